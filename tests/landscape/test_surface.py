"""Loss surfaces: closed forms, batched vs one-at-a-time, resume, recipes, the user's model untouched."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.batches import batch_size
from landscape import surface
from landscape.directions import random_direction

from .test_objective import cnn_data, small_cnn

F64 = torch.float64


class Quadratic(nn.Module):
    """``f(x; w) = w`` broadcast, so that mean-squared loss against 0 is ``||w||^2 / n`` per example."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], -1)


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).sum(dim=-1).mean()


def test_quadratic_model_gives_the_closed_form_surface():
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    d1 = {"w": torch.tensor([1.0, 0.0, 0.0], dtype=F64)}
    d2 = {"w": torch.tensor([0.0, 2.0, 1.0], dtype=F64)}
    data = (torch.zeros(6, 1, dtype=F64), torch.zeros(6, 3, dtype=F64))
    result = surface.slice_2d(Quadratic(w), mse, data, directions=(d1, d2), steps=(5, 7), progress=False)
    a, b = np.meshgrid(result.coords[0], result.coords[1], indexing="ij")
    point = w.numpy()[None, None, :] + a[..., None] * d1["w"].numpy() + b[..., None] * d2["w"].numpy()
    assert result.loss.shape == (5, 7)
    np.testing.assert_allclose(result.loss, (point**2).sum(-1), rtol=1e-12)
    batched = surface.slice_2d(Quadratic(w), mse, data, directions=(d1, d2), steps=(5, 7), points_per_pass=6,
                               progress=False)
    np.testing.assert_allclose(batched.loss, (point**2).sum(-1), rtol=1e-12)
    assert np.isnan(result.accuracy).all() and np.isnan(batched.accuracy).all()  # regression: no accuracy


