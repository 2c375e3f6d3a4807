"""Layers shared by the models: a dropout that is cheap on CPU, and stochastic depth.

PyTorch's CPU dropout draws one bernoulli per element from mt19937 and applies a float
mask in separate passes; for the small ViT that costs more than its matrix products.
Here the mask comes from a counter-based hash: element i of a call keeps its value when
16-bit slice i % 4 of splitmix64(seed + golden * (i // 4 + 1)) is at least
round(p * 65536), with the seed drawn from PyTorch's generator (so `torch.manual_seed`
and saved RNG states reproduce it). The fused kernel of cpu_kernels.cpp computes exactly
this in one pass; `keep_mask` below is the same function in PyTorch ops, used when the
kernel cannot be built. CUDA keeps PyTorch's own fused dropout.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitcnn import kernels

_SPAN = 1 << 16  # p is exact to 1/65536


def _int64(value: int) -> int:
    """A 64-bit constant as the signed int64 with the same bits (torch's integer ops wrap)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: clear the copied sign bits)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def keep_mask(shape: torch.Size, seed: int, threshold: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask of `shape`, True with probability 1 - threshold / 65536; the kernel's bits exactly."""
    numel = shape.numel()
    z = seed + torch.arange(1, (numel + 3) // 4 + 1, dtype=torch.int64, device=device) * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    slices = z.view(torch.int16)[:numel].view(shape)  # little-endian: slice j of word w is element 4w + j
    # Compare as unsigned: flipping the sign bit maps u to u - 32768, keeping the order.
    return (slices ^ -(1 << 15)) >= threshold - (1 << 15)


def draw_seed() -> int:
    """A fresh 64-bit seed from PyTorch's default generator."""
    return int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64))


class _MaskedScale(torch.autograd.Function):
    """y = x * keep * scale; the backward pass reuses the same mask (the PyTorch-ops path)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0), None, None


class _FusedDropout(torch.autograd.Function):
    """The same, in one pass of the fused kernel, keeping the mask as bits for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, threshold: int, scale: float) -> torch.Tensor:
        y, bits = torch.ops.vitcnn.dropout(x, seed, threshold, scale)
        ctx.save_for_backward(bits)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (bits,) = ctx.saved_tensors
        return torch.ops.vitcnn.dropout_backward(grad, bits, ctx.scale), None, None, None


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of a CPU tensor: zero with probability p, scale the rest by 1 / (1 - p)."""
    threshold = round(p * _SPAN)
    if threshold >= _SPAN:
        return x * 0.0
    seed, scale = draw_seed(), 1.0 / (1.0 - p)
    if x.dtype in (torch.float32, torch.bfloat16) and kernels.cpu_kernels():
        return _FusedDropout.apply(x, seed, threshold, scale)
    return _MaskedScale.apply(x, keep_mask(x.shape, seed, threshold), scale)


class Dropout(nn.Dropout):
    """nn.Dropout with the cheaper mask above on CPU; CUDA (and compiled code) keep PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, self.training)
        return cpu_dropout(x, self.p)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, drop a residual branch for a random fraction
    `p` of the samples and scale the rest by 1 / (1 - p). One draw per sample, on the device: no sync."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)  # (B, ...) with whole samples zeroed

    def extra_repr(self) -> str:
        return f"p={self.p}"
