"""Running a study on DVC's experiment queue: queue each run, start workers, follow them.

Nothing here runs training itself: each run is `dvc exp run --queue -n <name> -S ...`,
`dvc queue start -j N` runs them (one at a time per worker, each in its own temporary
copy of the project), and every finished run is an ordinary DVC experiment that
`dvc exp show`, `dvc exp apply` and `dvc queue logs` know. The workers go on when this
process stops, so stopping it loses nothing.

DVC's queue is one per repository: its workers serve every study of the repository, in the
order runs were queued. Following a study also watches those workers: DVC shows a run whose
worker died as "Running" forever, so a run seen without a live worker is collected here with
DVC's own executor API when it has finished (or marked lost when it died with the worker),
and runs queued with no worker left end the waiting with one line instead of a hang.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vitcnn.errors import first_line
from vitcnn.study.grid import Run, StudyError, in_study

DONE = {"Success", "Failed"}  # DVC's queue states; the others are "Queued" and "Running"
POLL_S = 5.0
ORPHAN_POLLS = 2  # polls in a row a running task must lack a live worker before it counts as orphaned
AMBIGUOUS_S = 60.0  # ... or this long, while some worker of the repository lives (it may be setting the run up)
IDLE_POLLS = 3  # polls in a row with runs queued and no worker before the waiting gives up ...
IDLE_S = 120.0  # ... spanning this long: on a loaded machine a worker `dvc queue start` spawned takes a while to show


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
    """{experiment name: Queued | Running | Success | Failed} of every task DVC's queue knows, by the
    name's latest task: a run queued again is followed, not its earlier failure."""
    with open_repo(root) as repo:
        return latest_states(repo.experiments.celery_queue.status())


def latest_states(entries: list[dict[str, Any]]) -> dict[str, str]:
    """DVC's queue status entries -> {name: the status of its latest entry}. On a tie (queued in the
    same second) the state furthest along wins: Failed < Success < Queued < Running."""
    rank = {"Failed": 0, "Success": 1, "Queued": 2, "Running": 3}
    ordered = sorted((e for e in entries if e["name"]), key=lambda e: (e["timestamp"], rank.get(e["status"], 0)))
    return {entry["name"]: entry["status"] for entry in ordered}


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
    """Refuse a study name that has runs (finished or queued) already: NAME-<i>, exactly."""
    taken = sorted(name for name in experiment_names(root) if in_study(name, study))
    if taken:
        raise StudyError(f"a study named '{study}' exists already ({len(taken)} experiments, e.g. {taken[0]}); "
                         f"choose another --name, rerun its failed runs with `vitcnn study retry {study}`, "
                         f"or summarize it: vitcnn study summarize --name {study}")


def live_workers(root: Path = Path(".")) -> int:
    """DVC queue workers running for this repository (every study's)."""
    with open_repo(root) as repo:
        return len(repo.experiments.celery_queue.worker_status())


def submit(runs: list[Run], study: str, jobs: int, root: Path = Path(".")) -> None:
    """Queue every run, then start workers up to `jobs` for the repository."""
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
    start_workers(study, jobs, root)


def start_workers(study: str, jobs: int, root: Path = Path(".")) -> None:
    """`dvc queue start -j jobs`, saying so when the repository's queue has workers already: they
    are shared by every study of the repository, and -j counts them (DVC starts only the missing)."""
    running = live_workers(root)
    if running:
        more = max(0, jobs - running)
        print(f"study {study}: DVC's queue is one per repository and {running} of its workers run already "
              f"(another study's?); they take this study's runs after the runs queued before them, and "
              f"-j {jobs} counts them: {more} more started", file=sys.stderr)
    dvc("queue", "start", "-j", str(jobs), cwd=root)


def requeue(runs: list[Run], failed_revs: list[str], study: str, jobs: int, root: Path = Path(".")) -> None:
    """Queue `runs` again under their names, after removing their failed tasks from DVC's queue
    (so that `dvc exp show` lists the new runs, not the old failures), then start workers."""
    if failed_revs:
        dvc("queue", "remove", *failed_revs, cwd=root)
    submit(runs, study, jobs, root)


