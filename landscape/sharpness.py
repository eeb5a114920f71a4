"""Sharpness of a minimum: m-sharpness, adaptive sharpness, Keskar sharpness and PAC-Bayes flatness.

All measures are functions of the whole-dataset objective of :mod:`landscape.objective` (eval mode,
buffers fixed, the user's module untouched). Perturbations live in *scaled coordinates*: a perturbation
``u`` moves the weights to ``w + c * u`` (elementwise) and the constraint is ``||u||_p <= rho``, with

* ``c = 1`` for plain sharpness (Foret et al. 2021, Eq. 1; Andriushchenko & Flammarion 2022),
* ``c = |w| + eta`` for adaptive sharpness (Kwon et al. 2021, Eq. 4; Andriushchenko et al. 2023, Eq. 2
  with ``eta = 0``), which makes the measure invariant to rescaling a ReLU layer by ``a`` and the next by
  ``1 / a`` (Dinh et al. 2017),
* ``c = |w| + 1`` with ``p = inf`` for Keskar et al. 2017's box (Eq. 3-4).

The worst case is found by ascent in ``u``. Starting from ``u_0 = 0``, ``steps`` projected
normalised-gradient steps ``u_{k+1} = Proj(u_k + alpha * d_k)`` (``d_k = c g / ||c g||_2`` for ``p = 2``,
``sign(g)`` for ``p = inf``; ``alpha = rho`` by default, so one step is the SAM step), or Auto-PGD (Croce
& Hein 2020, Alg. 1: momentum 0.75, step size from ``2 rho`` halved at checkpoints when progress stalls).
The value is the best iterate ``u_1 .. u_k`` (for ``steps = 1``, the SAM point).

m-sharpness (Andriushchenko & Flammarion 2022, Eq. 3; Foret et al. 2021, Sec. 4.1):

.. math::

    S_m(w) = \\frac{1}{|\\mathcal{P}|}\\sum_{S \\in \\mathcal{P}} \\max_{\\|u\\|_p \\le \\rho}
             \\frac{1}{m} \\sum_{i \\in S} \\big[\\ell_i(w + c \\odot u) - \\ell_i(w)\\big],

over a seeded random partition ``P`` of the data into disjoint chunks of ``m`` examples (the last
``N mod m`` examples of the permutation are left out and the count used is reported). For ``m = 1`` every
example is its own chunk whatever the permutation: the data are read batch by batch, in their order, so
``per_chunk`` follows the data. Each chunk has its own ascent; chunks are vectorised with ``torch.vmap``
over stacked perturbations (``m = 1`` gives per-example gradients), ``batched=False`` loops over chunks in
Python (the reference path). The vectorised ascent starts from the per-chunk gradients at ``w`` itself,
vmapped over the chunks only (one plain batched forward, no stacked copy of the weights), takes its first
step as one scaling of them per chunk, and writes the perturbed weights into one stack reused from call to
call. For ``m = 1`` with one step (``p = 2``, ``c = 1``) neither stack is needed: per-layer rules
(:mod:`landscape._layer_rules`; ghost norms, Li et al. 2022) give every example's gradient norm and its loss
at its own SAM point from one batched forward and backward and one batched forward whose layers add each
example's correction; models outside the rules use vmap (``settings["method"]`` says which ran). A chunk's
loss is the mean over its loss terms (its tokens, for a language model; :mod:`landscape.batches`); a chunk
without any (every target ignored) is left out.

Models and data beyond ``(x, y)`` tensors: every function here also takes the keyword options of
:class:`~landscape.objective.Objective` (``forward``, ``weight``, ``target``, ``params``, ``stream``,
``memory_budget``), and ``loss_fn=None`` for a model that computes its own loss (Hugging Face style);
the batch protocol is :mod:`landscape.batches`.

Example:
    >>> import torch
    >>> from landscape import sharpness
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> result = sharpness.m_sharpness(model, torch.nn.functional.cross_entropy, (X, y), m=8, rho=0.05,
    ...                                progress=False)
    >>> result.settings["n_chunks"], result.value > 0
    (8, True)
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad_and_value

from . import _layer_rules
from ._checks import check_int
from .batches import batch_size, split_chunks, take
from .lanczos import top_eigenpairs
from .objective import Data, LossFn, Objective, Params, _first_sentence, _warn_once, evaluation_objective
from .progress import progress_bar

__all__ = [
    "ASCENTS",
    "NOISES",
    "SharpnessResult",
    "SharpnessCurve",
    "m_sharpness",
    "m_sharpness_curve",
    "adaptive_sharpness",
    "average_sharpness",
    "keskar_sharpness",
    "pac_bayes_flatness",
    "sharpness_objective",
    "ascend",
    "apgd_checkpoints",
    "MEASURES",
    "MeasureSettings",
    "measure_all",
    "measure_columns",
]

ASCENTS = ("pgd", "apgd")
NOISES = ("gaussian", "uniform")
DEFAULT_MS = (1, 4, 16, 64, 256)

# Examples (chunk size x chunks) in one vmapped call. On the CPU, m = 1 on the digits CNN cost 0.38-0.42 ms per
# example from 32 to 128 per call and 0.55 at 256 (2 threads); 128 won two of three full runs against 32
# (benchmarks/RESULTS.md, Sharpness).
_EXAMPLES_PER_CALL = {"cpu": 128, "cuda": 1024}
# The per-layer rules at m = 1 take the same: 0.43-0.44 s for the whole set from 128 to 512 examples per call,
# 0.49 s at 64 (2 threads, one process, medians of 8).
_PARAM_ELEMENTS_PER_CALL = 2**24  # stacked perturbation elements in one vmapped call (64 MiB in float32)
# Values the layer rules keep in one call on the CPU (512 MiB in float32). Language models keep far more per
# example than the digits CNN (a 4-layer GPT-2 and Llama of width 128 on 64 tokens: 3.2M and 3.8M values):
# at 2**25, 10 and 8 examples per call took 2.20 and 3.14 s for 256 sequences, at 2**27 (42 and 35) 1.84 and
# 2.27 s (2 threads, medians of 5 interleaved rounds).
_LAYER_RULES_CPU_ELEMENTS = 2**27
_CHECKED_EXAMPLES = 2  # examples on which the layer rules are checked against the loop
_TINY = 1e-12
_APGD_MOMENTUM = 0.75  # Croce & Hein 2020, Sec. 3.2
_APGD_SUCCESS_FRACTION = 0.75  # ibid., condition 1


@dataclass
class SharpnessResult:
    """One sharpness measure at one setting.

    Attributes:
        value: the measure.
        std_error: standard error where the value is an average of random draws (noise samples) or of
            chunks (for m-sharpness: the spread over chunks divided by ``sqrt(n_chunks)``); ``None``
            where it is a single deterministic number.
        measure: which measure (``"m_sharpness"``, ``"adaptive_worst"``, ``"average"``, ``"keskar"``,
            ``"pac_bayes"``).
        settings: every setting used (rho, p, m, steps, ascent, seeds, counts), as saved in JSON.
        per_chunk: the value of every chunk (m-sharpness), else ``None``.
    """

    value: float
    std_error: float | None
    measure: str
    settings: dict[str, Any] = field(default_factory=dict)
    per_chunk: np.ndarray | None = None

    def __float__(self) -> float:
        return float(self.value)

    def to_dict(self) -> dict[str, Any]:
        return {"measure": self.measure, "value": self.value, "std_error": self.std_error, **self.settings}


@dataclass
class SharpnessCurve:
    """A sharpness measure as a function of the chunk size ``m``."""

    m: list[int]
    values: list[float]
    std_errors: list[float | None]
    results: list[SharpnessResult]

    def to_dict(self) -> dict[str, Any]:
        per_m = ("m", "n_chunks", "n_examples_used", "chunks_per_call", "vectorised", "method")
        settings = {k: v for k, v in self.results[0].settings.items() if k not in per_m}
        return {"measure": self.results[0].measure, "value": self.values, "std_error": self.std_errors, **settings,
                **{k: [r.settings[k] for r in self.results] for k in per_m}}


# ----------------------------------------------------------------------------- batched vector algebra
# A "stack" is a parameter dict whose tensors have a leading chunk dimension G.

def _per_chunk_norm(stack: Params, p: float) -> Tensor:
    """``||stack[g]||_p`` over all parameters together, for every chunk ``g``: shape ``(G,)``."""
    parts = [t.reshape(t.shape[0], -1) for t in stack.values()]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, p, dim=1) for t in parts]), p, dim=0)


def _broadcast(per_chunk: Tensor, like: Tensor) -> Tensor:
    return per_chunk.reshape(per_chunk.shape + (1,) * (like.ndim - 1))


def _ascent_direction(grad: Params, p: float) -> Params:
    """The unit-``p``-ball direction maximising ``<grad, d>``: ``g / ||g||_2`` or ``sign(g)`` (Foret et al. 2021, Eq. 2)."""
    if p == math.inf:
        return {k: g.sign() for k, g in grad.items()}
    norm = _per_chunk_norm(grad, 2.0).clamp_min(_TINY)
    return {k: g / _broadcast(norm, g) for k, g in grad.items()}


def _project(stack: Params, rho: float, p: float) -> Params:
    """Euclidean projection of every chunk's ``u`` onto ``||u||_p <= rho`` (exact for p = 2 and inf)."""
    if p == math.inf:
        return {k: u.clamp(-rho, rho) for k, u in stack.items()}
    factor = (rho / _per_chunk_norm(stack, 2.0).clamp_min(_TINY)).clamp(max=1.0)
    return {k: u * _broadcast(factor, u) for k, u in stack.items()}


