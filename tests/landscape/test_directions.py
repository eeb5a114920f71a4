"""Directions for loss surfaces: normalisations against closed forms, seeding, Gram-Schmidt, PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from landscape import directions as D
from landscape.objective import ParamLayout

F64 = torch.float64


def make_params(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A conv + BatchNorm + linear parameter dict with filters of very different norms."""
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-2, 1, 4, dtype=F64)
    conv = torch.randn(4, 3, 3, 3, generator=g, dtype=F64) * scale[:, None, None, None]
    return {
        "conv.weight": conv.to(dtype),
        "conv.bias": torch.randn(4, generator=g, dtype=F64).to(dtype),
        "bn.weight": (1 + torch.rand(4, generator=g, dtype=F64)).to(dtype),
        "bn.bias": torch.randn(4, generator=g, dtype=F64).to(dtype),
        "fc.weight": (torch.randn(5, 36, generator=g, dtype=F64) * 3).to(dtype),
        "fc.bias": torch.randn(5, generator=g, dtype=F64).to(dtype),
    }


def flat_norm(d) -> float:
    return float(torch.sqrt(sum((t.to(F64) ** 2).sum() for t in d.values())))


def flat_dot(a, b) -> float:
    return float(sum((a[k].to(F64) * b[k].to(F64)).sum() for k in a))


# --------------------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_filter_normalization_matches_every_filter(dtype):
    params = make_params(dtype)
    d = D.random_direction(params, seed=3)
    for k, (dn, wn) in D.direction_norms_by_filter(d, params).items():
        if params[k].ndim > 1:
            torch.testing.assert_close(dn, wn, rtol=1e-6, atol=0)
        else:
            assert torch.count_nonzero(d[k]) == 0, k
    for k in params:
        assert d[k].shape == params[k].shape and d[k].dtype == dtype and d[k].device == params[k].device


def test_ignore_none_normalizes_1d_tensors_as_a_whole():
    params = make_params(F64)
    for norm in ("filter", "layer"):
        d = D.random_direction(params, seed=1, norm=norm, ignore="none")
        for k in ("conv.bias", "bn.weight", "bn.bias", "fc.bias"):
            assert flat_norm({k: d[k]}) == pytest.approx(float(params[k].norm()), rel=1e-6)


def test_layer_normalization_closed_form():
    params = make_params(F64)
    raw = {k: torch.randn_like(v) for k, v in params.items()}
    d = D.normalize_direction(raw, params, norm="layer")
    for k in params:
        if params[k].ndim > 1:
            torch.testing.assert_close(d[k], raw[k] * params[k].norm() / (raw[k].norm() + 1e-10), rtol=1e-12, atol=0)
        else:
            assert torch.count_nonzero(d[k]) == 0


@pytest.mark.parametrize("ignore", ["biasbn", "none"])
def test_model_normalization_closed_form(ignore):
    params = make_params(F64)
    raw = {k: torch.randn_like(v) for k, v in params.items()}
    d = D.normalize_direction(raw, params, norm="model", ignore=ignore)
    covered = [k for k in params if ignore == "none" or params[k].ndim > 1]
    factor = flat_norm({k: params[k] for k in covered}) / (flat_norm({k: raw[k] for k in covered}) + 1e-10)
    for k in params:
        expected = raw[k] * factor if k in covered else torch.zeros_like(raw[k])
        torch.testing.assert_close(d[k], expected, rtol=1e-12, atol=0)


