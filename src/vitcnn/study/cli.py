"""`vitcnn study`: run many experiments on DVC's queue or a Dask cluster, and summarize them honestly.

    vitcnn study run seeds --seeds 5 [-S key=value ...]
    vitcnn study run data --subsets 1000,5000,20000,45000 --seeds 3 [-S ...]
    vitcnn study run budget --epochs 5,10,20,40 --seeds 3 [-S ...]
    vitcnn study run sweep -S 'vit.depth=4,6,8' --seeds 3
    vitcnn study run seeds --recipe strong --seeds 3
    vitcnn study run seeds --seeds 5 --cluster local:2            # a Dask cluster: local:N, tcp://HOST:PORT, slurm, ...
    vitcnn study run seeds --seeds 5 --cluster slurm -j 5 --git-remote git@host:me/project.git
    vitcnn study wait NAME
    vitcnn study retry NAME [--cluster SPEC]                     # its failed and lost runs, same params
    vitcnn study summarize [--name NAME] [--all-commits] [--json] [--out DIR]
    vitcnn study summarize --from studies/NAME/runs.csv [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from vitcnn import recipes
from vitcnn.overrides import leftover_text, leftovers, value_text
from vitcnn.study import experiments, queue, record, report, runs
from vitcnn.study.grid import AXES, Run, StudyError, in_study, parse_counts, plan
from vitcnn.study.record import FAILED, LOST, PENDING, QUEUE, SUCCESS, StudyRecord
from vitcnn.study.summary import Summary, summarize

if TYPE_CHECKING:
    from vitcnn.study.cluster import Spec

STUDIES = Path("studies")
EXAMPLE = "vitcnn study run seeds --seeds 3"
CLUSTER_HELP = ("run on a Dask cluster instead of DVC's queue: local:N (N worker processes here; with GPUs, "
                "one per GPU), tcp://HOST:PORT (a running Dask scheduler), or slurm, pbs, sge, lsf "
                "(dask-jobqueue, from ~/.config/dask/jobqueue.yaml)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser("study", help="many runs of the pipeline, one summary with confidence intervals",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = study.add_subparsers(dest="command", required=True, metavar="{run,wait,retry,summarize}")

    run = commands.add_parser("run", help="queue a study's experiments, run them, summarize them")
    run.add_argument("kind", choices=list(AXES), help="seeds: the same params, several seeds; data: against "
                     "data.subset; budget: against train.epochs; sweep: any -S grid")
    run.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every point of the grid (default 3)")
    run.add_argument("--subsets", help="data: training-image counts, e.g. 1000,5000,20000,45000")
    run.add_argument("--epochs", help="budget: epoch budgets, e.g. 5,10,20,40")
    run.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="a params.yaml override for every run, in dvc exp run's -S syntax (a,b,c or range() sweep)")
    run.add_argument("--recipe", help="a named recipe (recipes/<name>.yaml) for every run; -S keys override it")
    run.add_argument("--name", help="the study's name; its experiments are NAME-0, NAME-1, ... "
                     "(default: <kind>-<date>-<time>)")
    run.add_argument("--from-workspace", action="store_true", help="keep the params an earlier `dvc exp run -S` "
                     "left in params.yaml (by default every run starts from the committed params.yaml)")
    _add_backend(run)
    run.add_argument("--out", type=Path, help="where the summary goes (default: studies/<name>/)")
    run.add_argument("--no-wait", action="store_true", help="queue and start only; follow with `vitcnn study wait` "
                     "(DVC's queue, or a scheduler's cluster)")

    wait = commands.add_parser("wait", help="follow a study's runs until they finish (on a cluster: gather what "
                               "was pushed), then summarize it")
    wait.add_argument("name")
    wait.add_argument("--out", type=Path, help="where the summary goes (default: studies/<name>/)")

    retry = commands.add_parser("retry", help="run a study's failed and lost runs again, with the same params")
    retry.add_argument("name")
    _add_backend(retry, again=True)
    retry.add_argument("--out", type=Path, help="where the summary goes (default: studies/<name>/)")
    retry.add_argument("--no-wait", action="store_true", help="queue and start only (DVC's queue, or a scheduler's)")

    summary = commands.add_parser("summarize", help="summarize experiments: n, mean, std, 95%% CIs, paired difference")
    summary.add_argument("--name", help="only the experiments of this study: NAME-0, NAME-1, ...")
    summary.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not only HEAD's")
    summary.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    summary.add_argument("--out", type=Path, help="where the summary goes (default: studies/<name or 'all'>/; "
                         "with --from, the folder of that runs.csv)")
    summary.add_argument("--from", dest="source", type=Path, metavar="RUNS_CSV",
                         help="summarize the runs of a runs.csv (offline; no DVC needed) instead of DVC's experiments")
    study.set_defaults(handler=main)


def _add_backend(parser: argparse.ArgumentParser, again: bool = False) -> None:
    parser.add_argument("-j", "--jobs", type=int, help="DVC queue workers (default: one per visible GPU, else 1; "
                        "the repository's queue workers are shared by its studies), or jobqueue jobs (default: one "
                        "per run)" + ("; default: as the study ran" if again else ""))
    parser.add_argument("--cluster", metavar="SPEC", help=CLUSTER_HELP + ("; default: where the study ran" if again
                                                                          else ""))
    parser.add_argument("--git-remote", metavar="URL", help="with --cluster: the git remote (URL, path or remote "
                        "name) the workers clone the study's commit from and push experiments to (default: "
                        + ("as the study ran" if again else "this repository's own path, for workers that share its "
                           "filesystem") + ")")


def main(args: argparse.Namespace) -> int:
    with sigterm_interrupts():
        if args.command == "run":
            return run_study(args)
        if args.command == "wait":
            return follow(args.name, args.out)
        if args.command == "retry":
            return retry(args)
        return summarize_command(args.name, args.all_commits, args.json, args.out, args.source)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (`kill`, a batch system's time limit) stops a study command as Ctrl-C does: with the
    line that says what goes on and how to come back, not silently."""
    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_study(args: argparse.Namespace) -> int:
    name = args.name or f"{args.kind}-{datetime.now():%Y%m%d-%H%M%S}"
    spec = _cluster_spec(args)
    values: list[int] = []
    if AXES[args.kind]:
        param, flag = AXES[args.kind]
        text = getattr(args, flag.removeprefix("--"))
        if text is None:
            raise StudyError(f"{flag} is required for a {args.kind} study ({param}), e.g. {flag} "
                             + ("1000,5000,20000,45000" if args.kind == "data" else "5,10,20,40"))
        values = parse_counts(text, flag, "training-image counts" if args.kind == "data" else "epoch budgets")
    if args.kind == "sweep" and not args.overrides:
        raise StudyError("a sweep study needs at least one -S, e.g. -S 'vit.depth=4,6,8'")
    overrides = with_recipe(args.recipe, args.overrides, args.kind)
    overrides = with_leftovers(overrides, args.kind, args.from_workspace, cloned=spec is not None)
    planned = plan(args.kind, name, args.seeds, values, overrides)
    if args.jobs is not None and args.jobs < 1:
        raise StudyError(f"-j: {args.jobs} is not allowed; use an integer >= 1")
    check_ready(planned, device_here=spec is None or spec.workers > 0, data_here=spec is None or spec.owned)
    queue.check_new(name)
    if record.load(name) is not None:  # a study whose runs all failed on a cluster has no experiment, but a record
        raise StudyError(f"a study named '{name}' exists already (.dvc/tmp/vitcnn-studies/{name}.json); choose "
                         f"another --name, or rerun its failed runs with `vitcnn study retry {name}`")
    commit = head()
    if spec:
        from vitcnn.study import cluster

        remote = cluster.resolve_remote(args.git_remote) if args.git_remote else ""
        cluster.check_repository(commit, remote or str(Path(".").resolve()))
        jobs = args.jobs or len(planned)
        study = new_record(name, args.kind, commit, spec.text, jobs, absolute_sources(planned), remote)
        print(f"study {name}: {_size(planned, args.seeds)} on the Dask cluster {spec.text}", file=sys.stderr)
        return run_on_cluster(study, spec, jobs, study.names, args.out, args.no_wait)
    jobs = args.jobs or queue.default_jobs()
    study = new_record(name, args.kind, commit, QUEUE, jobs, planned)
    print(f"study {name}: {_size(planned, args.seeds)}, {jobs} queue worker(s)", file=sys.stderr)
    queue.submit(planned, name, jobs)
    return finish_on_queue(study, args.out, args.no_wait)


