"""Wall time for the pipeline's training to reach a validation accuracy, at the default recipe.

    python benchmarks/time_to_accuracy.py --model vit|cnn --target 0.6 [--epochs 20] [--precision auto|fp32|bf16]

Reads the prepared data (run `dvc repro prepare` first, e.g. with
data.source=../shared/datasets/cifar10-jpeg.tar.gz), trains with params.yaml's recipe
through the same `fit` the train stages use, and stops at the end of the first epoch
whose validation accuracy reaches the target. Prints one JSON line: the epoch, the
seconds (training + validation, wall clock) and the accuracy reached, or that the
target was not reached within the epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from vitcnn import paths
from vitcnn.config import load_params, recipe_for
from vitcnn.data import load_meta, load_split, normalization
from vitcnn.models import MODELS
from vitcnn.models.store import build_model
from vitcnn.runtime import keep_freed_memory, resolve_device, seed_everything, use_deterministic
from vitcnn.train import fit

PREPARED = paths.PREPARED


class TargetReached(Exception):
    """Raised from the epoch callback to end training once the target is met."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--target", type=float, required=True, help="validation accuracy to reach, 0..1")
    parser.add_argument("--epochs", type=int, help="epoch budget (default: the model's recipe in params.yaml)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="override train.precision")
    args = parser.parse_args()

    params = load_params(models=[args.model])
    overrides = {k: v for k, v in {"epochs": args.epochs, "precision": args.precision}.items() if v is not None}
    cfg = dataclasses.replace(recipe_for(params, args.model), **overrides)
    device = resolve_device(params.device)
    keep_freed_memory()
    meta = load_meta(PREPARED)
    train, val = load_split(PREPARED, "train"), load_split(PREPARED, "val")
    mean, std = normalization(meta, cfg.normalization)
    use_deterministic(cfg.deterministic)
    seed_everything(params.seed)
    model = build_model(args.model, len(meta["classes"]), getattr(params, args.model), meta["image_shape"][0])

    start = time.perf_counter()
    reached: dict = {}

    def check(row: dict) -> None:
        if row["val_acc"] >= args.target:
            reached.update(epoch=row["epoch"], val_acc=row["val_acc"], seconds=round(time.perf_counter() - start, 1))
            raise TargetReached

    try:
        result = fit(model, train, val, cfg, mean, std, device, params.seed, name=args.model, on_epoch=check)
        best = max(r["val_acc"] for r in result.history)
        outcome = {"reached": False, "best_val_acc": best, "seconds": round(time.perf_counter() - start, 1)}
    except TargetReached:
        outcome = {"reached": True, **reached}
    print(json.dumps({"model": args.model, "target": args.target, "device": str(device), "train_images": len(train),
                      "epochs_budget": cfg.epochs, "precision": cfg.precision, "torch": torch.__version__, **outcome}))


if __name__ == "__main__":
    main()
