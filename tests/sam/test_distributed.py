"""DDP training on two CPU processes (Gloo) against single-process references.

One spawn runs every scenario (a process group costs seconds to start); the tests compare its results:

* SAM-family steps with synchronised perturbations equal the single-process step on the global batch;
* per-replica perturbations (the default) equal m-SAM with ``m`` = the per-replica batch, BatchNorm
  statistics included (rank 0's, as DDP keeps), and for every SAM variant the average of the update
  gradients each shard computes on its own; the replicas never drift apart;
* the trainer under DDP equals a single-process run, writes files from rank 0 only, resumes, reports
  the saved checkpoint's test metrics, and refuses unsupported settings before writing anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sam.trainer as trainer_module
from sam import distributed
from sam.optim import OPTIMIZERS, create
from sam.step import train_step
from sam.trainer import TrainConfig, evaluate, load_run, train
from tests._processes import run_processes

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 16
PER_REPLICA = GLOBAL_BATCH // WORLD
SAM_FAMILY = tuple(OPTIMIZERS)  # every registered SAM variant
HYPER: dict[str, dict[str, Any]] = {
    "sam": {"rho": 0.2},
    "asam": {"rho": 1.0},
    "msam": {"rho": 0.2, "m": 4},
    "gsam": {"rho": 0.2, "alpha": 0.5},
    "multistep_sam": {"rho": 0.2, "steps": 2},
    "every_k_sam": {"rho": 0.2, "k": 2},
}


def _model(batchnorm: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(16)] if batchnorm else []
    return nn.Sequential(nn.Linear(6, 16), *norm, nn.ReLU(), nn.Linear(16, 4)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=generator, dtype=torch.float64),
         torch.randint(0, 4, (GLOBAL_BATCH,), generator=generator))
        for _ in range(STEPS)
    ]


def _steps(name: str, batchnorm: bool, *, ddp: bool, sync: bool = False, rank: int = 0, **override: Any) -> dict[str, torch.Tensor]:
    """The state after ``STEPS`` steps of optimizer ``name``: under DDP on this rank's share, else on the batch."""
    model = _model(batchnorm)
    kwargs = {**HYPER[name], **override}
    optimizer = create(name, model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, **kwargs)
    network = DistributedDataParallel(model) if ddp else model
    share = slice(rank * PER_REPLICA, (rank + 1) * PER_REPLICA) if ddp else slice(None)
    model.train()
    for x, y in _batches():
        train_step(network, optimizer, F.cross_entropy, x[share], y[share], sync_perturbation=sync)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _digits_config(**override: Any) -> TrainConfig:
    # 1280 training examples (517 held out): 20 whole global batches of 64, so no batch is padded and
    # the replicas' shares are exactly the single-process batches.
    values = dict(optimizer="sam", sync_perturbation=True, batchnorm=False, epochs=2, batch_size=64, lr=0.05,
                  device="cpu", seed=3,
                  test_fraction=516.5 / 1797)
    return TrainConfig(**{**values, **override})


class _Interrupt(Exception):
    pass


def _interrupt_after_first_epoch(epoch: int, record: dict[str, Any]) -> None:
    if epoch == 1:
        raise _Interrupt


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("a lock cannot be sent")
        self.lock = threading.Lock()


def _raise(error: Exception) -> Any:
    raise error


def _decisions() -> dict[str, str]:
    """What every rank gets from a decision only rank 0 makes (it reads the files), error or value."""
    from sam.analyses import _decided_on_main

    decisions = {"value": lambda: {"done": 7}, "key_error": lambda: {}["missing"],
                 "type_error": lambda: _raise(TypeError("recipe is a list")),
                 "unpicklable": lambda: _raise(_Unpicklable())}
    seen = {}
    for name, decide in decisions.items():
        try:
            seen[name] = repr(_decided_on_main(decide))
        except Exception as error:  # noqa: BLE001 - what each rank raised is the result
            seen[name] = f"{type(error).__name__}: {error}"
    return seen


