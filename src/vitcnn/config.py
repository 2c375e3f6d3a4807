"""Typed view of params.yaml, validated before any stage does work.

Every section of params.yaml is a frozen dataclass. `load_params` walks the YAML
against those dataclasses and raises `ConfigError` with one line naming the key,
the bad value and what is allowed: an unknown key (a typo), a wrong type, or a
value that cannot work (embed_dim not divisible by num_heads, lr <= 0, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vitcnn.errors import ConfigError

IMAGE_SIZE = 32  # CIFAR images are 32x32; every supported dataset has this size
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["cifar10", "cifar100"] = "cifar10"
    source: str = "download"  # "download" or a path to an archive / folder
    val_size: int = 5000  # held out of the training images, stratified
    subset: int = 0  # 0 = every remaining training image; else a stratified subset
    split_seed: int = 0  # seeds the validation split and the subset (not `seed`: runs of many seeds share one split)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3.0e-4
    weight_decay: float = 0.05
    schedule: Literal["cosine", "constant"] = "cosine"
    crop_padding: int = 4  # random crop with this zero padding; 0 turns it off
    flip: bool = True  # random horizontal flip
    normalization: Literal["fixed", "measured"] = "fixed"  # fixed = the seed's CIFAR-10 constants
    select: Literal["best_val", "last"] = "best_val"  # which epoch's weights to keep
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    deterministic: bool = False  # deterministic kernels on GPU (CPU runs are deterministic anyway)
    eval_batch_size: int = 1000


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int = 4
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1


@dataclass(frozen=True)
class CNNConfig:
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 1000
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    throughput_batches: int = 5  # timed batches for inference images/s (median)
    latency_runs: int = 50  # timed batch-1 forwards for latency (median)


@dataclass(frozen=True)
class VisualizeConfig:
    num_images: int = 8  # fixed test images for attention and feature maps
    classes: list[str] = field(default_factory=list)  # empty = any class
    feature_channels: int = 2  # strongest channels shown per CNN block
    mistakes: int = 8  # most confidently wrong test images shown per model
    dpi: int = 120


@dataclass(frozen=True)
class Params:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    visualize: VisualizeConfig = field(default_factory=VisualizeConfig)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ConfigError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    params = _build(Params, raw, prefix="")
    _check_values(params)
    return params


def params_dict(obj: Any) -> Any:
    """The params (or one section) as plain dicts/lists, e.g. for hashing or JSON."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def check_key(dotted: str) -> None:
    """Raise ConfigError, as for params.yaml, unless `dotted` (e.g. 'vit.depth') names a param."""
    cls, prefix = Params, ""
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            if not fields:  # a part after a plain value, as in 'seed.x'
                raise ConfigError(f"unknown key '{dotted}'; '{prefix.rstrip('.')}' has no keys below it")
            _unknown_key(part, list(fields), prefix)
        cls, prefix = typing.get_type_hints(cls)[part], f"{prefix}{part}."


def _unknown_key(key: str, names: list[str], prefix: str) -> typing.NoReturn:
    guess = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{prefix}{guess[0]}'?)" if guess else ""
    raise ConfigError(f"unknown key '{prefix}{key}'{hint}; allowed: {', '.join(names)}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:  # a section with every key commented out: its defaults
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'params.yaml'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            _unknown_key(str(key), names, prefix)
    values = {}
    for name in names:
        if name not in raw:
            continue
        key, hint = f"{prefix}{name}", hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], prefix=f"{key}.")
        else:
            values[name] = _coerce(key, raw[name], hint)
    return cls(**values)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; use one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        # PyYAML reads '1e-3' (no dot) as a string; accept any number written as text.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type for {key}: {hint}")  # a bug in this module, not in params


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


def _check_values(p: Params) -> None:
    """Range and cross-field checks that types alone cannot express."""
    d, t, v, c, e, vis = p.data, p.train, p.vit, p.cnn, p.evaluate, p.visualize
    _require(p.seed >= 0, "seed", p.seed, "use an integer >= 0")
    _require(d.source.strip() != "", "data.source", d.source, "use 'download' or a path to the data")
    _require(d.val_size >= 1, "data.val_size", d.val_size, "use an integer >= 1")
    _require(d.subset >= 0, "data.subset", d.subset, "use 0 (all training images) or a positive count")
    _require(d.split_seed >= 0, "data.split_seed", d.split_seed, "use an integer >= 0")
    _require(t.epochs >= 1, "train.epochs", t.epochs, "use an integer >= 1")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "use an integer >= 1")
    _require(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, "use an integer >= 1")
    _require(t.lr > 0, "train.lr", t.lr, "use a number > 0")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "use a number >= 0")
    _require(0 <= t.crop_padding <= IMAGE_SIZE, "train.crop_padding", t.crop_padding, f"use 0..{IMAGE_SIZE}")
    _require(v.patch_size >= 1 and IMAGE_SIZE % v.patch_size == 0, "vit.patch_size", v.patch_size,
             f"the image size {IMAGE_SIZE} must be divisible by it (1, 2, 4, 8, 16, 32)")
    _require(v.embed_dim >= 1, "vit.embed_dim", v.embed_dim, "use an integer >= 1")
    _require(v.num_heads >= 1 and v.embed_dim % v.num_heads == 0, "vit.num_heads", v.num_heads,
             f"vit.embed_dim ({v.embed_dim}) must be divisible by it")
    _require(v.depth >= 1, "vit.depth", v.depth, "use an integer >= 1")
    _require(v.mlp_ratio > 0, "vit.mlp_ratio", v.mlp_ratio, "use a number > 0")
    _require(0 <= v.dropout < 1, "vit.dropout", v.dropout, "use a number in [0, 1)")
    _require(len(c.channels) >= 1 and all(ch >= 1 for ch in c.channels), "cnn.channels", c.channels,
             "use a non-empty list of positive integers")
    _require(2 ** len(c.channels) <= IMAGE_SIZE, "cnn.channels", c.channels,
             f"each block halves the image; at most {IMAGE_SIZE.bit_length() - 1} blocks fit {IMAGE_SIZE}x{IMAGE_SIZE}")
    _require(e.batch_size >= 1, "evaluate.batch_size", e.batch_size, "use an integer >= 1")
    _require(e.throughput_batches >= 1, "evaluate.throughput_batches", e.throughput_batches, "use an integer >= 1")
    _require(e.latency_runs >= 1, "evaluate.latency_runs", e.latency_runs, "use an integer >= 1")
    _require(vis.num_images >= 1, "visualize.num_images", vis.num_images, "use an integer >= 1")
    _require(vis.feature_channels >= 1, "visualize.feature_channels", vis.feature_channels, "use an integer >= 1")
    _require(vis.mistakes >= 1, "visualize.mistakes", vis.mistakes, "use an integer >= 1")
    _require(vis.dpi >= 30, "visualize.dpi", vis.dpi, "use an integer >= 30")

