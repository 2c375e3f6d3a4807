"""One training loop for every model and recipe, and validation each epoch.

At the default params the recipe is the original program's: AdamW (lr 3e-4, weight decay
0.05 on every parameter), cosine annealing stepped once per epoch, random crop + flip.
A model's own recipe (`<model>.recipe`) can change the optimizer (SGD with Nesterov
momentum), the schedule (stepped per batch, linear warmup, one-cycle), weight decay on
matrices only, gradient clipping, label smoothing and an EMA of the weights. What the
original program got wrong is not kept: the epoch whose weights are kept is chosen on the
validation split (held out of train), never on test.

Every part of a training step runs on the device without reading a value back (no host
sync, no Python branch on a tensor's value): the schedule is a pure function of the step
number, clipping scales on the device, the EMA is three fused foreach operations. So one
function (`TrainSteps.step`: the epoch's next batch, crop + flip + augmentation, forward,
loss, backward, optimizer update, EMA and the epoch's running totals) is the whole step,
and on CUDA it is captured once as a CUDA graph and replayed (`train.cuda_graphs`);
elsewhere it is called as it is. The learning rate and the EMA's weight are set between
steps.

The file reads in the order a run does: the schedule and the optimizer, one step, the
steps of an epoch, setting a run up (`setup`, which the benchmarks call too), and the run
itself (`fit`: epochs, validation, selection, checkpoints).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from vitcnn.augment import Augment, Mix, Mixed
from vitcnn.checkpoint import Checkpoint, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from vitcnn.config import Recipe, TrainConfig
from vitcnn.data import BatchLoader, Split
from vitcnn.errors import ConfigError, UserError
from vitcnn.runtime import CudaGraphStep, autocast, maybe_compile, predict, resolve_precision, use_cuda_graphs

log = logging.getLogger(__name__)
PROGRESS_EVERY = 20  # steps between progress-bar refreshes (each reads the running loss once)


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss): stop without writing results."""


# --- the schedule and the optimizer -----------------------------------------------------------------


def lr_at(step: int, steps_per_epoch: int, cfg: Recipe) -> float:
    """The learning rate of 0-based optimizer step `step`.

    The schedule counts in units of one batch (`lr_step: batch`) or one epoch (`epoch`, the
    original program's: every step of an epoch takes the epoch's rate). Linear warmup from
    0 over the first `warmup` fraction of the units (reaching `lr` at its last one), then
    cosine or linear decay towards 0 over the rest of the run, or constant.
    """
    unit, units = (step, cfg.epochs * steps_per_epoch) if cfg.lr_step == "batch" else (step // steps_per_epoch, cfg.epochs)
    warmup = round(cfg.warmup * units)
    if unit < warmup:
        return cfg.lr * (unit + 1) / warmup
    progress = (unit - warmup) / (units - warmup)  # 0 at the first unit after warmup
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr


def param_groups(model: nn.Module, cfg: Recipe) -> list[dict[str, Any]]:
    """The trained parameters in groups: weight decay on every parameter (`decay: all`), or only on weight
    matrices (`matrices`: not on norms, biases, or what the model names in `no_weight_decay()`, its
    embeddings). With `bn_bias_lr` != 1, batch norm's biases form a group of their own whose learning rate
    is that many times the others' (`lr_scale`) and whose weight decay is divided by it, so that they decay
    as much per step as they would otherwise (airbench's bias scaler)."""
    skip = model.no_weight_decay()
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.bias is not None} if cfg.bn_bias_lr != 1 else set()
    decayed, kept, scaled = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen (a whitening layer's filters, airbench's batch-norm scales)
        if id(p) in bn_biases:
            scaled.append(p)
        elif cfg.decay == "all" or (p.ndim >= 2 and name not in skip):
            decayed.append(p)
        else:
            kept.append(p)
    groups = [{"params": decayed, "weight_decay": cfg.weight_decay}]
    if kept or cfg.decay == "matrices":
        groups.append({"params": kept, "weight_decay": 0.0})
    if scaled:
        decay = cfg.weight_decay if cfg.decay == "all" else 0.0
        groups.append({"params": scaled, "weight_decay": decay / cfg.bn_bias_lr, "lr_scale": cfg.bn_bias_lr})
    return groups


