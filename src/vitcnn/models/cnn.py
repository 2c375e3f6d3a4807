"""The seed's CNN: blocks of two 3x3 conv+BN+ReLU and a 2x2 max-pool, then global average pool.

At the default channels (64, 128, 256, 512) it has 4,694,346 parameters for 10 classes.
It has the ViT's interface (`forward_features` / `forward_head`), so evaluation and
figures never branch on the model type.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ConvBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )


class CNN(nn.Module):
    def __init__(self, num_classes: int, channels: list[int] = (64, 128, 256, 512), in_chans: int = 3):
        super().__init__()
        widths = [in_chans, *channels]
        self.blocks = nn.ModuleList(ConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)

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
