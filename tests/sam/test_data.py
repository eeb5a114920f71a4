"""Tests for sam.data: loading, label noise, device loader and augmentation (offline, fast)."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from sam.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DatasetInfo,
    DeviceLoader,
    Split,
    augment_batch,
    crop_and_flip,
    load_dataset,
    symmetric_label_noise,
)

# --------------------------------------------------------------------------------------
# Helpers: tiny CIFAR files in the official pickle format
# --------------------------------------------------------------------------------------

CIFAR10_TRAIN_PER_BATCH = 4
CIFAR10_TEST = 3


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, entry: object) -> None:
    with path.open("wb") as handle:
        pickle.dump(entry, handle)


def write_cifar10(parent: Path) -> dict[str, np.ndarray]:
    """Writes 5 train batches of 4 images and a test batch of 3 under parent/cifar-10-batches-py."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_data, train_labels = [], []
    for i in range(1, 6):
        data = _images(CIFAR10_TRAIN_PER_BATCH, seed=i)
        labels = [(4 * i + j) % 10 for j in range(CIFAR10_TRAIN_PER_BATCH)]
        _dump(
            folder / f"data_batch_{i}",
            {b"batch_label": b"training batch", b"labels": labels, b"data": data,
             b"filenames": [b"x.png"] * len(labels)},
        )
        train_data.append(data)
        train_labels += labels
    test_data = _images(CIFAR10_TEST, seed=99)
    test_labels = [7, 0, 9]
    _dump(folder / "test_batch", {b"labels": test_labels, b"data": test_data})
    return {
        "train_data": np.concatenate(train_data),
        "train_labels": np.array(train_labels),
        "test_data": test_data,
        "test_labels": np.array(test_labels),
    }


def write_cifar100(parent: Path) -> dict[str, np.ndarray]:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    train_data, test_data = _images(6, seed=1), _images(2, seed=2)
    train_labels, test_labels = [0, 99, 50, 3, 42, 99], [17, 98]
    _dump(folder / "train", {b"data": train_data, b"fine_labels": train_labels,
                             b"coarse_labels": [0] * 6})
    _dump(folder / "test", {b"data": test_data, b"fine_labels": test_labels,
                            b"coarse_labels": [0] * 2})
    return {"train_data": train_data, "train_labels": np.array(train_labels),
            "test_data": test_data, "test_labels": np.array(test_labels)}


def normalised_pixel(value: int, channel: int, mean, std) -> float:
    return (value / 255.0 - mean[channel]) / std[channel]


# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_and_info(digits):
    train, test, info = digits
    assert isinstance(info, DatasetInfo)
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == ("digits", 10, 1, 8)
    assert len(info.mean) == len(info.std) == 1
    assert train.x.shape[1:] == test.x.shape[1:] == (1, 8, 8)
    assert train.x.dtype == test.x.dtype == torch.float32
    assert train.y.dtype == test.y.dtype == torch.int64
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=1)


