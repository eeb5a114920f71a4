"""Every example's SAM point at once from per-layer rules: ``m = 1`` sharpness without per-example weights.

For ``m = 1`` and one ascent step (``p = 2``, plain coordinates) example ``i``'s perturbation is the SAM step
``eps_i = k_i g_i`` with ``g_i = grad l_i(w)`` and ``k_i = alpha / ||g_i||_2``, clipped to the ball ``rho``
(Foret et al. 2021, Eq. 2). vmap computes it by stacking ``E`` per-example gradients and ``E`` perturbed
copies of the weights, and every convolution becomes a grouped one with a group per example. Neither is
needed: a layer ``z_q = W u_q`` (``q`` a position: a token, or a patch of a convolution's input) has
per-example gradient ``G_i = sum_q d_iq u_iq^T`` with ``d_iq = dl_i / dz_iq`` (Goodfellow 2015), from one
batched forward and backward to the layer outputs. Then

* ``||G_i||_F^2 = sum_{q,r} (u_iq . u_ir)(d_iq . d_ir)`` (the "ghost norm": Li et al. 2022, Sec. 4; Bu et
  al. 2022 choose, as here, per layer between it and materialising ``G_i``, whichever takes fewer
  multiplications: ``P (d_in + d_out) < d_in d_out`` for ``P`` positions);
* at ``w + eps_i`` the layer maps an input ``u'`` to ``W u'_q + k_i G_i u'_q``: the plain batched layer plus
  a correction ``k_i D_i^T (U_i u'_q)`` (ghost) or ``k_i G_i u'_q`` (materialised), one batched matrix
  product per example with nothing of the size of the model stacked ``E`` times.

So every ``l_i(w)`` and ``l_i(w + eps_i)`` come from one forward with the layer inputs kept, one backward
to the layer outputs, per-example products of size ``P x P`` or ``d_out x d_in``, and one forward whose
layers add their corrections. Rules (a module's own ``forward`` only; a subclass that overrides it is not
covered):

* ``Linear`` (positions: every index between the batch and the features), transformers' ``Conv1D`` (GPT-2's
  ``z = u W + b``, the weight stored transposed: ``G = U^T D`` in its layout), ``Conv1d``/``Conv2d`` (the
  unfolded patches; zero padding, one group): ``G = D^T U``, bias gradient ``sum_q d_q``;
* ``Embedding``: ``u_q`` is one-hot, so ``u_q . u_r = [t_q = t_r]`` for the token ids ``t`` (rows at
  ``padding_idx`` get no gradient, as in PyTorch); transformers' ``*ScaledWordEmbedding`` (Gemma's: ``z = s
  W[t]``) the same with ``d_q`` scaled by ``s``;
* a weight tied between such layers (GPT-2's token embedding and output layer): its gradient is the sum
  ``G = G_a + G_b`` of its uses, so ``||G||^2`` gains ``2 <G_a, G_b>`` and every use's correction applies the
  whole ``G``. Both stay factored, ``G_a = sum_q r_q c_q^T``: ``<G_a, G_b> = sum_{q,s} (r_q . r'_s)(c_q . c'_s)``,
  with a one-hot factor's inner products read off the other factor by its token ids;
* ``BatchNorm`` (eval, running statistics), ``LayerNorm``, ``GroupNorm``, ``RMSNorm`` and Hugging Face's own
  normalisations (classes of ``transformers``, or of a model's remote code, named ``*RMSNorm`` or
  ``*LayerNorm``: Llama's ``gamma * xhat``, the ``(1 + gamma) * xhat`` of others): ``z = c + gamma * xhat`` with
  ``xhat`` the normalised input (for Hugging Face's, ``dz / dgamma`` along all-ones by a JVP, whatever dtype
  they compute in; checked once, along a second direction, to be that channel by channel over the last
  dimension), so ``dgamma_i = sum d_i * xhat_i`` and ``dbeta_i = sum d_i``, small enough to materialise.

A module that runs several times in one forward (ALBERT's shared layers, an embedding shared by an encoder
and a decoder) has the sum over its calls as its gradient, as a tied weight has over its uses; one that does
not run contributes nothing. Anything else (a parameter of another module, a convolution that runs twice, a
tie involving a bias, a norm or a convolution, a loss that cannot be taken per example) raises
:class:`Unsupported`, and
:func:`landscape.sharpness.m_sharpness` uses vmap. References: Goodfellow, "Efficient per-example gradient
computations", 2015; Li et al., "Large language models can be strong differentially private learners", ICLR
2022; Bu et al., "Scalable and efficient training of large convolutional neural networks with differential
privacy", NeurIPS 2022.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import BatchProtocol, _is_class_index, batch_size, take
from .objective import Objective, _upcast

__all__ = ["LayerRules", "Unsupported", "first_step_coefficient", "layer_rules"]

_TINY = 1e-12
_SLAB_VALUES = 2**19


class _TransposedLinear(nn.Module):
    """The kind of transformers' ``Conv1D`` (GPT-2): ``z = u W + b`` with ``W`` stored ``(d_in, d_out)``."""


