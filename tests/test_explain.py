"""Where the models look, and the report: attention rollout, Grad-CAM, the choice of images,
and the visualize stage end to end on a tiny generated project (its report must carry both
models' numbers exactly as metrics/evaluate.json writes them).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitcnn import compare, explain
from vitcnn import report as report_text
from vitcnn import visualize as viz
from vitcnn.data import FIXED_MEAN, FIXED_STD, write_prepared
from vitcnn.io import write_csv, write_json
from vitcnn.models import MODELS, REGISTRY
from vitcnn.models.store import build_model, save_model

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The rollout tests need two layers and a coarse grid: on top of the registry's tiny ViT.
TINY = {"vit": {"patch_size": 8, "depth": 2, "dropout": 0.1}}


def tiny_params(name: str, **overrides):
    return dataclasses.replace(REGISTRY[name].params(), **{**REGISTRY[name].tiny, **TINY.get(name, {}), **overrides})


def tiny(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, len(CLASSES), tiny_params(name, **overrides), 32).eval()


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def attention_of(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's attention weights and the head's readout."""
    with torch.no_grad():
        _, maps, readout = model.forward_with_attention(x)
    return maps, readout


# --- ViT: the readout's attention, and rollout --------------------------------------------------


@pytest.mark.parametrize("patch_size", [4, 8, 16])
def test_rollout_rows_sum_to_one_and_the_cls_map_has_the_patch_grid_shape(patch_size):
    model = tiny("vit", patch_size=patch_size)
    attention, readout = attention_of(model, images(batch=3))
    grid = 32 // patch_size
    n = 1 + grid**2

    rollout = explain.attention_rollout(attention)
    assert rollout.shape == (3, n, n)
    assert (rollout >= 0).all()
    torch.testing.assert_close(rollout.sum(-1), torch.ones(3, n))

    cls_map = explain.rollout_map(attention, readout, grid)
    assert cls_map.shape == (3, grid, grid) == (3, model.grid_size, model.grid_size)
    torch.testing.assert_close(cls_map.sum((1, 2)), torch.ones(3))
    # With a CLS token the readout is the CLS row: the map is the rollout's CLS row over the patches.
    expected = rollout[:, 0, 1:] / rollout[:, 0, 1:].sum(-1, keepdim=True)
    torch.testing.assert_close(cls_map.flatten(1), expected)


def _softmax_rows(batch: int, heads: int, n: int, seed: int) -> torch.Tensor:
    logits = torch.randn(batch, heads, n, n, generator=torch.Generator().manual_seed(seed))
    return logits.softmax(-1)


def test_rollout_averages_heads_adds_the_residual_and_multiplies_later_layers_on_the_left():
    first, second = _softmax_rows(2, 3, 5, seed=1), _softmax_rows(2, 3, 5, seed=2)
    eye = torch.eye(5)
    step1, step2 = 0.5 * (first.mean(1) + eye), 0.5 * (second.mean(1) + eye)  # rows of A + I sum to 2
    torch.testing.assert_close(explain.attention_rollout([first]), step1)
    torch.testing.assert_close(explain.attention_rollout([first, second]), step2 @ step1)


def test_rollout_follows_information_through_the_layers():
    # Layer 1: patch 2 gathers from patch 4; layer 2: the CLS token gathers from patch 2 only.
    # The rollout's CLS map must then sit on patches 2 and 4 and nowhere else.
    n = 1 + 9
    layer1, layer2 = torch.eye(n), torch.eye(n)
    layer1[1 + 2] = F.one_hot(torch.tensor(1 + 4), n).float()
    layer2[0] = F.one_hot(torch.tensor(1 + 2), n).float()
    cls = F.one_hot(torch.tensor([0]), n).float()  # a CLS readout
    cls_map = explain.rollout_map([layer1[None, None], layer2[None, None]], cls, grid=3).flatten()
    assert set(torch.nonzero(cls_map).flatten().tolist()) == {2, 4}
    torch.testing.assert_close(cls_map.sum(), torch.tensor(1.0))


def test_a_cls_readouts_attention_is_each_layers_and_heads_own_cls_row():
    model = tiny("vit")
    attention, readout = attention_of(model, images(batch=2))
    maps = explain.readout_attention(attention, readout, model.grid_size)
    depth, heads, grid = tiny_params("vit").depth, tiny_params("vit").num_heads, model.grid_size
    assert maps.shape == (2, depth, heads, grid, grid)
    for layer in range(depth):
        for head in range(heads):
            torch.testing.assert_close(maps[:, layer, head].flatten(1), attention[layer][:, head, 0, 1:])


