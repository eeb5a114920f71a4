"""Multi-process helpers on PyTorch's own engine: ``torch.distributed`` under ``torchrun``.

Nothing here replaces DistributedDataParallel or the collectives; these are the few decisions the
analyses here and the trainer in :mod:`sam` share (``sam.distributed`` re-exports them and adds the
gradient averaging of training):

* :func:`init_from_env` joins the process group that ``torchrun`` describes in the environment
  (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL for CUDA, Gloo for
  the CPU, and each process on the GPU ``cuda:LOCAL_RANK``.
* :func:`shard` cuts ``n`` examples into contiguous, balanced pieces, one per rank, so an analysis
  over the whole dataset is a sum of per-rank partial sums.
* :func:`all_reduce_sum_` reduces a list of tensors with *one* collective (flattened into one
  buffer), so one Hessian-vector product over sharded data costs one ``all_reduce``.

Without an initialised process group every function is the single-process identity (rank 0 of 1), so
the same code runs under ``python`` and under ``torchrun``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "active",
    "world_size",
    "rank",
    "is_main",
    "init_from_env",
    "launched_by_torchrun",
    "device_for",
    "check_device_name",
    "shard",
    "all_reduce_sum_",
    "broadcast_",
    "broadcast_object",
    "barrier",
]


def active() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on the process that logs and writes files (rank 0)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (``torchrun --nproc_per_node N``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_for(device: str) -> torch.device:
    """The device this process uses for ``device`` (``"auto"``, ``"cpu"``, ``"cuda"`` ...).

    Under a process group, ``"auto"`` and ``"cuda"`` mean this process's own GPU,
    ``cuda:LOCAL_RANK``; elsewhere ``"auto"`` is CUDA when available, else the CPU.

    Raises:
        ValueError: ``device`` names no device, CUDA was asked for and is not available, or a numbered GPU
            (``cuda:K``) was asked for under a process group (every process would take the same GPU).
    """
    check_device_name(device)
    wants_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use --device cpu or auto")
    if device.startswith("cuda:") and launched_by_torchrun():
        raise ValueError(f"device {device!r} names one GPU for every process; under torchrun pass --device cuda "
                         "or auto (each process takes cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if wants_cuda and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank() % torch.cuda.device_count())))
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device_name(device: str) -> str:
    """``device`` itself if it is ``"auto"`` or a device ``torch.device`` knows (``"cpu"``, ``"cuda:1"``).

    Raises:
        ValueError: it is not, with what would be accepted (``torch.device`` raises a RuntimeError).
    """
    if device == "auto":
        return device
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device: use auto, cpu, cuda, cuda:N or another torch device "
                         "type (mps, xpu)") from None
    return device


def init_from_env(device: str = "auto") -> bool:
    """Join the process group described by ``torchrun``'s environment variables, once.

    The backend is NCCL when this process will use a GPU and Gloo otherwise. The CUDA device is set
    to ``cuda:LOCAL_RANK`` so that collectives and ``"cuda"`` tensors land on this process's GPU.

    Args:
        device: the device the work will run on (``"auto"``, ``"cpu"``, ``"cuda"``).

    Returns:
        True if a process group is active afterwards (the environment asked for more than one process).
    """
    if not launched_by_torchrun():
        return active()
    if not dist.is_initialized():
        uses_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if uses_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if uses_cuda else "gloo")
    return active()


def shard(n: int, part: int | None = None, parts: int | None = None) -> slice:
    """The contiguous slice of ``range(n)`` that rank ``part`` of ``parts`` owns.

    Sizes differ by at most one (the first ``n % parts`` ranks hold one more); defaults are this
    process's rank and the world size.

    Example:
        >>> [shard(10, r, 3) for r in range(3)]
        [slice(0, 4, None), slice(4, 7, None), slice(7, 10, None)]
    """
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    if not 0 <= part < parts:
        raise ValueError(f"part must be in [0, {parts}); got {part}")
    base, extra = divmod(int(n), parts)
    start = part * base + min(part, extra)
    return slice(start, start + base + (1 if part < extra else 0))


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` over all processes, in place, with one ``all_reduce`` on one flat buffer.

    Every tensor must have the same dtype and device. No-op without a process group.
    """
    if not active() or not tensors:
        return
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"all_reduce_sum_ reduces tensors of one dtype in one buffer; got {sorted(map(str, dtypes))}")
    if len(tensors) == 1 and tensors[0].is_contiguous():
        dist.all_reduce(tensors[0])
        return
    _through_flat_buffer(tensors, dist.all_reduce)


@torch.no_grad()
def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` with rank ``src``'s values, one ``broadcast`` per dtype (no-op without a group).

    The trainer uses it for BatchNorm running statistics: DDP re-broadcasts buffers only before a
    synchronised forward pass, so between steps every replica holds its own.
    """
    if not active():
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        _through_flat_buffer(group, lambda flat: dist.broadcast(flat, src=src))


def _through_flat_buffer(tensors: Sequence[Tensor], collective: Callable[[Tensor], Any]) -> None:
    """Run one in-place ``collective`` on the tensors concatenated into one buffer, then copy back."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    collective(flat)
    pieces = torch.split(flat, [t.numel() for t in tensors])
    torch._foreach_copy_(list(tensors), [piece.view_as(t) for piece, t in zip(pieces, tensors)])


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` from rank ``src`` on every process (a picklable object; identity without a group)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait until every process gets here (no-op without a process group)."""
    if active():
        dist.barrier()
