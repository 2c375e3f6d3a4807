"""On-device batch augmentation: every op is torchvision's own (compared pixel for pixel), does what it
says on synthetic images, is seeded and differs across images; Cutout, random erasing, mixup and
cutmix; and without augmentation the loader's batches are exactly crop + flip's."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from vitcnn import augment as A
from vitcnn.data import BatchLoader, Split
from vitcnn.train import _loss

NEAREST = TF.InterpolationMode.NEAREST


def batch(n: int = 24, seed: int = 0) -> torch.Tensor:
    """(n, 3, 32, 32) uint8: random pixels, a third of them squeezed into a narrow range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    x[: n // 3] = x[: n // 3] // 3 + 80
    return x


def factors(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def run(op, x: torch.Tensor, *args) -> torch.Tensor:
    """An op of the module on a uint8 batch, back to uint8."""
    return op(x.float(), *args).to(torch.uint8)


# --- torchvision's definitions, pixel for pixel -------------------------------------------------


@pytest.mark.parametrize("name, reference", [
    ("brightness", TF.adjust_brightness), ("color", TF.adjust_saturation),
    ("contrast", TF.adjust_contrast), ("sharpness", TF.adjust_sharpness),
])
def test_each_enhance_op_equals_torchvisions_with_a_factor_per_image(name, reference):
    x, f = batch(), factors(24)
    expected = torch.stack([reference(image, float(factor)) for image, factor in zip(x, f)])
    assert torch.equal(run(getattr(A, name), x, f), expected)


def test_posterize_solarize_autocontrast_and_equalize_equal_torchvisions():
    x = batch()
    bits = torch.arange(24, dtype=torch.float64) % 8 + 1
    thresholds = torch.linspace(0, 256, 24, dtype=torch.float64)
    assert torch.equal(run(A.posterize, x, bits), torch.stack([TF.posterize(im, int(b)) for im, b in zip(x, bits)]))
    assert torch.equal(run(A.solarize, x, thresholds),
                       torch.stack([TF.solarize(im, float(t)) if t <= 255 else im for im, t in zip(x, thresholds)]))
    assert torch.equal(run(A.autocontrast, x), torch.stack([TF.autocontrast(im) for im in x]))
    assert torch.equal(run(A.equalize, x), torch.stack([TF.equalize(im) for im in x]))


def _warp(x: torch.Tensor, op: str, magnitudes: list[float]) -> torch.Tensor:
    m = torch.tensor(magnitudes, dtype=torch.float64)
    return run(A.affine, x, A.geometry(torch.full((len(m),), A.OP[op]), m, (32, 32)))


def test_the_geometric_ops_equal_torchvisions_nearest_warps():
    x = batch(6)
    shears = [0.3, -0.2, 0.99, -0.99, 0.05, 0.15]
    degrees = [math.degrees(math.atan(m)) for m in shears]
    assert torch.equal(_warp(x, "shear_x", shears), torch.stack([
        TF.affine(im, angle=0.0, translate=[0, 0], scale=1.0, shear=[d, 0.0], interpolation=NEAREST, center=[0, 0])
        for im, d in zip(x, degrees)]))
    assert torch.equal(_warp(x, "shear_y", shears), torch.stack([
        TF.affine(im, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, d], interpolation=NEAREST, center=[0, 0])
        for im, d in zip(x, degrees)]))
    shifts = [3.7, -5.2, 14.5, -14.5, 0.4, 32.0]
    assert torch.equal(_warp(x, "translate_x", shifts), torch.stack([
        TF.affine(im, angle=0.0, translate=[int(t), 0], scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST)
        for im, t in zip(x, shifts)]))
    angles = [90.0, -30.0, 13.0, -135.0, 45.0, 180.0]
    assert torch.equal(_warp(x, "rotate", angles),
                       torch.stack([TF.rotate(im, a, interpolation=NEAREST) for im, a in zip(x, angles)]))


# --- what each op does, on synthetic images ----------------------------------------------------


def test_ops_do_what_they_say_on_synthetic_images():
    one = torch.ones(1, dtype=torch.float64)
    flat = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)
    assert (run(A.brightness, flat, 1.5 * one) == 150).all()
    assert (run(A.brightness, flat, 0.25 * one) == 25).all()
    value = torch.full((1, 3, 4, 4), 0b10110111, dtype=torch.uint8)
    assert (run(A.posterize, value, 3 * one) == 0b10100000).all()
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    solarized = run(A.solarize, ramp, 128 * one)
    assert torch.equal(solarized[ramp < 128], ramp[ramp < 128]) and torch.equal(solarized[ramp >= 128],
                                                                                255 - ramp[ramp >= 128])
    narrow = (ramp // 4 + 60).contiguous()  # 60..123
    stretched = run(A.autocontrast, narrow)
    assert stretched.min() == 0 and stretched.max() >= 254  # 254 here, as torchvision: 63 * (1/255) rounds up
    two_levels = torch.tensor([50, 150], dtype=torch.uint8).repeat(8).view(1, 1, 4, 4).expand(1, 3, 4, 4)
    # Contrast 0 leaves the mean luma: 99, since torchvision's weights sum to 0.9999 (50 -> 49, 150 -> 149).
    assert (run(A.contrast, two_levels.contiguous(), 0 * one) == 99).all()
    assert set(run(A.contrast, two_levels.contiguous(), 2 * one).unique().tolist()) == {1, 201}  # 2x - 99


def test_a_translation_moves_a_marker_by_the_stated_pixels_and_rotation_by_90_is_rot90():
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[..., 10, 12] = 255
    moved = _warp(image, "translate_x", [5.9])  # whole pixels: 5
    assert torch.nonzero(moved[0, 0]).tolist() == [[10, 17]]
    moved = _warp(image, "translate_y", [-3.0])
    assert torch.nonzero(moved[0, 0]).tolist() == [[7, 12]]
    x = batch(2)
    assert torch.equal(_warp(x, "rotate", [90.0, 90.0]), torch.rot90(x, 1, (2, 3)))  # counter-clockwise
    sheared = _warp(x, "shear_x", [2.0, 2.0])  # about the top-left corner: row j moves left by 2 (j + 0.5)
    assert torch.equal(sheared[..., 0, :31], x[..., 0, 1:]) and torch.equal(sheared[..., 3, :25], x[..., 3, 7:])
    assert (sheared[..., 3, 25:] == 0).all()  # black where the row left the image


@pytest.mark.parametrize("op", A.OPS)
def test_every_op_keeps_the_batch_a_batch_of_images(op):
    x = batch(8)
    m = A.magnitudes("trivialaugment", 32)[A.OP[op], 30] * torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    out = A.apply_op(x.float(), torch.full((8,), A.OP[op]), m)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    if op != "identity":
        assert not torch.equal(out.to(torch.uint8), x), f"{op} at full strength changed nothing"
    # The identity parameters of every other op change nothing.
    assert torch.equal(A.apply_op(x.float(), torch.zeros(8, dtype=torch.long), m).to(torch.uint8), x)


# --- the policies: per image, seeded ------------------------------------------------------------


@pytest.mark.parametrize("augment", [A.Augment("randaugment", 2, 9), A.Augment("trivialaugment"),
                                     A.Augment(cutout=8), A.Augment(erasing=1.0)])
def test_policies_are_seeded_per_image_and_keep_uint8(augment):
    same = batch(1).permute(0, 2, 3, 1).expand(32, 32, 32, 3).contiguous()  # one image, 32 times
    a = augment(same, torch.Generator().manual_seed(5))
    b = augment(same, torch.Generator().manual_seed(5))
    c = augment(same, torch.Generator().manual_seed(6))
    assert a.dtype == torch.uint8 and a.shape == same.shape and a.is_contiguous()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({image.numpy().tobytes() for image in a}) > 16  # drawn per image, not per batch


def test_cutout_zeroes_a_square_and_erasing_only_with_its_probability():
    ones = torch.full((64, 3, 32, 32), 7, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    cut = A.cutout(ones, 8, g)
    zeroed = (cut[:, 0] == 0).sum((1, 2))
    assert (zeroed <= 64).all() and (zeroed == 64).any() and (zeroed > 0).all()  # cut where it crosses the border
    assert torch.equal(A.random_erasing(ones, 0.0, g), ones)
    erased = (A.random_erasing(ones, 1.0, g)[:, 0] == 0).sum((1, 2)).float() / 1024
    assert (erased > 0).all() and (erased <= 0.33 * 1.2).all()


# --- mixup and cutmix --------------------------------------------------------------------------


def test_beta_draws_have_the_distributions_mean_and_variance():
    alpha = 0.8
    mix = A.Mix(alpha, 0.0, 1.0, "image", torch.device("cpu"))
    lam = mix.sample("mixup", 40_000, torch.Generator().manual_seed(0))
    assert lam.min() >= 0 and lam.max() <= 1
    assert lam.mean().item() == pytest.approx(0.5, abs=0.01)
    assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)


def test_mixup_blends_each_image_with_its_partner_by_its_lambda():
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16)
    mixed, labels = A.Mix(0.4, 0.0, 1.0, "image", torch.device("cpu"))(x, y, torch.Generator().manual_seed(0))
    lam = labels.lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    assert torch.equal(labels.a, y) and torch.equal(labels.b, y.flip(0))
    assert torch.equal(labels.dominant, torch.where(labels.lam >= 0.5, y, y.flip(0)))


