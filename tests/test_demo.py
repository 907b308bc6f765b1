"""``fewshot demo`` as a user meets it: digits split three ways, a pretraining run that is a backbone, the run
against random init and pixels in one report, and a re-run into the same folder that reuses everything."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fewshot.cli import app
from fewshot.config import apply
from fewshot.demo import PIXELS, demo_config, random_init_spec, run_name, write_digits

runner = CliRunner()
# a short demo: 2 shot counts x 2 seeds, the two fast heads (and 2 pretraining steps, via --steps)
QUICK = ["--set", "evaluate.shots=1,5", "--set", "evaluate.seeds=2", "--set", "evaluate.heads=knn,prototype", "-q"]


def run(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_write_digits_makes_three_disjoint_splits_and_repairs_an_old_layout(tmp_path: Path) -> None:
    stale = tmp_path / "train" / "3" / "digit_9999.png"  # e.g. left by a demo with other splits
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    folders = write_digits(tmp_path)
    names = {split: {p.name for p in folder.glob("**/digit_*.png")} for split, folder in folders.items()}
    assert not stale.exists()
    assert sum(len(n) for n in names.values()) == len(set().union(*names.values())) == 1797  # disjoint, complete
    assert not any((folders["unlabeled"]).glob("*/"))  # a flat folder: no labels to leak into pretraining
    per_class = [len(list(d.glob("*.png"))) for d in sorted(folders["train"].iterdir())]
    assert len(per_class) == 10 and min(per_class) >= 10  # every class can give a 10-shot support


def test_demo_pretrains_then_compares_run_random_init_and_pixels(tmp_path: Path) -> None:
    code, out = run("demo", "--out", tmp_path, "--steps", "2", *QUICK)
    assert code == 0, out
    cfg = demo_config()
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "backbone.safetensors").is_file(), runs
    saved = json.loads((runs[0] / "config.json").read_text())
    assert saved["config"]["method"] == cfg.pretrain.method and saved["config"]["steps"] == 2
    assert saved["n_images"] == len(list((tmp_path / "data" / "unlabeled").glob("*.png")))

    report = json.loads((tmp_path / "evaluation" / "report.json").read_text())
    run_spec = next(b for b in report["backbones"] if b.startswith(str(runs[0])))
    assert report["backbones"] == [run_spec, random_init_spec(cfg), PIXELS]
    assert {(r["backbone"], r["shots"]) for r in report["results"]} == {
        (b, k) for b in report["backbones"] for k in (1, 5)
    }
    assert (tmp_path / "evaluation" / "label_efficiency.png").is_file()
    pixels = max(r["accuracy"] for r in report["results"] if r["backbone"] == PIXELS and r["shots"] == 5)
    assert pixels > 0.6  # digits from 5 labels per class: far above chance (0.1), so splits and labels line up
    assert "pretrained" in out and "random init" in out and str(runs[0]) in out
    # the unlabeled split also serves as pool and for selection: TypiClust supports beside random, and the first
    # digits to label, chosen on the run's features, on a contact sheet
    assert report["select"] == ["random", "typiclust"]
    assert report["pool"]["unlabeled"] == str(tmp_path / "data" / "unlabeled")
    picked = (tmp_path / "selection" / "selection.csv").read_text().splitlines()
    assert len(picked) == 1 + 10 and (tmp_path / "selection" / "contact_sheet.png").is_file()
    assert "TypiClust's first 10 digits to label" in out and "of 10 classes" in out

    # the run folder is a backbone spec for every other command
    code, ext = run("extract", tmp_path / "data" / "test", "-b", run_spec, "-o", tmp_path / "f.safetensors", "-q")
    assert code == 0 and f"{report['test_images']} images -> " in ext and "(10 classes)" in ext, ext

    # a re-run into the same folder reuses the data and the finished run, and gives the same numbers
    weights = runs[0] / "backbone.safetensors"
    before = weights.stat().st_mtime_ns
    code, again = run("demo", "--out", tmp_path, "--steps", "2", *QUICK)
    assert code == 0, again
    assert "already finished" in again and weights.stat().st_mtime_ns == before
    rerun = json.loads((tmp_path / "evaluation" / "report.json").read_text())
    assert [r["accuracy"] for r in rerun["results"]] == [r["accuracy"] for r in report["results"]]


def test_another_length_is_another_run_folder() -> None:
    """``--steps`` after a finished demo starts a new run beside the old one instead of refusing to resume it."""
    cfg = demo_config()
    longer = apply(cfg, {"pretrain": {"steps": (cfg.pretrain.steps or 0) + 1}}, source="test")
    assert run_name(longer) != run_name(cfg)


def test_no_pretrain_compares_the_baselines_only(tmp_path: Path) -> None:
    code, out = run("demo", "--out", tmp_path, "--no-pretrain", *QUICK)
    assert code == 0, out
    report = json.loads((tmp_path / "evaluation" / "report.json").read_text())
    assert report["backbones"] == [random_init_spec(demo_config()), PIXELS]
    assert not (tmp_path / "runs").exists()


def test_bad_settings_fail_in_one_line_before_pretraining(tmp_path: Path) -> None:
    for args, words in ((["--set", "evaluate.heads=nope"], "nope"), (["--steps", "0"], "--steps must be ≥ 1, got 0")):
        code, out = run("demo", "--out", tmp_path, *args, "-q")
        assert code == 2 and out.strip().startswith("error:") and words in out and "Traceback" not in out, out
    assert not (tmp_path / "runs").exists()
