"""Where and how a model runs: device, precision, compilation, CUDA graphs, seeding, batched inference."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock, Timeout

from vitcnn.data import BatchLoader
from vitcnn.errors import UserError, first_line
from vitcnn.kernels import cpu_flags, quiet_cpp_extension

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be available.

    With several GPUs, each process takes one of its own (see `claim_gpu`), so that the
    runs of a study started with one queue worker per GPU do not all land on GPU 0.
    """
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if available[d])
    elif not available[name]:
        usable = ", ".join(d for d, ok in available.items() if ok)
        raise UserError(f"device: '{name}' is not available on this machine; use auto or one of {usable}")
    if name == "cuda" and torch.cuda.device_count() > 1:
        index = claim_gpu()
        torch.cuda.set_device(index)  # what plain "cuda" means in this process from now on
        return torch.device("cuda", index)
    return torch.device(name)


GPU_LOCKS = Path(tempfile.gettempdir()) / "vitcnn-gpus"  # one lock file per GPU, machine-wide
_held_gpu_locks: list[FileLock] = []  # held until the process exits (the OS releases them then)


def claim_gpu(lock_dir: Path | None = None) -> int:
    """Index of a visible GPU for this process: the first one no other vitcnn process holds.

    Each GPU has a lock file named by its UUID (the same GPU under any CUDA_VISIBLE_DEVICES
    numbering); this process takes the first free one and keeps it until it exits. When
    every GPU is taken, it shares the one with the most free memory, and says so.
    """
    lock_dir = lock_dir or GPU_LOCKS
    count = torch.cuda.device_count()
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            lock = FileLock(lock_dir / f"{torch.cuda.get_device_properties(index).uuid}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # another run is on this GPU
            _held_gpu_locks.append(lock)
            return index
        why = f"all {count} GPUs are in use by other runs"
    except OSError as exc:  # e.g. another user's lock folder: choose by free memory alone
        why = f"GPU locks in {lock_dir} are unusable ({exc})"
    index = max(range(count), key=lambda i: torch.cuda.mem_get_info(i)[0])
    log.warning("%s; sharing cuda:%d, which has the most free memory", why, index)
    return index


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 pays off."""
    return not {"avx512_bf16", "amx_bf16"}.isdisjoint(cpu_flags())


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 on CUDA with bf16 support and on CPUs with native bf16, else fp32."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        if device.type == "mps":
            raise UserError("train.precision: bf16 is not supported on mps here; use auto or fp32")
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def maybe_compile(model: nn.Module, mode: str, device: torch.device, examples: list[torch.Tensor],
                  dtype: torch.dtype) -> nn.Module:
    """torch.compile on CUDA by default ("auto"), on CPU only when asked ("on").

    On CPU compilation measured no faster here and costs a minute or more per run, so
    `auto` keeps CPU runs eager. torch.compile only compiles at the first call, and the
    backward pass later still, so a missing toolchain would otherwise surface as a
    crash in the middle of the first step. One trial training step on each of `examples`
    (batches of the shapes an epoch trains on: a full one and the last, smaller one) compiles
    both passes for each shape here instead, so that no recompilation falls in an epoch and
    its speed; if that fails, a one-line warning says why and the model trains eagerly. The
    trials change nothing: random states, weights, buffers and gradients are as they were
    before them.
    """
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return model
    import torch._dynamo

    with quiet_cpp_extension():
        import torch.utils.cpp_extension  # noqa: F401  (inductor imports it when it builds CPU code)
    compiled = torch.compile(model)
    try:
        with torch._dynamo.config.patch(suppress_errors=False):  # the trial must see a failure, not skip it
            for example in examples:
                _trial_step(compiled, model, example, dtype)
    except torch.OutOfMemoryError:
        raise  # the batch does not fit: the caller's message says what to try
    except Exception as exc:  # any failure to compile means "train eagerly"
        torch._dynamo.reset()
        log.warning("torch.compile failed (%s); training without compilation", first_line(exc))
        return model
    # A later recompilation (eval mode, a smaller last batch) that fails runs eagerly instead.
    torch._dynamo.config.suppress_errors = True
    return compiled


def _trial_step(compiled: nn.Module, model: nn.Module, example: torch.Tensor, dtype: torch.dtype) -> None:
    """Forward and backward through `compiled` on `example`, leaving no trace on `model`, even if it fails."""
    device = example.device
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # batch norm's running statistics
    labels = torch.zeros(len(example), dtype=torch.long, device=device)
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            model.train()
            with autocast(device, dtype):
                logits = compiled(example)
            nn.functional.cross_entropy(logits.float(), labels).backward()
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.zero_grad(set_to_none=True)


def use_cuda_graphs(mode: str, device: torch.device) -> bool:
    """Whether training steps run as a CUDA graph: `auto` and `on` on CUDA, never elsewhere."""
    if mode != "off" and device.type == "cuda":
        return True
    if mode == "on":
        log.warning("train.cuda_graphs: on needs a CUDA device; training on %s without graphs", device.type)
    return False


class CudaGraphStep:
    """Calls `step()` as one captured CUDA graph: one replay per call instead of hundreds of launches.

    A small model's training step at batch 128 is launch-bound on a fast GPU: the CPU takes
    longer to queue its few hundred kernels than the GPU takes to run them. A replayed graph
    queues them all at once. The first `WARMUP` calls run `step` eagerly on a side stream
    (they are real steps: they let cuDNN and cuBLAS pick their algorithms, the optimizer
    create its state and torch.compile finish before capture); the next call records
    `step` and replays the recording; every later call is one replay.

    `step` must keep what it reads and writes in tensors of fixed address (a caller changes
    them in place between calls) and must not read a value back to the host. `generators`
    are the non-default generators it draws from: registered with the graph, each replay
    draws fresh numbers from them as an eager call would. The last warm-up call runs with
    CUDA's sync check on: a step that reads a value back (or copies from the host) is never
    captured, since a failed capture can leave the allocator in a capture state. If the
    step synchronizes or capture fails, one line says why and every later call runs `step`
    eagerly, as training without graphs does.
    """

    WARMUP = 3
    _SYNC_WARNING = "synchronizing CUDA operation"  # what CUDA's sync check warns (set_sync_debug_mode)

    def __init__(self, step: Callable[[], None], generators: list[torch.Generator], name: str = "model"):
        self.step, self.generators, self.name = step, generators, name
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False  # the step cannot be captured: run it as it is
        self.calls = 0
        self.capture_s = 0.0  # time spent recording the graph (part of the run's setup, not of its epochs)
        # One side stream for every warm-up: the caching allocator keeps freed blocks per stream, so a new
        # stream per warm-up would hold a step's activations (and cuBLAS workspaces) once per warm-up.
        self.side: torch.cuda.Stream | None = None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.eager:
            self.step()
        elif self.calls < self.WARMUP:
            self._warm_up(check_syncs=self.calls == self.WARMUP - 1)
        else:
            self._capture()
        self.calls += 1

    def _warm_up(self, check_syncs: bool) -> None:
        """One real step on a side stream; with `check_syncs`, note whether it synchronized with the host."""
        side = self.side = self.side or torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        user_mode = torch.cuda.get_sync_debug_mode()
        with torch.cuda.stream(side), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if check_syncs:
                torch.cuda.set_sync_debug_mode("warn")  # warns at each sync, and lets the step finish
            try:
                self.step()
            finally:
                torch.cuda.set_sync_debug_mode(user_mode)
        torch.cuda.current_stream().wait_stream(side)
        syncs = [w for w in caught if self._SYNC_WARNING in str(w.message)]
        for w in caught:
            # A capturable optimizer warns once when it steps outside a capture: here it is meant to.
            if w not in syncs and "capturable=True" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if syncs:
            self._give_up(f"the step reads a value back to the host: {first_line(syncs[0].message)}")

    def _capture(self) -> None:
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        entry_stream = torch.cuda.current_stream()
        # Every generator the capture draws from (it always registers the default one), as it stands
        # before: a capture that CUDA rejects can leave a generator marked as capturing (torch 2.11
        # clears the mark only when capture ends well), and its next eager draw would then fail.
        generators = [*self.generators, torch.cuda.default_generators[torch.cuda.current_device()]]
        before = [g.clone_state() for g in generators]
        # No old graph may be freed by Python's cycle collector while this one records (a graph and
        # the step it calls refer to each other): collect now, and not during the capture.
        collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for generator in self.generators:
                graph.register_generator_state(generator)
            with torch.cuda.graph(graph, stream=self.side or torch.cuda.Stream()):  # records; nothing runs yet
                self.step()
        except torch.OutOfMemoryError:
            raise  # the batch does not fit: the caller's message says what to try
        except Exception as exc:  # any failure to record means "train eagerly"
            torch.cuda.set_stream(entry_stream)  # a failed capture_end leaves the capture stream current
            # capture_end's own error ("a previous error during capture") hides the step's, its context.
            self._give_up(first_line(exc.__context__ or exc))
            try:
                for generator, state in zip(generators, before):
                    generator.graphsafe_set_state(state)  # draws go on as if no capture had been tried
                self.step()
            except Exception as again:
                raise UserError(f"{self.name}: training without CUDA graphs after a failed capture failed too "
                                f"({first_line(again)}); set train.cuda_graphs: off") from None
        else:
            self.graph = graph
            graph.replay()  # the step just recorded
        finally:
            if collecting:
                gc.enable()
        self.capture_s = time.perf_counter() - start

    def _give_up(self, why: str) -> None:
        log.warning("%s: cannot capture the training step as a CUDA graph (%s); training without graphs",
                    self.name, why)
        self.eager = True


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    A training step frees and allocates the same activation sizes every time. With
    glibc's defaults the large ones are returned to the OS (mmap, heap trimming) and come
    back as fresh pages that the kernel must fault in and zero: 10-19% of a CPU training
    step on the machine the README's numbers come from, for both models. The process
    keeps its peak footprint instead. Does nothing where the C library has no mallopt.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 1 << 30)  # serve blocks up to 1 GiB from the heap, not mmap
    mallopt(m_trim_threshold, 1 << 30)  # give the heap's free top back only beyond 1 GiB
    mallopt(m_top_pad, 1 << 28)  # grow the heap in 256 MiB steps


def use_deterministic(enabled: bool) -> None:
    """Deterministic kernels (cuDNN, cuBLAS, scatter/index ops) for bit-identical GPU runs.

    Otherwise cuDNN times its convolution algorithms once per shape and keeps the fastest
    (training uses the same few shapes throughout), which can differ from run to run.
    """
    if enabled:  # cuBLAS reads it once, at its first call in the process: call this before any GPU work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """The model's logits of the batch `x` (B, C, H, W) under test-time augmentation `tta`: "none"; "flip",
    the mean over the image and its mirror; "flip_translate", airbench's: half that, and half the mean of
    the same over the image shifted one pixel up-left and one down-right (reflected at the border)."""
    if tta == "none":
        return model(x)

    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model(v) + model(v.flip(-1)))

    if tta == "flip":
        return mirrored(x)
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = (padded[..., :height, :width], padded[..., 2:, 2:])  # up-left, down-right
    return 0.5 * mirrored(x) + 0.25 * (mirrored(shifted[0]) + mirrored(shifted[1]))


@torch.no_grad()
def predict(model: nn.Module, loader: BatchLoader, dtype: torch.dtype, tta: str = "none") -> torch.Tensor:
    """fp32 logits (N, classes) for every item of the loader, in order, on its device (under test-time
    augmentation `tta`, see `tta_logits`)."""
    model.eval()
    with autocast(loader.device, dtype):
        logits = [tta_logits(model, x, tta).float() for x, _ in loader]
    return torch.cat(logits)
