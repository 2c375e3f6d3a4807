"""The prepare stage: raw source -> train / val / test splits (+ optional subset) -> uint8 arrays and meta.json.

A split the source gives is kept as it is (CIFAR's test split; an ImageFolder's `test/`, and its
`val/` or `validation/`); a split it does not give is held out of the training images, stratified
by class and seeded by `data.split_seed`: the test split of a single folder of class folders
(`data.test_size`), and the validation split when the source has no `val/` (`data.val_size`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vitcnn.data import channel_stats, class_counts, stratified_split, write_prepared
from vitcnn.errors import DataError
from vitcnn.sources import read_source


def prepare(params: Any, out_dir: Path, download_dir: Path) -> dict:
    """Read the source, hold out what it does not give, write the splits; return meta.

    The splits depend on data.* alone, never on the training `seed`: every seed of a study
    trains on the same split, and DVC reuses this stage's output across seeds.
    """
    cfg = params.data
    raw = read_source(cfg, download_dir)
    rng = np.random.default_rng(cfg.split_seed)
    images, labels = raw.train_images, raw.train_labels
    origin = {}
    if raw.test_images is None:
        test_idx, rest = stratified_split(labels, _count(cfg.test_size, len(labels), "test_size"), rng)
        test = (images[test_idx], labels[test_idx])
        images, labels = images[rest], labels[rest]
        origin["test"] = f"held out of the source's images ({len(test_idx)}, stratified, data.split_seed)"
    else:
        test = (raw.test_images, raw.test_labels)
        origin["test"] = "the source's test split"
    if raw.val_images is None:
        val_idx, train_idx = stratified_split(labels, _count(cfg.val_size, len(labels), "val_size"), rng)
        val = (images[val_idx], labels[val_idx])
        origin["val"] = f"held out of the training images ({len(val_idx)}, stratified, data.split_seed)"
    else:
        train_idx, val = np.arange(len(labels)), (raw.val_images, raw.val_labels)
        origin["val"] = "the source's validation split (data.val_size unused)"
    if cfg.subset:
        if cfg.subset > len(train_idx):
            raise DataError(f"data.subset: {cfg.subset} is not allowed; {len(train_idx)} training images remain after val, use at most that (or 0 for all)")
        picked, _ = stratified_split(labels[train_idx], cfg.subset, rng)
        train_idx = train_idx[picked]
    splits = {"train": (images[train_idx], labels[train_idx]), "val": val, "test": test}
    for name, (_, split_labels) in splits.items():
        if len(split_labels) < len(raw.classes):
            raise DataError(f"the {name} split would hold {len(split_labels)} images for {len(raw.classes)} classes; "
                            "each class needs at least one: use more images, or a larger data.val_size / data.test_size")
    mean, std = channel_stats(splits["train"][0])
    meta = {
        "dataset": cfg.dataset,
        "name": _name(raw, cfg.dataset),
        "classes": raw.classes,
        "image_shape": list(splits["train"][0].shape[1:]),  # (H, W, C)
        "image_size": cfg.image_size,
        "resize": cfg.resize,
        "stored_sizes": raw.sizes,  # "WxH" as the source stores the images -> how many
        "skipped": raw.skipped,  # why -> files of the source not used
        "counts": {name: len(labels) for name, (_, labels) in splits.items()},
        "class_counts": {name: class_counts(labels, raw.classes) for name, (_, labels) in splits.items()},
        "splits": origin,
        "mean": mean,
        "std": std,
        "split_seed": cfg.split_seed,
        "layout": raw.layout,
        "source": raw.source,
        "source_sha256": raw.sha256,
    }
    write_prepared(out_dir, splits, meta)
    return meta


def _count(size: float, available: int, key: str) -> int:
    """data.<key> as a number of images (a fraction of `available`, or a count), checked against it."""
    count = round(size * available) if size < 1 else int(size)
    if not 1 <= count < available:
        raise DataError(f"data.{key}: {size:g} is not allowed; the source has {available} training images, "
                        f"so hold out between 1 and {available - 1} (or a fraction in (0, 1))")
    return count


def _name(raw: Any, dataset: str) -> str:
    """What reports call the data: CIFAR's name, or the folder that holds the images (else the source's name)."""
    if dataset != "folder":
        return {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[dataset]
    if raw.folder:
        return raw.folder
    name = os.path.basename(raw.source.rstrip("/\\"))
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        name = name.removesuffix(suffix)
    return name
