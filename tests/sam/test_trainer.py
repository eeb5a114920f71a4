"""The training loop: outputs, exact resume, divergence handling, schedules, every optimizer."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sam.models import build_model
from sam.optim import OPTIMIZERS, SAM
from sam.trainer import TrainConfig, TrainingDiverged, build_optimizer, lr_factor, resolve_device, train

FAST = dict(epochs=3, batch_size=256, lr=0.05)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_directory_holds_loadable_checkpoint_metrics_and_config(tmp_path):
    config = TrainConfig(optimizer="sam", snapshot_every=2, **FAST)
    result = train(config, tmp_path / "run", progress=False)

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for record in records:
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "time", "grad_norm", "images_per_sec"):
            assert math.isfinite(record[key]), key
    assert records[-1]["train_loss"] < records[0]["train_loss"]

    state_dict = _weights(tmp_path / "run" / "model.pt")
    model = build_model("digits_cnn", num_classes=10, in_channels=1)
    model.load_state_dict(state_dict)
    _assert_same_weights(state_dict, result.model.state_dict())
    torch.load(tmp_path / "run" / "state.pt", weights_only=True)

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert TrainConfig.from_dict(saved["config"]) == config
    assert saved["derived"]["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert saved["derived"]["train_size"] + saved["derived"]["test_size"] == 1797
    assert sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir()) == ["epoch_0002.pt"]
    assert oct((tmp_path / "run" / "model.pt").stat().st_mode & 0o777) != oct(0o600)


def test_metrics_match_an_independent_evaluation_of_the_saved_model(tmp_path):
    from sam.data import load_dataset

    result = train(TrainConfig(**FAST), tmp_path / "run", progress=False)
    _, test, _ = load_dataset("digits")
    model = build_model("digits_cnn", num_classes=10, in_channels=1)
    model.load_state_dict(_weights(tmp_path / "run" / "model.pt"))
    model.eval()
    with torch.no_grad():
        logits = model(test.x)
    loss = torch.nn.functional.cross_entropy(logits, test.y).item()
    acc = int((logits.argmax(1) == test.y).sum()) / len(test)
    assert result.final["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert result.final["test_acc"] == pytest.approx(acc, abs=1e-9)


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "every_k_sam", "gsam"])
def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, optimizer):
    config = TrainConfig(optimizer=optimizer, sam_every=3, rho_min=0.01, **{**FAST, "epochs": 4})
    train(config, tmp_path / "straight", progress=False)

    def interrupt(epoch, _record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", progress=False, on_epoch_end=interrupt)
    assert torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)["epoch"] == 2
    train(config, tmp_path / "resumed", resume=True, progress=False)

    _assert_same_weights(_weights(tmp_path / "straight" / "model.pt"), _weights(tmp_path / "resumed" / "model.pt"))
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    resumed = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(resumed) == 4
    for a, b in zip(straight, resumed):
        a, b = json.loads(a), json.loads(b)
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "grad_norm"):
            assert a[key] == b[key], key


@pytest.mark.slow
def test_process_killed_midway_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL (no clean-up at all) after the first checkpoint, then ``--resume`` through the CLI."""
    args = ["--optimizer", "sam", "--epochs", "12", "--batch-size", "256", "--lr", "0.05", "--no-progress"]
    command = [sys.executable, "-m", "sam.cli", "train", *args]
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "state.pt").exists():
        assert process.poll() is None, "training finished or failed before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    epoch_at_kill = torch.load(killed / "state.pt", weights_only=True)["epoch"]
    assert 1 <= epoch_at_kill < 12

    subprocess.run([*command, "--out", str(killed), "--resume"], check=True, capture_output=True)
    subprocess.run([*command, "--out", str(tmp_path / "straight")], check=True, capture_output=True)
    _assert_same_weights(_weights(tmp_path / "straight" / "model.pt"), _weights(killed / "model.pt"))
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 12


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    good = {}

    def poison(epoch, _record):
        if epoch == 2:
            good.update({k: v.clone() for k, v in _weights(run / "model.pt").items()})
            model_param = next(iter(result_holder["model"].parameters()))
            with torch.no_grad():
                model_param.fill_(float("nan"))

    result_holder = {}
    original_build = build_model

    def capture(*args, **kwargs):
        model = original_build(*args, **kwargs)
        result_holder["model"] = model
        return model

    import sam.trainer as trainer_module

    trainer_module.build_model, saved = capture, trainer_module.build_model
    try:
        with pytest.raises(TrainingDiverged, match=r"became nan in epoch 3.*Last good checkpoint: epoch 2"):
            train(TrainConfig(**{**FAST, "epochs": 5}), run, progress=False, on_epoch_end=poison)
    finally:
        trainer_module.build_model = saved
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["epoch"] == 2
    _assert_same_weights(good, _weights(run / "model.pt"))
    assert all(torch.isfinite(v).all() for v in _weights(run / "model.pt").values() if v.is_floating_point())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_existing_run_is_never_overwritten_and_resume_needs_the_same_config(tmp_path):
    config = TrainConfig(**{**FAST, "epochs": 1})
    train(config, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "model.pt").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(config, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"different config \(lr: saved 0.05, given 0.1\)"):
        train(TrainConfig(**{**FAST, "epochs": 1, "lr": 0.1}), tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "model.pt").read_bytes() == before
    # --resume on a finished run leaves it as it is; on an empty directory it starts the run.
    again = train(config, tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "model.pt").read_bytes() == before and len(again.metrics) == 1
    fresh = train(config, tmp_path / "empty", resume=True, progress=False)
    assert [r["epoch"] for r in fresh.metrics] == [1]


