"""Named recipes: `vitcnn recipe` prints them as -S flags that round-trip through DVC's own override
function; bad names, keys and values are one line before anything runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from vitcnn.__main__ import main as vitcnn
from vitcnn.config import load_params, recipe_for
from vitcnn.overrides import flatten


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """The project's params.yaml and recipes/, in a scratch folder that is the working directory."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_list_names_every_recipe_with_its_description(project, capsys):
    assert vitcnn(["recipe", "--list"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(lines) == {p.stem for p in (ROOT / "recipes").glob("*.yaml")} >= {"original", "strong"}
    assert all(lines.values())


@pytest.mark.parametrize("name", [p.stem for p in sorted((ROOT / "recipes").glob("*.yaml"))])
def test_the_printed_flags_set_exactly_the_recipes_keys(name, project, capsys):
    from dvc.utils.hydra import apply_overrides

    assert vitcnn(["recipe", name]) == 0
    args = capsys.readouterr().out.split()
    assert args[::2] == ["-S"] * (len(args) // 2)
    apply_overrides(project / "params.yaml", args[1::2])  # as `dvc exp run -S ...` applies them
    applied = flatten(yaml.safe_load((project / "params.yaml").read_text()))
    wanted = flatten(yaml.safe_load((project / "recipes" / f"{name}.yaml").read_text()) or {})
    assert {k: applied[k] for k in wanted} == wanted
    load_params(project / "params.yaml")  # and the result is valid


def test_the_original_recipe_is_the_defaults_and_the_strong_one_differs_per_model(project, capsys):
    from dvc.utils.hydra import apply_overrides

    assert vitcnn(["recipe", "original"]) == 0 and capsys.readouterr().out.strip() == ""
    assert vitcnn(["recipe", "strong"]) == 0
    apply_overrides(project / "params.yaml", capsys.readouterr().out.split()[1::2])
    params = load_params(project / "params.yaml")
    vit, cnn = recipe_for(params, "vit"), recipe_for(params, "cnn")
    assert (vit.optimizer, cnn.optimizer) == ("adamw", "sgd")
    assert params.vit.stem == "conv" and params.cnn.block == "resnet9"
    assert vit.epochs == cnn.epochs == params.train.epochs  # one flag still sets both budgets


@pytest.mark.parametrize("recipe, message", [
    (None, "unknown recipe 'nope'; known recipes: " + ", ".join(p.stem for p in sorted((ROOT / "recipes").glob("*.yaml")))),
    ({"vit": {"depht": 8}}, "recipe 'nope' (recipes/nope.yaml): unknown key 'vit.depht' (did you mean 'vit.depth'?)"),
    ({"train": {"warmup": 1.5}}, "train.warmup: 1.5 is not allowed; use a fraction of the run in [0, 1)"),
    ({"vit": {"recipe": {"ema": 1.5}}}, "vit.recipe.ema: 1.5 is not allowed; use 0 (off) or a decay in (0, 1)"),
    ({"vit": {"pooling": "max"}}, "vit.pooling: 'max' is not allowed; use one of cls, mean, seq"),
])
def test_a_bad_recipe_is_one_line_naming_it(recipe, message, project, capsys):
    if recipe is not None:
        (project / "recipes" / "nope.yaml").write_text("# a broken recipe\n" + yaml.safe_dump(recipe))
    assert vitcnn(["recipe", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitcnn recipe: error: ") and message in err, err


def test_a_study_takes_a_recipe_and_its_own_flags_win(project, monkeypatch):
    from vitcnn.study.cli import with_recipe

    sets = with_recipe("strong", ["vit.recipe.lr=0.002", "train.epochs=3"], "budget")
    assert "vit.recipe.lr=0.002" in sets and "vit.recipe.lr=0.001" not in sets
    assert "cnn.block=resnet9" in sets and "train.epochs=3" in sets


def test_the_recipes_old_name_still_works_for_a_release_with_a_notice(project, capsys, caplog):
    assert vitcnn(["recipe", "seed"]) == 0
    assert capsys.readouterr().out.strip() == ""  # the original recipe: the defaults
    assert "recipe 'seed' is now called 'original'" in caplog.text


def test_a_recipe_starts_from_the_committed_params_not_from_what_an_earlier_run_left(project, capsys, caplog):
    import subprocess

    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml", "recipes"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "-m", "p"]):
        subprocess.run(cmd, cwd=project, check=True)
    from dvc.utils.hydra import apply_overrides

    apply_overrides(project / "params.yaml", ["vit.depth=8", "train.lr=0.001"])  # as `dvc exp run -S` leaves it
    assert vitcnn(["recipe", "strong"]) == 0
    args = capsys.readouterr().out.split()
    assert "vit.depth=6" in args and "train.lr=0.0003" in args  # back to the committed values
    assert "params.yaml holds train.lr=0.001 (committed: 0.0003), vit.depth=8 (committed: 6)" in caplog.text
    apply_overrides(project / "params.yaml", args[1::2])  # as `dvc exp run $(vitcnn recipe strong)` applies them
    params = load_params(project / "params.yaml")
    assert params.vit.depth == 6 and params.train.lr == 0.0003 and params.vit.stem == "conv"

    apply_overrides(project / "params.yaml", ["vit.depth=8"])
    assert vitcnn(["recipe", "strong", "--from-workspace"]) == 0
    assert not any(a.startswith("vit.depth=") for a in capsys.readouterr().out.split())



def git(project: Path, *args: str) -> None:
    import subprocess

    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=project, check=True)


def test_a_refused_value_left_by_an_earlier_run_says_how_to_undo_it(project, capsys):
    from dvc.utils.hydra import apply_overrides

    from vitcnn.cli import run_stage

    git(project, "init", "-q")
    git(project, "add", "params.yaml")
    git(project, "commit", "-qm", "params")
    apply_overrides(project / "params.yaml", ["vit.embed_dim=130", "train.lr=0.001"])  # as `dvc exp run -S` leaves them
    with pytest.raises(SystemExit) as stopped:
        run_stage("train_vit", lambda: load_params(Path("params.yaml")))
    assert stopped.value.code == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("train_vit: error: vit.num_heads: 4 is not allowed; vit.embed_dim (130)")
    # the key the error names (not every leftover), its committed value, and the way back
    assert error.endswith("; params.yaml now holds vit.embed_dim=130 (committed: 128) — git checkout params.yaml to undo")

    git(project, "commit", "-qam", "the user's own choice")  # committed: there is nothing to undo
    with pytest.raises(SystemExit):
        run_stage("train_vit", lambda: load_params(Path("params.yaml")))
    error = capsys.readouterr().err
    assert "vit.embed_dim" in error and "git checkout" not in error