def _worker(rank: int, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"rank": distributed.rank(), "world": distributed.world_size()}
    out["decided"] = _decisions()  # first: before the fix a failed decision left rank 1 waiting forever
    for name in SAM_FAMILY:
        if name != "msam":
            out[f"{name}/synced"] = _steps(name, batchnorm=False, ddp=True, sync=True, rank=rank)
        out[f"{name}/per_replica"] = _steps(name, batchnorm=True, ddp=True, rank=rank)
        out[f"{name}/per_replica_plain"] = _steps(name, batchnorm=False, ddp=True, rank=rank)
    writers = ("atomic_write_json", "atomic_write_text", "atomic_torch_save")
    originals = {name: getattr(trainer_module, name) for name in writers}
    writes: list[str] = []

    def counting(name: str) -> Any:
        def write(*args: Any, **kwargs: Any) -> Any:
            writes.append(name)
            return originals[name](*args, **kwargs)
        return write

    for name in writers:
        setattr(trainer_module, name, counting(name))
    config = _digits_config()
    try:
        result = train(config, workdir / "run", progress=False)
    finally:
        for name in writers:
            setattr(trainer_module, name, originals[name])
    out["run/files_written"] = len(writes)
    out["run/weights"] = {k: v.clone() for k, v in result.model.state_dict().items()}
    out["run/metrics"] = json.dumps(result.metrics)
    try:
        train(config, workdir / "resumed", progress=False, on_epoch_end=_interrupt_after_first_epoch)
    except _Interrupt:
        pass
    out["resumed/epochs_before"] = len((workdir / "resumed" / "metrics.jsonl").read_text().splitlines())
    resumed = train(config, workdir / "resumed", resume=True, progress=False)
    out["resumed/weights"] = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    try:
        train(config, workdir / "run", progress=False)
    except FileExistsError as error:
        out["run/again"] = str(error)
    # The default: per-replica perturbations, BatchNorm (the replicas' running statistics differ).
    bn = train(_digits_config(sync_perturbation=False, batchnorm=True, epochs=1), workdir / "bn", progress=False)
    out["bn/metrics"] = json.dumps(bn.metrics)
    for name, override in (("fp16", {"amp": "fp16", "sync_perturbation": False}), ("msam_synced", {"optimizer": "msam"})):
        try:
            train(_digits_config(**override), workdir / name, progress=False)
        except ValueError as error:
            out[f"refused/{name}"] = str(error)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_processes(_worker, WORLD, tmp_path_factory.mktemp("ddp"))


def _assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=lambda m, key=key: f"{key}: {m}")


def test_process_group_has_two_ranks(ranks: list[dict[str, Any]]) -> None:
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["world"] for r in ranks} == {WORLD}


@pytest.mark.parametrize("name", [n for n in SAM_FAMILY if n != "msam"])
def test_synced_perturbation_equals_single_process_step_on_global_batch(ranks: list[dict[str, Any]], name: str) -> None:
    reference = _steps(name, batchnorm=False, ddp=False)
    for rank in ranks:
        _assert_states_close(rank[f"{name}/synced"], reference, 1e-10)


@pytest.mark.parametrize(("name", "equivalent"), [
    ("sam", {"name": "msam", "m": PER_REPLICA, "rho": 0.2}),
    ("asam", {"name": "msam", "m": PER_REPLICA, "rho": 1.0, "adaptive": True}),
    ("msam", {"name": "msam", "m": 4, "rho": 0.2}),
])
def test_per_replica_perturbation_equals_m_sam_with_per_replica_batch(
    ranks: list[dict[str, Any]], name: str, equivalent: dict[str, Any]
) -> None:
    settings = dict(equivalent)
    reference_name = settings.pop("name")
    model = _model(batchnorm=True)
    optimizer = create(reference_name, model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, **settings)
    for x, y in _batches():
        train_step(model, optimizer, F.cross_entropy, x, y)
    reference = model.state_dict()
    # Rank 0 holds the BatchNorm statistics DDP keeps, those of the first chunk, as m-SAM does.
    _assert_states_close(ranks[0][f"{name}/per_replica"], reference, 1e-10)
    parameters = [k for k, _ in _model(batchnorm=True).named_parameters()]
    _assert_states_close({k: ranks[1][f"{name}/per_replica"][k] for k in parameters},
                         {k: reference[k] for k in parameters}, 1e-10)


