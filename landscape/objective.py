"""The analysed objective: a fixed model on a fixed dataset, as a function of a parameter dict.

.. math::

    L(w) = \\frac{1}{N} \\sum_{b} n_b\\, \\ell_b(w),\\qquad \\ell_b = \\text{mean loss of batch } b,

summed over every batch weighted by its size (never a plain mean of batch means). The model runs in
eval mode (BatchNorm uses its running statistics, dropout is off), the data are moved to the device once
and used in a fixed order, and buffers are never perturbed. Every quantity goes through
``torch.func.functional_call`` on a parameter dict, so the user's module is never left modified: its
train/eval flags are restored after each call and its buffers are copied.

A determinism check (two evaluations of the first batch must agree, the buffers must not change, and a
DataLoader must yield the same data twice) raises :class:`NondeterministicObjective` naming the cause:
train-mode BatchNorm, dropout, shuffling or augmentation.

Data-parallel over processes (``distributed=True`` under ``torchrun``): each process holds a shard of
the data (e.g. its :func:`landscape.distributed.shard`), the weights ``n_b / N`` use the global ``N``, and every
quantity is the process's partial sum reduced with one ``all_reduce``: one Hessian-vector product is one
collective, and every process gets the same result (so Lanczos runs in lockstep on all of them).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from . import distributed as _distributed
from .linop import LinearOperator

__all__ = [
    "Data",
    "Objective",
    "HessianOperator",
    "NondeterministicObjective",
    "ParamLayout",
    "as_batches",
    "evaluation_objective",
]

Data = Union[torch.utils.data.DataLoader, tuple[Tensor, Tensor], list[tuple[Tensor, Tensor]]]
LossFn = Callable[[Tensor, Tensor], Tensor]
Params = dict[str, Tensor]

HVP_METHODS = ("auto", "jvp", "double_backward", "graph")


class NondeterministicObjective(RuntimeError):
    """Two evaluations of the objective disagreed; the message names the likely cause."""


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and sizes of a parameter dict, to move between dicts and flat vectors."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> ParamLayout:
        return cls(tuple(params), tuple(t.shape for t in params.values()))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``tensors`` (in this layout's order) into one flat vector."""
        return torch.cat([tensors[name].reshape(-1) for name in self.names])

    def unflatten(self, flat: Tensor) -> Params:
        """Views of ``flat`` shaped like the parameters."""
        if flat.ndim != 1 or flat.shape[0] != self.size:
            raise ValueError(f"expected a flat vector of length {self.size}; got shape {tuple(flat.shape)}")
        chunks = torch.split(flat, self.numels)
        return {name: chunk.view(shape) for name, chunk, shape in zip(self.names, chunks, self.shapes)}


def as_batches(
    data: Data, *, device: torch.device, dtype: torch.dtype | None = None, batch_size: int | None = None
) -> list[tuple[Tensor, Tensor]]:
    """The dataset as a list of ``(x, y)`` batches on ``device``, materialised once.

    ``data`` may be a DataLoader (iterated once, in its order), an ``(X, y)`` tuple of tensors (cut
    into batches of ``batch_size``, default 2048) or a list of ``(x, y)`` batches. Floating inputs are
    cast to ``dtype`` when given.
    """
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"(X, y) must have the same number of examples; got {x.shape[0]} and {y.shape[0]}")
        size = batch_size or 2048
        batches: Iterable[Any] = [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]
    elif isinstance(data, (torch.utils.data.DataLoader, list)):
        batches = data
    else:
        raise TypeError(
            "data must be a DataLoader, an (X, y) tuple of tensors or a list of (x, y) batches; "
            f"got {type(data).__name__}"
        )
    out = []
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"batch {i} must be an (x, y) pair; got {type(batch).__name__}")
        x, y = batch
        x = x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else x.dtype)
        out.append((x, y.to(device)))
    if not out:
        raise ValueError("data holds no batches")
    return out


@contextlib.contextmanager
def _training_flags(model: nn.Module, training: bool) -> Iterator[None]:
    """Set every submodule's train/eval flag for the duration, then restore each one as it was."""
    saved = [(m, m.training) for m in model.modules()]
    for m, _ in saved:
        m.training = training
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


