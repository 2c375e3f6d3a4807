"""Batch augmentation on the training device: RandAugment, TrivialAugment-wide, Cutout, random
erasing, mixup and cutmix — drawn per image from the loader's seeded generator.

The op definitions are torchvision's (`transforms.v2`: the same augmentation spaces,
magnitudes, blends and rounding, nearest sampling with black fill), but every op here works
on a whole uint8 batch (B, C, H, W) with a parameter per image, and an image that did not
draw an op gets that op's identity parameter (a factor of 1, a threshold of 256, 8 bits,
the identity matrix). So one round of RandAugment applies every op once to the whole batch
— one affine warp for all geometric ops, one blend per colour op — and each image changes
only by its own op: no Python per image, no branch on a tensor's value, no host sync.
torchvision's own random transforms draw one op per call and its MixUp/CutMix draw λ on
the CPU, hence this module; its functional ops are what the tests compare against.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitcnn.config import BINS  # magnitude bins, as torchvision's (RandAugment's M is a bin: 0..30)

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
       "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
OP = {name: i for i, name in enumerate(OPS)}
SIGNED = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
          "sharpness")
POLICIES = ("randaugment", "trivialaugment")
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
def magnitudes(policy: str, size: int) -> torch.Tensor:
    """(ops, bins) float64: each op's magnitude per bin, unsigned, as torchvision's augmentation spaces
    (RandAugment's, or TrivialAugment-wide's stronger ones); posterize in bits, solarize a threshold."""
    wide = policy == "trivialaugment"
    line = lambda top: torch.linspace(0.0, top, BINS, dtype=torch.float64)  # noqa: E731
    table = torch.zeros(len(OPS), BINS, dtype=torch.float64)
    table[OP["shear_x"]] = table[OP["shear_y"]] = line(0.99 if wide else 0.3)
    table[OP["translate_x"]] = table[OP["translate_y"]] = line(32.0 if wide else 150.0 / 331.0 * size)
    table[OP["rotate"]] = line(135.0 if wide else 30.0)
    for op in ("brightness", "color", "contrast", "sharpness"):
        table[OP[op]] = line(0.99 if wide else 0.9)
    table[OP["posterize"]] = (8 - torch.arange(BINS) / ((BINS - 1) / (6 if wide else 4))).round().to(torch.float64)
    table[OP["solarize"]] = torch.linspace(1.0, 0.0, BINS, dtype=torch.float64) * 255
    return table


# --- the ops: each on a batch (B, C, H, W) of float pixel values 0..255, whole numbers in and out ---
# (float all the way saves a conversion per op; each op rounds as torchvision's does on uint8)


def _per_image(value: torch.Tensor) -> torch.Tensor:
    return value.view(-1, 1, 1, 1)


def blend(image: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * image + (1 - ratio) * other, clamped and truncated (torchvision's _blend on uint8).
    ratio: (B,) float64; both weights are rounded to float32 as torchvision's Python floats are."""
    keep, mix = _per_image(ratio.float()), _per_image((1.0 - ratio).float())
    return image.mul(keep).addcmul_(other, mix).clamp_(0, 255).floor_()  # clamped: truncation is a floor


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W), floored: torchvision's luma of a uint8 image."""
    r, g, b = image.unbind(1)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).floor_().unsqueeze(1)


def brightness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(image, torch.zeros((), device=image.device), factor)