def _cluster_spec(args: argparse.Namespace) -> Spec | None:
    if getattr(args, "git_remote", None) and not args.cluster:
        raise StudyError("--git-remote is for --cluster runs (DVC's queue runs in copies of this repository)")
    if not args.cluster:
        return None
    from vitcnn.study import cluster

    spec = cluster.parse_spec(args.cluster)
    if args.no_wait and spec.owned:
        raise StudyError(f"--no-wait: a {spec.text} cluster stops with this process; follow the study here, or "
                         "start a scheduler (`dask scheduler`, `dask worker`) and use --cluster tcp://HOST:PORT")
    return spec


def _size(planned: list[Run], seeds: int) -> str:
    return (f"{len(planned)} runs ({seeds} seeds" + (f" x {len(planned) // seeds} settings" if len(planned) > seeds
                                                      else "") + ")")


def set_keys(overrides: list[str], kind: str) -> set[str]:
    """The keys -S or the study itself sets (seed, and the param its kind varies)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides} | {"seed"} | ({AXES[kind][0]} if AXES[kind] else set())


def with_recipe(recipe: str | None, overrides: list[str], kind: str) -> list[str]:
    """The recipe's overrides, less the keys that -S or the study itself sets, then -S."""
    if not recipe:
        return overrides
    taken = set_keys(overrides, kind)
    return [o for o in recipes.overrides(recipe) if o.split("=", 1)[0] not in taken] + overrides


