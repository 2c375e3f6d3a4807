"""A study's record: what was launched and what became of the runs DVC cannot tell about.

`vitcnn study run` writes `.dvc/tmp/vitcnn-studies/<name>.json` (local state beside DVC's own
queue, ignored by git): the study's commit, where its runs run (DVC's queue or a Dask cluster),
and each run's name, `-S` overrides and params. `wait`, `retry` and `summarize` read it after the
process that started the study has gone. DVC knows every successful run (an experiment) and
every failed queued one; the record adds what DVC never sees: a cluster run that failed (it made
no experiment), a run lost with its worker or cluster, and why.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from vitcnn.errors import UserError
from vitcnn.study.experiments import Experiment

RECORDS = Path(".dvc") / "tmp" / "vitcnn-studies"
QUEUE = "queue"  # the backend of a study on DVC's own queue; otherwise a cluster spec (local:2, tcp://..., slurm)
PENDING, SUCCESS, FAILED, LOST = "pending", "success", "failed", "lost"


class RecordError(UserError):
    """A study's record that is missing or unreadable."""


@dataclass
class RunRecord:
    name: str
    seed: int
    overrides: list[str]  # dvc exp run -S, as run (a cluster run's data.source made absolute)
    params: dict[str, Any]  # the run's params.yaml, flattened: a run that made no experiment is listed with them
    state: str = PENDING  # pending (queued, submitted or running) | success | failed | lost
    error: str = ""  # why it failed or was lost, in one line
    updated: str = ""  # when the state last changed


@dataclass
class StudyRecord:
    name: str
    kind: str
    commit: str  # the commit every run starts from
    backend: str  # QUEUE, or the cluster spec it ran on
    jobs: int  # queue workers, or jobqueue jobs
    runs: list[RunRecord]
    git_remote: str = ""  # a cluster's runs are cloned from and pushed to it (a URL or a path)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)  # the process a local or jobqueue cluster lives and dies with
    created: str = field(default_factory=lambda: now())

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    def run(self, name: str) -> RunRecord:
        return next(r for r in self.runs if r.name == name)

    def mark(self, name: str, state: str, error: str = "") -> None:
        run = self.run(name)
        run.state, run.error, run.updated = state, error, now()

    def owner_alive(self) -> bool:
        """Whether the process that started this study (and owns its local cluster) still runs here."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: alive
            return True
        return self.pid != os.getpid()

    def save(self, root: Path = Path(".")) -> Path:
        from vitcnn.io import atomic_write

        path = root / RECORDS / f"{self.name}.json"
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def load(name: str, root: Path = Path(".")) -> StudyRecord | None:
    """The record of study `name`, or None if this repository has none (a study from before records)."""
    path = root / RECORDS / f"{name}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        runs = [RunRecord(**run) for run in data.pop("runs")]
        return StudyRecord(**data, runs=runs)
    except (ValueError, TypeError, KeyError) as exc:
        raise RecordError(f"{path}: unreadable study record ({exc}); delete it to start the study afresh") from None


def load_all(root: Path = Path(".")) -> list[StudyRecord]:
    folder = root / RECORDS
    return [r for p in sorted(folder.glob("*.json")) if (r := load(p.stem, root))] if folder.is_dir() else []


def merge(found: list[Experiment], records: list[StudyRecord]) -> list[Experiment]:
    """DVC's experiments with what the records add: each run that failed or was lost without
    leaving an experiment DVC knows (a cluster's), and the reason for a lost queued run, which DVC
    lists only as "Experiment run failed"."""
    known = {(e.baseline, e.name): e for e in found}
    added = []
    for record in records:
        for run in record.runs:
            experiment = known.get((record.commit, run.name))
            if experiment is not None:
                if experiment.state == "failed" and run.state == LOST and run.error:
                    experiment.error = run.error
                continue
            if run.state in (FAILED, LOST) or (run.state == PENDING and record.backend != QUEUE):
                state = "failed" if run.state == LOST else run.state  # listed with its reason, like a failure
                added.append(Experiment(name=run.name, rev="", baseline=record.commit, state=state,
                                        timestamp=run.updated or record.created, params=dict(run.params),
                                        error=run.error))
    return found + added