def _killed_at(monkeypatch, name: str, epoch: int, *, after: bool) -> None:
    """Make the trainer's checkpoint writes stop (as a SIGKILL would) at ``name`` of ``epoch``'s checkpoint:
    just before that file is written, or just after (the rename done, nothing more)."""
    import sam.trainer as trainer_module

    real = trainer_module.atomic_torch_save

    def save(obj, path):
        hit = Path(path).name == name and _checkpoint_epoch(obj, path) == epoch
        if hit and not after:
            raise KeyboardInterrupt
        real(obj, path)
        if hit:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "atomic_torch_save", save)


def _checkpoint_epoch(obj, path) -> int | None:
    name = Path(path).name
    if name == "state.pt":
        return obj["epoch"]
    return int(name[6:10]) if name.startswith("epoch_") else None


def test_a_snapshot_is_written_before_the_state_that_commits_its_epoch(tmp_path, monkeypatch):
    """A kill right after an epoch's state.pt must not lose that epoch's snapshot: the resumed run starts
    after that epoch and would never write it again."""
    config = TrainConfig(snapshot_every=2, **{**FAST, "epochs": 3})
    train(config, tmp_path / "straight", progress=False)
    run = tmp_path / "killed"
    _killed_at(monkeypatch, "state.pt", 2, after=True)
    with pytest.raises(KeyboardInterrupt):
        train(config, run, progress=False)
    monkeypatch.undo()
    train(config, run, resume=True, progress=False)
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["epoch_0002.pt"]
    _assert_same_weights(_weights(tmp_path / "straight" / "snapshots" / "epoch_0002.pt"),
                         _weights(run / "snapshots" / "epoch_0002.pt"))


