"""Where a model looks: CLS attention and attention rollout for the ViT, Grad-CAM for the CNN.

Pure torch functions on tensors the models already give (`forward_with_attention`,
`forward_features` / `forward_head`); the figures live in `vitcnn.visualize`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def cls_attention(attentions: list[torch.Tensor], grid: int) -> torch.Tensor:
    """The CLS token's attention to each patch, per layer and head, as (B, layers, heads, grid, grid).

    attentions: one (B, heads, N, N) softmax matrix per layer, N = 1 + grid**2 (CLS first).
    The weights are as the model computed them; the CLS token's attention to itself is left
    out, so a map sums to at most 1.
    """
    weights = torch.stack(attentions, dim=1)  # (B, layers, heads, N, N)
    B, layers, heads = weights.shape[:3]
    return weights[..., 0, 1:].reshape(B, layers, heads, grid, grid)


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


def cls_rollout(attentions: list[torch.Tensor], grid: int) -> torch.Tensor:
    """The CLS row of the rollout over the patches, renormalised to sum to 1: (B, grid, grid).

    The share the CLS token keeps of its own input embedding is dropped, so the map reads
    as "which fraction of the patch information the classifier's token draws on each patch".
    """
    patches = attention_rollout(attentions)[:, 0, 1:]  # (B, grid**2)
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
