"""The batch protocol: every form of batch and output, exact weighting of token-level losses with padding,
accuracy where it is defined, streamed data, parameter subsets and compiled models, against float64
references computed on the whole dataset at once."""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from landscape import hessian, sharpness, surface
from landscape.batches import BatchError, token_cross_entropy
from landscape.objective import NondeterministicObjective, Objective, ParamLayout

F64 = torch.float64
VOCAB, T = 7, 6


class TinyLM(nn.Module):
    """Token embeddings, a tanh and a head: logits ``[B, T, V]`` (a dict with ``logits``, as HF models give)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        h = torch.tanh(self.mix(self.emb(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.head(h)}


class Output(OrderedDict):
    """A stand-in for a Hugging Face ``ModelOutput``: a mapping with attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class TinyCausalLM(TinyLM):
    """Computes its own loss as a causal LM does: position t's logits against label t + 1."""

    def forward(self, input_ids, attention_mask=None, labels=None):  # type: ignore[override]
        logits = super().forward(input_ids, attention_mask)["logits"]
        out = Output(logits=logits)
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        return out


def padded_tokens(n: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """``n`` sequences of lengths 2..6 padded to 6: labels -100 on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def as_list(data: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = data["labels"].shape[0]
    return [{k: v[s : s + size] for k, v in data.items()} for s in range(0, n, size)]


def token_reference(model: nn.Module, data: dict[str, torch.Tensor], shift: int = 0) -> tuple[float, float, int]:
    """Mean loss and accuracy over every real token of the dataset, in one float64 pass."""
    reference = copy.deepcopy(model).to(F64).eval()
    with torch.no_grad():
        logits = TinyLM.forward(reference, data["input_ids"], data["attention_mask"])["logits"]
    labels = data["labels"]
    if shift:
        logits, labels = logits[:, :-shift], labels[:, shift:]
    real = labels != -100
    loss = F.cross_entropy(logits[real], labels[real])
    return float(loss), float((logits.argmax(-1)[real] == labels[real]).double().mean()), int(real.sum())


# ------------------------------------------------------------------------------------- weighting


class TokenDataset(Dataset):
    """A map-style dataset of dict examples, as Hugging Face datasets give them (collated into dict batches)."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data["labels"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


@pytest.mark.parametrize("batching", ["one", "pairs", "threes", "list", "loader", "stream"])
def test_a_token_level_loss_with_padding_is_the_mean_over_real_tokens_however_batched(batching):
    model, data = TinyLM(), padded_tokens()
    expected_loss, expected_accuracy, tokens = token_reference(model, data)
    form = {
        "one": dict(data=data),
        "pairs": dict(data=data, batch_size=2),
        "threes": dict(data=data, batch_size=3),
        "list": dict(data=as_list(data, 4)),
        "loader": dict(data=DataLoader(TokenDataset(data), batch_size=4)),
        "stream": dict(data=DataLoader(TokenDataset(data), batch_size=2), stream=True),
    }[batching]
    objective = Objective(model, token_cross_entropy, dtype=F64, **form)
    loss, accuracy = objective.loss_and_accuracy()
    assert objective.n_terms == tokens and objective.n_examples == 9
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    assert accuracy == pytest.approx(expected_accuracy, rel=1e-12)
    assert objective.stream == (batching == "stream")


def test_the_old_per_sequence_weighting_would_differ_so_the_test_above_can_fail():
    model, data = TinyLM(), padded_tokens()
    expected, _, _ = token_reference(model, data)
    objective = Objective(model, token_cross_entropy, data, dtype=F64, batch_size=2,
                          weight=lambda batch: batch["labels"].shape[0])  # sequences, not tokens
    assert abs(float(objective.loss()) - expected) > 1e-3


def test_the_models_own_causal_loss_is_counted_over_shifted_labels():
    model, data = TinyCausalLM(), padded_tokens()
    expected_loss, expected_accuracy, tokens = token_reference(model, data, shift=1)
    for size in (1, 4, 9):
        objective = Objective(model, None, data, dtype=F64, batch_size=size)
        assert objective.protocol.label_shift == 1 and objective.n_terms == tokens
        loss, accuracy = objective.loss_and_accuracy()
        assert loss == pytest.approx(expected_loss, rel=1e-12)
        assert accuracy == pytest.approx(expected_accuracy, rel=1e-12)


def test_a_model_loss_that_is_not_a_token_mean_is_refused_without_weight():
    class Smoothed(TinyCausalLM):
        def forward(self, input_ids, attention_mask=None, labels=None):  # type: ignore[override]
            out = super().forward(input_ids, attention_mask, labels)
            out["loss"] = F.cross_entropy(out["logits"][:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                          ignore_index=-100, label_smoothing=0.2)
            return out

    with pytest.raises(BatchError, match="not the mean cross-entropy over its non-ignored labels.*pass weight="):
        Objective(Smoothed(), None, padded_tokens(), dtype=F64)
    objective = Objective(Smoothed(), None, padded_tokens(), dtype=F64, weight=lambda b: (b["labels"][:, 1:] != -100).sum())
    assert math.isfinite(float(objective.loss()))


# ------------------------------------------------------------------------ inputs and outputs


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


def two_input_data(n: int = 10):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("form", ["tuple", "list", "dict", "forward"])
def test_multi_input_batches_reach_the_model_as_positional_keyword_or_custom_arguments(form):
    x, z, y = two_input_data()
    model = TwoInputs()
    with torch.no_grad():
        expected = F.cross_entropy(model.double()(x.double(), z.double()), y).item()
    model = TwoInputs()
    batches = {
        "tuple": [((x[:6], z[:6]), y[:6]), ((x[6:], z[6:]), y[6:])],
        "list": [([x, z], y)],
        "dict": [({"x": x[:3], "z": z[:3]}, y[:3]), ({"x": x[3:], "z": z[3:]}, y[3:])],
        "forward": [{"first": x, "second": z, "y": y}],
    }[form]
    kwargs = {}
    if form == "forward":
        kwargs = dict(forward=lambda m, b: m(b["first"], b["second"]), target=lambda b: b["y"])
    objective = Objective(model, F.cross_entropy, batches, dtype=F64, **kwargs)
    assert float(objective.loss()) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("wrap", [lambda t: t, lambda t: (t, "extra"), lambda t: {"logits": t, "aux": 1},
                                  lambda t: Output(logits=t)], ids=["tensor", "tuple", "dict", "model-output"])
def test_every_output_form_gives_the_same_loss_accuracy_and_surface(wrap):
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

        def forward(self, x):
            return wrap(self.net(x))

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g)
    plain = Objective(Wrapped().net, F.cross_entropy, (X, y), dtype=F64)
    objective = Objective(Wrapped(), F.cross_entropy, (X, y), dtype=F64, batch_size=7)
    assert objective.loss_and_accuracy() == pytest.approx(plain.loss_and_accuracy(), rel=1e-12)
    line = surface.slice_1d(Wrapped(), F.cross_entropy, (X, y), steps=3, dtype=F64, progress=False, points_per_pass=3)
    assert line.loss[1] == pytest.approx(plain.loss_and_accuracy()[0], rel=1e-12)
    assert line.accuracy[1] == pytest.approx(plain.loss_and_accuracy()[1], rel=1e-12)


def test_accuracy_is_nan_where_it_is_not_defined_never_zero():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 4, generator=g)
    regression = Objective(nn.Linear(4, 1), lambda out, y: F.mse_loss(out.squeeze(-1), y), (X, torch.randn(12)))
    soft = Objective(nn.Linear(4, 3), F.cross_entropy, (X, torch.softmax(torch.randn(12, 3), -1)))
    # scores [12, 6] that the loss reads as two positions of 3 classes: they do not line up with the [12, 2] target
    misaligned = Objective(nn.Linear(4, 6), lambda out, y: F.cross_entropy(out.reshape(-1, 3), y.reshape(-1)),
                           (X, torch.randint(0, 3, (12, 2), generator=g)))
    for objective in (regression, soft, misaligned):
        loss, accuracy = objective.loss_and_accuracy()
        assert math.isfinite(loss) and math.isnan(accuracy)
    line = surface.slice_1d(nn.Linear(4, 1), lambda out, y: F.mse_loss(out.squeeze(-1), y), (X, torch.randn(12)), steps=3,
                            progress=False, points_per_pass=3)
    assert np.isnan(line.accuracy).all() and np.isfinite(line.loss).all()


