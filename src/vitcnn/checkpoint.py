"""Resume checkpoints: everything a training run needs to go on exactly where it stopped.

A `Checkpoint` holds the model, optimizer, the EMA's weights, every random state (python,
numpy, torch CPU and CUDA, the loader's generator) and the run so far (history, the selected
weights, time), with the fingerprint of the params and data it belongs to and the version of
its layout. It is written atomically at the end of each epoch, so killing the process at any
moment leaves the previous one loadable, and it is read with `torch.load(weights_only=True)`:
tensors and plain values only, nothing executable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcnn.io import atomic_write

log = logging.getLogger(__name__)


def fingerprint(*parts: Any, files: tuple[Path, ...] = ()) -> str:
    """sha256 over the reprs of `parts` and the bytes of `files`: what a checkpoint belongs to."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def rng_states(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": generator.get_state(),
    }


def restore_rng_states(states: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(_as_tuples(states["python"]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    generator.set_state(states["loader"])


def _as_tuples(value: Any) -> Any:
    # random.setstate wants the nested tuples that getstate gave
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


VERSION = 2  # of the layout below; a checkpoint of another version is not resumed


@dataclass
class Checkpoint:
    """A training run's state at the end of an epoch."""

    fingerprint: str  # of the params and data the run belongs to
    model: dict[str, torch.Tensor]  # the live weights
    optimizer: dict[str, Any]  # optimizer.state_dict()
    ema: dict[str, torch.Tensor]  # the EMA's weights; {} without one
    rng: dict[str, Any]  # rng_states()
    run: dict[str, Any]  # the run so far (train.RunState, as a dict)
    version: int = VERSION


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    with atomic_write(path) as tmp:
        torch.save(dataclasses.asdict(checkpoint), tmp)


def load_checkpoint(path: Path, fingerprint: str) -> Checkpoint | None:
    """The checkpoint at `path` if it belongs to this run (same fingerprint, this layout), else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: training from scratch loses nothing
        log.warning("ignoring unreadable checkpoint %s (%s); starting fresh", path, exc)
        return None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        log.info("checkpoint %s was written by another version of this code; starting fresh", path)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("checkpoint %s is for other params or data; starting fresh", path)
        return None
    return Checkpoint(**{f.name: state[f.name] for f in dataclasses.fields(Checkpoint)})
