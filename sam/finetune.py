"""Finetuning: a training run that starts from trained weights instead of a random initialisation.

``TrainConfig.init_from`` (``sam-landscape train --init-from``) names where the weights come from:

* a run directory of ``sam-landscape train``: its ``model.pt``, the weights after its last finished epoch;
* a weights file: a plain ``state_dict`` (``torch.save(model.state_dict(), path)``), or a checkpoint dict
  that holds one under ``"state_dict"`` (Lightning, timm's training script) or ``"model"`` (this
  trainer's ``state.pt``); a ``.safetensors`` file. Files are read with ``torch.load(weights_only=True)``:
  a file that holds pickled Python objects is refused, never executed. DDP's ``module.`` prefix is
  removed from the keys;
* ``timm:NAME``: timm's pretrained weights for its model NAME (``tf_efficientnet_b0.aa_in1k``), read from
  this machine's Hugging Face cache or timm's older cache (:func:`timm_weights_file`). Nothing is ever
  downloaded; the run's model is ``timm:NAME``.

Every weight of the model comes from the init, with one exception: with ``reset_head`` the
classification head (:func:`sam.models.head_names`) is freshly initialised for the dataset's number of
classes (seeded by the run's seed), as finetuning on new classes needs (Foret et al. 2021, Sec. 3.2:
EfficientNets pretrained on ImageNet, finetuned on CIFAR-10/100 and other datasets with a new last
layer). Without it, a head of another size is an error that says so.

What was loaded is recorded (:class:`InitRecord`) in the run's ``config.json`` (``derived.init``): the
file read, its SHA-256 and the head keys started afresh. A resumed run continues from its ``state.pt``
and never reads the init again; it is refused when the init file now holds other weights
(:func:`check_init_unchanged`), since its config would then no longer say where it started.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from landscape.storage import CorruptFileError, file_sha256, load_weights

from .models import TIMM_PREFIX, head_keys, import_timm, timm_model

__all__ = [
    "InitRecord",
    "check_init_unchanged",
    "hf_hub_cache",
    "init_weights_file",
    "load_init",
    "pretrained_timm",
    "read_state_dict",
    "timm_init_name",
    "timm_weights_file",
]

_FIRST_KEYS = 3  # mismatching keys named in an error


@dataclass(frozen=True)
class InitRecord:
    """What a finetuning run started from, saved in its ``config.json`` as ``derived.init``.

    Attributes:
        init_from: ``TrainConfig.init_from`` as given.
        file: The absolute path of the weights file read (a run's ``model.pt``, the file given, or
            timm's cached file).
        sha256: That file's SHA-256.
        head_reset: The ``state_dict`` keys initialised afresh (``reset_head``); empty otherwise.
    """

    init_from: str
    file: str
    sha256: str
    head_reset: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "head_reset": list(self.head_reset)}


def timm_init_name(init_from: str | None) -> str | None:
    """NAME for ``init_from = "timm:NAME"``, else ``None``.

    Example:
        >>> timm_init_name("timm:resnet18.a1_in1k"), timm_init_name("runs/pretrained")
        ('resnet18.a1_in1k', None)
    """
    if isinstance(init_from, str) and init_from.startswith(TIMM_PREFIX):
        return init_from.removeprefix(TIMM_PREFIX)
    return None


# ---------------------------------------------------------------------------------------------- files


def init_weights_file(init_from: str | Path) -> Path:
    """The weights file that ``init_from`` names: a run directory's ``model.pt``, or the file itself.

    Raises:
        FileNotFoundError: there is no such file or directory, or the directory is not a run of
            ``sam-landscape train`` with a finished epoch.
    """
    path = Path(init_from).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() or not (path / "model.pt").is_file():
            raise FileNotFoundError(f"--init-from {init_from}: the directory holds no run of sam-landscape train with "
                                    "a finished epoch (config.json and model.pt); pass a run directory, a weights "
                                    "file or timm:NAME")
        return path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {init_from}: no such file or directory; pass a run directory, a weights "
                                "file (a state_dict saved by torch.save) or timm:NAME")
    return path


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value) and all(isinstance(k, str) for k in value)
            and all(isinstance(v, Tensor) for v in value.values()))


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The ``state_dict`` that the weights file ``path`` holds, on the CPU.

    A plain ``state_dict``, or one under a checkpoint's ``"state_dict"`` or ``"model"`` key; a
    ``.safetensors`` file. A ``module.`` prefix on every key (a DDP-wrapped model's) is removed.

    Raises:
        FileNotFoundError: there is no such file.
        CorruptFileError: the file is unreadable, unsafe (pickled objects) or holds no ``state_dict``.
    """
    path = Path(path)
    state = _read_safetensors(path) if path.suffix == ".safetensors" else load_weights(path)
    if isinstance(state, dict) and not _is_state_dict(state):
        state = next((state[k] for k in ("state_dict", "model") if _is_state_dict(state.get(k))), state)
    if not _is_state_dict(state):
        keys = f" with keys {sorted(map(str, state))[:_FIRST_KEYS]}" if isinstance(state, dict) else ""
        raise CorruptFileError(f"{path} holds no state_dict (a dict of tensors, or a checkpoint with one under "
                               f"'state_dict' or 'model'); got a {type(state).__name__}{keys}")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f"{path} is a .safetensors file, which needs safetensors: pip install safetensors") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError, among others
        raise CorruptFileError(f"{path} is not a readable .safetensors file ({type(error).__name__}: "
                               f"{' '.join(str(error).split())[:200]})") from None


