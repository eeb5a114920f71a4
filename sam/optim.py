"""Sharpness-Aware Minimization and its variants as wrappers around an already-built torch optimizer.

Every class here wraps a ``torch.optim.Optimizer`` that the user built (``SGD``, ``AdamW``, ...). The
wrapper only moves the weights: it perturbs them to ``w + eps`` before the second gradient evaluation
and restores them bit for bit before the base optimizer steps. The base optimizer's ``param_groups``,
``state`` and learning-rate schedulers stay the base's (``sam.param_groups is base.param_groups``).

Two ways to drive a step, both following ``torch.optim`` conventions:

* ``opt.step(closure)``: ``closure()`` zeroes the gradients, runs forward and backward and returns the
  loss; it is called ``1 + opt.ascent_steps`` times. Inside it, ``opt.is_perturbed`` tells whether the
  weights are currently perturbed (e.g. to freeze BatchNorm statistics with :func:`frozen_running_stats`).
* a hand-written loop: backward, ``opt.first_step(zero_grad=True)``, backward again,
  ``opt.second_step(zero_grad=True)``; ``opt.restore()`` may be called before ``second_step`` to clip the
  final gradient.

Mixed precision: pass a ``torch.amp.GradScaler`` as ``grad_scaler``. The perturbation direction is
invariant to the loss scale, so the first pass needs no unscaling; a non-finite first-pass gradient skips
the whole step (the weights are left untouched, the scaler records the overflow and backs off at its
next ``update()``).

References:
    Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for Efficiently Improving
    Generalization. ICLR 2021 (Eq. 2 perturbation, Eq. 3 gradient, Sec. 4.1 m-sharpness).
    Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware Minimization. ICML 2021 (Eq. 9).
    Zhuang et al. Surrogate Gap Guided Sharpness-Aware Minimization. ICLR 2022 (Alg. 1).
    Andriushchenko & Flammarion. Towards Understanding Sharpness-Aware Minimization. ICML 2022
    (multi-step ascent).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .perturbation import dual_direction_, dual_exponent, global_norm, project_

__all__ = [
    "SAM",
    "ASAM",
    "MSAM",
    "GSAM",
    "MultiStepSAM",
    "EveryKSAM",
    "OPTIMIZERS",
    "BASE_OPTIMIZERS",
    "available_optimizers",
    "create",
    "frozen_running_stats",
]

_SAM_GROUP_KEYS = ("rho", "adaptive", "eta")


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run forward passes in train mode without touching BatchNorm running statistics.

    SAM's second pass must normalise with the batch statistics (as in pass 1) but must not update
    ``running_mean``, ``running_var`` or ``num_batches_tracked``: each step updates them once. Setting
    ``track_running_stats = False`` for the duration does exactly that, also for ``momentum=None``.
    """
    norms = []
    if enabled:
        norms = [
            m
            for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        ]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def _unlinked(optimizer: Any, key: str, name: str) -> Any:
    """What ``torch.optim.Optimizer.__init__`` stored before the wrapper is linked to its base optimizer.

    An AttributeError (not a KeyError) where there is none, so that wrappers which proxy attributes
    through ``__getattr__`` (Lightning's ``LightningOptimizer`` subclasses our class) reach the real one.
    """
    try:
        return optimizer.__dict__[key]
    except KeyError:
        raise AttributeError(f"{type(optimizer).__name__} has no {name} of its own") from None


