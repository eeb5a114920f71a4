r"""Lanczos methods for symmetric operators: tridiagonalisation, extreme eigenpairs, baselines.

Everything here works on any :class:`landscape.linop.LinearOperator` (the Hessian of a network with
millions of parameters on a GPU, or a dense test matrix). Products with the operator are the expensive
part, so the algorithms minimise them; Krylov vectors stay on ``op.device`` in ``op.dtype``, and only the
small projected problems (tridiagonal or arrowhead matrices of order at most a few hundred) are moved to
the CPU and solved in float64.

The Lanczos recurrence (Lanczos 1950; Golub & Van Loan, *Matrix Computations*, 4th ed., Sec. 10.1) builds
an orthonormal basis ``V_m = [v_1, ..., v_m]`` of the Krylov space ``K_m(A, v_1)`` with

.. math::

    A V_m = V_m T_m + \beta_m v_{m+1} e_m^\top, \qquad
    T_m = \operatorname{tridiag}(\beta_{j-1}, \alpha_j, \beta_j),

and the eigenpairs ``(theta_i, s_i)`` of ``T_m`` give Ritz pairs ``(theta_i, y_i = V_m s_i)`` whose
residual is known without another product: ``||A y_i - theta_i y_i|| = |beta_m e_m^T s_i|``
(Golub & Van Loan, Sec. 10.1; Parlett, *The Symmetric Eigenvalue Problem*, 1998, Ch. 13). In floating
point the ``v_j`` lose orthogonality as Ritz vectors converge (Paige 1972), so every new vector is
reorthogonalised against the whole basis by classical Gram-Schmidt applied twice ("twice is enough":
Kahan's argument in Parlett 1998, Ch. 6; Giraud et al. 2005), two products with the basis per step.

Functions:

- :func:`lanczos_tridiagonal`: ``m`` plain Lanczos steps, the building block of stochastic Lanczos
  quadrature (Ubaru et al. 2017; Ghorbani et al. 2019).
- :func:`tridiagonal_eigh`: eigenpairs of ``T_m`` in float64.
- :func:`top_eigenpairs`: ``k`` extreme eigenpairs by thick-restart Lanczos (Wu & Simon 2000), stopped
  by the residual test ``||A y - theta y|| <= tol |theta|`` and verified with explicit products.
- :func:`power_iteration`: power iteration with deflation as in PyHessian (Yao et al. 2020), the baseline.
- :func:`arpack_eigenpairs`: ``scipy.sparse.linalg.eigsh`` (ARPACK, implicitly restarted Lanczos;
  Lehoucq, Sorensen & Yang 1998), the reference backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
from torch import Tensor

from ._checks import check_operator
from .linop import LinearOperator

__all__ = [
    "WHICH",
    "LanczosDecomposition",
    "EigenResult",
    "lanczos_tridiagonal",
    "tridiagonal_eigh",
    "top_eigenpairs",
    "power_iteration",
    "arpack_eigenpairs",
]

WHICH = ("LA", "SA", "LM")
"""Accepted ``which``: largest algebraic, smallest algebraic, largest magnitude (ARPACK's names)."""

_F64 = torch.float64


# --------------------------------------------------------------------------- #
# Results
# --------------------------------------------------------------------------- #
@dataclass
class LanczosDecomposition:
    """The outcome of ``m`` Lanczos steps: ``A V^T = V^T T + beta_m v_{m+1} e_m^T``.

    Attributes:
        alpha: diagonal of ``T``, float64 CPU tensor of length ``m``.
        beta: off-diagonal of ``T``, float64 CPU tensor of length ``m - 1``.
        basis: the Lanczos vectors as the rows of an ``m x n`` tensor in the operator's dtype and on its
            device, or ``None`` when ``keep_basis=False``.
        n_matvecs: products with the operator used (equals ``m``).
        residual_norm: ``beta_m = ||A v_m - alpha_m v_m - beta_{m-1} v_{m-1}||``, the norm of the part of
            the last product outside the basis; it bounds every Ritz residual.
        breakdown: True when the Krylov space became invariant (``beta_m`` at rounding level, or
            ``m = n``) and the recurrence stopped before ``n_steps``; the Ritz values are then exact
            eigenvalues of the operator.
    """

    alpha: Tensor
    beta: Tensor
    basis: Tensor | None
    n_matvecs: int
    residual_norm: float = 0.0
    breakdown: bool = False

    @property
    def n_steps(self) -> int:
        """The number ``m`` of Lanczos steps taken."""
        return int(self.alpha.shape[0])

    def tridiagonal(self) -> Tensor:
        """The ``m x m`` tridiagonal matrix ``T`` as a dense float64 CPU tensor."""
        return torch.diag(self.alpha) + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)


