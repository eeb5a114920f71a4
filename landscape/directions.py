"""Directions in parameter space along which a loss surface is drawn.

A surface is ``L(w + a d1 + b d2)`` for a point ``w`` and directions ``d1, d2`` given as parameter
dicts (``dict[str, Tensor]`` shaped like the parameters; buffers are never part of a direction). This
module builds those directions:

* :func:`random_direction` / :func:`random_plane`: seeded Gaussian directions, normalised filter-wise
  (Li et al., NeurIPS 2018, "Visualizing the Loss Landscape of Neural Nets", Sec. 4), layer-wise or
  model-wise by :func:`normalize_direction`;
* :func:`difference`: the interpolation direction ``w_b - w_a`` (Goodfellow et al., ICLR 2015; Li et
  al. 2018, Sec. 3);
* :func:`plane_through`: the plane through three models (Garipov et al., NeurIPS 2018, Sec. 3);
* :func:`eigenvector_directions`: top Hessian eigenvectors from :func:`landscape.hessian.top_eigenvalues`;
* :func:`pca_directions`: principal directions of a saved training trajectory (Li et al. 2018, Sec. 7).

Every function is pure: it returns new tensors and never modifies its arguments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._checks import check_int
from .objective import ParamLayout

__all__ = [
    "NORMALIZATIONS",
    "IGNORE",
    "PCAResult",
    "random_direction",
    "normalize_direction",
    "orthogonalize",
    "random_plane",
    "difference",
    "plane_through",
    "eigenvector_directions",
    "pca_directions",
    "direction_norms_by_filter",
]

Params = dict[str, Tensor]

NORMALIZATIONS = ("filter", "layer", "model", "none")
IGNORE = ("biasbn", "none")

_EPS = 1e-10  # Li et al.'s guard against a zero direction filter
_F64 = torch.float64


# --------------------------------------------------------------------------------------------- checks
def _check_params(name: str, params: object) -> ParamLayout:
    """The layout of ``params`` after checking it is a non-empty dict of floating tensors."""
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"{name} must be a non-empty dict of parameter name -> Tensor; got {type(params).__name__}")
    for key, value in params.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name}[{key!r}] must be a floating-point Tensor; got {kind}")
    return ParamLayout.of(params)


def _check_same_layout(name_a: str, a: object, name_b: str, b: object) -> ParamLayout:
    """The shared layout of ``a`` and ``b``; they must have the same names and shapes."""
    layout_a, layout_b = _check_params(name_a, a), _check_params(name_b, b)
    if set(layout_a.names) != set(layout_b.names):
        missing = sorted(set(layout_a.names) - set(layout_b.names))
        extra = sorted(set(layout_b.names) - set(layout_a.names))
        raise ValueError(f"{name_b} must have the same names as {name_a}; missing {missing}, unexpected {extra}")
    for key in layout_a.names:
        if a[key].shape != b[key].shape:  # type: ignore[index]
            raise ValueError(
                f"{name_b}[{key!r}] has shape {tuple(b[key].shape)}; "  # type: ignore[index]
                f"{name_a}[{key!r}] has shape {tuple(a[key].shape)}"  # type: ignore[index]
            )
    return layout_a


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value  # type: ignore[return-value]


def _norm(x: Tensor) -> Tensor:
    """Euclidean norm accumulated in float64 (no overflow in half precision)."""
    return torch.linalg.vector_norm(x, dtype=_F64)


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Flat inner product ``<a, b>`` over all tensors, in float64."""
    return sum((a[k].to(_F64) * b[k].to(_F64)).sum() for k in a)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ random directions
def random_direction(
    params: Mapping[str, Tensor], *, seed: int, norm: str = "filter", ignore: str = "biasbn"
) -> Params:
    """A seeded Gaussian direction, normalised against ``params`` (Li et al. 2018, Sec. 4).

    .. math::

        d_i \\sim \\mathcal N(0, 1)\\ \\text{i.i.d.},\\qquad d \\leftarrow \\text{normalize}(d, w).

    The entries are drawn from a CPU ``torch.Generator`` seeded with ``seed``, in float64, tensor by
    tensor in the dict's order (every tensor is drawn, including those that ``ignore`` then zeroes),
    and only then cast to each parameter's dtype and moved to its device: the same seed gives the same
    direction on every device and, up to rounding, in every dtype.

    Args:
        params: the point ``w`` (parameters only, no buffers).
        seed: non-negative integer seed.
        norm, ignore: see :func:`normalize_direction`.

    Returns:
        A dict of new tensors with the names, shapes, dtypes and devices of ``params``.

    Raises:
        ValueError: ``params`` is not a dict of floating tensors, or ``norm``/``ignore`` is unknown.
        TypeError: ``seed`` is not an integer.
    """
    _check_params("params", params)
    seed = check_int("seed", seed, 0)
    _check_choice("norm", norm, NORMALIZATIONS)
    _check_choice("ignore", ignore, IGNORE)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    direction = {
        k: torch.randn(w.shape, generator=gen, dtype=_F64).to(device=w.device, dtype=w.dtype)
        for k, w in params.items()
    }
    return normalize_direction(direction, params, norm=norm, ignore=ignore)


