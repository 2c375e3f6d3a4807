"""The `vitcnn` command (installed with the package; also `python -m vitcnn`).

    vitcnn study run|wait|summarize ...   many experiments on DVC's queue, one honest summary
    vitcnn recipe NAME | --list           a named recipe as `-S key=value` flags for dvc exp run
    vitcnn results save NAME [--exp EXP]  a run's metrics, plots, params, dvc.lock and machine into results/NAME/

The pipeline itself runs with `dvc repro` / `dvc exp run`; this command works around it.
"""

from __future__ import annotations

import argparse
import sys

from vitcnn import recipes, results
from vitcnn.errors import UserError
from vitcnn.study import cli as study_cli


def add_recipe_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("recipe", help="print a named recipe (recipes/<name>.yaml) as -S flags",
                                   description="Print recipes/NAME.yaml as `-S key=value` flags: "
                                   "dvc exp run -n strong $(vitcnn recipe strong)")
    parser.add_argument("name", nargs="?", help="the recipe's name (the file's stem)")
    parser.add_argument("--list", action="store_true", help="list the recipes, one line each")
    parser.add_argument("--from-workspace", action="store_true",
                        help="build on the workspace's params.yaml as it is, even where it differs from the "
                        "committed one (by default those keys go back to their committed values)")
    parser.set_defaults(handler=recipe_command)


def recipe_command(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        for name, description in recipes.available().items():
            print(f"{name}: {description}")
        return 0
    print(" ".join(recipes.flags(args.name, from_workspace=args.from_workspace)))
    return 0


def add_results_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("results", help="save a run with its provenance under results/NAME/",
                                   description=results.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{save}")
    save = commands.add_parser("save", help="copy metrics/, plots/, params.yaml and dvc.lock into results/NAME/ "
                               "with machine.json")
    save.add_argument("name", help="the folder's name under results/ (lower-case letters, digits, . _ -)")
    save.add_argument("--exp", help="save this experiment (a name from dvc exp show) instead of the workspace")
    save.add_argument("--note", help="a sentence kept in machine.json, e.g. what else shared the machine")
    save.add_argument("--force", action="store_true", help="replace results/NAME/ if it exists")
    parser.set_defaults(handler=results_command)


def results_command(args: argparse.Namespace) -> int:
    folder = results.save(args.name, exp=args.exp, note=args.note or "", force=args.force)
    count = sum(1 for p in folder.rglob("*") if p.is_file())
    print(f"vitcnn results: saved {folder}/ ({count} files)", file=sys.stderr)
    return 0


GROUPS = {"study": study_cli.add_parser, "recipe": add_recipe_parser, "results": add_results_parser}


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the command; a problem the user can fix is one line on stderr, exit 1."""
    parser = argparse.ArgumentParser(prog="vitcnn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="group", required=True, metavar="{" + ",".join(GROUPS) + "}")
    for add_parser in GROUPS.values():
        add_parser(subparsers)
    args = parser.parse_args(argv)
    prefix = f"vitcnn {args.group}"
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        stopped = exc.exit_code == 130  # stopped on purpose: the message says what to do next; not an error
        print(f"{prefix}: {'' if stopped else 'error: '}{exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
