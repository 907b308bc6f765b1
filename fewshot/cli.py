"""The ``fewshot`` command line: a thin Typer layer over the library.

Each command parses its options, resolves one config (defaults < --recipe < --set < explicit flags), calls
one library function and prints a summary. torch and timm are imported inside the commands, so ``--help``
answers at once. User errors (:class:`fewshot.errors.FewshotError`) print as one line, in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from fewshot.errors import FewshotError

app = typer.Typer(
    name="fewshot",
    help="Self-supervised ViTs on your own unlabeled images, then honest few-shot classification.\n\n"
    "Quick start: fewshot demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

F = TypeVar("F", bound=Callable[..., Any])

# ---------------------------------------------------------------------------------------------- shared options

BACKBONE_HELP = (
    "Backbone spec: `pixels[:SIZE]`, a timm name with optional timm kwargs "
    "(`vit_tiny_patch16_224:img_size=64,patch_size=8`), a weights file (`.safetensors`/`.pth`, add `:arch=NAME` "
    "if it doesn't say), a `fewshot pretrain` run folder, or `hf-hub:owner/name`. Add `:pool=avg` to give one "
    "backbone its own pooling."
)
Backbone = Annotated[str | None, typer.Option("--backbone", "-b", help=BACKBONE_HELP, show_default=False)]
Backbones = Annotated[
    list[str] | None, typer.Option("--backbone", "-b", help=BACKBONE_HELP + " Repeat to compare.", show_default=False)
]
Pool = Annotated[str | None, typer.Option("--pool", help="Token pooling: cls, avg, cls+avg or lastN (e.g. last4).")]
Recipe = Annotated[Path | None, typer.Option("--recipe", "-r", help="TOML recipe with config sections.")]
Sets = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a config key, e.g. `--set heads.knn.k=10` (repeat).")
]
Device = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="Images per forward pass.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed of the support sampling (and of the head).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Data = Annotated[
    str,
    typer.Argument(
        help="Images: a folder (recursive), an ImageFolder (class subfolders), a CSV manifest (path,label), "
        "a Hugging Face save_to_disk/imagefolder directory, or hf:owner/name[:split].",
        show_default=False,
    ),
]


DISTRIBUTED_COMMANDS = ("pretrain", "extract")  # the commands that share their work among torchrun processes


def command(fn: F) -> F:
    """Register ``fn`` as a command; format user errors as one line (the only place that does)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_processes(fn.__name__)
            return fn(*args, **kwargs)
        except FewshotError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(130) from None

    app.command()(wrapper)
    return fn


def _config(recipe: Path | None, sets: list[str] | None, flags: dict[str, Any], base: Any = None) -> Any:
    from fewshot.config import build_config

    return build_config(recipe, sets or (), flags, base=base)


def _check_processes(name: str) -> None:
    """Only pretrain and extract share work among torchrun processes; the others would each write the same files."""
    import os

    if name not in DISTRIBUTED_COMMANDS and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FewshotError(f"`fewshot {name}` runs in one process; start it without torchrun (use torchrun for "
                           "pretrain and extract)")  # fmt: skip


