"""What the registry knows of a model without importing its code (so that no stage depends on
another model's code: dvc.yaml reruns a model's stages only when its own code changes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelSpec:
    name: str  # its params.yaml section, its stage (train_<name>) and its folder models/<name>/
    label: str  # as figures and reports name it
    color: str  # its colour in every figure
    params: type  # the dataclass of its params.yaml section; `check(section)` validates values
    module: str  # the module whose `build(params, num_classes, img_size)` makes the nn.Module
    # How figures show where it looks: "attention" (rollout, and the readout's attention per
    # layer and head: `forward_with_attention`) or "gradcam" (Grad-CAM on `forward_features`,
    # and the strongest channels of `feature_maps`).
    explains: Literal["attention", "gradcam"]
