"""The command line as a user meets it: fast help with examples, one-line errors, every command end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fewshot.cli import app
from tests.conftest import TINY_VIT, write_digits_folder

runner = CliRunner()
COMMANDS = ["pretrain", "extract", "probe", "predict", "evaluate", "select", "attention", "demo"]


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_help_does_not_import_torch() -> None:
    code = "import sys; from fewshot.cli import app; print('torch' in sys.modules or 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_python_dash_m() -> None:
    out = subprocess.run([sys.executable, "-m", "fewshot", "--help"], capture_output=True, text=True, check=True)
    assert all(c in out.stdout for c in COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_help_has_an_example(name: str) -> None:
    code, out = run(name, "--help")
    assert code == 0 and "Example" in out and f"fewshot {name}" in out


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    code, out = run("extract", tmp_path / "missing", "--out", tmp_path / "f.safetensors")
    assert code == 2 and "Traceback" not in out
    assert out.strip().startswith("error:") and len(out.strip().splitlines()) == 1
    code, out = run("evaluate", tmp_path, tmp_path, "--set", "evaluate.nope=1")
    assert code == 2 and "unknown config key 'evaluate.nope'" in out


def test_extract_probe_predict(digits: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = digits
    code, out = run("extract", train, "-b", TINY_VIT, "--pool", "avg", "-o", tmp_path / "f.safetensors", "-q")
    assert code == 0, out
    assert "40 images -> 40x192 features (4 classes)" in out
    code, out = run(
        "probe", train, "-b", "pixels:8", "--shots", "3", "--head", "knn", "--test", test, "-o", tmp_path / "head", "-q"
    )
    assert code == 0, out
    assert "knn head on 12 labelled images" in out and "test accuracy" in out
    code, out = run("predict", test, "--head", tmp_path / "head", "--out", tmp_path / "p.csv", "-q")
    assert code == 0, out
    assert "24 predictions" in out and (tmp_path / "p.csv").read_text().startswith("path,label,score")


def test_evaluate_writes_report_and_is_reproducible(digits: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = digits
    args = [train, test, "-b", "pixels:8", "-b", TINY_VIT, "--shots", "1,3", "--seeds", "3", "--heads", "knn,prototype"]
    code, out = run("evaluate", *args, "--out", tmp_path / "a", "-q")
    assert code == 0, out
    assert "3-shot accuracy" in out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert {(r["backbone"], r["head"], r["shots"]) for r in report["results"]} == {
        (b, h, s) for b in ("pixels:8", TINY_VIT) for h in ("knn", "prototype") for s in (1, 3)
    }
    for name in ("report.md", "label_efficiency.png", "config.json"):
        assert (tmp_path / "a" / name).is_file()
    run("evaluate", *args, "--out", tmp_path / "b", "-q")
    again = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [r["accuracy"] for r in again["results"]] == [r["accuracy"] for r in report["results"]]


def test_recipe_and_set_reach_the_library(digits: tuple[Path, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[evaluate]\nheads = ["knn"]\nshots = [2]\nseeds = 2\n[heads.knn]\nk = 3\n')
    code, out = run("evaluate", *digits, "-b", "pixels:8", "-r", recipe, "--set", "heads.knn.k=5", "-o", tmp_path, "-q")
    assert code == 0, out
    saved = json.loads((tmp_path / "config.json").read_text())["config"]
    assert saved["heads"]["knn"]["k"] == 5 and saved["evaluate"]["shots"] == [2]


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_pretrain_two_steps_then_extract_from_the_run(digits: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    train, test = digits
    run_dir = tmp_path / "run"
    small = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--depth", "2"]
    args = ["pretrain", train, "--method", method, *small, "--steps", "2", "--batch-size", "8", "-o", run_dir, "-q"]
    code, out = run(*args, "--set", "pretrain.dino.local_crops=2", "--set", "pretrain.mae.decoder_depth=1")
    assert code == 0, out
    for name in ("config.json", "metrics.jsonl", "checkpoint.safetensors", "backbone.safetensors"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and {"step", "epoch", "loss", "lr"} <= set(lines[-1])
    code, out = run("extract", test, "-b", run_dir, "-o", tmp_path / "f.safetensors", "-q")
    assert code == 0 and "24 images -> 24x192 features" in out, out


def test_resume_needs_a_checkpoint(digits: tuple[Path, Path], tmp_path: Path) -> None:
    code, out = run("pretrain", digits[0], "--resume", "-o", tmp_path / "new-run", "-q")
    assert code == 2 and "holds no checkpoint" in out


def test_commands_that_cannot_share_work_refuse_torchrun(
    digits: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out = run("evaluate", digits[0], digits[1], "-b", "pixels")
    assert code == 2 and "runs in one process" in out


def test_evaluate_with_selection_pool_heads_and_a_reference(digits: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = digits
    pool = write_digits_folder(tmp_path / "pool", per_class=5, offset=16)
    args = [train, test, "-b", "pixels:8", "-b", TINY_VIT, "--shots", "1,2", "--seeds", "2", "--reference", TINY_VIT]
    args += ["--heads", "knn,spread,selftrain,prototype+center", "--select", "random,typiclust,kcenter"]
    code, out = run("evaluate", *args, "--unlabeled", pool, "--out", tmp_path / "ev", "-q")
    assert code == 0, out
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["references"] == {"pixels:8": TINY_VIT} and report["select"] == ["random", "typiclust", "kcenter"]
    assert len(report["results"]) == 2 * 3 * 4 * 2  # backbones x strategies x heads x shots
    spread = next(r for r in report["results"] if r["head"] == "spread" and r["shots"] == 1)
    assert spread["pool_size"] == 40 - 4 + 20  # TRAIN outside the 1-shot support + the --unlabeled folder
    fields = {c["field"] for c in report["comparisons"]}
    assert fields == {"backbone", "select"}
    assert report["headline"][0] in out  # the terminal leads with the paired differences too
    saved = json.loads((tmp_path / "ev" / "config.json").read_text())["config"]
    assert saved["pool"]["unlabeled"] == str(pool) and saved["evaluate"]["reference"] == TINY_VIT


def test_probe_a_pool_head_then_predict(digits: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = digits
    pool = write_digits_folder(tmp_path / "pool", per_class=5, offset=16)
    for head in ("spread", "logreg+center"):
        args = ["probe", train, "-b", "pixels:8", "--shots", "2", "--head", head, "--unlabeled", pool]
        code, out = run(*args, "--test", test, "-o", tmp_path / head, "-q")
        assert code == 0, out
        assert "8 labelled images" in out and "52 unlabeled pool images" in out  # 40 - 8 in TRAIN + 20
        probe_accuracy = float(out.split("test accuracy ")[1].split(",")[0])
        code, out = run("predict", test, "--head", tmp_path / head, "--out", tmp_path / f"{head}.csv", "-q")
        assert code == 0, out
        lines = (tmp_path / f"{head}.csv").read_text().splitlines()[1:]
        right = [line.split(",")[0].split("/")[0] == line.split(",")[1] for line in lines]
        assert len(right) == 24 and sum(right) / 24 == pytest.approx(probe_accuracy, abs=1e-4)  # the same labels


def test_allow_overlap_turns_the_error_into_a_listed_warning(digits: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    train, test = digits
    victim = sorted((test / "1").glob("*.png"))[0]
    copy = tmp_path / "train"
    shutil.copytree(train, copy)
    shutil.copy(victim, copy / "0" / "again.png")
    args = [copy, test, "-b", "pixels:8", "--shots", "1", "--seeds", "1", "--heads", "knn", "-o", tmp_path / "ev"]
    code, out = run("evaluate", *args, "-q")
    assert code == 2 and "also in TRAIN" in out
    code, out = run("evaluate", *args, "--allow-overlap", "-q")
    assert code == 0 and "warning: 1 TEST image(s) also in TRAIN" in out
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["overlaps"] == [{"with": "TRAIN", "test": f"1/{victim.name}", "other": "0/again.png"}]
    assert "allowed by --allow-overlap" in (tmp_path / "ev" / "report.md").read_text()
