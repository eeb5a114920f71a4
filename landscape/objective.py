"""The analysed objective: a fixed model on a fixed dataset, as a function of a parameter dict.

.. math::

    L(w) = \\frac{\\sum_b n_b\\, \\ell_b(w)}{\\sum_b n_b},\\qquad \\ell_b = \\text{mean loss of batch } b,

the mean over every loss term of the dataset (SPEC Sec. 2): ``n_b`` is the number of loss terms of batch
``b`` (examples, or the tokens that are not ``-100``; :mod:`landscape.batches`), so the value does not
depend on how the data are batched. The model runs in eval mode (BatchNorm uses its running statistics,
dropout is off), the data are read in a fixed order (kept on the device, or streamed to it one batch at a
time: :mod:`landscape.data`), and buffers are never perturbed. Every quantity goes through
``torch.func.functional_call`` on a parameter dict, so the user's module is never left modified: its
train/eval flags are restored after each call and its buffers are copied.

The analysed parameters are the trainable ones, or the subset ``params=`` names (a list of names or a
predicate on the name): the others stay fixed, like buffers.

A determinism check (two evaluations of the first batch must agree, the buffers must not change, and the
data must be the same on every pass) raises :class:`NondeterministicObjective` naming the cause:
train-mode BatchNorm, dropout, shuffling or augmentation.

Hessian-vector products are exact: forward-over-reverse (``torch.func.jvp`` of the gradient), double
backward, or one backward pass through the kept graph of the gradient over every batch (kept data whose
graph fits the memory budget). ``hvp_method="auto"`` times one product of each on the first batch at
construction and keeps the fastest (:class:`HVPChoice`); a method the model does not support (a
``torch.compile``d module has no double backward through its graph) is skipped with one warning. They run with PyTorch's
math attention kernel, the one ``scaled_dot_product_attention`` has second derivatives for.

Data-parallel over processes (``distributed=True`` under ``torchrun``): each process holds a shard of
the data (e.g. its :func:`landscape.distributed.shard`), the weights ``n_b / N`` use the global ``N``, and every
quantity is the process's partial sum reduced with one ``all_reduce``: one Hessian-vector product is one
collective, and every process gets the same result (so Lanczos runs in lockstep on all of them).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from . import distributed as _distributed
from .batches import BatchProtocol, Forward, LossFn, Weight, batch_size, fingerprint, map_tensors, nbytes, tensors_of
from .data import BatchSource
from .linop import LinearOperator

__all__ = [
    "Data",
    "LossFn",
    "Objective",
    "HessianOperator",
    "HVPChoice",
    "NondeterministicObjective",
    "ParamLayout",
    "ParamSelection",
    "select_parameters",
    "evaluation_objective",
]

Data = Union[torch.utils.data.DataLoader, torch.utils.data.Dataset, tuple, Mapping, list]
Params = dict[str, Tensor]
ParamSelection = Union[Sequence[str], Callable[[str], bool], None]

HVP_METHODS = ("auto", "jvp", "double_backward", "graph")
_COMPILED_PREFIX = "_orig_mod."


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


def select_parameters(model: nn.Module, params: ParamSelection = None) -> list[str]:
    """The names of the parameters to analyse, in the model's order.

    Args:
        model: the network.
        params: ``None`` (every parameter with ``requires_grad``), a list of names, or a predicate on the
            name. Names may leave out the ``_orig_mod.`` prefix of a ``torch.compile``d module; a tied
            parameter may be listed by any of its names (GPT-2's ``lm_head.weight`` is
            ``transformer.wte.weight``, the name it is analysed under). Listed names are analysed even when
            frozen; a predicate sees the trainable ones only (each under its first name).

    Raises:
        ValueError: a listed name is not a parameter, or nothing is selected.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> select_parameters(model, lambda name: name.startswith("2."))
        ['2.weight', '2.bias']
    """
    named = dict(model.named_parameters())
    if params is None or callable(params):
        chosen = [n for n, p in named.items() if p.requires_grad and (params is None or params(_plain(n)))]
    elif isinstance(params, str):
        raise ValueError(f"params takes a list of names or a predicate, not one string; got {params!r} "
                         f"(write [{params!r}])")
    else:
        first: dict[int, str] = {}
        own = {n: first.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)}
        own.update({_plain(n): name for n, name in own.items()})  # every name, tied ones too -> the first one
        listed = set(params)
        unknown = sorted(n for n in listed if n not in own)
        if unknown:
            raise ValueError(f"params names {unknown} are not parameters of the model; its parameters include "
                             f"{[_plain(n) for n in named][:6]}")
        wanted = {own[n] for n in listed}
        chosen = [n for n in named if n in wanted]
    if not chosen:
        raise ValueError("no parameter to analyse: the model has none with requires_grad=True, or params= selects "
                         "none of them")
    return chosen


def _plain(name: str) -> str:
    return name[len(_COMPILED_PREFIX):] if name.startswith(_COMPILED_PREFIX) else name


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


class _ExactLayerNorm(torch.overrides.TorchFunctionMode):
    """``layer_norm`` computed from its definition (mean, variance, rsqrt) instead of PyTorch's fused kernel.

    The fused kernel's second derivatives are wrong (PyTorch 2.13-2.14, double backward and forward-over-
    reverse alike; pytorch/pytorch#196700): the Hessian of ``sum(LayerNorm(x W) * ...)`` comes out
    asymmetric, by 0.7 on a 36-parameter example (``tests/landscape/test_objective.py``). Its first
    derivatives are right, so the kernel is replaced only while second derivatives are taken.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.nn.functional.layer_norm, torch.layer_norm):
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5, *_: Any) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last ``len(normalized_shape)`` axes."""
    axes = tuple(range(-len(tuple(normalized_shape)), 0))
    centred = input - input.mean(axes, keepdim=True)
    out = centred * torch.rsqrt(centred.square().mean(axes, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


@contextlib.contextmanager
def _second_order() -> Iterator[None]:
    """What exact second derivatives need: attention through the math kernel (the fused ones have neither
    double backward nor forward-mode AD; the math one is built from differentiable operations) and
    layer norm from its definition (:class:`_ExactLayerNorm`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), _ExactLayerNorm():
        yield


