"""The visualize stage's work, for every registered model: the figures and the one-page report.

Reads what the earlier stages wrote (histories, predictions, per-class accuracy, metrics,
the trained models and the test split) and draws, on a fixed, seeded set of test images
and on each model's most confident mistakes, where each model looks: a model that
`explains` by attention shows its rollout (and its readout's attention per layer and head),
one that explains by Grad-CAM shows that (and its strongest feature maps). Every model is
handled the same way, by its registry entry; nothing here names a model.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vitcnn import explain
from vitcnn import visualize as viz
from vitcnn.config import VisualizeConfig
from vitcnn.data import BatchLoader, Split
from vitcnn.io import atomic_write, read_json, write_csv
from vitcnn.models import MODELS, REGISTRY
from vitcnn.models.store import load_model

COPIED_TO_EVALUATE = ("params", "train_time_s")  # training metrics that metrics/evaluate.json repeats
CPU = torch.device("cpu")


@dataclass
class Results:
    """What the earlier stages wrote, per model, and the test split they were measured on."""

    classes: list[str]
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
    corruptions: dict[str, list[dict]]  # rows of plots/robustness/corruptions/<model>.csv
    occlusion: dict[str, list[dict]]
    reliability: dict[str, dict[str, list[dict]]]  # {model: {"reliability" | "reliability_ts": bins}}

    @property
    def actual(self) -> np.ndarray:
        return self.test.labels.numpy()


def read_results(classes: list[str], test: Split, plots: Path, metrics_dir: Path, models_dir: Path) -> Results:
    index = {c: i for i, c in enumerate(classes)}
    histories = {name: [{k: float(v) for k, v in row.items()} for row in _rows(plots / "train" / f"{name}.csv")]
                 for name in MODELS}
    predictions = {name: _rows(plots / "evaluate" / f"{name}_predictions.csv") for name in MODELS}
    return Results(
        classes=classes,
        test=test,
        histories=histories,
        predicted={n: np.array([index[r["predicted"]] for r in rows]) for n, rows in predictions.items()},
        confidence={n: np.array([float(r["confidence"]) for r in rows]) for n, rows in predictions.items()},
        per_class={n: [r["accuracy"] for r in _rows(plots / "evaluate" / "per_class" / f"{n}.csv")] for n in MODELS},
        metrics=read_json(metrics_dir / "evaluate.json"),
        train_metrics={n: read_json(metrics_dir / f"train_{n}.json") for n in MODELS},
        models={n: load_model(models_dir / n) for n in MODELS},
        robustness=read_json(metrics_dir / "robustness.json"),
        paired=read_json(plots / "robustness" / "paired.json"),
        corruptions={n: _rows(plots / "robustness" / "corruptions" / f"{n}.csv") for n in MODELS},
        occlusion={n: _rows(plots / "robustness" / "occlusion" / f"{n}.csv") for n in MODELS},
        reliability={n: {kind: _rows(plots / "robustness" / kind / f"{n}.csv")
                         for kind in ("reliability", "reliability_ts")} for n in MODELS},
    )


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@dataclass
class Looks:
    """Where a model looks on some images, and what that was computed from."""

    title: str  # the figure column's title, e.g. "ViT rollout"
    relevance: torch.Tensor  # (B, h, w)
    inputs: torch.Tensor  # the normalised images, (B, C, H, W)
    attention: list[torch.Tensor] | None = None  # attention models: per layer (B, heads, N, N)
    readout: torch.Tensor | None = None  # attention models: (B, N)


class Figures:
    """Draws every figure of `results` into `out` (PNG), with the settings of `cfg`."""

    def __init__(self, results: Results, cfg: VisualizeConfig, seed: int, out: Path):
        self.r, self.cfg, self.out = results, cfg, out
        self.sample = viz.pick_images(results.actual, results.classes, cfg.classes, cfg.num_images, seed)
        self.mistakes = {n: viz.confident_mistakes(results.actual, results.predicted[n], results.confidence[n],
                                                   results.classes, cfg.classes, cfg.mistakes) for n in MODELS}
        self.head_figures: dict[str, list[Path]] = {}

    def draw(self) -> None:
        r, cfg, out = self.r, self.cfg, self.out
        viz.learning_curves(r.histories, out / "learning_curves.png", cfg.dpi)
        confusions = {n: viz.confusion_counts(r.actual, r.predicted[n], len(r.classes)) for n in MODELS}
        viz.confusion_matrices(confusions, r.classes, out / "confusion.png", cfg.dpi)
        viz.per_class_bars({n: [float(a) for a in acc] for n, acc in r.per_class.items()}, r.classes,
                           out / "per_class.png", cfg.dpi)
        viz.tradeoffs(r.metrics, out / "tradeoffs.png", cfg.dpi)
        viz.robustness_curves(r.corruptions, {n: r.robustness[n]["subset_clean_acc"] for n in MODELS},
                              out / "robustness.png", cfg.dpi)
        viz.occlusion_curves(r.occlusion, out / "occlusion.png", cfg.dpi)
        viz.reliability_diagrams(r.reliability, r.robustness, out / "reliability.png", cfg.dpi)

        sample_looks = self.where_models_look(self.sample, "fixed, seeded test images", out / "compare_sample.png")
        for name, picked in self.mistakes.items():
            if len(picked):  # a model may make no mistake at all
                self.where_models_look(picked, f"the {viz.label(name)}'s most confident mistakes",
                                       out / f"compare_{name}_mistakes.png")
        for name in MODELS:
            self.on_its_own(name, sample_looks[name])
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

    def looks(self, name: str, picked: np.ndarray) -> Looks:
        """Where model `name` looks on test images `picked`: rollout, or Grad-CAM of its prediction."""
        model, spec = self.r.models[name][0], REGISTRY[name]
        x = self.inputs(name, picked)
        if spec.explains == "attention":
            with torch.no_grad():
                _, attention, readout = model.forward_with_attention(x)  # per layer (B, heads, N, N); (B, N)
            rollout = explain.rollout_map(attention, readout, model.grid_size, model.num_prefix_tokens)
            return Looks(f"{spec.label} rollout", rollout, x, attention, readout)
        target = torch.from_numpy(self.r.predicted[name][picked])
        return Looks(f"{spec.label} Grad-CAM", explain.gradcam(model, x, target), x)

    def where_models_look(self, picked: np.ndarray, title: str, path: Path) -> dict[str, Looks]:
        """Figure: the image, then each model's relevance map, with its prediction under it."""
        looks = {name: self.looks(name, picked) for name in MODELS}
        viz.overlay_grid(self.r.test.images[picked].numpy(), {lk.title: lk.relevance for lk in looks.values()},
                         f"Where each model looks: {title}", self.row_labels(picked), "relevance (scaled per map)",
                         path, self.cfg.dpi, captions={looks[n].title: self.captions(n, picked) for n in MODELS})
        return looks

    def on_its_own(self, name: str, looks: Looks) -> None:
        """Model `name` alone on the seeded images: attention per layer and head, or feature maps."""
        model, spec = self.r.models[name][0], REGISTRY[name]
        images, labels = self.r.test.images[self.sample].numpy(), self.row_labels(self.sample)
        if spec.explains == "attention":
            heads = explain.readout_attention(looks.attention, looks.readout, model.grid_size, model.num_prefix_tokens)
            layers = {f"layer {i + 1}": heads[:, i].mean(1) for i in range(heads.shape[1])}  # (B, grid, grid)
            viz.overlay_grid(images, layers | {"rollout": looks.relevance},
                             f"{spec.label}: the readout's attention over the patches per layer (mean over heads), "
                             "and rollout", labels, "attention (scaled per map)", self.out / f"{name}_attention.png",
                             self.cfg.dpi, captions={"rollout": self.captions(name, self.sample)})
            paths = [self.out / f"{name}_heads" / f"{rank + 1:02d}_test{i}_{self.r.classes[self.r.actual[i]]}.png"
                     for rank, i in enumerate(self.sample)]
            for image, maps, i, path in zip(images, heads, self.sample, paths):
                viz.attention_heads(image, maps, f"{spec.label}: the readout's attention per layer and head, "
                                    f"test #{i}, true: {self.r.classes[self.r.actual[i]]}, "
                                    f"{self.captions(name, [i])[0][0]}", path, self.cfg.dpi)
            self.head_figures[name] = paths
        else:
            with torch.no_grad():
                block_maps = model.feature_maps(looks.inputs)
            viz.feature_grid(images, labels, block_maps, self.cfg.feature_channels, looks.relevance,
                             self.captions(name, self.sample), self.out / f"{name}_features.png", self.cfg.dpi,
                             title=f"{spec.label}: the {self.cfg.feature_channels} strongest feature maps of each "
                                   "block, and Grad-CAM of the predicted class")


