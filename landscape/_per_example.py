"""Per-example weight gradients of convolutions as batched matrix products, for vmapped chunk gradients.

Under ``torch.vmap`` over chunks of examples, ``grad`` of a convolution's weight comes out of PyTorch's
batching rule as a grouped convolution with one group per chunk, which the CPU kernels (mkldnn) run far
below their speed on a plain batch: for the digits CNN's 64 -> 64 channel layer on 4 x 4 maps, 128 per-example
weight gradients took 26 ms that way against 8 ms as below (``benchmarks/RESULTS.md``, Sharpness). The same
gradient is, per chunk,

.. math::

    \\frac{\\partial L}{\\partial W_{o,k}} = \\sum_{n \\in \\text{chunk}} \\sum_{l}
        \\frac{\\partial L}{\\partial y_{n,o,l}} \\, \\operatorname{unfold}(x)_{n,k,l},

an ``unfold`` (im2col) of the input and one matrix product, which vmap turns into one batched matrix
product (Opacus computes per-sample convolution gradients the same way; Yousefpour et al. 2021, Sec. 3).

:class:`PerExampleConvolutions` routes ``conv1d`` and ``conv2d`` (``groups=1``, numeric padding) through
:class:`_Convolution`, whose forward is the native convolution (the same numbers), whose input gradient is
the native ``convolution_backward`` and whose weight gradient is the product above: the same gradient up to
float rounding. Other convolutions pass through untouched. First derivatives only: the mode is for the
per-chunk gradients of :mod:`landscape.sharpness`, never for Hessian-vector products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PerExampleConvolutions"]

_CONVOLUTIONS: dict[Callable[..., Tensor], int] = {F.conv1d: 1, F.conv2d: 2}
_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _pair(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


class _Convolution(torch.autograd.Function):
    """``conv{1,2}d(x, w, b)`` (``groups=1``) with the weight gradient from ``unfold`` and ``einsum``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None, stride: tuple[int, ...], padding: tuple[int, ...],
                dilation: tuple[int, ...]) -> Tensor:
        conv = F.conv2d if w.ndim == 4 else F.conv1d
        return conv(x, w, b, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, w, b, stride, padding, dilation = inputs
        ctx.save_for_backward(x, w)
        ctx.settings = (stride, padding, dilation, b is not None)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.settings
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, w, None, list(stride), list(padding), list(dilation), False, [0] * len(stride), 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_gradient(grad_out, x, w, stride, padding, dilation)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=[0, *range(2, grad_out.ndim)])
        return grad_x, grad_w, grad_b, None, None, None


def _weight_gradient(grad_out: Tensor, x: Tensor, w: Tensor, stride: tuple[int, ...], padding: tuple[int, ...],
                     dilation: tuple[int, ...]) -> Tensor:
    """``sum_n sum_l grad_out[n, o, l] * unfold(x)[n, k, l]``, shaped like ``w``."""
    shape = w.shape
    if w.ndim == 3:  # conv1d as conv2d over a height of one
        x, w, grad_out = x.unsqueeze(2), w.unsqueeze(2), grad_out.unsqueeze(2)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    columns = F.unfold(x, w.shape[2:], dilation=dilation, padding=padding, stride=stride)  # [n, C*kh*kw, L]
    flat = grad_out.reshape(grad_out.shape[0], grad_out.shape[1], -1)  # [n, O, L]
    return torch.einsum("nol,nkl->ok", flat, columns).reshape(shape)


class PerExampleConvolutions(torch.overrides.TorchFunctionMode):
    """While active, ``conv1d``/``conv2d`` with ``groups=1`` and numeric padding take :class:`_Convolution`.

    Example:
        >>> conv = torch.nn.Conv2d(2, 3, 3)
        >>> x = torch.randn(4, 1, 2, 5, 5)  # 4 chunks of 1 example
        >>> params = dict(conv.named_parameters())
        >>> def loss(p, chunk):
        ...     return torch.func.functional_call(conv, p, (chunk,)).square().mean()
        >>> per_example = torch.vmap(torch.func.grad(loss), in_dims=(None, 0))
        >>> with PerExampleConvolutions():
        ...     fast = per_example(params, x)
        >>> torch.allclose(fast["weight"], per_example(params, x)["weight"], atol=1e-6)
        True
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        dims = _CONVOLUTIONS.get(func)
        if dims is not None:
            bound = dict(zip(_NAMES, args))
            bound.update(kwargs)
            padding = bound.get("padding", 0)
            weight = bound.get("weight")
            if bound.get("groups", 1) == 1 and not isinstance(padding, str) and isinstance(weight, Tensor) \
                    and weight.ndim == dims + 2:
                return _Convolution.apply(bound["input"], weight, bound.get("bias"), _pair(bound.get("stride", 1), dims),
                                          _pair(padding, dims), _pair(bound.get("dilation", 1), dims))
        return func(*args, **kwargs)
