"""Progress bars that suit where they are shown: tqdm on an interactive terminal (and in notebooks), plain lines
in logs.

With stderr redirected to a file (batch jobs, clusters, ``2> log``) a tqdm bar writes every refresh, thousands of
carriage-return-separated bars per run. There the bar becomes a plain line with the same fields (description,
count, elapsed and remaining time, rate and the bar's postfix, e.g. the loss), printed at most once every
``FEWSHOT_PROGRESS_SECONDS`` seconds (default 30), plus one when it starts and one when it ends.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

PLAIN = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"  # tqdm's fields, no bar


def interval() -> float:
    """Seconds between plain progress lines (``FEWSHOT_PROGRESS_SECONDS``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("FEWSHOT_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def bar(
    iterable: Iterable[Any] | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    initial: int = 0,
    leave: bool = True,
    stream: TextIO | None = None,
) -> tqdm:
    """A tqdm bar (over ``iterable`` if given) on ``stream`` (stderr by default) when it is a terminal or a
    notebook, else a :class:`LogLines` bar printing plain lines at most every :func:`interval` seconds."""
    stream = stream or sys.stderr
    options: dict[str, Any] = {"iterable": iterable, "total": total, "desc": desc, "unit": unit, "disable": disable,
                               "initial": initial}  # fmt: skip
    if disable or _interactive(stream):
        if "ipykernel" in sys.modules:
            from tqdm.auto import tqdm as auto

            return auto(**options, leave=leave)
        return tqdm(**options, leave=leave, file=stream)
    seconds = interval()
    return LogLines(**options, file=_Lines(stream), mininterval=seconds, maxinterval=max(seconds, 1.0),
                    bar_format=PLAIN, leave=True, dynamic_ncols=False, ncols=200)  # fmt: skip


def _interactive(stream: TextIO) -> bool:
    try:
        return stream.isatty() or "ipykernel" in sys.modules
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


class LogLines(tqdm):
    """tqdm, rate-limited for logs: changing the description or postfix does not print by itself (tqdm refreshes
    at once by default), so lines come only from the ``mininterval`` clock, the start and the end."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        super().set_postfix_str(s, refresh=False)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)


class _Lines(io.TextIOBase):
    """A stream for tqdm that turns each carriage-return refresh into one line of ``stream``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")
            self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
