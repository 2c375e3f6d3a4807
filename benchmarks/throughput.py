"""Training throughput of the pipeline's own training step, optionally against the naive way.

    python benchmarks/throughput.py --model vit|cnn|all [--steps N] [--repeats R] [--baseline] [--json]
    python benchmarks/throughput.py --recipe strong      # the models, recipes and augmentation of recipes/strong.yaml
    python benchmarks/throughput.py --cuda-graphs off --profile   # on CUDA: eager steps; how busy the GPU is

Measures training images/s (loader + forward + backward + optimizer step) at the
default params (the original program's models, batch 128), or at a named recipe's, on the
current device: warm-up steps, then the median of R timed windows of N steps each. The
training is set up by the training stage's own `train.setup` (every recipe key honoured,
normalisation included). When the
recipe augments (a policy, erasing, mixup/cutmix), it also reports what augmentation costs
per batch: the loader alone timed with and without it, alternating, medians of R windows. The engine runs set up as the
training stage runs (`keep_freed_memory`). With --baseline the naive way is measured in
the same run, window by window alternating with the engine so that both see the same
machine load, in a process of its own (so it keeps PyTorch's and the C library's
defaults, as a hand-written script would): the original program's own model classes (loaded
from ../shared/reference/seed_vit_vs_cnn.py when present; otherwise this project's models
with manual attention and PyTorch's dropout), a torchvision-style Dataset with PIL
transforms through a DataLoader with 2 workers, fp32, eager, and a `.item()` per step
as the original program does.

Data: data/prepared/ (train split and meta.json) when it exists, else random images of the
same shape (speed does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from vitcnn import paths
from vitcnn.config import TrainConfig, params_type, recipe_for
from vitcnn.data import FIXED_MEAN, FIXED_STD, BatchLoader, Split, channel_stats, load_meta, load_split, normalization
from vitcnn.models import MODELS
from vitcnn.models.store import build_model
from vitcnn.recipes import params_with
from vitcnn.runtime import CudaGraphStep, keep_freed_memory, resolve_device, use_deterministic
from vitcnn.train import setup

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_PROGRAM = ROOT.parent / "shared" / "reference" / "seed_vit_vs_cnn.py"
ORIGINAL_CLASSES = {"vit": "VisionTransformer", "cnn": "SimpleCNN"}  # the original program's models, by registry name


def load_images(n_random: int = 10000, size: int | None = None) -> tuple[Split, dict, str]:
    """The prepared train split and its meta.json, or random images (and their statistics) of CIFAR's shape;
    with `size`, random images of that size (size x size x 3)."""
    prepared = ROOT / paths.PREPARED
    if size is None and (prepared / "train.safetensors").is_file():
        return load_split(prepared, "train"), load_meta(prepared), str(paths.PREPARED / "train.safetensors")
    size = size or 32
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_random, size, size, 3), dtype=torch.uint8, generator=g)
    mean, std = channel_stats(images.numpy())
    meta = {"classes": [str(i) for i in range(10)], "image_shape": [size, size, 3], "mean": mean, "std": std}
    return (Split(images, torch.randint(0, 10, (n_random,), generator=g)), meta,
            f"random ({n_random} images, {size} px)")


class NaiveDataset(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 array -> PIL image -> transforms."""

    def __init__(self, split: Split):
        self.images, self.labels = split.images.numpy(), split.labels.numpy()
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(FIXED_MEAN, FIXED_STD),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def naive_model(name: str, num_classes: int) -> tuple[nn.Module, str]:
    if ORIGINAL_PROGRAM.is_file() and name in ORIGINAL_CLASSES:
        spec = importlib.util.spec_from_file_location("original_program", ORIGINAL_PROGRAM)
        original = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(original)
        return getattr(original, ORIGINAL_CLASSES[name])(num_classes=num_classes), "original program's model"
    model = build_model(name, num_classes, getattr(params_type()(), name), 32)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
        if isinstance(module, nn.Dropout):
            module.forward = lambda x, m=module: F.dropout(x, m.p, m.training)
    return model, "project model, manual attention"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Engine:
    """The pipeline's training path, set up by the training stage's own `train.setup`: on-device uint8
    loader, autocast, fused parts, its step function (a replayed CUDA graph on CUDA), no per-step sync."""

    def __init__(self, name: str, split: Split, meta: dict, device: torch.device, params: Any, cfg: TrainConfig):
        torch.manual_seed(0)
        model = build_model(name, len(meta["classes"]), getattr(params, name), meta["image_shape"][0])
        mean, std = normalization(meta, cfg.normalization)
        self.training = setup(model, split, split, cfg, mean, std, device, seed=0, name=name)
        self.training.model.train()
        self.steps, self.loader, self.dtype = self.training.steps, self.training.loader, self.training.dtype
        self.device, self.epoch, self.done, self.seen = device, iter(()), 0, 0

    def run(self, steps: int) -> int:
        """Train `steps` steps (epochs wrap around); returns the images trained on."""
        images = 0
        for _ in range(steps):
            step = next(self.epoch, None)
            if step is None:
                self.epoch, self.seen = self.steps.epoch(self.done), 0
                step = next(self.epoch)
            _, seen = step  # images of the epoch trained on so far
            images, self.seen, self.done = images + seen - self.seen, seen, self.done + 1
        self.steps.loss_sum.item()  # one sync per window, so that the window's work is done when timed
        return images


