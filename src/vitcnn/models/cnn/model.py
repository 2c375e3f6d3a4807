"""The original program's CNN, a residual variant at the same widths, ResNet-9, and airbench94's network.

Plain blocks (the default): two 3x3 conv+BN+ReLU and a 2x2 max-pool, then global average
pooling and a linear head; at channels (64, 128, 256, 512) it has 4,694,346 parameters for
10 classes. Residual blocks: conv+BN+ReLU, max-pool, then x + two conv+BN+ReLU. `resnet9`:
the cifar10-fast network (Page 2018) whole — a conv+BN+ReLU stem at full resolution, then
per further width conv+BN+ReLU and max-pool, with a residual branch after the first and the
last; global max-pooling, a linear head without bias and logits scaled by 1/8; convolutions
without bias (a BN follows each). At (64, 128, 256, 512) it has 6,573,120 parameters.
`airbench`: airbench94's network (Jordan 2024, `legacy/airbench94.py`): the whitening layer (a
2x2 conv, 24 channels, with bias) and GELU, then per width conv - pool - BN - GELU - conv - BN -
GELU, global max-pooling, a bias-free head and logits x 1/9; its batch norms have eps 1e-12 and
learn only their bias. All have the ViT's interface (`forward_features` / `forward_head`), so
evaluation and figures never branch on the model type.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitcnn.models.cnn import CNNParams


WHITEN_KERNEL = 2  # airbench's whitening layer: 2x2 patches, 2 * 3 * 2 * 2 = 24 channels (each filter and its negative)


def build(params: CNNParams, num_classes: int, img_size: int) -> "CNN":
    return CNN(num_classes=num_classes, channels=params.channels, block=params.block, in_chans=3)


def conv_bn_relu(in_ch: int, out_ch: int, bias: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=bias), nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True)]


class ConvBlock(nn.Sequential):
    """conv-BN-ReLU twice, then a 2x2 max-pool: (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(*conv_bn_relu(in_ch, out_ch), *conv_bn_relu(out_ch, out_ch), nn.MaxPool2d(2, 2))


class Residual(nn.Sequential):
    """x + its layers applied to x (they keep x's shape); its weights are named as a plain Sequential's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU and a 2x2 max-pool, then x + (conv-BN-ReLU twice)(x): (B, in, H, W) -> (B, out, H/2, W/2).
    Without `residual`, the conv and the pool alone (ResNet-9's middle layer)."""

    def __init__(self, in_ch: int, out_ch: int, bias: bool = True, residual: bool = True):
        super().__init__()
        self.down = nn.Sequential(*conv_bn_relu(in_ch, out_ch, bias), nn.MaxPool2d(2, 2))
        self.residual = (Residual(*conv_bn_relu(out_ch, out_ch, bias), *conv_bn_relu(out_ch, out_ch, bias))
                         if residual else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(self.down(x))


class Scale(nn.Module):
    """Multiplies by a constant: ResNet-9's logits x 1/8, which keeps its untrained outputs small."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def resnet9_blocks(in_chans: int, channels: list[int]) -> list[nn.Module]:
    """The stem at full resolution, then one pooling layer per further width, residual at the first and last."""
    layers = len(channels) - 1
    return [nn.Sequential(*conv_bn_relu(in_chans, channels[0], bias=False)),
            *(ResidualBlock(a, b, bias=False, residual=i in (0, layers - 1))
              for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])))]


class AirbenchNorm(nn.BatchNorm2d):
    """airbench's batch norm: eps 1e-12, its scale fixed at 1 (not learnt), only its bias learnt."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12)
        self.weight.requires_grad_(False)


class AirbenchGroup(nn.Sequential):
    """conv3x3 - max-pool - BN - GELU - conv3x3 - BN - GELU: (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.MaxPool2d(2), AirbenchNorm(out_ch),
                         nn.GELU(), nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), AirbenchNorm(out_ch), nn.GELU())


def airbench_blocks(in_chans: int, channels: list[int]) -> list[nn.Module]:
    """The whitening layer and its GELU, then a group per width."""
    whiten_width = 2 * in_chans * WHITEN_KERNEL**2
    widths = [whiten_width, *channels]
    return [nn.Sequential(nn.Conv2d(in_chans, whiten_width, WHITEN_KERNEL, bias=True), nn.GELU()),
            *(AirbenchGroup(a, b) for a, b in zip(widths[:-1], widths[1:]))]


class CNN(nn.Module):
    def __init__(self, *, num_classes: int, channels: list[int], block: str, in_chans: int):
        """Every argument by keyword and without a default: the defaults are params.yaml's (CNNParams)."""
        super().__init__()
        if block == "resnet9":
            self.blocks = nn.ModuleList(resnet9_blocks(in_chans, list(channels)))
            self.pool = nn.AdaptiveMaxPool2d(1)
            self.head = nn.Sequential(nn.Linear(channels[-1], num_classes, bias=False), Scale(0.125))
        elif block == "airbench":
            self.blocks = nn.ModuleList(airbench_blocks(in_chans, list(channels)))
            self.pool = nn.AdaptiveMaxPool2d(1)
            self.head = nn.Sequential(nn.Linear(channels[-1], num_classes, bias=False), Scale(1 / 9))
        else:
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
