"""Guarded adaptation, one mechanism for DINO and MAE: the head warm-up leaves the backbone bitwise unchanged, the
layer-wise learning rates per block, DINO's high teacher momentum, BatchNorm backbones, the start-point monitor,
and the method's optimiser resolved alike by the Python API and the CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import fewshot.train
from fewshot import adapt
from fewshot.errors import FewshotError
from fewshot.methods import get_method
from fewshot.methods.base import RunPlan
from fewshot.methods.dino import resolve as dino_resolve
from fewshot.pretrain_config import METHOD_OPTIM, AdaptConfig, DinoConfig, MaeConfig, PretrainConfig
from fewshot.runs import save_backbone
from fewshot.train import pretrain

KWARGS = {"img_size": 32, "patch_size": 8, "depth": 3}
SMALL = {
    "dino": DinoConfig(local_crops=2, hidden_dim=32, bottleneck_dim=16, out_dim=64),
    "mae": MaeConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2),
}


def init_file(path: Path, seed: int = 5) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **KWARGS)
    save_backbone(path, model, "vit_tiny_patch16_224", KWARGS, (0.5,) * 3, (0.5,) * 3, 32)
    return path


def config(method: str, init: Path | None, **kw: Any) -> PretrainConfig:
    base: dict[str, Any] = {"method": method, "batch_size": 4, "seed": 0, "log_every": 1, "init": init and str(init)}
    if init is None:
        base |= {"model": "vit_tiny_patch16_224", **KWARGS}
    return PretrainConfig(**{**base, "dino": SMALL["dino"], "mae": SMALL["mae"], **kw})


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (8, 3, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------- the warm-up


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_head_warmup_leaves_the_backbone_bitwise_unchanged_then_trains_it(
    method: str, images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init = load_file(str(init_file(tmp_path / "init.safetensors")))
    cls = get_method(method)
    seen: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    original = cls.after_step

    def record(self: Any, step: int) -> None:
        original(self, step)
        backbones = {
            f"{p}.{k}": v.clone() for p, m in self.backbone_modules().items() for k, v in m.state_dict().items()
        }
        heads = {k: v.clone() for k, v in self.state_dict().items() if k not in backbones}
        seen.append((backbones, heads))

    monkeypatch.setattr(cls, "after_step", record)
    cfg = config(method, tmp_path / "init.safetensors", steps=4, adapt=AdaptConfig(head_warmup_steps=2))
    pretrain(images, tmp_path / "run", cfg, progress=False)
    assert len(seen) == 4
    for backbones, _ in seen[:2]:  # both warm-up steps: every backbone tensor (buffers too) is the init's, bit for bit
        for name, tensor in backbones.items():
            assert torch.equal(tensor, init[name.split(".", 2)[-1] if method == "dino" else name[len("encoder.") :]])
    assert any(not torch.equal(a, b) for a, b in zip(seen[0][1].values(), seen[1][1].values(), strict=True))  # head
    trained = [k for k, v in seen[2][0].items() if not torch.equal(v, seen[1][0][k])]
    assert any(k.startswith(("student.backbone.blocks", "encoder.blocks")) for k in trained)  # then it trains
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert (saved["head_warmup_steps"], saved["backbone_lr_scale"], saved["layer_decay"]) == (2, 1.0, 0.75)


def test_guard_defaults_follow_the_init_and_the_run_length() -> None:
    assert adapt.resolve(AdaptConfig(), True, 1000, 100) == adapt.GuardPlan(100, 1.0, 0.75, 100)
    assert adapt.resolve(AdaptConfig(), False, 1000, 100) == adapt.GuardPlan(0, 1.0, 1.0, 0)  # from scratch: nothing
    assert adapt.resolve(AdaptConfig(), True, 4, 0).head_warmup_steps == 1  # at least one step
    explicit = AdaptConfig(head_warmup_steps=7, backbone_lr_scale=0.5, layer_decay=0.9, backbone_warmup_steps=3)
    assert adapt.resolve(explicit, True, 1000, 100) == adapt.GuardPlan(7, 0.5, 0.9, 3)
    with pytest.raises(FewshotError, match="layer_decay"):
        adapt.resolve(AdaptConfig(layer_decay=1.5), True, 1000, 100)


def test_a_run_from_scratch_keeps_its_two_optimiser_groups(tmp_path: Path) -> None:
    """No guard, no per-layer groups: checkpoints of runs from scratch resume as before."""
    method = get_method("mae").build(config("mae", None), RunPlan(8, 4, 2, 8))
    assert adapt.lr_scales(method, adapt.resolve(AdaptConfig(), False, 8, 0)) == {}
    assert [g["apply_wd"] for g in method.param_groups({})] == [True, False]


def test_dino_teacher_momentum_starts_high_from_an_init() -> None:
    plan = RunPlan(n_images=4000, batch_size=64, steps_per_epoch=62, total_steps=4000)
    assert dino_resolve(DinoConfig(), plan)["momentum_teacher"] == pytest.approx(0.995)  # 1 - 20/T
    assert dino_resolve(DinoConfig(), plan, adapting=True)["momentum_teacher"] == pytest.approx(0.99875)  # 1 - 5/T
    short = RunPlan(4000, 64, 62, 300)
    assert dino_resolve(DinoConfig(), short, adapting=True)["momentum_teacher"] == 0.996  # never below
    assert dino_resolve(DinoConfig(momentum_teacher=0.9), short, adapting=True)["momentum_teacher"] == 0.9


# ---------------------------------------------------------------------------------------------- layer-wise lr


def test_layerwise_lr_per_block_as_beit_and_mae_finetuning(tmp_path: Path) -> None:
    method = get_method("dino").build(config("dino", init_file(tmp_path / "w.safetensors")), RunPlan(8, 4, 2, 8))
    scales = adapt.lr_scales(method, adapt.GuardPlan(0, 0.1, 0.75, 0))
    depth = KWARGS["depth"]
    for name, _ in method.student.backbone.named_parameters():
        got = scales[f"student.backbone.{name}"]
        if name.startswith("blocks."):
            assert got == pytest.approx(0.1 * 0.75 ** (depth - int(name.split(".")[1])))  # block i: decay^(D - i)
        elif name.startswith(("patch_embed", "cls_token", "pos_embed")):
            assert got == pytest.approx(0.1 * 0.75 ** (depth + 1))  # the embeddings: one step below block 0
        else:
            assert name.startswith("norm") and got == pytest.approx(0.1)  # the final norm: the backbone's own rate
    groups = method.param_groups(scales)
    head = [g for g in groups if not g["backbone"]]
    assert {g["lr_scale"] for g in head} == {1.0} and sum(len(g["params"]) for g in head) == len(
        [p for p in method.student.head.parameters() if p.requires_grad]
    )
    assert all(not p.requires_grad for p in method.teacher.parameters())  # the teacher only follows the EMA


def test_the_loop_sets_each_group_lr_from_the_schedule_scale_and_ramp(
    images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[torch.optim.Optimizer] = []
    make = fewshot.train.build_optimizer

    def keep(*args: Any) -> torch.optim.Optimizer:
        made.append(make(*args))
        return made[-1]

    seen: list[list[tuple[float, bool, float]]] = []
    cls = get_method("mae")
    original = cls.after_step

    def record(self: Any, step: int) -> None:
        original(self, step)
        seen.append([(g["lr_scale"], g["backbone"], g["lr"]) for g in made[0].param_groups])

    monkeypatch.setattr(fewshot.train, "build_optimizer", keep)
    monkeypatch.setattr(cls, "after_step", record)
    guard = AdaptConfig(head_warmup_steps=1, backbone_warmup_steps=2)
    cfg = config("mae", init_file(tmp_path / "w.safetensors"), steps=4, adapt=guard)
    pretrain(images, tmp_path / "run", cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scheduled = [x["lr"] for x in lines if x["kind"] == "step"]  # lr[step], logged every step
    ramp = [0.0, 0.5, 1.0, 1.0]  # frozen, then the backbone's lr ramps up over 2 steps
    for step, groups in enumerate(seen):
        for scale, backbone, lr in groups:
            assert lr == pytest.approx(scheduled[step] * scale * (ramp[step] if backbone else 1.0))
    assert {round(s, 6) for s, b, _ in seen[0] if b} >= {round(0.75**i, 6) for i in range(KWARGS["depth"] + 2)}


# ---------------------------------------------------------------------------------------------- BatchNorm


def _bn_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


def test_a_batchnorm_teacher_tracks_its_own_statistics_and_the_warmup_keeps_the_inits(
    images: torch.Tensor, tmp_path: Path
) -> None:
    """A convnet under DINO: the teacher, as in DINO's main_dino.py, normalises with batch statistics in training
    and tracks running statistics of its own (not the 0/1 it was built with); frozen in the warm-up, it keeps the
    init's."""
    cfg = config("dino", None, model="test_resnet", img_size=32, patch_size=None, depth=None, steps=2)
    pretrain(images, tmp_path / "scratch", cfg, progress=False)
    exported = _bn_buffers(load_file(str(tmp_path / "scratch" / "backbone.safetensors")))
    assert exported and not any(torch.equal(v, torch.zeros_like(v)) for k, v in exported.items() if "mean" in k)
    assert not any(torch.equal(v, torch.ones_like(v)) for k, v in exported.items() if "var" in k)
    ckpt = load_file(str(tmp_path / "scratch" / "checkpoint.safetensors"))
    student = {
        k[len("model/student.backbone.") :]: v for k, v in ckpt.items() if k.startswith("model/student.backbone.")
    }
    assert any(not torch.equal(v, student[k]) for k, v in exported.items())  # its own forward passes, not an EMA copy

    save_file(load_file(str(tmp_path / "scratch" / "backbone.safetensors")), str(tmp_path / "init.safetensors"))
    cfg = config("dino", tmp_path / "init.safetensors", img_size=32, steps=2, adapt=AdaptConfig(head_warmup_steps=2))
    pretrain(
        images,
        tmp_path / "warm",
        replace_spec(cfg, f"{tmp_path / 'init.safetensors'}:arch=test_resnet"),
        progress=False,
    )
    after = _bn_buffers(load_file(str(tmp_path / "warm" / "backbone.safetensors")))
    assert all(torch.equal(after[k], v) for k, v in exported.items())