@dataclass
class _Active:
    """The parameters perturbed in the current step and their per-tensor settings."""

    params: list[Tensor]
    rhos: list[float]
    adaptive: list[int]  # indices of tensors with T = |w| + eta
    plain: list[int]  # indices of tensors with T = 1


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization around an already-built base optimizer (Foret et al. 2021).

    Each step solves ``min_w max_{||eps||_p <= rho} L_B(w + eps)`` to first order:

    .. math::

        \epsilon^\star = \rho\,\frac{\operatorname{sign}(g)\,|g|^{q-1}}{(\|g\|_q^q)^{1/p}}
        \quad\text{(Eq. 2)},\qquad
        w \leftarrow \text{base\_step}\big(w,\ \nabla L_B(w)\big|_{w+\epsilon^\star}\big)\quad\text{(Eq. 3)}.

    With ``adaptive=True`` the ball is ``||T^{-1} eps||_p <= rho`` with ``T = |w| + eta`` on weight
    tensors (ASAM, Kwon et al. 2021, Eq. 9: ``eps = rho T^2 g / ||T g||_2`` for ``p = 2``); tensors of
    one dimension or fewer (biases, norm parameters) keep ``T = 1`` unless ``adaptive_biases=True``.

    ``rho``, ``adaptive`` and ``eta`` are stored in each param group, so per-group values and
    schedules work; ``p`` is global.

    Args:
        base_optimizer: a built ``torch.optim.Optimizer`` over the model's parameters.
        rho: radius of the perturbation ball (paper default 0.05; 0.5-2.0 is typical for ASAM).
        adaptive: use ASAM's scale-invariant ball.
        eta: ASAM's offset in ``T = |w| + eta``.
        p: the ball's norm, ``p > 1`` or ``math.inf`` (``p = 2`` default, ``inf`` gives ``rho sign(g)``).
        adaptive_biases: also scale 0-d/1-d tensors by ``|w| + eta`` when ``adaptive``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
    """

    _single_ascent = True  # first_step is called once per step (MultiStepSAM: several times)

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        p: float = 2.0,
        *,
        adaptive_biases: bool = False,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{type(self).__name__} wraps an already-built torch.optim.Optimizer, e.g. "
                f"{type(self).__name__}(torch.optim.SGD(model.parameters(), lr=0.1)); "
                f"got {type(base_optimizer).__name__}"
            )
        if isinstance(base_optimizer, SAM):
            raise TypeError(f"{type(self).__name__} cannot wrap another SAM optimizer; wrap its base")
        _check_float("rho", rho, minimum=0.0)
        _check_float("eta", eta, minimum=0.0)
        dual_exponent(p)
        self.base_optimizer = base_optimizer
        self.p = float(p)
        self.adaptive_biases = bool(adaptive_biases)
        sam_defaults = {"rho": float(rho), "adaptive": bool(adaptive), "eta": float(eta)}
        params = [w for group in base_optimizer.param_groups for w in group["params"]]
        super().__init__(params, dict(sam_defaults))
        # From here on, param_groups and state are the base optimizer's own objects.
        self.__dict__["_linked"] = True
        for key in ("_init_param_groups", "_init_state"):
            self.__dict__.pop(key, None)
        self.defaults = {**base_optimizer.defaults, **sam_defaults}
        for group in base_optimizer.param_groups:
            self._init_group(group)
        self._scratch: dict[str, dict[Tensor, Tensor]] = {}
        self._active: _Active | None = None
        self._skipped = False
        self.step_count = 0

    # -- param_groups and state are the base optimizer's -------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        if self.__dict__.get("_linked"):
            return self.base_optimizer.param_groups
        return _unlinked(self, "_init_param_groups", "param_groups")

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self.__dict__.get("_linked"):
            self.base_optimizer.param_groups = value
        else:
            self.__dict__["_init_param_groups"] = value

    @property
    def state(self) -> dict[Tensor, Any]:  # type: ignore[override]
        if self.__dict__.get("_linked"):
            return self.base_optimizer.state
        return _unlinked(self, "_init_state", "state")

    @state.setter
    def state(self, value: dict[Tensor, Any]) -> None:
        if self.__dict__.get("_linked"):
            self.base_optimizer.state = value
        else:
            self.__dict__["_init_state"] = value

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer, with this wrapper's defaults for rho, adaptive, eta."""
        if not self.__dict__.get("_linked"):
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        self._init_group(self.base_optimizer.param_groups[-1])

    def _init_group(self, group: dict[str, Any]) -> None:
        """Fill in this wrapper's per-group settings where the group does not set them itself.

        A base optimizer built with per-group values (``SGD([{"params": a, "rho": 0.0}, ...])``) keeps
        them; groups restored from a plain base-optimizer checkpoint get the wrapper's defaults.
        """
        for key in _SAM_GROUP_KEYS:
            group.setdefault(key, self.defaults[key])

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"sam"`` entry with this wrapper's counters.

        The perturbation buffers are scratch space and are not saved.
        """
        state = self.base_optimizer.state_dict()
        state["sam"] = self._extra_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        extra = state.pop("sam", {})
        self.base_optimizer.load_state_dict(state)
        for group in self.param_groups:
            self._init_group(group)
        self._load_extra_state(extra)
        self._active = None
        self._skipped = False

    def _extra_state(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.step_count = int(extra.get("step_count", 0))

    # -- the step protocol -------------------------------------------------------------------------

    @property
    def ascent_steps(self) -> int:
        """How many ascent (perturbation) passes the next step makes: 1 for SAM, 0 skips SAM."""
        return 1

    @property
    def is_perturbed(self) -> bool:
        """True between ``first_step`` and ``restore``/``second_step``: the weights are ``w + eps``."""
        return self._active is not None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> bool:
        """Move the weights to ``w + eps`` using the gradient currently in ``.grad``.

        Parameters whose ``.grad`` is None are skipped (not perturbed, not restored). Calling it again
        before ``second_step`` takes a further ascent step from the perturbed point
        (:class:`MultiStepSAM`).

        Args:
            zero_grad: zero the gradients afterwards, ready for the second pass.
            grad_scaler: the ``GradScaler`` of an fp16 AMP loop. Only then is the gradient norm read
                back to the host, to skip the step on overflow.

        Returns:
            False if the step was skipped because the gradient was not finite (AMP only): the weights
            are untouched, no second pass is needed and ``second_step`` does nothing.
        """
        starting = self._active is None
        if starting:
            self._active = self._collect()
            if self._active.params:
                torch._foreach_copy_(self._buffers("w0", self._active.params), self._active.params)
                if self._active.adaptive:
                    self._compute_scales(self._active)
        active = self._active
        if not active.params:
            if zero_grad:
                self.zero_grad()
            return True

        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in active.params]
        if self._single_ascent and self.p == 2.0 and not active.adaptive:
            if not self._euclidean_step(active, grads, starting, grad_scaler):
                if zero_grad:
                    self.zero_grad()
                return False
            if starting:
                self._on_first_gradient(active, grads)
            if zero_grad:
                self.zero_grad()
            return True

        direction = self._buffers("direction", active.params)
        torch._foreach_copy_(direction, grads)
        if active.adaptive:
            torch._foreach_mul_(_pick(direction, active.adaptive), self._scales(active))
        if _amp_enabled(grad_scaler) and not _all_finite(grads):
            self._skip(grad_scaler)
            if zero_grad:
                self.zero_grad()
            return False
        dual_direction_(direction, self.p)
        delta = self._ascend(direction, starting)
        self._move_to(active, delta, from_backup=not starting)
        if starting:
            self._on_first_gradient(active, grads)
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put the weights back to ``w`` bit for bit and leave the update's gradient in ``.grad``.

        Idempotent. ``second_step`` calls it; call it yourself first to clip or inspect the final
        gradient (e.g. ``clip_grad_norm_``: clipping applies to the final gradient only).
        """
        if self._active is None:
            return
        if self._active.params:
            torch._foreach_copy_(self._active.params, self._buffers("w0", self._active.params))
            self._finalize_gradient(self._active)
        self._active = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore ``w`` and step the base optimizer with the gradient taken at ``w + eps`` (Eq. 3)."""
        if self._skipped:
            self._skipped = False
        else:
            self.restore()
            if _amp_enabled(grad_scaler):
                grad_scaler.step(self.base_optimizer)
            else:
                self.base_optimizer.step()
            self.step_count += 1
            # An LR scheduler attached to this wrapper wraps step() to set this flag; a loop that
            # drives first_step/second_step has stepped all the same.
            self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, grad_scaler: torch.amp.GradScaler | None = None
    ) -> Tensor:
        """One full SAM update; ``closure`` zeroes grads, runs forward and backward, returns the loss.

        Returns:
            The loss at the unperturbed weights (the first call of ``closure``).
        """
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step needs a closure that zeroes the gradients, runs forward and "
                "backward and returns the loss; or call first_step() and second_step() yourself"
            )
        closure = torch.enable_grad()(closure)
        loss = closure()
        for _ in range(self.ascent_steps):
            if not self.first_step(zero_grad=True, grad_scaler=grad_scaler):
                self.second_step(grad_scaler=grad_scaler)
                return loss
            closure()
        self.second_step(grad_scaler=grad_scaler)
        return loss

    def _euclidean_step(
        self, active: _Active, grads: list[Tensor], starting: bool, grad_scaler: torch.amp.GradScaler | None
    ) -> bool:
        """The common case, ``eps = rho g / ||g||_2``, in one fused pass over the weights.

        ``w <- w + s g`` with the 0-dim device tensor ``s = rho / ||g||``: a broadcast ``addcmul_`` on
        the CPU (one read of ``w`` and ``g``, one write), ``mul`` + ``add_`` fused kernels on a GPU.
        """
        if _amp_enabled(grad_scaler) and not _all_finite(grads):
            self._skip(grad_scaler)
            return False
        norm = global_norm(grads, 2.0)
        if not starting:
            torch._foreach_copy_(active.params, self._buffers("w0", active.params))
        inverse = 1.0 / norm.clamp_min(1e-12)
        scale_of = {rho: inverse * rho for rho in set(self._current_rhos(active))}
        scales = [scale_of[rho] for rho in self._current_rhos(active)]
        if active.params[0].device.type == "cpu":
            torch._foreach_addcmul_(active.params, grads, scales)
        else:
            torch._foreach_add_(active.params, torch._foreach_mul(grads, scales))
        return True

    # -- hooks for the variants --------------------------------------------------------------------

    def _current_rhos(self, active: _Active) -> list[float]:
        return active.rhos

    def _ascend(self, direction: list[Tensor], starting: bool) -> list[Tensor]:
        """Turn the unit direction into the perturbation ``delta`` (in T-scaled coordinates)."""
        torch._foreach_mul_(direction, self._current_rhos(self._active))
        return direction

    def _on_first_gradient(self, active: _Active, grads: list[Tensor]) -> None:
        """Called once per step with the gradient at ``w`` (GSAM keeps it)."""

    def _finalize_gradient(self, active: _Active) -> None:
        """Called after restoring ``w``: turn ``.grad`` into the update's gradient (GSAM combines)."""

    # -- internals ---------------------------------------------------------------------------------

    def _collect(self) -> _Active:
        params, rhos, adaptive, plain = [], [], [], []
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                (adaptive if group["adaptive"] and (w.ndim > 1 or self.adaptive_biases) else plain).append(
                    len(params)
                )
                params.append(w)
                rhos.append(float(group["rho"]))
        return _Active(params, rhos, adaptive, plain)

    def _compute_scales(self, active: _Active) -> None:
        """``T = |w| + eta`` for the adaptive tensors, kept for the whole step (Kwon et al. 2021)."""
        etas = {id(w): g["eta"] for g in self.param_groups for w in g["params"]}
        weights = _pick(active.params, active.adaptive)
        scales = self._buffers("scale", weights)
        torch._foreach_copy_(scales, weights)
        torch._foreach_abs_(scales)
        torch._foreach_add_(scales, [float(etas[id(w)]) for w in weights])

    def _scales(self, active: _Active) -> list[Tensor]:
        return self._buffers("scale", _pick(active.params, active.adaptive))

    def _move_to(self, active: _Active, delta: list[Tensor], from_backup: bool) -> None:
        """``w <- w0 + T delta``."""
        if from_backup:
            torch._foreach_copy_(active.params, self._buffers("w0", active.params))
        if active.plain:
            torch._foreach_add_(_pick(active.params, active.plain), _pick(delta, active.plain))
        if active.adaptive:
            torch._foreach_addcmul_(
                _pick(active.params, active.adaptive), self._scales(active), _pick(delta, active.adaptive)
            )

    def _skip(self, grad_scaler: torch.amp.GradScaler) -> None:
        """Abandon this step on a non-finite gradient: restore ``w`` and let the scaler back off."""
        if self._active is not None and self._active.params:
            torch._foreach_copy_(self._active.params, self._buffers("w0", self._active.params))
        self._active = None
        # The scaler unscales the non-finite gradient, records the overflow and does not step.
        grad_scaler.step(self.base_optimizer)
        self._skipped = True  # not counted in step_count: EveryKSAM retries the SAM step next time

    def _buffers(self, name: str, params: list[Tensor]) -> list[Tensor]:
        """Persistent scratch tensors shaped like ``params``, allocated once and reused every step."""
        store = self._scratch.setdefault(name, {})
        out = []
        for w in params:
            buf = store.get(w)
            if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
                buf = torch.empty_like(w, memory_format=torch.preserve_format)
                store[w] = buf
            out.append(buf)
        return out


