"""Trace estimators against dense float64 traces and closed forms.

Stochastic claims are checked at stated tolerances on fixed seeds (so the tests are deterministic):
|estimate - tr A| <= 4 standard errors, standard errors against the closed-form Rademacher variance
Var[z^T A z] = 2 (||A||_F^2 - sum_i A_ii^2) (Avron & Toledo 2011), and Hutch++ against Hutchinson at
equal matrix-vector products on a matrix with a fast-decaying spectrum.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from landscape.linop import DenseOperator
from landscape.trace import TraceEstimate, hutch_plus_plus, hutchinson, rademacher_probes


def _with_spectrum(eigenvalues: np.ndarray, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (float64)."""
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def _hutchinson_std(A: torch.Tensor) -> float:
    """Closed-form standard deviation of one Rademacher sample z^T A z."""
    return math.sqrt(2.0 * (float((A**2).sum()) - float((torch.diagonal(A) ** 2).sum())))


@pytest.fixture(scope="module")
def generic() -> torch.Tensor:
    """n = 300, an indefinite spectrum spread over [-1, 3]."""
    rng = np.random.default_rng(1)
    return _with_spectrum(rng.uniform(-1.0, 3.0, size=300), seed=1)


@pytest.fixture(scope="module")
def decaying() -> torch.Tensor:
    """n = 400, PSD: 12 large eigenvalues 100 * 0.6^i plus a bulk of size ~1e-3."""
    rng = np.random.default_rng(2)
    lam = np.concatenate([100.0 * 0.6 ** np.arange(12), rng.uniform(0.0, 2e-3, size=388)])
    return _with_spectrum(lam, seed=2)


# --------------------------------------------------------------------------------------------------
# Hutchinson
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hutchinson_within_four_standard_errors(generic, seed):
    est = hutchinson(DenseOperator(generic), n_samples=400, seed=seed)
    exact = float(torch.trace(generic))
    assert isinstance(est, TraceEstimate) and est.method == "hutchinson"
    assert abs(est.value - exact) <= 4 * est.std_error
    assert est.samples.shape == (400,) and est.samples.dtype == np.float64
    assert est.value == pytest.approx(est.samples.mean(), rel=1e-12)


def test_hutchinson_standard_error_matches_closed_form_and_shrinks_as_inverse_sqrt(generic):
    sigma = _hutchinson_std(generic)
    small = hutchinson(DenseOperator(generic), n_samples=100, seed=3)
    large = hutchinson(DenseOperator(generic), n_samples=400, seed=4)
    # sample std of 100 / 400 draws is within 25% / 15% of the true std for this (near-Gaussian) law
    assert small.std_error * math.sqrt(100) == pytest.approx(sigma, rel=0.25)
    assert large.std_error * math.sqrt(400) == pytest.approx(sigma, rel=0.15)
    # 4x the samples halves the standard error (ratio 2 within 30%)
    assert small.std_error / large.std_error == pytest.approx(2.0, rel=0.3)


def test_hutchinson_mean_error_over_seeds_matches_standard_error(generic):
    """The spread of independent estimates is the closed-form sigma / sqrt(N) (within 35%, 20 seeds)."""
    exact = float(torch.trace(generic))
    errors = np.array([hutchinson(DenseOperator(generic), 50, seed=s).value - exact for s in range(20)])
    assert abs(errors.mean()) <= 4 * _hutchinson_std(generic) / math.sqrt(50 * 20)
    assert np.sqrt((errors**2).mean()) == pytest.approx(_hutchinson_std(generic) / math.sqrt(50), rel=0.35)


def test_hutchinson_is_exact_on_a_diagonal_matrix():
    """z^T D z = sum_i z_i^2 d_i = tr D for every Rademacher z: zero variance."""
    d = torch.linspace(-2.0, 5.0, 257, dtype=torch.float64)
    est = hutchinson(DenseOperator(torch.diag(d)), n_samples=17, seed=5)
    assert np.allclose(est.samples, float(d.sum()), rtol=0, atol=1e-12)
    assert est.value == pytest.approx(float(d.sum()), abs=1e-12)
    assert est.std_error == 0.0


def test_hutchinson_batch_does_not_change_the_probes(generic):
    one_by_one = hutchinson(DenseOperator(generic), n_samples=23, seed=6)
    for batch in (1, 5, 23, 64):
        blocked = hutchinson(DenseOperator(generic), n_samples=23, seed=6, batch=batch)
        np.testing.assert_allclose(blocked.samples, one_by_one.samples, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [None, 1, 7, 100])
def test_hutchinson_matvec_accounting(generic, batch):
    op = DenseOperator(generic)
    op.n_matvecs = 11
    est = hutchinson(op, n_samples=30, seed=0, batch=batch)
    assert est.n_matvecs == 30 == op.n_matvecs - 11


def test_hutchinson_seeded_determinism(generic):
    a = hutchinson(DenseOperator(generic), 20, seed=9)
    b = hutchinson(DenseOperator(generic), 20, seed=9)
    c = hutchinson(DenseOperator(generic), 20, seed=10)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.value == b.value
    assert not np.array_equal(a.samples, c.samples)


def test_hutchinson_single_sample_has_undefined_standard_error(generic):
    est = hutchinson(DenseOperator(generic), n_samples=1)
    assert est.n_matvecs == 1 and math.isnan(est.std_error) and math.isfinite(est.value)


def test_hutchinson_float32_operator_matches_float64(generic):
    """Same probes in float32: the per-probe forms agree to float32 accuracy (reduced in float64)."""
    e64 = hutchinson(DenseOperator(generic), 40, seed=0)
    e32 = hutchinson(DenseOperator(generic.float()), 40, seed=0)
    scale = float(generic.abs().sum())
    np.testing.assert_allclose(e32.samples, e64.samples, rtol=0, atol=1e-6 * scale)
    assert isinstance(e32.value, float) and e32.samples.dtype == np.float64