def failed_tasks(names: list[str], root: Path = Path(".")) -> dict[str, str]:
    """{name: stash rev} of each of `names` whose latest queue task failed."""
    with open_repo(root) as repo:
        entries = repo.experiments.celery_queue.status()
    latest = {e["name"]: e for e in sorted(entries, key=lambda e: e["timestamp"]) if e["name"] in names}
    return {name: e["rev"] for name, e in latest.items() if e["status"] == "Failed"}


@dataclass
class Waited:
    states: dict[str, str]  # name -> Success | Failed | Missing
    lost: dict[str, str] = field(default_factory=dict)  # name -> why: its worker died with it


def wait(names: list[str], study: str, root: Path = Path("."), poll_s: float = POLL_S,
         jobs: int | None = None, on_lost: Callable[[str, str], None] | None = None) -> Waited:
    """Follow the runs `names` until each has succeeded or failed; return their final states.

    Shows runs done, failed, running and left, with tqdm's estimate of the time left (from the
    runs that finish while it watches: runs finished before it started do not count). Ctrl-C
    stops the waiting only: the workers go on, and the message says how to come back to the
    study, or how to stop it. A run whose worker died is recovered or marked lost (`Watch`), and
    `on_lost(name, why)` hears of each lost one at once.
    """
    watch = Watch(study, set(names), jobs, on_lost)
    states: dict[str, str] = {}
    bar = None
    try:
        while True:
            with open_repo(root) as repo:
                queue = repo.experiments.celery_queue
                states = _states(queue, names)
                if any(s in ("Running", "Queued") for s in states.values()) and watch.check(queue, states):
                    states = _states(queue, names)  # after a recovery
            counts = Counter(states.values())
            finished = counts["Success"] + counts["Failed"] + counts["Missing"]
            if bar is None:  # the estimate counts only runs that finish from now on
                bar = tqdm(total=len(names), initial=finished, desc=study, unit="run", dynamic_ncols=True,
                           smoothing=0)
            bar.set_postfix(failed=counts["Failed"], running=counts["Running"], refresh=False)
            bar.update(finished - bar.n)
            if finished == len(names):
                return Waited(states, watch.lost)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        left = [name for name in names if states.get(name) not in DONE]
        raise StudyInterrupted(
            f"stopped waiting; {len(left)} runs of '{study}' go on in the background. Follow them again with "
            f"`vitcnn study wait {study}` (or `dvc queue status`), stop them with `dvc queue kill {' '.join(left)}`, "
            f"and summarize what has finished with `vitcnn study summarize --name {study}`"
        ) from None
    finally:
        if bar is not None:
            bar.close()


def _states(queue: Any, names: list[str]) -> dict[str, str]:
    known = latest_states(queue.status())
    return {name: known.get(name, "Missing") for name in names}


