"""The pretraining loop end to end on a tiny ViT: run folder, timm-loadable backbone, exact resume, NaN guard."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fewshot.errors import FewshotError
from fewshot.inits import resolve_pretrain
from fewshot.methods.dino import DINO
from fewshot.pretrain_config import IMAGENET_MEAN, IMAGENET_STD, DinoConfig, PretrainConfig
from fewshot.train import load_run_config, pretrain

KWARGS: dict[str, Any] = {"img_size": 32, "patch_size": 8, "depth": 2}
CFG = PretrainConfig(
    model="vit_tiny_patch16_224", **KWARGS, epochs=2, batch_size=4, log_every=1, seed=1,
    dino=DinoConfig(local_crops=2, hidden_dim=32, bottleneck_dim=16, out_dim=64),
)  # fmt: skip


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (8, 3, 40, 48), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.fixture(scope="module")
def finished(images: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    pretrain(images, out, CFG, progress=False)
    return out


def test_run_folder_has_config_metrics_checkpoint_and_backbone(finished: Path) -> None:
    assert {p.name for p in finished.iterdir()} >= {
        "config.json", "metrics.jsonl", "checkpoint.safetensors", "backbone.safetensors"
    }  # fmt: skip
    saved = json.loads((finished / "config.json").read_text())
    assert saved["n_images"] == 8 and saved["plan"]["total_steps"] == 4
    assert saved["resolved"]["out_dim"] == 64
    assert load_run_config(finished) == resolve_pretrain(CFG)[0]  # saved with the values the library derived
    assert load_run_config(finished).optim.lr == 5e-4 and load_run_config(finished).mean == IMAGENET_MEAN
    lines = [json.loads(ln) for ln in (finished / "metrics.jsonl").read_text().splitlines()]
    steps = [ln for ln in lines if ln["kind"] == "step"]
    assert [ln["step"] for ln in steps] == [1, 2, 3, 4]
    assert [ln["epoch"] for ln in lines if ln["kind"] == "epoch"] == [0, 1]
    for ln in lines:
        assert {"step", "epoch", "loss", "lr", "teacher_entropy", "feature_std"} <= set(ln)
        assert ln["images_per_s"] > 0


def test_backbone_loads_into_timm_and_is_the_teacher(finished: Path) -> None:
    path = finished / "backbone.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["architecture"] == "vit_tiny_patch16_224"
    assert json.loads(meta["model_kwargs"]) == KWARGS
    assert json.loads(meta["img_size"]) == 32 and len(json.loads(meta["mean"])) == 3
    model = timm.create_model(
        meta["architecture"], pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0,
        **json.loads(meta["model_kwargs"]),
    )  # fmt: skip
    state = load_file(str(path))
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    teacher = load_file(str(finished / "checkpoint.safetensors"))
    assert torch.equal(teacher["model/teacher.backbone.cls_token"], state["cls_token"])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 192)


def test_resume_continues_at_the_saved_step_and_matches_an_uninterrupted_run(
    images: torch.Tensor, finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = DINO.after_step

    def crash_in_epoch_two(self: DINO, step: int) -> None:
        original(self, step)
        if step == 2:
            raise KeyboardInterrupt  # killed after the epoch-1 checkpoint (2 steps) was written

    monkeypatch.setattr(DINO, "after_step", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        pretrain(images, tmp_path, CFG, progress=False)
    monkeypatch.setattr(DINO, "after_step", original)
    seen: list[int] = []

    def record(self: DINO, batch: dict, step: int) -> dict:
        seen.append(step)
        return _FORWARD(self, batch, step)

    monkeypatch.setattr(DINO, "forward", record)
    pretrain(images, tmp_path, CFG, progress=False)
    assert seen == [2, 3]  # resumed at the saved step, not from scratch
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 4, 4]  # step lines + epoch lines, none duplicated by the resume
    resumed = load_file(str(tmp_path / "backbone.safetensors"))
    straight = load_file(str(finished / "backbone.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)  # bit-identical to the uninterrupted run


def test_a_kill_right_after_the_final_checkpoint_leaves_the_final_backbone(
    images: torch.Tensor, finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fewshot.loop

    original = fewshot.loop.save_run_checkpoint

    def die_after_the_last(run: Any, model: Any, opt: Any, state: dict) -> None:
        original(run, model, opt, state)
        if state["step"] == state["total_steps"]:
            raise KeyboardInterrupt  # as if killed before anything after the final checkpoint ran

    monkeypatch.setattr(fewshot.loop, "save_run_checkpoint", die_after_the_last)
    with pytest.raises(KeyboardInterrupt):
        pretrain(images, tmp_path, CFG, progress=False)
    monkeypatch.setattr(fewshot.loop, "save_run_checkpoint", original)
    pretrain(images, tmp_path, CFG, progress=False)  # already finished: nothing to redo
    resumed = load_file(str(tmp_path / "backbone.safetensors"))
    straight = load_file(str(finished / "backbone.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_damaged(
    images: torch.Tensor, finished: Path, tmp_path: Path
) -> None:
    import shutil

    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    newest = tmp_path / "checkpoint-000000004.safetensors"
    assert {p.name for p in tmp_path.glob("checkpoint-*")} == {newest.name, "checkpoint-000000002.safetensors"}
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, e.g. by a full disk
    (tmp_path / "checkpoint.safetensors").write_bytes(newest.read_bytes())
    pretrain(images, tmp_path, CFG, progress=False)  # resumes at step 2 and redoes steps 2, 3
    resumed = load_file(str(tmp_path / "backbone.safetensors"))
    straight = load_file(str(finished / "backbone.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert load_file(str(newest)).keys() == load_file(str(finished / "checkpoint.safetensors")).keys()


_FORWARD = DINO.forward


def test_resume_with_other_settings_is_refused(images: torch.Tensor, finished: Path) -> None:
    from dataclasses import replace

    with pytest.raises(FewshotError, match="batch_size"):
        pretrain(images, finished, replace(CFG, batch_size=2), progress=False)


def test_non_finite_loss_stops_with_the_step(images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seen: list[int] = []

    def nan_loss(self: DINO, batch: dict, step: int) -> dict:
        seen.append(step)
        out = _FORWARD(self, batch, step)
        if step == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(DINO, "forward", nan_loss)
    cfg = dataclasses.replace(CFG, log_every=50)  # on the CPU the check does not wait for a log step
    with pytest.raises(FewshotError, match=r"non-finite at step 1 .*lower learning rate"):
        pretrain(images, tmp_path, cfg, progress=False)
    assert seen == [0, 1]  # stopped within one step


def test_bad_settings_are_one_line_errors(images: torch.Tensor, tmp_path: Path) -> None:
    from dataclasses import replace

    with pytest.raises(FewshotError, match="batch-size"):
        pretrain(images, tmp_path / "a", replace(CFG, batch_size=64), progress=False)
    with pytest.raises(FewshotError, match="CUDA"):
        pretrain(images, tmp_path / "b", replace(CFG, device="cpu", precision="bf16"), progress=False)
    with pytest.raises(FewshotError, match="timm"):
        pretrain(images, tmp_path / "c", replace(CFG, model="not_a_model"), progress=False)


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "recipes").glob("dino-*.toml")), ids=str)
def test_recipes_set_only_known_pretrain_keys(recipe: Path) -> None:
    from fewshot.config import apply, load_recipe

    table = load_recipe(recipe)
    assert set(table) == {"pretrain"}
    cfg = apply(PretrainConfig(), table["pretrain"], source=f"recipe {recipe.name}")
    assert cfg.method == "dino" and (cfg.img_size or 224) % (cfg.patch_size or 16) == 0  # None: from --init


def test_warmup_is_steps_else_epochs_else_ten_epochs_capped_at_a_tenth() -> None:
    from fewshot.pretrain_config import OptimConfig
    from fewshot.train import _warmup_steps

    assert _warmup_steps(OptimConfig(warmup_steps=7), 40, 1000) == 7
    assert _warmup_steps(OptimConfig(warmup_epochs=2.5), 40, 1000) == 100
    assert _warmup_steps(OptimConfig(), 40, 1000) == 100  # 10% of the run < 10 epochs (400)
    assert _warmup_steps(OptimConfig(), 40, 100_000) == 400  # 10 epochs


def test_monitor_logs_the_knn_accuracy_of_the_backbone_every_epoch(
    images: torch.Tensor, digits: tuple[Path, Path], tmp_path: Path
) -> None:
    from fewshot.backbones import load_backbone
    from fewshot.monitor import KnnMonitor

    cfg = dataclasses.replace(CFG, monitor=str(digits[0]))
    pretrain(images, tmp_path / "run", cfg, progress=False)
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accuracies = [ln["knn_top1"] for ln in lines if ln["kind"] == "epoch"]
    assert len(accuracies) == 2
    # the last one is the k-NN accuracy of the saved backbone (DINO: the teacher)
    final = load_backbone(str(tmp_path / "run")).model
    mon = KnnMonitor.from_source(str(digits[0]), 32, IMAGENET_MEAN, IMAGENET_STD, progress=False)
    assert accuracies[-1] == pytest.approx(mon(final, torch.device("cpu"))["knn_top1"])


def test_a_bad_monitor_folder_fails_before_training(images: torch.Tensor, tmp_path: Path) -> None:
    with pytest.raises(FewshotError, match="--monitor"):
        pretrain(images, tmp_path / "run", dataclasses.replace(CFG, monitor=str(tmp_path / "nope")), progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "nope"], "nope"),
        (["--model", "not_a_model"], "not a timm architecture"),
        (["--method", "mae", "--img-size", "30"], "must be a multiple of patch_size 8, got 30"),
        (["--set", "pretrain.nope=1"], "unknown config key 'pretrain.nope'"),
        (["--init", "missing.safetensors"], "'missing.safetensors' does not exist"),
        (["--batch-size", "64"], "fewer than --batch-size 64"),
        (["--locked"], "in use by another fewshot process"),
    ],
    ids=["method", "model", "sizes", "recipe-key", "init", "batch", "lock"],
)
def test_every_setting_error_comes_before_any_image_is_read(
    args: list[str], message: str, digits: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fewshot import train
    from fewshot.cli import app
    from fewshot.runs import RunFolder

    def no_reading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("images were read before the settings were checked")

    monkeypatch.setattr(train, "open_store", no_reading)
    out = tmp_path / "run"
    out.mkdir()
    base = ["pretrain", str(digits[0]), "--out", str(out), "--model", "vit_tiny_patch16_224", "--img-size", "32",
            "--patch-size", "8", "--depth", "1", "--steps", "2", "--batch-size", "4", "-q"]  # fmt: skip
    with RunFolder(out).lock() if args == ["--locked"] else contextlib.nullcontext():
        result = CliRunner().invoke(app, base + [a for a in args if a != "--locked"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and message in result.output


def test_the_python_api_pretrains_a_folder_named_by_its_path(tmp_path: Path) -> None:
    from PIL import Image

    import fewshot

    data = tmp_path / "unlabeled"
    data.mkdir()
    pixels = torch.randint(0, 256, (8, 40, 48, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    for i, image in enumerate(pixels.numpy()):
        Image.fromarray(image).save(data / f"{i}.png")
    summary = fewshot.pretrain(str(data), tmp_path / "run", dataclasses.replace(CFG, epochs=1), progress=False)
    assert summary.steps == 2 and summary.backbone.is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["n_images"] == 8


def test_an_epoch_warning_is_shown_once_and_again_at_the_end_but_logged_every_epoch(
    images: torch.Tensor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fewshot.pretrain_config import MaeConfig

    cfg = dataclasses.replace(
        CFG, method="mae", epochs=4, mae=MaeConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    )
    with caplog.at_level("WARNING", logger="fewshot"):
        pretrain(images, tmp_path / "run", cfg, progress=False)  # noise: MAE cannot beat each patch's mean
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [w for x in lines if x["kind"] == "epoch" for w in x["warnings"] if "reconstructs little" in w]
    shown = [r for r in caplog.records if "reconstructs little" in r.getMessage()]
    assert len(logged) == 4 and len(shown) == 2  # the first epoch, and the last


def test_a_run_from_random_weights_is_not_advised_to_tune_the_adaptation_guard(
    images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fewshot.loop

    advice: list[Any] = []
    real = fewshot.loop.StartPoint

    def spy(best: Path, margin: float, advise: Any, save: Any) -> Any:
        advice.append(advise)
        return real(best, margin, advise, save)

    monkeypatch.setattr(fewshot.loop, "StartPoint", spy)
    pretrain(images, tmp_path / "run", dataclasses.replace(CFG, epochs=1), progress=False)
    text = advice[0]()
    assert "no adapt.* setting applies" in text and "adapt.backbone_lr_scale" not in text
