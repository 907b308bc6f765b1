"""Evaluation artifacts: ``report.json`` (everything), ``report.md`` (for people), ``label_efficiency.png``.

The plot is the label-efficiency curve of few-shot evaluation (accuracy against labels per class on a log-2
axis, as in DINO, Caron et al. 2021, and MSN, Assran et al. 2022), with the 95% t-interval over seeds shaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from fewshot.outputs import write_atomically, write_text

# Above this many classes the confusion matrix stays in report.json only: a wider markdown table is unreadable.
MAX_MD_CONFUSION = 30


def write_report(report: dict, out: Path) -> None:
    """Write ``report.json``, ``report.md`` and ``label_efficiency.png`` into ``out`` (created if needed)."""
    out = Path(out)
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text(out / "report.md", markdown(report))
    plot(report, out / "label_efficiency.png")


def interval(value: float, ci: float | None = None, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± half-width`` of a score in [0, 1], times ``scale``; an interval that spills outside [0, 1] (a
    handful of seeds: with 2, t₀.₉₇₅ = 12.7) is shown clipped as ``mean (low–high)`` instead of an impossible ±."""
    if ci is None:
        return f"{scale * value:.{digits}f}"
    if value - ci < 0 or value + ci > 1:
        low, high = max(0.0, value - ci), min(1.0, value + ci)
        return f"{scale * value:.{digits}f} ({scale * low:.{digits}f}–{scale * high:.{digits}f})"
    return f"{scale * value:.{digits}f} ± {scale * ci:.{digits}f}"


def few_seeds_note(seeds: int) -> str:
    """A warning for evaluations whose intervals are too wide to conclude anything ('' from 3 seeds on)."""
    if seeds >= 3:
        return ""
    if seeds == 2:
        return "2 seeds give a 95% interval 12.7 standard errors wide: too few to conclude; use --seeds 5 or more"
    return "1 seed gives no confidence interval; use --seeds 5 or more"



def _points(r: dict) -> str:
    """A paired difference in points: ``+3.1 ± 1.2``, starred when the interval excludes 0."""
    return f"{100 * r['mean']:+.1f} ± {100 * r['ci95']:.1f}" + (" *" if r["significant"] else "")


