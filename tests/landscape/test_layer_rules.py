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


class TiedTokenModel(nn.Module):
    """A language model whose output layer is its token embedding (``head.weight = tokens.weight``); every
    position sees the mean over the sequence, padding included, so the padding row's embedding gradient would
    not be zero if PyTorch did not leave it out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.tokens = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, input_ids: torch.Tensor) -> dict:
        h = torch.tanh(self.mix(self.tokens(input_ids)))
        return {"logits": self.head(h + h.mean(1, keepdim=True))}


@pytest.mark.parametrize("dim, ghost", [(16, True), (6, False)])
def test_a_weight_tied_between_embedding_and_output_layer_matches_autograd_by_hand(dim, ghost):
    """The tied weight's gradient is the sum of its two uses' (the cross term ``2 <G_emb, G_head>`` in the
    norm, the whole sum in both corrections), with the head's own piece factored or materialised."""
    model, data = TiedTokenModel(dim), token_batch()
    assert _layer_rules._ghost(dim, T, VOCAB) is ghost
    result = m1(model, token_cross_entropy, data, batch_size=4)
    examples = [{k: v[i : i + 1] for k, v in data.items()} for i in range(7)]
    assert result.settings["method"] == "layer_rules"
    np.testing.assert_allclose(result.per_chunk, by_hand(model, examples, token_loss_of), rtol=1e-10, atol=1e-15)


def test_a_weight_tied_between_two_linear_layers_matches_autograd_by_hand():
    model = Tied()
    g = torch.Generator().manual_seed(22)
    X, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    result = m1(model, F.cross_entropy, (X, y))
    assert result.settings["method"] == "layer_rules"
    np.testing.assert_allclose(result.per_chunk, by_hand(model, pairs(X, y), ce_of), rtol=1e-10, atol=1e-15)


def hf_token_data(n: int, vocab: int, length: int) -> dict[str, torch.Tensor]:
    """Right-padded sequences (attention mask 0, labels -100 on the padding); one without any label."""
    g = torch.Generator().manual_seed(23)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[1] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def causal_loss_of(model: nn.Module, one: dict) -> torch.Tensor:
    """The causal LM's own loss in float64 (Hugging Face's casts the logits to float32): each token predicts
    the next one's label."""
    logits = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
    return token_cross_entropy(logits[:, :-1], one["labels"][:, 1:])


def hf_matches_by_hand(model: nn.Module, data: dict, rtol: float) -> None:
    result = m1(model, None, data, batch_size=4)
    examples = [{k: v[i : i + 1] for k, v in data.items()} for i in range(data["input_ids"].shape[0])]
    expected = by_hand(model, examples, causal_loss_of)
    assert result.settings["method"] == "layer_rules"
    assert len(expected) == data["input_ids"].shape[0] - 1
    np.testing.assert_allclose(result.per_chunk, expected, rtol=rtol, atol=1e-15)


@pytest.mark.parametrize("width", [8, 16])  # Conv1D gradients materialised (8) or ghost (16)
def test_a_tiny_gpt2_with_padding_and_its_own_loss_matches_autograd_by_hand(width):
    """transformers' Conv1D, the token embedding tied to the output layer, shared position ids, LayerNorm,
    an attention mask: the model vmap cannot take (its mask code branches on the data)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    assert _layer_rules._ghost(width, 7, 3 * width) is (width == 16)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=width, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    hf_matches_by_hand(model, hf_token_data(6, VOCAB, 7), rtol=1e-9)


def test_gpt2s_output_layer_alone_is_its_tied_token_embedding():
    """``params=["lm_head.weight"]`` names the weight shared with ``transformer.wte``: both uses are perturbed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    data = hf_token_data(5, VOCAB, 7)
    result = m1(model, None, data, params=["lm_head.weight"])
    assert result.settings["method"] == "layer_rules"
    frozen = copy.deepcopy(model)
    for name, p in frozen.named_parameters():
        p.requires_grad_(name == "transformer.wte.weight")
    examples = [{k: v[i : i + 1] for k, v in data.items()} for i in range(5)]
    np.testing.assert_allclose(result.per_chunk, by_hand(frozen, examples, causal_loss_of), rtol=1e-9, atol=1e-15)


