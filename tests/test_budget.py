"""``--minutes``: a time budget sized by a timed probe of the step (fake clock); schedules end at the planned step."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewshot import budget
from fewshot.errors import FewshotError
from fewshot.pretrain_config import DinoConfig, OptimConfig, PretrainConfig
from fewshot.schedules import capped_steps
from fewshot.train import pretrain

TICK = 0.1  # seconds the fake clock advances at every reading
CFG = PretrainConfig(
    model="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, batch_size=4, log_every=1, seed=3,
    minutes=0.1, optim=OptimConfig(lr=0.05, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4),
    dino=DinoConfig(local_crops=2, hidden_dim=32, bottleneck_dim=16, out_dim=64),
)  # fmt: skip


class FakeClock:
    """A clock that moves TICK seconds each time it is read, whatever the machine does."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.reads = 0

    def __call__(self) -> float:
        self.now += TICK
        self.reads += 1
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(budget, "clock", fake)
    return fake


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (8, 3, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_plan_fits_the_minutes_left_after_start_up(clock: FakeClock) -> None:
    started = clock()  # 1 tick of start-up until plan_steps reads the clock again
    plan = budget.plan_steps(1.0, started, [0.5, 0.2, 0.3], steps_per_epoch=10, epoch_seconds=1.0, margin=0.05)
    # 60 s - 0.1 s of start-up, 5% margin, 0.3 s per step (the median) + 1 s per 10-step epoch = 0.4 s per step
    assert plan.seconds_per_step == pytest.approx(0.3)
    assert plan.total_steps == math.floor(59.9 * 0.95 / 0.4) == 142
    assert plan.epochs == 14.2 and plan.startup_seconds == pytest.approx(TICK)
    assert plan.expected_minutes * 60 == pytest.approx(0.1 + 142 * 0.3 + 14.2 * 1.0, abs=0.06)
    assert plan.expected_minutes <= 1.0


def test_plan_refuses_a_budget_with_no_time_for_a_step(clock: FakeClock) -> None:
    with pytest.raises(FewshotError, match="leaves no time to train"):
        budget.plan_steps(0.01, clock() - 10.0, [0.5], steps_per_epoch=10)
    for bad in (0.0, -1.0, float("nan"), float("inf"), None):
        with pytest.raises(FewshotError, match="--minutes must be a positive number"):
            budget.check_minutes(bad)


def test_minutes_run_ends_every_schedule_at_the_planned_last_step(
    images: torch.Tensor, clock: FakeClock, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    pretrain(images, run, CFG, progress=False)
    saved = json.loads((run / "config.json").read_text())
    plan = budget.BudgetPlan(**saved["budget"])
    # the probe timed PROBE_STEPS steps of one tick each (a clock read before and after) and one epoch end
    assert plan.probe_steps == budget.PROBE_STEPS and plan.seconds_per_step == pytest.approx(TICK)
    assert plan.epoch_end_seconds == pytest.approx(TICK)
    per_epoch = 8 // CFG.batch_size
    left = 0.1 * 60 - plan.startup_seconds
    assert plan.total_steps == math.floor(left * (1 - budget.MARGIN) / (TICK + TICK / per_epoch)) > 1
    assert saved["plan"]["total_steps"] == plan.total_steps
    assert saved["resolved"]["warmup_steps"] == capped_steps(10, per_epoch, plan.total_steps, 0.1)
    steps = [m for m in _metrics(run) if m["kind"] == "step"]
    assert [m["step"] for m in steps] == list(range(1, plan.total_steps + 1))
    last = steps[-1]  # the values used at the last step: every cosine is at its end
    assert last["lr"] == pytest.approx(CFG.optim.min_lr)
    assert last["weight_decay"] == pytest.approx(CFG.optim.weight_decay_end)
    assert last["momentum"] == pytest.approx(1.0)
    assert steps[-2]["lr"] > last["lr"]


def test_minutes_run_equals_a_steps_run_of_the_planned_length(
    images: torch.Tensor, clock: FakeClock, tmp_path: Path
) -> None:
    pretrain(images, tmp_path / "budget", CFG, progress=False)
    total = json.loads((tmp_path / "budget" / "config.json").read_text())["plan"]["total_steps"]
    pretrain(images, tmp_path / "steps", dataclasses.replace(CFG, minutes=None, steps=total), progress=False)
    # the probe trained a throwaway copy: the budgeted run starts from the same initialisation and data order
    a, b = (load_file(str(tmp_path / name / "backbone.safetensors")) for name in ("budget", "steps"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "budget").glob(".probe-*"))  # the epoch-end probe cleaned up after itself


def test_rerun_keeps_the_saved_plan_without_probing_again(
    images: torch.Tensor, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    pretrain(images, run, CFG, progress=False)
    before = json.loads((run / "config.json").read_text())["budget"]

    def no_probe(*args: object, **kwargs: object) -> list[float]:
        raise AssertionError("a resumed --minutes run must keep its plan, not probe again")

    monkeypatch.setattr(budget, "time_steps", no_probe)
    result = pretrain(images, run, CFG, progress=False)
    assert result.steps == before["total_steps"] and not result.logs  # already finished
    assert json.loads((run / "config.json").read_text())["budget"] == before


def test_minutes_and_steps_together_are_refused(images: torch.Tensor, clock: FakeClock, tmp_path: Path) -> None:
    with pytest.raises(FewshotError, match="--minutes 0.1 and --steps 5 both set"):
        pretrain(images, tmp_path / "run", dataclasses.replace(CFG, steps=5), progress=False)


def test_bad_budget_is_one_line_error_before_decoding(
    digits: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fewshot import train
    from fewshot.cli import app

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the budget is checked before the images are decoded")

    monkeypatch.setattr(train, "open_store", no_decoding)
    for args, message in ((["--minutes", "0"], "--minutes must be a positive number"),
                          (["--minutes", "5", "--steps", "3"], "--minutes 5 and --steps 3 both set"),
                          (["--minutes", "5", "--epochs", "3"], "--minutes 5 and --epochs 3 both set")):  # fmt: skip
        result = CliRunner().invoke(app, ["pretrain", str(digits[0]), *args, "-o", str(tmp_path / "run"), "-q"])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
