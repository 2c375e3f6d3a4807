"""airbench94's network and training tricks as recipe options any model may use where they fit, and
test-time augmentation: what each does, and one line where one does not fit the model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import random_images
from vitcnn.config import ConfigError, Recipe, TrainConfig, load_params
from vitcnn.data import FIXED_MEAN, FIXED_STD, BatchLoader, Split
from vitcnn.models import REGISTRY
from vitcnn.models.store import build_model, count_params
from vitcnn.runtime import predict, tta_logits
from vitcnn.train import Lookahead, check_recipe_fits, dirac_init, fit, make_optimizer, whitening_init

CPU = torch.device("cpu")
MEAN, STD = list(FIXED_MEAN), list(FIXED_STD)


def airbench(channels=(64, 256, 256)) -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", 10, dataclasses.replace(REGISTRY["cnn"].params(), block="airbench",
                                                      channels=list(channels)), 32)


def key(name: str) -> str:
    return f"cnn.recipe.{name}"


def test_the_airbench_network_is_airbench94s():
    model = airbench()
    assert sum(p.numel() for p in model.parameters()) == 1_972_792  # 24-64-256-256 widths, bias-free head
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and all(m.eps == 1e-12 and not m.weight.requires_grad for m in norms)
    whiten = model.blocks[0][0]
    assert (whiten.in_channels, whiten.out_channels, whiten.kernel_size) == (3, 24, (2, 2)) and whiten.bias is not None
    assert [m.shape[-1] for m in model.feature_maps(torch.zeros(1, 3, 32, 32))] == [31, 15, 7, 3]


def smooth_images(n: int = 64) -> torch.Tensor:
    """Images whose neighbouring pixels and channels correlate, as photographs' do: normalised, (N, 3, 32, 32)."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.normal(size=(n, 3, 8, 8))).float()
    x = nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    return x + 0.3 * x.mean(1, keepdim=True) + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


def test_whitening_makes_the_first_convs_outputs_decorrelated_on_the_patches():
    conv = nn.Conv2d(3, 24, 2, bias=False)
    x = smooth_images()
    whitening_init(conv, x)
    with torch.no_grad():
        out = conv(x)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()  # the 12 filters; the other 12 negate them
    covariance = out.T @ out / len(out)
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=0.02, rtol=0)
    assert not conv.weight.requires_grad  # frozen: only a bias would learn


def test_dirac_init_leaves_a_conv_an_identity_on_its_input_channels():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False))
    dirac_init(model)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert torch.equal(model(x)[:, :4], x)


def test_batch_norm_biases_learn_at_their_own_rate_with_the_same_decay_per_step():
    model = airbench(channels=(8, 16))
    cfg = Recipe(optimizer="sgd", lr=0.1, weight_decay=5e-4, bn_bias_lr=64.0)
    groups = make_optimizer(model, cfg).param_groups
    biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    (scaled,) = [g for g in groups if g.get("lr_scale") == 64.0]
    assert {id(p) for p in scaled["params"]} == biases
    assert scaled["weight_decay"] * 64.0 == pytest.approx(5e-4)
    assert all(id(p) not in biases for g in groups if g is not scaled for p in g["params"])


def test_alternating_flip_flips_each_image_the_other_way_each_epoch():
    images = torch.from_numpy(random_images(np.random.default_rng(0), 12))
    loader = BatchLoader(Split(images, torch.arange(12)), 12, CPU, [0.0] * 3, [1 / 255] * 3, flip=True,
                         generator=torch.Generator().manual_seed(0), alternate_flip=True)
    epochs = [next(iter(loader))[0] for _ in range(3)]
    first = epochs[0].permute(0, 2, 3, 1).round().to(torch.uint8)
    flipped = torch.tensor([torch.equal(img, orig.flip(1)) for img, orig in zip(first, images)])
    assert 0 < flipped.sum() < 12  # a random half, drawn once
    for before, after in zip(epochs, epochs[1:]):
        assert torch.equal(after, before.flip(-1))  # every image the other way: exactly the complement