def _first_step(grad: Params, alpha: float, rho: float, p: float, overwrite: bool = False) -> Params:
    """``Proj(alpha * d)``: the first projected step from ``u = 0`` (``d`` the ascent direction of ``grad``), as
    one scaling of ``grad`` per chunk: ``min(alpha, rho) sign(g)`` for ``p = inf``; for ``p = 2``,
    ``g * alpha / max(||g||, tiny)`` times the projection's factor, whose norm is known without another pass.
    ``overwrite``: scale ``grad``'s tensors in place (no new stack of the size of the parameters)."""
    if p == math.inf:
        return {k: (g.sign_() if overwrite else g.sign()).mul_(min(alpha, rho)) for k, g in grad.items()}
    coefficient = _layer_rules.first_step_coefficient(_per_chunk_norm(grad, 2.0), alpha, rho)
    if overwrite:
        return {k: g.mul_(_broadcast(coefficient, g)) for k, g in grad.items()}
    return {k: g * _broadcast(coefficient, g) for k, g in grad.items()}


def _axpy(a: float | Tensor, x: Params, y: Params) -> Params:
    """``y + a x`` (``a`` a scalar or one value per chunk)."""
    if isinstance(a, Tensor):
        return {k: y[k] + _broadcast(a, x[k]) * x[k] for k in y}
    return {k: y[k] + a * x[k] for k in y}


def _unaliased(stack: Params) -> Params:
    """``stack`` with no two tensors sharing memory, so that scaling one in place leaves the others alone.
    vmapped gradients may be views of one another: in timm's ViT the gradient of ``cls_token`` is a slice of
    that of ``pos_embed`` (both meet in ``cat([cls, x]) + pos_embed``)."""
    seen: set[int] = set()
    out = {}
    for k, t in stack.items():
        storage = t.untyped_storage().data_ptr()
        out[k] = t.clone() if storage in seen else t
        seen.add(storage)
    return out


def _where(mask: Tensor, a: Params, b: Params) -> Params:
    """Per chunk: ``a[g]`` where ``mask[g]`` else ``b[g]``."""
    return {k: torch.where(_broadcast(mask, a[k]), a[k], b[k]) for k in a}


# ------------------------------------------------------------------------------------------- ascent
ValueAndGrad = Callable[[Params], tuple[Tensor, Params]]
Value = Callable[[Params], Tensor]


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which Auto-PGD may halve its step size (Croce & Hein 2020, Sec. 3.2).

    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``; checkpoints ``ceil(p_j steps)``.
    """
    fractions = [0.0, 0.22]
    while fractions[-1] < 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    marks = {math.ceil(f * steps - 1e-9) for f in fractions[1:]}  # 1e-9: 0.57 * 100 is 57.000000000000007
    return sorted(k for k in marks if 0 < k < steps)


def ascend(
    value_and_grad: ValueAndGrad,
    value: Value,
    zeros: Params,
    rho: float,
    p: float,
    steps: int,
    ascent: str = "pgd",
    step_size: float | None = None,
    start: Callable[[], tuple[Tensor, Params]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Maximise ``f(u)`` over ``||u||_p <= rho`` for a stack of independent problems, starting at ``u = 0``.

    Args:
        value_and_grad: ``u -> (f(u), grad f(u))`` for a stack of ``G`` problems (values shaped ``(G,)``).
        value: ``u -> f(u)`` without gradients (for the last iterate).
        zeros: a zero stack fixing shapes, dtype and device.
        rho, p: the ball (``p`` is 2 or ``math.inf``).
        steps: ascent steps ``k >= 1``.
        ascent: ``"pgd"`` (projected normalised gradient ascent, step ``alpha``) or ``"apgd"`` (Croce &
            Hein 2020, Alg. 1, started with step ``2 rho``).
        step_size: ``alpha`` of ``"pgd"``; default ``rho`` (one step is the SAM step).
        start: ``() -> (f(0), grad f(0))`` when it is cheaper than ``value_and_grad(zeros)`` (the
            per-chunk gradients at the unperturbed weights need no stacked perturbation); its gradient
            tensors are fresh, and the ascent may overwrite them.

    Returns:
        ``(f(0), max_k f(u_k))`` over the iterates ``u_1 .. u_steps``, each shaped ``(G,)``.
    """
    base, grad = value_and_grad(zeros) if start is None else start()
    if ascent == "pgd":
        alpha = rho if step_size is None else step_size
        u = zeros
        best = None
        for k in range(steps):
            if k == 0:
                u = _first_step(grad, alpha, rho, p, overwrite=start is not None)
            else:
                u = _project(_axpy(alpha, _ascent_direction(grad, p), u), rho, p)
            if k + 1 < steps:
                f, grad = value_and_grad(u)
            else:
                f = value(u)
            best = f if best is None else torch.maximum(best, f)
        return base.detach(), best.detach()

    # Auto-PGD, vectorised over the stack: every problem keeps its own step size and best point.
    eta = torch.full_like(base, 2.0 * rho)
    checkpoints = set(apgd_checkpoints(steps))
    u_prev, u = zeros, _project(_axpy(eta, _ascent_direction(grad, p), zeros), rho, p)
    f_prev = base
    best_f, best_u, best_grad = None, u, grad
    successes = torch.zeros_like(base)
    last_checkpoint, eta_at_checkpoint, best_at_checkpoint = 0, eta.clone(), torch.full_like(base, -math.inf)
    for k in range(1, steps + 1):
        if k < steps:
            f, grad = value_and_grad(u)
        else:
            f = value(u)
        improved = f > best_f if best_f is not None else torch.ones_like(f, dtype=torch.bool)
        best_f = f if best_f is None else torch.maximum(best_f, f)
        if k == steps:
            break
        best_u, best_grad = _where(improved, u, best_u), _where(improved, grad, best_grad)
        successes += (f > f_prev).to(successes.dtype)
        f_prev = f
        if k in checkpoints:
            stalled = successes < _APGD_SUCCESS_FRACTION * (k - last_checkpoint)
            unchanged = (eta == eta_at_checkpoint) & (best_f == best_at_checkpoint)
            halve = stalled | unchanged
            eta_at_checkpoint, best_at_checkpoint = eta.clone(), best_f.clone()
            eta = torch.where(halve, eta / 2, eta)
            u, grad = _where(halve, best_u, u), _where(halve, best_grad, grad)
            u_prev = _where(halve, u, u_prev)  # a restart from the best point carries no momentum
            successes.zero_()
            last_checkpoint = k
        z = _project(_axpy(eta, _ascent_direction(grad, p), u), rho, p)
        momentum_step = {key: _APGD_MOMENTUM * (z[key] - u[key]) + (1 - _APGD_MOMENTUM) * (u[key] - u_prev[key]) for key in u}
        u_prev, u = u, _project({key: u[key] + momentum_step[key] for key in u}, rho, p)
    return base.detach(), best_f.detach()