def normalize_direction(
    direction: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    *,
    norm: str = "filter",
    ignore: str = "biasbn",
) -> Params:
    """Rescale ``direction`` to the scale of ``params`` (Li et al. 2018, Sec. 4).

    For a tensor ``d`` of the direction and the matching parameter ``w``, with more than one dimension:

    * ``"filter"``: every output index ``j`` (dim 0: a conv filter, a row of a linear weight),
      :math:`d_j \\leftarrow d_j \\, \\lVert w_j \\rVert / (\\lVert d_j \\rVert + 10^{-10})` (Li et al.,
      Sec. 4, "filter normalization");
    * ``"layer"``: :math:`d \\leftarrow d \\, \\lVert w \\rVert / (\\lVert d \\rVert + 10^{-10})`;
    * ``"model"``: the whole direction is scaled so that :math:`\\lVert d \\rVert = \\lVert w \\rVert`
      over all tensors it covers;
    * ``"none"``: unchanged.

    Tensors with one dimension or fewer (biases, BatchNorm weight and bias): with ``ignore="biasbn"``
    (the default, as in Li et al.'s code) their direction is zero, for every ``norm`` including
    ``"none"``; with ``ignore="none"`` they are normalised as a whole (like ``"layer"``) under
    ``"filter"`` and ``"layer"``, included in the total under ``"model"`` and left unchanged under
    ``"none"``.

    Args:
        direction: the raw direction, shaped like ``params``.
        params: the point ``w``.
        norm: one of :data:`NORMALIZATIONS`.
        ignore: one of :data:`IGNORE`.

    Returns:
        New tensors in the dtype and on the device of ``direction``.

    Raises:
        ValueError: unknown ``norm``/``ignore``, or ``direction`` and ``params`` differ in names or shapes.
    """
    _check_choice("norm", norm, NORMALIZATIONS)
    _check_choice("ignore", ignore, IGNORE)
    _check_same_layout("params", params, "direction", direction)

    def scaled(d: Tensor, w: Tensor) -> Tensor:
        return d * (_norm(w) / (_norm(d) + _EPS)).to(d.dtype)

    out: Params = {}
    for k, w in params.items():
        d = direction[k]
        if d.ndim <= 1 and ignore == "biasbn":
            out[k] = torch.zeros_like(d)
        elif norm == "filter" and d.ndim > 1:
            d_rows, w_rows = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
            w_norm = torch.linalg.vector_norm(w_rows, dim=1, dtype=_F64)
            d_norm = torch.linalg.vector_norm(d_rows, dim=1, dtype=_F64)
            factor = (w_norm / (d_norm + _EPS)).to(d.dtype)
            out[k] = (d_rows * factor[:, None]).reshape(d.shape)
        elif norm in ("filter", "layer"):
            out[k] = scaled(d, w)
        else:  # "model" (scaled below) and "none"
            out[k] = d.clone()
    if norm == "model":
        covered = [k for k in out if ignore == "none" or out[k].ndim > 1]
        if covered:
            w_norm = torch.sqrt(sum(_norm(params[k]) ** 2 for k in covered))
            d_norm = torch.sqrt(sum(_norm(out[k]) ** 2 for k in covered))
            factor = w_norm / (d_norm + _EPS)
            for k in covered:
                out[k] = out[k] * factor.to(out[k].dtype)
    return out


