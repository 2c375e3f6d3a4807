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


def test_the_benchmark_trains_at_another_image_size_and_refuses_the_naive_way_there():
    command = [sys.executable, "benchmarks/throughput.py", "--model", "vit", "--steps", "1", "--repeats", "1",
               "--warmup", "1", "--image-size", "48", "--json"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["image_size"] == 48 and report["data"] == "random (10000 images, 48 px)"
    refused = subprocess.run([*command, "--baseline"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "the naive way (the original program) trains at 32 px only" in refused.stderr


def test_the_benchmark_trains_as_the_training_stage_sets_up_every_recipe_key():
    """The benchmark's engine is `train.setup`'s: `normalization: measured` and the recipe's augmentation are
    the training stage's, not a copy of them that drifts."""
    import dataclasses
    import importlib.util

    import torch

    from vitcnn.config import TrainConfig, params_type

    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = throughput.Split(images, torch.arange(40) % 10)
    meta = {"classes": [str(i) for i in range(10)], "image_shape": [32, 32, 3], "mean": [0.1, 0.2, 0.3],
            "std": [0.5, 0.5, 0.5]}
    params = params_type()()
    cfg = dataclasses.replace(TrainConfig(), normalization="measured", batch_size=16, augment="trivialaugment",
                              precision="fp32")
    engine = throughput.Engine("cnn", split, meta, torch.device("cpu"), params, cfg)
    assert torch.allclose(engine.loader.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]) * 255)
    assert engine.loader.augment is not None and engine.training.steps.cfg is cfg
    assert engine.run(2) == 32