def test_digits_train_normalised(digits):
    train, test, _ = digits
    assert float(train.x.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(train.x.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert abs(float(test.x.mean())) < 0.1  # normalised with train stats: close, not exact


def test_digits_stratified(digits):
    train, test, _ = digits
    assert set(train.y.tolist()) == set(test.y.tolist()) == set(range(10))
    train_freq = torch.bincount(train.y, minlength=10).double() / len(train)
    test_freq = torch.bincount(test.y, minlength=10).double() / len(test)
    assert torch.allclose(train_freq, test_freq, atol=0.01)


def test_digits_deterministic_and_seeded(digits):
    train, test, info = digits
    train2, test2, info2 = load_dataset("digits")
    assert torch.equal(train.x, train2.x) and torch.equal(train.y, train2.y)
    assert torch.equal(test.x, test2.x) and torch.equal(test.y, test2.y)
    assert info == info2
    other, _, _ = load_dataset("digits", split_seed=1)
    assert not torch.equal(other.y, train.y)


def test_digits_test_fraction():
    train, test, _ = load_dataset("digits", test_fraction=0.5)
    assert abs(len(train) - len(test)) <= 1
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)


def test_unknown_dataset_names_accepted_ones():
    with pytest.raises(ValueError, match="mnist") as excinfo:
        load_dataset("mnist")
    for accepted in ("digits", "cifar10", "cifar100"):
        assert accepted in str(excinfo.value)


# --------------------------------------------------------------------------------------
# CIFAR readers
# --------------------------------------------------------------------------------------


def test_cifar10_shapes_labels_and_normalisation(tmp_path):
    written = write_cifar10(tmp_path)
    train, test, info = load_dataset("cifar10", root=tmp_path)
    assert info == DatasetInfo("cifar10", 10, 3, 32, CIFAR10_MEAN, CIFAR10_STD)
    assert train.x.shape == (5 * CIFAR10_TRAIN_PER_BATCH, 3, 32, 32)
    assert test.x.shape == (CIFAR10_TEST, 3, 32, 32)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.y.tolist() == written["train_labels"].tolist()
    assert test.y.tolist() == written["test_labels"].tolist()
    # Row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major.
    for split, data in ((train, written["train_data"]), (test, written["test_data"])):
        for example, channel, row, col in [(0, 0, 0, 0), (1, 1, 5, 7), (2, 2, 31, 30)]:
            raw = int(data[example, channel * 1024 + row * 32 + col])
            expected = normalised_pixel(raw, channel, CIFAR10_MEAN, CIFAR10_STD)
            assert float(split.x[example, channel, row, col]) == pytest.approx(expected, abs=1e-5)
    # Examples of the 3rd batch come after the first two batches, in order.
    raw = int(written["train_data"][9, 2 * 1024 + 3 * 32 + 4])
    assert float(train.x[9, 2, 3, 4]) == pytest.approx(
        normalised_pixel(raw, 2, CIFAR10_MEAN, CIFAR10_STD), abs=1e-5
    )


def test_cifar10_root_may_be_parent_or_batches_folder(tmp_path):
    write_cifar10(tmp_path)
    from_parent = load_dataset("cifar10", root=tmp_path)
    from_folder = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py")
    from_str = load_dataset("cifar10", root=str(tmp_path))
    for other in (from_folder, from_str):
        assert torch.equal(from_parent[0].x, other[0].x)
        assert torch.equal(from_parent[1].y, other[1].y)


def test_a_selection_of_classes_keeps_their_examples_relabelled_in_the_order_given(tmp_path):
    written = write_cifar100(tmp_path)  # train labels [0, 99, 50, 3, 42, 99], test labels [17, 98]
    train, test, info = load_dataset("cifar100", root=tmp_path, classes=[99, 3, 17])
    full_train, full_test, _ = load_dataset("cifar100", root=tmp_path)
    assert train.y.tolist() == [0, 1, 0] and test.y.tolist() == [2]
    assert torch.equal(train.x, full_train.x[[1, 3, 5]]) and torch.equal(test.x, full_test.x[[0]])
    assert (info.num_classes, info.classes) == (3, (99, 3, 17))
    assert written["train_labels"].tolist()[1] == 99
    digits_train, digits_test, digits_info = load_dataset("digits", classes=[5, 6, 7, 8, 9], label_noise=0.5)
    assert set(digits_train.y.tolist()) == set(digits_test.y.tolist()) == {0, 1, 2, 3, 4}  # noise among the kept
    assert digits_info.mean == load_dataset("digits")[2].mean  # the full dataset's normalisation
    with pytest.raises(ValueError, match=r"classes must be labels of cifar100, in \[0, 100\); got 100"):
        load_dataset("cifar100", root=tmp_path, classes=[1, 100])
    with pytest.raises(ValueError, match=r"the test split of cifar100 holds no example of the classes \[0, 50\]"):
        load_dataset("cifar100", root=tmp_path, classes=[0, 50])


def test_cifar100(tmp_path):
    written = write_cifar100(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-100-python"):
        train, test, info = load_dataset("cifar100", root=root)
        assert info == DatasetInfo("cifar100", 100, 3, 32, CIFAR100_MEAN, CIFAR100_STD)
        assert train.x.shape == (6, 3, 32, 32) and test.x.shape == (2, 3, 32, 32)
        assert train.y.tolist() == written["train_labels"].tolist()
        assert test.y.tolist() == written["test_labels"].tolist()
        raw = int(written["test_data"][1, 1024 + 10 * 32 + 20])
        assert float(test.x[1, 1, 10, 20]) == pytest.approx(
            normalised_pixel(raw, 1, CIFAR100_MEAN, CIFAR100_STD), abs=1e-5
        )


def test_cifar_missing_directory_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as excinfo:
        load_dataset("cifar10", root=missing)
    message = str(excinfo.value)
    assert str(missing) in message
    assert "cifar-10-batches-py" in message and "data_batch_1" in message
    assert "--download" in message


def test_cifar_partially_missing_files(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_needs_root():
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar100")


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, "3072"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "one label per image"),
        ({b"labels": [0] * 4}, "missing key b'data'"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, r"\[0, 10\)"),
        ([1, 2, 3], "pickled dict"),
    ],
)
def test_cifar_malformed_file(tmp_path, entry, fragment):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    _dump(bad, entry)
    with pytest.raises(ValueError, match=fragment) as excinfo:
        load_dataset("cifar10", root=tmp_path)
    assert "data_batch_3" in str(excinfo.value)


