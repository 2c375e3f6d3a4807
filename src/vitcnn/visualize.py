"""The figures: learning curves, confusion, per-class accuracy, cost against accuracy, where each
model looks (attention and rollout, feature maps and Grad-CAM), the images each model gets wrong
most confidently, and robustness and calibration. Models are named and coloured by the registry;
the report's text is `vitcnn.report`'s.

Every figure has a title, axis labels and, where colour carries a value, a colour bar; the
layout is matplotlib's constrained layout, so titles, labels and colour bars never overlap.
Functions take plain data (arrays, tensors, dicts) and write nothing but their PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from vitcnn.io import atomic_write  # noqa: E402
from vitcnn.models import color, label  # noqa: E402

OVERLAY_CMAP, OVERLAY_ALPHA, FEATURE_CMAP = "inferno", 0.6, "viridis"
RIGHT, WRONG = "#1a7f37", "#cf222e"  # caption colours of correct and wrong predictions
PANEL = 1.5  # inches per image panel
# The costs accuracy is drawn against: key -> (short name, axis label, unit).
COST_AXES = {
    "params": ("parameters", "parameters (millions)", 1e-6),
    "flops_per_image": ("FLOPs", "forward FLOPs per image (millions)", 1e-6),
    "train_time_s": ("training time", "training time (s)", 1.0),
    "inference_images_per_s": ("inference speed", "inference images/s", 1.0),
}



def save_figure(fig: plt.Figure, path: Path, dpi: int) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)


def prediction_caption(name: str, predicted: str, confidence: float, correct: bool) -> tuple[str, str]:
    """('ViT: cat 87% ✓', green) — the text and colour under a model's panel."""
    mark, color = ("✓", RIGHT) if correct else ("✗", WRONG)
    return f"{label(name)}: {predicted} {100 * confidence:.0f}% {mark}", color