def _leader() -> bool:
    """False in the torchrun processes other than rank 0: they train or extract but stay silent."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _echo_skips(skipped: list[dict[str, str]]) -> None:
    if skipped and _leader():
        from fewshot.sources import summarize_skips

        typer.secho(summarize_skips(skipped), fg=typer.colors.YELLOW)


# ---------------------------------------------------------------------------------------------- commands


@command
def pretrain(
    data: Data,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (re-running into it resumes).")],
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help="dino or mae (each brings its paper's AdamW settings unless a recipe sets them)."
        ),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="timm architecture, e.g. vit_small_patch16_224.")] = None,
    img_size: Annotated[int | None, typer.Option("--img-size", help="Global crop size in pixels.")] = None,
    patch_size: Annotated[int | None, typer.Option("--patch-size", help="Override the ViT's patch size.")] = None,
    depth: Annotated[int | None, typer.Option("--depth", help="Override the ViT's number of blocks.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the images.")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Stop after N optimiser steps (overrides epochs).")
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option("--minutes", help="Time budget: the steps that fit, from a timed probe of the step (no --steps)."),
    ] = None,
    batch_size: BatchSize = None,
    device: Device = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of initialisation, data order and augmentation.")
    ] = None,
    init: Annotated[
        str | None, typer.Option("--init", help="Start from weights: .safetensors/.pth file or a run folder.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Require an existing run folder to continue.")] = False,
    monitor: Annotated[
        str | None, typer.Option("--monitor", help="Labelled images: log the backbone's k-NN accuracy every epoch.")
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe", "-r", help="TOML recipe, or auto (the default without --model/--init): from device and data."
        ),
    ] = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Self-supervised pretraining (DINO or MAE) of a timm ViT on a folder of unlabeled images.

    Small data needs small-data settings: out_dim, teacher temperature and momentum and the warm-ups follow the
    dataset size and run length unless set (see README). The run folder is a backbone spec for extract, probe,
    evaluate and attention.

    Example: `fewshot pretrain data/unlabeled --minutes 20 --out runs/auto` (recipe auto: chosen from the device
    and the data, printed and saved in config.json), or `--recipe recipes/dino-cpu-tiny.toml --out runs/dino`.

    Several GPUs or nodes: `torchrun --nproc_per_node=8 -m fewshot pretrain ...` (--batch-size is the global batch).
    """
    from fewshot import auto_recipe
    from fewshot.runs import RunFolder
    from fewshot.sources import open_source
    from fewshot.train import pretrain as run

    names = ("method", "model", "img_size", "patch_size", "depth", "epochs", "steps", "minutes", "batch_size", "device")
    values = (method, model, img_size, patch_size, depth, epochs, steps, minutes, batch_size, device)
    flags: dict[str, Any] = {f"pretrain.{k}": v for k, v in zip(names, values, strict=True)}
    flags |= {"pretrain.seed": seed, "pretrain.init": init, "pretrain.monitor": monitor}
    given = auto_recipe.given_keys(flags, set_ or ())
    if {"pretrain.minutes", "pretrain.epochs"} <= given:
        raise FewshotError(f"--minutes {minutes:g} and --epochs {epochs} both set the run's length; give one")
    auto = auto_recipe.wanted(recipe, given)
    cfg = _config(None if auto else recipe, set_, flags)
    if resume and not RunFolder(out).has_checkpoint():
        raise FewshotError(f"--resume: '{out}' holds no checkpoint to continue; drop --resume to start a new run")
    images = open_source(data)
    _echo_skips(images.skipped)
    notes: dict[str, Any] = {}
    if auto:  # the recipe from the device and the data; --set and flags still win
        choice = auto_recipe.for_run(images, out, cfg.pretrain.device, given, cfg.pretrain.method)
        cfg = _config(None, set_, flags, base=choice.base())
        notes["auto_recipe"] = choice.record()
        if _leader():
            typer.echo(choice.line())
    run(images, cfg, out, progress=not quiet and _leader(), notes=notes)
    if _leader():
        typer.echo(f"run folder {out}: use it as a backbone, e.g. fewshot evaluate TRAIN TEST -b {out} -b pixels")


