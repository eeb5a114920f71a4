"""Datasets held as tensors: loaded once, normalised once, iterated on the device.

The training loops in this project work on small and medium datasets (``digits``,
``mnist1d``, CIFAR-10, CIFAR-100) that fit comfortably in accelerator memory.
Instead of a ``torch.utils.data.DataLoader`` with worker processes, each split is
materialised once as a pair of tensors (:class:`Split`), moved to the device
once, and mini-batches are cut from it by :class:`DeviceLoader`. Shuffling and
the standard CIFAR augmentation (pad 4, random crop, horizontal flip) run on the
device as a handful of batched tensor ops, driven by a generator seeded only by
``(seed, epoch)``, so a run resumed at epoch ``e`` sees exactly the batches an
uninterrupted run would have seen.

Nothing here downloads anything unless explicitly asked to (``download=True``
for CIFAR, which needs the optional ``torchvision`` dependency). ``digits`` ships
with scikit-learn and ``mnist1d`` is generated procedurally (Greydanus & Kobak
2024), so both are built in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import pickle
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from landscape.storage import atomic_write

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "BUILT_IN_DATASETS",
    "DATASET_NAMES",
    "DatasetInfo",
    "DeviceLoader",
    "Split",
    "NUM_CLASSES",
    "augment_batch",
    "check_classes",
    "crop_and_flip",
    "load_dataset",
    "select_classes",
    "symmetric_label_noise",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist1d", "cifar10", "cifar100")
"""Names accepted by :func:`load_dataset`."""

BUILT_IN_DATASETS: tuple[str, ...] = ("digits", "mnist1d")
"""Datasets that need no files: bundled with scikit-learn, or generated offline."""

NUM_CLASSES: dict[str, int] = {"digits": 10, "mnist1d": 10, "cifar10": 10, "cifar100": 100}
"""The number of classes of each dataset (before a selection of classes)."""

# Standard per-channel statistics of the CIFAR training sets, for pixels scaled to [0, 1].
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)

_CIFAR_IMAGE_SIZE = 32
_CIFAR_ROW_LENGTH = 3 * _CIFAR_IMAGE_SIZE * _CIFAR_IMAGE_SIZE  # 3072
_DIGITS_MAX_VALUE = 16.0
_SEED_MULTIPLIER = 1_000_003


# --------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    Attributes:
        name: Dataset name, one of :data:`DATASET_NAMES`.
        num_classes: Number of classes; labels lie in ``[0, num_classes)``.
        in_channels: Number of image channels ``C``.
        image_size: Height (= width) ``H`` of the square images; the length ``L`` of 1-D signals.
        mean: Per-channel mean subtracted during normalisation, in units of pixel
            intensity scaled to ``[0, 1]``.
        std: Per-channel standard deviation divided out during normalisation, in
            the same units as ``mean``.
        classes: The dataset's labels of the classes kept (:func:`select_classes`), in the order of
            their new labels ``0..k-1``; ``None`` when every class is kept.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[int, ...] | None = None


@dataclass
class Split:
    """One split of a dataset held as two tensors.

    Attributes:
        x: Images, floating point (float32 as produced by :func:`load_dataset`),
            shape ``N x C x H x W`` (``N x C x L`` for 1-D signals), already normalised.
        y: Integer class labels, int64, shape ``N``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise TypeError(
                f"Split expects torch.Tensor x and y, got {type(self.x).__name__} "
                f"and {type(self.y).__name__}"
            )
        if self.x.dim() not in (3, 4) or not self.x.is_floating_point():
            raise ValueError(
                "Split.x must be a floating-point tensor of shape N x C x H x W (or N x C x L), got "
                f"dtype {self.x.dtype} and shape {tuple(self.x.shape)}"
            )
        if self.y.dim() != 1 or self.y.dtype != torch.int64:
            raise ValueError(
                "Split.y must be an int64 tensor of shape N, got dtype "
                f"{self.y.dtype} and shape {tuple(self.y.shape)}"
            )
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Split.x has {self.x.shape[0]} examples but Split.y has {self.y.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str | None) -> Split:
        """Returns this split with both tensors on ``device`` (no copy if already there)."""
        return Split(self.x.to(device), self.y.to(device))


