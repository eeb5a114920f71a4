"""Finetuning (#18): a run started from another run, a weights file or timm's pretrained weights.

A digits CNN pretrained on classes 0-5 is finetuned on classes 6-9 with a fresh head, with SGD and SAM:
it starts from the pretrained weights bit for bit, learns the new classes faster than from scratch, resumes
from its own state without the init, and its run directory feeds every analysis. timm models load fake
"pretrained" weights from a temporary Hugging Face cache, with the network switched off.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from landscape.storage import CorruptFileError
from sam.cli import main
from sam.data import load_dataset
from sam.finetune import read_state_dict
from sam.models import build_model, head_keys
from sam.trainer import TrainConfig, build_network, load_run, train

PRETRAIN = {"classes": [0, 1, 2, 3, 4, 5], "epochs": 3, "batch_size": 64}
FINETUNE = {"classes": [6, 7, 8, 9], "epochs": 1, "batch_size": 64, "lr": 0.05}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits CNN trained on classes 0-5 (about 3 s)."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    train(TrainConfig(**PRETRAIN), out, progress=False)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_equal_but_head(model: dict[str, torch.Tensor], init: dict[str, torch.Tensor], head: set[str],
                           keys: set[str] | None = None) -> None:
    for key in (keys if keys is not None else set(model)) - head:
        assert torch.equal(model[key], init[key]), key


def _parameter_names(config: TrainConfig, num_classes: int) -> set[str]:
    return {name for name, _ in build_model(config.model, num_classes=num_classes).named_parameters()}


# ------------------------------------------------------------------------------------- run inits


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_a_finetuned_run_starts_from_the_pretrained_weights_with_a_fresh_head_of_the_new_size(
        pretrained, tmp_path, optimizer):
    init = _weights(pretrained / "model.pt")
    config = TrainConfig(**{**FINETUNE, "lr": 0.0}, optimizer=optimizer, init_from=str(pretrained), reset_head=True)
    # lr 0: an epoch of SGD or SAM (whose perturbation is undone bit for bit) leaves every parameter where it started
    train(config, tmp_path / "run", progress=False)
    after = _weights(tmp_path / "run" / "model.pt")
    assert after["fc.weight"].shape == (4, 64) and init["fc.weight"].shape == (6, 64)
    _assert_equal_but_head(after, init, {"fc.weight", "fc.bias"}, _parameter_names(config, 4))
    derived = json.loads((tmp_path / "run" / "config.json").read_text())["derived"]
    assert derived["init"]["file"] == str((pretrained / "model.pt").resolve())
    assert derived["init"]["head_reset"] == ["fc.bias", "fc.weight"] and len(derived["init"]["sha256"]) == 64
    assert derived["dataset_info"]["num_classes"] == 4 and derived["dataset_info"]["classes"] == [6, 7, 8, 9]


def test_the_initial_network_holds_every_pretrained_tensor_buffers_included(pretrained):
    config = TrainConfig(**FINETUNE, init_from=str(pretrained), reset_head=True)
    info = load_dataset("digits", classes=config.classes)[2]
    model, record = build_network(config, info, init=True)
    _assert_equal_but_head(model.state_dict(), _weights(pretrained / "model.pt"), set(head_keys(model)))
    assert record.head_reset == ("fc.bias", "fc.weight")
    same_classes = TrainConfig(**PRETRAIN, init_from=str(pretrained))  # no reset: the head is loaded too
    model, record = build_network(same_classes, load_dataset("digits", classes=PRETRAIN["classes"])[2], init=True)
    _assert_equal_but_head(model.state_dict(), _weights(pretrained / "model.pt"), set())
    assert record.head_reset == ()


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_finetuning_learns_the_new_classes_faster_than_training_from_scratch(pretrained, tmp_path, optimizer):
    finetuned = train(TrainConfig(**FINETUNE, optimizer=optimizer, init_from=str(pretrained), reset_head=True),
                      tmp_path / "finetuned", progress=False).final
    scratch = train(TrainConfig(**FINETUNE, optimizer=optimizer), tmp_path / "scratch", progress=False).final
    # seeds 0-3 at this size: finetuned 0.66-0.77, scratch 0.25-0.55 test accuracy after one epoch
    assert finetuned["test_acc"] > scratch["test_acc"] + 0.1
    assert finetuned["test_loss"] < scratch["test_loss"]


def test_without_reset_head_a_head_of_another_size_is_refused_and_the_fix_named(pretrained, tmp_path):
    config = TrainConfig(**FINETUNE, init_from=str(pretrained))
    with pytest.raises(ValueError, match=r"run/model.pt does not fit the model digits_cnn \(other shapes for "
                                         r"\['fc.bias', 'fc.weight'\].*pass --reset-head"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_weights_files_of_every_common_kind_are_read(pretrained, tmp_path):
    state = _weights(pretrained / "model.pt")
    files = {"plain.pt": state, "lightning.ckpt": {"state_dict": state, "epoch": 3},
             "ddp.pt": {f"module.{k}": v for k, v in state.items()}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "weights.safetensors"))
    for path in [*(tmp_path / name for name in files), tmp_path / "weights.safetensors", pretrained / "state.pt"]:
        loaded = read_state_dict(path)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), path


def test_bad_inits_are_one_clear_error_naming_the_file(pretrained, tmp_path):
    def build(init_from, **extra):
        config = TrainConfig(**{**FINETUNE, **extra}, init_from=str(init_from), reset_head=True)
        return build_network(config, load_dataset("digits", classes=config.classes)[2], init=True)

    with pytest.raises(FileNotFoundError, match="nowhere: no such file or directory; pass a run directory"):
        build(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no run of sam-landscape train with a finished epoch"):
        build(tmp_path)
    (tmp_path / "half.pt").write_bytes((pretrained / "model.pt").read_bytes()[:500])
    with pytest.raises(CorruptFileError, match="half.pt is truncated or not a torch.save file"):
        build(tmp_path / "half.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(CorruptFileError, match=r"list.pt holds no state_dict .* got a dict with keys \['weights'\]"):
        build(tmp_path / "list.pt")
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(ValueError, match=r"linear.pt does not fit the model digits_cnn \(missing \['bn1.bias', "
                                         r"'bn1.num_batches_tracked', 'bn1.running_mean'\] ...; "
                                         r"unexpected \['bias', 'weight'\]"):
        build(tmp_path / "linear.pt")
    other = tmp_path / "resnet-run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"config": {"model": "resnet20"}}))
    torch.save(build_model("resnet20", in_channels=1).state_dict(), other / "model.pt")
    with pytest.raises(ValueError, match="the run in .*resnet-run trained resnet20: pass --model resnet20"):
        build(other)


def test_config_errors_name_the_field():
    for kwargs, message in [
        ({"reset_head": True}, "reset_head must come with init_from"),
        ({"init_from": ""}, "init_from must be a run directory, a weights file or timm:NAME"),
        ({"init_from": "timm:"}, "init_from must name timm's pretrained weights after timm:"),
        ({"init_from": "timm:resnet18", "model": "resnet20"}, "model must be left out or be timm:resnet18"),
        ({"model": "timm:"}, "model must name a timm model after timm:"),
        ({"classes": [3, 12]}, r"classes must be labels of digits, in \[0, 10\); got 12 in \[3, 12\]"),
        ({"classes": [3, 3]}, "classes must be at least two distinct labels of digits"),
        ({"classes": [3]}, "classes must be at least two distinct labels"),
        ({"image_size": 0}, "image_size must be an integer >= 1"),
        ({"dataset": "mnist1d", "image_size": 40}, "image_size must be left out for mnist1d"),
        ({"dataset": "mnist1d", "model": "timm:resnet18"}, "does not take the inputs of dataset 'mnist1d'"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs)
    assert TrainConfig(init_from="timm:resnet18", reset_head=True).model == "timm:resnet18"
    assert TrainConfig(classes=(2, 1)).classes == [2, 1]  # a list, as config.json gives it back


# ------------------------------------------------------------------------------------------ resume


def test_a_resumed_finetuning_run_continues_from_its_state_and_refuses_a_changed_init(pretrained, tmp_path):
    init = tmp_path / "init.pt"
    shutil.copy(pretrained / "model.pt", init)
    config = TrainConfig(**{**FINETUNE, "epochs": 2}, optimizer="sam", init_from=str(init), reset_head=True)
    whole = train(config, tmp_path / "whole", progress=False)

    def stop(epoch, metrics):
        raise KeyboardInterrupt

    for name in ("gone", "changed"):
        with pytest.raises(KeyboardInterrupt):
            train(config, tmp_path / name, progress=False, on_epoch_end=stop)
    init.unlink()  # a resume reads its state.pt, never the init
    resumed = train(config, tmp_path / "gone", resume=True, progress=False)
    assert resumed.metrics[-1]["test_loss"] == whole.metrics[-1]["test_loss"]
    for key, value in _weights(tmp_path / "whole" / "model.pt").items():
        assert torch.equal(_weights(tmp_path / "gone" / "model.pt")[key], value), key
    torch.save(build_model("digits_cnn", num_classes=6).state_dict(), init)  # other weights under the same name
    with pytest.raises(ValueError, match=r"cannot resume .*changed: its init file .*init.pt changed since the run "
                                         r"started \(SHA-256 [0-9a-f]{12}\.\.\., now [0-9a-f]{12}\.\.\.\)"
                                         r".*--overwrite"):
        train(config, tmp_path / "changed", resume=True, progress=False)


# ------------------------------------------------------------------------------- command line, analyses


def test_the_command_line_finetunes_and_the_run_feeds_every_analysis(pretrained, tmp_path, capsys):
    run = tmp_path / "finetuned"
    assert main(["train", "--classes", "6-9", "--epochs", "1", "--batch-size", "64", "--init-from", str(pretrained),
                 "--reset-head", "--optimizer", "sam", "--out", str(run), "--no-progress"]) == 0
    assert "sam on digits/digits_cnn" in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["init_from"], saved["reset_head"], saved["classes"]) == (str(pretrained), True, [6, 7, 8, 9])
    loaded = load_run(run)
    assert loaded.model.fc.out_features == 4 and set(loaded.test.y.tolist()) == {0, 1, 2, 3}
    assert main(["hessian", str(run), "--k", "1", "--no-trace", "--tol", "0.01", "--no-progress"]) == 0
    assert main(["surface", str(run), "--steps", "3", "--no-progress"]) == 0
    assert main(["sharpness", str(run), "--m", "64", "--measures", "m_sharpness", "--no-progress"]) == 0
    assert {"hessian.json", "surface_2d.npz", "sharpness.json"} <= {p.name for p in run.iterdir()}


@pytest.mark.parametrize("argv, message", [
    (["--classes", "0,x"], "argument --classes: takes class labels separated by commas"),
    (["--classes", "8-11"], "--classes: classes must be labels of digits, in [0, 10); got 10 in [8, 9, 10, 11]"),
    (["--reset-head"], "--reset-head: reset_head must come with init_from"),
    (["--init-from", "NOWHERE"], "--init-from NOWHERE: no such file or directory"),
    (["--model", "timm:"], "argument --model: invalid choice: 'timm:'"),
    (["--image-size", "0"], "argument --image-size: must be >= 1; got 0"),
])
def test_bad_finetuning_flags_are_one_line_errors(tmp_path, capsys, argv, message):
    argv = [a.replace("NOWHERE", str(tmp_path / "nowhere")) for a in argv]
    try:
        code = main(["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress", *argv])
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.replace("NOWHERE", str(tmp_path / "nowhere")) in err, err


# ---------------------------------------------------------------------------------------------- timm

RESNET = "test_resnet.r160_in1k"  # timm's tiny test networks (about 0.4M parameters), pretrained at 160 x 160
VIT = "test_vit.r160_in1k"


def _write_cifar10(root: Path, n_train: int = 8, n_test: int = 8) -> Path:
    """Tiny CIFAR-10 files in the real pickle format: 5 training batches and a test batch."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", n_train) for i in range(1, 6)), ("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _cache_fake_weights(cache: Path, name: str) -> dict[str, torch.Tensor]:
    """Random weights of timm's ``name`` laid out as the Hugging Face hub cache holds a download."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    state = timm.create_model(name.split(".")[0], pretrained=False).state_dict()
    repo = cache / f"models--timm--{name}"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return state


@pytest.fixture
def hub(tmp_path, monkeypatch) -> dict[str, dict[str, torch.Tensor]]:
    """A Hugging Face cache holding fake pretrained weights of timm's test networks; no network at all."""
    pytest.importorskip("timm")
    weights = {name: _cache_fake_weights(tmp_path / "hf" / "hub", name) for name in (RESNET, VIT)}
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _no_network(monkeypatch)
    return weights


def test_timm_pretrained_weights_come_from_the_local_cache_and_the_run_rebuilds_without_them(hub, tmp_path,
                                                                                           monkeypatch):
    root = _write_cifar10(tmp_path / "data")
    config = TrainConfig(dataset="cifar10", data_root=str(root), init_from=f"timm:{RESNET}", reset_head=True,
                         epochs=1, batch_size=16, lr=0.0)
    assert config.model == f"timm:{RESNET}"
    run = tmp_path / "run"
    train(config, run, progress=False)
    after = _weights(run / "model.pt")
    assert after["fc.weight"].shape == (10, hub[RESNET]["fc.weight"].shape[1])
    parameters = {name for name, _ in build_model(config.model, num_classes=10).named_parameters()}
    _assert_equal_but_head(after, hub[RESNET], {"fc.weight", "fc.bias"}, parameters)
    init = json.loads((run / "config.json").read_text())["derived"]["init"]
    assert init["file"].endswith(f"models--timm--{RESNET}/snapshots/{'0' * 40}/model.safetensors")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))  # the run's model.pt holds every weight
    loaded = load_run(run)
    assert type(loaded.model).__name__ == "ResNet" and loaded.model.fc.out_features == 10
    assert main(["hessian", str(run), "--k", "1", "--no-trace", "--tol", "0.01", "--no-progress"]) == 0