class Objective:
    """``L(w)`` of a model on a dataset, with its gradient and exact Hessian-vector products.

    Args:
        model: the network. Its parameters at construction are the default point ``w``.
        loss_fn: mean-reduced loss ``loss_fn(output, y)``, e.g. ``torch.nn.functional.cross_entropy``.
        data: DataLoader, ``(X, y)`` tuple or list of ``(x, y)`` batches (every example used once).
        device: where to evaluate; default: the model's device.
        dtype: floating dtype of parameters, buffers and inputs (e.g. ``torch.float64`` for reference
            computations); default: the model's.
        batch_size: batch size when ``data`` is an ``(X, y)`` tuple.
        train_mode: evaluate in train mode (BatchNorm batch statistics, dropout on). Off by default;
            the determinism check then reports why the objective is not a fixed function.
        hvp_method: ``"jvp"`` (forward-over-reverse), ``"double_backward"`` (reverse-over-reverse),
            ``"graph"`` (reverse-over-reverse keeping every batch's gradient graph between products: one
            backward pass per product, memory growing with the dataset) or ``"auto"``: ``"graph"`` when
            the data are one batch, else whichever of the first two is faster on the first batch.
        check: run the determinism check at construction.
        distributed: ``data`` is this process's shard of the dataset; losses, gradients and
            Hessian-vector products are summed over the processes of the default group (one
            ``all_reduce`` each). Every process must construct the objective and call the same methods
            in the same order.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int | None = None,
        train_mode: bool = False,
        hvp_method: str = "auto",
        check: bool = True,
        distributed: bool = False,
    ) -> None:
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"unknown hvp_method {hvp_method!r}; choose one of {HVP_METHODS}")
        first = next(iter(model.parameters()), None)
        if first is None:
            raise ValueError("the model has no parameters to analyse")
        self.model = model
        self.loss_fn = loss_fn
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self.train_mode = train_mode
        self.params: Params = {
            name: p.detach().to(self.device, self.dtype) for name, p in model.named_parameters() if p.requires_grad
        }
        self.frozen: Params = {  # parameters with requires_grad=False: fixed, like buffers
            name: p.detach().to(self.device, self.dtype) for name, p in model.named_parameters() if not p.requires_grad
        }
        self.buffers: Params = {
            name: b.detach().to(self.device, self.dtype if b.is_floating_point() else b.dtype).clone()
            for name, b in model.named_buffers()
        }
        self.layout = ParamLayout.of(self.params)
        self.distributed = bool(distributed) and _distributed.active()
        self.batches = as_batches(data, device=self.device, dtype=self.dtype, batch_size=batch_size)
        self.n_local = sum(int(x.shape[0]) for x, _ in self.batches)
        count = torch.tensor([self.n_local], dtype=torch.float64, device=self.device)
        self._reduce([count])
        self.n_examples = int(count.item())
        self._data_source = data
        self._graph: tuple[Params, Params, list[Tensor]] | None = None  # (params, leaves, weighted gradient)
        if check:
            self.check_determinism()
        if hvp_method == "auto":
            hvp_method = "graph" if len(self.batches) == 1 else self._choose_hvp_method()
        # Rank 0's choice for everyone: the processes must take the same products, in lockstep.
        self.hvp_method = _distributed.broadcast_object(hvp_method) if self.distributed else hvp_method

    def _reduce(self, tensors: list[Tensor]) -> None:
        """Sum per-process partial results over the processes, in place, in one collective."""
        if self.distributed:
            _distributed.all_reduce_sum_(tensors)

    # -- pure pieces over a parameter dict ----------------------------------------------------------

    def forward(self, params: Params, x: Tensor, buffers: Params | None = None) -> Tensor:
        """The model's output at ``params`` (the objective's fixed buffers, or ``buffers`` when given)."""
        with _training_flags(self.model, self.train_mode):
            return functional_call(self.model, (params, self.frozen, self.buffers if buffers is None else buffers), (x,),
                                   strict=True)

    def batch_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self.forward(params, x), y)

    def _weights(self) -> Iterator[tuple[float, Tensor, Tensor]]:
        for x, y in self.batches:
            yield x.shape[0] / self.n_examples, x, y

    @torch.no_grad()
    def loss(self, params: Params | None = None) -> Tensor:
        """``L(w)`` as a 0-dim tensor (accumulated in float64)."""
        params = self.params if params is None else params
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for weight, x, y in self._weights():
            total += weight * self.batch_loss(params, x, y).double()
        self._reduce([total])
        return total

    @torch.no_grad()
    def loss_and_accuracy(self, params: Params | None = None, buffers: Params | None = None) -> tuple[float, float]:
        """``(L(w), accuracy)``; accuracy counts ``argmax(output) == y`` (classification). ``buffers``
        replaces the objective's buffers for this evaluation (e.g. interpolated BatchNorm statistics)."""
        params = self.params if params is None else params
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # [loss, number correct]
        for weight, x, y in self._weights():
            out = self.forward(params, x, buffers)
            out = out.to(torch.promote_types(out.dtype, torch.float32))  # a bf16/fp16 autocast output
            sums[0] += weight * self.loss_fn(out, y).double()
            if out.ndim == 2 and not y.is_floating_point():
                sums[1] += (out.argmax(dim=1) == y).sum()
        self._reduce([sums])
        return float(sums[0]), float(sums[1]) / self.n_examples

    def gradient(self, params: Params | None = None) -> Params:
        """``grad L(w)`` as a parameter dict, accumulated over the whole dataset."""
        params = self.params if params is None else params
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        batch_grad = grad(self.batch_loss)
        for weight, x, y in self._weights():
            g = batch_grad(params, x, y)
            torch._foreach_add_(list(total.values()), [g[k] for k in total], alpha=weight)
        self._reduce(list(total.values()))
        return total

    def hvp(self, v: Params, params: Params | None = None, method: str | None = None) -> Params:
        """Exact Hessian-vector product ``H(w) v`` over the whole dataset, as a parameter dict."""
        params = self.params if params is None else params
        method = method or self.hvp_method
        if method == "graph":
            return self._graph_hvp(v, params)
        batch_hvp = _HVP[method]
        total = {k: torch.zeros_like(t) for k, t in params.items()}
        for weight, x, y in self._weights():
            hv = batch_hvp(self.batch_loss, params, v, x, y)
            torch._foreach_add_(list(total.values()), [hv[k] for k in total], alpha=weight)
        self._reduce(list(total.values()))
        return total

    def _graph_hvp(self, v: Params, params: Params) -> Params:
        """``H v`` by one backward pass through the kept graph of ``g(w) = sum_b (n_b / N) grad l_b(w)``.

        The graph is built once per parameter dict (a forward and a ``create_graph`` backward per batch)
        and reused by every later product at the same ``params``.
        """
        if self._graph is None or self._graph[0] is not params:
            with torch.enable_grad():
                leaves = {k: t.detach().requires_grad_(True) for k, t in params.items()}
                total: list[Tensor] | None = None
                for weight, x, y in self._weights():
                    g = torch.autograd.grad(self.batch_loss(leaves, x, y), list(leaves.values()), create_graph=True)
                    total = [weight * t for t in g] if total is None else [a + weight * t for a, t in zip(total, g)]
            self._graph = (params, leaves, total)
        _, leaves, gradient = self._graph
        with torch.enable_grad():
            products = list(torch.autograd.grad(gradient, list(leaves.values()), grad_outputs=[v[k] for k in leaves],
                                                retain_graph=True))
        self._reduce(products)
        return dict(zip(leaves, products))

    def hessian_operator(self, params: Params | None = None) -> HessianOperator:
        """The Hessian at ``params`` (default ``w``) as a :class:`LinearOperator` on flat vectors."""
        return HessianOperator(self, self.params if params is None else params)

    # -- checks -------------------------------------------------------------------------------------

    def check_determinism(self) -> None:
        """Evaluate the first batch twice and re-read a DataLoader; raise naming the cause if they differ.

        Raises:
            NondeterministicObjective: the loss changed between evaluations (dropout, a random layer),
                the buffers changed (train-mode BatchNorm updating running statistics), or the data loader
                yielded different data (shuffling, augmentation).
        """
        causes = []
        if isinstance(self._data_source, torch.utils.data.DataLoader):
            again = as_batches(self._data_source, device=self.device, dtype=self.dtype)
            same = len(again) == len(self.batches) and all(
                torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, self.batches)
            )
            if not same:
                causes.append(
                    "the DataLoader yields different data on two passes (shuffle=True or random augmentation); "
                    "pass an unshuffled loader without augmentation, or an (X, y) tuple"
                )
        x, y = self.batches[0]
        before = {k: b.clone() for k, b in self.buffers.items()}
        with torch.no_grad():
            first = self.batch_loss(self.params, x, y)
            second = self.batch_loss(self.params, x, y)
        if any(not torch.equal(before[k], b) for k, b in self.buffers.items()):
            self.buffers = before
            causes.append(self._mode_cause("BatchNorm in train mode updates its running statistics"))
        tolerance = 1e-12 if self.dtype == torch.float64 else 1e-5
        if not torch.allclose(first, second, rtol=tolerance, atol=tolerance):
            causes.append(self._mode_cause("two evaluations of the loss differ (dropout or another random layer)"))
        if causes:
            raise NondeterministicObjective("the objective is not a fixed function of the weights: " + "; ".join(causes))

    def _mode_cause(self, what: str) -> str:
        kinds = {type(m).__name__ for m in self.model.modules()
                 if isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase))}
        where = f" (the model has {', '.join(sorted(kinds))})" if kinds else ""
        hint = "; evaluate in eval mode (train_mode=False)" if self.train_mode else ""
        return what + where + hint

    def _choose_hvp_method(self) -> str:
        """Time both exact HVPs on (up to 256 examples of) the first batch after a warm-up; keep the faster."""
        x, y = self.batches[0]
        x, y = x[:256], y[:256]
        v = {k: torch.randn_like(t) for k, t in self.params.items()}
        timings = {}
        for method in ("jvp", "double_backward"):
            try:
                _HVP[method](self.batch_loss, self.params, v, x, y)
            except (RuntimeError, NotImplementedError):  # an op without forward-mode AD
                continue
            _synchronize(self.device)
            start = time.perf_counter()
            for _ in range(2):
                _HVP[method](self.batch_loss, self.params, v, x, y)
            _synchronize(self.device)
            timings[method] = time.perf_counter() - start
        if not timings:
            raise RuntimeError("neither forward-over-reverse nor double-backward HVPs work for this model")
        return min(timings, key=timings.get)


