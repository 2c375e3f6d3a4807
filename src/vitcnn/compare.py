"""The visualize stage's work, for every registered model: what the earlier stages wrote, the images
the figures show, the figures, and the data `dvc plots` reads.

Reads what the earlier stages wrote (histories, predictions, per-class accuracy, metrics, the
trained models and the test split) and chooses the images to show: a fixed, seeded set of test
images, and each model's most confident mistakes. On them it shows where each model looks, in
each way its registry entry says it can (`ModelSpec.explains`: attention, Grad-CAM). Every model
is handled the same way; nothing here names a model.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vitcnn import explain, paths
from vitcnn import visualize as viz
from vitcnn.config import VisualizeConfig
from vitcnn.data import BatchLoader, Split, load_meta, load_split
from vitcnn.io import read_json, write_csv
from vitcnn.models import MODELS, REGISTRY, label
from vitcnn.models.spec import Attention, GradCam
from vitcnn.models.store import load_model

CPU = torch.device("cpu")
# One row per model for dvc plots' cost-against-accuracy charts, from metrics/evaluate.json.
TRADEOFF_FIELDS = ["test_acc", "params", "flops_per_image", "train_time_s", "inference_images_per_s", "latency_ms"]


@dataclass
class Results:
    """What the earlier stages wrote, per model, and the data set they were measured on."""

    meta: dict  # data/prepared/meta.json: classes, counts, source, image size
    test: Split
    histories: dict[str, list[dict[str, float]]]
    predicted: dict[str, np.ndarray]  # class index per test image
    confidence: dict[str, np.ndarray]
    per_class: dict[str, list[str]]  # accuracy per class, as written
    metrics: dict[str, dict]  # metrics/evaluate.json
    train_metrics: dict[str, dict]  # metrics/train_<model>.json
    models: dict[str, tuple[nn.Module, dict]]  # (model in eval mode on the CPU, its config.json)
    robustness: dict[str, dict]  # metrics/robustness.json
    paired: list[dict]  # plots/robustness/paired.json: differences between models with their intervals
    corruptions: dict[str, list[dict]]  # rows of plots/robustness/corruptions.csv, per model
    occlusion: dict[str, list[dict]]
    reliability: dict[str, dict[str, list[dict]]]  # {model: {"reliability" | "reliability_ts": bins}}

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def actual(self) -> np.ndarray:
        return self.test.labels.numpy()


def read_results(root: Path = Path(".")) -> Results:
    """Everything the earlier stages wrote, under the project `root`."""
    predictions = {name: _rows(root / paths.predictions(name)) for name in MODELS}
    per_class = _by_model(_rows(root / paths.PER_CLASS))
    robustness_tables = {kind: _by_model(_rows(root / paths.robustness_table(kind)))
                         for kind in ("corruptions", "occlusion", "reliability", "reliability_ts")}
    return Results(
        meta=load_meta(root / paths.PREPARED),
        test=load_split(root / paths.PREPARED, "test"),
        histories={name: [{k: float(v) for k, v in row.items()} for row in _rows(root / paths.history(name))]
                   for name in MODELS},
        predicted={n: np.array([int(r["predicted_index"]) for r in rows]) for n, rows in predictions.items()},
        confidence={n: np.array([float(r["confidence"]) for r in rows]) for n, rows in predictions.items()},
        per_class={n: [r["accuracy"] for r in per_class[n]] for n in MODELS},
        metrics=read_json(root / paths.EVALUATE),
        train_metrics={n: read_json(root / paths.train_metrics(n)) for n in MODELS},
        models={n: load_model(root / paths.model_dir(n)) for n in MODELS},
        robustness=read_json(root / paths.ROBUSTNESS),
        paired=read_json(root / paths.PAIRED),
        corruptions={n: robustness_tables["corruptions"][n] for n in MODELS},
        occlusion={n: robustness_tables["occlusion"][n] for n in MODELS},
        reliability={n: {kind: robustness_tables[kind][n] for kind in ("reliability", "reliability_ts")}
                     for n in MODELS},
    )


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _by_model(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows of a file that holds every model (a `model` column), per model, without that column."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[row["model"]].append({k: v for k, v in row.items() if k != "model"})
    return grouped


# --- which images the figures show ----------------------------------------------------------------


def pick_images(labels: np.ndarray, classes: list[str], wanted: list[str], count: int, seed: int) -> np.ndarray:
    """A fixed, seeded choice of test indices, cycling through the wanted classes (all if empty)."""
    rng = np.random.default_rng(seed)
    names = wanted or classes
    pools = [rng.permutation(np.flatnonzero(labels == classes.index(n))).tolist() for n in names]
    picked = []
    while len(picked) < count and any(pools):
        for pool in pools:
            if pool and len(picked) < count:
                picked.append(pool.pop(0))
    return np.array(picked)


def confident_mistakes(
    actual: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, classes: list[str], wanted: list[str], count: int
) -> np.ndarray:
    """Indices of the `count` wrong predictions made with the highest confidence (ties: lower index first),
    among images of the wanted classes (all if empty)."""
    allowed = np.isin(actual, [classes.index(n) for n in wanted or classes])
    wrong = np.flatnonzero((predicted != actual) & allowed)
    order = np.argsort(-confidence[wrong], kind="stable")
    return wrong[order[:count]]


# --- the figures ---------------------------------------------------------------------------------------


class Figures:
    """Draws every figure of `results` into `out` (PNG) and the attention-per-head figures into `heads`."""

    def __init__(self, results: Results, cfg: VisualizeConfig, seed: int, out: Path, heads: Path):
        self.r, self.cfg, self.out, self.heads = results, cfg, out, heads
        self.sample = pick_images(results.actual, results.classes, cfg.classes, cfg.num_images, seed)
        self.mistakes = {n: confident_mistakes(results.actual, results.predicted[n], results.confidence[n],
                                               results.classes, cfg.classes, cfg.mistakes) for n in MODELS}
        self.head_figures: dict[str, list[Path]] = {}

    def draw(self) -> None:
        r, cfg, out = self.r, self.cfg, self.out
        viz.learning_curves(r.histories, out / "learning_curves.png", cfg.dpi)
        confusions = {n: viz.confusion_counts(r.actual, r.predicted[n], len(r.classes)) for n in MODELS}
        viz.confusion_matrices(confusions, r.classes, out / "confusion.png", cfg.dpi)
        viz.per_class_bars({n: [float(a) for a in acc] for n, acc in r.per_class.items()}, r.classes,
                           out / "per_class.png", cfg.dpi)
        viz.tradeoffs(tradeoff_rows(r), out / "tradeoffs.png", cfg.dpi)
        viz.robustness_curves(r.corruptions, {n: r.robustness[n]["subset_clean_acc"] for n in MODELS},
                              out / "robustness.png", cfg.dpi)
        viz.occlusion_curves(r.occlusion, out / "occlusion.png", cfg.dpi)
        viz.reliability_diagrams(r.reliability, r.robustness, out / "reliability.png", cfg.dpi)

        sample_looks = self.where_models_look(self.sample, "fixed, seeded test images", out / "compare_sample.png")
        for name, picked in self.mistakes.items():
            if len(picked):  # a model may make no mistake at all
                self.where_models_look(picked, f"the {label(name)}'s most confident mistakes",
                                       out / f"compare_{name}_mistakes.png")
        for name in MODELS:
            for looks in sample_looks[name]:
                self.on_its_own(name, looks)
        viz.mistakes_grid({n: r.test.images[m].numpy() for n, m in self.mistakes.items()},
                          {n: [f"test #{i}\ntrue: {r.classes[r.actual[i]]}\n"
                               f"pred: {r.classes[r.predicted[n][i]]} {100 * r.confidence[n][i]:.0f}%" for i in m]
                           for n, m in self.mistakes.items()}, cfg.mistakes, out / "mistakes.png", cfg.dpi)

    def inputs(self, name: str, picked: np.ndarray) -> torch.Tensor:
        """Test images `picked`, normalised as model `name` was trained: (B, C, H, W)."""
        config = self.r.models[name][1]
        sample = Split(self.r.test.images[picked], self.r.test.labels[picked])
        return next(iter(BatchLoader(sample, len(sample), CPU, config["mean"], config["std"])))[0]

    def captions(self, name: str, picked) -> list[tuple[str, str]]:
        r = self.r
        return [viz.prediction_caption(name, r.classes[r.predicted[name][i]], r.confidence[name][i],
                                       r.predicted[name][i] == r.actual[i]) for i in picked]

    def row_labels(self, picked) -> list[str]:
        return [f"test #{i}\ntrue: {self.r.classes[self.r.actual[i]]}" for i in picked]

    def looks(self, name: str, picked: np.ndarray) -> list[explain.Looks]:
        """Where model `name` looks on test images `picked`, in each way it can show (of its prediction)."""
        model, x = self.r.models[name][0], self.inputs(name, picked)
        target = torch.from_numpy(self.r.predicted[name][picked])
        return [explain.where_it_looks(model, how, x, target) for how in REGISTRY[name].explains]

    def where_models_look(self, picked: np.ndarray, title: str, path: Path) -> dict[str, list[explain.Looks]]:
        """Figure: the image, then each model's relevance maps, with its prediction under them."""
        looks = {name: self.looks(name, picked) for name in MODELS}
        columns = {f"{label(n)} {lk.how.title}": (n, lk) for n in MODELS for lk in looks[n]}
        viz.overlay_grid(self.r.test.images[picked].numpy(), {t: lk.relevance for t, (_, lk) in columns.items()},
                         f"Where each model looks: {title}", self.row_labels(picked), "relevance (scaled per map)",
                         path, self.cfg.dpi, captions={t: self.captions(n, picked) for t, (n, _) in columns.items()})
        return looks

    def on_its_own(self, name: str, looks: explain.Looks) -> None:
        """Model `name` alone on the seeded images: its attention per layer and head, or its feature maps."""
        model, shown = self.r.models[name][0], label(name)
        images, labels = self.r.test.images[self.sample].numpy(), self.row_labels(self.sample)
        if isinstance(looks.how, Attention):
            heads = explain.readout_attention(looks.attention, looks.readout, model.grid_size, model.num_prefix_tokens)
            layers = {f"layer {i + 1}": heads[:, i].mean(1) for i in range(heads.shape[1])}  # (B, grid, grid)
            viz.overlay_grid(images, layers | {"rollout": looks.relevance},
                             f"{shown}: the readout's attention over the patches per layer (mean over heads), "
                             "and rollout", labels, "attention (scaled per map)", self.out / f"{name}_attention.png",
                             self.cfg.dpi, captions={"rollout": self.captions(name, self.sample)})
            paths_ = [self.heads / name / f"{rank + 1:02d}_test{i}_{self.r.classes[self.r.actual[i]]}.png"
                      for rank, i in enumerate(self.sample)]
            for image, maps, i, path in zip(images, heads, self.sample, paths_):
                viz.attention_heads(image, maps, f"{shown}: the readout's attention per layer and head, "
                                    f"test #{i}, true: {self.r.classes[self.r.actual[i]]}, "
                                    f"{self.captions(name, [i])[0][0]}", path, self.cfg.dpi)
            self.head_figures[name] = paths_
        elif isinstance(looks.how, GradCam):
            with torch.no_grad():
                block_maps = model.feature_maps(looks.inputs)
            viz.feature_grid(images, labels, block_maps, self.cfg.feature_channels, looks.relevance,
                             self.captions(name, self.sample), self.out / f"{name}_features.png", self.cfg.dpi,
                             title=f"{shown}: the {self.cfg.feature_channels} strongest feature maps of each "
                                   "block, and Grad-CAM of the predicted class")


# --- the data dvc plots reads: every model in one file ------------------------------------------------


def tradeoff_rows(results: Results) -> dict[str, dict]:
    """Per model: test accuracy and each cost."""
    return {n: {k: results.metrics[n][k] for k in TRADEOFF_FIELDS} for n in MODELS}


def write_plot_data(results: Results, root: Path, out: Path) -> None:
    """plots/compare/history.csv (every model's epochs, as each training stage wrote them) and tradeoff.csv
    (one row per model)."""
    histories = {n: _rows(root / paths.history(n)) for n in MODELS}
    columns = list(dict.fromkeys(k for rows in histories.values() for row in rows for k in row))
    write_csv(out / "history.csv", ["model", *columns],
              [[n, *(row.get(k, "") for k in columns)] for n, rows in histories.items() for row in rows])
    write_csv(out / "tradeoff.csv", ["model", *TRADEOFF_FIELDS],
              [[n, *values.values()] for n, values in tradeoff_rows(results).items()])