def test_none_normalization_keeps_direction_and_returns_new_tensors():
    params = make_params(F64)
    raw = {k: torch.randn_like(v) for k, v in params.items()}
    kept = {k: v.clone() for k, v in raw.items()}
    d = D.normalize_direction(raw, params, norm="none", ignore="none")
    for k in params:
        torch.testing.assert_close(d[k], kept[k], rtol=0, atol=0)
        assert d[k].data_ptr() != raw[k].data_ptr()
    D.normalize_direction(raw, params, norm="filter")
    for k in params:  # inputs untouched
        torch.testing.assert_close(raw[k], kept[k], rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- seeding
def test_seeded_reproducibility():
    params = make_params()
    a, b, c = (D.random_direction(params, seed=s) for s in (7, 7, 8))
    for k in params:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not torch.equal(a["conv.weight"], c["conv.weight"])
    # drawn in float64 then cast: float32 and float64 directions agree up to rounding
    d64 = D.random_direction(make_params(F64), seed=7)
    torch.testing.assert_close(a["fc.weight"].to(F64), d64["fc.weight"], rtol=1e-5, atol=1e-6)


def test_random_plane_uses_seed_and_seed_plus_one():
    params = make_params(F64)
    d1, d2 = D.random_plane(params, seed=5)
    for k in params:
        torch.testing.assert_close(d1[k], D.random_direction(params, seed=5)[k], rtol=0, atol=0)
        torch.testing.assert_close(d2[k], D.random_direction(params, seed=6)[k], rtol=0, atol=0)
    o1, o2 = D.random_plane(params, seed=5, orthogonal=True)
    assert abs(flat_dot(o1, o2)) <= 1e-10 * flat_norm(o1) * flat_norm(o2)
    assert flat_norm(o2) == pytest.approx(flat_norm(d2), rel=1e-12)
    assert torch.count_nonzero(o2["fc.bias"]) == 0


# ------------------------------------------------------------------------------------- Gram-Schmidt
def test_orthogonalize_inner_product_zero_norm_kept():
    params = make_params(F64)
    d1 = {k: torch.randn_like(v) for k, v in params.items()}
    d2 = {k: torch.randn_like(v) + 0.5 * d1[k] for k, v in params.items()}
    o = D.orthogonalize(d2, d1)
    assert abs(flat_dot(o, d1)) <= 1e-10 * flat_norm(o) * flat_norm(d1)
    assert flat_norm(o) == pytest.approx(flat_norm(d2), rel=1e-12)
    with pytest.raises(ValueError, match="parallel"):
        D.orthogonalize({k: 2 * v for k, v in d1.items()}, d1)
    with pytest.raises(ValueError, match="d1 must be a non-zero"):
        D.orthogonalize(d2, {k: torch.zeros_like(v) for k, v in d1.items()})


# --------------------------------------------------------------------------------- model directions
def test_difference_and_plane_through_coordinates():
    a, b, c = make_params(F64), make_params(F64), make_params(F64)
    b = {k: v + 1.0 for k, v in b.items()}
    c = {k: v * 2.0 - 0.5 for k, v in c.items()}
    diff = D.difference(b, a)
    for k in a:
        torch.testing.assert_close(a[k] + diff[k], b[k], rtol=0, atol=1e-12)
    origin, d1, d2 = D.plane_through(a, b, c)
    for (x, y), target in [((0, 0), a), ((1, 0), b), ((0, 1), c)]:
        for k in a:
            torch.testing.assert_close(origin[k] + x * d1[k] + y * d2[k], target[k], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="differ from params_a"):
        D.plane_through(a, a, c)


def test_eigenvector_directions_validates_and_copies():
    params = make_params(F64)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    v = {k: t / flat_norm(v) for k, t in v.items()}
    (out,) = D.eigenvector_directions([v])
    for k in v:
        torch.testing.assert_close(out[k], v[k], rtol=0, atol=0)
        assert out[k].data_ptr() != v[k].data_ptr()
    with pytest.raises(ValueError, match="unit norm"):
        D.eigenvector_directions([{k: 2 * t for k, t in v.items()}])
    with pytest.raises(ValueError, match="non-empty list"):
        D.eigenvector_directions([])


# ----------------------------------------------------------------------------------------------- PCA
def test_pca_recovers_plane_of_synthetic_trajectory():
    final = make_params(F64)
    layout = ParamLayout.of(final)
    g = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(layout.size, 2, generator=g, dtype=F64))
    u, v = q[:, 0], q[:, 1]
    t = torch.linspace(0, 1, 9, dtype=F64)
    ab = torch.stack([3 * (1 - t) ** 2 + 0.1 * torch.sin(7 * t), 0.8 * torch.cos(5 * t) * (1 - t)], dim=1)
    f = layout.flatten(final)
    snapshots = [{k: x.clone() for k, x in layout.unflatten(f + a * u + b * v).items()} for a, b in ab]
    snapshots[-1] = {k: x.clone() for k, x in final.items()}  # the trajectory ends at final
    ab[-1] = 0.0

    result = D.pca_directions(snapshots, n_components=2)
    basis = torch.stack([layout.flatten(d) for d in result.directions], dim=1)
    torch.testing.assert_close(basis.T @ basis, torch.eye(2, dtype=F64), rtol=0, atol=1e-12)
    residual = q - basis @ (basis.T @ q)  # span{d1, d2} == span{u, v}
    assert float(residual.norm()) <= 1e-10
    assert result.explained_variance_ratio.shape == (2,)
    assert result.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-12)
    assert result.explained_variance_ratio[0] >= result.explained_variance_ratio[1]
    assert result.coordinates.shape == (9, 2)
    # coordinates equal (a_i, b_i) up to rotation/reflection: same pairwise distances and norms
    true = ab.numpy()
    dist = lambda x: np.linalg.norm(x[:, None] - x[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(dist(result.coordinates), dist(true), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(result.coordinates, axis=1), np.linalg.norm(true, axis=1), atol=1e-10)
    # and they are the projections onto the directions
    proj = torch.stack([layout.flatten(s) - f for s in snapshots]) @ basis
    np.testing.assert_allclose(result.coordinates, proj.numpy(), atol=1e-12)

    explicit = D.pca_directions(snapshots, final, n_components=1)
    assert explicit.coordinates.shape == (9, 1)
    np.testing.assert_allclose(explicit.coordinates[:, 0], result.coordinates[:, 0], atol=1e-12)


def test_pca_in_small_blocks_of_memory_mapped_snapshots_equals_a_dense_svd(tmp_path, monkeypatch):
    final = make_params(F64)
    layout = ParamLayout.of(final)
    g = torch.Generator().manual_seed(5)
    f = layout.flatten(final)
    rows = torch.randn(6, 3, generator=g, dtype=F64) @ torch.randn(3, layout.size, generator=g, dtype=F64)  # rank 3
    for i, row in enumerate(rows):
        torch.save({k: x.float() for k, x in layout.unflatten(f + row).items()}, tmp_path / f"s{i}.pt")
    snapshots = [torch.load(tmp_path / f"s{i}.pt", weights_only=True, mmap=True) for i in range(6)]
    final32 = {k: x.float() for k, x in final.items()}
    monkeypatch.setattr(D, "PCA_BLOCK_ELEMENTS", 13)  # 2 columns per block: every tensor in several blocks
    result = D.pca_directions(snapshots, final32, n_components=3)

    matrix = np.stack([layout.flatten({k: x.double() for k, x in s.items()}).numpy() for s in snapshots])
    matrix -= layout.flatten({k: x.double() for k, x in final32.items()}).numpy()
    u, sv, vh = np.linalg.svd(matrix, full_matrices=False)  # the dense reference
    signs = np.sign((u[:, :3] * sv[:3])[np.abs(u[:, :3]).argmax(axis=0), range(3)])
    np.testing.assert_allclose(result.coordinates, u[:, :3] * sv[:3] * signs, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.explained_variance_ratio, sv[:3] ** 2 / (sv**2).sum(), rtol=1e-10)
    for k, d in enumerate(result.directions):
        assert d["fc.weight"].dtype == torch.float32
        np.testing.assert_allclose(layout.flatten({n: x.double() for n, x in d.items()}).numpy(), vh[k] * signs[k],
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="spans 3 dimension"):
        D.pca_directions(snapshots, final32, n_components=4)


def test_pca_rejects_degenerate_inputs():
    final = make_params(F64)
    line = [{k: v + s for k, v in final.items()} for s in (2.0, 1.0, 0.0)]
    with pytest.raises(ValueError, match="spans 1 dimension"):
        D.pca_directions(line, n_components=2)
    with pytest.raises(ValueError, match="at least two"):
        D.pca_directions([final])
    with pytest.raises(ValueError, match="n_components must be <="):
        D.pca_directions(line, n_components=4)
    with pytest.raises(ValueError, match="every snapshot equals final"):
        D.pca_directions([final, final], n_components=1)


# ------------------------------------------------------------------------------------- bad arguments
def test_bad_arguments_raise_clear_errors():
    params = make_params()
    with pytest.raises(ValueError, match=r"norm must be one of \('filter', 'layer', 'model', 'none'\)"):
        D.random_direction(params, seed=0, norm="unit")
    with pytest.raises(ValueError, match=r"ignore must be one of \('biasbn', 'none'\)"):
        D.normalize_direction(params, params, ignore="bias")
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        D.random_direction(params, seed=-1)
    with pytest.raises(ValueError, match="non-empty dict"):
        D.random_direction({}, seed=0)
    with pytest.raises(ValueError, match=r"params\['x'\] must be a floating-point Tensor"):
        D.random_direction({"x": torch.zeros(2, dtype=torch.long)}, seed=0)
    short = {k: v for k, v in params.items() if k != "fc.bias"}
    with pytest.raises(ValueError, match=r"missing \['fc.bias'\]"):
        D.normalize_direction(short, params)
    wrong = dict(params, **{"fc.weight": torch.zeros(5, 35)})
    with pytest.raises(ValueError, match=r"direction\['fc.weight'\] has shape \(5, 35\)"):
        D.normalize_direction(wrong, params)
    with pytest.raises(ValueError, match="differ in|missing"):
        D.difference(short, params)