class ASAM(SAM):
    """Adaptive SAM (Kwon et al. 2021): :class:`SAM` with ``adaptive=True`` and its typical rho.

    ``eps = rho T^2 g / ||T g||_2`` with ``T = |w| + eta`` on weight tensors (Eq. 9).
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.5,
        eta: float = 0.01,
        p: float = 2.0,
        *,
        adaptive_biases: bool = False,
    ) -> None:
        super().__init__(base_optimizer, rho=rho, adaptive=True, eta=eta, p=p, adaptive_biases=adaptive_biases)


class MultiStepSAM(SAM):
    """SAM whose inner maximisation takes ``steps`` projected normalised-gradient ascent steps.

    ``delta_{j+1} = Proj_{||delta||_p <= rho}(delta_j + alpha d_j)``, ``d_j`` the unit-``p`` ascent
    direction of the gradient at ``w + T delta_j`` (Andriushchenko & Flammarion 2022). One step costs
    ``steps + 1`` forward-backward passes. ``step_size`` defaults to ``rho``, so ``steps = 1`` is SAM and
    later steps move along the ball's surface.

    Args:
        steps: number of ascent steps ``k >= 1``.
        step_size: ``alpha``; ``None`` means each group's ``rho``.
    """

    _single_ascent = False

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        steps: int = 2,
        step_size: float | None = None,
        adaptive: bool = False,
        eta: float = 0.01,
        p: float = 2.0,
        *,
        adaptive_biases: bool = False,
    ) -> None:
        _check_int("steps", steps, minimum=1)
        if step_size is not None:
            _check_float("step_size", step_size, minimum=0.0)
        super().__init__(base_optimizer, rho=rho, adaptive=adaptive, eta=eta, p=p, adaptive_biases=adaptive_biases)
        self.steps = int(steps)
        self.step_size = step_size

    @property
    def ascent_steps(self) -> int:
        return self.steps

    def _ascend(self, direction: list[Tensor], starting: bool) -> list[Tensor]:
        active = self._active
        alphas = active.rhos if self.step_size is None else [self.step_size] * len(active.params)
        delta = self._buffers("delta", active.params)
        if starting:
            torch._foreach_zero_(delta)
        torch._foreach_add_(delta, torch._foreach_mul(direction, alphas))
        project_(delta, active.rhos, self.p)
        return delta


class EveryKSAM(SAM):
    """SAM on every ``k``-th step and a plain base-optimizer step otherwise.

    The cost per step averages ``1 + 1/k`` passes, between the base optimizer (``k -> inf``) and SAM
    (``k = 1``). The step counter is saved in the state dict so a resumed run keeps the phase.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        k: int = 2,
        adaptive: bool = False,
        eta: float = 0.01,
        p: float = 2.0,
        *,
        adaptive_biases: bool = False,
    ) -> None:
        _check_int("k", k, minimum=1)
        super().__init__(base_optimizer, rho=rho, adaptive=adaptive, eta=eta, p=p, adaptive_biases=adaptive_biases)
        self.k = int(k)

    @property
    def ascent_steps(self) -> int:
        return 1 if self.step_count % self.k == 0 else 0


