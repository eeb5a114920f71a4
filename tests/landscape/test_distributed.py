"""Distributed analysis on two CPU processes (Gloo) against single-process references, in float64.

One spawn runs every scenario; the tests compare its results with the same analyses run here:
Hessian top-k eigenvalues and trace over sharded data (one ``all_reduce`` per product), the loss and
gradient, and a 2D loss surface whose points are split across the ranks (rank 0 writing the file,
resuming a half-done one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import hessian, surface
from landscape.batches import token_cross_entropy
from landscape.objective import Objective
from sam import distributed
from tests._processes import run_processes

WORLD = 2
N = 97  # odd: the shards differ in size
GRID = (5, 4)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(N, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (N,), generator=generator)


VOCAB = 7


def _token_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, 4), nn.Tanh(), nn.Linear(4, VOCAB)).double()


def _token_batches() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Six dict batches of padded sequences, labels -100 on the padding: the ranks' shards (batches 0, 2, 4
    and 1, 3, 5) hold different numbers of real tokens, so weighting by sequences or by batches is wrong."""
    generator = torch.Generator().manual_seed(5)
    batches = []
    for b in range(6):
        ids = torch.randint(1, VOCAB, (3, 5), generator=generator)
        lengths = torch.tensor([5, 1 + b % 4, 2 + (b * 3) % 4])
        keep = torch.arange(5)[None, :] < lengths[:, None]
        batches.append(({"input": ids * keep}, torch.where(keep, torch.roll(ids, -1, 1), torch.full_like(ids, -100))))
    return batches


def _surface(path: Path | None, **kwargs: Any) -> surface.SurfaceResult:
    return surface.slice_2d(_model(), F.cross_entropy, _data(), steps=GRID, seed=2, path=path, points_per_pass=3,
                            dtype=torch.float64, progress=False, **kwargs)


