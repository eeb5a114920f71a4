"""Loss surfaces: closed forms, batched vs one-at-a-time, resume, recipes, the user's model untouched."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import surface
from landscape.directions import random_direction

from .test_objective import cnn_data, small_cnn

F64 = torch.float64


class Quadratic(nn.Module):
    """``f(x; w) = w`` broadcast, so that mean-squared loss against 0 is ``||w||^2 / n`` per example."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], -1)


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).sum(dim=-1).mean()


def test_quadratic_model_gives_the_closed_form_surface():
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    d1 = {"w": torch.tensor([1.0, 0.0, 0.0], dtype=F64)}
    d2 = {"w": torch.tensor([0.0, 2.0, 1.0], dtype=F64)}
    data = (torch.zeros(6, 1, dtype=F64), torch.zeros(6, 3, dtype=F64))
    result = surface.slice_2d(Quadratic(w), mse, data, directions=(d1, d2), steps=(5, 7), progress=False)
    a, b = np.meshgrid(result.coords[0], result.coords[1], indexing="ij")
    point = w.numpy()[None, None, :] + a[..., None] * d1["w"].numpy() + b[..., None] * d2["w"].numpy()
    assert result.loss.shape == (5, 7)
    np.testing.assert_allclose(result.loss, (point**2).sum(-1), rtol=1e-12)


