"""Stochastic trace estimators for symmetric operators given by matrix-vector products.

Both estimators work on any :class:`landscape.linop.LinearOperator` (the Hessian of a network, a dense
test matrix). Probe vectors are Rademacher (entries +-1 with probability 1/2), drawn from a seeded CPU
``torch.Generator`` as ``int8`` (one byte per entry to move), converted on ``op.device`` to ``op.dtype``.
Per-probe quadratic forms are reduced in float64 on the device and copied to the host once at the end.

References:
    Hutchinson. A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
    splines. Communications in Statistics - Simulation and Computation, 1989.
    Avron & Toledo. Randomized algorithms for estimating the trace of an implicit symmetric positive
    semi-definite matrix. Journal of the ACM, 2011 (variance of the Rademacher estimator,
    ``Var[z^T A z] = 2 (||A||_F^2 - sum_i A_ii^2)``).
    Meyer, Musco, Musco, Woodruff. Hutch++: Optimal Stochastic Trace Estimation. SOSA 2021
    (Algorithm 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._checks import check_int, check_operator
from .linop import LinearOperator
from .progress import progress_bar

__all__ = ["TraceEstimate", "hutchinson", "hutch_plus_plus", "rademacher_probes"]


@dataclass
class TraceEstimate:
    """A stochastic estimate of ``tr(A)``.

    Attributes:
        value: the estimate (the mean of ``samples``).
        std_error: standard error of ``value``: sample standard deviation (``ddof=1``) of the stochastic
            part divided by ``sqrt(#probes)``; ``nan`` with a single probe, ``0.0`` when every probe
            gave the same value (e.g. any diagonal matrix under Rademacher probes).
        n_matvecs: matrix-vector products used (equals the increase of ``op.n_matvecs``).
        method: ``"hutchinson"`` or ``"hutch++"``.
        samples: per-probe estimates of ``tr(A)`` (float64, one per probe), or ``None``.
    """

    value: float
    std_error: float
    n_matvecs: int
    method: str
    samples: np.ndarray | None = None




def _std_error(x: np.ndarray) -> float:
    """``std(x, ddof=1) / sqrt(len(x))``; ``nan`` for a single sample."""
    if x.size < 2:
        return math.nan
    if np.all(x == x[0]):
        return 0.0  # exactly, not the rounding noise of np.std
    return float(np.std(x, ddof=1) / math.sqrt(x.size))


def rademacher_probes(
    generator: torch.Generator, k: int, n: int, *, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """``k`` Rademacher probe vectors of length ``n`` as the rows of a ``k x n`` tensor.

    Drawn on the CPU from ``generator`` as ``int8`` and converted after the move to ``device``. The
    stream is the same however it is chunked: ``k = 5`` at once equals ``k = 2`` then ``k = 3``.
    """
    bits = torch.randint(0, 2, (k, n), generator=generator, dtype=torch.int8)
    z = bits.to(device=device).to(dtype)
    return z.mul_(2).sub_(1)


def _quadratic_forms(Z: Tensor, AZ: Tensor) -> Tensor:
    """``z_j^T A z_j`` for the rows ``z_j`` of ``Z`` (``k x n``) and columns of ``AZ`` (``n x k``), in float64.

    Products with +-1 entries are exact in any dtype; only the reduction needs float64.
    """
    return torch.sum(Z * AZ.T, dim=1, dtype=torch.float64)


def hutchinson(
    op: LinearOperator, n_samples: int = 100, *, seed: int = 0, batch: int | None = None, progress: bool = True
) -> TraceEstimate:
    r"""Hutchinson's estimator of ``tr(A)`` with Rademacher probes.

    .. math::

        \widehat{\mathrm{tr}}(A) = \frac{1}{N} \sum_{j=1}^{N} z_j^\top A z_j, \qquad
        z_j \in \{-1, +1\}^n \text{ i.i.d. uniform},

    unbiased with variance ``2 (||A||_F^2 - sum_i A_ii^2) / N`` (Hutchinson 1989; Avron & Toledo 2011).
    The reported standard error is the sample standard deviation of ``z_j^T A z_j`` over ``sqrt(N)``.

    Args:
        op: a symmetric linear operator (``shape``, ``dtype``, ``device``, ``matvec``, ``matmat``).
        n_samples: number of probes ``N`` (= matrix-vector products), at least 1.
        seed: seed of the CPU ``torch.Generator`` that draws the probes.
        batch: if given, probes are applied ``batch`` at a time with ``op.matmat`` (an ``n x batch``
            block on the device); ``None`` applies them one by one with ``op.matvec``. The probes and
            hence the estimate do not depend on ``batch``.
        progress: show a progress bar over the probes.

    Returns:
        A :class:`TraceEstimate` with ``method="hutchinson"`` and the ``N`` per-probe values.

    Example:
        >>> import torch
        >>> from landscape.linop import DenseOperator
        >>> D = DenseOperator(torch.diag(torch.arange(4.0, dtype=torch.float64)))
        >>> est = hutchinson(D, 10, progress=False)
        >>> est.value, est.std_error
        (6.0, 0.0)
    """
    n = check_operator(op)
    n_samples = check_int("n_samples", n_samples, 1)
    if batch is not None:
        batch = check_int("batch", batch, 1)
    generator = torch.Generator().manual_seed(seed)
    chunk = 1 if batch is None else batch
    values = []
    done = 0
    bar = progress_bar(total=n_samples, desc="hutchinson", unit="probe", enabled=progress, leave=False)
    while done < n_samples:
        k = min(chunk, n_samples - done)
        Z = rademacher_probes(generator, k, n, dtype=op.dtype, device=op.device)
        if batch is None:
            AZ = op.matvec(Z[0]).unsqueeze(1)
        else:
            AZ = op.matmat(Z.T)
        values.append(_quadratic_forms(Z, AZ))
        done += k
        bar.update(k)
    bar.close()
    samples = torch.cat(values).cpu().numpy()  # the only host synchronisation
    return TraceEstimate(
        value=float(samples.mean()),
        std_error=_std_error(samples),
        n_matvecs=n_samples,
        method="hutchinson",
        samples=samples,
    )


def _orthonormal_basis(Y: Tensor) -> Tensor:
    """An orthonormal basis (columns) of a space containing ``range(Y)``, by Householder QR.

    Householder ``Q`` is orthonormal even when ``Y`` is rank deficient, which is all Hutch++ needs:
    ``tr(A) = tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T))`` for any orthonormal ``Q``. Half precision is
    factored in float32 (``torch.linalg.qr`` does not support it).
    """
    work = torch.promote_types(Y.dtype, torch.float32)
    Q, _ = torch.linalg.qr(Y.to(work), mode="reduced")
    return Q.to(Y.dtype)


def hutch_plus_plus(
    op: LinearOperator, n_matvecs: int = 102, *, seed: int = 0, progress: bool = False
) -> TraceEstimate:
    r"""Hutch++ estimate of ``tr(A)`` (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1).

    With a budget of ``m`` products, ``k = floor(m / 3)`` sketch vectors and ``p = m - 2k`` probes:

    .. math::

        Q = \mathrm{orth}(A S), \quad S \in \{\pm 1\}^{n \times k}, \qquad
        \widehat{\mathrm{tr}}(A) = \mathrm{tr}(Q^\top A Q)
            + \frac{1}{p} \sum_{j=1}^{p} g_j^\top (I - QQ^\top) A (I - QQ^\top) g_j,

    with Rademacher ``g_j``. The first term is exact; only the second is random, so the error is
    governed by the spectrum outside the top ``k`` directions, ``O(1/m)`` relative error for positive
    semi-definite ``A`` against Hutchinson's ``O(1/sqrt(m))``. ``std_error`` is the sample standard
    deviation of the ``p`` residual quadratic forms over ``sqrt(p)``.

    Memory: ``S``, ``A S``, ``Q``, ``A Q`` and the ``p`` probes are ``n x k`` blocks on ``op.device``.

    Args:
        op: a symmetric linear operator.
        n_matvecs: budget ``m`` of matrix-vector products, at least 3. If ``k > n`` only ``n`` products
            are spent on ``A Q``; the reported count is what was used.
        seed: seed of the CPU ``torch.Generator`` that draws ``S`` and the probes.
        progress: show a progress bar over the products (advanced after each of the three blocks).

    Returns:
        A :class:`TraceEstimate` with ``method="hutch++"``; ``samples[j] = tr(Q^T A Q) + g_j^T ... g_j``.
    """
    n = check_operator(op)
    m = check_int("n_matvecs", n_matvecs, 3)
    k = m // 3
    p = m - 2 * k
    generator = torch.Generator().manual_seed(seed)
    bar = progress_bar(total=m, desc="hutch++", unit="matvec", enabled=progress, leave=False)

    S = rademacher_probes(generator, k, n, dtype=op.dtype, device=op.device)
    Q = _orthonormal_basis(op.matmat(S.T))
    del S
    bar.update(k)
    low_rank = torch.sum(Q * op.matmat(Q), dtype=torch.float64)  # tr(Q^T A Q)
    bar.update(Q.shape[1])

    G = rademacher_probes(generator, p, n, dtype=op.dtype, device=op.device)
    G = G - (G @ Q) @ Q.T  # rows (I - QQ^T) g_j
    residual = _quadratic_forms(G, op.matmat(G.T))
    bar.update(p)
    bar.close()
    host = torch.cat([low_rank.reshape(1), residual]).cpu().numpy()  # the only host synchronisation
    residual = host[1:]
    samples = host[0] + residual
    return TraceEstimate(
        value=float(samples.mean()),
        std_error=_std_error(residual),
        n_matvecs=k + Q.shape[1] + p,
        method="hutch++",
        samples=samples,
    )