def test_mean_pooling_reads_the_average_attention_row_and_rollout():
    model = tiny("vit", pooling="mean")
    attention, readout = attention_of(model, images(batch=2))
    grid = model.grid_size
    assert model.num_prefix_tokens == 0
    torch.testing.assert_close(readout, torch.full((2, grid**2), 1 / grid**2))
    maps = explain.readout_attention(attention, readout, grid, prefix=0)
    torch.testing.assert_close(maps[:, 0, 1].flatten(1), attention[0][:, 1].mean(1))
    rollout = explain.attention_rollout(attention).mean(1)  # the mean of every token's row
    torch.testing.assert_close(explain.rollout_map(attention, readout, grid, prefix=0).flatten(1), rollout)


# --- CNN: Grad-CAM ------------------------------------------------------------------------


def test_gradcam_is_non_negative_has_the_image_size_and_leaves_no_gradient():
    model, x = tiny("cnn"), images(batch=4)
    cam = explain.gradcam(model, x, torch.tensor([0, 3, 5, 9]))
    assert cam.shape == (4, 32, 32) == (x.shape[0], *x.shape[-2:])
    assert torch.isfinite(cam).all() and (cam >= 0).all()
    assert cam.flatten(1).amax(1).gt(0).any()
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_changes_with_the_target_class():
    model, x = tiny("cnn"), images(batch=4)
    maps = {c: explain.gradcam(model, x, torch.full((4,), c)) for c in range(len(CLASSES))}
    # A class whose evidence is negative everywhere gets an all-zero map (the ReLU); the others differ.
    shown = [c for c, cam in maps.items() if cam.amax() > 0]
    assert len(shown) >= 2
    for a in shown:
        for b in shown[shown.index(a) + 1 :]:
            assert not torch.allclose(maps[a], maps[b]), f"classes {a} and {b} give the same Grad-CAM"


def test_gradcam_of_a_global_average_pool_head_is_the_class_activation_map():
    # With GAP + linear, d logit_c / d feature_k = W[c, k] / (h * w) everywhere: Grad-CAM is CAM.
    model, x, target = tiny("cnn"), images(batch=2), torch.tensor([1, 7])
    with torch.no_grad():
        features = model.forward_features(x)  # (B, C, h, w)
    h, w = features.shape[-2:]
    weights = model.head.weight[target]  # (B, C)
    cam = F.relu(torch.einsum("bc,bchw->bhw", weights, features) / (h * w))
    expected = F.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(explain.gradcam(model, x, target), expected.detach())


# --- the images shown ---------------------------------------------------------------------


def test_confident_mistakes_are_wrong_most_confident_first_and_of_the_wanted_classes():
    actual = np.array([0, 1, 2, 0, 1, 2, 0])
    predicted = np.array([1, 1, 0, 2, 2, 2, 1])
    confidence = np.array([0.6, 0.99, 0.7, 0.9, 0.8, 0.95, 0.6])
    names = CLASSES[:3]
    assert compare.confident_mistakes(actual, predicted, confidence, names, [], 10).tolist() == [3, 4, 2, 0, 6]
    assert compare.confident_mistakes(actual, predicted, confidence, names, [], 2).tolist() == [3, 4]
    assert compare.confident_mistakes(actual, predicted, confidence, names, ["airplane"], 10).tolist() == [3, 0, 6]


