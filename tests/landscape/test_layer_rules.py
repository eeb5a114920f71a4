"""m = 1 sharpness by per-layer rules (:mod:`landscape._layer_rules`) against plain autograd, example by example.

The reference perturbs a float64 copy of the module in place with each example's own SAM step (its gradient
by ``loss.backward()``), as one would by hand: no vmap, no functional calls, no rules. Where the rules do not
cover a model, ``m_sharpness`` must say so (``settings["method"]``) and still equal the loop.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import _layer_rules, sharpness
from landscape.batches import take, token_cross_entropy

F64 = torch.float64
RHO = 0.05


def by_hand(model: nn.Module, examples: list, loss_of, rho: float = RHO) -> np.ndarray:
    """``l_i(w + rho g_i / ||g_i||) - l_i(w)`` for every example with a loss term (plain autograd, float64)."""
    out = []
    for one in examples:
        copied = copy.deepcopy(model).to(F64).eval()
        params = [p for p in copied.parameters() if p.requires_grad]
        loss = loss_of(copied, one)
        if not torch.isfinite(loss):
            continue
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(rho * g / norm)
            out.append(float(loss_of(copied, one) - loss))
    return np.asarray(out)


def pairs(X: torch.Tensor, y: torch.Tensor) -> list:
    return [(X[i : i + 1], y[i : i + 1]) for i in range(len(y))]


def ce_of(model: nn.Module, one) -> torch.Tensor:
    return F.cross_entropy(model(one[0].to(F64)), one[1])


def m1(model, loss_fn, data, **kw):
    if "objective" not in kw:
        kw["dtype"] = F64
    return sharpness.m_sharpness(model, loss_fn, data, m=1, rho=RHO, progress=False, **kw)


# ------------------------------------------------------------------------------------------ models
class ConvNet(nn.Module):
    """Convolutions with padding, stride, dilation and a rectangular kernel; BatchNorm (running statistics)
    followed by an in-place ReLU, GroupNorm; a Linear head. Layer shapes make the rules materialise the
    first convolution's per-example gradient and use ghost norms for the other two and the head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding="same")  # P 64: 64 (27 + 8) > 27 * 8, materialised
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)  # P 9: 9 (72 + 16) < 72 * 16, ghost
        self.gn = nn.GroupNorm(4, 16)
        self.conv3 = nn.Conv2d(16, 12, (2, 3), padding=(1, 0), dilation=(2, 1), bias=False)  # P 3, ghost
        self.head = nn.Linear(36, 5)
        with torch.no_grad():  # running statistics and affine maps away from the identity
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.bn(self.conv1(x)), inplace=True)
        x = torch.relu(self.gn(self.conv2(x)))
        return self.head(torch.flatten(torch.tanh(self.conv3(x)), 1))


def conv1d_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv1d(2, 4, 5, stride=2, padding=1), nn.ReLU(), nn.Conv1d(4, 6, 3, dilation=2, padding=2),
                         nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8, 3)).eval()


VOCAB, T = 11, 6


class TokenModel(nn.Module):
    """Token and position embeddings (positions shared by every example: ids ``[1, T]``), LayerNorm, a
    Linear layer on every token, RMSNorm and a head: logits ``[B, T, V]``."""

    def __init__(self, own_loss: bool = False) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.tokens = nn.Embedding(VOCAB, 6, padding_idx=0)
        self.positions = nn.Embedding(T, 6)
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 6)
        self.rms = nn.RMSNorm(6)
        self.head = nn.Linear(6, VOCAB)
        self.own_loss = own_loss

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        h = self.norm(self.tokens(input_ids) + self.positions(torch.arange(input_ids.shape[1])[None]))
        logits = self.head(self.rms(torch.tanh(self.mix(h))))
        out = {"logits": logits}
        if self.own_loss and labels is not None:  # a causal language model's own loss, Hugging Face style
            out["loss"] = token_cross_entropy(logits[:, :-1], labels[:, 1:])
        return out


