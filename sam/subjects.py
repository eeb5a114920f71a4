"""What an analysis looks at: the model and data of a saved run, or a user's own, named by callables.

:func:`run_subject` rebuilds a run of ``sam-landscape train`` (:func:`sam.trainer.load_run`); its data
are the run's splits and its loss cross-entropy. :func:`callable_subject` takes ``module:callable``
specifications, as the ``--model``, ``--data`` and ``--loss`` flags of ``hessian``, ``surface`` and
``sharpness`` do:

* ``--model pkg.models:build`` (or ``path/to/file.py:build``): a callable returning the model, weights
  loaded;
* ``--data pkg.data:loader``: a callable returning the data in any form :mod:`landscape.data` accepts (a
  DataLoader, a Dataset, tensors, a list of batches), called with ``split="train"`` or ``"test"`` when it
  takes a ``split`` argument;
* ``--loss``: ``cross_entropy`` (default), ``token_cross_entropy``, ``causal_lm`` (next-token
  cross-entropy), ``model`` (the model's own ``loss``, Hugging Face style) or a ``module:callable``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from landscape import distributed
from landscape.batches import causal_lm_cross_entropy, take, tensors_of, token_cross_entropy
from landscape.data import BatchSource

from .trainer import load_run

__all__ = ["Subject", "run_subject", "callable_subject", "load_callable", "LOSSES"]

LOSSES: dict[str, Callable | None] = {
    "cross_entropy": F.cross_entropy,
    "token_cross_entropy": token_cross_entropy,
    "causal_lm": causal_lm_cross_entropy,
    "model": None,
}


@dataclass
class Subject:
    """A model with its loss and data, and how the results that concern it are named and filed.

    Attributes:
        model: the network (eval mode).
        loss_fn: the loss, or ``None`` for the model's own.
        name: a short label (the run directory's name, or the model callable's).
        source: where it came from (a checkpoint path, or ``module:callable``), saved with results.
        identity: the SHA-256 of its weights (the checkpoint file, or the model's tensors), which saved
            results are checked against.
        home: the run directory, the default place for results; ``None`` for callables.
        splits: ``split -> data``.
    """

    model: nn.Module
    loss_fn: Callable | None
    name: str
    source: str
    identity: str
    home: Path | None
    splits: Callable[[str], Any]

    def data(self, split: str, *, shard: bool = False) -> Any:
        """The data of ``split``; with ``shard``, this process's contiguous part of tensors (under
        ``torchrun``). Data in other forms are this process's already: the data callable shards them."""
        data = self.splits(split)
        if not shard or not distributed.active() or not isinstance(data, (tuple, dict)) or not tensors_of(data):
            return data
        return take(data, distributed.shard(tensors_of(data)[0].shape[0]))

    @property
    def snapshots(self) -> Path | None:
        return self.home / "snapshots" if self.home is not None else None


def run_subject(path: str | Path, *, device: str | torch.device = "cpu") -> Subject:
    """A saved run: its model (from ``model.pt``, or the snapshot ``path`` names), its splits, cross-entropy."""
    run = load_run(path, device=device)
    splits = {"train": (run.train.x, run.train.y), "test": (run.test.x, run.test.y)}
    return Subject(run.model, F.cross_entropy, run.run_dir.name, str(run.checkpoint), run.checkpoint_sha256,
                   run.run_dir, splits.__getitem__)


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """The callable ``module:name`` (a dotted module, or a ``.py`` file) names.

    Raises:
        ValueError: the specification is malformed, or the module or attribute cannot be found.
    """
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} takes MODULE:CALLABLE (e.g. mypkg.models:build or models.py:build); got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found")
            module_spec = importlib.util.spec_from_file_location(f"_sam_landscape_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            sys.modules[module_spec.name] = module  # type: ignore[union-attr]
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as error:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name} ({error})") from None
    target = getattr(module, attribute, None)
    if not callable(target):
        raise ValueError(f"{what} {spec!r}: {module_name} has no callable {attribute!r}")
    return target


def callable_subject(model: str, data: str, loss: str = "cross_entropy", *,
                     device: str | torch.device = "cpu") -> Subject:
    """A user's own model and data, from ``module:callable`` specifications (see the module docstring).

    Raises:
        ValueError: a specification cannot be loaded, the model callable returns no ``nn.Module``, or the
            data callable returns data of no accepted form.
    """
    build = load_callable(model, "--model")
    network = build()
    if not isinstance(network, nn.Module):
        raise ValueError(f"--model {model!r} returned {type(network).__name__}, not a torch.nn.Module")
    network = network.to(torch.device(device)).eval()
    loader = load_callable(data, "--data")
    takes_split = "split" in inspect.signature(loader).parameters

    def splits(split: str) -> Any:
        if not takes_split and split != "train":
            raise ValueError(f"--data {data!r} takes no split argument, so it gives one dataset: drop --split {split}")
        got = loader(split=split) if takes_split else loader()
        try:  # refused here, in one line, rather than deep inside an analysis
            BatchSource(got, device=torch.device("cpu"), stream=True)
        except (TypeError, ValueError) as error:
            raise ValueError(f"--data {data!r} returned data of no accepted form: {error}") from None
        return got

    loss_fn = LOSSES[loss] if loss in LOSSES else load_callable(loss, "--loss")
    return Subject(network, loss_fn, model.rpartition(":")[2], model, _weights_sha256(network), None, splits)


def _weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes and bytes), to tie results to weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
