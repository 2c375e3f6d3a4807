"""BatchLoader (normalisation, shuffling, crop and flip augmentation, seeding) and stratified_split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import random_images
from vitcnn.data import FIXED_MEAN, FIXED_STD, BatchLoader, Split, stratified_split

CPU = torch.device("cpu")
MEAN, STD = list(FIXED_MEAN), list(FIXED_STD)
# With mean 0 and std 1/255 the loader's output is the raw pixel value: augmented
# images can then be compared exactly with windows of the original.
IDENTITY = ([0.0, 0.0, 0.0], [1 / 255] * 3)


def make_split(n: int, seed: int = 0) -> Split:
    images = torch.from_numpy(random_images(np.random.default_rng(seed), n))
    return Split(images, torch.arange(n))  # label i == index i: identifies each image


def loader(split, batch_size=8, norm=IDENTITY, seed=0, **kwargs) -> BatchLoader:
    random = kwargs.get("shuffle") or kwargs.get("crop_padding") or kwargs.get("flip")
    generator = torch.Generator().manual_seed(seed) if random else None
    return BatchLoader(split, batch_size, CPU, norm[0], norm[1], generator=generator, **kwargs)


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Loader output with IDENTITY normalisation -> (B, H, W, C) uint8, checked to be exact."""
    out = x.permute(0, 2, 3, 1)
    rounded = out.round()
    assert torch.allclose(out, rounded, atol=1e-3)
    return rounded.to(torch.uint8)


