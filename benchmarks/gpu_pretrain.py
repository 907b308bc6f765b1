"""DINO on one GPU at the paper's scale: ViT-S/16, 2×224 px + 10×96 px multi-crop, bf16 autocast.

Prints, in one run (≤5 minutes on one H100/H200 class GPU):
- the GPU's measured bf16 matmul peak;
- model-only images/s (the views already on the GPU) for eager and ``torch.compile``d blocks, the model's FLOP per
  image and its FLOP/s as a share of that peak;
- end-to-end images/s of ``fewshot.train.pretrain`` (decoded real images kept on the GPU, batched augmentation
  there, logging and checkpointing included) with the faster of the two.

    python benchmarks/gpu_pretrain.py [--batch 256] [--steps 20] [--data ../shared/data/clothing10/unlabeled]

Without a folder of images (``--data`` missing) the end-to-end row uses random uint8 images of the same size.
``--smoke`` runs every code path on the CPU with a tiny ViT (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fewshot.pretrain_config import PretrainConfig

# the paper's ViT-S/16 recipe; --smoke swaps in a tiny CPU one
SETUP = {"model": "vit_small_patch16_224", "img_size": 224, "patch_size": None, "depth": None, "store": 256,
         "locals": 10, "local_size": 96, "out_dim": 65536, "device": "cuda"}  # fmt: skip
SMOKE = {"model": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2, "store": 40,
         "locals": 2, "local_size": 16, "out_dim": 256, "device": "cpu"}  # fmt: skip


def sync() -> None:
    if SETUP["device"] == "cuda":
        torch.cuda.synchronize()


def bf16_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - start) / 1e12


def config(batch: int, steps: int, compile_: bool) -> PretrainConfig:
    """The run's PretrainConfig, resolved as `fewshot pretrain` resolves it (the method's optimiser, ImageNet's
    normalisation)."""
    from fewshot.inits import resolve_pretrain
    from fewshot.pretrain_config import DinoConfig, PretrainConfig

    s = SETUP
    dino = DinoConfig(local_crops=s["locals"], local_crop_size=s["local_size"], out_dim=s["out_dim"])
    cfg = PretrainConfig(model=s["model"], img_size=s["img_size"], patch_size=s["patch_size"], depth=s["depth"],
                         batch_size=batch, steps=steps, device=s["device"], compile=compile_, log_every=5,
                         checkpoint_every=10**6, dino=dino)  # fmt: skip
    return resolve_pretrain(cfg)[0]


def model_only(batch: int, steps: int, compile_: bool) -> tuple[float, float]:
    """(images/s, FLOP per image) of our DINO step on views already on the GPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from fewshot.methods.base import RunPlan
    from fewshot.methods.dino import DINO
    from fewshot.optimisation import build_optimizer, clip_per_parameter

    cfg = config(batch, steps, compile_)
    device = torch.device(str(SETUP["device"]))
    method = DINO(cfg, RunPlan(batch * 100, batch, 100, 100 * steps)).to(device)
    if compile_:
        method.compile_blocks()
    opt = build_optimizer(method, cfg)
    params = [p for g in opt.param_groups for p in g["params"]]
    side = int(SETUP["store"])  # type: ignore[call-overload]
    images = torch.randint(0, 255, (batch, 3, side, side), dtype=torch.uint8, device=device)
    views = method.augment(images, torch.Generator(device=device).manual_seed(0))

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = method(views, i)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_per_parameter(params, 3.0)
        opt.step()
        method.after_step(i)

    for i in range(3):  # warm-up (and compilation)
        step(i)
    flops = 0.0
    if not compile_:
        with FlopCounterMode(display=False) as counter:
            step(3)
        flops = counter.get_total_flops() / batch
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(i + 4)
    sync()
    return steps * batch / (time.perf_counter() - start), flops


def end_to_end(data: Path | None, batch: int, steps: int, compile_: bool) -> float:
    """fewshot.train.pretrain (decode once to the GPU, batched augmentation there); images/s from metrics.jsonl."""
    from fewshot.train import pretrain

    if data is not None and data.is_dir():
        from fewshot.sources import open_source

        images: object = open_source(data)
    else:
        side = int(SETUP["store"])  # type: ignore[call-overload]
        images = torch.randint(0, 255, (max(batch * 2, 512), 3, side, side), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as run:
        pretrain(images, Path(run), config(batch, steps + 10, compile_), progress=False)
        lines = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in lines if r["kind"] == "step"][2:]  # first logs include compilation
    return len(rates) / sum(1 / r for r in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    default = Path(__file__).resolve().parents[2] / "shared/data/clothing10/unlabeled"
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--smoke", action="store_true", help="tiny ViT on the CPU: check the script runs")
    args = parser.parse_args()
    if args.smoke:
        SETUP.update(SMOKE)
    elif not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device: this benchmark is for a GPU (benchmarks/pretrain_throughput.py is the CPU one)"
        )
    peak = bf16_peak() if SETUP["device"] == "cuda" else float("nan")
    eager, flops = model_only(args.batch, args.steps, False)
    compiled, _ = model_only(args.batch, args.steps, True)
    best = compiled > eager
    e2e = end_to_end(args.data, args.batch, args.steps, best)
    s = SETUP
    name = torch.cuda.get_device_name() if s["device"] == "cuda" else "CPU smoke run"
    print(f"{name}: {s['model']} DINO, 2x{s['img_size']} + {s['locals']}x{s['local_size']} crops, batch {args.batch}, "
          "bf16 autocast; "
          f"bf16 matmul peak {peak:.0f} TFLOP/s; model {flops / 1e9:.1f} GFLOP per image")  # fmt: skip
    for label, rate in (("model-only eager", eager), ("model-only compiled", compiled)):
        tflops = rate * flops / 1e12
        print(f"{label:24} {rate:8.0f} img/s  {tflops:6.1f} TFLOP/s = {tflops / peak:.0%} of peak")
    print(f"{'end-to-end':24} {e2e:8.0f} img/s  ({'compiled' if best else 'eager'}; "
          f"{e2e / max(eager, compiled):.2f} of model-only)")  # fmt: skip
    if s["device"] == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