def test_cifar_unpicklable_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="test_batch.*could not be unpickled"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_download_without_torchvision(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "sam-landscape\[vision\]"'):
        load_dataset("cifar10", root=tmp_path, download=True)


def test_cifar_download_uses_torchvision_then_own_reader(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            write_cifar10(Path(root))

    datasets = types.ModuleType("torchvision.datasets")
    datasets.CIFAR10 = FakeCIFAR10
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)

    # root given as the (missing) batches folder: the archive goes into its parent.
    train, test, _ = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", download=True)
    assert calls == [(str(tmp_path), True)]
    assert len(train) == 20 and len(test) == 3
    load_dataset("cifar10", root=tmp_path, download=True)  # files present: no second download
    assert len(calls) == 1


# --------------------------------------------------------------------------------------
# Label noise
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_symmetric_noise_changes_exact_count(rate):
    labels = torch.arange(1000) % 10
    noisy = symmetric_label_noise(labels, rate, 10, seed=3)
    changed = noisy != labels
    assert int(changed.sum()) == round(rate * 1000)
    assert noisy.dtype == labels.dtype and noisy.shape == labels.shape
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10


def test_symmetric_noise_rounds_count():
    labels = torch.zeros(7, dtype=torch.int64)
    assert int((symmetric_label_noise(labels, 0.3, 2, seed=0) != labels).sum()) == round(2.1)


def test_symmetric_noise_seeding_and_purity():
    labels = torch.arange(500) % 10
    before = labels.clone()
    a = symmetric_label_noise(labels, 0.4, 10, seed=1)
    b = symmetric_label_noise(labels, 0.4, 10, seed=1)
    c = symmetric_label_noise(labels, 0.4, 10, seed=2)
    assert torch.equal(labels, before)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(symmetric_label_noise(labels, 0.0, 10, seed=1), labels)


def test_symmetric_noise_new_class_is_uniform_over_others():
    labels = torch.zeros(20000, dtype=torch.int64)
    noisy = symmetric_label_noise(labels, 1.0, 5, seed=0)
    counts = torch.bincount(noisy, minlength=5)
    assert counts[0] == 0
    assert torch.all((counts[1:] - 5000).abs() < 300)


@pytest.mark.parametrize("rate", [-0.1, 1.01, float("nan")])
def test_symmetric_noise_rejects_bad_rate(rate):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        symmetric_label_noise(torch.zeros(10, dtype=torch.int64), rate, 10, seed=0)


def test_symmetric_noise_rejects_bad_labels():
    with pytest.raises(ValueError, match="lie in"):
        symmetric_label_noise(torch.tensor([0, 10]), 0.5, 10, seed=0)
    with pytest.raises(ValueError, match="num_classes"):
        symmetric_label_noise(torch.tensor([0, 0]), 0.5, 1, seed=0)


def test_load_dataset_noise_only_on_train(digits):
    clean_train, clean_test, _ = digits
    train, test, _ = load_dataset("digits", label_noise=0.3, noise_seed=5)
    assert torch.equal(train.x, clean_train.x)
    assert int((train.y != clean_train.y).sum()) == round(0.3 * len(clean_train))
    assert torch.equal(test.y, clean_test.y) and torch.equal(test.x, clean_test.x)
    with pytest.raises(ValueError, match="label_noise"):
        load_dataset("digits", label_noise=1.5)


def test_load_dataset_noise_on_cifar(tmp_path):
    written = write_cifar10(tmp_path)
    train, test, _ = load_dataset("cifar10", root=tmp_path, label_noise=0.5, noise_seed=0)
    assert int((train.y != torch.tensor(written["train_labels"])).sum()) == 10
    assert test.y.tolist() == written["test_labels"].tolist()


# --------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------


def test_split_len_to_and_validation():
    split = Split(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.int64))
    assert len(split) == 3
    moved = split.to("cpu")
    assert moved.x.device.type == "cpu" and len(moved) == 3
    with pytest.raises(ValueError, match="3 examples"):
        Split(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="N x C x H x W"):
        Split(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64))


