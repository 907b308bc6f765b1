"""DINO training throughput on this machine: our step vs lightly's DINO, same ViT, crops and batch, one run.

Prints images/s for both (model-only: views already made; end to end: from decoded images, augmentation
included), their ratio, and the model's FLOP/s as a share of the measured fp32 matmul peak. lightly (MIT) is a
benchmark-only dependency, used as its documentation's DINO example shows (DINOProjectionHead, DINOLoss,
update_momentum, DINOTransform).

    python benchmarks/pretrain_throughput.py [--steps 10] [--compile] [--data ../shared/data/clothing10/unlabeled]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fewshot.pretrain_config import PretrainConfig

IMG, PATCH, DEPTH, LOCALS, LOCAL_SIZE, BATCH, OUT_DIM = 64, 8, 4, 4, 24, 64, 4096
VIT = dict(img_size=IMG, patch_size=PATCH, depth=DEPTH)


def matmul_peak() -> float:
    """fp32 GFLOP/s of a large square matmul: the ceiling the model's FLOP/s is compared to."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    start, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - start) / 1e9


def ours(steps: int, compile_: bool = False) -> tuple[float, float, object]:
    """(model-only img/s, FLOP per image, method) for fewshot's DINO step (``compile_``: torch.compile'd blocks)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fewshot.methods.base import RunPlan
    from fewshot.methods.dino import DINO
    from fewshot.optimisation import build_optimizer, clip_per_parameter

    cfg = _config(steps)
    method = DINO(cfg, RunPlan(BATCH * 100, BATCH, 100, 100 * steps))
    opt = build_optimizer(method, cfg)
    for group in opt.param_groups:
        group["lr"] = 1e-4
    params = [p for g in opt.param_groups for p in g["params"]]
    images = torch.randint(0, 255, (BATCH, 3, 73, 73), dtype=torch.uint8)
    batch = method.augment(images, torch.Generator().manual_seed(0))

    def step(i: int) -> None:
        loss = method(batch, i)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_per_parameter(params, cfg.optim.clip_grad)
        method.before_optimizer_step(i)
        opt.step()
        method.after_step(i)

    with FlopCounterMode(display=False) as counter:
        step(0)  # counted eagerly
    flops = counter.get_total_flops() / BATCH
    if compile_:
        method.compile_blocks()  # compiled during _rate's warm-up steps
    return _rate(step, steps), flops, method


def _config(steps: int) -> PretrainConfig:
    """Resolved as `fewshot pretrain` resolves it (the method's optimiser, ImageNet's normalisation)."""
    from fewshot.inits import resolve_pretrain
    from fewshot.pretrain_config import DinoConfig, PretrainConfig

    dino = DinoConfig(
        local_crops=LOCALS, local_crop_size=LOCAL_SIZE, hidden_dim=512, bottleneck_dim=128, out_dim=OUT_DIM
    )
    cfg = PretrainConfig(model="vit_tiny_patch16_224", img_size=IMG, patch_size=PATCH, depth=DEPTH, dino=dino,
                         batch_size=BATCH, steps=steps, log_every=1, device="cpu")  # fmt: skip
    return resolve_pretrain(cfg)[0]


def lightly_model_only(steps: int) -> float:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    student, head, teacher, t_head, criterion, opt = _lightly_models(DINOLoss, DINOProjectionHead)
    deactivate_requires_grad(teacher)
    deactivate_requires_grad(t_head)
    views = [torch.randn(BATCH, 3, IMG, IMG)] * 2 + [torch.randn(BATCH, 3, LOCAL_SIZE, LOCAL_SIZE)] * LOCALS

    def step(i: int) -> None:
        update_momentum(student, teacher, m=0.996)
        update_momentum(head, t_head, m=0.996)
        with torch.no_grad():
            t_out = [t_head(teacher(v)) for v in views[:2]]
        s_out = [head(student(v)) for v in views]
        loss = criterion(t_out, s_out, epoch=0)
        loss.backward()
        head.cancel_last_layer_gradients(current_epoch=1)
        opt.step()
        opt.zero_grad()

    return _rate(step, steps)


def _lightly_models(loss_cls: type, head_cls: type) -> tuple:
    import timm

    student = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, **VIT)
    head = head_cls(192, 512, 128, OUT_DIM, freeze_last_layer=1)
    teacher, t_head = copy.deepcopy(student), head_cls(192, 512, 128, OUT_DIM)  # weight norm can't deepcopy
    t_head.load_state_dict(head.state_dict())
    opt = torch.optim.AdamW(list(student.parameters()) + list(head.parameters()), lr=1e-4)
    return student, head, teacher, t_head, loss_cls(output_dim=OUT_DIM), opt


def _rate(step: object, steps: int) -> float:
    for i in range(2):  # warm-up
        step(i)  # type: ignore[operator]
    start = time.perf_counter()
    for i in range(steps):
        step(i + 2)  # type: ignore[operator]
    return steps * BATCH / (time.perf_counter() - start)


def ours_end_to_end(data: Path, steps: int) -> float:
    """fewshot.train.pretrain on real images (decode once, batched augmentation), images/s from metrics.jsonl."""
    from fewshot.sources import open_source
    from fewshot.train import pretrain

    cfg = _config(steps + 3)
    with tempfile.TemporaryDirectory() as run:
        pretrain(open_source(data), Path(run), cfg, progress=False)
        lines = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    # skip 2 warm-up steps and the last, which also writes the final checkpoint (a real run writes one per epoch)
    rates = [r["images_per_s"] for r in lines if r["kind"] == "step"][2:-1]
    return len(rates) / sum(1 / r for r in rates)  # harmonic mean over steps = total images / total time


def lightly_end_to_end(data: Path, steps: int, workers: int) -> float:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.dino_transform import DINOTransform
    from PIL import Image

    files = sorted(p for p in data.iterdir() if p.suffix.lower() in (".jpg", ".png"))[: BATCH * (steps + 2)]
    transform = DINOTransform(global_crop_size=IMG, local_crop_size=LOCAL_SIZE, n_local_views=LOCALS)

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> list[torch.Tensor]:
            return transform(Image.open(files[i]).convert("RGB"))

    student, head, teacher, t_head, criterion, opt = _lightly_models(DINOLoss, DINOProjectionHead)
    deactivate_requires_grad(teacher)
    deactivate_requires_grad(t_head)
    loader = torch.utils.data.DataLoader(Files(), batch_size=BATCH, num_workers=workers, drop_last=True)
    start, seen = 0.0, 0
    for i, views in enumerate(loader):
        if i == 2:
            start = time.perf_counter()
        update_momentum(student, teacher, m=0.996)
        update_momentum(head, t_head, m=0.996)
        with torch.no_grad():
            t_out = [t_head(teacher(v)) for v in views[:2]]
        loss = criterion(t_out, [head(student(v)) for v in views], epoch=0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen += BATCH if i >= 2 else 0
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/clothing10/unlabeled"
    )
    parser.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers (end to end)")
    parser.add_argument("--compile", action="store_true", help="also time our step with torch.compile'd blocks")
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak()
    our_rate, flops, _ = ours(args.steps)
    compiled_rate = ours(args.steps, compile_=True)[0] if args.compile else float("nan")
    their_rate = lightly_model_only(args.steps)
    our_e2e = ours_end_to_end(args.data, args.steps)
    their_e2e = lightly_end_to_end(args.data, args.steps, args.workers)
    print(f"ViT-tiny depth {DEPTH}, 2x{IMG}px + {LOCALS}x{LOCAL_SIZE}px crops (patch {PATCH}), batch {BATCH}, "
          f"{torch.get_num_threads()} threads; fp32 matmul peak {peak:.0f} GFLOP/s")  # fmt: skip
    print(f"{'':24} {'fewshot':>10} {'lightly':>10} {'ratio':>7}")
    print(f"{'model-only img/s':24} {our_rate:>10.1f} {their_rate:>10.1f} {our_rate / their_rate:>7.2f}")
    if args.compile:
        print(
            f"{'model-only, compiled':24} {compiled_rate:>10.1f} {their_rate:>10.1f} {compiled_rate / their_rate:>7.2f}"
        )
    print(f"{'end-to-end img/s':24} {our_e2e:>10.1f} {their_e2e:>10.1f} {our_e2e / their_e2e:>7.2f}")
    print(f"fewshot end to end / model-only: {our_e2e / our_rate:.2f}")
    print(f"model: {flops / 1e9:.2f} GFLOP per image -> {flops * our_rate / 1e9:.0f} GFLOP/s = "
          f"{flops * our_rate / 1e9 / peak:.0%} of the matmul peak")  # fmt: skip


if __name__ == "__main__":
    main()