def test_lookahead_moves_to_the_slow_weights_every_k_steps_and_ends_on_them():
    model = nn.Linear(3, 2)
    lookahead = Lookahead(model, every=2, total_steps=4)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.after(1)  # not a multiple of 2: nothing
    assert torch.equal(model.weight, start + 1)
    lookahead.after(2)  # decay 0.95**5 * (2/4)**3: the slow weights move most of the way, the live ones follow
    decay = 0.95**5 * 0.5**3
    torch.testing.assert_close(model.weight, start + (1 - decay))
    with torch.no_grad():
        model.weight.add_(5.0)
    lookahead.after(4)  # the last step: the live weights are the slow ones, which stay put
    torch.testing.assert_close(model.weight, start + (1 - decay))


class MeanColour(nn.Module):
    """Logits from the images' mean colour: the same for an image and its mirror."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        return self.head(x.mean((2, 3)))


def test_tta_of_a_flip_invariant_model_equals_no_tta_and_flip_translate_averages_six_views():
    torch.manual_seed(0)
    model, x = MeanColour().eval(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(tta_logits(model, x, "flip"), tta_logits(model, x, "none"))
        views = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        up_left, down_right = views[..., :8, :8], views[..., 2:, 2:]
        expected = (2 * (model(x) + model(x.flip(-1))) + model(up_left) + model(up_left.flip(-1))
                    + model(down_right) + model(down_right.flip(-1))) / 8
        torch.testing.assert_close(tta_logits(model, x, "flip_translate"), expected)
    loader = BatchLoader(Split(torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8), torch.arange(5)), 2, CPU,
                         MEAN, STD)
    assert predict(model, loader, torch.float32, "flip").shape == (5, 10)


def test_airbench_trains_with_all_its_tricks_on():
    images = random_images(np.random.default_rng(0), 40)
    train = Split(torch.from_numpy(images), torch.arange(40) % 10)
    cfg = dataclasses.replace(TrainConfig(), epochs=2, batch_size=16, optimizer="sgd", lr=0.05, precision="fp32",
                              whiten=2, dirac=True, bn_bias_lr=64.0, bn_momentum=0.4, lookahead=2,
                              alternate_flip=True, crop_padding=2, label_smoothing=0.2, eval_batch_size=20)
    model = airbench(channels=(8, 16))
    check_recipe_fits(model, cfg, key)
    result = fit(model, train, train, cfg, MEAN, STD, CPU, seed=0, name="cnn")
    assert len(result.history) == 2 and all(np.isfinite(r["train_loss"]) for r in result.history)
    assert not model.blocks[0][0].weight.requires_grad and count_params(model) < sum(p.numel() for p in model.parameters())
    assert all(m.momentum == 0.4 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name, recipe, message", [
    ("vit", {"bn_bias_lr": 64.0}, "vit.recipe.bn_bias_lr: 64.0 is not allowed; this model has no batch norm"),
    ("vit", {"bn_momentum": 0.4}, "vit.recipe.bn_momentum: 0.4 is not allowed; this model has no batch norm"),
    ("cnn", {"whiten": 3}, "cnn.recipe.whiten: 3 is not allowed; whitening 3x3 patches needs a first conv of 3 -> 54"),
    ("cnn", {"whiten": 2}, "this model has a first conv of 3 -> 4 channels, 3x3"),
])
def test_an_airbench_option_the_model_cannot_take_is_one_line(name, recipe, message):
    model = build_model(name, 10, dataclasses.replace(REGISTRY[name].params(), **REGISTRY[name].tiny), 32)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_recipe_fits(model, dataclasses.replace(Recipe(), **recipe), lambda k: f"{name}.recipe.{k}")


@pytest.mark.parametrize("text, message", [
    ("train:\n  lookahead: 5\n  ema: 0.99\n", "train.lookahead: 5 is not allowed; lookahead and an EMA both"),
    ("evaluate:\n  tta: mirror\n", "evaluate.tta: 'mirror' is not allowed; use one of none, flip, flip_translate"),
    ("train:\n  alternate_flip: true\n  flip: false\n", "train.alternate_flip: True is not allowed"),
])
def test_bad_airbench_or_tta_settings_are_one_line(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_params(tmp_path / "params.yaml")
