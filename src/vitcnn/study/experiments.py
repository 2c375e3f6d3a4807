"""The experiments DVC knows, read from `dvc exp show --json`: params, metrics, state, error.

Each experiment becomes an `Experiment` with its params flattened to dotted keys
(`vit.depth`), its per-model metrics gathered from the pipeline's metrics files, its
state (success, failed, running, queued) and, for a failed one, the last error line of
its log (the stage's own `<stage>: error: ...` line where there is one).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitcnn import paths
from vitcnn.overrides import flatten
from vitcnn.study.queue import dvc

# The metrics files as `dvc exp show --json` names them (paths relative to the project, with /).
EVALUATE_METRICS = paths.EVALUATE.as_posix()  # {model: {test_acc, train_time_s, ...}}
ROBUSTNESS_METRICS = paths.ROBUSTNESS.as_posix()  # {model: {corruption_acc, ece, ...}}
TRAIN_METRICS = paths.train_metrics("{model}").as_posix()  # {train_images_per_s, ...}
# The metrics a study summarizes, per model, and the file each comes from.
SUMMARIZED = {"test_acc": EVALUATE_METRICS, "train_time_s": EVALUATE_METRICS, "train_images_per_s": TRAIN_METRICS,
              "corruption_acc": ROBUSTNESS_METRICS, "ece": ROBUSTNESS_METRICS, "ece_ts": ROBUSTNESS_METRICS}
CHANCE = "above_chance"  # robustness: 1 when the model is clearly above chance on the test split, else 0
STAGE_ERROR = re.compile(r"^\S+: error: ")
KILLED = re.compile(r"exited with -(\d+)\s*$")  # DVC's words for a stage that a signal ended


@dataclass
class Experiment:
    name: str
    rev: str
    baseline: str  # the commit it was run from
    state: str  # success | failed | running | queued
    timestamp: str
    params: dict[str, Any]  # params.yaml, flattened: {"vit.depth": 6, ...}
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # {model: {metric: value}}
    error: str = ""  # why a failed experiment failed, in one line


@dataclass
class Baseline:
    rev: str
    name: str  # branch or tag, else the short hash
    params: dict[str, Any]


def load(all_commits: bool = False, root: Path = Path(".")) -> tuple[list[Experiment], list[Baseline]]:
    """Every experiment of the current commit (or of all commits) and the commits they came from."""
    shown = json.loads(dvc("exp", "show", "--json", *(["--all-commits"] if all_commits else []), cwd=root))
    return parse(shown)


def latest(experiments: list[Experiment]) -> list[Experiment]:
    """One entry per name and commit, the latest: a run queued again (a retry, or by hand) replaces
    its earlier failure. On a tie a finished success wins, then a run still going, then a failure."""
    rank = {"failed": 0, "queued": 1, "running": 2, "success": 3}
    newest: dict[tuple[str, str], Experiment] = {}
    for e in sorted(experiments, key=lambda e: (e.timestamp, rank.get(e.state, 1))):
        newest[(e.baseline, e.name)] = e
    return [e for e in experiments if newest[(e.baseline, e.name)] is e]


def parse(shown: list[dict]) -> tuple[list[Experiment], list[Baseline]]:
    """`dvc exp show --json` output -> experiments and baselines (the workspace row is neither)."""
    experiments, baselines = [], []
    for row in shown:
        if row["rev"] == "workspace":
            continue
        baselines.append(Baseline(row["rev"], row.get("name") or row["rev"][:7], _params(row.get("data") or {})))
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs") or []:  # one rev per experiment (several for a checkpoint series)
                experiments.append(_experiment(exp, rev, baseline=row["rev"]))
    return experiments, baselines


def _experiment(exp: dict, rev: dict, baseline: str) -> Experiment:
    data = rev.get("data") or {}
    executor = exp.get("executor") or {}
    metrics = _metrics(data.get("metrics") or {})
    if executor.get("state"):
        state = executor["state"]
    else:  # a finished experiment whose queue entry is gone
        state = "failed" if rev.get("error") else "success"
    error = ""
    if state == "failed":
        local = executor.get("local") or {}
        error = last_error(Path(local["log"])) if local.get("log") else ""
        killed = signal_name(-(local.get("returncode") or 0))
        error = error or (f"killed by {killed}" if killed else "") or (rev.get("error") or {}).get("msg") \
            or "failed (no log)"
    elif state == "success" and not metrics:
        state, error = "failed", f"finished without {EVALUATE_METRICS}"
    return Experiment(name=exp.get("name") or rev.get("name") or rev["rev"][:7], rev=rev["rev"], baseline=baseline,
                      state=state, timestamp=data.get("timestamp") or "", params=_params(data), metrics=metrics,
                      error=error)


def _params(data: dict) -> dict[str, Any]:
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    return flatten(params)


def _metrics(files: dict) -> dict[str, dict[str, float]]:
    evaluate = (files.get(EVALUATE_METRICS) or {}).get("data") or {}
    metrics = {}
    for model, values in evaluate.items():
        if not isinstance(values, dict):
            continue
        train = (files.get(TRAIN_METRICS.format(model=model)) or {}).get("data") or {}
        robust = ((files.get(ROBUSTNESS_METRICS) or {}).get("data") or {}).get(model) or {}
        sources = {EVALUATE_METRICS: values, TRAIN_METRICS: train, ROBUSTNESS_METRICS: robust}
        metrics[model] = {metric: float(sources[file][metric]) for metric, file in SUMMARIZED.items()
                          if isinstance(sources[file].get(metric), (int, float))}
        if isinstance(robust.get(CHANCE), bool):
            metrics[model][CHANCE] = float(robust[CHANCE])
    return metrics


def last_error(log: Path) -> str:
    """The stage's own error line in a run's log, else DVC's last ERROR line (naming the signal when
    a stage was killed: "exited with -9" is SIGKILL, most often the kernel's out-of-memory killer)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    ours = [line for line in lines if STAGE_ERROR.match(line)]
    theirs = [line for line in lines if line.startswith("ERROR")]
    line = (ours or theirs or [""])[-1]
    killed = KILLED.search(line)
    if killed and signal_name(int(killed.group(1))):
        line += f" (killed by {signal_name(int(killed.group(1)))}: out of memory, or stopped by hand?)"
    return line


def signal_name(number: int) -> str:
    """SIGKILL for 9; "" for 0 or a number that is no signal."""
    import signal

    try:
        return signal.Signals(number).name if number > 0 else ""
    except ValueError:
        return ""
