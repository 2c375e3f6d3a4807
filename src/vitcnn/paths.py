"""Every file and folder of the pipeline, named once: the stages write and read them through these
names, `compare` and `study` find results by them, and dvc.yaml declares the same paths (a test
checks that each stage reads only what it declares). All are relative to the project's root.

Per-model files are named by the model's registry name; the files that hold every model at once
(a `model` column) are what dvc.yaml's plots read, so that a new model needs no plot of its own.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
LOCK = Path("dvc.lock")  # which code, params and data made the outputs (DVC's)
PREPARED = Path("data/prepared")  # train/val/test .safetensors and meta.json (prepare)
DOWNLOADS = Path("data/raw")  # the official archive, downloaded once
CHECKPOINTS = Path("checkpoints")  # resume checkpoints, <model>/last.pt (neither git's nor DVC's)

MODELS = Path("models")  # <model>/model.safetensors + config.json (train_<model>)
METRICS = Path("metrics")
PLOTS = Path("plots")

EVALUATE = METRICS / "evaluate.json"  # per model: test accuracy, cost, speed (evaluate)
ROBUSTNESS = METRICS / "robustness.json"  # per model: corruption, occlusion, calibration (robustness)
HISTORIES = PLOTS / "train"  # <model>.csv: one row per epoch (train_<model>)
PREDICTIONS = PLOTS / "evaluate" / "predictions"  # <model>.csv: one row per test image (evaluate)
PER_CLASS = PLOTS / "evaluate" / "per_class.csv"  # model, class, accuracy (evaluate)
ROBUSTNESS_PLOTS = PLOTS / "robustness"  # severity.csv, corruptions.csv, occlusion.csv, reliability*.csv, paired.json
PAIRED = ROBUSTNESS_PLOTS / "paired.json"  # each pair of models' differences with their intervals (robustness)
COMPARE = PLOTS / "compare"  # history.csv, tradeoff.csv: every model in one file, for dvc plots (visualize)
IMAGES = PLOTS / "images"  # the figures (visualize)
HEADS = PLOTS / "heads"  # <model>/<image>.png: attention per layer and head (visualize; not in dvc plots)
REPORT = PLOTS / "report.md"  # the one-page comparison (visualize)


def model_dir(name: str) -> Path:
    return MODELS / name


def train_metrics(name: str) -> Path:
    return METRICS / f"train_{name}.json"


def history(name: str) -> Path:
    return HISTORIES / f"{name}.csv"


def predictions(name: str) -> Path:
    return PREDICTIONS / f"{name}.csv"


def checkpoint(name: str) -> Path:
    return CHECKPOINTS / name / "last.pt"


def robustness_table(kind: str) -> Path:
    """plots/robustness/<kind>.csv: severity, corruptions, occlusion, reliability or reliability_ts."""
    return ROBUSTNESS_PLOTS / f"{kind}.csv"