def make_optimizer(model: nn.Module, cfg: Recipe, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum; on CPU and CUDA their fused kernels (one pass over all
    parameters: 4x faster than the per-tensor loop on CPU) compute the same update. `capturable`:
    AdamW may be recorded in a CUDA graph (SGD keeps no step count and always may)."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda") or None
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused, capturable=capturable)


IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how an optimizer runs, not what it does


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping how this run's optimizer runs: a checkpoint may
    come from another machine (begun on a CPU, resumed on a GPU with graphs), and torch's loader
    would bring back the saved run's `fused`/`capturable` flags (a CUDA graph then refuses the
    optimizer) and leave each step count where the saved run kept it."""
    kept = [{k: g[k] for k in IMPLEMENTATION_FLAGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, kept):
        group.update(flags)
        on_device = group.get("fused") or group.get("capturable")  # torch's rule for where `step` lives
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(p.device if on_device else "cpu", torch.float32)


# --- one step --------------------------------------------------------------------------------------------


def _loss(logits: torch.Tensor, y: torch.Tensor | Mixed, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy; for a mixed batch, each image's lam-weighted loss of its two labels (with
    label smoothing, each of the two is smoothed)."""
    if not isinstance(y, Mixed):
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    per_image = (y.lam * F.cross_entropy(logits, y.a, reduction="none", label_smoothing=label_smoothing)
                 + (1 - y.lam) * F.cross_entropy(logits, y.b, reduction="none", label_smoothing=label_smoothing))
    return per_image.mean()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor | Mixed,
               dtype: torch.dtype, cfg: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns the batch's mean loss and its count of correct predictions
    (for a mixed batch: of its dominant labels), both still on the device (reading them is the
    caller's choice of when to sync).

    Gradients are zeroed in place, not freed: the steps of a run keep one set of gradient tensors,
    which a CUDA graph records and an eager step (the epoch's last, smaller batch) then reuses.
    """
    with autocast(x.device, dtype):
        logits = model(x)
    loss = _loss(logits.float(), y, cfg.label_smoothing)  # in fp32 whatever the compute dtype
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip, foreach=True)
    optimizer.step()
    labels = y.dominant if isinstance(y, Mixed) else y
    return loss.detach(), (logits.argmax(1) == labels).sum()


class EMA:
    """An exponential moving average of a model's weights and float buffers (batch-norm statistics).

    Updated after every optimizer step on the device: average += weight * (live - average), as three
    foreach operations whose weight is one 0-d device tensor (each a single fused kernel on CUDA;
    `_foreach_lerp_` with a tensor weight per parameter is not). The decay rises as
    min(decay, (1 + t) / (10 + t)) over the first updates t, so the average does not start out
    dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.updates = decay, 0
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))  # (average, live)
        self._averaged = [a for a, _ in pairs if a.is_floating_point()]
        self._live = [m for a, m in pairs if a.is_floating_point()]
        self._counters = [(a, m) for a, m in pairs if not a.is_floating_point()]  # copied, not averaged
        # 1 - decay of the next update, on the device: a replayed CUDA graph reads each update's own value
        self.weight = torch.zeros((), device=self._averaged[0].device)

    def advance(self) -> None:
        """Count the next update and set its weight (between steps, outside a captured graph)."""
        self.updates += 1
        self.weight.fill_(1 - min(self.decay, (1 + self.updates) / (10 + self.updates)))

    @torch.no_grad()
    def apply(self) -> None:
        """Move the average towards the live weights by `weight` (part of the step)."""
        deltas = torch._foreach_sub(self._live, self._averaged)
        torch._foreach_mul_(deltas, self.weight)
        torch._foreach_add_(self._averaged, deltas)
        for average, live in self._counters:
            average.copy_(live)

    def update(self) -> None:
        self.advance()
        self.apply()


