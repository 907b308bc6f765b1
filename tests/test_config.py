"""Config precedence, validation and saving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fewshot.config import Config, build_config, from_dict, save_config, to_dict
from fewshot.errors import FewshotError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_when_nothing_given() -> None:
    assert build_config() == Config()


def test_precedence_defaults_recipe_set_flags(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.toml", '[heads.knn]\nk = 5\ntemperature = 0.5\n[extract]\npool = "avg"\n')
    cfg = build_config(recipe, ["heads.knn.k=7", "extract.pool=cls+avg"], {"extract.pool": "last4"})
    assert cfg.heads.knn.temperature == 0.5  # recipe beats default
    assert cfg.heads.knn.k == 7  # --set beats recipe
    assert cfg.extract.pool == "last4"  # explicit flag beats --set
    assert cfg.extract.batch_size == Config().extract.batch_size


def test_the_method_brings_its_optimiser_defaults_below_recipe_set_and_flags(tmp_path: Path) -> None:
    from fewshot.pretrain_config import METHOD_OPTIM, resolve_optim

    def optim(cfg: Config) -> Any:
        return resolve_optim(cfg.pretrain.method, cfg.pretrain.optim)

    mae = optim(build_config(flags={"pretrain.method": "mae"}))
    assert (mae.lr, mae.betas, mae.weight_decay, mae.weight_decay_end, mae.clip_grad) == (
        1.5e-4,
        (0.9, 0.95),
        0.05,
        0.05,
        0,
    )
    assert optim(build_config(flags={"pretrain.method": "dino"})) == METHOD_OPTIM["dino"] == optim(Config())
    assert METHOD_OPTIM["dino"].lr == 5e-4 and METHOD_OPTIM["dino"].weight_decay_end == 0.4
    recipe = write(tmp_path / "r.toml", '[pretrain]\nmethod = "mae"\n[pretrain.optim]\nlr = 1e-3\n')
    cfg = optim(build_config(recipe, ["pretrain.optim.clip_grad=1.0"]))
    assert (cfg.lr, cfg.clip_grad, cfg.betas) == (1e-3, 1.0, (0.9, 0.95))  # recipe and --set win; the rest is MAE's
    assert cfg.warmup_steps is None and cfg.warmup_epochs is None  # derived from the run length by the loop


def test_flags_that_are_none_are_ignored() -> None:
    assert build_config(flags={"extract.pool": None}).extract.pool == "cls"


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(FewshotError, match=r"unknown config key 'heads\.knn\.kk'.*k, temperature"):
        build_config(sets=["heads.knn.kk=3"])
    recipe = write(tmp_path / "r.toml", "[nope]\nx = 1\n")
    with pytest.raises(FewshotError, match="valid keys at the top level: extract, heads"):
        build_config(recipe)


@pytest.mark.parametrize(
    ("item", "attr", "expected"),
    [
        ("evaluate.shots=1,5", ("evaluate", "shots"), (1, 5)),
        ("evaluate.heads=knn", ("evaluate", "heads"), ("knn",)),
        ("probe.shots=none", ("probe", "shots"), None),
        ("probe.shots=3", ("probe", "shots"), 3),
        ("extract.cache=false", ("extract", "cache"), False),
        ("heads.logreg.c_grid=0.1,10", ("heads", "logreg", "c_grid"), (0.1, 10.0)),
    ],
)
def test_set_strings_are_coerced_to_field_types(item: str, attr: tuple[str, ...], expected: object) -> None:
    value: object = build_config(sets=[item])
    for name in attr:
        value = getattr(value, name)
    assert value == expected


@pytest.mark.parametrize("item", ["heads.knn.k=three", "extract.cache=maybe", "heads.knn", "heads=1"])
def test_bad_values_are_one_line_errors(item: str) -> None:
    with pytest.raises(FewshotError) as info:
        build_config(sets=[item])
    assert "\n" not in str(info.value)


def test_recipe_types_are_checked(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.toml", '[heads.knn]\nk = "twenty"\n')
    with pytest.raises(FewshotError, match="heads.knn.k' expects int"):
        build_config(recipe)


def test_broken_or_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(FewshotError, match="does not exist"):
        build_config(tmp_path / "missing.toml")
    with pytest.raises(FewshotError, match="not valid TOML"):
        build_config(write(tmp_path / "bad.toml", "[extract\n"))


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = build_config(sets=["heads.knn.k=3", "evaluate.shots=2,4"])
    save_config(cfg, tmp_path / "config.json", command="test")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["command"] == "test" and saved["config"] == json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(Config, saved["config"]) == cfg


def test_configs_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().extract.pool = "avg"  # type: ignore[misc]


def test_a_rule_across_two_fields_holds_for_the_finished_config_not_between_its_layers(tmp_path: Path) -> None:
    from fewshot.pretrain_config import PretrainConfig

    recipe = tmp_path / "r.toml"
    recipe.write_text("[pretrain]\nimg_size = 64\npatch_size = 8\n")
    # 28 is no multiple of the recipe's 8, but the next --set makes the patch 4: the finished config is valid
    cfg = build_config(recipe, sets=["pretrain.img_size=28", "pretrain.patch_size=4"])
    assert (cfg.pretrain.img_size, cfg.pretrain.patch_size) == (28, 4)
    assert build_config(recipe, ["pretrain.patch_size=4"], {"pretrain.img_size": 28}).pretrain.img_size == 28
    with pytest.raises(
        FewshotError, match=r"^config key 'pretrain.img_size' \(--set\) must be a multiple of patch_size 8"
    ):
        build_config(recipe, sets=["pretrain.img_size=28"])
    with pytest.raises(FewshotError, match=r"^--img-size must be a multiple of patch_size 8, got 30"):
        build_config(recipe, flags={"pretrain.img_size": 30})
    with pytest.raises(FewshotError, match="must be a multiple of patch_size 8"):
        PretrainConfig(img_size=30, patch_size=8)  # built directly (Python API): checked at once