def with_leftovers(overrides: list[str], kind: str, from_workspace: bool, cloned: bool) -> list[str]:
    """`overrides` that start every run from the committed params.yaml: for each param an earlier
    `dvc exp run -S` left in the workspace at another value (DVC applies an experiment's params to
    the workspace) and that neither -S, the recipe nor the study sets, its committed value, with a
    one-line notice. With `from_workspace` the workspace's values stay: as they are for DVC's queue
    (it copies the workspace), as overrides for a cluster (its workers clone the commit)."""
    changed = leftovers()
    taken = set_keys(overrides, kind)
    changed = {k: v for k, v in changed.items() if k not in taken}
    if not changed:
        return overrides
    if from_workspace:
        return [f"{k}={value_text(now)}" for k, (_, now) in changed.items()] + overrides if cloned else overrides
    print(f"params.yaml holds {leftover_text(changed)}, left by an earlier run: every run starts from the committed "
          "values (--from-workspace keeps them)", file=sys.stderr)
    return [f"{k}={value_text(before)}" for k, (before, _) in changed.items()] + overrides


def check_ready(planned: list[Run], device_here: bool, data_here: bool, root: Path = Path(".")) -> None:
    """What would fail every run minutes later, found now: an empty dvc.lock (left by a full disk;
    DVC refuses to start with it), a device this machine lacks (when the runs run here), a
    data.source that does not exist (when the runs see this filesystem: here, or a jobqueue
    cluster's nodes; a scheduler's workers are asked themselves, in `cluster.check_workers`)."""
    lock = root / "dvc.lock"
    if lock.is_file() and not lock.read_text(errors="replace").strip():
        raise StudyError("dvc.lock is empty (left by a DVC command that ran out of disk space?) and DVC cannot run "
                         "with it: free some space, then restore it with `git checkout dvc.lock` (or delete it if "
                         "it was never committed)")
    devices = {str(r.params.get("device", "auto")) for r in planned} - {"auto", "cpu"}
    for device in sorted(devices) if device_here else []:
        if not _device_available(device):
            raise StudyError(f"-S device={device}: this machine has no {device.upper()} device that torch can use; "
                             "use device=auto or cpu, or run the study where there is one (--cluster)")
    sources = {str(r.params.get("data.source", "download")) for r in planned} - {"download"}
    for source in sorted(sources) if data_here else []:
        path = root / Path(source).expanduser()
        if not path.exists():
            where = "" if Path(source).expanduser().is_absolute() else f" (relative to the project: {path.resolve()})"
            raise StudyError(f"data.source: {source} does not exist{where}; use 'download' or a path to an archive "
                             "or folder")