def _cell(text: object) -> str:
    """Markdown table cell: pipes escaped so a class name or path cannot break the table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _score_table(report: dict, key: str) -> list[str]:
    shots = report["shots"]
    by = {(r["backbone"], r["head"], r["shots"]): r for r in report["results"]}
    rows = []
    for backbone in report["backbones"]:
        for head in report["heads"]:
            cells = []
            for k in shots:
                r = by.get((backbone, head, k))
                cells.append(interval(r[key], r[f"{key}_ci95"]) if r else "–")
            rows.append([backbone, head, *cells])
    return _table(["backbone", "head", *(f"{k}-shot" for k in shots)], rows)


def markdown(report: dict) -> str:
    """The human-readable report: accuracy tables, full-label k-NN, the best configuration, skipped files."""
    classes = report["classes"]
    lines = [
        "# Few-shot evaluation",
        "",
        f"TRAIN: {report['train_images']} images, {len(classes)} classes. "
        f"TEST: {report['test_images']} images, all scored in every episode.",
        f"Each cell: mean over {report['seeds']} seeded supports drawn from TRAIN (the same supports for every "
        "backbone and head) ± half-width of the 95% t-interval, in %.",
        *([f"**Warning:** {note}.", ""] if (note := few_seeds_note(report["seeds"])) else [""]),
        *[f"**Warning:** {text}." for text in report.get("backbone_notes", {}).values()],
        "## Accuracy (%)",
        "",
        *_score_table(report, "accuracy"),
        "",
        "## Balanced accuracy (%)",
        "",
        *_score_table(report, "balanced_accuracy"),
        "",
    ]
    if report["full_knn"]:
        lines += ["## k-NN with every TRAIN label", ""]
        rows = [
            [r["backbone"], str(r["labels"]), interval(r["accuracy"]), interval(r["balanced_accuracy"])]
            for r in report["full_knn"]
        ]
        lines += [*_table(["backbone", "labels", "accuracy (%)", "balanced accuracy (%)"], rows), ""]
    if report.get("vs_init"):
        lines += [
            "## Each run against the weights it started from (--init)",
            "",
            "Paired over the same supports: mean of (run − init) accuracy, in points, ± 95% t-interval; wins / losses "
            "count the supports.",
            "",
        ]
        rows = [
            [r["backbone"], r["init"], r["head"], str(r["shots"]), _points(r), f"{r['wins']} / {r['losses']}"]
            for r in report["vs_init"]
        ]
        lines += [*_table(["run", "init", "head", "shots", "run − init (points)", "wins / losses"], rows), ""]
    best = report["best"]
    if best:
        lines += [
            f"## Best configuration: {best['backbone']} + {best['head']}, {best['shots']}-shot",
            "",
            f"Accuracy {interval(best['accuracy'], best['accuracy_ci95'])} %, balanced accuracy "
            f"{interval(best['balanced_accuracy'], best['balanced_accuracy_ci95'])} % "
            f"(highest mean accuracy at the largest shot count).",
            "",
            "### Per-class accuracy (%)",
            "",
        ]
        counts = report["test_per_class"]
        rows = [
            [
                name,
                str(counts[i]),
                "–" if best["per_class_accuracy"][name] is None else interval(best["per_class_accuracy"][name]),
            ]
            for i, name in enumerate(classes)
        ]
        lines += [*_table(["class", "TEST images", "accuracy (%)"], rows), ""]
        lines += ["### Confusion matrix", ""]
        if len(classes) <= MAX_MD_CONFUSION:
            lines += [
                f"Rows: true class; columns: predicted class; counts summed over {best['seeds']} seeds.",
                "",
                *_table(
                    ["true \\ predicted", *classes],
                    [[name, *map(str, row)] for name, row in zip(classes, best["confusion"], strict=True)],
                ),
                "",
            ]
        else:
            lines += [f"{len(classes)} classes: too wide for markdown; see `best.confusion` in report.json.", ""]
    skipped = report["skipped"]
    lines += [f"## Skipped files ({len(skipped)})", ""]
    if skipped:
        lines += [f"- {s['split']}: `{s.get('path', '?')}`: {s.get('reason', '')}" for s in skipped]
    else:
        lines += ["None: every image was read."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Accuracy vs shots (log-2 axis): one line per backbone × head, 95% CI shaded; full-label k-NN dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 5), dpi=120)
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state: safe in scripts, threads and headless machines
    ax = fig.add_subplot()
    palette = [f"C{i}" for i in range(10)]
    styles = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D")]
    for b, backbone in enumerate(report["backbones"]):
        color = palette[b % len(palette)]
        for h, head in enumerate(report["heads"]):
            rows = sorted(
                (r for r in report["results"] if r["backbone"] == backbone and r["head"] == head),
                key=lambda r: r["shots"],
            )
            if not rows:
                continue
            x = [r["shots"] for r in rows]
            y = [100 * r["accuracy"] for r in rows]
            ci = [100 * r["accuracy_ci95"] for r in rows]
            line, marker = styles[h % len(styles)]
            ax.plot(x, y, line, marker=marker, color=color, label=f"{backbone} · {head}")
            ax.fill_between(
                x,
                [a - c for a, c in zip(y, ci, strict=True)],
                [a + c for a, c in zip(y, ci, strict=True)],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
        for r in report["full_knn"]:
            if r["backbone"] == backbone:
                ax.axhline(
                    100 * r["accuracy"],
                    color=color,
                    linestyle=(0, (1, 3)),
                    linewidth=1,
                    label=f"{backbone} · k-NN, all labels",
                )
    shots = report["shots"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("labelled images per class (shots, log₂ scale)")
    ax.set_ylabel("TEST accuracy (%)")
    ax.set_title(f"Label efficiency: mean accuracy over {report['seeds']} seeds, 95% CI shaded")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a curve
    # bbox_inches="tight" grows the canvas to fit the outside legend
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
