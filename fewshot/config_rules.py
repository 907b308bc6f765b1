"""Value rules of the config dataclasses, checked when a config is built (``__post_init__``).

Each section states its rules next to its fields, e.g. ``check(self, k=at_least(1), temperature=above(0))``; a
broken rule raises :class:`ConfigValueError`, which :func:`fewshot.config.apply` turns into one line naming the
dotted key, the value, the rule and where the value came from (recipe, ``--set`` or a flag). ``None`` always
passes: it means "derived" or "not set" wherever a field allows it. Pure Python, no torch.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fewshot.errors import FewshotError

Rule = tuple[Callable[[Any], bool], str]  # (predicate, what the value must be)


class ConfigValueError(FewshotError):
    """A config value outside its allowed range; ``key`` is the field name within its section."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        self.key, self.value, self.rule = key, value, rule
        super().__init__(f"config key '{key}' must be {rule}, got {value!r}")


# Rules across two fields (img_size a multiple of patch_size, ...) hold for the finished config only: while its
# layers are applied one by one (recipe, --set, flags), a value may briefly pair with the other field's old value.
_ACROSS_DEFERRED: contextvars.ContextVar[bool] = contextvars.ContextVar("across_deferred", default=False)


@contextmanager
def across_deferred() -> Iterator[None]:
    """Within: sections skip their ``check_across`` at construction; the caller checks the finished config."""
    token = _ACROSS_DEFERRED.set(True)
    try:
        yield
    finally:
        _ACROSS_DEFERRED.reset(token)


def check_across_now(section: Any) -> None:
    """Call ``section.check_across()`` unless a layered build deferred it (see :func:`across_deferred`)."""
    if not _ACROSS_DEFERRED.get():
        section.check_across()


def check(section: Any, **rules: Rule) -> None:
    """Raise :class:`ConfigValueError` for the first field of ``section`` that breaks its rule."""
    for name, (ok, text) in rules.items():
        value = getattr(section, name)
        if value is not None and not ok(value):
            raise ConfigValueError(name, value, text)


def at_least(low: float) -> Rule:
    return (lambda v: v >= low), f"≥ {low:g}"


def above(low: float) -> Rule:
    return (lambda v: v > low), f"> {low:g}"


def fraction(closed_low: bool = True, closed_high: bool = True) -> Rule:
    """A value in the unit interval, each end included or not (both excluded: the open interval (0, 1))."""

    def ok(v: float) -> bool:
        return (v >= 0 if closed_low else v > 0) and (v <= 1 if closed_high else v < 1)

    return ok, f"in {'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


def each(rule: Rule, length: int | None = None) -> Rule:
    """Every item of a tuple passes ``rule`` (and the tuple has ``length`` items, when given)."""
    ok, text = rule
    size = f"{length} values, each " if length is not None else "non-empty, each "
    return (lambda v: len(v) > 0 and (length is None or len(v) == length) and all(ok(x) for x in v)), size + text


def scale_range() -> Rule:
    """A crop-scale range (min, max) of area fractions."""
    return (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1), "(min, max) with 0 < min ≤ max ≤ 1"


POOL_PATTERN = re.compile(r"cls|avg|cls\+avg|last[1-9]\d*")


def pool_name() -> Rule:
    return (lambda v: POOL_PATTERN.fullmatch(v) is not None), "cls, avg, cls+avg or lastN with N ≥ 1 (e.g. last4)"