def _device_available(device: str) -> bool:
    import torch

    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return torch.backends.mps.is_available()
    return True


def absolute_sources(planned: list[Run], root: Path = Path(".")) -> list[Run]:
    """Each run with a relative data.source made absolute: a worker runs in a clone elsewhere, where
    the path relative to the project would name nothing."""
    changed = []
    for run in planned:
        source = str(run.params.get("data.source", "download"))
        if source == "download" or Path(source).expanduser().is_absolute():
            changed.append(run)
            continue
        absolute = str((root / Path(source).expanduser()).resolve())
        kept = tuple(o for o in run.overrides if o.split("=", 1)[0].lstrip("+~") != "data.source")
        changed.append(replace(run, overrides=(*kept, f"data.source={value_text(absolute)}"),
                               params={**run.params, "data.source": absolute}))
    return changed


def head(root: Path = Path(".")) -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise StudyError("this is not a git repository with a commit; a study runs from a commit")
    return result.stdout.strip()


def new_record(name: str, kind: str, commit: str, backend: str, jobs: int, planned: list[Run],
               git_remote: str = "") -> StudyRecord:
    study = StudyRecord(name=name, kind=kind, commit=commit, backend=backend, jobs=jobs, git_remote=git_remote,
                        runs=[record.RunRecord(r.name, r.seed, list(r.overrides), r.params) for r in planned])
    study.save()
    return study


def run_on_cluster(study: StudyRecord, spec: Spec, jobs: int, names: list[str], out: Path | None,
                   no_wait: bool) -> int:
    """Run `names` of the study on the cluster, then summarize it; exit 1 when runs failed."""
    from vitcnn.study import cluster

    if no_wait:  # only a scheduler's cluster gets here: its tasks outlive this process
        cluster.submit_and_leave(study, spec, names)
        print(f"study {study.name}: submitted; gather it with `vitcnn study wait {study.name}`", file=sys.stderr)
        return 0
    cluster.run(study, spec, jobs, names)
    return conclude(study, out)


def finish_on_queue(study: StudyRecord, out: Path | None, no_wait: bool) -> int:
    if no_wait:
        print(f"study {study.name}: queued; follow it with `vitcnn study wait {study.name}`", file=sys.stderr)
        return 0
    waited = queue.wait(study.names, study.name, jobs=study.jobs, on_lost=_lost_in(study))
    _record_queue(study, waited)
    return conclude(study, out)


def _lost_in(study: StudyRecord) -> Callable[[str, str], None]:
    """Record a lost run at once: the waiting may end before it returns (Ctrl-C, no worker left)."""
    def lost(name: str, why: str) -> None:
        study.mark(name, LOST, why)
        study.save()

    return lost


def _record_queue(study: StudyRecord, waited: queue.Waited) -> None:
    for name, state in waited.states.items():
        if name in waited.lost:
            study.mark(name, LOST, waited.lost[name])
        elif state in ("Success", "Failed"):
            study.mark(name, SUCCESS if state == "Success" else FAILED)
    study.save()


def conclude(study: StudyRecord, out: Path | None) -> int:
    """Summarize the study; exit 1 (after the summary) when any of its runs failed or was lost."""
    code = summarize_command(study.name, True, False, out)  # any commit: HEAD may have moved meanwhile
    bad = [r for r in study.runs if r.state in (FAILED, LOST)]
    if bad:
        print(f"study {study.name}: {len(bad)} of {len(study.runs)} runs failed or were lost (listed above and in "
              f"the summary); run them again with `vitcnn study retry {study.name}`", file=sys.stderr)
        return 1
    return code


def follow(name: str, out: Path | None) -> int:
    """`vitcnn study wait NAME`: follow the queue's runs (or gather a cluster's), then summarize."""
    study = record.load(name)
    if study is not None and study.backend != QUEUE:
        from vitcnn.study import cluster

        cluster.gather(study)
        return conclude(study, out)
    names = sorted(n for n in queue.queue_statuses() if in_study(n, name))
    if not names:
        raise StudyError(f"no queued or finished runs named '{name}-<i>' in DVC's queue; "
                         f"see `dvc queue status`, or summarize: vitcnn study summarize --name {name}")
    waited = queue.wait(names, name, jobs=study.jobs if study else None, on_lost=_lost_in(study) if study else None)
    if study is None:  # a study from before records: its queue states are all there is
        failed = sum(state != "Success" for state in waited.states.values())
        code = summarize_command(name, True, False, out)
        if failed:
            print(f"study {name}: {failed} of {len(names)} runs failed (listed above and in the summary)",
                  file=sys.stderr)
        return 1 if failed else code
    _record_queue(study, waited)
    return conclude(study, out)