def test_centre_of_a_slice_equals_the_models_loss_and_batched_equals_one_at_a_time():
    model = small_cnn()
    data = cnn_data(n=40)
    kwargs = dict(steps=(5, 5), seed=3, dtype=F64, batch_size=16, progress=False)
    batched = surface.slice_2d(model, F.cross_entropy, data, points_per_pass=7, **kwargs)
    plain = surface.slice_2d(model, F.cross_entropy, data, batched=False, **kwargs)
    np.testing.assert_allclose(batched.loss, plain.loss, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(batched.accuracy, plain.accuracy)
    with torch.no_grad():
        expected = F.cross_entropy(model.double()(data[0].double()), data[1])
    model.float()
    assert batched.loss[2, 2] == pytest.approx(float(expected), rel=1e-12)
    assert not np.allclose(batched.loss, batched.loss[2, 2])


def test_filter_normalised_direction_has_the_filter_norms_of_the_weights():
    model = small_cnn()
    params = {k: v.detach() for k, v in model.named_parameters()}
    d = random_direction(params, seed=0)
    w, dw = params["0.weight"], d["0.weight"]
    np.testing.assert_allclose(dw.flatten(1).norm(dim=1).numpy(), w.flatten(1).norm(dim=1).numpy(), rtol=1e-5)
    assert torch.count_nonzero(d["0.bias"]) == 0


def test_the_users_model_is_unchanged():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    surface.slice_1d(model, F.cross_entropy, cnn_data(), steps=5, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training


def test_interrupted_grid_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    model = small_cnn()
    data = cnn_data(n=24)
    kwargs = dict(steps=(4, 5), seed=1, dtype=F64, points_per_pass=3, progress=False)
    full = surface.slice_2d(model, F.cross_entropy, data, **kwargs)

    calls = {"n": 0}
    original = surface.evaluate_points

    def crash_after_three_passes(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(surface, "evaluate_points", crash_after_three_passes)
    with pytest.raises(KeyboardInterrupt):
        surface.slice_2d(model, F.cross_entropy, data, path=tmp_path / "grid", **kwargs)
    saved = json.loads((tmp_path / "grid.json").read_text())
    assert saved["points_done"] == 9 and saved["points_total"] == 20
    monkeypatch.setattr(surface, "evaluate_points", original)

    calls["n"] = 0
    resumed = surface.slice_2d(model, F.cross_entropy, data, path=tmp_path / "grid", **kwargs)
    np.testing.assert_allclose(resumed.loss, full.loss, rtol=1e-12)
    stored = np.load(tmp_path / "grid.npz")
    np.testing.assert_allclose(stored["loss"], full.loss, rtol=1e-12)

    with pytest.raises(ValueError, match=r"different recipe \(differs in \['seed'\]\)"):
        surface.slice_2d(model, F.cross_entropy, data, path=tmp_path / "grid", **{**kwargs, "seed": 2})
    np.testing.assert_allclose(np.load(tmp_path / "grid.npz")["loss"], full.loss, rtol=1e-12)


def test_a_lone_file_at_the_path_is_never_overwritten(tmp_path):
    (tmp_path / "grid.npz").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="without its pair"):
        surface.slice_1d(small_cnn(), F.cross_entropy, cnn_data(), steps=3, path=tmp_path / "grid", progress=False)
    assert (tmp_path / "grid.npz").read_bytes() == b"user data"


def test_interpolation_reaches_both_endpoints():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    b = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    result = surface.interpolate(a, b, F.cross_entropy, (X, y), steps=9, span=(-0.5, 1.5), dtype=F64, progress=False)
    t = result.coords[0]
    with torch.no_grad():
        la = float(F.cross_entropy(a.double()(X.double()), y))
        lb = float(F.cross_entropy(b.double()(X.double()), y))
    assert result.loss[np.argmin(np.abs(t - 0.0))] == pytest.approx(la, rel=1e-12)
    assert result.loss[np.argmin(np.abs(t - 1.0))] == pytest.approx(lb, rel=1e-12)


@pytest.mark.parametrize("batched", [True, False])
def test_interpolation_with_batchnorm_reaches_both_models_with_their_own_statistics(batched):
    a, b = small_cnn(seed=0), small_cnn(seed=1)
    X, y = cnn_data(n=24)
    result = surface.interpolate(a, b, F.cross_entropy, (X, y), steps=5, span=(-0.5, 1.5), dtype=F64, batched=batched,
                                 points_per_pass=5, progress=False)
    with torch.no_grad():
        la = float(F.cross_entropy(copy.deepcopy(a).double()(X.double()), y))
        lb = float(F.cross_entropy(copy.deepcopy(b).double()(X.double()), y))
        # the midpoint by hand: weights and running statistics both halfway
        mid = copy.deepcopy(a).double()
        for (name, t), t_b in zip(mid.state_dict().items(), b.double().state_dict().values()):
            if t.is_floating_point():
                t.copy_((t + t_b.double()) / 2)
        lm = float(F.cross_entropy(mid(X.double()), y))
    assert result.loss[1] == pytest.approx(la, rel=1e-12)
    assert result.loss[3] == pytest.approx(lb, rel=1e-12)
    assert result.loss[2] == pytest.approx(lm, rel=1e-12)
    assert result.meta["recipe"]["buffers"] == "interpolate, clamped to [0, 1]"

    kept = surface.interpolate(a, b, F.cross_entropy, (X, y), steps=5, span=(-0.5, 1.5), dtype=F64, batched=batched,
                               buffers="a", progress=False)
    assert kept.loss[1] == pytest.approx(la, rel=1e-12) and abs(kept.loss[3] - lb) > 1e-6  # b's weights, a's statistics
    # beyond the endpoints the statistics stay at the nearer model's: a variance ratio above 3 would turn
    # the extrapolated running variance negative (NaN loss)
    with torch.no_grad():
        a2, b2 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
        a2[1].running_var.fill_(0.1)
        b2[1].running_var.fill_(1.0)
    wide = surface.interpolate(a2, b2, F.cross_entropy, (X, y), steps=5, span=(-0.5, 1.5), dtype=F64, batched=batched,
                               points_per_pass=5, progress=False)
    assert np.isfinite(wide.loss).all()
    with torch.no_grad():
        outside = copy.deepcopy(a2)
        for (name, p), p_b in zip(outside.named_parameters(), b2.parameters()):
            p.copy_(p - 0.5 * (p_b - p))  # t = -0.5: the weights extrapolated, the statistics a2's own
        expected = float(F.cross_entropy(outside(X.double()), y))
    assert wide.loss[0] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="buffers must be 'interpolate' or 'a'"):
        surface.interpolate(a, b, F.cross_entropy, (X, y), buffers="b", progress=False)


def test_bf16_autocast_is_close_to_float32():
    model = small_cnn()
    data = cnn_data(n=32)
    exact = surface.slice_1d(model, F.cross_entropy, data, steps=5, progress=False)
    bf16 = surface.slice_1d(model, F.cross_entropy, data, steps=5, autocast_dtype=torch.bfloat16, progress=False)
    np.testing.assert_allclose(bf16.loss, exact.loss, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_grid_with_memory_sized_passes_matches_the_cpu():
    model = small_cnn()
    data = cnn_data(n=64)
    cpu = surface.slice_2d(model, F.cross_entropy, data, steps=(5, 5), dtype=F64, progress=False)
    gpu = surface.slice_2d(model, F.cross_entropy, data, steps=(5, 5), dtype=F64, device="cuda", progress=False)
    np.testing.assert_allclose(gpu.loss, cpu.loss, rtol=1e-9)
