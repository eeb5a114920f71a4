"""Stochastic Lanczos quadrature against known spectra.

Deterministic checks (float64, tight tolerances): every run's Gauss rule reproduces the moments
v^T A^j v / v^T v for j <= 2m - 1 (computed from the known eigendecomposition), weights sum to 1, the
kernel density equals its closed form on a grid. Stochastic checks (fixed seeds, stated tolerances from
closed forms for a uniform unit vector u: Var[u^T B u] = 2/(n+2) (tr(B^2)/n - (tr B/n)^2) and
||P_k u||^2 ~ Beta(d_k/2, (n-d_k)/2)): averaged moments converge to tr(A^j)/n and the mass of the
density around each eigenvalue of a five-point spectrum matches multiplicity / n.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import landscape.density as density_module
from landscape.density import (
    Density,
    SLQResult,
    default_sigma_squared,
    density_from_operator,
    gaussian_density,
    log_floor,
    slq_nodes,
    slq_quadrature,
    slq_start_vector,
    spectral_density,
)
from landscape.linop import DenseOperator


def _with_spectrum(eigenvalues: np.ndarray, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(``Q diag(eigenvalues) Q^T``, ``Q``) with a random orthogonal ``Q`` (float64)."""
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2, Q


def _trapezoid_mass(d: Density, lo: float, hi: float) -> float:
    inside = (d.grid >= lo) & (d.grid <= hi)
    return float(np.trapezoid(d.density[inside], d.grid[inside]))


VALUES = np.array([-1.0, 0.0, 0.5, 2.0, 4.0])
MULTIPLICITIES = np.array([30, 150, 60, 40, 20])  # n = 300


@pytest.fixture(scope="module")
def five_point():
    return _with_spectrum(np.repeat(VALUES, MULTIPLICITIES), seed=0)


@pytest.fixture(scope="module")
def generic():
    """n = 200, eigenvalues spread over [-1, 1.5], with eigenvectors."""
    lam = np.random.default_rng(5).uniform(-1.0, 1.5, size=200)
    A, Q = _with_spectrum(lam, seed=5)
    return A, Q, lam


@pytest.fixture(scope="module")
def five_point_density(five_point):
    return density_from_operator(DenseOperator(five_point[0]), n_runs=30, n_steps=80, seed=0, progress=False)


# --------------------------------------------------------------------------------------------------
# Start vectors and the quadrature rule
# --------------------------------------------------------------------------------------------------


def test_start_vectors_are_unit_seeded_and_distinct():
    v = slq_start_vector(500, 0, seed=3)
    assert v.dtype == torch.float64 and v.shape == (500,)
    assert float(torch.linalg.vector_norm(v)) == pytest.approx(1.0, abs=1e-14)
    assert torch.equal(v, slq_start_vector(500, 0, seed=3))
    assert not torch.equal(v, slq_start_vector(500, 1, seed=3))
    assert not torch.equal(v, slq_start_vector(500, 0, seed=4))
    v32 = slq_start_vector(500, 0, seed=3, dtype=torch.float32)
    assert v32.dtype == torch.float32 and torch.allclose(v32.double(), v, atol=1e-7)


def test_weights_sum_to_one_and_nodes_are_sorted_float64(generic):
    A, _, lam = generic
    res = slq_nodes(DenseOperator(A), n_runs=4, n_steps=12, seed=0, progress=False)
    assert isinstance(res, SLQResult) and res.n_runs == 4 and res.dim == 200
    assert res.nodes.dtype == np.float64 and res.weights.dtype == np.float64
    assert res.nodes.shape == res.weights.shape == (4, 12)
    np.testing.assert_array_equal(res.n_nodes, [12, 12, 12, 12])
    np.testing.assert_allclose(res.weights.sum(axis=1), 1.0, rtol=0, atol=1e-14)
    assert np.all(res.weights >= 0) and np.all(np.diff(res.nodes, axis=1) >= 0)
    # Ritz values interlace: they lie inside the spectrum
    assert lam.min() - 1e-10 <= res.lambda_min and res.lambda_max <= lam.max() + 1e-10


