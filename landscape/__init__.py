"""landscape: analysis of the minima that training reaches.

Every analysis is a function of a fixed model on a fixed dataset (:mod:`landscape.objective`):

* :mod:`landscape.hessian`: top Hessian eigenvalues (Lanczos on exact Hessian-vector products), trace
  (Hutchinson, Hutch++) and eigenvalue density (stochastic Lanczos quadrature);
* :mod:`landscape.lanczos`, :mod:`landscape.trace`, :mod:`landscape.density`: the estimators, on any
  :class:`landscape.linop.LinearOperator` (a Hessian or a dense test matrix).

Loss surfaces and sharpness measures are on the roadmap (see the README).
"""

from . import density, hessian, lanczos, linop, objective, trace
from .objective import Objective

__all__ = ["hessian", "objective", "lanczos", "linop", "trace", "density", "Objective"]
