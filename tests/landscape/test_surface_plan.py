"""The timed default of the loss surfaces (landscape._surface_plan): the fastest method on the first points.

Nothing here asserts a speed: the clock is replaced (``_surface_plan.timed``) to force each decision, and
the tests check that the values do not depend on it, that every point is evaluated once, that the choice
is recorded and saved, and that a resumed grid keeps it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import _surface_plan as plan
from landscape import surface
from landscape.directions import random_plane

from .test_objective import cnn_data, mlp_data, small_cnn, small_mlp

F64 = torch.float64
GRID = (9, 9)  # 81 points: timed (TIMED_FROM = 64), batched passes up to Q = 8 (81 // ZONE_SHARE = 10)


def fake_clock(monkeypatch, per_point: dict[str, float], default: float = 1.0) -> list[str]:
    """Replace the timing's clock: method ``name`` takes ``per_point[name]`` seconds per point. Returns the
    names of the timed runs, in order."""
    runs = []

    def timed(method, run, device):
        values = run()
        runs.append(method.name)
        return values, per_point.get(method.name, default) * len(values[0])

    monkeypatch.setattr(plan, "timed", timed)
    return runs


def spy_evaluations(monkeypatch) -> list[tuple[bool, bool, int]]:
    """Record ``(batched, channels_last, points)`` of every call of ``surface.evaluate_points``."""
    calls = []
    real = surface.evaluate_points

    def spy(objective, directions, points, **kw):
        calls.append((bool(kw.get("batched", True)) and len(points) > 1, bool(kw.get("channels_last")), len(points)))
        return real(objective, directions, points, **kw)

    monkeypatch.setattr(surface, "evaluate_points", spy)
    return calls


def grid(model=None, data=None, **kw) -> surface.SurfaceResult:
    model = small_cnn() if model is None else model
    data = cnn_data(n=20) if data is None else data
    return surface.slice_2d(model, F.cross_entropy, data, **{"steps": GRID, "seed": 3, "dtype": F64, "progress": False,
                                                              **kw})


def test_the_timed_default_gives_the_loops_and_the_batched_surface_and_records_its_choice():
    auto, loop, batched = grid(), grid(batched=False), grid(points_per_pass=8)
    np.testing.assert_allclose(auto.loss, loop.loss, rtol=1e-13, atol=0)
    np.testing.assert_allclose(batched.loss, loop.loss, rtol=1e-13, atol=0)
    np.testing.assert_array_equal(auto.accuracy, loop.accuracy)
    chosen = auto.meta["evaluation"]
    assert chosen["chosen_by"] == "timing" and chosen["device"] == "cpu"
    assert {"loop", "loop, channels-last", "batched Q=2"} <= set(chosen["seconds_per_point"])  # a conv: 4-D kernels
    assert all(s > 0 for s in chosen["seconds_per_point"].values()) and chosen["skipped"] == {}
    assert chosen["method"] in ("loop", "batched") and chosen["points_per_save"] % chosen["points_per_pass"] == 0
    assert loop.meta["evaluation"]["chosen_by"] == "argument" and loop.meta["evaluation"]["seconds_per_point"] == {}
    assert batched.meta["evaluation"]["points_per_pass"] == 8


@pytest.mark.parametrize("fastest, expected", [
    ("loop", (False, False, 1)),
    ("loop, channels-last", (False, True, 1)),
    ("batched Q=4", (True, False, 4)),
])
def test_the_rest_of_the_grid_follows_the_fastest_candidate_and_every_point_is_evaluated_once(
        monkeypatch, fastest, expected):
    reference = grid(batched=False)
    runs = fake_clock(monkeypatch, {fastest: 0.1})
    calls = spy_evaluations(monkeypatch)
    result = grid()
    # loop and channels-last: a warm-up point, then 4 timed; batched: an untimed pass of 2, then Q = 2, 4, 8,
    # stopping at the first that is not 5% faster per point than the one before
    timed = ["loop", "loop", "loop, channels-last", "loop, channels-last", "batched Q=2", "batched Q=2", "batched Q=4"]
    assert runs[: len(timed)] == timed
    assert runs[len(timed):] == (["batched Q=8"] if fastest == "batched Q=4" else [])
    zone = 5 + 5 + 2 + 2 + 4 + (8 if fastest == "batched Q=4" else 0)
    assert sum(n for *_, n in calls) == 81  # the timed points are part of the grid
    rest = calls[len(runs):]
    batched, channels_last, q = expected
    assert rest and all(c[0] == batched and c[1] == channels_last for c in rest)
    assert sum(c[2] for c in rest) == 81 - zone and all(c[2] == q for c in rest[:-1] if batched)
    chosen = result.meta["evaluation"]
    assert (chosen["method"] == "batched", chosen["channels_last"], chosen["points_per_pass"]) == expected
    assert min(chosen["seconds_per_point"], key=chosen["seconds_per_point"].get) == fastest
    np.testing.assert_allclose(result.loss, reference.loss, rtol=1e-13, atol=0)


def test_batched_passes_grow_while_they_cut_the_time_per_point_and_memory_allows(monkeypatch):
    runs = fake_clock(monkeypatch, {"loop": 1.0, "loop, channels-last": 1.0, "batched Q=2": 0.5, "batched Q=4": 0.3,
                                    "batched Q=8": 0.2})
    chosen = grid(steps=(12, 12)).meta["evaluation"]  # 144 points: Q up to 16
    assert [r for r in runs if r.startswith("batched")] == ["batched Q=2"] * 2 + ["batched Q=4", "batched Q=8",
                                                                                     "batched Q=16"]
    assert chosen["points_per_pass"] == 8  # Q = 16 (1.0 s, the default) was slower
    # at most ZONE_SHARE-th of the grid per pass, and no more points per pass than memory allows
    monkeypatch.setattr(plan, "CPU_STACK_BYTES", 4 * sum(p.numel() * 8 for p in small_cnn().parameters()))
    runs.clear()
    grid(steps=(12, 12))
    assert [r for r in runs if r.startswith("batched")] == ["batched Q=2"] * 2 + ["batched Q=4"]
    # passes far behind the fastest loop stop growing at Q = 4 even while they improve
    monkeypatch.undo()
    runs = fake_clock(monkeypatch, {"loop": 0.1, "loop, channels-last": 0.2, "batched Q=2": 1.0, "batched Q=4": 0.5})
    grid(steps=(12, 12))
    assert [r for r in runs if r.startswith("batched")] == ["batched Q=2"] * 2 + ["batched Q=4"]
    monkeypatch.undo()
    runs = fake_clock(monkeypatch, {"loop": 0.1, "batched Q=2": 1.0, "batched Q=4": 0.14, "batched Q=8": 0.05})
    assert grid(steps=(12, 12)).meta["evaluation"]["points_per_pass"] == 8  # within 1.5x at Q = 4: grew on
    assert "batched Q=16" in runs


def test_explicit_choices_and_small_grids_are_not_timed(monkeypatch):
    def no_clock(*args):
        raise AssertionError("timed although the choice was given")

    monkeypatch.setattr(plan, "timed", no_clock)
    calls = spy_evaluations(monkeypatch)
    loop = grid(batched=False)
    assert loop.meta["evaluation"]["chosen_by"] == "argument" and {c[:2] for c in calls} == {(False, False)}
    calls.clear()
    passes = grid(points_per_pass=6, batched=None)
    assert passes.meta["evaluation"]["points_per_pass"] == 6 and all(c[0] for c in calls[:-1]) and calls[-1][2] == 3
    one = grid(points_per_pass=1)  # one point per pass: the loop
    assert one.meta["evaluation"]["method"] == "loop"
    small = grid(steps=(7, 9))  # 63 points: the loop on the CPU, one point per save as before
    assert small.meta["evaluation"] == {"method": "loop", "points_per_pass": 1, "channels_last": False,
                                        "points_per_save": 1, "chosen_by": "default", "device": "cpu",
                                        "seconds_per_point": {}, "skipped": {}}
    assert grid(steps=(7, 9), batched=True).meta["evaluation"]["points_per_pass"] == 8
    for result in (passes, one):
        np.testing.assert_allclose(result.loss, loop.loss, rtol=1e-13, atol=0)


def test_batched_true_times_only_batched_passes(monkeypatch):
    runs = fake_clock(monkeypatch, {"batched Q=2": 0.1})
    chosen = grid(batched=True).meta["evaluation"]
    assert runs and all(r.startswith("batched") for r in runs)
    assert chosen["method"] == "batched" and chosen["points_per_pass"] == 2


def test_a_resumed_grid_keeps_the_saved_choice(tmp_path, monkeypatch):
    full = grid(batched=False)
    fake_clock(monkeypatch, {"batched Q=4": 0.1})  # one pass of 4 points: about 0.4 s, so a save every 5 passes
    saves = {"n": 0}
    real_save = surface._save

    def killed(*args, **kwargs):
        saves["n"] += 1
        real_save(*args, **kwargs)
        if saves["n"] == 10:  # the empty grid, 8 during the timing, one block after it
            raise KeyboardInterrupt

    monkeypatch.setattr(surface, "_save", killed)
    with pytest.raises(KeyboardInterrupt):
        grid(path=tmp_path / "grid")
    monkeypatch.setattr(surface, "_save", real_save)
    saved = json.loads((tmp_path / "grid.json").read_text())
    assert saved["points_done"] == 5 + 5 + 2 + 2 + 4 + 8 + 20 and saved["evaluation"]["points_per_pass"] == 4
    assert saved["evaluation"]["points_per_save"] == 20

    runs = fake_clock(monkeypatch, {"loop": 0.01})  # would choose the loop if it timed again
    calls = spy_evaluations(monkeypatch)
    resumed = grid(path=tmp_path / "grid")
    assert runs == [] and calls and all(c == (True, False, 4) for c in calls[:-1])
    assert resumed.meta["evaluation"] == saved["evaluation"] == surface.load(tmp_path / "grid").meta["evaluation"]
    np.testing.assert_allclose(resumed.loss, full.loss, rtol=1e-13, atol=0)
    assert resumed.computed == 81 - saved["points_done"]

    # an explicit choice on resume is followed (and recorded), a complete grid keeps its record
    with np.load(tmp_path / "grid.npz") as stored:
        arrays = dict(stored)
    arrays["done"].reshape(-1)[-10:] = False
    np.savez(tmp_path / "grid.npz", **arrays)
    calls.clear()
    again = grid(path=tmp_path / "grid", batched=False)
    assert [c[0] for c in calls] == [False] * 10 and again.meta["evaluation"]["chosen_by"] == "argument"
    assert grid(path=tmp_path / "grid").meta["evaluation"]["chosen_by"] == "argument"


class ViewsItsKernel(nn.Module):
    """A convolution that flattens its kernel with ``view``: not possible on a channels-last kernel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.conv.weight.view(3, -1).view(3, 2, 3, 3)
        out = F.conv2d(x, kernel, self.conv.bias)
        if out.sum() > 1e9:  # data-dependent control flow: not under vmap
            out = out * 0
        return self.fc(out.flatten(1))