class GSAM(SAM):
    r"""Surrogate-gap guided SAM (Zhuang et al. 2022, Alg. 1).

    With ``g`` the gradient at ``w`` and ``g_p`` the gradient at ``w + eps``, the update direction is

    .. math::

        g_p - \alpha\, g_\perp,\qquad g_\perp = g - \frac{\langle g, g_p\rangle}{\|g_p\|^2} g_p,

    which descends the perturbed loss while decreasing the surrogate gap. The radius follows the
    learning rate, ``rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)`` (Sec. 5.1),
    with ``lr_max`` each group's learning rate when GSAM was built (its ``initial_lr`` if a scheduler set
    one). ``rho_min=None`` keeps ``rho`` constant.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        alpha: float = 0.4,
        rho_min: float | None = None,
        lr_min: float = 0.0,
        adaptive: bool = False,
        eta: float = 0.01,
        p: float = 2.0,
        *,
        adaptive_biases: bool = False,
    ) -> None:
        _check_float("alpha", alpha, minimum=0.0)
        if rho_min is not None:
            _check_float("rho_min", rho_min, minimum=0.0)
        super().__init__(base_optimizer, rho=rho, adaptive=adaptive, eta=eta, p=p, adaptive_biases=adaptive_biases)
        self.alpha = float(alpha)
        self.rho_min = rho_min
        self.lr_min = float(lr_min)
        for group in self.param_groups:
            self._init_group(group)

    def _init_group(self, group: dict[str, Any]) -> None:
        super()._init_group(group)
        group.setdefault("gsam_lr_max", float(group.get("initial_lr", group["lr"])))

    def rho_t(self, group: dict[str, Any]) -> float:
        """This step's radius for ``group`` (Zhuang et al. 2022, Sec. 5.1)."""
        if self.rho_min is None:
            return float(group["rho"])
        lr_max, lr = group["gsam_lr_max"], float(group["lr"])
        if lr_max <= self.lr_min:
            return float(group["rho"])
        frac = min(max((lr - self.lr_min) / (lr_max - self.lr_min), 0.0), 1.0)
        return self.rho_min + (float(group["rho"]) - self.rho_min) * frac

    def _current_rhos(self, active: _Active) -> list[float]:
        rho_of = {id(w): self.rho_t(g) for g in self.param_groups for w in g["params"]}
        return [rho_of[id(w)] for w in active.params]

    def _on_first_gradient(self, active: _Active, grads: list[Tensor]) -> None:
        torch._foreach_copy_(self._buffers("grad_at_w", active.params), grads)

    def _finalize_gradient(self, active: _Active) -> None:
        params = [w for w in active.params if w.grad is not None]
        if not params or all(r == 0.0 for r in self._current_rhos(active)):
            # rho = 0 makes g_p = g, so g_perp = 0 analytically; skip the arithmetic to keep the
            # base optimizer's trajectory exact.
            return
        g_p = [w.grad for w in params]
        g = self._buffers("grad_at_w", params)
        dot = torch.stack([torch.sum(a * b) for a, b in zip(g, g_p)]).sum()
        sq_norm = torch.stack([torch.sum(b * b) for b in g_p]).sum()
        coef = dot / sq_norm.clamp_min(1e-24)
        # g_p - alpha (g - coef g_p) = (1 + alpha coef) g_p - alpha g
        torch._foreach_mul_(g_p, 1.0 + self.alpha * coef)
        torch._foreach_add_(g_p, g, alpha=-self.alpha)


