"""landscape: analysis of the minima that training reaches.

Every analysis is a function of a fixed model on a fixed dataset (:mod:`landscape.objective`):

* :mod:`landscape.hessian`: top Hessian eigenvalues (Lanczos on exact Hessian-vector products), trace
  (Hutchinson, Hutch++) and eigenvalue density (stochastic Lanczos quadrature);
* :mod:`landscape.lanczos`, :mod:`landscape.trace`, :mod:`landscape.density`: the estimators, on any
  :class:`landscape.linop.LinearOperator` (a Hessian or a dense test matrix);
* :mod:`landscape.surface`: 1D/2D loss-surface slices and interpolations (Li et al. 2018), batched with
  ``torch.vmap`` and resumable; :mod:`landscape.directions`: the directions (filter-normalised random,
  two/three models, Hessian eigenvectors, PCA of a trajectory);
* :mod:`landscape.sharpness`: m-sharpness (vectorised over chunks with ``torch.vmap``), worst- and
  average-case adaptive sharpness, Keskar epsilon-sharpness and PAC-Bayes flatness;
* :mod:`landscape.distributed` (process groups under ``torchrun``), :mod:`landscape.storage` (atomic
  writes, reads that name a bad file) and :mod:`landscape.progress` (progress bars on a terminal, plain
  lines in a log): the ground that :mod:`sam` builds on too. ``landscape`` never imports ``sam``.
"""

from . import density, directions, distributed, hessian, lanczos, linop, objective, progress
from . import sharpness, storage, surface, trace
from .objective import Objective

__all__ = ["hessian", "surface", "sharpness", "directions", "objective", "lanczos", "linop", "trace", "density",
           "distributed", "storage", "progress", "Objective"]
