"""The fused CPU kernels of cpu_kernels.cpp, compiled on first use and cached.

torch.utils.cpp_extension builds the source once per machine (about 15 s; the build is
kept in PyTorch's extension cache, ~/.cache/torch_extensions, keyed by the source and
flags) with the vector instructions this CPU has. Every checkout of the same source
shares that build, queued experiments' temporary copies included. Without a C++ compiler, or if the
build fails, training says so in one line and uses the same computation written in
PyTorch ops: same masks, same results, slower.

Set VITCNN_NATIVE_KERNELS=0 to use the PyTorch ops without trying to build.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from vitcnn.errors import first_line

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl")


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def build_flags(flags: frozenset[str]) -> list[str]:
    """Compiler flags for the instructions the kernels use that this CPU has (none: portable C++)."""
    if not all(f in flags for f in _AVX512):
        return []
    return [f"-m{f}" for f in _AVX512] + (["-mavx512bf16"] if "avx512_bf16" in flags else [])


@functools.cache
def cpu_kernels() -> bool:
    """Build (or load from the cache) the kernels and register torch.ops.vitcnn; False if unavailable."""
    if os.environ.get("VITCNN_NATIVE_KERNELS", "1") == "0":
        return False
    isa = build_flags(cpu_flags())
    _put_ninja_on_path()
    try:
        # One name per source and instruction set: a build is never reused for other code, and
        # PyTorch never loads a second library registering the same ops into this process.
        cflags = ["-O3", "-fopenmp", *isa]  # OpenMP: at::parallel_for shares PyTorch's threads
        digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(cflags).encode()).hexdigest()[:12]
        name = f"vitcnn_cpu_kernels_{'avx512' if isa else 'portable'}_{digest}"
        with quiet_cpp_extension():
            from torch.utils import cpp_extension

            build_dir = Path(cpp_extension._get_build_directory(name, False))  # where load() builds `name` anyway
            cpp_extension.load(name=name, sources=[str(_copy_into(build_dir))], build_directory=str(build_dir),
                               extra_cflags=cflags, extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: all mean "use the PyTorch ops"
        reason = first_line(exc).split(": [")[0]  # not the compiler's command line
        log.warning("fused CPU kernels unavailable (%s); using PyTorch ops: same results, slower", reason)
        return False
    return True


def _copy_into(build_dir: Path) -> Path:
    """SOURCE copied into the build folder, and that copy's path: the build's inputs stay the same
    file wherever this checkout is. ninja rebuilds when a source's path changes, and each queued
    experiment runs in a copy of the project at a new path."""
    copy = build_dir / SOURCE.name
    data = SOURCE.read_bytes()
    if not copy.is_file() or copy.read_bytes() != data:
        tmp = copy.with_name(f".{copy.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, copy)  # atomic: a process building at the same time never reads half a file
    return copy


@contextlib.contextmanager
def quiet_cpp_extension() -> Iterator[None]:
    """Silence torch.utils.cpp_extension's warning at import when a CUDA toolkit is installed but no
    GPU is present: it says nothing about building CPU code (these kernels, or torch.compile's)."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cpp_log.setLevel(level)


def _put_ninja_on_path() -> None:
    """PyTorch runs `ninja` from PATH; the pip-installed one is found even when the venv is not activated."""
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
