"""The prepare stage: raw source -> stratified train/val split (+ optional subset) -> uint8 arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vitcnn.data import channel_stats, class_counts, stratified_split, write_prepared
from vitcnn.errors import DataError
from vitcnn.sources import read_source


def prepare(params: Any, out_dir: Path, download_dir: Path) -> dict:
    """Read the source, hold out a stratified val split seeded by data.split_seed, write the splits; return meta.

    The split depends on data.* alone, never on the training `seed`: every seed of a study
    trains on the same split, and DVC reuses this stage's output across seeds.
    """
    cfg = params.data
    raw = read_source(cfg.source, cfg.dataset, download_dir)
    n_train = len(raw.train_labels)
    if cfg.val_size >= n_train:
        raise DataError(f"data.val_size: {cfg.val_size} is not allowed; the source has {n_train} training images, use fewer")
    rng = np.random.default_rng(cfg.split_seed)
    val_idx, train_idx = stratified_split(raw.train_labels, cfg.val_size, rng)
    if cfg.subset:
        if cfg.subset > len(train_idx):
            raise DataError(f"data.subset: {cfg.subset} is not allowed; {len(train_idx)} training images remain after val, use at most that (or 0 for all)")
        picked, _ = stratified_split(raw.train_labels[train_idx], cfg.subset, rng)
        train_idx = train_idx[picked]
    splits = {
        "train": (raw.train_images[train_idx], raw.train_labels[train_idx]),
        "val": (raw.train_images[val_idx], raw.train_labels[val_idx]),
        "test": (raw.test_images, raw.test_labels),
    }
    mean, std = channel_stats(splits["train"][0])
    meta = {
        "dataset": cfg.dataset,
        "classes": raw.classes,
        "image_shape": list(raw.train_images.shape[1:]),  # (H, W, C)
        "counts": {name: len(labels) for name, (_, labels) in splits.items()},
        "class_counts": {name: class_counts(labels, raw.classes) for name, (_, labels) in splits.items()},
        "mean": mean,
        "std": std,
        "split_seed": cfg.split_seed,
        "layout": raw.layout,
        "source": raw.source,
        "source_sha256": raw.sha256,
    }
    write_prepared(out_dir, splits, meta)
    return meta
