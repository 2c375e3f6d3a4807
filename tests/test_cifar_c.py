"""vitcnn.corruptions against CIFAR-10-C's published code, pixel for pixel.

PUBLISHED holds a port of the deterministic corruptions of `make_cifar_c.py` (Hendrycks & Dietterich
2019; github hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py): the original's functions as
they are, calling the libraries it calls (numpy, scikit-image, OpenCV, PIL), and `np.uint8` of their
result as its caller does (its `convert_img` too, which gives the image back unchanged). One thing
changed: skimage's `multichannel=True` is now `channel_axis=-1` (renamed, the same filter). The severity
lists are the original's, copied, not vitcnn's. The noises are ported as well, with their random draws
passed in. The port lives here, not in the library: it is the reference, one image at a time in numpy.

Every corruption and severity is compared on generated images that exercise what truncation decides
(flat images and blocks at every kind of level, black and white blocks, ramps over all 256 levels,
channels that tie for the maximum), and on real CIFAR-10 test images when the shared JPEG copy is
there. The noises draw from torch's generator, so they can equal the published files only in
distribution (test_robustness.py); here, given their draws, they must be the original's float64
formulas truncated.
"""

from __future__ import annotations

import tarfile
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage as sk
import torch
import torchvision.transforms as trn
from PIL import Image as PILImage
from skimage.filters import gaussian

from vitcnn import corruptions as C

CIFAR10_JPEG = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


# --- make_cifar_c.py, ported ------------------------------------------------------------------------


def disk(radius, alias_blur=0.1, dtype=np.float32):
    if radius <= 8:
        L = np.arange(-8, 8 + 1)
        ksize = (3, 3)
    else:
        L = np.arange(-radius, radius + 1)
        ksize = (5, 5)
    X, Y = np.meshgrid(L, L)
    aliased_disk = np.array((X ** 2 + Y ** 2) <= radius ** 2, dtype=dtype)
    aliased_disk /= np.sum(aliased_disk)

    # supersample disk to antialias
    return cv2.GaussianBlur(aliased_disk, ksize=ksize, sigmaX=alias_blur)


def gaussian_noise(x, severity, normal):
    """np.random.normal(size=x.shape, scale=c) is `normal` (standard normal draws, torch's) times c."""
    c = [0.04, 0.06, .08, .09, .10][severity - 1]

    x = np.array(x) / 255.
    return np.clip(x + c * normal, 0, 1) * 255


def shot_noise(x, severity, poisson):
    """np.random.poisson(x * c) is `poisson`, torch's draws for those rates."""
    c = [500, 250, 100, 75, 50][severity - 1]

    x = np.array(x) / 255.
    return np.clip(poisson / c, 0, 1) * 255


def impulse_noise(x, severity, flipped, salted):
    """sk.util.random_noise(x, mode='s&p', amount=c) with its two Bernoulli draws given: `flipped` (rate c)
    and `salted` (rate 0.5); salt is 1, pepper 0 (the image has no negative values), and its clip to
    [0, 1] changes nothing more."""
    c = [.01, .02, .03, .05, .07][severity - 1]

    x = np.array(x) / 255.
    x[flipped & salted] = 1
    x[flipped & ~salted] = 0
    return np.clip(x, 0, 1) * 255


def gaussian_blur(x, severity=1):
    c = [.4, .6, 0.7, .8, 1][severity - 1]

    x = gaussian(np.array(x) / 255., sigma=c, channel_axis=-1)
    return np.clip(x, 0, 1) * 255


def defocus_blur(x, severity=1):
    c = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]

    x = np.array(x) / 255.
    kernel = disk(radius=c[0], alias_blur=c[1])

    channels = []
    for d in range(3):
        channels.append(cv2.filter2D(x[:, :, d], -1, kernel))
    channels = np.array(channels).transpose((1, 2, 0))  # 3x32x32 -> 32x32x3

    return np.clip(channels, 0, 1) * 255


def contrast(x, severity=1):
    c = [.75, .5, .4, .3, 0.15][severity - 1]

    x = np.array(x) / 255.
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def brightness(x, severity=1):
    c = [.05, .1, .15, .2, .3][severity - 1]

    x = np.array(x) / 255.
    x = sk.color.rgb2hsv(x)
    x[:, :, 2] = np.clip(x[:, :, 2] + c, 0, 1)
    x = sk.color.hsv2rgb(x)

    return np.clip(x, 0, 1) * 255


def saturate(x, severity=1):
    c = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][severity - 1]

    x = np.array(x) / 255.
    x = sk.color.rgb2hsv(x)
    x[:, :, 1] = np.clip(x[:, :, 1] * c[0] + c[1], 0, 1)
    x = sk.color.hsv2rgb(x)

    return np.clip(x, 0, 1) * 255


def jpeg_compression(x, severity=1):
    c = [80, 65, 58, 50, 40][severity - 1]

    output = BytesIO()
    x.save(output, 'JPEG', quality=c)
    x = PILImage.open(output)

    return x


def pixelate(x, severity=1):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]

    x = x.resize((int(32 * c), int(32 * c)), PILImage.BOX)
    x = x.resize((32, 32), PILImage.BOX)

    return x


PUBLISHED = {"contrast": contrast, "brightness": brightness, "saturate": saturate, "gaussian_blur": gaussian_blur,
             "defocus_blur": defocus_blur, "pixelate": pixelate, "jpeg_compression": jpeg_compression}
