"""How a batch meets the model: the one batch protocol of every analysis.

A batch is one of

* ``(inputs, target)``, a pair: ``inputs`` is a Tensor (``model(inputs)``), a tuple or list
  (``model(*inputs)``) or a dict (``model(**inputs)``); ``target`` is what ``loss_fn(output, target)``
  compares the output with;
* a Mapping in the Hugging Face style, ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``:
  ``labels`` is the target and the other entries are keyword inputs. With ``loss_fn=None`` the model
  gets the whole Mapping (labels included) and the loss is its output's ``loss``.

``forward=(model, batch) -> output`` replaces these rules for models fed some other way, and
``target=(batch) -> target`` says where the target of such a batch is. An output may be a Tensor, a tuple
or list (its first element), or a Mapping or ``ModelOutput`` (its ``logits``).

The objective is the mean over every loss term of the dataset (SPEC Sec. 2),

.. math::

    L(w) = \\frac{\\sum_b n_b\\, \\ell_b(w)}{\\sum_b n_b},

with ``l_b`` the batch's mean loss and ``n_b`` its number of loss terms: for integer targets the entries
that are not ``-100`` (the ignore index of ``torch.nn.functional.cross_entropy`` and of Hugging Face),
else the number of examples; ``weight=(batch) -> n_b`` overrides. With ``loss_fn=None`` the terms are
the model's own: its non-ignored labels, shifted by one token for a causal language model, whose loss
compares position ``t``'s logits with label ``t + 1``; :meth:`BatchProtocol.calibrated` finds the shift on
the first batch by recomputing the model's loss from its logits, and refuses a model whose loss is not
such a mean (a different ``weight=`` is then needed).

Accuracy counts ``argmax`` of class scores against integer targets, per token where the target has a
sequence axis, skipping ignored positions; where it is not defined (regression, soft labels, an output
that does not line up with the target) it is ``None`` and reported as NaN, never 0.

Example:
    >>> import torch
    >>> protocol = BatchProtocol(torch.nn.functional.cross_entropy)
    >>> batch = (torch.randn(4, 3), torch.tensor([0, 2, -100, 1]))
    >>> float(protocol.terms(batch))  # the ignored target is no loss term
    3.0
    >>> model = torch.nn.Linear(3, 5)
    >>> output = protocol.call(model, batch)
    >>> correct, counted = protocol.accuracy_counts(output, batch)
    >>> int(counted)
    3
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IGNORE_INDEX",
    "BatchError",
    "BatchProtocol",
    "token_cross_entropy",
    "causal_lm_cross_entropy",
    "map_tensors",
    "tensors_of",
    "batch_size",
    "to_device",
    "take",
    "concat",
    "split_chunks",
    "fingerprint",
    "nbytes",
]

IGNORE_INDEX = -100
LABELS = "labels"

LossFn = Callable[[Tensor, Tensor], Tensor]
Forward = Callable[[nn.Module, Any], Any]
Weight = Callable[[Any], "float | int | Tensor"]


class BatchError(ValueError):
    """A batch, a model output or a loss does not follow the batch protocol; the message says what was expected."""


def token_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over every non-ignored position: logits ``[..., V]`` against integer targets ``[...]``.

    The mean over the positions whose target is not ``-100``, as a language model's loss (flattened
    ``cross_entropy`` with ``ignore_index=-100``); for ``[B, V]`` logits it is plain cross-entropy.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)


def causal_lm_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of a causal language model: position ``t``'s logits ``[B, T, V]`` against
    label ``t + 1`` (``[B, T]``, ``-100`` ignored), in the logits' precision.

    Hugging Face causal LMs compute this loss themselves, in float32 even for a float64 model; with this
    ``loss_fn`` (and their Mapping batches) a float64 analysis stays float64. Its ``label_shift`` attribute
    tells the protocol to count and score the labels from the second position on.
    """
    return token_cross_entropy(logits[..., :-1, :], labels[..., 1:])


causal_lm_cross_entropy.label_shift = 1  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------- batch trees


def map_tensors(fn: Callable[[Tensor], Tensor], batch: Any) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it (dicts, Mappings, tuples and lists are walked;
    a Mapping comes back as a dict, other leaves as they were)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(map_tensors(fn, v) for v in batch)
    if isinstance(batch, list):
        return [map_tensors(fn, v) for v in batch]
    return batch