class Watch:
    """The queue workers behind a study's runs, checked at each poll.

    DVC marks a task done only from the worker that ran it: when that worker dies (`kill -9`, out
    of memory) the task stays "Running" with no worker, for ever, and a run that finished meanwhile
    stays in its temporary copy under .dvc/tmp/exps/. The evidence is the processes themselves:
    DVC's inspection of its workers (`worker_status`) misses busy workers on a loaded machine, so
    it only clears a task, never condemns one. A task its worker does not report is orphaned when
    its `dvc exp exec-run` runs on with no live worker as its parent (it is left to finish), or
    when no executor runs and no worker process of the repository is alive (for ORPHAN_POLLS
    polls), or some is but the task has stayed so for AMBIGUOUS_S (a live worker sets a run up
    or collects it within seconds). An orphan's finished result is collected as DVC's worker
    would have (`collect_executor`, the task marked done, the copy cleaned up); one that died
    unfinished is marked failed in DVC's queue, and lost here.
    """

    def __init__(self, study: str, names: set[str], jobs: int | None,
                 on_lost: Callable[[str, str], None] | None = None):
        self.study, self.names, self.jobs, self.on_lost = study, names, jobs, on_lost
        self.suspects: dict[str, tuple[int, float]] = {}  # task id -> (polls in a row unreported, since when)
        self.told: set[str] = set()
        self.idle = 0  # polls in a row with runs queued and no worker
        self.idle_since = 0.0
        self.lost: dict[str, str] = {}

    def check(self, queue: Any, states: dict[str, str]) -> bool:
        """Look for orphaned runs and recover them; True when the queue's states changed."""
        reported = {task["id"] for tasks in queue.worker_status().values() for task in tasks}
        workers = worker_pids(queue)
        changed = False
        suspects = {}
        for result, entry in queue._iter_active_tasks():  # DVC's own: tasks taken by a worker, not done
            if entry.name not in self.names or result.id in reported:
                continue
            polls, since = self.suspects.get(result.id, (0, time.monotonic()))
            suspects[result.id] = (polls + 1, since)
            process = queue.proc.get(entry.stash_rev)
            executor = process.pid if process is not None and _alive(process.pid) else None
            if executor is not None:
                if _parent(executor) not in workers:
                    self._unsupervised(entry.name)
                continue
            waited = time.monotonic() - since
            if polls + 1 >= ORPHAN_POLLS and (not workers or waited >= AMBIGUOUS_S):
                changed |= self._orphan(queue, result.id, entry)
        self.suspects = suspects
        queued = sum(state == "Queued" for state in states.values())
        running = any(state == "Running" for state in states.values())  # an orphan still to collect, say
        self.idle = self.idle + 1 if queued and not workers and not running else 0
        if self.idle == 1:
            self.idle_since = time.monotonic()
        if self.idle >= IDLE_POLLS and time.monotonic() - self.idle_since >= IDLE_S:
            raise StudyError(f"{queued} runs of '{self.study}' are queued and no DVC queue worker is running "
                             f"(stopped, or killed?): start workers with `dvc queue start -j {self.jobs or 1}`, "
                             f"then follow them with `vitcnn study wait {self.study}`")
        return changed

    def _unsupervised(self, name: str) -> None:
        if name not in self.told:
            self.told.add(name)
            tqdm.write(f"{name}: its DVC queue worker died; the run goes on without it, and is collected here "
                       "when it ends", file=sys.stderr)

    def _orphan(self, queue: Any, task_id: str, entry: Any) -> bool:
        """Recover one orphaned run whose executor has ended; True when done (collected, or lost)."""
        from dvc.repo.experiments.executor.base import ExecutorInfo, TaskStatus
        from dvc.repo.experiments.executor.local import TempDirExecutor
        from dvc.repo.experiments.queue.base import BaseStashQueue

        name = entry.name
        infofile = queue.get_infofile_path(entry.stash_rev)
        try:
            info = ExecutorInfo.load_json(infofile)
        except (OSError, ValueError, TypeError):
            info = None
        result = info.result if info is not None and info.status in (TaskStatus.SUCCESS, TaskStatus.FINISHED) else None
        executor = TempDirExecutor.from_info(info) if info is not None and Path(info.root_dir).is_dir() else None
        if result is not None and result.ref_info is not None and executor is not None:
            BaseStashQueue.collect_executor(queue.repo.experiments, executor, result)
            tqdm.write(f"{name}: its DVC queue worker died after the run finished; its result is collected "
                       "(an experiment, as the worker would have made it)", file=sys.stderr)
        elif info is not None and info.status == TaskStatus.FAILED:  # it failed on its own: its log says why
            queue.stash_failed(entry)
        else:
            queue.stash_failed(entry)
            self.lost[name] = ("lost: its DVC queue worker died, and the run with it; rerun it with "
                               f"`vitcnn study retry {self.study}`")
            tqdm.write(f"{name}: {self.lost[name]}", file=sys.stderr)
            if self.on_lost:
                self.on_lost(name, self.lost[name])
        queue.celery.backend.mark_as_done(task_id, None)
        if executor is not None:
            executor.cleanup(infofile)
        return True


def worker_pids(queue: Any) -> set[int]:
    """The live `dvc exp queue-worker` processes of this repository's queue, from the process files
    DVC keeps for them (.dvc/tmp/exps/celery/dvc-exp-worker-<n>.json)."""
    import psutil
    from dvc_task.proc.process import ProcessInfo

    pids = set()
    for info in Path(queue.wdir).glob("dvc-exp-worker-*.json"):
        try:
            pid = ProcessInfo.load(str(info)).pid
            if _alive(pid) and "queue-worker" in " ".join(psutil.Process(pid).cmdline()):
                pids.add(pid)
        except (OSError, ValueError, TypeError, KeyError, psutil.Error):  # a worker's file half-written, or gone
            continue
    return pids


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _parent(pid: int) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


class StudyInterrupted(StudyError):
    """Ctrl-C (or SIGTERM) while queueing or waiting: what is queued goes on; the message says what to do next."""

    exit_code = 130