@pytest.mark.parametrize("ignore", ["biasbn", "none"])
def test_centre_of_a_slice_equals_the_models_loss_and_batched_equals_one_at_a_time(ignore):
    model = small_cnn()
    data = cnn_data(n=40)
    kwargs = dict(steps=(5, 5), seed=3, dtype=F64, batch_size=16, ignore=ignore, progress=False)
    batched = surface.slice_2d(model, F.cross_entropy, data, points_per_pass=7, **kwargs)
    plain = surface.slice_2d(model, F.cross_entropy, data, batched=False, **kwargs)
    np.testing.assert_allclose(batched.loss, plain.loss, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(batched.accuracy, plain.accuracy)
    with torch.no_grad():
        expected = F.cross_entropy(model.double()(data[0].double()), data[1])
    model.float()
    assert batched.loss[2, 2] == pytest.approx(float(expected), rel=1e-12)
    assert not np.allclose(batched.loss, batched.loss[2, 2])


def test_cpu_chunks_of_a_batch_are_weighted_like_the_whole_batch(monkeypatch):
    model = small_cnn()
    data = cnn_data(n=45)  # one batch of 45, cut into calls of 32 and 13 examples
    kwargs = dict(steps=(3, 3), seed=5, dtype=F64, batch_size=45, progress=False)
    plain = surface.slice_2d(model, F.cross_entropy, data, batched=False, **kwargs)
    calls = []
    real_vmap = torch.vmap
    monkeypatch.setattr(surface, "_CPU_EXAMPLE_POINTS_PER_CALL", 1)
    monkeypatch.setattr(surface.torch, "vmap",
                        lambda f, in_dims: lambda *a: calls.append(batch_size(a[1])) or real_vmap(f, in_dims)(*a))
    chunked = surface.slice_2d(model, F.cross_entropy, data, points_per_pass=9, **kwargs)
    assert calls[:2] == [32, 13]  # one vmapped call (model and loss) per piece of the batch
    np.testing.assert_allclose(chunked.loss, plain.loss, rtol=1e-12)
    np.testing.assert_array_equal(chunked.accuracy, plain.accuracy)


def test_a_block_stacks_only_the_tensors_a_direction_moves():
    model = small_cnn()
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    directions = [random_direction(params, seed=s) for s in (0, 1)]  # "biasbn": zero on biases and BN
    points = torch.tensor([[0.5, -1.0], [2.0, 0.25], [0.0, 0.0]], dtype=F64)
    stacked, dims = surface._block_params(params, directions, points)
    assert dims == {"0.weight": 0, "0.bias": None, "1.weight": None, "1.bias": None, "4.weight": 0, "4.bias": None}
    assert stacked["0.bias"] is params["0.bias"]  # shared, not copied Q times
    for q, (a, b) in enumerate(points):
        expected = params["4.weight"] + a * directions[0]["4.weight"] + b * directions[1]["4.weight"]
        torch.testing.assert_close(stacked["4.weight"][q], expected, rtol=0, atol=1e-15)
    # a direction that moves nothing (a model against itself) still gives a vmap-able block
    zero = [{k: torch.zeros_like(v) for k, v in params.items()}]
    stacked, dims = surface._block_params(params, zero, points[:, :1])
    assert set(dims.values()) == {0} and stacked["0.bias"].shape == (3, *params["0.bias"].shape)
    flat = surface.interpolate(model, copy.deepcopy(model), F.cross_entropy, cnn_data(n=12), steps=4, dtype=F64,
                               points_per_pass=4, progress=False)
    with torch.no_grad():
        expected = float(F.cross_entropy(copy.deepcopy(model).double()(cnn_data(n=12)[0].double()), cnn_data(n=12)[1]))
    np.testing.assert_allclose(flat.loss, expected, rtol=1e-12)


def test_filter_normalised_direction_has_the_filter_norms_of_the_weights():
    model = small_cnn()
    params = {k: v.detach() for k, v in model.named_parameters()}
    d = random_direction(params, seed=0)
    w, dw = params["0.weight"], d["0.weight"]
    np.testing.assert_allclose(dw.flatten(1).norm(dim=1).numpy(), w.flatten(1).norm(dim=1).numpy(), rtol=1e-5)
    assert torch.count_nonzero(d["0.bias"]) == 0


@pytest.mark.parametrize("batched", [True, False])
def test_the_users_models_are_unchanged(batched):
    model, other = small_cnn(seed=0), small_cnn(seed=1)
    model.train()  # the user's mode is restored too
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, other)]
    kwargs = dict(steps=5, batched=batched, points_per_pass=5, progress=False)
    surface.slice_1d(model, F.cross_entropy, cnn_data(), **kwargs)
    surface.slice_2d(model, F.cross_entropy, cnn_data(), **{**kwargs, "steps": (3, 3)})
    surface.interpolate(model, other, F.cross_entropy, cnn_data(), **kwargs)
    for m, saved in zip((model, other), before):
        assert all(torch.equal(v, saved[k]) for k, v in m.state_dict().items())
    assert model.training and not other.training