def test_per_replica_sam_is_not_the_global_batch_step(ranks: list[dict[str, Any]]) -> None:
    reference = _steps("sam", batchnorm=True, ddp=False)
    difference = max(float((ranks[0]["sam/per_replica"][k] - reference[k]).abs().max()) for k in reference)
    assert difference > 1e-4


@pytest.mark.parametrize("name", SAM_FAMILY)
def test_replicas_hold_identical_weights_after_per_replica_steps(ranks: list[dict[str, Any]], name: str) -> None:
    parameters = [k for k, _ in _model(batchnorm=True).named_parameters()]
    for key in parameters:
        assert torch.equal(ranks[0][f"{name}/per_replica"][key], ranks[1][f"{name}/per_replica"][key]), key


def test_ddp_training_run_equals_single_process_run(ranks: list[dict[str, Any]], tmp_path: Path) -> None:
    single = train(_digits_config(), tmp_path / "single", progress=False)
    _assert_states_close(ranks[0]["run/weights"], single.model.state_dict(), 2e-4)
    _assert_states_close(ranks[1]["run/weights"], ranks[0]["run/weights"], 0.0)
    distributed_metrics = json.loads(ranks[0]["run/metrics"])
    assert distributed_metrics == json.loads(ranks[1]["run/metrics"])
    for ours, theirs in zip(distributed_metrics, single.metrics):
        assert ours["steps"] == theirs["steps"] == 20
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert ours["test_acc"] == pytest.approx(theirs["test_acc"], abs=2 / 360)


def test_ddp_run_directory_is_written_once_by_rank_zero(ranks: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> None:
    run = next(p for p in tmp_path_factory.getbasetemp().glob("ddp*/run"))
    saved = json.loads((run / "config.json").read_text())
    assert saved["derived"]["world_size"] == WORLD
    assert saved["derived"]["per_replica_batch"] == 64 // WORLD
    assert saved["config"] == dataclasses.asdict(_digits_config())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    loaded = torch.load(run / "model.pt", weights_only=True)
    _assert_states_close(loaded, ranks[0]["run/weights"], 0.0)
    assert "already holds a run" in ranks[0]["run/again"] and "already holds a run" in ranks[1]["run/again"]


def test_interrupted_ddp_run_resumes_to_the_same_weights(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["resumed/epochs_before"] == 1
    for rank in ranks:
        _assert_states_close(rank["resumed/weights"], ranks[0]["run/weights"], 0.0)


def test_loader_shards_are_the_single_process_batches() -> None:
    from sam.data import DeviceLoader, Split

    split = Split(torch.randn(45, 3, 8, 8), torch.arange(45))
    single = DeviceLoader(split, 12, shuffle=True, augment=True, seed=5)
    shards = [DeviceLoader(split, 12, shuffle=True, augment=True, seed=5, num_replicas=3, rank=r) for r in range(3)]
    for loader in (single, *shards):
        loader.set_epoch(4)
    batches = list(zip(single, *shards))
    assert len(batches) == 4
    for (x, y), *parts in batches[:-1]:
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
    (_, last), *parts = batches[-1]
    assert [len(p[1]) for p in parts] == [3, 3, 3]  # 9 examples padded to 9: 45 = 3 * 12 + 9
    assert torch.equal(torch.cat([p[1] for p in parts]), last)
    seen = torch.cat([p[1] for batch in batches for p in batch[1:]])
    assert sorted(seen.tolist()) == list(range(45))


def test_loader_pads_a_ragged_last_batch_with_the_first_examples() -> None:
    from sam.data import DeviceLoader, Split

    split = Split(torch.randn(10, 1, 2, 2), torch.arange(10))
    shards = [DeviceLoader(split, 4, shuffle=True, seed=0, num_replicas=4, rank=r) for r in range(4)]
    order = torch.cat([y for y, in [(b[1],) for b in DeviceLoader(split, 10, shuffle=True, seed=0)]])
    last = [list(shard)[-1][1] for shard in shards]
    assert [len(y) for y in last] == [1, 1, 1, 1]
    assert torch.cat(last).tolist() == order[8:10].tolist() + order[0:2].tolist()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_replicas": 0}, "num_replicas"),
    ({"num_replicas": 2, "rank": 2}, "rank"),
    ({"num_replicas": 3}, "divisible"),
])
def test_loader_rejects_bad_sharding(kwargs: dict[str, Any], message: str) -> None:
    from sam.data import DeviceLoader, Split

    with pytest.raises(ValueError, match=message):
        DeviceLoader(Split(torch.randn(10, 1, 2, 2), torch.arange(10)), 4, shuffle=False, **kwargs)


