r"""Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

The spectral density of an ``n x n`` symmetric ``A`` with eigenvalues ``lambda_k`` and its Gaussian
smoothing are

.. math::

    \phi(t) = \frac{1}{n} \sum_{k=1}^{n} \delta(t - \lambda_k), \qquad
    \phi_\sigma(t) = \frac{1}{n} \sum_{k=1}^{n} N(t; \lambda_k, \sigma^2) = \frac{1}{n}\,\mathrm{tr}\, N(t; A, \sigma^2).

For a unit vector ``v``, ``v^T f(A) v = sum_k (q_k^T v)^2 f(lambda_k)`` is a Riemann-Stieltjes integral
that ``m`` Lanczos steps from ``v`` turn into an ``m``-point Gauss quadrature: nodes ``theta_i`` = the
eigenvalues of the tridiagonal ``T_m`` (Ritz values), weights ``tau_i = (e_1^T s_i)^2`` = squared first
components of its eigenvectors (Golub & Welsch 1969), exact for polynomials of degree ``<= 2m - 1``:

.. math::

    \sum_{i=1}^{m} \tau_i \theta_i^j = e_1^\top T_m^j e_1 = v^\top A^j v, \qquad j \le 2m - 1.

Averaging over random unit ``v`` (``E[v v^T] = I / n``) gives the SLQ estimate (Lin, Saad, Yang 2016,
Sec. 3; Ubaru, Chen, Saad 2017; Ghorbani, Krishnan, Xiao 2019, Sec. 3)

.. math::

    \widehat\phi_\sigma(t) = \frac{1}{n_v} \sum_{l=1}^{n_v} \sum_{i=1}^{m} \tau_i^{(l)}
        N(t; \theta_i^{(l)}, \sigma^2),
    \qquad \sigma^2 = 10^{-5} (\lambda_{\max} - \lambda_{\min}) \text{ by default,}

with ``lambda_max``, ``lambda_min`` the extreme Ritz values over all runs. Each run's weights sum to 1,
so the density integrates to 1. Plot it on a logarithmic y axis (as Ghorbani et al. 2019 do; Foret
et al. 2021, Fig. 3): the bulk near zero and the outliers differ by many orders of magnitude. Use
:func:`log_floor` to floor the density (at ``1e-12`` by default) before taking logs.

Everything after the Lanczos runs (tridiagonal eigenproblems, nodes, weights, density) is float64 numpy
on the CPU; the operator's vectors stay on ``op.device`` in ``op.dtype``.

References:
    Golub & Welsch. Calculation of Gauss quadrature rules. Mathematics of Computation, 1969.
    Lin, Saad, Yang. Approximating spectral densities of large matrices. SIAM Review, 2016.
    Ubaru, Chen, Saad. Fast estimation of tr(f(A)) via stochastic Lanczos quadrature. SIMAX, 2017.
    Ghorbani, Krishnan, Xiao. An investigation into neural net optimization via Hessian eigenvalue
    density. ICML 2019 (Sec. 3).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._checks import check_int, check_operator
from .lanczos import lanczos_tridiagonal, tridiagonal_eigh
from .linop import LinearOperator
from .progress import progress_bar

__all__ = [
    "SLQResult",
    "Density",
    "slq_start_vector",
    "slq_nodes",
    "concatenate_slq",
    "slq_quadrature",
    "default_sigma_squared",
    "gaussian_density",
    "spectral_density",
    "density_from_operator",
    "log_floor",
]

DEFAULT_SIGMA_FACTOR = 1e-5
MIN_GRID_POINTS = 10_000
MAX_GRID_POINTS = 1_000_000
POINTS_PER_SIGMA = 3
LOG_FLOOR = 1e-12


@dataclass
class SLQResult:
    """Gauss quadrature nodes and weights of ``n_runs`` Lanczos runs.

    Runs that break down early (``m < n_steps``: the start vector lies in an invariant subspace, e.g.
    ``n_steps > n`` or a low-rank ``A``) have fewer nodes. The arrays are padded to the longest run by
    repeating the run's largest node with weight 0, so they stay sorted, finite and exact for any
    weighted sum; ``n_nodes`` gives each run's true length.

    Attributes:
        nodes: ``(n_runs, m_max)`` Ritz values ``theta_i``, ascending per run (float64).
        weights: ``(n_runs, m_max)`` quadrature weights ``tau_i = (e_1^T s_i)^2``; each row sums to 1.
        n_nodes: ``(n_runs,)`` number of Lanczos steps each run took.
        n_matvecs: matrix-vector products used by all runs.
        dim: the operator's size ``n``.
    """

    nodes: np.ndarray
    weights: np.ndarray
    n_nodes: np.ndarray
    n_matvecs: int
    dim: int

    @property
    def n_runs(self) -> int:
        return int(self.nodes.shape[0])

    @property
    def lambda_min(self) -> float:
        """The smallest Ritz value over all runs."""
        return float(self.nodes[:, 0].min())

    @property
    def lambda_max(self) -> float:
        """The largest Ritz value over all runs."""
        return float(self.nodes.max())

    def run(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Nodes and weights of run ``index`` without padding."""
        m = int(self.n_nodes[index])
        return self.nodes[index, :m], self.weights[index, :m]