def retry(args: argparse.Namespace) -> int:
    """`vitcnn study retry NAME`: the study's failed and lost runs, again, under their own names and
    with the same params, where the study ran (or on --cluster)."""
    study = record.load(args.name)
    if study is None:
        raise StudyError(f"no record of a study '{args.name}' here (.dvc/tmp/vitcnn-studies/; studies started "
                         "before records have none): rerun a run by hand with "
                         f"`dvc exp run --queue -n {args.name}-<i> -S ...`")
    if args.jobs is not None and args.jobs < 1:
        raise StudyError(f"-j: {args.jobs} is not allowed; use an integer >= 1")
    if args.cluster or study.backend != QUEUE:
        return _retry_on_cluster(study, args)
    if head() != study.commit:
        raise StudyError(f"HEAD is not commit {study.commit[:7]}, which study '{study.name}' ran: DVC's queue runs "
                         f"from HEAD, so check out {study.commit[:7]} to rerun its runs on the same code")
    statuses = queue.queue_statuses()
    done = experiments_done(study)
    again = [r for r in study.runs if r.name not in done and statuses.get(r.name) not in ("Queued", "Running")]
    if not again:
        print(f"study {study.name}: no failed or lost runs to retry", file=sys.stderr)
        return conclude(study, args.out)
    failed = queue.failed_tasks([r.name for r in again])
    jobs = args.jobs or study.jobs
    print(f"study {study.name}: retrying {len(again)} runs ({', '.join(r.name for r in again)}), {jobs} queue "
          "worker(s)", file=sys.stderr)
    for r in again:
        study.mark(r.name, PENDING)
    study.save()
    queue.requeue([Run(r.name, r.seed, tuple(r.overrides)) for r in again], list(failed.values()), study.name, jobs)
    return finish_on_queue(study, args.out, args.no_wait)


def _retry_on_cluster(study: StudyRecord, args: argparse.Namespace) -> int:
    from vitcnn.study import cluster

    if study.backend != QUEUE:
        cluster.gather(study)  # what was pushed meanwhile is not run again
    spec = cluster.parse_spec(args.cluster or study.backend)
    if args.no_wait and spec.owned:
        raise StudyError(f"--no-wait: a {spec.text} cluster stops with this process; follow the retry here")
    busy: set[str] = set()
    if study.backend == QUEUE:  # a queue study retried on a cluster: the runs need the data at an absolute path
        study.runs = [_absolute(r) for r in study.runs]
        busy = {n for n, state in queue.queue_statuses().items() if state in ("Queued", "Running")}
    if args.git_remote:
        study.git_remote = cluster.resolve_remote(args.git_remote)
    done = experiments_done(study)
    again = [r.name for r in study.runs if r.name not in busy and r.name not in done
             and r.state in (FAILED, LOST, PENDING)]
    if not again:
        print(f"study {study.name}: no failed or lost runs to retry", file=sys.stderr)
        return conclude(study, args.out)
    cluster.check_repository(study.commit, study.git_remote or str(Path(".").resolve()))
    study.backend, study.jobs = spec.text, args.jobs or len(again)
    for name in again:
        study.mark(name, PENDING)
    study.save()
    print(f"study {study.name}: retrying {len(again)} runs ({', '.join(again)}) on {spec.text}", file=sys.stderr)
    return run_on_cluster(study, spec, study.jobs, again, args.out, args.no_wait)


def _absolute(run: record.RunRecord) -> record.RunRecord:
    (planned,) = absolute_sources([Run(run.name, run.seed, tuple(run.overrides), run.params)])
    run.overrides, run.params = list(planned.overrides), planned.params
    return run


