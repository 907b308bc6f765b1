"""Do the unlabeled images help the few labels? Selection strategies and pool heads, with paired intervals.

Two parts, both printing tables and writing them (JSON + Markdown) to --out:

``sweep``: the pool heads' hyperparameters, chosen on scikit-learn's digits as the demo splits them (897 unlabeled,
360 TRAIN, 540 TEST; raw 8x8 pixels), NOT on the benchmark sets, so the main run does not select on its own TEST:
    python benchmarks/unlabeled.py sweep --out bench-unlabeled/

``run``: on clothing10 and mnist5k (shared/data), with raw pixels, the random-init ViT and a pretrained MAE run as
backbones: 1/2/5-shot accuracy over 10 seeds of random (class-balanced) vs uniform (label-blind) vs TypiClust vs
ProbCover selection with the logreg and spread heads, and, on the random supports, the inductive heads (logreg,
prototype) against the pool heads (spread, selftrain, logreg+center, prototype+center); then the same on a
class-imbalanced pool (80% of half the classes' TRAIN images dropped, no extra unlabeled folder). Every comparison
is a paired difference over seeds:
    python benchmarks/unlabeled.py run --run clothing10=runs/mae-clothing10 --run mnist5k=runs/mae-mnist5k \\
        --out bench-unlabeled/
Features are cached (fewshot's feature cache), so a re-run costs only the fits. Run it with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.comparisons import compare, points
from fewshot.config import Config, EvaluateConfig, ExtractConfig, apply
from fewshot.episodes import run_episodes
from fewshot.features import Features, extract_features

SHOTS = (1, 2, 5)
SEEDS = 10
INDUCTIVE = ("logreg", "prototype")
POOL_HEADS = ("spread", "selftrain", "logreg+center", "prototype+center")
AGAINST = {"spread": "logreg", "selftrain": "logreg", "logreg+center": "logreg", "prototype+center": "prototype"}
SELECT_HEADS = ("logreg", "spread")
STRATEGIES = ("uniform", "typiclust", "probcover")  # uniform: what a person without labels gets from random picks
RANDOM_INIT = "vit_tiny_patch16_224:img_size=64,patch_size=8,depth=4,pool=avg"  # the MAE recipe's ViT, untrained
PIXELS = "pixels:16"  # 768-d: the pool heads' k-NN graph and self-training on 3,072-d pixels cost 4x more


def cfg_with(heads: tuple[str, ...], select: tuple[str, ...], seeds: int = SEEDS, shots=SHOTS, **sections) -> Config:
    ev = EvaluateConfig(shots=tuple(shots), seeds=seeds, heads=heads, select=select, full_knn=False)
    return Config(evaluate=ev, **sections)


def paired(rows: list[dict], field: str, refs: dict[str, str]) -> list[dict]:
    return compare(rows, field, refs)


def short(backbone: str) -> str:
    """Table names: the random-init ViT and a run folder by role, not by spec."""
    if backbone == RANDOM_INIT:
        return "random-init ViT"
    return "MAE run" if backbone.endswith(":pool=avg") else backbone


def fmt_rows(rows: list[dict]) -> list[str]:
    lines = ["| backbone | select | head | " + " | ".join(f"{k}-shot" for k in SHOTS) + " |"]
    lines.append("|" + "---|" * (3 + len(SHOTS)))
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((short(r["backbone"]), r["select"], r["head"]), {})[r["shots"]] = r
    for (b, s, h), cells in by.items():
        shown = [f"{100 * c['accuracy']:.1f} ± {100 * c['accuracy_ci95']:.1f}" if c else "–"
                 for c in (cells.get(k) for k in SHOTS)]  # fmt: skip
        lines.append(f"| {b} | {s} | {h} | " + " | ".join(shown) + " |")
    return lines


def fmt_diffs(diffs: list[dict], field: str) -> list[str]:
    """One table per kind of comparison: each cell the paired difference in points, * when the 95% interval
    excludes 0, and (seeds better / seeds)."""
    title = {"select": "selection vs random", "head": "pool head vs its inductive head", "backbone": "vs pixels"}
    lines = [f"| backbone | {title[field]} | with | " + " | ".join(f"{k}-shot" for k in SHOTS) + " |"]
    lines.append("|" + "---|" * (3 + len(SHOTS)))
    by: dict[tuple, dict] = {}
    for c in (c for c in diffs if c["field"] == field):
        other = ", ".join(c[f] for f in ("head", "select") if f != field)
        what = f"{c[field] if field != 'backbone' else short(c[field])} − {c['reference']}"
        by.setdefault((short(c["backbone"]), what, other), {})[c["shots"]] = c
    for (b, what, other), cells in by.items():
        shown = []
        for k in SHOTS:
            c = cells.get(k)
            shown.append("–" if c is None else points(c["difference"], c["difference_ci95"])
                         + (" *" if c["significant"] else "") + f" ({c['wins']}/{c['n']})")  # fmt: skip
        lines.append(f"| {b} | {what} | {other} | " + " | ".join(shown) + " |")
    return lines


def fmt_all_diffs(diffs: list[dict]) -> list[str]:
    lines: list[str] = []
    for field in ("select", "head", "backbone"):
        if any(c["field"] == field for c in diffs):
            lines += [*fmt_diffs(diffs, field), ""]
    return lines


# ---------------------------------------------------------------------------------------------- sweep


def sweep(out: Path) -> dict[str, Any]:
    """Pool heads' hyperparameters on the demo's digits split (pixels:8), each against logreg, paired."""
    from fewshot.demo import write_digits

    folders = write_digits(out / "digits")
    e = ExtractConfig(backbone="pixels:8")
    train, test = (extract_features(folders[s], e, progress=False) for s in ("train", "test"))
    extra = extract_features(folders["unlabeled"], e, progress=False)
    feats, unl = {"pixels:8": (train, test)}, {"pixels:8": extra}
    variants: dict[str, tuple[str, dict]] = {h: (h, {}) for h in ("logreg", "prototype", "knn")}
    for k in (5, 10, 20):
        for alpha in (0.2, 0.5, 0.8, 0.99):
            variants[f"spread k={k} alpha={alpha}"] = ("spread", {"spread": {"k": k, "alpha": alpha}})
    for t in (0.75, 0.9, 0.95):
        variants[f"selftrain threshold={t}"] = ("selftrain", {"selftrain": {"criterion": "threshold", "threshold": t}})
    for kb in (10, 50):
        variants[f"selftrain k_best={kb}"] = ("selftrain", {"selftrain": {"criterion": "k_best", "k_best": kb}})
    for base in ("logreg", "prototype", "knn"):
        variants[f"{base}+center"] = (f"{base}+center", {})
    rows: list[dict] = []
    for label, (head, heads_cfg) in variants.items():
        t0 = time.perf_counter()
        cfg = apply(cfg_with((head,), ("random",)), {"heads": heads_cfg}, source="sweep")
        for r in run_episodes(feats, cfg, progress=False, unlabeled=unl):
            rows.append({**r, "head": label, "seconds": time.perf_counter() - t0})
        print(f"  {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    refs = {label: label.removesuffix("+center") if label.endswith("+center") else "logreg" for label in variants}
    for base in ("logreg", "prototype", "knn"):
        refs.pop(base)
    diffs = paired(rows, "head", refs)
    return {"rows": rows, "diffs": diffs}


# ---------------------------------------------------------------------------------------------- run


def imbalanced(train: Features, seed: int = 0, keep: float = 0.2) -> Features:
    """TRAIN with ``1 - keep`` of the images of every second class dropped (seeded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(len(train.classes)):
        members = np.flatnonzero(train.labels == c)
        if c % 2 == 1:
            members = np.sort(rng.choice(members, size=max(1, round(keep * len(members))), replace=False))
        rows.append(members)
    idx = np.sort(np.concatenate(rows))
    return dataclasses.replace(train, features=train.features[idx], labels=train.labels[idx],
                               paths=[train.paths[i] for i in idx])  # fmt: skip


def run_dataset(data: Path, run: str | None, seeds: int) -> dict[str, Any]:
    backbones = [PIXELS, RANDOM_INIT] + ([f"{run}:pool=avg"] if run else [])
    feats: dict[str, tuple[Features, Features]] = {}
    unl: dict[str, Features] = {}
    for spec in backbones:
        t0 = time.perf_counter()
        e = ExtractConfig(backbone=spec)
        feats[spec] = (extract_features(data / "train", e, progress=False), extract_features(data / "test", e, False))
        unl[spec] = extract_features(data / "unlabeled", e, progress=False)
        print(f"  features {spec}: {time.perf_counter() - t0:.0f} s", flush=True)
    result: dict[str, Any] = {}
    for variant in ("balanced", "imbalanced"):
        if variant == "imbalanced":
            feats = {b: (imbalanced(tr), te) for b, (tr, te) in feats.items()}
        pool = unl if variant == "balanced" else None  # the unlabeled folder's classes are unknown: not subsampled
        rows = []
        t0 = time.perf_counter()
        rows += run_episodes(feats, cfg_with(INDUCTIVE + POOL_HEADS, ("random",), seeds), False, unlabeled=pool)
        print(f"  {variant} random x {len(INDUCTIVE + POOL_HEADS)} heads: {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        rows += run_episodes(feats, cfg_with(SELECT_HEADS, STRATEGIES, seeds), False, unlabeled=pool)
        print(f"  {variant} selection: {time.perf_counter() - t0:.0f} s", flush=True)
        diffs = paired(rows, "select", {s: "random" for s in STRATEGIES})
        diffs += paired(rows, "head", AGAINST)
        if run:
            diffs += paired(rows, "backbone", {f"{run}:pool=avg": PIXELS, RANDOM_INIT: PIXELS})
        result[variant] = {"rows": [{k: v for k, v in r.items() if k != "confusion"} for r in rows], "diffs": diffs}
    return result


# The README's table: (label, field, compared, reference, the other field's value)
SUMMARY = (
    ("uniform − random (logreg)", "select", "uniform", "random", "logreg"),
    ("typiclust − uniform (logreg)", "select", "typiclust", "uniform", "logreg"),
    ("typiclust − random (logreg)", "select", "typiclust", "random", "logreg"),
    ("probcover − uniform (logreg)", "select", "probcover", "uniform", "logreg"),
    ("typiclust − random (spread)", "select", "typiclust", "random", "spread"),
    ("spread − logreg", "head", "spread", "logreg", "random"),
    ("selftrain − logreg", "head", "selftrain", "logreg", "random"),
    ("logreg+center − logreg", "head", "logreg+center", "logreg", "random"),
    ("prototype+center − prototype", "head", "prototype+center", "prototype", "random"),
)


def summary(paths: list[Path]) -> list[str]:
    """The README's compact tables from run.json files: paired differences (points, 10 seeds) for the MAE run and
    pixels, balanced and imbalanced pools; * marks a 95% interval that excludes 0."""
    lines: list[str] = []
    for path in paths:
        for name, res in json.loads(path.read_text()).items():
            order = dict.fromkeys(r["backbone"] for r in res["balanced"]["rows"])
            backbones = [b for b in order if b != RANDOM_INIT]
            head = " | ".join(f"{short(b)} {k}-shot" for b in backbones for k in SHOTS)
            lines += [f"**{name}**", "", f"| paired difference (points) | pool | {head} |"]
            lines.append("|" + "---|" * (2 + len(backbones) * len(SHOTS)))
            for variant in ("balanced", "imbalanced"):
                rows = res[variant]["rows"]
                for label, field, compared, reference, other in SUMMARY:
                    found = {
                        (c["backbone"], c["shots"]): c
                        for c in compare(rows, field, {compared: reference})
                        if c["head" if field == "select" else "select"] == other
                    }
                    cells = []
                    for b in backbones:
                        for k in SHOTS:
                            c = found.get((b, k))
                            mark = "*" if c is not None and c["significant"] else ""
                            cells.append("–" if c is None else points(c["difference"], c["difference_ci95"]) + mark)
                    lines.append(f"| {label} | {variant} | " + " | ".join(cells) + " |")
                logreg = {
                    (r["backbone"], r["shots"]): r for r in rows if (r["select"], r["head"]) == ("random", "logreg")
                }
                cells = [f"{100 * logreg[(b, k)]['accuracy']:.1f}" for b in backbones for k in SHOTS]
                lines.append(f"| *logreg accuracy, random supports (%)* | {variant} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["sweep", "run", "summary"])
    parser.add_argument("--from", dest="sources", type=Path, action="append", default=[], help="summary: run.json")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--datasets", default="clothing10,mnist5k")
    parser.add_argument("--run", action="append", default=[], help="DATASET=RUN_FOLDER (a fewshot pretrain run)")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--out", type=Path, default=Path("bench-unlabeled"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lines: list[str] = []
    if args.part == "sweep":
        res = sweep(args.out)
        lines += ["## Pool heads' hyperparameters on the demo digits (pixels:8), 10 seeds", ""]
        lines += [*fmt_rows(res["rows"]), "", "Paired differences against logreg (HEAD+center against HEAD):", ""]
        lines += fmt_all_diffs(res["diffs"])
        (args.out / "sweep.json").write_text(json.dumps(res, indent=1, default=float))
    elif args.part == "summary":
        lines += summary(args.sources)
    else:
        runs = dict(item.split("=", 1) for item in args.run)
        everything = {}
        for name in args.datasets.split(","):
            print(f"{name}:", flush=True)
            everything[name] = res = run_dataset(args.data / name, runs.get(name), args.seeds)
            for variant, part in res.items():
                lines += [f"## {name}, {variant} pool", "", *fmt_rows(part["rows"]), "", *fmt_all_diffs(part["diffs"])]
        (args.out / "run.json").write_text(json.dumps(everything, indent=1, default=float))
    lines += ["", f"Total wall time {time.perf_counter() - started:.0f} s (shared 2-core machine)."]
    text = "\n".join(lines) + "\n"
    (args.out / f"{args.part}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
