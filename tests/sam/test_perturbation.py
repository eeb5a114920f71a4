"""Closed-form checks of the pure perturbation functions in sam.perturbation (float64 references)."""

from __future__ import annotations

import math

import pytest
import torch

from sam.perturbation import dual_direction_, dual_exponent, global_norm, project_, sam_perturbation

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _grads(dtype: torch.dtype = F64) -> list[torch.Tensor]:
    """A gradient spread over tensors of different shapes (weight, bias, conv kernel, scalar)."""
    return [
        torch.randn(4, 3, dtype=dtype),
        torch.randn(4, dtype=dtype),
        torch.randn(2, 1, 3, 3, dtype=dtype),
        torch.randn((), dtype=dtype),
    ]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(F64) for t in tensors])


# --------------------------------------------------------------------------- #
# dual_exponent
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (3.0, 1.5), (1.5, 3.0), (4, 4 / 3), (math.inf, 1.0)])
def test_dual_exponent_closed_form(p: float, q: float) -> None:
    assert dual_exponent(p) == pytest.approx(q, rel=1e-15)
    if p != math.inf:
        assert 1 / p + 1 / dual_exponent(p) == pytest.approx(1.0, rel=1e-15)


@pytest.mark.parametrize("p", [1.0, 1, 0.5, 0.0, -2.0, math.nan, -math.inf])
def test_dual_exponent_rejects_p_at_most_one(p: float) -> None:
    with pytest.raises(ValueError, match="p must be > 1"):
        dual_exponent(p)


# --------------------------------------------------------------------------- #
# global_norm
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("ord", [2.0, 1.0, 1.5, 3.0, math.inf])
def test_global_norm_is_norm_of_concatenation(ord: float) -> None:
    ts = _grads()
    got = global_norm(ts, ord)
    want = torch.linalg.vector_norm(_flat(ts), ord)
    assert got.dim() == 0
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("ord", [2.0, 1.0, 3.0, math.inf])
def test_global_norm_mixed_float32_float64_accumulates_in_float64(ord: float) -> None:
    ts = [torch.randn(7, dtype=torch.float32), torch.randn(3, 2, dtype=F64), torch.randn(5, dtype=torch.float32)]
    got = global_norm(ts, ord)
    assert got.dtype == F64
    want = torch.linalg.vector_norm(_flat(ts), ord)  # float32 values are exact in float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


def test_global_norm_float32_list_stays_float32_and_half_accumulates_in_float32() -> None:
    ts = [torch.randn(10), torch.randn(4, 4)]
    got = global_norm(ts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.linalg.vector_norm(_flat(ts)), rtol=1e-6, atol=0.0)
    # 4096 bf16 ones: a bf16 accumulator would stall at 256 (ulp(256) = 2 in bf16).
    ones = [torch.ones(4096, dtype=torch.bfloat16)]
    assert global_norm(ones, 1.0).item() == 4096.0
    assert global_norm(ones, 2.0).item() == 64.0


def test_global_norm_empty_raises() -> None:
    with pytest.raises(ValueError, match="at least one tensor"):
        global_norm([])


# --------------------------------------------------------------------------- #
# dual_direction_
# --------------------------------------------------------------------------- #
def test_dual_direction_p2_is_unit_gradient_in_place_and_returns_norm() -> None:
    g = _grads()
    u = [t.clone() for t in g]
    ids = [id(t) for t in u]
    norm = dual_direction_(u, 2.0)
    ref = torch.linalg.vector_norm(_flat(g))
    torch.testing.assert_close(norm, ref, rtol=1e-12, atol=0.0)
    assert [id(t) for t in u] == ids
    for d, t in zip(u, g):
        torch.testing.assert_close(d, t / ref, rtol=1e-12, atol=1e-16)


def test_dual_direction_zero_gradient_gives_zero_direction() -> None:
    for p in (2.0, 3.0, math.inf):
        u = [torch.zeros(3, dtype=F64), torch.zeros(2, 2, dtype=F64)]
        norm = dual_direction_(u, p)
        assert norm.item() == 0.0
        assert all(torch.equal(t, torch.zeros_like(t)) for t in u)