def token_batch(n: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    lengths = torch.tensor([T, 3, 5, 2, T, 4, 1][:n])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return {"input_ids": ids * mask, "labels": torch.where(mask, ids, torch.full_like(ids, -100))}


# ------------------------------------------------------------------------------ against the reference
def test_convolutions_batchnorm_groupnorm_and_an_in_place_relu_match_autograd_by_hand():
    model = ConvNet().eval()
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(13, 3, 8, 8, generator=g), torch.randint(0, 5, (13,), generator=g)
    result = m1(model, F.cross_entropy, (X, y), examples_per_call=5)
    assert result.settings["method"] == "layer_rules" and result.settings["chunks_per_call"] == 5
    np.testing.assert_allclose(result.per_chunk, by_hand(model, pairs(X, y), ce_of), rtol=1e-10, atol=1e-15)
    assert np.all(result.per_chunk > 0)


def test_conv1d_with_stride_dilation_and_batchnorm1d_matches_autograd_by_hand():
    model = conv1d_net()
    with torch.no_grad():
        model[3].running_mean.uniform_(-0.5, 0.5)
        model[3].running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(9, 2, 17, generator=g), torch.randint(0, 3, (9,), generator=g)
    result = m1(model, F.cross_entropy, (X, y))
    assert result.settings["method"] == "layer_rules"
    np.testing.assert_allclose(result.per_chunk, by_hand(model, pairs(X, y), ce_of), rtol=1e-10, atol=1e-15)


def token_loss_of(model: nn.Module, one: dict) -> torch.Tensor:
    return token_cross_entropy(model(one["input_ids"])["logits"], one["labels"])


def test_token_losses_with_padding_embeddings_and_norms_match_autograd_by_hand():
    """Each sequence's own mean over its tokens; the padding row of the embedding gets no gradient; the
    position embedding is shared by every example (ids ``[1, T]``); a sequence without tokens is left out."""
    model, data = TokenModel(), token_batch()
    data["labels"][3] = -100
    result = m1(model, token_cross_entropy, data, batch_size=4)
    examples = [{k: v[i : i + 1] for k, v in data.items()} for i in range(7)]
    expected = by_hand(model, examples, token_loss_of)
    assert result.settings["method"] == "layer_rules" and result.settings["n_chunks"] == 6 == len(expected)
    np.testing.assert_allclose(result.per_chunk, expected, rtol=1e-10, atol=1e-15)


def test_the_models_own_causal_loss_is_taken_per_example():
    model, data = TokenModel(own_loss=True), token_batch()
    result = m1(model, None, data)
    examples = [{k: v[i : i + 1] for k, v in data.items()} for i in range(7)]
    expected = by_hand(model, examples, lambda m, one: m(**one)["loss"])
    assert result.settings["method"] == "layer_rules"
    assert len(expected) == 6  # the one-token sequence has no next token to predict
    np.testing.assert_allclose(result.per_chunk, expected, rtol=1e-10, atol=1e-15)


def test_a_tiny_bert_with_its_own_loss_matches_autograd_by_hand():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config).eval()
    data = token_batch(6)
    mask = (data["input_ids"] != 0).long()
    data = {"input_ids": data["input_ids"], "attention_mask": mask,
            "labels": torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(6))}
    result = m1(model, None, data, batch_size=4)
    examples = [{k: v[i : i + 1] for k, v in data.items()} for i in range(6)]
    assert result.settings["method"] == "layer_rules"
    np.testing.assert_allclose(result.per_chunk, by_hand(model, examples, lambda m, one: m(**one).loss),
                               rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_a_resnet18_from_torchvision_or_timm_matches_autograd_by_hand(library):
    """Residual blocks with in-place ReLUs after BatchNorm, strided 1x1 downsampling, global pooling."""
    torch.manual_seed(0)
    if library == "torchvision":
        model = pytest.importorskip("torchvision").models.resnet18(num_classes=3)
    else:
        model = pytest.importorskip("timm").create_model("resnet18", pretrained=False, num_classes=3)
    model.eval()
    g = torch.Generator().manual_seed(18)
    X, y = torch.randn(3, 3, 16, 16, generator=g), torch.randint(0, 3, (3,), generator=g)
    result = m1(model, F.cross_entropy, (X, y))
    assert result.settings["method"] == "layer_rules"
    np.testing.assert_allclose(result.per_chunk, by_hand(model, pairs(X, y), ce_of), rtol=1e-9, atol=1e-15)


def test_only_the_selected_parameters_are_perturbed():
    model = ConvNet().eval()
    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    selected = ["conv2.weight", "gn.bias", "head.bias"]
    frozen = copy.deepcopy(model)
    for name, p in frozen.named_parameters():
        p.requires_grad_(name in selected)
    result = m1(model, F.cross_entropy, (X, y), params=selected)
    assert result.settings["method"] == "layer_rules"
    np.testing.assert_allclose(result.per_chunk, by_hand(frozen, pairs(X, y), ce_of), rtol=1e-10, atol=1e-15)


# -------------------------------------------------------------------------------- the pieces alone
def per_example_gradients(layer: nn.Module, a: torch.Tensor, z_grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent reference: the gradient of ``<layer(a_i), z_grad_i>`` for each example with torch.func."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def inner(p, x, d):
        return (torch.func.functional_call(layer, p, (x[None],))[0] * d).sum()

    return torch.vmap(torch.func.grad(inner), in_dims=(None, 0, 0))(params, a, z_grad)


@pytest.mark.parametrize("layer, shape, ghost", [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1), (5, 4, 7, 7), False),  # P 16: 16 (36 + 6) > 36 * 6
    (nn.Conv2d(16, 16, 3), (5, 16, 4, 4), True),  # P 4: 4 (144 + 16) < 144 * 16
    (nn.Conv1d(8, 8, 3, padding=1), (5, 8, 3), True),
    (nn.Linear(10, 7), (5, 4, 10), True),  # 4 tokens
    (nn.Linear(3, 2), (5, 9, 3), False),
])
def test_ghost_or_materialised_norms_and_corrections_are_the_per_example_gradients(layer, shape, ghost):
    layer = layer.to(F64)
    g = torch.Generator().manual_seed(8)
    a = torch.randn(shape, generator=g, dtype=F64)
    z_grad = torch.randn(layer(a).shape, generator=g, dtype=F64)
    step = _layer_rules._Dense.of(layer, {"weight", "bias"}, a, z_grad)
    assert step.ghost is ghost
    grads = per_example_gradients(layer, a, z_grad)
    expected = sum(t.flatten(1).pow(2).sum(1) for t in grads.values())
    torch.testing.assert_close(step.squared_norm(), expected, rtol=1e-12, atol=0)
    a_new = torch.randn(shape, generator=g, dtype=F64)  # the input at the perturbed point differs
    z = layer(a_new)
    for i in range(shape[0]):
        moved = torch.func.functional_call(layer, {k: v + grads[k][i] for k, v in layer.named_parameters()},
                                           (a_new[i : i + 1],))
        torch.testing.assert_close(z[i : i + 1] + step.correction(a_new, z)[i : i + 1], moved, rtol=1e-12, atol=1e-12)