# --------------------------------------------------------------------------------------
# DeviceLoader
# --------------------------------------------------------------------------------------


def id_split(n: int, size: int = 4, channels: int = 1) -> Split:
    """Each image is constant, equal to its index + 1; labels are the indices."""
    ids = torch.arange(n)
    x = (ids + 1).float().view(n, 1, 1, 1).expand(n, channels, size, size).contiguous()
    return Split(x, ids)


def collect(loader: DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)
    )


@pytest.mark.parametrize(("n", "batch_size", "drop_last", "expected"),
                         [(10, 3, False, 4), (10, 3, True, 3), (9, 3, False, 3), (9, 3, True, 3),
                          (2, 5, True, 0), (2, 5, False, 1)])
def test_loader_len(n, batch_size, drop_last, expected):
    loader = DeviceLoader(id_split(n), batch_size, shuffle=True, drop_last=drop_last)
    assert len(loader) == expected
    assert len(collect(loader)) == expected


def test_loader_covers_every_example_once_per_epoch():
    split = id_split(23)
    loader = DeviceLoader(split, 5, shuffle=True, seed=7)
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = collect(loader)
        assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
        ids = torch.cat([y for _, y in batches])
        assert sorted(ids.tolist()) == list(range(23))
        for x, y in batches:  # images stay aligned with their labels
            assert torch.equal(x[:, 0, 0, 0], (y + 1).float())


def test_loader_drop_last_drops_only_the_tail():
    loader = DeviceLoader(id_split(23), 5, shuffle=True, drop_last=True)
    ids = torch.cat([y for _, y in loader])
    assert len(ids) == 20 and len(set(ids.tolist())) == 20


def test_loader_without_shuffle_keeps_order():
    loader = DeviceLoader(id_split(7), 3, shuffle=False)
    assert torch.cat([y for _, y in loader]).tolist() == list(range(7))


def test_loader_order_depends_only_on_seed_and_epoch():
    split = id_split(50)
    loader = DeviceLoader(split, 8, shuffle=True, seed=3)
    epochs = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        epochs.append(collect(loader))
    assert not same_batches(epochs[0], epochs[1])
    assert not same_batches(epochs[1], epochs[2])
    # Same (seed, epoch) twice, and a "resumed" fresh loader jumping straight to epoch 2.
    assert same_batches(collect(loader), epochs[2])
    resumed = DeviceLoader(split, 8, shuffle=True, seed=3)
    resumed.set_epoch(2)
    assert same_batches(collect(resumed), epochs[2])
    other_seed = DeviceLoader(split, 8, shuffle=True, seed=4)
    other_seed.set_epoch(2)
    assert not same_batches(collect(other_seed), epochs[2])


def test_loader_augmentation_reproducible_and_aligned():
    split = id_split(40, size=8, channels=3)
    loader = DeviceLoader(split, 16, shuffle=True, augment=True, seed=1)
    loader.set_epoch(4)
    first = collect(loader)
    resumed = DeviceLoader(split, 16, shuffle=True, augment=True, seed=1)
    resumed.set_epoch(4)
    assert same_batches(first, collect(resumed))
    for x, y in first:
        assert x.shape[1:] == (3, 8, 8)
        # Crops of 8 with padding 4 always keep part of the constant image.
        assert torch.equal(x.amax(dim=(1, 2, 3)), (y + 1).float())
    # Augmentation actually changes something (zero padding shows up somewhere).
    assert any(bool((x == 0).any()) for x, _ in first)