def test_a_snapshot_of_an_epoch_its_state_never_committed_is_removed_on_resume(tmp_path, monkeypatch):
    """Analyses read snapshots/ (PCA directions): a snapshot ahead of state.pt is not the run's yet."""
    import sam.trainer as trainer_module

    config = TrainConfig(snapshot_every=1, **{**FAST, "epochs": 3})
    run = tmp_path / "run"
    _killed_at(monkeypatch, "state.pt", 2, after=False)  # after epoch 2's snapshot, before its state.pt
    with pytest.raises(KeyboardInterrupt):
        train(config, run, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    seen = []

    def stop(*args, **kwargs):  # the resumed run is stopped again before it trains a step
        seen.extend(sorted(p.name for p in (run / "snapshots").iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "_train_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        train(config, run, resume=True, progress=False)
    assert seen == ["epoch_0001.pt"]


def test_weights_metrics_or_snapshots_without_a_resume_state_are_never_trained_over(tmp_path):
    config = TrainConfig(snapshot_every=1, **{**FAST, "epochs": 2})
    run = tmp_path / "run"
    train(config, run, progress=False)
    (run / "state.pt").unlink()  # a finished run whose resume state was deleted to save space
    before = (run / "model.pt").read_bytes()
    for flags in ({}, {"resume": True}):
        with pytest.raises(FileExistsError, match=rf"{run} holds a run without its resume state \(state.pt\) but "
                           r"with model.pt, metrics.jsonl, snapshots/; it is not overwritten: pass --overwrite"):
            train(config, run, progress=False, **flags)
    assert (run / "model.pt").read_bytes() == before
    (run / "model.pt").unlink()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(FileExistsError, match=r"but with snapshots/; it is not overwritten: pass --overwrite"):
        train(config, run, progress=False)
    again = train(config, run, overwrite=True, progress=False)
    assert [r["epoch"] for r in again.metrics] == [1, 2]


def test_a_first_epoch_cut_short_before_its_state_is_trained_again_only_with_resume(tmp_path, monkeypatch):
    config = TrainConfig(snapshot_every=1, **{**FAST, "epochs": 2})
    train(config, tmp_path / "straight", progress=False)
    run = tmp_path / "killed"
    _killed_at(monkeypatch, "state.pt", 1, after=False)  # metrics, model.pt and the snapshot are written
    with pytest.raises(KeyboardInterrupt):
        train(config, run, progress=False)
    monkeypatch.undo()
    assert (run / "model.pt").exists() and not (run / "state.pt").exists()
    with pytest.raises(FileExistsError, match=r"with model.pt, metrics.jsonl, snapshots/; it is not overwritten: pass "
                       r"--resume to train its first epoch again, pass --overwrite"):
        train(config, run, progress=False)
    with pytest.raises(ValueError, match=r"different config \(lr: saved 0.05, given 0.1\)"):
        train(TrainConfig(snapshot_every=1, **{**FAST, "epochs": 2, "lr": 0.1}), run, resume=True, progress=False)
    result = train(config, run, resume=True, progress=False)
    assert [r["epoch"] for r in result.metrics] == [1, 2]
    _assert_same_weights(_weights(tmp_path / "straight" / "model.pt"), _weights(run / "model.pt"))


def test_overwrite_discards_the_resume_state_first_and_the_config_last(tmp_path, monkeypatch):
    """Killed at any point of the discard, what is left is never resumed, nor trained over without --overwrite."""
    config = TrainConfig(snapshot_every=1, **{**FAST, "epochs": 2})
    run = tmp_path / "run"
    train(config, run, progress=False)
    (run / "preset.json").write_text("{}")
    real_unlink = Path.unlink
    order = []

    def recording(self, missing_ok=False):
        order.append(self.relative_to(copy).as_posix())
        if len(order) == kill_at:
            raise KeyboardInterrupt
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", recording)
    copy, kill_at = tmp_path / "whole", None
    shutil.copytree(run, copy)
    train(TrainConfig(**{**FAST, "epochs": 1}), copy, overwrite=True, progress=False)
    discarded = order[:7]
    assert discarded == ["state.pt", "snapshots/epoch_0001.pt", "snapshots/epoch_0002.pt", "preset.json", "model.pt",
                         "metrics.jsonl", "config.json"]
    for kill_at in range(2, len(discarded) + 1):
        copy, order = tmp_path / f"killed-{kill_at}", []
        shutil.copytree(run, copy)
        with pytest.raises(KeyboardInterrupt):
            train(config, copy, overwrite=True, progress=False)
        assert not (copy / "state.pt").exists()  # nothing to resume from
        left = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())
        assert left == sorted(set(discarded[kill_at - 1:])), kill_at
        if left != ["config.json"]:
            with pytest.raises(FileExistsError, match="pass --overwrite"):
                train(config, copy, progress=False)
    monkeypatch.undo()


def test_users_own_module_trains_and_resumes(tmp_path):
    def mlp() -> torch.nn.Module:
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    config = TrainConfig(model="custom", optimizer="sam", **FAST)
    result = train(config, tmp_path / "run", progress=False, model=mlp())
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]
    derived = json.loads((tmp_path / "run" / "config.json").read_text())["derived"]
    assert derived["model_class"] == "torch.nn.modules.container.Sequential"
    again = train(config, tmp_path / "run", resume=True, progress=False, model=mlp())
    _assert_same_weights(again.model.state_dict(), result.model.state_dict())
    with pytest.raises(ValueError, match="config.model='custom'"):
        train(TrainConfig(**FAST), tmp_path / "other", progress=False, model=mlp())
    with pytest.raises(ValueError, match="or neither"):
        train(config, tmp_path / "other", progress=False)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_registered_optimizer_trains_through_the_trainer(tmp_path, optimizer):
    config = TrainConfig(optimizer=optimizer, m=32, **{**FAST, "epochs": 2, "batch_size": 64})
    result = train(config, tmp_path / optimizer, progress=False)
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]
    assert result.final["test_acc"] > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_digits_cnn_reaches_97_percent_with_default_settings(tmp_path, optimizer):
    """Issue acceptance: SGD and SAM (rho 0.05) each reach 97%+ test accuracy on digits."""
    result = train(TrainConfig(optimizer=optimizer), tmp_path / optimizer, progress=False)
    assert result.final["test_acc"] >= 0.97


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, amp):
    result = train(TrainConfig(optimizer="sam", amp=amp, **{**FAST, "epochs": 2}), tmp_path / amp, progress=False)
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]
    assert result.final["skipped_steps"] == 0


