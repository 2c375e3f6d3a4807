"""One training loop for every model: AdamW, a per-epoch schedule, validation each epoch.

The recipe at the default params is the seed's: AdamW (lr 3e-4, weight decay 0.05 on
every parameter), cosine annealing stepped once per epoch, random crop + flip. What
the seed got wrong is not kept: the epoch whose weights are kept is chosen on the
validation split (held out of train), never on test.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from vitcnn.config import TrainConfig
from vitcnn.data import BatchLoader, Split
from vitcnn.errors import UserError
from vitcnn.runtime import autocast, maybe_compile, predict, resolve_precision

log = logging.getLogger(__name__)
PROGRESS_EVERY = 20  # steps between progress-bar refreshes (each reads the running loss once)


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss): stop without writing results."""


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """Learning rate for a 0-based epoch: cosine from lr towards 0 over the run, or constant."""
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


@dataclass
class FitResult:
    history: list[dict]  # one row per epoch
    best_epoch: int  # 1-based epoch whose weights `state` holds
    state: dict[str, torch.Tensor]
    precision: str
    train_time_s: float


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
) -> FitResult:
    """Train `model` in place and return the per-epoch history and the selected weights."""
    generator = torch.Generator(device=device).manual_seed(seed)
    train_loader = BatchLoader(train, cfg.batch_size, device, mean, std, shuffle=True,
                               crop_padding=cfg.crop_padding, flip=cfg.flip, generator=generator)
    val_loader = BatchLoader(val, cfg.eval_batch_size, device, mean, std)
    dtype = resolve_precision(cfg.precision, device)
    model.to(device, memory_format=torch.channels_last)  # faster convolutions; no effect on linear layers
    optimizer = make_optimizer(model, cfg)
    step_model = maybe_compile(model, cfg.compile, device)

    history: list[dict] = []
    best_epoch, best_acc, best_state = 0, -1.0, None
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        lr = lr_at(epoch - 1, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        train_loss, train_acc = _train_epoch(step_model, optimizer, train_loader, dtype, epoch, cfg.epochs, name)
        epoch_s = time.perf_counter() - t0
        val_loss, val_acc = _validate(step_model, val_loader, dtype)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "epoch_time_s": round(epoch_s, 3),
            "images_per_s": round(len(train) / epoch_s, 1),
        }
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if cfg.select == "last" or val_acc > best_acc:
            best_epoch, best_acc = epoch, val_acc
            best_state = copy.deepcopy(model.state_dict())
    return FitResult(history, best_epoch, best_state, str(dtype).removeprefix("torch."), time.perf_counter() - start)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns the batch's mean loss and its count of correct predictions,
    both still on the device (reading them is the caller's choice of when to sync)."""
    with autocast(x.device, dtype):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)  # loss in fp32 whatever the compute dtype
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


def _train_epoch(model, optimizer, loader: BatchLoader, dtype, epoch: int, epochs: int, name: str):
    """One pass over the shuffled, augmented train split; returns (mean loss, accuracy)."""
    model.train()
    device = loader.device
    loss_sum = torch.zeros((), device=device)  # accumulated on the device: no sync per step
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(total=len(loader), desc=f"{name} epoch {epoch}/{epochs}", unit="batch", leave=False)
    for step, (x, y) in enumerate(loader, start=1):
        loss, hits = train_step(model, optimizer, x, y, dtype)
        loss_sum += loss * len(y)
        correct += hits
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        seen += len(y)
        if step % PROGRESS_EVERY == 0 or step == len(loader):
            _check_finite(first_bad, epoch)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", refresh=False)
            bar.update(step - bar.n)
    bar.close()
    return loss_sum.item() / seen, correct.item() / seen


def _check_finite(first_bad: torch.Tensor, epoch: int) -> None:
    step = int(first_bad.item())
    if step >= 0:
        raise TrainingError(
            f"training loss is not finite at epoch {epoch}, step {step}; "
            "lower train.lr or set train.precision: fp32"
        )


def _validate(model, loader: BatchLoader, dtype) -> tuple[float, float]:
    logits = predict(model, loader, dtype)
    loss = F.cross_entropy(logits, loader.labels).item()
    acc = (logits.argmax(1) == loader.labels).float().mean().item()
    return loss, acc
