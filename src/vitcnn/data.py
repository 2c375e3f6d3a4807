"""Prepared data: uint8 splits on disk (safetensors), and the on-device batch loader.

`data/prepared/` holds `train`, `val` and `test` as safetensors files with `images`
(N, 32, 32, 3) uint8 and `labels` (N,) int64, plus `meta.json` (classes, counts per
split and class, per-channel mean/std of train, source and its sha256).

`BatchLoader` keeps a split on the training device as uint8 and cuts each batch with
tensor ops: one gather does the random crop (zero padding) and the horizontal flip for
the whole batch, an optional `augment.Augment` policy works on the uint8 batch, the batch
is normalised once, and an optional `augment.Mix` mixes it with its labels. No workers,
no PIL, no per-image Python. A split too large for a GPU's budget (`train.device_memory_gb`;
by default half its free memory) stays in pinned host memory instead: each batch's images are
gathered there and copied to the GPU without waiting (the same batches, bit for bit; no CUDA
graph then, as the gather is the host's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import logging

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vitcnn.errors import DataError
from vitcnn.io import atomic_write, read_json, write_json

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
META_FILE = "meta.json"
# The original program's normalisation constants (CIFAR-10), used when train.normalization is "fixed".
FIXED_MEAN = (0.4914, 0.4822, 0.4465)
FIXED_STD = (0.2023, 0.1994, 0.2010)


@dataclass
class Split:
    images: torch.Tensor  # (N, H, W, C) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def stratified_split(labels: np.ndarray, n_take: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a class-stratified random sample of n_take items, and of the rest (both sorted).

    Each class gets its proportional share; the remainder goes to the classes with the
    largest fractional shares, so the total is exactly n_take.
    """
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * n_take / len(labels)
    quota = np.floor(share).astype(int)
    quota[np.argsort(quota - share, kind="stable")[: n_take - quota.sum()]] += 1
    perm = rng.permutation(len(labels))
    taken = np.concatenate([perm[labels[perm] == c][:q] for c, q in zip(classes, quota)])
    mask = np.zeros(len(labels), dtype=bool)
    mask[taken] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, H, W, C), in [0, 1] units."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return pixels.mean(0).round(6).tolist(), pixels.std(0).round(6).tolist()


def class_counts(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(classes))
    return {name: int(n) for name, n in zip(classes, counts)}