# ---------------------------------------------------------------------------------- the chunk losses
def _chunk_loss_fn(objective: Objective, origin: Params, scale: Params | None) -> Callable[[Params, Any], Tensor]:
    """``(u, chunk) -> mean loss of the chunk at w + c u`` (a chunk is a batch of examples)."""

    def chunk_loss(u: Params, chunk: Any) -> Tensor:
        if scale is None:
            params = {k: origin[k] + u[k] for k in origin}
        else:
            params = {k: origin[k] + scale[k] * u[k] for k in origin}
        return objective.batch_loss(params, chunk)

    return chunk_loss


def _vmapped_evaluators(objective: Objective, origin: Params, scale: Params | None, chunks: Any, count: int,
                        buffer: Params) -> tuple[ValueAndGrad, Value, Callable[[], tuple[Tensor, Params]]]:
    """Evaluators for a stack of ``count`` chunks (every tensor ``[count, m, ...]``): one vmapped call each.

    ``start`` gives the per-chunk gradients at ``w`` itself, vmapped over the chunks only (the parameters
    unstacked: one plain batched forward). The perturbed weights ``w + c u`` are written into ``buffer``
    (stacks of at least ``count``, reused from group to group: a fresh stack the size of the parameters per
    call costs the CPU a page fault per 4 KiB), and ``grad_u = c * grad_w`` there."""
    per_chunk = torch.vmap(grad_and_value(objective.batch_loss), in_dims=(0, 0))
    at_origin = torch.vmap(grad_and_value(objective.batch_loss), in_dims=(None, 0))
    loss = torch.vmap(objective.batch_loss, in_dims=(0, 0))

    def perturbed(u: Params) -> Params:
        out = {k: b[:count] for k, b in buffer.items()}
        for k, w in origin.items():
            if scale is None:
                torch.add(w, u[k], out=out[k])
            else:
                torch.addcmul(w, scale[k], u[k], out=out[k])
        return out

    def scaled(g: Params) -> Params:
        g = _unaliased(g)  # both the scaling here and the ascent's first step write into them
        return g if scale is None else {k: t.mul_(scale[k]) for k, t in g.items()}

    def value_and_grad(u: Params) -> tuple[Tensor, Params]:
        g, f = per_chunk(perturbed(u), chunks)
        return f, scaled(g)

    def value(u: Params) -> Tensor:
        with torch.no_grad():
            return loss(perturbed(u), chunks)

    def start() -> tuple[Tensor, Params]:
        g, f = at_origin(origin, chunks)
        return f, scaled(g)

    return value_and_grad, value, start


def _looped_evaluators(objective: Objective, chunk_loss: Callable[..., Tensor], chunks: list[Any],
                       sub_batch: int) -> tuple[ValueAndGrad, Value]:
    """Evaluators for a stack of chunks, one chunk at a time; a chunk larger than ``sub_batch`` examples is
    summed over sub-batches weighted by their loss terms (its mean loss, in pieces that fit)."""
    vg = grad_and_value(chunk_loss)
    pieces = []
    for chunk in chunks:
        n = batch_size(chunk)
        parts = [chunk] if n <= sub_batch else [take(chunk, slice(s, s + sub_batch)) for s in range(0, n, sub_batch)]
        terms = [float(objective.protocol.terms(part)) for part in parts]
        total = sum(terms)
        pieces.append([(part, t / total if total > 0 else float("nan")) for part, t in zip(parts, terms) if t > 0 or total == 0])

    def value_and_grad(u: Params) -> tuple[Tensor, Params]:
        values, grads = [], []
        for g, parts in enumerate(pieces):
            single = {k: t[g] for k, t in u.items()}
            total_f, total_g = None, None
            for part, weight in parts:
                grad_part, f = vg(single, part)
                total_f = weight * f if total_f is None else total_f + weight * f
                total_g = {k: weight * t for k, t in grad_part.items()} if total_g is None else _axpy(weight, grad_part, total_g)
            values.append(total_f)
            grads.append(total_g)
        return torch.stack(values), {k: torch.stack([g[k] for g in grads]) for k in u}

    def value(u: Params) -> Tensor:
        with torch.no_grad():
            return torch.stack([sum(weight * chunk_loss({k: t[g] for k, t in u.items()}, part) for part, weight in parts)
                                for g, parts in enumerate(pieces)])

    return value_and_grad, value