def test_shard_covers_the_range_in_balanced_contiguous_pieces() -> None:
    for n in (0, 1, 7, 10):
        for parts in (1, 2, 3, 4):
            pieces = [distributed.shard(n, r, parts) for r in range(parts)]
            assert [i for p in pieces for i in range(n)[p]] == list(range(n))
            sizes = [len(range(n)[p]) for p in pieces]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="part"):
        distributed.shard(5, 3, 3)


def test_helpers_are_the_identity_without_a_process_group() -> None:
    t = torch.ones(3)
    distributed.all_reduce_sum_([t])
    assert torch.equal(t, torch.ones(3))
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "-m", "sam.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_cli_trains_and_analyses_under_torchrun(tmp_path: Path) -> None:
    from landscape import surface
    from sam.cli import main

    train_flags = ["--epochs", "1", "--batch-size", "64", "--lr", "0.05", "--optimizer", "sam", "--device", "cpu",
                   "--test-fraction", str(516.5 / 1797), "--no-progress"]
    done = _torchrun("train", *train_flags, "--out", "ddp", cwd=tmp_path)
    assert done.stdout.count("run saved in") == 1  # rank 0 alone reports
    saved = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert saved["derived"]["world_size"] == WORLD and saved["config"]["sync_perturbation"] is False

    analysis = ["--device", "cpu", "--dtype", "float64", "--split", "test", "--no-progress"]
    _torchrun("hessian", "ddp", "--k", "2", "--tol", "1e-6", "--no-trace", *analysis, "--out", "ddp-hessian", cwd=tmp_path)
    _torchrun("surface", "ddp", "--dim", "2", "--steps", "4", *analysis, "--out", "ddp-surface", cwd=tmp_path)
    assert main(["hessian", str(tmp_path / "ddp"), "--k", "2", "--tol", "1e-6", "--no-trace", *analysis,
                 "--out", str(tmp_path / "single-hessian")]) == 0
    assert main(["surface", str(tmp_path / "ddp"), "--dim", "2", "--steps", "4", *analysis,
                 "--out", str(tmp_path / "single-surface")]) == 0

    ours = json.loads((tmp_path / "ddp-hessian" / "hessian.json").read_text())
    theirs = json.loads((tmp_path / "single-hessian" / "hessian.json").read_text())
    assert ours["processes"] == WORLD and theirs["processes"] == 1
    assert ours["eigen"]["eigenvalues"] == pytest.approx(theirs["eigen"]["eigenvalues"], rel=1e-6)
    np.testing.assert_allclose(surface.load(tmp_path / "ddp-surface" / "surface_2d_test").loss,
                               surface.load(tmp_path / "single-surface" / "surface_2d_test").loss, rtol=1e-6)

    # Hessian directions: computed once by every rank together, kept by rank 0; a rerun reads them back
    hessian_surface = ["surface", "ddp", "--directions", "hessian", "--dim", "1", "--steps", "3", *analysis,
                       "--out", "ddp-hessian-surface"]
    _torchrun(*hessian_surface, cwd=tmp_path)
    store = tmp_path / "ddp-hessian-surface" / "surface_1d_hessian_test.directions.pt"
    written = store.stat().st_mtime_ns
    _torchrun(*hessian_surface, cwd=tmp_path)
    assert store.stat().st_mtime_ns == written
    assert main(["surface", str(tmp_path / "ddp"), *hessian_surface[2:-1], str(tmp_path / "single-hessian-surface")]) == 0
    np.testing.assert_allclose(surface.load(tmp_path / "ddp-hessian-surface" / "surface_1d_hessian_test").loss,
                               surface.load(tmp_path / "single-hessian-surface" / "surface_1d_hessian_test").loss,
                               rtol=1e-6)