class _ScaledEmbedding(nn.Embedding):
    """The kind of transformers' ``*ScaledWordEmbedding`` (Gemma's, BART's): ``z = s W[t]``, ``s`` its
    ``embed_scale``."""


class _ElementwiseAffine(nn.Module):
    """The kind of Hugging Face's own normalisations: affine in a 1-D ``weight``, channel by channel, over the
    last dimension (``z = c(u) + gamma * xhat(u)``)."""


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_CONVS = (nn.Conv1d, nn.Conv2d)
_MATRICES = (nn.Linear, _TransposedLinear, nn.Embedding, _ScaledEmbedding)  # met on one side: may be tied
_AFFINE = _NORMS + (_ElementwiseAffine,)


class Unsupported(Exception):
    """The model or its loss is outside the layer rules; the message says what (the caller uses vmap)."""


def first_step_coefficient(norm: Tensor, alpha: float, rho: float) -> Tensor:
    """``k`` of the first projected step from ``u = 0`` along ``g`` with ``||g||_2 = norm``: ``Proj(alpha g /
    ||g||) = k g`` with ``k = min(alpha, rho) / ||g||`` (``||g||`` clamped at ``1e-12``, so that ``k g = 0`` where
    ``g = 0``)."""
    coefficient = alpha / norm.clamp_min(_TINY)
    return coefficient * (rho / (coefficient * norm).clamp_min(_TINY)).clamp(max=1.0)


# ------------------------------------------------------------------------- what a layer computes
def _kind(module: nn.Module) -> type[nn.Module] | None:
    """The class whose rule ``module`` computes by: a ruled PyTorch class (itself or a subclass that keeps its
    ``forward``), else :class:`_TransposedLinear` or :class:`_ElementwiseAffine` for transformers' classes, else
    ``None``."""
    for cls in type(module).__mro__:
        if cls in _CONVS + (nn.Linear, nn.Embedding) + _NORMS and type(module).forward is cls.forward:
            return cls
    cls = type(module)
    if cls.__module__ == "transformers.pytorch_utils" and cls.__name__ == "Conv1D":
        return _TransposedLinear
    weight = getattr(module, "weight", None)
    hugging_face = cls.__module__.startswith(("transformers.", "transformers_modules."))  # or its remote code
    if (hugging_face and cls.__name__.endswith("ScaledWordEmbedding") and isinstance(module, nn.Embedding)
            and hasattr(module, "embed_scale")):
        return _ScaledEmbedding
    if (hugging_face and cls.__name__.endswith(("RMSNorm", "LayerNorm"))
            and isinstance(weight, Tensor) and weight.ndim == 1
            and getattr(module, "data_format", "channels_last") == "channels_last"):  # ConvNeXt's may be first
        return _ElementwiseAffine
    return None


def _conv_padding(module: nn.Module) -> tuple[int, ...]:
    """The zeros a convolution pads on each side, per spatial axis (``"same"`` only where that is symmetric)."""
    padding = module.padding
    if padding == "valid":
        return (0,) * len(module.kernel_size)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
        if any(t % 2 for t in total):
            raise Unsupported(f"{type(module).__name__} with padding='same' and an even kernel (asymmetric padding)")
        return tuple(t // 2 for t in total)
    return tuple(padding)


def _columns(module: nn.Module, a: Tensor) -> Tensor:
    """A convolution's input as the columns ``(E, d_in, P)`` of its product: its patches in the order of the
    flattened kernel (``F.unfold``'s result, built from strided windows of the zero-padded input in one copy,
    1.8-11x faster than ``F.unfold`` on the CPU)."""
    padding = _conv_padding(module)
    x = F.pad(a, [p for p in reversed(padding) for _ in range(2)])
    spatial = len(module.kernel_size)
    for axis, (k, d, s) in enumerate(zip(module.kernel_size, module.dilation, module.stride)):
        x = x.unfold(2 + axis, (k - 1) * d + 1, s)  # appends the window axis
        if d > 1:
            x = x[..., ::d]
    # (E, C, *out, *kernel) -> (E, C, *kernel, *out) -> (E, C * kernel, P)
    order = (0, 1) + tuple(range(2 + spatial, 2 + 2 * spatial)) + tuple(range(2, 2 + spatial))
    return x.permute(order).reshape(a.shape[0], a.shape[1] * math.prod(module.kernel_size), -1)


def _rows(a: Tensor) -> Tensor:
    """A matrix layer's input or output as rows ``(E, P, d)``: every index between the batch and the features
    is a position."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _dense_sizes(kind: type[nn.Module], module: nn.Module, a: Tensor, z: Tensor) -> tuple[int, int, int]:
    """``(d_in, P, d_out)`` of a matrix layer or a convolution, from its input and its output (or the output's
    gradient)."""
    if kind in _CONVS:
        return a.shape[1] * math.prod(module.kernel_size), z[0, 0].numel(), z.shape[1]
    return a.shape[-1], z[0, ..., 0].numel(), z.shape[-1]


def _ghost(d_in: int, P: int, d_out: int) -> bool:
    """Whether the ghost norm (``P x P`` Gram matrices) takes fewer multiplications than ``G = D^T U``."""
    return P * (d_in + d_out) < d_in * d_out


def _slabs(module: nn.Module, a: Tensor, values_per_example: int) -> Iterator[tuple[slice, Tensor]]:
    """``(examples, their columns)`` of a convolution's input, a slab of about ``2**19`` unfolded values (2 MiB in
    float32) at a time: unfolding all ``E`` examples at once writes ``d_in * P`` values each out of cache (for
    the digits CNN's second convolution at E = 256, 19 MB in 5.5 ms against 1.8 ms the same copy takes alone)."""
    step = max(1, _SLAB_VALUES // max(values_per_example, 1))
    for start in range(0, a.shape[0], step):
        examples = slice(start, start + step)
        yield examples, _columns(module, a[examples])


def _channels_first(kind: type[nn.Module]) -> bool:
    return issubclass(kind, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))


def _affine_rows(kind: type[nn.Module], module: nn.Module, x: Tensor) -> Tensor:
    """A normalisation's input or output as rows ``(E, R, C)``, ``C`` the size of its affine parameters."""
    if _channels_first(kind):
        return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])
    size = math.prod(module.normalized_shape) if hasattr(module, "normalized_shape") else module.weight.numel()
    return x.reshape(x.shape[0], -1, size)