def replace_spec(cfg: PretrainConfig, spec: str) -> PretrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, init=spec)


# ---------------------------------------------------------------------------------------------- the monitor


def test_step0_monitor_equals_evaluates_full_label_knn_of_the_init(digits: tuple[Path, Path], tmp_path: Path) -> None:
    from fewshot.evaluation import evaluate

    path = init_file(tmp_path / "init.safetensors")
    save_backbone(path, load_backbone_model(path), "vit_tiny_patch16_224", KWARGS, (0.5,) * 3, (0.25,) * 3, 32,
                  crop_pct=0.875, interpolation="bilinear")  # fmt: skip  # a transform evaluate must follow
    train, test = digits
    cfg = config("dino", path, steps=2, monitor=str(train), monitor_test=str(test))
    from fewshot.sources import open_source

    summary = pretrain(open_source(train), tmp_path / "run", cfg, progress=False)
    start = next(json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert start["kind"] == "start" and start["step"] == 0
    report = evaluate(train, test, backbones=[str(path), f"{tmp_path / 'run'}:init"], out=None, progress=False)
    assert [r["accuracy"] for r in report["full_knn"]] == [start["knn_top1"]] * 2
    assert summary.monitor["start"] == start["knn_top1"]
    assert (tmp_path / "run" / "best.safetensors").is_file()


def load_backbone_model(path: Path) -> torch.nn.Module:
    from fewshot.backbones import load_backbone

    return load_backbone(str(path)).model


# ---------------------------------------------------------------------------------------------- API and CLI


def test_api_and_cli_resolve_the_same_mae_optimiser(digits: tuple[Path, Path], tmp_path: Path) -> None:
    from fewshot.cli import app
    from fewshot.sources import open_source

    train = digits[0]
    api = PretrainConfig(method="mae", model="vit_tiny_patch16_224", **KWARGS, steps=1, batch_size=8, mae=SMALL["mae"])
    pretrain(open_source(train), tmp_path / "api", api, progress=False)
    sets = ["pretrain.mae.decoder_dim=32", "pretrain.mae.decoder_depth=1", "pretrain.mae.decoder_heads=2"]
    args = ["pretrain", str(train), "--method", "mae", "--model", "vit_tiny_patch16_224", "--img-size", "32"]
    args += ["--patch-size", "8", "--depth", "3", "--steps", "1", "--batch-size", "8", "-o", str(tmp_path / "cli")]
    result = CliRunner().invoke(app, [*args, "-q", *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 0, result.output
    saved = [json.loads((tmp_path / r / "config.json").read_text())["config"]["optim"] for r in ("api", "cli")]
    assert saved[0] == saved[1]
    mae = METHOD_OPTIM["mae"]
    assert (saved[0]["lr"], saved[0]["betas"], saved[0]["weight_decay"], saved[0]["clip_grad"]) == (
        mae.lr, list(mae.betas or ()), mae.weight_decay, mae.clip_grad
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- torchrun


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_processes_adapt_like_one_through_the_warmup(tmp_path: Path) -> None:
    """DDP is rebuilt when the warm-up ends (it registers the parameters that train when it is built)."""
    import subprocess

    from tests.conftest import write_digits_folder
    from tests.test_distributed import fewshot as run_cli
    from tests.test_distributed import losses

    data = write_digits_folder(tmp_path / "data", classes=2, per_class=8)  # 2 steps per epoch at batch 8
    init = init_file(tmp_path / "init.safetensors")
    sets = ["pretrain.log_every=1", "pretrain.adapt.head_warmup_steps=2", "pretrain.dino.local_crops=2"]
    sets += ["pretrain.dino.hidden_dim=32", "pretrain.dino.bottleneck_dim=16", "pretrain.dino.out_dim=64"]
    sets += ["pretrain.dino.drop_path_rate=0.0"]  # stochastic depth draws per rank
    args = ["pretrain", data, "--init", init, "--epochs", "2", "--batch-size", "8", "--seed", "3", "--device", "cpu"]
    args += [a for s in sets for a in ("--set", s)] + ["-q"]
    run_cli(*args, "--out", tmp_path / "one")
    run_cli(*args, "--out", tmp_path / "two", processes=2)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-4)
    a, b = (
        load_file(str(tmp_path / "one" / "backbone.safetensors")),
        load_file(str(tmp_path / "two" / "backbone.safetensors")),
    )
    assert any(not torch.equal(a[k], load_file(str(init))[k]) for k in a)  # the backbone trained after the warm-up
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # BatchNorm across CPU processes: refused in one line (SyncBatchNorm needs GPUs)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fewshot"]
    bn = ["pretrain", str(data), "--model", "test_resnet", "--img-size", "32", "--steps", "1", "--batch-size", "8"]
    done = subprocess.run([*launcher, *bn, "--device", "cpu", "-q", "--out", str(tmp_path / "bn")], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode != 0 and "error: this backbone has BatchNorm" in done.stderr  # torchrun adds a report
