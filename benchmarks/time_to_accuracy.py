"""Training time until the validation accuracy reaches each of some targets.

    python benchmarks/time_to_accuracy.py --model vit|cnn --target 0.8,0.85 [--epochs 20] [--precision auto|fp32|bf16]
    python benchmarks/time_to_accuracy.py --from results/fast-10 --target 0.9,0.93 [--model cnn]

Training: reads the prepared data (run `dvc repro prepare` first, e.g. with
data.source=../shared/datasets/cifar10-jpeg.tar.gz), trains with params.yaml's recipe for
the model through the same `fit` the train stages use, and stops at the end of the first
epoch that reaches the last target. `--from` reads a saved run's per-epoch history instead
(`vitcnn results save`), so a run already made answers without training again. Either way
the time is the epochs' own training time summed (validation and compilation left out), and
one JSON line per model says, for each target, the epoch that reached it and that time, or
that no epoch of the budget did.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import torch

from vitcnn import paths
from vitcnn.config import load_params, recipe_for
from vitcnn.data import load_meta, load_split, normalization
from vitcnn.models import MODELS
from vitcnn.models.store import build_model
from vitcnn.results import time_to_accuracy
from vitcnn.runtime import keep_freed_memory, resolve_device, seed_everything, use_deterministic
from vitcnn.train import fit


class TargetsReached(Exception):
    """Raised from the epoch callback to end training once the last target is met."""


def train_history(model_name: str, targets: list[float], epochs: int | None, precision: str | None) -> list[dict]:
    """The history of a run of params.yaml's recipe for `model_name`, stopped once it reaches every target."""
    params = load_params(models=[model_name])
    overrides = {k: v for k, v in {"epochs": epochs, "precision": precision}.items() if v is not None}
    cfg = dataclasses.replace(recipe_for(params, model_name), **overrides)
    device = resolve_device(params.device)
    keep_freed_memory()
    meta = load_meta(paths.PREPARED)
    train, val = load_split(paths.PREPARED, "train"), load_split(paths.PREPARED, "val")
    mean, std = normalization(meta, cfg.normalization)
    use_deterministic(cfg.deterministic)
    seed_everything(params.seed)
    model = build_model(model_name, len(meta["classes"]), getattr(params, model_name), meta["image_shape"][0])
    history: list[dict] = []

    def check(row: dict) -> None:
        history.append(row)
        if row["val_acc"] >= max(targets):
            raise TargetsReached

    try:
        fit(model, train, val, cfg, mean, std, device, params.seed, name=model_name, on_epoch=check)
    except TargetsReached:
        pass
    return history


def saved_history(folder: Path, model_name: str) -> list[dict]:
    with open(folder / paths.history(model_name), newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, help="the model (with --from: default every model of the run)")
    parser.add_argument("--target", required=True, help="validation accuracies to reach, 0..1, comma-separated")
    parser.add_argument("--from", dest="source", type=Path, help="a saved run (results/NAME) instead of training")
    parser.add_argument("--epochs", type=int, help="epoch budget (default: the model's recipe in params.yaml)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="override train.precision")
    args = parser.parse_args()
    targets = sorted(float(t) for t in args.target.split(","))
    if not args.source and not args.model:
        parser.error("--model is needed to train (or --from a saved run)")
    models = [args.model] if args.model else [m for m in MODELS if (args.source / paths.history(m)).is_file()]
    for name in models:
        history = saved_history(args.source, name) if args.source else train_history(name, targets, args.epochs,
                                                                                      args.precision)
        reached = time_to_accuracy(history, targets)
        print(json.dumps({"model": name, "source": str(args.source or "params.yaml"), "epochs_run": len(history),
                          "best_val_acc": max(float(r["val_acc"]) for r in history), "torch": torch.__version__,
                          "targets": {str(t): found for t, found in reached.items()}}))


if __name__ == "__main__":
    main()