def test_the_kept_values_bound_the_examples_per_call():
    model = ConvNet().eval()
    g = torch.Generator().manual_seed(9)
    X, y = torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 5, (10,), generator=g)
    objective = sharpness.sharpness_objective(model, F.cross_entropy, (X, y), dtype=F64)
    rules = _layer_rules.layer_rules(objective, objective.source.first(), 64, element_budget=10**9)
    assert rules.examples_per_call == 64
    per_example = rules.elements_per_example
    small = _layer_rules.layer_rules(objective, objective.source.first(), 64, element_budget=3 * per_example + 1)
    assert small.examples_per_call == 3
    whole = m1(None, None, None, objective=objective)
    split = m1(None, None, None, objective=objective, examples_per_call=3)
    assert split.settings["chunks_per_call"] == 3
    np.testing.assert_allclose(split.per_chunk, whole.per_chunk, rtol=1e-12)


# ------------------------------------------------------------------------------------- fallbacks
class ExtraScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(10)
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.fc(x) * self.scale


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.inp = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)
        self.out.weight = self.inp.weight

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))[:, :3]


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))[:, :3]


class WeightUsedOutside(nn.Module):
    """``fc``'s weight also enters through ``F.linear``, which no hook sees: only the check against the loop
    can tell."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + 0.5 * F.linear(x, self.fc.weight)


def grouped() -> nn.Module:
    torch.manual_seed(16)
    return nn.Sequential(nn.Unflatten(1, (4, 1)), nn.Conv1d(4, 6, 1, groups=2), nn.Flatten(), nn.Linear(6, 3))


def even_same() -> nn.Module:
    torch.manual_seed(19)
    return nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 2, padding="same"), nn.Flatten(), nn.Linear(8, 3))


def linear() -> nn.Module:
    torch.manual_seed(17)
    return nn.Linear(4, 3)


FALLBACKS = {
    "a parameter outside any module": (ExtraScale, {}),
    "tied weights": (Tied, {}),
    "a module called twice": (Twice, {}),
    "a grouped convolution": (grouped, {}),
    "padding='same' with an even kernel": (even_same, {}),
    "adaptive": (ExtraScale, {"adaptive": True}),
    "p = inf": (Twice, {"p": math.inf}),
    "two steps": (Twice, {"steps": 2}),
    "layer_rules=False": (linear, {"layer_rules": False}),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_models_outside_the_rules_use_vmap_and_equal_the_loop(case):
    build, kwargs = FALLBACKS[case]
    g = torch.Generator().manual_seed(14)
    data = (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent fallback: no warning of ours
        warnings.filterwarnings("ignore", message="Using padding='same' with even kernel")  # PyTorch's own
        batched = m1(build(), F.cross_entropy, data, **kwargs)
    looped = m1(build(), F.cross_entropy, data, batched=False, **kwargs)
    assert batched.settings["method"] == "vmap", case
    np.testing.assert_allclose(batched.per_chunk, looped.per_chunk, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("first_without_terms", [0, 2, 5])
def test_a_weight_used_outside_its_module_fails_the_check_and_falls_back_with_a_warning(first_without_terms,
                                                                                      monkeypatch):
    """The check compares examples that have loss terms, however many of the first ones have none."""
    monkeypatch.setattr("landscape.objective._warned", set())  # the warning is given once per process
    g = torch.Generator().manual_seed(15)
    X, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    y[:first_without_terms] = -100  # cross_entropy's ignore_index: NaN losses, left out
    objective = sharpness.sharpness_objective(WeightUsedOutside(), F.cross_entropy, (X, y), dtype=F64)
    rules = _layer_rules.layer_rules(objective, objective.source.first(), 8, 10**9)  # the structure passes
    base, best = rules.sam_losses(objective.source.first(), RHO, RHO)
    expected = by_hand(WeightUsedOutside(), pairs(X, y), ce_of)
    increase = (best - base)[first_without_terms:].numpy()
    assert not np.allclose(increase, expected, rtol=1e-3)  # the rules alone are wrong here
    with pytest.warns(RuntimeWarning, match="disagree with the loop"):
        result = m1(None, None, None, objective=objective, examples_per_call=3)
    assert result.settings["method"] == "vmap"
    np.testing.assert_allclose(result.per_chunk, expected, rtol=1e-10)


def test_an_unsupported_model_is_named():
    objective = sharpness.sharpness_objective(ExtraScale(), F.cross_entropy,
                                              (torch.randn(4, 4), torch.randint(0, 3, (4,))), dtype=F64)
    with pytest.raises(_layer_rules.Unsupported, match=r"no rule covers \['scale'\] of the model \(ExtraScale\)"):
        _layer_rules.layer_rules(objective, objective.source.first(), 4, 10**9)
    objective = sharpness.sharpness_objective(Tied(), F.cross_entropy,
                                              (torch.randn(4, 4), torch.randint(0, 3, (4,))), dtype=F64)
    with pytest.raises(_layer_rules.Unsupported, match="tied"):
        _layer_rules.layer_rules(objective, objective.source.first(), 4, 10**9)
    objective = sharpness.sharpness_objective(Twice(), F.cross_entropy,
                                              (torch.randn(4, 4), torch.randint(0, 3, (4,))), dtype=F64)
    with pytest.raises(_layer_rules.Unsupported, match="fc ran 2 times"):
        _layer_rules.layer_rules(objective, take(objective.source.first(), slice(0, 2)), 4, 10**9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_rules_run_in_float32_with_tf32_on_and_match_the_cpu():
    """cuDNN's TF32 convolutions must not make the check against the loop drop the rules."""
    model = ConvNet().eval()
    g = torch.Generator().manual_seed(20)
    X, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 5, (64,), generator=g)
    cpu = m1(model, F.cross_entropy, (X, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpu = sharpness.m_sharpness(model, F.cross_entropy, (X, y), m=1, rho=RHO, device="cuda", progress=False)
    assert gpu.settings["method"] == "layer_rules"
    np.testing.assert_allclose(gpu.per_chunk, cpu.per_chunk, rtol=2e-2, atol=5e-3)  # TF32 convolutions
