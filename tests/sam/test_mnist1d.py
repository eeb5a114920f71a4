"""MNIST-1D as a built-in dataset end to end: its default model, no data directory, no augmentation, label
noise, a preset, and the analysis commands on a run trained on it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from landscape import hessian
from sam.cli import main
from sam.trainer import TrainConfig, load_run

pytest.importorskip("mnist1d")


def test_mnist1d_gets_its_own_model_needs_no_files_and_is_not_augmented():
    config = TrainConfig(dataset="mnist1d")
    assert config.model == "mnist1d_mlp" and config.data_root is None and not config.uses_augmentation
    assert TrainConfig(dataset="mnist1d", model="mnist1d_cnn").model == "mnist1d_cnn"
    assert TrainConfig().model == "digits_cnn"
    with pytest.raises(ValueError, match="augment .* does not apply to mnist1d"):
        TrainConfig(dataset="mnist1d", augment=True)


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist1d") / "run"
    assert main(["train", "--dataset", "mnist1d", "--epochs", "3", "--label-noise", "0.1", "--batch-size", "100",
                 "--optimizer", "sam", "--rho", "0.2", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    return out


def test_train_on_mnist1d_from_the_command_line(mnist1d_run):
    config = json.loads((mnist1d_run / "config.json").read_text())["config"]
    assert (config["dataset"], config["model"], config["label_noise"]) == ("mnist1d", "mnist1d_mlp", 0.1)
    rows = [json.loads(line) for line in (mnist1d_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["test_acc"] > 0.2  # ten classes: above chance after three epochs


def test_the_hessian_command_on_an_mnist1d_run_equals_the_library(mnist1d_run, capsys):
    assert main(["hessian", str(mnist1d_run), "--k", "1", "--device", "cpu", "--no-progress",
                 "--dtype", "float64"]) == 0
    saved = json.loads((mnist1d_run / "hessian.json").read_text())
    run = load_run(mnist1d_run)
    top = hessian.top_eigenvalues(run.model, F.cross_entropy, (run.train.x, run.train.y), k=1, dtype=torch.float64,
                                  progress=False)
    assert saved["lambda_max"] == pytest.approx(float(top.eigenvalues[0]), rel=1e-4)


def test_surface_and_sharpness_commands_run_on_mnist1d(mnist1d_run, capsys):
    assert main(["surface", str(mnist1d_run), "--dim", "1", "--steps", "5", "--device", "cpu", "--no-progress"]) == 0
    assert main(["sharpness", str(mnist1d_run), "--m", "1", "16", "--device", "cpu", "--no-progress"]) == 0
    assert (mnist1d_run / "surface_1d.json").exists() and (mnist1d_run / "sharpness.json").exists()


def test_a_preset_trains_on_mnist1d_with_its_model(tmp_path):
    out = tmp_path / "preset"
    assert main(["train", "--preset", "digits-sam", "--dataset", "mnist1d", "--epochs", "1", "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["dataset"], config["model"]) == ("mnist1d", "mnist1d_mlp")


@pytest.mark.parametrize("dataset, model", [("digits", "mnist1d_mlp"), ("mnist1d", "digits_cnn"), ("mnist1d", "resnet20")])
def test_a_model_that_does_not_take_the_datasets_inputs_is_refused_before_training(dataset, model, tmp_path, capsys):
    with pytest.raises(ValueError, match=f"model '{model}' does not take the inputs of dataset '{dataset}'"):
        TrainConfig(dataset=dataset, model=model)
    assert main(["train", "--dataset", dataset, "--model", model, "--out", str(tmp_path / "run")]) == 2
    assert "does not take the inputs" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_data_directory_that_cannot_be_written_only_loses_the_cache(tmp_path, monkeypatch):
    import sam.data as data_module
    from sam.data import load_dataset

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(data_module, "atomic_write", refuse)
    with pytest.warns(UserWarning, match="MNIST-1D not cached"):
        train, test, _ = load_dataset("mnist1d", root=tmp_path)
    assert train.x.shape == (4000, 1, 40) and not list(tmp_path.rglob("*.npz"))
