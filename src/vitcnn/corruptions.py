"""CIFAR-10-C's corruptions (Hendrycks & Dietterich 2019) at severities 1-5, on batches on the device.

Each function takes a batch of uint8 images (B, 3, H, W), a severity's parameter and a seeded
generator, and returns what the function of the same name in the published `make_cifar_c.py`
returns for each image: `np.clip(x, 0, 1) * 255` of a float64 result, or whole values (pixelate,
JPEG). `corrupt` truncates that to uint8, as the original's caller does with `np.uint8(...)`. The
severity parameters are the original's.

Exact: equal to the published code pixel for pixel (tests/test_cifar_c.py compares each with a port
of it that calls its libraries, at every severity, on generated and real CIFAR-10 images). Each does
the original's float64 operations in the original's order, wherever that order decides the last bit
and so a truncation (an image of one level k/255 comes out as k or k - 1 as the original's does):
- contrast: numpy's mean over the pixels, summed one pixel after another as numpy sums over the
  two non-contiguous axes of an (H, W, 3) image;
- brightness, saturate: skimage's rgb2hsv and hsv2rgb, operation for operation;
- gaussian_blur: skimage's `gaussian` = scipy.ndimage.gaussian_filter (mode 'nearest', truncate 4
  sigma): scipy's weights, computed with numpy as scipy does, rows (axis 0) then columns, each in
  the order of scipy's correlate1d for a symmetric kernel;
- defocus_blur: cv2's anti-aliased disk (`disk_kernel`, float32, as cv2.GaussianBlur computes it),
  correlated in float64 with reflect-101 borders as cv2.filter2D's direct sum. With the 17x17
  kernel cv2.filter2D goes through its DFT, whose sums differ from the direct ones in the last bits:
  the two truncate alike except where a value lies that close to a whole level;
- pixelate: PIL's BOX resampling written out in its own fixed point; jpeg_compression: libjpeg
  through torchvision's `encode_jpeg` / `decode_jpeg` on the CPU, as PIL's does. torchvision 0.29
  marks that codec deprecated in favour of TorchCodec; it is still there.
"The libraries" are the versions requirements.txt pins for that test (scipy 1.17, scikit-image 0.26,
OpenCV 5.0). The published files were made in 2018 with the versions of then, some of which computed
their Gaussian weights otherwise: there a weight, and so rarely a level, can differ in the last bit.
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

SEVERITY = {
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
}
CORRUPTIONS = tuple(SEVERITY)
assert CORRUPTIONS == CORRUPTION_NAMES  # the names params.yaml accepts


def corrupt(images: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """`images` (B, 3, H, W) uint8 under corruption `name` at `severity` (0: unchanged), as uint8."""
    if severity == 0:
        return images
    if images.device.type == "mps":  # no float64 there: on the CPU, with a generator seeded from the given one
        seed = int(torch.randint(2**31 - 1, (1,), device=images.device, generator=generator))
        return corrupt(images.cpu(), name, severity, torch.Generator().manual_seed(seed)).to(images.device)
    # np.uint8(...) of the original's levels: float64 truncated towards zero (pixelate's and JPEG's are whole).
    return FUNCTIONS[name](images, SEVERITY[name][severity - 1], generator).to(torch.uint8)


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


def _cv2_gaussian3(sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre and side weights of cv2.getGaussianKernel(3, sigma, CV_32F): 1 and exp(-1 / (2 sigma^2))
    normalised in float64 (OpenCV's bit-exact kernel), rounded to float32."""
    side = math.exp(-0.5 / (sigma * sigma))
    scale = 1 / (2 * side + 1)
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(side * scale, dtype=torch.float32)


def _blur3(x: torch.Tensor, centre: torch.Tensor, side: torch.Tensor, dim: int) -> torch.Tensor:
    """cv2's filter of a 2-D float32 `x` along `dim` with the symmetric 3-tap kernel (side, centre, side),
    reflect-101 borders: `x[i] * centre + (x[i - 1] + x[i + 1]) * side`, as its row and column filters for
    such kernels. Element by element, so the same bits on every CPU, and mirror-symmetric by construction."""
    padded = F.pad(x.movedim(dim, -1)[None], (1, 1), mode="reflect")[0]
    return (padded[..., 1:-1] * centre + (padded[..., :-2] + padded[..., 2:]) * side).movedim(-1, dim)


def disk_kernel(radius: float, alias_blur: float, device: torch.device) -> torch.Tensor:
    """CIFAR-10-C's defocus kernel, float32 as its `disk` computes it: a disk of `radius` on a 17x17 grid,
    normalised, then cv2.GaussianBlur with a 3x3 kernel of sigma `alias_blur` (rows, then columns)."""
    t = torch.arange(-8, 9)
    disk = ((t.view(-1, 1) ** 2 + t.view(1, -1) ** 2) <= radius**2).float()
    disk = disk / disk.sum()
    centre, side = _cv2_gaussian3(alias_blur)
    return _blur3(_blur3(disk, centre, side, 1), centre, side, 0).to(device)


def defocus_blur(images: torch.Tensor, c: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    x = _unit(images)
    kernel = disk_kernel(*c, torch.device("cpu")).double()
    taps = kernel.nonzero().tolist()  # row-major, as cv2's Filter2D lists the non-zero coefficients it sums
    r = max(max(abs(i - 8), abs(j - 8)) for i, j in taps)  # the kernel is zero beyond: pad by r only
    padded = F.pad(x, (r, r, r, r), mode="reflect") if r else x
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    for i, j in taps:
        out = out + kernel[i, j].item() * padded[..., i - 8 + r : i - 8 + r + h, j - 8 + r : j - 8 + r + w]
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
