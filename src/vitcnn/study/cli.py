"""`vitcnn study`: run many experiments on DVC's queue and summarize them honestly.

    vitcnn study run seeds --seeds 5 [-S key=value ...]
    vitcnn study run data --subsets 1000,5000,20000,45000 --seeds 3 [-S ...]
    vitcnn study run budget --epochs 5,10,20,40 --seeds 3 [-S ...]
    vitcnn study run sweep -S 'vit.depth=4,6,8' --seeds 3
    vitcnn study run seeds --recipe strong --seeds 3
    vitcnn study wait NAME
    vitcnn study summarize [--name PREFIX] [--all-commits] [--json] [--out DIR]
    vitcnn study summarize --from studies/NAME/runs.csv [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from vitcnn import recipes
from vitcnn.study import experiments, queue, report, runs
from vitcnn.study.grid import AXES, StudyError, parse_counts, plan
from vitcnn.study.summary import Summary, summarize

STUDIES = Path("studies")
EXAMPLE = "vitcnn study run seeds --seeds 3"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser("study", help="many runs of the pipeline, one summary with confidence intervals",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = study.add_subparsers(dest="command", required=True, metavar="{run,wait,summarize}")

    run = commands.add_parser("run", help="queue a study's experiments, run them, summarize them")
    run.add_argument("kind", choices=list(AXES), help="seeds: the same params, several seeds; data: against "
                     "data.subset; budget: against train.epochs; sweep: any -S grid")
    run.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every point of the grid (default 3)")
    run.add_argument("--subsets", help="data: training-image counts, e.g. 1000,5000,20000,45000")
    run.add_argument("--epochs", help="budget: epoch budgets, e.g. 5,10,20,40")
    run.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="a params.yaml override for every run, in dvc exp run's -S syntax (a,b,c or range() sweep)")
    run.add_argument("--recipe", help="a named recipe (recipes/<name>.yaml) for every run; -S keys override it")
    run.add_argument("--name", help="the study's name, the prefix of its experiments' names "
                     "(default: <kind>-<date>-<time>)")
    run.add_argument("-j", "--jobs", type=int, help="queue workers (default: one per visible GPU, else 1)")
    run.add_argument("--out", type=Path, help="where the summary goes (default: studies/<name>/)")
    run.add_argument("--no-wait", action="store_true", help="queue and start only; follow with `vitcnn study wait`")

    wait = commands.add_parser("wait", help="follow a study's runs until they finish, then summarize it")
    wait.add_argument("name")
    wait.add_argument("--out", type=Path, help="where the summary goes (default: studies/<name>/)")

    summary = commands.add_parser("summarize", help="summarize experiments: n, mean, std, 95%% CIs, paired difference")
    summary.add_argument("--name", help="only experiments whose name starts with this (a study's name)")
    summary.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not only HEAD's")
    summary.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    summary.add_argument("--out", type=Path, help="where the summary goes (default: studies/<name or 'all'>/; "
                         "with --from, the folder of that runs.csv)")
    summary.add_argument("--from", dest="source", type=Path, metavar="RUNS_CSV",
                         help="summarize the runs of a runs.csv (offline; no DVC needed) instead of DVC's experiments")
    study.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    if args.command == "run":
        return run_study(args)
    if args.command == "wait":
        return follow(args.name, args.out)
    return summarize_command(args.name, args.all_commits, args.json, args.out, args.source)


def run_study(args: argparse.Namespace) -> int:
    name = args.name or f"{args.kind}-{datetime.now():%Y%m%d-%H%M%S}"
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
    runs = plan(args.kind, name, args.seeds, values, with_recipe(args.recipe, args.overrides, args.kind))
    if args.jobs is not None and args.jobs < 1:
        raise StudyError(f"-j: {args.jobs} is not allowed; use an integer >= 1")
    queue.check_new(name)
    jobs = args.jobs or queue.default_jobs()
    print(f"study {name}: {len(runs)} runs ({args.seeds} seeds"
          + (f" x {len(runs) // args.seeds} settings" if len(runs) > args.seeds else "") + f"), {jobs} queue worker(s)",
          file=sys.stderr)
    queue.submit(runs, name, jobs)
    if args.no_wait:
        print(f"study {name}: queued; follow it with `vitcnn study wait {name}`", file=sys.stderr)
        return 0
    states = queue.wait([r.name for r in runs], name)
    failed = sum(state != "Success" for state in states.values())
    code = summarize_command(name, True, False, args.out)  # any commit: HEAD may have moved meanwhile
    if failed:
        print(f"study {name}: {failed} of {len(runs)} runs failed (listed above and in the summary)", file=sys.stderr)
    return 1 if failed else code


def with_recipe(recipe: str | None, overrides: list[str], kind: str) -> list[str]:
    """The recipe's overrides, less the keys that -S or the study itself sets, then -S."""
    if not recipe:
        return overrides
    taken = {o.split("=", 1)[0].lstrip("+~") for o in overrides} | {"seed"} | ({AXES[kind][0]} if AXES[kind] else set())
    return [o for o in recipes.overrides(recipe) if o.split("=", 1)[0] not in taken] + overrides


def follow(name: str, out: Path | None) -> int:
    names = sorted(n for n in queue.queue_statuses() if n.startswith(f"{name}-"))
    if not names:
        raise StudyError(f"no queued or finished runs named '{name}-...' in DVC's queue; "
                         f"see `dvc queue status`, or summarize: vitcnn study summarize --name {name}")
    queue.wait(names, name)
    return summarize_command(name, True, False, out)


def summarize_command(name: str | None, all_commits: bool, as_json: bool, out: Path | None,
                      source: Path | None = None) -> int:
    if source:  # a study's runs, as summarize wrote them: the same summary again, offline
        found, baselines = runs.read(source)
        name = name or (None if source.parent.name == "all" else source.parent.name)
        out = out or source.parent
    else:
        found, baselines = experiments.load(all_commits)
        if name:
            found = [e for e in found if e.name.startswith(name)]
    if not found:
        where = f"in {source}" if source else "of any commit" if all_commits else "of this commit"
        matching = f" named '{name}...'" if name else ""
        raise StudyError(f"no experiments{matching} {where}; run one with `{EXAMPLE}` or `dvc exp run`")
    from vitcnn.models import MODELS

    summary = summarize(found, baselines, list(MODELS))
    out = out or STUDIES / (name or "all")
    title = f"Study {name}" if name else "All experiments"
    written = report.write(summary, out, title, found, baselines)
    if as_json:
        print(json.dumps({**summary.as_dict(), "files": [str(p) for p in written]}, indent=2))
    else:
        print(console(summary, written))
    if not summary.groups:
        print(f"no successful experiments among the {len(found)} found", file=sys.stderr)
        return 1
    return 0


def console(summary: Summary, written: list[Path]) -> str:
    lines = [report.table(summary)] if summary.groups else []
    lines += [f"note: {note}" for note in summary.notes]
    lines += [f"failed, left out: {e.name}: {e.error}" for e in summary.failed]
    lines += [f"not finished, left out: {e.name} ({e.state})" for e in summary.unfinished]
    lines.append("wrote " + ", ".join(str(p) for p in written))
    return "\n".join(lines)
