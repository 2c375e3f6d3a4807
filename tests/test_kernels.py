"""The fused CPU kernels compute exactly what their PyTorch-ops fallback computes.

Training draws the same masks whether or not the kernels could be built, so these tests
compare bits, not statistics (the statistics are checked in test_models.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vitcnn import kernels
from vitcnn.models import layers

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")


@pytest.fixture(scope="module")
def ops():
    """The built kernels' operators."""
    assert kernels.cpu_kernels(), "a C++ compiler is present, so the fused kernels must build"
    return torch.ops.vitcnn


def masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.where(keep, x * scale, 0)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (31,), (33,), (5, 7, 11), (16, 4, 65, 65)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fused_dropout_equals_the_pytorch_ops_bit_for_bit(ops, dtype, shape, p):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    seed, threshold, scale = layers.draw_seed(), round(p * 65536), 1 / (1 - p)

    y, bits = ops.dropout(x, seed, threshold, scale)
    keep = layers.keep_mask(x.shape, seed, threshold)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, masked_scale(x, keep, scale))
    assert torch.equal(ops.dropout_backward(grad, bits, scale), masked_scale(grad, keep, scale))


@needs_compiler
def test_fused_dropout_reads_non_contiguous_inputs_in_logical_order(ops):
    x = torch.randn(64, 48).t()  # a transposed view, as attention produces
    seed, threshold = 7, round(0.3 * 65536)
    y, _ = ops.dropout(x, seed, threshold, 1 / 0.7)
    assert torch.equal(y, masked_scale(x, layers.keep_mask(x.shape, seed, threshold), 1 / 0.7))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "pytorch-ops"])
def test_dropout_module_draws_the_same_masks_with_or_without_the_kernels(monkeypatch, fused):
    """Same seed, same outputs and gradients, whichever path this machine takes."""
    monkeypatch.setenv("VITCNN_NATIVE_KERNELS", "1" if fused else "0")
    kernels.cpu_kernels.cache_clear()
    try:
        if fused and not kernels.cpu_kernels():
            pytest.skip("the kernels cannot be built here")
        x = torch.randn(3, 65, 128, requires_grad=True)
        torch.manual_seed(5)
        y = layers.Dropout(0.25).train()(x)
        y.backward(torch.ones_like(y))
        torch.manual_seed(5)
        keep = layers.keep_mask(x.shape, layers.draw_seed(), round(0.25 * 65536))
        assert torch.equal(y, masked_scale(x.detach(), keep, 1 / 0.75))
        assert torch.equal(x.grad, masked_scale(torch.ones_like(x), keep, 1 / 0.75))
    finally:
        kernels.cpu_kernels.cache_clear()


def test_a_failed_build_warns_in_one_line_and_training_falls_back(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "cpu_kernels.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCE", broken)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))  # leave the real build's cache alone
    kernels.cpu_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=kernels.__name__):
            assert kernels.cpu_kernels() is False
        (record,) = [r for r in caplog.records if r.name == kernels.__name__]
        assert "fused CPU kernels unavailable" in record.getMessage()
        assert "\n" not in record.getMessage()
        x = torch.ones(1000)
        y = layers.Dropout(0.5).train()(x)  # still trains, through the PyTorch ops
        assert set(y.unique().tolist()) == {0.0, 2.0}
    finally:
        kernels.cpu_kernels.cache_clear()


PORTABLE_BUILD = """
import json, sys, torch
from torch.utils import cpp_extension
from vitcnn import kernels
cpp_extension.load(name="vitcnn_cpu_kernels_portable_check", sources=[str(kernels.SOURCE)],
                   extra_cflags=["-O3"], is_python_module=False)
out = {}
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0)).to(dtype)
    y, bits = torch.ops.vitcnn.dropout(x, 123456789, 13107, 1.25)
    out[str(dtype)] = [y.float().tolist(), bits.tolist()]
json.dump(out, sys.stdout)
"""


@needs_compiler
@pytest.mark.skipif(not kernels.build_flags(kernels.cpu_flags()), reason="this CPU builds only the portable kernels")
def test_the_portable_build_computes_what_the_vectorised_build_does(ops, tmp_path):
    """CPUs without AVX-512 get the plain C++ loops; they must draw the same bits and round the same way."""
    env = {**__import__("os").environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PORTABLE_BUILD], capture_output=True, text=True, env=env, check=True)
    portable = json.loads(done.stdout)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0)).to(dtype)
        y, bits = ops.dropout(x, 123456789, 13107, 1.25)
        assert portable[str(dtype)] == [y.float().tolist(), bits.tolist()]


@needs_compiler
def test_every_checkout_of_the_source_shares_one_build(ops, tmp_path):
    # A queued experiment runs in a fresh copy of the project: loading the kernels from there
    # must reuse the build, not compile again (ninja rebuilds when a source's path changes).
    code = ("from vitcnn import kernels; assert kernels.cpu_kernels();"
            "print(next(line.split()[-1] for line in open('/proc/self/maps') if 'vitcnn_cpu_kernels' in line))")
    loaded = {}
    for checkout in ("a", "b"):
        src = tmp_path / checkout / "src"
        shutil.copytree(kernels.SOURCE.parents[2], src, ignore=shutil.ignore_patterns("__pycache__"))
        result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(src)},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        library = result.stdout.split()[-1]
        loaded[checkout] = (library, os.stat(library).st_mtime_ns)  # a rebuild writes the library anew
    assert loaded["a"] == loaded["b"]
