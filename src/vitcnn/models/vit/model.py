"""Vision Transformer for 32x32 images: the original program's model, its variants, a fused attention path.

At the default params (patch 4, dim 128, depth 6, 4 heads, MLP ratio 4, dropout 0.1) this
is the original program's ViT, parameter for parameter (1,205,898 for 10 classes): a CLS
token, learnable positions, pre-norm blocks, dropout on the attention weights, after the
MLP's GELU and after its output, and on the embedded tokens. The variants are
constructor choices (timm's way), not new models: a conv tokenizer instead of the patch
projection, mean or sequence pooling instead of a CLS token, stochastic depth.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitcnn.models.layers import Dropout, DropPath
from vitcnn.models.vit import ViTParams


def build(params: ViTParams, num_classes: int, img_size: int) -> "VisionTransformer":
    return VisionTransformer(num_classes=num_classes, img_size=img_size, in_chans=3, **dataclasses.asdict(params))


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to embed_dim."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, grid, grid)
        return x.flatten(2).transpose(1, 2)  # (B, num_patches, D)


class Attention(nn.Module):
    """Multi-head self-attention.

    `fused_attn` selects `F.scaled_dot_product_attention`; asking for the weights (or
    training with attention dropout on CPU) runs the manual softmax path, which computes
    the same function.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = Dropout(attn_drop)
        self.fused_attn = True

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        weights = None
        if self.fused_attn and not return_weights and not self._drops_on_cpu(x):
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            weights = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
            x = self.attn_drop(weights) @ v
        x = self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
        return (x, weights) if return_weights else x

    def _drops_on_cpu(self, x: torch.Tensor) -> bool:
        # SDPA has no fused CPU kernel with dropout: its fallback is this same math with a
        # bernoulli_ mask, so CPU training takes the manual path and the cheaper Dropout.
        return self.training and self.attn_drop.p > 0 and x.device.type == "cpu"


class ConvStem(nn.Sequential):
    """CCT's tokenizer: `layers` of conv3x3 (no bias) - ReLU - maxpool 3/2, each halving the grid.

    Inner layers have `channels` channels, the last `embed_dim`. Output: (B, grid**2, embed_dim).
    """

    def __init__(self, img_size: int, layers: int, in_chans: int, channels: int, embed_dim: int):
        widths = [in_chans] + [channels] * (layers - 1) + [embed_dim]
        super().__init__(*(nn.Sequential(nn.Conv2d(a, b, kernel_size=3, padding=1, bias=False), nn.ReLU(inplace=True),
                                         nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
                           for a, b in zip(widths[:-1], widths[1:])))
        self.grid_size = img_size >> layers
        self.num_patches = self.grid_size**2
        if self.grid_size << layers != img_size:
            raise ValueError(f"a conv stem of {layers} layers does not divide a {img_size}x{img_size} image evenly")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).flatten(2).transpose(1, 2)  # (B, grid**2, D)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), Dropout(drop), nn.Linear(hidden, dim), Dropout(drop))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); each branch may be dropped
    per sample (stochastic depth)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        if return_weights:
            y, weights = self.attn(self.norm1(x), return_weights=True)
        else:
            y, weights = self.attn(self.norm1(x)), None
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, weights) if return_weights else x


class SeqPool(nn.Module):
    """Sequence pooling (CCT): a learned softmax weighting of the tokens, (B, N, D) -> (B, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x).squeeze(-1).softmax(-1)  # (B, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weights(x).unsqueeze(1) @ x).squeeze(1)  # (B, D)


class VisionTransformer(nn.Module):
    def __init__(self, *, num_classes: int, img_size: int, in_chans: int, patch_size: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, dropout: float, attn_dropout: float, drop_path: float, stem: str,
                 stem_layers: int, stem_channels: int, pooling: str):
        """Every argument by keyword and without a default: the defaults are params.yaml's (ViTParams)."""
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if stem == "patch":
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        else:
            self.patch_embed = ConvStem(img_size, stem_layers, in_chans, stem_channels, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.pooling = pooling
        self.num_prefix_tokens = 1 if pooling == "cls" else 0  # tokens before the patches' (the CLS token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pooling == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = Dropout(dropout)
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # 0 for the first block, linear
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dropout, attn_dropout, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.seq_pool = SeqPool(embed_dim) if pooling == "seq" else None
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the original program: PyTorch's default init for layers, truncated normal for the tokens.
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters that are embeddings, not weights: left out of weight decay on matrices (timm's convention)."""
        return {"pos_embed", "cls_token"}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, num_patches, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + num_patches, D)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, N, D), N = num_prefix_tokens + num_patches

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        """How the head reads the tokens: (B, N) weights summing to 1 (one-hot on the CLS token, uniform
        for mean pooling, learned for sequence pooling)."""
        B, N, _ = features.shape
        if self.pooling == "seq":
            return self.seq_pool.weights(features)
        if self.pooling == "mean":
            return features.new_full((B, N), 1 / N)
        return F.one_hot(torch.zeros(B, dtype=torch.long, device=features.device), N).to(features.dtype)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = features[:, 0]  # the CLS token
        elif self.pooling == "mean":
            pooled = features.mean(1)
        else:
            pooled = self.seq_pool(features)
        return self.head(pooled)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Logits, every layer's attention weights (each (B, heads, N, N)) and the head's readout (B, N)."""
        x = self._embed(x)
        maps = []
        for block in self.blocks:
            x, weights = block(x, return_weights=True)
            maps.append(weights)
        features = self.norm(x)
        return self.forward_head(features), maps, self.readout(features)