@pytest.mark.parametrize("n_steps", [3, 8])
def test_gauss_quadrature_reproduces_moments_exactly(generic, n_steps):
    """sum_i tau_i theta_i^j = v^T A^j v for j <= 2m - 1 (to 1e-8 relative to sum_k c_k^2 |lambda_k|^j)."""
    A, Q, lam = generic
    res = slq_nodes(DenseOperator(A), n_runs=3, n_steps=n_steps, seed=1, progress=False)
    for run in range(3):
        theta, tau = res.run(run)
        assert len(theta) == n_steps
        v = slq_start_vector(200, run, seed=1)
        c2 = (Q.T @ v).numpy() ** 2
        for j in range(2 * n_steps):
            exact = float(np.sum(c2 * lam**j))
            scale = float(np.sum(c2 * np.abs(lam) ** j))
            assert abs(float(np.sum(tau * theta**j)) - exact) <= 1e-8 * scale, (run, j)
        # degree 2m is not integrated exactly: the Gauss rule underestimates it by ||p_m(A) v||^2 > 0
        j = 2 * n_steps
        gap = float(np.sum(c2 * lam**j)) - float(np.sum(tau * theta**j))
        assert gap > 1e-6 * float(np.sum(c2 * np.abs(lam) ** j))


def test_averaged_moments_converge_to_normalised_traces(generic):
    """mean over 40 runs of sum_i tau_i theta_i^j -> tr(A^j)/n within 4 closed-form standard errors."""
    A, _, lam = generic
    n, n_runs = len(lam), 40
    res = slq_nodes(DenseOperator(A), n_runs=n_runs, n_steps=10, seed=2, progress=False)
    for j in range(1, 5):
        b = lam**j
        std = math.sqrt(2.0 / (n + 2) * (np.mean(b**2) - np.mean(b) ** 2) / n_runs)
        estimate = slq_quadrature(res, lambda x, j=j: x**j)
        assert abs(estimate - np.mean(b)) <= 4 * std, j
    assert n * slq_quadrature(res) == pytest.approx(float(torch.trace(A)), abs=4 * n * math.sqrt(
        2.0 / (n + 2) * np.var(lam) / n_runs))


def test_matvec_accounting_and_seeded_determinism(generic):
    A, _, _ = generic
    op = DenseOperator(A)
    op.n_matvecs = 5
    res = slq_nodes(op, n_runs=3, n_steps=7, seed=0, progress=False)
    assert res.n_matvecs == op.n_matvecs - 5
    assert 3 * 6 <= res.n_matvecs <= 3 * 7
    again = slq_nodes(DenseOperator(A), n_runs=3, n_steps=7, seed=0, progress=False)
    np.testing.assert_array_equal(res.nodes, again.nodes)
    np.testing.assert_array_equal(res.weights, again.weights)
    other = slq_nodes(DenseOperator(A), n_runs=3, n_steps=7, seed=1, progress=False)
    assert not np.array_equal(res.weights, other.weights)
    # runs are seeded individually: the first runs of a longer job are the same runs
    longer = slq_nodes(DenseOperator(A), n_runs=5, n_steps=7, seed=0, progress=False)
    np.testing.assert_array_equal(longer.nodes[:3], res.nodes)


# --------------------------------------------------------------------------------------------------
# The density
# --------------------------------------------------------------------------------------------------


def test_density_integrates_to_one_with_default_sigma_and_grid(five_point_density):
    d = five_point_density
    assert isinstance(d, Density)
    assert d.grid.dtype == np.float64 and d.density.dtype == np.float64 and d.grid.shape == d.density.shape
    assert np.all(np.isfinite(d.density)) and np.all(d.density >= 0)
    assert float(np.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-5)
    lam_min, lam_max = d.nodes.min(), d.nodes.max()
    assert d.sigma_squared == pytest.approx(1e-5 * (lam_max - lam_min), rel=1e-12)
    margin = max(0.01 * (lam_max - lam_min), 6 * math.sqrt(d.sigma_squared))
    assert d.grid[0] == pytest.approx(lam_min - margin) and d.grid[-1] == pytest.approx(lam_max + margin)
    assert len(d.grid) >= 10_000
    assert (d.grid[1] - d.grid[0]) <= math.sqrt(d.sigma_squared) / 2  # the kernel is resolved
    assert d.n_matvecs > 0


def test_density_mass_near_each_eigenvalue_matches_multiplicity(five_point_density):
    """Mass within the window between neighbouring midpoints = d_k / n within 4 standard deviations of
    the run average of a Beta(d_k/2, (n - d_k)/2) weight (30 runs)."""
    d = five_point_density
    n, n_runs = MULTIPLICITIES.sum(), 30
    edges = np.concatenate([[d.grid[0]], (VALUES[1:] + VALUES[:-1]) / 2, [d.grid[-1]]])
    for k, (value, mult) in enumerate(zip(VALUES, MULTIPLICITIES)):
        p = mult / n
        std = math.sqrt(p * (1 - p) / (n / 2 + 1) / n_runs)
        mass = _trapezoid_mass(d, edges[k], edges[k + 1])
        assert abs(mass - p) <= 4 * std + 1e-6, (value, mass, p)
    # the density peaks at the eigenvalues: between them it vanishes
    between = (VALUES[1:] + VALUES[:-1]) / 2
    assert np.all(np.interp(between, d.grid, d.density) < 1e-12)