def _from_affine_rows(kind: type[nn.Module], rows: Tensor, like: Tensor) -> Tensor:
    if _channels_first(kind):
        return rows.reshape((like.shape[0],) + like.shape[2:] + (like.shape[1],)).movedim(-1, 1)
    return rows.reshape(like.shape)


# ---------------------------------------------------- a weight matrix's per-example gradient, factored
@dataclass
class _Ids:
    """The one-hot vectors ``e_{t_q}`` of token ids ``t`` ``(E, P)`` among ``n``, never materialised."""

    ids: Tensor
    n: int
    dtype: torch.dtype


_Factor = Tensor | _Ids  # (E, P, n) vectors at P positions, or one-hot ones


@dataclass
class _Outer:
    """``G_i = sum_q r_iq c_iq^T`` (``R x C``, the weight's layout), kept as its factors."""

    rows: _Factor
    cols: Tensor


_Gradient = _Outer | Tensor  # factored, or materialised (E, R, C)


def _gram(a: _Factor, b: _Factor) -> Tensor:
    """``(E, P_a, P_b)``: ``a_q . b_s`` for every two positions (a one-hot factor reads the other one at its ids)."""
    if isinstance(a, _Ids) and isinstance(b, _Ids):
        return (a.ids[:, :, None] == b.ids[:, None, :]).to(a.dtype)
    if isinstance(a, _Ids):
        return _gram(b, a).mT
    if isinstance(b, _Ids):
        return a.gather(2, b.ids[:, None, :].expand(-1, a.shape[1], -1))
    return a @ b.mT


def _times(M: Tensor, f: _Factor) -> Tensor:
    """``(E, P', n)``: ``sum_s M[:, q, s] f_s`` (one-hot ``f``: ``M`` added into the columns of its ids)."""
    if isinstance(f, _Ids):
        out = M.new_zeros(M.shape[:2] + (f.n,))
        return out.scatter_add_(2, f.ids[:, None, :].expand_as(M), M)
    return M @ f


def _met(g: _Gradient, side: int, x: _Factor) -> Tensor:
    """What an input ``x`` ``(E, P', .)`` meets in ``G``, at every position: ``G^T x_q`` for ``side = 0`` (the input
    meets the rows: ``Conv1D``, ``Embedding``), ``G x_q`` for ``side = 1`` (the columns: ``Linear``)."""
    if isinstance(g, _Outer):
        near, far = (g.rows, g.cols) if side == 0 else (g.cols, g.rows)
        return _times(_gram(x, near), far)
    if side == 1:
        return x @ g.mT
    if isinstance(x, _Ids):
        return g.gather(1, x.ids[:, :, None].expand(-1, -1, g.shape[2]))
    return x @ g


def _dot(f: _Factor, M: Tensor) -> Tensor:
    """``(E,)``: ``sum_q f_q . M_q`` for ``M`` ``(E, P, n)``."""
    if isinstance(f, _Ids):
        return M.gather(2, f.ids[:, :, None]).sum((1, 2))
    return (f * M).sum((1, 2))


def _inner(a: _Gradient, b: _Gradient) -> Tensor:
    """``<G_a, G_b>_F`` of every example, from whatever form each is kept in."""
    if isinstance(a, _Outer) and isinstance(b, _Outer):
        return (_gram(a.rows, b.rows) * _gram(a.cols, b.cols)).sum((1, 2))
    if isinstance(b, _Outer):
        a, b = b, a
    if isinstance(a, _Outer):  # sum_q r_q^T G c_q: rows of G picked by a one-hot factor, else G c_q
        return _dot(a.cols, _met(b, 0, a.rows)) if isinstance(a.rows, _Ids) else _dot(a.rows, _met(b, 1, a.cols))
    if a is b:
        return torch.linalg.vector_norm(a, dim=(1, 2)).square()
    return (a * b).sum((1, 2))