def test_interrupted_grid_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    model = small_cnn()
    data = cnn_data(n=24)
    kwargs = dict(steps=(4, 5), seed=1, dtype=F64, points_per_pass=3, progress=False)
    full = surface.slice_2d(model, F.cross_entropy, data, **kwargs)

    calls = {"n": 0}
    original = surface.evaluate_points

    def crash_after_three_passes(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(surface, "evaluate_points", crash_after_three_passes)
    with pytest.raises(KeyboardInterrupt):
        surface.slice_2d(model, F.cross_entropy, data, path=tmp_path / "grid", **kwargs)
    saved = json.loads((tmp_path / "grid.json").read_text())
    assert saved["points_done"] == 9 and saved["points_total"] == 20
    monkeypatch.setattr(surface, "evaluate_points", original)

    calls["n"] = 0
    resumed = surface.slice_2d(model, F.cross_entropy, data, path=tmp_path / "grid", **kwargs)
    np.testing.assert_allclose(resumed.loss, full.loss, rtol=1e-12)
    stored = np.load(tmp_path / "grid.npz")
    np.testing.assert_allclose(stored["loss"], full.loss, rtol=1e-12)

    with pytest.raises(ValueError, match=r"different recipe \(differs in \['seed'\]\)"):
        surface.slice_2d(model, F.cross_entropy, data, path=tmp_path / "grid", **{**kwargs, "seed": 2})
    np.testing.assert_allclose(np.load(tmp_path / "grid.npz")["loss"], full.loss, rtol=1e-12)


def test_a_lone_file_at_the_path_is_never_overwritten(tmp_path):
    (tmp_path / "grid.npz").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="not a surface saved by landscape.surface"):
        surface.slice_1d(small_cnn(), F.cross_entropy, cnn_data(), steps=3, path=tmp_path / "grid", progress=False)
    assert (tmp_path / "grid.npz").read_bytes() == b"user data"
    np.savez(tmp_path / "arrays.npz", loss=np.zeros(3))  # an npz, but not a surface
    with pytest.raises(FileExistsError, match="not a surface saved by landscape.surface"):
        surface.slice_1d(small_cnn(), F.cross_entropy, cnn_data(), steps=3, path=tmp_path / "arrays", progress=False)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 a cut-off zip")  # np.load raises BadZipFile
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "plain.npz")  # an .npy under an .npz name
    for name in ("broken", "plain"):
        with pytest.raises(FileExistsError, match="not a surface saved by landscape.surface"):
            surface.slice_1d(small_cnn(), F.cross_entropy, cnn_data(), steps=3, path=tmp_path / name, progress=False)
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(FileExistsError, match="without its pair"):
        surface.slice_1d(small_cnn(), F.cross_entropy, cnn_data(), steps=3, path=tmp_path / "notes", progress=False)
    assert (tmp_path / "notes.json").read_text() == "{}"


def test_a_run_killed_between_its_two_files_resumes_and_nan_points_count_as_done(tmp_path, monkeypatch):
    model, data = small_cnn(), cnn_data(n=20)
    kwargs = dict(steps=5, seed=4, dtype=F64, progress=False, path=tmp_path / "line", info={"note": "mine"})
    full = surface.slice_1d(model, F.cross_entropy, data, **{**kwargs, "path": None})
    writes = {"n": 0}
    real_write = surface.atomic_write_json

    def killed_on_the_third_json(*args, **kw):  # after the empty grid and one point: the npz has two points
        writes["n"] += 1
        if writes["n"] == 3:
            raise KeyboardInterrupt
        real_write(*args, **kw)

    monkeypatch.setattr(surface, "atomic_write_json", killed_on_the_third_json)
    with pytest.raises(KeyboardInterrupt):
        surface.slice_1d(model, F.cross_entropy, data, **kwargs)
    monkeypatch.setattr(surface, "atomic_write_json", real_write)
    assert json.loads((tmp_path / "line.json").read_text())["points_done"] == 1  # one behind the npz
    (tmp_path / "line.json").unlink()  # as if killed before the json's first write
    evaluated = []
    real_evaluate = surface.evaluate_points
    monkeypatch.setattr(surface, "evaluate_points", lambda o, d, pts, **kw: evaluated.append(len(pts)) or real_evaluate(o, d, pts, **kw))
    resumed = surface.slice_1d(model, F.cross_entropy, data, **kwargs)
    assert sum(evaluated) == 3  # the npz's two points were kept
    np.testing.assert_allclose(resumed.loss, full.loss, rtol=1e-12)
    saved = json.loads((tmp_path / "line.json").read_text())
    assert saved["points_done"] == 5 and saved["note"] == "mine" and resumed.meta["note"] == "mine"

    # a point whose loss is NaN is done: a rerun does not evaluate it again
    with np.load(tmp_path / "line.npz") as stored:
        arrays = dict(stored)
    arrays["loss"][2] = np.nan
    np.savez(tmp_path / "line.npz", **arrays)
    evaluated.clear()
    again = surface.slice_1d(model, F.cross_entropy, data, **kwargs)
    assert evaluated == [] and np.isnan(again.loss[2])
    assert np.isnan(surface.load(tmp_path / "line").loss[2])
    with pytest.raises(ValueError, match="info may not set"):
        surface.slice_1d(model, F.cross_entropy, data, **{**kwargs, "info": {"recipe": 1}})

    # killed after the last npz and before the last json: the finished grid's json is brought up to date
    saved = json.loads((tmp_path / "line.json").read_text())
    (tmp_path / "line.json").write_text(json.dumps({**saved, "points_done": 4}))
    surface.slice_1d(model, F.cross_entropy, data, **kwargs)
    assert evaluated == [] and json.loads((tmp_path / "line.json").read_text())["points_done"] == 5

    # a file from the version before the recipe moved into the npz: read by load(), refused for resuming
    np.savez(tmp_path / "old.npz", loss=arrays["loss"], accuracy=arrays["accuracy"], coords_0=arrays["coords_0"])
    (tmp_path / "old.json").write_text(json.dumps({"recipe": {"kind": "random"}, "points_done": 5, "points_total": 5}))
    old = surface.load(tmp_path / "old")
    np.testing.assert_array_equal(old.loss, arrays["loss"])
    np.testing.assert_array_equal(old.coords[0], arrays["coords_0"])
    with pytest.raises(FileExistsError, match="saved by an earlier version"):
        surface.slice_1d(model, F.cross_entropy, data, **{**kwargs, "path": tmp_path / "old"})


