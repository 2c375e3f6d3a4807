"""Building a registered model, and saving/loading a trained one as safetensors + a JSON config.

A model's code is imported only when that model is built, so a stage that trains the ViT
does not read the CNN's code (dvc.yaml lists exactly the code each stage depends on).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors.torch import load_file, save_file

from vitcnn.errors import UserError
from vitcnn.io import atomic_write
from vitcnn.models import spec

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def model_params(name: str, section: Any) -> Any:
    """The model's own params (its dataclass) out of its params.yaml section, which also holds `recipe`."""
    cls = spec(name).params
    return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


def build_model(name: str, num_classes: int, params: Any, img_size: int) -> nn.Module:
    """The registered model `name` with its params (its dataclass, or its params.yaml section), for square
    images of `img_size` pixels."""
    own = model_params(name, params)
    return importlib.import_module(spec(name).module).build(own, num_classes, img_size)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_model(model: nn.Module, directory: Path, config: dict[str, Any]) -> None:
    """Write weights (safetensors) and the config that rebuilds the model, each atomically.

    config must hold `name`, `num_classes`, `image_size` and `params` (the model's own params as a dict).
    """
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
    try:
        params = spec(config["name"]).params(**config["params"])
        config["image_size"]  # noqa: B018  (written since models have a size; older configs lack it)
    except (KeyError, TypeError) as exc:
        raise UserError(f"{config_path}: not a model config of this version ({exc}); rerun training") from None
    model = build_model(config["name"], config["num_classes"], params, config["image_size"])
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise UserError(f"{weights_path}: cannot load the weights ({exc}); rerun training") from None
    return model.eval(), config