@dataclass
class EigenResult:
    """Eigenpairs of a symmetric operator with the evidence that they are eigenpairs.

    Attributes:
        eigenvalues: float64 CPU tensor of length ``k``: descending for ``which="LA"``, ascending (most
            negative first) for ``"SA"``, descending in magnitude for ``"LM"``.
        eigenvectors: ``n x k`` tensor in the operator's dtype and on its device with orthonormal columns
            (up to the convergence tolerance); column ``j`` belongs to ``eigenvalues[j]``.
        residuals: float64 CPU tensor of explicit residual norms ``||A y_j - theta_j y_j||``.
        n_matvecs: operator products used, including the ``k`` products of the explicit residual check.
        converged: whether the method's stopping test held for all ``k`` pairs (for :func:`top_eigenpairs`
            the explicit residual test, see there).
        n_restarts: thick restarts performed (0 for the power method and ARPACK, which does not report them).
        which: the ``which`` that ordered the result.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    n_matvecs: int
    converged: bool
    n_restarts: int
    which: str

    @property
    def relative_residuals(self) -> Tensor:
        """``||A y_j - theta_j y_j|| / |theta_j|`` (``inf`` where ``theta_j = 0``)."""
        return self.residuals / self.eigenvalues.abs()


# --------------------------------------------------------------------------- #
# Argument checks and small helpers
# --------------------------------------------------------------------------- #

def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer with 1 <= k <= n = {n} (the operator's size); got k={k!r}")
    return int(k)


def _check_which(which: str) -> str:
    if which not in WHICH:
        raise ValueError(
            f"which must be one of {WHICH} (largest algebraic, smallest algebraic, largest magnitude); got which={which!r}"
        )
    return which


def _check_tol(tol: float) -> float:
    if not (isinstance(tol, (int, float, np.floating)) and math.isfinite(tol) and tol > 0):
        raise ValueError(
            f"tol must be a finite number > 0 (relative residual ||Ay - theta y|| / |theta|); got tol={tol!r}"
        )
    return float(tol)


def _check_max_matvecs(max_matvecs: int | None, k: int) -> int:
    if max_matvecs is None:
        return max(1000, 20 * k)
    if isinstance(max_matvecs, bool) or not isinstance(max_matvecs, (int, np.integer)) or max_matvecs < 2 * k:
        raise ValueError(
            f"max_matvecs must be an integer >= 2k = {2 * k} (k products to build k Ritz vectors and k to check "
            f"their residuals) or None for max(1000, 20k); got max_matvecs={max_matvecs!r}"
        )
    return int(max_matvecs)


def _unit_vector(op: LinearOperator, v: Tensor, name: str) -> Tensor:
    """``v / ||v||`` on the operator's device and dtype, after checking that it is a usable start vector."""
    n = op.shape[0]
    if not isinstance(v, Tensor) or v.ndim != 1 or v.shape[0] != n:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a flat tensor of length n = {n}; got {got}")
    v = v.detach().to(device=op.device, dtype=op.dtype)
    norm = torch.linalg.vector_norm(v)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise ValueError(f"{name} must be finite and nonzero; got a vector of norm {float(norm)}")
    return v / norm


def _gaussian(n: int, op: LinearOperator, generator: torch.Generator) -> Tensor:
    """A standard Gaussian vector drawn on the CPU (reproducible across devices), then moved."""
    draw_dtype = _F64 if op.dtype == _F64 else torch.float32
    return torch.randn(n, generator=generator, dtype=draw_dtype).to(device=op.device, dtype=op.dtype)


def _rounding_floor(n: int, dtype: torch.dtype, anorm: float) -> float:
    """Size of rounding noise in a product with ``A``: ``log2(n + 1) eps ||A||``.

    A residual or Lanczos ``beta`` below this is indistinguishable from zero: it sets the breakdown
    threshold and the absolute part of the residual test (without it, an eigenvalue 0 could never pass
    ``||A y|| <= tol * 0``). The ``log2 n`` is the growth of summation error in blocked/pairwise
    reductions. For eigenvalues well above rounding level it is negligible next to ``tol |theta|``
    (float32, ``n = 10^7``: ``3e-6 ||A||``).
    """
    return math.log2(n + 1) * torch.finfo(dtype).eps * anorm