def _whole_data_evaluators(objective: Objective, origin: Params, scale: Params | None) -> tuple[ValueAndGrad, Value]:
    """Evaluators of ``L(w + c u)`` over the whole dataset (one chunk; passes of the objective, so streamed
    data work): ``grad_u L = c * grad_w L``."""

    dtype = objective.dtype  # the loss is summed in float64; the ascent runs in the parameters' dtype

    def at(u: Params) -> Params:
        return {k: origin[k] + (u[k][0] if scale is None else scale[k] * u[k][0]) for k in origin}

    def value_and_grad(u: Params) -> tuple[Tensor, Params]:
        params = at(u)
        g = objective.gradient(params)
        if scale is not None:
            g = {k: scale[k] * t for k, t in g.items()}
        return objective.loss(params).to(dtype).reshape(1), {k: t.unsqueeze(0) for k, t in g.items()}

    def value(u: Params) -> Tensor:
        return objective.loss(at(u)).to(dtype).reshape(1)

    return value_and_grad, value


# ------------------------------------------------------------------------------------------- checks
def _check_rho(name: str, rho: object) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {rho!r}")
    return float(rho)


def _check_p(p: object) -> float:
    if p in (2, 2.0):
        return 2.0
    if p in (math.inf, "inf"):
        return math.inf
    raise ValueError(f"p must be 2 or math.inf (the l2 or l-infinity ball); got {p!r}")


def _check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")
    return str(value)


def sharpness_objective(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Data,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    **objective_options: Any,
) -> Objective:
    """The objective every measure here analyses; build it once and pass ``objective=`` to share it.

    Keyword arguments (``forward``, ``weight``, ``params``, ``stream``, ``memory_budget``) go to
    :class:`~landscape.objective.Objective`.
    """
    return evaluation_objective(model, loss_fn, data, dtype=dtype, device=device, batch_size=batch_size,
                                **objective_options)


OBJECTIVE_OPTIONS = frozenset(inspect.signature(Objective.__init__).parameters) - {"self", "model", "loss_fn", "data"}
"""The keyword arguments every measure passes on to :class:`~landscape.objective.Objective`."""


def _objective_of(model: nn.Module | None, loss_fn: LossFn | None, data: Data | None, objective: Objective | None,
                  **options: Any) -> Objective:
    """``objective``, or one built from the model, loss and data; options that build one are refused beside it."""
    given = sorted(k for k, v in options.items() if v is not None and k in OBJECTIVE_OPTIONS)
    if objective is not None:
        if given:
            raise ValueError(f"{given} describe the objective; pass them to sharpness_objective(...), not beside "
                             "objective=")
        return objective
    unknown = sorted(set(options) - OBJECTIVE_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}")
    if model is None or data is None:
        raise ValueError("pass model, loss_fn and data, or objective=")
    return sharpness_objective(model, loss_fn, data, **options)


def _scale(params: Params, adaptive: bool, eta: float) -> Params | None:
    """``c = |w| + eta`` (adaptive) or ``None`` (``c = 1``)."""
    if not adaptive:
        return None
    return {k: w.abs() + eta for k, w in params.items()}