def test_cifar_format_training_with_device_augmentation(tmp_path):
    """The CIFAR path end to end on small files written in the real CIFAR-10 pickle format."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 8) for i in range(1, 6)), ("test_batch", 6)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    config = TrainConfig(dataset="cifar10", data_root=str(tmp_path), model="resnet20", epochs=1, batch_size=16)
    assert config.uses_augmentation
    result = train(config, tmp_path / "run", progress=False)
    assert result.final["steps"] == 3
    assert math.isfinite(result.final["train_loss"])


def test_lr_schedules_follow_their_closed_forms():
    config = TrainConfig(epochs=10, schedule="cosine")
    assert lr_factor(0, 100, config) == 1.0
    assert lr_factor(50, 100, config) == pytest.approx(0.5)
    assert lr_factor(100, 100, config) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(epochs=10, schedule="step", lr_milestones=[0.5, 0.75], lr_gamma=0.1)
    assert [lr_factor(s, 100, step) for s in (49, 50, 74, 75)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    warm = TrainConfig(epochs=10, schedule="constant", warmup_epochs=2)
    assert [lr_factor(s, 100, warm) for s in (0, 9, 19, 20, 99)] == pytest.approx([0.05, 0.5, 1.0, 1.0, 1.0])


def test_trainer_learning_rate_follows_the_schedule_and_gsam_rho_follows_lr(tmp_path):
    config = TrainConfig(optimizer="gsam", rho=0.05, rho_min=0.01, **FAST)
    result = train(config, tmp_path / "run", progress=False)
    steps = result.final["steps"]
    for record in result.metrics:
        expected = 0.05 * lr_factor(record["epoch"] * steps, 3 * steps, config)
        assert record["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_build_optimizer_maps_config_fields_onto_the_registry():
    params = list(build_model("digits_cnn").parameters())
    sgd = build_optimizer(TrainConfig(optimizer="sgd", lr=0.3, momentum=0.8, weight_decay=1e-3), params)
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"], sgd.param_groups[0]["weight_decay"]) == (0.3, 0.8, 1e-3)
    msam = build_optimizer(TrainConfig(optimizer="msam", m=8, rho=0.2, base_optimizer="adamw"), params)
    assert isinstance(msam, SAM) and msam.m == 8 and msam.param_groups[0]["rho"] == 0.2
    assert build_optimizer(TrainConfig(optimizer="asam"), params).param_groups[0]["rho"] == 0.5
    assert build_optimizer(TrainConfig(optimizer="sam"), params).param_groups[0]["rho"] == 0.05
    assert isinstance(msam.base_optimizer, torch.optim.AdamW)
    multi = build_optimizer(TrainConfig(optimizer="multistep_sam", ascent_steps=3), params)
    assert multi.ascent_steps == 3
    every = build_optimizer(TrainConfig(optimizer="every_k_sam", sam_every=5), params)
    assert every.k == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "resnet1000"}, "unknown model 'resnet1000'"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be a finite number >= 0"),
        ({"label_noise": 1.5}, r"label_noise must be in \[0, 1\]"),
        ({"dataset": "cifar10"}, "needs data_root"),
        ({"lr_milestones": [0.8, 0.2]}, "lr_milestones"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_cuda_requested_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_a_device_torch_does_not_know_is_a_clear_error_before_anything_runs(tmp_path):
    for device in ("foo", "cuda:x", ""):
        with pytest.raises(ValueError, match=f"device {device!r} is not a device: use auto, cpu, cuda, cuda:N"):
            resolve_device(device)
        with pytest.raises(ValueError, match=f"device {device!r} is not a device"):
            TrainConfig(device=device)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_gpu_matches_the_metrics_contract(tmp_path):
    result = train(TrainConfig(optimizer="sam", device="cuda", amp="bf16", **FAST), tmp_path / "gpu", progress=False)
    assert result.final["test_acc"] > 0.8
    assert next(result.model.parameters()).device.type == "cuda"
    assert os.path.exists(tmp_path / "gpu" / "model.pt")
