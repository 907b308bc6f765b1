"""Step times of the CPU sweep's recipes, measured interleaved in one process (A, B, C, A, B, C, ...).

The sweep (benchmarks/mae_cpu_sweep.md) defines its runs by step counts and measures accuracy; their cost is
measured here, separately, so that a shared machine does not corrupt the per-minute comparison: every variant is
timed in every round, and each gets its best round (the least-disturbed one). Each round times ``--steps``
optimiser steps of the real training step (augmentation, forward, backward, AdamW: :func:`fewshot.budget.probe_step`,
what ``--minutes`` times) after the variant's untimed first step, both as wall time and as the process's CPU time.
With one thread (the default) the CPU seconds of a step hardly depend on other jobs sharing the cores, so on a busy
machine they are the cost to compare; the wall time of the best round is what an idle machine approaches.

    python benchmarks/cpu_step_times.py                      # every variant, 1 thread
    python benchmarks/cpu_step_times.py mae-32p4 dino-cpu-tiny --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fewshot.pretrain_config import PretrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
R32P4 = ("img_size=32", "patch_size=4")  # the sweep's MAE reference point: 64 tokens at 32 px

# name -> (recipe file, --set overrides of its [pretrain] section)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mae-cpu-tiny": ("mae-cpu-tiny.toml", ()),  # today's: 64 px / patch 8, 64 tokens, 4 blocks, decoder 2 × 128
    "mae-32p4": ("mae-cpu-tiny.toml", R32P4),
    "mae-32p8": ("mae-cpu-tiny.toml", ("img_size=32",)),  # 16 tokens
    "mae-48p8": ("mae-cpu-tiny.toml", ("img_size=48",)),  # 36 tokens
    "mae-28p4": ("mae-cpu-tiny.toml", ("img_size=28", "patch_size=4")),  # 49 tokens
    "mae-28p7": ("mae-cpu-tiny.toml", ("img_size=28", "patch_size=7")),  # 16 tokens
    "mae-16p4": ("mae-cpu-tiny.toml", ("img_size=16", "patch_size=4")),  # 16 tokens, the demo's
    "mae-28p4-dec1": ("mae-cpu-tiny.toml", ("img_size=28", "patch_size=4", "mae.decoder_depth=1")),
    "mae-28p4-d2": ("mae-cpu-tiny.toml", ("img_size=28", "patch_size=4", "depth=2")),
    "mae-32p4-d2": ("mae-cpu-tiny.toml", (*R32P4, "depth=2")),
    "mae-32p4-d8": ("mae-cpu-tiny.toml", (*R32P4, "depth=8")),
    "mae-32p4-small": ("mae-cpu-tiny.toml", (*R32P4, "model=vit_small_patch16_224")),  # 384-d
    "mae-32p4-dec1": ("mae-cpu-tiny.toml", (*R32P4, "mae.decoder_depth=1")),
    "mae-32p4-mask50": ("mae-cpu-tiny.toml", (*R32P4, "mae.mask_ratio=0.5")),
    "mae-32p4-mask90": ("mae-cpu-tiny.toml", (*R32P4, "mae.mask_ratio=0.9")),
    "mae-32p4-b32": ("mae-cpu-tiny.toml", (*R32P4, "batch_size=32")),
    "mae-32p4-b128": ("mae-cpu-tiny.toml", (*R32P4, "batch_size=128")),
    "dino-cpu-tiny": ("dino-cpu-tiny.toml", ()),  # 32 px / patch 8, 2 + 4 crops of 16 px
    "dino-cpu-tiny-2local": ("dino-cpu-tiny.toml", ("dino.local_crops=2",)),
    "dino-cpu-tiny-nolocal": ("dino-cpu-tiny.toml", ("dino.local_crops=0",)),
}


def config(name: str) -> PretrainConfig:
    """The PretrainConfig of a variant, resolved as `fewshot pretrain --recipe FILE --set pretrain.KEY=V` would."""
    from fewshot.config import build_config
    from fewshot.inits import resolve_pretrain

    recipe, sets = VARIANTS[name]
    return resolve_pretrain(build_config(RECIPES / recipe, [f"pretrain.{s}" for s in sets]).pretrain)[0]


def main() -> None:
    from fewshot.budget import probe_step
    from fewshot.image_store import ImageStore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(VARIANTS), help="variants (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--threads", type=int, default=1, help="1: CPU seconds per step do not depend on other jobs")
    parser.add_argument("--store", type=int, default=None, help="side of the stored images (default 2 × img)")
    parser.add_argument("--minutes", type=float, default=20.0, help="budget for the steps column")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    steppers = {}
    for name in args.names:
        cfg = config(name)
        side = args.store or 2 * cfg.img_size
        pixels = torch.randint(
            0, 256, (512, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
        store = ImageStore(pixels, torch.full((512, 2), side, dtype=torch.long))  # square images filling the canvas
        _, _, step = probe_step(cfg, store, per_epoch=8, device=cpu)
        step(0)  # untimed: first-call allocations
        steppers[name] = (step, cfg)
    wall: dict[str, list[float]] = {name: [] for name in steppers}
    cpu: dict[str, list[float]] = {name: [] for name in steppers}
    for r in range(args.rounds):
        for name, (step, _) in steppers.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                step(1 + r * args.steps + i)
            wall[name].append((time.perf_counter() - w0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.3f}" for n, t in cpu.items()), flush=True)
    print(f"\n{args.threads} thread(s), {args.rounds} rounds × {args.steps} steps, interleaved; best round of each")
    print(f"| variant | img / patch (tokens) | batch | CPU s/step | wall s/step | img/s | steps in {args.minutes:g}m |")
    print("|---|---|---|---|---|---|---|")
    for name, (_, cfg) in steppers.items():
        best_cpu, best_wall = min(cpu[name]), min(wall[name])
        tokens = (cfg.img_size // (cfg.patch_size or 16)) ** 2
        steps = int(args.minutes * 60 / best_wall)
        print(f"| {name} | {cfg.img_size} / {cfg.patch_size} ({tokens}) | {cfg.batch_size} | {best_cpu:.3f} | "
              f"{best_wall:.3f} | {cfg.batch_size / best_wall:.0f} | {steps} |")  # fmt: skip


if __name__ == "__main__":
    main()