def test_eval_batches_are_normalised_floats_in_order():
    split = make_split(10)
    batches = list(loader(split, batch_size=4, norm=(list(FIXED_MEAN), list(FIXED_STD))))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    assert all(x.dtype == torch.float32 for x, _ in batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(y, split.labels)
    mean = torch.tensor(FIXED_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(FIXED_STD).view(1, 3, 1, 1)
    expected = (split.images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-5)


def test_len_is_the_number_of_batches():
    assert len(loader(make_split(10), batch_size=4)) == 3
    assert len(loader(make_split(8), batch_size=4)) == 2
    assert len(list(loader(make_split(10), batch_size=4))) == 3


def test_shuffled_epochs_cover_every_item_exactly_once_in_a_new_order():
    split = make_split(37)
    train = loader(split, batch_size=8, shuffle=True, crop_padding=4, flip=True)
    orders = []
    for _ in range(3):
        labels = torch.cat([y for _, y in train])
        assert sorted(labels.tolist()) == list(range(37))
        orders.append(labels.tolist())
    assert orders[0] != list(range(37))
    assert len({tuple(o) for o in orders}) == 3


def test_labels_stay_with_their_images_when_shuffled():
    split = make_split(20)
    for x, y in loader(split, batch_size=6, shuffle=True):
        assert torch.equal(pixels(x), split.images[y])


def test_random_crop_is_a_window_of_the_zero_padded_image():
    split = make_split(24)
    padded = torch.nn.functional.pad(split.images, (0, 0, 4, 4, 4, 4))  # (N, 40, 40, 3), zeros around
    offsets = set()
    for x, y in loader(split, batch_size=8, shuffle=True, crop_padding=4, flip=False):
        for image, i in zip(pixels(x), y.tolist()):
            found = [(dy, dx) for dy in range(9) for dx in range(9)
                     if torch.equal(image, padded[i, dy:dy + 32, dx:dx + 32])]
            assert found, f"image {i} is not a 32x32 window of its padded original"
            offsets.add(found[0])
    assert len(offsets) > 5  # the crops really move (24 draws from 81 positions)
    assert offsets != {(4, 4)}


def test_flip_gives_the_original_or_its_mirror_and_both_occur():
    split = make_split(32)
    kinds = []
    for x, y in loader(split, batch_size=8, shuffle=True, crop_padding=0, flip=True):
        for image, i in zip(pixels(x), y.tolist()):
            original = split.images[i]
            if torch.equal(image, original):
                kinds.append("original")
            elif torch.equal(image, original.flip(1)):  # mirror: reverse the columns
                kinds.append("mirror")
            else:
                pytest.fail(f"image {i} is neither the original nor its horizontal mirror")
    assert 0 < kinds.count("mirror") < len(kinds)


def test_augmentation_without_shuffle_keeps_the_order():
    split = make_split(40)
    batches = list(loader(split, batch_size=16, flip=True))
    assert torch.equal(torch.cat([y for _, y in batches]), split.labels)
    images = torch.cat([pixels(x) for x, _ in batches])
    mirrored = [torch.equal(img, split.images[i].flip(1)) for i, img in enumerate(images)]
    assert all(m or torch.equal(img, split.images[i]) for i, (img, m) in enumerate(zip(images, mirrored)))
    assert 0 < sum(mirrored) < len(split)


@pytest.mark.parametrize("randomness", [{"shuffle": True}, {"crop_padding": 4}, {"flip": True}])
def test_random_order_or_augmentation_needs_a_seeded_generator(randomness):
    with pytest.raises(ValueError, match="seeded generator"):
        BatchLoader(make_split(4), 2, CPU, *IDENTITY, **randomness)


def test_same_seed_gives_identical_batches_and_another_seed_does_not():
    split = make_split(30)

    def epoch(seed):
        return [(x.clone(), y.clone()) for x, y in loader(split, batch_size=7, seed=seed, shuffle=True,
                                                          crop_padding=4, flip=True)]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


@pytest.mark.parametrize("sizes", [[10] * 10, [7, 5, 3], [1, 1, 50], [4, 9, 2, 6]])
def test_stratified_split_takes_exactly_n_with_each_class_share(sizes):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    np.random.default_rng(0).shuffle(labels)
    total = len(labels)
    for n_take in range(1, total):
        taken, rest = stratified_split(labels, n_take, np.random.default_rng(n_take))
        assert len(taken) == n_take and len(rest) == total - n_take
        assert sorted(np.concatenate([taken, rest]).tolist()) == list(range(total))
        counts = np.bincount(labels[taken], minlength=len(sizes))
        share = np.array(sizes) * n_take / total
        assert np.all(np.abs(counts - share) < 1), (n_take, counts, share)


def test_stratified_split_is_seeded():
    labels = np.repeat(np.arange(10), 20)
    a, _ = stratified_split(labels, 50, np.random.default_rng(3))
    b, _ = stratified_split(labels, 50, np.random.default_rng(3))
    c, _ = stratified_split(labels, 50, np.random.default_rng(4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == [5] * 10


@pytest.mark.parametrize("sizes, n_take, expected", [
    ([7, 5, 3], 4, [2, 1, 1]),  # shares 1.87, 1.33, 0.8: the leftovers go to the largest fractions
    ([90, 6, 4], 10, [9, 1, 0]),  # shares 9, 0.6, 0.4
    ([5, 5, 5, 5], 2, None),  # ties: any two classes get one each
])
def test_stratified_split_rounds_each_class_share_to_the_nearest_count(sizes, n_take, expected):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    taken, _ = stratified_split(labels, n_take, np.random.default_rng(0))
    counts = np.bincount(labels[taken], minlength=len(sizes)).tolist()
    if expected is None:
        assert sorted(counts) == [0, 0, 1, 1]
    else:
        assert counts == expected


# --- images too large for the device: in host memory, the same batches -----------------------------


def test_images_kept_in_host_memory_give_the_very_batches_of_images_on_the_device():
    from vitcnn.augment import Augment, Mix

    images = torch.randint(0, 256, (37, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    split = Split(images, torch.arange(37) % 10)

    def batches(placement: str) -> list:
        loader = BatchLoader(split, 8, CPU, MEAN, STD, shuffle=True, crop_padding=4, flip=True,
                             generator=torch.Generator().manual_seed(0), augment=Augment("randaugment", 2, 9, 8, 0.5),
                             mix=Mix(0.8, 1.0, 1.0, "image", CPU), placement=placement)
        assert loader.on_host == (placement == "host")
        return [batch for _ in range(2) for batch in loader]

    on_device, on_host = batches("device"), batches("host")
    assert len(on_device) == len(on_host) == 10
    for (x, y), (hx, hy) in zip(on_device, on_host):
        assert torch.equal(x, hx)
        assert all(torch.equal(a, b) for a, b in zip(dataclasses.astuple(y), dataclasses.astuple(hy)))


def test_a_run_with_its_images_in_host_memory_trains_the_same_weights():
    from vitcnn.config import TrainConfig
    from vitcnn.models import REGISTRY
    from vitcnn.models.store import build_model
    from vitcnn.train import TrainSteps, make_optimizer

    cfg = dataclasses.replace(TrainConfig(), batch_size=8, precision="fp32", epochs=2)
    split = Split(torch.randint(0, 256, (30, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)),
                  torch.arange(30) % 10)
    weights = []
    for placement in ("device", "host"):
        torch.manual_seed(0)
        model = build_model("cnn", 10, dataclasses.replace(REGISTRY["cnn"].params(), **REGISTRY["cnn"].tiny), 32)
        loader = BatchLoader(split, 8, CPU, MEAN, STD, shuffle=True, crop_padding=4, flip=True,
                             generator=torch.Generator().manual_seed(0), placement=placement)
        steps = TrainSteps(model, make_optimizer(model, cfg), loader, torch.float32, cfg, None, graphs=False)
        model.train()
        for epoch in range(2):
            assert [seen for _, seen in steps.epoch(epoch * len(loader))] == [8, 16, 24, 30]
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