# -------------------------------------------------------------------------------------- path inits


def load_init(model: nn.Module, init_from: str, *, reset_head: bool, model_name: str) -> InitRecord:
    """Load the weights that ``init_from`` (a run directory or a weights file) names into ``model``.

    With ``reset_head`` the classification head keeps the fresh initialisation ``model`` was built
    with (for the dataset's classes), and the init's head, whatever its shape, is left out; every other
    tensor, buffers included, must be in the init with the model's shape.

    Args:
        model: The freshly built model of the run (its head sized for the dataset's classes).
        init_from: A run directory or a weights file (:func:`init_weights_file`).
        reset_head: Keep the model's own head instead of the init's.
        model_name: The run's model (``config.model``), for the messages.

    Returns:
        What was loaded.

    Raises:
        FileNotFoundError: ``init_from`` does not exist.
        CorruptFileError: the file is unreadable or unsafe.
        ValueError: the init's keys or shapes do not fit the model (the first few named); when only the
            head differs, the message says to pass ``--reset-head``.
    """
    file = init_weights_file(init_from)
    state = read_state_dict(file)
    try:
        model_head = set(head_keys(model))
    except ValueError:
        if reset_head:
            raise
        model_head = set()  # a user's module without a known head: the hint about --reset-head is left out
    head = model_head if reset_head else set()
    _check_fit(model.state_dict(), state, head, model_head, file, _describe_model(model_name, init_from))
    model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=not head)
    return InitRecord(str(init_from), os.path.abspath(file), file_sha256(file), tuple(sorted(head)))


def _describe_model(model_name: str, init_from: str) -> str:
    """``the model digits_cnn`` and, for a run directory, the model that run trained if it is another."""
    config = Path(init_from).expanduser() / "config.json"
    try:
        trained = json.loads(config.read_text())["config"]["model"] if config.is_file() else None
    except (ValueError, KeyError, TypeError, OSError):
        trained = None
    if trained is None or trained == model_name:
        return f"the model {model_name}"
    return f"the model {model_name} (the run in {init_from} trained {trained}: pass --model {trained})"


def _check_fit(expected: dict[str, Tensor], state: dict[str, Tensor], skipped: set[str], model_head: set[str],
               file: Path, what: str) -> None:
    """Raise a ValueError naming the first keys in which ``state`` does not fit ``expected`` (``skipped`` aside)."""
    missing = sorted(set(expected) - set(state) - skipped)
    unexpected = sorted(set(state) - set(expected) - skipped)
    shapes = sorted(k for k in (set(expected) & set(state)) - skipped if expected[k].shape != state[k].shape)
    if not (missing or unexpected or shapes):
        return
    problems = [f"{label} {keys[:_FIRST_KEYS]}{' ...' if len(keys) > _FIRST_KEYS else ''}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("other shapes for", shapes)) if keys]
    details = "; ".join(f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
                        for k in shapes[:_FIRST_KEYS])
    hint = f"; {details}" if details else ""
    if shapes and not (missing or unexpected) and set(shapes) <= model_head:
        hint += ("; only the classification head differs: pass --reset-head (reset_head=True) to start it afresh "
                 "for this dataset's classes")
    raise ValueError(f"{file} does not fit {what} ({'; '.join(problems)}{hint})")


# --------------------------------------------------------------------------------------- timm inits


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it, read from the environment now.

    ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``).
    """
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _pretrained_cfg(timm: Any, name: str) -> Any:
    """timm's pretrained config of ``name`` (the default weights of an architecture without a tag)."""
    architecture = name.split(".", 1)[0]
    if not timm.is_model(architecture):
        raise ValueError(f"timm has no model {architecture!r} (from --init-from timm:{name}); list them with "
                         f"python -c \"import timm; print(timm.list_models('*{architecture[:5]}*', pretrained=True))\"")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as error:  # an unknown tag
        cfg, reason = None, f" ({' '.join(str(error).split())})"
    else:
        reason = ""
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = timm.list_models(architecture, pretrained=True)
        raise ValueError(f"timm has no pretrained weights named {name!r}{reason}; pretrained weights of "
                         f"{architecture}: {', '.join(tags) or 'none'}")
    return cfg


