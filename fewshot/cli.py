"""The ``fewshot`` command line: a thin Typer layer over the library.

Each command parses its options, resolves one config (defaults < --recipe < --set < explicit flags), calls
one library function and prints a summary. torch and timm are imported inside the commands, so ``--help``
answers at once. User errors (:class:`fewshot.errors.FewshotError`) print as one line, in one place.

Longer than the project's 300 lines because each of its eight commands is mostly its Typer signature (an option
per config key, with its help text); the logic of each command is a few lines around one library call.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from fewshot.errors import FewshotError

if TYPE_CHECKING:
    from fewshot.evaluation import Report

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
Unlabeled = Annotated[
    str | None,
    typer.Option("--unlabeled", help="Unlabeled images for the pool heads, beside TRAIN's images outside the support."),
]
AllowOverlap = Annotated[
    bool | None,
    typer.Option(
        "--allow-overlap", help="Report TEST images also found in TRAIN or the pool as a warning, not an error."
    ),
]
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
        _show_library_log()
        in_step = False  # whether every torchrun rank ends here together (success, or an error all of them raised)
        try:
            _check_processes(fn.__name__)
            result = fn(*args, **kwargs)
            in_step = True
            return result
        except FewshotError as exc:
            in_step = getattr(exc, "every_rank", False)  # fewshot.distributed.SharedError
            if _leader() or not in_step:  # an error every rank raised is printed once
                typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(130) from None
        finally:
            _leave_process_group(in_step)

    app.command()(wrapper)
    return fn


class _LogLine(logging.Handler):
    """The library's log (the ``fewshot`` logger) on stderr, rank 0 only: a warning as one yellow ``warning:`` line,
    news (the image cache used, a budget's plan, k-NN at each epoch) as a plain line; written around any progress
    bar, so the bar stays whole."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _leader():
            return
        from tqdm import tqdm

        warning = record.levelno >= logging.WARNING
        text = f"warning: {record.getMessage()}" if warning else record.getMessage()
        with tqdm.external_write_mode(file=sys.stderr):
            typer.secho(text, err=True, fg=typer.colors.YELLOW if warning else None)


def _show_library_log() -> None:
    logger = logging.getLogger("fewshot")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _LogLine) for h in logger.handlers):
        logger.addHandler(_LogLine(logging.INFO))


def _config(recipe: Path | None, sets: list[str] | None, flags: dict[str, Any], base: Any = None) -> Any:
    from fewshot.config import build_config

    return build_config(recipe, sets or (), flags, base=base)


def _check_processes(name: str) -> None:
    """Only pretrain and extract share work among torchrun processes; the others would each write the same files."""
    import os

    if name not in DISTRIBUTED_COMMANDS and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FewshotError(f"`fewshot {name}` runs in one process; start it without torchrun (use torchrun for "
                           "pretrain and extract)")  # fmt: skip