@pytest.mark.parametrize("per", ["batch", "image"])
def test_cutmix_lambda_is_the_share_of_the_image_left_unpasted(per):
    x = torch.zeros(16, 3, 32, 32)
    x[8:] = 1.0  # partners (the batch reversed) differ from each image everywhere
    mixed, labels = A.Mix(0.0, 1.0, 1.0, per, torch.device("cpu"))(x, torch.arange(16), torch.Generator().manual_seed(3))
    kept = (mixed == x).all(1).float().mean((1, 2))
    torch.testing.assert_close(kept, labels.lam)
    if per == "batch":
        assert len(set(labels.lam.tolist())) == 1


def test_a_mixed_loss_weights_both_labels_and_composes_with_label_smoothing():
    logits, a, b = torch.randn(8, 10), torch.arange(8), torch.arange(8).flip(0)
    lam = torch.linspace(0, 1, 8)
    ce = torch.nn.functional.cross_entropy
    expected = (lam * ce(logits, a, reduction="none", label_smoothing=0.1)
                + (1 - lam) * ce(logits, b, reduction="none", label_smoothing=0.1)).mean()
    torch.testing.assert_close(_loss(logits, A.Mixed(a, b, lam), 0.1), expected)
    torch.testing.assert_close(_loss(logits, A.Mixed(a, b, torch.ones(8)), 0.1), ce(logits, a, label_smoothing=0.1))


# --- the loader -------------------------------------------------------------------------------


def test_without_augmentation_the_loaders_batches_are_those_of_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(40) % 10)
    args = (split, 16, torch.device("cpu"), [0.5] * 3, [0.25] * 3)
    plain = BatchLoader(*args, shuffle=True, crop_padding=4, flip=True, generator=torch.Generator().manual_seed(1))
    off = BatchLoader(*args, shuffle=True, crop_padding=4, flip=True, generator=torch.Generator().manual_seed(1),
                      augment=None, mix=None)
    for (x1, y1), (x2, y2) in zip(plain, off):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(plain.generator.get_state(), off.generator.get_state())


def test_an_augmented_loader_yields_mixed_labels_and_channels_last_batches():
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(32) % 10)
    loader = BatchLoader(split, 16, torch.device("cpu"), [0.5] * 3, [0.25] * 3, shuffle=True, crop_padding=4,
                         flip=True, generator=g, augment=A.Augment("randaugment", 2, 9),
                         mix=A.Mix(0.8, 1.0, 1.0, "batch", torch.device("cpu")))
    x, y = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
    assert isinstance(y, A.Mixed) and len(y) == 16
