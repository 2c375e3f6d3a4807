"""A study's runs on a Dask cluster, gathered back as ordinary DVC experiments.

    --cluster local:N         a Dask LocalCluster of N worker processes on this machine (with GPUs,
                              dask-cuda's LocalCUDACluster: one worker per GPU, each run seeing only its own)
    --cluster tcp://HOST:PORT a Dask scheduler someone started (dask scheduler + dask worker on several
                              machines, dask-kubernetes, ...)
    --cluster slurm|pbs|sge|lsf  a dask-jobqueue cluster from ~/.config/dask/jobqueue.yaml, scaled to -j jobs

Dask does the scheduling, the retries after a lost worker (a task whose worker dies is run
again elsewhere, up to `distributed.scheduler.allowed-failures` times), the resources
(`resources={"GPU": 1}`) and the progress (`as_completed`); each task is `task.run_experiment`:
a clone of the project at the study's commit, `dvc exp run`, `dvc exp push`, idempotent. Runs of
one split wait for that split's `task.prepare_data`, so that `prepare` is computed once and the
runs take its output from DVC's run cache in a cache every worker shares (the project's own on
this machine or a shared filesystem); without a shared cache each run prepares for itself.

A cluster this process starts (local:N, jobqueue) stops with it: Ctrl-C says how many runs
finished and that `vitcnn study retry NAME` runs the rest. A scheduler's tasks (tcp://) go on
without this process: its futures are published on the scheduler (`publish_dataset`), and
`vitcnn study wait NAME` picks them up again.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vitcnn.errors import first_line
from vitcnn.study.grid import StudyError, in_study
from vitcnn.study.queue import StudyInterrupted, open_repo
from vitcnn.study.record import FAILED, LOST, PENDING, SUCCESS, StudyRecord
from vitcnn.study.task import Job, Outcome, TransientError, prepare_data, run_experiment

JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
SPECS = "local:N, tcp://HOST:PORT, or one of " + ", ".join(JOBQUEUE)
RETRIES = 2  # git failing to reach the remote; a lost worker is Dask's allowed-failures
CONNECT_TIMEOUT_S = 20
POLL_S = 5.0


@dataclass(frozen=True)
class Spec:
    text: str
    workers: int = 0  # local:N
    address: str = ""  # a scheduler that runs already
    system: str = ""  # a dask-jobqueue system

    @property
    def owned(self) -> bool:
        """Whether the cluster lives and dies with this process (local:N, jobqueue), unlike a scheduler's."""
        return not self.address


def parse_spec(text: str) -> Spec:
    """'local:4', 'tcp://host:8786', 'slurm' -> Spec; anything else is a one-line error."""
    local = re.fullmatch(r"local:(\d+)", text)
    if local and int(local.group(1)) >= 1:
        return Spec(text, workers=int(local.group(1)))
    if re.fullmatch(r"(tcp|tls)://[^/\s]+:\d+", text):
        return Spec(text, address=text)
    if text in JOBQUEUE:
        return Spec(text, system=text)
    if text in ("kubernetes", "k8s"):
        raise StudyError(f"--cluster: {text!r} is not started from here; start a Dask cluster on Kubernetes "
                         "with dask-kubernetes (pip install dask-kubernetes) and give its scheduler: "
                         "--cluster tcp://HOST:PORT")
    raise StudyError(f"--cluster: {text!r} is not allowed; use {SPECS}")


@dataclass(frozen=True)
class Setup:
    """Where the workers get the project, its data and its cache, and where the results come back."""

    git_remote: str  # what workers clone and push to
    pull_from: str  # where this repository pulls the experiments from; "" when they are pushed into it
    cache_dir: str  # a DVC cache every worker shares, or ""
    downloads: str  # the project's download cache, when the workers share this filesystem
    push_cache: bool  # the project has a default DVC remote


