"""Where a model looks: the readout's attention and attention rollout for a model that shows its
attention, Grad-CAM for one that shows its feature maps (what each registered model can show is in
its `ModelSpec.explains`: `Attention()`, `GradCam()`).

Pure torch functions on tensors the models already give (`forward_with_attention`,
`forward_features` / `forward_head`); the figures live in `vitcnn.visualize`.

A ViT's head reads its tokens through a readout, (B, N) weights over the output tokens:
one-hot on the CLS token, uniform for mean pooling, learned for sequence pooling. The maps
below are that readout's view, so they work for every pooling: with a CLS token they are
the CLS token's attention and the CLS row of the rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitcnn.models.spec import Attention, GradCam


@dataclass
class Looks:
    """Where a model looks on some images, by one way of showing it, and what that was computed from."""

    how: Attention | GradCam
    relevance: torch.Tensor  # (B, h, w), >= 0
    inputs: torch.Tensor  # the normalised images, (B, C, H, W)
    attention: list[torch.Tensor] | None = None  # Attention: per block (B, heads, N, N)
    readout: torch.Tensor | None = None  # Attention: (B, N)


def where_it_looks(model: nn.Module, how: Attention | GradCam, x: torch.Tensor, target: torch.Tensor) -> Looks:
    """Model `model`'s relevance map on images `x` (B, C, H, W), shown `how`: the readout's row of the
    attention rollout, or Grad-CAM of the `target` classes (B,)."""
    if isinstance(how, Attention):
        with torch.no_grad():
            _, attention, readout = model.forward_with_attention(x)  # per block (B, heads, N, N); (B, N)
        relevance = rollout_map(attention, readout, model.grid_size, model.num_prefix_tokens)
        return Looks(how, relevance, x, attention, readout)
    if isinstance(how, GradCam):
        return Looks(how, gradcam(model, x, target), x)
    raise TypeError(f"no way to show where a model looks by {how!r}")  # a new kind of ModelSpec.explains


def readout_attention(attentions: list[torch.Tensor], readout: torch.Tensor, grid: int, prefix: int = 1) -> torch.Tensor:
    """The readout's attention to each patch, per layer and head, as (B, layers, heads, grid, grid).

    attentions: one (B, heads, N, N) softmax matrix per layer, N = prefix + grid**2 (the CLS
    token first, if any). readout: (B, N). Each layer's attention rows are mixed with the
    readout's weights (for a CLS readout: the CLS token's own row); the columns of prefix
    tokens are left out, so a map sums to at most 1.
    """
    weights = torch.stack(attentions, dim=1)  # (B, layers, heads, N, N)
    B, layers, heads = weights.shape[:3]
    rows = torch.einsum("bn,blhnm->blhm", readout.to(weights.dtype), weights)  # (B, layers, heads, N)
    return rows[..., prefix:].reshape(B, layers, heads, grid, grid)


def attention_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each token draws on each input token.

    Per layer the heads are averaged, the identity is added for the residual connection and
    the rows are renormalised; the layers are then multiplied, last layer on the left.
    Returns (B, N, N) with rows summing to 1: row i is token i's mix of the input tokens.
    """
    rollout = None
    for weights in attentions:
        mixed = weights.mean(1)  # (B, N, N), heads averaged
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout  # (B, N, N)
    return rollout


def rollout_map(attentions: list[torch.Tensor], readout: torch.Tensor, grid: int, prefix: int = 1) -> torch.Tensor:
    """The readout's row of the rollout over the patches, renormalised to sum to 1: (B, grid, grid).

    The share the prefix tokens keep (the CLS token's own input embedding) is dropped, so the
    map reads as "which fraction of the patch information the classifier draws on each patch".
    """
    rows = torch.einsum("bn,bnm->bm", readout.to(attentions[0].dtype), attention_rollout(attentions))  # (B, N)
    patches = rows[:, prefix:]
    patches = patches / patches.sum(-1, keepdim=True)
    return patches.reshape(-1, grid, grid)  # (B, grid, grid)


def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of `target` classes on a CNN's last feature maps, at x's size.

    Each channel of `model.forward_features(x)` is weighted by the spatial mean of the
    gradient of the target logit with respect to it; the ReLU of the weighted sum is
    upsampled (bilinear) to the input's height and width. Returns (B, H, W), >= 0, in the
    units of the features (not rescaled). x: (B, C, H, W); target: (B,) class indices.
    The model is used as given (eval mode, as `load_model` returns it); no gradient is left
    on its parameters.
    """
    with torch.no_grad():
        features = model.forward_features(x)  # (B, C, h, w)
    features.requires_grad_()  # a leaf: the gradient stops here, none reaches the parameters
    with torch.enable_grad():
        logits = model.forward_head(features)  # (B, num_classes)
        score = logits.gather(1, target.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, features)  # (B, C, h, w)
    channel_weights = grads.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((channel_weights * features.detach()).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, 1, H, W)
    return cam[:, 0]  # (B, H, W); bilinear weights are convex, so still >= 0
