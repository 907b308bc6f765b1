"""torchrun on the CPU (gloo): 2 processes train exactly like 1 with the same global batch and seed (the 2 decoding
their shares of one image-cache file and reading it memory-mapped, the 1 from memory), a checkpoint written by 2
processes resumes in 1, only rank 0 writes, and extraction shards and gathers in order."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fewshot.features import load_features
from fewshot.runs import RunFolder
from tests.conftest import write_digits_folder

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed gloo")

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--depth", "2"]
SETS = {
    "pretrain.log_every": 1,
    "pretrain.dino.local_crops": 2,
    "pretrain.dino.hidden_dim": 32,
    "pretrain.dino.bottleneck_dim": 16,
    "pretrain.dino.out_dim": 64,
    "pretrain.dino.drop_path_rate": 0.0,  # stochastic depth draws per rank: the one thing that would differ
}


def fewshot(*args: object, processes: int = 1, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"FEWSHOT_CACHE": str(cache)} if cache else {})}
    launcher = [sys.executable, "-m"]
    if processes > 1:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
    done = subprocess.run([*launcher, "fewshot", *map(str, args)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def pretrain(
    data: Path, out: Path, processes: int = 1, cache: Path | None = None, *extra: str
) -> subprocess.CompletedProcess[str]:
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
    args = ["pretrain", data, "--method", "dino", *TINY, "--epochs", "2", "--batch-size", "8", "--seed", "3"]
    return fewshot(*args, *sets, *extra, "--device", "cpu", "-q", "--out", out, processes=processes, cache=cache)


def losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["kind"] == "step"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    data = write_digits_folder(root / "data", classes=2, per_class=8)  # 16 images: 2 steps per epoch at batch 8
    pretrain(data, root / "one", 1, root / "cache-one")
    # the 2 processes build their own cache entry, and read it memory-mapped (a memory cap of 0)
    two = pretrain(data, root / "two", 2, root / "cache-two", "--set", "pretrain.data.memory_gb=0")
    (root / "two.out").write_text(two.stdout + two.stderr)
    return {"data": data, "one": root / "one", "two": root / "two", "root": root}


def test_two_processes_follow_the_one_process_trajectory(runs: dict[str, Path]) -> None:
    one, two = losses(runs["one"]), losses(runs["two"])
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-4)
    a, b = load_file(runs["one"] / "backbone.safetensors"), load_file(runs["two"] / "backbone.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_decode_their_shares_into_one_cache_file_equal_to_one_process(runs: dict[str, Path]) -> None:
    one, two = (list((runs["root"] / f"cache-{k}" / "images").glob("*.u8")) for k in ("one", "two"))
    assert len(one) == len(two) == 1  # one file, shared by both processes
    assert one[0].read_bytes() == two[0].read_bytes()  # the same canvases, in the same slots
    with safe_open(str(two[0].with_suffix(".index.safetensors")), framework="pt") as f:
        assert json.loads(f.metadata()["decoded_by"]) == [8, 8]  # each rank decoded its half
    where = [json.loads((runs[k] / "config.json").read_text())["images"]["where"] for k in ("one", "two")]
    assert where[0].startswith("in memory") and where[1].startswith("memory-mapped")


def test_rank_zero_alone_writes_the_run_folder(runs: dict[str, Path]) -> None:
    two = runs["two"]
    steps = [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 4, 4]  # one writer: each step line and epoch line once
    assert json.loads((two / "config.json").read_text())["processes"] == 2
    printed = (runs["root"] / "two.out").read_text()
    assert printed.count("run folder") == printed.count("backbone →") == 1  # one summary, from rank 0


def test_a_checkpoint_written_by_two_processes_resumes_in_one(runs: dict[str, Path]) -> None:
    resumed = runs["root"] / "resumed"
    shutil.copytree(runs["two"], resumed)
    folder = RunFolder(resumed)
    newest = folder.checkpoints()[0][1]
    assert newest.name.endswith("4.safetensors")
    for path in (newest, folder.checkpoint, folder.backbone):  # as if killed right after the epoch-1 checkpoint
        path.unlink()
    pretrain(runs["data"], resumed)
    a, b = load_file(runs["two"] / "backbone.safetensors"), load_file(folder.backbone)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert losses(resumed) == pytest.approx(losses(runs["two"]), rel=1e-4)


def test_extraction_shards_across_ranks_and_gathers_in_order(runs: dict[str, Path]) -> None:
    data, root = runs["data"], runs["root"]
    (data / "0" / "broken.png").write_text("not an image")  # skipped by one rank, reported by rank 0
    args = ["extract", data, "-b", runs["one"], "--device", "cpu", "--set", "extract.cache=false"]
    fewshot(*args, "-o", root / "f1.safetensors", "-q")
    two = fewshot(*args, "-o", root / "f2.safetensors", "-q", processes=2)
    one, both = load_features(root / "f1.safetensors"), load_features(root / "f2.safetensors")
    assert both.paths == one.paths and len(both.paths) == 16
    assert (both.labels == one.labels).all()
    torch.testing.assert_close(torch.from_numpy(both.features), torch.from_numpy(one.features), rtol=1e-5, atol=1e-5)
    assert [s["path"] for s in both.skipped] == [s["path"] for s in one.skipped] == ["0/broken.png"]
    assert two.stdout.count("written to") == 1


def test_an_error_one_rank_meets_stops_every_rank_with_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    # only rank 0 takes the run folder's lock: held here, rank 0 fails and rank 1 must not wait for it forever
    out = tmp_path / "busy"
    out.mkdir()
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
    args = ["pretrain", runs["data"], "--method", "dino", *TINY, "--steps", "2", "--batch-size", "8", *sets, "-q"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fewshot"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with RunFolder(out).lock():
        done = subprocess.run([*launcher, *map(str, args), "--device", "cpu", "--out", str(out)], capture_output=True,
                              text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert errors == [f"error: run folder {out} is in use by another fewshot process (pid {os.getpid()}); wait for it "
                      "or use another --out"]  # fmt: skip
    assert not re.search(r'File ".*/fewshot/', done.stdout + done.stderr)  # torchrun reports; we print no traceback