def setup(record: StudyRecord, spec: Spec, root: Path = Path(".")) -> Setup:
    """The workers' view of the project: its own path on this filesystem, unless --git-remote says
    otherwise; the project's DVC cache when the workers share this filesystem (local:N, and a
    jobqueue cluster, whose nodes mount the project as HPC clusters do)."""
    from vitcnn import paths

    project = root.resolve()
    remote = record.git_remote or str(project)
    shared = spec.owned
    with open_repo(root) as repo:
        configured = repo.config.load_one("repo").get("cache", {}).get("dir", "")  # the project's own, committed
        cache_dir = repo.cache.local_cache_dir if shared else configured if Path(configured).is_absolute() else ""
        push_cache = bool(repo.config["core"].get("remote"))
    downloads = ""
    if shared and any(run.params.get("data.source") == "download" for run in record.runs):
        downloads = str(project / paths.DOWNLOADS)
        Path(downloads).mkdir(parents=True, exist_ok=True)
    pull_from = "" if _same_path(remote, project) else remote
    return Setup(remote, pull_from, str(cache_dir or ""), downloads, push_cache)


def resolve_remote(remote: str, root: Path = Path(".")) -> str:
    """--git-remote as the workers need it: a remote's name becomes its URL, a relative path absolute."""
    if "://" in remote or "@" in remote.split("/")[0]:
        return remote
    named = subprocess.run(["git", "remote", "get-url", remote], cwd=root, capture_output=True, text=True)
    if named.returncode == 0:
        return named.stdout.strip()
    path = (root / remote).resolve()
    if not path.exists():
        raise StudyError(f"--git-remote: {remote} is neither a git remote of this repository nor a path; "
                         "give a URL or path that every worker can reach (e.g. a bare repository)")
    return str(path)


def check_repository(commit: str, remote: str, root: Path = Path(".")) -> None:
    """The workers clone the commit: refuse uncommitted changes (they would not be run), and a
    remote that lacks the commit."""
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                             capture_output=True, text=True).stdout.splitlines()
    changed = [line for line in changed if line[3:] != "params.yaml"]  # passed to the runs as -S (with_leftovers)
    if changed:
        files = ", ".join(line[3:] for line in changed[:3]) + (", ..." if len(changed) > 3 else "")
        raise StudyError(f"{len(changed)} tracked files differ from commit {commit[:7]} ({files}): a cluster runs "
                         "the commit, cloned; commit the changes (or stash them) first")
    if _same_path(remote, root.resolve()):
        return
    listed = subprocess.run(["git", "ls-remote", remote], cwd=root, capture_output=True, text=True, timeout=120)
    if listed.returncode != 0:
        raise StudyError(f"--git-remote {remote}: git cannot reach it ({first_line(RuntimeError(listed.stderr))})")
    tips = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    if commit in tips or any(subprocess.run(["git", "merge-base", "--is-ancestor", commit, tip], cwd=root,
                                            capture_output=True).returncode == 0 for tip in tips):
        return
    raise StudyError(f"--git-remote {remote}: it does not have commit {commit[:7]}, which the workers clone; "
                     f"push it first: git push {remote} HEAD")


def visible_gpus() -> list[str]:
    """The GPUs this process may give workers: CUDA_VISIBLE_DEVICES' entries, else 0..count-1."""
    import torch

    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


@contextlib.contextmanager
def connect(spec: Spec, jobs: int, gpus: list[str]) -> Iterator[Any]:
    """A Dask client of the cluster `spec` names: started here (and stopped on leaving) for local:N
    and jobqueue, joined for a scheduler's address."""
    try:
        from distributed import Client
    except ImportError:
        raise StudyError(f"--cluster {spec.text} needs Dask's distributed: pip install distributed") from None

    if spec.address:
        try:
            client = Client(spec.address, timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise StudyError(f"--cluster {spec.text}: no Dask scheduler answers there ({first_line(exc)}); "
                             "start one with `dask scheduler`, and workers with `dask worker ADDRESS --nthreads 1`") \
                from None
        with client:
            yield client
        return
    with _start(spec, jobs, gpus) as cluster, Client(cluster) as client:
        yield client


def _start(spec: Spec, jobs: int, gpus: list[str]) -> Any:
    from distributed import LocalCluster

    if spec.system:
        return _jobqueue(spec, jobs)
    if not gpus:
        return LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise StudyError(f"--cluster {spec.text}: one worker per GPU ({len(gpus)} here) needs dask-cuda: "
                         "pip install dask-cuda (or run on the CPU: -S device=cpu)") from None
    n = min(spec.workers, len(gpus))
    if spec.workers > n:
        print(f"--cluster {spec.text}: {n} workers, one per GPU", file=sys.stderr)
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(gpus[:n]), n_workers=n, threads_per_worker=1,
                            resources={"GPU": 1}, dashboard_address=":0")


