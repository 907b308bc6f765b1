"""Run folders: one writer per folder (flock), crash-safe checkpoints kept K deep, fallback to the previous one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fewshot.errors import FewshotError
from fewshot.runs import KEEP_CHECKPOINTS, RunFolder, load_run_checkpoint, save_run_checkpoint

HOLD = """
import sys, time
from fewshot.runs import RunFolder
with RunFolder(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """Another process holding the lock of the run folder ``tmp_path``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_folder_in_use_by_another_process_is_refused_with_its_pid(tmp_path: Path, holder) -> None:
    message = rf"{re.escape(str(tmp_path))} .*pid {holder.pid}\).*wait for it or use another --out"
    with pytest.raises(FewshotError, match=message), RunFolder(tmp_path).lock():
        pass


def test_pretrain_refuses_a_folder_in_use(tmp_path: Path, holder) -> None:
    from fewshot.pretrain_config import PretrainConfig
    from fewshot.train import pretrain

    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(FewshotError, match="in use"):
        pretrain(images, tmp_path, PretrainConfig(), progress=False)
    assert not (tmp_path / "config.json").exists()  # refused before touching the run


def test_a_killed_holder_does_not_leave_the_folder_locked(tmp_path: Path, holder) -> None:
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    (tmp_path / "checkpoint-000000007.safetensors.tmp").write_bytes(b"half a checkpoint")
    with RunFolder(tmp_path).lock():
        assert not list(tmp_path.glob("*.tmp"))  # left by the killed writer, removed by the next one
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with RunFolder(tmp_path).lock():  # released on exit, also in this process
        pass


def _save(run: RunFolder, step: int) -> nn.Linear:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(step)
    opt = torch.optim.AdamW(model.parameters())
    save_run_checkpoint(run, model, opt, {"step": step})
    return model


def test_checkpoints_keep_the_last_k_and_checkpoint_is_the_newest(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    for step in (2, 4, 6, 8):
        _save(run, step)
    assert [s for s, _ in run.checkpoints()] == [8, 6, 4, 2][:KEEP_CHECKPOINTS]
    assert run.checkpoint.read_bytes() == run.step_checkpoint(8).read_bytes()
    model, _, _, state, path = load_run_checkpoint(run)
    assert state["step"] == 8 and path == run.step_checkpoint(8) and torch.all(model["weight"] == 8)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    _save(run, 2)
    _save(run, 4)
    newest = run.step_checkpoint(4)
    with open(newest, "r+b") as fh:  # e.g. a full disk or a crash of the file system mid-write
        fh.truncate(newest.stat().st_size // 2)
    model, _, _, state, path = load_run_checkpoint(run)
    assert state["step"] == 2 and path == run.step_checkpoint(2) and torch.all(model["weight"] == 2)
    _save(run, 4)  # the resumed run writes step 4 again: the damaged file is replaced
    assert load_run_checkpoint(run)[3]["step"] == 4


def test_no_readable_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    _save(run, 2)
    run.step_checkpoint(2).write_bytes(b"garbage")
    with pytest.raises(FewshotError, match="start the run over"):
        load_run_checkpoint(run)


def test_checkpoints_after_the_resumed_step_are_dropped(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    for step in (2, 4, 6):
        _save(run, step)
    _save(run, 5)  # a resume from step 4 (step 6 damaged) discards the later timeline
    assert [s for s, _ in run.checkpoints()] == [5, 4]