class Lookahead:
    """airbench's lookahead: every `every` steps a slow copy of the weights (and batch-norm statistics) moves
    towards the live ones by 1 - decay, and the live ones are set to it. The decay grows over the run as
    0.95**5 * (t / T)**3 (t: steps done, T: all the run's steps), so the slow copy follows the live weights
    closely at first and averages more at the end; after the last step the live weights are the slow ones."""

    def __init__(self, model: nn.Module, every: int, total_steps: int):
        self.every, self.total = every, total_steps
        self._live = [v for v in model.state_dict().values() if v.is_floating_point()]
        self._slow = [v.detach().clone() for v in self._live]

    @torch.no_grad()
    def after(self, steps_done: int) -> None:
        """Called after each step with the run's steps done so far."""
        if steps_done == self.total:
            decay = 1.0  # the last step: the live weights become the slow ones
        elif steps_done % self.every == 0:
            decay = 0.95**5 * (steps_done / self.total) ** 3
        else:
            return
        torch._foreach_lerp_(self._slow, self._live, 1 - decay)
        torch._foreach_copy_(self._live, self._slow)


class TrainSteps:
    """The steps of a training run, epoch by epoch: `step` is the whole of one step, on the device.

    `step` takes the epoch's next batch from the epoch's order, trains on it and adds its
    loss, hits and a non-finite check to the epoch's totals, all in tensors of fixed address
    and without reading a value back. So on CUDA it is recorded once as a CUDA graph
    (`runtime.CudaGraphStep`) and replayed for every full batch; elsewhere, and for the
    epoch's last, smaller batch (45,000 % 128 = 72 images at the defaults), it is called as
    it is. Between steps the host sets the learning rate (in a device tensor the optimizer
    reads, when graphed) and the EMA's weight.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: BatchLoader, dtype: torch.dtype,
                 cfg: Recipe, ema: EMA | None, graphs: bool, name: str = "model"):
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.dtype, self.cfg, self.ema = dtype, cfg, ema
        device, n = loader.device, len(loader.labels)
        self.order = torch.zeros(n, dtype=torch.long, device=loader.index_device)  # (N,) the epoch's permutation
        self.done = 0  # with the images in host memory: the epoch's batches done so far, counted on the host
        self.batch = torch.zeros((), dtype=torch.long, device=device)  # batches of the epoch done so far
        self.loss_sum = torch.zeros((), device=device)  # sum of per-image losses over the epoch so far
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
        self.full_batches, self.tail = divmod(n, loader.batch_size)
        self.lr_on_device = False  # whether the optimizer reads its learning rates from device tensors (graphed)
        self.lookahead = Lookahead(model, cfg.lookahead, cfg.epochs * len(loader)) if cfg.lookahead else None
        self.full_step: Callable[[], None] = lambda: self.step(loader.batch_size)
        self.graph: CudaGraphStep | None = None
        if graphs:  # the learning rates as device tensors the optimizer reads: set between replays
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(cfg.lr * group.get("lr_scale", 1.0), device=device)
            self.lr_on_device = True
            self.graph = CudaGraphStep(self.full_step, [loader.generator], name)
            self.full_step = self.graph

    @property
    def capture_s(self) -> float:
        return self.graph.capture_s if self.graph else 0.0

    @property
    def graphed(self) -> bool:
        return self.graph is not None and self.graph.graph is not None

    def epoch(self, first_step: int) -> Iterator[tuple[int, int]]:
        """Run one epoch's steps (`first_step`: the run's step count before it), yielding after each
        the 1-based step and the images trained on so far."""
        self.order.copy_(self.loader.permutation())
        self.done = 0
        self.batch.zero_()
        self.loss_sum.zero_()
        self.correct.zero_()
        self.first_bad.fill_(-1)
        batches, n = len(self.loader), len(self.loader.labels)
        for step in range(batches):
            lr = lr_at(first_step + step, batches, self.cfg)
            for group in self.optimizer.param_groups:
                scaled = lr * group.get("lr_scale", 1.0)
                if self.lr_on_device:
                    group["lr"].fill_(scaled)
                else:
                    group["lr"] = scaled
            if self.ema:
                self.ema.advance()
            if step < self.full_batches:
                self.full_step()
            else:
                self.step(self.tail)
            if self.lookahead:  # between steps (every k of them), outside a captured graph
                self.lookahead.after(first_step + step + 1)
            yield step + 1, min((step + 1) * self.loader.batch_size, n)

    def step(self, batch_size: int) -> None:
        """Train on the epoch's next `batch_size` images and add them to the epoch's totals."""
        if self.loader.on_host:  # the indexes where the images are: a host step, never a graph's
            idx = self.order[self.done * self.loader.batch_size:][:batch_size]  # (B,)
            self.done += 1
        else:
            start = self.batch * self.loader.batch_size  # () on the device
            idx = self.order[start + torch.arange(batch_size, device=self.order.device)]  # (B,)
        x, y = self.loader.batch(idx)
        loss, hits = train_step(self.model, self.optimizer, x, y, self.dtype, self.cfg)
        if self.ema:
            self.ema.apply()
        self.batch += 1
        self.loss_sum += loss * batch_size
        self.correct += hits
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~torch.isfinite(loss), self.batch, self.first_bad))


# --- setting a run up ----------------------------------------------------------------------------------


def augmentation(cfg: Recipe) -> Augment | None:
    """The recipe's per-image augmentation after crop + flip, or None."""
    augment = Augment(cfg.augment, cfg.augment_ops, cfg.augment_magnitude, cfg.cutout, cfg.erasing)
    return augment if augment.active else None


