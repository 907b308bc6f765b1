"""Where commands write: output paths checked before any computation, files written atomically with the user's
normal file mode, and one writer per output folder.

- :func:`check_file` / :func:`check_folder` fail in one line, before minutes of work, when an ``--out`` cannot be
  written: it exists as the wrong kind, lies under a file, or its folder is not writable (permissions, read-only
  or immutable file systems). The folder is created then, so the check is the real thing: a probe file is made
  in it and removed.
- :func:`write_atomically` writes to a temporary name beside the target and renames it into place, so a reader
  never sees half a file; the temporary file is removed on every failure; the result gets ``0o666 & ~umask``
  (safetensors alone would leave 0600, unreadable to the others on a shared machine).
- :func:`folder_lock`: an exclusive ``flock`` on ``FOLDER/.lock`` while a command writes there, released by the
  OS even when the holder is killed.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fewshot.errors import FewshotError


def check_file(path: str | Path, flag: str = "--out", suffix: str | None = None) -> Path:
    """``path`` can be written as a file (its folder is created): else one line naming the problem and the fix."""
    path = Path(path).expanduser()
    if suffix is not None and path.suffix.lower() != suffix:
        raise FewshotError(f"{flag} {path}: this command writes {suffix} files; name it {path.with_suffix(suffix)}")
    if path.is_dir():
        raise FewshotError(f"{flag} {path} is a folder; pass a file name, e.g. {path / ('out' + (suffix or ''))}")
    _writable_folder(path.parent, flag, path)
    return path


def check_folder(path: str | Path, flag: str = "--out") -> Path:
    """``path`` is (or can be created as) a writable folder: else one line naming the problem and the fix."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise FewshotError(f"{flag} {path} is a file; pass a folder (it is created if missing)")
    _writable_folder(path, flag, path)
    return path


def _writable_folder(folder: Path, flag: str, target: Path) -> None:
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise FewshotError(f"{flag} {target} lies under {parent}, which is a file; choose another path")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:  # EACCES, EPERM (immutable), EROFS, ENOSPC ...
        reason = exc.strerror or type(exc).__name__
        raise FewshotError(f"{flag} {target}: cannot write in {folder} ({reason}); choose another path") from None


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: str | Path, write: Callable[[Path], object], durable: bool = False) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it to ``path``; ``durable`` also
    fsyncs the file and the folder entry (checkpoints that must survive a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_folder(path.parent)
    return path


def save_tensors(
    path: str | Path, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None, durable: bool = False
) -> Path:
    """Write numpy arrays or torch tensors as safetensors, atomically (:func:`write_atomically`)."""
    import numpy as np

    if any(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file  # type: ignore[assignment]
    return write_atomically(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=metadata), durable)


def write_text(path: str | Path, text: str) -> Path:
    """:func:`write_atomically` for UTF-8 text."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv(path: str | Path, fields: list[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """:func:`write_atomically` for a CSV with a header row (UTF-8; file names that are not valid UTF-8 kept)."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    return write_atomically(path, write)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms that cannot open folders
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "output folder") -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on FOLDER/.lock for the block (the folder must exist). A second
    process is refused in one line; temporary files left by a killed writer are removed once the lock is held."""
    folder = Path(folder)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise FewshotError(
                f"{what} {folder} is in use by another fewshot process (pid {holder}); wait for it or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for stale in folder.glob("*.tmp"):  # half-written by a killed writer: only this writer now
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            # the file stays (unlinking it would let a third process lock a different inode)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
