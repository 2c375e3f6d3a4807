"""Named recipes: recipes/<name>.yaml holds only the params.yaml keys that differ from the defaults.

A recipe is printed as `-S key=value` flags (`vitcnn recipe strong`), so that
`dvc exp run $(vitcnn recipe strong)` runs it and `dvc exp show` shows every key it set.
The file's first comment line is its one-line description. A recipe is checked as DVC will
apply it: an unknown key or an impossible value is one line naming the recipe and the key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from vitcnn.errors import ConfigError, UserError
from vitcnn.overrides import flatten, leftover_text, leftovers, value_text, with_overrides

RECIPES = Path("recipes")
# Old names that still work for one release, each with a one-line notice: name -> its name now.
RENAMED = {"seed": "original"}
log = logging.getLogger(__name__)


class RecipeError(UserError):
    """An unknown recipe, or one that params.yaml cannot take."""


def available(folder: Path = RECIPES) -> dict[str, str]:
    """{name: one-line description} of every recipe in `folder`."""
    return {path.stem: _description(path) for path in sorted(folder.glob("*.yaml"))}


def overrides(name: str, folder: Path = RECIPES, params_path: Path = Path("params.yaml")) -> list[str]:
    """The recipe's keys as `key=value` overrides, checked against params.yaml."""
    if name in RENAMED and not (folder / f"{name}.yaml").is_file():
        log.warning("recipe '%s' is now called '%s'; the old name goes away in the next release", name, RENAMED[name])
        name = RENAMED[name]
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available(folder)) or f"none: {folder}/ has no .yaml files"
        raise RecipeError(f"unknown recipe '{name}'; known recipes: {known}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RecipeError(f"{path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: expected keys of params.yaml, got {tree!r}")
    sets = [f"{key}={value_text(value)}" for key, value in flatten(tree).items()]
    try:
        with_overrides(sets, params_path)
    except ConfigError as exc:
        raise RecipeError(f"recipe '{name}' ({path}): {exc}") from None
    return sets


def params_with(name: str, folder: Path = RECIPES, params_path: Path = Path("params.yaml")) -> Any:
    """The params of params.yaml with the recipe applied (as `dvc exp run $(vitcnn recipe NAME)` would)."""
    return with_overrides(overrides(name, folder, params_path), params_path)


def flags(name: str, folder: Path = RECIPES, from_workspace: bool = False) -> list[str]:
    """`-S key=value` for every key of the recipe, as separate arguments; and, unless `from_workspace`, for
    every other param the workspace's params.yaml holds at another value than the committed one (left there
    by an earlier `dvc exp run -S`), its committed value, so that the run starts from what is committed plus
    the recipe (a one-line notice names them)."""
    sets = overrides(name, folder)
    changed = {k: v for k, v in leftovers(folder.parent / "params.yaml").items()
               if k not in {o.split("=", 1)[0] for o in sets}}
    if changed and not from_workspace:
        log.warning("params.yaml holds %s, left by an earlier run: the recipe starts from the committed values "
                    "(--from-workspace keeps them)", leftover_text(changed))
        sets = [f"{k}={value_text(before)}" for k, (before, _) in changed.items()] + sets
    return [arg for override in sets for arg in ("-S", override)]


def _description(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""