def test_candidates_the_model_does_not_support_are_skipped_and_named():
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(12, 2, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g))
    auto = grid(ViewsItsKernel(), data, ignore="none")
    loop = grid(ViewsItsKernel(), data, ignore="none", batched=False)
    np.testing.assert_allclose(auto.loss, loop.loss, rtol=1e-13, atol=0)
    chosen = auto.meta["evaluation"]
    assert set(chosen["skipped"]) == {"loop, channels-last", "batched Q=2"}
    assert "view" in chosen["skipped"]["loop, channels-last"] and chosen["method"] == "loop"
    assert set(chosen["seconds_per_point"]) == {"loop"}
    with pytest.raises(RuntimeError):  # asked for, not timed: the failure is the caller's to see
        grid(ViewsItsKernel(), data, ignore="none", points_per_pass=4)


@pytest.mark.parametrize("kind", ["slice_1d", "interpolate"])
def test_1d_slices_and_interpolations_are_timed_too(kind):
    a, b, data = small_cnn(seed=0), small_cnn(seed=1), cnn_data(n=16)
    if kind == "slice_1d":
        call = lambda **kw: surface.slice_1d(a, F.cross_entropy, data, steps=70, dtype=F64, progress=False, **kw)
    else:
        call = lambda **kw: surface.interpolate(a, b, F.cross_entropy, data, steps=70, dtype=F64, progress=False, **kw)
    auto, loop = call(), call(batched=False)
    assert auto.meta["evaluation"]["chosen_by"] == "timing"
    np.testing.assert_allclose(auto.loss, loop.loss, rtol=1e-13, atol=0)


