"""vitcnn.corruptions against the published code of CIFAR-10-C, Tiny-ImageNet-C and ImageNet-C, pixel for pixel.

Here is a port of the deterministic corruptions of the three files that made those datasets (Hendrycks &
Dietterich 2019; github hendrycks/robustness, ImageNet-C/create_c/: make_cifar_c.py, make_tinyimagenet_c.py,
make_imagenet_c.py, as of commit 8190fe3): the original's functions as they are, calling the libraries they
call (numpy, scikit-image, OpenCV, PIL), and `np.uint8` of their result as their callers do (make_cifar_c.py's
`convert_img` too, which gives the image back unchanged). For these corruptions the three files' functions are
the same line for line (`disk` too) but for their severity lists and the side pixelate resizes from and back to:
so each is ported once, taking its parameter `c` (and pixelate its `side`) where the original picks it from its
list, and LISTS holds the three files' lists, copied, not vitcnn's. One thing changed: skimage's
`multichannel=True` is now `channel_axis=-1` (renamed, the same filter). The noises are ported as well, with
their random draws passed in. The port lives here, not in the library: it is the reference, one image at a
time in numpy.

Every corruption and severity is compared on generated images that exercise what truncation decides
(flat images and blocks at every kind of level, black and white blocks, ramps over all 256 levels,
channels that tie for the maximum): at 32 px with CIFAR-10-C's parameters, at 64 px with Tiny-ImageNet-C's
and at 224 px with ImageNet-C's (vitcnn picks them by the images' size); and on real CIFAR-10 test images
when the shared JPEG copy is there. The noises draw from torch's generator, so they can equal the published
files only in distribution (here, and test_robustness.py); given their draws they must be the original's
float64 formulas truncated.
"""

from __future__ import annotations

import math
import platform
import tarfile
from functools import partial
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

