"""One typed configuration for every command.

Precedence, lowest first: dataclass defaults < recipe TOML (``--recipe``) < ``--set a.b=value`` < explicit
CLI flags. Unknown keys are errors that list the valid ones; the resolved config is saved as JSON next to
every output (``config.json``) so a run can be reproduced from its artifacts alone.

The sections of every command but ``pretrain`` (whose own are in :mod:`fewshot.pretrain_config`) and the layering
that builds them stay together, a little past the project's 300 lines, so that a key and the code that types,
coerces and saves it are read in one place.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fewshot.config_rules import (
    ConfigValueError,
    above,
    across_deferred,
    at_least,
    check,
    each,
    fraction,
    one_of,
    pool_name,
)
from fewshot.errors import FewshotError
from fewshot.outputs import write_text
from fewshot.pretrain_config import PretrainConfig

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


@dataclass(frozen=True)
class ExtractConfig:
    """How frozen features are computed (``fewshot extract`` and every command that needs features)."""

    backbone: str = "pixels"
    pool: str = "cls"  # cls | avg | cls+avg | lastN (CLS of the last N blocks, concatenated)
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 0  # DataLoader workers; 0 decodes in the main process (best on 2 CPU cores)
    cache: bool = True  # reuse features computed before for the same backbone + data + transform + pool

    def __post_init__(self) -> None:
        check(self, pool=pool_name(), batch_size=at_least(1), workers=at_least(0))


@dataclass(frozen=True)
class KNNConfig:
    """DINO's weighted k-NN (Wu et al. 2018; Caron et al. 2021)."""

    k: int = 20
    temperature: float = 0.07

    def __post_init__(self) -> None:
        check(self, k=at_least(1), temperature=above(0))


@dataclass(frozen=True)
class LogRegConfig:
    """Logistic regression; C by stratified CV inside the support (≥2 shots), else ``one_shot_c``."""

    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    one_shot_c: float = 10.0
    cv_folds: int = 5
    max_iter: int = 1000

    def __post_init__(self) -> None:
        check(self, c_grid=each(above(0)), one_shot_c=above(0), cv_folds=at_least(2), max_iter=at_least(1))


@dataclass(frozen=True)
class PrototypeConfig:
    """Nearest class mean of L2-normalised features (Snell et al. 2017)."""

    temperature: float = 0.1  # softmax temperature over cosine similarities, for scores only

    def __post_init__(self) -> None:
        check(self, temperature=above(0))


@dataclass(frozen=True)
class LinearConfig:
    """Linear layer on BatchNorm(affine=False) features trained with SGD, as MAE's linear probe."""

    epochs: int = 100
    lr: float = 0.1
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        # batch_size ≥ 2: the probe's BatchNorm needs two rows per batch (a trailing batch of one joins the last)
        check(self, epochs=at_least(1), lr=above(0), batch_size=at_least(2), momentum=fraction(closed_high=False),
              weight_decay=at_least(0))  # fmt: skip


@dataclass(frozen=True)
class SpreadConfig:
    """Label spreading (Zhou et al. 2004) on a k-NN graph of support + pool + scored images (transductive)."""

    k: int = 20  # neighbours per image in the graph
    alpha: float = 0.8  # weight of the neighbours against an image's own label (Zhou et al.'s alpha)
    max_iter: int = 100
    tol: float = 1e-3

    def __post_init__(self) -> None:
        # alpha in (0, 1): at 0 the graph is ignored, at 1 the support's own labels are (sklearn rejects both)
        check(self, k=at_least(1), alpha=fraction(closed_low=False, closed_high=False), max_iter=at_least(1),
              tol=at_least(0))  # fmt: skip


@dataclass(frozen=True)
class SelfTrainConfig:
    """Logistic regression (C chosen on the support as ``logreg``), then self-training on the pool."""

    criterion: str = "threshold"  # threshold | k_best (sklearn's SelfTrainingClassifier criteria)
    threshold: float = 0.95  # criterion threshold: adopt pool images whose top probability exceeds this
    k_best: int = 10  # criterion k_best: adopt this many of the most confident pool images per round
    max_iter: int = 10  # rounds
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    one_shot_c: float = 10.0
    cv_folds: int = 5

    def __post_init__(self) -> None:
        # the criteria sklearn's SelfTrainingClassifier accepts; C is chosen on the support as logreg's is
        check(self, criterion=one_of("threshold", "k_best"), threshold=fraction(closed_high=False),
              k_best=at_least(1), max_iter=at_least(1), c_grid=each(above(0)), one_shot_c=above(0),
              cv_folds=at_least(2))  # fmt: skip


