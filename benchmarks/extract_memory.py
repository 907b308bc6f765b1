"""Peak memory of `fewshot extract` does not grow with the number of images.

Generates 1,000 and 20,000 small PNGs, extracts features of each folder in a fresh process (a tiny ViT,
192-d features) and prints both peak RSS figures side by side. The goal: 20k within +10% of 1k. What does grow
is the output itself (N x D float32: 15 MB for 20k x 192), which the figures include.

    python benchmarks/extract_memory.py [--small 1000] [--large 20000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BACKBONE = "vit_tiny_patch16_224:img_size=32,patch_size=8,depth=2"

CHILD = """
import resource, sys
from fewshot.config import ExtractConfig
from fewshot.features import extract_features
feats = extract_features(sys.argv[1], ExtractConfig(backbone=sys.argv[2], cache=False), progress=False)
print(feats.features.shape[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_images(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"{i // 1000:03d}"  # 1,000 files per folder, like a real dump
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return root


def peak_rss_mb(folder: Path) -> tuple[int, float, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), BACKBONE], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), int(out[1]) / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in (args.small, args.large):
            folder = write_images(Path(tmp) / str(n), n)
            rows.append(peak_rss_mb(folder))
    print(f"{'images':>8} {'peak RSS (MB)':>14} {'seconds':>8}")
    for n, mb, s in rows:
        print(f"{n:>8} {mb:>14.1f} {s:>8.1f}")
    growth = rows[1][1] / rows[0][1] - 1
    print(f"peak RSS growth {args.small} -> {args.large} images: {growth:+.1%} (goal: within +10%)")


if __name__ == "__main__":
    main()
