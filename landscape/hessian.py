"""The Hessian spectrum of a trained network: top eigenpairs, trace and eigenvalue density.

Every function takes ``(model, loss_fn, data)`` and analyses the Hessian of the whole-dataset objective
``L(w) = (1/N) sum_i l(f(x_i; w), y_i)`` at the model's weights (:mod:`landscape.objective`: eval mode,
batch-size-weighted sums, exact Hessian-vector products through ``torch.func``). Pass ``dtype=torch.float64``
for reference-quality numbers.

* :func:`top_eigenvalues`: the top-k (``which="LA"``), most negative (``"SA"``) or largest-magnitude
  (``"LM"``) eigenpairs by thick-restart Lanczos (default), ARPACK, or power iteration with deflation.
* :func:`hessian_trace`: Hutchinson or Hutch++ with a standard error.
* :func:`spectral_density`: stochastic Lanczos quadrature (Ghorbani et al. 2019).
* :func:`summary`: ``lambda_max``, ``lambda_max / lambda_5`` (Jastrzebski et al. 2020) and the trace.

Models and data beyond ``(x, y)`` tensors: every function here also takes the keyword options of
:class:`~landscape.objective.Objective` (``forward``, ``weight``, ``target``, ``params``, ``stream``,
``memory_budget``), and ``loss_fn=None`` for a model that computes its own loss (Hugging Face style);
the batch protocol is :mod:`landscape.batches`.

Example:
    >>> import torch
    >>> from landscape import hessian
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> result = hessian.top_eigenvalues(model, torch.nn.functional.cross_entropy, (X, y), k=2,
    ...                                  progress=False)
    >>> result.eigenvalues.shape, bool(result.eigenvalues[0] >= result.eigenvalues[1])
    (torch.Size([2]), True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as _distributed
from .density import Density, density_from_operator
from .lanczos import EigenResult, arpack_eigenpairs, power_iteration, top_eigenpairs
from .objective import Data, HessianOperator, LossFn, Objective
from .trace import TraceEstimate, hutch_plus_plus, hutchinson

__all__ = [
    "HessianEigen",
    "HessianSummary",
    "hessian_operator",
    "top_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "summary",
]

METHODS = ("lanczos", "arpack", "power")
TRACE_METHODS = ("hutchinson", "hutch++")


@dataclass
class HessianEigen:
    """Eigenpairs of the Hessian.

    Attributes:
        eigenvalues: 1-D float64 tensor, descending for ``"LA"`` / ``"LM"`` (by magnitude), ascending
            (most negative first) for ``"SA"``.
        eigenvectors: one parameter dict per eigenvalue (unit norm over all parameters together).
        n_matvecs: Hessian-vector products used (each one pass over the data).
        converged: whether ``||H v - lambda v|| <= tol |lambda|`` holds for every pair.
        residuals: ``||H v - lambda v||`` per pair.
        method, which, tol: how it was computed.
    """

    eigenvalues: Tensor
    eigenvectors: list[dict[str, Tensor]]
    n_matvecs: int
    converged: bool
    residuals: Tensor
    method: str
    which: str
    tol: float

    def to_dict(self) -> dict[str, Any]:
        """Scalars and eigenvalues as plain Python values (for JSON)."""
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.tolist(),
            "n_matvecs": self.n_matvecs,
            "converged": self.converged,
            "method": self.method,
            "which": self.which,
            "tol": self.tol,
        }


@dataclass
class HessianSummary:
    """The numbers a SAM-vs-SGD comparison reports (Foret et al. 2021, Fig. 3 left).

    ``ratio = lambda_max / lambda_5`` (Jastrzebski et al. 2020), ``trace`` with its standard error.
    """

    lambda_max: float
    lambda_5: float
    ratio: float
    trace: float
    trace_std_error: float
    top_eigenvalues: list[float]
    n_matvecs: int
    converged: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lambda_max": self.lambda_max,
            "lambda_5": self.lambda_5,
            "lambda_max_over_lambda_5": self.ratio,
            "trace": self.trace,
            "trace_std_error": self.trace_std_error,
            "top_eigenvalues": self.top_eigenvalues,
            "n_matvecs": self.n_matvecs,
            "converged": self.converged,
            **self.extra,
        }


def hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    hvp_method: str = "auto",
    distributed: bool = False,
    **objective_options: Any,
) -> HessianOperator:
    """The Hessian of ``L`` at the model's weights as a :class:`~landscape.linop.LinearOperator`.

    ``distributed=True`` (under ``torchrun``): ``data`` is this process's shard and each product is
    summed over the processes with one ``all_reduce`` (:class:`~landscape.objective.Objective`); the
    functions below take the same flag and return the same result on every process. Other keyword
    arguments (``forward``, ``weight``, ``params``, ``stream``, ``memory_budget``) go to the
    :class:`~landscape.objective.Objective`, in these functions too.
    """
    objective = Objective(model, loss_fn, data, dtype=dtype, device=device, batch_size=batch_size,
                          hvp_method=hvp_method, distributed=distributed, **objective_options)
    return objective.hessian_operator()


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    method: str = "lanczos",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    hvp_method: str = "auto",
    distributed: bool = False,
    ncv: int | None = None,
    seed: int = 0,
    progress: bool = True,
    operator: HessianOperator | None = None,
    **objective_options: Any,
) -> HessianEigen:
    """Top-``k`` Hessian eigenpairs by Lanczos on exact Hessian-vector products.

    ``method="lanczos"``: thick-restart Lanczos with full reorthogonalisation on the device, Ritz
    problems in float64, stopping when ``||H v - lambda v|| <= tol |lambda|`` for all ``k`` pairs
    (verified with explicit products). ``"arpack"``: ``scipy.sparse.linalg.eigsh`` on the same
    operator (the reference). ``"power"``: power iteration with deflation, as in PyHessian (``"LM"``).

    Args:
        model, loss_fn, data: the objective (see :mod:`landscape.objective`).
        k: number of eigenpairs.
        which: ``"LA"`` (largest), ``"SA"`` (most negative) or ``"LM"`` (largest magnitude).
        tol: relative residual tolerance.
        max_matvecs: budget of Hessian-vector products; when it runs out the result has
            ``converged=False``.
        method: ``"lanczos"``, ``"arpack"`` or ``"power"``.
        dtype, device, batch_size, hvp_method, distributed: passed to
            :class:`~landscape.objective.Objective` (``distributed``: ``data`` is this process's shard).
        ncv: Lanczos basis size before a thick restart.
        seed: seed of the start vector.
        progress: show a progress bar.
        operator: a Hessian operator of this same objective, to share between calls (its products are
            not recomputed; model/loss_fn/data are then not read again).

    Returns:
        :class:`HessianEigen` with ``.eigenvalues``, ``.eigenvectors``, ``.n_matvecs``, ``.converged``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "power" and which != "LM":
        raise ValueError("power iteration finds largest-magnitude eigenvalues: use which='LM' with method='power'")
    op = operator or hessian_operator(
        model, loss_fn, data, dtype=dtype, device=device, batch_size=batch_size, hvp_method=hvp_method,
        distributed=distributed, **objective_options,
    )
    return _eigenpairs(op, k, which, tol, max_matvecs, method, ncv, seed, _shows_progress(op, progress))


def _shows_progress(op: HessianOperator, progress: bool) -> bool:
    """Progress bars on rank 0 only when the products are summed over processes."""
    return progress and (not op.objective.distributed or _distributed.is_main())


def _eigenpairs(
    op: HessianOperator, k: int, which: str, tol: float, max_matvecs: int | None, method: str,
    ncv: int | None, seed: int, progress: bool,
) -> HessianEigen:
    if method == "lanczos":
        result = top_eigenpairs(op, k=k, which=which, tol=tol, max_matvecs=max_matvecs, ncv=ncv, seed=seed, progress=progress)
    elif method == "arpack":
        result = arpack_eigenpairs(op, k=k, which=which, tol=tol, max_matvecs=max_matvecs, seed=seed)
    else:
        result = power_iteration(op, k=k, tol=tol, max_matvecs=max_matvecs, seed=seed)
    return _as_hessian_eigen(result, op, method, which, tol)


def _as_hessian_eigen(result: EigenResult, op: HessianOperator, method: str, which: str, tol: float) -> HessianEigen:
    layout = op.objective.layout
    vectors = [layout.unflatten(result.eigenvectors[:, j].contiguous()) for j in range(result.eigenvectors.shape[1])]
    return HessianEigen(
        eigenvalues=result.eigenvalues,
        eigenvectors=vectors,
        n_matvecs=result.n_matvecs,
        converged=result.converged,
        residuals=result.residuals,
        method=method,
        which=which,
        tol=tol,
    )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    method: str = "hutch++",
    n_matvecs: int = 99,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    hvp_method: str = "auto",
    distributed: bool = False,
    seed: int = 0,
    progress: bool = True,
    operator: HessianOperator | None = None,
    **objective_options: Any,
) -> TraceEstimate:
    """Estimate ``tr H`` with ``n_matvecs`` Hessian-vector products and give a standard error.

    ``"hutchinson"``: mean of ``z^T H z`` over Rademacher ``z`` (Hutchinson 1989). ``"hutch++"``:
    exact trace on a sketched top subspace plus Hutchinson on the rest (Meyer et al. 2021, Alg. 1),
    far more accurate when the spectrum decays fast, as Hessian spectra do.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown trace method {method!r}; choose one of {TRACE_METHODS}")
    op = operator or hessian_operator(
        model, loss_fn, data, dtype=dtype, device=device, batch_size=batch_size, hvp_method=hvp_method,
        distributed=distributed, **objective_options,
    )
    return _trace(op, method, n_matvecs, seed, _shows_progress(op, progress))


def _trace(op: HessianOperator, method: str, n_matvecs: int, seed: int, progress: bool) -> TraceEstimate:
    if method == "hutchinson":
        return hutchinson(op, n_samples=n_matvecs, seed=seed, progress=progress)
    return hutch_plus_plus(op, n_matvecs=n_matvecs, seed=seed, progress=progress)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    n_runs: int = 10,
    n_steps: int = 80,
    *,
    sigma_squared: float | None = None,
    grid: np.ndarray | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    hvp_method: str = "auto",
    distributed: bool = False,
    seed: int = 0,
    progress: bool = True,
    operator: HessianOperator | None = None,
    **objective_options: Any,
) -> Density:
    """The Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019, Sec. 3).

    ``n_runs`` Lanczos runs of ``n_steps`` steps from random unit vectors; each run gives Ritz values
    ``theta_i`` with weights ``tau_i = (first component of the i-th Ritz vector)^2``, and
    ``phi(t) = (1/n_runs) sum_runs sum_i tau_i N(t; theta_i, sigma^2)`` with
    ``sigma^2 = 1e-5 (lambda_max - lambda_min)`` by default. Returns grid and density (plot it on a
    log scale, as in Foret et al. 2021, Fig. 3 left).
    """
    op = operator or hessian_operator(
        model, loss_fn, data, dtype=dtype, device=device, batch_size=batch_size, hvp_method=hvp_method,
        distributed=distributed, **objective_options,
    )
    return density_from_operator(
        op, n_runs=n_runs, n_steps=n_steps, seed=seed, sigma_squared=sigma_squared, grid=grid,
        progress=_shows_progress(op, progress),
    )


def summary(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    k: int = 5,
    tol: float = 1e-3,
    trace_matvecs: int = 99,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    hvp_method: str = "auto",
    distributed: bool = False,
    seed: int = 0,
    progress: bool = True,
    operator: HessianOperator | None = None,
    **objective_options: Any,
) -> HessianSummary:
    """``lambda_max``, ``lambda_max / lambda_5`` and the trace (Hutch++) of the Hessian at ``w``."""
    if k < 5:
        raise ValueError(f"summary reports lambda_max / lambda_5 and needs k >= 5; got k={k}")
    op = operator or hessian_operator(
        model, loss_fn, data, dtype=dtype, device=device, batch_size=batch_size, hvp_method=hvp_method,
        distributed=distributed, **objective_options,
    )
    start = op.n_matvecs
    progress = _shows_progress(op, progress)
    eig = _eigenpairs(op, k, "LA", tol, None, "lanczos", None, seed, progress)
    trace = _trace(op, "hutch++", trace_matvecs, seed, progress)
    values = eig.eigenvalues.tolist()
    return HessianSummary(
        lambda_max=values[0],
        lambda_5=values[4],
        ratio=values[0] / values[4],
        trace=trace.value,
        trace_std_error=trace.std_error,
        top_eigenvalues=values,
        n_matvecs=op.n_matvecs - start,
        converged=eig.converged,
        extra={"hvp_method": op.objective.hvp_method, "hvp_timings_s": op.objective.hvp_timings,
               "n_parameters": op.shape[0], "n_examples": op.objective.n_examples},
    )