def test_five_point_rule_puts_each_eigenspace_projection_on_its_eigenvalue(five_point):
    """Only 5 distinct eigenvalues: the Krylov space of v is 5-dimensional, so every node that carries
    weight is an exact eigenvalue and the weight at lambda_k is ||P_k v||^2 (P_k: its eigenprojector).

    Lanczos may not recognise the breakdown (beta_5 ~ 1e-13 sits at its rounding floor) and continue
    in an orthogonal direction; the extra Ritz values then repeat eigenvalues and share their weight,
    so the test sums the weights per eigenvalue.
    """
    A, Q = five_point
    res = slq_nodes(DenseOperator(A), n_runs=3, n_steps=80, seed=0, progress=False)
    assert np.all(res.n_nodes <= 80)
    labels = np.repeat(np.arange(5), MULTIPLICITIES)
    for run in range(3):
        theta, tau = res.run(run)
        heavy = tau > 1e-10
        nearest = np.abs(theta[:, None] - VALUES[None, :]).argmin(axis=1)
        np.testing.assert_allclose(theta[heavy], VALUES[nearest[heavy]], atol=1e-8)
        c2 = (Q.T @ slq_start_vector(300, run, seed=0)).numpy() ** 2
        projections = np.bincount(labels, weights=c2, minlength=5)
        np.testing.assert_allclose(np.bincount(nearest, weights=tau, minlength=5), projections, atol=1e-10)


def test_density_matches_closed_form_kernel_sum_on_an_explicit_grid(generic):
    A, _, _ = generic
    res = slq_nodes(DenseOperator(A), n_runs=3, n_steps=6, seed=0, progress=False)
    grid = np.linspace(-1.5, 2.0, 301)
    d = spectral_density(res, grid, sigma_squared=0.01)
    assert d.grid is grid or np.array_equal(d.grid, grid)
    assert d.sigma_squared == 0.01
    reference = np.zeros_like(grid)
    for run in range(3):
        theta, tau = res.run(run)
        for t_i, w_i in zip(theta, tau):
            reference += w_i * np.exp(-((grid - t_i) ** 2) / 0.02) / math.sqrt(2 * math.pi * 0.01) / 3
    np.testing.assert_allclose(d.density, reference, rtol=1e-12, atol=1e-300)


def test_default_sigma_rule_and_degenerate_range():
    assert default_sigma_squared(-2.0, 8.0) == pytest.approx(1e-4)
    assert default_sigma_squared(3.0, 3.0) == pytest.approx(3e-5)  # A = 3 I: range replaced by |lambda|
    assert default_sigma_squared(0.0, 0.0) == pytest.approx(1e-5)


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_multiple_of_identity_gives_one_gaussian(scale):
    A = scale * torch.eye(50, dtype=torch.float64)
    d = density_from_operator(DenseOperator(A), n_runs=2, n_steps=10, progress=False)
    assert np.all(np.isfinite(d.density))
    np.testing.assert_array_equal(d.weights.sum(axis=1), [1.0, 1.0])
    assert float(np.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-6)
    assert d.grid[np.argmax(d.density)] == pytest.approx(scale, abs=1e-3)


def test_breakdown_when_n_steps_exceeds_n():
    lam = np.linspace(-2.0, 3.0, 20)
    A, Q = _with_spectrum(lam, seed=7)
    res = slq_nodes(DenseOperator(A), n_runs=3, n_steps=50, seed=0, progress=False)
    assert np.all(res.n_nodes <= 20)
    assert np.all(np.isfinite(res.nodes)) and np.all(np.isfinite(res.weights))
    np.testing.assert_allclose(res.weights.sum(axis=1), 1.0, atol=1e-14)
    for run in range(3):  # a full Krylov space integrates every moment exactly
        theta, tau = res.run(run)
        c2 = (Q.T @ slq_start_vector(20, run, seed=0)).numpy() ** 2
        for j in (1, 2, 5, 40, 60):
            exact = float(np.sum(c2 * lam**j))
            assert float(np.sum(tau * theta**j)) == pytest.approx(exact, rel=1e-8, abs=1e-12), j
    d = spectral_density(res)
    assert np.all(np.isfinite(d.density))
    assert float(np.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-5)