convert_img = trn.Compose([trn.ToTensor(), trn.ToPILImage()])  # the original's, applied to each test image


def published(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    """What make_cifar_c.py writes for `images` (N, 32, 32, 3) uint8: np.uint8 of its function of each image."""
    return np.stack([np.uint8(PUBLISHED[name](convert_img(image), severity)) for image in images])


# --- the images --------------------------------------------------------------------------------------


def generated(seed: int = 0) -> np.ndarray:
    """(16, 32, 32, 3) uint8 images, seeded, made of what tells truncation from rounding and float64 from
    float32: eight images of one colour each (greys among them: skimage's zero-saturation path), and eight
    of blocks: black, white, two colours whose largest channels tie (skimage's hue takes the last maximum),
    a flat colour, ramps through all 256 levels in each direction, and random pixels."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (16, 3))
    colours[:4] = colours[:4, :1]  # greys
    images = np.broadcast_to(colours[:, None, None, :], (16, 32, 32, 3)).copy()
    levels = np.arange(1024).reshape(32, 32) % 256  # neighbours one level apart, all 256 levels in each channel
    for image in images[8:]:
        high, low = sorted(rng.integers(0, 256, 2), reverse=True)
        image[:8, :8], image[:8, 8:16] = 0, 255
        image[:8, 16:24], image[:8, 24:] = (high, high, low), (low, high, high)
        image[8:16] = np.stack([levels[8:16], (levels[8:16] + 85) % 256, (levels[8:16] + 170) % 256], -1)
        image[16:24] = np.stack([levels.T[16:24], (levels.T[16:24] + 85) % 256, levels.T[16:24]], -1)
        image[24:, :16] = rng.integers(0, 256, (8, 16, 3))
    return images.astype(np.uint8)


def cifar10_test_images(per_class: int = 8) -> np.ndarray:
    """The first `per_class` images of each class of the test split, read out of the shared JPEG copy."""
    wanted = {f"cifar10-jpeg/test/{c}/{i:04d}.jpg" for c in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                                             "frog", "horse", "ship", "truck")
              for i in range(per_class)}
    images = {}
    with tarfile.open(CIFAR10_JPEG, "r|gz") as archive:
        for member in archive:
            if member.name in wanted:
                images[member.name] = np.array(PILImage.open(archive.extractfile(member)).convert("RGB"))
                if len(images) == len(wanted):
                    break
    return np.stack([images[name] for name in sorted(images)])


@pytest.fixture(scope="module")
def real_images() -> np.ndarray:
    if not CIFAR10_JPEG.exists():
        pytest.skip(f"{CIFAR10_JPEG} is not there: the comparison on real CIFAR-10 images needs it")
    return cifar10_test_images()


def corrupted(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    """vitcnn's corruption of (N, 32, 32, 3) uint8 images, as (N, 32, 32, 3) uint8."""
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return C.corrupt(batch, name, severity, torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy()


def assert_same_pixels(got: np.ndarray, expected: np.ndarray) -> None:
    differ = got != expected
    assert not differ.any(), (f"{differ.sum()} of {differ.size} values differ, by up to "
                              f"{np.abs(got.astype(int) - expected).max()} levels")


# --- the tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("severity", range(1, 6))
@pytest.mark.parametrize("name", PUBLISHED)
def test_each_deterministic_corruption_equals_the_published_code_on_generated_images(name, severity):
    images = generated(severity)
    assert_same_pixels(corrupted(images, name, severity), published(images, name, severity))


@pytest.mark.parametrize("severity", range(1, 6))
@pytest.mark.parametrize("name", PUBLISHED)
def test_each_deterministic_corruption_equals_the_published_code_on_cifar10_test_images(name, severity, real_images):
    assert_same_pixels(corrupted(real_images, name, severity), published(real_images, name, severity))


@pytest.mark.parametrize("severity", range(1, 6))
def test_the_noises_are_the_originals_float64_formulas_on_torchs_draws_truncated(severity):
    """The draws are made here as vitcnn makes them, from a generator seeded 0, in (B, C, H, W) order:
    float64 standard normals; Poisson counts for the float64 rates x * c; two uniform draws (float32)
    for which values flip and which of those are salt."""
    images = generated(severity)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    def hwc(draws: torch.Tensor) -> np.ndarray:
        return draws.permute(0, 2, 3, 1).numpy()

    normal = hwc(torch.randn(batch.shape, dtype=torch.float64, generator=seeded()))
    counts = hwc(torch.poisson(batch.double() / 255 * C.SEVERITY["shot_noise"][severity - 1], generator=seeded()))
    g = seeded()
    flipped = hwc(torch.rand(batch.shape, generator=g) < C.SEVERITY["impulse_noise"][severity - 1])
    salted = hwc(torch.rand(batch.shape, generator=g) < 0.5)
    expected = {
        "gaussian_noise": [gaussian_noise(x, severity, z) for x, z in zip(images, normal)],
        "shot_noise": [shot_noise(x, severity, n) for x, n in zip(images, counts)],
        "impulse_noise": [impulse_noise(x, severity, f, s) for x, f, s in zip(images, flipped, salted)],
    }
    for name, levels in expected.items():
        assert_same_pixels(corrupted(images, name, severity), np.uint8(np.stack(levels)))
