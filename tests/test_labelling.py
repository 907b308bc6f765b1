"""``fewshot select`` as a user meets it: a CSV, a contact sheet, copies for a labelling tool, the next batch."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from fewshot.cli import app
from tests.conftest import write_digits_folder

runner = CliRunner()


def run(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def flat(tmp_path: Path) -> Path:
    """A flat folder of 40 unlabeled digits (4 classes), names that carry no label."""
    labelled = write_digits_folder(tmp_path / "labelled", classes=4, per_class=10)
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for i, file in enumerate(sorted(labelled.glob("*/*.png"))):
        shutil.copy(file, folder / f"u_{(i * 17) % 40:03d}.png")
    return folder


def test_select_writes_csv_sheet_and_copies(tmp_path: Path) -> None:
    images = flat(tmp_path)
    out = tmp_path / "to_label"
    code, text = run("select", images, "-b", "pixels:8", "--budget", "4", "--files", "copy", "-o", out, "-q")
    assert code == 0, text
    assert "4 of 40 images chosen by typiclust" in text
    chosen = rows(out / "selection.csv")
    assert [r["rank"] for r in chosen] == ["1", "2", "3", "4"]
    assert len({r["cluster"] for r in chosen}) == 4 and all(float(r["score"]) > 0 for r in chosen)
    assert all((images / r["path"]).is_file() for r in chosen)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 4 * 96 and sheet.height > 96
    copies = sorted(p.name for p in (out / "images").iterdir())
    assert copies == [f"{int(r['rank']):04d}_{r['path']}" for r in chosen]
    assert (out / "images" / copies[0]).read_bytes() == (images / chosen[0]["path"]).read_bytes()
    again = tmp_path / "again"
    run("select", images, "-b", "pixels:8", "--budget", "4", "-o", again, "-q")
    assert rows(again / "selection.csv") == chosen  # same seed, same picks


def test_exclude_picks_the_next_batch_elsewhere(tmp_path: Path) -> None:
    images = flat(tmp_path)
    first = tmp_path / "first"
    run("select", images, "-b", "pixels:8", "--budget", "4", "--files", "copy", "-o", first, "-q")
    picked = {r["path"] for r in rows(first / "selection.csv")}
    for exclude in (first / "selection.csv", first / "images"):  # by path, or by content (renamed copies)
        out = tmp_path / f"next-{exclude.name}"
        code, text = run("select", images, "-b", "pixels:8", "-n", "4", "--exclude", exclude, "-o", out, "-q")
        assert code == 0, text
        assert "(4 already labelled, excluded)" in text
        assert not picked & {r["path"] for r in rows(out / "selection.csv")}


def test_every_strategy_runs_from_the_command_line(tmp_path: Path) -> None:
    images = flat(tmp_path)
    for strategy in ("probcover", "kcenter", "random"):
        out = tmp_path / strategy
        code, text = run("select", images, "-b", "pixels:8", "-n", "3", "--strategy", strategy, "--classes", "4",
                         "--files", "link", "-o", out, "-q")  # fmt: skip
        assert code == 0, text
        assert len(rows(out / "selection.csv")) == 3
        assert all(p.is_symlink() for p in (out / "images").iterdir())
