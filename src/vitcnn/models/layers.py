"""Layers shared by the models."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_INT16_SPAN = 1 << 16


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool mask, True with probability 1 - p (to 1/65536), from 16-bit slices of 64-bit random words.

    One 64-bit draw yields four 16-bit uniforms, so the generator runs a quarter as often
    as `bernoulli_`, which on CPU costs more than the matrix products of a small ViT.
    """
    numel = shape.numel()
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), (1 << 63) - 1)  # the whole int64 range: every bit uniform
    uniform16 = words.view(torch.int16)[:numel].view(shape)  # uniform on [-32768, 32767]
    return uniform16 >= round(p * _INT16_SPAN) - (1 << 15)


class _MaskedScale(torch.autograd.Function):
    """y = x * keep / (1 - p); the backward pass reuses the same mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0), None, None


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper random mask on CPU; CUDA keeps PyTorch's fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        return _MaskedScale.apply(x, _keep_mask(x.shape, self.p, x.device), 1.0 / (1.0 - self.p))
