"""Common corruptions (Hendrycks & Dietterich 2019) at severities 1-5, on batches on the device, with the
parameters of CIFAR-10-C, Tiny-ImageNet-C or ImageNet-C by the images' size.

Three files of github hendrycks/robustness (ImageNet-C/create_c/) made those datasets: make_cifar_c.py for
32 px, make_tinyimagenet_c.py for 64 px, make_imagenet_c.py for 224 px. For these ten corruptions the three
define the same functions line for line but for their severity lists (SEVERITY holds the three, copied) and
the side pixelate resizes from and back to; their `disk` takes a 17x17 grid and a 3x3 Gaussian up to radius
8, a (2r + 1)-square grid and a 5x5 Gaussian beyond (only ImageNet-C's defocus at severity 5, radius 10).
SIZE_RULE picks the set by the images' side (`parameter_set`): CIFAR-10-C's below 48 px, Tiny-ImageNet-C's
from 48 to 111 px, ImageNet-C's from 112 px. Pixelate resizes to int(side * c) of the images' own side and
back: the published at 32, 64 and 224 px, the same fraction at other sizes; no other function depends on it.

Each function takes a batch of uint8 images (B, 3, H, W), a severity's parameter and a seeded
generator, and returns what the function of the same name in the published files returns for each image:
`np.clip(x, 0, 1) * 255` of a float64 result, or whole values (pixelate, JPEG). `corrupt` truncates that to
uint8, as the originals' callers do with `np.uint8(...)`. (The Tiny-ImageNet-C and ImageNet-C callers then
stored each image as a JPEG of quality 85: storage, not a corruption, and not done here.)

Exact: equal to the published code pixel for pixel at 32, 64 and 224 px: contrast, brightness, saturate,
gaussian_blur, defocus_blur, pixelate, jpeg_compression (tests/test_cifar_c.py compares each with a port of
the files that calls their libraries, at every severity, on generated images of each size with that size's
parameters, and on real CIFAR-10 images). Each does the original's float64 operations in the original's
order, wherever that order decides the last bit and so a truncation (an image of one level k/255 comes out
as k or k - 1 as the original's does):
- contrast: numpy's mean over the pixels, summed one pixel after another as numpy sums over the
  two non-contiguous axes of an (H, W, 3) image;
- brightness, saturate: skimage's rgb2hsv and hsv2rgb, operation for operation;
- gaussian_blur: skimage's `gaussian` = scipy.ndimage.gaussian_filter (mode 'nearest', truncate 4
  sigma): scipy's weights, computed with numpy as scipy does, rows (axis 0) then columns, each in
  the order of scipy's correlate1d for a symmetric kernel;
- defocus_blur: the files' anti-aliased disk (`disk_kernel`, float32, as cv2.GaussianBlur computes it),
  correlated in float64 with reflect-101 borders as cv2.filter2D's direct sum. With 17x17 and 21x21
  kernels cv2.filter2D goes through its DFT, whose sums differ from the direct ones in the last bits:
  the two truncate alike except where a value lies that close to a whole level. On x86, cv2's own 21x21
  kernel differs from `disk_kernel`'s by a float32 ulp in 12 entries (see `_cv2_filter`): a level could
  differ only where a value lies within a millionth of a level of a whole one;
- pixelate: PIL's BOX resampling written out in its own fixed point; jpeg_compression: libjpeg
  through torchvision's `encode_jpeg` / `decode_jpeg` on the CPU, as PIL's does. torchvision 0.29
  marks that codec deprecated in favour of TorchCodec; it is still there.
"The libraries" are the versions requirements.txt pins for that test (scipy 1.17, scikit-image 0.26,
OpenCV 5.0), on a CPU where cv2's filters use fused multiply-adds (x86 with AVX2, ARM64; without, cv2
rounds ImageNet-C's defocus kernels otherwise in a last bit). The published files were made in 2018 with
the versions of then, some of which computed their Gaussian weights otherwise: there a weight, and so
rarely a level, can differ in the last bit.
Equal in distribution only: the three noises draw from the given torch generator, not numpy's, so
a seed gives the same corrupted images every time; given their draws they are the original's
float64 formulas (skimage's random_noise for impulse noise), truncated alike.
Apple's GPUs have no float64: on "mps" the corruptions run on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vitcnn.config import CORRUPTION_NAMES

SEVERITY = {  # parameter set -> corruption -> its parameter at severities 1-5, copied from the set's own file
    "cifar10-c": {  # make_cifar_c.py
        "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
        "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
        "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
        "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
        "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
        "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
        "jpeg_compression": [80, 65, 58, 50, 40],
    },
    "tiny-imagenet-c": {  # make_tinyimagenet_c.py
        "gaussian_noise": [0.04, 0.08, 0.12, 0.15, 0.18],
        "shot_noise": [250, 100, 50, 30, 15],
        "impulse_noise": [0.01, 0.02, 0.05, 0.08, 0.14],
        "defocus_blur": [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
        "gaussian_blur": [0.5, 0.75, 1, 1.25, 1.5],
        "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
        "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
        "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)],
        "pixelate": [0.9, 0.8, 0.7, 0.6, 0.5],
        "jpeg_compression": [65, 58, 50, 40, 25],
    },
    "imagenet-c": {  # make_imagenet_c.py
        "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
        "shot_noise": [60, 25, 12, 5, 3],
        "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
        "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
        "gaussian_blur": [1, 2, 3, 4, 6],
        "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
        "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
        "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
        "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
        "jpeg_compression": [25, 18, 15, 10, 7],
    },
}
# Which set an image side takes: the first whose bound lies above the side. The sets are tuned for 32, 64 and
# 224 px (a blur of CIFAR-10-C's sigma 1 is nearly invisible at 224 px); the bounds lie between.
SIZE_RULE = ((48, "cifar10-c"), (112, "tiny-imagenet-c"), (math.inf, "imagenet-c"))
CORRUPTIONS = tuple(SEVERITY["cifar10-c"])
assert CORRUPTIONS == CORRUPTION_NAMES  # the names params.yaml accepts
assert all(tuple(table) == CORRUPTIONS for table in SEVERITY.values())


def parameter_set(size: int) -> str:
    """The parameter set ("cifar10-c", "tiny-imagenet-c" or "imagenet-c") for images of side `size` pixels."""
    return next(name for bound, name in SIZE_RULE if size < bound)


def corrupt(images: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """`images` (B, 3, H, W) uint8 under corruption `name` at `severity` (0: unchanged), as uint8, with the
    parameters of the set for their side (`parameter_set`; the shorter side, were they not square)."""
    if severity == 0:
        return images
    if images.device.type == "mps":  # no float64 there: on the CPU, with a generator seeded from the given one
        seed = int(torch.randint(2**31 - 1, (1,), device=images.device, generator=generator))
        return corrupt(images.cpu(), name, severity, torch.Generator().manual_seed(seed)).to(images.device)
    c = SEVERITY[parameter_set(min(images.shape[-2:]))][name][severity - 1]
    # np.uint8(...) of the original's levels: float64 truncated towards zero (pixelate's and JPEG's are whole).
    return FUNCTIONS[name](images, c, generator).to(torch.uint8)


def _unit(images: torch.Tensor) -> torch.Tensor:
    """The original's `np.array(x) / 255.`: float64 in [0, 1]."""
    return images.double() / 255


