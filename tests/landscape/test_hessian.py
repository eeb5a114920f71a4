"""The public Hessian API against dense float64 Hessians from torch.func.hessian."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from landscape import hessian
from landscape.objective import Objective

from .test_objective import cnn_data, dense_reference, mlp_data, small_cnn, small_mlp

F64 = torch.float64
CASES = {"mlp": (small_mlp, mlp_data), "cnn_bn": (small_cnn, cnn_data)}


@pytest.fixture(scope="module", params=sorted(CASES))
def problem(request):
    make, data = CASES[request.param]
    model = make()
    X, y = data()
    layout, _, _, _, dense = dense_reference(model, X, y)
    return model, (X, y), layout, dense, torch.linalg.eigvalsh(dense)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_top_k_matches_dense_eigvalsh(problem, k, which):
    model, data, layout, dense, spectrum = problem
    result = hessian.top_eigenvalues(model, F.cross_entropy, data, k=k, which=which, tol=1e-9, dtype=F64, progress=False)
    expected = spectrum.flip(0)[:k] if which == "LA" else spectrum[:k]
    assert result.converged
    assert result.eigenvalues.shape == (k,)
    rel = (result.eigenvalues - expected).abs() / expected.abs()
    assert float(rel.max()) <= 1e-6, (result.eigenvalues, expected)
    for value, vector in zip(result.eigenvalues, result.eigenvectors):
        v = layout.flatten(vector)
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-10)
        assert float((dense @ v - value * v).norm()) <= 1e-6 * abs(float(value))
    assert result.n_matvecs > 0


def test_lanczos_agrees_with_the_arpack_backend(problem):
    model, data, _, _, _ = problem
    kwargs = dict(k=5, which="LA", tol=1e-10, dtype=F64)
    lanczos = hessian.top_eigenvalues(model, F.cross_entropy, data, method="lanczos", progress=False, **kwargs)
    arpack = hessian.top_eigenvalues(model, F.cross_entropy, data, method="arpack", progress=False, **kwargs)
    assert torch.allclose(lanczos.eigenvalues, arpack.eigenvalues, rtol=1e-8)


def test_power_iteration_finds_the_largest_magnitude_eigenvalue(problem):
    model, data, _, _, spectrum = problem
    result = hessian.top_eigenvalues(model, F.cross_entropy, data, k=1, which="LM", method="power", tol=1e-8,
                                     max_matvecs=5000, dtype=F64, progress=False)
    top = spectrum[spectrum.abs().argmax()]
    assert float(result.eigenvalues[0]) == pytest.approx(float(top), rel=1e-4)
    with pytest.raises(ValueError, match="which='LM'"):
        hessian.top_eigenvalues(model, F.cross_entropy, data, which="LA", method="power")


def test_float32_analysis_is_close_to_float64(problem):
    model, data, _, _, spectrum = problem
    result = hessian.top_eigenvalues(model, F.cross_entropy, data, k=3, tol=1e-4, progress=False)
    assert result.eigenvectors[0][next(iter(result.eigenvectors[0]))].dtype == torch.float32
    assert torch.allclose(result.eigenvalues, spectrum.flip(0)[:3], rtol=1e-3)


def test_trace_estimators_converge_to_the_dense_trace(problem):
    model, data, _, dense, _ = problem
    exact = float(torch.trace(dense))
    n = dense.shape[0]
    # Hutch++ with a sketch as large as the dimension captures the whole range: essentially exact.
    full = hessian.hessian_trace(model, F.cross_entropy, data, method="hutch++", n_matvecs=3 * n + 3, dtype=F64)
    assert full.value == pytest.approx(exact, rel=1e-8)
    for method in ("hutchinson", "hutch++"):
        estimate = hessian.hessian_trace(model, F.cross_entropy, data, method=method, n_matvecs=150, dtype=F64, seed=3)
        assert abs(estimate.value - exact) <= 4 * estimate.std_error + 1e-9, (method, estimate, exact)
        assert estimate.n_matvecs == 150


def test_spectral_density_integrates_to_one_and_spans_the_spectrum(problem):
    model, data, _, _, spectrum = problem
    density = hessian.spectral_density(model, F.cross_entropy, data, n_runs=4, n_steps=30, dtype=F64)
    assert np.trapezoid(density.density, density.grid) == pytest.approx(1.0, abs=1e-3)
    assert density.grid[0] <= float(spectrum[0]) + 1e-6 and density.grid[-1] >= float(spectrum[-1]) - 1e-6
    # Ghorbani et al. 2019: sigma^2 = 1e-5 (lambda_max - lambda_min), from the extreme Ritz values
    assert density.sigma_squared == pytest.approx(1e-5 * (density.lambda_max - density.lambda_min), rel=1e-12)
    assert density.lambda_max == pytest.approx(float(spectrum[-1]), rel=1e-6)


def test_summary_reports_lambda_max_ratio_and_trace(problem):
    model, data, _, dense, spectrum = problem
    result = hessian.summary(model, F.cross_entropy, data, k=5, tol=1e-9, trace_matvecs=3 * dense.shape[0] + 3,
                             dtype=F64, progress=False)
    top = spectrum.flip(0)
    assert result.lambda_max == pytest.approx(float(top[0]), rel=1e-6)
    assert result.ratio == pytest.approx(float(top[0] / top[4]), rel=1e-6)
    assert result.trace == pytest.approx(float(torch.trace(dense)), rel=1e-6)
    saved = json.loads(json.dumps(result.to_dict()))
    # the product method auto picked, and the timings it picked it by
    assert saved["hvp_timings_s"][saved["hvp_method"]] == min(saved["hvp_timings_s"].values())
    with pytest.raises(ValueError, match="k >= 5"):
        hessian.summary(model, F.cross_entropy, data, k=3)


def test_operator_is_shared_between_calls():
    model, data = small_mlp(), mlp_data()
    op = Objective(model, F.cross_entropy, data, dtype=F64).hessian_operator()
    first = hessian.top_eigenvalues(model, F.cross_entropy, data, k=2, tol=1e-8, operator=op, progress=False)
    used = op.n_matvecs
    assert used == first.n_matvecs
    hessian.hessian_trace(model, F.cross_entropy, data, n_matvecs=30, operator=op)
    assert op.n_matvecs == used + 30


def test_bad_arguments_are_named():
    model, data = small_mlp(), mlp_data()
    with pytest.raises(ValueError, match="unknown method 'qr'"):
        hessian.top_eigenvalues(model, F.cross_entropy, data, method="qr")
    with pytest.raises(ValueError, match="unknown trace method 'exact'"):
        hessian.hessian_trace(model, F.cross_entropy, data, method="exact")
