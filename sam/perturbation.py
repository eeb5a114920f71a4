"""Pure functions for SAM's adversarial weight perturbation.

All functions take lists of tensors (one per parameter) and use ``torch._foreach_*`` kernels so that a
whole model is handled in a few fused launches. None of them reads a value back to the host: norms stay
0-dim device tensors, so a training step never synchronises on the perturbation.

Notation (Foret et al. 2021; Kwon et al. 2021):

.. math::

    \\epsilon^\\star = \\rho\\, T\\, \\frac{\\operatorname{sign}(u)\\,|u|^{q-1}}{\\|u\\|_q^{q-1}},
    \\qquad u = T g, \\qquad \\tfrac1p + \\tfrac1q = 1,

where ``g`` is the mini-batch gradient and ``T`` the diagonal normalisation operator of ASAM
(``T = |w| + eta`` on adaptive tensors, ``T = 1`` elsewhere). With ``T = 1`` this is Eq. 2 of Foret et al.
(``(||g||_q^q)^(1/p) = ||g||_q^(q-1)``); with ``p = 2`` it is ``rho T^2 g / ||T g||_2`` (Kwon et al. 2021,
Eq. 9).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["dual_exponent", "global_norm", "dual_direction_", "project_", "sam_perturbation"]

_TINY = 1e-12  # norms are clamped to at least this: a zero gradient gives a zero perturbation


def dual_exponent(p: float) -> float:
    """Return ``q`` with ``1/p + 1/q = 1`` (``p = inf`` gives ``q = 1``).

    Raises:
        ValueError: if ``p <= 1`` (the dual norm would be ``L_inf``, whose maximiser is not unique).
    """
    if p == math.inf:
        return 1.0
    if not p > 1:
        raise ValueError(f"p must be > 1 or math.inf (the SAM ball is ||eps||_p <= rho); got p={p!r}")
    return p / (p - 1.0)


def global_norm(tensors: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """The ``ord``-norm of the concatenation of ``tensors``, as a 0-dim tensor on ``tensors[0].device``.

    Per-tensor norms come from one ``torch._foreach_norm`` launch, accumulated in float32 (float64 when
    any tensor is float64) so that bf16/fp16 gradients do not lose the global norm to rounding.
    """
    if len(tensors) == 0:
        raise ValueError("global_norm needs at least one tensor")
    device = tensors[0].device
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch._foreach_norm(list(tensors), ord, dtype=acc)
    stacked = torch.stack([n.to(device) for n in norms])
    if ord == math.inf:
        return stacked.max()
    return torch.linalg.vector_norm(stacked, ord)


def dual_direction_(u: list[Tensor], p: float = 2.0) -> Tensor:
    """Overwrite ``u`` with the unit-``p``-norm direction that maximises ``<u, d>``; return ``||u||_q``.

    ``d = sign(u) |u|^(q-1) / ||u||_q^(q-1)`` (Foret et al. 2021, Eq. 2 with ``rho = 1``):
    ``p = 2`` gives ``u / ||u||_2`` and ``p = inf`` gives ``sign(u)``. A zero ``u`` gives ``d = 0``.

    Args:
        u: tensors to overwrite in place (pass copies if the originals are still needed).
        p: the norm of the perturbation ball, ``p > 1`` or ``math.inf``.

    Returns:
        The dual norm ``||u||_q`` of the input, a 0-dim tensor (``inf``/``nan`` if ``u`` was not finite).
    """
    q = dual_exponent(p)
    norm = global_norm(u, q)
    if p == math.inf:
        torch._foreach_sign_(u)
    elif p == 2.0:
        torch._foreach_mul_(u, 1.0 / norm.clamp_min(_TINY))
    else:
        signs = torch._foreach_sign(u)
        torch._foreach_abs_(u)
        torch._foreach_pow_(u, q - 1.0)
        torch._foreach_mul_(u, signs)
        torch._foreach_mul_(u, 1.0 / norm.pow(q - 1.0).clamp_min(_TINY))
    return norm


def project_(delta: list[Tensor], radius: Sequence[float], p: float = 2.0) -> None:
    """Pull ``delta`` back into the ball ``||delta||_p <= radius`` in place.

    ``p = 2``: the Euclidean projection ``delta * min(1, r / ||delta||_2)``; ``p = inf``: the exact
    projection, clipping each coordinate to ``[-r, r]``; other ``p``: radial rescaling onto the sphere
    (feasible, not the exact Euclidean projection, which has no closed form). ``radius`` gives one value
    per tensor and tensors sharing a radius are one ball (the usual case: one rho for the whole model).
    """
    for r, idx in _indices_by_value(radius).items():
        part = [delta[i] for i in idx]
        if p == math.inf:
            torch._foreach_clamp_min_(part, -r)
            torch._foreach_clamp_max_(part, r)
        else:
            norm = global_norm(part, p)
            torch._foreach_mul_(part, torch.clamp(r / norm.clamp_min(_TINY), max=1.0))


def sam_perturbation(
    grads: Sequence[Tensor],
    rho: float | Sequence[float],
    *,
    p: float = 2.0,
    scales: Sequence[Tensor | None] | None = None,
) -> list[Tensor]:
    """The first-order SAM perturbation ``eps*`` for the gradient ``grads`` (Foret et al. 2021, Eq. 2).

    ``eps* = rho T sign(u)|u|^(q-1) / ||u||_q^(q-1)`` with ``u = T g``; ``T = scales[i]`` where given
    (ASAM, Kwon et al. 2021, Eq. 9) and the identity where ``None``. This is the functional form of what
    :class:`sam.optim.SAM` does in place with persistent buffers; it returns new tensors.

    Args:
        grads: the gradient, one tensor per parameter.
        rho: radius of the ball, a float or one float per tensor.
        p: the ball's norm.
        scales: optional per-tensor ``T`` (``None`` entries mean ``T = 1``).

    Returns:
        ``eps*``, one tensor per parameter.

    Example:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> sam_perturbation(g, rho=0.5)[0]
        tensor([0.3000, 0.4000])
    """
    rhos = _per_tensor(rho, len(grads), "rho")
    scales = list(scales) if scales is not None else [None] * len(grads)
    u = [g.clone() if t is None else g * t for g, t in zip(grads, scales)]
    dual_direction_(u, p)
    torch._foreach_mul_(u, rhos)
    return [d if t is None else d * t for d, t in zip(u, scales)]


def _per_tensor(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} must be a float or one value per tensor ({n}); got {len(values)} values")
    return values


def _indices_by_value(values: Sequence[float]) -> dict[float, list[int]]:
    groups: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    return groups
