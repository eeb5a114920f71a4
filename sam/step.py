"""One training step for any optimizer: plain torch optimizers and every SAM variant.

:func:`train_step` is the single place that knows how the passes of a step are ordered, so the
trainer, the benchmarks and hand-written loops share it:

* pass 1 at ``w`` (BatchNorm running statistics updated here, once per step);
* ``optimizer.ascent_steps`` ascent passes at ``w + eps`` with running statistics frozen;
* m-SAM repeats both per chunk of ``m`` examples (statistics updated by the first chunk only, as
  DistributedDataParallel keeps rank 0's buffers);
* restore ``w``, optionally unscale (AMP) and clip the final gradient, step the base optimizer.

Under :class:`~torch.nn.parallel.DistributedDataParallel` (Foret et al. 2021, Sec. 4.1):
each replica perturbs with the gradient of its own share of the batch, so pass 1 (forward *and*
backward) runs under ``model.no_sync()`` and the paper's ``m`` is the per-replica batch; only the last
pass's gradient is averaged, by DDP's own bucketed all-reduce. ``sync_perturbation=True`` lets DDP
average pass 1 as well, so every replica takes the same ``eps`` from the global batch's gradient (the
single-process SAM step on the global batch). m-SAM and per-replica GSAM build the final gradient from
per-replica state after the backward passes (the chunk sum; the combination with the gradient at
``w``), so there every pass runs under ``no_sync`` and that final gradient is averaged with one
collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .distributed import average_gradients_
from .optim import GSAM, MSAM, SAM, frozen_running_stats

__all__ = ["StepResult", "train_step", "check_distributed_settings"]


@dataclass
class StepResult:
    """What one step measured, as device tensors (no host synchronisation).

    Attributes:
        loss: mean loss over the batch at ``w`` (before the update).
        correct: number of correctly classified examples at ``w``.
        grad_norm: L2 norm of the final gradient before clipping (the one the base optimizer used).
        skipped: True if the step was skipped because pass 1 overflowed under fp16 AMP.
    """

    loss: Tensor
    correct: Tensor
    grad_norm: Tensor
    skipped: bool = False


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    grad_scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
    sync_perturbation: bool = False,
) -> StepResult:
    """Run one optimisation step of ``optimizer`` on the batch ``(x, y)``.

    Args:
        model: the network, in train mode.
        optimizer: a plain ``torch.optim`` optimizer or any :class:`sam.optim.SAM` variant.
        loss_fn: mean-reduced loss, ``loss_fn(logits, y)``.
        x, y: the batch, already on the model's device.
        grad_scaler: ``GradScaler`` for fp16 autocast (``None`` for fp32/bf16).
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype (bf16 or fp16).
        max_grad_norm: clip the final gradient to this L2 norm (the perturbation uses the raw one).
        sync_perturbation: under DDP, average the first pass's gradient over the replicas, so all take
            one perturbation (default: each replica perturbs with its own gradient, as in the paper).
            Ignored without DDP; not for m-SAM.

    Returns:
        The step's loss and number correct at ``w`` (over this replica's share under DDP) and the norm
        of the final gradient (the averaged one under DDP, the same on every replica).

    Raises:
        ValueError: DDP settings that are not supported (:func:`check_distributed_settings`).
    """
    batch = x.shape[0]
    scale = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
    device_type = x.device.type
    ddp = isinstance(model, DistributedDataParallel)
    if ddp:
        check_distributed_settings(type(optimizer), amp_fp16=scale is not None, sync_perturbation=sync_perturbation)

    def forward_backward(chunk: slice, update_stats: bool, sync: bool = True) -> tuple[Tensor, Tensor]:
        autocast = (
            torch.autocast(device_type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        local = model.no_sync() if ddp and not sync else contextlib.nullcontext()
        with local:
            with frozen_running_stats(model, enabled=not update_stats), autocast:
                logits = model(x[chunk])
                loss = loss_fn(logits, y[chunk])
            (scale.scale(loss) if scale is not None else loss).backward()
        return loss.detach().float(), (logits.detach().argmax(dim=1) == y[chunk]).sum()

    optimizer.zero_grad(set_to_none=True)
    if not isinstance(optimizer, SAM):
        loss, correct = forward_backward(slice(None), update_stats=True)
        grad_norm = _unscale_and_clip(optimizer, optimizer, scale, max_grad_norm)
        if scale is not None:
            scale.step(optimizer)
        else:
            optimizer.step()
        return StepResult(loss, correct, grad_norm)

    chunks = optimizer.chunks(batch) if isinstance(optimizer, MSAM) else [slice(0, batch)]
    ascent_steps = optimizer.ascent_steps
    # Which passes DDP averages (see the module docstring); all of them without DDP.
    averaged_after = ddp and (isinstance(optimizer, MSAM) or (isinstance(optimizer, GSAM) and not sync_perturbation))
    sync_first = sync_perturbation or ascent_steps == 0
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for i, chunk in enumerate(chunks):
        weight = (chunk.stop - chunk.start) / batch
        chunk_loss, chunk_correct = forward_backward(chunk, update_stats=i == 0, sync=sync_first)
        loss += chunk_loss * weight
        correct += chunk_correct
        for step in range(ascent_steps):
            if not optimizer.first_step(zero_grad=True, grad_scaler=scale):
                optimizer.second_step(zero_grad=True, grad_scaler=scale)
                return StepResult(loss, correct, torch.full((), float("nan"), device=x.device), skipped=True)
            last = step == ascent_steps - 1
            forward_backward(chunk, update_stats=False, sync=not averaged_after if last else sync_perturbation)
        if isinstance(optimizer, MSAM) and ascent_steps > 0:
            optimizer.end_chunk(weight)
    optimizer.restore()
    if averaged_after:
        average_gradients_([w for group in optimizer.param_groups for w in group["params"]])
    grad_norm = _unscale_and_clip(optimizer, optimizer.base_optimizer, scale, max_grad_norm)
    optimizer.second_step(grad_scaler=scale)
    return StepResult(loss, correct, grad_norm)


def check_distributed_settings(
    optimizer: type[torch.optim.Optimizer], *, amp_fp16: bool, sync_perturbation: bool
) -> None:
    """Refuse the DDP settings :func:`train_step` does not support for an ``optimizer`` class, naming the
    alternative (the trainer asks before building anything).

    Raises:
        ValueError: fp16 AMP with per-replica perturbations (an overflow on one replica only would skip
            the step there only: use bf16 or ``sync_perturbation``); ``sync_perturbation`` with m-SAM (its
            ``m`` already fixes whose gradient each perturbation uses).
    """
    if amp_fp16 and issubclass(optimizer, SAM) and not sync_perturbation:
        raise ValueError(
            "fp16 AMP with per-replica SAM perturbations under DDP is not supported: an overflow on one "
            "replica would skip the step there only. Use --amp bf16, or --sync-perturbation"
        )
    if sync_perturbation and issubclass(optimizer, MSAM):
        raise ValueError(
            "--sync-perturbation does not apply to m-SAM, whose m already sets the examples behind each "
            "perturbation; under DDP m-SAM perturbs every chunk of m examples of each replica separately"
        )


def _unscale_and_clip(
    optimizer: torch.optim.Optimizer,
    base: torch.optim.Optimizer,
    scale: torch.amp.GradScaler | None,
    max_grad_norm: float | None,
) -> Tensor:
    """Unscale (AMP) and clip the final gradient; return its norm before clipping."""
    if scale is not None:
        scale.unscale_(base)
    params = [w for group in optimizer.param_groups for w in group["params"] if w.grad is not None]
    if max_grad_norm is not None:
        return nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not params:
        return torch.zeros(())
    return nn.utils.get_total_norm([w.grad for w in params])
