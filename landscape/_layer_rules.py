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

* ``Linear`` (positions: every index between the batch and the features), ``Conv1d``/``Conv2d`` (the
  unfolded patches; zero padding, one group): ``G = D^T U``, bias gradient ``sum_q d_q``;
* ``Embedding``: ``u_q`` is one-hot, so ``u_q . u_r = [t_q = t_r]`` for the token ids ``t`` (rows at
  ``padding_idx`` get no gradient, as in PyTorch);
* ``BatchNorm`` (eval, running statistics), ``LayerNorm``, ``GroupNorm``, ``RMSNorm``: ``z = gamma * xhat +
  beta`` with ``xhat`` the normalised input, so ``dgamma_i = sum d_i * xhat_i`` and ``dbeta_i = sum d_i``,
  small enough to materialise.

Anything else (a parameter of another module, one module called twice, tied weights, a loss that cannot be
taken per example) raises :class:`Unsupported`, and :func:`landscape.sharpness.m_sharpness` uses vmap.
References: Goodfellow, "Efficient per-example gradient computations", 2015; Li et al., "Large language
models can be strong differentially private learners", ICLR 2022; Bu et al., "Scalable and efficient
training of large convolutional neural networks with differential privacy", NeurIPS 2022.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import BatchProtocol, _is_class_index, batch_size, take
from .objective import Objective, _upcast

__all__ = ["LayerRules", "Unsupported", "first_step_coefficient", "layer_rules"]

_TINY = 1e-12
_SLAB_VALUES = 2**19
_AFFINE = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_RULED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding) + _AFFINE


class Unsupported(Exception):
    """The model or its loss is outside the layer rules; the message says what (the caller uses vmap)."""


def first_step_coefficient(norm: Tensor, alpha: float, rho: float) -> Tensor:
    """``k`` of the first projected step from ``u = 0`` along ``g`` with ``||g||_2 = norm``: ``Proj(alpha g /
    ||g||) = k g`` with ``k = min(alpha, rho) / ||g||`` (``||g||`` clamped at ``1e-12``, so that ``k g = 0`` where
    ``g = 0``)."""
    coefficient = alpha / norm.clamp_min(_TINY)
    return coefficient * (rho / (coefficient * norm).clamp_min(_TINY)).clamp(max=1.0)


# ------------------------------------------------------------------------- what a layer computes
def _rule_class(module: nn.Module) -> type[nn.Module] | None:
    """The ruled class ``module`` computes as (itself or a subclass that keeps its ``forward``), or ``None``."""
    for cls in type(module).__mro__:
        if cls in _RULED:
            return cls if type(module).forward is cls.forward else None
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


def _inputs(module: nn.Module, a: Tensor) -> Tensor:
    """A dense layer's input as the operand of its product: columns ``(E, d_in, P)`` for a convolution (its
    patches in the order of the flattened kernel: ``F.unfold``'s result, built from strided windows of the
    zero-padded input in one copy, 1.8-11x faster than ``F.unfold`` on the CPU), rows ``(E, P, d_in)`` for a
    ``Linear`` layer."""
    if isinstance(module, nn.Linear):
        return a.reshape(a.shape[0], -1, a.shape[-1])
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


def _dense_sizes(module: nn.Module, a: Tensor, z: Tensor) -> tuple[int, int, int]:
    """``(d_in, P, d_out)`` of a ``Linear`` layer or a convolution, from its input and its output (or the
    output's gradient)."""
    if isinstance(module, nn.Linear):
        return a.shape[-1], z[0, ..., 0].numel(), z.shape[-1]
    return a.shape[1] * math.prod(module.kernel_size), z[0, 0].numel(), z.shape[1]


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
        yield examples, _inputs(module, a[examples])


def _channels_first(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))


def _affine_rows(module: nn.Module, x: Tensor) -> Tensor:
    """A normalisation's input or output as rows ``(E, R, C)``, ``C`` the size of its affine parameters."""
    if _channels_first(module):
        return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])
    return x.reshape(x.shape[0], -1, math.prod(module.normalized_shape))


def _from_affine_rows(module: nn.Module, rows: Tensor, like: Tensor) -> Tensor:
    if _channels_first(module):
        return rows.reshape((like.shape[0],) + like.shape[2:] + (like.shape[1],)).movedim(-1, 1)
    return rows.reshape(like.shape)