@pytest.mark.parametrize("written", ["[]", '"done"', '{"points_done": "all"}', "{", b"\xff\xfe", "directory"])
def test_a_surface_json_that_is_not_its_metadata_is_written_again_from_the_npz(tmp_path, written):
    """The .npz holds the recipe and the values; whatever is at the .json is replaced, never a traceback."""
    model, data = small_cnn(), cnn_data(n=12)
    kwargs = {"steps": 3, "seed": 1, "dtype": F64, "progress": False, "path": tmp_path / "line"}
    first = surface.slice_1d(model, F.cross_entropy, data, **kwargs)
    json_path = tmp_path / "line.json"
    json_path.unlink()
    if written == "directory":
        json_path.mkdir()
        assert surface._json_behind(json_path, np.ones(3, dtype=bool))
        json_path.rmdir()
    elif isinstance(written, bytes):
        json_path.write_bytes(written)
    else:
        json_path.write_text(written)
    if written != "directory":
        assert surface._json_behind(json_path, np.ones(3, dtype=bool))
        if written == "[]":
            with pytest.raises(ValueError, match=r"line.json holds a JSON list, not the surface's metadata"):
                surface.load(tmp_path / "line")
    again = surface.slice_1d(model, F.cross_entropy, data, **kwargs)
    np.testing.assert_array_equal(again.loss, first.loss)
    assert json.loads(json_path.read_text())["points_done"] == 3 and again.computed == 0


def test_surface_progress_names_what_is_computed(tmp_path, capsys):
    model, data = small_cnn(), cnn_data(n=12)
    surface.slice_2d(model, F.cross_entropy, data, steps=(2, 2), dtype=F64, path=tmp_path / "grid")
    surface.slice_1d(model, F.cross_entropy, data, steps=2, dtype=F64)
    surface.interpolate(model, small_cnn(), F.cross_entropy, data, steps=2, dtype=F64)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("surface: interpolation of loss and accuracy: 100% (2/2 pt")
    assert any(line.startswith("surface: 1D slice of loss and accuracy: 100% (2/2 pt") for line in lines)
    assert any(line.startswith("surface: 2D grid of loss and accuracy (grid): 100% (4/4 pt") for line in lines)


def test_an_interpolation_resumes_its_undone_points_only(tmp_path, monkeypatch):
    a, b = small_cnn(seed=0), small_cnn(seed=1)
    kwargs = dict(steps=6, dtype=F64, points_per_pass=2, progress=False, path=tmp_path / "path")
    full = surface.interpolate(a, b, F.cross_entropy, cnn_data(n=16), **kwargs)
    with np.load(tmp_path / "path.npz") as stored:
        arrays = dict(stored)
    arrays["done"][3:] = False
    arrays["loss"][3:] = np.nan
    np.savez(tmp_path / "path.npz", **arrays)
    evaluated = []
    real_evaluate = surface.evaluate_points
    monkeypatch.setattr(surface, "evaluate_points", lambda o, d, pts, **kw: evaluated.extend(pts[:, 0]) or real_evaluate(o, d, pts, **kw))
    resumed = surface.interpolate(a, b, F.cross_entropy, cnn_data(n=16), **kwargs)
    np.testing.assert_allclose(evaluated, full.coords[0][3:])
    np.testing.assert_allclose(resumed.loss, full.loss, rtol=1e-12)