# --------------------------------------------------------------------------------------
# Label noise
# --------------------------------------------------------------------------------------


def symmetric_label_noise(
    labels: torch.Tensor, rate: float, num_classes: int, seed: int
) -> torch.Tensor:
    """Corrupts a fixed fraction of labels with symmetric (uniform) noise.

    Exactly ``round(rate * N)`` positions (Python's ``round``, i.e. ties to even)
    are chosen uniformly at random without replacement, and each of their labels
    is replaced by a class drawn uniformly from the ``num_classes - 1`` *other*
    classes, so every chosen label really changes. This is the symmetric-noise
    protocol of the label-noise experiments in Zhang et al. 2017 ("Understanding
    deep learning requires rethinking generalization") and Foret et al. 2021 (SAM,
    Sec. 3.3 "Robustness to label noise"), in its "exactly a fraction ``rate`` is
    wrong" variant: protocols that redraw from *all* classes leave about
    ``rate / num_classes`` of the selected labels unchanged, this one does not.

    Randomness comes from a CPU ``torch.Generator`` seeded with ``seed``, so the
    result depends only on ``(labels, rate, num_classes, seed)``, not on the
    device or the global RNG state.

    Args:
        labels: 1-D integer tensor of labels in ``[0, num_classes)``. Not modified.
        rate: Fraction of labels to corrupt, in ``[0, 1]``.
        num_classes: Number of classes, at least 2.
        seed: Seed of the generator that picks positions and new classes.

    Returns:
        A new tensor with the dtype and device of ``labels``.

    Raises:
        ValueError: If ``rate`` is outside ``[0, 1]``, ``num_classes < 2``,
            ``labels`` is not a 1-D integer tensor, or a label is out of range.
    """
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 to flip labels, got {num_classes}")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            "labels must be a 1-D integer tensor, got dtype "
            f"{labels.dtype} and shape {tuple(labels.shape)}"
        )
    original = labels.detach().cpu().to(torch.int64)
    if original.numel() and (int(original.min()) < 0 or int(original.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range "
            f"[{int(original.min())}, {int(original.max())}]"
        )
    n = original.numel()
    num_flipped = round(rate * n)
    generator = torch.Generator().manual_seed(int(seed))
    positions = torch.randperm(n, generator=generator)[:num_flipped]
    # An offset in [1, num_classes - 1] modulo num_classes is uniform over the other classes.
    offsets = torch.randint(1, num_classes, (num_flipped,), generator=generator)
    noisy = original.clone()
    noisy[positions] = (original[positions] + offsets) % num_classes
    return noisy.to(device=labels.device, dtype=labels.dtype)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    download: bool = False,
    label_noise: float = 0.0,
    noise_seed: int = 0,
    split_seed: int = 0,
    test_fraction: float = 0.2,
    classes: Sequence[int] | None = None,
) -> tuple[Split, Split, DatasetInfo]:
    """Loads a dataset as normalised CPU tensors.

    * ``digits``: scikit-learn's bundled 8x8 digits (no download). Pixels are
      scaled from ``0..16`` to ``[0, 1]``, split train/test with a stratified,
      seeded :func:`sklearn.model_selection.train_test_split`, and normalised with
      the mean/std of the *training* pixels (one channel).
    * ``mnist1d``: MNIST-1D (Greydanus & Kobak 2024), 4000 training and 1000 test
      signals of length 40 in 10 classes, generated by the ``mnist1d`` package's
      procedural generator with its default arguments (never its download helper;
      about a second, identical on every machine). The global ``random`` and
      ``numpy.random`` states, which the generator reseeds, are restored. With
      ``root``, the arrays are cached in ``root/mnist1d/`` beside their recipe.
    * ``cifar10`` / ``cifar100``: the official python-pickle files read from
      ``root`` (the directory containing ``cifar-10-batches-py`` /
      ``cifar-100-python``, or that folder itself), using the official 50k/10k
      train/test split and the standard per-channel CIFAR mean/std.

    With ``classes``, both splits keep only the examples of those classes, relabelled ``0..k-1`` in the
    order given (:func:`select_classes`); normalisation is the full dataset's, so a model trained on
    one selection sees the inputs of another exactly as it saw its own.

    Label noise (:func:`symmetric_label_noise`) is applied to the training split
    only (among the classes kept); test labels are always clean.

    Args:
        name: One of :data:`DATASET_NAMES`.
        root: Data directory; required for CIFAR, the cache of ``mnist1d``, ignored
            for ``digits``.
        download: For CIFAR, fetch missing files with ``torchvision`` (optional
            dependency ``sam-landscape[vision]``). Never needed for ``digits``.
        label_noise: Fraction of training labels to corrupt, in ``[0, 1]``.
        noise_seed: Seed of the label noise.
        split_seed: Seed of the ``digits`` train/test split (CIFAR has a fixed split).
        test_fraction: Fraction of ``digits`` held out for testing, in ``(0, 1)``
            (CIFAR has a fixed split).
        classes: The classes to keep, at least two distinct labels of the dataset; ``None`` keeps all.

    Returns:
        ``(train, test, info)``; with ``classes``, ``info.num_classes`` is their number and
        ``info.classes`` the labels kept.

    Raises:
        ValueError: Unknown ``name``, missing ``root`` for CIFAR, out-of-range
            ``label_noise`` / ``test_fraction``, ``classes`` that are not distinct labels of the
            dataset, or a malformed CIFAR file.
        FileNotFoundError: CIFAR files are missing and ``download`` is False.
        ImportError: ``download=True`` but ``torchvision`` is not installed.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; accepted names: {', '.join(DATASET_NAMES)}")
    if not 0.0 <= float(label_noise) <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    if name == "digits":
        train, test, info = _load_digits(split_seed=split_seed, test_fraction=test_fraction)
    elif name == "mnist1d":
        train, test, info = _load_mnist1d(Path(root).expanduser() if root is not None else None)
    else:
        if root is None:
            raise ValueError(
                f"dataset {name!r} is read from local files: pass root=<data directory> "
                "(and download=True to fetch it there if it is missing)"
            )
        train, test, info = _load_cifar(name, Path(root).expanduser(), download=download)
    if classes is not None:
        check_classes(classes, name)
        train, test = select_classes(train, classes), select_classes(test, classes)
        for label, split in (("training", train), ("test", test)):
            if not len(split):
                raise ValueError(f"the {label} split of {name} holds no example of the classes {list(classes)}")
        info = dataclasses.replace(info, num_classes=len(classes), classes=tuple(int(c) for c in classes))
    if label_noise > 0.0:
        noisy = symmetric_label_noise(train.y, label_noise, info.num_classes, noise_seed)
        train = Split(train.x, noisy)
    return train, test, info


def check_classes(classes: Sequence[int], dataset: str) -> None:
    """Raise a ValueError unless ``classes`` are at least two distinct labels of ``dataset``.

    Example:
        >>> check_classes([5, 6, 10], "digits")
        Traceback (most recent call last):
        ...
        ValueError: classes must be labels of digits, in [0, 10); got 10 in [5, 6, 10]
    """
    classes = list(classes)
    total = NUM_CLASSES[dataset]
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in classes):
        raise ValueError(f"classes must be integer labels of {dataset}, in [0, {total}); got {classes!r}")
    outside = [c for c in classes if not 0 <= c < total]
    if outside:
        raise ValueError(f"classes must be labels of {dataset}, in [0, {total}); got {outside[0]} in {classes}")
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"classes must be at least two distinct labels of {dataset}; got {classes}")


def select_classes(split: Split, classes: Sequence[int]) -> Split:
    """The examples of ``split`` whose label is one of ``classes``, relabelled: ``classes[i]`` becomes ``i``.

    The examples keep their order.

    Example:
        >>> split = Split(torch.zeros(5, 1, 2, 2), torch.tensor([3, 1, 4, 1, 5]))
        >>> select_classes(split, [1, 5]).y
        tensor([0, 0, 1])
    """
    classes = [int(c) for c in classes]
    top = max(max(classes), int(split.y.max()) if len(split) else 0) + 1
    table = torch.full((top,), -1, dtype=torch.int64)  # old label -> new label, -1 for a class left out
    table[classes] = torch.arange(len(classes))
    labels = table[split.y.cpu()]
    keep = labels >= 0
    return Split(split.x[keep.to(split.x.device)], labels[keep].to(split.y.device))


def _load_digits(*, split_seed: int, test_fraction: float) -> tuple[Split, Split, DatasetInfo]:
    """Loads sklearn's digits, split stratified and normalised with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / _DIGITS_MAX_VALUE  # N x 8 x 8
    labels = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels
    )
    mean = float(x_train.mean())
    std = float(x_train.std())
    info = DatasetInfo(
        name="digits",
        num_classes=NUM_CLASSES["digits"],
        in_channels=1,
        image_size=int(images.shape[-1]),
        mean=(mean,),
        std=(std,),
    )
    train = _digits_split(x_train, y_train, mean, std)
    test = _digits_split(x_test, y_test, mean, std)
    return train, test, info