def test_the_point_writer_gives_the_perturbed_parameters_in_the_asked_layout():
    params = {k: v.detach().double() for k, v in small_cnn().named_parameters()}
    d1, d2 = random_plane(params, seed=0)
    for channels_last in (False, True):
        writer = surface._PointWriter(params, [d1, d2], channels_last)
        for a, b in ((0.5, -1.0), (0.0, 0.25)):
            at = writer.at([a, b])
            assert list(at) == list(params)
            for name, w in params.items():
                torch.testing.assert_close(at[name], w + a * d1[name] + b * d2[name], rtol=0, atol=1e-15)
            assert at["0.bias"] is params["0.bias"]  # not moved: passed as it is
            assert (at["0.weight"].stride(1) == 1) == channels_last  # channels innermost: NHWC


def test_a_plan_record_reads_back_and_anything_else_is_none():
    chosen = plan.Plan(plan.Method(8), 32, "timing", "cuda", {"loop": 0.5, "batched Q=8": 0.1}, {"x": "y"})
    assert plan.Plan.from_record(json.loads(json.dumps(chosen.record()))) == chosen
    for broken in (None, [], {"method": "loop"}, {**chosen.record(), "points_per_pass": 0},
                   {**chosen.record(), "seconds_per_point": "fast"}):
        assert plan.Plan.from_record(broken) is None


