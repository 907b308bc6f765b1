"""Paired comparisons between evaluated configurations: backbone against a reference backbone, selection strategy
against random, head against a reference head.

Two configurations that differ in one field (backbone, ``select`` or head) and agree on the rest were scored on
episodes with the same seeds; random supports are the very same images for every backbone and head. So they are
compared per seed, with the paired t-interval of :func:`fewshot.stats.paired_difference` (mean difference, its
95% half-width, and the seeds won and lost), not by overlapping intervals.

Which backbone is compared with which is a mapping ``{backbone: reference}``: by default every backbone against
one reference (``--reference``, else pixels when evaluated); callers may add their own pairs (e.g. a pretraining
run against its initialisation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fewshot.stats import paired_difference

FIELDS = ("backbone", "head", "select", "shots")


def backbone_references(backbones: Sequence[str], reference: str | None) -> dict[str, str]:
    """``{backbone: reference}`` for every other backbone; ``reference`` None picks the first ``pixels`` spec."""
    if reference is None:
        reference = next((b for b in backbones if b == "pixels" or b.startswith("pixels:")), None)
    if reference is None:
        return {}
    return {b: reference for b in backbones if b != reference}


def compare(rows: Sequence[dict], field: str, references: Mapping[str, str], kind: str | None = None) -> list[dict]:
    """Every row whose ``field`` has a reference in ``references`` against the row that differs only there.

    Each result holds the compared configuration (``backbone``, ``head``, ``select``, ``shots``), ``field``,
    ``kind`` (a label, ``field`` unless given), ``reference`` (the value of ``field`` compared against), and for
    accuracy and balanced accuracy the paired ``difference``, ``difference_ci95``, ``wins``, ``losses``, ``n`` and
    ``significant`` (balanced ones prefixed ``balanced_``), over the seeds both rows share.
    """
    by_key = {tuple(r.get(f, "random") for f in FIELDS): r for r in rows if r.get("shots") is not None}
    out = []
    for key, row in by_key.items():
        value = key[FIELDS.index(field)]
        ref_value = references.get(value)
        if ref_value is None or ref_value == value:
            continue
        ref = by_key.get(tuple(ref_value if f == field else v for f, v in zip(FIELDS, key, strict=True)))
        if ref is None:
            continue
        mine = {p["seed"]: p for p in row["per_seed"]}
        theirs = {p["seed"]: p for p in ref["per_seed"]}
        seeds = [s for s in mine if s in theirs]
        if not seeds:
            continue
        result: dict[str, Any] = {f: row.get(f, "random") for f in FIELDS}
        result.update(kind=kind or field, field=field, reference=ref_value)
        for metric, prefix in (("accuracy", ""), ("balanced_accuracy", "balanced_")):
            d = paired_difference([mine[s][metric] for s in seeds], [theirs[s][metric] for s in seeds])
            result.update(
                {
                    f"{prefix}difference": d.mean,
                    f"{prefix}difference_ci95": d.ci95,
                    f"{prefix}wins": d.wins,
                    f"{prefix}losses": d.losses,
                    f"{prefix}n": d.n,
                    f"{prefix}significant": d.significant,
                }
            )
        out.append(result)
    return out


def all_comparisons(
    rows: Sequence[dict],
    references: Mapping[str, str],
    strategies: Sequence[str],
    heads: Sequence[str],
    reference_head: str | None = None,
) -> list[dict]:
    """Backbones against their references, each selection strategy against random (when random was evaluated),
    and with ``reference_head`` every head against it."""
    found = compare(rows, "backbone", references)
    if "random" in strategies:
        found += compare(rows, "select", {s: "random" for s in strategies if s != "random"})
    if reference_head:
        found += compare(rows, "head", {h: reference_head for h in heads if h != reference_head})
    return found


# ---------------------------------------------------------------------------------------------- reporting


def points(value: float, ci: float) -> str:
    return f"{100 * value:+.1f} ± {100 * ci:.1f}"


def sentence(c: dict) -> str:
    """One comparison in words: "runs/dino beats pixels by +6.1 ± 2.3 points at 5 shots (logreg; won 9 of 10)"."""
    what = {"backbone": c["backbone"], "select": f"{c['select']} selection", "head": c["head"]}[c["field"]]
    other = {"backbone": c["reference"], "select": f"{c['reference']} selection", "head": c["reference"]}[c["field"]]
    context = [x for f, x in (("head", c["head"]), ("select", f"{c['select']} selection"),
                              ("backbone", c["backbone"])) if f != c["field"]]  # fmt: skip
    if c["field"] == "backbone" and c["select"] == "random":
        context = [c["head"]]
    diff = points(c["difference"], c["difference_ci95"])
    if not c["significant"]:
        verdict = f"is level with {other} ({diff} points, the interval holds 0)"
    elif c["difference"] > 0:
        verdict = f"beats {other} by {diff} points"
    else:
        verdict = f"trails {other} by {points(-c['difference'], c['difference_ci95']).lstrip('+')} points"
    return (
        f"{what} {verdict} at {c['shots']} shot{'s' if c['shots'] != 1 else ''} ({', '.join(context)}; "
        f"better in {c['wins']} of {c['n']} seeds, worse in {c['losses']})"
    )


def headline(comparisons: Sequence[dict], rows: Sequence[dict]) -> list[str]:
    """The sentences a report leads with: each backbone against its reference at the largest shot count, with the
    backbone's best head and strategy there; each strategy against random at the smallest shot count, with the
    best configuration there; each head against the reference head at the largest shot count."""
    results = [r for r in rows if r.get("shots") is not None]
    if not comparisons or not results:
        return []
    top, low = max(r["shots"] for r in results), min(r["shots"] for r in results)

    def best(backbone: str | None, shots: int) -> dict:
        pool = [r for r in results if r["shots"] == shots and backbone in (None, r["backbone"])]
        return max(pool, key=lambda r: r["accuracy"])

    lines = []
    for c in comparisons:
        if c["field"] == "backbone" and c["shots"] == top:
            b = best(c["backbone"], top)
            if (c["head"], c["select"]) == (b["head"], b.get("select", "random")):
                lines.append(sentence(c))
        elif c["field"] == "select" and c["shots"] == low:
            b = best(None, low)
            if (c["backbone"], c["head"]) == (b["backbone"], b["head"]):
                lines.append(sentence(c))
        elif c["field"] == "head" and c["shots"] == top:
            b = best(None, top)
            if (c["backbone"], c["select"]) == (b["backbone"], b.get("select", "random")):
                lines.append(sentence(c))
    return lines


def table(comparisons: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the full comparison table (differences in points)."""
    header = ["compared", "against", "head", "select", "backbone", "shots", "accuracy diff.", "balanced diff.",
              "better / worse"]  # fmt: skip
    rows = []
    for c in comparisons:
        compared = c[c["field"]]
        rows.append(
            [
                str(compared),
                str(c["reference"]),
                c["head"],
                c["select"],
                c["backbone"],
                str(c["shots"]),
                points(c["difference"], c["difference_ci95"]) + (" *" if c["significant"] else ""),
                points(c["balanced_difference"], c["balanced_difference_ci95"]),
                f"{c['wins']} / {c['losses']}",
            ]
        )
    return header, rows


