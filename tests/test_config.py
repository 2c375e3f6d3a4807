"""params.yaml validation: the shipped file loads; every mistake is one ConfigError naming key and fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from vitcnn.config import Params, load_params
from vitcnn.errors import ConfigError


def write_params(directory, data) -> object:
    path = directory / "params.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def config_error(tmp_path, data) -> str:
    with pytest.raises(ConfigError) as info:
        load_params(write_params(tmp_path, data))
    return str(info.value)


def test_shipped_params_yaml_loads_as_the_defaults():
    assert load_params(ROOT / "params.yaml") == Params()


def test_a_partial_file_keeps_the_other_defaults(tmp_path):
    params = load_params(write_params(tmp_path, {"vit": {"depth": 2}, "train": {"epochs": 3}}))
    assert params.vit.depth == 2 and params.train.epochs == 3
    assert params.vit.embed_dim == Params().vit.embed_dim
    assert params.cnn == Params().cnn


def test_unknown_key_names_it_and_suggests_the_close_match(tmp_path):
    msg = config_error(tmp_path, {"vit": {"dept": 6}})
    assert "vit.dept" in msg
    assert "vit.depth" in msg


def test_an_unknown_recipe_key_names_it_and_suggests_the_close_match(tmp_path):
    msg = config_error(tmp_path, {"cnn": {"recipe": {"lr_schedule": "linear"}}})
    assert "unknown key 'cnn.recipe.lr_schedule'" in msg and "did you mean 'cnn.recipe.schedule'" in msg


def test_a_models_recipe_keys_replace_the_shared_ones_for_that_model_only(tmp_path):
    from vitcnn.config import recipe_for

    params = load_params(write_params(tmp_path, {"train": {"lr": 0.01, "epochs": 7},
                                                 "cnn": {"recipe": {"optimizer": "sgd", "lr": 0.1}}}))
    cnn, vit = recipe_for(params, "cnn"), recipe_for(params, "vit")
    assert (cnn.optimizer, cnn.lr, cnn.epochs) == ("sgd", 0.1, 7)
    assert (vit.optimizer, vit.lr, vit.epochs) == ("adamw", 0.01, 7)


def test_unknown_section_names_it_and_lists_the_sections(tmp_path):
    msg = config_error(tmp_path, {"model": {"depth": 6}})
    assert "'model'" in msg
    for section in ("data", "train", "vit", "cnn", "evaluate", "visualize"):
        assert section in msg


@pytest.mark.parametrize(
    "data, key, allowed",
    [
        ({"vit": {"depth": "six"}}, "vit.depth", "integer"),
        ({"vit": {"depth": 2.5}}, "vit.depth", "integer"),
        ({"train": {"epochs": True}}, "train.epochs", "integer"),
        ({"train": {"flip": 3}}, "train.flip", "true or false"),
        ({"train": {"flip": "yes please"}}, "train.flip", "true or false"),
        ({"cnn": {"channels": 5}}, "cnn.channels", "list"),
        ({"cnn": {"channels": [64, "wide"]}}, "cnn.channels", "integer"),
        ({"train": {"lr": "fast"}}, "train.lr", "number"),
        ({"data": {"source": 7}}, "data.source", "string"),
        ({"vit": 6}, "vit", "mapping"),
        ({"vit": {"recipe": {"lr": "fast"}}}, "vit.recipe.lr", "number"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_wrong_type_names_the_key_and_the_expected_type(tmp_path, data, key, allowed):
    msg = config_error(tmp_path, data)
    assert key in msg
    assert allowed in msg


@pytest.mark.parametrize(
    "data, key, allowed",
    [
        ({"vit": {"embed_dim": 130, "num_heads": 4}}, "vit.num_heads", "divisible"),
        ({"vit": {"patch_size": 5}}, "vit.patch_size", "divisible"),
        ({"vit": {"depth": 0}}, "vit.depth", ">= 1"),
        ({"vit": {"dropout": 1.0}}, "vit.dropout", "[0, 1)"),
        ({"train": {"lr": 0}}, "train.lr", "> 0"),
        ({"train": {"lr": -1}}, "train.lr", "> 0"),
        ({"train": {"epochs": 0}}, "train.epochs", ">= 1"),
        ({"train": {"schedule": "step"}}, "train.schedule", "cosine, linear, constant"),
        ({"train": {"warmup": 1.0}}, "train.warmup", "a warmup cannot be as long as the run"),
        ({"vit": {"recipe": {"warmup": 3}}}, "vit.recipe.warmup", "a fraction of the run in [0, 1)"),
        ({"vit": {"recipe": {"epochs": 0}}}, "vit.recipe.epochs", ">= 1"),
        ({"cnn": {"recipe": {"ema": 1.0}}}, "cnn.recipe.ema", "0 (off) or a decay in (0, 1)"),
        ({"train": {"ema": -0.5}}, "train.ema", "0 (off) or a decay in (0, 1)"),
        ({"cnn": {"recipe": {"optimizer": "sgd", "momentum": 0.0}}}, "cnn.recipe.momentum", "Nesterov"),
        ({"cnn": {"recipe": {"optimizer": "adam"}}}, "cnn.recipe.optimizer", "adamw, sgd"),
        ({"train": {"label_smoothing": 1.0}}, "train.label_smoothing", "[0, 1)"),
        ({"train": {"grad_clip": -1}}, "train.grad_clip", "0 (off)"),
        ({"vit": {"stem": "conv", "stem_layers": 6}}, "vit.stem_layers", "must divide evenly: use 1..5"),
        ({"vit": {"pooling": "max"}}, "vit.pooling", "cls, mean, seq"),
        ({"vit": {"drop_path": 1.0}}, "vit.drop_path", "[0, 1)"),
        ({"cnn": {"block": "dense"}}, "cnn.block", "plain, residual"),
        ({"train": {"augment_magnitude": 31}}, "train.augment_magnitude", "a magnitude bin 0..30"),
        ({"vit": {"recipe": {"augment_ops": -1}}}, "vit.recipe.augment_ops", "an integer >= 0"),
        ({"train": {"augment": "autoaugment"}}, "train.augment", "none, randaugment, trivialaugment"),
        ({"cnn": {"recipe": {"mixup": -0.2}}}, "cnn.recipe.mixup", "a Beta alpha > 0"),
        ({"train": {"cutmix": -1.0}}, "train.cutmix", "a Beta alpha > 0"),
        ({"train": {"erasing": 1.5}}, "train.erasing", "a probability in [0, 1]"),
        ({"train": {"mix_prob": -0.1}}, "train.mix_prob", "a probability in [0, 1]"),
        ({"train": {"mix_per": "pixel"}}, "train.mix_per", "batch, image"),
        ({"train": {"cutout": 40}}, "train.cutout", "0 (off) .. 32 pixels"),
        ({"data": {"val_size": 0}}, "data.val_size", ">= 1"),
        ({"data": {"dataset": "mnist"}}, "data.dataset", "cifar100"),
        ({"device": "tpu"}, "device", "cuda"),
        ({"cnn": {"channels": []}}, "cnn.channels", "non-empty"),
        ({"cnn": {"channels": [8, 8, 8, 8, 8, 8]}}, "cnn.channels", "at most 5"),
        ({"cnn": {"block": "resnet9", "channels": [8]}}, "cnn.channels", "at least two widths"),
        ({"cnn": {"block": "resnet9", "channels": [8] * 7}}, "cnn.channels", "at most 6 widths"),
        ({"cnn": {"block": "resnet18"}}, "cnn.block", "resnet9"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_impossible_value_names_the_key_and_what_is_allowed(tmp_path, data, key, allowed):
    msg = config_error(tmp_path, data)
    assert key in msg
    assert allowed in msg


def test_embed_dim_not_divisible_by_heads_mentions_both_values(tmp_path):
    msg = config_error(tmp_path, {"vit": {"embed_dim": 130, "num_heads": 4}})
    assert "130" in msg and "4" in msg


def test_device_error_lists_every_choice(tmp_path):
    msg = config_error(tmp_path, {"device": "tpu"})
    assert "'tpu'" in msg
    for choice in ("auto", "cpu", "cuda", "mps"):
        assert choice in msg


def test_exponent_without_dot_is_read_as_a_number(tmp_path):
    # PyYAML reads 1e-3 (no dot) as the string '1e-3'; it must still be the float 0.001.
    params = load_params(write_params(tmp_path, "train:\n  lr: 1e-3\n  weight_decay: 5e-2\n"))
    assert params.train.lr == pytest.approx(0.001)
    assert isinstance(params.train.lr, float)
    assert params.train.weight_decay == pytest.approx(0.05)


def test_invalid_yaml_is_a_config_error_with_the_line(tmp_path):
    msg = config_error(tmp_path, "vit:\n  depth: 6\n  heads: [1, 2\n")
    assert "line" in msg


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def _stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "data, fragment",
    [({"vit": {"dept": 6}}, "vit.depth"), ({"train": {"lr": 0}}, "train.lr")],
)
def test_train_stage_reports_a_bad_params_file_in_one_line(tmp_path, data, fragment):
    write_params(tmp_path, data)
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "train.py"), "vit"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = _stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("train_vit: error:")
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_train_stage_before_prepare_says_to_run_prepare(tmp_path):
    write_params(tmp_path, {"train": {"epochs": 1}})
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "train.py"), "cnn"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = _stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("train_cnn: error:") and "prepare" in lines[0]
    assert "Traceback" not in result.stderr
