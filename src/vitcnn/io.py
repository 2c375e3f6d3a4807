"""Atomic file writes: a crash or Ctrl-C never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# DVC sets this for every stage command: the project's root, also when a queued experiment
# runs in a temporary copy of the project (then it names the project the copy came from).
DVC_ROOT = "DVC_ROOT"


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def project_root() -> Path:
    """The project a stage belongs to: what DVC says (DVC_ROOT), else the working directory.

    Paths in params.yaml are relative to it, and the download cache lives under it, so a
    queued experiment (run in a copy under .dvc/tmp/) finds the same files as `dvc repro`.
    """
    return Path(os.environ.get(DVC_ROOT) or ".")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