def _normalised(module: nn.Module, a: Tensor) -> Tensor:
    """``xhat``: the normalisation of ``a`` before its affine map (BatchNorm with its running statistics)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None or module.running_var is None:
            raise Unsupported(f"{type(module).__name__} normalises with batch statistics (train mode, or no running "
                              "statistics): examples are not independent")
        return F.batch_norm(a, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(a, module.num_groups, None, None, module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps)
    return F.rms_norm(a, module.normalized_shape, None, module.eps)


# --------------------------------------------------------------------- one layer's first step
@dataclass
class _Dense:
    """A ``Linear`` layer or a convolution: its per-example gradient ``G = D^T U`` kept as ``(X, D)`` (ghost) or
    ``G``, and its bias gradient ``b = sum_q d_q``.

    A convolution works on columns (``X`` and ``D`` shaped ``(E, d, P)``: ``F.unfold``'s layout and the
    output's), a ``Linear`` layer on rows (``(E, P, d)``), so that every product reads its operands in place
    and writes the output's layout."""

    module: nn.Module
    ghost: bool = False
    X: Tensor | None = None
    D: Tensor | None = None
    G: Tensor | None = None
    b: Tensor | None = None

    @property
    def cols(self) -> bool:
        """Whether the layer is a convolution (columns) rather than a ``Linear`` layer (rows)."""
        return not isinstance(self.module, nn.Linear)

    @classmethod
    def of(cls, module: nn.Module, selected: set[str], a: Tensor, z_grad: Tensor) -> _Dense:
        step = cls(module)
        cols = step.cols
        D = z_grad.flatten(2) if cols else z_grad.reshape(z_grad.shape[0], -1, z_grad.shape[-1])
        if "bias" in selected:
            step.b = D.sum(2 if cols else 1)
        if "weight" in selected:
            d_in, P, d_out = _dense_sizes(module, a, z_grad)
            step.ghost = _ghost(d_in, P, d_out)
            if step.ghost:
                step.X, step.D = _inputs(module, a), D
            elif cols:
                step.G = D.new_empty(D.shape[0], d_out, d_in)
                for examples, X in _slabs(module, a, d_in * P):
                    torch.bmm(D[examples], X.mT, out=step.G[examples])
            else:
                step.G = D.mT @ _inputs(module, a)
        return step

    def _gram(self, t: Tensor) -> Tensor:
        """``(E, P, P)``: the inner products of every two positions' vectors."""
        return t.mT @ t if self.cols else t @ t.mT

    def squared_norm(self) -> Tensor:
        total = 0
        if self.b is not None:
            total = torch.linalg.vector_norm(self.b, dim=1).square()
        if self.ghost:
            total = total + (self._gram(self.X) * self._gram(self.D)).sum((1, 2))
        elif self.G is not None:
            total = total + torch.linalg.vector_norm(self.G, dim=(1, 2)).square()
        return total

    def correction(self, a: Tensor, z: Tensor) -> Tensor:
        """``G u'_q + b`` at every output position, in ``z``'s shape."""
        out = None
        if self.ghost:
            X = _inputs(self.module, a)
            out = self.D @ (self.X.mT @ X) if self.cols else (X @ self.X.mT) @ self.D
        elif self.G is not None and self.cols:
            out = self.G.new_empty(z.shape[0], z.shape[1], z[0, 0].numel())
            for examples, X in _slabs(self.module, a, self.G.shape[2] * out.shape[2]):
                torch.bmm(self.G[examples], X, out=out[examples])
        elif self.G is not None:
            out = _inputs(self.module, a) @ self.G.mT
        if self.b is not None:
            bias = self.b[:, :, None] if self.cols else self.b[:, None, :]
            out = bias if out is None else out + bias
        if self.cols:
            return out.expand(z.shape[0], z.shape[1], z[0, 0].numel()).reshape(z.shape)
        return out.expand(z.shape[0], z[0, ..., 0].numel(), z.shape[-1]).reshape(z.shape)


@dataclass
class _Embedding:
    """``Embedding``: the rows of ``G_i`` are sums of ``d_iq`` over the positions holding the same token."""

    ids: Tensor
    D: Tensor

    @classmethod
    def of(cls, module: nn.Module, selected: set[str], a: Tensor, z_grad: Tensor) -> _Embedding:
        ids = a.reshape(a.shape[0], -1)
        D = z_grad.reshape(ids.shape + (z_grad.shape[-1],))
        if module.padding_idx is not None:
            D = D.masked_fill((ids == module.padding_idx)[..., None], 0.0)
        return cls(ids, D)

    def squared_norm(self) -> Tensor:
        same = (self.ids[:, :, None] == self.ids[:, None, :]).to(self.D.dtype)
        return (same * (self.D @ self.D.transpose(1, 2))).sum((1, 2))

    def correction(self, a: Tensor, z: Tensor) -> Tensor:
        """``G u'_q``: the sum of ``d_r`` over the positions ``r`` whose token is the one at ``q``."""
        same = (a.reshape(a.shape[0], -1)[:, :, None] == self.ids[:, None, :]).to(self.D.dtype)
        return (same @ self.D).reshape(z.shape)


@dataclass
class _Affine:
    """A normalisation ``z = gamma * xhat + beta``: ``dgamma_i = sum d_i * xhat_i``, ``dbeta_i = sum d_i``."""

    module: nn.Module
    gamma: Tensor | None
    beta: Tensor | None

    @classmethod
    def of(cls, module: nn.Module, selected: set[str], xhat: Tensor, z_grad: Tensor) -> _Affine:
        """``xhat``: the normalised input, as :func:`_capture` keeps it (with the objective's buffers)."""
        D = _affine_rows(module, z_grad)
        gamma = (D * _affine_rows(module, xhat)).sum(1) if "weight" in selected else None
        beta = D.sum(1) if "bias" in selected else None
        return cls(module, gamma, beta)

    def squared_norm(self) -> Tensor:
        return sum(torch.linalg.vector_norm(t, dim=1).square() for t in (self.gamma, self.beta) if t is not None)

    def correction(self, a: Tensor, z: Tensor) -> Tensor:
        """``dgamma * xhat' + dbeta``."""
        rows = 0
        if self.gamma is not None:
            rows = _affine_rows(self.module, _normalised(self.module, a)) * self.gamma[:, None, :]
        if self.beta is not None:
            rows = rows + self.beta[:, None, :]
        rows = rows.expand(_affine_rows(self.module, z).shape)
        return _from_affine_rows(self.module, rows, z)


_Step = _Dense | _Embedding | _Affine


def _step_of(module: nn.Module) -> Callable[..., _Step]:
    if isinstance(module, nn.Embedding):
        return _Embedding.of
    if isinstance(module, _AFFINE):
        return _Affine.of
    return _Dense.of


# ----------------------------------------------------------------------------------- the model
@dataclass
class _Layer:
    """A module owning analysed parameters, and what the last forward showed it."""

    name: str
    module: nn.Module
    selected: set[str]  # its analysed parameters' local names ("weight", "bias")
    examples: int = 0  # E, the examples of the forward under way
    calls: int = 0
    inputs: Tensor | None = None
    version: int = 0
    output: Tensor | None = None  # the output whose gradient is read (a leaf if nothing before it needs one)
    output_version: int = 0
    copy: bool = False  # hand the model a copy of the output (it changes the output in place)
    step: _Step | None = None
    k: Tensor | None = None  # the step coefficient of every example

    def elements_per_example(self, a: Tensor, z: Tensor) -> int:
        """What the rules keep per example for this layer: its input and output, the unfolded input, and ``G``
        or the ghost norm's operands and Gram matrix (a plan for the memory of a call)."""
        if isinstance(self.module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and "weight" in self.selected:
            d_in, P, d_out = _dense_sizes(self.module, a, z)
            kept = P * (d_in + d_out + 3 * P) if _ghost(d_in, P, d_out) else d_in * d_out  # up to 3 Gram matrices
            return kept + P * d_in + a[0].numel() + z[0].numel()
        if isinstance(self.module, nn.Embedding):
            T = a[0].numel()
            return 3 * T * T + 2 * z[0].numel()
        return 2 * (a[0].numel() + z[0].numel())


def _layers(objective: Objective) -> list[_Layer]:
    """The modules owning the analysed parameters, every one of them ruled; else :class:`Unsupported`."""
    model = objective.model
    if objective.train_mode:
        raise Unsupported("the objective evaluates in train mode")
    if any(isinstance(module, torch._dynamo.eval_frame.OptimizedModule) for module in model.modules()):
        raise Unsupported("a torch.compile'd module")
    wanted = set(objective.params)
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen and (name in wanted or seen[id(p)] in wanted):
            raise Unsupported(f"parameters {seen[id(p)]!r} and {name!r} are tied")
        seen.setdefault(id(p), name)
    layers = []
    for name, module in model.named_modules():
        own = {local for local, _ in module.named_parameters(recurse=False)
               if (f"{name}.{local}" if name else local) in wanted}
        if not own:
            continue
        if _rule_class(module) is None or not own <= {"weight", "bias"}:
            names = sorted(f"{name}.{local}" if name else local for local in own)
            raise Unsupported(f"no rule covers {names} of {name or 'the model'} ({type(module).__name__})")
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            if module.groups != 1 or module.padding_mode != "zeros":
                raise Unsupported(f"{name} ({type(module).__name__}) with groups={module.groups}, "
                                  f"padding_mode={module.padding_mode!r}")
            _conv_padding(module)
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
            raise Unsupported(f"{name} (Embedding) with max_norm or scale_grad_by_freq")
        layers.append(_Layer(name, module, own))
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
    if isinstance(module, _AFFINE):  # read the statistics now: the objective's buffers are in place only here
        with torch.no_grad():
            layer.inputs = _per_example(layer, _normalised(module, a))
    else:
        layer.inputs = _per_example(layer, a.detach())
    layer.version = layer.inputs._version
    shared = output.shape[0] != layer.examples
    z = _per_example(layer, output)
    if shared and output.requires_grad:
        raise Unsupported(f"{layer.name} is shared by every example but depends on earlier parameters")
    leaf = shared or not z.requires_grad
    layer.output = z.detach().requires_grad_() if leaf else z
    layer.output_version = layer.output._version
    return layer.output.clone() if leaf or layer.copy else layer.output


def _correct(layer: _Layer, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """Forward hook at the SAM points: the plain layer plus every example's correction ``k_i G_i u'``."""
    layer.calls += 1
    z = _per_example(layer, output)
    return torch.addcmul(z, layer.step.correction(_per_example(layer, args[0]), z),
                         layer.k.reshape((-1,) + (1,) * (z.ndim - 1)))


@contextlib.contextmanager
def _hooked(layers: Sequence[_Layer], hook: Callable[..., Any], examples: int) -> Iterator[None]:
    for layer in layers:
        layer.calls, layer.examples = 0, examples
    handles = [layer.module.register_forward_hook(functools.partial(hook, layer)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        if layer.calls != 1:
            raise Unsupported(f"{layer.name} ran {layer.calls} times in one forward")


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
        while True:  # again where the model changed a layer's output in place (a ReLU(inplace=True)), on copies
            with torch.enable_grad(), _hooked(self.layers, _capture, batch_size(batch)):
                losses = _losses(objective.protocol, self.loss, objective.forward(params, batch), batch)
            changed = [layer for layer in self.layers if layer.output._version != layer.output_version]
            if not changed:
                break
            for layer in changed:  # a copied output is never changed again: at most one pass per layer
                layer.copy = True
        finite = torch.isfinite(losses.detach())
        total = torch.where(finite, losses, torch.zeros_like(losses)).sum()
        grads = torch.autograd.grad(total, [layer.output for layer in self.layers], allow_unused=True)
        everywhere = bool(finite.all())
        norm2 = torch.zeros_like(losses.detach())
        for layer, grad in zip(self.layers, grads):
            if layer.inputs._version != layer.version:
                raise Unsupported(f"the input of {layer.name} is modified in place after the layer")
            if grad is None:
                grad = torch.zeros_like(layer.output)
            elif not everywhere:
                grad = torch.where(finite.reshape((-1,) + (1,) * (grad.ndim - 1)), grad, torch.zeros_like(grad))
            layer.step = _step_of(layer.module)(layer.module, layer.selected, layer.inputs, grad)
            layer.inputs = layer.output = None
            norm2 += layer.step.squared_norm()
        k = first_step_coefficient(norm2.sqrt(), alpha, rho)
        for layer in self.layers:
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
    with torch.no_grad(), _hooked(layers, _capture, 1):
        _losses(objective.protocol, loss, objective.forward(objective.params, one), one)
    per_example = sum(layer.elements_per_example(layer.inputs, layer.output) for layer in layers)
    for layer in layers:
        layer.inputs = layer.output = None
    count = max(1, min(examples_per_call, element_budget // max(per_example, 1)))
    return LayerRules(objective, layers, loss, count, per_example)