def mixing(cfg: Recipe, device: torch.device) -> Mix | None:
    """The recipe's mixup / cutmix, or None."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    return Mix(cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.mix_per, device)


WHITENING_IMAGES = 5000  # training images whose patches the whitening layer is fitted to (airbench's number)
WHITENING_EPS = 5e-4  # added to the patch covariance's eigenvalues before dividing by their roots (airbench's)


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def check_recipe_fits(model: nn.Module, cfg: Recipe, key: Callable[[str], str]) -> None:
    """The recipe's airbench options fit this model, else one line naming the key (`key(name)`: where it is
    set, train.<name> or <model>.recipe.<name>) and what the model has."""
    if cfg.bn_bias_lr != 1 or cfg.bn_momentum:
        name = "bn_bias_lr" if cfg.bn_bias_lr != 1 else "bn_momentum"
        if not batch_norms(model):
            raise ConfigError(f"{key(name)}: {getattr(cfg, name)} is not allowed; this model has no batch norm")
    if cfg.whiten:
        conv = first_conv(model)
        wanted = 2 * 3 * cfg.whiten**2
        if conv is None or conv.kernel_size != (cfg.whiten, cfg.whiten) or conv.out_channels != wanted \
                or conv.in_channels != 3 or conv.groups != 1:
            shape = "no convolution" if conv is None else (f"a first conv of {conv.in_channels} -> {conv.out_channels} "
                                                          f"channels, {conv.kernel_size[0]}x{conv.kernel_size[1]}")
            raise ConfigError(f"{key('whiten')}: {cfg.whiten} is not allowed; whitening {cfg.whiten}x{cfg.whiten} "
                              f"patches needs a first conv of 3 -> {wanted} channels, {cfg.whiten}x{cfg.whiten}; this "
                              f"model has {shape}")
    if cfg.dirac and not any(isinstance(m, nn.Conv2d) and m.out_channels >= m.in_channels for m in model.modules()):
        raise ConfigError(f"{key('dirac')}: true is not allowed; this model has no convolution to start as an identity")


@torch.no_grad()
def dirac_init(model: nn.Module) -> None:
    """Each conv's first in-channels filters pass their input through (airbench's identity start); the
    others keep their initialisation."""
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.out_channels >= conv.in_channels:
            nn.init.dirac_(conv.weight[: conv.in_channels])


@torch.no_grad()
def whitening_init(conv: nn.Conv2d, images: torch.Tensor, eps: float = WHITENING_EPS) -> None:
    """Set `conv`'s filters to whiten the k x k patches of `images` (B, 3, H, W), normalised: the eigenvectors
    of the patches' covariance divided by the roots of their eigenvalues, and their negatives (airbench's
    initialisation); the filters are then frozen (only the bias learns)."""
    k = conv.kernel_size[0]
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)
    covariance = patches.T @ patches / len(patches)  # (3kk, 3kk)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    filters = (eigenvectors.T / (eigenvalues + eps).sqrt()[:, None]).flip(0).float().view(-1, 3, k, k)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
    conv.weight.requires_grad_(False)


def start_from(model: nn.Module, cfg: Recipe, train: Split, mean: list[float], std: list[float]) -> None:
    """The recipe's initialisation and batch-norm settings: dirac, whitening, batch-norm momentum."""
    if cfg.dirac:
        dirac_init(model)
    if cfg.whiten:
        device = next(model.parameters()).device
        sample = Split(train.images[:WHITENING_IMAGES], train.labels[:WHITENING_IMAGES])
        x = next(iter(BatchLoader(sample, len(sample), device, mean, std)))[0]  # normalised as training does
        whitening_init(first_conv(model), x)
    if cfg.bn_momentum:
        for norm in batch_norms(model):
            norm.momentum = cfg.bn_momentum


