"""Output paths: checked before any work, written atomically with the user's file mode, one writer per folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fewshot.errors import FewshotError
from fewshot.outputs import check_file, check_folder, folder_lock, save_tensors, write_atomically, write_text


def test_a_file_where_a_folder_goes_and_the_reverse(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    with pytest.raises(FewshotError, match="is a file; pass a folder"):
        check_folder(tmp_path / "taken")
    (tmp_path / "dir").mkdir()
    with pytest.raises(FewshotError, match="is a folder; pass a file name"):
        check_file(tmp_path / "dir")
    with pytest.raises(FewshotError, match=r"lies under .*taken, which is a file"):
        check_folder(tmp_path / "taken" / "sub" / "deeper")
    with pytest.raises(FewshotError, match="writes .safetensors files; name it .*x.safetensors"):
        check_file(tmp_path / "x.npy", suffix=".safetensors")
    assert check_folder(tmp_path / "new" / "out").is_dir()  # created, writable


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(FewshotError, match="cannot write in"):
            check_folder(locked / "eval")
    finally:
        locked.chmod(0o700)


def test_atomic_writes_clean_up_and_take_the_umask_mode(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(tmp_path / "x.bin", broken)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind, no half file under the final name
    old = os.umask(0o027)
    try:
        save_tensors(tmp_path / "a.safetensors", {"x": np.zeros(3, np.float32)})  # safetensors alone gives 0600
        write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    for name in ("a.safetensors", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def test_one_writer_per_folder(tmp_path: Path) -> None:
    (tmp_path / "stale.json.123.tmp").write_text("left by a killed writer")
    refused = pytest.raises(FewshotError, match=f"in use by another fewshot process \\(pid {os.getpid()}")
    with folder_lock(tmp_path), refused, folder_lock(tmp_path):
        pass
    assert not list(tmp_path.glob("*.tmp"))
    with folder_lock(tmp_path):  # released
        pass
