"""Corruptions, occlusion and calibration: each corruption is seeded, keeps images images and grows with
its severity, and equals the published pipeline where that is deterministic; occlusion removes what
it says; ECE on hand-computed cases; the official CIFAR-10-C files are used as they are, and checked."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from matplotlib.colors import hsv_to_rgb as mpl_hsv_to_rgb
from matplotlib.colors import rgb_to_hsv as mpl_rgb_to_hsv

from vitcnn import corruptions as C
from vitcnn.config import RobustnessConfig
from vitcnn.data import BatchLoader, Split
from vitcnn.errors import DataError
from vitcnn.robustness import (ModelRobustness, calibration, compare, correct, expected_calibration_error,
                               fit_temperature, load_official, measure, occlusion_masks, pick_subset)
from vitcnn.runtime import predict
from vitcnn.report import robustness_reading

CPU = torch.device("cpu")


def scenes(n: int = 6, seed: int = 0, side: int = 32) -> torch.Tensor:
    """(n, 3, side, side) uint8 images with structure: smooth colour gradients and a bright square each."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    images = []
    for _ in range(n):
        a, b, c = torch.rand(3, 3, generator=g)
        image = (a.view(3, 1, 1) * xs + b.view(3, 1, 1) * ys + 0.3 * c.view(3, 1, 1)) / 1.6
        top, left = torch.randint(side // 8, side * 5 // 8, (2,), generator=g).tolist()
        image[:, top : top + side // 4, left : left + side // 4] = 0.9
        images.append(image)
    return (torch.stack(images).clamp(0, 1) * 255).to(torch.uint8)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_each_corruption_is_seeded_and_keeps_images_images(name):
    x = scenes()
    a = C.corrupt(x, name, 3, torch.Generator().manual_seed(1))
    b = C.corrupt(x, name, 3, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    assert torch.equal(C.corrupt(x, name, 0, torch.Generator()), x)  # severity 0: the clean images


@pytest.mark.parametrize("side, parameter_set, share", [
    (47, "cifar10-c", 0.07), (48, "tiny-imagenet-c", 0.14), (111, "tiny-imagenet-c", 0.14), (112, "imagenet-c", 0.27),
])
def test_the_image_side_picks_the_parameter_set_at_its_bounds(side, parameter_set, share):
    """CIFAR-10-C's parameters below 48 px, Tiny-ImageNet-C's from 48, ImageNet-C's from 112; `corrupt` reads the side
    from the batch: impulse noise at severity 5 flips the set's share of a mid-grey batch's values (to within five
    standard errors; the neighbouring sets' shares lie dozens away)."""
    assert C.parameter_set(side) == parameter_set
    x = torch.full((8, 3, side, side), 128, dtype=torch.uint8)
    flipped = (C.corrupt(x, "impulse_noise", 5, torch.Generator().manual_seed(0)) != 128).double().mean().item()
    assert flipped == pytest.approx(share, abs=5 * math.sqrt(share * (1 - share) / x.numel()))


@pytest.mark.parametrize("side", [32, 64, 224])  # CIFAR-10-C's parameters, Tiny-ImageNet-C's, ImageNet-C's
@pytest.mark.parametrize("name", [c for c in C.CORRUPTIONS if c != "saturate"])
def test_the_distance_from_the_clean_image_grows_with_severity(name, side):
    x = scenes(8 if side < 224 else 2, side=side)
    distances = [(C.corrupt(x, name, s, torch.Generator().manual_seed(2)).float() - x.float()).abs().mean().item()
                 for s in range(1, 6)]
    assert all(a <= b + 1e-6 for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] > distances[0]


def test_saturate_first_washes_out_then_saturates_as_cifar10c_does():
    x = scenes(4)

    def saturation(images):
        return torch.from_numpy(mpl_rgb_to_hsv(images.permute(0, 2, 3, 1).numpy() / 255.0)[..., 1]).mean().item()

    levels = [saturation(C.corrupt(x, "saturate", s, torch.Generator())) for s in range(6)]
    assert levels[2] < levels[1] < levels[0] < levels[3] < levels[4] < levels[5]


@pytest.mark.parametrize("severity", range(1, 6))
def test_pixelate_and_jpeg_equal_the_published_pil_pipeline(severity):
    import io

    from PIL import Image

    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(severity))
    cifar10c = C.SEVERITY["cifar10-c"]  # the set for 32 px
    c, quality = cifar10c["pixelate"][severity - 1], cifar10c["jpeg_compression"][severity - 1]

    def pil(image: torch.Tensor, change) -> torch.Tensor:
        return torch.from_numpy(np.array(change(Image.fromarray(image.permute(1, 2, 0).numpy())))).permute(2, 0, 1)

    def jpeg(image):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(buffer)

    pixelated = torch.stack([pil(im, lambda p: p.resize((int(32 * c),) * 2, Image.BOX).resize((32, 32), Image.BOX))
                             for im in x])
    assert torch.equal(C.corrupt(x, "pixelate", severity, torch.Generator()), pixelated)
    assert torch.equal(C.corrupt(x, "jpeg_compression", severity, torch.Generator()),
                       torch.stack([pil(im, jpeg) for im in x]))


def test_hsv_conversions_agree_with_matplotlibs_and_invert_each_other():
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    hsv = C.rgb_to_hsv(x)
    expected = mpl_rgb_to_hsv(x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(hsv.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(C.hsv_to_rgb(hsv).permute(0, 2, 3, 1).numpy(), mpl_hsv_to_rgb(expected), atol=1e-5)
    torch.testing.assert_close(C.hsv_to_rgb(hsv), x, atol=1e-5, rtol=0)


def test_contrast_scales_around_each_channels_mean_and_the_defocus_kernels_sum_as_published():
    x = scenes(2)
    unit = x.double() / 255
    means = unit.mean((2, 3), keepdim=True)  # summed in torch's order, not numpy's: equal to within rounding
    torch.testing.assert_close(C.contrast(x, 0.5, torch.Generator()), (0.5 * (unit - means) + means).clamp(0, 1) * 255)
    for radius, blur in [c for table in C.SEVERITY.values() for c in table["defocus_blur"]]:
        kernel = C.disk_kernel(radius, blur, CPU)
        assert kernel.shape == ((17, 17) if radius <= 8 else (21, 21))
        if radius < 8:
            assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
        else:  # ImageNet-C's radii 8 and 10 reach the grid's edge, where the published blur's reflect-101
            assert 1.01 < kernel.sum().item() < 1.02  # border folds back in what spills over: 1.3% and 1.1% more
        # Exact on every CPU: the kernel comes of element-wise float32 operations, mirrored by construction
        # (a convolution's summation order, and so its last bits, would depend on the CPU). Not transposed:
        # cv2's row and column filters fuse their multiply-adds in other orders.
        assert torch.equal(kernel, kernel.flip(0)) and torch.equal(kernel, kernel.flip(1))


# --- occlusion -----------------------------------------------------------------------------------


def test_occlusion_removes_the_stated_share_of_patches_or_a_central_box():
    patches = occlusion_masks(10, 32, 0.25, "patches", 4, seed=0)
    assert patches.shape == (10, 1, 32, 32)
    assert (patches.float().mean((1, 2, 3)) == 16 / 64).all()  # 16 of the 64 cells of 4x4 pixels
    assert not torch.equal(patches[0], patches[1])  # random per image, seeded
    assert torch.equal(patches, occlusion_masks(10, 32, 0.25, "patches", 4, seed=0))
    box = occlusion_masks(3, 32, 0.25, "box", 4, seed=0)
    assert box[0, 0, 8:24, 8:24].all() and box.float().mean().item() == 0.25
    assert not occlusion_masks(2, 32, 0.0, "patches", 4, seed=0).any()


# --- calibration ---------------------------------------------------------------------------------


def test_a_perfectly_calibrated_predictor_has_zero_ece():
    # 100 predictions at confidence 0.8 of which 80 are right, 100 at 0.6 of which 60 are right.
    probs = torch.tensor([[0.8, 0.2]] * 100 + [[0.6, 0.4]] * 100)
    labels = torch.tensor([0] * 80 + [1] * 20 + [0] * 60 + [1] * 40)
    result = calibration(probs.log(), labels, bins=10)
    assert result.ece == pytest.approx(0.0, abs=1e-6)
    assert [(b["count"], round(b["accuracy"], 6)) for b in result.bins] == [(100, 0.6), (100, 0.8)]


def test_ece_nll_and_brier_match_a_hand_computed_case():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 0])
    result = calibration(probs.log(), labels, bins=2)  # bins (0, 0.5], (0.5, 1]: all four in the second
    # confidences 0.9, 0.7, 0.7, 0.55 (mean 0.7125); right: yes, no, yes, no (0.5)
    assert result.ece == pytest.approx(abs(0.7125 - 0.5))
    assert result.nll == pytest.approx(-np.mean(np.log([0.9, 0.3, 0.7, 0.45])))
    assert result.brier == pytest.approx(np.mean([2 * 0.1**2, 2 * 0.7**2, 2 * 0.3**2, 2 * 0.55**2]))


# --- measure: the stage's work ----------------------------------------------------------------------


def test_the_vectorised_ece_is_calibrations_ece():
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(500, 10, generator=g) * 3, torch.randint(0, 10, (500,), generator=g)
    result = calibration(logits, labels, bins=15)
    assert expected_calibration_error(result.confidence.astype(np.float64), result.correct, 15) == pytest.approx(
        result.ece, abs=1e-6)


def _model(clean: np.ndarray, share: np.ndarray, confidence: np.ndarray, correct: np.ndarray) -> ModelRobustness:
    logits = torch.zeros(1, 2)  # only the per-image arrays matter to `compare`
    cal = calibration(logits, torch.zeros(1, dtype=torch.long), 15)
    cal.confidence, cal.correct = confidence, correct
    return ModelRobustness(clean_acc=float(clean.mean()), clean_correct=clean, corrupted_share=share, calibration=cal)


def test_paired_intervals_tell_a_real_difference_from_none():
    rng = np.random.default_rng(0)
    clean = rng.random(400) < 0.8
    share = np.where(clean, rng.uniform(0.5, 1.0, 400), 0.0)
    right = rng.random(2000) < 0.7
    calibrated = np.full(2000, 0.7)  # confident exactly as often as right
    overconfident = np.full(2000, 0.99)
    same = compare({"a": _model(clean, share, calibrated, right), "b": _model(clean, share, calibrated, right)},
                   bins=15, seed=0, resamples=500)[0]
    assert same["relative_robustness"]["diff"] == 0 and same["relative_robustness"]["ci95"] == [0, 0]
    # b loses a quarter of a's accuracy under corruption, and is overconfident: both clear.
    differ = compare({"a": _model(clean, share, calibrated, right), "b": _model(clean, share * 0.75, overconfident, right)},
                     bins=15, seed=0, resamples=500)[0]
    robust, ece = differ["relative_robustness"], differ["ece"]
    assert robust["ci95"][0] > 0 and robust["ci95"][0] <= robust["diff"] <= robust["ci95"][1]
    assert ece["ci95"][1] < 0 and ece["diff"] == pytest.approx(
        expected_calibration_error(calibrated, right, 15) - expected_calibration_error(overconfident, right, 15))
    assert robust["images"] == 400 and ece["images"] == 2000
    # Two models that differ image by image at random, on few images: the intervals include 0, and the
    # reading says neither is clearly better.
    other_share = np.where(clean[:40], rng.uniform(0.5, 1.0, 40), 0.0)
    other_confidence = np.clip(calibrated[:40] + rng.normal(0, 0.1, 40), 0, 1)
    noisy = compare({"a": _model(clean[:40], share[:40], calibrated[:40], right[:40]),
                     "b": _model(clean[:40], other_share, other_confidence, right[:40])},
                    bins=15, seed=0, resamples=500)
    assert noisy[0]["relative_robustness"]["ci95"][0] < 0 < noisy[0]["relative_robustness"]["ci95"][1]
    metrics = {"a": {"relative_robustness": 0.8, "ece": 0.02}, "b": {"relative_robustness": 0.78, "ece": 0.03}}
    reading = robustness_reading(metrics, noisy)
    assert "neither degrades clearly more gracefully" in reading[0]
    assert "neither is clearly better calibrated" in reading[1]
    # Eight images, one clean hit: some resamples have no ratio, so there is no interval, and no verdict.
    few = np.array([True] + [False] * 7)
    none = compare({"a": _model(few, few * 0.5, calibrated[:8], right[:8]),
                    "b": _model(few, few * 0.4, calibrated[:8], right[:8])}, bins=15, seed=0, resamples=200)
    assert none[0]["relative_robustness"]["ci95"] is None
    assert "too few images to tell" in robustness_reading(metrics, none)[0]
    clear = robustness_reading(metrics, [differ])
    assert "the a degrades more gracefully" in clear[0] and "the a is the better calibrated" in clear[1]


def _labels_drawn_from(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels sampled from softmax(logits): a predictor that is calibrated by construction."""
    return torch.multinomial(logits.softmax(1), 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_temperature_scaling_finds_the_temperature_a_calibrated_predictor_was_scaled_by(true_temperature):
    logits = torch.randn(20000, 10, generator=torch.Generator().manual_seed(1)) * 2.5
    labels = _labels_drawn_from(logits, seed=2)
    found = fit_temperature(logits * true_temperature, labels)  # over- (T > 1) or underconfident (T < 1)
    assert found == pytest.approx(true_temperature, rel=0.05)
    nll = lambda t: torch.nn.functional.cross_entropy(logits.double() * true_temperature / t, labels).item()
    assert nll(found) <= min(nll(found * 0.98), nll(found * 1.02))  # a minimum, not just near the truth
    scaled = calibration(logits * true_temperature / found, labels, 15)
    raw = calibration(logits * true_temperature, labels, 15)
    assert scaled.ece < 0.02
    if true_temperature != 1.0:
        assert raw.ece > 3 * scaled.ece  # what it was for
    assert np.array_equal(scaled.correct, raw.correct)


class Brightness(torch.nn.Module):
    """A stand-in model: class 1 when the image's mean (normalised) value is positive, else class 0."""

    def forward(self, x):
        score = x.mean((1, 2, 3))
        return torch.stack([-score, score], 1)


def test_clean_severity_and_empty_occlusion_give_the_clean_accuracy_exactly():
    images = scenes(40, seed=4).permute(0, 2, 3, 1).contiguous()
    labels = (images.float().mean((1, 2, 3)) > 120).long()
    test = Split(images, labels)
    config = {"mean": [0.47] * 3, "std": [0.25] * 3}
    cfg = dataclasses.replace(RobustnessConfig(), subset=20, corruptions=["contrast", "gaussian_noise"],
                              severities=[1, 5], occlusion_fractions=[0.5], batch_size=7)
    val_images = scenes(30, seed=5).permute(0, 2, 3, 1).contiguous()
    val = Split(val_images, (val_images.float().mean((1, 2, 3)) > 100).long())  # another threshold: other errors
    results = measure({"toy": (Brightness(), config)}, test, val, cfg, seed=0, device=CPU, dtype=torch.float32)["toy"]
    subset = pick_subset(labels, 20, 0)
    clean = float(correct(Brightness(), images[subset], labels[subset], config, CPU, torch.float32, 7).mean())
    assert results.clean_acc == clean
    assert results.occlusion_acc["patches"][0.0] == clean and results.occlusion_acc["box"][0.0] == clean
    assert set(results.corruption_acc) == {"contrast", "gaussian_noise"}
    summary = results.summary()
    assert summary["corruption_acc"] == pytest.approx(np.mean([a for s in results.corruption_acc.values()
                                                               for a in s.values()]), abs=1e-6)
    assert {"ece", "nll", "brier", "relative_robustness", "occlusion_box_acc", "temperature", "ece_ts"} <= set(summary)
    # Temperature scaling changes confidence only: every prediction stays as it was.
    assert np.array_equal(results.calibrated.correct, results.calibration.correct)
    # The temperature is the validation split's, never the test split's.
    def logits(split):
        return predict(Brightness(), BatchLoader(split, 7, CPU, config["mean"], config["std"]), torch.float32)

    assert results.temperature == pytest.approx(fit_temperature(logits(val), val.labels))
    assert results.temperature != pytest.approx(fit_temperature(logits(test), labels), rel=0.01)
    # The per-image shares behind the paired intervals average to the same accuracies.
    assert results.corrupted_share.mean() == pytest.approx(summary["corruption_acc"], abs=1e-6)
    assert results.occluded_share["box"].mean() == pytest.approx(summary["occlusion_box_acc"], abs=1e-6)


def test_a_subset_larger_than_the_test_split_is_one_line():
    test = Split(scenes(10).permute(0, 2, 3, 1).contiguous(), torch.zeros(10, dtype=torch.long))
    cfg = dataclasses.replace(RobustnessConfig(), subset=11)
    with pytest.raises(DataError, match=r"robustness.subset: 11 is not allowed; the test split has 10 images"):
        measure({}, test, test, cfg, 0, CPU, torch.float32)


def _write_official(folder, n: int, labels: np.ndarray, images: np.ndarray, corruptions: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    np.save(folder / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    for name in corruptions:
        np.save(folder / f"{name}.npy", images)


def test_the_official_cifar10c_files_are_used_as_they_are(tmp_path):
    n = 12
    g = np.random.default_rng(0)
    labels = g.integers(0, 2, n)
    official = g.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
    _write_official(tmp_path / "c", n, labels, official, ["contrast"])
    test = Split(scenes(n).permute(0, 2, 3, 1).contiguous(), torch.from_numpy(labels))
    config = {"mean": [0.47] * 3, "std": [0.25] * 3}
    cfg = dataclasses.replace(RobustnessConfig(), subset=0, corruptions=["contrast"], severities=[2],
                              occlusion_fractions=[], cifar10c=str(tmp_path / "c"))
    got = measure({"toy": (Brightness(), config)}, test, test, cfg, 0, CPU, torch.float32)["toy"]
    expected = float(correct(Brightness(), torch.from_numpy(official[n : 2 * n]), torch.from_numpy(labels), config,
                             CPU, torch.float32, 500).mean())  # severity 2: the second block of n rows
    assert got.corruption_acc["contrast"][2] == expected


@pytest.mark.parametrize("damage, message", [
    ("labels", "12 labels, expected 5 x 4"),
    ("order", "the labels do not follow the test split's order"),
    ("shape", "contrast.npy: shape (20, 16, 16, 3) uint8, expected (20, 32, 32, 3) uint8"),
    ("missing", "contrast.npy not found"),
])
def test_wrong_cifar10c_files_are_one_line(tmp_path, damage, message):
    labels = np.array([0, 1, 1, 2])
    folder = tmp_path / "c"
    images = np.zeros((20, 16, 16, 3) if damage == "shape" else (20, 32, 32, 3), dtype=np.uint8)
    _write_official(folder, 4, labels[::-1] if damage == "order" else labels, images,
                    [] if damage == "missing" else ["contrast"])
    if damage == "labels":
        np.save(folder / "labels.npy", np.zeros(12, dtype=np.uint8))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_official(folder, ["contrast"], torch.from_numpy(labels), (32, 32, 3))


def test_a_model_at_chance_gets_no_verdict_on_robustness_or_calibration():
    from vitcnn.report import robustness_reading
    from vitcnn.robustness import above_chance

    guessing = above_chance(np.arange(1000) % 10 == 0, classes=10, temperature=20.0)  # 10% right: chance
    assert not guessing["above"] and guessing["temperature_at_bound"] and guessing["ci95"][0] < 0.1
    assert above_chance(np.arange(1000) % 10 < 3, classes=10, temperature=1.2)["above"]  # 30%: clearly above
    assert not above_chance(np.arange(1000) % 10 < 3, classes=10, temperature=0.05)["above"]  # no minimum found
    robustness = {"vit": {"relative_robustness": 0.9, "ece": 0.02, "temperature": 1.1, "ece_ts": 0.01},
                  "cnn": {"relative_robustness": None, "ece": 0.2, "temperature": 20.0, "ece_ts": 0.1}}
    pair = {"a": "vit", "b": "cnn", "at_chance": {"cnn": guessing},
            "relative_robustness": {"diff": -0.07, "ci95": [-0.1, -0.05], "images": 500},
            "ece": {"diff": -0.18, "ci95": [-0.2, -0.16], "images": 10000}}
    lines = robustness_reading(robustness, [pair])
    text = " ".join(lines)
    assert "The CNN is not clearly above chance (test accuracy 10.0% [95% CI" in text
    assert "no verdict on robustness or calibration between the ViT and the CNN" in text
    assert "more gracefully" not in text and "better calibrated" not in text and "more accurate" not in text