def experiments_done(study: StudyRecord) -> set[str]:
    """The study's runs that are successful experiments in this repository."""
    found, _ = experiments.load(all_commits=True)
    return {e.name for e in experiments.latest(found)
            if e.baseline == study.commit and e.state == "success" and in_study(e.name, study.name)}


def summarize_command(name: str | None, all_commits: bool, as_json: bool, out: Path | None,
                      source: Path | None = None) -> int:
    """One study's summary (--name, or --from its runs.csv); without a name, one per study found, each
    in its own folder under studies/all/ (experiments of no study: 'other'), so that unrelated runs
    are never pooled into one table."""
    if source:  # a study's runs, as summarize wrote them: the same summary again, offline
        found, baselines = runs.read(source)
        name = name or (None if source.parent.name == "all" else source.parent.name)
        return _summarize(found, baselines, name, as_json, out or source.parent, source=source)[0]
    found, baselines = experiments.load(all_commits)
    studies = [s for s in ([record.load(name)] if name else record.load_all()) if s is not None]
    if not all_commits:
        studies = [s for s in studies if s.commit in {b.rev for b in baselines}]
    found = experiments.latest(record.merge(found, studies))
    if name:
        return _summarize([e for e in found if in_study(e.name, name)], baselines, name, as_json,
                          out or STUDIES / name, all_commits)[0]
    by_study = by_study_name(found, [s.name for s in studies])
    if len(by_study) <= 1:
        return _summarize(found, baselines, None, as_json, out or STUDIES / "all", all_commits)[0]
    codes, summaries = [], {}
    for study, members in by_study.items():
        if not as_json:
            print(f"## {study}")
        code, summaries[study] = _summarize(members, baselines, study, as_json, (out or STUDIES / "all") / study,
                                            all_commits, quiet=as_json)
        codes.append(code)
    if as_json:
        print(json.dumps(summaries, indent=2))
    return min(codes)  # 1 only when no study has a successful run


def by_study_name(found: list[experiments.Experiment], names: list[str]) -> dict[str, list[experiments.Experiment]]:
    """Experiments by the study they belong to: a recorded study's NAME-<i>, else a name's part before a
    final -<i>; 'other' for the rest (a plain `dvc exp run`)."""
    groups: dict[str, list[experiments.Experiment]] = {}
    for e in found:
        study = next((n for n in sorted(names, key=len, reverse=True) if in_study(e.name, n)), None)
        if study is None:
            prefix, dash, index = e.name.rpartition("-")
            study = prefix if dash and index.isdigit() and prefix else "other"
        groups.setdefault(study, []).append(e)
    return dict(sorted(groups.items()))


def _summarize(found: list[experiments.Experiment], baselines: list[experiments.Baseline], name: str | None,
               as_json: bool, out: Path, all_commits: bool = False, source: Path | None = None,
               quiet: bool = False) -> tuple[int, dict]:
    """Summarize `found` into `out`, print it (as JSON with `as_json`, nothing when `quiet`); the exit code
    and the summary as a dict."""
    if not found:
        where = f"in {source}" if source else "of any commit" if all_commits else "of this commit"
        matching = f" named '{name}-<i>'" if name else ""
        raise StudyError(f"no experiments{matching} {where}; run one with `{EXAMPLE}` or `dvc exp run`")
    from vitcnn.models import MODELS

    summary = summarize(found, baselines, list(MODELS))
    title = f"Study {name}" if name else "All experiments"
    written = report.write(summary, out, title, found, baselines)
    payload = {**summary.as_dict(), "files": [str(p) for p in written]}
    if as_json and not quiet:
        print(json.dumps(payload, indent=2))
    elif not as_json:
        print(console(summary, written))
    if not summary.groups:
        print(f"no successful experiments among the {len(found)} found", file=sys.stderr)
        return 1, payload
    return 0, payload


def console(summary: Summary, written: list[Path]) -> str:
    lines = [report.table(summary)] if summary.groups else []
    lines += [f"note: {note}" for note in summary.notes]
    lines += [f"failed, left out: {e.name}: {e.error}" for e in summary.failed]
    lines += [f"not finished, left out: {e.name} ({e.state})" for e in summary.unfinished]
    lines.append("wrote " + ", ".join(str(p) for p in written))
    return "\n".join(lines)
