"""The 20-minute CPU recipe (``fewshot pretrain DATA --minutes 20``, recipe auto) against raw pixels and today's
CPU recipes (``recipes/mae-cpu-tiny.toml``, ``recipes/dino-cpu-tiny.toml``) on the dev sets.

For each set it pretrains on ``SET/unlabeled`` (a run folder that already exists is resumed, so a finished one is
reused as it is), evaluates every run, the auto recipe's ViT at random init and pixels on ``SET/train`` →
``SET/test`` (1, 5 and 10 shots, 10 seeds, heads knn, logreg, linear and prototype; MAE runs read with ``pool=avg``),
and prints each backbone's best head with its 95% interval, then the auto run's paired differences (its best head
minus the other backbone's best head, seed by seed on the same supports: :func:`fewshot.stats.paired_difference`).

    python benchmarks/cpu_recipes.py --work runs/cpu-recipes [--sets clothing10,mnist5k] [--minutes 20]
        [--compare mae-cpu-tiny,dino-cpu-tiny]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SHOTS, SEEDS, HEADS = (1, 5, 10), 10, ("knn", "logreg", "linear", "prototype")


def fewshot(*args: object) -> str:
    """Run a fewshot command in a subprocess (as a user would); its output."""
    cmd = [sys.executable, "-m", "fewshot", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def pretrain(data: Path, out: Path, recipe: str | None, length: list[str]) -> dict:
    """Pretrain (or resume / reuse) a run folder; its config.json. ``recipe`` None: recipe auto for ``length``."""
    if recipe is None:
        printed = fewshot("pretrain", data / "unlabeled", *length, "--out", out, "-q")
        print("  " + next((ln for ln in printed.splitlines() if ln.startswith("recipe auto")), "recipe auto (saved)"))
    else:
        fewshot("pretrain", data / "unlabeled", "--recipe", ROOT / "recipes" / f"{recipe}.toml", "--out", out, "-q")
    return json.loads((out / "config.json").read_text())


def spec(run: Path, saved: dict) -> str:
    return f"{run}:pool=avg" if saved["config"]["method"] == "mae" else str(run)


def random_init(saved: dict) -> str:
    c = saved["config"]
    kwargs = {"img_size": c["img_size"], "patch_size": c["patch_size"], "depth": c["depth"]}
    pool = ",pool=avg" if c["method"] == "mae" else ""
    return f"{c['model']}:" + ",".join(f"{k}={v}" for k, v in kwargs.items() if v is not None) + pool


def best(report: dict, backbone: str, shots: int) -> dict:
    rows = [r for r in report["results"] if r["backbone"] == backbone and r["shots"] == shots]
    return max(rows, key=lambda r: r["accuracy"])


def main() -> None:
    from fewshot.stats import paired_difference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the run folders and evaluations")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--sets", default="clothing10,mnist5k")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument(
        "--auto-steps", default=None,
        help="SET=STEPS,...: the auto recipe for this many steps instead of --minutes (on a shared machine a time "
        "budget buys fewer steps than on an idle one; the sweep's 20-minute step counts stand for idle 2 cores)",
    )  # fmt: skip
    parser.add_argument("--compare", default="mae-cpu-tiny,dino-cpu-tiny", help="today's recipes to pretrain too")
    args = parser.parse_args()
    for name in args.sets.split(","):
        data, work = args.data / name, args.work / name
        print(f"\n## {name}")
        steps = dict(item.split("=") for item in args.auto_steps.split(",")) if args.auto_steps else {}
        length = ["--steps", steps[name]] if name in steps else ["--minutes", str(args.minutes)]
        runs = {"auto": pretrain(data, work / "auto", None, length)}
        for recipe in filter(None, args.compare.split(",")):
            runs[recipe] = pretrain(data, work / recipe, recipe, [])
        for label, saved in runs.items():
            budget = saved.get("budget") or {}
            note = f", planned {budget['expected_minutes']:.1f} min" if budget else ""
            print(f"  {label}: {saved['plan']['total_steps']} steps{note}")
        specs = {label: spec(work / label, saved) for label, saved in runs.items()}
        specs |= {"auto at random init": random_init(runs["auto"]), "pixels": "pixels"}
        report_dir = work / "evaluation"
        fewshot("evaluate", data / "train", data / "test", *[a for s in specs.values() for a in ("-b", s)],
                "--shots", ",".join(map(str, SHOTS)), "--seeds", SEEDS, "--heads", ",".join(HEADS),
                "--out", report_dir, "-q")  # fmt: skip
        report = json.loads((report_dir / "report.json").read_text())
        print("\n| backbone | " + " | ".join(f"{k}-shot (best head)" for k in SHOTS) + " |")
        print("|---|" + "---|" * len(SHOTS))
        for label, s in specs.items():
            cells = [best(report, s, k) for k in SHOTS]
            print(f"| {label} | " + " | ".join(f"{c['accuracy']:.3f} ± {c['accuracy_ci95']:.3f} ({c['head']})"
                                              for c in cells) + " |")  # fmt: skip
        print("\n| auto minus | " + " | ".join(f"{k}-shot" for k in SHOTS) + " |")
        print("|---|" + "---|" * len(SHOTS))
        for label, s in specs.items():
            if label == "auto":
                continue
            cells = []
            for k in SHOTS:
                a, b = best(report, specs["auto"], k), best(report, s, k)
                d = paired_difference([p["accuracy"] for p in a["per_seed"]], [p["accuracy"] for p in b["per_seed"]])
                mark = "" if d.significant else " (n.s.)"
                cells.append(f"{100 * d.mean:+.1f} ± {100 * d.ci95:.1f} pts, {d.wins}/{d.n} wins{mark}")
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
