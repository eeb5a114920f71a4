"""The analysed data: every batch in a fixed order, kept on the device or streamed to it one batch at a time.

``data`` is any of

* a ``DataLoader`` (iterated in its order; it must not shuffle or augment);
* a map-style ``Dataset``, read in order in batches of ``batch_size``;
* the whole dataset as tensors: an ``(X, y)`` tuple, or any tuple or Mapping of tensors sharing the
  leading (example) dimension, e.g. ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``, cut into
  batches of ``batch_size`` (default 2048);
* a list of batches.

Kept (``stream=False``): the batches are moved to the device once and stay there. Streamed
(``stream=True``): every pass over the data reads the batches again from the source and moves one at a
time to the device, so the device holds one batch, whatever the size of the dataset. By default the data
are streamed when they would take more than ``memory_budget`` bytes on the device (default: a quarter of
its memory).

For chunked measures (m-sharpness with ``m > 1``) :meth:`BatchSource.examples` gathers any set of
examples into one batch; that needs random access (tensors, a list of batches, or a DataLoader over a
map-style dataset, whose ``collate_fn`` builds the chunk).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .batches import BatchError, batch_size, concat, nbytes, take, tensors_of, to_device

__all__ = ["BatchSource", "default_memory_budget", "DEFAULT_BATCH_SIZE"]

DEFAULT_BATCH_SIZE = 2048
_BUDGET_FRACTION = 0.25

DATA_FORMS = ("a DataLoader, a map-style Dataset, an (X, y) tuple (or a tuple or dict) of tensors sharing the "
              "example dimension, or a list of batches")


def default_memory_budget(device: torch.device) -> int:
    """A quarter of the device's memory in bytes: the data kept on the device may take this much."""
    if device.type == "cuda":
        return int(_BUDGET_FRACTION * torch.cuda.get_device_properties(device).total_memory)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        physical = 16 * 2**30
    return int(_BUDGET_FRACTION * physical)


def _is_tensor_tree(data: Any) -> bool:
    """A tuple or Mapping whose leaves are all tensors sharing a leading size (a whole dataset)."""
    if not isinstance(data, (tuple, Mapping)):
        return False
    found = tensors_of(data)
    if not found or any(t.ndim == 0 for t in found):
        return False
    leaves_are_tensors = len(found) == _count_leaves(data)
    return leaves_are_tensors and len({t.shape[0] for t in found}) == 1


def _count_leaves(data: Any) -> int:
    if isinstance(data, Mapping):
        return sum(_count_leaves(v) for v in data.values())
    if isinstance(data, (tuple, list)):
        return sum(_count_leaves(v) for v in data)
    return 1


