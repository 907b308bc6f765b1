"""Does guarded adaptation keep what it starts from, and beat it on a new domain? (issue 11)

A source backbone with real features: MAE (ViT-tiny cut to 4 blocks, 16 px in 4-px patches; the demo's recipe,
longer) on all 1,797 scikit-learn digits (8×8 scans). The target is another domain of the same kind: MNIST
(/work/shared/data/mnist5k: 3,000 unlabeled, 1,000 labelled TRAIN, 1,000 TEST, 28×28 pen strokes rather than
8×8 scans). On the target's unlabeled images, the same seed and the same number of steps for each:

- ``naive``: continue from the source as today's ``--init`` did: fresh decoder / head, full learning rate;
- ``guarded``: the same with this issue's guard at its defaults (head warm-up over 10% of the run, then layer decay
  0.75 and a backbone lr ramp; DINO: a higher teacher momentum);
- ``guarded-lr0.1``: the guard with the backbone's rate also × 0.1 (``adapt.backbone_lr_scale = 0.1``);
- ``scratch``: the same architecture from random initialisation (MAE only);

then ``fewshot evaluate`` on the target's labels: 1/5/10 shots × 10 seeds, k-NN / logreg / prototype, every ViT read
with ``avg`` pooling, against the source as it is and raw pixels. Every run is monitored (leave-one-out k-NN on the
target's TRAIN images), so the monitored curves of naive and guarded come out too.

Prints: each backbone's best head at 10 shots with 1/5/10-shot accuracy ± 95% CI, the paired difference to the
source over the same supports, and the monitored k-NN of naive and guarded at the start, along the run and at the
end; writes WORK/curves.png. Re-running reuses finished runs (run folders resume) and cached features.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/adapt.py --work /work/runs-adapt [--methods mae,dino]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

SOURCE: dict[str, Any] = {  # the demo's MAE recipe (fewshot.demo.DEMO_PRETRAIN), 5,000 steps ≈ 178 epochs
    "method": "mae", "model": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 4, "steps": 5000,
    "batch_size": 64, "log_every": 50, "checkpoint_every": 25,
    "optim": {"lr": 1.5e-3, "min_lr": 0.0, "weight_decay": 0.05, "weight_decay_end": 0.05, "betas": (0.9, 0.95),
              "clip_grad": 0.0},
    "mae": {"mask_ratio": 0.75, "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4, "reconstruct_every": 50},
}  # fmt: skip
# today's --init: a fresh head trained together with the backbone at the full rate, DINO's from-scratch momentum
NAIVE = {"head_warmup_steps": 0, "backbone_lr_scale": 1.0, "layer_decay": 1.0, "backbone_warmup_steps": 0}
CAUTIOUS = {"backbone_lr_scale": 0.1}  # the guard with the backbone's rate also × 0.1
DINO: dict[str, Any] = {  # DINO continued from the MAE source: the small-head CPU recipe, 4 local crops of 8 px
    "method": "dino", "batch_size": 64, "log_every": 25, "checkpoint_every": 10,
    "optim": {"lr": 2e-3, "min_lr": 1e-5},
    "dino": {"hidden_dim": 512, "bottleneck_dim": 128, "local_crops": 4, "drop_path_rate": 0.0},
}  # fmt: skip
SHOTS, SEEDS, HEADS = (1, 5, 10), 10, ("knn", "logreg", "prototype")


def write_digits(root: Path) -> Path:
    """All 1,797 scikit-learn digits as 8×8 PNGs in one flat folder (no labels)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(np.rint(load_digits().images * (255 / 16)).astype(np.uint8)):
        if not (root / f"d{i:04d}.png").exists():
            Image.fromarray(image, mode="L").save(root / f"d{i:04d}.png")
    return root


def train(data: Path, recipe: dict[str, Any], out: Path) -> float:
    """Pretrain (or finish, or reuse) a run folder; the seconds it took now."""
    from fewshot.config import apply
    from fewshot.pretrain_config import PretrainConfig
    from fewshot.sources import open_source
    from fewshot.train import pretrain

    t0 = time.perf_counter()
    print(f"== {out.name}", flush=True)
    pretrain(open_source(data), out, apply(PretrainConfig(), recipe, source="benchmark"), progress=False)
    return time.perf_counter() - t0