def test_the_recipe_holds_the_data_and_the_buffers(tmp_path):
    model, (X, y) = small_cnn(), cnn_data(n=20)
    kwargs = dict(steps=3, seed=0, dtype=F64, progress=False, path=tmp_path / "line")
    surface.slice_1d(model, F.cross_entropy, (X, y), **kwargs)
    with pytest.raises(ValueError, match=r"differs in \['data_sha256'\]"):  # same size, other examples
        surface.slice_1d(model, F.cross_entropy, (X.flip(0), y), **kwargs)
    # the same data cut into other batches is the same data
    surface.slice_1d(model, F.cross_entropy, (X, y), batch_size=7, **kwargs)
    recalibrated = copy.deepcopy(model)
    recalibrated[1].running_mean.add_(0.1)  # same weights, other BatchNorm statistics
    with pytest.raises(ValueError, match=r"differs in \['model'\]"):
        surface.slice_1d(recalibrated, F.cross_entropy, (X, y), **kwargs)


def test_bad_grids_and_directions_are_refused_with_a_message():
    model, data = small_cnn(), cnn_data(n=8)
    params = {k: v.detach() for k, v in model.named_parameters()}
    d = random_direction(params, seed=0)
    call = dict(progress=False)
    with pytest.raises(ValueError, match="must be a tuple of 2 parameter dicts; got dict"):
        surface.slice_2d(model, F.cross_entropy, data, directions=d, steps=3, **call)
    with pytest.raises(ValueError, match="must be a tuple of 2 parameter dicts; got tuple of length 3"):
        surface.slice_2d(model, F.cross_entropy, data, directions=(d, d, d), steps=3, **call)
    with pytest.raises(ValueError, match=r"directions\[1\] must have the same names .* missing \['4.bias'\]"):
        surface.slice_2d(model, F.cross_entropy, data, directions=(d, {k: v for k, v in d.items() if k != "4.bias"}),
                         steps=3, **call)
    with pytest.raises(ValueError, match=r"span must be finite with low < high"):
        surface.slice_1d(model, F.cross_entropy, data, steps=3, span=(1.0, -1.0), **call)
    with pytest.raises(ValueError, match=r"span must be a pair of numbers"):
        surface.slice_1d(model, F.cross_entropy, data, steps=3, span=1.0, **call)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 2; got 1"):
        surface.slice_1d(model, F.cross_entropy, data, steps=1, **call)
    with pytest.raises(ValueError, match=r"steps\[1\] must be an integer >= 2; got 0"):
        surface.slice_2d(model, F.cross_entropy, data, steps=(3, 0), **call)
    with pytest.raises(ValueError, match="autocast_dtype must be torch.bfloat16 or torch.float16 with dtype float32"):
        surface.slice_1d(model, F.cross_entropy, data, steps=3, dtype=F64, autocast_dtype=torch.bfloat16, **call)
    # one number and one (low, high) pair serve both axes
    both = surface.slice_2d(model, F.cross_entropy, data, steps=3, span=(-0.5, 0.5), **call)
    assert both.loss.shape == (3, 3) and all(np.array_equal(c, [-0.5, 0.0, 0.5]) for c in both.coords)


def test_interpolation_reaches_both_endpoints():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    b = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    result = surface.interpolate(a, b, F.cross_entropy, (X, y), steps=9, span=(-0.5, 1.5), dtype=F64, progress=False)
    t = result.coords[0]
    with torch.no_grad():
        la = float(F.cross_entropy(a.double()(X.double()), y))
        lb = float(F.cross_entropy(b.double()(X.double()), y))
    assert result.loss[np.argmin(np.abs(t - 0.0))] == pytest.approx(la, rel=1e-12)
    assert result.loss[np.argmin(np.abs(t - 1.0))] == pytest.approx(lb, rel=1e-12)