@dataclass
class Density:
    """A smoothed eigenvalue density ``phi_sigma`` on a grid (integrates to ~1 over the grid).

    Attributes:
        grid: ``(n_grid,)`` ascending points ``t`` (float64).
        density: ``(n_grid,)`` values of ``phi_sigma(t)`` (float64, >= 0).
        nodes: ``(n_runs, m_max)`` SLQ nodes (see :class:`SLQResult`).
        weights: ``(n_runs, m_max)`` SLQ weights.
        sigma_squared: the Gaussian kernel's variance.
        n_matvecs: matrix-vector products used.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma_squared: float
    n_matvecs: int

    @property
    def lambda_min(self) -> float:
        return float(self.nodes[:, 0].min())

    @property
    def lambda_max(self) -> float:
        return float(self.nodes.max())



def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value}")
    return value


def slq_start_vector(
    n: int, run: int, *, seed: int = 0, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> Tensor:
    """The unit start vector of SLQ run ``run``: ``g / ||g||`` with ``g ~ N(0, I_n)``.

    ``g / ||g||`` is uniform on the sphere, so ``E[v v^T] = I / n`` and ``E[v^T f(A) v] = tr f(A) / n``.
    Each run has its own CPU generator seeded from ``(seed, run)``, so a run is reproducible on its own
    and more runs can be added later. Drawn and normalised in float64, then cast to ``dtype``.
    """
    n = check_int("n", n, 1)
    run = check_int("run", run, 0)
    seed = check_int("seed", seed, 0)
    state = int(np.random.SeedSequence([seed, run]).generate_state(1, np.uint64)[0])
    generator = torch.Generator().manual_seed(state)
    g = torch.randn(n, generator=generator, dtype=torch.float64)
    return (g / torch.linalg.vector_norm(g)).to(device=device, dtype=dtype)


def _quadrature_rule(alpha: Tensor, beta: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Gauss rule of the Jacobi matrix ``T = tridiag(beta, alpha, beta)``: (nodes ascending, weights).

    Weights ``tau_i = S[0, i]^2`` (Golub & Welsch 1969), renormalised to sum to exactly 1 (they do up to
    rounding since ``S`` is orthogonal).
    """
    theta, S = tridiagonal_eigh(alpha, beta)
    theta = np.asarray(torch.as_tensor(theta).cpu(), dtype=np.float64).reshape(-1)
    first = np.asarray(torch.as_tensor(S).cpu(), dtype=np.float64)[0]
    tau = first**2
    return theta, tau / tau.sum()


