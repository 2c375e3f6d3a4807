"""What the registry knows of a model without importing its code (so that no stage depends on
another model's code: dvc.yaml reruns a model's stages only when its own code changes).

A model package (`models/<name>/`) declares in its `__init__.py`, without torch:
- its params (the dataclass of its params.yaml section, with a `check(section, image_size)`);
- `SPEC`: its label and colour, the module holding its nn.Module and `build`, a tiny config for
  tests, and what it can show of where it looks (`explains`: objects, below).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Attention:
    """Where the model looks, read from its attention: attention rollout through every block, and the
    readout's attention per block and head. The model provides `forward_with_attention(x) -> (logits,
    [per block (B, heads, N, N)], readout (B, N))`, `grid_size` (tokens per side) and
    `num_prefix_tokens` (tokens before the patches', e.g. a CLS token)."""

    title: str = "attention rollout"


@dataclass(frozen=True)
class GradCam:
    """Where the model looks, by Grad-CAM of the predicted class on the output of `forward_features`
    (B, C, h, w), read by `forward_head`; and the strongest channels of each stage of
    `feature_maps(x) -> [(B, C_i, h_i, w_i)]`."""

    title: str = "Grad-CAM"


@dataclass(frozen=True)
class ModelSpec:
    name: str  # its params.yaml section, its stage (train_<name>) and its folder models/<name>/
    label: str  # as figures and reports name it
    color: str  # its colour in every figure (a matplotlib colour)
    params: type  # the dataclass of its params.yaml section; `check(section, image_size)` validates values
    module: str  # the module whose `build(params, num_classes, img_size)` makes the nn.Module
    explains: tuple[Attention | GradCam, ...]  # what figures can show of where it looks, first one first
    tiny: dict[str, Any] = field(default_factory=dict)  # params of a small version, for tests (tiny data, fast)