def _squared_norm(pieces: Sequence[_Gradient]) -> Tensor:
    """``||sum_a G_a||_F^2 = sum_a ||G_a||^2 + 2 sum_{a<b} <G_a, G_b>`` (the uses of one tied weight)."""
    return sum((1 if a == b else 2) * _inner(pieces[a], pieces[b])
               for a in range(len(pieces)) for b in range(a, len(pieces)))


# --------------------------------------------------------------------- one layer's first step
@dataclass
class _Matrix:
    """``Linear``, transformers' ``Conv1D`` or ``Embedding``: a weight matrix that the input meets on one side
    (:func:`_met`), its gradient ``G = sum_q`` (input) x (output gradient) factored (ghost) or materialised, and
    the bias gradient ``b = sum_q d_q``.

    ``weight`` lists the gradient's pieces: this layer's own, and, once :meth:`LayerRules.sam_losses` has tied
    them, those of every layer sharing the weight (one list for all of them; only the first one counts its
    norm, ``counts_weight``)."""

    layer: _Layer
    weight: list[_Gradient] = field(default_factory=list)
    b: Tensor | None = None
    counts_weight: bool = True

    @property
    def side(self) -> int:
        """The side of the stored weight the input meets: its columns (1) for ``Linear``, else its rows (0)."""
        return 1 if self.layer.kind is nn.Linear else 0

    def _input(self, a: Tensor, dtype: torch.dtype) -> _Factor:
        if issubclass(self.layer.kind, nn.Embedding):
            return _Ids(a.reshape(a.shape[0], -1), self.layer.module.num_embeddings, dtype)
        return _rows(a)

    @classmethod
    def of(cls, layer: _Layer, a: Tensor, z_grad: Tensor) -> _Matrix:
        step = cls(layer)
        D = _rows(z_grad)
        if "bias" in layer.selected:
            step.b = D.sum(1)
        if "weight" in layer.selected:
            if issubclass(layer.kind, nn.Embedding):
                padding = layer.module.padding_idx
                if padding is not None:
                    D = D.masked_fill((a.reshape(D.shape[:2]) == padding)[..., None], 0.0)
                step.weight.append(_Outer(step._input(a, D.dtype), D if layer.scale is None else D * layer.scale))
            else:
                X = _rows(a)
                piece = _Outer(D, X) if step.side == 1 else _Outer(X, D)
                step.weight.append(piece if _ghost(X.shape[2], X.shape[1], D.shape[2])
                                   else piece.rows.mT @ piece.cols)
        return step

    def absorb(self, other: _Matrix) -> None:
        """Add another call's gradient: its weight's piece to the list, its bias gradient to the sum."""
        self.weight.extend(other.weight)
        if other.b is not None:
            self.b = other.b if self.b is None else self.b + other.b

    def squared_norm(self) -> Tensor:
        total = torch.linalg.vector_norm(self.b, dim=1).square() if self.b is not None else 0
        return total + _squared_norm(self.weight) if self.counts_weight and self.weight else total

    def correction(self, a: Tensor, z: Tensor) -> Tensor:
        """``G u'_q + b`` at every output position, in ``z``'s shape."""
        x = self._input(a, z.dtype)
        out = sum(_met(g, self.side, x) for g in self.weight) if self.weight else None
        if out is not None and self.layer.scale is not None:
            out = out * self.layer.scale
        if self.b is not None:
            out = self.b[:, None, :] if out is None else out + self.b[:, None, :]
        return out.expand(z.shape[0], z[0, ..., 0].numel(), z.shape[-1]).reshape(z.shape)


@dataclass
class _Conv:
    """A convolution: its per-example gradient ``G = D^T U`` kept as ``(X, D)`` (ghost) or ``G``, and its bias
    gradient ``b = sum_q d_q``. ``X`` and ``D`` are columns ``(E, d, P)`` (``F.unfold``'s layout and the
    output's), so that every product reads its operands in place and writes the output's layout."""

    module: nn.Module
    ghost: bool = False
    X: Tensor | None = None
    D: Tensor | None = None
    G: Tensor | None = None
    b: Tensor | None = None

    @classmethod
    def of(cls, layer: _Layer, a: Tensor, z_grad: Tensor) -> _Conv:
        module = layer.module
        step = cls(module)
        D = z_grad.flatten(2)
        if "bias" in layer.selected:
            step.b = D.sum(2)
        if "weight" in layer.selected:
            d_in, P, d_out = _dense_sizes(layer.kind, module, a, z_grad)
            step.ghost = _ghost(d_in, P, d_out)
            if step.ghost:
                step.X, step.D = _columns(module, a), D
            else:
                step.G = D.new_empty(D.shape[0], d_out, d_in)
                for examples, X in _slabs(module, a, d_in * P):
                    torch.bmm(D[examples], X.mT, out=step.G[examples])
        return step

    def squared_norm(self) -> Tensor:
        total = 0
        if self.b is not None:
            total = torch.linalg.vector_norm(self.b, dim=1).square()
        if self.ghost:
            total = total + ((self.X.mT @ self.X) * (self.D.mT @ self.D)).sum((1, 2))
        elif self.G is not None:
            total = total + torch.linalg.vector_norm(self.G, dim=(1, 2)).square()
        return total

    def correction(self, a: Tensor, z: Tensor) -> Tensor:
        """``G u'_q + b`` at every output position, in ``z``'s shape."""
        out = None
        if self.ghost:
            out = self.D @ (self.X.mT @ _columns(self.module, a))
        elif self.G is not None:
            out = self.G.new_empty(z.shape[0], z.shape[1], z[0, 0].numel())
            for examples, X in _slabs(self.module, a, self.G.shape[2] * out.shape[2]):
                torch.bmm(self.G[examples], X, out=out[examples])
        if self.b is not None:
            out = self.b[:, :, None] if out is None else out + self.b[:, :, None]
        return out.expand(z.shape[0], z.shape[1], z[0, 0].numel()).reshape(z.shape)