def evaluation_objective(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> Objective:
    """An :class:`Objective` for losses and gradients (surfaces, sharpness): its HVP method is fixed to
    double backward instead of being timed at construction, since these analyses need no HVPs."""
    return Objective(model, loss_fn, data, dtype=dtype, device=device, batch_size=batch_size, hvp_method="double_backward")


def _hvp_jvp(f: Callable[..., Tensor], params: Params, v: Params, x: Tensor, y: Tensor) -> Params:
    """Forward-over-reverse: ``d/dt grad f(w + t v)`` at ``t = 0`` (Pearlmutter 1994)."""
    return jvp(lambda p: grad(f)(p, x, y), (params,), (v,))[1]


def _hvp_double_backward(f: Callable[..., Tensor], params: Params, v: Params, x: Tensor, y: Tensor) -> Params:
    """Reverse-over-reverse: the vector-Jacobian product of ``grad f`` with ``v``."""
    _, vjp_fn = vjp(lambda p: grad(f)(p, x, y), params)
    return vjp_fn(v)[0]


_HVP = {"jvp": _hvp_jvp, "double_backward": _hvp_double_backward}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HessianOperator(LinearOperator):
    """The Hessian ``H(w)`` of an :class:`Objective` acting on flat vectors (one matvec = one pass)."""

    def __init__(self, objective: Objective, params: Params) -> None:
        super().__init__(objective.layout.size, objective.dtype, objective.device)
        self.objective = objective
        self.params = params

    def _matvec(self, v: Tensor) -> Tensor:
        layout = self.objective.layout
        return layout.flatten(self.objective.hvp(layout.unflatten(v), self.params))
