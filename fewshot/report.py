"""Evaluation artifacts: ``report.json`` (everything), ``report.md`` (for people), ``label_efficiency.png``.

The plot is the label-efficiency curve of few-shot evaluation (accuracy against labels per class on a log-2
axis, as in DINO, Caron et al. 2021, and MSN, Assran et al. 2022), with the 95% t-interval over seeds shaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot.outputs import write_atomically, write_text

if TYPE_CHECKING:
    from fewshot.evaluation import Report

# Above this many classes the confusion matrix stays in report.json only: a wider markdown table is unreadable.
MAX_MD_CONFUSION = 30


def write_report(report: Report, out: Path) -> None:
    """Write ``report.json``, ``report.md`` and ``label_efficiency.png`` into ``out`` (created if needed), and
    ``paired_differences.png`` when the report holds paired comparisons."""
    from fewshot.comparisons import plot_differences

    out = Path(out)
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text(out / "report.md", markdown(report))
    plot(report, out / "label_efficiency.png")
    if report.get("comparisons"):
        plot_differences(report["comparisons"], out / "paired_differences.png")


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


def _cell(text: object) -> str:
    """Markdown table cell: pipes escaped so a class name or path cannot break the table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _selects(report: Report) -> list[str]:
    return report.get("select") or ["random"]


def _score_table(report: Report, key: str) -> list[str]:
    shots, selects = report["shots"], _selects(report)
    by = {(r["backbone"], r.get("select", "random"), r["head"], r["shots"]): r for r in report["results"]}
    rows = []
    for backbone in report["backbones"]:
        for select in selects:
            for head in report["heads"]:
                cells = []
                for k in shots:
                    r = by.get((backbone, select, head, k))
                    cells.append(interval(r[key], r[f"{key}_ci95"]) if r else "–")
                rows.append([backbone, *([select] if len(selects) > 1 else []), head, *cells])
    first = ["backbone", *(["select"] if len(selects) > 1 else []), "head"]
    return _table([*first, *(f"{k}-shot" for k in shots)], rows)


def _comparison_lines(report: Report) -> list[str]:
    """The paired differences the report leads with: headline sentences, then the full table."""
    from fewshot.comparisons import table

    comparisons = report.get("comparisons") or []
    if not comparisons:
        return []
    header, rows = table(comparisons)
    lines = ["## Paired differences", ""]
    lines += [f"- {s}" for s in report.get("headline", [])]
    lines += [
        "",
        "Each configuration against its reference on the same seeds (for random selection, the very same supports): "
        "mean difference in points ± half-width of the paired 95% t-interval; * marks an interval that excludes 0.",
        "",
        *_table(header, rows),
        "",
    ]
    return lines


def _selection_lines(report: Report) -> list[str]:
    """How many classes each selection strategy's picks covered (the labels were revealed after the pick)."""
    selects = [s for s in _selects(report) if s != "random"]
    if not selects:
        return []
    shots = report["shots"]
    by = {(r.get("select"), r["shots"]): r for r in report["results"]}
    rows = [
        [s, *(f"{by[(s, k)].get('classes_covered') or 0:.1f} ({by[(s, k)].get('distinct_supports', '?')})"
              for k in shots if (s, k) in by)]
        for s in selects
    ]  # fmt: skip
    return [
        "## Selection",
        "",
        f"A strategy picks shots × {len(report['classes'])} TRAIN images from their features alone, then their "
        "labels are revealed; random is the class-balanced draw. Classes covered, mean over seeds (in brackets: "
        "distinct supports over the seeds; a strategy that picks the same images whatever the seed has an interval "
        "that shows none of the luck of the draw):",
        "",
        *_table(["select", *(f"{k}-shot" for k in shots)], rows),
        "",
    ]


def _pool_lines(report: Report) -> list[str]:
    pool = report.get("pool") or {}
    sizes = [r["pool_size"] for r in report["results"] if r.get("pool_size")]
    if not sizes:
        return []
    extra = f" plus {pool['unlabeled_images']} images of `{pool['unlabeled']}`" if pool.get("unlabeled") else ""
    return [
        f"Pool heads saw TRAIN's images outside the support{extra} as unlabeled pool, capped at "
        f"{pool.get('max_images')} images (pool.max_images): {min(sizes):.0f}–{max(sizes):.0f} per episode.",
        "",
    ]


def markdown(report: Report) -> str:
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
        *(
            [
                "A selection strategy picks each backbone's supports from that backbone's features (seeds vary its "
                "k-means), so its supports differ between backbones; random supports are shared."
            ]
            if any(s != "random" for s in _selects(report))
            else []
        ),
        "",
        *_comparison_lines(report),
        *_pool_lines(report),
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
    best = report["best"]
    if best:
        lines += [
            f"## Best configuration: {best['backbone']} + {best['head']}"
            + (f", {best['select']} selection" if best.get("select", "random") != "random" else "")
            + f", {best['shots']}-shot",
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
    lines += _selection_lines(report)
    overlaps = report.get("overlaps") or []
    if overlaps:
        lines += [f"## TEST images also in TRAIN or the pool ({len(overlaps)}, allowed by --allow-overlap)", ""]
        lines += [f"- `{o['test']}` = `{o['other']}` ({o['with']})" for o in overlaps]
        lines += [""]
    skipped = report["skipped"]
    lines += [f"## Skipped files ({len(skipped)})", ""]
    if skipped:
        lines += [f"- {s['split']}: `{s.get('path', '?')}`: {s.get('reason', '')}" for s in skipped]
    else:
        lines += ["None: every image was read."]
    return "\n".join(lines) + "\n"


def plot(report: Report, path: Path) -> None:
    """Accuracy vs shots (log-2 axis): one line per backbone × head, 95% CI shaded; full-label k-NN dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 5), dpi=120)
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state: safe in scripts, threads and headless machines
    ax = fig.add_subplot()
    palette = [f"C{i}" for i in range(10)]
    styles = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D")]
    selects = _selects(report)
    for b, backbone in enumerate(report["backbones"]):
        color = palette[b % len(palette)]
        for h, (select, head) in enumerate((s, h) for s in selects for h in report["heads"]):
            rows = sorted(
                (
                    r
                    for r in report["results"]
                    if (r["backbone"], r["head"], r.get("select", "random")) == (backbone, head, select)
                ),
                key=lambda r: r["shots"],
            )
            if not rows:
                continue
            x = [r["shots"] for r in rows]
            y = [100 * r["accuracy"] for r in rows]
            ci = [100 * r["accuracy_ci95"] for r in rows]
            line, marker = styles[h % len(styles)]
            label = f"{backbone} · {head}" + (f" · {select}" if len(selects) > 1 else "")
            ax.plot(x, y, line, marker=marker, color=color, label=label)
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
