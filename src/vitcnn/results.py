"""Saved runs with their provenance: `results/<name>/`, one folder per run whose numbers are published.

A saved run is a copy of what the pipeline wrote (`metrics/`, `plots/`: the metrics, the
small CSVs, the report and its figures), beside what makes it reproducible and checkable:
`params.yaml` and `dvc.lock` (which code, params and data produced those files, by hash) and
`machine.json` (the machine, the software, the commit, the date and the training times).
It is written from the workspace, after `dvc repro` or `dvc exp run`, or from an experiment
(`--exp NAME`), whose files are read from its Git commit. The folder is committed, so every
number the README quotes has a file behind it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from vitcnn import paths
from vitcnn.errors import UserError, first_line
from vitcnn.io import write_json

RESULTS = Path("results")
# What a saved run holds, besides machine.json, as the project's own paths (posix, relative to its root).
SAVED = tuple(p.as_posix() for p in (paths.PARAMS, paths.LOCK, paths.METRICS, paths.PLOTS))
MACHINE_FILE = "machine.json"
NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


class ResultsError(UserError):
    """A run that cannot be saved: a bad name, outputs out of date, an unknown experiment."""


def save(name: str, exp: str | None = None, note: str = "", force: bool = False, root: Path = Path("."),
         out: Path | None = None) -> Path:
    """Write `results/<name>/` (or `out`) from the workspace, or from experiment `exp`; return the folder.

    From the workspace, the pipeline's outputs must be those dvc.lock records (`dvc status` has
    nothing to rerun), so that dvc.lock describes them. An existing folder is replaced only
    with `force`, and only once the new one is complete.
    """
    if not NAME.fullmatch(name):
        raise ResultsError(f"'{name}' is not allowed as a results name; use lower-case letters, digits, '.', '_', '-'")
    target = out or root / RESULTS / name
    if target.exists() and not force:
        raise ResultsError(f"{target} exists already; choose another name, or replace it with --force")
    files = _experiment_files(exp, root) if exp else _workspace_files(root)
    missing = [p for p in (p.as_posix() for p in (paths.PARAMS, paths.LOCK, paths.EVALUATE)) if p not in files]
    if missing:
        where = f"experiment '{exp}'" if exp else "the workspace"
        raise ResultsError(f"{where} has no {missing[0]}; run the pipeline first (dvc repro)")
    staging = target.with_name(f".{target.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    for path, data in files.items():
        dest = staging / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    write_json(staging / MACHINE_FILE, provenance(name, exp, note, files, root))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def provenance(name: str, exp: str | None, note: str, files: dict[str, bytes], root: Path) -> dict[str, Any]:
    """machine.json: where and with what the run was made, and how long its training took."""
    from vitcnn.models import MODELS

    trained = {m: json.loads(files[paths.train_metrics(m).as_posix()]) for m in MODELS
               if paths.train_metrics(m).as_posix() in files}
    commit = _git("rev-parse", f"{_experiment_rev(exp, root)}^" if exp else "HEAD", root=root).strip()
    info: dict[str, Any] = {
        "name": name,
        "source": f"experiment {exp}" if exp else "workspace",
        "commit": commit,
        "code_changes": [] if exp else _changed_code(root),
        "saved_at": _now(),
        "run_date": (_git("log", "-1", "--format=%cI", _experiment_rev(exp, root), root=root).strip() if exp
                     else _mtime(root / paths.EVALUATE)),
        "machine": machine(),
        "software": software(),
        "trained": {model: {k: m.get(k) for k in ("device", "precision", "torch", "epochs", "train_time_s",
                                                   "setup_time_s", "train_images_per_s", "cuda_graphs")}
                    for model, m in trained.items()},
    }
    if note:
        info["note"] = note
    return info


def machine() -> dict[str, Any]:
    """The CPU (model, cores, the bf16/AMX features training uses), memory and GPUs of this machine."""
    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in ("", platform.machine(), platform.processor()):
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the platform's own name
        pass
    memory = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_features": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
            "memory_gib": memory, "gpus": gpus, "platform": platform.platform()}


def software() -> dict[str, Any]:
    import torch

    from dvc import __version__ as dvc_version

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "dvc": dvc_version}


def load(folder: Path) -> dict[str, Any]:
    """A saved run: its machine.json, params, metrics files and the folder, for tables and checks."""
    import yaml

    if not (folder / MACHINE_FILE).is_file():
        raise ResultsError(f"{folder}: not a saved run (no {MACHINE_FILE}); write one with `vitcnn results save`")
    metrics = {p.relative_to(folder / paths.METRICS).as_posix(): json.loads(p.read_text())
               for p in sorted((folder / paths.METRICS).glob("*.json"))}
    return {"folder": folder, "machine": json.loads((folder / MACHINE_FILE).read_text()),
            "params": yaml.safe_load((folder / paths.PARAMS).read_text()), "metrics": metrics}


# --- where the files come from ------------------------------------------------------------


def _workspace_files(root: Path) -> dict[str, bytes]:
    stale = _stale_stages(root)
    if stale:
        raise ResultsError(f"the outputs of {', '.join(stale)} are not those dvc.lock records (dvc status); "
                           "run `dvc repro` first, so that dvc.lock describes what is saved")
    files = {}
    for entry in SAVED:
        path = root / entry
        if path.is_file():
            files[entry] = path.read_bytes()
        elif path.is_dir():
            files |= {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
                      if p.is_file() and not p.name.startswith(".")}
    return files


def _stale_stages(root: Path) -> list[str]:
    """Stages `dvc status` would rerun (changed code, params, data or outputs)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            return sorted(name.split(":")[-1] for name in repo.status())
    except DvcException as exc:
        raise ResultsError(f"{root.resolve()}: {first_line(exc)}") from None