def learning_curves(histories: dict[str, list[dict]], path: Path, dpi: int) -> None:
    """Loss (train, val) and accuracy (train, val) per epoch, both models on shared axes."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for name, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        c, shown = color(name), label(name)
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], "-o", color=c, ms=3, label=f"{shown} train")
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], "--s", color=c, ms=3, label=f"{shown} val")
        ax_acc.plot(epochs, [100 * r["train_acc"] for r in rows], "-o", color=c, ms=3, label=f"{shown} train")
        ax_acc.plot(epochs, [100 * r["val_acc"] for r in rows], "--s", color=c, ms=3, label=f"{shown} val")
    last = max((r["epoch"] for rows in histories.values() for r in rows), default=1)
    for ax, title, ylabel in ((ax_loss, "Loss", "cross-entropy"), (ax_acc, "Accuracy", "accuracy (%)")):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel, xlim=(0.5, last + 0.5))  # one epoch: a point, not a sliver
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{' vs '.join(label(n) for n in histories)}: learning curves")
    save_figure(fig, path, dpi)


def confusion_matrices(confusions: dict[str, np.ndarray], classes: list[str], path: Path, dpi: int) -> None:
    """Confusion matrices oriented as DVC's (actual class on x, predicted on y), each column normalised to the
    images of its actual class, one panel per model. `confusions`: (actual, predicted) counts."""
    n = len(classes)
    fig, axes = plt.subplots(1, len(confusions), figsize=(6.2 * len(confusions), 5.4), squeeze=False,
                             layout="constrained")
    tick_size = 8 if n <= 20 else 4
    for ax, (name, counts) in zip(axes[0], confusions.items()):
        rates = (counts / counts.sum(1, keepdims=True).clip(min=1)).T  # (predicted, actual): columns sum to 1
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        acc = np.trace(counts) / counts.sum()
        ax.set(title=f"{label(name)} (test acc {100 * acc:.1f}%)", xlabel="actual", ylabel="predicted")
        ax.set_xticks(range(n), classes, rotation=90, fontsize=tick_size)
        ax.set_yticks(range(n), classes, fontsize=tick_size)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the actual class")
    fig.suptitle("Confusion matrices on the test split")
    save_figure(fig, path, dpi)


def confusion_counts(actual: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(actual * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_bars(per_class: dict[str, Sequence[float]], classes: list[str], path: Path, dpi: int) -> None:
    """Test accuracy per class as grouped bars, one bar per model in each group."""
    n, models = len(classes), len(per_class)
    width = 0.8 / models
    fig, ax = plt.subplots(figsize=(max(7.0, 0.32 * n * models + 2), 4.4), layout="constrained")
    x = np.arange(n)
    for k, (name, acc) in enumerate(per_class.items()):
        pct = 100 * np.asarray(acc, dtype=float)
        bars = ax.bar(x + (k - (models - 1) / 2) * width, pct, width, color=color(name),
                      label=f"{label(name)} (mean over classes {pct.mean():.1f}%)")
        if n <= 20:
            ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    ax.set_xticks(x, classes, rotation=45 if n <= 20 else 90, ha="right" if n <= 20 else "center",
                  fontsize=8 if n <= 20 else 5)
    ax.set(title=f"Per-class test accuracy, {' vs '.join(label(n) for n in per_class)}", xlabel="class", ylabel="test accuracy (%)", ylim=(0, 108))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncols=models)
    save_figure(fig, path, dpi)


def tradeoffs(metrics: dict[str, dict], path: Path, dpi: int) -> None:
    """Test accuracy against each cost (parameters, FLOPs, training time, inference speed), one point per model."""
    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(3.3 * len(COST_AXES), 3.6), layout="constrained")
    for ax, (key, (short, xlabel, unit)) in zip(axes, COST_AXES.items()):
        for k, (name, m) in enumerate(metrics.items()):
            x, y = m[key] * unit, 100 * m["test_acc"]
            ax.scatter(x, y, s=60, color=color(name), label=label(name), zorder=3)
            # Labels alternate above and below their points, so two close points never share a line.
            ax.annotate(f"{label(name)} {y:.1f}%", (x, y), xytext=(0, 9 if k % 2 == 0 else -9), textcoords="offset points",
                        ha="center", va="bottom" if k % 2 == 0 else "top", fontsize=8)
        ax.set(title=f"accuracy vs {short}", xlabel=xlabel, ylabel="test accuracy (%)", ylim=(0, 100))
        ax.set_xlim(0, 1.3 * max(m[key] * unit for m in metrics.values()) or 1.0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    fig.suptitle("Accuracy against cost, one point per model")
    save_figure(fig, path, dpi)


def upsample(maps: torch.Tensor, size: int) -> np.ndarray:
    """(B, h, w) maps -> (B, size, size), bilinear, each scaled to [0, 1] for overlays."""
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values.view(-1, 1, 1)
    hi = up.flatten(1).max(1).values.view(-1, 1, 1)
    return ((up - lo) / (hi - lo).clamp(min=1e-12)).numpy()


def _panel_grid(rows: int, cols: int, title: str, row_labels: Sequence[str], col_titles: Sequence[str],
                caption_lines: int = 0) -> tuple[plt.Figure, np.ndarray]:
    """A grid of image panels without ticks: column titles on the first row, row labels at the left."""
    label_width = 0.07 * max((len(line) for label in row_labels for line in label.split("\n")), default=0)
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained",
                             figsize=(PANEL * cols + label_width + 1.2, (PANEL + 0.16 * caption_lines) * rows + 0.8))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax, text in zip(axes[0], col_titles):
        ax.set_title(text, fontsize=8)
    for ax, text in zip(axes[:, 0], row_labels):
        ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8, labelpad=4)
    fig.suptitle(title)
    return fig, axes


def _overlay(ax: plt.Axes, image: np.ndarray, heat: np.ndarray) -> None:
    """The image with a [0, 1] heat map over it."""
    ax.imshow(image)
    ax.imshow(heat, cmap=OVERLAY_CMAP, alpha=OVERLAY_ALPHA, vmin=0, vmax=1)


def _colorbar(fig: plt.Figure, axes: np.ndarray, label: str, cmap: str, location: str = "right") -> None:
    """An opaque [0, 1] colour bar for `cmap` beside a block of panels, at most 4 inches long."""
    span = PANEL * (axes.shape[0] if location == "right" else axes.shape[1])
    length = min(span, 4.0)
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=axes, location=location, label=label,
                 shrink=length / span, aspect=length / 0.15)


def overlay_grid(
    images: np.ndarray,
    columns: dict[str, torch.Tensor],
    title: str,
    row_labels: Sequence[str],
    colorbar_label: str,
    path: Path,
    dpi: int,
    captions: dict[str, Sequence[tuple[str, str]]] | None = None,
    image_column: bool = True,
) -> None:
    """Rows: images (H, W, 3 uint8). Columns: the image itself, then each named map overlaid on it.

    columns: title -> (B, h, w) maps at any resolution, upsampled to the image and scaled to
    [0, 1] per map. captions: column title -> one (text, colour) per row, under its panels.
    """
    captions = captions or {}
    titles = (["image"] if image_column else []) + list(columns)
    heat = {name: upsample(maps, images.shape[1]) for name, maps in columns.items()}
    lines = max((text.count("\n") + 1 for caps in captions.values() for text, _ in caps), default=0)
    fig, axes = _panel_grid(len(images), len(titles), title, row_labels, titles, caption_lines=lines)
    for i, image in enumerate(images):
        for ax, name in zip(axes[i], titles):
            if name in heat:
                _overlay(ax, image, heat[name][i])
            else:
                ax.imshow(image)
            if name in captions:
                text, color = captions[name][i]
                ax.set_xlabel(text, color=color, fontsize=7, labelpad=2)
    _colorbar(fig, axes, colorbar_label, OVERLAY_CMAP)
    save_figure(fig, path, dpi)


def attention_heads(image: np.ndarray, maps: torch.Tensor, title: str, path: Path, dpi: int) -> None:
    """One image's attention in every layer (rows) and head (columns), and the mean over heads.

    maps: (layers, heads, h, w), overlaid on the (H, W, 3) image.
    """
    layers, heads = maps.shape[:2]
    columns = {f"head {h + 1}": maps[:, h] for h in range(heads)} | {"mean of heads": maps.mean(1)}
    overlay_grid(np.repeat(image[None], layers, axis=0), columns, title, [f"layer {i + 1}" for i in range(layers)],
                 "attention (scaled per map)", path, dpi, image_column=False)


def feature_grid(
    images: np.ndarray,
    row_labels: Sequence[str],
    block_maps: list[torch.Tensor],
    channels: int,
    cam: torch.Tensor,
    cam_captions: Sequence[tuple[str, str]],
    path: Path,
    dpi: int,
    title: str,
) -> None:
    """Per image (rows): the image, each block's `channels` strongest feature maps, and Grad-CAM over the image.

    block_maps: one (B, C, h, w) tensor per block; strength = mean activation of a channel.
    cam: (B, H, W) Grad-CAM of the predicted class; cam_captions: (text, colour) under each.
    """
    col_titles = ["image"]
    for b, maps in enumerate(block_maps):
        col_titles += [f"block {b + 1} ({maps.shape[2]}×{maps.shape[3]})"] + [""] * (channels - 1)
    col_titles.append("Grad-CAM, predicted")
    fig, axes = _panel_grid(len(images), len(col_titles), title, row_labels, col_titles, caption_lines=1)
    heat = upsample(cam, images.shape[1])
    for i, image in enumerate(images):
        axes[i, 0].imshow(image)
        for b, maps in enumerate(block_maps):
            strongest = maps[i].mean((1, 2)).topk(min(channels, maps.shape[1])).indices
            for k, ch in enumerate(strongest.tolist()):
                ax = axes[i, 1 + b * channels + k]
                fmap = maps[i, ch].float().numpy()
                ax.imshow(fmap / max(fmap.max(), 1e-12), cmap=FEATURE_CMAP, vmin=0, vmax=1)
                ax.set_xlabel(f"channel {ch}", fontsize=7, labelpad=2)
        _overlay(axes[i, -1], image, heat[i])
        text, color = cam_captions[i]
        axes[i, -1].set_xlabel(text, color=color, fontsize=7, labelpad=2)
    _colorbar(fig, axes[:, 1:-1], "activation (scaled per map)", FEATURE_CMAP, location="bottom")
    _colorbar(fig, axes[:, -1:], "Grad-CAM (scaled per map)", OVERLAY_CMAP, location="bottom")
    save_figure(fig, path, dpi)


def mistakes_grid(
    images: dict[str, np.ndarray], captions: dict[str, Sequence[str]], count: int, path: Path, dpi: int
) -> None:
    """One row per model: the test images it gets wrong most confidently, most confident first.

    images: model -> (k, H, W, 3) uint8 with k <= count; captions: model -> one caption per image.
    """
    labels = [label(name) for name in images]
    lines = max((text.count("\n") + 1 for texts in captions.values() for text in texts), default=0)
    fig, axes = _panel_grid(len(images), count, "The test images each model gets wrong most confidently",
                            labels, [f"#{j + 1}" for j in range(count)], caption_lines=lines)
    for row, name in zip(axes, images):
        for j, ax in enumerate(row):
            if j < len(images[name]):
                ax.imshow(images[name][j])
                ax.set_xlabel(captions[name][j], color=WRONG, fontsize=7, labelpad=2)
            else:
                ax.set_frame_on(False)
    save_figure(fig, path, dpi)


def robustness_curves(by_corruption: dict[str, list[dict]], clean: dict[str, float], path: Path, dpi: int) -> None:
    """Accuracy against severity (0 = clean), one panel per corruption and one for their mean.

    by_corruption: model -> rows of plots/robustness/corruptions/<model>.csv (corruption, severity, accuracy).
    """
    corruptions = list(dict.fromkeys(r["corruption"] for rows in by_corruption.values() for r in rows))
    panels = [*corruptions, "mean of all"]
    cols = min(4, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(3.2 * cols, 2.7 * -(-len(panels) // cols)),
                             squeeze=False, layout="constrained", sharey=True)
    for ax, panel in zip(axes.flat, panels):
        for name, rows in by_corruption.items():
            chosen = [r for r in rows if panel in (r["corruption"], "mean of all")]
            severities = sorted({int(r["severity"]) for r in chosen})
            acc = [np.mean([float(r["accuracy"]) for r in chosen if int(r["severity"]) == s]) for s in severities]
            ax.plot([0, *severities], [100 * clean[name], *(100 * a for a in acc)], "-o", ms=3, color=color(name),
                    label=label(name))
        ax.set(title=panel.replace("_", " "), xlabel="severity", ylim=(0, 100))
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Accuracy under CIFAR-10-C corruptions (severity 0: the clean images)")
    save_figure(fig, path, dpi)


def occlusion_curves(occlusion: dict[str, list[dict]], path: Path, dpi: int) -> None:
    """Accuracy against the fraction removed: random patches, and one central box.

    occlusion: model -> rows of plots/robustness/occlusion/<model>.csv (fraction, patches, box).
    """
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained", sharey=True)
    for ax, kind, title in zip(axes, ("patches", "box"), ("random patches removed", "a central box removed")):
        for name, rows in occlusion.items():
            ax.plot([100 * float(r["fraction"]) for r in rows], [100 * float(r[kind]) for r in rows], "-o", ms=3,
                    color=color(name), label=label(name))
        ax.set(title=title, xlabel="fraction of the image removed (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Accuracy under occlusion (removed pixels set to the mean colour)")
    save_figure(fig, path, dpi)


FEW_IMAGES = 30  # a confidence bin with fewer images than this says little about its accuracy


def reliability_diagrams(bins: dict[str, dict[str, list[dict]]], robustness: dict[str, dict], path: Path,
                         dpi: int) -> None:
    """Accuracy per confidence bin against the diagonal of perfect calibration, one column per model: the
    model as trained on top, after temperature scaling below. Each bar is labelled with its number of
    images, and a bin with fewer than FEW_IMAGES is drawn hatched and pale: its accuracy is noise, whatever
    its height (the ECE weights each bin by its images, so such bins barely count there either).

    bins: model -> {"reliability" | "reliability_ts": rows of plots/robustness/<that>/<model>.csv (lower,
    upper, confidence, accuracy, count)}; robustness: metrics/robustness.json (ece, ece_ts, temperature).
    """
    fig, axes = plt.subplots(2, len(bins), figsize=(3.8 * len(bins), 7.8), squeeze=False, layout="constrained")
    for column, (name, by_kind) in enumerate(bins.items()):
        m = robustness[name]
        titles = {"reliability": f"{label(name)} as trained (ECE {m['ece']:.3f})",
                  "reliability_ts": f"{label(name)}, T = {m['temperature']:.2f} (ECE {m['ece_ts']:.3f})"}
        for row, (kind, title) in enumerate(titles.items()):
            ax, rows = axes[row][column], by_kind[kind]
            lower = np.array([float(r["lower"]) for r in rows])
            width = np.array([float(r["upper"]) for r in rows]) - lower
            accuracy = np.array([float(r["accuracy"]) for r in rows])
            counts = np.array([int(float(r["count"])) for r in rows])
            few = counts < FEW_IMAGES
            ax.bar(lower[~few], accuracy[~few], width=width[~few], align="edge", color=color(name),
                   edgecolor="white", label="accuracy")
            if few.any():
                ax.bar(lower[few], accuracy[few], width=width[few], align="edge", color=color(name), alpha=0.3,
                       hatch="///", edgecolor="white", label=f"accuracy of < {FEW_IMAGES} images")
            for x, w, n in zip(lower, width, counts):  # a row of counts above the bars, clear of them
                ax.text(x + w / 2, 1.015, f"{n:,}", rotation=90, ha="center", va="bottom", fontsize=5.5)
            ax.axhline(1.0, color="0.8", lw=0.6)
            ax.plot([float(r["confidence"]) for r in rows], [float(r["confidence"]) for r in rows], "k.", ms=4,
                    label="mean confidence")
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.set(title=title, xlabel="confidence (above each bar: its number of images)", ylabel="accuracy",
                   xlim=(0, 1), ylim=(0, 1.16), yticks=np.linspace(0, 1, 6))
            ax.legend(fontsize=6.5, loc="center left")
    fig.suptitle("Reliability on the clean test split: as trained, and after temperature scaling")
    save_figure(fig, path, dpi)
