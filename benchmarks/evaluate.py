"""How much does the few-shot evaluation cost next to feature extraction? (goal: under 5%)

Times ``run_episodes`` on 10,000 synthetic 384-d features (10 classes; 5,000 TRAIN / 5,000 TEST) for
4 shot levels (1, 2, 5, 10) × 10 seeds × 3 heads (knn, logreg, prototype) plus the full-label k-NN, and times
extracting real images with a randomly initialised ViT-S/16 at 224 (timm ``vit_small_patch16_224``, 384-d)
through ``extract_features`` on 128 generated images, extrapolated to 10,000. Run: ``python benchmarks/evaluate.py``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

N_FEATURES, DIM, N_CLASSES = 10_000, 384, 10
N_IMAGES, TARGET_IMAGES = 128, 10_000
FITS = {"knn": "40 fits", "logreg": "40 fits", "prototype": "40 fits", "full-label knn": "1 fit"}


def synthetic_features():
    from fewshot.features import Features

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(N_CLASSES, DIM)).astype(np.float32)
    labels = rng.integers(0, N_CLASSES, size=N_FEATURES)
    x = (centres[labels] + 5.0 * rng.normal(size=(N_FEATURES, DIM))).astype(np.float32)  # (N, 384): 1-shot is hard
    classes = [f"class{c}" for c in range(N_CLASSES)]
    half = N_FEATURES // 2

    def part(s: slice) -> Features:
        return Features(x[s], labels[s].astype(np.int64), classes, [f"{i}.jpg" for i in range(*s.indices(N_FEATURES))])

    return part(slice(0, half)), part(slice(half, None))


def time_episodes() -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per head (40 episodes each: 4 shot levels x 10 seeds) and for the full-label k-NN; 10-shot accuracy."""
    from fewshot.config import Config, EvaluateConfig
    from fewshot.episodes import run_episodes

    train, test = synthetic_features()
    seconds, accuracy = {}, {}
    for head in ("knn", "logreg", "prototype"):
        ev = EvaluateConfig(shots=(1, 2, 5, 10), seeds=10, heads=(head,), full_knn=False)
        start = time.perf_counter()
        rows = run_episodes({"synthetic": (train, test)}, Config(evaluate=ev), progress=False)
        seconds[head] = time.perf_counter() - start
        accuracy[head] = next(r["accuracy"] for r in rows if r["shots"] == 10)
    ev = EvaluateConfig(shots=(1,), seeds=1, heads=("prototype",), full_knn=True)  # 1 cheap episode + full k-NN
    start = time.perf_counter()
    rows = run_episodes({"synthetic": (train, test)}, Config(evaluate=ev), progress=False)
    seconds["full-label knn"] = time.perf_counter() - start
    accuracy["full-label knn"] = next(r["accuracy"] for r in rows if r["shots"] is None)
    return seconds, accuracy


def make_images(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(256, 320, 3), dtype=np.uint8)  # decoded and resized like a photo
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)


def time_extraction(root: Path) -> tuple[float, float]:
    """(seconds per image, seconds of the one-off model build + first batch) for ViT-S/16 at 224."""
    from fewshot.config import ExtractConfig
    from fewshot.features import extract_features

    cfg = ExtractConfig(backbone="vit_small_patch16_224", pool="cls", cache=False)
    warm_dir = root / "warm"
    make_images(warm_dir, 8)
    start = time.perf_counter()
    extract_features(warm_dir, cfg, progress=False)  # model build, allocator and thread-pool warm-up
    warmup = time.perf_counter() - start
    data = root / "images"
    make_images(data, N_IMAGES)
    start = time.perf_counter()
    feats = extract_features(data, cfg, progress=False)
    elapsed = time.perf_counter() - start
    assert feats.features.shape == (N_IMAGES, DIM), feats.features.shape
    return elapsed / N_IMAGES, warmup


def main() -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEWSHOT_CACHE"] = str(Path(tmp) / "cache")  # never touch the user's cache
        seconds, accuracy = time_episodes()
        per_image_s, warmup_s = time_extraction(Path(tmp))
    episodes_s = sum(seconds.values())
    extract_s = per_image_s * TARGET_IMAGES
    device = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"

    left = [
        ("features (TRAIN/TEST)", f"{N_FEATURES // 2:,}/{N_FEATURES // 2:,} x {DIM}"),
        *((f"{h} ({FITS[h]}), s", f"{t:.2f}  [{100 * accuracy[h]:.0f}%]") for h, t in seconds.items()),
        ("total, s", f"{episodes_s:.2f}"),
    ]
    right = [
        ("device", device),
        (f"{N_IMAGES} images, s/image", f"{per_image_s:.4f}"),
        ("images/s", f"{1 / per_image_s:.1f}"),
        ("model build + warm-up, s", f"{warmup_s:.2f}"),
        (f"{TARGET_IMAGES:,} images (extrap.), s", f"{extract_s:.1f}"),
    ]
    print(f"{'EVALUATION  run_episodes  [10-shot acc]':<52}   {'EXTRACTION  ViT-S/16 @224, random init':<52}")
    blank = ("", "")
    for i in range(max(len(left), len(right))):
        (lk, lv), (rk, rv) = left[i] if i < len(left) else blank, right[i] if i < len(right) else blank
        print(f"{lk:<30}{lv:>22}   {rk:<30}{rv:>22}")
    ratio = episodes_s / extract_s
    print()
    print(
        f"evaluation / extraction = {episodes_s:.2f} s / {extract_s:.1f} s = {100 * ratio:.2f}%"
        f"  (goal < 5%: {'met' if ratio < 0.05 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
