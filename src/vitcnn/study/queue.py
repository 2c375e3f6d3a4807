"""Running a study on DVC's experiment queue: queue each run, start workers, follow them.

Nothing here runs training itself: each run is `dvc exp run --queue -n <name> -S ...`,
`dvc queue start -j N` runs them (one at a time per worker, each in its own temporary
copy of the project), and every finished run is an ordinary DVC experiment that
`dvc exp show`, `dvc exp apply` and `dvc queue logs` know. The workers go on when this
process stops, so stopping it loses nothing.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vitcnn.errors import first_line
from vitcnn.study.grid import Run, StudyError

DONE = {"Success", "Failed"}  # DVC's queue states; the others are "Queued" and "Running"
POLL_S = 5.0


def dvc(*args: str, cwd: Path = Path(".")) -> str:
    """Run the dvc command line (of this Python's environment) and return its output; a failure
    becomes one line.

    The output goes through a file, not a pipe: `dvc queue start` leaves workers running that
    inherit its output, and reading a pipe to its end would wait for them to finish.
    """
    with tempfile.TemporaryFile(mode="w+") as output:
        code = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, stdout=output,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        output.seek(0)
        text = output.read()
    if code != 0:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = next((line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR")), lines[-1] if lines else "")
        raise StudyError(f"dvc {' '.join(args[:2])} failed: {reason}")
    return text


@contextlib.contextmanager
def open_repo(root: Path) -> Iterator[Any]:
    """DVC's Repo at `root`; DVC's own errors (not a DVC repository, no commit yet) become one line."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            yield repo
    except DvcException as exc:
        raise StudyError(f"{root.resolve()}: {first_line(exc)}") from None


def queue_statuses(root: Path = Path(".")) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} of every task DVC's queue knows."""
    with open_repo(root) as repo:
        return {entry["name"]: entry["status"] for entry in repo.experiments.celery_queue.status() if entry["name"]}


def experiment_names(root: Path = Path(".")) -> set[str]:
    """Names of every experiment of the repository (any commit) and of every queued task."""
    with open_repo(root) as repo:
        done = {name for exps in repo.experiments.ls(all_commits=True).values() for name, _ in exps}
    return done | set(queue_statuses(root))


def default_jobs() -> int:
    """One queue worker per visible GPU (each run then takes a GPU of its own), else one."""
    import torch

    return max(1, torch.cuda.device_count())


def check_new(study: str, root: Path = Path(".")) -> None:
    """Refuse a study name that experiments (finished or queued) already start with."""
    taken = sorted(name for name in experiment_names(root) if name.startswith(f"{study}-"))
    if taken:
        raise StudyError(f"a study named '{study}' exists already ({len(taken)} experiments, e.g. {taken[0]}); "
                         f"choose another --name, or summarize it: vitcnn study summarize --name {study}")


def submit(runs: list[Run], study: str, jobs: int, root: Path = Path(".")) -> None:
    """Queue every run, then start `jobs` workers."""
    queued: list[str] = []
    try:
        for run in tqdm(runs, desc=f"queueing {study}", unit="run", leave=False):
            dvc("exp", "run", "--queue", "-n", run.name, *[arg for o in run.overrides for arg in ("-S", o)], cwd=root)
            queued.append(run.name)
    except KeyboardInterrupt:
        raise StudyInterrupted(
            f"stopped while queueing: {len(queued)} of {len(runs)} runs of '{study}' are queued, none started; "
            f"run them with `dvc queue start`, or remove them with `dvc queue remove {' '.join(queued)}`"
        ) from None
    dvc("queue", "start", "-j", str(jobs), cwd=root)


def wait(names: list[str], study: str, root: Path = Path("."), poll_s: float = POLL_S) -> dict[str, str]:
    """Follow the runs `names` until each has succeeded or failed; return their final states.

    Shows runs done, failed, running and left, with tqdm's estimate of the time left. Ctrl-C
    stops the waiting only: the workers go on, and the message says how to come back to the
    study, or how to stop it.
    """
    known: dict[str, str] = {}
    try:
        with tqdm(total=len(names), desc=study, unit="run", dynamic_ncols=True, smoothing=0) as bar:  # ETA from the mean run time
            while True:
                known = queue_statuses(root)
                states = {name: known.get(name, "Missing") for name in names}
                counts = Counter(states.values())
                finished = counts["Success"] + counts["Failed"] + counts["Missing"]
                bar.set_postfix(failed=counts["Failed"], running=counts["Running"], refresh=False)
                bar.update(finished - bar.n)
                if finished == len(names):
                    return states
                time.sleep(poll_s)
    except KeyboardInterrupt:
        left = [name for name in names if known.get(name) not in DONE]
        raise StudyInterrupted(
            f"stopped waiting; {len(left)} runs of '{study}' go on in the background. Follow them again with "
            f"`vitcnn study wait {study}` (or `dvc queue status`), stop them with `dvc queue kill {' '.join(left)}`, "
            f"and summarize what has finished with `vitcnn study summarize --name {study}`"
        ) from None


class StudyInterrupted(StudyError):
    """Ctrl-C while queueing or waiting: what is queued goes on; the message says what to do next."""

    exit_code = 130
