"""A small linear-operator protocol for symmetric operators on flat vectors.

Lanczos, the trace estimators and the spectral density work on anything with ``shape``, ``dtype``,
``device`` and ``matvec``: the Hessian of a network (:class:`landscape.objective.HessianOperator`) and a
dense test matrix (:class:`DenseOperator`) alike. ``to_scipy()`` exposes the operator to
``scipy.sparse.linalg`` (ARPACK's ``eigsh`` is the reference backend).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor

__all__ = ["LinearOperator", "DenseOperator"]


class LinearOperator(ABC):
    """A symmetric linear map ``R^n -> R^n`` given by its action on vectors.

    Subclasses implement :meth:`_matvec`; :meth:`matvec` checks the input and counts products in
    :attr:`n_matvecs`, which estimators report.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = (int(size), int(size))
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_matvecs = 0

    @abstractmethod
    def _matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a 1-D tensor ``v`` of length ``n`` (already of the operator's dtype and device)."""

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a flat vector ``v`` of length ``n``; returns a flat vector on :attr:`device`."""
        if v.ndim != 1 or v.shape[0] != self.shape[0]:
            raise ValueError(f"matvec expects a flat vector of length {self.shape[0]}; got shape {tuple(v.shape)}")
        self.n_matvecs += 1
        return self._matvec(v.to(device=self.device, dtype=self.dtype))

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` column by column for an ``n x k`` matrix ``V``."""
        if V.ndim != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"matmat expects an n x k matrix with n = {self.shape[0]}; got shape {tuple(V.shape)}")
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v) if v.ndim == 1 else self.matmat(v)

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """This operator as a float64 ``scipy.sparse.linalg.LinearOperator`` (products still counted)."""

        def matvec(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1))
            return self.matvec(v).detach().to("cpu", torch.float64).numpy()

        return scipy.sparse.linalg.LinearOperator(self.shape, matvec=matvec, rmatvec=matvec, dtype=np.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.shape[0]}, dtype={self.dtype}, device={self.device})"


class DenseOperator(LinearOperator):
    """A symmetric matrix held densely; the reference operator in tests and benchmarks."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix; got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def matmat(self, V: Tensor) -> Tensor:
        if V.ndim != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"matmat expects an n x k matrix with n = {self.shape[0]}; got shape {tuple(V.shape)}")
        self.n_matvecs += V.shape[1]
        return self.matrix @ V.to(device=self.device, dtype=self.dtype)