def _digits_split(images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> Split:
    normalised = ((images - mean) / std).astype(np.float32)[:, None, :, :]
    return Split(torch.tensor(normalised), torch.tensor(labels, dtype=torch.int64))


def mnist1d_recipe() -> dict[str, object]:
    """The generator's default arguments (its ``url`` left out: nothing is downloaded) and its version."""
    from importlib.metadata import version

    from mnist1d.data import get_dataset_args

    args = {k: v for k, v in get_dataset_args(as_dict=True).items() if k != "url"}
    return {"generator": "mnist1d.data.make_dataset", "mnist1d": version("mnist1d"), "args": args}


@contextlib.contextmanager
def _global_random_state_kept() -> Iterator[None]:
    """Restore Python's and NumPy's global random states, which ``mnist1d`` reseeds, on the way out."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _generate_mnist1d(recipe: dict[str, object]) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    with _global_random_state_kept():
        data = make_dataset(ObjectView(dict(recipe["args"])))  # type: ignore[arg-type]
    return {"x": np.asarray(data["x"], np.float32), "y": np.asarray(data["y"], np.int64),
            "x_test": np.asarray(data["x_test"], np.float32), "y_test": np.asarray(data["y_test"], np.int64)}


def _read_mnist1d_cache(path: Path, recipe: dict[str, object]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file holds another recipe; a damaged file is an error naming it."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in ("x", "y", "x_test", "y_test", "recipe")}
    except Exception as error:  # noqa: BLE001 - any failure to read it means the file is damaged
        raise ValueError(f"{path}: not a readable MNIST-1D cache ({type(error).__name__}: {error}); "
                         "delete it to generate the data again") from None
    if json.loads(str(arrays.pop("recipe"))) != recipe:
        return None
    return arrays


def _load_mnist1d(root: Path | None) -> tuple[Split, Split, DatasetInfo]:
    """MNIST-1D from the procedural generator, cached under ``root/mnist1d`` when a root is given."""
    try:
        recipe = mnist1d_recipe()
    except ImportError:
        raise ImportError("dataset 'mnist1d' needs the mnist1d package: pip install mnist1d") from None
    arrays = None
    cache = None
    if root is not None:
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        cache = root / "mnist1d" / f"mnist1d-{digest}.npz"
        if cache.exists():
            arrays = _read_mnist1d_cache(cache, recipe)
    if arrays is None:
        arrays = _generate_mnist1d(recipe)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cache, lambda f: np.savez(f, recipe=np.array(json.dumps(recipe, sort_keys=True)),
                                                       **arrays))
            except OSError as error:  # the cache saves a second; a data directory we cannot write is no error
                warnings.warn(f"MNIST-1D not cached in {cache.parent} ({error}); it is generated on every load",
                              stacklevel=2)
    length = int(arrays["x"].shape[-1])
    info = DatasetInfo(name="mnist1d", num_classes=NUM_CLASSES["mnist1d"], in_channels=1, image_size=length, mean=(0.0,), std=(1.0,))
    train = Split(torch.from_numpy(arrays["x"][:, None, :].copy()), torch.from_numpy(arrays["y"].copy()))
    test = Split(torch.from_numpy(arrays["x_test"][:, None, :].copy()), torch.from_numpy(arrays["y_test"].copy()))
    return train, test, info


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: str


_CIFAR_LAYOUTS: dict[str, _CifarLayout] = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        num_classes=NUM_CLASSES["cifar10"],
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        torchvision_class="CIFAR10",
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        num_classes=NUM_CLASSES["cifar100"],
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        torchvision_class="CIFAR100",
    ),
}


def _load_cifar(name: str, root: Path, *, download: bool) -> tuple[Split, Split, DatasetInfo]:
    layout = _CIFAR_LAYOUTS[name]
    directory = _find_cifar_directory(root, layout)
    if directory is None:
        if not download:
            raise FileNotFoundError(_missing_cifar_message(name, root, layout))
        _download_cifar(root, layout)
        directory = _find_cifar_directory(root, layout)
        if directory is None:
            raise FileNotFoundError(
                "torchvision reported success but " + _missing_cifar_message(name, root, layout)
            )
    train = _read_cifar_files(directory, layout.train_files, layout)
    test = _read_cifar_files(directory, layout.test_files, layout)
    info = DatasetInfo(
        name=name,
        num_classes=layout.num_classes,
        in_channels=3,
        image_size=_CIFAR_IMAGE_SIZE,
        mean=layout.mean,
        std=layout.std,
    )
    return train, test, info


def _cifar_candidates(root: Path, layout: _CifarLayout) -> tuple[Path, ...]:
    """Directories that may hold the batch files: ``root/<folder>`` or ``root`` itself."""
    return (root / layout.folder, root)


def _find_cifar_directory(root: Path, layout: _CifarLayout) -> Path | None:
    expected = layout.train_files + layout.test_files
    for candidate in _cifar_candidates(root, layout):
        if all((candidate / file).is_file() for file in expected):
            return candidate
    return None


def _missing_cifar_message(name: str, root: Path, layout: _CifarLayout) -> str:
    expected = layout.train_files + layout.test_files
    looked = " and ".join(f"'{c}'" for c in _cifar_candidates(root, layout))
    return (
        f"{name} files not found: looked in {looked} for {', '.join(expected)}. "
        f"Point root at the directory containing '{layout.folder}' (or at that folder), "
        "or pass --download (download=True) to fetch the dataset there."
    )


def _download_cifar(root: Path, layout: _CifarLayout) -> None:
    """Fetches the official archive with torchvision into the parent of ``layout.folder``."""
    try:
        import torchvision.datasets as tv_datasets
    except ImportError as error:
        raise ImportError(
            "downloading CIFAR needs torchvision, which is not installed; "
            'install it with: pip install "sam-landscape[vision]"'
        ) from error
    parent = root.parent if root.name == layout.folder else root
    parent.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(tv_datasets, layout.torchvision_class)
    dataset_class(root=str(parent), train=True, download=True)


def _read_cifar_files(directory: Path, files: tuple[str, ...], layout: _CifarLayout) -> Split:
    arrays = [_read_cifar_file(directory / file, layout) for file in files]
    data = np.concatenate([a for a, _ in arrays], axis=0)
    labels = np.concatenate([b for _, b in arrays], axis=0)
    return Split(_normalise_cifar(data, layout.mean, layout.std), torch.tensor(labels))


def _read_cifar_file(path: Path, layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """Reads one official CIFAR pickle into ``(uint8 N x 3072, int64 N)`` arrays.

    The official format is a pickled dict, so only read files you trust.
    """
    try:
        with path.open("rb") as handle:
            entry = pickle.load(handle, encoding="bytes")
    except Exception as error:  # unpickling garbage can raise almost anything
        raise ValueError(
            f"malformed CIFAR file '{path}': could not be unpickled "
            f"({type(error).__name__}: {error})"
        ) from error
    if not isinstance(entry, dict):
        raise ValueError(
            f"malformed CIFAR file '{path}': expected a pickled dict, got {type(entry).__name__}"
        )
    for key in (b"data", layout.label_key):
        if key not in entry:
            present = ", ".join(repr(k) for k in entry)
            raise ValueError(
                f"malformed CIFAR file '{path}': missing key {key!r} (keys present: {present})"
            )
    data = np.asarray(entry[b"data"])
    if data.ndim != 2 or data.shape[1] != _CIFAR_ROW_LENGTH or data.shape[0] == 0:
        raise ValueError(
            f"malformed CIFAR file '{path}': b'data' must have shape N x {_CIFAR_ROW_LENGTH} "
            f"with N > 0, got {data.shape}"
        )
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or data.min() < 0 or data.max() > 255:
            raise ValueError(
                f"malformed CIFAR file '{path}': b'data' must hold uint8 pixels (0..255), "
                f"got dtype {data.dtype}"
            )
        data = data.astype(np.uint8)
    labels = np.asarray(entry[layout.label_key])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"malformed CIFAR file '{path}': {layout.label_key!r} must list one label per "
            f"image ({data.shape[0]}), got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"malformed CIFAR file '{path}': {layout.label_key!r} must be integers, "
            f"got dtype {labels.dtype}"
        )
    if labels.min() < 0 or labels.max() >= layout.num_classes:
        raise ValueError(
            f"malformed CIFAR file '{path}': {layout.label_key!r} must lie in "
            f"[0, {layout.num_classes}), got range [{labels.min()}, {labels.max()}]"
        )
    return np.ascontiguousarray(data), labels.astype(np.int64)


def _normalise_cifar(
    data: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """``uint8 N x 3072`` rows (R, G, B planes, row-major) -> normalised float32 N x 3 x 32 x 32."""
    size = _CIFAR_IMAGE_SIZE
    images = torch.tensor(data).view(-1, 3, size, size).to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return images.sub_(mean_t).div_(std_t)


# --------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------


def crop_and_flip(
    x: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flip: torch.Tensor,
    padding: int = 4,
) -> torch.Tensor:
    """Zero-pads, crops back to the input size at given offsets, and optionally flips.

    The deterministic half of :func:`augment_batch`, for a whole batch at once:
    ``out[n] = hflip?(pad(x[n], padding)[:, top[n]:top[n]+H, left[n]:left[n]+W])``.
    With ``top == left == padding`` and no flip it is the identity. The pad
    value is 0, which for normalised data means "the per-channel mean".

    Args:
        x: Batch ``N x C x H x W``.
        top: Integer tensor ``N``, row offsets into the padded image, in ``[0, 2*padding]``.
        left: Integer tensor ``N``, column offsets, in ``[0, 2*padding]``.
        flip: Boolean tensor ``N``; where True the crop is mirrored left-right.
        padding: Zero padding on each side, ``>= 0``.

    Returns:
        A new tensor shaped like ``x``.

    Raises:
        ValueError: On a bad shape, dtype, offset range, or negative padding.
    """
    _check_batch(x, padding)
    n = x.shape[0]
    for label, tensor in (("top", top), ("left", left), ("flip", flip)):
        if tensor.shape != (n,):
            raise ValueError(f"{label} must have shape ({n},), got {tuple(tensor.shape)}")
    if flip.dtype != torch.bool:
        raise ValueError(f"flip must be a bool tensor, got {flip.dtype}")
    for label, tensor in (("top", top), ("left", left)):
        if tensor.is_floating_point() or tensor.dtype == torch.bool:
            raise ValueError(f"{label} must be an integer tensor, got {tensor.dtype}")
        if n and (int(tensor.min()) < 0 or int(tensor.max()) > 2 * padding):
            raise ValueError(
                f"{label} offsets must lie in [0, {2 * padding}] for padding={padding}, got "
                f"range [{int(tensor.min())}, {int(tensor.max())}]"
            )
    device = x.device
    return _crop_and_flip(
        x, top.to(device, torch.int64), left.to(device, torch.int64), flip.to(device), padding
    )


def augment_batch(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation for a whole batch, on the batch's device.

    Zero-pads by ``padding`` pixels, takes a random crop of the original size
    (independent offsets per example, uniform in ``[0, 2*padding]``), then flips
    left-right with probability 0.5 — the recipe of He et al. 2016 used by the
    SAM paper. Everything is a few batched tensor ops (an index grid plus one
    gather), with no Python loop over examples.

    Padding happens on *normalised* data, so the pad value 0 equals the
    per-channel dataset mean (as in pipelines that pad with the mean colour),
    not black.

    Random numbers are drawn from ``generator`` in this order: row offsets,
    column offsets, flips (each ``N`` values). The generator must live on the
    same device type as ``x`` (a CUDA generator for CUDA data).

    Args:
        x: Batch ``N x C x H x W``.
        generator: Source of randomness, advanced by the call.
        padding: Zero padding on each side, ``>= 0``.

    Returns:
        A new, augmented tensor shaped like ``x``.

    Raises:
        ValueError: If ``x`` is not 4-D, ``padding`` is negative, or the generator
            is on a different device type than ``x``.
    """
    _check_batch(x, padding)
    if generator.device.type != x.device.type:
        raise ValueError(
            f"generator is on {generator.device} but the batch is on {x.device}; "
            "use torch.Generator(device=x.device)"
        )
    top, left, flip = _augmentation_draws(x.shape[0], generator, x.device, padding)
    return _crop_and_flip(x, top, left, flip, padding)


def _augmentation_draws(
    n: int, generator: torch.Generator, device: torch.device, padding: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row offsets, column offsets and flips for ``n`` examples, in :func:`augment_batch`'s order."""
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    return top, left, flip


def _check_batch(x: torch.Tensor, padding: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a batch of shape N x C x H x W, got shape {tuple(x.shape)}")
    if int(padding) != padding or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}")


def _crop_and_flip(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Unchecked core of :func:`crop_and_flip`; offsets are int64 on ``x.device``."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    device = x.device
    rows = top[:, None] + torch.arange(h, device=device)  # N x H
    cols_in_crop = torch.arange(w, device=device).expand(n, w)  # N x W
    cols_in_crop = torch.where(flip[:, None], (w - 1) - cols_in_crop, cols_in_crop)
    cols = left[:, None] + cols_in_crop  # N x W
    batch_index = torch.arange(n, device=device)[:, None, None, None]
    channel_index = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


# --------------------------------------------------------------------------------------
# Iteration
# --------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed for ``(seed, epoch)``; distinct pairs give distinct seeds in practice."""
    return (seed * _SEED_MULTIPLIER + epoch) % (1 << 64)


class DeviceLoader:
    """Mini-batches cut from a :class:`Split` that lives on a device.

    The split is moved to ``device`` once, at construction. Each pass over the
    loader draws the permutation (and, with ``augment=True``, the augmentation)
    from a fresh ``torch.Generator`` on the data's device seeded from
    ``(seed, epoch)`` only. Like ``DistributedSampler``, the epoch does not
    advance by itself: call :meth:`set_epoch` before each epoch, otherwise every
    pass repeats the same order. A run resumed at epoch ``e`` (``set_epoch(e)``)
    therefore sees exactly the batches an uninterrupted run sees at epoch ``e``.

    Note that CPU and CUDA generators produce different streams, so batches are
    reproducible per device type, not across devices.

    Sharded for DistributedDataParallel (``num_replicas > 1``): ``batch_size`` is
    the *global* batch. Every rank draws the same permutation (same seed, as
    ``DistributedSampler`` does) and keeps rank ``r``'s contiguous share of each
    global batch, so the replicas' shares of every full global batch are
    exactly the batch a single process would see, augmentation included (the
    crops and flips are drawn for the whole global batch and each rank applies
    its share's). A final global batch that does not split evenly is padded
    with the epoch's first examples, as ``DistributedSampler`` pads, so that
    every replica holds the same number of examples and DDP's mean over
    replicas is the batch mean; that padded batch, and its augmentation,
    differ from the single-process one.

    Args:
        split: The data to iterate.
        batch_size: Examples per batch, ``>= 1``.
        shuffle: Draw a new random order each epoch; otherwise keep the stored order.
        augment: Apply :func:`augment_batch` (pad 4, random crop, flip) to each batch.
        drop_last: Drop the final batch if it is smaller than ``batch_size``.
        seed: Non-negative base seed.
        device: Where to hold the data and produce batches; ``None`` keeps the
            split where it is.
        num_replicas: Number of data-parallel processes sharing each batch.
        rank: This process's index among them.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(num_replicas) != num_replicas or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        if int(rank) != rank or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an integer in [0, {num_replicas}), got {rank!r}")
        if batch_size % num_replicas:
            raise ValueError(
                f"the global batch_size {batch_size} must be divisible by the number of processes "
                f"{num_replicas}, so that every replica holds the same share"
            )
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.split = split.to(device) if device is not None else split
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self._epoch = 0

    @property
    def device(self) -> torch.device:
        """Device holding the data and the batches."""
        return self.split.x.device

    @property
    def epoch(self) -> int:
        """Epoch whose order the next pass uses."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose shuffle and augmentation the next pass uses.

        Args:
            epoch: Non-negative epoch index.

        Raises:
            ValueError: If ``epoch`` is negative or not an integer.
        """
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _generator(self) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_epoch_seed(self.seed, self._epoch))
        return generator

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = self._generator()
        n = len(self.split)
        order = (
            torch.randperm(n, generator=generator, device=self.device) if self.shuffle else None
        )
        x, y = self.split.x, self.split.y
        for batch in range(len(self)):
            start = batch * self.batch_size
            stop = min(start + self.batch_size, n)
            if self.num_replicas > 1:
                index = self._share(order, start, stop)
                xb, yb = x.index_select(0, index), y.index_select(0, index)
                if self.augment:
                    _check_batch(xb, 4)
                    share = slice(index.shape[0] * self.rank, index.shape[0] * (self.rank + 1))
                    size = index.shape[0] * self.num_replicas
                    top, left, flip = _augmentation_draws(size, generator, xb.device)
                    xb = _crop_and_flip(xb, top[share], left[share], flip[share], 4)
            else:
                if order is None:
                    xb, yb = x[start:stop], y[start:stop]
                else:
                    index = order[start:stop]
                    xb, yb = x.index_select(0, index), y.index_select(0, index)
                if self.augment:
                    xb = augment_batch(xb, generator)
            yield xb, yb

    def _share(self, order: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        """This rank's indices in the global batch ``[start, stop)``, padded to a multiple of the replicas."""
        n = len(self.split)
        positions = torch.arange(start, stop, device=self.device)
        short = -(stop - start) % self.num_replicas
        if short:  # wrap around to the epoch's first examples, as DistributedSampler pads
            positions = torch.cat([positions, torch.arange(short, device=self.device) % n])
        per_rank = positions.shape[0] // self.num_replicas
        mine = positions[self.rank * per_rank : (self.rank + 1) * per_rank]
        return mine if order is None else order[mine]