@dataclass
class Training:
    """Everything a run of recipe `cfg` trains with, set up once (`setup`); the benchmarks time its steps."""

    model: nn.Module  # the live weights, on the device
    optimizer: torch.optim.Optimizer
    loader: BatchLoader  # the train split: shuffled, augmented
    val_loader: BatchLoader
    dtype: torch.dtype  # the autocast precision
    ema: EMA | None
    steps: TrainSteps
    generator: torch.Generator  # the loader's: order, crops, flips, augmentation, mixing
    setup_s: float  # compiling (the trial steps), part of training's cost, outside the epochs' speeds

    @property
    def selected(self) -> nn.Module:
        """The weights validated, selected and saved: the EMA's when there is one."""
        return self.ema.model if self.ema else self.model


def setup(model: nn.Module, train: Split, val: Split, cfg: TrainConfig, mean: list[float], std: list[float],
          device: torch.device, seed: int, name: str = "model", checkpoint: Checkpoint | None = None) -> Training:
    """Set up training `model` on `train` with recipe `cfg`: loaders, precision, optimizer, EMA, compilation
    and the step function (replayed as a CUDA graph on CUDA). A `checkpoint` is loaded before the step
    function exists, so that a graph records the resumed state."""
    generator = torch.Generator(device=device).manual_seed(seed)
    loader = BatchLoader(train, cfg.batch_size, device, mean, std, shuffle=True, crop_padding=cfg.crop_padding,
                         flip=cfg.flip, generator=generator, augment=augmentation(cfg), mix=mixing(cfg, device),
                         memory_gb=cfg.device_memory_gb, alternate_flip=cfg.alternate_flip)
    val_loader = BatchLoader(val, cfg.eval_batch_size, device, mean, std, memory_gb=cfg.device_memory_gb)
    dtype = resolve_precision(cfg.precision, device)
    model.to(device, memory_format=torch.channels_last)  # faster convolutions; no effect on linear layers
    start_from(model, cfg, train, mean, std)  # before the optimizer: a frozen layer is left out of it
    graphs = use_cuda_graphs(cfg.cuda_graphs, device)
    if graphs and loader.on_host:
        log.info("%s: the training images are in host memory; each step gathers there, so no CUDA graph", name)
        graphs = False
    optimizer = make_optimizer(model, cfg, capturable=graphs)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    start = time.perf_counter()
    step_model = maybe_compile(model, cfg.compile, device, loader.examples(), dtype)
    setup_s = time.perf_counter() - start
    if checkpoint:
        model.load_state_dict(checkpoint.model)
        load_optimizer_state(optimizer, checkpoint.optimizer)
        if ema:
            ema.model.load_state_dict(checkpoint.ema)
            ema.updates = checkpoint.run["ema_updates"]
        restore_rng_states(checkpoint.rng, generator)
    steps = TrainSteps(step_model, optimizer, loader, dtype, cfg, ema, graphs, name)
    return Training(model, optimizer, loader, val_loader, dtype, ema, steps, generator, setup_s)


# --- the run: epochs, validation, selection, checkpoints -------------------------------------------------


