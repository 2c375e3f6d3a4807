"""params.yaml overrides in `dvc exp run -S` syntax (`vit.depth=8`): writing them, and checking them
before any work is queued, exactly as DVC will apply them (DVC's own override function)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from vitcnn.config import check_key, load_params
from vitcnn.errors import ConfigError, first_line

PARAMS_FILE = "params.yaml"
_BARE = re.compile(r"[A-Za-z0-9_./:+-]+")  # a string DVC's override grammar reads without quotes


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"vit": {"depth": 6}} -> {"vit.depth": 6}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def value_text(value: Any) -> str:
    """A value as `-S key=<value>` reads it back: true, null, 0.001, [64,128], 'a string'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in ("true", "false", "null"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def with_overrides(overrides: list[str], params_path: Path = Path(PARAMS_FILE)) -> Any:
    """The params of params.yaml with `overrides` applied as DVC applies them; ConfigError if invalid."""
    from dvc.utils.hydra import apply_overrides, to_hydra_overrides

    if not params_path.is_file():
        raise ConfigError(f"{params_path}: not found; run this from the project's root")
    try:
        parsed = to_hydra_overrides(list(overrides))
    except Exception as exc:  # hydra's grammar errors: several types, each with a readable first line
        raise ConfigError(first_line(exc)) from None
    for override in parsed:
        check_key(override.key_or_group)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / PARAMS_FILE
        shutil.copyfile(params_path, copy)
        try:
            apply_overrides(copy, list(overrides))
        except Exception as exc:  # DVC's own refusal of a value, e.g. a type hydra cannot merge
            raise ConfigError(first_line(exc)) from None
        return load_params(copy)


def leftovers(params_path: Path = Path(PARAMS_FILE)) -> dict[str, tuple[Any, Any]]:
    """{key: (committed value, value now)} of every param whose value in the workspace's params.yaml differs from
    the committed one (HEAD's): what an earlier `dvc exp run -S` left there (DVC applies an experiment's params to
    the workspace). Empty outside a Git repository or before the first commit."""
    import yaml

    done = subprocess.run(["git", "show", f"HEAD:./{params_path.name}"], cwd=params_path.resolve().parent,
                          capture_output=True, text=True)
    if done.returncode != 0 or not params_path.is_file():
        return {}
    committed = flatten(yaml.safe_load(done.stdout) or {})
    now = flatten(yaml.safe_load(params_path.read_text()) or {})
    return {k: (committed[k], now[k]) for k in now if k in committed and committed[k] != now[k]}


def leftover_text(changed: dict[str, tuple[Any, Any]]) -> str:
    """'vit.depth=8 (committed: 6), train.lr=0.001 (committed: 0.0003)'."""
    return ", ".join(f"{k}={value_text(now)} (committed: {value_text(before)})" for k, (before, now) in changed.items())
