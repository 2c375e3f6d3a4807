"""The model registry: the one list of models. Everything that handles "each model" iterates it.

Adding a model: a package `models/<name>/` with its params dataclass and `SPEC` in `__init__.py`
(no torch there) and its nn.Module and `build` in `model.py`; its line in `REGISTERED` below;
its section in params.yaml; and a `train_<name>` block in dvc.yaml. A model's package is
imported only when that model is asked for, so a stage that trains one model reads neither
another model's code nor its params (dvc.yaml lists exactly the code each stage reads).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from vitcnn.errors import UserError
from vitcnn.models.spec import ModelSpec

REGISTERED = {  # name -> its package, in the order tables and figures show the models
    "vit": "vitcnn.models.vit",
    "cnn": "vitcnn.models.cnn",
}
MODELS = list(REGISTERED)


class _Registry(Mapping[str, ModelSpec]):
    """name -> ModelSpec, importing a model's package (its params, never its torch code) on first use."""

    def __getitem__(self, name: str) -> ModelSpec:
        return importlib.import_module(REGISTERED[name]).SPEC

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTERED)

    def __len__(self) -> int:
        return len(REGISTERED)


REGISTRY: Mapping[str, ModelSpec] = _Registry()


def spec(name: str) -> ModelSpec:
    if name not in REGISTERED:
        raise UserError(f"unknown model '{name}'; use one of {', '.join(MODELS)}")
    return REGISTRY[name]


def label(name: str) -> str:
    """How figures and reports name a model: its registry label (the name itself if unregistered)."""
    return REGISTRY[name].label if name in REGISTERED else name


def color(name: str) -> str | None:
    return REGISTRY[name].color if name in REGISTERED else None