class MSAM(SAM):
    """m-SAM (Foret et al. 2021, Sec. 4.1): each chunk of ``m`` examples gets its own perturbation.

    The batch is split into contiguous chunks of ``m`` examples; for each chunk the gradient at ``w``
    gives ``eps_c`` and the gradient of that chunk's loss at ``w + eps_c`` is accumulated, weighted by the
    chunk's share of the batch. The base optimizer then steps with the weighted average. With
    ``m >= batch size`` this is :class:`SAM`.

    ``step(closure, batch_size)`` calls ``closure(chunk)`` with a ``slice`` into the batch. In a
    hand-written loop, call :meth:`end_chunk` after each chunk's second pass, then ``second_step``.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        m: int = 16,
        adaptive: bool = False,
        eta: float = 0.01,
        p: float = 2.0,
        *,
        adaptive_biases: bool = False,
    ) -> None:
        _check_int("m", m, minimum=1)
        super().__init__(base_optimizer, rho=rho, adaptive=adaptive, eta=eta, p=p, adaptive_biases=adaptive_biases)
        self.m = int(m)
        self._accumulated: set[Tensor] = set()

    def chunks(self, batch_size: int) -> list[slice]:
        """Contiguous slices of ``m`` examples covering a batch (the last may be shorter)."""
        _check_int("batch_size", batch_size, minimum=1)
        return [slice(i, min(i + self.m, batch_size)) for i in range(0, batch_size, self.m)]

    @torch.no_grad()
    def end_chunk(self, weight: float) -> None:
        """Restore ``w``, add ``weight`` times the chunk's perturbed gradient to the total, zero grads."""
        if self._active is not None and self._active.params:
            torch._foreach_copy_(self._active.params, self._buffers("w0", self._active.params))
        self._active = None
        with_grad = [w for group in self.param_groups for w in group["params"] if w.grad is not None]
        if with_grad:
            total = self._buffers("chunk_sum", with_grad)
            fresh = [i for i, w in enumerate(with_grad) if w not in self._accumulated]
            if fresh:
                torch._foreach_zero_(_pick(total, fresh))
            torch._foreach_add_(total, [w.grad for w in with_grad], alpha=float(weight))
            self._accumulated.update(with_grad)
        self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        if self._active is not None and self._accumulated:
            raise RuntimeError("MSAM: call end_chunk(weight) after each chunk's second pass, before second_step")
        super().restore()
        if self._accumulated:
            params = [w for group in self.param_groups for w in group["params"] if w in self._accumulated]
            for w, total in zip(params, self._buffers("chunk_sum", params)):
                if w.grad is None:
                    w.grad = total.clone()
                else:
                    w.grad.copy_(total)
            self._accumulated.clear()

    def _skip(self, grad_scaler: torch.amp.GradScaler) -> None:
        self._accumulated.clear()
        super()._skip(grad_scaler)

    def step(  # type: ignore[override]
        self,
        closure: Callable[[slice], Tensor] | None = None,
        batch_size: int | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """One m-SAM update; ``closure(chunk)`` runs forward and backward on ``batch[chunk]``.

        Returns:
            The batch loss at ``w``: the chunk losses averaged with the chunks' weights.
        """
        if closure is None or batch_size is None:
            raise RuntimeError(
                "MSAM.step needs closure(chunk: slice) and batch_size: the closure runs forward and backward "
                "on batch[chunk] and returns the loss"
            )
        closure = torch.enable_grad()(closure)
        total = None
        for chunk in self.chunks(batch_size):
            weight = (chunk.stop - chunk.start) / batch_size
            loss = closure(chunk).detach() * weight
            total = loss if total is None else total + loss
            if not self.first_step(zero_grad=True, grad_scaler=grad_scaler):
                self.second_step(grad_scaler=grad_scaler)
                return total
            closure(chunk)
            self.end_chunk(weight)
        self.second_step(grad_scaler=grad_scaler)
        return total


OPTIMIZERS: dict[str, type[SAM]] = {
    "sam": SAM,
    "asam": ASAM,
    "msam": MSAM,
    "gsam": GSAM,
    "multistep_sam": MultiStepSAM,
    "every_k_sam": EveryKSAM,
}
"""The SAM-family wrappers by registry name."""

BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
"""Base optimizers that :func:`create` can build (and use alone)."""


def available_optimizers() -> list[str]:
    """Every name :func:`create` accepts."""
    return sorted({*BASE_OPTIMIZERS, *OPTIMIZERS})


def wrapper_arguments(name: str) -> list[str]:
    """The keyword arguments that the registered wrapper ``name`` takes (the rest go to the base)."""
    signature = inspect.signature(OPTIMIZERS[name].__init__)
    return [k for k in signature.parameters if k not in ("self", "base_optimizer")]


def wrapper_defaults(name: str) -> dict[str, Any]:
    """The default of every keyword argument of the registered wrapper ``name``.

    Example:
        >>> wrapper_defaults("asam")["rho"]
        0.5
    """
    signature = inspect.signature(OPTIMIZERS[name].__init__)
    return {k: p.default for k, p in signature.parameters.items()
            if k not in ("self", "base_optimizer") and p.default is not inspect.Parameter.empty}


def create(name: str, params: Any, *, base: str = "sgd", **kwargs: Any) -> torch.optim.Optimizer:
    """Build a registered optimizer by name.

    Keyword arguments that the wrapper takes (``rho``, ``m``, ``alpha``, ...) go to the wrapper; the
    rest (``lr``, ``momentum``, ``weight_decay``, ...) go to the base optimizer ``base``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = create("sam", model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
        >>> type(opt).__name__, type(opt.base_optimizer).__name__
        ('SAM', 'SGD')
    """
    key, base_key = name.lower(), base.lower()
    if base_key not in BASE_OPTIMIZERS:
        raise ValueError(f"unknown base optimizer {base!r}; choose one of {sorted(BASE_OPTIMIZERS)}")
    if key in BASE_OPTIMIZERS:
        return BASE_OPTIMIZERS[key](params, **kwargs)
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {available_optimizers()}")
    accepted = set(wrapper_arguments(key))
    family = {k for cls in OPTIMIZERS.values() for k in inspect.signature(cls.__init__).parameters}
    misplaced = sorted(k for k in kwargs if k in family and k not in accepted)
    if misplaced:
        raise ValueError(f"{key} does not take {misplaced}; it accepts {sorted(accepted)} plus the base optimizer's arguments")
    wrapper_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in accepted}
    return OPTIMIZERS[key](BASE_OPTIMIZERS[base_key](params, **kwargs), **wrapper_kwargs)


def _pick(items: list[Tensor], indices: list[int]) -> list[Tensor]:
    return [items[i] for i in indices]


def _amp_enabled(grad_scaler: torch.amp.GradScaler | None) -> bool:
    return grad_scaler is not None and grad_scaler.is_enabled()


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element is finite, judged like ``GradScaler`` does: element by element.

    The max-norm is finite exactly when all elements are (a 2-norm can overflow on finite values).
    This reads the result back to the host; it runs only in the fp16 AMP path, where ``GradScaler``
    synchronises every step anyway.
    """
    return bool(torch.isfinite(global_norm(tensors, math.inf)))


def _check_float(name: str, value: float, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}; got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
