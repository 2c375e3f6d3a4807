"""The training loop on tiny models: seeded, keeps the selected epoch's weights, schedule, stops on NaN."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import random_images
from vitcnn.config import TrainConfig
from vitcnn.data import FIXED_MEAN, FIXED_STD, BatchLoader, Split
from vitcnn.models import build_model
from vitcnn.runtime import maybe_compile, predict
from vitcnn.train import TrainingError, fit

CPU = torch.device("cpu")
TINY = {"vit": {"embed_dim": 8, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}, "cnn": {"channels": [4, 8]}}
MEAN, STD = list(FIXED_MEAN), list(FIXED_STD)


def split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(torch.from_numpy(random_images(rng, n)), torch.from_numpy(rng.integers(0, 10, n)))


TRAIN, VAL = split(48, 0), split(24, 1)


def config(**overrides) -> TrainConfig:
    base = dict(epochs=3, batch_size=16, lr=3e-3, precision="fp32", compile="off", eval_batch_size=10)
    return dataclasses.replace(TrainConfig(), **{**base, **overrides})


def train(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model(name, 10, **TINY[name])
    result = fit(model, TRAIN, VAL, config(**overrides), MEAN, STD, CPU, seed, name=name)
    return model, result


@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_same_seed_trains_the_same_weights(name):
    _, a = train(name, seed=0)
    _, b = train(name, seed=0)
    _, c = train(name, seed=1)
    assert a.state.keys() == b.state.keys()
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)


@pytest.mark.parametrize("select", ["best_val", "last"])
def test_kept_weights_are_those_of_the_selected_epoch(select):
    model, result = train("cnn", epochs=4, select=select)
    accs = [row["val_acc"] for row in result.history]
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    expected = 1 + int(np.argmax(accs)) if select == "best_val" else 4
    assert result.best_epoch == expected
    # The returned weights really score the recorded val accuracy of that epoch.
    model.load_state_dict(result.state)
    logits = predict(model, BatchLoader(VAL, 10, CPU, MEAN, STD), torch.float32)
    acc = (logits.argmax(1) == VAL.labels).float().mean().item()
    assert acc == pytest.approx(accs[expected - 1], abs=1e-6)  # history rounds to 6 decimals


def test_kept_weights_are_a_snapshot_not_the_live_parameters():
    model, result = train("cnn", epochs=2, select="best_val")
    snapshot = {k: v.clone() for k, v in result.state.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(snapshot[k], result.state[k]) for k in snapshot)


def test_cosine_schedule_decays_once_per_epoch_and_constant_does_not():
    _, cosine = train("cnn", epochs=4, schedule="cosine", lr=1e-3)
    lrs = [row["lr"] for row in cosine.history]
    assert lrs[0] == pytest.approx(1e-3)
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:]))
    _, constant = train("cnn", epochs=3, schedule="constant", lr=1e-3)
    assert [row["lr"] for row in constant.history] == [pytest.approx(1e-3)] * 3


def test_non_finite_loss_stops_training_with_a_user_error():
    model = build_model("cnn", 10, **TINY["cnn"])
    with pytest.raises(TrainingError, match="not finite"):
        # A zero std turns every input into inf/nan: the loss cannot be finite.
        fit(model, TRAIN, VAL, config(epochs=1), MEAN, [0.0, 0.0, 0.0], CPU, 0, name="cnn")


# --- torch.compile (the default on CUDA), exercised on the CPU ----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_compiled_training_computes_what_eager_training_does(name):
    # Without dropout: compiled code draws its dropout masks differently, by design.
    kwargs = {**TINY[name], "dropout": 0.0} if name == "vit" else TINY[name]
    runs, logits = {}, {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = build_model(name, 10, **kwargs)
        runs[mode] = fit(model, TRAIN, VAL, config(epochs=2, compile=mode), MEAN, STD, CPU, 0, name=name)
        model.load_state_dict(runs[mode].state)
        logits[mode] = predict(model, BatchLoader(VAL, 10, CPU, MEAN, STD), torch.float32)
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in runs["on"].history] == pytest.approx([r[key] for r in runs["off"].history], rel=1e-4)
    # The trained models agree on what they predict. Weights are not compared one by one: a
    # parameter whose exact gradient is zero (a bias before batch norm, the keys' bias) moves by
    # AdamW-normalised rounding noise, which differs between compiled and eager code; through
    # batch norm's running statistics that reaches the CNN's eval-mode logits at ~1e-3.
    torch.testing.assert_close(logits["on"], logits["off"], rtol=0, atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "cnn"])  # the ViT draws dropout masks; the CNN has batch norm
def test_compiling_leaves_weights_buffers_gradients_and_random_state_untouched(name):
    torch.manual_seed(0)
    model = build_model(name, 10, **TINY[name])
    loader = BatchLoader(TRAIN, 16, CPU, MEAN, STD)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # weights and batch norm statistics
    rng = torch.get_rng_state()
    compiled = maybe_compile(model, "on", CPU, loader.example(), torch.float32)
    assert compiled is not model, "the trial step compiled nothing"
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_compile_is_off_on_cpu_unless_asked_for():
    model = build_model("cnn", 10, **TINY["cnn"])
    example = BatchLoader(TRAIN, 16, CPU, MEAN, STD).example()
    assert maybe_compile(model, "auto", CPU, example, torch.float32) is model
    assert maybe_compile(model, "off", CPU, example, torch.float32) is model


# --- resume checkpoints --------------------------------------------------------------------


class Interrupt(Exception):
    pass


def _stop_after(epoch: int):
    def on_epoch(row):
        if row["epoch"] == epoch:
            raise Interrupt  # as Ctrl-C after the epoch's checkpoint was written
    return on_epoch


def _fit(name, checkpoint, fingerprint="run-a", on_epoch=None, **overrides):
    torch.manual_seed(0)
    model = build_model(name, 10, **TINY[name])
    return fit(model, TRAIN, VAL, config(**overrides), MEAN, STD, CPU, 0, name=name, on_epoch=on_epoch,
               checkpoint=checkpoint, fingerprint=fingerprint)


def _same_run(a, b):
    assert a.best_epoch == b.best_epoch
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[r[k] for k in keys] for r in a.history] == [[r[k] for k in keys] for r in b.history]
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


@pytest.mark.parametrize("name, select", [("vit", "last"), ("cnn", "last"), ("cnn", "best_val")])
def test_interrupted_run_resumes_to_the_same_weights(name, select, tmp_path):
    checkpoint = tmp_path / "ckpt" / "last.pt"
    uninterrupted = _fit(name, tmp_path / "other" / "last.pt", epochs=4, select=select)
    with pytest.raises(Interrupt):
        _fit(name, checkpoint, on_epoch=_stop_after(2), epochs=4, select=select)
    assert checkpoint.is_file()
    resumed = _fit(name, checkpoint, epochs=4, select=select)
    assert resumed.resumed_from == 2
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    _same_run(resumed, uninterrupted)


def test_checkpoint_of_another_run_is_not_resumed(tmp_path):
    checkpoint = tmp_path / "last.pt"
    with pytest.raises(Interrupt):
        _fit("cnn", checkpoint, fingerprint="params-a", on_epoch=_stop_after(1), epochs=3)
    fresh = _fit("cnn", checkpoint, fingerprint="params-b", epochs=3)
    assert fresh.resumed_from == 0
    _same_run(fresh, _fit("cnn", None, epochs=3))


def test_damaged_checkpoint_starts_fresh(tmp_path):
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    result = _fit("cnn", checkpoint, epochs=2)
    assert result.resumed_from == 0
    _same_run(result, _fit("cnn", None, epochs=2))
