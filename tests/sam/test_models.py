"""Tests for sam.models: registry, shapes, parameter counts, skip/BN variants, init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sam.models import (
    MODELS,
    CifarResNet,
    WideResNet,
    available_models,
    build_model,
)

# Parameter counts with 10 classes and BatchNorm.
PARAM_COUNTS = {
    "digits_cnn": 56_554,
    # Greydanus & Kobak (2024): 40*100+100 + 100*100+100 + 100*10+10, and 1*25*5+25 + 2*(25*25*3+25) + 125*10+10
    "mnist1d_mlp": 15_210,
    "mnist1d_cnn": 5_210,
    # Option-A (parameter-free) shortcuts.  He et al. (2016) Table 6 gives
    # "0.27M"; 269,722 is also what e.g. akamaster/pytorch_resnet_cifar10
    # prints.  The often-quoted 272,474 is the option-B count (1x1 projection
    # conv + BN at the two stage transitions: 2,560 + 192 = 2,752 more).
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet56": 853_018,
    "wrn16_8": 10_961_370,
    # Same count as the reference WRN implementations (e.g. xternalz/WideResNet-pytorch),
    # the "36.5M" of Zagoruyko & Komodakis (2016), Table 4.
    "wrn28_10": 36_479_194,
    "wrn40_10": 55_841_754,
}
BIG = {"wrn28_10", "wrn40_10"}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _input(name: str, batch: int) -> torch.Tensor:
    shape = {"digits_cnn": (1, 8, 8), "mnist1d_mlp": (1, 40), "mnist1d_cnn": (1, 40)}.get(name, (3, 32, 32))
    return torch.randn(batch, *shape)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #
def test_registry_names() -> None:
    assert available_models() == sorted(PARAM_COUNTS)
    assert set(MODELS) == set(PARAM_COUNTS)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError) as err:
        build_model("resnet18")
    msg = str(err.value)
    assert "'resnet18'" in msg
    assert ", ".join(sorted(PARAM_COUNTS)) in msg


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.0}, "num_classes"),
        ({"in_channels": -1}, "in_channels"),
        ({"batchnorm": "no"}, "batchnorm"),
        ({"skip": 0}, "skip"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        build_model("resnet20", **kwargs)


def test_unsupported_skip_flag_for_digits() -> None:
    with pytest.raises(ValueError, match="skip=False.*digits_cnn"):
        build_model("digits_cnn", skip=False)


def test_bad_depths() -> None:
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(27, 10)


# --------------------------------------------------------------------------- #
# Shapes and parameter counts
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count_and_forward_shape(name: str) -> None:
    model = build_model(name).eval()
    assert _count(model) == PARAM_COUNTS[name]
    batch = 1 if name in BIG else 2
    with torch.no_grad():
        out = model(_input(name, batch))
    assert out.shape == (batch, 10)
    assert torch.isfinite(out).all()


def test_num_classes_and_in_channels_are_honoured() -> None:
    digits = build_model("digits_cnn")
    assert digits.conv1.in_channels == 1  # model default, not 3
    digits_rgb = build_model("digits_cnn", in_channels=3, num_classes=4)
    assert digits_rgb(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    resnet = build_model("resnet20", num_classes=100, in_channels=1)
    assert resnet(torch.randn(2, 1, 32, 32)).shape == (2, 100)


def test_train_mode_forward_backward() -> None:
    model = build_model("resnet20")
    loss = model(_input("resnet20", 4)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------- #
# skip=False
# --------------------------------------------------------------------------- #
def _blocks(model: nn.Module) -> list[nn.Module]:
    return [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]


@torch.no_grad()
def _zero_last_stage_branches(model: nn.Module) -> None:
    for block in model.layer3:
        block.conv1.weight.zero_()
        block.conv2.weight.zero_()


@pytest.mark.parametrize("name", ["resnet20", "wrn16_8"])
def test_skip_false_removes_shortcuts(name: str) -> None:
    with_skip = build_model(name).eval()
    no_skip = build_model(name, skip=False).eval()
    assert all(b.shortcut is not None for b in _blocks(with_skip))
    assert all(b.shortcut is None for b in _blocks(no_skip))
    if name.startswith("resnet"):  # option-A shortcuts have no parameters
        assert _count(no_skip) == _count(with_skip)
    else:  # the WRN loses its three 1x1 shortcut convs (16->128, 128->256, 256->512)
        assert _count(no_skip) == _count(with_skip) - (16 * 128 + 128 * 256 + 256 * 512)

    # Behaviour: with the last stage's residual branches zeroed, only the
    # shortcuts can carry information about the input to the output.
    x1, x2 = _input(name, 2), _input(name, 2)
    for model, depends in ((with_skip, True), (no_skip, False)):
        _zero_last_stage_branches(model)
        with torch.no_grad():
            y1, y2 = model(x1), model(x2)
        assert (not torch.allclose(y1, y2)) is depends
        if not depends:
            assert torch.allclose(y1, y1[:1].expand_as(y1))


# --------------------------------------------------------------------------- #
# batchnorm=False
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("name", "skip"),
    [("digits_cnn", True), ("resnet56", True), ("resnet56", False), ("wrn16_8", True)],
)
def test_no_batchnorm_forward_is_sane(name: str, skip: bool) -> None:
    model = build_model(name, batchnorm=False, skip=skip)
    assert not _has_batchnorm(model)
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        out = model(_input(name, 8))  # train mode: no BN, so same as eval
    assert torch.isfinite(out).all()
    assert 1e-3 < out.std().item() < 10.0


def test_no_batchnorm_without_scaling_would_explode() -> None:
    """Sanity check of the premise behind the scaled residual-branch init."""
    model = build_model("resnet56", batchnorm=False)
    with torch.no_grad():
        for block in _blocks(model):
            nn.init.kaiming_normal_(block.conv2.weight, mode="fan_out", nonlinearity="relu")
        out = model(_input("resnet56", 8))
    assert out.std().item() > 100.0


# --------------------------------------------------------------------------- #
# Initialisation, determinism, functional_call
# --------------------------------------------------------------------------- #
def test_init() -> None:
    model = build_model("resnet32")
    conv = model.layer3[1].conv1  # 64 -> 64, fan_out = 64 * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "wrn16_8"])
def test_eval_mode_is_deterministic(name: str) -> None:
    model = build_model(name).eval()
    x = _input(name, 2)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_functional_call() -> None:
    model = build_model("resnet20").eval()
    x = _input("resnet20", 2)
    params = {k: v.detach() * 1.1 for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    out = functional_call(model, (params, buffers), (x,))
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k])
        expected = model(x)
    torch.testing.assert_close(out, expected)

    # Gradients w.r.t. the dict of parameters flow through functional_call.
    leaf = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    functional_call(model, (leaf, buffers), (x,)).sum().backward()
    assert all(v.grad is not None for v in leaf.values())


@pytest.mark.parametrize("name", ["mnist1d_mlp", "mnist1d_cnn"])
def test_mnist1d_models_have_no_skip_switch_and_no_batchnorm(name: str) -> None:
    with pytest.raises(ValueError, match=f"skip=False is not supported by '{name}'"):
        build_model(name, skip=False)
    assert not _has_batchnorm(build_model(name))
    # the flag changes nothing: the same architecture, parameter for parameter
    a, b = build_model(name), build_model(name, batchnorm=False)
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]


def test_mnist1d_cnn_is_three_strided_convolutions_down_to_five_positions() -> None:
    model = build_model("mnist1d_cnn", num_classes=7, in_channels=2)
    assert [m.stride for m in model.modules() if isinstance(m, nn.Conv1d)] == [(2,), (2,), (2,)]
    assert model.fc.in_features == 25 * 5 and model.fc.out_features == 7
    assert model(torch.randn(3, 2, 40)).shape == (3, 7)