@dataclass
class _Affine:
    """A normalisation ``z = c + gamma * xhat + beta``: ``dgamma_i = sum d_i * xhat_i``, ``dbeta_i = sum d_i``."""

    layer: _Layer
    gamma: Tensor | None
    beta: Tensor | None

    @classmethod
    def of(cls, layer: _Layer, xhat: Tensor, z_grad: Tensor) -> _Affine:
        """``xhat``: the normalised input, as :func:`_capture` keeps it (with the objective's buffers)."""
        D = _affine_rows(layer.kind, layer.module, z_grad)
        gamma = (D * _affine_rows(layer.kind, layer.module, xhat)).sum(1) if "weight" in layer.selected else None
        beta = D.sum(1) if "bias" in layer.selected else None
        return cls(layer, gamma, beta)

    def absorb(self, other: _Affine) -> None:
        """Add another call's ``dgamma`` and ``dbeta``."""
        self.gamma = None if self.gamma is None else self.gamma + other.gamma
        self.beta = None if self.beta is None else self.beta + other.beta

    def squared_norm(self) -> Tensor:
        return sum(torch.linalg.vector_norm(t, dim=1).square() for t in (self.gamma, self.beta) if t is not None)

    def correction(self, a: Tensor, z: Tensor) -> Tensor:
        """``dgamma * xhat' + dbeta``."""
        kind, module = self.layer.kind, self.layer.module
        rows = 0
        if self.gamma is not None:
            rows = _affine_rows(kind, module, _normalised(self.layer, a)) * self.gamma[:, None, :]
        if self.beta is not None:
            rows = rows + self.beta[:, None, :]
        rows = rows.expand(_affine_rows(kind, module, z).shape)
        return _from_affine_rows(kind, rows, z)


_Step = _Matrix | _Conv | _Affine


def _slope(layer: _Layer, a: Tensor, tangent: Tensor) -> Tensor:
    """``dz / dgamma`` of the module at input ``a`` along ``tangent`` (a JVP of its forward; its hooks stand aside
    meanwhile)."""
    module = layer.module
    layer.busy = True
    try:
        _, slope = torch.func.jvp(lambda w: torch.func.functional_call(module, {"weight": w}, (a,)),
                                  (module.weight.detach(),), (tangent,))
    finally:
        layer.busy = False
    return slope


def _check_elementwise(layer: _Layer, a: Tensor, xhat: Tensor) -> None:
    """That a Hugging Face normalisation is affine in its weight channel by channel over the last dimension:
    its slope along ``v = (0.5 .. 1.5)`` is ``v * xhat`` (SqueezeBERT's and VitDet's ``*LayerNorm`` normalise
    the channels of a channels-first input, for one); else :class:`Unsupported`."""
    weight = layer.module.weight
    if xhat.shape[-1] != weight.numel():
        raise Unsupported(f"{layer.name} ({type(layer.module).__name__}): the last dimension of its output is not "
                          "the size of its weight")
    v = torch.linspace(0.5, 1.5, weight.numel(), dtype=weight.dtype, device=weight.device)
    along = _slope(layer, a, v)
    if not torch.allclose(along, xhat * v, rtol=1e-4, atol=1e-6 * float(xhat.abs().max())):
        raise Unsupported(f"{layer.name} ({type(layer.module).__name__}) is not affine in its weight channel by "
                          "channel over the last dimension")


def _step_of(kind: type[nn.Module]) -> Callable[..., _Step]:
    if kind in _MATRICES:
        return _Matrix.of
    if kind in _CONVS:
        return _Conv.of
    return _Affine.of