def _distributed_worker(rank: int, workdir):
    """A timed grid split over two processes: the clock forces Q = 4, and Q = 8 fails on rank 1 only."""
    runs = []

    def timed(method, run, device):
        values = run()
        runs.append(method.name)
        return values, {"batched Q=4": 0.1}.get(method.name, 1.0) * len(values[0])

    real = surface._evaluate_passes

    def fails_on_rank_1(objective, directions, points, method, *args):
        if rank == 1 and method.points_per_pass == 8:
            raise torch.OutOfMemoryError("no memory for Q = 8 on rank 1")
        return real(objective, directions, points, method, *args)

    plan.timed, surface._evaluate_passes = timed, fails_on_rank_1
    result = surface.slice_2d(small_mlp(), F.cross_entropy, mlp_data(n=30), steps=(12, 12), seed=2, dtype=F64,
                              progress=False, distributed=True, path=workdir / "grid")
    return {"loss": torch.from_numpy(result.loss), "evaluation": result.meta["evaluation"], "runs": runs}


@pytest.mark.slow
def test_a_distributed_grid_takes_rank_0s_timing_and_a_failure_on_one_process_skips_the_candidate(tmp_path):
    from tests._processes import run_processes

    reference = surface.slice_2d(small_mlp(), F.cross_entropy, mlp_data(n=30), steps=(12, 12), seed=2, dtype=F64,
                                 progress=False, batched=False)
    ranks = run_processes(_distributed_worker, 2, tmp_path)
    for out in ranks:
        np.testing.assert_allclose(out["loss"].numpy(), reference.loss, rtol=1e-13, atol=0)
        assert out["evaluation"] == ranks[0]["evaluation"] and out["runs"] == ranks[0]["runs"]
    chosen = ranks[0]["evaluation"]
    assert chosen["method"] == "batched" and chosen["points_per_pass"] == 4 and chosen["chosen_by"] == "timing"
    reason = "RuntimeError: process 1: OutOfMemoryError: no memory for Q = 8 on rank 1"
    assert chosen["skipped"] == {"batched Q=8": reason}
    assert json.loads((tmp_path / "grid.json").read_text())["evaluation"] == chosen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_timed_gpu_grid_matches_the_cpu_loop_and_records_the_gpu():
    cpu = grid(batched=False)
    gpu = grid(device="cuda")
    np.testing.assert_allclose(gpu.loss, cpu.loss, rtol=1e-9, atol=0)
    np.testing.assert_array_equal(gpu.accuracy, cpu.accuracy)
    chosen = gpu.meta["evaluation"]
    assert chosen["device"] == "cuda" and chosen["chosen_by"] == "timing" and "batched Q=2" in chosen["seconds_per_point"]
    float32 = grid(device="cuda", dtype=torch.float32)  # channels-last convolutions run in float32 only
    np.testing.assert_allclose(float32.loss, cpu.loss, rtol=1e-4)
