"""Lanczos, thick-restart Lanczos, power iteration and ARPACK against dense float64 eigendecompositions.

Test matrices are ``Q diag(lam) Q^T`` with a random orthogonal ``Q`` and a controlled spectrum, so the
reference eigenpairs are known exactly (and re-derived with ``numpy.linalg.eigh`` in float64). Residuals
are recomputed here with numpy from the returned vectors, independently of the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from landscape.lanczos import (
    WHICH,
    EigenResult,
    LanczosDecomposition,
    arpack_eigenpairs,
    lanczos_tridiagonal,
    power_iteration,
    top_eigenpairs,
    tridiagonal_eigh,
)
from landscape.linop import DenseOperator, LinearOperator

F64 = torch.float64
N = 300


def _with_spectrum(eigenvalues: np.ndarray, seed: int = 0) -> np.ndarray:
    """``Q diag(eigenvalues) Q^T`` in float64 with a seeded random orthogonal ``Q``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    a = (q * np.asarray(eigenvalues, dtype=np.float64)) @ q.T
    return (a + a.T) / 2


def _op(a: np.ndarray, dtype: torch.dtype = F64) -> DenseOperator:
    return DenseOperator(torch.tensor(a, dtype=dtype))


def _reference(a: np.ndarray, k: int, which: str) -> tuple[np.ndarray, np.ndarray]:
    """The k wanted eigenpairs of ``a`` from numpy, ordered as the API promises."""
    lam, u = np.linalg.eigh(a)
    order = {"LA": np.argsort(-lam), "SA": np.argsort(lam), "LM": np.argsort(-np.abs(lam))}[which][:k]
    return lam[order], u[:, order]


def _residuals(a: np.ndarray, result: EigenResult) -> np.ndarray:
    y = result.eigenvectors.detach().to("cpu", F64).numpy()
    theta = result.eigenvalues.numpy()
    return np.linalg.norm(a @ y - y * theta, axis=0)


# Spectra, n = 300. Distinct magnitudes at both ends of "indefinite" so that LA, SA and LM are unambiguous.
_RNG = np.random.default_rng(1)
SPECTRA = {
    "separated": np.r_[10.0, 8.0, 6.5, 5.0, 4.0, _RNG.uniform(-1.0, 3.0, N - 5)],
    "clustered": np.r_[10.0, 9.9, 9.8, 9.7, 9.6, _RNG.uniform(0.0, 9.0, N - 5)],
    "indefinite": np.r_[10.0, 9.0, 8.0, 7.5, 7.0, -12.0, -11.0, -9.5, -8.5, -8.2, _RNG.uniform(-6.0, 5.0, N - 10)],
    "double": np.r_[10.0, 10.0, 8.0, 7.0, 6.0, _RNG.uniform(-1.0, 5.0, N - 5)],
    "low_rank": np.r_[5.0, 3.0, 2.0, np.zeros(N - 3)],
}


@pytest.fixture(scope="module")
def mats() -> dict[str, np.ndarray]:
    return {name: _with_spectrum(lam, seed=i) for i, (name, lam) in enumerate(SPECTRA.items())}


# --------------------------------------------------------------------------- #
# tridiagonal_eigh
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("m", [1, 2, 7, 40])
def test_tridiagonal_eigh_matches_numpy_on_dense_tridiagonal(m: int) -> None:
    rng = np.random.default_rng(m)
    alpha, beta = rng.standard_normal(m), rng.uniform(0.1, 1.0, m - 1)
    theta, s = tridiagonal_eigh(torch.tensor(alpha), torch.tensor(beta))
    dense = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    assert theta.dtype == F64 and s.dtype == F64 and theta.device.type == "cpu"
    np.testing.assert_allclose(theta.numpy(), np.linalg.eigvalsh(dense), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dense @ s.numpy(), s.numpy() * theta.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.numpy().T @ s.numpy(), np.eye(m), rtol=0, atol=1e-12)
    assert np.all(np.diff(theta.numpy()) >= 0)


