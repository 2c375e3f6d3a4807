"""The throughput benchmark runs as the README shows and reports what it promises.

Only the shape of the report is checked here: speed goals belong to the benchmark's own
runs, not to tests on a shared machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_throughput_benchmark_reports_both_ways_and_their_ratio():
    done = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--model", "vit", "--steps", "1", "--repeats", "2",
         "--warmup", "1", "--baseline", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.strip().splitlines()
    report = json.loads(line)
    assert report["model"] == "vit" and report["batch_size"] == 128
    assert len(report["train_images_per_s_windows"]) == 2
    assert len(report["baseline_images_per_s_windows"]) == 2
    assert report["train_images_per_s"] > 0 and report["baseline_images_per_s"] > 0
    assert report["speedup"] == pytest.approx(report["train_images_per_s"] / report["baseline_images_per_s"], abs=0.01)
    assert report["peak_memory_mb"] > 0 and report["baseline_peak_memory_mb"] > 0
