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
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from vitcnn.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
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
    resumed_from: int  # epochs taken from a checkpoint (0 = a fresh run)


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
    """Train `model` in place and return the per-epoch history and the selected weights.

    With `checkpoint`, the state is saved there after every epoch, and a run whose
    checkpoint has the same `fingerprint` (params and data) goes on from it, ending
    with exactly the weights an uninterrupted run would have (on CPU).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    train_loader = BatchLoader(train, cfg.batch_size, device, mean, std, shuffle=True,
                               crop_padding=cfg.crop_padding, flip=cfg.flip, generator=generator)
    val_loader = BatchLoader(val, cfg.eval_batch_size, device, mean, std)
    dtype = resolve_precision(cfg.precision, device)
    model.to(device, memory_format=torch.channels_last)  # faster convolutions; no effect on linear layers
    optimizer = make_optimizer(model, cfg)
    compile_start = time.perf_counter()
    step_model = maybe_compile(model, cfg.compile, device, train_loader.example(), dtype)
    compile_s = time.perf_counter() - compile_start

    run = {"history": [], "best_epoch": 0, "best_acc": -1.0, "best_state": None, "train_time_s": 0.0}
    saved = load_checkpoint(checkpoint, fingerprint) if checkpoint else None
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        restore_rng_states(saved["rng"], generator)
        run = saved["run"]
        log.info("resuming %s from epoch %d of %d (%s)", name, len(run["history"]), cfg.epochs, checkpoint)
    elif checkpoint:
        log.info("starting %s fresh", name)
    resumed_from = len(run["history"])
    run["train_time_s"] += compile_s  # compiling is part of what training costs (epoch speeds leave it out)

    for epoch in range(resumed_from + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = lr_at(epoch - 1, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loss, train_acc = _train_epoch(step_model, optimizer, train_loader, dtype, epoch, cfg.epochs, name)
        train_s = time.perf_counter() - t0
        val_loss, val_acc = _validate(step_model, val_loader, dtype)
        row = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "train_acc": round(train_acc, 6),
            "val_loss": round(val_loss, 6),
            "val_acc": round(val_acc, 6),
            "lr": lr,
            "epoch_time_s": round(train_s, 3),
            "images_per_s": round(len(train) / train_s, 1),
        }
        run["history"].append(row)
        run["train_time_s"] += time.perf_counter() - t0
        if cfg.select == "last" or val_acc > run["best_acc"]:
            run["best_epoch"], run["best_acc"] = epoch, val_acc
            run["best_state"] = copy.deepcopy(model.state_dict())
        if checkpoint:
            save_checkpoint(checkpoint, {
                "fingerprint": fingerprint,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng_states(generator),
                "run": run,
            })
        if on_epoch:
            on_epoch(row)
    return FitResult(run["history"], run["best_epoch"], run["best_state"], str(dtype).removeprefix("torch."),
                     run["train_time_s"], resumed_from)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; on CPU and CUDA its fused kernel (one pass over all parameters: 4x faster than
    the per-tensor loop on CPU) computes the same update."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


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
    # As a context manager the bar is cleared on an error or Ctrl-C too, so messages start on a clean line.
    with tqdm(total=len(loader), desc=f"{name} epoch {epoch}/{epochs}", unit="batch", leave=False) as bar:
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
