"""The same study on DVC's queue and on a local Dask cluster: wall time, runs completed, and whether
the runs give the same numbers.

    python benchmarks/study_backends.py --seeds 4 --workers 2 --out results/study-backends \
        -S data.source=../shared/datasets/sign-digits.tar.gz -S data.dataset=folder -S data.val_size=0.1 \
        -S train.normalization=measured -S train.epochs=2 -S robustness.subset=100 -S visualize.num_images=4

Each back-end runs `vitcnn study run seeds --seeds N` with `-j WORKERS` (DVC's queue) or `--cluster
local:WORKERS` (Dask, cloning from a bare copy of the project and pushing back to it), in a fresh
clone of this project's HEAD under a temporary folder, so this repository's experiments and caches
are left alone and neither back-end finds the other's run cache. The back-ends run one after the
other, in the order given, nothing else should run meanwhile. `--out` gets `study_backends.json`
(each back-end's wall time, exit status, runs completed and its summary's test accuracies) and
`machine.json`; `--keep DIR` keeps the queue's study (its runs.csv, summary and figures, and a
machine.json) in DIR, as `vitcnn study summarize` wrote it in the clone, named after DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vitcnn import results  # noqa: E402

BACKENDS = ("queue", "cluster")


def project_copy(base: Path) -> tuple[Path, Path]:
    """A clone of this project's HEAD in `base`, and a bare copy of it the cluster's workers clone from."""
    remote, repo = base / "remote.git", base / "project"
    subprocess.run(["git", "clone", "-q", "--bare", str(ROOT), str(remote)], check=True)
    subprocess.run(["git", "clone", "-q", str(remote), str(repo)], check=True)
    return repo, remote


def absolute(overrides: list[str]) -> list[str]:
    """-S data.source=<relative path> made absolute (taken from this project's root, as the stages do)."""
    fixed = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "data.source" and value != "download" and "://" not in value and not Path(value).is_absolute():
            value = str((ROOT / value).resolve())
        fixed.append(f"{key}={value}")
    return fixed


def run_backend(backend: str, name: str, seeds: int, workers: int, overrides: list[str], base: Path) -> dict:
    repo, remote = project_copy(base / backend)
    where = ["-j", str(workers)] if backend == "queue" else ["--cluster", f"local:{workers}", "--git-remote",
                                                            str(remote)]
    flags = [arg for o in overrides for arg in ("-S", o)]
    cmd = [sys.executable, "-m", "vitcnn", "study", "run", "seeds", "--seeds", str(seeds), "--name", name,
           *where, *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    summary = subprocess.run([sys.executable, "-m", "vitcnn", "study", "summarize", "--name", name, "--json"],
                             cwd=repo, env=env, capture_output=True, text=True)  # into the clone's studies/NAME
    found = json.loads(summary.stdout) if summary.returncode == 0 else {"groups": [], "failed": []}
    groups = found["groups"]
    print(f"{backend}: {seconds:.0f} s, exit {done.returncode}", file=sys.stderr)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
    return {
        "backend": backend,
        "study": str(repo / "studies" / name),
        "command": " ".join(["vitcnn", *cmd[3:]]).replace(str(remote), "<bare clone>"),
        "wall_s": round(seconds, 1),
        "exit": done.returncode,
        "runs": seeds,
        "completed": sum(g["n"] for g in groups),
        "failed": len(found.get("failed", [])),
        # one group (a seeds study): each model's test accuracy over the seeds, mean and std
        "test_acc": {m: {k: e["test_acc"][k] for k in ("mean", "std")} for g in groups[:1]
                     for m, e in g["metrics"].items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--order", default="queue,cluster", help="the back-ends, in the order to run them")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("results/study-backends"))
    parser.add_argument("--keep", type=Path, help="keep the queue's study here (e.g. studies/seeds-cpu)")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    order = args.order.split(",")
    if not set(order) <= set(BACKENDS):
        parser.error(f"--order: use {', '.join(BACKENDS)}")
    overrides = absolute(args.overrides)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    name = args.keep.name if args.keep else "backends"
    machine = {"machine": results.machine(), "software": results.software(), "commit": commit,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": args.note}
    with tempfile.TemporaryDirectory(prefix="study-backends-") as tmp:
        measured = [run_backend(b, name if b == "queue" else f"{name}-dask", args.seeds, args.workers, overrides,
                                Path(tmp)) for b in order]
        if args.keep:
            kept = Path(next(m["study"] for m in measured if m["backend"] == "queue"))
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(kept, args.keep)
            note = f"{args.workers} runs at a time on DVC's queue (`-j {args.workers}`): training times are shared"
            (args.keep / "machine.json").write_text(json.dumps({**machine, "note": note}, indent=2) + "\n")
    for m in measured:
        del m["study"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study_backends.json").write_text(json.dumps(
        {"seeds": args.seeds, "workers": args.workers, "overrides": args.overrides, "backends": measured}, indent=2)
        + "\n")
    (args.out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    print(json.dumps(measured, indent=2))
    return 1 if any(m["exit"] != 0 for m in measured) else 0


if __name__ == "__main__":
    sys.exit(main())