def _levels(x: torch.Tensor) -> torch.Tensor:
    """The original's `np.clip(x, 0, 1) * 255`."""
    return x.clamp(0, 1) * 255


def gaussian_noise(images: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    x = _unit(images)
    return _levels(x + c * torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator))


def shot_noise(images: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    return _levels(torch.poisson(_unit(images) * c, generator=generator) / c)


def impulse_noise(images: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    """Salt and pepper: a fraction c of the values set to 1 or 0, half each (skimage's random_noise)."""
    x = _unit(images)
    flipped = torch.rand(x.shape, device=x.device, generator=generator) < c
    salt = torch.rand(x.shape, device=x.device, generator=generator) < 0.5
    return _levels(torch.where(flipped, salt.to(x.dtype), x))


def _gaussian_weights(sigma: float) -> list[float]:
    """scipy.ndimage's 1-D Gaussian weights for `sigma`, truncated at 4 sigma (gaussian_filter's default),
    computed with numpy as scipy's `_gaussian_kernel1d` does: its exp and its sum decide the last bits."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return (phi / phi.sum()).tolist()


def _correlate_nearest(x: torch.Tensor, weights: list[float], dim: int) -> torch.Tensor:
    """scipy.ndimage.correlate1d of (B, C, H, W) `x` along `dim` (-2 or -1) with the symmetric `weights`,
    mode 'nearest', summed in the order of scipy's ni_filters.c: the centre's product, then the pairs
    from the outermost in, `+= (x[i - j] + x[i + j]) * w[j]`. Float64 throughout, as scipy's line buffers."""
    r, n = len(weights) // 2, x.shape[dim]
    padded = F.pad(x, (0, 0, r, r) if dim == -2 else (r, r, 0, 0), mode="replicate")

    def shifted(j: int) -> torch.Tensor:
        return padded.narrow(dim, r + j, n)

    out = shifted(0) * weights[r]
    for j in range(r, 0, -1):
        out = out + (shifted(-j) + shifted(j)) * weights[r + j]
    return out


def gaussian_blur(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    weights = _gaussian_weights(sigma)
    # gaussian_filter filters axis 0 of the (H, W, 3) image first, then axis 1; not across channels.
    return _levels(_correlate_nearest(_correlate_nearest(_unit(images), weights, -2), weights, -1))


def _cv2_gaussian(ksize: int, sigma: float) -> list[torch.Tensor]:
    """cv2.getGaussianKernel(ksize, sigma, CV_32F) from the centre outwards, as OpenCV's bit-exact kernel computes
    it in float64 (its `softdouble`; its exp could differ from Python's in a last bit, which float32 all but
    always hides): exp(x^2 * -0.125 / sigma^2) at its doubled offsets x = 1 - ksize, 3 - ksize, .., -2, summed
    outermost first, doubled, plus the centre's 1; each weight times the inverse of that sum; then float32."""
    scale = -0.125 / (sigma * sigma)
    outer = [math.exp(x * x * scale) for x in range(1 - ksize, 0, 2)]
    total = 0.0
    for t in outer:
        total += t
    norm = 1 / (total * 2 + 1)
    return [torch.tensor(w, dtype=torch.float32) for w in [norm, *(t * norm for t in reversed(outer))]]


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 `a * b + c` rounded once, as a fused multiply-add, from float64 operations that round the same
    on every device: the product is exact in float64 (24 + 24 bits); the sum is rounded to odd (TwoSum's error
    says whether it was inexact and which way), so that rounding it to float32 is the one correct rounding of the
    exact value (Boldo & Melquiond 2008: 53 >= 24 + 2 bits)."""
    p, q = a.double() * b.double(), c.double()
    s = p + q
    t = s - p
    error = (p - (s - t)) + (q - t)
    even = (s.view(torch.int64) & 1) == 0
    s = torch.where((error != 0) & even, torch.nextafter(s, torch.full_like(s, math.inf).copysign(error)), s)
    return s.float()


def _cv2_filter(x: torch.Tensor, weights: list[torch.Tensor], dim: int) -> torch.Tensor:
    """cv2's separable filter of a 2-D float32 `x` along `dim` (-1: its row filter, -2: its column filter) with
    the symmetric kernel `weights` (centre first), reflect-101 borders, as its SIMD loops for symmetric kernels
    compute it with fused multiply-adds (`v_muladd` where the CPU has FMA: x86 with AVX2, ARM64):
    rows `fma(x[i], w0, (x[i-1] + x[i+1]) * w1)`, columns `fma(x[i-1] + x[i+1], w1, x[i] * w0)`, then
    `fma(x[i-j] + x[i+j], wj, ...)` for each further j. Element by element: the same bits on every device, and
    mirror-symmetric by construction. cv2's own is not quite, on x86: its 5-tap column filter does the columns
    past its last 16-wide AVX2 block 4 at a time in an SSE loop without FMA (columns 16-19 of ImageNet-C's
    21x21 disk), where it differs from this by a float32 ulp, here and there."""
    r, n = len(weights) - 1, x.shape[dim]
    padded = F.pad(x.movedim(dim, -1)[None], (r, r), mode="reflect")[0]

    def pair(j: int) -> torch.Tensor:
        return padded[..., r - j : r - j + n] + padded[..., r + j : r + j + n]

    centre = padded[..., r : r + n]
    if dim == -1:
        out, further = _fma32(centre, weights[0], pair(1) * weights[1]), range(2, r + 1)
    else:
        out, further = centre * weights[0], range(1, r + 1)
    for j in further:
        out = _fma32(pair(j), weights[j], out)
    return out.movedim(-1, dim)


def disk_kernel(radius: float, alias_blur: float, device: torch.device) -> torch.Tensor:
    """The published files' defocus kernel, float32 as their `disk` computes it: a disk of `radius` on a 17x17
    grid, normalised, then cv2.GaussianBlur with a 3x3 kernel of sigma `alias_blur` (rows, then columns); for a
    radius above 8 (ImageNet-C's 10) on the grid np.arange(-radius, radius + 1), blurred with a 5x5 kernel.
    A disk that reaches the grid's edge (ImageNet-C's radii 8 and 10) gets back from the blur's reflect-101
    border what spills over it: those kernels sum to 1.013 and 1.011, and brighten, as the published do."""
    grid, ksize = (np.arange(-8, 8 + 1), 3) if radius <= 8 else (np.arange(-radius, radius + 1), 5)
    t = torch.from_numpy(grid)
    disk = ((t.view(-1, 1) ** 2 + t.view(1, -1) ** 2) <= radius**2).float()
    disk = disk / disk.sum()
    weights = _cv2_gaussian(ksize, alias_blur)
    return _cv2_filter(_cv2_filter(disk, weights, -1), weights, -2).to(device)


def defocus_blur(images: torch.Tensor, c: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    x = _unit(images)
    kernel = disk_kernel(*c, torch.device("cpu")).double()
    anchor = kernel.shape[0] // 2  # cv2.filter2D's default anchor: the kernel's centre
    taps = kernel.nonzero().tolist()  # row-major, as cv2's Filter2D lists the non-zero coefficients it sums
    r = max(max(abs(i - anchor), abs(j - anchor)) for i, j in taps)  # the kernel is zero beyond: pad by r only
    padded = F.pad(x, (r, r, r, r), mode="reflect") if r else x
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    for i, j in taps:
        top, left = i - anchor + r, j - anchor + r
        out = out + kernel[i, j].item() * padded[..., top : top + h, left : left + w]
    return _levels(out)


def _pixel_sum(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, 1): the sum over the pixels of each image and channel, one pixel after another in row-major
    order. That is numpy's order for np.mean(x, axis=(0, 1)) of an (H, W, 3) image: a reduction along no
    contiguous axis adds row by row, with no pairwise summation."""
    pixels = x.flatten(2)
    total = pixels[..., 0].clone()
    for i in range(1, pixels.shape[-1]):
        total += pixels[..., i]
    return total[..., None, None]


def contrast(images: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    x = _unit(images)
    means = _pixel_sum(x) / (x.shape[-2] * x.shape[-1])  # per image and channel
    return _levels((x - means) * c + means)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (skimage's rgb2hsv, operation for operation)."""
    r, g, b = x.unbind(1)
    value, _ = x.max(1)
    delta = value - x.min(1).values
    saturation = torch.where(value > 0, delta / value.clamp(min=1e-12), 0.0)
    safe = delta.clamp(min=1e-12)
    # skimage assigns red's, then green's, then blue's formula where each is the maximum: the last wins.
    hue = torch.where(value == b, 4 + (r - g) / safe, torch.where(value == g, 2 + (b - r) / safe, (g - b) / safe))
    hue = torch.where(delta > 0, (hue / 6) % 1.0, 0.0)
    return torch.stack([hue, saturation, value], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV in [0, 1] -> RGB (skimage's hsv2rgb, operation for operation)."""
    h, s, v = hsv.unbind(1)
    i = torch.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    i = i.long() % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = [torch.zeros_like(v) for _ in range(3)]
    for k, triple in enumerate(choices):
        for channel in range(3):
            rgb[channel] = torch.where(i == k, triple[channel], rgb[channel])
    return torch.stack(rgb, 1)


def brightness(images: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    hsv = rgb_to_hsv(_unit(images))
    hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
    return _levels(hsv_to_rgb(hsv))


def saturate(images: torch.Tensor, c: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    hsv = rgb_to_hsv(_unit(images))
    hsv[:, 1] = (hsv[:, 1] * c[0] + c[1]).clamp(0, 1)
    return _levels(hsv_to_rgb(hsv))


def box_weights(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """(size_out, size_in) int64 weights of PIL's BOX resampling along one axis, in PIL's fixed point
    (2**22 = 1): each output pixel averages the input pixels whose centres lie within its box."""
    scale = size_in / size_out
    width = max(scale, 1.0)  # the box spans at least one input pixel
    centre = (torch.arange(size_out, dtype=torch.float64) + 0.5) * scale  # in input pixel units
    offset = (torch.arange(size_in, dtype=torch.float64).view(1, -1) + 0.5 - centre.view(-1, 1)) / width
    weights = ((offset >= -0.5) & (offset < 0.5)).double()  # PIL's box: [-0.5, 0.5)
    weights = weights / weights.sum(1, keepdim=True)
    return torch.floor(weights * (1 << _PRECISION) + 0.5).long().to(device)


_PRECISION = 22  # PIL's fixed-point bits in its 8-bit resampling


def _resample(x: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """One PIL resampling pass along `dim` (-1: rows of pixels, -2: columns) of int64 values 0..255.

    The products are summed in float64, which is exact here (every partial sum is a whole number below
    255 * 2**22 < 2**53) and, unlike int64, has a matrix product on every device (CUDA has none for int64).
    """
    moved = x.movedim(dim, -1)
    sums = (moved.double() @ weights.T.double()).long()
    out = (sums + (1 << (_PRECISION - 1))) >> _PRECISION
    return out.clamp(0, 255).movedim(-1, dim)


def _resize_box(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's BOX resize of a (B, C, H, W) int64 batch 0..255: horizontal pass, then vertical, each in
    PIL's fixed point and rounded to 8 bits, as Image.resize does."""
    x = _resample(x, box_weights(x.shape[-1], size[1], x.device), -1)
    return _resample(x, box_weights(x.shape[-2], size[0], x.device), -2)


def pixelate(images: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    size = images.shape[-2:]
    small = _resize_box(images.long(), (int(size[0] * c), int(size[1] * c)))
    return _resize_box(small, size)


def jpeg_compression(images: torch.Tensor, quality: int, generator: torch.Generator) -> torch.Tensor:
    """libjpeg on the CPU, as PIL's: on a GPU torchvision would take nvJPEG, whose pixels differ."""
    from torchvision.io import decode_jpeg, encode_jpeg

    decoded = decode_jpeg(encode_jpeg(list(images.cpu().contiguous()), quality=quality))
    return torch.stack(decoded).to(images.device)


FUNCTIONS: dict[str, Callable] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "gaussian_blur": gaussian_blur, "contrast": contrast,
    "brightness": brightness, "saturate": saturate, "pixelate": pixelate, "jpeg_compression": jpeg_compression,
}
