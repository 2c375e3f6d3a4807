"""The Vision Transformer's params (its params.yaml section) and registry entry; the model is in model.py.

At the defaults it is the original program's ViT: patch 4, dim 128, depth 6, 4 heads,
MLP ratio 4, dropout 0.1, a CLS token. The variants (all off at the defaults):
- `stem: conv`: a convolutional tokenizer as in CCT (Hassani et al. 2021): `stem_layers`
  of conv3x3-ReLU-maxpool, each halving the grid, instead of the patch projection;
- `pooling`: `cls` (a CLS token), `mean` (mean of the tokens) or `seq` (sequence pooling,
  CCT's learned attention over the tokens; no CLS token then);
- `drop_path`: stochastic depth, rising linearly over the blocks to this rate;
- `attn_dropout` apart from `dropout` (the tokens and the MLP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vitcnn.errors import require
from vitcnn.models.spec import Attention, ModelSpec


@dataclass(frozen=True)
class ViTParams:
    patch_size: int = 4  # patch stem: the side of each square patch
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1  # on the embedded tokens and after the MLP's activation and output
    attn_dropout: float = 0.1  # on the attention weights
    drop_path: float = 0.0  # stochastic depth of the last block (0 for the first, linear between)
    stem: Literal["patch", "conv"] = "patch"
    stem_layers: int = 2  # conv stem: conv3x3-ReLU-maxpool layers, each halving the grid
    stem_channels: int = 64  # conv stem: channels of its inner layers (the last has embed_dim)
    pooling: Literal["cls", "mean", "seq"] = "cls"

    def grid_size(self, img_size: int) -> int:
        return img_size // self.patch_size if self.stem == "patch" else img_size >> self.stem_layers

    def check(self, section: str, img_size: int) -> None:
        def key(name: str) -> str:
            return f"{section}.{name}"

        if self.stem == "patch":
            require(self.patch_size >= 1 and img_size % self.patch_size == 0, key("patch_size"), self.patch_size,
                    f"the image size {img_size} must be divisible by it (1, 2, 4, 8, 16, 32)")
        else:
            most = img_size.bit_length() - 1
            require(1 <= self.stem_layers <= most, key("stem_layers"), self.stem_layers,
                    f"each conv stem layer halves the {img_size}x{img_size} grid, which must divide evenly: use 1..{most}")
            require(self.stem_channels >= 1, key("stem_channels"), self.stem_channels, "use an integer >= 1")
        require(self.embed_dim >= 1, key("embed_dim"), self.embed_dim, "use an integer >= 1")
        require(self.num_heads >= 1 and self.embed_dim % self.num_heads == 0, key("num_heads"), self.num_heads,
                f"{key('embed_dim')} ({self.embed_dim}) must be divisible by it")
        require(self.depth >= 1, key("depth"), self.depth, "use an integer >= 1")
        require(self.mlp_ratio > 0, key("mlp_ratio"), self.mlp_ratio, "use a number > 0")
        for name in ("dropout", "attn_dropout", "drop_path"):
            require(0 <= getattr(self, name) < 1, key(name), getattr(self, name), "use a number in [0, 1)")


SPEC = ModelSpec(name="vit", label="ViT", color="tab:blue", params=ViTParams, module="vitcnn.models.vit.model",
                 explains=(Attention(),),
                 tiny={"patch_size": 4, "embed_dim": 8, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0,
                       "stem_channels": 4})
