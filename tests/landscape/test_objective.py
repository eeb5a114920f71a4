"""The analysed objective against dense float64 references and its determinism check."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from landscape.data import BatchSource
from landscape.objective import HessianOperator, NondeterministicObjective, Objective, ParamLayout, select_parameters

F64 = torch.float64


def small_cnn(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU-Linear with non-trivial running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    with torch.no_grad():
        model.train()
        model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model.eval()


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def cnn_data(n: int = 37, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def mlp_data(n: int = 41, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def dense_reference(model: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """Full-batch float64 loss, gradient and Hessian via torch.func on a flat parameter vector."""
    reference = copy.deepcopy(model).to(F64).eval()
    params = {k: v.detach() for k, v in reference.named_parameters()}
    buffers = {k: v.detach() for k, v in reference.named_buffers()}
    layout = ParamLayout.of(params)

    def loss(flat):
        return F.cross_entropy(torch.func.functional_call(reference, (layout.unflatten(flat), buffers), (X.to(F64),)), y)

    flat = layout.flatten(params)
    return layout, flat, loss(flat), torch.func.grad(loss)(flat), torch.func.hessian(loss)(flat)


@pytest.mark.parametrize("make, data", [(small_mlp, mlp_data), (small_cnn, cnn_data)])
def test_loss_gradient_and_hvps_match_dense_float64(make, data):
    model = make()
    X, y = data()
    layout, flat, loss, gradient, hessian = dense_reference(model, X, y)
    objective = Objective(model, F.cross_entropy, (X, y), dtype=F64, batch_size=10)  # 37/41 examples: ragged last batch
    assert float(objective.loss()) == pytest.approx(float(loss), rel=1e-13)
    assert torch.allclose(layout.flatten(objective.gradient()), gradient, rtol=1e-11, atol=1e-13)
    v = torch.randn(flat.shape[0], dtype=F64, generator=torch.Generator().manual_seed(5))
    for method in ("jvp", "double_backward", "graph", "graph"):  # graph twice: the kept graph is reused
        hv = layout.flatten(objective.hvp(layout.unflatten(v), method=method))
        assert torch.allclose(hv, hessian @ v, rtol=1e-10, atol=1e-12), method
    op = objective.hessian_operator()
    assert isinstance(op, HessianOperator) and op.shape == (flat.shape[0], flat.shape[0])
    assert torch.allclose(op.matvec(v), hessian @ v, rtol=1e-10, atol=1e-12)
    assert op.n_matvecs == 1


def test_batches_are_weighted_by_size_not_averaged():
    """With a ragged last batch the mean of batch means differs from the dataset mean; L is the latter."""
    model = small_mlp()
    X, y = mlp_data(n=21)
    batches = [(X[:20], y[:20]), (X[20:], y[20:])]
    objective = Objective(model, F.cross_entropy, batches, dtype=F64)
    with torch.no_grad():
        full = F.cross_entropy(model.to(F64)(X.to(F64)), y)
        mean_of_means = sum(F.cross_entropy(model(x.to(F64)), t) for x, t in batches) / 2
    assert float(objective.loss()) == pytest.approx(float(full), rel=1e-13)
    assert abs(float(mean_of_means) - float(full)) > 1e-3


def test_every_data_form_gives_the_same_objective():
    model = small_cnn()
    X, y = cnn_data()
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=False)
    batches = [(X[i : i + 8], y[i : i + 8]) for i in range(0, len(X), 8)]
    values = [float(Objective(model, F.cross_entropy, d, dtype=F64, batch_size=8).loss()) for d in (loader, (X, y), batches)]
    assert values[0] == pytest.approx(values[1], rel=1e-14) and values[1] == pytest.approx(values[2], rel=1e-14)


def test_loss_and_accuracy_counts_correct_predictions():
    model = small_mlp()
    X, y = mlp_data()
    objective = Objective(model, F.cross_entropy, (X, y), dtype=F64, batch_size=16)
    loss, accuracy = objective.loss_and_accuracy()
    with torch.no_grad():
        logits = model.to(F64)(X.to(F64))
    assert accuracy == int((logits.argmax(1) == y).sum()) / len(y)
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-13)


def test_the_users_module_is_never_left_modified():
    model = small_cnn()
    model.train()
    model[1].eval()  # a mixed-mode model: flags must come back exactly as they were
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_flags = [m.training for m in model.modules()]
    X, y = cnn_data()
    objective = Objective(model, F.cross_entropy, (X, y), dtype=F64, batch_size=8)
    objective.loss()
    objective.gradient()
    objective.hvp({k: torch.ones_like(v) for k, v in objective.params.items()})
    assert [m.training for m in model.modules()] == before_flags
    for k, v in model.state_dict().items():
        assert v.dtype == before_state[k].dtype and torch.equal(v, before_state[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_determinism_check_names_train_mode_batchnorm():
    model = small_cnn().train()
    with pytest.raises(NondeterministicObjective, match="BatchNorm in train mode.*BatchNorm2d"):
        Objective(model, F.cross_entropy, cnn_data(), train_mode=True)
    # the user's buffers were not touched by the failed check
    assert model[1].num_batches_tracked.item() == 1


def test_determinism_check_names_dropout_and_eval_mode_turns_it_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 50), nn.ReLU(), nn.Dropout(0.5), nn.Linear(50, 3)).train()
    with pytest.raises(NondeterministicObjective, match="dropout.*Dropout"):
        Objective(model, F.cross_entropy, mlp_data(), train_mode=True)
    Objective(model, F.cross_entropy, mlp_data())  # eval mode by default: deterministic


def test_determinism_check_names_a_shuffling_loader():
    X, y = mlp_data(n=64)
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
    with pytest.raises(NondeterministicObjective, match="shuffle=True or random augmentation"):
        Objective(small_mlp(), F.cross_entropy, loader)


def test_frozen_parameters_are_fixed_not_analysed():
    model = small_mlp()
    model[0].bias.requires_grad_(False)
    objective = Objective(model, F.cross_entropy, mlp_data(), dtype=F64)
    assert "0.bias" not in objective.params and "0.bias" in objective.fixed
    assert objective.layout.size == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        expected = F.cross_entropy(model.to(F64)(mlp_data()[0].to(F64)), mlp_data()[1])
    assert float(objective.loss()) == pytest.approx(float(expected), rel=1e-13)


def test_a_tied_parameter_may_be_named_by_any_of_its_names():
    """GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``: either name selects it, under its first name."""
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    assert select_parameters(model, ["1.weight"]) == ["0.weight"]
    assert select_parameters(model, ["0.weight", "1.weight"]) == ["0.weight"]
    assert select_parameters(model, (name for name in ["1.weight"])) == ["0.weight"]  # any iterable, read once
    with pytest.raises(ValueError, match=r"params names \['2.weight'\] are not parameters of the model"):
        select_parameters(model, ["2.weight"])


def test_auto_hvp_method_picks_a_working_method():
    objective = Objective(small_cnn(), F.cross_entropy, cnn_data(), dtype=F64, batch_size=8)
    assert objective.hvp_method in ("graph", "jvp", "double_backward")
    assert set(objective.hvp_timings) == {"graph", "jvp", "double_backward"}  # kept data: all three timed
    assert all(seconds > 0 for seconds in objective.hvp_timings.values())
    assert objective.hvp_timings[objective.hvp_method] == min(objective.hvp_timings.values())


def _forced_timings(monkeypatch, seconds: dict[str, float]) -> list[str]:
    """Make ``hvp_method="auto"`` measure ``seconds[method]`` for each product it times (each is still run);
    returns the list of methods timed, in order."""
    import landscape.objective as objective_module

    timed = []

    def fake(method, product, device):
        product()
        timed.append(method)
        return seconds[method]

    monkeypatch.setattr(objective_module, "_product_seconds", fake)
    return timed


@pytest.mark.parametrize("fastest", ["graph", "jvp", "double_backward"])
def test_auto_keeps_the_fastest_timed_method_and_its_products_match_dense_float64(monkeypatch, fastest):
    seconds = {"graph": 3.0, "jvp": 2.0, "double_backward": 4.0}
    seconds[fastest] = 1.0
    timed = _forced_timings(monkeypatch, seconds)
    model = small_cnn()
    X, y = cnn_data()
    _, flat, _, _, hessian = dense_reference(model, X, y)
    objective = Objective(model, F.cross_entropy, (X, y), dtype=F64, batch_size=10)  # 4 batches
    assert objective.hvp_method == fastest and objective.hvp_choice.asked == "auto"
    assert sorted(timed) == ["double_backward", "graph", "jvp"]
    assert objective.hvp_timings == seconds and objective.hvp_choice.probe_examples == 10
    assert objective.hvp_choice.graph_bytes <= objective.hvp_choice.graph_budget
    v = torch.randn(flat.shape[0], dtype=F64, generator=torch.Generator().manual_seed(5))
    for _ in range(2):  # a second product reuses the kept graph (graph) or recomputes (the others)
        torch.testing.assert_close(objective.hessian_operator().matvec(v), hessian @ v, rtol=1e-10, atol=1e-12)
    # Cached: products never time again; a resumed analysis passes the method back and takes the same products.
    assert len(timed) == 3
    again = Objective(model, F.cross_entropy, (X, y), dtype=F64, batch_size=10, hvp_method=objective.hvp_method)
    assert len(timed) == 3 and again.hvp_choice.asked == fastest and again.hvp_timings == {}
    assert torch.equal(again.hessian_operator().matvec(v), objective.hessian_operator().matvec(v))


def test_auto_leaves_out_a_kept_graph_above_the_memory_budget(monkeypatch):
    timed = _forced_timings(monkeypatch, {"graph": 1.0, "jvp": 2.0, "double_backward": 3.0})
    X, y = mlp_data()
    data_bytes = X.numel() * 8 + y.numel() * 8  # float64 inputs, int64 targets
    roomy = Objective(small_mlp(), F.cross_entropy, (X, y), dtype=F64, batch_size=8)
    graph_bytes = roomy.hvp_choice.graph_bytes
    # the saved activations of 41 examples (7 tanh outputs and more per example) and the gradient (59 values)
    assert 41 * 7 * 8 + 59 * 8 < graph_bytes < 41 * 1000 * 8 and roomy.hvp_method == "graph"
    timed.clear()
    tight = Objective(small_mlp(), F.cross_entropy, (X, y), dtype=F64, batch_size=8, memory_budget=data_bytes + 64)
    assert not tight.stream and tight.hvp_choice.graph_bytes == graph_bytes
    assert tight.hvp_method == "jvp" and sorted(timed) == ["double_backward", "jvp"]
    assert "graph" not in tight.hvp_timings and "budget" in tight.hvp_choice.reason


def test_an_asked_method_is_not_timed(monkeypatch):
    timed = _forced_timings(monkeypatch, {})
    objective = Objective(small_mlp(), F.cross_entropy, mlp_data(), dtype=F64, hvp_method="jvp")
    assert objective.hvp_method == "jvp" and objective.hvp_timings == {} and timed == []
    assert objective.hvp_choice.to_dict()["reason"] == "asked for"


def test_kept_graph_follows_the_parameters():
    model = small_mlp()
    X, y = mlp_data()
    layout, flat, _, _, hessian = dense_reference(model, X, y)
    objective = Objective(model, F.cross_entropy, (X, y), dtype=F64, hvp_method="graph")
    v = {k: torch.ones_like(t) for k, t in objective.params.items()}
    objective.hvp(v)
    moved = {k: t + 0.1 for k, t in objective.params.items()}
    other = Objective(model, F.cross_entropy, (X, y), dtype=F64, hvp_method="double_backward")
    assert torch.allclose(layout.flatten(objective.hvp(v, moved)), layout.flatten(other.hvp(v, moved)), rtol=1e-10)
    assert torch.allclose(layout.flatten(objective.hvp(v)), hessian @ layout.flatten(v), rtol=1e-10)
    with pytest.raises(ValueError, match="unknown hvp_method 'fast'"):
        Objective(small_cnn(), F.cross_entropy, cnn_data(), hvp_method="fast")


def test_param_layout_round_trip_and_errors():
    params = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    layout = ParamLayout.of(params)
    flat = layout.flatten(params)
    assert flat.shape == (10,) and layout.size == 10
    back = layout.unflatten(flat)
    assert all(torch.equal(back[k], params[k]) for k in params)
    with pytest.raises(ValueError, match="length 10"):
        layout.unflatten(torch.zeros(9))


def test_bad_data_is_rejected_with_a_clear_error():
    cpu = torch.device("cpu")
    with pytest.raises(TypeError, match="a DataLoader, a map-style Dataset, an \\(X, y\\) tuple"):
        BatchSource("data.csv", device=cpu)
    with pytest.raises(ValueError, match="must share the example dimension; got leading sizes \\[3, 4\\]"):
        BatchSource((torch.zeros(3, 2), torch.zeros(4)), device=cpu)
    with pytest.raises(ValueError, match="no batches"):
        BatchSource([], device=cpu)
    with pytest.raises(ValueError, match="batch 0 must be an \\(inputs, target\\) pair"):
        Objective(small_mlp(), F.cross_entropy, [torch.zeros(4, 5)])


@pytest.mark.parametrize("method", ["graph", "jvp", "double_backward"])
def test_layer_norm_second_derivatives_are_exact_although_pytorchs_kernel_gets_them_wrong(method):
    """PyTorch's fused layer_norm has wrong second derivatives (pytorch/pytorch#196700); the products here take
    them from its definition. Reference: central differences of exact first derivatives."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(6, 4, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)
    objective = Objective(model, F.cross_entropy, (X, y), hvp_method=method)
    n = objective.layout.size
    basis = torch.eye(n, dtype=F64)
    hessian = torch.stack([objective.hessian_operator().matvec(e) for e in basis], dim=1)
    flat = objective.layout.flatten(objective.params)

    def gradient(point):
        return objective.layout.flatten(objective.gradient(objective.layout.unflatten(point)))

    differences = torch.stack([(gradient(flat + 1e-5 * e) - gradient(flat - 1e-5 * e)) / 2e-5 for e in basis], dim=1)
    torch.testing.assert_close(hessian, hessian.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(hessian, differences, rtol=1e-7, atol=1e-7)