def test_breakdown_on_a_low_rank_operator():
    lam = np.zeros(120)
    lam[:3] = [5.0, -1.0, 2.0]
    A, _ = _with_spectrum(lam, seed=8)
    d = density_from_operator(DenseOperator(A), n_runs=4, n_steps=30, seed=0, progress=False)
    assert np.all(np.isfinite(d.nodes)) and np.all(np.isfinite(d.weights)) and np.all(np.isfinite(d.density))
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, atol=1e-14)
    assert -1.0 - 1e-10 <= d.nodes.min() and d.nodes.max() <= 5.0 + 1e-10
    assert float(np.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-5)
    # almost all mass sits at 0 (117 of 120 eigenvalues; each run's weight there is ~Beta(58.5, 1.5))
    assert _trapezoid_mass(d, -0.5, 0.5) == pytest.approx(117 / 120, abs=0.05)


def test_runs_of_different_lengths_are_padded_with_zero_weight(generic, monkeypatch):
    """A run that stops early is padded by repeating its largest node with weight 0."""
    A, _, _ = generic
    original = density_module.lanczos_tridiagonal
    calls = []

    def short_second_run(op, v0, n_steps, **kwargs):
        calls.append(n_steps)
        return original(op, v0, 3 if len(calls) == 2 else n_steps, **kwargs)

    monkeypatch.setattr(density_module, "lanczos_tridiagonal", short_second_run)
    res = slq_nodes(DenseOperator(A), n_runs=3, n_steps=6, seed=0, progress=False)
    np.testing.assert_array_equal(res.n_nodes, [6, 3, 6])
    theta, tau = res.run(1)
    assert len(theta) == 3
    np.testing.assert_array_equal(res.nodes[1, 3:], theta[-1])
    np.testing.assert_array_equal(res.weights[1, 3:], 0.0)
    # the CLI stores them as plain float64 arrays
    d = spectral_density(res)
    assert np.asarray(d.nodes, dtype=np.float64).shape == (3, 6)
    assert float(np.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-5)


def test_float32_operator(generic):
    A, _, lam = generic
    d = density_from_operator(DenseOperator(A.float()), n_runs=2, n_steps=10, seed=0, progress=False)
    d64 = density_from_operator(DenseOperator(A), n_runs=2, n_steps=10, seed=0, progress=False)
    assert d.nodes.dtype == np.float64
    np.testing.assert_allclose(d.nodes, d64.nodes, atol=1e-4)
    assert float(np.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-4)


def test_gaussian_density_and_log_floor():
    grid = np.linspace(-1.0, 1.0, 5)
    out = gaussian_density(grid, np.array([0.0, 0.0]), np.array([0.5, 0.0]), 1.0)
    np.testing.assert_allclose(out, 0.5 * np.exp(-(grid**2) / 2) / math.sqrt(2 * math.pi), rtol=1e-14)
    far = gaussian_density(np.array([100.0]), np.array([0.0]), np.array([1.0]), 1e-4)
    assert far[0] == 0.0
    floored = log_floor(np.array([0.0, 1e-20, 0.3]))
    np.testing.assert_array_equal(floored, [1e-12, 1e-12, 0.3])
    assert np.all(np.isfinite(np.log(floored)))
    np.testing.assert_array_equal(log_floor(np.array([0.0, 1e-3]), floor=1e-6), [1e-6, 1e-3])


# --------------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda op, r: slq_nodes(op, n_runs=0), ValueError, "n_runs"),
        (lambda op, r: slq_nodes(op, n_steps=0), ValueError, "n_steps"),
        (lambda op, r: slq_nodes(op, n_steps=2.0), TypeError, "n_steps"),
        (lambda op, r: slq_nodes(op, seed=-1), ValueError, "seed"),
        (lambda op, r: slq_nodes(object()), TypeError, "op"),
        (lambda op, r: spectral_density(r, sigma_squared=0.0), ValueError, "sigma_squared"),
        (lambda op, r: spectral_density(r, sigma_squared=float("nan")), ValueError, "sigma_squared"),
        (lambda op, r: spectral_density(r, n_grid=1), ValueError, "n_grid"),
        (lambda op, r: spectral_density(r, margin=-1.0), ValueError, "margin"),
        (lambda op, r: spectral_density(r, np.array([0.0, 0.0, 1.0])), ValueError, "grid"),
        (lambda op, r: spectral_density(r, np.zeros((2, 2))), ValueError, "grid"),
        (lambda op, r: log_floor(np.ones(2), floor=0.0), ValueError, "floor"),
        (lambda op, r: gaussian_density(np.ones(2), np.ones(3), np.ones(2), 1.0), ValueError, "nodes"),
    ],
)
def test_argument_validation(call, error, match):
    op = DenseOperator(torch.diag(torch.arange(6, dtype=torch.float64)))
    res = slq_nodes(op, n_runs=1, n_steps=3, progress=False)
    with pytest.raises(error, match=match):
        call(op, res)