def _normalised(layer: _Layer, a: Tensor) -> Tensor:
    """``xhat``: the normalisation of ``a`` before its affine map (BatchNorm with its running statistics; for
    Hugging Face's own, ``dz / dgamma`` along all-ones, by a JVP of the module's forward with the hooks off)."""
    kind, module = layer.kind, layer.module
    if kind is _ElementwiseAffine:
        return _slope(layer, a, torch.ones_like(module.weight))
    if issubclass(kind, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None or module.running_var is None:
            raise Unsupported(f"{type(module).__name__} normalises with batch statistics (train mode, or no running "
                              "statistics): examples are not independent")
        return F.batch_norm(a, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    if kind is nn.GroupNorm:
        return F.group_norm(a, module.num_groups, None, None, module.eps)
    if kind is nn.LayerNorm:
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps)
    return F.rms_norm(a, module.normalized_shape, None, module.eps)


# ----------------------------------------------------------------------------------- the model
@dataclass
class _Call:
    """What one call of a layer showed: its input (a normalisation's ``xhat``) and the output whose gradient is
    read (a leaf if nothing before it needs one), with their versions (to see in-place changes)."""

    inputs: Tensor
    version: int
    output: Tensor
    output_version: int


@dataclass
class _Layer:
    """A module owning analysed parameters, and what the last forward showed it."""

    name: str
    module: nn.Module
    kind: type[nn.Module]  # the class whose rule applies (:func:`_kind`)
    selected: dict[str, str]  # its analysed parameters: local name ("weight", "bias") -> name in the objective
    examples: int = 0  # E, the examples of the forward under way
    calls: int = 0
    busy: bool = False  # the rules call the module themselves (a JVP): its hooks stand aside
    seen: list[_Call] = field(default_factory=list)  # the calls of the forward at w
    copy: bool = False  # hand the model a copy of the output (it changes the output in place)
    scale: Tensor | None = None  # a scaled embedding's s, as the forward under way has it
    step: _Step | None = None
    k: Tensor | None = None  # the step coefficient of every example

    @property
    def matrix_weight(self) -> str | None:
        """The objective's name of a matrix layer's analysed weight (what ties the layers sharing it), or
        ``None``."""
        return self.selected.get("weight") if issubclass(self.kind, _MATRICES) else None

    def elements_per_example(self, a: Tensor, z: Tensor, uses: int = 1) -> int:
        """What the rules keep per example for one call of this layer: its input, its output with the output's
        gradient and correction (and one more for the sum of the pieces of a weight with ``uses > 1`` uses), a
        convolution's unfolded input, and ``G`` or the ghost norm's operands and Gram matrices (a plan for the
        memory of a call; a language model's output layer is most of it)."""
        outputs = (3 + (uses > 1)) * z[0].numel()
        if issubclass(self.kind, nn.Embedding):
            T = a[0].numel()
            return 3 * T * T + outputs
        if self.kind in _MATRICES + _CONVS and "weight" in self.selected:
            d_in, P, d_out = _dense_sizes(self.kind, self.module, a, z)
            kept = P * (d_in + d_out + 3 * P) if _ghost(d_in, P, d_out) else d_in * d_out  # up to 3 Gram matrices
            unfolded = P * d_in if self.kind in _CONVS else 0
            return kept + unfolded + a[0].numel() + outputs
        return 2 * a[0].numel() + outputs


def _layers(objective: Objective) -> list[_Layer]:
    """The modules owning the analysed parameters, every one of them ruled; else :class:`Unsupported`."""
    model = objective.model
    if objective.train_mode:
        raise Unsupported("the objective evaluates in train mode")
    if any(isinstance(module, torch._dynamo.eval_frame.OptimizedModule) for module in model.modules()):
        raise Unsupported("a torch.compile'd module")
    first: dict[int, str] = {}
    analysed: dict[str, str] = {}  # every name of an analysed parameter (tied ones have several) -> its own
    for name, p in model.named_parameters(remove_duplicate=False):
        own = first.setdefault(id(p), name)
        if own in objective.params:
            analysed[name] = own
    layers = []
    for name, module in model.named_modules():
        selected = {local: analysed[full] for local, _ in module.named_parameters(recurse=False)
                    if (full := f"{name}.{local}" if name else local) in analysed}
        if not selected:
            continue
        kind = _kind(module)
        if kind is None or not set(selected) <= {"weight", "bias"}:
            names = sorted(f"{name}.{local}" if name else local for local in selected)
            raise Unsupported(f"no rule covers {names} of {name or 'the model'} ({type(module).__name__})")
        if kind in _CONVS:
            if module.groups != 1 or module.padding_mode != "zeros":
                raise Unsupported(f"{name} ({type(module).__name__}) with groups={module.groups}, "
                                  f"padding_mode={module.padding_mode!r}")
            _conv_padding(module)
        if issubclass(kind, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
            raise Unsupported(f"{name} (Embedding) with max_norm or scale_grad_by_freq")
        layers.append(_Layer(name, module, kind, selected))
    users: dict[str, list[str]] = {}
    for layer in layers:
        for local, own in layer.selected.items():
            users.setdefault(own, []).append(f"{layer.name}.{local}" if layer.name else local)
    for own, uses in users.items():
        if len(uses) > 1 and not all(layer.matrix_weight == own for layer in layers if own in layer.selected.values()):
            raise Unsupported(f"{own!r} is tied between {uses}: only the weights of Linear, Conv1D and Embedding "
                              "layers may be tied")
    return layers


def _per_example(layer: _Layer, t: Tensor) -> Tensor:
    """``t`` with a leading dimension of the ``E`` examples: an input shared by all of them (a leading 1, as
    Hugging Face's position ids) is expanded; anything else is refused."""
    if t.ndim and t.shape[0] == layer.examples:
        return t
    if t.ndim and t.shape[0] == 1:
        return t.expand((layer.examples,) + t.shape[1:])
    raise Unsupported(f"{layer.name} sees a tensor of shape {tuple(t.shape)}, not one row per example "
                      f"({layer.examples})")


def _capture(layer: _Layer, module: nn.Module, args: tuple, output: Any) -> Tensor:
    """Forward hook at ``w``: keep the input and the output whose gradient is read (a leaf where nothing before
    the layer needs a gradient, returned as a copy so that later in-place operations may change it; a copy
    too where :attr:`_Layer.copy` says that the model changes the layer's output in place). An output shared
    by every example (a leading 1) is expanded first, so that each example's gradient stays its own."""
    layer.calls += 1
    if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
        raise Unsupported(f"{layer.name} is not called with one input tensor")
    a = args[0]
    if layer.kind is _ElementwiseAffine and len(args) != 1:
        raise Unsupported(f"{layer.name} ({type(module).__name__}) is called with {len(args)} inputs")
    if layer.kind in _AFFINE:  # read the statistics now: the objective's buffers are in place only here
        with torch.no_grad():
            inputs = _per_example(layer, _normalised(layer, a.detach()))
    else:
        inputs = _per_example(layer, a.detach())
    if layer.kind is _ScaledEmbedding:  # the objective's copy of the buffer is in place only here
        layer.scale = torch.as_tensor(module.embed_scale, dtype=output.dtype, device=output.device)
    shared = output.shape[0] != layer.examples
    z = _per_example(layer, output)
    if shared and output.requires_grad:
        raise Unsupported(f"{layer.name} is shared by every example but depends on earlier parameters")
    leaf = shared or not z.requires_grad
    kept = z.detach().requires_grad_() if leaf else z
    layer.seen.append(_Call(inputs, inputs._version, kept, kept._version))
    return kept.clone() if leaf or layer.copy else kept


def _correct(layer: _Layer, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """Forward hook at the SAM points: the plain layer plus every example's correction ``k_i G_i u'``."""
    layer.calls += 1
    if layer.step is None:
        raise Unsupported(f"{layer.name} runs at the SAM points but did not at w")
    z = _per_example(layer, output)
    return torch.addcmul(z, layer.step.correction(_per_example(layer, args[0]), z),
                         layer.k.reshape((-1,) + (1,) * (z.ndim - 1)))


def _probe(layer: _Layer, module: nn.Module, args: tuple, output: Any) -> Tensor:
    """Forward hook of the plan: :func:`_capture`, and the check of a Hugging Face normalisation's form."""
    z = _capture(layer, module, args, output)
    if layer.kind is _ElementwiseAffine:
        _check_elementwise(layer, args[0].detach(), layer.seen[-1].inputs)
    return z


def _unless_busy(hook: Callable[..., Any], layer: _Layer, module: nn.Module, args: tuple, output: Any) -> Any:
    """``hook``, except while the rules call the module themselves (:func:`_slope`): output left as it is."""
    return None if layer.busy else hook(layer, module, args, output)


@contextlib.contextmanager
def _hooked(layers: Sequence[_Layer], hook: Callable[..., Any], examples: int) -> Iterator[None]:
    for layer in layers:
        layer.calls, layer.examples, layer.seen = 0, examples, []
    handles = [layer.module.register_forward_hook(functools.partial(_unless_busy, hook, layer)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        if layer.calls > 1 and layer.kind in _CONVS:
            raise Unsupported(f"{layer.name} ({type(layer.module).__name__}) ran {layer.calls} times in one forward")


# ------------------------------------------------------------------------------------ the loss
def _loss_per_example(protocol: BatchProtocol) -> Callable[[Tensor, Tensor], Tensor]:
    """``(logits, target) -> loss`` of one example's batch: the ``loss_fn``, or the cross-entropy a Hugging
    Face model computes itself (:meth:`~landscape.batches.BatchProtocol.calibrated` found its label shift)."""
    if protocol.forward is not None and protocol.loss_fn is None:
        raise Unsupported("forward= with the model's own loss")
    if protocol.loss_fn is not None:
        return protocol.loss_fn
    if protocol.weight is not None or protocol.label_shift is None:
        raise Unsupported("the model computes a loss of its own that is not a plain cross-entropy")
    shift, ignore = protocol.label_shift, protocol.ignore_index

    def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
        if shift:
            logits, labels = logits[..., :-shift, :], labels[..., shift:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore)

    return cross_entropy


def _losses(protocol: BatchProtocol, loss: Callable[[Tensor, Tensor], Tensor], output: Any, batch: Any) -> Tensor:
    """Every example's mean loss ``(E,)`` (NaN for one without loss terms)."""
    logits, target = protocol.logits(_upcast(output)), protocol.target(batch)
    if target is None or target.ndim == 0 or logits.shape[0] != target.shape[0]:
        raise Unsupported("the output and the target do not share a leading dimension of examples")
    if protocol.loss_fn is None and not _is_class_index(target):
        raise Unsupported("the model's own loss on targets that are not class indices")
    try:
        return torch.vmap(lambda x, t: loss(x.unsqueeze(0), t.unsqueeze(0)))(logits, target)
    except (RuntimeError, NotImplementedError) as error:
        raise Unsupported(f"the loss cannot be taken per example ({error})") from error


# --------------------------------------------------------------------------------- the first step
def _tie(layers: Sequence[_Layer]) -> None:
    """Give every layer sharing a weight one list of the weight's gradient pieces (counted by the first)."""
    pieces: dict[str, list[_Gradient]] = {}
    for layer in layers:
        if layer.matrix_weight is None or not layer.step.weight:
            continue
        shared = pieces.get(layer.matrix_weight)
        if shared is None:
            pieces[layer.matrix_weight] = layer.step.weight
        else:
            shared.extend(layer.step.weight)
            layer.step.weight, layer.step.counts_weight = shared, False


@dataclass
class LayerRules:
    """The layer rules for one objective: its ruled layers and examples per call."""

    objective: Objective
    layers: list[_Layer]
    loss: Callable[[Tensor, Tensor], Tensor]
    examples_per_call: int
    elements_per_example: int = 0

    def sam_losses(self, batch: Any, alpha: float, rho: float) -> tuple[Tensor, Tensor]:
        """``(l_i(w), l_i(w + eps_i))`` for every example ``i`` of ``batch``, ``eps_i`` the SAM step of its own
        loss (module docstring); NaN for an example without loss terms."""
        objective, params = self.objective, self.objective.params
        for layer in self.layers:  # nothing left from a call that stopped with an error
            layer.step = layer.k = None
        while True:  # again where the model changed a layer's output in place (a ReLU(inplace=True)), on copies
            with torch.enable_grad(), _hooked(self.layers, _capture, batch_size(batch)):
                losses = _losses(objective.protocol, self.loss, objective.forward(params, batch), batch)
            ran = [layer for layer in self.layers if layer.seen]  # a layer that did not run has no gradient
            changed = [layer for layer in ran if any(c.output._version != c.output_version for c in layer.seen)]
            if not changed:
                break
            for layer in changed:  # a copied output is never changed again: at most one pass per layer
                layer.copy = True
        finite = torch.isfinite(losses.detach())
        total = torch.where(finite, losses, torch.zeros_like(losses)).sum()
        grads = iter(torch.autograd.grad(total, [c.output for layer in ran for c in layer.seen], allow_unused=True))
        everywhere = bool(finite.all())
        for layer in ran:
            for call in layer.seen:
                grad = next(grads)
                if call.inputs._version != call.version:
                    raise Unsupported(f"the input of {layer.name} is modified in place after the layer")
                if grad is None:
                    grad = torch.zeros_like(call.output)
                elif not everywhere:
                    grad = torch.where(finite.reshape((-1,) + (1,) * (grad.ndim - 1)), grad, torch.zeros_like(grad))
                step = _step_of(layer.kind)(layer, call.inputs, grad)
                if layer.step is None:
                    layer.step = step
                else:  # another call of the same layer: the gradient is the sum over its calls
                    layer.step.absorb(step)
            layer.seen = []  # the output gradients go as their steps are made
        grad = grads = None
        _tie(ran)
        norm2 = torch.zeros_like(losses.detach())
        for layer in ran:
            norm2 += layer.step.squared_norm()
        k = first_step_coefficient(norm2.clamp_min(0.0).sqrt(), alpha, rho)  # cross terms may round below 0
        for layer in ran:
            layer.k = k
        try:
            with torch.no_grad(), _hooked(self.layers, _correct, batch_size(batch)):
                perturbed = _losses(objective.protocol, self.loss, objective.forward(params, batch), batch)
        finally:
            for layer in self.layers:
                layer.step = layer.k = None
        return losses.detach(), perturbed


def layer_rules(objective: Objective, first: Any, examples_per_call: int, element_budget: int) -> LayerRules:
    """The rules for ``objective``, planned on the first example of ``first`` (a batch): the ruled layers, and
    examples per call at most ``examples_per_call`` with at most ``element_budget`` kept values per call.

    Raises:
        Unsupported: the model or its loss is outside the rules (module docstring).
    """
    layers = _layers(objective)
    loss = _loss_per_example(objective.protocol)
    one = take(first, slice(0, 1))
    with torch.no_grad(), _hooked(layers, _probe, 1):
        _losses(objective.protocol, loss, objective.forward(objective.params, one), one)
    ran = [layer for layer in layers if layer.seen]
    uses = collections.Counter()  # the uses of every matrix weight: its layers' calls
    for layer in ran:
        uses[layer.matrix_weight] += len(layer.seen)
    per_example = sum(layer.elements_per_example(call.inputs, call.output, uses[layer.matrix_weight])
                      for layer in ran for call in layer.seen)
    for layer in ran:
        layer.seen = []
    count = max(1, min(examples_per_call, element_budget // max(per_example, 1)))
    return LayerRules(objective, layers, loss, count, per_example)