def curve(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["knn_top1"]) for r in lines if r.get("kind") in ("start", "epoch") and "knn_top1" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the data, run folders and results")
    parser.add_argument("--target", type=Path, default=Path("/work/shared/data/mnist5k"))
    parser.add_argument("--steps", type=int, default=1000, help="MAE steps on the target for every variant")
    parser.add_argument("--dino-steps", type=int, default=300)
    parser.add_argument("--methods", default="mae", help="mae, dino or mae,dino")
    parser.add_argument("--source-steps", type=int, default=SOURCE["steps"], help="(a quick check: fewer)")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    args = parser.parse_args()
    work, target = args.work, args.target
    methods = args.methods.split(",")
    seconds: dict[str, float] = {}
    source = work / "source-mae"
    seconds["source"] = train(write_digits(work / "digits"), {**SOURCE, "steps": args.source_steps}, source)
    monitor = {"monitor": str(target / "train"), "monitor_pool": "avg"}
    target_recipe = {**SOURCE, **monitor, "steps": args.steps, "checkpoint_every": 5}
    runs: dict[str, Path] = {}
    if "mae" in methods:
        for name, extra in (
            ("naive", {"init": str(source), "adapt": NAIVE}),
            ("guarded", {"init": str(source)}),
            ("guarded-lr0.1", {"init": str(source), "adapt": CAUTIOUS}),
            ("scratch", {}),
        ):
            runs[f"mae-{name}"] = work / f"target-mae-{name}"
            seconds[f"mae-{name}"] = train(target / "unlabeled", {**target_recipe, **extra}, runs[f"mae-{name}"])
    if "dino" in methods:
        dino = {**DINO, **monitor, "init": str(source), "steps": args.dino_steps}
        momentum = min(0.996, max(0.99, 1 - 20 / args.dino_steps))  # DINO's from-scratch rule, as before this issue
        naive = {**dino, "adapt": NAIVE, "dino": {**DINO["dino"], "momentum_teacher": momentum}}
        for name, recipe in (("naive", naive), ("guarded", dino), ("guarded-lr0.1", {**dino, "adapt": CAUTIOUS})):
            runs[f"dino-{name}"] = work / f"target-dino-{name}"
            seconds[f"dino-{name}"] = train(target / "unlabeled", recipe, runs[f"dino-{name}"])
    report = evaluate_all(target, source, runs, work / "evaluation", args.seeds)
    print_results(report, source, runs, seconds)
    plot_curves(runs, work / "curves.png")


def evaluate_all(target: Path, source: Path, runs: dict[str, Path], out: Path, seeds: int) -> dict:
    from fewshot.config import Config, EvaluateConfig
    from fewshot.evaluation import evaluate

    specs = [f"{source}:pool=avg"] + [f"{run}:pool=avg" for run in runs.values()] + ["pixels:28"]
    cfg = Config(evaluate=EvaluateConfig(shots=SHOTS, seeds=seeds, heads=HEADS))
    return evaluate(target / "train", target / "test", backbones=specs, cfg=cfg, out=out, progress=False)


def print_results(report: dict, source: Path, runs: dict[str, Path], seconds: dict[str, float]) -> None:
    from fewshot.stats import paired_difference

    names = {f"{source}:pool=avg": "source (MAE on sklearn digits), as it is", "pixels:28": "pixels:28"}
    names |= {f"{run}:pool=avg": name for name, run in runs.items()}
    by = {(r["backbone"], r["head"], r["shots"]): r for r in report["results"]}
    src = f"{source}:pool=avg"
    print("\n| backbone | head | " + " | ".join(f"{k}-shot" for k in SHOTS) + " | − source, 10-shot (points) |")
    print("|---|---|" + "---|" * (len(SHOTS) + 1))
    for spec, name in names.items():
        head = max(HEADS, key=lambda h: by[(spec, h, SHOTS[-1])]["accuracy"])
        cells = [f"{100 * by[(spec, head, k)]['accuracy']:.1f} ± {100 * by[(spec, head, k)]['accuracy_ci95']:.1f}"
                 for k in SHOTS]  # fmt: skip
        diff = "–"
        if spec != src:
            a, b = by[(spec, head, SHOTS[-1])], by[(src, head, SHOTS[-1])]
            d = paired_difference([p["accuracy"] for p in a["per_seed"]], [p["accuracy"] for p in b["per_seed"]])
            diff = f"{100 * d.mean:+.1f} ± {100 * d.ci95:.1f} ({d.wins} wins, {d.losses} losses)"
        print(f"| {name} | {head} | " + " | ".join(cells) + f" | {diff} |")
    knn = {r["backbone"]: r["accuracy"] for r in report["full_knn"]}
    print("\nk-NN with every TRAIN label: " + ", ".join(f"{names[s]} {100 * a:.1f}" for s, a in knn.items()))
    print("\nmonitored k-NN top-1 (leave-one-out on the target's TRAIN, avg pool): start → … → best → end")
    for name, run in runs.items():
        points = curve(run)
        if not points:
            continue
        shown = points[:: max(1, len(points) // 6)]
        best = max(points, key=lambda p: p[1])
        print(f"  {name:<12} " + " → ".join(f"{100 * a:.1f} (step {s})" for s, a in shown)
              + f" | best {100 * best[1]:.1f} (step {best[0]}) | end {100 * points[-1][1]:.1f}")  # fmt: skip
    print("\nwall seconds now (a finished run is reused: ~0): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, run in runs.items():
        points = curve(run)
        if points:
            ax.plot([s for s, _ in points], [100 * a for _, a in points], marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("monitored k-NN top-1 (%)")
    ax.set_title("Continuing from the source on MNIST: naive vs guarded")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, bbox_inches="tight")
    print(f"curves: {path}")


if __name__ == "__main__":
    main()
