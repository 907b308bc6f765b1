"""Exact resume under SIGKILL: a pretraining run killed at a random moment and resumed ends bitwise equal to an
uninterrupted one.

Runs a tiny DINO pretrain (vit_tiny_patch16_224 at 32 px, patch 8, depth 2, 2 local crops; 64 scikit-learn
digits, batch 8, 5 epochs = 40 steps, a checkpoint every epoch; one CPU thread, deterministic algorithms) once
uninterrupted in a fresh process, then ``--trials`` times: start it in a fresh process, SIGKILL it at a random
(seeded) moment of its training phase, restart it and kill it again (``--kills`` per trial), let it finish,
and compare backbone.safetensors and the model and optimiser tensors of checkpoint.safetensors with the
uninterrupted run, bit for bit. Prints each trial's kill times and "k/N bitwise equal".

    python benchmarks/kill_resume.py [--trials 5] [--seed 0] [--kills 2]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = """
import sys
import numpy as np
import torch
from sklearn.datasets import load_digits
from fewshot.pretrain_config import DinoConfig, PretrainConfig
from fewshot.train import pretrain

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
digits = load_digits().images[:64]  # (64, 8, 8) in 0..16
img = torch.from_numpy(np.repeat(np.kron(digits, np.ones((4, 4)))[:, None] * 15.9, 3, axis=1))  # (64, 3, 32, 32)
cfg = PretrainConfig(
    model="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, epochs=5, batch_size=8, seed=3,
    log_every=1, checkpoint_every=1, device="cpu",
    dino=DinoConfig(local_crops=2, hidden_dim=32, bottleneck_dim=16, out_dim=64),
)
pretrain(img.round().to(torch.uint8), sys.argv[1], cfg, progress=False)
"""


def run_worker(out: Path, kill_after: float | None = None) -> tuple[bool, float, float]:
    """Run the worker on ``out``; SIGKILL it after ``kill_after`` seconds unless it finished by then.
    Returns (finished, seconds, seconds until config.json appeared: the end of start-up and decoding)."""
    start = time.perf_counter()
    ready = float("nan")
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(out)], stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        now = time.perf_counter() - start
        if ready != ready and (out / "config.json").is_file():
            ready = now
        if kill_after is not None and now >= kill_after:
            proc.kill()  # SIGKILL: no finally blocks, no flushes
            proc.communicate()
            return False, now, ready
        time.sleep(0.005)
    err = proc.communicate()[1]
    if proc.returncode != 0:
        sys.exit(f"worker failed ({proc.returncode}):\n{err}")
    return True, time.perf_counter() - start, ready


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def bitwise_equal(a: Path, b: Path) -> list[str]:
    """Names of tensors that differ between runs ``a`` and ``b`` (backbone, checkpoint model/optimiser)."""
    import torch

    diff = []
    for name, keep in (
        ("backbone.safetensors", ""),
        ("checkpoint.safetensors", "model/"),
        ("checkpoint.safetensors", "optim/"),
    ):
        ta, tb = tensors(a / name), tensors(b / name)
        keys = sorted(k for k in set(ta) | set(tb) if k.startswith(keep))
        diff += [f"{name}:{k}" for k in keys if k not in ta or k not in tb or not torch.equal(ta[k], tb[k])]
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per trial (each restart killed again)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "uninterrupted"
        _, total, ready = run_worker(ref)
        print(f"uninterrupted run: {total:.1f}s, training from {ready:.1f}s (process start and decoding before)")
        equal = 0
        for trial in range(args.trials):
            out = Path(tmp) / f"trial{trial}"
            events = []
            for _ in range(args.kills):  # each (re)start killed at a random moment of the training phase
                kill_at = rng.uniform(ready, total)
                finished, _, _ = run_worker(out, kill_after=kill_at)
                if finished:
                    events.append(f"finished before {kill_at:.2f}s")
                    break
                saved = [int(p.name[11:-12]) for p in out.glob("checkpoint-*.safetensors")]
                events.append(f"killed at {kill_at:.2f}s (newest checkpoint: step {max(saved, default=0)})")
            restarts = 0
            while not finished:
                finished, _, _ = run_worker(out)
                restarts += 1
            diff = bitwise_equal(ref, out)
            equal += not diff
            verdict = "bitwise equal" if not diff else f"DIFFERS in {len(diff)} tensors, e.g. {diff[:3]}"
            print(f"trial {trial}: {'; '.join(events)}; {restarts} final restart(s): {verdict}")
        print(f"{equal}/{args.trials} bitwise equal")


if __name__ == "__main__":
    main()
