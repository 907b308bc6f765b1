"""User-facing errors: one line that names the problem and the fix.

Library code raises :class:`FewshotError`; the CLI prints ``error: <message>`` and exits 2.
Anything else reaching the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations


class FewshotError(Exception):
    """A problem with the user's input, reported as one line (no traceback)."""