def slq_nodes(
    op: LinearOperator, n_runs: int = 10, n_steps: int = 80, *, seed: int = 0, progress: bool = True,
    first_run: int = 0,
) -> SLQResult:
    """Stochastic Lanczos quadrature nodes and weights (Ghorbani et al. 2019, Sec. 3; Ubaru et al. 2017).

    Run ``l`` starts Lanczos with full reorthogonalisation from :func:`slq_start_vector` ``(n, l, seed)``
    and takes up to ``n_steps`` steps (fewer on breakdown); the Ritz values of the tridiagonal ``T_m``
    are the nodes and the squared first components of its eigenvectors the weights. For each run

        ``sum_i tau_i theta_i^j = v^T A^j v`` for ``j <= 2m - 1``,

    and averaged over runs ``sum_i tau_i f(theta_i)`` estimates ``tr f(A) / n`` (:func:`slq_quadrature`).

    Args:
        op: a symmetric linear operator.
        n_runs: number of random start vectors ``n_v``, at least 1.
        n_steps: Lanczos steps ``m`` per run, at least 1 (cost: ``n_runs * n_steps`` products and an
            ``n_steps x n`` basis on the device for the reorthogonalisation).
        seed: non-negative seed of the start vectors.
        progress: show a progress bar over the runs.
        first_run: index of the first run: runs ``first_run, ..., first_run + n_runs - 1`` are computed,
            so a long computation can be done (and saved) a run at a time and joined with
            :func:`concatenate_slq`, equal bit for bit to one call.

    Returns:
        An :class:`SLQResult`.

    Example:
        >>> import torch
        >>> from landscape.linop import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 1.0, 1.0, 3.0], dtype=torch.float64)))
        >>> res = slq_nodes(A, n_runs=2, n_steps=10, progress=False)
        >>> res.n_nodes.tolist()  # two distinct eigenvalues: the Krylov space breaks down after 2 steps
        [2, 2]
        >>> res.nodes.round(10).tolist()
        [[1.0, 3.0], [1.0, 3.0]]
        >>> res.weights.sum(axis=1).round(12).tolist()  # weight at 1.0 ~ Beta(3/2, 1/2): random
        [1.0, 1.0]
    """
    n = check_operator(op)
    n_runs = check_int("n_runs", n_runs, 1)
    n_steps = check_int("n_steps", n_steps, 1)
    seed = check_int("seed", seed, 0)
    first_run = check_int("first_run", first_run, 0)

    rules = []
    n_matvecs = 0
    runs = range(first_run, first_run + n_runs)
    for run in progress_bar(runs, desc="SLQ", unit="run", enabled=progress, leave=False):
        v0 = slq_start_vector(n, run, seed=seed, dtype=op.dtype, device=op.device)
        dec = lanczos_tridiagonal(op, v0, n_steps, reorthogonalize=True, keep_basis=False)
        n_matvecs += int(dec.n_matvecs)
        rules.append(_quadrature_rule(dec.alpha, dec.beta))
    return _padded(rules, n_matvecs, n)


def _padded(rules: list[tuple[np.ndarray, np.ndarray]], n_matvecs: int, dim: int) -> SLQResult:
    """Runs of different lengths as one :class:`SLQResult`, padded as its docstring describes."""
    m_max = max(len(theta) for theta, _ in rules)
    nodes = np.empty((len(rules), m_max), dtype=np.float64)
    weights = np.zeros((len(rules), m_max), dtype=np.float64)
    for row, (theta, tau) in enumerate(rules):
        nodes[row, : len(theta)] = theta
        nodes[row, len(theta) :] = theta[-1]
        weights[row, : len(tau)] = tau
    n_nodes = np.array([len(theta) for theta, _ in rules], dtype=np.int64)
    return SLQResult(nodes=nodes, weights=weights, n_nodes=n_nodes, n_matvecs=n_matvecs, dim=dim)


def concatenate_slq(results: list[SLQResult]) -> SLQResult:
    """The runs of several :class:`SLQResult` (of one operator) as one, in order.

    Example:
        >>> import torch
        >>> from landscape.linop import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.linspace(0.0, 1.0, 30, dtype=torch.float64)))
        >>> whole = slq_nodes(A, n_runs=3, n_steps=8, progress=False)
        >>> parts = [slq_nodes(A, n_runs=1, n_steps=8, first_run=r, progress=False) for r in range(3)]
        >>> bool(np.array_equal(concatenate_slq(parts).nodes, whole.nodes))
        True
    """
    if not results:
        raise ValueError("concatenate_slq needs at least one SLQResult")
    if len({r.dim for r in results}) != 1:
        raise ValueError(f"the results come from operators of different sizes {sorted({r.dim for r in results})}")
    rules = [r.run(i) for r in results for i in range(r.n_runs)]
    return _padded(rules, sum(r.n_matvecs for r in results), results[0].dim)


