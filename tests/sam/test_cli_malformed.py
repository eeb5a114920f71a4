"""Malformed input of every kind: flags, files, checkpoints, configs, data.

Each case runs the real command in a fresh process and must end with exit code 2 and exactly one line on
standard error that names the problem (and the file, where one is to blame): no traceback, no warning.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from sam.cli import main

Case = tuple[str, Callable[[Path, Path], list[str]], str]


def _run(root: Path, name: str) -> Path:
    return root / "runs" / name


def _copy(trained: Path, root: Path, name: str) -> Path:
    """A copy of the trained run to break."""
    target = _run(root, name)
    shutil.copytree(trained, target)
    return target


def _write(path: Path, data: bytes | str) -> None:
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


class _Executable:  # pickled into a checkpoint: must never be executed (weights_only=True)
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _truncated_model(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "truncated")
    blob = (run / "model.pt").read_bytes()
    _write(run / "model.pt", blob[: len(blob) // 2])
    return ["hessian", str(run), "--k", "1"]


def _empty_model(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "empty")
    _write(run / "model.pt", b"")
    return ["surface", str(run), "--steps", "3"]


def _unsafe_model(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "unsafe")
    torch.save({"weight": _Executable()}, run / "model.pt")
    return ["hessian", str(run), "--k", "1"]


def _garbage_model(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "garbage")
    _write(run / "model.pt", bytes(range(256)) * 40)
    return ["sharpness", str(run), "--m", "64"]


def _foreign_model(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "foreign")
    torch.save(torch.nn.Linear(3, 2).state_dict(), run / "model.pt")
    return ["hessian", str(run), "--k", "1"]


def _tensor_model(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "tensor")
    torch.save(torch.zeros(3), run / "model.pt")
    return ["hessian", str(run), "--k", "1"]


def _snapshot_of_another_model(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "snapshot")
    (run / "snapshots").mkdir(exist_ok=True)
    torch.save({"x": torch.zeros(2)}, run / "snapshots" / "epoch_0001.pt")
    return ["hessian", str(run / "snapshots" / "epoch_0001.pt"), "--k", "1"]


def _edit_config(trained: Path, root: Path, name: str, edit: Callable[[dict], object]) -> Path:
    run = _copy(trained, root, name)
    saved = json.loads((run / "config.json").read_text())
    _write(run / "config.json", json.dumps(edit(saved)))
    return run


def _truncated_config(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "config-truncated")
    text = (run / "config.json").read_text()
    _write(run / "config.json", text[: len(text) // 2])
    return ["hessian", str(run), "--k", "1"]


def _config_list(trained: Path, root: Path) -> list[str]:
    run = _edit_config(trained, root, "config-list", lambda saved: [saved])
    return ["train", "--out", str(run), "--epochs", "1", "--resume"]


def _config_unknown_model(trained: Path, root: Path) -> list[str]:
    def edit(saved: dict) -> dict:
        saved["config"]["model"] = "resnet9000"
        return saved

    return ["surface", str(_edit_config(trained, root, "config-model", edit)), "--steps", "3"]


def _config_unknown_key(trained: Path, root: Path) -> list[str]:
    def edit(saved: dict) -> dict:
        saved["config"]["learning_rate"] = 0.1
        return saved

    return ["sharpness", str(_edit_config(trained, root, "config-key", edit)), "--m", "64"]


def _config_bad_value(trained: Path, root: Path) -> list[str]:
    def edit(saved: dict) -> dict:
        saved["config"]["epochs"] = "many"
        return saved

    return ["hessian", str(_edit_config(trained, root, "config-value", edit)), "--k", "1"]


def _config_binary(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "config-binary")
    _write(run / "config.json", b"\xff\xfe\x00binary")
    return ["hessian", str(run), "--k", "1"]


def _metrics_corrupt(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "metrics")
    _write(run / "metrics.jsonl", (run / "metrics.jsonl").read_text() + '{"epoch": 2, "train_loss": \n')
    return ["train", "--out", str(run), "--epochs", "1", "--batch-size", "256", "--resume"]


def _metrics_not_records(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "metrics-list")
    _write(run / "metrics.jsonl", "[1, 2, 3]\n")
    return ["train", "--out", str(run), "--epochs", "1", "--batch-size", "256", "--resume"]


def _state_truncated(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "state")
    blob = (run / "state.pt").read_bytes()
    _write(run / "state.pt", blob[:100])
    return ["train", "--out", str(run), "--epochs", "1", "--batch-size", "256", "--resume"]


def _state_foreign(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "state-foreign")
    torch.save({"weights": torch.zeros(2)}, run / "state.pt")
    return ["train", "--out", str(run), "--epochs", "1", "--batch-size", "256", "--resume"]


def _edit_state(trained: Path, root: Path, name: str, key: str, value: object) -> list[str]:
    run = _copy(trained, root, name)
    state = torch.load(run / "state.pt", weights_only=True)
    state[key] = value
    torch.save(state, run / "state.pt")
    return ["train", "--out", str(run), "--epochs", "1", "--batch-size", "256", "--resume"]


def _state_of_another_model(trained: Path, root: Path) -> list[str]:
    return _edit_state(trained, root, "state-model", "model", torch.nn.Linear(3, 2).state_dict())


def _state_optimizer_of_another_run(trained: Path, root: Path) -> list[str]:
    return _edit_state(trained, root, "state-optimizer", "optimizer", {"state": {}, "param_groups": []})


def _state_rng_not_a_tensor(trained: Path, root: Path) -> list[str]:
    return _edit_state(trained, root, "state-rng", "rng_cpu", [1, 2, 3])


def _config_derived_not_an_object(trained: Path, root: Path) -> list[str]:
    def edit(saved: dict) -> dict:
        saved["derived"] = ["world_size", 1]
        return saved

    run = _edit_config(trained, root, "config-derived", edit)
    return ["train", "--out", str(run), "--epochs", "1", "--batch-size", "256", "--resume"]


def _hessian_recipe_not_an_object(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "hessian-recipe")
    _write(run / "hessian.json", json.dumps({"recipe": "fast", "lambda_max": 1.0}))
    return ["hessian", str(run), "--k", "1", "--resume"]


def _other_weights(trained: Path, root: Path, name: str) -> Path:
    """A copy of the trained run with other weights: a second minimum to compare with."""
    other = _copy(trained, root, name)
    torch.save({k: v + 0.01 for k, v in torch.load(other / "model.pt", weights_only=True).items()}, other / "model.pt")
    return other


def _compare_metrics_without_train_loss(trained: Path, root: Path) -> list[str]:
    other = _other_weights(trained, root, "compare-train-loss")
    rows = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    _write(other / "metrics.jsonl", "".join(json.dumps({k: v for k, v in r.items() if k != "train_loss"}) + "\n"
                                            for r in rows))
    return ["compare", str(trained), str(other), "--out", str(root / "cmp-train-loss")]


def _compare_one_surface_step(trained: Path, root: Path) -> list[str]:
    other = _other_weights(trained, root, "compare-steps")
    return ["compare", str(trained), str(other), "--out", str(root / "cmp-steps"), "--surface-steps", "1"]


def _compare_chunks_beyond_the_data(trained: Path, root: Path) -> list[str]:
    return ["compare", str(trained), str(_other_weights(trained, root, "compare-m")), "--out", str(root / "cmp-m"),
            "--m", "16", "5000"]


def _compare_corrupt_metrics(trained: Path, root: Path) -> list[str]:
    other = _copy(trained, root, "compare-metrics")
    torch.save({k: v + 0.01 for k, v in torch.load(other / "model.pt", weights_only=True).items()}, other / "model.pt")
    _write(other / "metrics.jsonl", "not json\n")
    return ["compare", str(trained), str(other), "--out", str(root / "cmp-metrics"), "--surface-steps", "3",
            "--slice-steps", "3", "--interpolation-steps", "3", "--density-runs", "1", "--density-steps", "3",
            "--trace-matvecs", "3", "--m", "256"]


def _compare_bad_noise_table(trained: Path, root: Path) -> list[str]:
    noise = root / "noise-bad"
    noise.mkdir()
    _write(noise / "noise_study.json", '{"table": [')
    return ["compare", str(trained), str(trained.parent / "other"), "--out", str(root / "cmp"), "--noise-study", str(noise)]


def _compare_bad_study(trained: Path, root: Path) -> list[str]:
    study = root / "study-bad"
    study.mkdir()
    _write(study / "study.json", '{"rows": []}')
    return ["compare", str(trained), str(trained.parent / "other"), "--out", str(root / "cmp2"), "--study", str(study)]


def _compare_same_weights(trained: Path, root: Path) -> list[str]:
    copy = _copy(trained, root, "same-weights")
    return ["compare", str(trained), str(copy), "--out", str(root / "cmp3")]


def _partial_hessian(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "partial")
    _write(run / "hessian.partial.pt", b"PK\x03\x04 torn")
    return ["hessian", str(run), "--k", "1", "--resume"]


def _partial_hessian_without_resume(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "partial2")
    torch.save({"recipe": {}}, run / "hessian.partial.pt")
    return ["hessian", str(run), "--k", "1"]


def _surface_junk_npz(trained: Path, root: Path) -> list[str]:
    run = _copy(trained, root, "surface-junk")
    _write(run / "surface_2d.npz", b"not a zip file")
    return ["surface", str(run), "--steps", "3"]


def _noise_study_bad_config(trained: Path, root: Path) -> list[str]:
    out = root / "noise-config"
    out.mkdir()
    _write(out / "noise_study_config.json", "{")
    return ["noise-study", "--out", str(out), "--rates", "0", "--epochs", "1"]


def _study_bad_config(trained: Path, root: Path) -> list[str]:
    out = root / "study-config"
    out.mkdir()
    _write(out / "study_config.json", "[]")
    return ["study", "--out", str(out), "--epochs", "1", "--n-models", "3"]


def _out_is_a_file(trained: Path, root: Path) -> list[str]:
    blocker = root / "a-file"
    _write(blocker, "x")
    return ["sharpness", str(trained), "--m", "256", "--out", str(blocker / "inside")]


def _train_out_is_a_file(trained: Path, root: Path) -> list[str]:
    blocker = root / "b-file"
    _write(blocker, "x")
    return ["train", "--out", str(blocker), "--epochs", "1"]


def _cifar_truncated(trained: Path, root: Path) -> list[str]:
    data = root / "cifar-truncated" / "cifar-10-batches-py"
    data.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write(data / name, pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:20])
    return ["train", "--dataset", "cifar10", "--data-root", str(data.parent), "--out", str(root / "c10"), "--epochs", "1"]


def _cifar_wrong_shape(trained: Path, root: Path) -> list[str]:
    data = root / "cifar-shape" / "cifar-10-batches-py"
    data.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write(data / name, pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    return ["train", "--dataset", "cifar10", "--data-root", str(data.parent), "--out", str(root / "c10b"), "--epochs", "1"]


def _cifar_root_is_a_file(trained: Path, root: Path) -> list[str]:
    blocker = root / "cifar-file"
    _write(blocker, "x")
    return ["train", "--dataset", "cifar100", "--data-root", str(blocker), "--out", str(root / "c100"), "--epochs", "1"]


def _init_truncated(trained: Path, root: Path) -> list[str]:
    blob = (trained / "model.pt").read_bytes()
    _write(root / "half.pt", blob[: len(blob) // 2])
    return ["train", "--out", str(root / "ft"), "--epochs", "1", "--init-from", str(root / "half.pt")]


def _init_unsafe(trained: Path, root: Path) -> list[str]:
    torch.save({"weight": _Executable()}, root / "unsafe.pt")
    return ["train", "--out", str(root / "ft"), "--epochs", "1", "--init-from", str(root / "unsafe.pt")]


def _flags(*argv: str) -> Callable[[Path, Path], list[str]]:
    """A case made of flags alone; ``RUN`` stands for the trained run, ``ROOT`` for a scratch directory."""
    return lambda trained, root: [str(trained) if a == "RUN" else a.replace("ROOT", str(root)) for a in argv]


def _sweep_summary(text: str) -> Callable[[Path, Path], list[str]]:
    """A sweep directory whose summary.json holds ``text``."""
    def case(trained: Path, root: Path) -> list[str]:
        sweep = root / "sweep"
        sweep.mkdir()
        _write(sweep / "summary.json", text)
        return ["plot", "error-reduction", str(sweep)]
    return case


CASES: list[Case] = [
    # flags
    ("epochs-not-a-number", _flags("train", "--out", "ROOT/x", "--epochs", "many"),
     "argument --epochs: invalid int value: 'many'"),
    ("epochs-zero", _flags("train", "--out", "ROOT/x", "--epochs", "0"), "--epochs: epochs must be an integer >= 1"),
    ("negative-lr", _flags("train", "--out", "ROOT/x", "--lr", "-1"), "--lr: lr must be a finite number >= 0"),
    ("nan-rho", _flags("train", "--out", "ROOT/x", "--rho", "nan"), "--rho: rho must be a finite number >= 0"),
    ("label-noise-above-one", _flags("train", "--out", "ROOT/x", "--label-noise", "1.5"),
     "--label-noise: label_noise must be in [0, 1]"),
    ("unknown-model", _flags("train", "--out", "ROOT/x", "--model", "resnet9000"),
     "argument --model: invalid choice: 'resnet9000'"),
    ("batch-size-zero", _flags("train", "--out", "ROOT/x", "--batch-size", "0"),
     "--batch-size: batch_size must be an integer >= 1"),
    ("missing-out", _flags("train", "--epochs", "1"), "the following arguments are required: --out"),
    ("milestones-decreasing", _flags("train", "--out", "ROOT/x", "--schedule", "step", "--lr-milestones", "0.8", "0.2"),
     "--lr-milestones: lr_milestones are increasing fractions"),
    ("resume-and-overwrite", _flags("train", "--out", "ROOT/x", "--resume", "--overwrite"),
     "--resume continues the run in --out and --overwrite discards it"),
    ("cifar-without-root", _flags("train", "--out", "ROOT/x", "--dataset", "cifar10"),
     "--dataset cifar10 is read from files: pass --data-root DIR"),
    ("cifar-root-missing", _flags("train", "--out", "ROOT/x", "--dataset", "cifar10", "--data-root", "ROOT/nowhere"),
     "nowhere/cifar-10-batches-py' and '"),
    ("unknown-command", _flags("frobnicate"), "argument COMMAND: invalid choice: 'frobnicate'"),
    ("unknown-flag", _flags("hessian", "RUN", "--bogus"), "unrecognized arguments: --bogus"),
    ("hessian-k-zero", _flags("hessian", "RUN", "--k", "0"), "argument --k: must be >= 1"),
    ("hessian-bad-which", _flags("hessian", "RUN", "--which", "XX"), "argument --which: invalid choice: 'XX'"),
    ("hessian-power-with-LA", _flags("hessian", "RUN", "--method", "power"), "use it with which LM (--which LM)"),
    ("hessian-negative-tol", _flags("hessian", "RUN", "--tol", "-1"), "--tol: tol must be > 0"),
    ("hessian-missing-run", _flags("hessian", "ROOT/nowhere"), "hessian-missing-run/nowhere does not exist"),
    ("hessian-no-cuda", _flags("hessian", "RUN", "--device", "cuda"),
     "device 'cuda' was asked for but CUDA is not available; use --device cpu or auto"),
    ("surface-one-step", _flags("surface", "RUN", "--steps", "1"), "--steps must be >= 2"),
    ("surface-empty-span", _flags("surface", "RUN", "--span", "1", "-1"),
     "--span: span must be (low, high) with low < high"),
    ("surface-dim-3", _flags("surface", "RUN", "--dim", "3"), "argument --dim: invalid choice: 3"),
    ("surface-compare-and-interpolate", _flags("surface", "RUN", "--compare", "RUN", "--interpolate", "RUN"),
     "use either --compare or --interpolate"),
    ("surface-orthogonal-1d", _flags("surface", "RUN", "--dim", "1", "--orthogonal"),
     "--orthogonal needs two directions"),
    ("surface-pca-without-snapshots", _flags("surface", "RUN", "--directions", "pca", "--steps", "3"),
     "--directions pca needs at least 3 weight snapshots in"),
    ("sharpness-m-zero", _flags("sharpness", "RUN", "--m", "0"), "--m: m must be an integer >= 1"),
    ("sharpness-negative-rho", _flags("sharpness", "RUN", "--rho", "-1"), "--rho: rho must be a finite number > 0"),
    ("sharpness-unknown-measure", _flags("sharpness", "RUN", "--measures", "nope"),
     "argument --measures: invalid choice: 'nope'"),
    ("study-bad-rhos", _flags("study", "--rhos", "sam"), "--rhos takes NAME=R1,R2"),
    ("noise-study-bad-rho", _flags("noise-study", "--rhos", "sam=x"), "--rhos takes NAME=RHO"),
    ("noise-study-negative-threads", _flags("noise-study", "--threads", "-1"), "--threads must be >= 0"),
    ("compare-the-same-run", _flags("compare", "RUN", "RUN", "--out", "ROOT/cmp"),
     "compare needs two different runs; got "),
    ("compare-missing-run", _flags("compare", "RUN", "ROOT/nowhere", "--out", "ROOT/cmp"),
     "compare-missing-run/nowhere is not a run directory (no config.json)"),
    ("unknown-preset", _flags("presets", "nope"), "unknown preset 'nope'"),
    ("plot-unknown-kind", _flags("plot", "histogram"), "argument KIND: invalid choice: 'histogram'"),
    ("plot-not-a-sweep", _flags("plot", "error-vs-rho", "ROOT/nowhere"),
     "plot-not-a-sweep/nowhere/summary.json not found: "),
    ("plot-summary-not-a-sweep", _sweep_summary("[]"), "sweep/summary.json holds no sweep summary"),
    ("plot-summary-truncated", _sweep_summary('{"recipe": {'), "sweep/summary.json is not valid JSON"),
    ("plot-summary-run-missing", _sweep_summary(json.dumps({"recipe": {"grid": [["seed", [0]]]}, "rows": [{"run": "x"}]})),
     "runs/x/config.json not found"),
    ("plot-epochs-not-numbers", _flags("plot", "spectrum-evolution", "RUN", "--out", "ROOT/p", "--epochs", "a,b"),
     "argument --epochs: takes epochs joined by commas"),
    ("plot-epoch-not-saved", _flags("plot", "spectrum-evolution", "RUN", "--out", "ROOT/p", "--epochs", "99"),
     "holds no weights of epoch(s) [99]"),
    *((f"{command}-unknown-device", _flags(*argv, "--device", "foo"), "argument --device: device 'foo' is not a device")
      for command, argv in (("train", ("train", "--out", "ROOT/x")), ("hessian", ("hessian", "RUN")),
                            ("surface", ("surface", "RUN")), ("sharpness", ("sharpness", "RUN")),
                            ("study", ("study", "--out", "ROOT/s")),
                            ("noise-study", ("noise-study", "--out", "ROOT/n")),
                            ("compare", ("compare", "RUN", "RUN", "--out", "ROOT/c")),
                            ("demo", ("demo", "--out", "ROOT/f", "--runs", "ROOT/r")),
                            ("plot", ("plot", "spectrum-evolution", "RUN", "--out", "ROOT/p")))),
    ("compare-one-surface-step", _compare_one_surface_step, "--surface-steps must be an integer >= 2; got 1"),
    ("compare-chunks-beyond-the-data", _compare_chunks_beyond_the_data,
     "--m 5000 is more than the 1437 training examples"),
    # checkpoints
    ("truncated-checkpoint", _truncated_model, "truncated/model.pt is truncated or not a torch.save file"),
    ("empty-checkpoint", _empty_model, "empty/model.pt is empty (0 bytes)"),
    ("unsafe-checkpoint", _unsafe_model, "unsafe/model.pt holds pickled Python objects"),
    ("garbage-checkpoint", _garbage_model, "garbage/model.pt is not a torch.save file"),
    ("checkpoint-of-another-model", _foreign_model, "foreign/model.pt does not fit the model digits_cnn"),
    ("checkpoint-not-a-state-dict", _tensor_model, "tensor/model.pt is not a state_dict"),
    ("snapshot-of-another-model", _snapshot_of_another_model,
     "snapshots/epoch_0001.pt does not fit the model digits_cnn"),
    ("truncated-resume-state", _state_truncated, "runs/state/state.pt is truncated or not a torch.save file"),
    ("foreign-resume-state", _state_foreign, "state-foreign/state.pt is not a resume checkpoint"),
    ("resume-state-of-another-model", _state_of_another_model,
     "state-model/state.pt does not fit the model digits_cnn of its run"),
    ("resume-state-of-another-optimizer", _state_optimizer_of_another_run,
     "state-optimizer/state.pt: its optimizer state does not fit this sgd run"),
    ("resume-state-rng-not-a-tensor", _state_rng_not_a_tensor,
     "state-rng/state.pt holds a rng_cpu that is not a random-number generator state (a 1-D uint8 tensor); got list"),
    ("torn-partial-hessian", _partial_hessian, "partial/hessian.partial.pt is truncated or not a torch.save file"),
    ("partial-hessian-without-resume", _partial_hessian_without_resume,
     "partial2/hessian.partial.pt holds an interrupted Hessian analysis; pass --resume"),
    # configs and result files
    ("truncated-config", _truncated_config, "config-truncated/config.json is not valid JSON"),
    ("config-not-an-object", _config_list, "config-list/config.json holds a JSON list"),
    ("config-unknown-model", _config_unknown_model,
     "config-model/config.json holds an invalid config: unknown model 'resnet9000'"),
    ("config-unknown-key", _config_unknown_key,
     "config-key/config.json holds an invalid config: unknown TrainConfig keys"),
    ("config-bad-value", _config_bad_value,
     "config-value/config.json holds an invalid config: epochs must be an integer"),
    ("config-not-text", _config_binary, "config-binary/config.json is not UTF-8 text"),
    ("corrupt-metrics-line", _metrics_corrupt, "runs/metrics/metrics.jsonl line 2 is not valid JSON"),
    ("metrics-not-records", _metrics_not_records,
     "metrics-list/metrics.jsonl holds a line that is not an epoch's metrics"),
    ("config-derived-not-an-object", _config_derived_not_an_object,
     "config-derived/config.json holds no 'derived' object"),
    ("hessian-recipe-not-an-object", _hessian_recipe_not_an_object,
     "hessian-recipe/hessian.json holds no 'recipe' object"),
    ("compare-metrics-without-train-loss", _compare_metrics_without_train_loss,
     "compare-train-loss/metrics.jsonl: record 1 has no number for train_loss"),
    ("compare-corrupt-metrics", _compare_corrupt_metrics, "compare-metrics/metrics.jsonl line 1 is not valid JSON"),
    ("compare-truncated-noise-table", _compare_bad_noise_table, "noise-bad/noise_study.json is not valid JSON"),
    ("compare-study-without-table", _compare_bad_study, "study-bad/study.json holds no 'kendall' table"),
    ("compare-same-weights", _compare_same_weights,
     "same-weights hold the same weights (model.pt has the same SHA-256)"),
    ("surface-file-not-a-surface", _surface_junk_npz,
     "surface-junk/surface_2d.npz is not a surface saved by landscape.surface"),
    ("noise-study-corrupt-settings", _noise_study_bad_config, "noise-config/noise_study_config.json is not valid JSON"),
    ("study-settings-not-an-object", _study_bad_config, "study-config/study_config.json holds a JSON list"),
    ("out-under-a-file", _out_is_a_file, "a-file/inside: Not a directory"),
    ("train-out-is-a-file", _train_out_is_a_file, "b-file is a file, not a run directory; choose another --out"),
    # finetuning
    ("reset-head-without-init", _flags("train", "--out", "ROOT/x", "--reset-head"),
     "--reset-head: reset_head must come with init_from"),
    ("init-missing", _flags("train", "--out", "ROOT/x", "--init-from", "ROOT/nowhere"),
     "init-missing/nowhere: no such file or directory; pass a run directory, a weights file"),
    ("init-truncated", _init_truncated, "init-truncated/half.pt is truncated or not a torch.save file"),
    ("init-unsafe", _init_unsafe, "init-unsafe/unsafe.pt holds pickled Python objects"),
    ("init-head-of-another-size", _flags("train", "--out", "ROOT/x", "--classes", "6-9", "--init-from", "RUN"),
     "only the classification head differs: pass --reset-head"),
    ("classes-beyond-the-dataset", _flags("train", "--out", "ROOT/x", "--classes", "8-11"),
     "--classes: classes must be labels of digits, in [0, 10); got 10 in [8, 9, 10, 11]"),
    ("classes-not-labels", _flags("train", "--out", "ROOT/x", "--classes", "a,b"),
     "argument --classes: takes class labels separated by commas"),
    # data
    ("cifar-truncated-batches", _cifar_truncated, "cifar-10-batches-py/data_batch_1': could not be unpickled"),
    ("cifar-wrong-shape", _cifar_wrong_shape, "cifar-10-batches-py/data_batch_1': b'data' must have shape N x 3072"),
    ("cifar-root-is-a-file", _cifar_root_is_a_file, "cifar-file/cifar-100-python' and '"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Every case run once, two processes at a time (each command is a fresh ``python -m sam.cli``)."""
    root = tmp_path_factory.mktemp("malformed")
    trained = root / "trained" / "sgd"
    assert main(["train", "--out", str(trained), "--epochs", "1", "--batch-size", "256", "--no-progress"]) == 0
    other = trained.parent / "other"
    assert main(["train", "--out", str(other), "--epochs", "1", "--batch-size", "256", "--seed", "1",
                 "--no-progress"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    argvs = {}
    for name, build, _ in CASES:
        scratch = root / name
        scratch.mkdir()
        (scratch / "runs").mkdir()
        argvs[name] = build(trained, scratch)

    def run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sam.cli", *argvs[name], "--no-progress"]
                              if argvs[name][0] not in ("presets", "frobnicate") else
                              [sys.executable, "-m", "sam.cli", *argvs[name]],
                              capture_output=True, text=True, timeout=300, env=env, cwd=root)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(argvs, pool.map(run, argvs)))


def test_there_are_about_fifty_cases():
    assert len(CASES) >= 50 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name, fragment", [(name, fragment) for name, _, fragment in CASES],
                         ids=[name for name, _, _ in CASES])
def test_malformed_input_is_one_line_and_exit_code_2(outcomes, name, fragment):
    done = outcomes[name]
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert fragment in lines[0], lines[0]
    assert "pwned" not in done.stdout  # a pickled object in a checkpoint is never executed
