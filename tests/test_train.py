"""The training loop on tiny models: seeded, keeps the selected epoch's weights, schedule, stops on NaN."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from conftest import random_images
from vitcnn.config import Recipe, TrainConfig
from vitcnn.data import FIXED_MEAN, FIXED_STD, BatchLoader, Split
from vitcnn.models import REGISTRY
from vitcnn.models.store import build_model
from vitcnn.runtime import maybe_compile, predict
from vitcnn.train import (EMA, TrainingError, TrainSteps, augmentation, fit, load_optimizer_state, lr_at, make_optimizer,
                          mixing, train_step)

CPU = torch.device("cpu")


def tiny(name: str, **overrides) -> torch.nn.Module:
    return build_model(name, 10, dataclasses.replace(REGISTRY[name].params(), **{**REGISTRY[name].tiny, **overrides}), 32)
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
    model = tiny(name)
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
    model = tiny("cnn")
    with pytest.raises(TrainingError, match="not finite"):
        # A zero std turns every input into inf/nan: the loss cannot be finite.
        fit(model, TRAIN, VAL, config(epochs=1), MEAN, [0.0, 0.0, 0.0], CPU, 0, name="cnn")


# --- recipes -----------------------------------------------------------------------------------


def test_the_default_recipe_is_the_original_programs_loop():
    # The original program's loop, written out: AdamW on every parameter, cosine annealing of
    # the learning rate once per epoch, crop + flip, the mean cross-entropy.
    epochs = 3
    torch.manual_seed(0)
    reference = tiny("cnn").to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=3e-3, weight_decay=0.05, fused=True)
    loader = BatchLoader(TRAIN, 16, CPU, MEAN, STD, shuffle=True, crop_padding=4, flip=True,
                         generator=torch.Generator().manual_seed(0))
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + np.cos(np.pi * epoch / epochs))
        reference.train()
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            optimizer.step()
    model, _ = train("cnn", epochs=epochs, select="last")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


STEPS = 10  # per epoch, in the schedule tests


def test_warmup_rises_linearly_to_the_peak_at_its_last_step():
    cfg = Recipe(epochs=10, lr=0.4, warmup=0.2, lr_step="batch", schedule="linear")
    assert [lr_at(s, STEPS, cfg) for s in (0, 9, 19)] == pytest.approx([0.02, 0.2, 0.4])
    # One-cycle: then linearly down to 0 at the end of the run.
    assert lr_at(20, STEPS, cfg) == pytest.approx(0.4)
    assert lr_at(60, STEPS, cfg) == pytest.approx(0.2)  # half way through the 80 steps after warmup
    assert lr_at(99, STEPS, cfg) == pytest.approx(0.4 / 80)
    assert all(a <= b for a, b in zip(*[[lr_at(s, STEPS, cfg) for s in r] for r in (range(0, 20), range(1, 21))]))


def test_cosine_per_batch_reaches_half_the_peak_half_way_after_warmup():
    cfg = Recipe(epochs=5, lr=1.0, warmup=0.2, lr_step="batch", schedule="cosine")
    assert lr_at(10, STEPS, cfg) == pytest.approx(1.0)
    assert lr_at(30, STEPS, cfg) == pytest.approx(0.5)
    assert lr_at(49, STEPS, cfg) == pytest.approx(0.5 * (1 + np.cos(np.pi * 39 / 40)))


def test_per_epoch_stepping_keeps_one_rate_through_each_epoch():
    cfg = Recipe(epochs=4, lr=1.0, lr_step="epoch", schedule="cosine")
    assert [lr_at(s, STEPS, cfg) for s in range(10, 20)] == [pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))] * 10
    assert lr_at(37, STEPS, Recipe(epochs=4, lr=1.0, schedule="constant")) == 1.0


def test_the_ema_is_the_hand_computed_average_of_the_weights():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(model, decay=0.5)
    seen = [model.weight.detach().clone()]
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update()
        seen.append(model.weight.detach().clone())
    decays = [min(0.5, (1 + t) / (10 + t)) for t in (1, 2, 3)]  # 2/11, 3/12, 4/13: rising towards 0.5
    expected = seen[0]
    for d, current in zip(decays, seen[1:]):
        expected = d * expected + (1 - d) * current
    torch.testing.assert_close(ema.model.weight, expected)
    assert not ema.model.weight.requires_grad


def test_ema_weights_are_validated_and_kept():
    model, plain = train("cnn", epochs=2, select="last")
    _, averaged = train("cnn", epochs=2, select="last", ema=0.9)
    # Same training (the EMA only reads the weights), different weights kept.
    assert [r["train_loss"] for r in averaged.history] == [r["train_loss"] for r in plain.history]
    assert not all(torch.equal(averaged.state[k], plain.state[k]) for k in plain.state)
    model.load_state_dict(averaged.state)
    logits = predict(model, BatchLoader(VAL, 10, CPU, MEAN, STD), torch.float32)
    acc = (logits.argmax(1) == VAL.labels).float().mean().item()
    assert acc == pytest.approx(averaged.history[-1]["val_acc"], abs=1e-6)


def test_weight_decay_on_matrices_leaves_norms_biases_and_embeddings_alone():
    model = tiny("vit")
    groups = make_optimizer(model, Recipe(decay="matrices", weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    kept = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert {"head.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= decayed
    assert {"head.bias", "blocks.0.norm1.weight", "pos_embed", "cls_token"} <= kept
    assert len(make_optimizer(model, Recipe(decay="all")).param_groups) == 1


def test_sgd_clipping_and_label_smoothing_act_in_the_step():
    torch.manual_seed(0)
    model = tiny("cnn")
    cfg = Recipe(optimizer="sgd", lr=0.1, momentum=0.9, grad_clip=0.01, label_smoothing=0.2)
    optimizer = make_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["nesterov"]
    x, y = next(iter(BatchLoader(TRAIN, 16, CPU, MEAN, STD)))
    with torch.no_grad():
        logits = model.train()(x)  # what the step will see (batch norm uses the batch's statistics)
    loss, _ = train_step(model, optimizer, x, y, torch.float32, cfg)
    grads = [p.grad for p in model.parameters()]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) <= 0.01 * (1 + 1e-5)
    smoothed = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2)
    assert loss.item() == pytest.approx(smoothed.item(), rel=1e-5)
    assert loss.item() != pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-3)


def test_strong_augmentation_trains_and_measures_accuracy_against_the_dominant_label():
    _, plain = train("cnn", epochs=1, select="last")
    _, augmented = train("cnn", epochs=1, select="last", augment="randaugment", augment_magnitude=15,
                         erasing=0.5, mixup=0.8, cutmix=1.0, mix_per="image", label_smoothing=0.1)
    row, base = augmented.history[0], plain.history[0]
    assert np.isfinite(row["train_loss"]) and 0 <= row["train_acc"] <= 1
    assert row["train_loss"] != base["train_loss"]  # the batches really were augmented and mixed
    # Validation never augments: the same data and weights give the same validation numbers.
    model = tiny("cnn")
    model.load_state_dict(augmented.state)
    logits = predict(model, BatchLoader(VAL, 10, CPU, MEAN, STD), torch.float32)
    assert (logits.argmax(1) == VAL.labels).float().mean().item() == pytest.approx(row["val_acc"], abs=1e-6)


# --- torch.compile (the default on CUDA), exercised on the CPU ----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_compiled_training_computes_what_eager_training_does(name):
    # Without dropout: compiled code draws its dropout masks differently, by design.
    no_dropout = {"dropout": 0.0, "attn_dropout": 0.0} if name == "vit" else {}
    runs, logits = {}, {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = tiny(name, **no_dropout)
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
    model = tiny(name)
    loader = BatchLoader(TRAIN, 16, CPU, MEAN, STD)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # weights and batch norm statistics
    rng = torch.get_rng_state()
    compiled = maybe_compile(model, "on", CPU, loader.examples(), torch.float32)
    assert compiled is not model, "the trial step compiled nothing"
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_compile_is_off_on_cpu_unless_asked_for():
    model = tiny("cnn")
    example = BatchLoader(TRAIN, 16, CPU, MEAN, STD).examples()
    assert maybe_compile(model, "auto", CPU, example, torch.float32) is model
    assert maybe_compile(model, "off", CPU, example, torch.float32) is model


# --- the step function (the body of the CUDA graph on CUDA; called as it is here) ----------------


@pytest.mark.parametrize("recipe", [
    {},  # the original program's: per-epoch cosine
    {"optimizer": "sgd", "lr": 0.05, "lr_step": "batch", "schedule": "linear", "warmup": 0.3, "ema": 0.8,
     "grad_clip": 1.0, "label_smoothing": 0.1, "augment": "randaugment", "mixup": 0.8, "cutmix": 1.0},
])
def test_the_step_function_trains_as_the_plain_loop_over_the_loader_including_the_last_small_batch(recipe):
    """What `TrainSteps.step` does with a batch index on the device equals the loop over the loader's
    batches, every image of an epoch once, the last smaller batch included (50 = 3 x 16 + 2)."""
    cfg = config(**recipe)
    data = split(50, 2)

    def setup():
        torch.manual_seed(0)
        model = tiny("cnn").to(memory_format=torch.channels_last)
        loader = BatchLoader(data, 16, CPU, MEAN, STD, shuffle=True, crop_padding=4, flip=True,
                             generator=torch.Generator().manual_seed(0), augment=augmentation(cfg),
                             mix=mixing(cfg, CPU))
        return model, loader, make_optimizer(model, cfg), EMA(model, cfg.ema) if cfg.ema else None

    model, loader, optimizer, ema = setup()
    plain_losses = []
    for epoch in range(2):
        model.train()
        for step, (x, y) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * len(loader) + step, len(loader), cfg)
            loss, _ = train_step(model, optimizer, x, y, torch.float32, cfg)
            if ema:
                ema.update()
            plain_losses.append(loss * len(y))

    stepped, loader, optimizer, stepped_ema = setup()
    steps = TrainSteps(stepped, optimizer, loader, torch.float32, cfg, stepped_ema, graphs=False)
    for epoch in range(2):
        stepped.train()
        trained = list(steps.epoch(epoch * len(loader)))
        assert trained == [(1, 16), (2, 32), (3, 48), (4, 50)]
        assert steps.batch.item() == 4 and steps.first_bad.item() == -1
        assert steps.loss_sum.item() == pytest.approx(sum(plain_losses[4 * epoch: 4 * epoch + 4]).item(), rel=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(stepped.state_dict()[key], value), key
    if ema:
        assert all(torch.equal(a, b) for a, b in zip(stepped_ema.model.state_dict().values(),
                                                     ema.model.state_dict().values()))


def test_cuda_graphs_are_for_cuda_alone(caplog):
    from vitcnn.runtime import use_cuda_graphs

    assert not use_cuda_graphs("auto", CPU) and not caplog.records
    assert not use_cuda_graphs("on", CPU)
    assert "needs a CUDA device" in caplog.text
    _, result = train("cnn", epochs=1, cuda_graphs="on")
    assert result.cuda_graphs is False and result.setup_time_s >= 0


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
    model = tiny(name)
    return fit(model, TRAIN, VAL, config(**overrides), MEAN, STD, CPU, 0, name=name, on_epoch=on_epoch,
               checkpoint=checkpoint, fingerprint=fingerprint)


def _same_run(a, b):
    assert a.best_epoch == b.best_epoch
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[r[k] for k in keys] for r in a.history] == [[r[k] for k in keys] for r in b.history]
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


@pytest.mark.parametrize("name, select, recipe", [
    ("vit", "last", {}), ("cnn", "last", {}), ("cnn", "best_val", {}),
    ("cnn", "best_val", {"ema": 0.9, "optimizer": "sgd", "lr_step": "batch", "warmup": 0.4}),
])
def test_interrupted_run_resumes_to_the_same_weights(name, select, recipe, tmp_path):
    checkpoint = tmp_path / "ckpt" / "last.pt"
    uninterrupted = _fit(name, tmp_path / "other" / "last.pt", epochs=4, select=select, **recipe)
    with pytest.raises(Interrupt):
        _fit(name, checkpoint, on_epoch=_stop_after(2), epochs=4, select=select, **recipe)
    assert checkpoint.is_file()
    resumed = _fit(name, checkpoint, epochs=4, select=select, **recipe)
    assert resumed.resumed_from == 2
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    _same_run(resumed, uninterrupted)


def test_a_checkpoint_from_a_run_that_ran_its_optimizer_otherwise_resumes_as_this_run_runs():
    # A run begun on a GPU with graphs saved capturable AdamW state; resumed here, the optimizer must run as
    # this run's does (torch's loader would bring back capturable=True and foreach) and step exactly as
    # if the state had been saved here.
    model = tiny("cnn")
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    saved_here = make_optimizer(model, config(optimizer="adamw"))
    train_step(model, saved_here, x, y, torch.float32, config(optimizer="adamw"))
    state = saved_here.state_dict()
    elsewhere = {**state, "param_groups": [{**g, "capturable": True, "fused": None, "foreach": True}
                                           for g in state["param_groups"]]}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    after = []
    for loaded in (state, elsewhere):
        model.load_state_dict(weights)
        optimizer = make_optimizer(model, config(optimizer="adamw"))
        load_optimizer_state(optimizer, copy.deepcopy(loaded))  # as read from disk: shares no tensor
        assert [(g["fused"], g["capturable"], g["foreach"]) for g in optimizer.param_groups] == \
            [(g["fused"], g["capturable"], g["foreach"]) for g in saved_here.param_groups]
        train_step(model, optimizer, x, y, torch.float32, config(optimizer="adamw"))
        after.append({k: v.clone() for k, v in model.state_dict().items()})
    for key in after[0]:
        assert torch.equal(after[0][key], after[1][key]), key


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
