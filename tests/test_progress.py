"""Progress in logs: plain lines with the bar's fields at most every FEWSHOT_PROGRESS_SECONDS when stderr is not a
terminal (a pretraining run's log stays a few lines), tqdm on terminals."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tqdm import tqdm

from fewshot.progress import LogLines, bar
from tests.conftest import write_digits_folder


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_at_the_start_and_the_end_with_the_same_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEWSHOT_PROGRESS_SECONDS", "3600")
    log = io.StringIO()
    b = bar(total=10_000, desc="dino", unit="step", stream=log)
    for i in range(10_000):
        b.update(1)
        b.set_postfix_str(f"loss {i}")  # tqdm would print on every call
    b.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 2
    assert lines[0].startswith("dino: 0/10000") and lines[1].startswith("dino: 10000/10000")
    assert "step/s" in lines[1] and lines[1].endswith("loss 9999]")


def test_lines_come_at_most_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEWSHOT_PROGRESS_SECONDS", "0.1")
    log = io.StringIO()
    start = time.perf_counter()
    with bar(total=30, desc="decoding", unit="img", stream=log) as b:
        for _ in range(30):
            time.sleep(0.02)
            b.update(1)
    elapsed = time.perf_counter() - start
    lines = log.getvalue().splitlines()
    assert 3 <= len(lines) <= elapsed / 0.1 + 2  # the start, one per 0.1 s at most, the end


def test_terminals_and_disabled_bars_keep_tqdm() -> None:
    terminal = _Terminal()
    b = bar(total=3, desc="x", stream=terminal)
    assert type(b) is tqdm
    b.close()
    assert isinstance(bar(total=3, stream=io.StringIO()), LogLines)
    quiet = bar(total=3, disable=True, stream=io.StringIO())
    assert type(quiet) is tqdm and quiet.disable


def test_a_pretraining_log_stays_a_few_lines(tmp_path: Path) -> None:
    data = write_digits_folder(tmp_path / "data", classes=2, per_class=8)
    env = {**os.environ, "FEWSHOT_PROGRESS_SECONDS": "3600", "OMP_NUM_THREADS": "1"}
    args = ["pretrain", data, "--method", "mae", "--model", "vit_tiny_patch16_224", "--img-size", "16", "--patch-size",
            "4", "--depth", "1", "--steps", "60", "--batch-size", "4", "--out", tmp_path / "run", "--set",
            "pretrain.mae.decoder_dim=16", "--set", "pretrain.mae.decoder_heads=2", "--set",
            "pretrain.mae.decoder_depth=1", "--set", "pretrain.log_every=1"]  # fmt: skip
    with open(tmp_path / "log", "w") as log:  # stderr to a file, as in a batch job
        subprocess.run([sys.executable, "-m", "fewshot", *map(str, args)], stderr=log, env=env, check=True)
    text = (tmp_path / "log").read_text()
    bars = [line for line in text.splitlines() if line.startswith("mae: ") and "/60 [" in line]
    assert "\r" not in text and len(bars) == 2, text  # 60 steps, 15 epochs: the first and the last line
    assert "loss" in bars[-1] and "img/s" in bars[-1]
