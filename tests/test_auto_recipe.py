"""``--recipe auto``: deterministic for a device and data description, recorded in config.json, flags still win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fewshot import auto_recipe
from fewshot.auto_recipe import DataInfo, DeviceInfo, choose, cpu_geometry, describe_data
from fewshot.cli import app
from fewshot.config import build_config
from fewshot.sources import open_source

runner = CliRunner()
CPU = DeviceInfo("cpu")
PHOTOS = DataInfo(n_images=2668, typical_side=96, sampled=100)


def run(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def saved(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def test_the_same_description_gives_the_same_choice() -> None:
    first, second = choose(CPU, PHOTOS), choose(DeviceInfo("cpu"), DataInfo(2668, 96, 100))
    assert first == second and first.line() == second.line()
    assert first.pretrain["method"] == "mae" and first.length_default == {"minutes": auto_recipe.CPU_MINUTES}
    assert choose(CPU, PHOTOS, length_given=True).length_default == {}
    assert choose(DeviceInfo("cuda", "H100"), PHOTOS).pretrain["method"] == "dino"
    assert choose(CPU, PHOTOS, method="dino").pretrain["method"] == "dino"


@pytest.mark.parametrize("side", [8, 12, 16, 20, 28, 31, 32, 64, 500])
def test_geometry_fits_the_images(side: int) -> None:
    img, patch = cpu_geometry(side)
    assert img % patch == 0 and 16 <= img <= 32 and (img // patch) ** 2 >= 16


def test_every_choice_is_a_valid_config() -> None:
    for device in (CPU, DeviceInfo("cuda")):
        for data in (PHOTOS, DataInfo(897, 8), DataInfo(3000, 28), DataInfo(40, 16), DataInfo(200_000, 400)):
            for method in (None, "mae", "dino"):
                choice = choose(device, data, method)
                cfg = build_config(base=choice.base()).pretrain  # unknown keys or bad types would raise here
                assert cfg.method == choice.pretrain["method"] and data.n_images // cfg.batch_size >= 4


def test_describe_data_reads_the_median_shorter_side(tmp_path: Path) -> None:
    for i, size in enumerate([(40, 30), (30, 50), (64, 90), (20, 20), (100, 45)]):
        Image.new("RGB", size, (i, 0, 0)).save(tmp_path / f"{i}.png")
    info = describe_data(open_source(tmp_path))
    assert info == DataInfo(n_images=5, typical_side=30, sampled=5)


def test_auto_is_the_default_and_its_choice_is_printed_and_saved(digits: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, text = run("pretrain", digits[0], "--steps", "2", "--batch-size", "8", "--device", "cpu", "-o", out, "-q")
    assert code == 0, text
    line = next(ln for ln in text.splitlines() if ln.startswith("recipe auto:"))
    record = saved(out)["auto_recipe"]
    expected = choose(CPU, describe_data(open_source(digits[0])), length_given=True)
    assert record == json.loads(json.dumps(expected.record())) and line == expected.line()
    config = saved(out)["config"]
    assert config["method"] == "mae" and (config["img_size"], config["patch_size"]) == cpu_geometry(16)
    assert config["batch_size"] == 8 and config["steps"] == 2 and config["minutes"] is None  # flags win


def test_explicit_flags_and_sets_win_over_auto(digits: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--method", "dino", "--img-size", "32", "--patch-size", "8", "--steps", "1", "--batch-size", "8"]
    code, text = run("pretrain", digits[0], *args, "--set", "pretrain.dino.local_crops=2", "-o", out, "-q")
    assert code == 0, text
    config, record = saved(out)["config"], saved(out)["auto_recipe"]
    assert record["pretrain"]["method"] == "dino"  # the choice follows the asked method
    assert (config["method"], config["img_size"], config["patch_size"]) == ("dino", 32, 8)
    assert config["dino"]["local_crops"] == 2 and config["depth"] == record["pretrain"]["depth"]


def test_a_model_or_a_recipe_file_turns_auto_off(digits: tuple[Path, Path], tmp_path: Path) -> None:
    small = ["--img-size", "16", "--patch-size", "8", "--depth", "1", "--steps", "1", "--batch-size", "8"]
    code, text = run("pretrain", digits[0], "--model", "vit_tiny_patch16_224", *small, "-o", tmp_path / "m", "-q")
    assert code == 0 and "recipe auto" not in text and "auto_recipe" not in saved(tmp_path / "m")
    assert auto_recipe.wanted(None, {"pretrain.init"}) is False
    assert auto_recipe.wanted(Path("recipes/mae-cpu-tiny.toml"), set()) is False
    assert auto_recipe.wanted("auto", {"pretrain.model"}) is True  # asked for by name: the flags go on top


def test_a_rerun_keeps_the_saved_choice(
    digits: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    args = ["pretrain", digits[0], "--steps", "1", "--batch-size", "8", "--device", "cpu", "-o", out, "-q"]
    assert run(*args)[0] == 0
    first = saved(out)["auto_recipe"]
    # the same folder on another device would choose differently: the run resumes with its own recipe instead
    monkeypatch.setattr(auto_recipe, "describe_device", lambda device: DeviceInfo("cuda", "elsewhere"))
    code, text = run(*args)
    assert code == 0, text
    assert saved(out)["auto_recipe"]["pretrain"] == first["pretrain"] and "as saved in" in text