def test_the_reliability_diagram_labels_each_bin_with_its_images_and_marks_the_few(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(viz, "save_figure", lambda fig, path, dpi: drawn.append(fig))
    rows = [{"lower": 0.2, "upper": 0.3, "confidence": 0.25, "accuracy": 1.0, "count": 3},
            {"lower": 0.9, "upper": 1.0, "confidence": 0.97, "accuracy": 0.96, "count": 4940}]
    metrics = {"ece": 0.02, "ece_ts": 0.01, "temperature": 1.1}
    viz.reliability_diagrams({"vit": {"reliability": rows, "reliability_ts": rows}}, {"vit": metrics},
                             tmp_path / "r.png", 60)
    ax = drawn[0].axes[0]
    assert {t.get_text() for t in ax.texts} == {"3", "4,940"}
    bars = [b for b in ax.patches if b.get_height() > 0]
    few = [b for b in bars if b.get_hatch()]  # the 3-image bin: hatched and pale, its accuracy of 1.0 is noise
    assert len(few) == 1 and few[0].get_x() == pytest.approx(0.2) and few[0].get_alpha() < 1


# --- the visualize stage on a tiny project ----------------------------------------------------

# Written by json.dumps as evaluate writes them; the report must show these texts unchanged.
METRICS = {
    "vit": {"test_acc": 0.8125, "test_loss": 0.612345, "params": 1205898, "flops_per_image": 154143232,
            "inference_images_per_s": 386.4, "latency_ms": 7.112, "train_time_s": 61.23, "device": "cpu",
            "precision": "float32"},
    "cnn": {"test_acc": 0.78125, "test_loss": 0.702, "params": 4694346, "flops_per_image": 418785280,
            "inference_images_per_s": 771.0, "latency_ms": 6.1, "train_time_s": 19.29, "device": "cpu",
            "precision": "float32"},
}


ROBUSTNESS = {  # as metrics/robustness.json writes them
    "vit": {"subset_clean_acc": 0.6, "corruption_acc": 0.45, "relative_robustness": 0.75, "occlusion_patches_acc": 0.4,
            "occlusion_box_acc": 0.5, "ece": 0.031, "nll": 1.1, "brier": 0.5, "temperature": 1.234, "ece_ts": 0.012,
            "nll_ts": 1.0, "brier_ts": 0.49},
    "cnn": {"subset_clean_acc": 0.8, "corruption_acc": 0.5, "relative_robustness": 0.625, "occlusion_patches_acc": 0.3,
            "occlusion_box_acc": 0.45, "ece": 0.082, "nll": 0.9, "brier": 0.4, "temperature": 0.8, "ece_ts": 0.02,
            "nll_ts": 0.85, "brier_ts": 0.39},
}
PAIRED = [{"a": "vit", "b": "cnn",  # as plots/robustness/paired.json writes them
           "relative_robustness": {"diff": 0.125, "ci95": [0.05, 0.2], "images": 30},
           "occlusion_box_acc": {"diff": -0.05, "ci95": [-0.09, -0.01], "images": 30},
           "ece": {"diff": -0.051, "ci95": None, "images": 30},
           "ece_ts": {"diff": -0.008, "ci95": [-0.012, -0.004], "images": 30}}]
RECIPES = {"vit": {"optimizer": "adamw", "lr": 0.001, "epochs": 2}, "cnn": {"optimizer": "sgd", "lr": 0.1, "epochs": 2}}


def of(table: dict, name: str) -> dict:
    """A fixture's entry for `name`; a model registered after these two gets the CNN's (its own numbers
    are not what these tests read)."""
    return table.get(name, table["cnn"])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Everything the visualize stage reads, tiny and generated; then the stage, run once."""
    root = tmp_path_factory.mktemp("visualize")
    rng = np.random.default_rng(0)
    splits = {name: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n, dtype=np.int64) % 10)
              for name, n in (("train", 20), ("val", 10), ("test", 30))}
    write_prepared(root / "data/prepared", splits, {"dataset": "cifar10", "classes": CLASSES, "image_shape": [32, 32, 3],
                                                     "counts": {k: len(v[1]) for k, v in splits.items()}})
    actual = splits["test"][1]
    per_class, robustness_rows = [], {kind: [] for kind in ("corruptions", "occlusion", "reliability", "reliability_ts")}
    for k, name in enumerate(MODELS):
        config = {"name": name, "num_classes": 10, "image_size": 32, "train_time_s": of(METRICS, name)["train_time_s"],
                  "recipe": of(RECIPES, name), "params": dataclasses.asdict(tiny_params(name)), "classes": CLASSES,
                  "mean": list(FIXED_MEAN), "std": list(FIXED_STD), "best_epoch": 2}
        save_model(tiny(name), root / "models" / name, config)
        write_csv(root / "plots/train" / f"{name}.csv",
                  ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"],
                  [[1, 2.3, 0.1, 2.2, 0.15, 3e-4], [2, 2.0, 0.2, 2.1, 0.2, 1e-4]])
        predicted = rng.integers(0, 10, len(actual))
        confidence = rng.uniform(0.1, 1.0, len(actual)).round(6)
        write_csv(root / "plots/evaluate/predictions" / f"{name}.csv",
                  ["actual", "predicted", "actual_index", "predicted_index", "confidence"],
                  [(CLASSES[a], CLASSES[p], a, p, c) for a, p, c in zip(actual, predicted, confidence)])
        write_json(root / "metrics" / f"train_{name}.json",
                   {"val_acc": 0.2, "best_epoch": 2, "final_val_acc": 0.2, "epochs": 2, "device": "cpu",
                    "precision": "float32", "train_time_s": of(METRICS, name)["train_time_s"],
                    "params": of(METRICS, name)["params"], "recipe": of(RECIPES, name)})
        accuracy = (lambda i: 0.05 * i) if name == "vit" else (lambda i: 0.9 - 0.05 * i)
        per_class += [[name, c, round(accuracy(i), 6)] for i, c in enumerate(CLASSES)]
        robustness_rows["corruptions"] += [[name, c, s, 0.5 - 0.05 * s] for c in ("gaussian_noise", "contrast")
                                           for s in (1, 3, 5)]
        robustness_rows["occlusion"] += [[name, f, 0.6 - f / 2, 0.6 - f / 3] for f in (0.0, 0.5)]
        for kind in ("reliability", "reliability_ts"):
            robustness_rows[kind] += [[name, 0.3, 0.25, 10, 0.2, 0.4], [name, 0.7, 0.8, 20, 0.6, 0.8]]
    write_csv(root / "plots/evaluate/per_class.csv", ["model", "class", "accuracy"], per_class)
    write_json(root / "metrics/evaluate.json", {name: of(METRICS, name) for name in MODELS})
    write_json(root / "metrics/robustness.json", {name: of(ROBUSTNESS, name) for name in MODELS})
    write_json(root / "plots/robustness/paired.json", PAIRED)
    headers = {"corruptions": ["corruption", "severity", "accuracy"], "occlusion": ["fraction", "patches", "box"],
               "reliability": ["confidence", "accuracy", "count", "lower", "upper"],
               "reliability_ts": ["confidence", "accuracy", "count", "lower", "upper"]}
    for kind, rows in robustness_rows.items():
        write_csv(root / "plots/robustness" / f"{kind}.csv", ["model", *headers[kind]], rows)
    (root / "params.yaml").write_text("visualize:\n  num_images: 3\n  mistakes: 2\n  dpi: 40\n")

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "stages/visualize.py")], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_report_shows_both_models_metrics_exactly_as_written(project):
    written = (project / "metrics/evaluate.json").read_text()
    report = (project / "plots/report.md").read_text()
    rows = {m.group(1): [cell.strip() for cell in m.group(0).strip("|").split("|")[1:]]
            for m in re.finditer(r"^\|[^|\n]*\(`(\w+)`\)[^\n]*$", report, flags=re.MULTILINE)}
    for key in METRICS["vit"]:
        as_written = re.findall(rf'"{key}": ("?[^,\n]*?"?),?\n', written)  # each model's, in the registry's order
        assert len(as_written) == len(MODELS), key
        # Each cell shows the value as written (beside a readable form where that rounds it).
        for cell, text in zip(rows[key], as_written):
            assert text.strip('"') in cell.replace(",", ""), f"{key}: {rows.get(key)} vs {as_written}"


def test_report_reads_robustness_and_calibration_from_its_metrics(project):
    report = (project / "plots/report.md").read_text()
    assert "| relative robustness (corrupted / clean) (`relative_robustness`) | 75.00% (0.75) | 62.50% (0.625) |" in report
    # The reading follows plots/robustness/paired.json: a verdict only where the interval excludes 0.
    assert ("Under corruption the ViT keeps 75% of its clean accuracy and the CNN 62%: ViT − CNN +12.5 points "
            "[95% CI +5.0, +20.0] (paired bootstrap over the 30 images); the ViT degrades more gracefully.") in report
    assert ("With a central box removed (accuracy averaged over the fractions): ViT − CNN -5.0 points "
            "[95% CI -9.0, -1.0] over the 30 images; the CNN is the more accurate.") in report
    assert "With random patches removed" not in report  # no interval for it in paired.json: no sentence
    assert ("ViT 0.031, CNN 0.082; ViT − CNN -0.051 [too few images for an interval] over the 30 test images; "
            "neither is clearly better calibrated (too few images to tell).") in report
    assert ("After temperature scaling (fitted on the validation split: T = 1.23 for the ViT, 0.80 for the CNN; the "
            "predictions are unchanged), ECE ViT 0.012, CNN 0.020; ViT − CNN -0.008 [95% CI -0.012, -0.004]; the "
            "ViT's scores are the better calibrated once rescaled.") in report
    assert "| temperature fitted on the validation split (`temperature`) | 1.234 | 0.8 |" in report


def test_report_lists_what_differs_and_links_every_figure(project):
    report = (project / "plots/report.md").read_text()
    assert "| `vit.depth` | 2 | — |" in report
    assert "| `cnn.channels` | — | [4, 8] |" in report
    assert "| `optimizer` (recipe) | adamw | sgd |" in report  # what each model was trained with
    assert "`epochs` (recipe) = 2" in report  # shared by all
    links = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert {f"images/{stem}.png" for stem in report_text.figure_captions(list(REGISTRY.values()))} <= set(links)
    assert any(link.startswith("heads/vit/") for link in links)
    for link in links:
        assert (project / "plots" / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link


def test_stage_writes_every_models_data_for_dvc_plots(project):
    with open(project / "plots/compare/tradeoff.csv", newline="") as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert list(rows) == MODELS
    for name in MODELS:
        expected = of(METRICS, name)
        assert {k: rows[name][k] for k in compare.TRADEOFF_FIELDS} == {k: str(expected[k]) for k in compare.TRADEOFF_FIELDS}
    with open(project / "plots/compare/history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert [(r["model"], r["epoch"]) for r in history] == [(n, e) for n in MODELS for e in ("1", "2")]
    heads = sorted((project / "plots/heads/vit").glob("*.png"))
    assert len(heads) == 3
