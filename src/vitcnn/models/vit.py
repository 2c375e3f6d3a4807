"""Vision Transformer for 32x32 images: the seed's model, with a fused attention path.

At the defaults (patch 4, dim 128, depth 6, 4 heads, MLP ratio 4, dropout 0.1) this is
the seed program's ViT, parameter for parameter (1,205,898 for 10 classes): a CLS token,
learnable positions, pre-norm blocks, dropout on the attention weights, after the MLP's
GELU and after its output, and on the embedded tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitcnn.models.layers import Dropout


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


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), Dropout(drop), nn.Linear(hidden, dim), Dropout(drop))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        if return_weights:
            y, weights = self.attn(self.norm1(x), return_weights=True)
        else:
            y, weights = self.attn(self.norm1(x)), None
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return (x, weights) if return_weights else x


class VisionTransformer(nn.Module):
    def __init__(
        self,
        num_classes: int,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the seed: PyTorch's default init for layers, truncated normal for the tokens.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, num_patches, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + num_patches, D)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, 1 + num_patches, D)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features[:, 0])  # classify from the CLS token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every layer's attention weights, each (B, heads, N, N) with N = 1 + num_patches."""
        x = self._embed(x)
        maps = []
        for block in self.blocks:
            x, weights = block(x, return_weights=True)
            maps.append(weights)
        return self.forward_head(self.norm(x)), maps