def _jobqueue(spec: Spec, jobs: int) -> Any:
    """A dask-jobqueue cluster from the user's Dask config, one run at a time per worker process
    (a `run` resource of 1), scaled to `jobs` jobs."""
    import dask

    try:
        import dask_jobqueue
    except ImportError:
        raise StudyError(f"--cluster {spec.system} needs dask-jobqueue: pip install dask-jobqueue") from None
    extra = list(dask.config.get(f"jobqueue.{spec.system}.worker-extra-args", None) or [])
    try:
        cluster = getattr(dask_jobqueue, JOBQUEUE[spec.system])(worker_extra_args=with_resource(extra, "run=1"))
    except ValueError as exc:  # dask-jobqueue's refusal of an incomplete config: cores, memory, ...
        raise StudyError(f"--cluster {spec.system}: {first_line(exc)} (set jobqueue.{spec.system}.cores and "
                         f".memory in ~/.config/dask/jobqueue.yaml)") from None
    cluster.scale(jobs=jobs)
    print(f"--cluster {spec.system}: {jobs} jobs submitted; their runs start as the jobs do", file=sys.stderr)
    return cluster


def with_resource(args: list[str], resource: str) -> list[str]:
    """dask worker arguments with `resource` (e.g. run=1) added to any --resources already given."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--resources" and i + 1 < len(args):
            args[i + 1] = f"{args[i + 1]} {resource}"
            return args
        if arg.startswith("--resources="):
            args[i] = f"{arg} {resource}"
            return args
    return [*args, "--resources", resource]


def resources(spec: Spec, client: Any, gpus: list[str]) -> dict[str, int] | None:
    """What one run takes of a worker: a GPU where workers have one each, a `run` slot on a jobqueue
    worker; nothing on a local CPU cluster (one thread per worker runs one task at a time)."""
    if spec.system:
        return {"run": 1}
    if spec.address:
        declared = [w.get("resources", {}) for w in client.scheduler_info()["workers"].values()]
        return {"GPU": 1} if any("GPU" in r for r in declared) else None
    return {"GPU": 1} if gpus else None


def check_workers(spec: Spec, client: Any, record: StudyRecord, remote: str) -> None:
    """On a scheduler's workers, which may be other machines: that they can read the data and the
    git remote when those are paths, and that each runs one task at a time."""
    if not spec.address:
        return
    workers = client.scheduler_info()["workers"]
    if not workers:
        print(f"--cluster {spec.text}: no workers yet; the runs start as workers join", file=sys.stderr)
        return
    paths = sorted({str(r.params["data.source"]) for r in record.runs if r.params.get("data.source") != "download"})
    if "://" not in remote:
        paths.append(remote)
    for path in paths:
        missing = sorted(w for w, ok in client.run(os.path.exists, path).items() if not ok)
        if missing:
            raise StudyError(f"{path} does not exist on {len(missing)} of {len(workers)} workers (e.g. {missing[0]}): "
                             "put it where every worker reads it at the same path, or give --git-remote URL")
    busy = sorted(w for w, info in workers.items() if info.get("nthreads", 1) > 1)
    if busy:
        print(f"--cluster {spec.text}: {len(busy)} workers have several threads and run as many experiments at "
              "once; start workers with `dask worker ADDRESS --nthreads 1`", file=sys.stderr)


@dataclass(frozen=True)
class Plan:
    """The study's tasks: each split's prepare (only with a shared cache, where its output can be
    reused), each run, and the split each run belongs to (its data.* params)."""

    prepares: dict[str, Job]
    runs: dict[str, Job]
    split_of: dict[str, str]


def plan(record: StudyRecord, names: list[str], study_setup: Setup, own_gpu: bool,
         environ: dict[str, str | None]) -> Plan:
    base = dict(git_remote=study_setup.git_remote, commit=record.commit, cache_dir=study_setup.cache_dir,
                downloads=study_setup.downloads, push_cache=study_setup.push_cache, environ=environ)
    prepares: dict[str, Job] = {}
    runs: dict[str, Job] = {}
    split_of: dict[str, str] = {}
    for run in (record.run(name) for name in names):
        split = repr(sorted((k, repr(v)) for k, v in run.params.items() if k.startswith("data.")))
        if study_setup.cache_dir and split not in prepares:
            data = tuple(o for o in run.overrides if o.split("=", 1)[0].lstrip("+~").startswith("data."))
            prepares[split] = Job(record.name, f"{record.name}-prepare-{len(prepares)}", data, **base)
        runs[run.name] = Job(record.name, run.name, tuple(run.overrides), own_gpu=own_gpu, **base)
        split_of[run.name] = split
    return Plan(prepares, runs, split_of)


def run_environ(spec: Spec) -> dict[str, str | None]:
    """What a run has of the variables Dask's nanny sets in its workers (OMP_NUM_THREADS=1 and the
    like, for many small tasks; a training run is one big one). On local:N, this process's values,
    so that a run computes as a queued run would (the same threads, the same numbers); taken before
    the cluster starts, since its nannies, which live in this process, set them here too. Elsewhere
    the one-thread limits are lifted and torch takes the cores of the worker's machine or job (a
    value other than Dask's 1 in `distributed.nanny.pre-spawn-environ` is the user's, and stays)."""
    import dask
    import distributed  # noqa: F401  (its defaults join Dask's config when it is imported)

    preset = dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}
    if spec.workers:
        return {key: os.environ.get(key) for key in preset}
    return {key: None for key, value in preset.items() if str(value) == "1"}


def submit(client: Any, record: StudyRecord, names: list[str], study_setup: Setup, gpus: list[str],
           spec: Spec, environ: dict[str, str | None]) -> dict[str, Any]:
    """Submit each split's prepare and each run (depending on its split's prepare); {name: future}."""
    import uuid

    token = uuid.uuid4().hex[:8]  # a retry's tasks must not be taken for an earlier attempt's on the scheduler
    tasks = plan(record, names, study_setup, bool(gpus) and not spec.address and not spec.system, environ)
    slot = {"run": 1} if spec.system else None
    prepared = {split: client.submit(prepare_data, job, key=f"{job.name}-{token}", retries=RETRIES, pure=False,
                                     resources=slot)
                for split, job in tasks.prepares.items()}
    taken = resources(spec, client, gpus)
    return {name: client.submit(run_experiment, job, prepared.get(tasks.split_of[name]), key=f"{name}-{token}",
                                retries=RETRIES, resources=taken, pure=False)
            for name, job in tasks.runs.items()}


def dataset(record: StudyRecord) -> str:
    """The name a scheduler keeps a study's futures under, for `vitcnn study wait`."""
    return f"vitcnn-study-{record.name}-{record.commit[:8]}"