@command
def extract(
    data: Data,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")],
    backbone: Backbone = None,
    pool: Pool = None,
    batch_size: BatchSize = None,
    device: Device = None,
    recipe: Recipe = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Compute frozen features of every image and save them as safetensors (cached for reuse).

    Example: `fewshot extract data/train --backbone runs/dino --pool cls --out train.safetensors`
    """
    from fewshot.features import extract as run

    flags = {"extract.backbone": backbone, "extract.pool": pool, "extract.batch_size": batch_size}
    cfg = _config(recipe, set_, {**flags, "extract.device": device})
    feats = run(data, out=out, cfg=cfg, progress=not quiet and _leader())
    _echo_skips(feats.skipped)
    n, d = feats.features.shape
    if _leader():
        typer.echo(f"{n} images -> {n}x{d} features ({len(feats.classes)} classes) written to {out}")


@command
def probe(
    train: Data,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the fitted head.")],
    backbone: Backbone = None,
    shots: Annotated[int | None, typer.Option("--shots", "-k", help="Labels per class (default: all).")] = None,
    head: Annotated[str | None, typer.Option("--head", help="knn, logreg, prototype or linear.")] = None,
    test: Annotated[str | None, typer.Option("--test", help="Labelled images to score the head on.")] = None,
    seed: Seed = None,
    pool: Pool = None,
    device: Device = None,
    recipe: Recipe = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Fit a few-shot head on K labels per class of TRAIN and save it.

    Example: `fewshot probe data/train --backbone runs/dino --shots 5 --head logreg --test data/test --out head/`
    """
    from fewshot.probing import probe as run

    flags: dict[str, Any] = {"extract.backbone": backbone, "extract.pool": pool, "extract.device": device}
    flags |= {"probe.shots": shots, "probe.head": head, "probe.seed": seed}
    cfg = _config(recipe, set_, flags)
    summary = run(train, out, test=test, cfg=cfg, progress=not quiet)
    _echo_skips(summary["skipped_train"] + summary.get("skipped_test", []))
    extra = f", C={summary['C']:g}" if "C" in summary else ""
    typer.echo(
        f"{summary['head']} head on {summary['support_size']} labelled images "
        f"({len(summary['classes'])} classes{extra}) saved to {out}"
    )
    if "accuracy" in summary:
        typer.echo(
            f"test accuracy {summary['accuracy']:.4f}, balanced {summary['balanced_accuracy']:.4f} "
            f"on {summary['test_size']} images"
        )


@command
def predict(
    images: Data,
    head: Annotated[Path, typer.Option("--head", help="Folder written by `fewshot probe`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV file: path,label,score.")] = Path("predictions.csv"),
    quiet: Quiet = False,
) -> None:
    """Label new images with a saved head; writes path,label,score.

    Example: `fewshot predict new_images/ --head head/ --out predictions.csv`
    """
    from fewshot.probing import predict as run

    result = run(images, head, out, progress=not quiet)
    _echo_skips(result["skipped"])
    typer.echo(f"{len(result['predictions'])} predictions written to {out}")


@command
def evaluate(
    train: Data,
    test: Annotated[str, typer.Argument(help="Labelled test images (same classes as TRAIN).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.json/.md and the plot.")] = Path(
        "evaluation"
    ),
    backbone: Backbones = None,
    shots: Annotated[str | None, typer.Option("--shots", help="Shot counts, e.g. 1,2,5,10.")] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Supports drawn per shot count.")] = None,
    heads: Annotated[str | None, typer.Option("--heads", help="e.g. knn,logreg,prototype,linear.")] = None,
    seed: Seed = None,
    pool: Pool = None,
    device: Device = None,
    recipe: Recipe = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Few-shot accuracy with 95% CIs: backbones x heads x shots x seeds, a report and a plot.

    Example: `fewshot evaluate data/train data/test -b pixels -b vit_small_patch16_224 -b runs/dino --out eval/`
    """
    from fewshot.evaluation import evaluate as run

    flags: dict[str, Any] = {
        "evaluate.shots": shots,
        "evaluate.seeds": seeds,
        "evaluate.heads": heads,
        "evaluate.seed": seed,
    }
    flags |= {"evaluate.backbones": backbone or None, "extract.pool": pool, "extract.device": device}
    cfg = _config(recipe, set_, flags)
    report = run(train, test, cfg=cfg, out=out, progress=not quiet)
    _print_report(report, out)


@command
def attention(
    images: Data,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs, maps and reports.")] = Path(
        "attention"
    ),
    backbone: Backbone = None,
    block: Annotated[
        int | None, typer.Option("--block", help="Block to read, 0-based (negative: from the end). Default: last.")
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Share of each map's attention mass a mask keeps (DINO: 0.6).")
    ] = 0.6,
    masks: Annotated[
        Path | None,
        typer.Option("--masks", help="Folder of ground-truth binary masks named like the images: report Jaccard."),
    ] = None,
    img_size: Annotated[
        str | None,
        typer.Option(
            "--img-size",
            help="Run at SIZE or HxW pixels (position embeddings interpolated). Default: the model's own size.",
        ),
    ] = None,
    save_maps: Annotated[bool, typer.Option("--save-maps", help="Also save the raw maps as safetensors.")] = False,
    pca: Annotated[bool, typer.Option("--pca/--no-pca", help="PCA feature maps of the patch tokens (DINOv2).")] = True,
    batch_size: BatchSize = None,
    device: Device = None,
    recipe: Recipe = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Attention maps, DINO masks and PCA feature maps of a ViT on your images, with Jaccard against masks.

    Example: `fewshot attention photos/ --backbone runs/dino --masks photo_masks/ --out attention/`
    """
    from fewshot.attention import run_attention

    flags = {"extract.backbone": backbone, "extract.batch_size": batch_size, "extract.device": device}
    cfg = _config(recipe, set_, flags)
    summary = run_attention(
        images,
        cfg.extract.backbone,
        out,
        block=block,
        threshold=threshold,
        save_maps=save_maps,
        masks=masks,
        pca=pca,
        progress=not quiet,
        img_size=img_size,
        device=cfg.extract.device,
        batch_size=cfg.extract.batch_size,
        cfg=cfg,
    )
    _echo_skips(summary["skipped"])
    h, w = summary["input_size"]
    typer.echo(
        f"{summary['images']} images -> block {summary['block']} attention ({summary['heads']} heads, "
        f"{summary['grid'][0]}x{summary['grid'][1]} patches at {h}x{w}) in {out}/grids; "
        f"contact sheet {summary['contact_sheets'][0]}"
    )
    if summary["pca"]:
        typer.echo(f"PCA feature maps: {out / 'pca'}")
    if "jaccard" in summary:
        jac = summary["jaccard"]
        pct = f"{100 * summary['threshold']:g}%"
        typer.echo(f"Jaccard of the {pct}-mass masks on {jac['images_with_masks']} images (mean | union | best head):")
        for name, row in list(jac["per_image"].items())[:20]:
            best = max(row["heads"])
            typer.echo(f"  {name:<40} {row['mean_map']:.3f} | {row['union']:.3f} | {best:.3f}")
        if len(jac["per_image"]) > 20:
            typer.echo(f"  ... {len(jac['per_image']) - 20} more in {jac['report']}")
        per_head = " ".join(f"{j:.3f}" for j in jac["mean_per_head"])
        typer.echo(f"  average: mean map {jac['mean_map']:.3f}, union {jac['union']:.3f}; per head {per_head}")
        typer.echo(f"  best head {jac['best_head']}: {jac['best_head_jaccard']:.3f}  report: {jac['report']}")
        if jac["missing_masks"]:
            typer.secho(f"  {len(jac['missing_masks'])} image(s) had no mask", fg=typer.colors.YELLOW)


@command
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the demo data, the pretraining run and the report.")
    ] = Path("demo"),
    steps: Annotated[
        int | None, typer.Option("--steps", help="Pretraining steps (default: the recipe's, ≈3 min on 2 CPU cores).")
    ] = None,
    pretrain: Annotated[
        bool, typer.Option("--pretrain/--no-pretrain", help="Pretrain first, or only compare the baselines.")
    ] = True,
    device: Device = None,
    recipe: Recipe = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Run the whole job on scikit-learn's bundled digits (1,797 real images, no download): pretrain a tiny ViT
    on an unlabeled split, then few-shot accuracy of that run against the same ViT at random init and raw pixels.

    Re-running into the same --out reuses the data and the finished run. The demo's pretraining recipe is
    `fewshot.demo.DEMO_PRETRAIN`; `--set pretrain.KEY=VALUE` changes it.

    Example: `fewshot demo --out demo/` (`fewshot demo --steps 300` for a quick look)
    """
    from fewshot.demo import demo_config, run_demo, summary_lines

    flags = {"pretrain.steps": steps, "pretrain.device": device, "extract.device": device}
    cfg = _config(recipe, set_, flags, base=demo_config())
    result = run_demo(out, cfg=cfg, pretrain=pretrain, progress=not quiet)
    for line in summary_lines(result):
        typer.echo(line)
    _print_report(result["report"], out / "evaluation")


def _print_report(report: dict[str, Any], out: Path) -> None:
    _echo_skips(report.get("skipped", []))
    results = report["results"]
    largest = max(r["shots"] for r in results)
    typer.echo(f"{largest}-shot accuracy (mean ± 95% CI over {results[0]['seeds']} seeds):")
    for r in sorted((r for r in results if r["shots"] == largest), key=lambda r: -r["accuracy"]):
        typer.echo(f"  {r['backbone']:<48} {r['head']:<10} {r['accuracy']:.4f} ± {r['accuracy_ci95']:.4f}")
    typer.echo(f"report: {out / 'report.md'}  plot: {out / 'label_efficiency.png'}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fewshot")


if __name__ == "__main__":
    main()
