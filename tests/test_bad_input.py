"""The bad-input corpus: real-world messes, each a counted and listed skip or a one-line error, never a traceback.

Every file is built at run time. Commands run through the CLI, as a user meets them.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fewshot.cli import app
from tests.conftest import TINY_VIT

runner = CliRunner()


def run(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def one_line_error(code: int, out: str, *needles: str) -> None:
    lines = [line for line in out.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, out
    for needle in needles:
        assert needle in lines[0], lines[0]


def photo(size: tuple[int, int] = (24, 24), seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming a decompression-bomb size, with almost no data."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo((30, 10)), "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 0, 250))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def multipage_tiff() -> bytes:
    return encode(photo(), "TIFF", save_all=True, append_images=[photo(seed=1)])


JPEG = encode(photo(), "JPEG")
PNG = encode(photo(), "PNG")
# name -> (bytes, expected: "ok" or a fragment of the skip reason)
FILES: dict[str, tuple[bytes, str]] = {
    "truncated.jpg": (JPEG[: len(JPEG) // 2], "truncated"),
    "truncated.png": (PNG[: len(PNG) // 2], "truncated"),
    "zero.jpg": (b"", "empty file"),
    "text.png": (b"just some words", "not an image"),
    "page.jpg": (b"<!DOCTYPE html><html><body>Not found</body></html>", "not an image"),
    "bomb.png": (huge_png(), "too large"),
    "cmyk.jpg": (encode(photo().convert("CMYK"), "JPEG"), "ok"),
    "deep16.png": (encode(Image.fromarray(np.full((9, 9), 40000, np.uint16)), "PNG"), "ok"),
    "palette.png": (encode(photo().convert("P"), "PNG", transparency=3), "ok"),
    "la.png": (encode(Image.new("LA", (5, 5), (90, 128)), "PNG"), "ok"),
    "rgba.png": (encode(Image.new("RGBA", (5, 5), (9, 9, 9, 10)), "PNG"), "ok"),
    "tiny.png": (encode(Image.new("RGB", (1, 1)), "PNG"), "ok"),
    "rotated.jpg": (exif_rotated(), "ok"),
    "animated.gif": (animated_gif(), "ok"),
    "pages.tif": (multipage_tiff(), "ok"),
    "notes.txt": (b"a readme", "not an image file"),
    ".hidden.jpg": (JPEG, "hidden"),
    ".DS_Store": (b"\0\0\0\1Bud1", "hidden"),
}


@pytest.fixture()
def messy(tmp_path: Path) -> Path:
    root = tmp_path / "messy"
    root.mkdir()
    for name, (data, _) in FILES.items():
        (root / name).write_bytes(data)
    (root / "broken.jpg").symlink_to(root / "missing.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    os.symlink(root, root / "subdir-loop")  # a folder symlink back to the root is not followed
    (root / os.fsdecode(b"caf\xe9-latin1.png")).write_bytes(PNG)  # a non-UTF-8 file name
    locked = root / "locked.png"
    locked.write_bytes(PNG)
    locked.chmod(0)
    return root


def test_messy_folder_extracts_good_images_and_lists_the_rest(messy: Path, tmp_path: Path) -> None:
    from fewshot.features import load_features

    code, out = run("extract", messy, "-b", "pixels:8", "-o", tmp_path / "f.safetensors", "-q")
    assert code == 0, out
    feats = load_features(tmp_path / "f.safetensors")
    reasons = {s["path"]: s["reason"] for s in feats.skipped}
    for name, (_, expected) in FILES.items():
        if expected == "ok":
            assert name in feats.paths, name
        else:
            assert expected in reasons[name], (name, reasons.get(name))
    assert reasons["broken.jpg"] == "broken symlink" and "loop.jpg" in reasons
    assert os.fsdecode(b"caf\xe9-latin1.png") in feats.paths
    if os.geteuid() == 0:  # root reads any file; elsewhere a locked file is a listed skip
        assert "locked.png" in feats.paths
    else:
        assert reasons["locked.png"] == "permission denied"
    assert f"skipped {len(feats.skipped)} file(s)" in out
    assert f"{len(feats.paths)} images" in out
    # The orientation was applied before resizing and the first frame of the animation was used.
    gif = feats.features[feats.paths.index("animated.gif")].reshape(3, 8, 8)
    assert gif[0].mean() > 0.9 and gif[2].mean() < 0.1


def labelled(root: Path, counts: dict[str, int], offset: int = 0) -> Path:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            photo(seed=offset + i + 100 * len(cls)).save(root / cls / f"{i}.png")
    return root


def _copied(t: Path, into: str) -> list[object]:
    """evaluate TRAIN TEST where one TEST image was copied, under another name, into TRAIN or the pool."""
    train, test = labelled(t / "tr", {"a": 3, "b": 3}), labelled(t / "te", {"a": 2, "b": 2}, offset=50)
    pool = t / "pool"
    pool.mkdir()
    photo(seed=999).save(pool / "u_0000.png")
    (train / "a" / "copy.png" if into == "train" else pool / "u_0001.png").write_bytes(
        (test / "b" / "1.png").read_bytes()
    )
    return ["evaluate", train, test, "-b", "pixels:4", "--shots", "1", "--seeds", "1", "--heads", "spread",
            "--unlabeled", pool, "-o", t / "ev"]  # fmt: skip


CASES: dict[str, tuple[Callable[[Path], list[object]], tuple[str, ...]]] = {
    "empty folder": (lambda t: ["extract", (t / "e").mkdir() or t / "e", "-o", _feats(t)], ("no readable images",)),
    "only broken files": (
        lambda t: ["extract", _write(t / "b" / "x.jpg", b"junk").parent, "-o", _feats(t)],
        ("no readable images",),
    ),
    "missing data": (lambda t: ["extract", t / "nowhere", "-o", _feats(t)], ("does not exist",)),
    "fewer images than shots": (
        lambda t: ["probe", labelled(t / "d", {"a": 5, "b": 2}), "-b", "pixels:4", "--shots", "3", "-o", t / "h"],
        ("class 'b' has 2 labelled image(s)", "lower --shots"),
    ),
    "unlabelled train": (
        lambda t: ["probe", _write(t / "u" / "x.png", PNG).parent, "-b", "pixels:4", "-o", t / "h"],
        ("has no labels",),
    ),
    "test classes differ": (
        lambda t: [
            "evaluate",
            labelled(t / "tr", {"a": 3, "b": 3}),
            labelled(t / "te", {"a": 2, "zebra": 2}, offset=50),
            "-b",
            "pixels:4",
            "--shots",
            "1",
            "--seeds",
            "1",
            "-o",
            t / "ev",
        ],
        ("not in TRAIN: zebra",),
    ),
    "csv without path column": (
        lambda t: ["extract", _write(t / "m.csv", b"file,label\nx.png,1\n"), "-o", _feats(t)],
        ("no 'path' column",),
    ),
    "missing run folder": (
        lambda t: _extract(t, "-b", t / "runs" / "nope"),
        ("not a file, a run folder or a timm model",),
    ),
    "run folder without weights": (
        lambda t: _extract(t, "-b", (t / "run").mkdir() or t / "run"),
        ("no backbone.safetensors",),
    ),
    "weights of the wrong architecture": (
        lambda t: _extract(t, "-b", _tiny_weights(t) + ",embed_dim=96"),
        ("do not fit this architecture",),
    ),
    "pickle that runs code": (
        lambda t: [
            "extract",
            labelled(t / "d", {"a": 1}),
            "-b",
            _evil(t) + ":arch=vit_tiny_patch16_224",
            "-o",
            _feats(t),
        ],
        ("refusing to load",),
    ),
    "unknown head": (
        lambda t: ["probe", labelled(t / "d", {"a": 2, "b": 2}), "-b", "pixels:4", "--head", "svm", "-o", t / "h"],
        ("unknown head 'svm'",),
    ),
    # silently wrong before (issue 17): bad values are refused when the config is built
    "k-NN temperature 0": (lambda t: _probe(t, "--set", "heads.knn.temperature=0"), ("temperature' must be > 0",)),
    "k-NN temperature -1": (lambda t: _probe(t, "--set", "heads.knn.temperature=-1"), ("must be > 0, got -1.0",)),
    "k-NN k -5": (lambda t: _probe(t, "--set", "heads.knn.k=-5"), ("heads.knn.k' must be ≥ 1, got -5",)),
    "pretrain --steps 0": (lambda t: _pretrain(t, "--steps", "0"), ("--steps must be ≥ 1, got 0",)),
    "pretrain image size not a multiple of the patch": (
        lambda t: _pretrain(t, "--img-size", "30", "--patch-size", "8"),
        ("--img-size must be a multiple of patch_size 8, got 30",),
    ),
    "pretrain image size not a multiple of the model's own patch": (
        lambda t: _pretrain(t, "--img-size", "30"),
        ("--img-size 30 is not a multiple of vit_tiny_patch16_224's patch size 16",),
    ),
    "extract --batch-size 0": (
        lambda t: _extract(t, "--batch-size", "0"),
        ("--batch-size must be ≥ 1, got 0",),
    ),
    "extract --batch-size -4": (
        lambda t: _extract(t, "--batch-size", "-4"),
        ("--batch-size must be ≥ 1, got -4",),
    ),
    "a text file named .pth": (
        lambda t: _extract(t, "-b", _text_pth(t) + ":arch=vit_tiny_patch16_224"),
        ("is not a PyTorch checkpoint",),
    ),
    "a text file named .pth as --init": (
        lambda t: _pretrain(t, "--init", _text_pth(t)),
        ("is not a PyTorch checkpoint",),
    ),
    "pool last4 on a CNN": (
        lambda t: _extract(t, "-b", "resnet10t", "--pool", "last4"),
        ("needs a ViT with a class token and blocks; use --pool avg",),
    ),
    "pool last0": (
        lambda t: _extract(t, "--pool", "last0"),
        ("--pool must be cls, avg, cls+avg or lastN with N ≥ 1",),
    ),
    "pixels with a word for a size": (
        lambda t: _extract(t, "-b", "pixels:abc"),
        ("pixels takes only a size in pixels",),
    ),
    "a timm option without a value": (
        lambda t: _extract(t, "-b", "vit_tiny_patch16_224:img_size"),
        ("options after ':' must be key=value pairs",),
    ),
    "a recipe that is a folder": (
        lambda t: _probe(t, "--recipe", (t / "recipes").mkdir() or t / "recipes"),
        ("is a folder; pass a TOML file in it",),
    ),
    "attention at a size that is not whole patches": (
        lambda t: ["attention", labelled(t / "d", {"a": 1}), "-b", TINY_VIT, "--img-size", "33", "-o", t / "att"],
        ("not a whole number of 8x8 patches; use e.g. --img-size 32x32",),
    ),
    "extract --out with another format's name": (
        lambda t: ["extract", labelled(t / "d", {"a": 1}), "-o", t / "x.npy"],
        ("writes .safetensors files; name it",),
    ),
    "evaluate --out an existing file": (
        lambda t: [*_evaluate_args(t), "-o", _write(t / "taken", b"x")],
        ("is a file; pass a folder",),
    ),
    "probe --out an existing file": (
        lambda t: [*_probe(t)[:-2], "-o", _write(t / "taken", b"x")],
        ("is a file; pass a folder",),
    ),
    "extract --out a folder": (
        lambda t: ["extract", labelled(t / "d", {"a": 1}), "-o", (t / "d.safetensors").mkdir() or t / "d.safetensors"],
        ("is a folder; pass a file name",),
    ),
    "predict --out a folder": (
        lambda t: ["predict", labelled(t / "d", {"a": 1}), "--head", t, "-o", (t / "p").mkdir() or t / "p"],
        ("is a folder; pass a file name",),
    ),
    "--out under a file": (
        lambda t: [*_evaluate_args(t), "-o", _write(t / "taken", b"x") / "eval"],
        ("which is a file; choose another path",),
    ),
    "blank labels in a labelled manifest": (
        lambda t: ["probe", _manifest(t, "a.png,hat\nb.png,\nc.png,cap\n"), "-b", "pixels:4", "-o", t / "h"],
        ("leaves 1 blank (line(s) 3)",),
    ),
    "a manifest listing each image twice counts each once": (
        lambda t: [
            "probe",
            _manifest(t, "a.png,hat\nb.png,cap\n" * 2),
            "-b",
            "pixels:4",
            "--shots",
            "2",
            "-o",
            t / "h",
        ],
        ("class 'cap' has 1 labelled image(s), fewer than the 2 shots",),
    ),
    "a stray image at an ImageFolder's root": (
        lambda t: ["probe", _stray(t), "-b", "pixels:4", "-o", t / "h"],
        ("but also 1 image(s) beside them (stray.png)", "imagefolder:"),
    ),
    "weights that leave half the model random": (
        lambda t: [
            "extract",
            labelled(t / "d", {"a": 1}),
            "-b",
            _tiny_weights(t).replace("depth=2", "depth=4"),
            "-o",
            _feats(t),
        ],
        ("leave 49% of the model's parameters at random init", ":strict=false"),
    ),
    "unknown head suffix": (
        lambda t: ["evaluate", *_pair(t), "-b", "pixels:4", "--heads", "knn+whiten", "-o", t / "ev"],
        ("unknown head 'knn+whiten'", "+center"),
    ),
    "TEST image copied into TRAIN": (lambda t: _copied(t, "train"), ("also in TRAIN", "b/1.png = a/copy.png")),
    "TEST image copied into the pool": (
        lambda t: _copied(t, "pool"),
        ("also in the unlabeled pool", "b/1.png = u_0001.png", "--allow-overlap"),
    ),
    "unknown selection strategy": (
        lambda t: ["evaluate", *_pair(t), "-b", "pixels:4", "--select", "random,best", "-o", t / "ev"],
        ("--select must be", "typiclust", "got ('random', 'best')"),
    ),
    "reference is not a backbone": (
        lambda t: ["evaluate", *_pair(t), "-b", "pixels:4", "--reference", "pixels:8", "-o", t / "ev"],
        ("--reference 'pixels:8' is not one of the backbones",),
    ),
    "select budget beyond the images": (
        lambda t: ["select", labelled(t / "d", {"a": 3}), "-b", "pixels:4", "--budget", "5", "-o", t / "s"],
        ("only 3 are not yet labelled", "lower --budget"),
    ),
    "select without a budget": (
        lambda t: ["select", labelled(t / "d", {"a": 3}), "-b", "pixels:4", "-o", t / "s"],
        ("--budget must be a positive number",),
    ),
    "probcover without a class count": (
        lambda t: ["select", labelled(t / "d", {"a": 3}), "--strategy", "probcover", "-n", "2", "-o", t / "s"],
        ("--classes N",),
    ),
    "spread with no neighbours": (
        lambda t: _head_setting(t, "spread", "heads.spread.k=0"),
        ("config key 'heads.spread.k' must be ≥ 1, got 0",),
    ),
    "selftrain threshold above 1": (
        lambda t: _head_setting(t, "selftrain", "heads.selftrain.threshold=2"),
        ("config key 'heads.selftrain.threshold' must be in [0, 1), got 2.0",),
    ),
    "spread alpha outside (0, 1)": (
        lambda t: _head_setting(t, "spread", "heads.spread.alpha=1.5"),
        ("config key 'heads.spread.alpha' must be in (0, 1), got 1.5",),
    ),
    "select --out an existing file": (
        lambda t: ["select", labelled(t / "d", {"a": 3}), "-b", "pixels:4", "-n", "1", "-o", _write(t / "taken", b"x")],
        ("is a file; pass a folder",),
    ),
    "select excluding a missing folder": (
        lambda t: ["select", labelled(t / "d", {"a": 3}), "-n", "1", "--exclude", t / "nope", "-o", t / "s"],
        ("--exclude", "does not exist"),
    ),
}


def _probe(t: Path, *extra: object) -> list[object]:
    return ["probe", labelled(t / "d", {"a": 2, "b": 2}), "-b", "pixels:4", *extra, "-o", t / "h"]


def _pretrain(t: Path, *extra: object) -> list[object]:
    data = labelled(t / "d", {"a": 4})
    return ["pretrain", data, "--model", "vit_tiny_patch16_224", "--depth", "1", "--steps", "1", "--batch-size", "2",
            *extra, "-o", t / "run"]  # fmt: skip


def _evaluate_args(t: Path) -> list[object]:
    return ["evaluate", *_pair(t), "-b", "pixels:4", "--shots", "1", "--seeds", "2"]


def _manifest(t: Path, rows: str) -> Path:
    for name in "abc":
        photo(seed=ord(name)).save(t / f"{name}.png")
    return _write(t / "m.csv", ("path,label\n" + rows).encode())


def _stray(t: Path) -> Path:
    root = labelled(t / "mixed", {"a": 2, "b": 2})
    photo().save(root / "stray.png")
    return root


def _text_pth(t: Path) -> str:
    return str(_write(t / "notes.pth", b"hello, these are my notes\n"))


def _extract(t: Path, *extra: object) -> list[object]:
    return ["extract", labelled(t / "d", {"a": 1}), *extra, "-o", _feats(t)]


def _feats(t: Path) -> Path:
    return t / "f.safetensors"


def _pair(t: Path) -> list[Path]:
    return [labelled(t / "tr", {"a": 3, "b": 3}), labelled(t / "te", {"a": 2, "b": 2}, offset=50)]


def _head_setting(t: Path, head: str, setting: str) -> list:
    """evaluate with one head and one --set value of it."""
    return ["evaluate", *_pair(t), "-b", "pixels:4", "--heads", head, "-s", setting, "-o", t / "e"]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tiny_weights(t: Path) -> str:
    from fewshot.backbones import load_backbone

    torch.save(load_backbone(TINY_VIT).model.state_dict(), t / "w.pth")
    return f"{t / 'w.pth'}:arch=vit_tiny_patch16_224,img_size=32,patch_size=8,depth=2"


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def _evil(t: Path) -> str:
    import pickle

    with open(t / "evil.pth", "wb") as fh:
        pickle.dump({"state_dict": _Exploit()}, fh, protocol=2)
    return str(t / "evil.pth")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_error(case: str, tmp_path: Path) -> None:
    build, needles = CASES[case]
    code, out = run(*build(tmp_path), "-q")
    one_line_error(code, out, *needles)


# ---------------------------------------------------------------------------------------------- silently wrong before


def _run_folder(root: Path, seed: int, depth: int = 2, step: int = 4, total: int = 4) -> Path:
    """A run folder as `fewshot pretrain` leaves it (backbone.safetensors with its metadata), without training."""
    import timm

    from fewshot.runs import save_backbone

    torch.manual_seed(seed)
    kwargs = {"img_size": 32, "patch_size": 8, "depth": depth}
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
    root.mkdir(parents=True, exist_ok=True)
    save_backbone(root / "backbone.safetensors", model, "vit_tiny_patch16_224", kwargs, (0.5,) * 3, (0.5,) * 3, 32,
                  {"method": "dino", "step": step, "total_steps": total})  # fmt: skip
    return root


def test_a_relabelled_manifest_gets_its_new_class_names(tmp_path: Path) -> None:
    csv = _manifest(tmp_path, "a.png,hat\nb.png,shoe\nc.png,shoe\n")
    code, out = run("probe", csv, "-b", "pixels:4", "-o", tmp_path / "h1", "-q")
    assert code == 0, out
    relabelled = _write(tmp_path / "m2.csv", b"path,label\na.png,headwear\nb.png,shoe\nc.png,shoe\n")  # same order
    code, out = run("probe", relabelled, "-b", "pixels:4", "-o", tmp_path / "h2", "-q")
    assert code == 0, out
    import json

    classes = [json.loads((tmp_path / h / "head.json").read_text())["info"]["classes"] for h in ("h1", "h2")]
    assert classes == [["hat", "shoe"], ["headwear", "shoe"]]


def test_predict_uses_the_backbone_the_head_was_fitted_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = labelled(tmp_path / "d", {"a": 3, "b": 3})
    first, second = tmp_path / "first", tmp_path / "second"
    _run_folder(first / "runs" / "r0", seed=1)
    _run_folder(second / "runs" / "r0", seed=2)  # another project with a run of the same name
    monkeypatch.chdir(first)
    assert run("probe", data, "-b", "runs/r0", "--head", "logreg", "-o", tmp_path / "head", "-q")[0] == 0
    code, out = run("predict", data, "--head", tmp_path / "head", "-o", tmp_path / "p1.csv", "-q")
    assert code == 0, out
    monkeypatch.chdir(second)  # runs/r0 here is another backbone: the head still uses its own
    code, out = run("predict", data, "--head", tmp_path / "head", "-o", tmp_path / "p2.csv", "-q")
    assert code == 0, out
    assert (tmp_path / "p1.csv").read_text() == (tmp_path / "p2.csv").read_text()

    _run_folder(first / "runs" / "r0", seed=3)  # retrained in place
    code, out = run("predict", data, "--head", tmp_path / "head", "-o", tmp_path / "p3.csv", "-q")
    one_line_error(code, out, "'runs/r0' has changed since the head was fitted", "--allow-backbone-change")
    assert not (tmp_path / "p3.csv").exists()
    code, out = run("predict", data, "--head", tmp_path / "head", "-o", tmp_path / "p3.csv", "-q",
                    "--allow-backbone-change")  # fmt: skip
    assert code == 0 and (tmp_path / "p3.csv").is_file(), out

    (first / "runs" / "r0" / "backbone.safetensors").unlink()
    (first / "runs" / "r0").rmdir()
    code, out = run("predict", data, "--head", tmp_path / "head", "-o", tmp_path / "p4.csv", "-q")
    one_line_error(code, out, "(given as 'runs/r0' to probe) no longer exists")


def test_partial_loads_are_reported_and_refused_unless_asked(tmp_path: Path) -> None:
    data = labelled(tmp_path / "d", {"a": 1})
    weights = _tiny_weights(tmp_path)  # 2 blocks
    code, out = run("extract", data, "-b", weights.replace("depth=2", "depth=4") + ",strict=False", "-o",
                    _feats(tmp_path), "-q")  # fmt: skip
    assert code == 0, out
    assert "warning:" in out and "24 missing (blocks.2." in out and "48.9% of the parameters left at random init" in out
    code, out = run("extract", data, "-b", weights.replace("depth=2", "depth=1"), "-o", _feats(tmp_path), "-q")
    assert code == 0, out
    assert "warning:" in out and "12 unexpected (blocks.1." in out and "not used" in out


def test_an_unfinished_run_warns_and_the_report_records_it(tmp_path: Path) -> None:
    import json

    run_dir = _run_folder(tmp_path / "run", seed=1, step=48, total=400)
    code, out = run(
        "evaluate", *_pair(tmp_path), "-b", run_dir, "--shots", "1", "--seeds", "3", "-o", tmp_path / "ev", "-q"
    )
    assert code == 0, out
    assert "warning:" in out and "unfinished run: step 48 of 400" in out
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert "step 48 of 400" in report["backbone_notes"][str(run_dir)]
    assert "step 48 of 400" in (tmp_path / "ev" / "report.md").read_text()


def test_two_seeds_give_a_clipped_interval_and_a_warning(tmp_path: Path) -> None:
    code, out = run(*_evaluate_args(tmp_path), "--heads", "prototype", "-o", tmp_path / "ev", "-q")
    assert code == 0, out
    assert "2 seeds give a 95% interval 12.7 standard errors wide" in out
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "too few to conclude" in md and not any(f"± {x}" in md for x in range(100, 1000))  # no "± 158.8"


def test_a_test_set_with_fewer_classes_leaks_no_sklearn_warning(tmp_path: Path) -> None:
    train = labelled(tmp_path / "tr", {"a": 3, "b": 3, "c": 3})
    test = labelled(tmp_path / "te", {"a": 2}, offset=50)
    code, out = run("probe", train, "-b", "pixels:4", "--test", test, "-o", tmp_path / "h", "-q")
    assert code == 0 and "test accuracy" in out, out
    assert "y_pred contains classes not in y_true" not in out and "Warning" not in out


def test_an_output_folder_in_use_is_refused(tmp_path: Path) -> None:
    from fewshot.outputs import folder_lock

    (tmp_path / "ev").mkdir()
    with folder_lock(tmp_path / "ev"):
        code, out = run(*_evaluate_args(tmp_path), "-o", tmp_path / "ev", "-q")
    one_line_error(code, out, "in use by another fewshot process")


def test_outputs_take_the_users_file_mode(tmp_path: Path) -> None:
    import stat

    old = os.umask(0o022)
    try:
        data = labelled(tmp_path / "d", {"a": 2, "b": 2})
        assert run("extract", data, "-b", "pixels:4", "-o", _feats(tmp_path), "-q")[0] == 0
        assert run("probe", data, "-b", "pixels:4", "-o", tmp_path / "h", "-q")[0] == 0
    finally:
        os.umask(old)
    for path in (_feats(tmp_path), tmp_path / "h" / "head.safetensors", tmp_path / "h" / "head.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
