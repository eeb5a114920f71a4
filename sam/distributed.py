"""Multi-process training under ``torchrun``: the process-group helpers of :mod:`landscape.distributed`
(which the analyses use too) and the one collective only training needs.

``from sam import distributed`` gives both: ``distributed.init_from_env()``, ``distributed.shard(n)``,
``distributed.is_main()`` ... and :func:`average_gradients_`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from landscape import distributed as _shared
from landscape.distributed import *  # noqa: F403 - `from sam import distributed` gives them all
from landscape.distributed import active, all_reduce_sum_, world_size

__all__ = [*_shared.__all__, "average_gradients_"]


@torch.no_grad()
def average_gradients_(params: Sequence[Tensor]) -> None:
    """Replace each ``.grad`` by its mean over the processes (one collective).

    Used where the final gradient is assembled from per-replica state after the backward passes
    (m-SAM's chunk sum, GSAM's combination), so DDP's bucketed reduction cannot do it.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not active() or not grads:
        return
    all_reduce_sum_(grads)
    torch._foreach_div_(grads, float(world_size()))
