"""Stage visualize: PNG figures under plots/images/ from the trained models and their results."""

import csv
from pathlib import Path

import numpy as np
import torch

from vitcnn.cli import run_stage
from vitcnn.config import load_params
from vitcnn.errors import ConfigError
from vitcnn.data import BatchLoader, Split, load_meta, load_split
from vitcnn.models import MODELS, load_model
from vitcnn import visualize as viz

PREPARED = Path("data/prepared")
OUT = Path("plots/images")


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    params = load_params()
    cfg = params.visualize
    classes = load_meta(PREPARED)["classes"]
    unknown = sorted(set(cfg.classes) - set(classes))
    if unknown:
        raise ConfigError(f"visualize.classes: {unknown} not in the dataset; allowed: {', '.join(classes)}")
    test = load_split(PREPARED, "test")

    histories = {name: [{k: float(v) for k, v in row.items()} for row in read_rows(Path("plots/train") / f"{name}.csv")]
                 for name in MODELS}
    viz.learning_curves(histories, OUT / "learning_curves.png", cfg.dpi)

    index = {c: i for i, c in enumerate(classes)}
    predictions = {}
    for name in MODELS:
        rows = read_rows(Path("plots/evaluate") / f"{name}_predictions.csv")
        predictions[name] = np.array([index[r["predicted"]] for r in rows])
    actual = test.labels.numpy()
    confusions = {name: viz.confusion_counts(actual, pred, len(classes)) for name, pred in predictions.items()}
    viz.confusion_matrices(confusions, classes, OUT / "confusion.png", cfg.dpi)

    picked = viz.pick_images(actual, classes, cfg.classes, cfg.num_images, params.seed)
    images = test.images[picked]
    sample = Split(images, test.labels[picked])

    def titles(name: str) -> list[str]:
        return [f"{classes[actual[i]]}\n{viz.MODEL_LABELS[name]}: {classes[predictions[name][i]]}" for i in picked]

    with torch.no_grad():
        vit, config = load_model(Path("models/vit"))
        x, _ = next(iter(BatchLoader(sample, len(sample), torch.device("cpu"), config["mean"], config["std"])))
        _, attention = vit.forward_with_attention(x)
        grid = vit.grid_size
        cls_attention = [a[:, :, 0, 1:].mean(1).reshape(-1, grid, grid) for a in attention]  # (B, grid, grid) per layer
        viz.attention_grid(images.numpy(), titles("vit"), cls_attention, OUT / "vit_attention.png", cfg.dpi)

        cnn, config = load_model(Path("models/cnn"))
        x, _ = next(iter(BatchLoader(sample, len(sample), torch.device("cpu"), config["mean"], config["std"])))
        viz.feature_grid(images.numpy(), titles("cnn"), cnn.feature_maps(x), cfg.feature_channels,
                         OUT / "cnn_features.png", cfg.dpi)
    print(f"visualize: wrote {', '.join(sorted(p.name for p in OUT.glob('*.png')))}")


if __name__ == "__main__":
    run_stage("visualize", main)