def slq_quadrature(result: SLQResult, f=None) -> float:
    """SLQ estimate of ``tr f(A) / n``: ``(1 / n_v) sum_l sum_i tau_i^(l) f(theta_i^(l))``.

    Ubaru, Chen, Saad 2017 (the SLQ estimator of ``tr f(A)``, divided by ``n``). ``f`` is a vectorised
    function of a float64 array (default: the identity, so ``n * slq_quadrature(result)`` estimates
    ``tr A``).
    """
    values = result.nodes if f is None else np.asarray(f(result.nodes), dtype=np.float64)
    return float(np.sum(result.weights * values) / result.n_runs)


def default_sigma_squared(lambda_min: float, lambda_max: float) -> float:
    """The kernel variance ``sigma^2 = 1e-5 (lambda_max - lambda_min)`` (SPEC Sec. 3; PyHessian's rule).

    Note the rule is not scale invariant (``sigma`` grows like ``sqrt(range)``). If all Ritz values
    coincide (``A = c I`` or ``A = 0``) the range is replaced by ``max(|lambda|, 1)`` so that the kernel
    stays a proper density.
    """
    spread = float(lambda_max) - float(lambda_min)
    if not spread > 0:
        spread = max(abs(float(lambda_max)), abs(float(lambda_min)), 1.0)
    return DEFAULT_SIGMA_FACTOR * spread