def color(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(image, grayscale(image), factor)


def contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(image, grayscale(image).mean((1, 2, 3), keepdim=True), factor)


def sharpness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a smoothed image (3x3 kernel of ones, 5 at the centre, over 13) inside a one-pixel
    border, which is kept (torchvision's). The smoothing sums nine shifted views: exact on whole
    numbers, and its rounding equals the convolution's, since a sum over 13 is never half-way."""
    H, W = image.shape[-2:]
    inner = image[..., 1:-1, 1:-1]
    window = inner.mul(5)  # the centre, counted 1 + 4 times
    for dy in range(3):
        for dx in range(3):
            if (dy, dx) != (1, 1):
                window.add_(image[..., dy : dy + H - 2, dx : dx + W - 2])
    blurred = window.div_(13).round_()  # (B, C, H - 2, W - 2)
    out = image.clone()
    out[..., 1:-1, 1:-1].addcmul_(blurred.sub_(inner), _per_image((1.0 - factor).float()))
    return out.clamp_(0, 255).floor_()  # clamped: truncation is a floor


def posterize(image: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the `bits` (B,) highest bits of every value (8: all)."""
    step = _per_image(torch.exp2(8 - bits.float()))
    return image.div(step).floor_().mul_(step)


def solarize(image: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert every value >= threshold (B,); 256 changes nothing."""
    return torch.where(image >= _per_image(threshold.float()), 255 - image, image)


def autocontrast(image: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to 0..255 (a flat channel is kept), as torchvision."""
    low, high = image.amin((2, 3), keepdim=True), image.amax((2, 3), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    return image.sub(torch.where(flat, 0.0, low)).div_(inv_scale).clamp_(0, 255).floor_()  # clamped: truncation is a floor


def equalize(image: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel, with PIL's look-up table (torchvision's batched version)."""
    flat = image.flatten(2).to(torch.int64)  # (B, C, H*W)
    hist = torch.zeros(*flat.shape[:2], 256, dtype=torch.int32, device=image.device)
    hist.scatter_add_(2, flat, torch.ones((), dtype=torch.int32, device=image.device).expand_as(flat))
    cum = hist.cumsum(2)
    last = hist.gather(2, cum.argmax(2, keepdim=True))  # the count of the highest value present
    step = (flat.shape[-1] - last).div(255, rounding_mode="floor")  # (B, C, 1)
    lut = (cum[..., :-1] + step // 2).div(step.clamp(min=1), rounding_mode="floor").clamp(0, 255)
    lut = torch.cat([torch.zeros_like(lut[..., :1]), lut], 2).to(image.dtype)
    out = lut.gather(2, flat).view_as(image)
    return torch.where(step.unsqueeze(-1) != 0, out, image)


def affine(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Warp each image by its inverse matrix (B, 2, 3): output pixel p samples the input at matrix @ [p, 1],
    in pixel units from the top-left corner (pixel centres at i + 0.5); nearest, black outside."""
    B, _, H, W = image.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=image.device) + 0.5, torch.arange(W, device=image.device) + 0.5,
                            indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).to(matrix.dtype)  # (H, W, 3)
    source = torch.einsum("bij,hwj->bhwi", matrix, points)  # (B, H, W, 2): x, y
    grid = torch.stack([source[..., 0] / (W / 2), source[..., 1] / (H / 2)], -1) - 1  # in [-1, 1]
    return F.grid_sample(image, grid.to(image.dtype), mode="nearest", padding_mode="zeros", align_corners=False)


def geometry(op: torch.Tensor, magnitude: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 2, 3) float64 inverse matrices of the geometric ops (the identity for every other op).

    As torchvision: shear about the top-left corner (x_in = x + m y), translation by whole
    pixels (int(m)), rotation by m degrees counter-clockwise about the centre.
    """
    H, W = size
    m = magnitude
    matrix = torch.zeros(op.shape[0], 2, 3, dtype=torch.float64, device=op.device)
    matrix[:, 0, 0] = matrix[:, 1, 1] = 1.0
    is_ = {name: op == OP[name] for name in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")}
    matrix[:, 0, 1] = torch.where(is_["shear_x"], m, 0.0)
    matrix[:, 1, 0] = torch.where(is_["shear_y"], m, 0.0)
    matrix[:, 0, 2] = torch.where(is_["translate_x"], -m.trunc(), 0.0)
    matrix[:, 1, 2] = torch.where(is_["translate_y"], -m.trunc(), 0.0)
    theta = torch.deg2rad(torch.where(is_["rotate"], m, 0.0))
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    centre = torch.full((2,), W / 2, dtype=torch.float64, device=op.device)  # filled on the device: no host copy
    centre.select(0, 1).fill_(H / 2)
    rotated = torch.cat([rotation, (centre - rotation @ centre).unsqueeze(-1)], -1)  # about the centre
    return torch.where(is_["rotate"].view(-1, 1, 1), rotated, matrix)


def apply_op(image: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """One op per image: op (B,) indices into OPS, magnitude (B,) float64, signed where the op is.

    Every op runs on the whole batch, an image that did not draw it getting its identity
    parameter; autocontrast and equalize, which have none, are selected per image.
    """
    def factor(name: str) -> torch.Tensor:
        return torch.where(op == OP[name], 1.0 + magnitude, 1.0)

    x = affine(image, geometry(op, magnitude, image.shape[-2:]))
    x = brightness(x, factor("brightness"))
    x = color(x, factor("color"))
    x = contrast(x, factor("contrast"))
    x = sharpness(x, factor("sharpness"))
    x = posterize(x, torch.where(op == OP["posterize"], magnitude, 8.0))
    x = solarize(x, torch.where(op == OP["solarize"], magnitude, 256.0))
    x = torch.where(_per_image(op == OP["autocontrast"]), autocontrast(x), x)
    return torch.where(_per_image(op == OP["equalize"]), equalize(x), x)


# --- policies and erasing: (B, H, W, C) uint8 -> the same, as the loader holds batches --------


@dataclass(frozen=True)
class Augment:
    """The per-image augmentation of a training batch: a policy, then Cutout and random erasing."""

    policy: str = "none"  # none | randaugment | trivialaugment
    ops: int = 2  # RandAugment: ops per image (N)
    magnitude: int = 9  # RandAugment: magnitude bin (M), 0..30
    cutout: int = 0  # side of a zeroed square (Cutout), 0 = off
    erasing: float = 0.0  # probability of random erasing per image

    @property
    def active(self) -> bool:
        return self.policy != "none" or self.cutout > 0 or self.erasing > 0

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, H, W, C) uint8 -> the same, augmented."""
        x = images.permute(0, 3, 1, 2)  # (B, C, H, W)
        if self.policy != "none":
            x = self.policy_rounds(x.float(), generator).to(torch.uint8)
        if self.cutout:
            x = cutout(x, self.cutout, generator)
        if self.erasing:
            x = random_erasing(x, self.erasing, generator)
        return x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C), as the loader holds images

    def policy_rounds(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        B, device = x.shape[0], x.device
        table, signed = _policy_tables(self.policy, x.shape[-1], device)
        rounds = self.ops if self.policy == "randaugment" else 1
        for _ in range(rounds):
            op = torch.randint(0, len(OPS), (B,), device=device, generator=generator)
            if self.policy == "randaugment":
                bins = torch.full((B,), self.magnitude, device=device)
            else:  # TrivialAugment: a random strength per image
                bins = torch.randint(0, BINS, (B,), device=device, generator=generator)
            flip = torch.rand(B, device=device, generator=generator) < 0.5
            sign = torch.where(signed[op] & flip, -1.0, 1.0).to(torch.float64)
            x = apply_op(x, op, table[op, bins] * sign)
        return x


@functools.cache
def _policy_tables(policy: str, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The magnitudes (ops, bins) and which ops are signed (ops,), copied to the device once: a copy from
    the host inside a step would stop a CUDA graph from capturing it."""
    return magnitudes(policy, size).to(device), torch.tensor([name in SIGNED for name in OPS], device=device)


def _boxes(size: tuple[int, int], top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
           width: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) masks: True inside each image's box [top, top + height) x [left, left + width)."""
    H, W = size
    rows = torch.arange(H, device=top.device).view(1, H, 1)
    cols = torch.arange(W, device=top.device).view(1, 1, W)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + height).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + width).view(-1, 1, 1)))
    return inside.unsqueeze(1)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a size x size square per image, centred anywhere in it (DeVries & Taylor 2017: it may
    reach past the border, where it is cut)."""
    B, _, H, W = x.shape
    cy = torch.randint(0, H, (B,), device=x.device, generator=generator)
    cx = torch.randint(0, W, (B,), device=x.device, generator=generator)
    side = torch.full_like(cy, size)
    return x.masked_fill(_boxes((H, W), cy - size // 2, cx - size // 2, side, side), 0)


def random_erasing(x: torch.Tensor, p: float, generator: torch.Generator,
                   scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """With probability p per image, zero a box of a random area fraction (`scale`) and aspect ratio
    (log-uniform in `ratio`), placed inside the image: torchvision's RandomErasing, its box drawn
    once and fitted to the image rather than redrawn until it fits."""
    B, _, H, W = x.shape
    device = x.device
    area = H * W * torch.empty(B, device=device).uniform_(*scale, generator=generator)
    aspect = torch.exp(torch.empty(B, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                              generator=generator))
    height = torch.sqrt(area * aspect).round().clamp(1, H).long()
    width = torch.sqrt(area / aspect).round().clamp(1, W).long()
    top = (torch.rand(B, device=device, generator=generator) * (H - height + 1)).long()
    left = (torch.rand(B, device=device, generator=generator) * (W - width + 1)).long()
    chosen = torch.rand(B, device=device, generator=generator) < p
    return x.masked_fill(_boxes((H, W), top, left, height, width) & chosen.view(-1, 1, 1, 1), 0)


# --- mixup and cutmix: on the normalised batch, with the labels ---------------------------------


@dataclass
class Mixed:
    """Labels of a mixed batch: each image is lam of class a and 1 - lam of class b."""

    a: torch.Tensor  # (B,)
    b: torch.Tensor  # (B,)
    lam: torch.Tensor  # (B,) float, the share of a

    def __len__(self) -> int:
        return len(self.a)

    @property
    def dominant(self) -> torch.Tensor:
        """The label with the larger share: what training accuracy is measured against."""
        return torch.where(self.lam >= 0.5, self.a, self.b)


class Mix:
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of a batch with itself reversed.

    λ ~ Beta(α, α), per batch or per image, drawn from the loader's generator through the
    Beta distribution's quantile function (tabulated once with scipy): a uniform draw and a
    table look-up on the device. With both on, each batch (or image) takes one of the two
    at random; `prob` is the chance that a batch (or image) is mixed at all. For CutMix λ is
    the share of the image left unpasted, after the box is cut at the border.
    """

    QUANTILES = 4097

    def __init__(self, mixup: float, cutmix: float, prob: float, per: str, device: torch.device):
        from scipy import stats

        self.per, self.prob = per, prob
        grid = torch.linspace(0, 1, self.QUANTILES, dtype=torch.float64)
        self.tables = {name: torch.from_numpy(stats.beta.ppf(grid.numpy(), alpha, alpha)).float().to(device)
                       for name, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0}

    def sample(self, name: str, n: int, generator: torch.Generator) -> torch.Tensor:
        """n draws of λ from Beta(α, α): the tabulated quantile function at uniform points, interpolated."""
        table = self.tables[name]
        u = torch.rand(n, device=table.device, generator=generator) * (self.QUANTILES - 1)
        low = u.floor().long().clamp(max=self.QUANTILES - 2)
        return torch.lerp(table[low], table[low + 1], u - low)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, Mixed]:
        B, _, H, W = x.shape
        n = B if self.per == "image" else 1  # one draw per image, or one for the whole batch
        device = x.device
        partner, partner_y = x.flip(0), y.flip(0)  # the batch is in random order: reversing pairs at random
        if len(self.tables) == 2:
            cutmix = torch.rand(n, device=device, generator=generator) < 0.5
        else:
            cutmix = torch.full((n,), "cutmix" in self.tables, device=device)
        applied = torch.rand(n, device=device, generator=generator) < self.prob
        lam = torch.ones(n, device=device)
        if "mixup" in self.tables:
            lam = torch.where(cutmix, lam, self.sample("mixup", n, generator))
        if "cutmix" in self.tables:
            box, pasted = self._box(n, H, W, generator)
            lam = torch.where(cutmix, 1 - pasted, lam)
        lam = torch.where(applied, lam, 1.0).expand(B)
        out = torch.lerp(partner, x, lam.view(-1, 1, 1, 1))  # mixup; x itself where lam is 1
        if "cutmix" in self.tables:
            pasted_in = torch.where(box.expand(B, 1, H, W), partner, x)
            out = torch.where((cutmix & applied).expand(B).view(-1, 1, 1, 1), pasted_in, out)
        return out, Mixed(y, partner_y, lam)

    def _box(self, n: int, H: int, W: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 1, H, W) boxes of area 1 - λ (λ from the cutmix Beta) at uniform centres, cut at the
        border, and the share of the image each covers."""
        device = self.tables["cutmix"].device
        side = torch.sqrt(1 - self.sample("cutmix", n, generator))
        height, width = (side * H).long(), (side * W).long()
        cy = torch.randint(0, H, (n,), device=device, generator=generator)
        cx = torch.randint(0, W, (n,), device=device, generator=generator)
        top, left = (cy - height // 2).clamp(0, H), (cx - width // 2).clamp(0, W)
        bottom, right = (cy + height - height // 2).clamp(0, H), (cx + width - width // 2).clamp(0, W)
        box = _boxes((H, W), top, left, bottom - top, right - left)
        return box, (bottom - top) * (right - left) / (H * W)