def _partition(n: int, m: int, seed: int) -> Tensor:
    """A seeded random partition of ``range(n)`` into ``n // m`` chunks of ``m``, shape ``(n // m, m)`` (CPU)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: (n // m) * m].reshape(n // m, m)


def _examples_per_call(device: torch.device, examples_per_call: int | None) -> int:
    if examples_per_call is not None:
        return check_int("examples_per_call", examples_per_call, 1)
    return _EXAMPLES_PER_CALL.get(device.type, _EXAMPLES_PER_CALL["cuda"])


def _chunk_budget(m: int, n_params: int, examples_per_call: int) -> int:
    return max(1, min(examples_per_call // m, _PARAM_ELEMENTS_PER_CALL // max(n_params, 1)))


# ---------------------------------------------------------------------------------------- measures
def _worst_case(
    objective: Objective,
    *,
    m: int | None,
    rho: float,
    p: float,
    steps: int,
    ascent: str,
    step_size: float | None,
    scale: Params | None,
    seed: int,
    batched: bool,
    examples_per_call: int | None,
    progress: bool,
    desc: str,
    layer_rules: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Per-chunk ``(L_S(w), max_u L_S(w + c u))`` for a partition into chunks of ``m`` (``None``: one chunk,
    the whole dataset). Chunks without loss terms (every target ignored) are left out."""
    origin = objective.params
    n = objective.n_examples
    if m is None:
        zeros = {k: torch.zeros((1,) + w.shape, dtype=w.dtype, device=w.device) for k, w in origin.items()}
        value_and_grad, value = _whole_data_evaluators(objective, origin, scale)
        base, best = ascend(value_and_grad, value, zeros, rho, p, steps, ascent, step_size)
        settings = {"m": n, "n_chunks": 1, "n_examples_used": n, "n_examples": n, "chunks_per_call": 1,
                    "vectorised": False, "method": "full_batch"}
        return base.double().cpu().numpy(), best.double().cpu().numpy(), settings
    if m > n:
        raise ValueError(f"m must be at most the number of examples ({n}); got m={m}")
    budget = _examples_per_call(objective.device, examples_per_call)
    if layer_rules and m == 1 and batched and steps == 1 and ascent == "pgd" and p == 2.0 and scale is None:
        ruled = _sam_step_by_layer_rules(objective, rho=rho, alpha=rho if step_size is None else step_size,
                                         examples_per_call=budget, progress=progress, desc=desc)
        if ruled is not None:
            return ruled
    chunk_loss = _chunk_loss_fn(objective, origin, scale)
    n_params = sum(t.numel() for t in origin.values())
    vectorised = batched and m <= budget
    group = _chunk_budget(m, n_params, budget) if vectorised else 1
    bases, bests = [], []
    vmap_works: bool | None = None if vectorised else False  # None: not tried on this model yet
    bar = progress_bar(total=n // m, desc=desc, unit="chunk", enabled=progress, leave=False)
    buffer: Params = {}
    for chunks, count in _chunk_groups(objective, m, group, seed):
        # A zero stack without memory: every chunk's u starts at 0 (the ascent never writes into it).
        zeros = {k: torch.zeros((), dtype=w.dtype, device=w.device).expand((count,) + w.shape) for k, w in origin.items()}
        result = None
        if vmap_works is not False:
            try:
                buffer = buffer or {k: torch.empty((group,) + w.shape, dtype=w.dtype, device=w.device)
                                    for k, w in origin.items()}
                value_and_grad, value, start = _vmapped_evaluators(objective, origin, scale,
                                                                   split_chunks(chunks, count, m), count, buffer)
                result = ascend(value_and_grad, value, zeros, rho, p, steps, ascent, step_size, start=start)
                vmap_works = True
            except (RuntimeError, NotImplementedError) as error:
                if vmap_works or isinstance(error, torch.OutOfMemoryError):  # a real error, not the model's
                    raise
                vmap_works, buffer = False, {}  # the loop needs no stack
                _warn_once(f"{type(objective.model).__name__} cannot be vmapped over chunks of examples "
                           f"({_first_sentence(error)}); its chunks are evaluated one at a time")
        if result is None:
            pieces = [take(chunks, slice(g * m, (g + 1) * m)) for g in range(count)]
            value_and_grad, value = _looped_evaluators(objective, chunk_loss, pieces, budget)
            result = ascend(value_and_grad, value, zeros, rho, p, steps, ascent, step_size)
        bases.append(result[0])
        bests.append(result[1])
        bar.update(count)
    bar.close()
    return _per_chunk_arrays(bases, bests, m=m, n_examples=n, chunks_per_call=group, vectorised=vectorised,
                             method="vmap" if vmap_works else "loop")


def _per_chunk_arrays(bases: list[Tensor], bests: list[Tensor], *, m: int, n_examples: int,
                      **settings: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The groups' values as arrays, chunks without loss terms left out, and the settings that count them
    (one transfer from the device at the end, not one per group)."""
    base, best = torch.cat(bases).double().cpu().numpy(), torch.cat(bests).double().cpu().numpy()
    has_terms = np.isfinite(base)
    counts = {"m": m, "n_chunks": int(has_terms.sum()), "n_examples_used": int(base.size * m), "n_examples": n_examples}
    return base[has_terms], best[has_terms], {**counts, **settings}


def _element_budget(device: torch.device, dtype: torch.dtype) -> int:
    """Values the layer rules may keep in one call: ``2**27`` on the CPU, a quarter of the free memory on a GPU
    (at least ``2**27``)."""
    if device.type != "cuda":
        return _LAYER_RULES_CPU_ELEMENTS
    free, _ = torch.cuda.mem_get_info(device)
    return max(_LAYER_RULES_CPU_ELEMENTS, free // 4 // (torch.finfo(dtype).bits // 8))


def _sam_step_by_layer_rules(objective: Objective, *, rho: float, alpha: float, examples_per_call: int,
                             progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    """One-step ``m = 1`` sharpness (``p = 2``, plain coordinates) by :mod:`landscape._layer_rules`: every
    example's ``(l_i(w), l_i(w + eps_i))`` without per-example weights; ``None`` where the rules do not cover
    the model (vmap then).

    The rules see modules, not how the model uses their parameters elsewhere (a weight read outside its
    module's ``forward``), so :data:`_CHECKED_EXAMPLES` examples with loss terms (the largest losses of the
    first calls that have any) are checked against the loop, the reference path of ``batched=False``; where
    they disagree the rules are dropped with a warning."""
    try:
        rules = _layer_rules.layer_rules(objective, objective.source.first(), examples_per_call,
                                         _element_budget(objective.device, objective.dtype))
    except _layer_rules.Unsupported:
        return None
    name = type(objective.model).__name__
    bases, bests, checked = [], [], 0
    bar = progress_bar(total=objective.n_examples, desc=desc, unit="chunk", enabled=progress, leave=False)
    try:
        for batch, count in _chunk_groups(objective, 1, rules.examples_per_call, seed=0):
            try:
                base, best = rules.sam_losses(batch, alpha, rho)
            except (RuntimeError, NotImplementedError) as error:
                if bases or isinstance(error, torch.OutOfMemoryError):  # they worked on an earlier call
                    raise
                _warn_once(f"{name}: the per-layer rules failed ({_first_sentence(error)}); m = 1 sharpness uses vmap")
                return None
            if checked < _CHECKED_EXAMPLES:
                finite = torch.isfinite(base).nonzero().flatten()
                picked = finite[base[finite].argsort(descending=True)[: _CHECKED_EXAMPLES - checked]]
                if picked.numel() and not _rules_agree_with_the_loop(objective, rules, take(batch, picked), rho=rho,
                                                                     alpha=alpha):
                    _warn_once(f"{name}: the per-layer rules disagree with the loop over examples (a parameter used "
                               "outside its module?); m = 1 sharpness uses vmap")
                    return None
                checked += picked.numel()
            bases.append(base)
            bests.append(best)
            bar.update(count)
    except _layer_rules.Unsupported as error:
        if bases:
            _warn_once(f"{name}: the per-layer rules stopped after {sum(b.numel() for b in bases)} examples "
                       f"({_first_sentence(error)}); m = 1 sharpness starts again with vmap")
        return None
    finally:
        bar.close()
    return _per_chunk_arrays(bases, bests, m=1, n_examples=objective.n_examples,
                             chunks_per_call=rules.examples_per_call, vectorised=True, method="layer_rules")


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """Float32 convolutions and matrix products in full precision (no TF32 on a GPU), restored after."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(matmul)


def _rules_agree_with_the_loop(objective: Objective, rules: _layer_rules.LayerRules, examples: Any, *, rho: float,
                               alpha: float) -> bool:
    """Whether the rules give the loop's ``(l_i(w), l_i(w + eps_i))`` on ``examples`` to within rounding:
    relative ``1e-3`` of the loss increase plus ``1e-5`` of the loss, both computed without TF32."""
    count = batch_size(examples)
    pieces = [take(examples, slice(i, i + 1)) for i in range(count)]
    origin = objective.params
    value_and_grad, value = _looped_evaluators(objective, _chunk_loss_fn(objective, origin, None), pieces, 1)
    zeros = {k: torch.zeros((), dtype=w.dtype, device=w.device).expand((count,) + w.shape) for k, w in origin.items()}
    with _full_float32():
        got = torch.stack(rules.sam_losses(examples, alpha, rho)).double()
        want = torch.stack(ascend(value_and_grad, value, zeros, rho, 2.0, 1, "pgd", alpha)).double()
    tolerance = 1e-3 * (want[1] - want[0]).abs() + 1e-5 * want.abs() + 1e-9
    return bool(((got - want).abs() <= tolerance).all())


def _chunk_groups(objective: Objective, m: int, group: int, seed: int) -> Iterator[tuple[Any, int]]:
    """``(batch of count * m examples, count)`` for every group of chunks, on the device.

    ``m = 1``: every example is its own chunk whatever the partition, and the data are read batch by batch
    (streamed data never need random access). ``m > 1``: the seeded random partition of all the examples;
    each group's examples are gathered from the source (:meth:`landscape.data.BatchSource.examples`).
    """
    if m == 1:
        for batch in objective.source:
            size = batch_size(batch)
            for start in range(0, size, group):
                yield take(batch, slice(start, start + group)), min(group, size - start)
        return
    chunks = _partition(objective.n_examples, m, seed)
    for start in range(0, chunks.shape[0], group):
        picked = chunks[start : start + group]
        yield objective.source.examples(picked.reshape(-1)), picked.shape[0]


def _chunk_result(measure: str, bases: np.ndarray, bests: np.ndarray, settings: dict[str, Any]) -> SharpnessResult:
    per_chunk = bests - bases
    n = per_chunk.shape[0]
    std_error = float(per_chunk.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return SharpnessResult(float(per_chunk.mean()), std_error, measure, settings, per_chunk)


def m_sharpness(
    model: nn.Module | None,
    loss_fn: LossFn | None,
    data: Data | None,
    m: int,
    rho: float,
    steps: int = 1,
    *,
    p: float = 2.0,
    adaptive: bool = False,
    eta: float = 0.0,
    ascent: str = "pgd",
    step_size: float | None = None,
    seed: int = 0,
    batched: bool = True,
    examples_per_call: int | None = None,
    layer_rules: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    objective: Objective | None = None,
    **objective_options: Any,
) -> SharpnessResult:
    """m-sharpness ``S_m(w)`` (Andriushchenko & Flammarion 2022, Eq. 3; Foret et al. 2021, Sec. 4.1).

    The mean over disjoint chunks of ``m`` examples of each chunk's worst loss increase in the ball
    ``||u||_p <= rho`` around ``w`` (perturbation ``c * u``; ``c = 1``, or ``|w| + eta`` when
    ``adaptive``), found by ``steps`` of ascent (see the module docstring). ``m = 1`` uses per-example
    gradients; ``m = N`` is the full-batch sharpness.

    Args:
        model, loss_fn, data: the objective (ignored when ``objective`` is given).
        m: chunk size, ``1 <= m <= N``.
        rho: radius of the ball.
        steps: ascent steps ``k >= 1`` (``k = 1`` is the SAM step).
        p: 2 or ``math.inf``.
        adaptive: scale the perturbation by ``c = |w| + eta`` (adaptive sharpness).
        eta: offset of ``c`` when ``adaptive``.
        ascent: ``"pgd"`` or ``"apgd"``.
        step_size: PGD step ``alpha`` (default ``rho``).
        seed: seed of the random partition into chunks.
        batched: vectorise over chunks with ``torch.vmap`` (``False``: a Python loop over chunks).
        examples_per_call: examples evaluated in one vmapped call (chunk size x chunks; default 128 on
            the CPU, 1024 on a GPU; the layer rules take fewer where what they keep would pass ``2**27``
            values on the CPU, a quarter of the free memory on a GPU); chunks larger than this are evaluated
            one at a time in sub-batches of this size.
        layer_rules: for ``m = 1`` with one step, ``p = 2`` and ``adaptive=False`` (with ``batched``), compute
            every example's SAM point by per-layer rules (:mod:`landscape._layer_rules`: no per-example
            weights) where they cover the model; ``False``: vmap. ``settings["method"]`` says which ran.
        dtype, device, batch_size: passed to :class:`~landscape.objective.Objective`.
        progress: show a progress bar.
        objective: an objective built by :func:`sharpness_objective`, shared between calls.

    Returns:
        :class:`SharpnessResult` with ``.value``, ``.std_error`` (over chunks), ``.per_chunk`` and
        ``.settings``.
    """
    m = check_int("m", m, 1)
    rho = _check_rho("rho", rho)
    steps = check_int("steps", steps, 1)
    p = _check_p(p)
    ascent = _check_choice("ascent", ascent, ASCENTS)
    if step_size is not None:
        step_size = _check_rho("step_size", step_size)
    objective = _objective_of(model, loss_fn, data, objective, dtype=dtype, device=device, batch_size=batch_size,
                              **objective_options)
    scale = _scale(objective.params, adaptive, eta)
    bases, bests, info = _worst_case(
        objective, m=m, rho=rho, p=p, steps=steps, ascent=ascent, step_size=step_size, scale=scale, seed=seed,
        batched=batched, examples_per_call=examples_per_call, progress=progress, desc=f"sharpness m={m}",
        layer_rules=layer_rules,
    )
    measure = "adaptive_worst" if adaptive else "m_sharpness"
    settings = {"rho": rho, "p": _p_name(p), "steps": steps, "ascent": ascent,
                "step_size": rho if step_size is None and ascent == "pgd" else step_size,
                "adaptive": adaptive, "eta": eta if adaptive else None, "seed": seed, **info}
    return _chunk_result(measure, bases, bests, settings)


def _p_name(p: float) -> float | str:
    return "inf" if p == math.inf else p


def m_sharpness_curve(
    model: nn.Module | None,
    loss_fn: LossFn | None,
    data: Data | None,
    ms: Sequence[int] = DEFAULT_MS,
    rho: float = 0.05,
    steps: int = 1,
    *,
    objective: Objective | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    **kwargs: Any,
) -> SharpnessCurve:
    """:func:`m_sharpness` for every chunk size in ``ms`` (default 1, 4, 16, 64, 256), sharing one objective.

    Chunk sizes larger than the dataset are an error; keyword arguments go to :func:`m_sharpness`.
    """
    if len(ms) == 0:
        raise ValueError("ms must list at least one chunk size")
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in OBJECTIVE_OPTIONS}
    objective = _objective_of(model, loss_fn, data, objective, dtype=dtype, device=device, batch_size=batch_size,
                              **options)
    results = [m_sharpness(None, None, None, m, rho, steps, objective=objective, **kwargs) for m in ms]
    return SharpnessCurve([r.settings["m"] for r in results], [r.value for r in results],
                          [r.std_error for r in results], results)


def adaptive_sharpness(
    model: nn.Module | None,
    loss_fn: LossFn | None,
    data: Data | None,
    rho: float,
    *,
    kind: str = "worst",
    p: float = 2.0,
    m: int | None = None,
    steps: int = 1,
    ascent: str = "pgd",
    eta: float = 0.0,
    noise: str = "gaussian",
    n_samples: int = 16,
    seed: int = 0,
    objective: Objective | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> SharpnessResult:
    """Adaptive sharpness with ``c = |w| + eta`` (Andriushchenko et al. 2023, Eq. 2-3; Kwon et al. 2021).

    ``kind="worst"``: :func:`m_sharpness` with ``adaptive=True`` (``m=None`` means one chunk, the whole
    dataset). ``kind="average"``: :func:`average_sharpness` with ``adaptive=True``. Both are invariant to
    rescaling a ReLU layer by ``a`` and the next by ``1 / a`` when ``eta = 0``.
    """
    kind = _check_choice("kind", kind, ("worst", "average"))
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in OBJECTIVE_OPTIONS}
    objective = _objective_of(model, loss_fn, data, objective, dtype=dtype, device=device, batch_size=batch_size,
                              **options)
    if kind == "average":
        if m is not None or steps != 1 or ascent != "pgd" or kwargs:
            ignored = [name for name, value in (("m", m is not None), ("steps", steps != 1), ("ascent", ascent != "pgd")) if value]
            raise ValueError(f"{ignored + sorted(kwargs)} apply to kind='worst' only; kind='average' draws noise "
                             "(use noise, n_samples, seed)")
        return average_sharpness(None, None, None, rho, p=p, adaptive=True, eta=eta, noise=noise,
                                 n_samples=n_samples, seed=seed, objective=objective, progress=progress)
    m = objective.n_examples if m is None else m
    return m_sharpness(None, None, None, m, rho, steps, p=p, adaptive=True, eta=eta, ascent=ascent, seed=seed,
                       objective=objective, progress=progress, **kwargs)


def _noise(params: Params, seed: int, kind: str, p: float) -> Params:
    """A seeded draw of ``z``: standard Gaussian, or uniform in the unit ``p``-ball (drawn on the CPU, so
    the same seed gives the same draw on every device)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "uniform" and p == math.inf:
        z = {k: torch.rand(w.shape, generator=generator, dtype=torch.float64) * 2 - 1 for k, w in params.items()}
    else:
        z = {k: torch.randn(w.shape, generator=generator, dtype=torch.float64) for k, w in params.items()}
        if kind == "uniform":  # uniform in the l2 ball: a uniform direction times radius U^(1/n)
            n = sum(t.numel() for t in z.values())
            radius = torch.rand((), generator=generator, dtype=torch.float64) ** (1.0 / n)
            norm = torch.sqrt(sum(t.pow(2).sum() for t in z.values()))
            z = {k: t * (radius / norm) for k, t in z.items()}
    return {k: z[k].to(params[k].device, params[k].dtype) for k in params}


def average_sharpness(
    model: nn.Module | None,
    loss_fn: LossFn | None,
    data: Data | None,
    rho: float,
    *,
    noise: str = "gaussian",
    p: float = 2.0,
    adaptive: bool = True,
    eta: float = 0.0,
    n_samples: int = 16,
    seed: int = 0,
    objective: Objective | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    **objective_options: Any,
) -> SharpnessResult:
    """Average-case sharpness ``E_z[L(w + c * rho z)] - L(w)`` (Andriushchenko et al. 2023, Eq. 3).

    ``noise="gaussian"``: ``z ~ N(0, I)`` (so the perturbation is ``N(0, rho^2 diag(c^2))``);
    ``"uniform"``: ``z`` uniform in the unit ``p``-ball. ``c = |w| + eta`` when ``adaptive`` else 1.
    Estimated with ``n_samples`` seeded draws (draw ``j`` uses seed ``seed + j``); the standard error is
    the spread of the draws over ``sqrt(n_samples)``.
    """
    rho = _check_rho("rho", rho)
    p = _check_p(p)
    noise = _check_choice("noise", noise, NOISES)
    n_samples = check_int("n_samples", n_samples, 1)
    objective = _objective_of(model, loss_fn, data, objective, dtype=dtype, device=device, batch_size=batch_size,
                              **objective_options)
    origin = objective.params
    scale = _scale(origin, adaptive, eta)
    base = float(objective.loss(origin))
    increases = []
    for j in progress_bar(range(n_samples), desc=f"average sharpness ({noise})", unit="draw", enabled=progress, leave=False):
        z = _noise(origin, seed + j, noise, p)
        c = scale if scale is not None else {k: 1.0 for k in origin}
        params = {k: origin[k] + rho * c[k] * z[k] for k in origin}
        increases.append(float(objective.loss(params)) - base)
    values = np.asarray(increases)
    std_error = float(values.std(ddof=1) / math.sqrt(n_samples)) if n_samples > 1 else None
    settings = {"rho": rho, "noise": noise, "p": _p_name(p), "adaptive": adaptive, "eta": eta if adaptive else None,
                "n_samples": n_samples, "seed": seed, "loss": base}
    return SharpnessResult(float(values.mean()), std_error, "average", settings, values)


def keskar_sharpness(
    model: nn.Module | None,
    loss_fn: LossFn | None,
    data: Data | None,
    epsilon: float = 1e-3,
    steps: int = 10,
    *,
    ascent: str = "apgd",
    objective: Objective | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    **objective_options: Any,
) -> SharpnessResult:
    """Keskar et al. 2017 epsilon-sharpness (Eq. 4), in percent, in the full parameter space (``A = I``):

    .. math::

        \\phi_\\epsilon = 100 \\cdot \\frac{\\max_{y \\in C_\\epsilon} L(w + y) - L(w)}{1 + L(w)},\\qquad
        C_\\epsilon = \\{y : |y_i| \\le \\epsilon (|w_i| + 1)\\},

    with the box maximum found by ``steps`` of ascent (``ascent``, default Auto-PGD) instead of the
    paper's L-BFGS-B.
    """
    epsilon = _check_rho("epsilon", epsilon)
    steps = check_int("steps", steps, 1)
    ascent = _check_choice("ascent", ascent, ASCENTS)
    objective = _objective_of(model, loss_fn, data, objective, dtype=dtype, device=device, batch_size=batch_size,
                              **objective_options)
    scale = _scale(objective.params, True, 1.0)
    bases, bests, info = _worst_case(
        objective, m=None, rho=epsilon, p=math.inf, steps=steps, ascent=ascent, step_size=None, scale=scale, seed=0,
        batched=False, examples_per_call=None, progress=progress, desc="keskar sharpness",
    )
    # bases/bests are sub-batch-weighted means over the whole (single-chunk) dataset
    base, best = float(bases[0]), float(bests[0])
    settings = {"epsilon": epsilon, "steps": steps, "ascent": ascent, "loss": base, "max_loss": best,
                "n_examples": info["n_examples"]}
    return SharpnessResult(100.0 * (best - base) / (1.0 + base), None, "keskar", settings)


def pac_bayes_flatness(
    model: nn.Module | None,
    loss_fn: LossFn | None,
    data: Data | None,
    *,
    accuracy_drop: float = 0.1,
    magnitude_aware: bool = False,
    epsilon: float = 1e-3,
    n_samples: int = 8,
    sigma_range: tuple[float, float] = (1e-6, 10.0),
    iterations: int = 20,
    seed: int = 0,
    objective: Objective | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    **objective_options: Any,
) -> SharpnessResult:
    """PAC-Bayes flatness ``1 / sigma'^2`` (Jiang et al. 2020, Sec. 4 and App. C.3, "pacbayes.flatness").

    ``sigma'`` is the largest ``sigma`` with ``acc(w) - E_z[acc(w + sigma s z)] <= accuracy_drop``,
    ``z ~ N(0, I)`` and ``s = 1`` (or, when ``magnitude_aware``, ``s_i^2 = |w_i|^2 + epsilon^2 / sigma^2``:
    noise variance ``sigma^2 w_i^2 + epsilon^2``, "pacbayes.mag.flatness"). Found by bisection on
    ``log sigma`` in ``sigma_range`` for ``iterations`` steps with the same ``n_samples`` seeded draws at
    every ``sigma`` (common random numbers), so the expected accuracy is a deterministic function of
    ``sigma``. If even the largest ``sigma`` keeps the drop within bounds, ``sigma'`` is that bound, and
    if even the smallest one exceeds it, ``sigma'`` is the smallest; either way ``settings["bracketed"]``
    is False.
    """
    if not 0 < accuracy_drop < 1:
        raise ValueError(f"accuracy_drop must be in (0, 1); got {accuracy_drop!r}")
    lo, hi = sigma_range
    if not 0 < lo < hi:
        raise ValueError(f"sigma_range must be (low, high) with 0 < low < high; got {sigma_range!r}")
    n_samples = check_int("n_samples", n_samples, 1)
    iterations = check_int("iterations", iterations, 1)
    objective = _objective_of(model, loss_fn, data, objective, dtype=dtype, device=device, batch_size=batch_size,
                              **objective_options)
    origin = objective.params
    _, accuracy = objective.loss_and_accuracy(origin)
    target = accuracy - accuracy_drop

    def mean_accuracy(sigma: float) -> tuple[float, float]:
        accs = []
        for j in range(n_samples):
            z = _noise(origin, seed + j, "gaussian", 2.0)
            if magnitude_aware:
                params = {k: w + torch.sqrt(sigma**2 * w.pow(2) + epsilon**2) * z[k] for k, w in origin.items()}
            else:
                params = {k: w + sigma * z[k] for k, w in origin.items()}
            accs.append(objective.loss_and_accuracy(params)[1])
        arr = np.asarray(accs)
        return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(n_samples)) if n_samples > 1 else 0.0

    bar = progress_bar(total=iterations + 1, desc="pac-bayes bisection", unit="step", enabled=progress, leave=False)
    acc_hi, se_hi = mean_accuracy(hi)
    bar.update()
    bracketed = acc_hi < target
    acc_at, se_at = acc_hi, se_hi
    low_ok = True
    if bracketed:
        acc_at, se_at = mean_accuracy(lo)
        low_ok = acc_at >= target  # False: even the smallest sigma drops accuracy too much
        for _ in range(iterations if low_ok else 0):
            mid = math.sqrt(lo * hi)
            acc_mid, se_mid = mean_accuracy(mid)
            if acc_mid >= target:
                lo, acc_at, se_at = mid, acc_mid, se_mid
            else:
                hi = mid
            bar.update()
    bar.close()
    sigma = lo if bracketed else hi
    settings = {"sigma": sigma, "accuracy": accuracy, "accuracy_drop": accuracy_drop,
                "perturbed_accuracy": acc_at, "perturbed_accuracy_std_error": se_at,
                "magnitude_aware": magnitude_aware, "epsilon": epsilon if magnitude_aware else None,
                "n_samples": n_samples, "iterations": iterations, "seed": seed, "bracketed": bracketed and low_ok}
    return SharpnessResult(1.0 / sigma**2, None, "pac_bayes", settings)


# ------------------------------------------------------------------------------------ every measure
CURVE_MEASURES = ("m_sharpness", "adaptive_l2", "adaptive_linf")
SCALAR_MEASURES = ("average", "keskar", "pac_bayes", "pac_bayes_mag", "lambda_max")
MEASURES = CURVE_MEASURES + SCALAR_MEASURES


@dataclass(frozen=True)
class MeasureSettings:
    """Which measures :func:`measure_all` computes, and how; saved with its results.

    The curve measures are worst-case sharpness as a function of ``m`` (over ``ms``): plain l2
    (``rho``), adaptive l2 (``adaptive_rho``) and adaptive l-infinity (``adaptive_rho_inf``). The
    scalar ones: average-case adaptive sharpness with Gaussian noise (``average_rho``), Keskar
    sharpness, PAC-Bayes flatness (plain and magnitude-aware) and the top Hessian eigenvalue. Every value
    is "larger is sharper" (PAC-Bayes as ``1 / sigma'^2``).
    """

    measures: tuple[str, ...] = MEASURES
    ms: tuple[int, ...] = DEFAULT_MS
    rho: float = 0.05
    adaptive_rho: float = 0.5
    adaptive_rho_inf: float = 0.005
    average_rho: float = 0.05
    steps: int = 1
    ascent: str = "pgd"
    n_samples: int = 16
    keskar_epsilon: float = 1e-3
    keskar_steps: int = 10
    pac_bayes_samples: int = 8
    pac_bayes_iterations: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.measures) - set(MEASURES))
        if unknown or not self.measures:
            raise ValueError(f"unknown measures {unknown}; choose from {MEASURES}")
        if not self.ms:
            raise ValueError("ms must list at least one chunk size")
        for m in self.ms:
            check_int("m", m, 1)
        for name in ("rho", "adaptive_rho", "adaptive_rho_inf", "average_rho", "keskar_epsilon"):
            _check_rho(name, getattr(self, name))
        _check_choice("ascent", self.ascent, ASCENTS)
        for name in ("steps", "n_samples", "keskar_steps", "pac_bayes_samples", "pac_bayes_iterations"):
            check_int(name, getattr(self, name), 1)

    def to_dict(self) -> dict[str, Any]:
        return {f: list(v) if isinstance(v, tuple) else v for f, v in self.__dict__.items()}


def measure_all(objective: Objective, settings: MeasureSettings = MeasureSettings(), *, progress: bool = True) -> dict[str, Any]:
    """Every measure in ``settings.measures`` at the objective's weights, as a JSON-ready dict.

    Returns ``{"settings": ..., "measures": {name: result}}``; a curve measure's result has lists
    ``"m"``, ``"value"``, ``"std_error"`` (see :class:`SharpnessCurve`), a scalar one ``"value"`` (see
    :class:`SharpnessResult`). The per-chunk values of the curves are under ``"per_chunk"`` as numpy
    arrays keyed ``"{measure}_m{m}"`` (not JSON; save them with ``.npz``).
    """
    s = settings
    ms = [m for m in s.ms if m <= objective.n_examples]
    if len(ms) < len(s.ms):
        raise ValueError(f"every m must be at most the number of examples ({objective.n_examples}); got ms={list(s.ms)}")
    common = {"steps": s.steps, "ascent": s.ascent, "seed": s.seed, "progress": progress}
    curves = {
        "m_sharpness": {"rho": s.rho},
        "adaptive_l2": {"rho": s.adaptive_rho, "adaptive": True},
        "adaptive_linf": {"rho": s.adaptive_rho_inf, "adaptive": True, "p": math.inf},
    }
    measures: dict[str, Any] = {}
    per_chunk: dict[str, np.ndarray] = {}
    for name, kwargs in curves.items():
        if name in s.measures:
            rho = kwargs.pop("rho")
            curve = m_sharpness_curve(None, None, None, ms, rho, objective=objective, **common, **kwargs)
            measures[name] = curve.to_dict()
            per_chunk.update({f"{name}_m{m}": r.per_chunk for m, r in zip(curve.m, curve.results)})
    if "average" in s.measures:
        measures["average"] = average_sharpness(None, None, None, s.average_rho, n_samples=s.n_samples, seed=s.seed,
                                                objective=objective, progress=progress).to_dict()
    if "keskar" in s.measures:
        measures["keskar"] = keskar_sharpness(None, None, None, s.keskar_epsilon, s.keskar_steps,
                                              objective=objective, progress=progress).to_dict()
    for name, magnitude_aware in (("pac_bayes", False), ("pac_bayes_mag", True)):
        if name in s.measures:
            measures[name] = pac_bayes_flatness(None, None, None, magnitude_aware=magnitude_aware, n_samples=s.pac_bayes_samples,
                                                iterations=s.pac_bayes_iterations, seed=s.seed, objective=objective,
                                                progress=progress).to_dict()
    if "lambda_max" in s.measures:
        eig = top_eigenpairs(objective.hessian_operator(), k=1, which="LA", tol=1e-3, seed=s.seed, progress=progress)
        measures["lambda_max"] = {"measure": "lambda_max", "value": float(eig.eigenvalues[0]), "std_error": None,
                                  "n_matvecs": eig.n_matvecs, "converged": bool(eig.converged), "tol": 1e-3}
    return {"settings": s.to_dict(), "measures": measures, "per_chunk": per_chunk}


def measure_columns(result: dict[str, Any]) -> dict[str, float]:
    """Flatten :func:`measure_all`'s result to ``{"m_sharpness@m=16": value, "keskar": value, ...}``."""
    columns = {}
    for name, entry in result["measures"].items():
        if isinstance(entry["value"], list):
            columns.update({f"{name}@m={m}": v for m, v in zip(entry["m"], entry["value"])})
        else:
            columns[name] = entry["value"]
    return columns
