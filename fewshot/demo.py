"""``fewshot demo``: the whole job end to end on real images that ship inside scikit-learn (no download).

scikit-learn bundles the UCI optical digits (Alpaydin & Kaynak 1998): 1,797 real 8x8 scans of handwritten
digits with 17 grey levels. The demo writes them as PNGs in three stratified, disjoint splits (seed 0): an
unlabeled pool (a flat folder), a labelled TRAIN split the supports are drawn from and a TEST split (ImageFolders).
It pretrains a tiny ViT on the unlabeled pool with self-supervision (MAE, He et al. 2022; the recipe is
:data:`DEMO_PRETRAIN`), then evaluates the run folder against the same architecture at random init and against
raw pixels over 1-10 shots with confidence intervals (:func:`fewshot.evaluation.evaluate`). The unlabeled pool
also helps the labels directly: supports chosen by TypiClust (Hacohen et al. 2022) beside the class-balanced random
draw, the ``spread`` head (label spreading over support + pool + TEST) beside the inductive heads, each compared
with paired intervals; and ``demo/selection/`` shows the first digits TypiClust would have a person label.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.config import Config, EvaluateConfig, apply

# Shares of the 1,797 digits: 897 unlabeled, 360 labelled TRAIN (36 per class: room for 10-shot supports) and 540
# TEST images.
SPLITS = {"unlabeled": 0.5, "train": 0.2, "test": 0.3}

# The demo's pretraining recipe, in the shape of a recipe TOML's [pretrain] section: the one place for its values.
# MAE on a ViT-tiny shrunk to 4 blocks, the 8x8 scans upsampled to 16 px in 4-px patches (16 tokens, 4 of them
# seen by the encoder); 3,000 steps ≈ 3 minutes on 2 idle CPU cores. Chosen by measuring 10-shot accuracy (README,
# "The demo"): DINO's multi-crop step costs ≈6x more, and in a third less time MAE led it by 24 points; 32 px in
# 8-px patches, 2 blocks or a 50% mask did no better per second.
DEMO_PRETRAIN: dict[str, Any] = {
    "method": "mae",
    "model": "vit_tiny_patch16_224",
    "img_size": 16,
    "patch_size": 4,
    "depth": 4,
    "steps": 3000,  # ≈214 epochs of the 897 unlabeled digits
    "batch_size": 64,
    "log_every": 50,
    "checkpoint_every": 25,  # epochs: an epoch is 14 steps (<1 s), too short to write 34 MB of checkpoint after each
    "optim": {
        "lr": 1.5e-3,  # per 256 images, 10x MAE's: short runs need the larger step (as recipes/mae-cpu-tiny.toml)
        "min_lr": 0.0,
        "weight_decay": 0.05,  # constant, as MAE
        "weight_decay_end": 0.05,
        "betas": (0.9, 0.95),
        "clip_grad": 0.0,
    },
    "mae": {"mask_ratio": 0.75, "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4, "reconstruct_every": 50},
}
# What the unlabeled images do beside pretraining (evaluate.select and evaluate.heads; the pool is the unlabeled split
# plus TRAIN's images outside each support): see the README's "Using the unlabeled images" for the measurements.
DEMO_EVALUATE: dict[str, Any] = {
    "select": ("random", "typiclust"),
    "heads": ("knn", "logreg", "prototype", "spread"),
}
SELECT_BUDGET = 10  # digits to label first, chosen by TypiClust from the unlabeled split (demo/selection/)
PIXELS = "pixels:8"  # the scans at their own resolution
# MAE's class token is a weak frozen feature: its run and its random-init twin are read with the mean of the patch
# tokens; DINO's use extract.pool (cls unless set)
POOL = {"mae": "avg"}


def demo_config() -> Config:
    """The demo's defaults: :data:`DEMO_PRETRAIN` as ``cfg.pretrain``; ``evaluate.backbones`` empty (extra backbones
    a user adds there are evaluated after the demo's own three)."""
    cfg = Config(evaluate=EvaluateConfig(backbones=()))
    return apply(cfg, {"pretrain": DEMO_PRETRAIN, "evaluate": DEMO_EVALUATE}, source="demo recipe")