def test_a_channels_first_hugging_face_layer_norm_is_refused_and_the_loop_runs(monkeypatch):
    """SqueezeBERT's ``*LayerNorm`` normalises the channels of ``(B, C, T)``: not the last dimension, which the
    check of its form catches before any example is measured (with ``C = T``, so that only the check along a
    second direction can tell)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SqueezeBertConfig(vocab_size=VOCAB, hidden_size=T, embedding_size=T, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=16, max_position_embeddings=8,
                                            num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                            q_groups=1, k_groups=1, v_groups=1, post_attention_groups=1,
                                            intermediate_groups=1, output_groups=1)  # else grouped: refused anyway
    model = transformers.SqueezeBertForSequenceClassification(config).eval()
    data = token_batch(5)
    data = {"input_ids": data["input_ids"], "attention_mask": (data["input_ids"] != 0).long(),
            "labels": torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(25))}
    objective = sharpness.sharpness_objective(model, None, data, dtype=F64)
    with pytest.raises(_layer_rules.Unsupported, match="not affine in its weight channel by channel"):
        _layer_rules.layer_rules(objective, objective.source.first(), 8, 10**9)
    monkeypatch.setattr("landscape.objective._warned", set())  # the warning is given once per process
    with pytest.warns(RuntimeWarning, match="cannot be vmapped"):  # transformers' mask code branches on the data
        result = m1(None, None, None, objective=objective)
    assert result.settings["method"] == "loop"
    examples = [{k: v[i : i + 1] for k, v in data.items()} for i in range(5)]
    np.testing.assert_allclose(result.per_chunk, by_hand(model, examples, lambda m, one: m(**one).loss),
                               rtol=1e-9, atol=1e-15)


def test_a_tiny_gemma_matches_autograd_by_hand():
    """Gemma's scaled token embedding (``z = sqrt(width) W[t]``, tied to the output layer) and its RMSNorm
    ``(1 + w) * xhat``, which rounds the perturbed ``1 + w + eps`` to float32 even in a float64 model (the
    reference's own rounding, not the rules': agreement to 1e-5)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                      max_position_embeddings=8)
    model = transformers.GemmaForCausalLM(config).eval()
    assert type(model.model.embed_tokens).__name__ == "GemmaTextScaledWordEmbedding"
    with torch.no_grad():  # norms away from their initial weights of 0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    hf_matches_by_hand(model, hf_token_data(5, VOCAB, 6), rtol=1e-5)


@pytest.mark.parametrize("family, tied", [("Llama", False), ("Llama", True), ("Qwen2", True)])
def test_tiny_llama_and_qwen2_match_autograd_by_hand(family, tied):
    """Hugging Face's own RMSNorm classes (``xhat`` by a JVP of their forward, which rounds it to float32 even
    in a float64 model, the same rounding as the reference's). Qwen2 adds biases to its query, key and value
    layers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8, tie_word_embeddings=tied)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # norms away from their initial weights of 1
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf_matches_by_hand(model, hf_token_data(5, VOCAB, 6), rtol=1e-9)


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


def step_of(layer: nn.Module, a: torch.Tensor, z_grad: torch.Tensor):
    """The rules' step of one layer owning all its parameters."""
    kind = _layer_rules._kind(layer)
    ruled = _layer_rules._Layer("layer", layer, kind, {local: local for local, _ in layer.named_parameters()})
    return _layer_rules._step_of(kind)(ruled, a, z_grad)


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
    step = step_of(layer, a, z_grad)
    kept = step.ghost if isinstance(step, _layer_rules._Conv) else isinstance(step.weight[0], _layer_rules._Outer)
    assert kept is ghost
    grads = per_example_gradients(layer, a, z_grad)
    expected = sum(t.flatten(1).pow(2).sum(1) for t in grads.values())
    torch.testing.assert_close(step.squared_norm(), expected, rtol=1e-12, atol=0)
    a_new = torch.randn(shape, generator=g, dtype=F64)  # the input at the perturbed point differs
    z = layer(a_new)
    for i in range(shape[0]):
        moved = torch.func.functional_call(layer, {k: v + grads[k][i] for k, v in layer.named_parameters()},
                                           (a_new[i : i + 1],))
        torch.testing.assert_close(z[i : i + 1] + step.correction(a_new, z)[i : i + 1], moved, rtol=1e-12, atol=1e-12)


def as_matrix(g) -> torch.Tensor:
    """A weight gradient ``(E, R, C)`` from whatever form the rules keep it in."""
    if isinstance(g, torch.Tensor):
        return g
    rows = g.rows
    if isinstance(rows, _layer_rules._Ids):
        rows = F.one_hot(rows.ids, rows.n).to(F64)
    return rows.mT @ g.cols


