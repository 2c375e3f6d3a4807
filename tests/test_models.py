"""The two models: shapes, the seed's exact parameter counts, gradients, attention paths, save/load."""

from __future__ import annotations

import pytest
import torch

from vitcnn.config import Params
from vitcnn.models import build_model, count_params, load_model, model_kwargs, save_model

TINY = {
    "vit": {"img_size": 32, "patch_size": 4, "embed_dim": 8, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0,
            "dropout": 0.1},
    "cnn": {"channels": [4, 8]},
}
MODELS = ["vit", "cnn"]


def tiny(name: str, num_classes: int = 10, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes, **{**TINY[name], **overrides})


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_is_one_logit_per_class(name, num_classes):
    model = tiny(name, num_classes).eval()
    with torch.no_grad():
        logits = model(images(batch=3))
    assert logits.shape == (3, num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name, expected", [("vit", 1_205_898), ("cnn", 4_694_346)])
def test_default_params_give_the_seed_models_parameter_count(name, expected):
    model = build_model(name, 10, **model_kwargs(name, Params()))
    assert count_params(model) == expected
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter_with_a_finite_gradient(name):
    model = tiny(name).train()
    x, y = images(batch=4), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


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
        logits, maps = model.forward_with_attention(x)
        plain = model(x)
    assert torch.allclose(logits, plain, atol=1e-5, rtol=1e-4)
    assert len(maps) == depth
    for layer in maps:
        assert layer.shape == (2, heads, 1 + grid**2, 1 + grid**2)
        assert (layer >= 0).all()
        assert torch.allclose(layer.sum(-1), torch.ones(2, heads, 1 + grid**2), atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_saved_model_reproduces_the_same_logits(name, tmp_path):
    model = tiny(name)
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
    kwargs = {k: v for k, v in TINY[name].items()}
    save_model(model, tmp_path / name, {"name": name, "num_classes": 10, "kwargs": kwargs})

    loaded, config = load_model(tmp_path / name)
    assert config["name"] == name
    assert not loaded.training  # ready for inference: dropout off, BatchNorm running stats used
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got, expected)
    fresh = tiny(name).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), expected)  # the comparison above is not vacuous


# --- the CPU dropout the ViT's training uses ----------------------------------------------


@pytest.fixture(params=["fused", "pytorch-ops"])
def dropout_path(request, monkeypatch):
    """Each statistical test runs through the fused kernel and through its PyTorch-ops fallback."""
    from vitcnn.models import native

    monkeypatch.setenv("VITCNN_NATIVE_KERNELS", "1" if request.param == "fused" else "0")
    native.cpu_kernels.cache_clear()
    yield request.param
    native.cpu_kernels.cache_clear()


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
