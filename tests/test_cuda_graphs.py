"""The training step as one CUDA graph: what a replayed graph trains equals what the eager step trains.

These need a CUDA GPU and are skipped without one (`pytest -m cuda` runs them alone). On CPU the
same step function runs as it is, and tests/test_train.py checks it against the plain loop.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_train import MEAN, STD, config, split, tiny
from vitcnn.data import BatchLoader
from vitcnn.runtime import CudaGraphStep
from vitcnn.train import EMA, TrainSteps, augmentation, fit, lr_at, make_optimizer, mixing

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = torch.device("cuda")
BATCH = 16
DATA = split(5 * BATCH + 7, 3)  # 5 full batches (the graph) and a last one of 7 (eager)
RECIPES = {
    "original": {},  # per-epoch cosine, AdamW
    "one-cycle": {"lr_step": "batch", "schedule": "linear", "warmup": 0.3, "ema": 0.8, "grad_clip": 1.0,
                  "label_smoothing": 0.1},
    "sgd+augment": {"optimizer": "sgd", "lr": 0.05, "lr_step": "batch", "augment": "randaugment", "mixup": 0.8,
                    "cutmix": 1.0, "erasing": 0.25},
}


def run_steps(name: str, recipe: dict, graphs: bool, epochs: int = 3, precision: str = "bf16"):
    """Train a tiny model `epochs` epochs through TrainSteps; returns it, its EMA, the steps and the lrs seen."""
    cfg = config(**recipe, precision=precision)
    torch.manual_seed(0)
    model = tiny(name).to(GPU, memory_format=torch.channels_last)
    loader = BatchLoader(DATA, BATCH, GPU, MEAN, STD, shuffle=True, crop_padding=4, flip=True,
                         generator=torch.Generator(device=GPU).manual_seed(0), augment=augmentation(cfg),
                         mix=mixing(cfg, GPU))
    optimizer = make_optimizer(model, cfg, capturable=graphs)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    steps = TrainSteps(model, optimizer, loader, dtype, cfg, ema, graphs=graphs, name=name)
    lrs = []
    for epoch in range(epochs):
        model.train()
        for _ in steps.epoch(epoch * len(loader)):
            lr = optimizer.param_groups[0]["lr"]
            lrs.append(lr.item() if torch.is_tensor(lr) else lr)
    torch.cuda.synchronize()
    return model, ema, steps, lrs


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_the_graph_trains_the_weights_the_eager_step_trains(name, recipe):
    graphed, graphed_ema, steps, _ = run_steps(name, RECIPES[recipe], graphs=True)
    assert steps.graphed, "the step was not captured"
    eager, eager_ema, _, _ = run_steps(name, RECIPES[recipe], graphs=False)
    for key, value in eager.state_dict().items():  # bf16 compute, fp32 weights; the lr is an fp32 tensor when graphed
        torch.testing.assert_close(graphed.state_dict()[key], value, rtol=2e-2, atol=2e-3, msg=key)
    if eager_ema:
        for a, b in zip(graphed_ema.model.state_dict().values(), eager_ema.model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_the_graph_follows_a_per_step_learning_rate_and_trains_the_last_small_batch():
    cfg = config(**RECIPES["one-cycle"])
    _, _, steps, lrs = run_steps("cnn", RECIPES["one-cycle"], graphs=True, precision="fp32")
    batches = len(steps.loader)
    assert lrs == pytest.approx([lr_at(s, batches, cfg) for s in range(3 * batches)], rel=1e-6)
    assert len(set(lrs[:batches])) > 1  # the rate changes within an epoch
    assert steps.batch.item() == batches == 6  # 5 replays and the last batch of 7
    assert torch.isfinite(steps.loss_sum) and steps.first_bad.item() == -1


def test_a_step_that_reads_a_value_back_is_never_captured_and_runs_eagerly(caplog):
    counter = torch.zeros((), device=GPU)

    def step_that_reads_a_value_back():
        counter.add_(1)
        counter.item()  # a host sync: not allowed while a graph is being captured

    run = CudaGraphStep(step_that_reads_a_value_back, [], name="cnn")
    with caplog.at_level(logging.WARNING):
        for _ in range(CudaGraphStep.WARMUP + 3):
            run()
    assert run.eager and run.graph is None
    assert counter.item() == CudaGraphStep.WARMUP + 3  # every call ran once: no step lost or doubled
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("cnn: cannot capture the training step as a CUDA graph (the step reads a value back")


def test_a_capture_cuda_rejects_falls_back_and_random_draws_go_on_as_if_never_tried(caplog):
    # The step is fine eagerly but synchronizes while it is being recorded: CUDA invalidates the
    # capture itself (not a Python error in the step alone). The generators it drew from must come
    # out of the capture as they went in, so the eager steps after it draw what they would have.
    def make(generator, counter, draws):
        def step():
            counter.add_(1)
            draws.append(torch.rand((), device=GPU, generator=generator) + torch.rand((), device=GPU))
            if torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize()  # not allowed while capturing
        return step

    def run(graphed: bool):
        torch.cuda.manual_seed(1)  # the default generator, which every capture registers
        generator, counter, draws = torch.Generator(device=GPU).manual_seed(0), torch.zeros((), device=GPU), []
        step = make(generator, counter, draws)
        call = CudaGraphStep(step, [generator], name="vit") if graphed else step
        for _ in range(CudaGraphStep.WARMUP + 3):
            call()
        return call, counter.item(), draws

    with caplog.at_level(logging.WARNING):
        tried, calls, drawn = run(graphed=True)
    assert tried.eager and tried.graph is None
    assert calls == CudaGraphStep.WARMUP + 3  # every call ran once: no step lost or doubled
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0] and warnings[0].startswith("vit: cannot capture")
    _, _, expected = run(graphed=False)
    ran = drawn[:CudaGraphStep.WARMUP] + drawn[CudaGraphStep.WARMUP + 1:]  # the one drawn while recording never ran
    assert [d.item() for d in ran] == [d.item() for d in expected]


def test_fit_on_cuda_replays_a_graph_deterministically_and_reports_setup_apart():
    def train(seed):
        torch.manual_seed(seed)
        model = tiny("vit")
        return fit(model, DATA, split(20, 4), config(epochs=2, deterministic=True, compile="off"), MEAN, STD, GPU,
                   seed, name="vit")

    from vitcnn.runtime import use_deterministic

    benchmark = torch.backends.cudnn.benchmark
    use_deterministic(True)  # conftest set CUBLAS_WORKSPACE_CONFIG before CUDA started, as the stages do
    try:
        first, second = train(0), train(0)
    finally:
        use_deterministic(False)
        torch.backends.cudnn.benchmark = benchmark
    assert first.cuda_graphs and first.setup_time_s > 0
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)
    assert [r["train_loss"] for r in first.history] == [r["train_loss"] for r in second.history]


def test_the_benchmark_measures_the_graphed_step_and_how_busy_the_gpu_is():
    out = subprocess.run([sys.executable, "benchmarks/throughput.py", "--model", "cnn", "--steps", "5", "--repeats", "2",
                          "--profile", "--json"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=600).stdout
    result = json.loads(out.splitlines()[-1])
    assert result["cuda_graphs"] is True and result["train_images_per_s"] > 0
    assert 0 < result["gpu_busy"] <= 1