@dataclass(frozen=True)
class HeadsConfig:
    knn: KNNConfig = field(default_factory=KNNConfig)
    logreg: LogRegConfig = field(default_factory=LogRegConfig)
    prototype: PrototypeConfig = field(default_factory=PrototypeConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    spread: SpreadConfig = field(default_factory=SpreadConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)


# Selection strategies (fewshot.selection), and how evaluate may choose supports: those, the class-balanced draw
# (random) and a label-blind uniform draw of shots x classes images.
SELECT_STRATEGIES = ("typiclust", "probcover", "kcenter", "random")
EVALUATE_STRATEGIES = ("random", "uniform", "typiclust", "probcover", "kcenter")


@dataclass(frozen=True)
class PoolConfig:
    """The unlabeled pool that ``spread``, ``selftrain`` and ``+center`` heads use: TRAIN's images outside the
    support plus ``unlabeled`` (``--unlabeled``), at most ``max_images`` of them (a seeded random subset)."""

    unlabeled: str | None = None
    max_images: int = 10000

    def __post_init__(self) -> None:
        check(self, max_images=at_least(0))


@dataclass(frozen=True)
class SelectConfig:
    """``fewshot select`` and the selection strategies of ``evaluate --select`` (see fewshot/selection.py)."""

    strategy: str = "typiclust"  # typiclust | probcover | kcenter | random
    budget: int | None = None  # images to choose (fewshot select --budget)
    seed: int = 0
    classes: int | None = None  # expected number of classes: ProbCover's k-means clusters for its radius
    typiclust_neighbors: int = 20  # K of the typicality (Hacohen et al. 2022)
    max_clusters: int = 500  # TypiClust's cap on k-means clusters
    min_cluster_size: int = 5  # TypiClust skips smaller clusters (outliers)
    probcover_alpha: float = 0.95  # share of pure balls that fixes ProbCover's radius (Yehuda et al. 2022)
    probcover_delta: float | None = None  # the radius itself, on L2-normalised features; None: from alpha

    def __post_init__(self) -> None:
        at_least_1 = at_least(1)
        check(self, strategy=one_of(*SELECT_STRATEGIES), budget=at_least_1, classes=at_least_1,
              typiclust_neighbors=at_least_1, max_clusters=at_least_1, min_cluster_size=at_least_1,
              probcover_alpha=(lambda v: 0 < v <= 1, "in (0, 1]"), probcover_delta=above(0))  # fmt: skip


@dataclass(frozen=True)
class ProbeConfig:
    head: str = "logreg"
    shots: int | None = None  # labels per class drawn from TRAIN; None uses every label
    seed: int = 0
    allow_overlap: bool = False  # TRAIN/pool images also in --test: a counted warning instead of an error

    def __post_init__(self) -> None:
        check(self, shots=at_least(1))


@dataclass(frozen=True)
class EvaluateConfig:
    backbones: tuple[str, ...] = ("pixels",)
    shots: tuple[int, ...] = (1, 2, 5, 10)
    seeds: int = 10
    heads: tuple[str, ...] = ("knn", "logreg", "prototype")
    seed: int = 0  # first seed; episode i uses seed + i
    full_knn: bool = True  # also report k-NN with every TRAIN label
    select: tuple[str, ...] = ("random",)  # supports: random (class-balanced), uniform, typiclust, probcover, kcenter
    reference: str | None = None  # backbone the others are compared with, paired by seed; None: pixels if present
    reference_head: str | None = None  # also compare every head with this one, paired by seed
    allow_overlap: bool = False  # TEST images also in TRAIN or the pool: a counted warning instead of an error

    def __post_init__(self) -> None:
        check(self, shots=each(at_least(1)), seeds=at_least(1), select=each(one_of(*EVALUATE_STRATEGIES)))


@dataclass(frozen=True)
class AttentionConfig:
    """``fewshot attention``: which block, DINO's mask threshold, the input size and what to write."""

    block: int | None = None  # 0-based block whose attention is read (negative: from the end); None: the last
    threshold: float = 0.6  # share of each map's attention mass a mask keeps (DINO: 0.6)
    img_size: str | None = None  # SIZE or HxW in whole patches (position embeddings interpolated); None: the model's
    save_maps: bool = False  # also write the raw maps as safetensors
    pca: bool = True  # PCA feature maps of the patch tokens (DINOv2)

    def __post_init__(self) -> None:
        check(self, threshold=(lambda v: 0 < v <= 1, "in (0, 1]"))


@dataclass(frozen=True)
class Config:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)


# ---------------------------------------------------------------------------------------------- building

Section = TypeVar("Section", bound="DataclassInstance")  # a config dataclass: the root Config or one of its sections


def build_config(
    recipe: Path | None = None,
    sets: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    base: Config | None = None,
) -> Config:
    """Resolve a config: ``base`` (defaults) < recipe TOML < ``--set`` strings < explicit flags.

    ``flags`` maps dotted keys to values; ``None`` values mean "flag not given" and are ignored. Pretraining values
    left at None (the method's optimiser, the init's architecture) are resolved by the library, in
    :func:`fewshot.train.pretrain`, the same for the CLI and the Python API.
    """
    return _layers(base if base is not None else Config(), recipe, sets, flags)


