"""Backbone specs: parsing, random init, local weights in every common layout, and refusing unsafe pickles."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from fewshot.backbones import load_backbone
from fewshot.errors import FewshotError
from fewshot.specs import parse_spec
from tests.conftest import TINY_VIT

ARCH = "vit_tiny_patch16_224"
KW = {"img_size": 32, "patch_size": 8, "depth": 2}


def tiny(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, num_classes=0, **KW)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_parse_spec_variants(tmp_path: Path) -> None:
    assert parse_spec("pixels").size == 32 and parse_spec("pixels:64").size == 64
    spec = parse_spec(f"{ARCH}:img_size=32,patch_size=8,seed=3")
    assert (spec.kind, spec.name, spec.kwargs, spec.seed) == ("timm", ARCH, {"img_size": 32, "patch_size": 8}, 3)
    hub = parse_spec("hf-hub:timm/vit_small_patch16_224.dino:img_size=96")
    assert (hub.kind, hub.name, hub.kwargs) == ("hub", "hf-hub:timm/vit_small_patch16_224.dino", {"img_size": 96})
    (tmp_path / "w.pth").write_bytes(b"x")
    assert parse_spec(f"{tmp_path / 'w.pth'}:arch={ARCH}").name == ARCH
    groups = parse_spec(f"{ARCH}:img_size=32,patch_size=8:pool=avg")  # a second group, as a user would append it
    assert (groups.name, groups.kwargs, groups.pool) == (ARCH, {"img_size": 32, "patch_size": 8}, "avg")
    assert parse_spec(f"{tmp_path / 'w.pth'}:arch={ARCH}:pool=avg").pool == "avg"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("not_a_model_name", "not a file, a run folder or a timm model"),
        ("missing/weights.safetensors", "does not exist"),
        ("pixels:size=8,depth=2", "pixels takes only a size"),
        ("", "empty backbone spec"),
    ],
)
def test_bad_specs_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(FewshotError, match=message):
        load_backbone(spec)


def test_run_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(FewshotError, match="no backbone.safetensors"):
        load_backbone(str(tmp_path))


def test_random_init_is_seeded_and_sized() -> None:
    a, b = load_backbone(TINY_VIT), load_backbone(TINY_VIT)
    assert same_weights(a.model, b.model) and a.weights_sha256 == b.weights_sha256
    assert a.weights_sha256 != load_backbone(TINY_VIT + ",seed=1").weights_sha256
    assert a.transform(Image.new("RGB", (50, 70))).shape == (3, 32, 32)


def test_pixels_flattens_resized_image() -> None:
    bb = load_backbone("pixels:4")
    x = bb.transform(Image.new("RGB", (9, 5), (255, 0, 0)))
    assert bb.model is None and x.shape == (3, 4, 4) and float(x[0].min()) == 1.0 and float(x[1].max()) == 0.0


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"teacher": {f"backbone.{k}": v for k, v in s.items()}, "epoch": 3},
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
        lambda s: {"model": s},
        lambda s: {"student": {f"module.backbone.{k}": v for k, v in s.items()}},
    ],
    ids=["plain", "dino-teacher", "ddp-state_dict", "model", "student"],
)
def test_pth_layouts_are_unwrapped(tmp_path: Path, wrap: object) -> None:
    source = tiny()
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(source.state_dict()), path)  # type: ignore[operator]
    bb = load_backbone(f"{path}:arch={ARCH},img_size=32,patch_size=8,depth=2")
    assert same_weights(bb.model, source) and bb.load_report == ""


def test_safetensors_with_our_metadata_needs_no_arch(tmp_path: Path) -> None:
    source = tiny()
    path = tmp_path / "backbone.safetensors"
    meta = {"architecture": ARCH, "model_kwargs": '{"img_size": 32, "patch_size": 8, "depth": 2}'}
    save_file(source.state_dict(), str(path), metadata=meta)
    for spec in (str(path), str(tmp_path)):  # the file, or the run folder holding it
        bb = load_backbone(spec)
        assert same_weights(bb.model, source) and len(bb.weights_sha256) == 64


def test_missing_keys_are_reported(tmp_path: Path) -> None:
    state = tiny().state_dict()
    state.pop("norm.weight")
    state["extra.thing"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pt")
    report = load_backbone(f"{tmp_path / 'w.pt'}:arch={ARCH},img_size=32,patch_size=8,depth=2").load_report
    assert "1 missing (norm.weight;" in report and "1 unexpected (extra.thing;" in report


def test_weights_without_architecture(tmp_path: Path) -> None:
    save_file(tiny().state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(FewshotError, match="add :arch="):
        load_backbone(str(tmp_path / "w.safetensors"))


def test_wrong_architecture_is_a_clear_error(tmp_path: Path) -> None:
    torch.save(tiny().state_dict(), tmp_path / "w.pth")
    with pytest.raises(FewshotError, match="do not fit this architecture"):
        load_backbone(f"{tmp_path / 'w.pth'}:arch=vit_small_patch16_224,img_size=32,patch_size=8,depth=2")


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this would have run code",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Exploit()}, fh, protocol=2)
    with pytest.raises(FewshotError, match="refusing to load"):
        load_backbone(f"{path}:arch={ARCH}")
    assert "would have run code" not in capsys.readouterr().out


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"not really")
    with pytest.raises(FewshotError, match="not a readable safetensors"):
        load_backbone(str(tmp_path / "junk.safetensors"))


def test_pool_option_survives_every_kind_of_spec(tmp_path: Path) -> None:
    source = tiny()
    meta = {"architecture": ARCH, "model_kwargs": '{"img_size": 32, "patch_size": 8, "depth": 2}'}
    save_file(source.state_dict(), str(tmp_path / "backbone.safetensors"), metadata=meta)
    for spec in (f"{tmp_path}:pool=avg", f"{tmp_path / 'backbone.safetensors'}:pool=avg", TINY_VIT + ",pool=avg"):
        assert load_backbone(spec).pool == "avg", spec
    assert load_backbone(str(tmp_path)).pool is None


HUB_CHECK = """
import json, sys, torch, timm
from pathlib import Path
from safetensors.torch import save_file
from fewshot.backbones import load_backbone
root = Path(sys.argv[1]) / "hub" / "models--acme--tiny-vit"
snapshot = root / "snapshots" / ("0" * 40)
snapshot.mkdir(parents=True)
(root / "refs").mkdir()
(root / "refs" / "main").write_text("0" * 40)
kwargs = {"img_size": 32, "patch_size": 8, "depth": 2}
torch.manual_seed(3)
source = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
save_file(source.state_dict(), str(snapshot / "model.safetensors"))
cfg = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bicubic"}
config = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "model_args": kwargs, "pretrained_cfg": cfg}
(snapshot / "config.json").write_text(json.dumps(config))
bb = load_backbone("hf-hub:acme/tiny-vit")
same = all(torch.equal(v, source.state_dict()[k]) for k, v in bb.model.state_dict().items())
print(same, json.loads(bb.transform_desc)["input_size"], bb.weights_sha256.startswith("hub:"))
"""


def test_hf_hub_names_load_through_timm_from_a_local_hub_cache(tmp_path: Path) -> None:
    """The real hub code path, offline: a repository laid out in the local Hugging Face cache."""
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}  # read when huggingface_hub is imported
    out = subprocess.run([sys.executable, "-c", HUB_CHECK, str(tmp_path)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-5:] == ["True", "[3,", "32,", "32]", "True"]


def test_unreachable_hub_name_is_one_line(tmp_path: Path) -> None:
    code = "from fewshot.backbones import load_backbone; load_backbone('hf-hub:acme/missing')"
    wrapped = (
        f"from fewshot.errors import FewshotError\ntry:\n    {code}\nexcept FewshotError as e:\n    print('ERR', e)"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", wrapped], env=env, capture_output=True, text=True)
    assert out.stdout.startswith("ERR cannot load 'hf-hub:acme/missing'"), out.stdout + out.stderr[-1000:]