def _orthogonalize(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Classical Gram-Schmidt twice: ``w - B^T (B w)`` applied two times for ``B`` with orthonormal rows.

    Returns the new vector (``w`` itself is not modified, it may be the operator's buffer) and the summed
    coefficients ``B w`` of both passes. Two passes give orthogonality to working precision unless ``w``
    lies in the span of ``B`` (Giraud, Langou, Rozloznik & van den Eshof 2005).
    """
    h = basis @ w
    w = w - basis.T @ h
    h2 = basis @ w
    w.addmv_(basis.T, h2, alpha=-1.0)
    return w, h + h2


def _random_orthonormal(basis: Tensor, op: LinearOperator, generator: torch.Generator) -> Tensor:
    """A seeded random unit vector orthogonal to the rows of ``basis`` (needs ``basis.shape[0] < n``)."""
    for _ in range(3):
        x, _ = _orthogonalize(_gaussian(op.shape[0], op, generator), basis)
        norm = torch.linalg.vector_norm(x)
        if float(norm) > 0:
            return x / norm
    raise RuntimeError("could not draw a vector orthogonal to the Lanczos basis; the basis spans the whole space")


def _preference(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``theta`` from most to least wanted under ``which`` (stable for ties)."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _explicit_residuals(op: LinearOperator, vectors: Tensor, theta: np.ndarray) -> np.ndarray:
    """``||A y_j - theta_j y_j||`` for the columns ``y_j`` of the ``n x k`` ``vectors`` (``k`` products)."""
    products = op.matmat(vectors)
    theta_t = torch.as_tensor(theta, dtype=vectors.dtype, device=vectors.device)
    r = products - vectors * theta_t
    return torch.linalg.vector_norm(r, dim=0).to("cpu", _F64).numpy()


def _result(theta: np.ndarray, vectors: Tensor, res: np.ndarray, n_matvecs: int, converged: bool,
            n_restarts: int, which: str) -> EigenResult:
    order = _preference(theta, which)
    idx = torch.as_tensor(order.copy(), device=vectors.device)
    return EigenResult(
        eigenvalues=torch.as_tensor(theta[order].copy(), dtype=_F64),
        # reorder rows of the k x n transpose so that each returned eigenvector stays contiguous
        eigenvectors=vectors.T.index_select(0, idx).T,
        residuals=torch.as_tensor(res[order].copy(), dtype=_F64),
        n_matvecs=int(n_matvecs),
        converged=bool(converged),
        n_restarts=int(n_restarts),
        which=which,
    )


# --------------------------------------------------------------------------- #
# Plain Lanczos and the tridiagonal eigenproblem
# --------------------------------------------------------------------------- #
def lanczos_tridiagonal(
    op: LinearOperator,
    v0: Tensor,
    n_steps: int,
    *,
    reorthogonalize: bool = True,
    keep_basis: bool = True,
) -> LanczosDecomposition:
    r"""Run up to ``n_steps`` Lanczos steps from ``v0`` and return the tridiagonal ``T_m`` (and basis).

    The recurrence (Lanczos 1950; Golub & Van Loan, Sec. 10.1), with ``v_1 = v0 / ||v0||``:

    .. math::

        w = A v_j, \quad \alpha_j = v_j^\top w, \quad
        w \leftarrow w - \alpha_j v_j - \beta_{j-1} v_{j-1}, \quad
        \beta_j = \|w\|, \quad v_{j+1} = w / \beta_j .

    With ``reorthogonalize=True`` (default) the three-term update is replaced by classical Gram-Schmidt
    applied twice against all previous ``v_i`` (full reorthogonalisation; Paige 1972; Parlett 1998,
    Ch. 13), which keeps the ``v_j`` orthonormal to working precision, so ``T_m = V_m^T A V_m`` holds
    and no spurious copies ("ghosts") of converged Ritz values appear. The recurrence stops early, with
    ``m < n_steps`` and no NaNs, when ``beta_j`` falls to rounding level (``log2(n+1) eps ||T||``):
    the Krylov space is then invariant and the Ritz values are exact eigenvalues. It never takes more
    than ``n`` steps.

    This is the inner loop of stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani,
    Krishnan & Xiao 2019): the eigenvalues ``theta_i`` of ``T_m`` and the squared first components
    ``tau_i^2`` of its eigenvectors are the nodes and weights of the Gauss quadrature of
    ``v_1^T f(A) v_1``.

    Cost: ``m`` operator products; ``4 m^2 n`` flops of reorthogonalisation on the device; one transfer
    of two scalars to the host per step (to test for breakdown). Memory ``m n`` for the basis (always
    kept when reorthogonalising; with ``reorthogonalize=False, keep_basis=False`` only three vectors).

    Args:
        op: a symmetric :class:`~landscape.linop.LinearOperator`.
        v0: start vector, flat tensor of length ``n`` (normalised here; any dtype/device).
        n_steps: maximum number of steps ``m >= 1``.
        reorthogonalize: full reorthogonalisation (recommended; without it the ``v_j`` lose orthogonality
            once a Ritz value converges and ``T_m`` acquires duplicate Ritz values).
        keep_basis: return the ``m x n`` basis; ``False`` drops it (saves memory for quadrature).

    Returns:
        A :class:`LanczosDecomposition` with ``alpha`` (length ``m``), ``beta`` (length ``m - 1``) in
        float64 on the CPU, the basis or ``None``, and ``n_matvecs = m``.

    Raises:
        ValueError: if ``n_steps < 1`` or ``v0`` is not a finite nonzero vector of length ``n``.
        RuntimeError: if the operator returns non-finite values.

    Example:
        >>> import torch
        >>> from landscape.linop import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
        >>> dec = lanczos_tridiagonal(A, torch.ones(5, dtype=torch.float64), 5)
        >>> theta, _ = tridiagonal_eigh(dec.alpha, dec.beta)
        >>> [round(t, 10) for t in theta.tolist()]
        [1.0, 2.0, 3.0, 4.0, 5.0]
    """
    n = check_operator(op)
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1 (the number of Lanczos steps); got n_steps={n_steps!r}")
    m_max = min(int(n_steps), n)
    v = _unit_vector(op, v0, "v0")
    store = reorthogonalize or keep_basis
    basis = torch.empty((m_max, n), dtype=op.dtype, device=op.device) if store else None
    alphas: list[float] = []
    betas: list[float] = []
    v_prev: Tensor | None = None
    beta_prev_t: Tensor | None = None
    beta_prev = 0.0
    anorm = 0.0
    beta = 0.0
    breakdown = False
    for j in range(m_max):
        if basis is not None:
            basis[j] = v
        w = op.matvec(v)
        if reorthogonalize:
            w, h = _orthogonalize(w, basis[: j + 1])
            alpha_t = h[j]
        else:
            alpha_t = torch.dot(v, w)
            w = w - alpha_t * v
            if v_prev is not None:
                w = w - beta_prev_t * v_prev
        beta_t = torch.linalg.vector_norm(w)
        alpha, beta = torch.stack([alpha_t, beta_t]).to("cpu", _F64).tolist()
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise RuntimeError(
                f"the operator returned non-finite values at Lanczos step {j + 1} (alpha={alpha}, beta={beta})"
            )
        alphas.append(alpha)
        anorm = max(anorm, abs(alpha) + beta_prev + beta)
        breakdown = beta <= _rounding_floor(n, op.dtype, anorm) or j + 1 == n
        if breakdown or j + 1 == m_max:
            break
        betas.append(beta)
        v_prev, beta_prev_t, beta_prev = v, beta_t, beta
        v = w / beta_t
    m = len(alphas)
    return LanczosDecomposition(
        alpha=torch.tensor(alphas, dtype=_F64),
        beta=torch.tensor(betas, dtype=_F64),
        basis=basis[:m] if (keep_basis and basis is not None) else None,
        n_matvecs=m,
        residual_norm=float(beta),
        breakdown=bool(breakdown),
    )


def tridiagonal_eigh(alpha: Tensor | np.ndarray, beta: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    r"""Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal ``T = tridiag(beta, alpha, beta)``.

    Solved in float64 on the CPU by LAPACK ``dstemr`` (MRRR; Dhillon & Parlett 2004) through
    ``scipy.linalg.eigh_tridiagonal``: ``T = S diag(theta) S^T``. ``O(m^2)`` work, no operator products.

    Args:
        alpha: diagonal, length ``m >= 1`` (tensor on any device, or array).
        beta: off-diagonal, length ``m - 1``.

    Returns:
        ``(theta, S)``: float64 CPU tensors, ``theta`` ascending of length ``m``, ``S`` of shape ``m x m``
        with the eigenvector of ``theta[i]`` in column ``i``.

    Raises:
        ValueError: if the shapes do not fit (``alpha`` 1-D nonempty, ``len(beta) = len(alpha) - 1``) or
            the entries are not finite.
    """
    a = np.asarray(alpha.detach().to("cpu", _F64) if isinstance(alpha, Tensor) else alpha, dtype=np.float64)
    b = np.asarray(beta.detach().to("cpu", _F64) if isinstance(beta, Tensor) else beta, dtype=np.float64)
    if a.ndim != 1 or a.shape[0] < 1:
        raise ValueError(f"alpha must be a nonempty 1-D array (the diagonal); got shape {a.shape}")
    if b.ndim != 1 or b.shape[0] != a.shape[0] - 1:
        raise ValueError(f"beta must be 1-D of length len(alpha) - 1 = {a.shape[0] - 1}; got shape {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("alpha and beta must be finite")
    if a.shape[0] == 1:
        return torch.tensor(a, dtype=_F64), torch.ones((1, 1), dtype=_F64)
    theta, s = scipy.linalg.eigh_tridiagonal(a, b)
    return torch.from_numpy(np.ascontiguousarray(theta)), torch.from_numpy(np.ascontiguousarray(s))


# --------------------------------------------------------------------------- #
# Thick-restart Lanczos
# --------------------------------------------------------------------------- #
def _default_ncv(k: int, n: int) -> int:
    return min(n, max(2 * k + 1, k + 20))


def _key(theta: np.ndarray | float, which: str) -> np.ndarray | float:
    """Larger is more wanted: ``theta`` for ``"LA"``, ``-theta`` for ``"SA"``, ``|theta|`` for ``"LM"``."""
    if which == "LA":
        return theta
    if which == "SA":
        return -theta
    return np.abs(theta)


def _ritz_vectors(basis: Tensor, coefficients: np.ndarray) -> Tensor:
    """``V^T S`` as an ``n x k`` tensor for the basis rows ``V`` (``j x n``) and float64 ``S`` (``j x k``).

    Returned as the transpose of a row-major ``k x n`` product, so each Ritz vector is contiguous.
    """
    coeff = torch.as_tensor(np.ascontiguousarray(coefficients.T), dtype=basis.dtype, device=basis.device)
    return (coeff @ basis).T


def top_eigenpairs(
    op: LinearOperator,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    ncv: int | None = None,
    v0: Tensor | None = None,
    seed: int = 0,
    progress: bool = False,
    *,
    confirm: bool = False,
) -> EigenResult:
    r"""The ``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Algorithm (Wu & Simon 2000, Sec. 3; Stathopoulos, Saad & Wu 1998). Krylov vectors live on the
    operator's device in its dtype; the projected problems are solved in float64 on the CPU.

    1. Lanczos steps with full reorthogonalisation (classical Gram-Schmidt twice; Paige 1972; Parlett
       1998, Ch. 13) extend an orthonormal basis ``V_j`` of at most ``ncv`` vectors. The
       reorthogonalisation coefficients give the projection ``T_j = V_j^T A V_j`` column by column
       (tridiagonal for a plain Krylov space, arrowhead after a restart) at no extra cost.
    2. After every step (once ``j >= k``), Rayleigh-Ritz: ``T_j = S diag(theta) S^T``, Ritz vectors
       ``y_i = V_j s_i``. Their residuals are bounded without a product by
       ``||A y_i - theta_i y_i|| <= |beta_j S_{j,i}| + sum_l |S_{l,i}| d_l`` (Golub & Van Loan,
       Sec. 10.1; Parlett 1998, Ch. 13), where ``beta_j`` couples the next Krylov vector and ``d_l``
       bounds what ``A v_l`` has outside the basis (0 for Lanczos vectors; the verified residual for a
       vector locked by ``confirm``).
    3. When the ``k`` wanted estimates (largest algebraic ``"LA"``, smallest ``"SA"``, largest magnitude
       ``"LM"``) pass ``||A y - theta y|| <= tol |theta| + c``, with ``c = log2(n+1) eps ||T||`` the
       rounding floor (it only matters for eigenvalues at rounding level, e.g. the zeros of a low-rank
       operator), the Ritz vectors are formed and the test is repeated with explicit residuals
       (``k`` products). If that verification fails (rounding, loss of orthogonality), the estimates are
       scaled by the observed discrepancy and the iteration continues.
    4. Thick restart when the basis holds ``ncv`` vectors: keep the ``l = k + (ncv - k) // 2`` most
       wanted Ritz vectors and continue the Krylov sequence from ``v_{j+1}``; ``T_l = diag(theta_1..l)``
       bordered by the couplings ``beta_j S_{j,i}`` (Wu & Simon 2000, Sec. 3). Nothing learned is lost
       and memory stays ``ncv n``.
    5. Invariant subspace (``beta_j <= c``: a low-rank operator, ``v0`` in a sum of few eigenspaces, or
       the whole space spanned): continue from a seeded random vector orthogonal to the basis, with
       coupling 0 and ``d_j = beta_j``. A Krylov space from a random vector in an invariant subspace
       ``C`` contains exactly one vector per distinct eigenvalue of ``A`` on ``C``; so when such a block
       closes, every eigenvalue left in its complement repeats one of the block's Ritz values. A block
       also closes, without a restart, when ``beta_j <= sqrt(eps) ||T||``: then ``beta_j`` is usually the
       operator's own rounding noise (a stored low-rank matrix is full rank at the ``eps ||A||`` level)
       and the next Lanczos vector is noise, i.e. effectively random. The run does not stop while a
       further copy of a closed block's Ritz value would enter the wanted ``k``; hence after a
       breakdown multiplicities are resolved (with probability one).

    Multiplicity without breakdown: a Krylov space contains a single vector of each eigenspace, so in
    exact arithmetic a multiple eigenvalue appears once. In floating point further copies grow from
    rounding noise and often appear before the tolerance is met (the tests cover a double eigenvalue
    with ``k = 5`` at ``tol = 1e-8``), as with ARPACK, but this is not guaranteed, especially for small
    ``k`` or loose ``tol``. ``confirm=True`` removes that gap: after convergence the ``k`` pairs are
    locked (kept with their verified residuals) and Lanczos continues from a fresh random vector
    orthogonal to them until the ``(k+1)``-th most wanted Ritz value has converged too; if the new
    block produced a better value (a further copy, or an eigenvalue whose eigenvector was missing from
    ``v0``), it is swapped in, verified, and the check repeats. This costs roughly one more top-1
    solve on the deflated operator and finds every copy of a multiple eigenvalue with probability one
    (up to the usual Krylov premise that extreme Ritz values converge first). Every returned pair
    satisfies the residual test in all cases.

    Cost: at most ``max_matvecs`` products: one per Lanczos step plus ``k`` per verification (``k`` of
    the budget are reserved so that the final answer always comes with explicit residuals). Device work
    per step ``O(ncv n)``; memory ``(ncv + 3) n`` in the operator's dtype; one host transfer of at most
    ``ncv + 1`` float64 numbers per step.

    Args:
        op: a symmetric :class:`~landscape.linop.LinearOperator`.
        k: number of eigenpairs, ``1 <= k <= n``.
        which: ``"LA"`` (returned descending), ``"SA"`` (ascending, most negative first) or ``"LM"``
            (descending in magnitude).
        tol: relative residual tolerance: stop when ``||A y - theta y|| <= tol |theta|`` for all ``k``.
        max_matvecs: budget of operator products, ``>= 2k``; default ``max(1000, 20 k)``. When it runs
            out the best Ritz pairs are returned with ``converged=False`` (no exception).
        ncv: largest basis size, ``k < ncv <= n`` (or ``ncv = n``); default ``min(n, max(2k + 1, k + 20))``.
            Larger means fewer restarts and usually fewer products, and more memory.
        v0: start vector (length ``n``); default a seeded Gaussian vector.
        seed: seeds the start vector and every random restart vector (``torch.Generator`` on the CPU).
        progress: show progress: the number of the ``k`` wanted pairs whose residual estimate passes the
            test (a line each time it grows, in a log), the products used and the largest relative
            residual estimate.
        confirm: after convergence, lock the pairs and search their complement from a random vector
            for copies of multiple eigenvalues (see above); off by default because it adds products.

    Returns:
        An :class:`EigenResult` with float64 CPU eigenvalues and explicit residuals, ``n x k``
        eigenvectors in the operator's dtype on its device, ``n_matvecs`` (equal to the growth of
        ``op.n_matvecs``), ``converged`` (the explicit residual test held for all ``k``), ``n_restarts``.

    Raises:
        ValueError: for ``k`` outside ``[1, n]``, unknown ``which``, ``tol <= 0``, ``ncv`` outside
            ``(k, n]``, ``max_matvecs < 2k`` or a bad ``v0``.
        RuntimeError: if the operator returns non-finite values.

    Example:
        >>> import torch
        >>> from landscape.linop import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.linspace(-2.0, 10.0, 100, dtype=torch.float64)))
        >>> res = top_eigenpairs(A, k=2, which="LA", tol=1e-8)
        >>> [round(x, 6) for x in res.eigenvalues.tolist()], res.converged
        ([10.0, 9.878788], True)
    """
    n = check_operator(op)
    k = _check_k(k, n)
    which = _check_which(which)
    tol = _check_tol(tol)
    max_matvecs = _check_max_matvecs(max_matvecs, k)
    if ncv is None:
        ncv = _default_ncv(k, n)
    elif isinstance(ncv, bool) or not isinstance(ncv, (int, np.integer)) or not (k < ncv <= n or ncv == n):
        raise ValueError(f"ncv must be an integer with k < ncv <= n (k = {k}, n = {n}), or ncv = n; got ncv={ncv!r}")
    ncv = int(ncv)
    keep = min(ncv - 1, k + (ncv - k) // 2)

    generator = torch.Generator().manual_seed(int(seed))
    r: Tensor | None = _unit_vector(op, v0 if v0 is not None else _gaussian(n, op, generator), "v0")
    basis = torch.empty((ncv, n), dtype=op.dtype, device=op.device)
    t = np.zeros((ncv, ncv))  # projection V^T A V of the current basis
    d = np.zeros(ncv)  # d[l] >= ||(I - V V^T) A v_l|| apart from the Krylov coupling of the last vector
    j = 0  # current basis size
    block = 0  # index where the current Krylov block (after a breakdown or lock) starts
    coupling = 0.0  # ||part of A v_j outside the basis||, carried by the next vector r
    virtual: np.ndarray | None = None  # Ritz values of a block that just broke down (their copies may remain)
    probing = False  # confirm=True: the k pairs are locked and a random block searches the complement
    locked = np.zeros(0)
    anorm = 0.0
    floor = 0.0
    used = 0
    n_restarts = 0
    est_scale = 1.0  # grows when an explicit check finds the estimates too optimistic
    verified: tuple[np.ndarray, Tensor, np.ndarray] | None = None  # explicit check of the current T
    converged = False
    theta = s = None

    bar = None
    if progress:
        from .progress import progress_bar

        # Counted in converged eigenvalues, not in products: the budget is a cap, and usually far from reached.
        bar = progress_bar(total=k, desc=f"lanczos top-{k} {which}", unit="eigenvalues", lines="each")
    try:
        while True:
            # One Lanczos step on v_{j+1} = r: column j of T from the reorthogonalisation coefficients.
            basis[j] = r
            w = op.matvec(r)
            used += 1
            w, h = _orthogonalize(w, basis[: j + 1])
            beta_t = torch.linalg.vector_norm(w)
            hb = torch.cat([h, beta_t.reshape(1)]).to("cpu", _F64).numpy()
            h_np, beta = hb[:-1], float(hb[-1])
            if not np.all(np.isfinite(hb)):
                raise RuntimeError(f"the operator returned non-finite values after {used} products")
            t[: j + 1, j] = h_np
            t[j, : j + 1] = h_np
            d[j] = 0.0
            anorm = max(anorm, abs(float(h_np[j])), beta)  # lower bounds of ||A||; Ritz values below
            j += 1
            floor = _rounding_floor(n, op.dtype, anorm)
            if beta > floor:
                coupling, r = beta, w / beta_t
            else:  # exact breakdown: continue from a random vector, keep beta as a residual bound
                d[j - 1] = beta
                coupling = 0.0
                r = _random_orthonormal(basis[:j], op, generator) if j < n else None
            if beta <= math.sqrt(torch.finfo(op.dtype).eps) * anorm:
                # The block since `block` is invariant to working accuracy (at beta <= floor exactly; above
                # it, beta is typically the operator's own rounding noise and r is noise). Copies of its
                # eigenvalues may remain in the complement: remember them until the next block is running.
                virtual = np.linalg.eigvalsh(t[block:j, block:j])
                block = j
            else:
                virtual = None
            verified = None

            if j >= k + int(probing):
                theta, s = np.linalg.eigh(t[:j, :j])
                anorm = max(anorm, float(np.abs(theta).max()))
                floor = _rounding_floor(n, op.dtype, anorm)
                order = _preference(theta, which)
                estimates = np.abs(s).T @ d[:j] + coupling * np.abs(s[j - 1])
                thresholds = tol * np.abs(theta) + floor
                wanted = order[: k + int(probing)]  # with confirm, also the best value outside the k
                if bar is not None:
                    _show_progress(bar, estimates, thresholds, theta, order[:k], est_scale, used)
                ok = bool(np.all(est_scale * estimates[wanted] <= thresholds[wanted]))
                if ok and virtual is not None:  # a further copy of the closed block's values would be wanted
                    kth = order[k - 1]
                    ok = not np.any(_key(virtual, which) > _key(theta[kth], which) + thresholds[kth])
                if ok:
                    wanted = order[:k]
                    vectors = _ritz_vectors(basis[:j], s[:, wanted])
                    res = _explicit_residuals(op, vectors, theta[wanted])
                    used += k
                    verified = (theta[wanted], vectors, res)
                    if not np.all(res <= thresholds[wanted]):
                        bad = res > thresholds[wanted]
                        ratio = np.max(res[bad] / np.maximum(estimates[wanted][bad], 1e-300))
                        est_scale = min(max(2.0 * est_scale, ratio), 1e12)
                    else:
                        improved = not probing or bool(np.any(
                            _key(theta[wanted], which) > _key(locked, which) + thresholds[wanted]))
                        if not (confirm and improved and k < n and used + 2 + k <= max_matvecs):
                            converged = True
                            if bar is not None:
                                bar.set_postfix(matvecs=used, rel_res="verified")
                                bar.update(k - bar.n)
                            break
                        # Lock the k verified pairs and search their complement from a random vector.
                        basis[:k] = vectors.T
                        t[:] = 0.0
                        t[np.arange(k), np.arange(k)] = theta[wanted]
                        d[:] = 0.0
                        d[:k] = res
                        locked = theta[wanted].copy()
                        j = block = k
                        coupling, virtual, probing = 0.0, None, True
                        r = _random_orthonormal(basis[:k], op, generator)
                        continue
                if r is None:  # the basis spans the whole space: nothing left to add
                    break
            if used + 1 + k > max_matvecs:
                break
            if j == ncv:  # thick restart (Wu & Simon 2000, Sec. 3)
                kept = _preference(theta, which)[:keep]
                basis[:keep] = _ritz_vectors(basis[:j], s[:, kept]).T
                d_kept = np.abs(s[:, kept]).T @ d[:j]
                t[:] = 0.0
                t[np.arange(keep), np.arange(keep)] = theta[kept]
                t[:keep, keep] = t[keep, :keep] = coupling * s[j - 1, kept]
                d[:] = 0.0
                d[:keep] = d_kept
                j, block = keep, 0
                n_restarts += 1
    finally:
        if bar is not None:
            bar.close()

    if verified is None:  # budget exhausted: explicit residuals from the k reserved products
        theta, s = np.linalg.eigh(t[:j, :j])
        wanted = _preference(theta, which)[:k]
        vectors = _ritz_vectors(basis[:j], s[:, wanted])
        res = _explicit_residuals(op, vectors, theta[wanted])
        used += k
        converged = bool(np.all(res <= tol * np.abs(theta[wanted]) + floor))
        verified = (theta[wanted], vectors, res)
    return _result(*verified, n_matvecs=used, converged=converged, n_restarts=n_restarts, which=which)


def _show_progress(bar: Any, estimates: np.ndarray, thresholds: np.ndarray, theta: np.ndarray, wanted: np.ndarray,
                   est_scale: float, used: int) -> None:
    """Move the bar to the number of wanted pairs whose estimate passes (never back: a restart or a
    rescaled estimate may undo one for a while), with the products used and the worst relative estimate."""
    passing = int(np.count_nonzero(est_scale * estimates[wanted] <= thresholds[wanted]))
    rel = estimates[wanted] / np.maximum(np.abs(theta[wanted]), 1e-300)
    bar.set_postfix(matvecs=used, rel_res=f"{rel.max():.1e}")
    if passing > bar.n:
        bar.update(passing - bar.n)


# --------------------------------------------------------------------------- #
# Baselines
# --------------------------------------------------------------------------- #
def power_iteration(
    op: LinearOperator,
    k: int = 1,
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    v0: Tensor | None = None,
    seed: int = 0,
) -> EigenResult:
    r"""The ``k`` largest-magnitude eigenpairs by power iteration with deflation, as in PyHessian.

    For ``i = 1..k`` (Yao, Gholami, Keutzer & Mahoney 2020, Alg. 1; Golub & Van Loan, Sec. 8.2):
    start from a random unit ``v`` orthogonal to the eigenvectors already found (``Y``) and iterate on
    the deflated operator ``(I - Y Y^T) A (I - Y Y^T)``:

    .. math::

        w = (I - Y Y^\top) A v, \quad \lambda \leftarrow v^\top w, \quad v \leftarrow w / \|w\|,

    stopping when ``|lambda_new - lambda_old| / (|lambda_old| + 1e-6) < tol`` (PyHessian's test). The
    error of ``v`` shrinks like ``|lambda_{i+1} / lambda_i|`` per product, so clustered eigenvalues
    need many products, and the eigenvalue-change test can stop long before the residual is small. The
    returned eigenvalues are the Rayleigh quotients ``y^T A y`` of the returned vectors, computed together
    with the explicit residuals from one final product per vector; ``converged`` reports PyHessian's
    test (it is not the residual test of :func:`top_eigenpairs`; compare ``residuals``).

    Cost: the products of the iterations plus ``k`` for the residuals, at most ``max_matvecs`` in all;
    the budget left is shared equally among the eigenpairs not yet computed.

    Args:
        op: a symmetric :class:`~landscape.linop.LinearOperator`.
        k: number of eigenpairs, ``1 <= k <= n``.
        tol: relative eigenvalue-change tolerance (PyHessian's default is ``1e-3``).
        max_matvecs: budget, ``>= 2k``; default ``max(1000, 20 k)``.
        v0: start vector of the first iteration; default seeded Gaussian.
        seed: seeds the random start vectors.

    Returns:
        An :class:`EigenResult` with ``which="LM"``: eigenvalues in descending magnitude.

    Raises:
        ValueError: for ``k`` outside ``[1, n]``, ``tol <= 0``, ``max_matvecs < 2k`` or a bad ``v0``.
    """
    n = check_operator(op)
    k = _check_k(k, n)
    tol = _check_tol(tol)
    max_matvecs = _check_max_matvecs(max_matvecs, k)
    generator = torch.Generator().manual_seed(int(seed))
    found = torch.zeros((k, n), dtype=op.dtype, device=op.device)
    start = _unit_vector(op, v0, "v0") if v0 is not None else None
    used = 0
    all_converged = True
    for i in range(k):
        share = (max_matvecs - k - used) // (k - i)
        v = start if (i == 0 and start is not None) else _gaussian(n, op, generator)
        if i > 0:
            v, _ = _orthogonalize(v, found[:i])
        v = v / torch.linalg.vector_norm(v)
        lam_old: float | None = None
        converged_i = False
        for _ in range(share):
            w = op.matvec(v)
            used += 1
            if i > 0:
                w, _ = _orthogonalize(w, found[:i])
            lam_t, norm_t = torch.stack([torch.dot(v, w), torch.linalg.vector_norm(w)]).to("cpu", _F64).tolist()
            if norm_t == 0.0:  # v is in the null space of the deflated operator: eigenvalue 0, exact
                converged_i = True
                break
            v = w / norm_t
            if lam_old is not None and abs(lam_t - lam_old) / (abs(lam_old) + 1e-6) < tol:
                converged_i = True
                break
            lam_old = lam_t
        found[i] = v
        all_converged &= converged_i
    vectors = found.T
    products = op.matmat(vectors)
    used += k
    theta = (vectors * products).sum(dim=0)
    res = torch.linalg.vector_norm(products - vectors * theta, dim=0)
    return _result(theta.to("cpu", _F64).numpy(), vectors, res.to("cpu", _F64).numpy(), n_matvecs=used,
                   converged=all_converged, n_restarts=0, which="LM")


def arpack_eigenpairs(
    op: LinearOperator,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    seed: int = 0,
    ncv: int | None = None,
) -> EigenResult:
    r"""The ``k`` extreme eigenpairs from ARPACK (``scipy.sparse.linalg.eigsh``), the reference backend.

    ARPACK runs implicitly restarted Lanczos (Sorensen 1992; Lehoucq, Sorensen & Yang 1998) on
    ``op.to_scipy()``, i.e. in float64 on the CPU with one device round trip per product. Its ``tol`` is
    passed through; scipy documents it as "relative accuracy for eigenvalues", and ARPACK's test
    (``dsconv``) accepts a Ritz pair when its *estimated* residual ``|beta_m s_{m,i}|`` is at most
    ``tol max(eps^{2/3}, |theta_i|)``: the same relative-residual test as :func:`top_eigenpairs`, but on
    the estimate only (no explicit check) and with an absolute floor ``eps^{2/3}`` (``~4e-11``) instead of
    one relative to ``||A||``. The explicit residuals are computed here afterwards (``k`` products).

    ``max_matvecs`` is approximate: ARPACK limits restart cycles, not products, so
    ``maxiter = max(1, max_matvecs // (ncv - k))`` cycles are allowed (each costs at most ``ncv - k``
    products, the first ``ncv``). If ARPACK does not converge, the pairs it did converge are returned
    (possibly fewer than ``k``) with ``converged=False``. For ``k = n`` (which ``eigsh`` refuses) the
    operator is formed densely with ``n`` products and solved by ``numpy.linalg.eigh``.

    Cost: ARPACK's products plus ``k`` for the residuals; ``n_matvecs`` is the growth of ``op.n_matvecs``.

    Args:
        op: a symmetric :class:`~landscape.linop.LinearOperator`.
        k: number of eigenpairs, ``1 <= k <= n``.
        which: ``"LA"``, ``"SA"`` or ``"LM"`` (passed to ``eigsh`` unchanged).
        tol: ARPACK's tolerance (see above).
        max_matvecs: approximate budget; default ``max(1000, 20 k)``.
        seed: seeds ARPACK's start vector.
        ncv: ARPACK's basis size; default scipy's ``min(n, max(2k + 1, 20))``.

    Returns:
        An :class:`EigenResult` ordered as for :func:`top_eigenpairs`.

    Raises:
        ValueError: for ``k`` outside ``[1, n]``, unknown ``which``, ``tol <= 0`` or ``max_matvecs < 2k``.
    """
    n = check_operator(op)
    k = _check_k(k, n)
    which = _check_which(which)
    tol = _check_tol(tol)
    max_matvecs = _check_max_matvecs(max_matvecs, k)
    start = op.n_matvecs
    converged = True
    if k >= n:
        eye = torch.eye(n, dtype=op.dtype, device=op.device)
        dense = op.matmat(eye).to("cpu", _F64).numpy()
        theta, u = np.linalg.eigh(0.5 * (dense + dense.T))
    else:
        if ncv is None:
            ncv = min(n, max(2 * k + 1, 20))
        generator = torch.Generator().manual_seed(int(seed))
        start_vector = torch.randn(n, generator=generator, dtype=_F64).numpy()
        maxiter = max(1, max_matvecs // max(1, ncv - k))
        try:
            theta, u = scipy.sparse.linalg.eigsh(op.to_scipy(), k=k, which=which, tol=tol, v0=start_vector,
                                                 ncv=ncv, maxiter=maxiter)
        except scipy.sparse.linalg.ArpackNoConvergence as err:
            theta, u, converged = err.eigenvalues, err.eigenvectors, False
    theta = np.asarray(theta, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64).reshape(n, -1)
    if k >= n:  # keep the k wanted of the full decomposition
        wanted = _preference(theta, which)[:k]
        theta, u = theta[wanted], u[:, wanted]
    vectors = torch.as_tensor(np.ascontiguousarray(u), device=op.device).to(op.dtype)
    res = _explicit_residuals(op, vectors, theta) if theta.shape[0] else np.zeros(0)
    return _result(theta, vectors, res, n_matvecs=op.n_matvecs - start, converged=converged, n_restarts=0,
                   which=which)