def gaussian_density(
    grid: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma_squared: float
) -> np.ndarray:
    r"""``phi(t) = sum_i w_i N(t; theta_i, sigma^2)`` at every ``t`` in ``grid``.

    ``N(t; theta, sigma^2) = exp(-(t - theta)^2 / (2 sigma^2)) / sqrt(2 pi sigma^2)``. ``nodes`` and
    ``weights`` are flattened; pass weights already divided by the number of runs. Evaluated in chunks
    of the grid to bound memory.
    """
    sigma_squared = _check_positive("sigma_squared", sigma_squared)
    t = np.asarray(grid, dtype=np.float64).reshape(-1)
    theta = np.asarray(nodes, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if theta.shape != w.shape:
        raise ValueError(f"nodes and weights must have the same size; got {theta.size} and {w.size}")
    keep = w != 0
    theta, w = theta[keep], w[keep]
    out = np.zeros_like(t)
    if theta.size == 0:
        return out
    norm = 1.0 / math.sqrt(2.0 * math.pi * sigma_squared)
    chunk = max(1, 4_000_000 // theta.size)
    for start in range(0, t.size, chunk):
        diff = t[start : start + chunk, None] - theta[None, :]
        out[start : start + chunk] = np.exp(diff**2 * (-0.5 / sigma_squared)) @ w * norm
    return out


def _default_grid(
    lambda_min: float, lambda_max: float, sigma_squared: float, n_grid: int | None, margin: float | None
) -> np.ndarray:
    sigma = math.sqrt(sigma_squared)
    if margin is None:
        margin = max(0.01 * (lambda_max - lambda_min), 6.0 * sigma)  # tails lose < 1e-9 of the mass
    lo, hi = lambda_min - margin, lambda_max + margin
    if n_grid is None:
        wanted = math.ceil(POINTS_PER_SIGMA * (hi - lo) / sigma) + 1
        n_grid = min(max(MIN_GRID_POINTS, wanted), MAX_GRID_POINTS)
        if wanted > MAX_GRID_POINTS:
            warnings.warn(
                f"the kernel (sigma = {sigma:.3g}) is narrower than the grid spacing "
                f"{(hi - lo) / (n_grid - 1):.3g} allows to resolve with {MAX_GRID_POINTS} points; pass a "
                "larger sigma_squared or an explicit grid",
                RuntimeWarning,
                stacklevel=3,
            )
    return np.linspace(lo, hi, n_grid)


def spectral_density(
    slq: SLQResult,
    grid: np.ndarray | None = None,
    *,
    n_grid: int | None = None,
    sigma_squared: float | None = None,
    margin: float | None = None,
) -> Density:
    r"""The smoothed SLQ density ``phi_sigma`` (Ghorbani et al. 2019, Sec. 3) on a grid.

    .. math::

        \widehat\phi_\sigma(t) = \frac{1}{n_v} \sum_{l=1}^{n_v} \sum_{i} \tau_i^{(l)}
            \frac{1}{\sqrt{2\pi\sigma^2}} \exp\Big(-\frac{(t - \theta_i^{(l)})^2}{2\sigma^2}\Big).

    It is not renormalised: over a grid that covers the nodes plus a few ``sigma`` and resolves
    ``sigma``, its trapezoid integral is 1 up to ~1e-6, which makes a useful check.

    Args:
        slq: nodes and weights from :func:`slq_nodes`.
        grid: points ``t`` (1-D, finite, ascending); default ``linspace(lambda_min - margin,
            lambda_max + margin, n_grid)`` with ``lambda`` the extreme Ritz values.
        n_grid: number of default grid points; default: enough for 3 points per ``sigma`` and at least
            10,000 (at most 1,000,000, with a warning if that cannot resolve ``sigma``).
        sigma_squared: kernel variance; default ``1e-5 (lambda_max - lambda_min)``
            (:func:`default_sigma_squared`).
        margin: default grid extension on each side; default ``max(0.01 (lambda_max - lambda_min),
            6 sigma)``.

    Returns:
        A :class:`Density`. For a log-scale plot use ``log_floor(d.density)``.

    Example:
        >>> import torch
        >>> from landscape.linop import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.linspace(-1.0, 4.0, 50, dtype=torch.float64)))
        >>> d = spectral_density(slq_nodes(A, n_runs=3, n_steps=20, progress=False))
        >>> round(float(np.trapezoid(d.density, d.grid)), 6), d.sigma_squared == 1e-5 * (d.lambda_max - d.lambda_min)
        (1.0, True)
    """
    lam_min, lam_max = slq.lambda_min, slq.lambda_max
    if sigma_squared is None:
        sigma_squared = default_sigma_squared(lam_min, lam_max)
    sigma_squared = _check_positive("sigma_squared", sigma_squared)
    if grid is None:
        if n_grid is not None:
            n_grid = check_int("n_grid", n_grid, 2)
        if margin is not None:
            margin = _check_positive("margin", margin, allow_zero=True)
        grid = _default_grid(lam_min, lam_max, sigma_squared, n_grid, margin)
    else:
        grid = np.asarray(grid, dtype=np.float64)
        if grid.ndim != 1 or grid.size < 2 or not np.all(np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
            raise ValueError(
                f"grid must be a 1-D, finite, strictly increasing array of at least 2 points; got shape "
                f"{grid.shape}"
            )
    density = gaussian_density(grid, slq.nodes, slq.weights / slq.n_runs, sigma_squared)
    return Density(
        grid=grid,
        density=density,
        nodes=slq.nodes,
        weights=slq.weights,
        sigma_squared=float(sigma_squared),
        n_matvecs=slq.n_matvecs,
    )


def density_from_operator(
    op: LinearOperator,
    n_runs: int = 10,
    n_steps: int = 80,
    *,
    seed: int = 0,
    grid: np.ndarray | None = None,
    n_grid: int | None = None,
    sigma_squared: float | None = None,
    margin: float | None = None,
    progress: bool = True,
) -> Density:
    """:func:`slq_nodes` followed by :func:`spectral_density`; see those for the arguments."""
    slq = slq_nodes(op, n_runs=n_runs, n_steps=n_steps, seed=seed, progress=progress)
    return spectral_density(slq, grid, n_grid=n_grid, sigma_squared=sigma_squared, margin=margin)


def log_floor(density: np.ndarray, floor: float = LOG_FLOOR) -> np.ndarray:
    """``max(density, floor)``: the density ready for a logarithmic y axis (the SLQ plot convention).

    Far from every node the Gaussian kernel underflows to 0 (log -inf); flooring at ``1e-12`` keeps the
    curve finite while leaving every value that matters on the plot unchanged.
    """
    floor = _check_positive("floor", floor)
    return np.maximum(np.asarray(density, dtype=np.float64), floor)