def orthogonalize(d2: Mapping[str, Tensor], d1: Mapping[str, Tensor]) -> Params:
    """Gram-Schmidt: the part of ``d2`` orthogonal to ``d1``, rescaled to the norm of ``d2``.

    .. math::

        d_2' = \\lVert d_2 \\rVert \\frac{r}{\\lVert r \\rVert},\\qquad
        r = d_2 - \\frac{\\langle d_2, d_1 \\rangle}{\\langle d_1, d_1 \\rangle} d_1,

    with the flat inner product over all tensors together (accumulated in float64). Filter-wise norms
    of a filter-normalised ``d2`` then no longer hold exactly, only its total norm. Entries that are
    zero in both ``d1`` and ``d2`` (ignored biases) stay zero.

    Raises:
        ValueError: different names/shapes, ``d1`` is zero, or ``d2`` is parallel to ``d1``.
    """
    _check_same_layout("d1", d1, "d2", d2)
    d11, d22 = _dot(d1, d1), _dot(d2, d2)
    if d11 == 0:
        raise ValueError("d1 must be a non-zero direction to orthogonalise against")
    coef = _dot(d2, d1) / d11
    r = {k: (d2[k].to(_F64) - coef * d1[k].to(_F64)) for k in d2}
    r_norm = torch.sqrt(_dot(r, r))
    if r_norm <= 1e-12 * torch.sqrt(d22):
        raise ValueError("d2 is zero or parallel to d1; there is no orthogonal part to keep")
    scale = torch.sqrt(d22) / r_norm
    return {k: (r[k] * scale).to(d2[k].dtype) for k in d2}


def random_plane(
    params: Mapping[str, Tensor],
    *,
    seed: int,
    norm: str = "filter",
    ignore: str = "biasbn",
    orthogonal: bool = False,
) -> tuple[Params, Params]:
    """Two random directions for a 2-D surface (Li et al. 2018, Sec. 4).

    ``d1 = random_direction(params, seed=seed)`` and ``d2 = random_direction(params, seed=seed + 1)``,
    so the plane of seed ``s`` shares ``d1`` with the 1-D slice of seed ``s``. In high dimension two
    such directions are nearly orthogonal already; with ``orthogonal=True`` ``d2`` is made exactly
    orthogonal to ``d1`` by :func:`orthogonalize`, which keeps its total norm but not its filter-wise
    norms.

    Returns:
        ``(d1, d2)``.
    """
    seed = check_int("seed", seed, 0)
    d1 = random_direction(params, seed=seed, norm=norm, ignore=ignore)
    d2 = random_direction(params, seed=seed + 1, norm=norm, ignore=ignore)
    if orthogonal:
        d2 = orthogonalize(d2, d1)
    return d1, d2


# ----------------------------------------------------------------------------- directions from models
def difference(params_b: Mapping[str, Tensor], params_a: Mapping[str, Tensor]) -> Params:
    """The interpolation direction ``d = w_b - w_a``, so that ``w_a + t d`` is ``w_a`` at ``t = 0`` and
    ``w_b`` at ``t = 1`` (Goodfellow et al., ICLR 2015, "Qualitatively characterizing neural network
    optimization problems"; Li et al. 2018, Sec. 3).

    Raises:
        ValueError: the two dicts differ in names or shapes.
    """
    _check_same_layout("params_a", params_a, "params_b", params_b)
    return {k: params_b[k] - params_a[k] for k in params_a}


def plane_through(
    params_a: Mapping[str, Tensor], params_b: Mapping[str, Tensor], params_c: Mapping[str, Tensor]
) -> tuple[Params, Params, Params]:
    """The plane through three models (Garipov et al., NeurIPS 2018, "Loss Surfaces, Mode
    Connectivity, and Fast Ensembling of DNNs", Sec. 3).

    Returns ``(origin, d1, d2) = (w_a, w_b - w_a, w_c - w_a)``: the point ``origin + x d1 + y d2`` is
    ``w_a`` at ``(0, 0)``, ``w_b`` at ``(1, 0)`` and ``w_c`` at ``(0, 1)``. The axes are not orthogonal
    nor of equal length in general (Garipov et al. orthonormalise them for their figures; apply
    :func:`orthogonalize` for that, which moves ``w_c`` off ``(0, 1)``).

    Raises:
        ValueError: different names/shapes, or two of the models are equal.
    """
    _check_same_layout("params_a", params_a, "params_b", params_b)
    _check_same_layout("params_a", params_a, "params_c", params_c)
    d1, d2 = difference(params_b, params_a), difference(params_c, params_a)
    if _dot(d1, d1) == 0 or _dot(d2, d2) == 0:
        raise ValueError("params_b and params_c must both differ from params_a to span a plane")
    return {k: v.clone() for k, v in params_a.items()}, d1, d2


