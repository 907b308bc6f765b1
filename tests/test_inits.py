"""--init: any backbone spec, offline from a local hub cache; what the run derives from it and records; RUN:init
and the paired difference run − init in evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from fewshot.backbones import load_backbone
from fewshot.errors import FewshotError
from fewshot.evaluation import evaluate
from fewshot.inits import resolve_init
from fewshot.pretrain_config import AdaptConfig, MaeConfig, PretrainConfig
from fewshot.runs import save_backbone
from fewshot.train import pretrain
from tests.conftest import TINY_VIT, write_hub_repo

KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2}
HUB_DATA = {
    "input_size": [3, 32, 32],
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "crop_pct": 0.9,
    "interpolation": "bilinear",
}
SMALL_MAE = ["pretrain.mae.decoder_dim=32", "pretrain.mae.decoder_depth=1", "pretrain.mae.decoder_heads=2"]

HUB_RUN = """
import json, sys, torch
from fewshot.backbones import load_backbone
from fewshot.cli import app
run = sys.argv[2]
args = ["pretrain", sys.argv[1], "--init", "hf-hub:acme/tiny-vit", "--method", "mae", "--steps", "2",
        "--batch-size", "4", "--out", run, "-q"] + [a for s in sys.argv[3:] for a in ("--set", s)]
try:
    app(args)
except SystemExit as e:
    assert e.code in (0, None), e.code
init = load_backbone(run + ":init")  # the weights the run started from, through the hub cache again
print(json.dumps({"init_sha": init.weights_sha256, "init_desc": json.loads(init.transform_desc),
                  "state": {k: v.flatten()[:4].tolist() for k, v in init.model.state_dict().items()}}))
"""


def test_init_from_a_local_hub_cache_sets_architecture_sizes_and_normalisation(
    digits: tuple[Path, Path], tmp_path: Path
) -> None:
    """The real hub code path, offline: `--init hf-hub:...` through the CLI with no --model/--img-size."""
    source = write_hub_repo(tmp_path / "hf", "acme/tiny-vit", KWARGS, HUB_DATA)
    run = tmp_path / "run"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", HUB_RUN, str(digits[0]), str(run), *SMALL_MAE], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads((run / "config.json").read_text())
    cfg, init = saved["config"], saved["init"]
    assert (cfg["model"], cfg["img_size"], cfg["patch_size"], cfg["depth"]) == ("vit_tiny_patch16_224", 32, 8, 2)
    assert cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.25] * 3 and cfg["init"] == "hf-hub:acme/tiny-vit"
    assert init["spec"] == "hf-hub:acme/tiny-vit" and init["sha256"].startswith("hub:")
    assert init["data"] == {"mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 0.9, "interpolation": "bilinear"}
    with safe_open(str(run / "backbone.safetensors"), framework="pt") as f:
        meta = f.metadata()
    # the exported backbone carries the init's normalisation and eval transform, and where it started
    assert json.loads(meta["mean"]) == [0.5] * 3 and json.loads(meta["std"]) == [0.25] * 3
    assert json.loads(meta["crop_pct"]) == 0.9 and json.loads(meta["interpolation"]) == "bilinear"
    assert json.loads(meta["init_sha256"]) == init["sha256"]
    back = json.loads(out.stdout.strip().splitlines()[-1])
    assert back["init_sha"] == init["sha256"] and back["init_desc"]["mean"] == [0.5] * 3
    assert all(back["state"][k] == v.flatten()[:4].tolist() for k, v in source.items())
    evaluated = load_backbone(str(run))  # the run is read as its init is: same eval transform
    assert json.loads(evaluated.transform_desc) == back["init_desc"]


def init_file(path: Path, seed: int = 5, crop_pct: float = 0.875) -> Path:
    """A tiny ViT's weights as a file with fewshot metadata: the stand-in for public weights."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **KWARGS)
    save_backbone(path, model, "vit_tiny_patch16_224", KWARGS, (0.5,) * 3, (0.5,) * 3, 32, crop_pct=crop_pct)
    return path