def _experiment_rev(exp: str, root: Path) -> str:
    """The commit of experiment `exp` (a name, as `dvc exp show` lists it, or its revision)."""
    from vitcnn.study.queue import open_repo

    with open_repo(root) as repo:
        for experiments in repo.experiments.ls(all_commits=True).values():
            for exp_name, rev in experiments:
                if exp in (exp_name, rev) or (rev and len(exp) >= 7 and rev.startswith(exp)):
                    return rev
    raise ResultsError(f"no experiment named '{exp}'; `dvc exp list --all-commits` lists them")


def _experiment_files(exp: str, root: Path) -> dict[str, bytes]:
    rev = _experiment_rev(exp, root)
    listed = _git("ls-tree", "-r", "--name-only", rev, "--", *SAVED, root=root).splitlines()
    return {path: _git_bytes("show", f"{rev}:{path}", root=root) for path in listed}


def _changed_code(root: Path) -> list[str]:
    """Tracked files that differ from the commit, other than the pipeline's params, lock and outputs."""
    changed = _git("status", "--porcelain", "--untracked-files=no", root=root).splitlines()
    paths = [line[3:] for line in changed]
    return [p for p in paths if not p.startswith(SAVED)]


def _git(*args: str, root: Path) -> str:
    return _git_bytes(*args, root=root).decode()


def _git_bytes(*args: str, root: Path) -> bytes:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True)
    if result.returncode != 0:
        raise ResultsError(f"git {args[0]} failed: {first_line(Exception(result.stderr.decode(errors='replace')))}")
    return result.stdout


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _mtime(path: Path) -> str:
    stamp = path.stat().st_mtime if path.exists() else datetime.datetime.now().timestamp()
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat(timespec="seconds")


def time_to_accuracy(history: list[dict], targets: list[float]) -> dict[float, dict | None]:
    """For each validation-accuracy target: the first epoch that reached it and the training time until then
    (the epochs' own times summed; validation and setup left out), or None when no epoch did. `history`: a
    run's plots/train/<model>.csv rows (epoch, val_acc, epoch_time_s)."""
    reached: dict[float, dict | None] = {}
    for target in targets:
        elapsed, found = 0.0, None
        for row in history:
            elapsed += float(row["epoch_time_s"])
            if float(row["val_acc"]) >= target:
                found = {"epoch": int(float(row["epoch"])), "seconds": round(elapsed, 1),
                         "val_acc": float(row["val_acc"])}
                break
        reached[target] = found
    return reached