def eigenvector_directions(eigenvectors: Sequence[Mapping[str, Tensor]]) -> list[Params]:
    """Copies of Hessian eigenvectors as directions, e.g. ``top_eigenvalues(...).eigenvectors``.

    Each must be a parameter dict of unit norm over all tensors together (within ``1e-3``), all with
    the same names and shapes. They are not rescaled: the axis of a surface along an eigenvector
    ``v`` with eigenvalue ``lambda`` then reads in parameter-space distance, and the loss curves as
    ``lambda a^2 / 2`` near a minimum.

    Raises:
        ValueError: empty list, mismatched layouts or a vector that is not of unit norm.
    """
    if isinstance(eigenvectors, Mapping) or not isinstance(eigenvectors, Sequence) or not eigenvectors:
        raise ValueError("eigenvectors must be a non-empty list of parameter dicts")
    out = []
    for i, v in enumerate(eigenvectors):
        _check_same_layout("eigenvectors[0]", eigenvectors[0], f"eigenvectors[{i}]", v)
        n = float(torch.sqrt(_dot(v, v)))
        if abs(n - 1.0) > 1e-3:
            raise ValueError(f"eigenvectors[{i}] must have unit norm over all parameters; got norm {n:.6g}")
        out.append({k: t.clone() for k, t in v.items()})
    return out


# ------------------------------------------------------------------------------------------------- PCA
@dataclass
class PCAResult:
    """Principal directions of a training trajectory (Li et al. 2018, Sec. 7).

    Attributes:
        directions: ``n_components`` parameter dicts, orthonormal over all parameters together, in the
            dtype and on the device of the final point.
        explained_variance_ratio: ``s_k^2 / sum_i s_i^2`` per component (float64, shape
            ``(n_components,)``), with ``s`` the singular values of the trajectory matrix.
        coordinates: ``(n_snapshots, n_components)`` float64 coordinates of each snapshot in the basis
            ``directions``, the final point being the origin.
    """

    directions: list[Params]
    explained_variance_ratio: np.ndarray
    coordinates: np.ndarray