def test_tridiagonal_eigh_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"beta must be 1-D of length len\(alpha\) - 1 = 2"):
        tridiagonal_eigh(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="alpha must be a nonempty 1-D"):
        tridiagonal_eigh(np.ones(0), np.ones(0))
    with pytest.raises(ValueError, match="finite"):
        tridiagonal_eigh(np.array([1.0, np.nan]), np.ones(1))


# --------------------------------------------------------------------------- #
# lanczos_tridiagonal
# --------------------------------------------------------------------------- #
def test_lanczos_tridiagonal_full_run_reproduces_spectrum() -> None:
    n = 80
    a = _with_spectrum(np.random.default_rng(3).uniform(-2.0, 5.0, n), seed=3)
    op = _op(a)
    dec = lanczos_tridiagonal(op, torch.ones(n, dtype=F64), n)
    assert isinstance(dec, LanczosDecomposition)
    assert dec.n_steps == n and dec.n_matvecs == n == op.n_matvecs
    assert dec.alpha.dtype == F64 and dec.beta.dtype == F64 and dec.alpha.device.type == "cpu"
    assert dec.beta.shape == (n - 1,)
    theta, _ = tridiagonal_eigh(dec.alpha, dec.beta)
    np.testing.assert_allclose(theta.numpy(), np.linalg.eigvalsh(a), rtol=0, atol=1e-8)
    v = dec.basis.numpy()
    np.testing.assert_allclose(v @ v.T, np.eye(n), rtol=0, atol=1e-12)
    np.testing.assert_allclose(v @ a @ v.T, dec.tridiagonal().numpy(), rtol=0, atol=1e-12)


def test_lanczos_tridiagonal_extreme_ritz_values_converge(mats: dict[str, np.ndarray]) -> None:
    a = mats["separated"]
    lam = np.linalg.eigvalsh(a)
    v0 = torch.randn(N, generator=torch.Generator().manual_seed(0), dtype=F64)
    top_err, bottom_err = [], []
    for m in (5, 10, 20, 40):
        dec = lanczos_tridiagonal(_op(a), v0, m)
        theta, _ = tridiagonal_eigh(dec.alpha, dec.beta)
        assert dec.n_steps == m and not dec.breakdown
        # Cauchy interlacing: Ritz values lie inside the spectrum
        assert lam[0] - 1e-12 <= theta[0] and theta[-1] <= lam[-1] + 1e-12
        top_err.append(lam[-1] - theta[-1].item())
        bottom_err.append(theta[0].item() - lam[0])
    assert all(x >= y for x, y in zip(top_err, top_err[1:])) and top_err[-1] < 1e-8 * lam[-1]
    assert all(x >= y for x, y in zip(bottom_err, bottom_err[1:])) and bottom_err[-1] < 0.1


def test_lanczos_tridiagonal_gauss_quadrature_moments(mats: dict[str, np.ndarray]) -> None:
    """``e1^T T^p e1 = v^T A^p v`` for ``p <= 2m - 1`` (Golub & Meurant; the basis of SLQ)."""
    a = mats["indefinite"]
    v = np.random.default_rng(5).standard_normal(N)
    v /= np.linalg.norm(v)
    m = 8
    dec = lanczos_tridiagonal(_op(a), torch.tensor(v), m, keep_basis=False)
    assert dec.basis is None
    theta, s = tridiagonal_eigh(dec.alpha, dec.beta)
    nodes, weights = theta.numpy(), s[0].numpy() ** 2
    lam, u = np.linalg.eigh(a)
    mu = (u.T @ v) ** 2
    for p in range(2 * m):
        exact = np.sum(mu * lam**p)
        assert np.sum(weights * nodes**p) == pytest.approx(exact, rel=1e-9, abs=1e-9 * 12.0**p)


def test_lanczos_tridiagonal_without_reorthogonalization_agrees_for_few_steps(mats: dict[str, np.ndarray]) -> None:
    a = mats["clustered"]
    v0 = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=F64)
    full = lanczos_tridiagonal(_op(a), v0, 8)
    plain = lanczos_tridiagonal(_op(a), v0, 8, reorthogonalize=False, keep_basis=False)
    assert plain.basis is None and plain.n_matvecs == 8
    np.testing.assert_allclose(plain.alpha.numpy(), full.alpha.numpy(), rtol=1e-10)
    np.testing.assert_allclose(plain.beta.numpy(), full.beta.numpy(), rtol=1e-10)