def test_random_init_and_pixels_are_not_weights_to_start_from() -> None:
    for spec in (TINY_VIT, "pixels"):
        with pytest.raises(FewshotError, match="not weights"):
            resolve_init(spec)


def test_explicit_settings_win_over_the_init(tmp_path: Path) -> None:
    from fewshot.inits import resolve_pretrain

    path = init_file(tmp_path / "w.safetensors")
    cfg, init = resolve_pretrain(PretrainConfig(init=str(path), img_size=48, std=(0.2,) * 3))
    assert init is not None and init.spec == str(path.resolve())
    assert (cfg.model, cfg.img_size, cfg.patch_size, cfg.depth) == ("vit_tiny_patch16_224", 48, 8, 2)
    assert cfg.mean == (0.5,) * 3 and cfg.std == (0.2,) * 3


@pytest.fixture(scope="module")
def adapted(digits: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder, init file): 2 MAE steps from a weights file."""
    base = tmp_path_factory.mktemp("adapted")
    path = init_file(base / "init.safetensors")
    cfg = PretrainConfig(
        method="mae", init=str(path), steps=2, batch_size=8, seed=0, mae=MaeConfig(decoder_dim=32, decoder_depth=1,
        decoder_heads=2), adapt=AdaptConfig(head_warmup_steps=1),
    )  # fmt: skip
    from fewshot.sources import open_source

    pretrain(open_source(digits[0]), base / "run", cfg, progress=False)
    return base / "run", path


def test_evaluate_reports_run_minus_init_over_the_same_supports(digits: tuple[Path, Path], adapted, tmp_path) -> None:
    run, _ = adapted
    report = evaluate(*digits, backbones=[f"{run}:pool=avg", f"{run}:init:pool=avg", "pixels:8"], out=tmp_path / "e")
    assert report["seeds"] == 10
    rows = [c for c in report["comparisons"] if c["kind"] == "init"]
    assert {(r["head"], r["shots"]) for r in rows} == {(h, k) for h in report["heads"] for k in report["shots"]}
    by = {(r["backbone"], r["head"], r["shots"]): r for r in report["results"]}
    for r in rows:
        assert (r["backbone"], r["reference"], r["n"]) == (f"{run}:pool=avg", f"{run}:init:pool=avg", 10)
        a, b = by[(r["backbone"], r["head"], r["shots"])], by[(r["reference"], r["head"], r["shots"])]
        diffs = [x["accuracy"] - y["accuracy"] for x, y in zip(a["per_seed"], b["per_seed"], strict=True)]
        assert r["difference"] == pytest.approx(sum(diffs) / len(diffs))
        assert r["wins"] == sum(d > 0 for d in diffs) and r["losses"] == sum(d < 0 for d in diffs)
    headline = " ".join(report["headline"])
    assert f"{run}:pool=avg" in headline and f"{run}:init:pool=avg" in headline  # run − init leads the report
    assert f"| {run}:init:pool=avg |" in (tmp_path / "e" / "report.md").read_text()


def test_run_init_is_refused_when_the_weights_changed(adapted) -> None:
    run, path = adapted
    assert load_backbone(f"{run}:init").weights_sha256 == load_backbone(str(path)).weights_sha256
    original = path.read_bytes()
    try:
        init_file(path, seed=6)
        with pytest.raises(FewshotError, match="changed since the run started"):
            load_backbone(f"{run}:init")
    finally:
        path.write_bytes(original)
    with pytest.raises(FewshotError, match="takes no options but :pool="):
        load_backbone(f"{run}:init:img_size=64")


def test_a_run_without_init_has_no_init_spec(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "backbone.safetensors").write_bytes(b"")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"init": None}))
    with pytest.raises(FewshotError, match="did not start from --init"):
        load_backbone(f"{tmp_path / 'run'}:init")