def pca_directions(
    snapshots: Sequence[Mapping[str, Tensor]],
    final: Mapping[str, Tensor] | None = None,
    *,
    n_components: int = 2,
) -> PCAResult:
    """PCA directions of an optimisation trajectory (Li et al. 2018, Sec. 7).

    With :math:`M \\in \\mathbb R^{m \\times n}` the matrix whose row :math:`i` is the flattened
    :math:`w_i - w_{\\text{final}}` and its SVD :math:`M = U S V^\\top`, computed from the ``m x m`` Gram
    matrix :math:`G = M M^\\top = U S^2 U^\\top` (float64, cost :math:`O(m^2 n)` for ``m`` snapshots of
    ``n`` parameters),

    .. math::

        d_k = V_{:,k} = M^\\top U_{:,k} / s_k,\\qquad \\text{ratio}_k = \\frac{s_k^2}{\\operatorname{tr} G},
        \\qquad \\text{coordinates}_{i,k} = \\langle w_i - w_{\\text{final}}, d_k \\rangle = (U S)_{i,k}.

    ``M`` is never formed: ``G`` and the ``d_k`` are accumulated over blocks of columns of about
    :data:`PCA_BLOCK_ELEMENTS` entries, each moved to the device of ``final`` in float64, so the
    snapshots may stay on the CPU (memory-mapped checkpoints, ``torch.load(..., mmap=True)``) and the
    memory beyond them is one block plus the directions. (200 snapshots of WRN-28-10 would need 58 GB as
    one float64 matrix.) The Gram matrix resolves singular values down to about ``1e-6 s_1``; smaller
    ones count as absent.

    The rows are not centred: the plane passes through the final point, which is the origin of the
    surface drawn around it, and the ratios are shares of the second moment about that point (sklearn's
    ``PCA``, used in Li et al.'s code, centres on the mean snapshot instead). Signs are fixed so that
    the coordinate of largest magnitude of every component is positive.

    Args:
        snapshots: parameter dicts saved along training, in order.
        final: the point the directions are taken around; default: the last snapshot.
        n_components: number of directions, ``1 <= n_components <= len(snapshots)``.

    Raises:
        ValueError: fewer than two snapshots, mismatched layouts, too many components, or a trajectory
            that spans fewer than ``n_components`` dimensions.
    """
    if isinstance(snapshots, Mapping) or not isinstance(snapshots, Sequence) or len(snapshots) < 2:
        raise ValueError("snapshots must be a list of at least two parameter dicts")
    n_components = check_int("n_components", n_components, 1)
    reference = snapshots[-1] if final is None else final
    layout = _check_params("final" if final is not None else "snapshots[-1]", reference)
    m = len(snapshots)
    if n_components > min(m, layout.size):
        raise ValueError(
            f"n_components must be <= min(number of snapshots, number of parameters) = "
            f"{min(m, layout.size)}; got {n_components}"
        )
    for i, s in enumerate(snapshots):
        _check_same_layout("final", reference, f"snapshots[{i}]", s)
    device = next(iter(reference.values())).device
    gram = torch.zeros(m, m, dtype=_F64, device=device)
    for _, _, block in _trajectory_blocks(snapshots, reference, layout.names, device):
        gram += block @ block.T
    total = float(gram.trace())
    if total == 0.0:
        raise ValueError("every snapshot equals final; the trajectory has no direction")
    eigenvalues, u = torch.linalg.eigh(gram)
    eigenvalues, u = eigenvalues.flip(0).clamp_min(0.0), u.flip(1)  # descending
    rank = int((eigenvalues > eigenvalues[0] * 1e-12).sum())
    if rank < n_components:
        raise ValueError(f"the trajectory spans {rank} dimension(s); cannot take n_components={n_components}")
    s = eigenvalues[:n_components].sqrt()
    u = u[:, :n_components]
    # SVD signs are arbitrary; fix them so that repeated runs give the same picture.
    coords = u * s
    pivot = coords.abs().argmax(dim=0)
    signs = torch.sign(coords[pivot, torch.arange(n_components)])
    coords, u = coords * signs, u * signs
    dtype = next(iter(reference.values())).dtype
    flat = {name: torch.empty(n_components, reference[name].numel(), dtype=_F64, device=device) for name in layout.names}
    for name, columns, block in _trajectory_blocks(snapshots, reference, layout.names, device):
        flat[name][:, columns] = (u.T @ block) / s[:, None]
    directions = [{name: flat[name][k].view(reference[name].shape).to(dtype) for name in layout.names}
                  for k in range(n_components)]
    return PCAResult(
        directions=directions,
        explained_variance_ratio=(s**2 / total).cpu().numpy(),
        coordinates=coords.cpu().numpy(),
    )


PCA_BLOCK_ELEMENTS = 2**24
"""Entries of the largest block of the trajectory matrix in flight in :func:`pca_directions` (128 MiB in float64)."""


def _trajectory_blocks(
    snapshots: Sequence[Mapping[str, Tensor]], reference: Mapping[str, Tensor], names: Sequence[str], device: torch.device,
) -> Iterator[tuple[str, slice, Tensor]]:
    """``(name, columns, block)``: the rows ``w_i - w_final`` restricted to a slice of one tensor's
    flattened entries, float64 on ``device``, tensor by tensor in ``names`` order."""
    width = max(1, PCA_BLOCK_ELEMENTS // len(snapshots))
    for name in names:
        origin = reference[name].reshape(-1)
        for start in range(0, origin.numel(), width):
            columns = slice(start, min(start + width, origin.numel()))
            rows = [s[name].reshape(-1)[columns].to(device, _F64) for s in snapshots]
            yield name, columns, torch.stack(rows) - origin[columns].to(device, _F64)


# -------------------------------------------------------------------------------------------- helpers
def direction_norms_by_filter(
    direction: Mapping[str, Tensor], params: Mapping[str, Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-filter norms ``(||d_j||, ||w_j||)`` of every tensor, as float64 CPU tensors.

    For tensors with more than one dimension, one norm per output index ``j`` (shape ``(out,)``); for
    the others, the norm of the whole tensor (shape ``(1,)``). Filter normalisation makes the two equal
    (Li et al. 2018, Sec. 4).
    """
    _check_same_layout("params", params, "direction", direction)
    out = {}
    for k, w in params.items():
        d = direction[k]
        rows = w.shape[0] if w.ndim > 1 else 1
        d_n = torch.linalg.vector_norm(d.reshape(rows, -1), dim=1, dtype=_F64)
        w_n = torch.linalg.vector_norm(w.reshape(rows, -1), dim=1, dtype=_F64)
        out[k] = (d_n.cpu(), w_n.cpu())
    return out