@pytest.mark.parametrize("batch, message", [
    (torch.zeros(4, 5), "must be an \\(inputs, target\\) pair.*got a Tensor"),
    ((torch.zeros(4, 5), torch.zeros(4), torch.zeros(4)), "got a tuple of 3"),
    (("text", torch.zeros(4)), "inputs must be a Tensor, a tuple or list, or a dict; got str"),
    ({"input_ids": torch.zeros(4, 3)}, "Mapping without 'labels'"),
])
def test_a_bad_batch_names_what_was_expected(batch, message):
    with pytest.raises(BatchError, match=message):
        Objective(nn.Linear(5, 3), F.cross_entropy, [batch])


def test_a_pair_with_the_models_own_loss_and_a_mapping_without_logits_are_explained():
    with pytest.raises(BatchError, match="loss_fn=None takes the loss from the model"):
        Objective(nn.Linear(5, 3), None, [(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))])

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return {"features": self.lin(x)}

    with pytest.raises(BatchError, match="mapping without 'logits' \\(keys \\['features'\\]\\)"):
        Objective(Features(), F.cross_entropy, (torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)))


# ----------------------------------------------------------------------------- streaming


class Synthetic(Dataset):
    """Examples made on the fly from their index (no memory held): a dataset of any size."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(5, generator=g), int(torch.randint(0, 3, (), generator=g))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def dense_hessian(model: nn.Module, X: torch.Tensor, y: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
    reference = copy.deepcopy(model).to(F64)
    params = {k: v.detach() for k, v in reference.named_parameters()}
    chosen = {k: v for k, v in params.items() if names is None or k in names}
    layout = ParamLayout.of(chosen)

    def loss(flat):
        return F.cross_entropy(torch.func.functional_call(reference, {**params, **layout.unflatten(flat)}, (X.to(F64),)), y)

    return torch.func.hessian(loss)(layout.flatten(chosen))


def test_streamed_data_give_the_kept_datas_numbers_and_the_dense_hessians_eigenvalues():
    loader = DataLoader(Synthetic(64), batch_size=16)
    X = torch.stack([Synthetic(64)[i][0] for i in range(64)])
    y = torch.tensor([Synthetic(64)[i][1] for i in range(64)])
    kept = Objective(mlp(), F.cross_entropy, loader, dtype=F64)
    streamed = Objective(mlp(), F.cross_entropy, loader, dtype=F64, stream=True)
    assert not kept.stream and streamed.stream
    assert float(streamed.loss()) == pytest.approx(float(kept.loss()), rel=1e-13)
    v = {k: torch.randn_like(t) for k, t in kept.params.items()}
    torch.testing.assert_close(kept.layout.flatten(streamed.hvp(v)), kept.layout.flatten(kept.hvp(v)), rtol=1e-12,
                               atol=1e-14)
    dense = torch.linalg.eigvalsh(dense_hessian(mlp(), X, y)).flip(0)[:3]
    top = hessian.top_eigenvalues(mlp(), F.cross_entropy, loader, k=3, tol=1e-10, dtype=F64, stream=True, progress=False)
    torch.testing.assert_close(top.eigenvalues, dense, rtol=1e-8, atol=1e-12)


def test_data_above_the_memory_budget_are_streamed_by_default():
    loader = DataLoader(Synthetic(64), batch_size=16)
    one_batch = 16 * (5 * 8 + 8)  # float64 inputs after the cast, int64 targets; 4 batches in all
    assert Objective(mlp(), F.cross_entropy, loader, dtype=F64, memory_budget=4 * one_batch - 1).stream
    assert not Objective(mlp(), F.cross_entropy, loader, dtype=F64, memory_budget=4 * one_batch).stream


def test_streamed_data_take_the_leaner_product_without_trying_the_other(monkeypatch):
    """Streaming is for memory: double backward (lower peak than forward-over-reverse), and forward-over-reverse
    is not run on the side to time it."""
    import landscape.objective as objective_module

    tried = []
    for name, product in list(objective_module._HVP.items()):
        monkeypatch.setitem(objective_module._HVP, name,
                            lambda *args, _name=name, _product=product: (tried.append(_name), _product(*args))[1])
    loader = DataLoader(Synthetic(64), batch_size=16)
    streamed = Objective(mlp(), F.cross_entropy, loader, dtype=F64, stream=True)
    assert streamed.hvp_method == "double_backward" and "jvp" not in tried
    kept = Objective(mlp(), F.cross_entropy, loader, dtype=F64)
    assert kept.hvp_method in ("graph", "jvp", "double_backward")
    assert "jvp" in tried and set(kept.hvp_timings) == {"graph", "jvp", "double_backward"}  # kept data: all timed


def test_streamed_data_that_change_between_passes_are_caught():
    loader = DataLoader(Synthetic(40), batch_size=8, shuffle=True)
    with pytest.raises(NondeterministicObjective, match="shuffle=True or random augmentation"):
        Objective(mlp(), F.cross_entropy, loader, stream=True)
    objective = Objective(mlp(), F.cross_entropy, loader, stream=True, check=False)
    with pytest.raises(NondeterministicObjective, match="the data changed between two passes"):
        objective.loss()


@pytest.mark.parametrize("m", [1, 4])
def test_streamed_m_sharpness_equals_the_kept_datas(m):
    loader = DataLoader(Synthetic(48), batch_size=16)
    kept = sharpness.m_sharpness(mlp(), F.cross_entropy, loader, m=m, rho=0.1, dtype=F64, progress=False)
    streamed = sharpness.m_sharpness(mlp(), F.cross_entropy, loader, m=m, rho=0.1, dtype=F64, stream=True, progress=False)
    np.testing.assert_allclose(streamed.per_chunk, kept.per_chunk, rtol=1e-12)
    assert streamed.settings["n_chunks"] == 48 // m


def test_token_level_m_sharpness_takes_each_sequences_mean_and_leaves_out_sequences_without_tokens():
    data = padded_tokens(n=8)
    data["labels"][3] = -100  # a sequence without loss terms
    result = sharpness.m_sharpness(TinyLM(), token_cross_entropy, data, m=1, rho=0.05, dtype=F64, progress=False)
    assert result.settings["n_chunks"] == 7 and np.isfinite(result.per_chunk).all()
    for m in (2, 4):
        value = sharpness.m_sharpness(TinyLM(), token_cross_entropy, data, m=m, rho=0.05, dtype=F64, progress=False)
        assert math.isfinite(value.value) and value.value > 0


def test_streamed_surface_equals_the_kept_datas():
    loader = DataLoader(Synthetic(40), batch_size=16)
    kept = surface.slice_2d(mlp(), F.cross_entropy, loader, steps=3, seed=1, dtype=F64, progress=False, points_per_pass=4)
    streamed = surface.slice_2d(mlp(), F.cross_entropy, loader, steps=3, seed=1, dtype=F64, progress=False,
                                points_per_pass=4, stream=True)
    np.testing.assert_allclose(streamed.loss, kept.loss, rtol=1e-12)
    np.testing.assert_array_equal(streamed.accuracy, kept.accuracy)


# ------------------------------------------------------------------ parameters and compiled models


def test_a_parameter_subset_is_analysed_alone_against_its_dense_hessian():
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)
    head = ["2.weight", "2.bias"]
    dense = torch.linalg.eigvalsh(dense_hessian(mlp(), X, y, head)).flip(0)[:2]
    by_name = hessian.top_eigenvalues(mlp(), F.cross_entropy, (X, y), k=2, tol=1e-10, dtype=F64, params=head,
                                      progress=False)
    by_predicate = hessian.top_eigenvalues(mlp(), F.cross_entropy, (X, y), k=2, tol=1e-10, dtype=F64, batch_size=7,
                                           params=lambda name: name.startswith("2."), progress=False)
    torch.testing.assert_close(by_name.eigenvalues, dense, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(by_predicate.eigenvalues, dense, rtol=1e-8, atol=1e-12)
    assert set(by_name.eigenvectors[0]) == set(head)
    line = surface.slice_1d(mlp(), F.cross_entropy, (X, y), steps=3, params=head, progress=False)
    assert line.meta["recipe"]["params"] == sorted(head)
    with pytest.raises(ValueError, match=r"params names \['3.weight'\] are not parameters of the model"):
        Objective(mlp(), F.cross_entropy, (X, y), params=["3.weight"])


def test_frozen_parameters_are_left_out_by_default():
    model = mlp()
    model[0].requires_grad_(False)
    objective = Objective(model, F.cross_entropy, (torch.randn(8, 5), torch.randint(0, 3, (8,))))
    assert set(objective.params) == {"2.weight", "2.bias"} and set(objective.fixed) == {"0.weight", "0.bias"}


def test_a_compiled_model_works_in_every_analysis_and_says_once_which_product_it_uses():
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    eager = hessian.top_eigenvalues(mlp(), F.cross_entropy, (X, y), k=2, tol=1e-8, dtype=F64, progress=False)
    compiled = torch.compile(mlp().double(), backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        top = hessian.top_eigenvalues(compiled, F.cross_entropy, (X, y), k=2, tol=1e-8, dtype=F64, progress=False)
    said = [str(w.message) for w in caught if "Hessian-vector products" in str(w.message)]
    assert len(said) == 1 and "backward through the kept gradient graph" in said[0], said
    torch.testing.assert_close(top.eigenvalues, eager.eigenvalues, rtol=1e-7, atol=1e-10)
    head = hessian.top_eigenvalues(compiled, F.cross_entropy, (X, y), k=1, dtype=F64, params=["2.weight"], progress=False)
    assert list(head.eigenvectors[0]) == ["_orig_mod.2.weight"]
    line = surface.slice_1d(compiled, F.cross_entropy, (X, y), steps=3, dtype=F64, progress=False, points_per_pass=3)
    plain = surface.slice_1d(mlp(), F.cross_entropy, (X, y), steps=3, dtype=F64, progress=False)
    np.testing.assert_allclose(line.loss, plain.loss, rtol=1e-10)
    value = sharpness.m_sharpness(compiled, F.cross_entropy, (X, y), m=4, rho=0.05, dtype=F64, progress=False)
    reference = sharpness.m_sharpness(mlp(), F.cross_entropy, (X, y), m=4, rho=0.05, dtype=F64, progress=False)
    assert value.value == pytest.approx(reference.value, rel=1e-10)