# Each file's severity lists, copied from it (c = [...][severity - 1]).
LISTS = {
    "cifar10-c": {  # make_cifar_c.py
        "gaussian_noise": [0.04, 0.06, .08, .09, .10], "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [.01, .02, .03, .05, .07], "gaussian_blur": [.4, .6, 0.7, .8, 1],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "contrast": [.75, .5, .4, .3, 0.15], "brightness": [.05, .1, .15, .2, .3],
        "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
        "jpeg_compression": [80, 65, 58, 50, 40], "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    },
    "tiny-imagenet-c": {  # make_tinyimagenet_c.py
        "gaussian_noise": [0.04, 0.08, .12, .15, .18], "shot_noise": [250, 100, 50, 30, 15],
        "impulse_noise": [.01, .02, .05, .08, .14], "gaussian_blur": [.5, .75, 1, 1.25, 1.5],
        "defocus_blur": [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
        "contrast": [.4, .3, .2, .1, 0.05], "brightness": [.1, .2, .3, .4, .5],
        "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)],
        "jpeg_compression": [65, 58, 50, 40, 25], "pixelate": [0.9, 0.8, 0.7, 0.6, 0.5],
    },
    "imagenet-c": {  # make_imagenet_c.py
        "gaussian_noise": [.08, .12, 0.18, 0.26, 0.38], "shot_noise": [60, 25, 12, 5, 3],
        "impulse_noise": [.03, .06, .09, 0.17, 0.27], "gaussian_blur": [1, 2, 3, 4, 6],
        "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
        "contrast": [0.4, .3, .2, .1, .05], "brightness": [.1, .2, .3, .4, .5],
        "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
        "jpeg_compression": [25, 18, 15, 10, 7], "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    },
}
SIDE = {"cifar10-c": 32, "tiny-imagenet-c": 64, "imagenet-c": 224}  # the image size each file is written for


# --- the three files' functions, ported ---------------------------------------------------------------


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


def gaussian_noise(x, c, normal):
    """np.random.normal(size=x.shape, scale=c) is `normal` (standard normal draws) times c."""
    x = np.array(x) / 255.
    return np.clip(x + c * normal, 0, 1) * 255


def shot_noise(x, c, poisson):
    """np.random.poisson(x * c) is `poisson`, draws for those rates."""
    x = np.array(x) / 255.
    return np.clip(poisson / c, 0, 1) * 255


def impulse_noise(x, c, flipped, salted):
    """sk.util.random_noise(x, mode='s&p', amount=c) with its two Bernoulli draws given: `flipped` (rate c)
    and `salted` (rate 0.5); salt is 1, pepper 0 (the image has no negative values), and its clip to
    [0, 1] changes nothing more."""
    x = np.array(x) / 255.
    x[flipped & salted] = 1
    x[flipped & ~salted] = 0
    return np.clip(x, 0, 1) * 255


def gaussian_blur(x, c):
    x = gaussian(np.array(x) / 255., sigma=c, channel_axis=-1)
    return np.clip(x, 0, 1) * 255


def defocus_blur(x, c):
    x = np.array(x) / 255.
    kernel = disk(radius=c[0], alias_blur=c[1])

    channels = []
    for d in range(3):
        channels.append(cv2.filter2D(x[:, :, d], -1, kernel))
    channels = np.array(channels).transpose((1, 2, 0))  # 3xSxS -> SxSx3

    return np.clip(channels, 0, 1) * 255


def contrast(x, c):
    x = np.array(x) / 255.
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def brightness(x, c):
    x = np.array(x) / 255.
    x = sk.color.rgb2hsv(x)
    x[:, :, 2] = np.clip(x[:, :, 2] + c, 0, 1)
    x = sk.color.hsv2rgb(x)

    return np.clip(x, 0, 1) * 255


def saturate(x, c):
    x = np.array(x) / 255.
    x = sk.color.rgb2hsv(x)
    x[:, :, 1] = np.clip(x[:, :, 1] * c[0] + c[1], 0, 1)
    x = sk.color.hsv2rgb(x)

    return np.clip(x, 0, 1) * 255


def jpeg_compression(x, c):
    output = BytesIO()
    x.save(output, 'JPEG', quality=c)
    x = PILImage.open(output)

    return x


def pixelate(x, c, side):
    """`side`: the constant the file writes there, its image size (SIDE)."""
    x = x.resize((int(side * c), int(side * c)), PILImage.BOX)
    x = x.resize((side, side), PILImage.BOX)

    return x


PUBLISHED = {"contrast": contrast, "brightness": brightness, "saturate": saturate, "gaussian_blur": gaussian_blur,
             "defocus_blur": defocus_blur, "pixelate": pixelate, "jpeg_compression": jpeg_compression}
convert_img = trn.Compose([trn.ToTensor(), trn.ToPILImage()])  # the original's, applied to each test image


def published(images: np.ndarray, name: str, severity: int, dataset: str = "cifar10-c") -> np.ndarray:
    """What the file of `dataset` writes for `images` (N, S, S, 3) uint8, S = SIDE[dataset]: np.uint8 of its
    function of each image. make_cifar_c.py hands its functions the image through `convert_img`; the other two
    the PIL image their loader reads and trn.Resize brings to S (here the size it has already: unchanged)."""
    c = LISTS[dataset][name][severity - 1]
    function = partial(pixelate, side=SIDE[dataset]) if name == "pixelate" else PUBLISHED[name]
    load = convert_img if dataset == "cifar10-c" else PILImage.fromarray
    return np.stack([np.uint8(function(load(image), c)) for image in images])


# --- the images --------------------------------------------------------------------------------------


def generated(seed: int = 0, side: int = 32, n: int = 16) -> np.ndarray:
    """(n, side, side, 3) uint8 images, seeded, made of what tells truncation from rounding and float64 from
    float32: n/2 images of one colour each (greys among them: skimage's zero-saturation path), and n/2 of
    blocks, each a quarter of the side high: black, white, two colours whose largest channels tie (skimage's
    hue takes the last maximum), a flat colour; ramps through all 256 levels in each direction; random pixels."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n, 3))
    colours[: n // 4] = colours[: n // 4, :1]  # greys
    images = np.broadcast_to(colours[:, None, None, :], (n, side, side, 3)).copy()
    levels = np.arange(side * side).reshape(side, side) % 256  # neighbours one level apart, all 256 levels
    q = side // 4
    across, down = levels[q : 2 * q], levels.T[2 * q : 3 * q]
    for image in images[n // 2 :]:
        high, low = sorted(rng.integers(0, 256, 2), reverse=True)
        image[:q, :q], image[:q, q : 2 * q] = 0, 255
        image[:q, 2 * q : 3 * q], image[:q, 3 * q :] = (high, high, low), (low, high, high)
        image[q : 2 * q] = np.stack([across, (across + 85) % 256, (across + 170) % 256], -1)
        image[2 * q : 3 * q] = np.stack([down, (down + 85) % 256, down], -1)
        image[3 * q :, : 2 * q] = rng.integers(0, 256, (side - 3 * q, 2 * q, 3))
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
    """vitcnn's corruption of (N, S, S, 3) uint8 images, as (N, S, S, 3) uint8."""
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return C.corrupt(batch, name, severity, torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy()


def assert_same_pixels(got: np.ndarray, expected: np.ndarray) -> None:
    differ = got != expected
    assert not differ.any(), (f"{differ.sum()} of {differ.size} values differ, by up to "
                              f"{np.abs(got.astype(int) - expected).max()} levels")


# --- the tests ---------------------------------------------------------------------------------------

# Each set, at the size its file is written for (SIDE), on this many generated images: fewer as they grow, to
# keep the file quick.
SIZES = {"cifar10-c": 16, "tiny-imagenet-c": 16, "imagenet-c": 8}


@pytest.mark.parametrize("severity", range(1, 6))
@pytest.mark.parametrize("name", PUBLISHED)
@pytest.mark.parametrize("dataset", SIZES)
def test_each_deterministic_corruption_equals_its_sets_published_code_on_generated_images(dataset, name, severity):
    """At 32 px against make_cifar_c.py, at 64 px against make_tinyimagenet_c.py, at 224 px against
    make_imagenet_c.py. Exact for all, defocus too: cv2.filter2D sums its 17x17 and 21x21 kernels through a
    DFT whose last bits differ from vitcnn's direct sum, and on x86 with AVX2 cv2's own 21x21 kernel differs
    from vitcnn's by a float32 ulp in 12 entries (test_the_defocus_kernels_are_cv2s_bit_for_bit); a level
    could differ only where a value lies within a millionth of a level of a whole one, which none does here
    (nor on 16 more images at 224 px, 8 generated, 8 CIFAR-10 test images enlarged, at severities 4 and 5,
    tried once)."""
    side = SIDE[dataset]
    images = generated(severity, side, SIZES[dataset])
    assert C.parameter_set(side) == dataset
    assert_same_pixels(corrupted(images, name, severity), published(images, name, severity, dataset))


@pytest.mark.parametrize("severity", range(1, 6))
@pytest.mark.parametrize("name", PUBLISHED)
def test_each_deterministic_corruption_equals_the_published_code_on_cifar10_test_images(name, severity, real_images):
    assert_same_pixels(corrupted(real_images, name, severity), published(real_images, name, severity))


# cv2 fuses its filters' multiply-adds where its SIMD code has FMA: x86 with AVX2 (its AVX2 code implies FMA3; the
# features line marks one compiled in but missing with "?"), and ARM64.
FUSING_CPU = ("AVX2" in [f.lstrip("*") for f in cv2.getCPUFeaturesLine().split()]
              or platform.machine().lower() in ("arm64", "aarch64"))


@pytest.mark.skipif(not FUSING_CPU, reason="cv2 filters without fused multiply-adds on this CPU; vitcnn fuses")
@pytest.mark.parametrize("dataset", LISTS)
def test_the_defocus_kernels_are_cv2s_bit_for_bit(dataset):
    """vitcnn's disk_kernel against the ported `disk` (cv2.GaussianBlur), float32, at every severity of each set:
    a 17x17 grid and a 3x3 Gaussian up to radius 8, ImageNet-C's 21x21 grid and 5x5 Gaussian at radius 10.
    One exception, cv2's own: on x86 its column filter computes a 21-wide kernel's columns 0-15 in an AVX2 loop
    with FMA, 16-19 in an SSE loop without, 20 in scalar code with; so its 21x21 kernel is not mirror-symmetric,
    and vitcnn's (symmetric, all fused) may differ from it there by one ulp, and equals its mirror image."""
    for radius, alias_blur in LISTS[dataset]["defocus_blur"]:
        got = C.disk_kernel(radius, alias_blur, torch.device("cpu")).numpy()
        expected = disk(radius, alias_blur)
        assert got.dtype == expected.dtype and got.shape == expected.shape == ((17, 17) if radius <= 8 else (21, 21))
        if radius <= 8:
            assert np.array_equal(got, expected)
        else:
            assert np.array_equal(got[:, :16], expected[:, :16]) and np.array_equal(got[:, 20], expected[:, 20])
            assert np.array_equal(got[:, 16:20], expected[:, 4:0:-1])
            np.testing.assert_array_max_ulp(got, expected, maxulp=1)


@pytest.mark.parametrize("severity", range(1, 6))
@pytest.mark.parametrize("dataset", SIZES)
def test_the_noises_are_the_originals_float64_formulas_on_torchs_draws_truncated(dataset, severity):
    """The draws are made here as vitcnn makes them, from a generator seeded 0, in (B, C, H, W) order:
    float64 standard normals; Poisson counts for the float64 rates x * c; two uniform draws (float32)
    for which values flip and which of those are salt. The parameters c are the file's, at its size."""
    images = generated(severity, SIDE[dataset], SIZES[dataset])
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    c = {name: LISTS[dataset][name][severity - 1] for name in ("gaussian_noise", "shot_noise", "impulse_noise")}

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    def hwc(draws: torch.Tensor) -> np.ndarray:
        return draws.permute(0, 2, 3, 1).numpy()

    normal = hwc(torch.randn(batch.shape, dtype=torch.float64, generator=seeded()))
    counts = hwc(torch.poisson(batch.double() / 255 * c["shot_noise"], generator=seeded()))
    g = seeded()
    flipped = hwc(torch.rand(batch.shape, generator=g) < c["impulse_noise"])
    salted = hwc(torch.rand(batch.shape, generator=g) < 0.5)
    expected = {
        "gaussian_noise": [gaussian_noise(x, c["gaussian_noise"], z) for x, z in zip(images, normal)],
        "shot_noise": [shot_noise(x, c["shot_noise"], n) for x, n in zip(images, counts)],
        "impulse_noise": [impulse_noise(x, c["impulse_noise"], f, s) for x, f, s in zip(images, flipped, salted)],
    }
    for name, levels in expected.items():
        assert_same_pixels(corrupted(images, name, severity), np.uint8(np.stack(levels)))


@pytest.mark.parametrize("severity", range(1, 6))
@pytest.mark.parametrize("dataset", ["tiny-imagenet-c", "imagenet-c"])
def test_the_noises_at_64_and_224_px_spread_as_their_sets_files_do_with_numpys_draws(dataset, severity):
    """On mid-grey images (level 128), the spread vitcnn's noises give equals, to within six standard errors of
    the two samples, the spread the file's functions give with numpy's draws as the originals make them
    (np.random.normal, np.random.poisson, skimage's two Bernoulli draws): the standard deviation of the levels
    under gaussian and shot noise, the share of values flipped under impulse noise: about 1% of a spread, where
    neighbouring severities' parameters lie 15% or more apart (and CIFAR-10-C's table fails it at every severity
    of either size)."""
    side = SIDE[dataset]
    grey = np.full((SIZES[dataset], side, side, 3), 128, np.uint8)
    many = np.full((2**20 // (side * side * 3) + 1, side, side, 3), 128, np.uint8)  # a million values or more
    rng = np.random.default_rng(severity)
    c = {name: LISTS[dataset][name][severity - 1] for name in ("gaussian_noise", "shot_noise", "impulse_noise")}
    numpys = {
        "gaussian_noise": np.uint8(gaussian_noise(many, c["gaussian_noise"], rng.standard_normal(many.shape))),
        "shot_noise": np.uint8(shot_noise(many, c["shot_noise"], rng.poisson(many / 255. * c["shot_noise"]))),
        "impulse_noise": np.uint8(impulse_noise(many, c["impulse_noise"], rng.random(many.shape) < c["impulse_noise"],
                                                rng.random(many.shape) < 0.5)),
    }
    for name, theirs in numpys.items():
        ours = corrupted(grey, name, severity)
        n1, n2 = ours.size, theirs.size
        if name == "impulse_noise":
            p1, p2 = (ours != 128).mean(), (theirs != 128).mean()
            assert abs(p1 - p2) <= 6 * math.sqrt(p2 * (1 - p2) * (1 / n1 + 1 / n2)), (name, p1, p2)
        else:
            s1, s2 = ours.std(), theirs.std()
            assert abs(s1 - s2) <= 6 * s2 * math.sqrt(1 / (2 * n1) + 1 / (2 * n2)), (name, s1, s2)