def run(record: StudyRecord, spec: Spec, jobs: int, runs: list[str], root: Path = Path(".")) -> None:
    """Run `runs` of the study on the cluster and follow them to the end, updating the record."""
    study_setup = setup(record, spec, root)
    gpus = visible_gpus() if not spec.address and not spec.system and _uses_gpu(record) else []
    environ = run_environ(spec)  # before the cluster starts (see run_environ)
    try:
        with connect(spec, jobs, gpus) as client:
            check_workers(spec, client, record, study_setup.git_remote)
            futures = submit(client, record, runs, study_setup, gpus, spec, environ)
            if spec.address:  # kept on the scheduler when this client goes: `wait` finds them there
                client.publish_dataset(futures, name=dataset(record), override=True)
            _announce(record, spec, client, len(runs))
            follow(futures, record, study_setup, root)
            if spec.address:
                client.unpublish_dataset(dataset(record))
    except KeyboardInterrupt:
        raise StudyInterrupted(stopped(record, spec, root)) from None


def submit_and_leave(record: StudyRecord, spec: Spec, runs: list[str], root: Path = Path(".")) -> None:
    """Submit the runs to a scheduler and leave them there (`--no-wait`): `wait` gathers them."""
    study_setup = setup(record, spec, root)
    with connect(spec, 0, []) as client:
        check_workers(spec, client, record, study_setup.git_remote)
        futures = submit(client, record, runs, study_setup, [], spec, run_environ(spec))
        client.publish_dataset(futures, name=dataset(record), override=True)