def _worker(rank: int, workdir: Path) -> dict[str, Any]:
    X, y = _data()
    mine = distributed.shard(N)
    shard = (X[mine], y[mine])
    out: dict[str, Any] = {"n_local": mine.stop - mine.start}
    eig = hessian.top_eigenvalues(_model(), F.cross_entropy, shard, k=3, tol=1e-10, dtype=torch.float64,
                                  progress=False, distributed=True)
    out["eigenvalues"], out["converged"] = eig.eigenvalues, eig.converged
    # Several batches per shard (49 and 48 examples in batches of 16): the per-batch products, and the
    # product method each process would time for itself replaced by rank 0's choice.
    batched = hessian.top_eigenvalues(_model(), F.cross_entropy, shard, k=3, tol=1e-10, dtype=torch.float64,
                                      batch_size=16, progress=False, distributed=True)
    out["eigenvalues_batched"] = batched.eigenvalues
    trace = hessian.hessian_trace(_model(), F.cross_entropy, shard, method="hutchinson", n_matvecs=20,
                                  dtype=torch.float64, progress=False, distributed=True)
    out["trace"] = trace.value
    objective = Objective(_model(), F.cross_entropy, shard, dtype=torch.float64, distributed=True)
    out["n_examples"] = objective.n_examples
    out["loss"] = float(objective.loss())
    out["loss_and_accuracy"] = list(objective.loss_and_accuracy())
    out["gradient"] = objective.layout.flatten(objective.gradient())
    operator = objective.hessian_operator()
    calls = []
    original = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    try:
        v = torch.randn(operator.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        products = [operator.matvec(v) for _ in range(3)]
    finally:
        torch.distributed.all_reduce = original
    out["collectives_per_3_matvecs"] = len(calls)
    out["hv"] = products[0]
    # token-level loss over dict batches: every real token of both shards weighs the same
    tokens = _token_batches()[rank::WORLD]
    token_options = {"dtype": torch.float64, "progress": False, "distributed": True}
    out["token_eigenvalues"] = hessian.top_eigenvalues(_token_model(), token_cross_entropy, tokens, k=2, tol=1e-10,
                                                       **token_options).eigenvalues
    out["token_eigenvalues_streamed"] = hessian.top_eigenvalues(_token_model(), token_cross_entropy, tokens, k=2,
                                                                tol=1e-10, stream=True, **token_options).eigenvalues
    objective = Objective(_token_model(), token_cross_entropy, tokens, dtype=torch.float64, distributed=True)
    out["token_loss_and_accuracy"] = list(objective.loss_and_accuracy())
    # a distributed surface splits its points, not the data: every process passes all of them
    out["token_centre"] = float(surface.slice_1d(_token_model(), token_cross_entropy, _token_batches(), steps=3,
                                                 seed=0, **token_options).loss[1])
    out["grid"] = torch.from_numpy(_surface(workdir / "grid", distributed=True).loss)
    out["resumed"] = torch.from_numpy(_surface(workdir / "partial", distributed=True).loss)
    try:
        _surface(workdir / "grid", distributed=True, norm="layer")
    except ValueError as error:
        out["recipe_error"] = str(error)
    try:  # rank 0 alone can read the file: its failure must reach every rank, not leave them waiting
        _surface(workdir / "broken", distributed=True)
    except Exception as error:  # noqa: BLE001
        out["broken_error"] = type(error).__name__
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path, np.ndarray]:
    workdir = tmp_path_factory.mktemp("distributed-analysis")
    reference = _surface(workdir / "partial")  # a finished single-process file, then half of it undone
    stored = dict(np.load(workdir / "partial.npz"))
    loss, done = stored["loss"].ravel(), stored["done"].ravel()
    loss[1::2], done[1::2] = np.nan, False
    loss[0] = 123.0  # a sentinel: a finished point must be read back, not recomputed
    stored["loss"], stored["done"] = loss.reshape(GRID), done.reshape(GRID)
    np.savez(workdir / "partial.npz", **stored)
    (workdir / "broken.json").write_text((workdir / "partial.json").read_text())  # the same recipe ...
    np.savez(workdir / "broken.npz", other=np.zeros(1))  # ... beside an array file that is not a surface
    return run_processes(_worker, WORLD, workdir, timeout=600), workdir, reference.loss


@pytest.fixture(scope="module")
def ranks(setup: tuple[list[dict[str, Any]], Path, np.ndarray]) -> list[dict[str, Any]]:
    return setup[0]


def test_ranks_hold_different_shards(ranks: list[dict[str, Any]]) -> None:
    assert [r["n_local"] for r in ranks] == [49, 48]
    assert all(r["n_examples"] == N for r in ranks)