class BatchSource:
    """The data as batches on ``device``, in a fixed order: kept there or streamed (see the module docstring).

    Args:
        data: see the module docstring.
        device: where the batches are evaluated.
        dtype: floating tensors of every batch are cast to it (``None``: kept).
        batch_size: examples per batch when ``data`` are tensors or a Dataset (default 2048).
        stream: ``True`` streams, ``False`` keeps the batches on the device, ``None`` streams when they would
            exceed ``memory_budget``.
        memory_budget: bytes the kept data may take on the device (default :func:`default_memory_budget`).

    Raises:
        TypeError: ``data`` is none of the accepted forms.
        ValueError: the data hold no batches, or tensors of one dataset disagree in length.
    """

    def __init__(self, data: Any, *, device: torch.device, dtype: torch.dtype | None = None,
                 batch_size: int | None = None, stream: bool | None = None, memory_budget: int | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self._tree: Any = None
        self._list: list[Any] | None = None
        self._loader: DataLoader | None = None
        self._order: list[int] | None = None  # the dataset indices a DataLoader visits, in order
        if isinstance(data, DataLoader):
            self._loader = data
        elif isinstance(data, Dataset):
            if isinstance(data, IterableDataset):
                self._loader = DataLoader(data, batch_size=self.batch_size)
            else:
                self._loader = DataLoader(data, batch_size=self.batch_size, shuffle=False)
        elif isinstance(data, list):
            if not data:
                raise ValueError("data holds no batches")
            self._list = data
        elif _is_tensor_tree(data):
            self._tree = data
        elif isinstance(data, (tuple, Mapping)) and tensors_of(data):
            sizes = sorted({t.shape[0] for t in tensors_of(data) if t.ndim > 0})
            raise ValueError(f"the tensors of a dataset given as a tuple or dict must share the example dimension; "
                             f"got leading sizes {sizes}")
        else:
            raise TypeError(f"data must be {DATA_FORMS}; got {type(data).__name__}")
        budget = default_memory_budget(self.device) if memory_budget is None else int(memory_budget)
        self.memory_budget = budget
        self.stream = bool(stream) if stream is not None else self._estimated_bytes() > budget
        self._kept: list[Any] | None = None if self.stream else [to_device(b, self.device, dtype) for b in self._host()]
        if self._kept is not None and not self._kept:
            raise ValueError("data holds no batches")

    # -- reading ---------------------------------------------------------------------------------------

    def _host(self) -> Iterator[Any]:
        """The batches as the source holds them (before moving them to the device)."""
        if self._loader is not None:
            yield from self._loader
        elif self._list is not None:
            yield from self._list
        else:
            n = batch_size(self._tree)
            for start in range(0, n, self.batch_size):
                yield take(self._tree, slice(start, start + self.batch_size))

    def __iter__(self) -> Iterator[Any]:
        """Every batch on the device, in order: the kept ones, or each one read and moved when it is reached."""
        if self._kept is not None:
            yield from self._kept
            return
        for batch in self._host():
            yield to_device(batch, self.device, self.dtype)

    def reread(self) -> Iterator[Any]:
        """The batches read from the source again, even when kept (the determinism check compares them)."""
        for batch in self._host():
            yield to_device(batch, self.device, self.dtype)

    @property
    def reads_again(self) -> bool:
        """Whether the source can yield other data on another pass (a DataLoader that shuffles or augments)."""
        return self._loader is not None

    def first(self) -> Any:
        """The first batch, on the device."""
        for batch in self:
            return batch
        raise ValueError("data holds no batches")

    def _estimated_bytes(self) -> int:
        if self._tree is not None:
            on_device = all(t.device == self.device for t in tensors_of(self._tree))
            return 0 if on_device and self.dtype is None else nbytes(self._tree, self.dtype)
        if self._list is not None:
            return sum(nbytes(b, self.dtype) for b in self._list)
        try:
            count = len(self._loader)  # type: ignore[arg-type]
        except TypeError:  # an IterableDataset of unknown length: never kept whole
            return 2**63 - 1
        first = next(iter(self._loader))  # type: ignore[arg-type]
        return nbytes(first, self.dtype) * count

    # -- random access ---------------------------------------------------------------------------------

    def examples(self, indices: Tensor | Sequence[int]) -> Any:
        """The examples ``indices`` (positions in the order of iteration) as one batch on the device.

        Raises:
            BatchError: the source has no random access (an IterableDataset, or a DataLoader without a batch
                sampler), or its batches cannot be joined.
        """
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if self._tree is not None:
            return to_device(take(self._tree, index.to(tensors_of(self._tree)[0].device)), self.device, self.dtype)
        if self._loader is not None:
            return to_device(self._gather_from_dataset(index), self.device, self.dtype)
        batches = self._kept if self._kept is not None else self._list
        return to_device(self._gather_from_batches(batches, index), self.device, self.dtype)  # type: ignore[arg-type]

    def _gather_from_batches(self, batches: list[Any], index: Tensor) -> Any:
        sizes = torch.tensor([batch_size(b) for b in batches])
        ends = torch.cumsum(sizes, 0)
        which = torch.searchsorted(ends, index, right=True)  # the batch holding each example
        grouped = torch.argsort(which, stable=True)
        pieces = []
        for b in torch.unique(which).tolist():
            rows = index[which == b] - (ends[b] - sizes[b])
            pieces.append(take(batches[b], rows.to(tensors_of(batches[b])[0].device)))
        joined = pieces[0] if len(pieces) == 1 else concat(pieces)
        restore = torch.empty_like(grouped)
        restore[grouped] = torch.arange(grouped.numel())
        return take(joined, restore.to(tensors_of(joined)[0].device))

    def _gather_from_dataset(self, index: Tensor) -> Any:
        loader = self._loader
        dataset = loader.dataset  # type: ignore[union-attr]
        if isinstance(dataset, IterableDataset) or loader.batch_sampler is None:  # type: ignore[union-attr]
            raise BatchError("chunks of examples need random access to the data, which an IterableDataset (or a "
                             "DataLoader without a batch sampler) does not give: use m=1, stream=False, or a "
                             "map-style Dataset")
        if self._order is None:
            self._order = [i for batch in loader.batch_sampler for i in batch]  # type: ignore[union-attr]
        return loader.collate_fn([dataset[self._order[i]] for i in index.tolist()])  # type: ignore[union-attr, index]
