"""Model registry, and saving/loading a trained model as safetensors + a JSON config.

Each model is imported only when asked for, so a stage that trains the ViT does not
read the CNN's code (dvc.yaml lists exactly the code each stage depends on).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors.torch import load_file, save_file

from vitcnn.config import IMAGE_SIZE, Params
from vitcnn.errors import UserError
from vitcnn.io import atomic_write

MODELS = {"vit": "vitcnn.models.vit:VisionTransformer", "cnn": "vitcnn.models.cnn:CNN"}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def model_kwargs(name: str, params: Params) -> dict[str, Any]:
    """Constructor arguments for `name` at these params (the section of the same name)."""
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; use one of {', '.join(MODELS)}")
    kwargs = dataclasses.asdict(getattr(params, name))
    if name == "vit":
        kwargs["img_size"] = IMAGE_SIZE
    return kwargs


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    module_name, class_name = MODELS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(num_classes=num_classes, **kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_model(model: nn.Module, directory: Path, config: dict[str, Any]) -> None:
    """Write weights (safetensors) and the config that rebuilds the model, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_write(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    with atomic_write(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")


def load_model(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model in eval mode on the CPU, and return it with its config."""
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"{path}: not found; run the training stage first (dvc repro)")
    config = json.loads(config_path.read_text())
    model = build_model(config["name"], config["num_classes"], **config["kwargs"])
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise UserError(f"{weights_path}: cannot load the weights ({exc}); rerun training") from None
    return model.eval(), config