def plot_differences(comparisons: Sequence[dict], path: Path) -> None:
    """Paired difference (points, 95% interval as error bars) against shots: one line per compared configuration."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 5), dpi=120)
    FigureCanvasAgg(fig)  # no pyplot state, as fewshot.report.plot
    ax = fig.add_subplot()
    lines: dict[tuple, list[dict]] = {}
    for c in comparisons:
        lines.setdefault((c["field"], c[c["field"]], c["reference"], c["backbone"], c["head"], c["select"]), []).append(
            c
        )
    for i, ((field, compared, reference, backbone, head, select), cs) in enumerate(lines.items()):
        cs = sorted(cs, key=lambda c: c["shots"])
        context = [x for f, x in (("backbone", backbone), ("head", head), ("select", select)) if f != field]
        ax.errorbar(
            [c["shots"] * 1.03**i for c in cs],  # nudged sideways so the error bars do not hide each other
            [100 * c["difference"] for c in cs],
            yerr=[100 * c["difference_ci95"] for c in cs],
            marker="o",
            capsize=3,
            label=f"{compared} − {reference} ({', '.join(context)})",
        )
    shots = sorted({c["shots"] for c in comparisons})
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("labelled images per class (shots, log₂ scale)")
    ax.set_ylabel("accuracy difference (points)")
    ax.set_title("Paired differences over seeds, 95% t-intervals")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(Path(path), format="png", bbox_inches="tight")
