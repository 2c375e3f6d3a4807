"""Typed view of params.yaml, validated before any stage does work.

Every section of params.yaml is a frozen dataclass; the model sections come from the
model registry (each model's own params, plus its `recipe` overrides of `train.*`).
`load_params` walks the YAML against those dataclasses and raises `ConfigError` with one
line naming the key, the bad value and what is allowed: an unknown key (a typo), a wrong
type, or a value that cannot work (embed_dim not divisible by num_heads, lr <= 0, a
warmup as long as the run, ...).

A stage validates the model sections it reads (`load_params(models=...)`): training one
model reads neither another model's params nor its package, so dvc.yaml need not list
another model's code for it. Every other section is validated by every stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vitcnn.errors import ConfigError, require
from vitcnn.models import MODELS, REGISTRY
from vitcnn.models.spec import ModelSpec

OFFICIAL_SIZE = 32  # the official CIFAR files' images are 32x32
BINS = 31  # magnitude bins of the augmentation policies, as torchvision's
# CIFAR-10-C's corruptions that vitcnn.corruptions generates (the names of the official .npy files)
CORRUPTION_NAMES = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "gaussian_blur", "contrast",
                    "brightness", "saturate", "pixelate", "jpeg_compression")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}  # data.dataset "folder" (your own images): any number, from 2


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["cifar10", "cifar100", "folder"] = "cifar10"  # folder: your own images, any classes
    source: str = "download"  # "download" or a path to an archive / folder
    image_size: int = 32  # every image is brought to image_size x image_size pixels, once, in prepare
    resize: Literal["crop", "pad", "stretch"] = "crop"  # crop: shorter side to the size, centre crop
    val_size: float = 5000  # held out of the training images, stratified: a count, or a fraction in (0, 1)
    test_size: float = 0.2  # held out when the source has no test split: a count, or a fraction in (0, 1)
    subset: int = 0  # 0 = every remaining training image; else a stratified subset
    split_seed: int = 0  # seeds the held-out splits and the subset (not `seed`: runs of many seeds share one split)
    skip_bad: bool = False  # true: skip (and count) images that do not decode, instead of stopping


@dataclass(frozen=True)
class Recipe:
    """How a model is trained. `train.*` is the recipe both models share (the original
    program's at the defaults); `<model>.recipe.*` overrides any of it for one model."""

    epochs: int = 20
    batch_size: int = 128
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: with Nesterov momentum
    lr: float = 3.0e-4  # the peak learning rate
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.05
    decay: Literal["all", "matrices"] = "all"  # matrices: not norms, biases, embeddings or tokens
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup, towards 0 (but constant)
    lr_step: Literal["epoch", "batch"] = "epoch"  # when the learning rate changes (epoch: the original program's)
    warmup: float = 0.0  # the fraction of the run spent warming up linearly from 0; + `linear` = one-cycle
    grad_clip: float = 0.0  # clip the gradients' global norm to this; 0 = off
    label_smoothing: float = 0.0
    ema: float = 0.0  # decay of an exponential moving average of the weights, e.g. 0.999; 0 = off
    crop_padding: int = 4  # random crop with this zero padding; 0 turns it off
    flip: bool = True  # random horizontal flip
    augment: Literal["none", "randaugment", "trivialaugment"] = "none"  # a per-image policy after crop + flip
    augment_ops: int = 2  # randaugment: ops per image (N)
    augment_magnitude: int = 9  # randaugment: magnitude bin (M), 0..30
    cutout: int = 0  # side of a square zeroed per image (Cutout); 0 = off
    erasing: float = 0.0  # probability of random erasing per image
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0 = off (with mixup too: one of the two at random)
    mix_prob: float = 1.0  # chance that a batch (or image) is mixed at all
    mix_per: Literal["batch", "image"] = "batch"  # one lambda per batch, or one per image
    # airbench94's tricks (Jordan 2024), for any model they fit (each checked against the model at setup):
    alternate_flip: bool = False  # flip each image every other epoch from a random first choice (needs flip)
    whiten: int = 0  # k: set the first conv (k x k, 2*3*k*k filters) to whiten the training images' k x k patches
    dirac: bool = False  # identity init of the first in-channels filters of each conv (a residual-like start)
    bn_bias_lr: float = 1.0  # learning-rate multiplier of batch-norm biases (their weight decay divided by it)
    bn_momentum: float = 0.0  # batch norm's running-statistics momentum (torch's convention); 0 = the model's own
    lookahead: int = 0  # every k steps the weights move to their slow average and back (airbench's); 0 = off


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """The shared recipe, and how every training run runs."""

    normalization: Literal["fixed", "measured"] = "fixed"  # fixed = the original program's CIFAR-10 constants
    select: Literal["best_val", "last"] = "best_val"  # which epoch's weights to keep
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    cuda_graphs: Literal["auto", "on", "off"] = "auto"  # each training step as one replayed CUDA graph (CUDA only)
    deterministic: bool = False  # deterministic kernels on GPU (CPU runs are deterministic anyway)
    eval_batch_size: int = 1000
    device_memory_gb: float = 0.0  # how much of a GPU's memory the uint8 images may take; 0 = auto (half its free memory)


# <model>.recipe: every recipe key, null (the shared value) unless set for this model.
RecipeOverrides = dataclasses.make_dataclass(
    "RecipeOverrides", [(name, typing.Optional[hint], None) for name, hint in typing.get_type_hints(Recipe).items()],
    frozen=True)


def _model_section(spec: ModelSpec) -> type:
    """A model's params.yaml section: its own params (from the registry) and its `recipe` overrides."""
    return dataclasses.make_dataclass(f"{spec.params.__name__}Section",
                                      [("recipe", RecipeOverrides, field(default_factory=RecipeOverrides))],
                                      bases=(spec.params,), frozen=True)


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 1000
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    tta: Literal["none", "flip", "flip_translate"] = "none"  # test-time augmentation: logits averaged over views
    throughput_batches: int = 5  # timed batches for inference images/s (median)
    latency_runs: int = 50  # timed batch-1 forwards for latency (median)


@dataclass(frozen=True)
class RobustnessConfig:
    subset: int = 500  # test images (stratified, seeded) for corruptions and occlusion; 0 = all
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTION_NAMES))
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    occlusion_fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    occlusion_patch: int = 4  # side of the square cells removed at random (the ViT's patch at the defaults)
    calibration_bins: int = 15  # equal-width confidence bins for the ECE and the reliability diagram
    cifar10c: str = ""  # a folder with the official CIFAR-10-C .npy files: used instead of generating them
    batch_size: int = 500