def tradeoff_tables(metrics: dict[str, dict], out: Path) -> None:
    """plots/compare/tradeoff/<model>.csv: one row of cost and accuracy per model, for dvc plots."""
    for name in MODELS:
        write_csv(out / "tradeoff" / f"{name}.csv", ["model", *viz.TRADEOFF_FIELDS],
                  [[viz.label(name), *(metrics[name][k] for k in viz.TRADEOFF_FIELDS)]])


def write_report(results: Results, figures: Figures, dataset: str, path: Path) -> None:
    """The one-page report: metrics, how the models were set up and trained, per-class accuracy, figures."""
    setups = {}
    for name in MODELS:
        config, trained = results.models[name][1], results.train_metrics[name]
        setup = {f"`{name}.{k}`": v for k, v in config["params"].items()}
        setup |= {f"`{k}` (recipe)": v for k, v in trained.get("recipe", {}).items()}
        setup |= {f"`{k}` (training)": v for k, v in trained.items() if k not in (*COPIED_TO_EVALUATE, "recipe")}
        setup |= {"input mean": config["mean"], "input std": config["std"]}
        setups[name] = setup

    def link(p: Path) -> str:
        return Path(os.path.relpath(p, path.parent)).as_posix()

    out = figures.out
    captions = viz.figure_captions([REGISTRY[n] for n in MODELS])
    listed = [(heading, link(out / f"{stem}.png"), text) for stem, (heading, text) in captions.items()
              if (out / f"{stem}.png").is_file()]
    for name, paths in figures.head_figures.items():
        listed.append((f"{viz.label(name)} attention per head", link(paths[0]),
                       "The readout's attention in every layer and head, one figure per seeded image: "
                       + ", ".join(f"[{p.stem}]({link(p)})" for p in paths) + ". The first:"))
    intro = (f"{len(results.test)} test images of {dataset}. Written by the `visualize` stage of `dvc repro` from "
             "`metrics/`, `models/*/config.json` and `plots/evaluate/`; every figure is in "
             f"`{out.as_posix()}/`.")
    title = f"{' vs '.join(viz.label(n) for n in MODELS)} on {dataset}"
    text = viz.report(title, intro, results.metrics, setups, results.classes, results.per_class, results.robustness,
                      results.paired, listed)
    with atomic_write(path) as tmp:
        tmp.write_text(text)