@dataclass
class RunState:
    """What a training run has done so far; also what its resume checkpoint holds."""

    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0  # 1-based epoch whose weights best_state holds
    best_acc: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    train_time_s: float = 0.0
    ema_updates: int = 0


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    state: dict[str, torch.Tensor]  # the selected weights (the EMA's when on)
    precision: str
    train_time_s: float
    resumed_from: int  # epochs taken from a checkpoint (0 = a fresh run)
    setup_time_s: float  # compilation and CUDA graph capture (in train_time_s, not in the epochs' speeds)
    cuda_graphs: bool  # whether the steps ran as a replayed CUDA graph


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int,
    name: str = "model",
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: Path | None = None,
    fingerprint: str = "",
) -> FitResult:
    """Train `model` in place with recipe `cfg`; return the per-epoch history and the selected weights.

    With `checkpoint`, the state is saved there after every epoch, and a run whose
    checkpoint has the same `fingerprint` (params and data) goes on from it, ending
    with exactly the weights an uninterrupted run would have (on CPU).
    """
    saved = _resume(checkpoint, fingerprint, name, cfg.epochs)
    run = RunState(**saved.run) if saved else RunState()
    training = setup(model, train, val, cfg, mean, std, device, seed, name, saved)
    resumed_from = len(run.history)
    run.train_time_s += training.setup_s  # compiling is part of what training costs (epoch speeds leave it out)
    steps = training.steps
    for epoch in range(resumed_from + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        capture_s = steps.capture_s
        train_loss, train_acc = _train_epoch(steps, (epoch - 1) * len(training.loader), epoch, name)
        train_s = time.perf_counter() - t0 - (steps.capture_s - capture_s)  # the epoch's steps, not the capture
        val_loss, val_acc = _validate(training.ema.model if training.ema else steps.model, training.val_loader,
                                      training.dtype)
        row = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "train_acc": round(train_acc, 6),
            "val_loss": round(val_loss, 6),
            "val_acc": round(val_acc, 6),
            "lr": lr_at((epoch - 1) * len(training.loader), len(training.loader), cfg),
            "epoch_time_s": round(train_s, 3),
            "images_per_s": round(len(train) / train_s, 1),
        }
        run.history.append(row)
        run.train_time_s += time.perf_counter() - t0
        if cfg.select == "last" or val_acc > run.best_acc:
            run.best_epoch, run.best_acc = epoch, val_acc
            run.best_state = copy.deepcopy(training.selected.state_dict())
        run.ema_updates = training.ema.updates if training.ema else 0
        if checkpoint:
            save_checkpoint(checkpoint, Checkpoint(
                fingerprint, model.state_dict(), training.optimizer.state_dict(),
                training.ema.model.state_dict() if training.ema else {}, rng_states(training.generator),
                dataclasses.asdict(run)))
        if on_epoch:
            on_epoch(row)
    return FitResult(run.history, run.best_epoch, run.best_state, str(training.dtype).removeprefix("torch."),
                     run.train_time_s, resumed_from, training.setup_s + steps.capture_s, steps.graphed)


def _resume(checkpoint: Path | None, fingerprint: str, name: str, epochs: int) -> Checkpoint | None:
    """The checkpoint to go on from, if `checkpoint` holds one of this run; says which in one line."""
    saved = load_checkpoint(checkpoint, fingerprint) if checkpoint else None
    if saved:
        log.info("resuming %s from epoch %d of %d (%s)", name, len(saved.run["history"]), epochs, checkpoint)
    elif checkpoint:
        log.info("starting %s fresh", name)
    return saved


def _train_epoch(steps: TrainSteps, first_step: int, epoch: int, name: str) -> tuple[float, float]:
    """One pass over the shuffled, augmented train split; returns (mean loss, accuracy)."""
    steps.model.train()
    batches, n = len(steps.loader), len(steps.loader.labels)
    # As a context manager the bar is cleared on an error or Ctrl-C too, so messages start on a clean line.
    with tqdm(total=batches, desc=f"{name} epoch {epoch}/{steps.cfg.epochs}", unit="batch", leave=False) as bar:
        for step, seen in steps.epoch(first_step):
            if step % PROGRESS_EVERY == 0 or step == batches:  # the only reads of a value: one per refresh
                _check_finite(steps.first_bad, epoch, name)
                bar.set_postfix(loss=f"{steps.loss_sum.item() / seen:.3f}", refresh=False)
                bar.update(step - bar.n)
    return steps.loss_sum.item() / n, steps.correct.item() / n


def _check_finite(first_bad: torch.Tensor, epoch: int, name: str) -> None:
    step = int(first_bad.item())
    if step >= 0:
        raise TrainingError(
            f"training loss is not finite at epoch {epoch}, step {step}; "
            f"lower the learning rate (train.lr, or {name}.recipe.lr) or set train.precision: fp32"
        )


def _validate(model, loader: BatchLoader, dtype) -> tuple[float, float]:
    logits = predict(model, loader, dtype)
    loss = F.cross_entropy(logits, loader.labels).item()
    acc = (logits.argmax(1) == loader.labels).float().mean().item()
    return loss, acc