@dataclass(frozen=True)
class VisualizeConfig:
    num_images: int = 8  # fixed test images for attention and feature maps
    classes: list[str] = field(default_factory=list)  # empty = any class
    feature_channels: int = 2  # strongest channels shown per CNN block
    mistakes: int = 8  # most confidently wrong test images shown per model
    dpi: int = 120


def params_type(models: tuple[str, ...] | None = None) -> type:
    """The dataclass of params.yaml with a section for each of `models` (every registered model by default)."""
    return _params_type(tuple(MODELS) if models is None else tuple(models))


@functools.cache  # one class per set of models, so that two loads of the same sections compare equal
def _params_type(models: tuple[str, ...]) -> type:
    cls = dataclasses.make_dataclass("Params", [
        ("seed", int, 0),
        ("device", Literal["auto", "cpu", "cuda", "mps"], "auto"),
        ("data", DataConfig, field(default_factory=DataConfig)),
        ("train", TrainConfig, field(default_factory=TrainConfig)),
        *((name, section, field(default_factory=section))
          for name, section in ((name, _model_section(REGISTRY[name])) for name in models)),
        ("evaluate", EvaluateConfig, field(default_factory=EvaluateConfig)),
        ("robustness", RobustnessConfig, field(default_factory=RobustnessConfig)),
        ("visualize", VisualizeConfig, field(default_factory=VisualizeConfig)),
    ], frozen=True)
    cls.__doc__ = "Sections of params.yaml; one per registered model asked for, named after it."
    return cls


def __getattr__(name: str) -> Any:
    """`Params`: the dataclass with every registered model's section (importing each model's package)."""
    if name == "Params":
        return params_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def recipe_for(params: Any, name: str) -> TrainConfig:
    """The recipe model `name` trains with: train.*, with the keys its `recipe` sets replaced."""
    overrides = {k: v for k, v in dataclasses.asdict(getattr(params, name).recipe).items() if v is not None}
    return dataclasses.replace(params.train, **overrides)