def tensors_of(batch: Any) -> list[Tensor]:
    """Every tensor in ``batch``, in a fixed order."""
    found: list[Tensor] = []
    map_tensors(lambda t: found.append(t) or t, batch)
    return found


def batch_size(batch: Any) -> int:
    """The number of examples in ``batch``: the leading size of its target, else of its first tensor."""
    target = _raw_target(batch)
    tensors = [target] if isinstance(target, Tensor) and target.ndim > 0 else tensors_of(batch)
    sized = [t for t in tensors if t.ndim > 0]
    if not sized:
        raise BatchError("a batch needs at least one tensor with a leading batch dimension")
    return int(sized[0].shape[0])


def to_device(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``batch`` on ``device``, floating tensors cast to ``dtype`` when given (integer ids and masks keep theirs)."""

    def move(t: Tensor) -> Tensor:
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return t.to(device=device, dtype=cast, non_blocking=True)

    return map_tensors(move, batch)


def take(batch: Any, index: Tensor | slice) -> Any:
    """The examples ``index`` of ``batch``: every tensor whose leading size is the batch size is indexed."""
    size = batch_size(batch)
    return map_tensors(lambda t: t[index] if t.ndim > 0 and t.shape[0] == size else t, batch)


def concat(batches: Sequence[Any]) -> Any:
    """Batches of one structure joined along the examples.

    Raises:
        BatchError: the batches differ in structure, or in a shape other than the leading one (e.g. token
            sequences padded to different lengths).
    """
    first = batches[0]
    flat = [tensors_of(b) for b in batches]
    if any(len(f) != len(flat[0]) for f in flat):
        raise BatchError("batches of different structures cannot be joined")
    joined = []
    for parts in zip(*flat):
        if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise BatchError(f"batches whose tensors differ in shape beyond the batch dimension "
                             f"({[tuple(p.shape) for p in parts[:3]]} ...) cannot be joined into chunks of examples; "
                             "pad them to one length, give the data as a map-style Dataset in a DataLoader (its "
                             "collate_fn pads each chunk), or use m=1")
        joined.append(torch.cat(parts) if parts[0].ndim > 0 else parts[0])
    queue = iter(joined)
    return map_tensors(lambda _: next(queue), first)


def split_chunks(batch: Any, groups: int, m: int) -> Any:
    """A batch of ``groups * m`` examples as ``groups`` chunks of ``m``: every batch-sized tensor reshaped
    to ``[groups, m, ...]`` (for ``torch.vmap`` over chunks)."""
    size = batch_size(batch)
    if size != groups * m:
        raise BatchError(f"a batch of {size} examples is not {groups} chunks of {m}")
    return map_tensors(lambda t: t.reshape(groups, m, *t.shape[1:]) if t.ndim > 0 and t.shape[0] == size else t, batch)


def fingerprint(batch: Any) -> Tensor:
    """Two float64 numbers that change when the batch's data change: the sum and the sum of squares of all
    its tensors. A batch's mean loss does not depend on the order of its examples, so neither does this."""
    parts = [t.detach().double() for t in tensors_of(batch)]
    if not parts:
        raise BatchError("a batch needs at least one tensor")
    return torch.stack([sum(p.sum() for p in parts), sum(p.square().sum() for p in parts)])


def nbytes(batch: Any, dtype: torch.dtype | None = None) -> int:
    """Bytes the tensors of ``batch`` take, with floating ones cast to ``dtype`` when given (as on the device)."""
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    return sum(t.numel() * (size if size is not None and t.is_floating_point() else t.element_size())
               for t in tensors_of(batch))


# -------------------------------------------------------------------------------------------- protocol


def _raw_target(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return batch.get(LABELS)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[1]
    return None


def _is_class_index(target: Tensor) -> bool:
    return not target.is_floating_point() and not target.is_complex() and target.dtype != torch.bool


@dataclass(frozen=True)
class BatchProtocol:
    """How batches are fed to the model, which part is the target, and how many loss terms each carries.

    Args:
        loss_fn: mean-reduced loss ``loss_fn(output, target)``; ``None`` takes the model's own ``loss``
            (Hugging Face style Mapping batches with ``labels``).
        forward: ``(model, batch) -> output``, replacing the feeding rules.
        weight: ``(batch) -> n_b``, the number of loss terms of a batch, replacing the counting rules.
        target: ``(batch) -> target`` for batches that are neither pairs nor Mappings with ``labels``.
        ignore_index: the target value that marks a position without a loss term.
        label_shift: with ``loss_fn=None``, how many leading label positions the model's loss skips (1 for a
            causal language model); ``None`` until :meth:`calibrated` has looked at the first batch.
    """

    loss_fn: LossFn | None
    forward: Forward | None = None
    weight: Weight | None = None
    target_fn: Callable[[Any], Tensor] | None = None
    ignore_index: int = IGNORE_INDEX
    label_shift: int | None = None

    # -- reading a batch -------------------------------------------------------------------------------

    def check(self, batch: Any, index: int = 0) -> None:
        """Refuse a batch this protocol cannot read, naming what was expected."""
        expected = ("an (inputs, target) pair (inputs a Tensor, a tuple or list, or a dict), or a Mapping with "
                    "'labels' (Hugging Face style)")
        if self.forward is not None:
            if not tensors_of(batch):
                raise BatchError(f"batch {index} holds no tensors; with forward= it may be any structure of tensors")
            return
        if isinstance(batch, Mapping):
            if self.loss_fn is not None and LABELS not in batch:
                raise BatchError(f"batch {index} is a Mapping without 'labels' (keys {sorted(batch)}): with a loss_fn "
                                 "its 'labels' entry is the target; pass loss_fn=None to use the model's own loss")
            return
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, target = batch
            if not isinstance(inputs, (Tensor, tuple, list, Mapping)):
                raise BatchError(f"batch {index}: inputs must be a Tensor, a tuple or list, or a dict; got "
                                 f"{type(inputs).__name__}")
            if self.loss_fn is None:
                raise BatchError(f"batch {index} is an (inputs, target) pair, but loss_fn=None takes the loss from "
                                 "the model: pass a loss_fn, Mapping batches with 'labels', or forward=")
            if not isinstance(target, Tensor):
                raise BatchError(f"batch {index}: the target must be a Tensor; got {type(target).__name__}")
            return
        got = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise BatchError(f"batch {index} must be {expected}; got {got}")

    def target(self, batch: Any) -> Tensor | None:
        """The batch's target: ``target_fn(batch)``, the second of a pair, a Mapping's ``labels``; ``None`` if
        there is none."""
        target = self.target_fn(batch) if self.target_fn is not None else _raw_target(batch)
        return target if isinstance(target, Tensor) else None

    def call(self, model: Callable[..., Any], batch: Any) -> Any:
        """The model's output on ``batch`` (``model`` may be a module or a function of its inputs)."""
        if self.forward is not None:
            return self.forward(model, batch)  # type: ignore[arg-type]
        if isinstance(batch, Mapping):
            if self.loss_fn is None:
                return model(**batch)
            return model(**{k: v for k, v in batch.items() if k != LABELS})
        inputs = batch[0]
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)

    # -- reading an output -----------------------------------------------------------------------------

    @staticmethod
    def logits(output: Any) -> Tensor:
        """The class scores in an output: the Tensor itself, a tuple's first element, a Mapping's ``logits``."""
        if isinstance(output, Tensor):
            return output
        if isinstance(output, Mapping):
            if "logits" in output:
                return output["logits"]
            raise BatchError(f"the model returned a mapping without 'logits' (keys {list(output)}); pass forward= "
                             "returning the tensor to compare with the target, or loss_fn=None to use its 'loss'")
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            return output[0]
        raise BatchError(f"the model returned {type(output).__name__}; expected a Tensor, a tuple (its first element "
                         "is used), a dict or a ModelOutput with 'logits'")

    def loss(self, output: Any, batch: Any) -> Tensor:
        """The batch's mean loss: ``loss_fn(logits, target)``, or the model's own ``loss``."""
        if self.loss_fn is not None:
            target = self.target(batch)
            if target is None:
                raise BatchError("the batch has no target for loss_fn: give (inputs, target) pairs or 'labels'")
            return self.loss_fn(self.logits(output), target)
        if isinstance(output, Mapping) and output.get("loss") is not None:
            return output["loss"]
        loss = getattr(output, "loss", None)
        if isinstance(loss, Tensor):
            return loss
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor) and output[0].ndim == 0:
            return output[0]
        raise BatchError(f"loss_fn=None takes the model's loss, but its output ({type(output).__name__}) has none: "
                         "Hugging Face models return one when the batch has 'labels'; otherwise pass a loss_fn")

    # -- loss terms and accuracy -----------------------------------------------------------------------

    @property
    def shift(self) -> int:
        """How many leading label positions the loss skips: the model's (found by :meth:`calibrated`) or the
        ``label_shift`` attribute of ``loss_fn`` (:func:`causal_lm_cross_entropy`)."""
        if self.loss_fn is None:
            return self.label_shift or 0
        return int(getattr(self.loss_fn, "label_shift", 0))

    def terms(self, batch: Any) -> Tensor:
        """``n_b``, the number of loss terms of ``batch``, as a float64 tensor on the batch's device."""
        if self.weight is not None:
            value = self.weight(batch)
            return torch.as_tensor(value, dtype=torch.float64).reshape(())
        target = self.target(batch)
        if target is None:
            return torch.tensor(float(batch_size(batch)), dtype=torch.float64)
        if target.ndim == 0:
            raise BatchError("a batch's target is a scalar: its examples cannot be counted; pass weight=")
        if _is_class_index(target):
            shift = self.shift
            counted = target[..., shift:] if shift and target.ndim >= 2 else target
            return (counted != self.ignore_index).sum().double()
        return torch.tensor(float(target.shape[0]), dtype=torch.float64, device=target.device)

    def accuracy_counts(self, output: Any, batch: Any) -> tuple[Tensor, Tensor] | None:
        """``(number correct, number counted)`` of ``argmax`` predictions against integer targets, ignored
        positions skipped; ``None`` where accuracy is not defined."""
        target = self.target(batch)
        if target is None or target.ndim == 0 or not _is_class_index(target):
            return None
        try:
            scores = self.logits(output)
        except BatchError:
            return None
        shift = self.shift
        if shift and scores.ndim >= 3 and target.ndim >= 2:
            scores, target = scores[..., :-shift, :], target[..., shift:]
        if scores.ndim == target.ndim + 1 and scores.shape[:-1] == target.shape:
            predicted = scores.argmax(dim=-1)
        elif scores.ndim == target.ndim + 1 and scores.shape[0] == target.shape[0] and scores.shape[2:] == target.shape[1:]:
            predicted = scores.argmax(dim=1)  # class scores on axis 1, as cross_entropy takes them
        else:
            return None
        valid = target != self.ignore_index
        return ((predicted == target) & valid).sum(), valid.sum()

    def calibrated(self, output: Any, batch: Any) -> BatchProtocol:
        """This protocol with ``label_shift`` found on a first batch and its output (``loss_fn=None`` only).

        The model's loss is recomputed from its logits as the mean cross-entropy over the non-ignored labels,
        unshifted and shifted by one (a causal language model); the matching shift fixes how the labels are
        counted.

        Raises:
            BatchError: the model's loss is neither (label smoothing, a weighted or custom loss): the number
                of loss terms of a batch is unknown, and ``weight=`` must say it.
        """
        if self.loss_fn is not None or self.weight is not None or self.label_shift is not None:
            return self
        target = self.target(batch)
        if target is None or target.ndim == 0 or not _is_class_index(target):
            return replace(self, label_shift=0)  # regression or no labels: every example is one term
        loss = self.loss(output, batch).detach().double()
        try:
            scores = self.logits(output).detach().double()
        except BatchError:
            scores = None
        candidates = []
        if scores is not None and scores.ndim == target.ndim + 1 and scores.shape[:-1] == target.shape:
            candidates.append((0, scores, target))
            if target.ndim >= 2 and target.shape[-1] > 1:
                candidates.append((1, scores[..., :-1, :], target[..., 1:]))
        for shift, s, t in candidates:
            expected = F.cross_entropy(s.reshape(-1, s.shape[-1]), t.reshape(-1), ignore_index=self.ignore_index)
            if torch.isclose(expected, loss, rtol=1e-4, atol=1e-6):
                return replace(self, label_shift=shift)
        raise BatchError("with loss_fn=None the model's loss is used, but it is not the mean cross-entropy over its "
                         "non-ignored labels (shifted or not), so the number of loss terms of a batch is unknown: "
                         "pass weight=(batch -> number of loss terms)")