def test_dual_direction_non_finite_norm_is_reported() -> None:
    u = [torch.tensor([1.0, math.inf], dtype=F64)]
    assert not torch.isfinite(dual_direction_(u, 2.0))
    u = [torch.tensor([1.0, math.nan], dtype=F64)]
    assert torch.isnan(dual_direction_(u, 2.0))


# --------------------------------------------------------------------------- #
# sam_perturbation
# --------------------------------------------------------------------------- #
def test_sam_perturbation_docstring_example() -> None:
    eps = sam_perturbation([torch.tensor([3.0, 4.0])], rho=0.5)
    torch.testing.assert_close(eps[0], torch.tensor([0.3, 0.4]))


@pytest.mark.parametrize("rho", [0.05, 1.0, 2.5])
def test_sam_perturbation_p2_closed_form(rho: float) -> None:
    g = _grads()
    eps = sam_perturbation(g, rho, p=2.0)
    n = torch.linalg.vector_norm(_flat(g))
    for e, t in zip(eps, g):
        assert e.shape == t.shape and e.dtype == F64
        torch.testing.assert_close(e, rho * t / n, rtol=1e-12, atol=1e-17)
    assert torch.linalg.vector_norm(_flat(eps)).item() == pytest.approx(rho, rel=1e-12)


def test_sam_perturbation_does_not_modify_grads() -> None:
    g = _grads()
    before = [t.clone() for t in g]
    for p in (2.0, 3.0, math.inf):
        sam_perturbation(g, 0.1, p=p)
        sam_perturbation(g, 0.1, p=p, scales=[t.abs() + 0.01 for t in g])
    assert all(torch.equal(a, b) for a, b in zip(g, before))


def test_sam_perturbation_pinf_is_rho_sign() -> None:
    g = _grads()
    g[0][0, 0] = 0.0  # sign(0) = 0
    eps = sam_perturbation(g, 0.2, p=math.inf)
    for e, t in zip(eps, g):
        assert torch.equal(e, 0.2 * torch.sign(t))


@pytest.mark.parametrize("p", [3.0, 1.5, 4.0])
def test_sam_perturbation_general_p_is_on_sphere_and_attains_dual_norm(p: float) -> None:
    rho = 0.3
    g = _grads()
    q = p / (p - 1.0)
    eps = sam_perturbation(g, rho, p=p)
    e, gf = _flat(eps), _flat(g)
    assert torch.linalg.vector_norm(e, p).item() == pytest.approx(rho, rel=1e-12, abs=0)
    # Hoelder equality: <eps, g> = rho ||g||_q is the max over the ball.
    assert torch.dot(e, gf).item() == pytest.approx(rho * torch.linalg.vector_norm(gf, q).item(), rel=1e-12)
    # Closed form of Eq. 2: rho sign(g)|g|^(q-1) / (||g||_q^q)^(1/p).
    want = rho * torch.sign(gf) * gf.abs() ** (q - 1) / (torch.linalg.vector_norm(gf, q) ** q) ** (1 / p)
    torch.testing.assert_close(e, want, rtol=1e-12, atol=1e-16)


def test_sam_perturbation_per_tensor_rho_and_length_check() -> None:
    g = _grads()
    n = torch.linalg.vector_norm(_flat(g))
    rhos = [0.1, 0.2, 0.3, 0.4]
    eps = sam_perturbation(g, rhos)
    for e, t, r in zip(eps, g, rhos):
        torch.testing.assert_close(e, r * t / n, rtol=1e-12, atol=1e-17)
    with pytest.raises(ValueError, match="one value per tensor"):
        sam_perturbation(g, [0.1, 0.2])