def test_a_timm_transformer_is_built_for_the_resized_images_and_resumes_to_the_same_metrics(hub, tmp_path):
    root = _write_cifar10(tmp_path / "data")
    config = TrainConfig(dataset="cifar10", data_root=str(root), init_from=f"timm:{VIT}", reset_head=True,
                         image_size=48, epochs=1, batch_size=20, optimizer="sam", lr=0.01)
    result = train(config, tmp_path / "run", progress=False)
    loaded = load_run(tmp_path / "run")
    assert loaded.model.patch_embed.img_size == (48, 48)  # timm built it for the size the hook resizes to
    from sam.trainer import evaluate

    assert evaluate(loaded.model, loaded.test) == pytest.approx((result.final["test_loss"], result.final["test_acc"]))


def test_timm_weights_missing_from_the_machine_are_one_error_saying_where_and_how(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    config = TrainConfig(dataset="cifar10", data_root=str(_write_cifar10(tmp_path / "data")),
                         init_from=f"timm:{RESNET}", reset_head=True, epochs=1)
    with pytest.raises(FileNotFoundError) as error:
        train(config, tmp_path / "run", progress=False)
    message = str(error.value)
    assert f"timm's pretrained weights for {RESNET} are not on this machine, and nothing is downloaded" in message
    cache = tmp_path / "empty" / "hub"
    assert f"timm/{RESNET} (model.safetensors or pytorch_model.bin) in the Hugging Face cache {cache}" in message
    assert f"hf download timm/{RESNET}" in message and "HF_HUB_CACHE" in message


def test_timm_inits_name_a_head_of_another_size_unknown_weights_and_a_corrupt_cache(hub, tmp_path):
    info = load_dataset("cifar10", root=_write_cifar10(tmp_path / "data"))[2]
    with pytest.raises(ValueError, match=f"timm's {RESNET} ends in a 1000-class head and the dataset has 10 classes: "
                                         "pass --reset-head"):
        build_network(TrainConfig(dataset="cifar10", data_root="x", init_from=f"timm:{RESNET}"), info, init=True)
    with pytest.raises(ValueError, match="timm has no pretrained weights named 'test_resnet.nope'.*r160_in1k"):
        build_network(TrainConfig(dataset="cifar10", data_root="x", init_from="timm:test_resnet.nope", reset_head=True),
                      info, init=True)
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        build_network(TrainConfig(dataset="cifar10", data_root="x", model="timm:no_such_net"), info)
    cached = next((tmp_path / "hf" / "hub" / f"models--timm--{RESNET}" / "snapshots").iterdir()) / "model.safetensors"
    cached.write_bytes(b"not safetensors")
    with pytest.raises(CorruptFileError, match="model.safetensors is not a readable .safetensors file"):
        build_network(TrainConfig(dataset="cifar10", data_root="x", init_from=f"timm:{RESNET}", reset_head=True),
                      info, init=True)


def test_without_timm_a_timm_model_asks_for_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"need timm: pip install sam-landscape\[timm\]"):
        build_model("timm:resnet18")


def test_the_finetuning_preset_trains_end_to_end_on_the_cpu_with_fake_weights(hub, tmp_path, capsys):
    from sam.presets import PRESETS

    preset = PRESETS["c10-effnet-b0-finetune-sam"]
    _cache_fake_weights(tmp_path / "hf" / "hub", preset.config["init_from"].removeprefix("timm:"))
    root = _write_cifar10(tmp_path / "data", n_train=2, n_test=4)
    # the preset as is (224 px, bf16 autocast, SAM, a fresh 10-class head), at a CPU's size
    assert main(["train", "--preset", "c10-effnet-b0-finetune-sam", "--data-root", str(root), "--epochs", "1",
                 "--batch-size", "10", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "sam on cifar10/timm:tf_efficientnet_b0.aa_in1k" in capsys.readouterr().out
    assert load_run(tmp_path / "run").model.classifier.out_features == 10
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert "c10-effnet-b0-finetune-sam" in text and "paper: EfficientNet-b7 test error 0.88%" in text