def test_cli_refuses_single_process_commands_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from sam.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["study", "--out", str(tmp_path / "study")]) == 2
    assert "runs as one process" in capsys.readouterr().err


def test_a_decision_rank_zero_fails_to_make_fails_every_rank_instead_of_hanging(ranks: list[dict[str, Any]]) -> None:
    first, second = (rank["decided"] for rank in ranks)
    assert first["value"] == second["value"] == "{'done': 7}"
    assert first["key_error"] == second["key_error"] == "KeyError: 'missing'"
    assert first["type_error"] == second["type_error"] == "TypeError: recipe is a list"
    assert first["unpicklable"] == "_Unpicklable: a lock cannot be sent"
    assert second["unpicklable"] == "RuntimeError: _Unpicklable on rank 0: a lock cannot be sent"


def test_only_rank_zero_writes_the_run_directory(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["run/files_written"] > 0
    assert ranks[1]["run/files_written"] == 0


def test_reported_test_metrics_are_the_saved_checkpoints_with_batchnorm(ranks: list[dict[str, Any]],
                                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    run = next(p for p in tmp_path_factory.getbasetemp().glob("ddp*/bn"))
    loaded = load_run(run)
    test_loss, test_acc = evaluate(loaded.model, loaded.test)
    for rank in ranks:
        reported = json.loads(rank["bn/metrics"])[-1]
        assert reported["test_loss"] == pytest.approx(test_loss, rel=1e-5)
        assert reported["test_acc"] == test_acc


@pytest.mark.parametrize(("name", "message"), [("fp16", "fp16 AMP"), ("msam_synced", "does not apply to m-SAM")])
def test_unsupported_ddp_settings_are_refused_before_writing(ranks: list[dict[str, Any]], name: str, message: str,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    for rank in ranks:
        assert message in rank[f"refused/{name}"]
    base = next(tmp_path_factory.getbasetemp().glob("ddp*"))
    assert not (base / name).exists()


# m-SAM's chunk passes are checked against single-process m-SAM above.
@pytest.mark.parametrize("name", [n for n in SAM_FAMILY if n != "msam"])
def test_per_replica_update_is_the_mean_of_each_shards_own_update_gradient(ranks: list[dict[str, Any]], name: str) -> None:
    """Reference without DDP: each shard runs its own passes from ``w``; the base optimizer steps with
    the average of the shards' final gradients (the per-replica method, spelled out)."""
    model = _model(batchnorm=False)
    optimizer = create(name, model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, **HYPER[name])
    params = list(model.parameters())
    for x, y in _batches():
        finals = []
        ascent_steps = optimizer.ascent_steps
        for rank in range(WORLD):
            share = slice(rank * PER_REPLICA, (rank + 1) * PER_REPLICA)
            optimizer.zero_grad()
            F.cross_entropy(model(x[share]), y[share]).backward()
            for _ in range(ascent_steps):
                optimizer.first_step(zero_grad=True)
                F.cross_entropy(model(x[share]), y[share]).backward()
            optimizer.restore()
            finals.append([p.grad.clone() for p in params])
        for p, *shard_grads in zip(params, *finals):
            p.grad = sum(shard_grads) / WORLD
        optimizer.second_step()
    reference = model.state_dict()
    for rank in ranks:
        _assert_states_close(rank[f"{name}/per_replica_plain"], reference, 1e-10)