def test_rademacher_probes_entries_and_chunking():
    g = torch.Generator().manual_seed(0)
    Z = rademacher_probes(g, 4, 1000, dtype=torch.float32, device="cpu")
    assert Z.shape == (4, 1000) and Z.dtype == torch.float32
    assert set(Z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(Z.mean())) < 0.1
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    whole = rademacher_probes(g1, 5, 300, dtype=torch.float64, device="cpu")
    parts = torch.cat([rademacher_probes(g2, k, 300, dtype=torch.float64, device="cpu") for k in (2, 3)])
    assert torch.equal(whole, parts)


# --------------------------------------------------------------------------------------------------
# Hutch++
# --------------------------------------------------------------------------------------------------


def test_hutch_plus_plus_exact_on_rank_r_matrix():
    """rank 8 and k = m/3 = 10 >= 8: Q spans range(A), the residual (I - QQ^T) A (I - QQ^T) vanishes."""
    rng = np.random.default_rng(3)
    lam = np.zeros(250)
    lam[:8] = rng.uniform(-3.0, 10.0, size=8)
    A = _with_spectrum(lam, seed=3)
    est = hutch_plus_plus(DenseOperator(A), n_matvecs=30, seed=0)
    assert abs(est.value - float(lam.sum())) <= 1e-8
    assert est.std_error <= 1e-8
    assert est.method == "hutch++"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hutch_plus_plus_within_four_standard_errors(generic, seed):
    est = hutch_plus_plus(DenseOperator(generic), n_matvecs=150, seed=seed)
    assert abs(est.value - float(torch.trace(generic))) <= 4 * est.std_error
    assert est.samples.shape == (50,)
    assert est.value == pytest.approx(est.samples.mean(), rel=1e-12)


def test_hutch_plus_plus_beats_hutchinson_on_fast_decaying_spectrum(decaying):
    """Equal budget of 60 products, 10 seeds: median |error| of Hutch++ at least 5x smaller.

    Here Hutchinson's error is dominated by the 12 large eigenvalues (sigma ~ sqrt(2) ||A||_F);
    Hutch++ removes the top 20 directions exactly and only sees the ~1e-3 bulk.
    """
    exact = float(torch.trace(decaying))
    op = DenseOperator(decaying)
    err_h = [abs(hutchinson(op, 60, seed=s).value - exact) for s in range(10)]
    err_pp = [abs(hutch_plus_plus(op, 60, seed=s).value - exact) for s in range(10)]
    assert np.median(err_pp) * 5 <= np.median(err_h)
    # and Hutch++'s standard error reports its much smaller uncertainty honestly
    for s in range(3):
        est = hutch_plus_plus(op, 60, seed=s)
        assert abs(est.value - exact) <= 4 * est.std_error
        assert est.std_error < 0.2 * hutchinson(op, 60, seed=s).std_error


@pytest.mark.parametrize("m", [3, 4, 5, 100, 101, 102])
def test_hutch_plus_plus_matvec_accounting(generic, m):
    op = DenseOperator(generic)
    before = op.n_matvecs
    est = hutch_plus_plus(op, n_matvecs=m, seed=1)
    assert est.n_matvecs == m == op.n_matvecs - before
    assert len(est.samples) == m - 2 * (m // 3)


def test_hutch_plus_plus_budget_beyond_three_n_is_exact_and_counts_what_it_used():
    A = _with_spectrum(np.linspace(-1.0, 1.0, 20), seed=4)
    op = DenseOperator(A)
    est = hutch_plus_plus(op, n_matvecs=75, seed=0)  # k = 25 > n = 20: Q is a full basis
    assert est.n_matvecs == 25 + 20 + 25 == op.n_matvecs
    assert est.value == pytest.approx(float(torch.trace(A)), abs=1e-10)


def test_hutch_plus_plus_seeded_determinism(generic):
    a = hutch_plus_plus(DenseOperator(generic), 30, seed=2)
    b = hutch_plus_plus(DenseOperator(generic), 30, seed=2)
    c = hutch_plus_plus(DenseOperator(generic), 30, seed=3)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.value != c.value


def test_hutch_plus_plus_float32_operator(decaying):
    est = hutch_plus_plus(DenseOperator(decaying.float()), 60, seed=0)
    assert est.value == pytest.approx(float(torch.trace(decaying)), rel=1e-4)


# --------------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda op: hutchinson(op, 0), ValueError, "n_samples"),
        (lambda op: hutchinson(op, 2.5), TypeError, "n_samples"),
        (lambda op: hutchinson(op, True), TypeError, "n_samples"),
        (lambda op: hutchinson(op, 5, batch=0), ValueError, "batch"),
        (lambda op: hutch_plus_plus(op, 2), ValueError, "n_matvecs"),
        (lambda op: hutch_plus_plus(op, "9"), TypeError, "n_matvecs"),
        (lambda op: hutchinson(object()), TypeError, "op"),
    ],
)
def test_argument_validation(call, error, match):
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(error, match=match):
        call(op)


def test_hutch_plus_plus_progress_counts_its_products(capsys):
    generic = torch.randn(30, 30, dtype=torch.float64)
    hutch_plus_plus(DenseOperator(generic + generic.T), n_matvecs=30, seed=0, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("(")[1].split(" ")[0] for line in lines] == ["10/30", "20/30", "30/30"]
    assert all(line.startswith("hutch++: ") and "matvec" in line for line in lines)
    hutch_plus_plus(DenseOperator(generic + generic.T), n_matvecs=30, seed=0)
    assert capsys.readouterr().err == ""  # off by default, as before