def follow(futures: dict[str, Any], record: StudyRecord, study_setup: Setup, root: Path) -> None:
    """Take each run's outcome as it comes (`as_completed`): pull its experiment here, record it,
    show it. The estimate of the time left counts only the runs finished meanwhile."""
    from distributed import as_completed

    names = {future.key: name for name, future in futures.items()}
    done_before = sum(r.state == SUCCESS for r in record.runs if r.name not in futures)
    failed = 0
    with tqdm(total=len(futures) + done_before, initial=done_before, desc=record.name, unit="run",
              dynamic_ncols=True, smoothing=0) as bar:
        for future in as_completed(list(futures.values())):
            name = names[future.key]
            outcome = _outcome(name, future, record.name)
            if outcome.state == SUCCESS and study_setup.pull_from:
                pull(study_setup, [name], root)
            record.mark(name, outcome.state, outcome.error)
            record.save(root)
            if outcome.state != SUCCESS:
                failed += 1
                tqdm.write(f"{name}: {outcome.error}" + (f" (log: {outcome.log})" if outcome.log else ""),
                           file=sys.stderr)
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(1)


def _outcome(name: str, future: Any, study: str) -> Outcome:
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        return Outcome(name, LOST, "lost: every worker that ran it died (out of memory? see the workers' logs); "
                                   f"rerun it with `vitcnn study retry {study}`")
    except TransientError as exc:
        return Outcome(name, FAILED, str(exc))
    except Exception as exc:  # the task's own failure, as Dask hands it back: any type
        return Outcome(name, FAILED, f"{type(exc).__name__}: {first_line(exc)}")


def pull(study_setup: Setup, names: list[str], root: Path = Path(".")) -> None:
    """`dvc exp pull` the experiments from the git remote the workers pushed them to."""
    with open_repo(root) as repo:
        try:
            repo.experiments.pull(study_setup.pull_from, names, pull_cache=study_setup.push_cache)
        except Exception as exc:  # DVC's and git's errors; the experiments stay on the remote for `wait`
            tqdm.write(f"could not pull {', '.join(names)} from {study_setup.pull_from} ({first_line(exc)}); "
                       "`vitcnn study wait` pulls them later", file=sys.stderr)


def gather(record: StudyRecord, root: Path = Path(".")) -> None:
    """`vitcnn study wait` for a cluster study: follow its tasks again where they still run (a
    scheduler's), else wait for the process that owns its cluster; then pull every run pushed to
    the remote and mark the runs nobody runs any more as lost."""
    spec = parse_spec(record.backend)
    study_setup = setup(record, spec, root)
    if spec.address:
        _rejoin(record, spec, study_setup, root)
    else:
        _wait_for_owner(record, root)
    pushed = remote_runs(record, study_setup, root)
    here = local_runs(record, root)
    if study_setup.pull_from and pushed - here:
        pull(study_setup, sorted(pushed - here), root)
    for run in record.runs:
        if run.name in pushed | here:
            if run.state != SUCCESS:
                record.mark(run.name, SUCCESS)
        elif run.state == PENDING and not (spec.owned and record.owner_alive()):
            record.mark(run.name, LOST, f"lost: the cluster ({record.backend}) stopped before it ran; "
                                        f"rerun it with `vitcnn study retry {record.name}`")
    record.save(root)


