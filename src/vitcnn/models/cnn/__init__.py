"""The CNN's params (its params.yaml section) and registry entry; the model is in model.py.

At the defaults it is the original program's CNN: blocks of two 3x3 conv+BN+ReLU and a
2x2 max-pool at widths 64-128-256-512, global average pooling, a linear head. `block:
residual` makes each block ResNet-9-like (Page 2018, the cifar10-fast network): one
conv+BN+ReLU and the max-pool, then a residual branch of two conv+BN+ReLU at the pooled size.
`block: resnet9` is that network whole: the first width is a stem at full resolution, each
further width a conv+BN+ReLU and max-pool, residual after the first and the last of those
(at 64-128-256-512: exactly cifar10-fast's ResNet-9), global max-pooling, logits x 1/8.
`block: airbench` is airbench94's network (Jordan 2024): a 2x2 convolution of 24 channels
with a bias (the layer the recipe's `whiten` initialises from the training images' patches)
and a GELU, then per width a group of conv3x3 - max-pool - BN - GELU - conv3x3 - BN - GELU
(bias-free convolutions; batch norm with eps 1e-12 and a fixed scale of 1, only its bias
learnt), global max-pooling, a bias-free linear head and logits x 1/9; at 64-256-256 it is
airbench94's 1.97M-parameter network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vitcnn.errors import require
from vitcnn.models.spec import GradCam, ModelSpec


@dataclass(frozen=True)
class CNNParams:
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    block: Literal["plain", "residual", "resnet9", "airbench"] = "plain"

    def check(self, section: str, img_size: int) -> None:
        key = f"{section}.channels"
        require(len(self.channels) >= 1 and all(ch >= 1 for ch in self.channels), key, self.channels,
                "use a non-empty list of positive integers")
        stem = self.block == "resnet9"  # its first width is a stem that keeps the resolution
        require(len(self.channels) >= 1 + stem, key, self.channels,
                "resnet9 needs at least two widths: the stem's and one pooling layer's")
        size = img_size - (self.block == "airbench")  # airbench's 2x2 whitening layer takes one pixel off
        most = size.bit_length() - 1 + stem
        require(2 ** (len(self.channels) - stem) <= size, key, self.channels,
                f"each {'width after the stem' if stem else 'block'} halves the image; at most {most} widths fit "
                f"{img_size}x{img_size}")


SPEC = ModelSpec(name="cnn", label="CNN", color="tab:orange", params=CNNParams, module="vitcnn.models.cnn.model",
                 explains=(GradCam(),), tiny={"channels": [4, 8]})
