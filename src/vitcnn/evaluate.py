"""Test-split evaluation, once per model: accuracy, per-class accuracy, FLOPs, speed."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitcnn.data import BatchLoader
from vitcnn.runtime import autocast, predict


def per_class_accuracy(predicted: torch.Tensor, actual: torch.Tensor, num_classes: int) -> list[float]:
    hits = torch.bincount(actual[predicted == actual], minlength=num_classes).double()
    totals = torch.bincount(actual, minlength=num_classes).double()
    return (hits / totals.clamp(min=1)).tolist()


def flops_per_image(model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """Forward FLOPs for one image, as torch.utils.flop_counter counts them (2 per multiply-add).

    Attention runs on SDPA's math backend here: the counter has no formula for the fused
    CPU kernel and would miss the attention products.
    """
    model.eval()
    x = torch.zeros(1, *image_shape, device=next(model.parameters()).device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _median_seconds(model: nn.Module, x: torch.Tensor, runs: int) -> float:
    """Median wall time of `runs` forwards of x, each waited for on the device."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x)
        _sync(x.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def inference_speed(model: nn.Module, loader: BatchLoader, dtype: torch.dtype, batches: int, latency_runs: int) -> dict:
    """Inference images/s (median over `batches` full batches) and batch-1 latency (median, ms)."""
    model.eval()
    x, _ = next(iter(loader))
    one = x[:1].contiguous(memory_format=torch.channels_last)
    with autocast(loader.device, dtype):
        _median_seconds(model, x, 1)  # warm-up: first calls allocate and pick kernels
        _median_seconds(model, one, 2)
        batch_s = _median_seconds(model, x, batches)
        latency_s = _median_seconds(model, one, latency_runs)
    return {
        "inference_images_per_s": round(len(x) / batch_s, 1),
        "latency_ms": round(1000 * latency_s, 3),
    }


def evaluate_model(model: nn.Module, loader: BatchLoader, dtype: torch.dtype, tta: str) -> dict:
    """Test loss, accuracy, per-class accuracy and predictions of a model over a loader (with test-time
    augmentation `tta`)."""
    logits = predict(model, loader, dtype, tta)
    predicted = logits.argmax(1)
    actual = loader.labels
    return {
        "test_loss": F.cross_entropy(logits, actual).item(),
        "test_acc": (predicted == actual).float().mean().item(),
        "per_class_acc": per_class_accuracy(predicted, actual, logits.shape[1]),
        "predicted": predicted.cpu(),
        "actual": actual.cpu(),
        "confidence": logits.softmax(1).max(1).values.cpu(),
    }