class _Caller(nn.Module):
    """The model fed by the batch protocol, as a module taking the batch (for ``functional_call``)."""

    def __init__(self, model: nn.Module, protocol: BatchProtocol) -> None:
        super().__init__()
        self.model = model
        self.protocol = protocol

    def forward(self, batch: Any) -> Any:
        return self.protocol.call(self.model, batch)


def _upcast(output: Any) -> Any:
    """Half-precision tensors of an output (a bf16/fp16 autocast forward) in float32, for the loss."""
    if isinstance(output, Tensor):
        return output.float() if output.dtype in (torch.bfloat16, torch.float16) else output
    if isinstance(output, (Mapping, tuple, list)):
        return map_tensors(lambda t: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t, output)
    return output


class Objective:
    """``L(w)`` of a model on a dataset, with its gradient and exact Hessian-vector products.

    Args:
        model: the network. Its parameters at construction are the default point ``w``.
        loss_fn: mean-reduced loss ``loss_fn(output, target)``, e.g. ``torch.nn.functional.cross_entropy``
            (or :func:`landscape.batches.token_cross_entropy` for ``[B, T, V]`` logits); ``None`` takes the
            model's own ``loss`` (Hugging Face style batches with ``labels``).
        data: see :mod:`landscape.data` (a DataLoader, a Dataset, tensors, or a list of batches); batches
            follow :mod:`landscape.batches`.
        forward: ``(model, batch) -> output`` for models fed another way than the batch protocol's.
        weight: ``(batch) -> n_b``, the number of loss terms of a batch (default: counted by the protocol).
        target: ``(batch) -> target`` for batches that are neither ``(inputs, target)`` pairs nor Mappings
            with ``labels`` (with ``forward=``).
        params: which parameters to analyse (:func:`select_parameters`; default: every trainable one).
        stream: read the data from the source on every pass, one batch on the device at a time (default:
            when they would exceed ``memory_budget``).
        memory_budget: bytes the kept data may take on the device (default: a quarter of its memory); also
            what the kept gradient graph of ``hvp_method="auto"`` may take (on a GPU at most half its free
            memory).
        device: where to evaluate; default: the model's device.
        dtype: floating dtype of parameters, buffers and inputs (e.g. ``torch.float64`` for reference
            computations); default: the model's.
        batch_size: examples per batch when ``data`` are tensors or a Dataset (default 2048).
        train_mode: evaluate in train mode (BatchNorm batch statistics, dropout on). Off by default;
            the determinism check then reports why the objective is not a fixed function.
        hvp_method: ``"jvp"`` (forward-over-reverse), ``"double_backward"`` (reverse-over-reverse),
            ``"graph"`` (reverse-over-reverse keeping the gradient's graph of every batch between products:
            one backward pass per product; kept data only) or ``"auto"``: for kept data, the fastest of one
            timed product of each on the first batch, ``"graph"`` among them when its estimated size fits the
            memory budget (:class:`HVPChoice`); for streamed data ``"double_backward"``, whose peak memory is
            the lower (about 1.7x one batch's forward and backward against 3.2x for ``"jvp"``,
            ``benchmarks/RESULTS.md``), and nothing is timed. The choice is made once, at construction:
            :attr:`hvp_method`, with the timings and the reason in :attr:`hvp_choice`.
        check: run the determinism check at construction.
        distributed: ``data`` is this process's shard of the dataset; losses, gradients and
            Hessian-vector products are summed over the processes of the default group (one
            ``all_reduce`` each). Every process must construct the objective and call the same methods
            in the same order.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        data: Data,
        *,
        forward: Forward | None = None,
        weight: Weight | None = None,
        target: Callable[[Any], Tensor] | None = None,
        params: ParamSelection = None,
        stream: bool | None = None,
        memory_budget: int | None = None,
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
        chosen = set(select_parameters(model, params))
        self.params: Params = {name: p.detach().to(self.device, self.dtype)
                               for name, p in model.named_parameters() if name in chosen}
        self.fixed: Params = {  # the other parameters: held fixed, like buffers
            name: p.detach().to(self.device, self.dtype) for name, p in model.named_parameters() if name not in chosen
        }
        self.buffers: Params = {
            name: b.detach().to(self.device, self.dtype if b.is_floating_point() else b.dtype).clone()
            for name, b in model.named_buffers()
        }
        self.layout = ParamLayout.of(self.params)
        self.distributed = bool(distributed) and _distributed.active()
        self.source = BatchSource(data, device=self.device, dtype=self.dtype, batch_size=batch_size, stream=stream,
                                  memory_budget=memory_budget)
        self.protocol = BatchProtocol(loss_fn, forward, weight, target)
        self._caller = _Caller(model, self.protocol)
        self._calibrate(self.source.first())
        self._count()
        self._graph: tuple[Params, Params, list[Tensor]] | None = None  # (params, leaves, weighted gradient)
        if check:
            self.check_determinism()
        self.hvp_method = self._resolve_hvp_method(hvp_method)

    # -- the data ----------------------------------------------------------------------------------------

    def _calibrate(self, batch: Any) -> None:
        """Check the first batch and, for the model's own loss, find how its labels are counted."""
        self.protocol.check(batch, 0)
        if self.loss_fn is None and self.protocol.weight is None:
            with torch.no_grad():
                output = self.forward(self.params, batch)
            self.protocol = self.protocol.calibrated(output, batch)
            self._caller.protocol = self.protocol

    def _count(self) -> None:
        """One pass over the data: each batch's number of loss terms and a fingerprint of its data."""
        terms, examples, prints = [], 0, []
        for index, batch in enumerate(self.source):
            if index:
                self.protocol.check(batch, index)
            terms.append(self.protocol.terms(batch))
            examples += batch_size(batch)
            prints.append(fingerprint(batch))
        if not terms:
            raise ValueError("data holds no batches")
        self._terms = torch.stack([t.to(self.device) for t in terms]).tolist()  # one synchronisation
        self._fingerprints = torch.stack(prints)
        totals = torch.tensor([sum(self._terms), float(examples)], dtype=torch.float64, device=self.device)
        self._reduce([totals])
        self.n_terms, self.n_examples = float(totals[0]), int(totals[1])
        self.n_local = examples
        if not self.n_terms > 0:
            raise ValueError("the data hold no loss terms: every target is the ignore index -100")

    @property
    def stream(self) -> bool:
        """Whether the data are read from the source on every pass (one batch on the device at a time)."""
        return self.source.stream

    @property
    def n_batches(self) -> int:
        return len(self._terms)

    def weighted_batches(self) -> Iterator[tuple[float, Any]]:
        """``(n_b / N, batch)`` for every batch with loss terms, on the device, in order.

        Streamed data are checked against the first pass as they come (their fingerprints, one
        synchronisation at the end of the pass).

        Raises:
            NondeterministicObjective: streamed data changed between passes.
        """
        prints = [] if self.stream else None
        count = 0
        for index, batch in enumerate(self.source):
            if prints is not None:
                prints.append(fingerprint(batch))
            count += 1
            if index < len(self._terms) and self._terms[index] > 0:
                yield self._terms[index] / self.n_terms, batch
        if prints is not None:
            self._check_same_data(prints, count)

    def _check_same_data(self, prints: list[Tensor], count: int) -> None:
        if count != len(self._terms) or not torch.equal(torch.stack(prints), self._fingerprints):
            raise NondeterministicObjective(
                "the data changed between two passes over them (a DataLoader that shuffles, or random "
                "augmentation): pass an unshuffled loader without augmentation")

    def _reduce(self, tensors: list[Tensor]) -> None:
        """Sum per-process partial results over the processes, in place, in one collective."""
        if self.distributed:
            _distributed.all_reduce_sum_(tensors)

    # -- pure pieces over a parameter dict ----------------------------------------------------------

    def forward(self, params: Params, batch: Any, buffers: Params | None = None) -> Any:
        """The model's output on ``batch`` at ``params`` (the objective's fixed buffers, or ``buffers``)."""
        tensors = {**self.fixed, **params, **(self.buffers if buffers is None else buffers)}
        with _training_flags(self.model, self.train_mode):
            return functional_call(self._caller, {"model." + k: v for k, v in tensors.items()}, (batch,), strict=True)

    def batch_loss(self, params: Params, batch: Any, buffers: Params | None = None) -> Tensor:
        """The mean loss of one batch at ``params``."""
        return self.protocol.loss(self.forward(params, batch, buffers), batch)

    @torch.no_grad()
    def loss(self, params: Params | None = None) -> Tensor:
        """``L(w)`` as a 0-dim tensor (accumulated in float64)."""
        params = self.params if params is None else params
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for weight, batch in self.weighted_batches():
            total += weight * self.batch_loss(params, batch).double()
        self._reduce([total])
        return total

    @torch.no_grad()
    def loss_and_accuracy(self, params: Params | None = None, buffers: Params | None = None) -> tuple[float, float]:
        """``(L(w), accuracy)``. Accuracy counts ``argmax`` predictions against integer targets (per token
        where the target has a sequence axis, ignored positions skipped; :mod:`landscape.batches`); it is NaN
        where it is not defined. ``buffers`` replaces the objective's buffers for this evaluation (e.g.
        interpolated BatchNorm statistics)."""
        params = self.params if params is None else params
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # [loss, correct, counted]
        defined = True
        for weight, batch in self.weighted_batches():
            output = _upcast(self.forward(params, batch, buffers))
            sums[0] += weight * self.protocol.loss(output, batch).double()
            counts = self.protocol.accuracy_counts(output, batch)
            if counts is None:
                defined = False
            else:
                sums[1] += counts[0]
                sums[2] += counts[1]
        self._reduce([sums])
        loss, correct, counted = sums.tolist()
        return loss, (correct / counted if defined and counted > 0 else float("nan"))

    def gradient(self, params: Params | None = None) -> Params:
        """``grad L(w)`` as a parameter dict, accumulated over the whole dataset."""
        params = self.params if params is None else params
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        batch_grad = grad(self.batch_loss)
        for weight, batch in self.weighted_batches():
            g = batch_grad(params, batch)
            torch._foreach_add_(list(total.values()), [g[k] for k in total], alpha=weight)
        self._reduce(list(total.values()))
        return total

    def hvp(self, v: Params, params: Params | None = None, method: str | None = None) -> Params:
        """Exact Hessian-vector product ``H(w) v`` over the whole dataset, as a parameter dict."""
        params = self.params if params is None else params
        method = method or self.hvp_method
        with _second_order():
            if method == "graph":
                return self._graph_hvp(v, params)
            batch_hvp = _HVP[method]
            total = {k: torch.zeros_like(t) for k, t in params.items()}
            for weight, batch in self.weighted_batches():
                hv = batch_hvp(self.batch_loss, params, v, batch)
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
                for weight, batch in self.weighted_batches():
                    g = torch.autograd.grad(self.batch_loss(leaves, batch), list(leaves.values()), create_graph=True)
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

        Streamed data are also compared with their first pass on every later pass.

        Raises:
            NondeterministicObjective: the loss changed between evaluations (dropout, a random layer),
                the buffers changed (train-mode BatchNorm updating running statistics), or the data loader
                yielded different data (shuffling, augmentation).
        """
        causes = []
        if self.source.reads_again:
            prints = [fingerprint(b) for b in self.source.reread()]
            if len(prints) != len(self._terms) or not torch.equal(torch.stack(prints), self._fingerprints):
                causes.append(
                    "the DataLoader yields different data on two passes (shuffle=True or random augmentation); "
                    "pass an unshuffled loader without augmentation, or the tensors themselves"
                )
        batch = self.source.first()
        before = {k: b.clone() for k, b in self.buffers.items()}
        with torch.no_grad():
            first = self.batch_loss(self.params, batch)
            second = self.batch_loss(self.params, batch)
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

    # -- the product method ---------------------------------------------------------------------------

    def _resolve_hvp_method(self, asked: str) -> str:
        """The product method: the one asked for, or the fastest that works (the same on every rank); the
        decision is kept in :attr:`hvp_choice`."""
        if asked == "graph" and self.stream:
            raise ValueError("hvp_method='graph' keeps the gradient graph of every batch on the device, which streamed "
                             "data (stream=True) must not: use 'jvp', 'double_backward' or 'auto'")
        if asked != "auto":
            choice = HVPChoice(asked, asked, "asked for")
        elif self.stream:  # memory first: double backward peaks lower than forward-over-reverse
            method = next((m for m in ("double_backward", "jvp") if self._works(m)), None)
            if method is None:
                raise RuntimeError("no exact Hessian-vector product works for this model: neither double "
                                   "backward nor forward-over-reverse")
            choice = HVPChoice(method, "auto", "streamed data: the product with the lower peak memory, not timed")
        else:
            choice = self._time_products()
        # Rank 0's choice for everyone: the processes must take the same products, in lockstep.
        self.hvp_choice = _distributed.broadcast_object(choice) if self.distributed else choice
        return self.hvp_choice.method

    @property
    def hvp_timings(self) -> dict[str, float]:
        """Seconds of one product on the probe batch for every method timed by ``hvp_method="auto"`` (empty when
        the method was asked for, or the data are streamed)."""
        return dict(self.hvp_choice.seconds)

    def _probe(self) -> tuple[Any, Params]:
        """Up to 256 examples of the first batch and a fixed random direction, to try and time the products
        (drawn from a seeded generator: building an objective leaves the global random state alone)."""
        from .batches import take

        batch = self.source.first()
        probe = take(batch, slice(0, _PROBE_EXAMPLES))
        generator = torch.Generator().manual_seed(0)
        return probe, {k: torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
                       for k, t in self.params.items()}

    def _product(self, method: str, batch: Any, v: Params, saved: _SavedBytes | None = None) -> Callable[[], Any] | None:
        """One product by ``method`` on ``batch`` as a closure, after running it once (a warm-up that also
        tells whether the method works for this model; warns once and returns ``None`` when it does not).
        For ``"graph"`` the closure is one backward pass through the probe's kept gradient graph, whose saved
        tensors ``saved`` counts while it is built."""
        try:
            with _second_order():
                if method == "graph":
                    leaves = {k: t.detach().requires_grad_(True) for k, t in self.params.items()}
                    with torch.enable_grad(), saved or contextlib.nullcontext():
                        g = torch.autograd.grad(self.batch_loss(leaves, batch), list(leaves.values()), create_graph=True)
                    inputs, vectors = list(leaves.values()), [v[k] for k in leaves]

                    def product() -> Any:
                        with torch.enable_grad():
                            return torch.autograd.grad(g, inputs, grad_outputs=vectors, retain_graph=True)
                else:
                    def product() -> Any:
                        with _second_order():
                            return _HVP[method](self.batch_loss, self.params, v, batch)
                product()
        except (RuntimeError, NotImplementedError) as error:
            _warn_once(f"Hessian-vector products by {_METHOD_NAMES[method]} do not work for this model "
                       f"({_first_sentence(error)}); another exact method is used")
            return None
        return product

    def _works(self, method: str) -> bool:
        """Whether ``method`` runs for this model (one product on a few examples); warns once when it does not."""
        batch, v = self._probe()
        return self._product(method, batch, v) is not None

    def _time_products(self) -> HVPChoice:
        """Time one product of every applicable method on the probe batch and keep the fastest.

        The applicable methods are forward-over-reverse and double backward, and the kept gradient graph when
        its estimated size over this process's data fits :meth:`_graph_budget`: the tensors autograd saves
        while the probe's graph is built (those of the parameters, buffers and data left out: they are kept
        anyway), per example, times the examples, plus the gradient. A product then costs one backward pass
        instead of a forward and two backward passes per batch; the one-off building of the graph (a forward
        and a ``create_graph`` backward per batch, about one gradient) is left out of the comparison.
        """
        batch, v = self._probe()
        n_probe = batch_size(batch)
        seconds: dict[str, float] = {}
        budget = self._graph_budget()
        saved = _SavedBytes([*self.params.values(), *self.fixed.values(), *self.buffers.values(), *tensors_of(batch)])
        graph = self._product("graph", batch, v, saved)
        graph_bytes = None
        if graph is not None:
            gradient = nbytes(self.params)
            graph_bytes = int(saved.total / max(n_probe, 1) * self.n_local) + gradient
            if graph_bytes <= budget:
                seconds["graph"] = _product_seconds("graph", graph, self.device)
        del graph  # the probe's kept graph
        for method in ("jvp", "double_backward"):
            product = self._product(method, batch, v)
            if product is not None:
                seconds[method] = _product_seconds(method, product, self.device)
        if not seconds:
            raise RuntimeError("no exact Hessian-vector product works for this model: neither forward-over-reverse "
                               "nor double backward")
        method = min(seconds, key=seconds.get)
        left_out = "" if graph_bytes is None or graph_bytes <= budget else (
            f"; the kept graph left out (about {graph_bytes / 2**20:.0f} MiB over the data, above the "
            f"{budget / 2**20:.0f} MiB budget)")
        return HVPChoice(method, "auto", f"the fastest of one timed product each on {n_probe} examples{left_out}",
                         seconds, n_probe, graph_bytes, budget)

    def _graph_budget(self) -> int:
        """Bytes the kept gradient graph may take: the data's ``memory_budget`` (a quarter of the device's
        memory by default), and on a GPU at most half of its free memory."""
        budget = self.source.memory_budget
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = min(budget, free // 2)
        return int(budget)


@dataclass(frozen=True)
class HVPChoice:
    """How an :class:`Objective` picked its Hessian-vector product method (``objective.hvp_choice``).

    Attributes:
        method: the method every product takes.
        asked: the ``hvp_method`` argument (``"auto"`` or a method).
        reason: why, in words.
        seconds: one product on the probe batch per method timed (the best of three, after a warm-up run,
            the device synchronised); empty when nothing was timed.
        probe_examples: examples of the probe batch (the first batch's first 256).
        graph_bytes: the estimated size of the kept gradient graph over this process's data, when estimated.
        graph_budget: the bytes it was allowed, when estimated.
    """

    method: str
    asked: str
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)
    probe_examples: int = 0
    graph_bytes: int | None = None
    graph_budget: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_PROBE_EXAMPLES = 256


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the distinct storages autograd saves while active, except those of ``kept``."""

    def __init__(self, kept: Sequence[Tensor]) -> None:
        self._kept = {t.untyped_storage().data_ptr() for t in kept}
        self._seen: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._kept:
            self._seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self._seen.values())