def test_lanczos_tridiagonal_stops_on_invariant_subspace(mats: dict[str, np.ndarray]) -> None:
    a = mats["low_rank"]
    op = _op(a)
    v0 = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=F64)
    dec = lanczos_tridiagonal(op, v0, 30)
    # K(A, v0) = span(v0, u1, u2, u3): beta_4 = 0 in exact arithmetic. The stored matrix is rank 3 only up
    # to rounding, so beta_4 may be noise a little above the threshold; the step after it is exact.
    assert dec.n_steps in (4, 5) and dec.breakdown and op.n_matvecs == dec.n_matvecs == dec.n_steps
    assert dec.residual_norm < 1e-13
    assert torch.isfinite(dec.alpha).all() and torch.isfinite(dec.beta).all() and torch.isfinite(dec.basis).all()
    theta, _ = tridiagonal_eigh(dec.alpha, dec.beta)
    np.testing.assert_allclose(theta.numpy()[-3:], [2.0, 3.0, 5.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(theta.numpy()[:-3], 0.0, rtol=0, atol=1e-12)
    # an eigenvector as start vector: one step
    u = torch.tensor(np.linalg.eigh(a)[1][:, -1])
    dec1 = lanczos_tridiagonal(_op(a), u, 30)
    assert dec1.n_steps == 1 and dec1.breakdown and dec1.beta.shape == (0,)
    assert dec1.alpha.item() == pytest.approx(5.0, rel=1e-12)


def test_lanczos_tridiagonal_caps_steps_at_n_and_keeps_operator_dtype() -> None:
    n = 12
    a = _with_spectrum(np.arange(1.0, n + 1), seed=4)
    dec = lanczos_tridiagonal(_op(a, torch.float32), torch.ones(n), 50)
    assert dec.n_steps == n and dec.breakdown
    assert dec.basis.dtype == torch.float32 and dec.alpha.dtype == F64
    theta, _ = tridiagonal_eigh(dec.alpha, dec.beta)
    np.testing.assert_allclose(theta.numpy(), np.arange(1.0, n + 1), rtol=1e-5)


def test_lanczos_tridiagonal_rejects_bad_arguments() -> None:
    op = _op(np.eye(5))
    with pytest.raises(ValueError, match="n_steps must be an integer >= 1"):
        lanczos_tridiagonal(op, torch.ones(5, dtype=F64), 0)
    with pytest.raises(ValueError, match="v0 must be a flat tensor of length n = 5"):
        lanczos_tridiagonal(op, torch.ones(4, dtype=F64), 3)
    with pytest.raises(ValueError, match="v0 must be finite and nonzero"):
        lanczos_tridiagonal(op, torch.zeros(5, dtype=F64), 3)


# --------------------------------------------------------------------------- #
# top_eigenpairs: accuracy against dense references
# --------------------------------------------------------------------------- #
def _check_pairs(a: np.ndarray, result: EigenResult, k: int, which: str, tol: float, rel: float,
                 vec_tol: float | None, atol: float = 1e-13) -> None:
    """Eigenvalues to ``rel``; reported residuals equal explicit float64 ones and pass the residual test
    (up to ``atol``, the rounding level of the operator's dtype); orthonormal vectors; vectors to ``vec_tol``."""
    ref_val, ref_vec = _reference(a, k, which)
    assert result.which == which
    assert result.eigenvalues.dtype == F64 and result.eigenvalues.shape == (k,)
    assert result.residuals.dtype == F64 and result.eigenvectors.shape == (a.shape[0], k)
    np.testing.assert_allclose(result.eigenvalues.numpy(), ref_val, rtol=rel, atol=0)
    explicit = _residuals(a, result)
    np.testing.assert_allclose(result.residuals.numpy(), explicit, rtol=1e-3, atol=atol)
    assert np.all(explicit <= tol * np.abs(result.eigenvalues.numpy()) + atol)
    y = result.eigenvectors.to(F64).numpy()
    np.testing.assert_allclose(y.T @ y, np.eye(k), rtol=0, atol=max(10 * tol, 1e-10))
    if vec_tol is not None:
        assert np.all(np.abs(np.sum(y * ref_vec, axis=0)) > 1 - vec_tol)


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("k", [1, 5])
def test_top_eigenpairs_match_eigh(mats: dict[str, np.ndarray], which: str, k: int) -> None:
    a = mats["indefinite"]
    op = _op(a)
    result = top_eigenpairs(op, k=k, which=which, tol=1e-8)
    assert result.converged
    assert result.n_matvecs == op.n_matvecs
    assert result.eigenvectors.dtype == F64 and result.eigenvectors.device == op.device
    _check_pairs(a, result, k, which, tol=1e-8, rel=1e-6, vec_tol=1e-6)


@pytest.mark.parametrize("name", ["separated", "clustered"])
@pytest.mark.parametrize("which", WHICH)
def test_top_eigenpairs_separated_and_clustered(mats: dict[str, np.ndarray], name: str, which: str) -> None:
    a = mats[name]
    op = _op(a)
    result = top_eigenpairs(op, k=5, which=which, tol=1e-8)
    assert result.converged and result.n_matvecs == op.n_matvecs
    # the bottom of these spectra is a dense bulk: eigenvalues are accurate, eigenvectors ill-determined
    _check_pairs(a, result, 5, which, tol=1e-8, rel=1e-6, vec_tol=1e-6 if which != "SA" else None)


@pytest.mark.parametrize("which", WHICH)
def test_top_eigenpairs_agree_with_arpack(mats: dict[str, np.ndarray], which: str) -> None:
    a = mats["indefinite"]
    ours = top_eigenpairs(_op(a), k=5, which=which, tol=1e-10)
    op = _op(a)
    ref = arpack_eigenpairs(op, k=5, which=which, tol=1e-10)
    assert ours.converged and ref.converged and ref.n_matvecs == op.n_matvecs
    np.testing.assert_allclose(ours.eigenvalues.numpy(), ref.eigenvalues.numpy(), rtol=1e-9)
    overlap = np.abs(np.sum(ours.eigenvectors.numpy() * ref.eigenvectors.numpy(), axis=0))
    assert np.all(overlap > 1 - 1e-8)


def test_small_ncv_forces_restarts_and_still_converges(mats: dict[str, np.ndarray]) -> None:
    a = mats["clustered"]
    op = _op(a)
    result = top_eigenpairs(op, k=5, which="LA", tol=1e-8, ncv=8)
    assert result.converged and result.n_restarts >= 3
    assert result.n_matvecs == op.n_matvecs
    _check_pairs(a, result, 5, "LA", tol=1e-8, rel=1e-6, vec_tol=1e-6)
    roomy = top_eigenpairs(_op(a), k=5, which="LA", tol=1e-8, ncv=60)
    assert roomy.n_restarts < result.n_restarts


@pytest.mark.parametrize(("name", "which"), [("clustered", "LA"), ("clustered", "LM"), ("indefinite", "SA")])
def test_float32_operator(mats: dict[str, np.ndarray], name: str, which: str) -> None:
    a = mats[name]
    op = _op(a, torch.float32)
    result = top_eigenpairs(op, k=5, which=which, tol=1e-4)
    assert result.converged and result.n_matvecs == op.n_matvecs
    assert result.eigenvectors.dtype == torch.float32 and result.eigenvalues.dtype == F64
    # float32 rounding in a product with ||A|| ~ 10: ~1e-6; allow 1e-5 in the float64 recomputation
    _check_pairs(a, result, 5, which, tol=1e-4, rel=1e-4, vec_tol=None, atol=1e-5)


def test_max_matvecs_exhaustion_returns_unconverged_estimates(mats: dict[str, np.ndarray]) -> None:
    a = mats["clustered"]
    op = _op(a)
    result = top_eigenpairs(op, k=5, which="LA", tol=1e-10, max_matvecs=15)
    assert not result.converged
    assert result.n_matvecs == op.n_matvecs <= 15
    assert result.eigenvalues.shape == (5,) and torch.isfinite(result.eigenvalues).all()
    np.testing.assert_allclose(result.residuals.numpy(), _residuals(a, result), rtol=1e-6)
    # best estimates: Ritz values are lower bounds of the top eigenvalues (interlacing)
    assert np.all(result.eigenvalues.numpy() <= _reference(a, 5, "LA")[0] + 1e-12)


def test_double_eigenvalue(mats: dict[str, np.ndarray]) -> None:
    """Multiplicity 2 at the top. Guaranteed with ``confirm=True``; found through rounding at k = 5."""
    a = mats["double"]
    u_top = np.linalg.eigh(a)[1][:, -2:]  # the two-dimensional eigenspace of 10
    for k in (2, 3):
        result = top_eigenpairs(_op(a), k=k, which="LA", tol=1e-8, confirm=True)
        assert result.converged
        _check_pairs(a, result, k, "LA", tol=1e-8, rel=1e-6, vec_tol=None)
        y = result.eigenvectors[:, :2].numpy()
        np.testing.assert_allclose(np.linalg.svd(u_top.T @ y, compute_uv=False), [1.0, 1.0], atol=1e-6)
    result = top_eigenpairs(_op(a), k=5, which="LA", tol=1e-8)
    assert result.converged
    _check_pairs(a, result, 5, "LA", tol=1e-8, rel=1e-6, vec_tol=None)


def test_triple_eigenvalue_with_confirm() -> None:
    lam = np.r_[10.0, 10.0, 10.0, 8.0, 7.0, np.random.default_rng(4).uniform(-1.0, 5.0, 195)]
    a = _with_spectrum(lam, seed=4)
    op = _op(a)
    result = top_eigenpairs(op, k=4, which="LA", tol=1e-6, confirm=True)
    assert result.converged and result.n_matvecs == op.n_matvecs
    _check_pairs(a, result, 4, "LA", tol=1e-6, rel=1e-6, vec_tol=None)


def test_confirm_costs_extra_products_but_changes_nothing_without_multiplicity(mats: dict[str, np.ndarray]) -> None:
    a = mats["separated"]
    plain = top_eigenpairs(_op(a), k=2, tol=1e-6)
    op = _op(a)
    confirmed = top_eigenpairs(op, k=2, tol=1e-6, confirm=True)
    assert confirmed.converged and confirmed.n_matvecs == op.n_matvecs > plain.n_matvecs
    np.testing.assert_allclose(confirmed.eigenvalues.numpy(), plain.eigenvalues.numpy(), rtol=1e-10)


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("k", [3, 5])
def test_low_rank_operator_breakdown(mats: dict[str, np.ndarray], which: str, k: int) -> None:
    """Rank 3, n = 300: the Krylov space of v0 is invariant after 4 steps; every copy of 0 is still found."""
    a = mats["low_rank"]
    op = _op(a)
    result = top_eigenpairs(op, k=k, which=which, tol=1e-8)
    assert result.converged and result.n_matvecs == op.n_matvecs < 30
    ref_val, _ = _reference(a, k, which)
    np.testing.assert_allclose(result.eigenvalues.numpy(), ref_val, rtol=0, atol=1e-12)
    assert np.all(_residuals(a, result) <= 1e-8 * np.abs(result.eigenvalues.numpy()) + 1e-12)
    y = result.eigenvectors.numpy()
    np.testing.assert_allclose(y.T @ y, np.eye(k), atol=1e-12)


@pytest.mark.parametrize("which", WHICH)
def test_low_rank_float32_operator(mats: dict[str, np.ndarray], which: str) -> None:
    a = mats["low_rank"]
    result = top_eigenpairs(_op(a, torch.float32), k=5, which=which, tol=1e-4)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues.numpy(), _reference(a, 5, which)[0], rtol=0, atol=1e-5)
    assert np.all(_residuals(a, result) <= 1e-4 * np.abs(result.eigenvalues.numpy()) + 1e-5)


def test_start_vector_in_an_eigenspace(mats: dict[str, np.ndarray]) -> None:
    """v0 = top eigenvector: immediate breakdown; the other wanted pairs come from random restarts."""
    a = mats["separated"]
    v0 = torch.tensor(np.linalg.eigh(a)[1][:, -1])
    result = top_eigenpairs(_op(a), k=3, which="LA", tol=1e-8, v0=v0)
    assert result.converged
    _check_pairs(a, result, 3, "LA", tol=1e-8, rel=1e-6, vec_tol=1e-6)


@pytest.mark.parametrize("which", WHICH)
def test_tiny_operator_with_k_equal_n(which: str) -> None:
    lam = np.array([3.0, -1.0, 0.5, 2.0, -4.0])
    a = _with_spectrum(lam, seed=7)
    op = _op(a)
    result = top_eigenpairs(op, k=5, which=which, tol=1e-10)
    assert result.converged and result.n_matvecs == op.n_matvecs == 10  # 5 steps + 5 for the check
    _check_pairs(a, result, 5, which, tol=1e-10, rel=1e-12, vec_tol=1e-10)
    dense = arpack_eigenpairs(_op(a), k=5, which=which)
    np.testing.assert_allclose(dense.eigenvalues.numpy(), result.eigenvalues.numpy(), rtol=1e-12)


class _Diagonal(LinearOperator):
    """A minimal operator on the base protocol (no matmat override): ``diag(d) v``."""

    def __init__(self, d: torch.Tensor) -> None:
        super().__init__(d.shape[0], d.dtype, d.device)
        self.d = d

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.d * v


def test_generic_operator_protocol_and_seed_reproducibility() -> None:
    d = torch.linspace(-1.0, 2.0, 200, dtype=F64)
    d[0], d[-1] = -3.0, 5.0
    first = top_eigenpairs(_Diagonal(d), k=2, which="LM", tol=1e-8, seed=3)
    again = top_eigenpairs(_Diagonal(d), k=2, which="LM", tol=1e-8, seed=3, progress=True)
    np.testing.assert_allclose(first.eigenvalues.numpy(), [5.0, -3.0], rtol=1e-10)
    assert torch.equal(first.eigenvalues, again.eigenvalues) and first.n_matvecs == again.n_matvecs


def test_progress_in_a_log_counts_converged_eigenvalues_not_the_budget(capsys) -> None:
    """The budget of products is a cap rarely reached: a bar over it would print nothing in a log."""
    d = torch.linspace(0.0, 1.0, 300, dtype=F64)
    d[-3:] = torch.tensor([3.0, 4.0, 5.0], dtype=F64)
    result = top_eigenpairs(_Diagonal(d), k=3, tol=1e-8, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert result.n_matvecs < 100 and lines, lines
    assert all(line.startswith("lanczos top-3 LA: ") for line in lines)
    counts = [int(line.split("(")[1].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and counts[-1] == 3
    assert lines[-1].startswith("lanczos top-3 LA: 100% (3/3 eigenvalues, ")
    assert f"matvecs={result.n_matvecs} rel_res=verified" in lines[-1]


def test_top_eigenpairs_rejects_bad_arguments() -> None:
    op = _op(np.diag(np.arange(1.0, 11.0)))
    with pytest.raises(ValueError, match=r"k must be an integer with 1 <= k <= n = 10.*k=0"):
        top_eigenpairs(op, k=0)
    with pytest.raises(ValueError, match=r"k=11"):
        top_eigenpairs(op, k=11)
    with pytest.raises(ValueError, match=r"which must be one of \('LA', 'SA', 'LM'\).*'BE'"):
        top_eigenpairs(op, which="BE")
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        top_eigenpairs(op, tol=0.0)
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        top_eigenpairs(op, tol=float("nan"))
    with pytest.raises(ValueError, match=r"ncv must be an integer with k < ncv <= n \(k = 2, n = 10\)"):
        top_eigenpairs(op, k=2, ncv=2)
    with pytest.raises(ValueError, match="ncv=11"):
        top_eigenpairs(op, k=2, ncv=11)
    with pytest.raises(ValueError, match=r"max_matvecs must be an integer >= 2k = 6"):
        top_eigenpairs(op, k=3, max_matvecs=5)
    with pytest.raises(ValueError, match="v0 must be a flat tensor of length n = 10"):
        top_eigenpairs(op, v0=torch.ones(3, dtype=F64))


# --------------------------------------------------------------------------- #
# Baselines: power iteration and ARPACK
# --------------------------------------------------------------------------- #
def test_power_iteration_finds_largest_magnitude(mats: dict[str, np.ndarray]) -> None:
    for name, top in (("separated", 10.0), ("indefinite", -12.0)):
        a = mats[name]
        op = _op(a)
        result = power_iteration(op, k=1, tol=1e-8)
        assert result.which == "LM" and result.converged
        assert result.n_matvecs == op.n_matvecs
        assert result.eigenvalues.item() == pytest.approx(top, rel=1e-6)
        np.testing.assert_allclose(result.residuals.numpy(), _residuals(a, result), rtol=1e-6, atol=1e-13)


def test_power_iteration_with_deflation_finds_top_three(mats: dict[str, np.ndarray]) -> None:
    a = mats["separated"]
    result = power_iteration(_op(a), k=3, tol=1e-9)
    np.testing.assert_allclose(result.eigenvalues.numpy(), [10.0, 8.0, 6.5], rtol=1e-6)
    y = result.eigenvectors.numpy()
    np.testing.assert_allclose(y.T @ y, np.eye(3), atol=1e-6)


def test_lanczos_beats_power_iteration_on_clustered_top5(mats: dict[str, np.ndarray]) -> None:
    """The benchmark claim in miniature: top-5 of a clustered spectrum at tol = 1e-3."""
    a = mats["clustered"]
    lanczos = top_eigenpairs(_op(a), k=5, which="LM", tol=1e-3)
    power = power_iteration(_op(a), k=5, tol=1e-3)
    arpack = arpack_eigenpairs(_op(a), k=5, which="LM", tol=1e-3)
    assert lanczos.converged and arpack.converged
    assert power.n_matvecs >= 2.5 * lanczos.n_matvecs
    # ... and power iteration's eigenvalue-change test stops with worse answers
    ref = _reference(a, 5, "LM")[0]
    assert np.max(np.abs(power.eigenvalues.numpy() - ref)) > 10 * np.max(np.abs(lanczos.eigenvalues.numpy() - ref))
    assert power.relative_residuals.max() > lanczos.relative_residuals.max()


def test_power_iteration_budget_and_arguments(mats: dict[str, np.ndarray]) -> None:
    op = _op(mats["clustered"])
    result = power_iteration(op, k=2, tol=1e-12, max_matvecs=20)
    assert not result.converged and result.n_matvecs == op.n_matvecs <= 20
    with pytest.raises(ValueError, match="k must be an integer"):
        power_iteration(op, k=0)
    with pytest.raises(ValueError, match="max_matvecs must be an integer >= 2k = 4"):
        power_iteration(op, k=2, max_matvecs=3)


@pytest.mark.parametrize("which", WHICH)
def test_arpack_matches_eigh(mats: dict[str, np.ndarray], which: str) -> None:
    a = mats["indefinite"]
    op = _op(a)
    result = arpack_eigenpairs(op, k=4, which=which, tol=1e-10)
    assert result.converged and result.n_matvecs == op.n_matvecs
    _check_pairs(a, result, 4, which, tol=1e-8, rel=1e-9, vec_tol=1e-8)


def test_arpack_no_convergence_returns_partial_results(mats: dict[str, np.ndarray]) -> None:
    op = _op(mats["clustered"])
    result = arpack_eigenpairs(op, k=5, which="SA", tol=1e-12, max_matvecs=20)
    assert not result.converged and result.n_matvecs == op.n_matvecs
    assert result.eigenvalues.shape[0] <= 5


def test_arpack_rejects_bad_arguments() -> None:
    op = _op(np.eye(4))
    with pytest.raises(ValueError, match="which must be one of"):
        arpack_eigenpairs(op, which="la")
    with pytest.raises(ValueError, match="k must be an integer"):
        arpack_eigenpairs(op, k=5)