def test_distributed_top_eigenvalues_equal_single_process(ranks: list[dict[str, Any]]) -> None:
    single = hessian.top_eigenvalues(_model(), F.cross_entropy, _data(), k=3, tol=1e-10, dtype=torch.float64,
                                     progress=False)
    dense = torch.linalg.eigvalsh(_dense_hessian()).flip(0)[:3]
    for rank in ranks:
        assert rank["converged"]
        torch.testing.assert_close(rank["eigenvalues"], single.eigenvalues, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(rank["eigenvalues"], dense, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(rank["eigenvalues_batched"], dense, rtol=1e-6, atol=1e-10)


def test_distributed_trace_equals_single_process_with_the_same_probes(ranks: list[dict[str, Any]]) -> None:
    single = hessian.hessian_trace(_model(), F.cross_entropy, _data(), method="hutchinson", n_matvecs=20,
                                   dtype=torch.float64, progress=False)
    for rank in ranks:
        assert rank["trace"] == pytest.approx(single.value, rel=1e-10)


def test_distributed_loss_gradient_and_product_equal_single_process(ranks: list[dict[str, Any]]) -> None:
    objective = Objective(_model(), F.cross_entropy, _data(), dtype=torch.float64)
    v = torch.randn(objective.layout.size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected_hv = _dense_hessian() @ v
    for rank in ranks:
        assert rank["loss"] == pytest.approx(float(objective.loss()), rel=1e-12)
        assert rank["loss_and_accuracy"] == pytest.approx(list(objective.loss_and_accuracy()), rel=1e-12)
        torch.testing.assert_close(rank["gradient"], objective.layout.flatten(objective.gradient()), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank["hv"], expected_hv, rtol=1e-10, atol=1e-12)


def test_one_hessian_vector_product_is_one_collective(ranks: list[dict[str, Any]]) -> None:
    assert [r["collectives_per_3_matvecs"] for r in ranks] == [3, 3]


def test_distributed_2d_grid_equals_single_process(setup: tuple[list[dict[str, Any]], Path, np.ndarray]) -> None:
    ranks, workdir, reference = setup
    for rank in ranks:
        np.testing.assert_allclose(rank["grid"].numpy(), reference, rtol=1e-6, atol=1e-12)
    saved = surface.load(workdir / "grid")
    np.testing.assert_allclose(saved.loss, reference, rtol=1e-6, atol=1e-12)
    meta = json.loads((workdir / "grid.json").read_text())
    assert meta["points_done"] == meta["points_total"] == GRID[0] * GRID[1]


def test_distributed_grid_resumes_a_partial_file_without_recomputing(setup: tuple[list[dict[str, Any]], Path, np.ndarray]) -> None:
    ranks, workdir, reference = setup
    expected = reference.ravel().copy()
    expected[0] = 123.0
    for rank in ranks:
        np.testing.assert_allclose(rank["resumed"].numpy().ravel(), expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(surface.load(workdir / "partial").loss.ravel(), expected, rtol=1e-6, atol=1e-12)


def test_distributed_grid_with_another_recipe_fails_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        assert "different recipe" in rank["recipe_error"] and "norm" in rank["recipe_error"]


def _dense_hessian() -> torch.Tensor:
    model = _model()
    X, y = _data()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = dict(zip(names, (t.view(s) for t, s in zip(torch.split(flat, sizes), shapes))))
        return F.cross_entropy(torch.func.functional_call(model, pieces, (X,)), y)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    return torch.func.hessian(loss)(flat)


def test_a_file_only_rank_zero_fails_to_read_fails_every_rank(ranks: list[dict[str, Any]]) -> None:
    assert [r["broken_error"] for r in ranks] == ["FileExistsError", "FileExistsError"]


def _dense_token_terms() -> tuple[torch.Tensor, float, float]:
    """The float64 Hessian, the loss and the accuracy of the mean over every real token of all six batches."""
    model = _token_model()
    ids = torch.cat([inputs["input"] for inputs, _ in _token_batches()])
    labels = torch.cat([labels for _, labels in _token_batches()])
    keep = labels != -100
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [params[n].numel() for n in names]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = dict(zip(names, (t.view(params[n].shape) for t, n in zip(torch.split(flat, sizes), names))))
        logits = torch.func.functional_call(model, pieces, (ids,))
        return F.cross_entropy(logits[keep], labels[keep])

    flat = torch.cat([params[n].reshape(-1) for n in names])
    with torch.no_grad():
        logits = model(ids)
    accuracy = float((logits[keep].argmax(-1) == labels[keep]).double().mean())
    return torch.func.hessian(loss)(flat), float(loss(flat)), accuracy


def test_distributed_token_level_dict_batches_equal_the_dense_mean_over_real_tokens(ranks: list[dict[str, Any]]) -> None:
    dense, loss, accuracy = _dense_token_terms()
    top = torch.linalg.eigvalsh(dense).flip(0)[:2]
    for rank in ranks:
        torch.testing.assert_close(rank["token_eigenvalues"], top, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(rank["token_eigenvalues_streamed"], top, rtol=1e-6, atol=1e-10)
        assert rank["token_loss_and_accuracy"] == pytest.approx([loss, accuracy], rel=1e-12)
        assert rank["token_centre"] == pytest.approx(loss, rel=1e-10)