@pytest.mark.parametrize("batched", [True, False])
def test_interpolation_with_batchnorm_reaches_both_models_with_their_own_statistics(batched):
    a, b = small_cnn(seed=0), small_cnn(seed=1)
    X, y = cnn_data(n=24)
    result = surface.interpolate(a, b, F.cross_entropy, (X, y), steps=5, span=(-0.5, 1.5), dtype=F64, batched=batched,
                                 points_per_pass=5, progress=False)
    with torch.no_grad():
        la = float(F.cross_entropy(copy.deepcopy(a).double()(X.double()), y))
        lb = float(F.cross_entropy(copy.deepcopy(b).double()(X.double()), y))
        # the midpoint by hand: weights and running statistics both halfway
        mid = copy.deepcopy(a).double()
        for (name, t), t_b in zip(mid.state_dict().items(), b.double().state_dict().values()):
            if t.is_floating_point():
                t.copy_((t + t_b.double()) / 2)
        lm = float(F.cross_entropy(mid(X.double()), y))
    assert result.loss[1] == pytest.approx(la, rel=1e-12)
    assert result.loss[3] == pytest.approx(lb, rel=1e-12)
    assert result.loss[2] == pytest.approx(lm, rel=1e-12)
    assert result.meta["recipe"]["buffers"] == "interpolate, clamped to [0, 1]"

    kept = surface.interpolate(a, b, F.cross_entropy, (X, y), steps=5, span=(-0.5, 1.5), dtype=F64, batched=batched,
                               buffers="a", progress=False)
    assert kept.loss[1] == pytest.approx(la, rel=1e-12) and abs(kept.loss[3] - lb) > 1e-6  # b's weights, a's statistics
    # beyond the endpoints the statistics stay at the nearer model's: a variance ratio above 3 would turn
    # the extrapolated running variance negative (NaN loss)
    with torch.no_grad():
        a2, b2 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
        a2[1].running_var.fill_(0.1)
        b2[1].running_var.fill_(1.0)
    wide = surface.interpolate(a2, b2, F.cross_entropy, (X, y), steps=5, span=(-0.5, 1.5), dtype=F64, batched=batched,
                               points_per_pass=5, progress=False)
    assert np.isfinite(wide.loss).all()
    with torch.no_grad():
        outside = copy.deepcopy(a2)
        for (name, p), p_b in zip(outside.named_parameters(), b2.parameters()):
            p.copy_(p - 0.5 * (p_b - p))  # t = -0.5: the weights extrapolated, the statistics a2's own
        expected = float(F.cross_entropy(outside(X.double()), y))
    assert wide.loss[0] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="buffers must be 'interpolate' or 'a'"):
        surface.interpolate(a, b, F.cross_entropy, (X, y), buffers="b", progress=False)


@pytest.mark.parametrize("batched", [True, False])
def test_bf16_autocast_is_close_to_float32_on_both_paths(batched):
    model = small_cnn()
    data = cnn_data(n=32)
    kwargs = dict(steps=5, batched=batched, points_per_pass=5, progress=False)
    exact = surface.slice_1d(model, F.cross_entropy, data, **kwargs)
    bf16 = surface.slice_1d(model, F.cross_entropy, data, autocast_dtype=torch.bfloat16, **kwargs)
    np.testing.assert_allclose(bf16.loss, exact.loss, rtol=5e-2)
    assert np.abs(bf16.loss - exact.loss).max() > 1e-5  # bf16 did run: its rounding shows
    assert bf16.meta["recipe"]["autocast"] == "bfloat16"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_grid_with_memory_sized_passes_matches_the_cpu():
    model = small_cnn()
    data = cnn_data(n=64)
    cpu = surface.slice_2d(model, F.cross_entropy, data, steps=(5, 5), dtype=F64, progress=False)
    gpu = surface.slice_2d(model, F.cross_entropy, data, steps=(5, 5), dtype=F64, device="cuda", progress=False)
    np.testing.assert_allclose(gpu.loss, cpu.loss, rtol=1e-9)