def test_sam_perturbation_asam_scales_closed_form() -> None:
    rho, eta = 0.5, 0.01
    w = [torch.randn(4, 3, dtype=F64), torch.randn(4, dtype=F64)]
    g = [torch.randn(4, 3, dtype=F64), torch.randn(4, dtype=F64)]
    # Weight tensor adaptive, bias T = 1 (None).
    t_w = w[0].abs() + eta
    eps = sam_perturbation(g, rho, scales=[t_w, None])
    tg = torch.cat([(t_w * g[0]).reshape(-1), g[1]])
    denom = torch.linalg.vector_norm(tg)
    torch.testing.assert_close(eps[0], rho * t_w**2 * g[0] / denom, rtol=1e-12, atol=1e-17)
    torch.testing.assert_close(eps[1], rho * g[1] / denom, rtol=1e-12, atol=1e-17)
    # On the T-scaled sphere: ||T^-1 eps||_2 = rho.
    scaled = torch.cat([(eps[0] / t_w).reshape(-1), eps[1]])
    assert torch.linalg.vector_norm(scaled).item() == pytest.approx(rho, rel=1e-12)


def test_sam_perturbation_asam_is_invariant_to_rescaling_a_layer() -> None:
    """ASAM's point: scaling w by a and g by 1/a (a ReLU rescaling) scales eps by a exactly (eta = 0)."""
    w = torch.randn(5, 4, dtype=F64)
    g = torch.randn(5, 4, dtype=F64)
    a = 8.0  # power of two: exact
    e1 = sam_perturbation([g], 0.5, scales=[w.abs()])[0]
    e2 = sam_perturbation([g / a], 0.5, scales=[(a * w).abs()])[0]
    torch.testing.assert_close(e2, a * e1, rtol=1e-12, atol=0.0)


# --------------------------------------------------------------------------- #
# project_
# --------------------------------------------------------------------------- #
def test_project_p2_scales_outside_points_onto_sphere_and_keeps_inside_points() -> None:
    d = _grads()
    n = torch.linalg.vector_norm(_flat(d)).item()
    out = [t.clone() for t in d]
    project_(out, [n / 2] * len(out), 2.0)
    for o, t in zip(out, d):
        torch.testing.assert_close(o, t / 2, rtol=1e-12, atol=1e-17)
    inside = [t.clone() for t in d]
    project_(inside, [2 * n] * len(inside), 2.0)
    assert all(torch.equal(a, b) for a, b in zip(inside, d))


def test_project_pinf_clips_coordinates() -> None:
    d = [torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0], dtype=F64), torch.tensor([[1.5, -1.5]], dtype=F64)]
    project_(d, [1.0, 1.0], math.inf)
    assert torch.equal(d[0], torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0], dtype=F64))
    assert torch.equal(d[1], torch.tensor([[1.0, -1.0]], dtype=F64))


def test_project_tensors_with_different_radius_are_separate_balls() -> None:
    a = torch.tensor([3.0, 4.0], dtype=F64)  # norm 5
    b = torch.tensor([0.0, 2.0], dtype=F64)  # norm 2
    c = torch.tensor([6.0, 8.0], dtype=F64)  # norm 10, shares radius with a
    d = [a.clone(), b.clone(), c.clone()]
    project_(d, [1.0, 5.0, 1.0], 2.0)
    joint = math.hypot(5.0, 10.0)
    torch.testing.assert_close(d[0], a / joint, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(d[2], c / joint, rtol=1e-12, atol=0.0)
    assert torch.equal(d[1], b)  # inside its own ball of radius 5


def test_project_zero_radius_gives_zero() -> None:
    for p in (2.0, math.inf):
        d = _grads()
        project_(d, [0.0] * len(d), p)
        assert all(torch.count_nonzero(t) == 0 for t in d)


@pytest.mark.parametrize("r", [5.0, 5.0 * 2.0**-6])
def test_project_p2_is_identity_on_the_sphere(r: float) -> None:
    """A delta exactly on the sphere is left bit for bit (the zero guard must not shrink it)."""
    d = [torch.tensor([3.0, 4.0], dtype=F64) * (r / 5.0)]  # exact in binary: ||d||_2 == r exactly
    assert global_norm(d).item() == r
    before = d[0].clone()
    project_(d, [r], 2.0)
    assert torch.equal(d[0], before)
