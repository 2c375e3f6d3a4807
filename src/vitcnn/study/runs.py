"""A study's runs as one CSV (`runs.csv`): every experiment with its params and metrics, so that the
summary, its statistics and its figures can be computed again offline, by anyone, from the file
alone (`vitcnn study summarize --from studies/NAME/runs.csv`).

One row per experiment (`name, rev, commit, state, timestamp, error`), then the params that
matter to the summary — `seed` and `data.split_seed` (the summary says whether the runs share a
split), and every param whose value differs between the runs or from
their commit's params.yaml; the others are the same everywhere and leave the groups as they are
— then every metric as `<model>:<metric>` (a colon, which no param key has). Each commit the runs came from has a row too
(`state` = `baseline`) with its params.yaml's values of those params, which tell what the study
set with `-S`. Params are written as JSON (lists, booleans and strings survive), metrics as
Python writes a float (read back bit for bit).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from vitcnn.errors import UserError
from vitcnn.study.experiments import Baseline, Experiment

FIXED = ["name", "rev", "commit", "state", "timestamp", "error"]
BASELINE = "baseline"  # the state of a row that holds a commit's params.yaml, not a run
ALWAYS = ("seed", "data.split_seed")  # written whatever their values: the summary reads them
SEP = ":"  # between model and metric in a metric column's name


class RunsFileError(UserError):
    """A runs.csv that cannot be read back."""


def to_csv(experiments: list[Experiment], baselines: list[Baseline]) -> str:
    """runs.csv: the experiments, and the commits they came from (as far as `baselines` knows them)."""
    used = {e.baseline for e in experiments}
    commits = [b for b in baselines if b.rev in used]
    params = _params_that_matter(experiments, commits)
    metrics = sorted({f"{model}{SEP}{metric}" for e in experiments for model, values in e.metrics.items()
                      for metric in values}, key=_metric_order(experiments))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*FIXED, *params, *metrics])
    for b in commits:
        writer.writerow([b.name, b.rev, b.rev, BASELINE, "", "", *(_param_text(b.params, k) for k in params),
                         *[""] * len(metrics)])
    for e in sorted(experiments, key=lambda e: (e.timestamp, e.name)):
        values = [e.metrics.get(m.split(SEP)[0], {}).get(m.split(SEP)[1]) for m in metrics]
        writer.writerow([e.name, e.rev, e.baseline, e.state, e.timestamp, e.error,
                         *(_param_text(e.params, k) for k in params), *("" if v is None else repr(v) for v in values)])
    return buf.getvalue()


def read(path: Path) -> tuple[list[Experiment], list[Baseline]]:
    """The experiments and commits of a runs.csv, as `experiments.load` returns them from DVC."""
    if not path.is_file():
        raise RunsFileError(f"{path}: not found; a study's folder holds runs.csv once it has been summarized")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or any(key not in rows[0] for key in FIXED):
        raise RunsFileError(f"{path}: not a runs.csv (expected the columns {', '.join(FIXED)}, then params and "
                            f"<model>{SEP}<metric> columns)")
    columns = list(rows[0])[len(FIXED):]
    params = [c for c in columns if SEP not in c]
    metrics = [c for c in columns if SEP in c]
    experiments, baselines = [], []
    for line, row in enumerate(rows, start=2):
        try:
            values = {k: json.loads(row[k]) for k in params if row[k] != ""}
            measured: dict[str, dict[str, float]] = {}
            for column in metrics:
                if row[column] != "":
                    model, metric = column.split(SEP)
                    measured.setdefault(model, {})[metric] = float(row[column])
        except ValueError as exc:
            raise RunsFileError(f"{path}, line {line}: unreadable value ({exc})") from None
        if row["state"] == BASELINE:
            baselines.append(Baseline(row["rev"], row["name"], values))
        else:
            experiments.append(Experiment(name=row["name"], rev=row["rev"], baseline=row["commit"], state=row["state"],
                                          timestamp=row["timestamp"], params=values, metrics=measured,
                                          error=row["error"]))
    return experiments, baselines


def write(path: Path, experiments: list[Experiment], baselines: list[Baseline]) -> None:
    from vitcnn.io import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(to_csv(experiments, baselines))


def _params_that_matter(experiments: list[Experiment], baselines: list[Baseline]) -> list[str]:
    """`ALWAYS`, then every param (in params.yaml's order) that differs between runs or from a commit's value."""
    base = {b.rev: b.params for b in baselines}
    keys: list[str] = []
    for e in experiments:
        keys += [k for k in e.params if k not in keys]
    texts = {k: {json.dumps(e.params.get(k), sort_keys=True) for e in experiments} for k in keys}
    differ = [k for k in keys if k not in ALWAYS and (len(texts[k]) > 1 or any(
        e.baseline in base and base[e.baseline].get(k) != e.params.get(k) for e in experiments))]
    return [k for k in ALWAYS if k in keys] + differ


def _param_text(params: dict[str, Any], key: str) -> str:
    return json.dumps(params[key]) if key in params else ""


def _metric_order(experiments: list[Experiment]):
    """Models in the order the experiments list them, metrics in the order the pipeline writes them."""
    models: list[str] = []
    metrics: list[str] = []
    for e in experiments:
        models += [m for m in e.metrics if m not in models]
        metrics += [k for values in e.metrics.values() for k in values if k not in metrics]
    return lambda column: (models.index(column.split(SEP)[0]), metrics.index(column.split(SEP)[1]))

