"""Every registered model and variant: shapes, gradients, where it looks, save/load; the original
program's exact models at the defaults; the ViT's attention paths and the CPU dropout."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from vitcnn import explain
from vitcnn.config import Params
from vitcnn.models import MODELS, REGISTRY
from vitcnn.models.spec import Attention
from vitcnn.models.store import build_model, count_params, load_model, save_model

# Every variant params.yaml can ask for, on top of each model's tiny config (its registry entry's): each must
# build, train and show where it looks.
VARIANTS = [(name, {}) for name in MODELS] + [
    ("vit", {"stem": "conv", "stem_layers": 2, "pooling": "seq", "drop_path": 0.2}),
    ("vit", {"stem": "conv", "stem_layers": 1, "pooling": "cls", "attn_dropout": 0.0}),
    ("vit", {"pooling": "mean", "depth": 2, "drop_path": 0.1}),
    ("cnn", {"block": "residual"}),
    ("cnn", {"block": "resnet9", "channels": [4, 8, 8, 16]}),
    ("cnn", {"block": "airbench", "channels": [4, 8, 8]}),
    ("vit", {"stem": "conv", "stem_layers": 1, "pooling": "seq", "depth": 2, "mlp_ratio": 2.0}),  # CCT-7/3x1's shape
]
VARIANT_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in variant.items()) or 'default'}" for name, variant in VARIANTS]


def tiny_params(name: str, **overrides):
    return dataclasses.replace(REGISTRY[name].params(), **{**REGISTRY[name].tiny, **overrides})


def tiny(name: str, num_classes: int = 10, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes, tiny_params(name, **overrides), 32)


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_is_one_logit_per_class(name, variant, num_classes):
    model = tiny(name, num_classes, **variant).eval()
    with torch.no_grad():
        logits = model(images(batch=3))
    assert logits.shape == (3, num_classes)
    assert torch.isfinite(logits).all()


# sha256 of the state dict built at seed 0 by the original program's models (names and bytes, in order).
DEFAULT_WEIGHTS = {
    "vit": (1_205_898, "8dda52d1f53ab4da481df85a7d510d283c24d584e47bf887a4d4ff4547b5e095"),
    "cnn": (4_694_346, "8685691ba5865ab6a31c2ebd47406d30af76b16d78b805e2221b21f1f029fe10"),
}


def test_resnet9_is_the_cifar10_fast_network():
    from vitcnn.models.cnn.model import Residual

    model = build_model("cnn", 10, dataclasses.replace(REGISTRY["cnn"].params(), block="resnet9"), 32)
    assert count_params(model) == 6_573_120  # Page's ResNet-9: bias-free convs, a bias-free head
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))
    sizes = [m.shape[1:] for m in model.feature_maps(images(batch=1))]
    assert sizes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]  # prep, layer1, layer2, layer3
    assert [isinstance(b.residual, Residual) for b in model.blocks[1:]] == [True, False, True]  # residual: 1 and 3
    features = torch.randn(2, 512, 4, 4)
    expected = model.head[0](features.amax((2, 3))) / 8  # global max-pool, logits x 1/8
    torch.testing.assert_close(model.forward_head(features), expected)


@pytest.mark.parametrize("name", DEFAULT_WEIGHTS)
def test_default_params_give_the_original_models_parameters_and_weights(name):
    torch.manual_seed(0)
    model = build_model(name, 10, getattr(Params(), name), 32)
    count, digest = DEFAULT_WEIGHTS[name]
    assert count_params(model) == count
    assert sum(p.numel() for p in model.parameters()) == count
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    assert h.hexdigest() == digest


@pytest.mark.parametrize("name, variant", VARIANTS, ids=VARIANT_IDS)
def test_a_training_step_reaches_every_parameter_with_a_finite_gradient(name, variant):
    model = tiny(name, **variant).train()
    x, y = images(batch=4), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for pname, param in model.named_parameters():
        if not param.requires_grad:  # fixed by design (airbench's batch-norm scales): not trained
            continue
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{pname} got a zero gradient"


@pytest.mark.parametrize("name, variant", VARIANTS, ids=VARIANT_IDS)
def test_every_model_shows_where_it_looks(name, variant):
    model, x = tiny(name, **variant).eval(), images(batch=2)
    if isinstance(REGISTRY[name].explains[0], Attention):
        with torch.no_grad():
            logits, maps, readout = model.forward_with_attention(x)
            torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-4)
        grid, prefix = model.grid_size, model.num_prefix_tokens
        assert grid == tiny_params(name, **variant).grid_size(32)
        n = prefix + grid**2
        assert all(m.shape == (2, model.blocks[0].attn.num_heads, n, n) for m in maps)
        torch.testing.assert_close(readout.sum(-1), torch.ones(2))
        rollout = explain.rollout_map(maps, readout, grid, prefix)
        assert rollout.shape == (2, grid, grid) and (rollout >= 0).all()
        torch.testing.assert_close(rollout.sum((1, 2)), torch.ones(2))
        per_head = explain.readout_attention(maps, readout, grid, prefix)
        assert per_head.shape == (2, len(maps), maps[0].shape[1], grid, grid)
    else:
        cam = explain.gradcam(model, x, torch.tensor([1, 2]))
        assert cam.shape == (2, 32, 32) and (cam >= 0).all()
        blocks = model.feature_maps(x)
        if name == "cnn" and variant.get("block") == "airbench":  # a 2x2 whitening layer, then the pooling groups
            assert [m.shape[-1] for m in blocks] == [31 >> i for i in range(len(blocks))]
        elif name == "cnn":
            stem = variant.get("block") == "resnet9"  # a stem at full resolution, then the pooling layers
            assert [m.shape[-1] for m in blocks] == [32 >> (i + 1 - stem) for i in range(len(blocks))]
        assert all(m.ndim == 4 and m.shape[0] == 2 for m in blocks)
        assert torch.equal(blocks[-1], model.forward_features(x))


def _set_fused(model: torch.nn.Module, fused: bool) -> None:
    attns = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attns, "the ViT has no attention module with a fused_attn switch"
    for m in attns:
        m.fused_attn = fused


@pytest.mark.parametrize("depth, heads", [(1, 2), (2, 4)])
def test_vit_fused_and_manual_attention_compute_the_same_function(depth, heads):
    model = tiny("vit", depth=depth, num_heads=heads).eval()
    x = images(batch=5)
    with torch.no_grad():
        _set_fused(model, True)
        fused = model(x)
        _set_fused(model, False)
        manual = model(x)
    assert torch.allclose(fused, manual, atol=1e-5, rtol=1e-4), (fused - manual).abs().max()


@pytest.mark.parametrize("patch_size, depth, heads", [(4, 1, 2), (8, 3, 4)])
def test_vit_attention_maps_are_row_stochastic_per_layer_and_head(patch_size, depth, heads):
    model = tiny("vit", patch_size=patch_size, depth=depth, num_heads=heads).eval()
    x = images(batch=2)
    grid = 32 // patch_size
    with torch.no_grad():
        _, maps, _ = model.forward_with_attention(x)
    assert len(maps) == depth
    for layer in maps:
        assert layer.shape == (2, heads, 1 + grid**2, 1 + grid**2)
        assert (layer >= 0).all()
        assert torch.allclose(layer.sum(-1), torch.ones(2, heads, 1 + grid**2), atol=1e-5)


def test_stochastic_depth_drops_whole_samples_in_training_only():
    from vitcnn.models.layers import DropPath

    torch.manual_seed(0)
    drop, x = DropPath(0.5), torch.ones(2000, 3, 4)
    y = drop.train()(x)
    kept = y.flatten(1).amax(1) > 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 2.0)) and torch.equal(y[~kept], torch.zeros_like(y[~kept]))
    assert abs(kept.float().mean().item() - 0.5) < 0.05
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("name, variant", VARIANTS, ids=VARIANT_IDS)
def test_saved_model_reproduces_the_same_logits(name, variant, tmp_path):
    model = tiny(name, **variant)
    # A few training steps so that the weights and the BatchNorm running statistics
    # differ from a freshly built model: loading must restore all of them.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images(batch=4, seed=step)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    model.eval()
    x = images(batch=3, seed=99)
    with torch.no_grad():
        expected = model(x)
    save_model(model, tmp_path / name, {"name": name, "num_classes": 10, "image_size": 32,
                                        "params": dataclasses.asdict(tiny_params(name, **variant))})

    loaded, config = load_model(tmp_path / name)
    assert config["name"] == name
    assert not loaded.training  # ready for inference: dropout off, BatchNorm running stats used
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got, expected)
    fresh = tiny(name, **variant).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), expected)  # the comparison above is not vacuous


# --- the CPU dropout the ViT's training uses ----------------------------------------------


@pytest.fixture(params=["fused", "pytorch-ops"])
def dropout_path(request, monkeypatch):
    """Each statistical test runs through the fused kernel and through its PyTorch-ops fallback."""
    from vitcnn import kernels

    monkeypatch.setenv("VITCNN_NATIVE_KERNELS", "1" if request.param == "fused" else "0")
    kernels.cpu_kernels.cache_clear()
    yield request.param
    kernels.cpu_kernels.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_drops_a_fraction_p_and_rescales_the_rest(dropout_path, p, dtype):
    from vitcnn.models.layers import Dropout

    torch.manual_seed(0)
    n = 400_000
    x = torch.ones(n, dtype=dtype, requires_grad=True)
    y = Dropout(p).train()(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.005
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    assert abs(y.float().mean().item() - 1) < 0.02  # unbiased: the expectation is the input
    # Each of the four 16-bit slices drawn from one 64-bit word is uniform on its own,
    # and neighbouring positions are independent.
    for offset in range(4):
        assert abs(kept[offset::4].float().mean().item() - (1 - p)) < 0.01
    both = (kept[:-1] & kept[1:]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 0.01
    # The backward pass uses the same mask and scale.
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


def test_dropout_is_the_identity_in_eval_mode_or_at_p_zero(dropout_path):
    from vitcnn.models.layers import Dropout

    x = torch.randn(1000)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_dropout_masks_are_seeded_and_fresh_each_call(dropout_path):
    from vitcnn.models.layers import Dropout

    drop = Dropout(0.5).train()
    x = torch.ones(10_000)
    torch.manual_seed(1)
    a, b = drop(x), drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), a)
    assert not torch.equal(a, b)


def test_vit_trains_with_dropout_and_predicts_without_it():
    model = tiny("vit", dropout=0.5)
    x = images(batch=4)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
