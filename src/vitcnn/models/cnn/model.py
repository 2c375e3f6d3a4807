"""The original program's CNN, and a residual (ResNet-9-like) variant at the same widths.

Plain blocks (the default): two 3x3 conv+BN+ReLU and a 2x2 max-pool, then global average
pooling and a linear head; at channels (64, 128, 256, 512) it has 4,694,346 parameters for
10 classes. Residual blocks: conv+BN+ReLU, max-pool, then x + two conv+BN+ReLU. Both have
the ViT's interface (`forward_features` / `forward_head`), so evaluation and figures never
branch on the model type.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitcnn.models.cnn import CNNParams


def build(params: CNNParams, num_classes: int, img_size: int) -> "CNN":
    return CNN(num_classes=num_classes, channels=params.channels, block=params.block)


def conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class ConvBlock(nn.Sequential):
    """conv-BN-ReLU twice, then a 2x2 max-pool: (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(*conv_bn_relu(in_ch, out_ch), *conv_bn_relu(out_ch, out_ch), nn.MaxPool2d(2, 2))


class ResidualBlock(nn.Module):
    """conv-BN-ReLU and a 2x2 max-pool, then x + (conv-BN-ReLU twice)(x): (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.down = nn.Sequential(*conv_bn_relu(in_ch, out_ch), nn.MaxPool2d(2, 2))
        self.residual = nn.Sequential(*conv_bn_relu(out_ch, out_ch), *conv_bn_relu(out_ch, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.residual(x)


class CNN(nn.Module):
    def __init__(self, num_classes: int, channels: list[int] = (64, 128, 256, 512), in_chans: int = 3,
                 block: str = "plain"):
        super().__init__()
        make_block = {"plain": ConvBlock, "residual": ResidualBlock}[block]
        widths = [in_chans, *channels]
        self.blocks = nn.ModuleList(make_block(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)

    def no_weight_decay(self) -> set[str]:
        return set()  # no embeddings: every matrix is a weight

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x  # (B, C_last, H / 2**blocks, W / 2**blocks)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(features).flatten(1))  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each block's output, (B, C_i, H_i, W_i), for figures."""
        maps = []
        for block in self.blocks:
            x = block(x)
            maps.append(x)
        return maps