def write_prepared(out_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in splits.items():
        tensors = {"images": torch.from_numpy(np.ascontiguousarray(images)), "labels": torch.from_numpy(labels)}
        with atomic_write(out_dir / f"{name}.safetensors") as tmp:
            save_file(tensors, str(tmp))
    write_json(out_dir / META_FILE, meta)


def load_meta(prepared_dir: Path) -> dict:
    path = prepared_dir / META_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    return read_json(path)


def load_split(prepared_dir: Path, name: str) -> Split:
    path = prepared_dir / f"{name}.safetensors"
    if not path.is_file():
        raise DataError(f"{path}: not found; run the prepare stage first (dvc repro prepare)")
    try:
        tensors = load_file(str(path))
        return Split(tensors["images"], tensors["labels"])
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise DataError(f"{path}: unreadable ({exc}); rerun the prepare stage") from None


def normalization(meta: dict, mode: str) -> tuple[list[float], list[float]]:
    """Mean and std for inputs: the original program's constants ("fixed") or train's own ("measured")."""
    if mode == "fixed":
        return list(FIXED_MEAN), list(FIXED_STD)
    return meta["mean"], meta["std"]


class BatchLoader:
    """Normalised float batches (B, C, H, W) in channels_last memory, from a uint8 split on `device`.

    With `shuffle`, each epoch draws a fresh order from `generator`; `crop_padding` > 0
    takes a random crop of the zero-padded image and `flip` mirrors half the images,
    each drawn per image from `generator` but applied to the whole batch in one gather.
    `augment` (uint8 batch, generator -> uint8 batch) and `mix` (batch, labels, generator ->
    batch, mixed labels) draw from the same generator; without them nothing else is drawn,
    so the batches are exactly those of crop + flip alone.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        mean: list[float],
        std: list[float],
        shuffle: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        generator: torch.Generator | None = None,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        mix: Callable | None = None,
        placement: str = "auto",
        memory_gb: float = 0.0,
        alternate_flip: bool = False,
    ):
        """`placement`: where the uint8 images live: "auto" (on `device` when they fit its budget: `memory_gb`
        GB, or half its free memory when 0; else in host memory), "device" or "host". `alternate_flip`
        (with `flip`): each image is flipped in every other epoch, starting from a random first choice
        drawn once (airbench's), rather than at random in each."""
        if (shuffle or crop_padding or flip or augment or mix) and generator is None:
            raise ValueError("a random order or augmentation needs a seeded generator")
        self.batch_size, self.device, self.shuffle, self.generator = batch_size, device, shuffle, generator
        self.augment, self.mix = augment, mix
        self.labels = split.labels.to(device)
        self.pad = crop_padding
        self.flip = flip
        self.size = split.images.shape[1]
        side = self.size + 2 * self.pad
        needed = len(split.labels) * side * side * split.images.shape[-1]
        self.on_host = placement == "host" or (placement == "auto" and not _fits(needed, device, memory_gb))
        images = split.images if self.on_host else split.images.to(device)
        if self.pad:  # pad once, with zeros (black), as torchvision's RandomCrop(padding=...)
            images = torch.nn.functional.pad(images, (0, 0, self.pad, self.pad, self.pad, self.pad))
        if self.on_host and device.type == "cuda":
            images = images.pin_memory()  # copies from pinned memory need not wait
        self.images = images  # (N, H + 2 * pad, W + 2 * pad, C) uint8, on the device or in host memory
        channels = images.shape[-1]
        self.mean = (torch.tensor(mean, device=device) * 255).view(1, channels, 1, 1)
        self.inv_std = 1 / (torch.tensor(std, device=device) * 255).view(1, channels, 1, 1)
        self.offsets = torch.arange(self.size, device=device)
        self.first_flips = None  # alternate_flip: (N,) each image's flip in the first epoch, and its epoch's parity
        if flip and alternate_flip:
            self.first_flips = torch.randint(0, 2, (len(self.labels),), device=device, generator=generator)
            self.parity = torch.ones((), dtype=torch.long, device=device)  # the first epoch turns it to 0

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def examples(self) -> list[torch.Tensor]:
        """Zeros shaped and laid out as an epoch's batches, for trial steps (compilation): a full batch, and
        the last, smaller one when the split does not divide into full batches."""
        sizes = [min(self.batch_size, len(self.labels))] + ([len(self.labels) % self.batch_size]
                                                           if len(self.labels) > self.batch_size else [])
        return [torch.zeros(b, self.size, self.size, self.images.shape[-1], device=self.device).permute(0, 3, 1, 2)
                for b in sizes if b]

    @property
    def index_device(self) -> torch.device:
        """Where an epoch's order and a batch's indexes live: with the images."""
        return self.images.device

    def permutation(self) -> torch.Tensor:
        """(N,) the order of one epoch, on `index_device`: a fresh draw from the generator with `shuffle`
        (drawn on the training device either way, so that both placements train on the same batches),
        else 0..N-1."""
        n = len(self.labels)
        if self.first_flips is not None:  # a new epoch: every image flips the other way
            self.parity.bitwise_xor_(1)
        if self.shuffle:
            order = torch.randperm(n, device=self.device, generator=self.generator)
            return order.to(self.index_device)  # with images in host memory: one copy per epoch
        return torch.arange(n, device=self.index_device)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of items `idx` (B,, on `index_device`): cropped, flipped, augmented, normalised and mixed
        as configured.

        With the images on the device, only tensor ops there, none of which reads a value back, so a
        CUDA graph can capture it with `idx` computed on the device. In host memory, the batch's padded
        images are gathered there and copied over first.
        """
        if self.on_host:
            padded = self.images[idx]  # (B, P, P, C) in host memory
            if self.device.type == "cuda":
                padded = padded.pin_memory()
            on_device = idx.to(self.device, non_blocking=True)
            images = self._gather(padded.to(self.device, non_blocking=True), torch.arange(len(idx), device=self.device),
                                  on_device)
            labels = self.labels[on_device]
        else:
            images, labels = self._gather(self.images, idx, idx), self.labels[idx]  # (B, H, W, C) uint8
        if self.augment:
            images = self.augment(images, self.generator)
        x, y = self._normalize(images), labels
        return self.mix(x, y, self.generator) if self.mix else (x, y)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.permutation()
        for start in range(0, len(order), self.batch_size):
            yield self.batch(order[start : start + self.batch_size])

    def _gather(self, source: torch.Tensor, idx: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) uint8: entries `idx` of the padded `source` (on the device), which are the split's items
        `items`, cropped and flipped as one index computation, one gather."""
        if not (self.pad or self.flip):
            return source[idx]
        b, s, padded = len(idx), self.size, source.shape[1]
        hi = 2 * self.pad + 1
        dy = torch.randint(0, hi, (b, 1), device=self.device, generator=self.generator)
        dx = torch.randint(0, hi, (b, 1), device=self.device, generator=self.generator)
        rows = dy + self.offsets  # (B, S)
        cols = dx + self.offsets  # (B, S)
        if self.flip:
            if self.first_flips is not None:
                mirror = (self.first_flips[items] ^ self.parity).bool().view(b, 1)
            else:
                mirror = torch.randint(0, 2, (b, 1), device=self.device, generator=self.generator).bool()
            cols = torch.where(mirror, cols.flip(1), cols)
        flat = source.view(-1, source.shape[-1])  # (N * P * P, C)
        pixel = (idx.view(b, 1, 1) * padded + rows.view(b, s, 1)) * padded + cols.view(b, 1, s)  # (B, S, S)
        return flat[pixel]  # (B, S, S, C)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()  # (B, C, H, W), channels_last memory
        return (x - self.mean) * self.inv_std


def _fits(needed: int, device: torch.device, memory_gb: float) -> bool:
    """Whether `needed` bytes of images may live on `device`: always off CUDA (the CPU's memory is the host's);
    on a GPU within `memory_gb` GB, or half its free memory when 0. Says so when they do not."""
    if device.type != "cuda":
        return True
    budget = memory_gb * 2**30 if memory_gb else torch.cuda.mem_get_info(device)[0] / 2
    if needed <= budget:
        return True
    log.info("the images (%.1f GiB as uint8) exceed the GPU's budget (%.1f GiB, train.device_memory_gb): kept in "
             "pinned host memory, each batch copied over", needed / 2**30, budget / 2**30)
    return False