def recipe_key(params: Any, name: str) -> typing.Callable[[str], str]:
    """Where model `name`'s recipe key is set, for messages: `<name>.recipe.<key>` if its recipe sets it, else
    `train.<key>`."""
    overridden = {k for k, v in dataclasses.asdict(getattr(params, name).recipe).items() if v is not None}
    return lambda key: f"{name}.recipe.{key}" if key in overridden else f"train.{key}"


def load_params(path: str | Path = "params.yaml", models: list[str] | tuple[str, ...] | None = None) -> Any:
    """Read and validate params.yaml; raise ConfigError with one clear line.

    `models`: the model sections to read and validate (default: every registered model); the others
    are left as they are, but must be registered models.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    models = tuple(MODELS if models is None else models)
    if isinstance(raw, dict):  # another model's section: that model's stages validate it
        raw = {k: v for k, v in raw.items() if k not in MODELS or k in models}
    params = _build(params_type(models), raw, prefix="", known=MODELS)
    _check_values(params, models)
    return params


def params_dict(obj: Any) -> Any:
    """The params (or one section) as plain dicts/lists, e.g. for hashing or JSON."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def check_key(dotted: str) -> None:
    """Raise ConfigError, as for params.yaml, unless `dotted` (e.g. 'vit.depth') names a param."""
    cls, prefix = params_type(), ""
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


def _build(cls: type, raw: Any, prefix: str, known: list[str] = ()) -> Any:
    """`cls` from the mapping `raw`; `known`: more keys that may stand there (the other models' sections)."""
    if raw is None:  # a section with every key commented out: its defaults
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'params.yaml'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            _unknown_key(str(key), [*names, *(k for k in known if k not in names)], prefix)
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
    if origin is typing.Union:  # Optional[X]: null, or an X
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return None if value is None else _coerce(key, value, inner)
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


def _check_values(p: Any, models: tuple[str, ...]) -> None:
    """Range and cross-field checks that types alone cannot express."""
    d, e, vis = p.data, p.evaluate, p.visualize
    size = d.image_size
    require(p.seed >= 0, "seed", p.seed, "use an integer >= 0")
    require(d.source.strip() != "", "data.source", d.source, "use 'download' or a path to the data")
    require(8 <= d.image_size <= 1024, "data.image_size", d.image_size, "use a side of 8..1024 pixels")
    for key in ("val_size", "test_size"):
        value = getattr(d, key)
        require(0 < value < 1 or (value >= 1 and float(value).is_integer()), f"data.{key}", value,
                "use a count of images (an integer >= 1) or a fraction in (0, 1)")
    require(d.subset >= 0, "data.subset", d.subset, "use 0 (all training images) or a positive count")
    require(d.split_seed >= 0, "data.split_seed", d.split_seed, "use an integer >= 0")
    require(p.train.eval_batch_size >= 1, "train.eval_batch_size", p.train.eval_batch_size, "use an integer >= 1")
    require(p.train.device_memory_gb >= 0, "train.device_memory_gb", p.train.device_memory_gb,
            "use 0 (auto: half the GPU's free memory) or a number of GB")
    _check_recipe(p.train, lambda k: f"train.{k}", size)
    for name in models:
        section = getattr(p, name)
        section.check(name, size)
        _check_recipe(recipe_for(p, name), recipe_key(p, name), size)
    require(e.batch_size >= 1, "evaluate.batch_size", e.batch_size, "use an integer >= 1")
    require(e.throughput_batches >= 1, "evaluate.throughput_batches", e.throughput_batches, "use an integer >= 1")
    require(e.latency_runs >= 1, "evaluate.latency_runs", e.latency_runs, "use an integer >= 1")
    _check_robustness(p.robustness, size)
    require(vis.num_images >= 1, "visualize.num_images", vis.num_images, "use an integer >= 1")
    require(vis.feature_channels >= 1, "visualize.feature_channels", vis.feature_channels, "use an integer >= 1")
    require(vis.mistakes >= 1, "visualize.mistakes", vis.mistakes, "use an integer >= 1")
    require(vis.dpi >= 30, "visualize.dpi", vis.dpi, "use an integer >= 30")