def test_inner_products_and_products_of_factored_one_hot_and_materialised_gradients_are_the_matrices():
    """Every pair of forms a (tied) weight's gradient pieces take, against the matrices themselves."""
    g = torch.Generator().manual_seed(24)
    E, R, C = 3, 7, 5
    ids = _layer_rules._Ids(torch.randint(0, R, (E, 4), generator=g), R, F64)
    forms = {
        "factored": _layer_rules._Outer(torch.randn(E, 6, R, generator=g, dtype=F64),
                                        torch.randn(E, 6, C, generator=g, dtype=F64)),
        "one-hot": _layer_rules._Outer(ids, torch.randn(E, 4, C, generator=g, dtype=F64)),
        "materialised": torch.randn(E, R, C, generator=g, dtype=F64),
    }
    for a in forms.values():
        for b in forms.values():
            torch.testing.assert_close(_layer_rules._inner(a, b), (as_matrix(a) * as_matrix(b)).sum((1, 2)),
                                       rtol=1e-12, atol=1e-12)
    rows_in, cols_in = torch.randn(E, 2, R, generator=g, dtype=F64), torch.randn(E, 2, C, generator=g, dtype=F64)
    ids_in = _layer_rules._Ids(torch.randint(0, R, (E, 3), generator=g), R, F64)
    for form in forms.values():
        G = as_matrix(form)
        torch.testing.assert_close(_layer_rules._met(form, 1, cols_in), cols_in @ G.mT, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_layer_rules._met(form, 0, rows_in), rows_in @ G, rtol=1e-12, atol=1e-12)
        picked = torch.stack([G[e, ids_in.ids[e]] for e in range(E)])
        torch.testing.assert_close(_layer_rules._met(form, 0, ids_in), picked, rtol=1e-12, atol=1e-12)


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


class Unused(nn.Module):
    """A layer that never runs (a head the forward skips): its parameters get no gradient and no step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(26)
        self.fc = nn.Linear(4, 3)
        self.spare = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def test_a_layer_that_never_runs_contributes_nothing():
    g = torch.Generator().manual_seed(27)
    X, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    result = m1(Unused(), F.cross_entropy, (X, y))
    assert result.settings["method"] == "layer_rules"
    np.testing.assert_allclose(result.per_chunk, by_hand(Unused(), pairs(X, y), ce_of), rtol=1e-10, atol=1e-15)


class TiedBias(Tied):
    """A bias shared by two layers: ties are ruled between matrix weights only."""

    def __init__(self) -> None:
        super().__init__()
        self.out.weight = nn.Parameter(self.inp.weight.detach().clone())
        self.out.bias = self.inp.bias


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))[:, :3]


class ConvTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(28)
        self.conv = nn.Conv1d(1, 1, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.conv(torch.tanh(self.conv(x[:, None])))[:, 0])


def test_a_linear_layer_called_twice_matches_autograd_by_hand():
    """Its gradient is the sum over its two calls (the cross term between them in the norm), and both calls
    are corrected with the sum."""
    g = torch.Generator().manual_seed(29)
    X, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    result = m1(Twice(), F.cross_entropy, (X, y))
    assert result.settings["method"] == "layer_rules"
    np.testing.assert_allclose(result.per_chunk, by_hand(Twice(), pairs(X, y), ce_of), rtol=1e-10, atol=1e-15)


def test_albert_whose_layers_are_shared_matches_autograd_by_hand():
    """ALBERT runs one transformer layer (its Linear layers and LayerNorms) three times."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=4, hidden_size=8, num_hidden_layers=3,
                                       num_attention_heads=2, intermediate_size=16, max_position_embeddings=8,
                                       num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                       classifier_dropout_prob=0.0)
    model = transformers.AlbertForSequenceClassification(config).eval()
    data = token_batch(6)
    data = {"input_ids": data["input_ids"], "attention_mask": (data["input_ids"] != 0).long(),
            "labels": torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(30))}
    result = m1(model, None, data, batch_size=4)
    examples = [{k: v[i : i + 1] for k, v in data.items()} for i in range(6)]
    assert result.settings["method"] == "layer_rules"
    np.testing.assert_allclose(result.per_chunk, by_hand(model, examples, lambda m, one: m(**one).loss),
                               rtol=1e-9, atol=1e-15)


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
    "a tied bias": (TiedBias, {}),
    "a convolution called twice": (ConvTwice, {}),
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
    objective = sharpness.sharpness_objective(TiedBias(), F.cross_entropy,
                                              (torch.randn(4, 4), torch.randint(0, 3, (4,))), dtype=F64)
    with pytest.raises(_layer_rules.Unsupported, match=r"'inp.bias' is tied between \['inp.bias', 'out.bias'\]"):
        _layer_rules.layer_rules(objective, objective.source.first(), 4, 10**9)
    objective = sharpness.sharpness_objective(ConvTwice(), F.cross_entropy,
                                              (torch.randn(4, 4), torch.randint(0, 3, (4,))), dtype=F64)
    with pytest.raises(_layer_rules.Unsupported, match=r"conv \(Conv1d\) ran 2 times"):
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_a_tiny_gpt2_keeps_the_rules_and_matches_the_cpu():
    """The tied embedding and output layer, Conv1D and the attention kernels of a GPU, in float32 with TF32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    data = hf_token_data(48, 64, 16)
    cpu = m1(model, None, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gpu = sharpness.m_sharpness(model, None, data, m=1, rho=RHO, device="cuda", progress=False)
    assert gpu.settings["method"] == "layer_rules"
    np.testing.assert_allclose(gpu.per_chunk, cpu.per_chunk, rtol=2e-2, atol=5e-3)