class Naive:
    """The original program's way: DataLoader(2 workers) + PIL transforms, fp32, eager, .item() per step."""

    def __init__(self, name: str, split: Split, device: torch.device, batch_size: int):
        torch.manual_seed(0)
        self.model, self.source = naive_model(name, 10)
        self.model.to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.05)
        self.loader = DataLoader(NaiveDataset(split), batch_size=batch_size, shuffle=True, num_workers=2,
                                 persistent_workers=True)
        self.device, self.batches = device, iter(())

    def run(self, steps: int) -> int:
        images = 0
        for _ in range(steps):
            batch = next(self.batches, None)
            if batch is None:
                self.batches = iter(self.loader)
                batch = next(self.batches)
            x, y = batch[0].to(self.device), batch[1].to(self.device)
            self.optimizer.zero_grad()
            out = self.model(x)
            out = out[0] if isinstance(out, tuple) else out
            loss = F.cross_entropy(out, y)
            loss.backward()
            self.optimizer.step()
            loss.item()
            out.max(1)[1].eq(y).sum().item()
            images += len(y)
        return images


def timed_window(runner, steps: int) -> float:
    """Images/s of `steps` training steps, the device's queued work included."""
    _sync(runner.device)
    t0 = time.perf_counter()
    images = runner.run(steps)
    _sync(runner.device)
    return images / (time.perf_counter() - t0)


def serve_baseline(conn, name: str, device: str, batch_size: int) -> None:
    """The baseline's own process: runs what the parent asks for, replies with images/s."""
    split, _, _ = load_images()
    runner = Naive(name, split, torch.device(device), batch_size)
    conn.send(runner.source)
    while (steps := conn.recv()) is not None:
        conn.send(timed_window(runner, steps))
    conn.send(peak_memory_mb(torch.device(device)))


class BaselineProcess:
    """Naive, in a spawned process, driven window by window from here."""

    def __init__(self, name: str, device: torch.device, batch_size: int):
        self.conn, child = mp.get_context("spawn").Pipe()
        # not a daemon: the baseline's DataLoader starts worker processes of its own
        self.process = mp.get_context("spawn").Process(target=serve_baseline, args=(child, name, str(device), batch_size))
        self.process.start()
        child.close()  # only the child holds its end now: if it dies, receiving here fails at once
        self.source = self._receive()

    def _receive(self):
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join()
            raise RuntimeError(f"the naive baseline's process died (exit code {self.process.exitcode}); "
                               "its traceback is above") from None

    def window(self, steps: int) -> float:
        self.conn.send(steps)
        return self._receive()

    def close(self) -> float:
        """Stop it; returns its peak memory in MiB."""
        self.conn.send(None)
        peak = self._receive()
        self.process.join()
        return peak


def measure(engine: Engine, baseline: BaselineProcess | None, steps: int, repeats: int,
            warmup: int) -> dict[str, list[float]]:
    # The graphed step warms up and is captured in its first calls: that belongs to the warm-up, not a window.
    engine.run(warmup + (CudaGraphStep.WARMUP + 1 if engine.steps.graph else 0))
    if baseline:
        baseline.window(warmup)
    rates: dict[str, list[float]] = {"engine": [], "baseline": []}
    for _ in range(repeats):  # alternate: each window sees the same machine load
        rates["engine"].append(timed_window(engine, steps))
        if baseline:
            rates["baseline"].append(baseline.window(steps))
    return rates


def augmentation_ms(engine: Engine, batches: int, repeats: int) -> float | None:
    """Milliseconds per batch that the recipe's augmentation (policy, erasing, mixup/cutmix) adds to the
    loader: its loader timed over `batches` batches with and without augmentation, alternating, medians
    of `repeats` windows. None when the recipe does not augment."""
    augmented = engine.loader
    if not (augmented.augment or augmented.mix):
        return None
    plain = copy.copy(augmented)
    plain.augment = plain.mix = None

    def window(loader: BatchLoader) -> float:
        batches_left, t0 = batches, time.perf_counter()
        while batches_left:
            for x, _ in loader:
                batches_left -= 1
                if not batches_left:
                    break
        _sync(engine.device)  # the last batch's work is done when timed
        return 1000 * (time.perf_counter() - t0) / batches

    window(augmented), window(plain)  # warm-up
    times = {"augmented": [], "plain": []}
    for _ in range(repeats):
        times["augmented"].append(window(augmented))
        times["plain"].append(window(plain))
    return statistics.median(times["augmented"]) - statistics.median(times["plain"])