def _layers(cfg: Config, recipe: Path | None, sets: Iterable[str], flags: Mapping[str, Any] | None) -> Config:
    origin: dict[str, str] = {}  # dotted key -> where its value came from, as an error should name it
    with across_deferred():  # a rule across two fields holds for the finished config, not between its layers
        if recipe is not None:
            table = load_recipe(recipe)
            cfg = apply(cfg, table, source=f"recipe {recipe}")
            origin |= {k: f"config key '{k}' (recipe {recipe})" for k in _dotted(table)}
        for item in sets:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise FewshotError(f"--set {item!r} is not KEY=VALUE; write e.g. --set heads.knn.k=10")
            cfg = apply(cfg, _nest({key.strip(): value.strip()}), source="--set", from_string=True)
            origin[key.strip()] = f"config key '{key.strip()}' (--set)"
        given = {k: v for k, v in (flags or {}).items() if v is not None}
        if given:
            # Flags arrive typed by the CLI, except comma lists such as --shots 1,2,5, which parse like --set.
            # An error names the flag as typed: pretrain.steps -> --steps.
            typed = {k: "--" + k.rsplit(".", 1)[-1].replace("_", "-") for k in given}
            cfg = apply(cfg, _nest(given), source="command-line flag", from_string=True, typed=typed)
            origin |= typed
    _check_across(cfg, origin)
    return cfg


def _check_across(section: Any, origin: Mapping[str, str], prefix: str = "") -> None:
    """The rules across two fields (``check_across``) on the finished config; an error names where the value came
    from (the flag as typed, or the key and its recipe or --set)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_across(value, origin, f"{prefix}{f.name}.")
    if hasattr(section, "check_across"):
        try:
            section.check_across()
        except ConfigValueError as exc:
            dotted = f"{prefix}{exc.key}"
            where = origin.get(dotted, f"config key '{dotted}'")
            raise FewshotError(f"{where} must be {exc.rule}, got {exc.value!r}; fix the value") from None


def _dotted(table: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of a nested table: {"a": {"b": 1}} -> ["a.b"]."""
    keys = []
    for k, v in table.items():
        keys += _dotted(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [f"{prefix}{k}"]
    return keys


def load_recipe(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise FewshotError(f"recipe {path} is a folder; pass a TOML file in it, e.g. {path}/<name>.toml")
    if not path.is_file():
        raise FewshotError(f"recipe {path} does not exist; pass a TOML file, e.g. recipes/<name>.toml")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FewshotError(f"recipe {path} is not valid TOML ({exc}); fix the file") from None


def apply(
    cfg: Section,
    overrides: Mapping[str, Any],
    source: str,
    from_string: bool = False,
    prefix: str = "",
    typed: Mapping[str, str] | None = None,
) -> Section:
    """Return ``cfg`` with nested ``overrides`` applied, every key and value checked against the types and the
    sections' value rules. ``typed`` maps dotted keys to what the user typed (flags), for the error messages."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
            raise FewshotError(f"unknown config key '{dotted}' ({source}); valid keys {where}: {', '.join(names)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            if not isinstance(value, Mapping):
                raise FewshotError(f"config key '{dotted}' is a section; set one of its keys, e.g. '{dotted}.<key>'")
            changes[key] = apply(current, value, source, from_string, prefix=f"{dotted}.", typed=typed)
        else:
            changes[key] = coerce(value, hints[key], dotted, from_string)
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigValueError as exc:  # the section's own rules (config_rules): name the key as given, and where
        dotted = f"{prefix}{exc.key}"
        if typed and dotted in typed:
            raise FewshotError(f"{typed[dotted]} must be {exc.rule}, got {exc.value!r}; fix the value") from None
        raise FewshotError(
            f"config key '{dotted}' must be {exc.rule}, got {exc.value!r} ({source}); fix the value"
        ) from None


def coerce(value: Any, typ: Any, key: str, from_string: bool = False) -> Any:
    """Convert ``value`` (TOML value or ``--set`` string) to the annotated type ``typ`` or raise one line."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (from_string and isinstance(value, str) and value.lower() in ("none", "null", ""))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key, from_string)
    if origin is tuple:
        item_type = args[0]
        if from_string and isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list | tuple):
            value = [value]
        return tuple(coerce(v, item_type, key, from_string) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_string and isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_string and isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
    elif typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if from_string and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config key '{key}' has unsupported type {typ}")  # a bug in a dataclass
    name = getattr(typ, "__name__", str(typ))
    raise FewshotError(f"config key '{key}' expects {name}, got {value!r}; fix the recipe or --set value")


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# ---------------------------------------------------------------------------------------------- saving


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path, **extra: Any) -> None:
    """Write the resolved config (plus ``extra`` facts such as the fewshot version) as JSON."""
    from fewshot import __version__

    payload = {"fewshot_version": __version__, **extra, "config": to_dict(cfg)}
    write_text(path, json.dumps(payload, indent=2) + "\n")


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a config dataclass from ``to_dict`` output (as read back from config.json)."""
    return apply(cls(), data, source="saved config")