def _product_seconds(method: str, product: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``product`` (a product by ``method``), the device synchronised before and after:
    the best of three calls, so that a preempted call on a shared machine does not decide."""
    best = math.inf
    for _ in range(3):
        _synchronize(device)
        start = time.perf_counter()
        product()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


_METHOD_NAMES = {"graph": "backward through the kept gradient graph", "jvp": "forward-over-reverse (jvp)",
                 "double_backward": "double backward"}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _first_sentence(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return re.split(r"(?<=[.!?]) ", text)[0][:200]


def evaluation_objective(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Data,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    **kwargs: Any,
) -> Objective:
    """An :class:`Objective` for losses and gradients (surfaces, sharpness): its HVP method is fixed to
    double backward instead of being tried and timed at construction, since these analyses need no HVPs.
    Keyword arguments (``forward``, ``weight``, ``params``, ``stream``, ``memory_budget``, ...) go to it."""
    return Objective(model, loss_fn, data, dtype=dtype, device=device, batch_size=batch_size,
                     hvp_method="double_backward", **kwargs)


def _hvp_jvp(f: Callable[..., Tensor], params: Params, v: Params, batch: Any) -> Params:
    """Forward-over-reverse: ``d/dt grad f(w + t v)`` at ``t = 0`` (Pearlmutter 1994)."""
    return jvp(lambda p: grad(f)(p, batch), (params,), (v,))[1]


def _hvp_double_backward(f: Callable[..., Tensor], params: Params, v: Params, batch: Any) -> Params:
    """Reverse-over-reverse: the vector-Jacobian product of ``grad f`` with ``v``."""
    _, vjp_fn = vjp(lambda p: grad(f)(p, batch), params)
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
