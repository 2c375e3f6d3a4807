"""One run of a study on a Dask worker: the project cloned at the study's commit, `dvc exp run`
there, the experiment pushed back. Also the `prepare` of each data split, once, for the runs.

The functions here run in a worker's process (Dask imports them by name, so a worker needs
vitcnn, DVC and torch installed, as the stages do) and talk to no scheduler: a run is

    git clone REMOTE; git checkout COMMIT            (a folder of its own under the worker's TMPDIR)
    dvc exp run -n STUDY-I -S ...                    (through `supervise`, so it dies with the worker)
    dvc exp push REMOTE STUDY-I                      (model files too where the project has a DVC remote)

and it is idempotent: an experiment of that name already on the remote is not run again, so a
task that Dask runs a second time (its worker was lost after the push, or two attempts raced)
ends with the experiment exactly once. A run that fails returns its one-line reason instead of
raising, so that Dask does not run it again; only git failing to reach the remote raises
(`TransientError`), which Dask's `retries` retry.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vitcnn.errors import first_line

SUCCESS, FAILED = "success", "failed"
PUSH_ATTEMPTS = 3
PUSH_BACKOFF_S = 5.0
GIT_TIMEOUT_S = 300


class TransientError(Exception):
    """Git could not clone from or push to the remote (network, server): worth running again."""


@dataclass(frozen=True)
class Job:
    """Everything a worker needs for one run (or one split's prepare), picklable and explicit."""

    study: str
    name: str  # the experiment's name, <study>-<i> (for a prepare: <study>-prepare-<k>)
    overrides: tuple[str, ...]  # dvc exp run -S
    git_remote: str  # cloned from, pushed to: a URL or a path every worker can reach
    commit: str
    cache_dir: str = ""  # a DVC cache every worker shares; "" = the clone's own (or what the project's config says)
    downloads: str = ""  # the project's download cache, where the workers share its filesystem
    push_cache: bool = False  # the project has a DVC remote: model files are pushed there too
    own_gpu: bool = False  # the worker owns the first GPU it sees (one worker per GPU): the run sees only that
    # The variables Dask's nanny sets in every worker (OMP_NUM_THREADS=1, ...: one thread per task) as the
    # run should have them instead, None for unset: a run uses the cores a queued run would.
    environ: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    name: str
    state: str  # success | failed
    error: str = ""  # why it failed, in one line
    note: str = ""  # e.g. that an earlier attempt had pushed it
    host: str = ""
    seconds: float = 0.0
    log: str = ""  # HOST:PATH of a failed run's whole log, kept on the worker


def run_experiment(job: Job, prepared: Outcome | None = None) -> Outcome:
    """Run `job` as an experiment and push it to the remote, unless the remote has it already.

    `prepared` is its split's prepare (a Dask dependency, so that prepare runs once and every run
    takes its output from DVC's run cache); a split that failed to prepare fails its runs at once.
    """
    start = time.monotonic()

    def outcome(state: str, error: str = "", note: str = "", kept: str = "") -> Outcome:
        kept = kept or (_where(log) if state == FAILED and log.exists() else "")
        return Outcome(job.name, state, error, note, socket.gethostname(), time.monotonic() - start, kept)

    folder, log = workspace(job)
    if pushed(job):
        return outcome(SUCCESS, note="on the remote already (an earlier attempt pushed it)")
    if prepared is not None and prepared.state == FAILED:
        return outcome(FAILED, prepared.error, kept=prepared.log)
    try:
        clone(job, folder)
        flags = [arg for o in job.overrides for arg in ("-S", o)]
        code = supervised([sys.executable, "-m", "dvc", "exp", "run", "-n", job.name, *flags], folder, log,
                          run_env(job.own_gpu, job.environ))
        if code != 0:
            return outcome(FAILED, failure(log, code))
        note = push(job, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    log.unlink(missing_ok=True)
    return outcome(SUCCESS, note=note)


def prepare_data(job: Job) -> Outcome:
    """Run the `prepare` stage once for a split (`job.overrides`: its data.* settings), filling the
    shared DVC cache and run cache, from which every run of that split then takes its output."""
    from dvc.utils.hydra import apply_overrides

    start = time.monotonic()
    folder, log = workspace(job)
    try:
        clone(job, folder)
        if job.overrides:
            apply_overrides(str(folder / "params.yaml"), list(job.overrides))
        code = supervised([sys.executable, "-m", "dvc", "repro", "prepare"], folder, log,
                          run_env(False, job.environ))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    seconds = time.monotonic() - start
    if code != 0:
        return Outcome(job.name, FAILED, failure(log, code), host=socket.gethostname(), seconds=seconds,
                       log=_where(log))
    log.unlink(missing_ok=True)
    return Outcome(job.name, SUCCESS, host=socket.gethostname(), seconds=seconds)


def exp_ref(job: Job) -> str:
    """The git ref DVC gives experiment `job.name` of commit `job.commit` (refs/exps/ab/cdef.../name)."""
    from dvc.repo.experiments.refs import ExpRefInfo

    return str(ExpRefInfo(job.commit, job.name))


def pushed(job: Job) -> bool:
    """Whether the remote has the experiment already."""
    return bool(git("ls-remote", job.git_remote, exp_ref(job)).strip())


def workspace(job: Job) -> tuple[Path, Path]:
    """The run's folder and log, the same on every attempt on this machine (a retry removes what a
    killed attempt left): $TMPDIR/vitcnn-studies/<study>-<commit>/<name>[.log]."""
    base = Path(tempfile.gettempdir()) / "vitcnn-studies" / f"{job.study}-{job.commit[:8]}"
    base.mkdir(parents=True, exist_ok=True)
    return base / job.name, base / f"{job.name}.log"


def clone(job: Job, folder: Path) -> None:
    """The project at the study's commit in `folder`, using the shared DVC cache and downloads."""
    from vitcnn import paths

    shutil.rmtree(folder, ignore_errors=True)
    git("clone", "--quiet", "--no-checkout", job.git_remote, str(folder))
    git("-c", "advice.detachedHead=false", "checkout", "--quiet", job.commit, cwd=folder)
    if job.cache_dir:
        _local_config(folder, {"cache": {"dir": job.cache_dir}})  # as DVC's own queue does for its copies
    if job.downloads:
        (folder / paths.DOWNLOADS).parent.mkdir(parents=True, exist_ok=True)
        (folder / paths.DOWNLOADS).symlink_to(job.downloads, target_is_directory=True)


def push(job: Job, folder: Path) -> str:
    """Push the experiment; a note when another attempt has pushed it first. Retried a few times
    (a network blip should not cost the run), then TransientError."""
    from dvc.repo import Repo

    reason = ""
    for attempt in range(PUSH_ATTEMPTS):
        try:
            with Repo(str(folder)) as repo:
                repo.experiments.push("origin", [job.name], push_cache=job.push_cache)
            return ""
        except Exception as exc:  # DVC's and dulwich's errors: many types; the remote decides what happened
            reason = first_line(exc)
            if pushed(job):
                return "another attempt pushed it first"
            time.sleep(PUSH_BACKOFF_S * (attempt + 1))
    raise TransientError(f"{job.name}: ran, but could not push to {job.git_remote}: {reason}")


def supervised(cmd: list[str], cwd: Path, log: Path, env: dict[str, str]) -> int:
    """Run `cmd` in `cwd` through `supervise` (ended if this worker dies), its output to `log`."""
    with open(log, "w") as out:
        return subprocess.run([sys.executable, "-m", "vitcnn.study.supervise", *cmd], cwd=cwd, env=env,
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


def run_env(own_gpu: bool, environ: dict[str, str | None]) -> dict[str, str]:
    """The environment a run gets: the worker's, less the one-thread limits Dask's nanny puts on
    its workers (`environ` says what to have instead), and with one worker per GPU, only the
    worker's own GPU (dask-cuda gives each worker every GPU, its own first)."""
    env = dict(os.environ)
    for key, value in environ.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if own_gpu and visible:
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0]
    return env


def failure(log: Path, code: int) -> str:
    """Why a run failed, in one line: the stage's own error line, else DVC's, else how it ended."""
    from vitcnn.study.experiments import last_error, signal_name

    line = last_error(log)
    if line:
        return line
    killed = signal_name(code - 128)
    if killed:
        return f"killed by {killed} (out of memory, or stopped by hand?)"
    return f"dvc exited with {code} without an error line"


def git(*args: str, cwd: Path | None = None) -> str:
    """Run git; a failure to reach the remote raises TransientError (Dask retries the task)."""
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise TransientError(f"git {args[0]} timed out after {GIT_TIMEOUT_S} s") from None
    if result.returncode != 0:
        said = first_line(RuntimeError(result.stderr)) if result.stderr.strip() else f"exit {result.returncode}"
        raise TransientError(f"git {args[0]} failed on {socket.gethostname()}: {said}")
    return result.stdout


def _local_config(folder: Path, update: dict) -> None:
    from dvc.repo import Repo

    with Repo(str(folder)) as repo, repo.config.edit("local") as config:
        for section, values in update.items():
            config.setdefault(section, {}).update(values)


def _where(log: Path) -> str:
    return f"{socket.gethostname()}:{log}"
