"""Stage visualize: figures under plots/images/, a one-row trade-off table
per model under plots/compare/ (for `dvc plots`), and the one-page report plots/report.md.

Everything runs on the CPU in fp32, on a fixed, seeded set of test images and on the test
images each model gets wrong most confidently (by evaluate's predictions and confidences).
"""

import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch

# This checkout's library first: a queued experiment runs in a copy of the project, and must run
# the code DVC hashed for it there, not the copy an editable install points to.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vitcnn import explain
from vitcnn import visualize as viz
from vitcnn.cli import run_stage
from vitcnn.config import load_params, params_dict
from vitcnn.data import BatchLoader, Split, load_meta, load_split
from vitcnn.errors import ConfigError
from vitcnn.io import atomic_write, read_json, write_csv
from vitcnn.models import MODELS, load_model

PREPARED = Path("data/prepared")
OUT = Path("plots/images")
COMPARE = Path("plots/compare")  # per model: tradeoff/<model>.csv (one row), for dvc plots
REPORT = Path("plots/report.md")
COPIED_TO_EVALUATE = ("params", "train_time_s")  # training metrics that metrics/evaluate.json repeats


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    params = load_params()
    cfg = params.visualize
    meta = load_meta(PREPARED)
    classes = meta["classes"]
    unknown = sorted(set(cfg.classes) - set(classes))
    if unknown:
        raise ConfigError(f"visualize.classes: {unknown} not in the dataset; allowed: {', '.join(classes)}")
    test = load_split(PREPARED, "test")
    actual = test.labels.numpy()

    # Results of the earlier stages: curves, confusion, per-class accuracy, costs.
    histories = {name: [{k: float(v) for k, v in row.items()} for row in read_rows(Path("plots/train") / f"{name}.csv")]
                 for name in MODELS}
    viz.learning_curves(histories, OUT / "learning_curves.png", cfg.dpi)
    index = {c: i for i, c in enumerate(classes)}
    predictions = {name: read_rows(Path("plots/evaluate") / f"{name}_predictions.csv") for name in MODELS}
    predicted = {name: np.array([index[r["predicted"]] for r in rows]) for name, rows in predictions.items()}
    confidence = {name: np.array([float(r["confidence"]) for r in rows]) for name, rows in predictions.items()}
    confusions = {name: viz.confusion_counts(actual, pred, len(classes)) for name, pred in predicted.items()}
    viz.confusion_matrices(confusions, classes, OUT / "confusion.png", cfg.dpi)
    per_class = {name: [row["accuracy"] for row in read_rows(Path("plots/evaluate/per_class") / f"{name}.csv")]
                 for name in MODELS}
    viz.per_class_bars({n: [float(a) for a in acc] for n, acc in per_class.items()}, classes,
                       OUT / "per_class.png", cfg.dpi)
    metrics = read_json(Path("metrics/evaluate.json"))
    for name in MODELS:
        write_csv(COMPARE / "tradeoff" / f"{name}.csv", ["model", *viz.TRADEOFF_FIELDS],
                  [[viz.MODEL_LABELS[name], *(metrics[name][k] for k in viz.TRADEOFF_FIELDS)]])
    viz.tradeoffs(metrics, OUT / "tradeoffs.png", cfg.dpi)

    # Where the models look, on the seeded images and on each model's confident mistakes.
    (vit, vit_config), (cnn, cnn_config) = load_model(Path("models/vit")), load_model(Path("models/cnn"))

    def inputs(config: dict, picked: np.ndarray) -> torch.Tensor:
        sample = Split(test.images[picked], test.labels[picked])
        return next(iter(BatchLoader(sample, len(sample), torch.device("cpu"), config["mean"], config["std"])))[0]

    def captions(name: str, picked: np.ndarray) -> list[tuple[str, str]]:
        return [viz.prediction_caption(name, classes[predicted[name][i]], confidence[name][i],
                                       predicted[name][i] == actual[i]) for i in picked]

    def row_labels(picked: np.ndarray) -> list[str]:
        return [f"test #{i}\ntrue: {classes[actual[i]]}" for i in picked]

    def where_models_look(picked: np.ndarray, title: str, path: Path) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Figure: image | ViT rollout | CNN Grad-CAM; returns the attention maps, rollout and CAM it drew."""
        with torch.no_grad():
            _, attention = vit.forward_with_attention(inputs(vit_config, picked))  # per layer (B, heads, N, N)
        rollout = explain.cls_rollout(attention, vit.grid_size)  # (B, grid, grid)
        cam = explain.gradcam(cnn, inputs(cnn_config, picked), torch.from_numpy(predicted["cnn"][picked]))
        viz.overlay_grid(test.images[picked].numpy(), {"ViT rollout": rollout, "CNN Grad-CAM": cam},
                         f"Where each model looks: {title}", row_labels(picked), "relevance (scaled per map)",
                         path, cfg.dpi,
                         captions={"ViT rollout": captions("vit", picked), "CNN Grad-CAM": captions("cnn", picked)})
        return attention, rollout, cam

    sample = viz.pick_images(actual, classes, cfg.classes, cfg.num_images, params.seed)
    attention, sample_rollout, sample_cam = where_models_look(sample, "fixed, seeded test images",
                                                              OUT / "compare_sample.png")
    heads = explain.cls_attention(attention, vit.grid_size)  # (B, layers, heads, grid, grid)
    mistakes = {n: viz.confident_mistakes(actual, predicted[n], confidence[n], classes, cfg.classes, cfg.mistakes)
                for n in MODELS}
    for name, picked in mistakes.items():
        if len(picked):  # a model may make no mistake at all
            where_models_look(picked, f"the {viz.MODEL_LABELS[name]}'s most confident mistakes",
                              OUT / f"compare_{name}_mistakes.png")

    # Each model on its own, on the seeded images: the ViT per layer and head, the CNN per block.
    images = test.images[sample].numpy()
    layers = {f"layer {l + 1}": heads[:, l].mean(1) for l in range(heads.shape[1])}
    viz.overlay_grid(images, layers | {"rollout": sample_rollout},
                     "ViT: CLS-token attention over the patches per layer (mean over heads), and rollout",
                     row_labels(sample), "CLS attention (scaled per map)", OUT / "vit_attention.png", cfg.dpi,
                     captions={"rollout": captions("vit", sample)})
    head_figures = [OUT / "vit_heads" / f"{rank + 1:02d}_test{i}_{classes[actual[i]]}.png"
                    for rank, i in enumerate(sample)]
    for image, maps, i, path in zip(images, heads, sample, head_figures):
        viz.attention_heads(image, maps, f"ViT: CLS attention per layer and head, test #{i}, true: "
                            f"{classes[actual[i]]}, {captions('vit', [i])[0][0]}", path, cfg.dpi)
    with torch.no_grad():
        block_maps = cnn.feature_maps(inputs(cnn_config, sample))
    viz.feature_grid(images, row_labels(sample), block_maps, cfg.feature_channels, sample_cam,
                     captions("cnn", sample), OUT / "cnn_features.png", cfg.dpi)
    viz.mistakes_grid({n: test.images[m].numpy() for n, m in mistakes.items()},
                      {n: [f"test #{i}\ntrue: {classes[actual[i]]}\n"
                           f"pred: {classes[predicted[n][i]]} {100 * confidence[n][i]:.0f}%" for i in m]
                       for n, m in mistakes.items()}, cfg.mistakes, OUT / "mistakes.png", cfg.dpi)

    # The one-page report.
    configs = {"vit": vit_config, "cnn": cnn_config}
    setups = {name: {f"`{name}.{k}`": v for k, v in configs[name]["kwargs"].items()} for name in MODELS}
    for name in MODELS:  # after every model's own section, so the table lists those first
        train_metrics = read_json(Path("metrics") / f"train_{name}.json")
        setups[name] |= {f"`{k}` (training)": v for k, v in train_metrics.items() if k not in COPIED_TO_EVALUATE}
        setups[name] |= {"input mean": configs[name]["mean"], "input std": configs[name]["std"]}
    shared = {f"`train.{k}`": v for k, v in params_dict(params.train).items()}

    def link(path: Path) -> str:
        return Path(os.path.relpath(path, REPORT.parent)).as_posix()

    figures = [(heading, link(OUT / f"{stem}.png"), text) for stem, (heading, text) in viz.FIGURES.items()
               if (OUT / f"{stem}.png").is_file()]
    figures.append(("ViT attention per head", link(head_figures[0]), "The CLS token's attention in every layer "
                    "and head, one figure per seeded image: " + ", ".join(
                        f"[{p.stem}]({link(p)})" for p in head_figures) + ". The first:"))
    intro = (f"{len(test)} test images of {meta['dataset']}. Written by the `visualize` stage of `dvc repro` from "
             "`metrics/`, `models/*/config.json`, `plots/evaluate/` and `params.yaml`; every figure is in "
             "`plots/images/`.")
    text = viz.report(f"ViT vs CNN on {meta['dataset']}", intro, metrics, setups, shared, classes, per_class, figures)
    with atomic_write(REPORT) as tmp:
        tmp.write_text(text)
    print(f"visualize: wrote {REPORT}, {len(list(OUT.rglob('*.png')))} figures under {OUT}/ "
          f"and the data under {COMPARE}/")


if __name__ == "__main__":
    run_stage("visualize", main)
