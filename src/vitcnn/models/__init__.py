"""The model registry: the one list of models. Everything that handles "each model" iterates it.

Adding a model: a package under models/ with its params dataclass and `SPEC` in
`__init__.py` (no torch there) and its nn.Module and `build` in `model.py`; its entry below;
its section in params.yaml; and a `train_<name>` stage in dvc.yaml.
"""

from __future__ import annotations

from vitcnn.errors import UserError
from vitcnn.models import cnn, vit
from vitcnn.models.spec import ModelSpec

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in (vit.SPEC, cnn.SPEC)}
MODELS = list(REGISTRY)


def spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise UserError(f"unknown model '{name}'; use one of {', '.join(MODELS)}")
    return REGISTRY[name]