def _check_robustness(r: RobustnessConfig, size: int) -> None:
    require(r.subset >= 0, "robustness.subset", r.subset, "use 0 (the whole test split) or a count of test images")
    unknown = [c for c in r.corruptions if c not in CORRUPTION_NAMES]
    require(not unknown, "robustness.corruptions", unknown[0] if unknown else None,
            f"use any of {', '.join(CORRUPTION_NAMES)}")
    bad = [s for s in r.severities if not 1 <= s <= 5]
    require(not bad, "robustness.severities", bad[0] if bad else None, "use severities 1..5")
    bad = [f for f in r.occlusion_fractions if not 0 <= f < 1]
    require(not bad, "robustness.occlusion_fractions", bad[0] if bad else None, "use fractions in [0, 1)")
    require(r.occlusion_patch >= 1 and size % r.occlusion_patch == 0, "robustness.occlusion_patch",
            r.occlusion_patch, f"the image size {size} (data.image_size) must be divisible by it")
    require(r.calibration_bins >= 1, "robustness.calibration_bins", r.calibration_bins, "use an integer >= 1")
    require(r.batch_size >= 1, "robustness.batch_size", r.batch_size, "use an integer >= 1")


def _check_recipe(r: Recipe, key: typing.Callable[[str], str], size: int) -> None:
    """A recipe's values for images of `size` pixels; `key` names where each came from (train.lr, or vit.recipe.lr)."""
    require(r.epochs >= 1, key("epochs"), r.epochs, "use an integer >= 1")
    require(r.batch_size >= 1, key("batch_size"), r.batch_size, "use an integer >= 1")
    require(r.lr > 0, key("lr"), r.lr, "use a number > 0")
    require(0 <= r.momentum < 1, key("momentum"), r.momentum, "use a number in [0, 1)")
    require(r.optimizer != "sgd" or r.momentum > 0, key("momentum"), r.momentum,
            "Nesterov momentum (optimizer: sgd) needs a momentum > 0, e.g. 0.9")
    require(r.weight_decay >= 0, key("weight_decay"), r.weight_decay, "use a number >= 0")
    require(0 <= r.warmup < 1, key("warmup"), r.warmup,
            "use a fraction of the run in [0, 1): a warmup cannot be as long as the run")
    require(r.grad_clip >= 0, key("grad_clip"), r.grad_clip, "use a number > 0 (the largest gradient norm) or 0 (off)")
    require(0 <= r.label_smoothing < 1, key("label_smoothing"), r.label_smoothing, "use a number in [0, 1)")
    require(r.ema == 0 or 0 < r.ema < 1, key("ema"), r.ema, "use 0 (off) or a decay in (0, 1), e.g. 0.999")
    require(0 <= r.crop_padding <= size, key("crop_padding"), r.crop_padding,
            f"use 0..{size} pixels (data.image_size is {size})")
    require(r.augment_ops >= 0, key("augment_ops"), r.augment_ops, "use an integer >= 0 (ops per image)")
    require(0 <= r.augment_magnitude < BINS, key("augment_magnitude"), r.augment_magnitude,
            f"use a magnitude bin 0..{BINS - 1}")
    require(0 <= r.cutout <= size, key("cutout"), r.cutout, f"use 0 (off) .. {size} pixels (data.image_size)")
    for name in ("erasing", "mix_prob"):
        require(0 <= getattr(r, name) <= 1, key(name), getattr(r, name), "use a probability in [0, 1]")
    for name in ("mixup", "cutmix"):
        require(getattr(r, name) >= 0, key(name), getattr(r, name), "use 0 (off) or a Beta alpha > 0, e.g. 0.8")
    require(not r.alternate_flip or r.flip, key("alternate_flip"), r.alternate_flip, "it alternates flips: set flip: true")
    require(r.whiten >= 0, key("whiten"), r.whiten, "use 0 (off) or the first conv's kernel size, e.g. 2")
    require(r.bn_bias_lr > 0, key("bn_bias_lr"), r.bn_bias_lr, "use a multiplier > 0 (1 = as the other parameters)")
    require(0 <= r.bn_momentum < 1, key("bn_momentum"), r.bn_momentum, "use 0 (the model's own) or a number in (0, 1)")
    require(r.lookahead >= 0, key("lookahead"), r.lookahead, "use 0 (off) or a number of steps, e.g. 5")
    require(not (r.lookahead and r.ema), key("lookahead"), r.lookahead,
            "lookahead and an EMA both average the weights: set one of lookahead and ema to 0")
