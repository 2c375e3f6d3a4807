"""Figures: learning curves, confusion matrices, ViT attention and CNN feature maps.

Every figure has a title, axis labels and, where colour carries a value, a colour bar.
Functions take plain data (arrays, dicts) and return nothing but the PNG they write.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vitcnn.io import atomic_write  # noqa: E402

MODEL_LABELS = {"vit": "ViT", "cnn": "CNN"}
MODEL_COLORS = {"vit": "tab:blue", "cnn": "tab:orange"}


def _save(fig: plt.Figure, path: Path, dpi: int) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)


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


def learning_curves(histories: dict[str, list[dict]], path: Path, dpi: int) -> None:
    """Loss (train, val) and accuracy (train, val) per epoch, both models on shared axes."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        color, label = MODEL_COLORS.get(name), MODEL_LABELS.get(name, name)
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], "-o", color=color, ms=3, label=f"{label} train")
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], "--s", color=color, ms=3, label=f"{label} val")
        ax_acc.plot(epochs, [100 * r["train_acc"] for r in rows], "-o", color=color, ms=3, label=f"{label} train")
        ax_acc.plot(epochs, [100 * r["val_acc"] for r in rows], "--s", color=color, ms=3, label=f"{label} val")
    for ax, title, ylabel in ((ax_loss, "Loss", "cross-entropy"), (ax_acc, "Accuracy", "accuracy (%)")):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("ViT vs CNN: learning curves")
    _save(fig, path, dpi)


def confusion_matrices(confusions: dict[str, np.ndarray], classes: list[str], path: Path, dpi: int) -> None:
    """Row-normalised confusion matrices (rows: true class), one panel per model."""
    n = len(classes)
    fig, axes = plt.subplots(1, len(confusions), figsize=(6.2 * len(confusions), 5.4), squeeze=False)
    tick_size = 8 if n <= 20 else 4
    for ax, (name, counts) in zip(axes[0], confusions.items()):
        rates = counts / counts.sum(1, keepdims=True).clip(min=1)
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        acc = np.trace(counts) / counts.sum()
        ax.set(title=f"{MODEL_LABELS.get(name, name)} (test acc {100 * acc:.1f}%)", xlabel="predicted", ylabel="true")
        ax.set_xticks(range(n), classes, rotation=90, fontsize=tick_size)
        ax.set_yticks(range(n), classes, fontsize=tick_size)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.suptitle("Confusion matrices on the test split")
    _save(fig, path, dpi)


def confusion_counts(actual: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(actual * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def upsample(maps: torch.Tensor, size: int) -> np.ndarray:
    """(B, h, w) maps -> (B, size, size), bilinear, each scaled to [0, 1] for overlays."""
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values.view(-1, 1, 1)
    hi = up.flatten(1).max(1).values.view(-1, 1, 1)
    return ((up - lo) / (hi - lo).clamp(min=1e-12)).numpy()


def attention_grid(
    images: np.ndarray, titles: list[str], cls_attention: list[torch.Tensor], path: Path, dpi: int
) -> None:
    """Per image (rows): the image, then each layer's CLS-to-patch attention (heads averaged) over it.

    cls_attention: one (B, grid, grid) tensor per layer.
    """
    layers = len(cls_attention)
    size = images.shape[1]
    fig, axes = plt.subplots(len(images), layers + 1, figsize=(1.6 * (layers + 1) + 0.8, 1.75 * len(images)),
                             squeeze=False)
    overlays = [upsample(a, size) for a in cls_attention]
    for i, image in enumerate(images):
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(titles[i], fontsize=8)
        for layer in range(layers):
            ax = axes[i, layer + 1]
            ax.imshow(image)
            shown = ax.imshow(overlays[layer][i], cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(f"layer {layer + 1}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes, fraction=0.02, pad=0.01, label="CLS attention (scaled per map)")
    fig.suptitle("ViT: CLS-token attention over the patch grid, every layer (mean over heads)")
    _save(fig, path, dpi)


def feature_grid(
    images: np.ndarray, titles: list[str], block_maps: list[torch.Tensor], channels: int, path: Path, dpi: int
) -> None:
    """Per image (rows): the image, then each block's `channels` strongest feature maps.

    block_maps: one (B, C, h, w) tensor per block; strength = mean activation of a channel.
    """
    blocks = len(block_maps)
    cols = 1 + blocks * channels
    fig, axes = plt.subplots(len(images), cols, figsize=(1.45 * cols + 0.8, 1.6 * len(images)), squeeze=False)
    for i, image in enumerate(images):
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(titles[i], fontsize=8)
        for b, maps in enumerate(block_maps):
            strongest = maps[i].mean((1, 2)).topk(min(channels, maps.shape[1])).indices
            for k, ch in enumerate(strongest.tolist()):
                ax = axes[i, 1 + b * channels + k]
                fmap = maps[i, ch].float().numpy()
                shown = ax.imshow(fmap / max(fmap.max(), 1e-12), cmap="viridis", vmin=0, vmax=1)
                if i == 0:
                    ax.set_title(f"block {b + 1}\n{tuple(maps.shape[2:])[0]}x{tuple(maps.shape[2:])[1]}", fontsize=7)
                ax.set_xlabel(f"ch {ch}", fontsize=6, labelpad=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes, fraction=0.02, pad=0.01, label="activation (scaled per map)")
    fig.suptitle(f"CNN: the {channels} strongest feature maps of each block")
    _save(fig, path, dpi)