def gpu_busy(engine: Engine, steps: int) -> float | None:
    """The share of a window of `steps` training steps during which the GPU runs a kernel: the kernels'
    time on the GPU's timeline (torch.profiler, overlaps merged) over the span from the first kernel's
    start to the last one's end. None off CUDA."""
    if engine.device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.run(steps)
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    if not kernels:
        print("gpu_busy: the profiler recorded no GPU kernels (CUPTI unavailable?); not measured", file=sys.stderr)
        return None
    busy, (start, end) = 0.0, kernels[0]
    for k_start, k_end in kernels[1:]:  # merge overlapping kernels (several streams)
        if k_start > end:
            busy, start = busy + end - start, k_start
        end = max(end, k_end)
    busy += end - start
    return busy / max(end - kernels[0][0], 1e-9)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--baseline", action="store_true", help="also measure the naive way, alternating")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                        help="each step as one replayed CUDA graph (auto: on CUDA)")
    parser.add_argument("--recipe", help="a named recipe (recipes/<name>.yaml): its models, recipes and augmentation")
    parser.add_argument("--profile", action="store_true",
                        help="on CUDA, also report the share of a window the GPU is busy (torch.profiler)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per model")
    parser.add_argument("--image-size", type=int, help="random images of this size (px) instead of data/prepared: "
                        "what training at data.image_size costs (the naive way is CIFAR's 32 px only)")
    args = parser.parse_args()
    params = params_with(args.recipe, ROOT / "recipes", ROOT / "params.yaml") if args.recipe else params_type()()

    device = resolve_device(args.device)
    if args.profile and device.type == "cuda":
        # CUPTI must be set up before a graph is captured, or the profiler may not see its replays' kernels.
        from torch.profiler import _utils as profiler_utils

        profiler_utils._init_for_cuda_graphs()
    keep_freed_memory()  # as the training stage does
    use_deterministic(TrainConfig().deterministic)
    if args.image_size is not None and args.baseline and args.image_size != 32:
        parser.error("--baseline: the naive way (the original program) trains at 32 px only")
    split, meta, data = load_images(size=args.image_size)
    for name in (MODELS if args.model == "all" else [args.model]):
        # The model's recipe (the original program's at the defaults).
        cfg = dataclasses.replace(recipe_for(params, name), precision=args.precision, compile=args.compile,
                                  cuda_graphs=args.cuda_graphs)
        engine = Engine(name, split, meta, device, params, cfg)
        baseline = BaselineProcess(name, device, cfg.batch_size) if args.baseline else None
        rates = measure(engine, baseline, args.steps, args.repeats, args.warmup)
        result = {
            "model": name,
            "device": str(device),
            "cpu_threads": torch.get_num_threads(),
            "precision": str(engine.dtype).removeprefix("torch."),
            "cuda_graphs": engine.steps.graphed,
            "batch_size": cfg.batch_size,
            "data": data,
            "image_size": meta["image_shape"][0],
            "steps_per_window": args.steps,
            "windows": args.repeats,
            "train_images_per_s": round(statistics.median(rates["engine"]), 1),
            "train_images_per_s_windows": [round(r, 1) for r in rates["engine"]],
        }
        result["peak_memory_mb"] = round(peak_memory_mb(device), 1)
        busy = gpu_busy(engine, args.steps) if args.profile else None
        if busy is not None:
            result["gpu_busy"] = round(busy, 3)
        augment_ms = augmentation_ms(engine, args.steps, args.repeats)
        if augment_ms is not None:
            step_ms = 1000 * cfg.batch_size / result["train_images_per_s"]
            result.update({"recipe": args.recipe, "augment_ms_per_batch": round(augment_ms, 2),
                           "augment_share_of_step": round(augment_ms / step_ms, 4)})
        if baseline:
            base = statistics.median(rates["baseline"])
            result.update({
                "baseline": baseline.source,
                "baseline_images_per_s": round(base, 1),
                "baseline_images_per_s_windows": [round(r, 1) for r in rates["baseline"]],
                "speedup": round(result["train_images_per_s"] / base, 2),
                "baseline_peak_memory_mb": round(baseline.close(), 1),
            })
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            graphs = ", CUDA graph" if result["cuda_graphs"] else ""
            line = f"{name}: {result['train_images_per_s']:.0f} img/s ({result['precision']}, {device}{graphs})"
            if "gpu_busy" in result:
                line += f"; GPU busy {100 * result['gpu_busy']:.0f}% of a step"
            if args.baseline:
                line += f"; naive {result['baseline_images_per_s']:.0f} img/s; speedup {result['speedup']:.2f}x"
            if "augment_ms_per_batch" in result:
                line += (f"; augmentation {result['augment_ms_per_batch']:.1f} ms/batch "
                         f"({100 * result['augment_share_of_step']:.1f}% of a step)")
            print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