def timm_weights_file(name: str) -> Path:
    """Where timm's pretrained weights for ``name`` lie on this machine. Nothing is downloaded.

    Looked for, in order: in the Hugging Face hub cache (:func:`hf_hub_cache`), the weights' hub
    repository (``timm/ARCH.TAG``, at its cached ``main`` revision) with ``model.safetensors`` or
    ``pytorch_model.bin``, as ``timm.create_model(name, pretrained=True)`` stores them; then timm's older
    cache, torch hub's ``$TORCH_HOME/hub/checkpoints``, the file named in the weights' URL.

    Raises:
        ImportError: timm is not installed.
        ValueError: timm has no model or no pretrained weights ``name``.
        FileNotFoundError: the weights are not on this machine; the message names the places looked at
            and how to put the weights there.
    """
    timm = import_timm()
    cfg = _pretrained_cfg(timm, name)
    looked = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        cache = hf_hub_cache()
        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        looked.append(f"{repo} ({' or '.join(filenames)}) in the Hugging Face cache {cache}")
    if cfg.url:
        file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if file.is_file():
            return file
        looked.append(f"{file.name} in timm's cache {file.parent}")
    repo = cfg.hf_hub_id or name
    raise FileNotFoundError(
        f"timm's pretrained weights for {name} are not on this machine, and nothing is downloaded: looked for "
        f"{' and for '.join(looked)}. Put them there from a machine with network access: hf download {repo} (or "
        f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\"), then copy that cache's "
        f"models--{repo.replace('/', '--')} folder into {hf_hub_cache()}, or point HF_HUB_CACHE (or HF_HOME) at a copy "
        "of the cache")


def pretrained_timm(name: str, *, num_classes: int, in_channels: int, image_size: int | None,
                    reset_head: bool) -> tuple[nn.Module, InitRecord]:
    """timm's model ``name`` with its pretrained weights from this machine's cache; nothing is downloaded.

    The weights are loaded the way timm loads them (its key filters, the first convolution adapted to
    ``in_channels``, position embeddings resampled to ``image_size``), then, with ``reset_head``, the
    head is replaced by a fresh one for ``num_classes`` classes (``model.reset_classifier``).

    Raises:
        ImportError: timm is not installed.
        ValueError: timm has no such weights; the weights' head has another number of classes than
            ``num_classes`` and ``reset_head`` is False; the cached file does not fit the model.
        FileNotFoundError: the weights are not on this machine (:func:`timm_weights_file`).
    """
    timm = import_timm()
    cfg = _pretrained_cfg(timm, name)
    if not reset_head and cfg.num_classes != num_classes:
        raise ValueError(f"timm's {name} ends in a {cfg.num_classes}-class head and the dataset has {num_classes} "
                         "classes: pass --reset-head (reset_head=True) to start the head afresh for them")
    file = timm_weights_file(name)
    state = read_state_dict(file)
    try:
        model = timm_model(name, in_channels=in_channels, image_size=image_size, weights=state)
    except (RuntimeError, KeyError) as error:
        raise CorruptFileError(f"{file} (timm's pretrained weights for {name}) does not fit timm's {name}: "
                               f"{' '.join(str(error).split())[:300]}") from None
    head: tuple[str, ...] = ()
    if reset_head:
        model.reset_classifier(num_classes)
        head = tuple(sorted(head_keys(model)))
    return model, InitRecord(TIMM_PREFIX + name, os.path.abspath(file), file_sha256(file), head)


# ------------------------------------------------------------------------------------------- resume


def check_init_unchanged(saved: Any, run_dir: Path) -> None:
    """Refuse to resume a run whose init file now holds other weights than those it started from.

    ``saved`` is the run's ``derived.init`` (:meth:`InitRecord.to_dict`). A resumed run does not read
    the init, so a file that is gone is no obstacle; a file whose SHA-256 changed is, since the run's
    config would no longer say where it started. timm inits are not checked (the cache is timm's).

    Raises:
        ValueError: the file changed; the message names it and both digests.
    """
    if not isinstance(saved, dict) or timm_init_name(saved.get("init_from")) is not None:
        return
    file, digest = saved.get("file"), saved.get("sha256")
    if not isinstance(file, str) or not isinstance(digest, str) or not Path(file).is_file():
        return
    now = file_sha256(Path(file))
    if now != digest:
        raise ValueError(f"cannot resume {run_dir}: its init file {file} changed since the run started (SHA-256 "
                         f"{digest[:12]}..., now {now[:12]}...), so its config no longer says where it started; "
                         "restore the file, or train again with --overwrite (from the new weights) or into another "
                         "--out")