def test_loader_device_and_validation():
    split = id_split(4)
    loader = DeviceLoader(split, 2, shuffle=False, device="cpu")
    assert loader.device.type == "cpu"
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(split, 0, shuffle=False)
    with pytest.raises(ValueError, match="seed"):
        DeviceLoader(split, 2, shuffle=False, seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda():
    split = id_split(30, size=8, channels=3)
    loader = DeviceLoader(split, 8, shuffle=True, augment=True, seed=2, device="cuda")
    loader.set_epoch(1)
    first = collect(loader)
    assert all(x.is_cuda and y.is_cuda for x, y in first)
    assert sorted(torch.cat([y for _, y in first]).tolist()) == list(range(30))
    again = DeviceLoader(split, 8, shuffle=True, augment=True, seed=2, device="cuda")
    again.set_epoch(1)
    assert same_batches(first, collect(again))


# --------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------


def test_crop_and_flip_identity_and_flip():
    x = torch.randn(5, 3, 32, 32)
    centre = torch.full((5,), 4)
    no_flip = torch.zeros(5, dtype=torch.bool)
    assert torch.equal(crop_and_flip(x, centre, centre, no_flip), x)
    assert torch.equal(crop_and_flip(x, centre, centre, ~no_flip), x.flip(-1))
    zeros = torch.zeros(5, dtype=torch.int64)
    assert torch.equal(crop_and_flip(x, zeros, zeros, no_flip, padding=0), x)


def test_crop_and_flip_shifts_a_bright_pixel():
    row, col, padding = 10, 12, 4
    top = torch.tensor([0, 4, 8, 2, 7, 3])
    left = torch.tensor([0, 4, 8, 6, 1, 5])
    flip = torch.tensor([False, False, False, False, True, True])
    x = torch.zeros(6, 2, 32, 32)
    x[:, 1, row, col] = 1.0
    out = crop_and_flip(x, top, left, flip, padding)
    assert out.shape == x.shape
    for n in range(6):
        expected_row = row - (int(top[n]) - padding)
        expected_col = col - (int(left[n]) - padding)
        if flip[n]:
            expected_col = 31 - expected_col
        assert float(out[n].sum()) == 1.0
        assert float(out[n, 1, expected_row, expected_col]) == 1.0


def test_crop_and_flip_pads_with_zero():
    x = torch.ones(1, 1, 6, 6)
    out = crop_and_flip(x, torch.tensor([0]), torch.tensor([8]), torch.tensor([False]))
    # Shifted down by 4 and left by 4: top 4 rows and right 4 columns come from the padding.
    assert torch.equal(out[0, 0, :4], torch.zeros(4, 6))
    assert torch.equal(out[0, 0, :, 2:], torch.zeros(6, 4))
    assert torch.equal(out[0, 0, 4:, :2], torch.ones(2, 2))


def test_crop_and_flip_rejects_bad_input():
    x = torch.zeros(2, 1, 4, 4)
    ok = torch.tensor([0, 0])
    no = torch.tensor([False, False])
    with pytest.raises(ValueError, match=r"\[0, 8\]"):
        crop_and_flip(x, torch.tensor([0, 9]), ok, no)
    with pytest.raises(ValueError, match="shape"):
        crop_and_flip(x, torch.tensor([0]), ok, no)
    with pytest.raises(ValueError, match="bool"):
        crop_and_flip(x, ok, ok, ok)
    with pytest.raises(ValueError, match="N x C x H x W"):
        crop_and_flip(torch.zeros(1, 4, 4), ok[:1], ok[:1], no[:1])


def test_augment_batch_matches_crop_and_flip_with_same_draws():
    x = torch.randn(16, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    top = torch.randint(0, 9, (16,), generator=g)
    left = torch.randint(0, 9, (16,), generator=g)
    flip = torch.randint(0, 2, (16,), generator=g).bool()
    assert torch.equal(out, crop_and_flip(x, top, left, flip))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)


def test_augment_batch_statistics():
    """A bright pixel left of centre reveals each example's offsets and flip."""
    n, row, col = 4000, 16, 10
    x = torch.zeros(n, 1, 32, 32)
    x[:, 0, row, col] = 1.0
    before = x.clone()
    out = augment_batch(x, torch.Generator().manual_seed(123))
    assert torch.equal(x, before)
    flat = out.view(n, -1)
    assert torch.all(flat.sum(dim=1) == 1.0)  # an offset of at most 4 never loses the pixel
    position = flat.argmax(dim=1)
    out_row, out_col = position // 32, position % 32
    flipped = out_col > 15  # unflipped columns lie in [6, 14], flipped ones in [17, 25]
    shift_col = torch.where(flipped, (31 - out_col) - col, out_col - col)
    shift_row = out_row - row
    assert set(shift_row.tolist()) == set(range(-4, 5))
    assert set(shift_col.tolist()) == set(range(-4, 5))
    assert abs(float(flipped.float().mean()) - 0.5) < 0.05
    for shifts in (shift_row, shift_col):
        counts = torch.bincount(shifts + 4, minlength=9).float() / n
        assert torch.all((counts - 1 / 9).abs() < 0.03)


def test_augment_batch_is_vectorised():
    """The number of torch calls does not grow with the batch size (no per-example loop)."""

    class CountCalls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (2, 64):
        x = torch.randn(n, 3, 32, 32)
        with CountCalls() as counter:
            augment_batch(x, torch.Generator().manual_seed(0))
        counts.append(counter.calls)
    assert 0 < counts[0] == counts[1] < 40


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_batch_rejects_mismatched_generator():
    with pytest.raises(ValueError, match="generator"):
        augment_batch(torch.zeros(2, 3, 8, 8), torch.Generator(device="cuda"))


# --------------------------------------------------------------------------------------
# MNIST-1D (procedural, offline)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d():
    pytest.importorskip("mnist1d")
    return load_dataset("mnist1d")


def test_mnist1d_is_the_generators_default_dataset(mnist1d):
    from mnist1d.data import get_dataset_args, make_dataset

    train, test, info = mnist1d
    reference = make_dataset(get_dataset_args())  # the package itself, called directly
    assert train.x.shape == (4000, 1, 40) and test.x.shape == (1000, 1, 40)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    np.testing.assert_allclose(train.x[:, 0].numpy(), reference["x"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(test.y.numpy(), reference["y_test"])
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == ("mnist1d", 10, 1, 40)
    assert sorted(set(train.y.tolist())) == list(range(10))


def test_mnist1d_leaves_the_global_random_state_as_it_was(mnist1d):
    import random

    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    load_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == expected


def test_mnist1d_is_cached_with_its_recipe_and_read_back(mnist1d, tmp_path, monkeypatch):
    import json

    import sam.data as data_module

    first = load_dataset("mnist1d", root=tmp_path)
    [cache] = (tmp_path / "mnist1d").glob("mnist1d-*.npz")
    with np.load(cache) as stored:
        assert json.loads(str(stored["recipe"])) == data_module.mnist1d_recipe()
    monkeypatch.setattr(data_module, "_generate_mnist1d", lambda recipe: pytest.fail("the cache was not used"))
    again = load_dataset("mnist1d", root=tmp_path, label_noise=0.2, noise_seed=1)
    assert torch.equal(again[0].x, first[0].x) and torch.equal(again[1].y, mnist1d[1].y)
    changed = (again[0].y != first[0].y).float().mean().item()
    assert changed == pytest.approx(0.2, abs=1e-3)  # label noise on the training split


def test_mnist1d_cache_of_another_recipe_is_regenerated_and_a_damaged_one_named(mnist1d, tmp_path):
    import json

    load_dataset("mnist1d", root=tmp_path)
    [cache] = (tmp_path / "mnist1d").glob("mnist1d-*.npz")
    with np.load(cache) as stored:
        arrays = {k: stored[k] for k in stored.files}
    arrays["x"] = np.zeros_like(arrays["x"])
    arrays["recipe"] = np.array(json.dumps({"generator": "something else"}))
    np.savez(cache, **arrays)
    train, _, _ = load_dataset("mnist1d", root=tmp_path)
    assert torch.equal(train.x, mnist1d[0].x)
    cache.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=f"{cache}.*not a readable MNIST-1D cache"):
        load_dataset("mnist1d", root=tmp_path)