def _rejoin(record: StudyRecord, spec: Spec, study_setup: Setup, root: Path) -> None:
    from distributed import Client

    try:
        client = Client(spec.address, timeout=CONNECT_TIMEOUT_S)
    except OSError:
        print(f"study {record.name}: no Dask scheduler at {spec.address} any more; gathering what was pushed",
              file=sys.stderr)
        return
    with client:
        try:
            futures = client.get_dataset(dataset(record))
        except KeyError:  # finished and unpublished, or the scheduler restarted
            return
        unfinished = {name: f for name, f in futures.items() if record.run(name).state == PENDING}
        try:
            follow(unfinished, record, study_setup, root)
        except KeyboardInterrupt:
            raise StudyInterrupted(stopped(record, spec, root)) from None
        client.unpublish_dataset(dataset(record))


def _wait_for_owner(record: StudyRecord, root: Path) -> None:
    """While the process that started the study (and owns its cluster) runs, follow its record."""
    from vitcnn.study import record as records

    if not record.owner_alive():
        return
    print(f"study {record.name}: its cluster runs in process {record.pid}; following its record", file=sys.stderr)
    try:
        while record.owner_alive() and any(r.state == PENDING for r in record.runs):
            time.sleep(POLL_S)
            record.runs = (records.load(record.name, root) or record).runs
    except KeyboardInterrupt:
        raise StudyInterrupted(f"stopped waiting; study '{record.name}' goes on in process {record.pid}; "
                               f"follow it again with `vitcnn study wait {record.name}`") from None


def remote_runs(record: StudyRecord, study_setup: Setup, root: Path = Path(".")) -> set[str]:
    """Names of the study's experiments on the remote the workers push to (of the study's commit)."""
    if not study_setup.pull_from:
        return local_runs(record, root)
    with open_repo(root) as repo:
        listed = repo.experiments.ls(all_commits=True, git_remote=study_setup.pull_from)
    return {name for baseline, exps in listed.items() if baseline == record.commit
            for name, _ in exps if in_study(name, record.name)}


def local_runs(record: StudyRecord, root: Path = Path(".")) -> set[str]:
    """Names of the study's experiments in this repository (of the study's commit)."""
    with open_repo(root) as repo:
        listed = repo.experiments.ls(all_commits=True)
    return {name for baseline, exps in listed.items() if baseline == record.commit
            for name, _ in exps if in_study(name, record.name)}


def stopped(record: StudyRecord, spec: Spec, root: Path) -> str:
    """What Ctrl-C (or SIGTERM) leaves, in one line; a cluster started here stops with this process."""
    left = [r for r in record.runs if r.state == PENDING]
    if spec.address:
        return (f"stopped following; {len(left)} runs of '{record.name}' go on on the scheduler at {spec.address}; "
                f"gather them with `vitcnn study wait {record.name}`")
    study_setup = setup(record, spec, root)
    pushed = remote_runs(record, study_setup, root)  # pushed while the cluster was stopping
    fresh = sorted({r.name for r in left} & pushed)
    if study_setup.pull_from and fresh:
        pull(study_setup, fresh, root)
    for r in left:
        if r.name in pushed:
            record.mark(r.name, SUCCESS)
        else:
            record.mark(r.name, LOST, f"lost: the study was stopped before it finished; `vitcnn study retry "
                                      f"{record.name}`")
    record.save(root)
    done = sum(r.state == SUCCESS for r in record.runs)
    left = [r for r in record.runs if r.state == LOST]
    return (f"stopped; the {spec.text} cluster stopped with this process, and its {len(left)} unfinished runs "
            f"with it ({done} of {len(record.runs)} are experiments); run them with `vitcnn study retry {record.name}`")


def _announce(record: StudyRecord, spec: Spec, client: Any, count: int) -> None:
    link = getattr(client, "dashboard_link", "") if _has_dashboard() else ""
    print(f"study {record.name}: {count} runs submitted to {spec.text}" + (f"; dashboard: {link}" if link else ""),
          file=sys.stderr)


def _has_dashboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def _uses_gpu(record: StudyRecord) -> bool:
    return any(run.params.get("device") != "cpu" for run in record.runs)


def _same_path(remote: str, project: Path) -> bool:
    return "://" not in remote and Path(remote).resolve() == project
