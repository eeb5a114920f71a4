"""Training speed options: torch.compile, channels-last, bf16 by default on CUDA, fused or foreach updates.

Each must leave the training itself alone: the same weights (to float tolerance) as the plain eager run,
checkpoints a plain model loads, resume as before. Speed itself is measured in benchmarks/, not here.
"""

from __future__ import annotations

import pytest
import torch

from sam.cli import main
from sam.trainer import TrainConfig, build_optimizer, load_run, train

TINY = dict(epochs=1, batch_size=256, test_fraction=0.5)  # digits: 4 steps an epoch


pytestmark = pytest.mark.usefixtures("one_thread")


def _pretend_cuda(monkeypatch, bf16: bool = True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


def test_amp_and_channels_last_default_to_the_fast_choice_of_the_device(monkeypatch):
    on_cpu = TrainConfig(device="cpu")
    assert (on_cpu.amp, on_cpu.channels_last) == ("none", False)
    assert (TrainConfig().amp, TrainConfig().channels_last) == ("none", False)  # no GPU here
    _pretend_cuda(monkeypatch)
    assert (TrainConfig().amp, TrainConfig().channels_last) == ("bf16", True)
    assert (TrainConfig(device="cuda:1").amp, TrainConfig(device="cpu").amp) == ("bf16", "none")
    assert TrainConfig(amp="none", channels_last=False).amp == "none"  # an explicit choice is kept
    assert TrainConfig(amp="fp16").amp == "fp16"
    assert TrainConfig(dataset="mnist1d").channels_last is False  # 1-D signals: no NHWC
    with pytest.raises(ValueError, match="channels_last applies to image models"):
        TrainConfig(dataset="mnist1d", channels_last=True)
    _pretend_cuda(monkeypatch, bf16=False)
    assert TrainConfig().amp == "none"  # a GPU without bf16 keeps fp32


def test_the_cli_defaults_are_decided_by_the_device(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "auto is bf16 on a CUDA GPU that supports it, else none (default: auto)" in text
    assert "default: on for image models on CUDA" in text


def test_base_optimizers_take_the_foreach_update_on_the_cpu_and_fused_on_cuda():
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    for name in ("sgd", "sam"):
        optimizer = build_optimizer(TrainConfig(optimizer=name), params, torch.device("cpu"))
        base = getattr(optimizer, "base_optimizer", optimizer)
        assert base.param_groups[0]["foreach"] is True and not base.param_groups[0]["fused"]
    fused = build_optimizer(TrainConfig(optimizer="adamw"), params, torch.device("cuda"))
    assert fused.param_groups[0]["fused"] is True
    assert build_optimizer(TrainConfig(), params).param_groups[0]["foreach"] is None  # no device: torch's choice


def _weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


class _Stop(Exception):
    pass


def _stop_after_first_epoch(epoch, record):
    if epoch == 1:
        raise _Stop


def test_compiled_sam_training_matches_eager_saves_a_plain_model_and_resumes(tmp_path):
    settings = dict(optimizer="sam", epochs=2, batch_size=256, test_fraction=0.5, snapshot_every=1)
    eager = train(TrainConfig(**settings), tmp_path / "eager", progress=False)
    with pytest.raises(_Stop):  # killed after its first epoch, then resumed: compiled again from state.pt
        train(TrainConfig(**settings, compile=True), tmp_path / "compiled", progress=False,
              on_epoch_end=_stop_after_first_epoch)
    compiled = train(TrainConfig(**settings, compile=True), tmp_path / "compiled", resume=True, progress=False)
    assert [m["epoch"] for m in compiled.metrics] == [1, 2]
    sgd = train(TrainConfig(**{**settings, "optimizer": "sgd"}), tmp_path / "sgd", progress=False)
    # Compiled kernels sum in another order, and digits' many zero pixels make ties in max-pooling and
    # ReLU that the rounding can flip: the runs drift apart by 1e-3 relative in 8 steps. A compiled SAM
    # that dropped a pass or updated BatchNorm twice would be as far from eager SAM as SGD is (1e-2 to 1e-1).
    for epoch in (1, 2):
        snapshot = f"snapshots/epoch_000{epoch}.pt"
        reference, saved, other = (torch.load(run / snapshot, weights_only=True)
                                   for run in (eager.out_dir, compiled.out_dir, sgd.out_dir))
        assert saved.keys() == reference.keys()  # no _orig_mod. prefix: the plain module is saved
        for key, value in reference.items():
            if value.dtype.is_floating_point:
                drift = float((saved[key] - value).norm() / value.norm())
                assert drift < 0.3 * float((other[key] - value).norm() / value.norm()), key
    assert compiled.final["train_loss"] == pytest.approx(eager.final["train_loss"], rel=1e-3)
    assert load_run(tmp_path / "compiled").model.fc.weight.shape == (10, 64)


def test_channels_last_trains_the_same_model(tmp_path):
    plain = train(TrainConfig(**TINY, device="cpu"), tmp_path / "plain", progress=False)
    nhwc = train(TrainConfig(**TINY, device="cpu", channels_last=True), tmp_path / "nhwc", progress=False)
    assert nhwc.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    reference = _weights(plain)
    for key, value in _weights(nhwc).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-3, atol=2e-4, msg=key)
    loaded = load_run(tmp_path / "nhwc")  # a contiguous model loads the channels-last checkpoint
    torch.testing.assert_close(loaded.model.conv1.weight, reference["conv1.weight"], rtol=1e-3, atol=2e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_training_takes_bf16_channels_last_and_fused_updates_compiled_or_not(tmp_path):
    fast = dict(optimizer="sam", device="cuda", epochs=3, batch_size=256, lr=0.05)  # test_trainer's FAST
    config = TrainConfig(**fast)
    assert (config.amp, config.channels_last) == ("bf16" if torch.cuda.is_bf16_supported() else "none", True)
    eager = train(config, tmp_path / "eager", progress=False)
    assert eager.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    compiled = train(TrainConfig(**fast, compile=True), tmp_path / "compiled", progress=False)
    for result in (eager, compiled):
        assert result.final["test_acc"] > 0.8 and result.metrics[-1]["skipped_steps"] == 0
    optimizer = build_optimizer(config, eager.model.parameters(), torch.device("cuda"))
    assert optimizer.base_optimizer.param_groups[0]["fused"] is True
    assert load_run(tmp_path / "compiled", device="cuda").model.fc.weight.shape == (10, 64)