def write_digits(root: Path, seed: int = 0) -> dict[str, Path]:
    """Materialise scikit-learn's digits as ``root/unlabeled/*.png``, ``root/train/<digit>/*.png`` and
    ``root/test/<digit>/*.png`` (shares :data:`SPLITS`, stratified); returns the three folders.

    Existing files are kept, so a re-run costs nothing; demo PNGs that belong to another split (a folder written
    by an older demo with other splits) are removed, so the splits stay disjoint.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), grey levels 0..16 -> 0..255
    index = np.arange(len(images))
    rest, test = train_test_split(index, test_size=SPLITS["test"], stratify=digits.target, random_state=seed)
    train_share = SPLITS["train"] / (SPLITS["train"] + SPLITS["unlabeled"])
    unlabeled, train = train_test_split(rest, test_size=train_share, stratify=digits.target[rest], random_state=seed)
    folders = {}
    for split, idx in (("unlabeled", unlabeled), ("train", train), ("test", test)):
        folders[split] = root / split
        wanted = {
            (root / split if split == "unlabeled" else root / split / str(digits.target[i])) / f"digit_{i:04d}.png": i
            for i in idx
        }
        for stale in set(folders[split].glob("**/digit_*.png")) - set(wanted):
            stale.unlink()
        for file, i in wanted.items():
            if not file.exists():
                file.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").save(file)
    return folders


def random_init_spec(cfg: Config) -> str:
    """The backbone spec of the pretrained architecture at random init (timm kwargs after the colon)."""
    p = cfg.pretrain
    kwargs = {"img_size": p.img_size, "patch_size": p.patch_size, "depth": p.depth, "pool": POOL.get(p.method)}
    return f"{p.model}:" + ",".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)


def run_name(cfg: Config) -> str:
    """The pretraining run's folder name: method and length, so a demo re-run with another ``--steps`` gets its own
    run folder while a plain re-run finds the finished one."""
    p = cfg.pretrain
    return f"{p.method}-{p.steps}steps" if p.steps else f"{p.method}-{p.epochs}epochs"


def run_demo(out: Path, cfg: Config | None = None, pretrain: bool = True, progress: bool = True) -> dict[str, Any]:
    """Write the digits, pretrain on the unlabeled pool (unless ``pretrain`` is False), evaluate the run against
    the same ViT at random init and raw pixels (then any ``cfg.evaluate.backbones``).

    Returns ``report`` (the evaluation report), ``run`` (the run folder or None), ``pretrain`` (what
    :func:`fewshot.train.pretrain` returned, or None), ``method``, ``roles`` (each evaluated backbone spec: pretrained,
    random init, pixels or extra), ``folders`` (the data splits), ``unlabeled_images``, ``pretrain_seconds`` and
    ``evaluate_seconds``, ``selection`` (what :func:`fewshot.labelling.select_images` returned for the
    :data:`SELECT_BUDGET` digits TypiClust picks from the unlabeled split, written to ``out/selection``) and
    ``selection_classes`` (how many digit classes those picks cover: the demo knows the labels it withheld).
    """
    import dataclasses

    from fewshot.episodes import check_evaluate_config
    from fewshot.evaluation import evaluate
    from fewshot.labelling import select_images
    from fewshot.outputs import check_folder
    from fewshot.sources import open_source
    from fewshot.train import pretrain as train

    out = check_folder(out)  # before any work
    cfg = cfg or demo_config()
    run = out / "runs" / run_name(cfg) if pretrain else None
    pool = POOL.get(cfg.pretrain.method)
    roles = {random_init_spec(cfg): "random init", PIXELS: "pixels"}
    if run is not None:
        roles = {(f"{run}:pool={pool}" if pool else str(run)): "pretrained", **roles}
    backbones = tuple(dict.fromkeys((*roles, *cfg.evaluate.backbones)))
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, backbones=backbones))
    check_evaluate_config(cfg)  # a bad --set fails before minutes of pretraining
    folders = write_digits(out / "data")
    if cfg.pool.unlabeled is None:  # the pool heads' extra images: the unlabeled split
        cfg = dataclasses.replace(cfg, pool=dataclasses.replace(cfg.pool, unlabeled=str(folders["unlabeled"])))
    unlabeled = open_source(folders["unlabeled"])
    t0 = time.perf_counter()
    trained = train(unlabeled, run, cfg, progress=progress) if run is not None else None
    t1 = time.perf_counter()
    report = evaluate(folders["train"], folders["test"], cfg=cfg, out=out / "evaluation", progress=progress)
    t2 = time.perf_counter()
    picker = dataclasses.replace(
        cfg,
        extract=dataclasses.replace(cfg.extract, backbone=backbones[0]),  # the run's features (pixels without one)
        select=dataclasses.replace(cfg.select, strategy="typiclust", budget=SELECT_BUDGET),
    )
    selection = select_images(folders["unlabeled"], out / "selection", cfg=picker, progress=progress)
    return {
        "report": report,
        "run": run,
        "pretrain": trained,
        "method": cfg.pretrain.method,
        "roles": {b: roles.get(b, "extra") for b in backbones},
        "folders": folders,
        "unlabeled_images": len(unlabeled),
        "pretrain_seconds": t1 - t0,
        "evaluate_seconds": t2 - t1,
        "selection": selection,
        "selection_backbone": backbones[0],
        "selection_classes": len(set(_digits([r["path"] for r in selection.rows]))),
    }


def _digits(names: list[str]) -> list[int]:
    """The withheld labels of demo files ``digit_NNNN.png`` (NNNN indexes scikit-learn's digits)."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    return [int(target[int(Path(name).stem.split("_")[1])]) for name in names]


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What ``fewshot demo`` prints before the accuracy table: the data, the run, each backbone's best head."""
    report, run, trained = result["report"], result["run"], result["pretrain"]
    lines = [
        f"data: {result['unlabeled_images']} unlabeled, {report['train_images']} train and {report['test_images']} "
        f"test digits in {result['folders']['train'].parent}"
    ]
    if run is not None:
        if trained.logs:
            done = f"pretrained {result['method']} for {trained.steps} steps in {_duration(trained.seconds)}"
        else:
            done = f"pretraining ({result['method']}, {trained.steps} steps) was already finished"
        lines.append(f"{done}: run folder {run}")
    top = max(r["shots"] for r in report["results"])
    lines.append(f"evaluated in {_duration(result['evaluate_seconds'])}; best head per backbone at {top} shots:")
    for backbone, role in result["roles"].items():
        rows = [r for r in report["results"] if r["backbone"] == backbone and r["shots"] == top]
        best = max(rows, key=lambda r: r["accuracy"])
        head = best["head"] + ("" if best.get("select", "random") == "random" else f" ({best['select']})")
        lines.append(f"  {role:<12} {best['accuracy']:.3f} ± {best['accuracy_ci95']:.3f} {head:<20} {backbone}")
    selection = result["selection"]
    lines.append(
        f"TypiClust's first {len(selection.rows)} digits to label (features of {result['selection_backbone']}) "
        f"cover {result['selection_classes']} of 10 classes: {selection.sheets[0]}"
    )
    return lines


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s"
