"""What a study runs: a grid of params.yaml overrides times seeds, checked before anything is queued.

Overrides are DVC's own `-S` syntax (`key=value`, `key=a,b,c`, `key=range(0,3)`,
`key=choice(...)`), expanded by DVC's own sweep parser, so a grid means here what it
means to `dvc exp run --queue -S`. Each expanded run is then applied to a copy of
params.yaml with DVC's own override function and validated as a stage would validate
it, so a typo or an impossible value stops the study with one line before any run is
queued, not in the middle of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vitcnn.config import check_key
from vitcnn.errors import ConfigError, UserError, first_line
from vitcnn.overrides import PARAMS_FILE, flatten, with_overrides

# The param each kind of study varies, and the flag that sets it (seeds vary in every kind).
AXES = {"seeds": None, "data": ("data.subset", "--subsets"), "budget": ("train.epochs", "--epochs"), "sweep": None}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a valid git ref and DVC experiment name


class StudyError(UserError):
    """A study that cannot be queued, run or summarized as asked."""


@dataclass(frozen=True)
class Run:
    """One experiment of a study: its DVC name and its `-S` overrides (the seed's among them)."""

    name: str
    seed: int
    overrides: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict, compare=False)  # params.yaml as the run sees it, flattened


def in_study(name: str, study: str) -> bool:
    """Whether experiment `name` is a run of `study`: exactly `<study>-<integer>`, so that study v3
    takes neither v3b-0 nor v3-0-old (nor a hand-run v3-best)."""
    return re.fullmatch(re.escape(study) + r"-\d+", name) is not None


def parse_counts(text: str, flag: str, what: str) -> list[int]:
    """'1000,5000' -> [1000, 5000]: positive integers, or a one-line error naming `flag`."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise StudyError(f"{flag}: {item or text!r} is not allowed; give {what} as integers >= 1, "
                             "separated by commas")
        values.append(int(item))
    if len(set(values)) != len(values):
        raise StudyError(f"{flag}: {text!r} repeats a value; give each one once")
    return values


def plan(kind: str, name: str, seeds: int, axis_values: list[int], overrides: list[str],
         params_path: Path = Path(PARAMS_FILE)) -> list[Run]:
    """Every run of a study, seed by seed (so that stopping early leaves whole seeds), all validated."""
    if not NAME_PATTERN.fullmatch(name):
        raise StudyError(f"--name: {name!r} is not allowed; use letters, digits, '-', '_' and '.', "
                         "starting with a letter or digit (at most 64)")
    if seeds < 1:
        raise StudyError(f"--seeds: {seeds} is not allowed; use an integer >= 1")
    axis = AXES[kind]
    set_by_study = {"seed": "--seeds", **({axis[0]: axis[1]} if axis else {})}
    points = [list(point) for point in expand(overrides, set_by_study)]
    if axis:
        points = [[*point, f"{axis[0]}={value}"] for value in axis_values for point in points]
    grid = [(seed, [*point, f"seed={seed}"]) for seed in range(seeds) for point in points]
    width = len(str(len(grid) - 1))
    runs = [Run(f"{name}-{i:0{width}d}", seed, tuple(point)) for i, (seed, point) in enumerate(grid)]
    return validate(runs, params_path)


def expand(overrides: list[str], set_by_study: dict[str, str]) -> list[tuple[str, ...]]:
    """The grid of `-S` overrides as DVC expands it: one tuple of single-value overrides per point."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides

    if not overrides:
        return [()]
    by_file = to_path_overrides(overrides)
    others = sorted(set(by_file) - {PARAMS_FILE})
    if others:
        raise StudyError(f"-S {others[0]}:...: only {PARAMS_FILE} keys can be set here")
    try:
        parsed = to_hydra_overrides(by_file[PARAMS_FILE])
        sweeps = get_hydra_sweeps(by_file)
    except Exception as exc:  # hydra's grammar errors: several types, each with a readable first line
        raise StudyError(f"-S: {first_line(exc)}") from None
    for override in parsed:
        key = override.key_or_group
        if key in set_by_study:
            raise StudyError(f"-S {override.input_line}: {key} is set by the study ({set_by_study[key]}); "
                             "leave it out of -S")
        try:
            check_key(key)
        except ConfigError as exc:
            raise StudyError(f"-S {override.input_line}: {exc}") from None
    return [tuple(sweep[PARAMS_FILE]) for sweep in sweeps]


def validate(runs: list[Run], params_path: Path) -> list[Run]:
    """Apply each run's overrides to a copy of params.yaml as DVC will, and validate the result;
    the runs with their params."""
    from vitcnn.config import params_dict

    checked = []
    for run in runs:
        try:
            params = with_overrides(list(run.overrides), params_path)
        except ConfigError as exc:
            raise StudyError(f"run {run.name} ({' '.join(run.overrides)}): {exc}") from None
        checked.append(replace(run, params=flatten(params_dict(params))))
    return checked