def _leave_process_group(in_step: bool) -> None:
    """Under torchrun, every rank leaves the process group together once the command is done (see
    :func:`fewshot.distributed.shutdown`); outside torchrun there is none."""
    import sys

    if "torch.distributed" in sys.modules:  # only pretrain and extract join one, and they imported it
        from fewshot.distributed import shutdown

        shutdown(synchronise=in_step)


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
    model: Annotated[
        str | None, typer.Option("--model", help="timm architecture, e.g. vit_small_patch16_224 (default: the init's).")
    ] = None,
    img_size: Annotated[
        int | None, typer.Option("--img-size", help="Global crop size in pixels (default: the init's).")
    ] = None,
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
        str | None,
        typer.Option(
            "--init",
            help="Start from these weights, any backbone spec (`hf-hub:timm/vit_small_patch16_224.dino`, a run folder, "
            "a weights file): architecture, sizes and normalisation follow it, and the guard keeps them (README).",
        ),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Require an existing run folder to continue.")] = False,
    monitor: Annotated[
        str | None,
        typer.Option(
            "--monitor",
            help="Labelled images: the backbone's k-NN accuracy at step 0 and every epoch; keeps best.safetensors.",
        ),
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

    From public weights: `fewshot pretrain data/unlabeled --init hf-hub:timm/vit_small_patch16_224.dino
    --recipe recipes/dino-adapt-vits16-gpu.toml --monitor data/train --out runs/adapted`, then
    `fewshot evaluate data/train data/test -b runs/adapted -b runs/adapted:init -b pixels`.

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
    run(images, out, cfg, progress=not quiet and _leader(), notes=notes)
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
    head: Annotated[
        str | None,
        typer.Option("--head", help="knn, logreg, prototype, linear, spread or selftrain; add +center to centre."),
    ] = None,
    test: Annotated[str | None, typer.Option("--test", help="Labelled images to score the head on.")] = None,
    unlabeled: Unlabeled = None,
    allow_overlap: AllowOverlap = None,
    seed: Seed = None,
    pool: Pool = None,
    device: Device = None,
    recipe: Recipe = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Fit a few-shot head on K labels per class of TRAIN and save it.

    Pool heads (spread, selftrain, HEAD+center) also use TRAIN's other images and --unlabeled as unlabeled pool.

    Example: `fewshot probe data/train --backbone runs/dino --shots 5 --head logreg --test data/test --out head/`
    """
    from fewshot.probing import probe as run

    flags: dict[str, Any] = {"extract.backbone": backbone, "extract.pool": pool, "extract.device": device}
    flags |= {"probe.shots": shots, "probe.head": head, "probe.seed": seed, "pool.unlabeled": unlabeled}
    flags |= {"probe.allow_overlap": allow_overlap}
    cfg = _config(recipe, set_, flags)
    result = run(train, out, test=test, cfg=cfg, progress=not quiet)
    _echo_skips(result.skipped_train + result.skipped_unlabeled + result.skipped_test)
    _echo_overlaps(result.overlaps)
    extra = f", C={result.C:g}" if result.C is not None else ""
    extra += f", {result.pool_size} unlabeled pool images" if result.pool_size else ""
    typer.echo(
        f"{result.head} head on {result.support_size} labelled images ({len(result.classes)} classes{extra}) "
        f"saved to {out}"
    )
    if result.accuracy is not None:
        typer.echo(
            f"test accuracy {result.accuracy:.4f}, balanced {result.balanced_accuracy:.4f} on {result.test_size} images"
        )


@command
def predict(
    images: Data,
    head: Annotated[Path, typer.Option("--head", help="Folder written by `fewshot probe`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV file: path,label,score.")] = Path("predictions.csv"),
    allow_backbone_change: Annotated[
        bool,
        typer.Option(
            "--allow-backbone-change",
            help="Predict even if the backbone's weights changed since the head was fitted (its features may not "
            "match the head).",
        ),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Label new images with a saved head; writes path,label,score.

    A spread head labels the images together with its saved support and pool (label spreading over all of them);
    the other heads label each image on its own.

    The head's backbone is the one it was fitted on (recorded with an absolute path and its weights' sha256); a
    backbone whose weights have changed since is refused.

    Example: `fewshot predict new_images/ --head head/ --out predictions.csv`
    """
    from fewshot.probing import predict as run

    result = run(images, head, out, progress=not quiet, allow_backbone_change=allow_backbone_change)
    _echo_skips(result.skipped)
    typer.echo(f"{len(result.rows)} predictions written to {out}")


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
    heads: Annotated[
        str | None,
        typer.Option("--heads", help="e.g. knn,logreg,prototype,linear,spread,selftrain; HEAD+center centres."),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(
            "--select",
            help="How supports are chosen: random (class-balanced), uniform, typiclust, probcover, kcenter; e.g. "
            "random,typiclust. All but random pick shots x classes TRAIN images without their labels.",
        ),
    ] = None,
    unlabeled: Unlabeled = None,
    reference: Annotated[
        str | None,
        typer.Option("--reference", help="Backbone the others are compared with, paired by seed (default: pixels)."),
    ] = None,
    allow_overlap: AllowOverlap = None,
    seed: Seed = None,
    pool: Pool = None,
    device: Device = None,
    recipe: Recipe = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Few-shot accuracy with 95% CIs: backbones x heads x shots x seeds, a report and a plot, led by paired
    differences against a reference backbone (and of each selection strategy against random).

    Example: `fewshot evaluate data/train data/test -b pixels -b vit_small_patch16_224 -b runs/dino --out eval/`

    With the unlabeled images: `fewshot evaluate data/train data/test -b runs/dino -b pixels --heads logreg,spread
    --select random,typiclust --unlabeled data/unlabeled --out eval/`
    """
    from fewshot.evaluation import evaluate as run

    flags: dict[str, Any] = {
        "evaluate.shots": shots,
        "evaluate.seeds": seeds,
        "evaluate.heads": heads,
        "evaluate.seed": seed,
        "evaluate.select": select,
        "evaluate.reference": reference,
        "evaluate.allow_overlap": allow_overlap,
        "pool.unlabeled": unlabeled,
    }
    flags |= {"evaluate.backbones": backbone or None, "extract.pool": pool, "extract.device": device}
    cfg = _config(recipe, set_, flags)
    report = run(train, test, cfg=cfg, out=out, progress=not quiet)
    _print_report(report, out)


@command
def select(
    images: Data,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for selection.csv, the contact sheet, images/.")],
    budget: Annotated[int | None, typer.Option("--budget", "-n", help="How many images to choose.")] = None,
    backbone: Backbone = None,
    strategy: Annotated[
        str | None, typer.Option("--strategy", help="typiclust (default), probcover, kcenter or random.")
    ] = None,
    classes: Annotated[
        int | None, typer.Option("--classes", help="Expected number of classes (probcover sets its radius by it).")
    ] = None,
    exclude: Annotated[
        Path | None,
        typer.Option(
            "--exclude", help="Already labelled images (a folder, or a CSV such as an earlier selection.csv)."
        ),
    ] = None,
    files: Annotated[
        str, typer.Option("--files", help="Put the chosen images in OUT/images: none, copy or link.")
    ] = "none",
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the strategy's randomness (k-means).")] = None,
    pool: Pool = None,
    device: Device = None,
    recipe: Recipe = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Choose which images to label first: the most typical image of each cluster of their features (TypiClust),
    or ProbCover / k-centre / random. Labels are never read.

    Writes OUT/selection.csv (path, rank, cluster, score) and OUT/contact_sheet.png; --files copy puts the images
    in OUT/images for a labelling tool; --exclude labelled/ picks the next batch elsewhere.

    Example: `fewshot select data/unlabeled -b runs/dino --budget 50 --out to_label/`
    """
    from fewshot.labelling import select_images

    flags: dict[str, Any] = {"extract.backbone": backbone, "extract.pool": pool, "extract.device": device}
    flags |= {"select.budget": budget, "select.strategy": strategy, "select.seed": seed, "select.classes": classes}
    cfg = _config(recipe, set_, flags)
    chosen = select_images(images, out, cfg=cfg, exclude=exclude, files=files, progress=not quiet)
    _echo_skips(chosen.skipped)
    excluded = f" ({chosen.excluded} already labelled, excluded)" if chosen.excluded else ""
    typer.echo(
        f"{len(chosen.rows)} of {chosen.candidates} images chosen by {chosen.strategy}{excluded}: "
        f"{chosen.csv}, contact sheet {chosen.sheets[0]}"
    )
    for row in chosen.rows[:10]:
        typer.echo(f"  {row['rank']:>4}  {row['path']}")
    if len(chosen.rows) > 10:
        typer.echo(f"  ... {len(chosen.rows) - 10} more in {chosen.csv}")


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
        float | None,
        typer.Option("--threshold", help="Share of each map's attention mass a mask keeps. [default: 0.6, DINO's]"),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option("--masks", help="Folder of ground-truth binary masks named like the images: report Jaccard."),
    ] = None,
    img_size: Annotated[
        str | None,
        typer.Option(
            "--img-size",
            help="Run at SIZE or HxW pixels, whole patches (position embeddings interpolated). Default: the "
            "model's own size.",
        ),
    ] = None,
    save_maps: Annotated[
        bool | None, typer.Option("--save-maps/--no-save-maps", help="Also save the raw maps as safetensors.")
    ] = None,
    pca: Annotated[bool | None, typer.Option("--pca/--no-pca", help="PCA feature maps of the patch tokens.")] = None,
    batch_size: BatchSize = None,
    device: Device = None,
    recipe: Recipe = None,
    set_: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Attention maps, DINO masks and PCA feature maps of a ViT on your images, with Jaccard against masks.

    Example: `fewshot attention photos/ --backbone runs/dino --masks photo_masks/ --out attention/`
    """
    from fewshot.attention_outputs import run_attention

    flags: dict[str, Any] = {"extract.backbone": backbone, "extract.batch_size": batch_size, "extract.device": device}
    flags |= {"attention.block": block, "attention.threshold": threshold, "attention.img_size": img_size}
    flags |= {"attention.save_maps": save_maps, "attention.pca": pca}
    result = run_attention(images, out, _config(recipe, set_, flags), masks=masks, progress=not quiet)
    _echo_skips(result.skipped)
    h, w = result.input_size
    typer.echo(
        f"{result.images} images -> block {result.block} attention ({result.heads} heads, "
        f"{result.grid[0]}x{result.grid[1]} patches at {h}x{w}) in {out}/grids; "
        f"contact sheet {result.contact_sheets[0]}"
    )
    if result.pca:
        typer.echo(f"PCA feature maps: {out / 'pca'}")
    if result.jaccard is not None:
        _print_jaccard(result.jaccard, result.threshold)


def _print_jaccard(jac: dict[str, Any], threshold: float) -> None:
    typer.echo(f"Jaccard of the {100 * threshold:g}%-mass masks on {jac['images_with_masks']} images "
               "(mean | union | best head):")  # fmt: skip
    for name, row in list(jac["per_image"].items())[:20]:
        typer.echo(f"  {name:<40} {row['mean_map']:.3f} | {row['union']:.3f} | {max(row['heads']):.3f}")
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


def _echo_overlaps(overlaps: list[dict[str, str]]) -> None:
    if overlaps:
        shown = "; ".join(f"{o['test']} = {o['other']} ({o['with']})" for o in overlaps[:5])
        more = f" and {len(overlaps) - 5} more (all listed in the report)" if len(overlaps) > 5 else ""
        typer.secho(f"warning: {len(overlaps)} TEST image(s) also in TRAIN or the pool: {shown}{more}", fg="yellow")


def _print_report(report: Report, out: Path) -> None:
    from fewshot.report import few_seeds_note, interval

    _echo_skips(report.get("skipped", []))
    _echo_overlaps(report.get("overlaps", []))
    for line in report.get("headline", []):
        typer.echo(line)
    results = report["results"]
    largest = max(r["shots"] for r in results)
    several = len(report.get("select") or ["random"]) > 1
    typer.echo(f"{largest}-shot accuracy (mean ± 95% CI over {results[0]['seeds']} seeds):")
    for r in sorted((r for r in results if r["shots"] == largest), key=lambda r: -r["accuracy"]):
        head = f"{r['head']} {r['select']}" if several else r["head"]
        score = interval(r["accuracy"], r["accuracy_ci95"], scale=1.0, digits=4)
        typer.echo(f"  {r['backbone']:<48} {head:<20} {score}")
    if note := few_seeds_note(report["seeds"]):
        typer.secho(f"warning: {note}", err=True, fg=typer.colors.YELLOW)
    typer.echo(f"report: {out / 'report.md'}  plot: {out / 'label_efficiency.png'}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fewshot")


if __name__ == "__main__":
    main()
