"""CIFAR-10-C's corruptions (Hendrycks & Dietterich 2019) at severities 1-5, on batches on the device.

Each function takes a batch of float images (B, 3, H, W) in [0, 1], a severity 1..5 and a
seeded generator, and returns the corrupted batch, quantised as the published files are
(`np.uint8` of the float result: truncated to whole 1/255 steps). The severity parameters
are those of the original `make_cifar_c.py`. Where this differs from it:
- gaussian_blur: a separable Gaussian kernel truncated at 4 sigma with edge padding
  (skimage's `gaussian` defaults), computed here with torch ops;
- defocus_blur: the same anti-aliased disk kernel (a disk of the radius on a 17x17 grid,
  smoothed by a 3x3 Gaussian), convolved with reflect padding as `cv2.filter2D`;
- brightness, saturate: the HSV conversions written out in torch (skimage's formulas);
- pixelate and jpeg_compression do not differ: PIL's BOX resampling is written out in its
  own fixed point, and JPEG goes through libjpeg with torchvision's `encode_jpeg` /
  `decode_jpeg` as PIL's does (the tests compare both with PIL's, pixel for pixel).
  torchvision 0.29 marks that codec deprecated in favour of TorchCodec; it is still there.
The random corruptions (the three noises) draw from the given generator, so a seed gives
the same corrupted images every time.
"""

from __future__ import annotations

from collections.abc import Callable

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
    x = images.float() / 255
    out = FUNCTIONS[name](x, SEVERITY[name][severity - 1], generator)
    # np.uint8(...): truncation, as the published files; the 1e-3 keeps a whole value that float32 rounding
    # left a hair below it (pixelate's and JPEG's results are whole values) from dropping by one.
    return (out.clamp(0, 1) * 255 + 1e-3).to(torch.uint8)


def gaussian_noise(x: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    return x + c * torch.randn(x.shape, device=x.device, generator=generator)


def shot_noise(x: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    return torch.poisson(x * c, generator=generator) / c


def impulse_noise(x: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    """Salt and pepper: a fraction c of the values set to 1 or 0, half each (skimage's random_noise)."""
    flipped = torch.rand(x.shape, device=x.device, generator=generator) < c
    salt = torch.rand(x.shape, device=x.device, generator=generator) < 0.5
    return torch.where(flipped, salt.to(x.dtype), x)


def _gaussian_1d(sigma: float, radius: int, device: torch.device) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _separable(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Convolve every channel with `kernel` along rows and columns."""
    r, channels = kernel.numel() // 2, x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1),
                 groups=channels)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1),
                    groups=channels)


def gaussian_blur(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    radius = int(4 * sigma + 0.5)  # scipy's gaussian_filter: truncate 4 sigma
    return _separable(x, _gaussian_1d(sigma, radius, x.device), "replicate")


def disk_kernel(radius: float, alias_blur: float, device: torch.device) -> torch.Tensor:
    """CIFAR-10-C's defocus kernel: a disk on a 17x17 grid, normalised, smoothed by a 3x3 Gaussian."""
    t = torch.arange(-8, 9, dtype=torch.float32, device=device)
    disk = ((t.view(-1, 1) ** 2 + t.view(1, -1) ** 2) <= radius**2).float()
    disk = disk / disk.sum()
    return _separable(disk.view(1, 1, 17, 17), _gaussian_1d(alias_blur, 1, device), "reflect")[0, 0]


def defocus_blur(x: torch.Tensor, c: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    kernel = disk_kernel(*c, x.device)
    support = (kernel > 0).nonzero()
    r = int((support - 8).abs().max())  # the kernel is zero beyond radius r: convolve with its centre only
    kernel = kernel[8 - r : 9 + r, 8 - r : 9 + r]
    channels = x.shape[1]
    padded = F.pad(x, (r, r, r, r), mode="reflect") if r else x
    return F.conv2d(padded, kernel.expand(channels, 1, -1, -1), groups=channels)


def contrast(x: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    means = x.mean((2, 3), keepdim=True)  # per image and channel
    return (x - means) * c + means


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (skimage's rgb2hsv)."""
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


def brightness(x: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
    return hsv_to_rgb(hsv)


def saturate(x: torch.Tensor, c: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    hsv[:, 1] = (hsv[:, 1] * c[0] + c[1]).clamp(0, 1)
    return hsv_to_rgb(hsv)


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
    """One PIL resampling pass along `dim` (-1: rows of pixels, -2: columns) of int64 values 0..255."""
    moved = x.movedim(dim, -1)
    out = (moved @ weights.T + (1 << (_PRECISION - 1))) >> _PRECISION
    return out.clamp(0, 255).movedim(-1, dim)


def _resize_box(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's BOX resize of a (B, C, H, W) int64 batch 0..255: horizontal pass, then vertical, each in
    PIL's fixed point and rounded to 8 bits, as Image.resize does."""
    x = _resample(x, box_weights(x.shape[-1], size[1], x.device), -1)
    return _resample(x, box_weights(x.shape[-2], size[0], x.device), -2)


def pixelate(x: torch.Tensor, c: float, generator: torch.Generator) -> torch.Tensor:
    size = x.shape[-2:]
    pixels = (x * 255).round().long()  # the uint8 image PIL receives
    small = _resize_box(pixels, (int(size[0] * c), int(size[1] * c)))
    return _resize_box(small, size).float() / 255


def jpeg_compression(x: torch.Tensor, quality: int, generator: torch.Generator) -> torch.Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg

    images = list((x * 255).to(torch.uint8))  # as PIL receives the uint8 image
    decoded = decode_jpeg(encode_jpeg(images, quality=quality), device=x.device)
    return torch.stack(decoded).float() / 255


FUNCTIONS: dict[str, Callable] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "gaussian_blur": gaussian_blur, "contrast": contrast,
    "brightness": brightness, "saturate": saturate, "pixelate": pixelate, "jpeg_compression": jpeg_compression,
}
