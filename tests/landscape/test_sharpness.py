"""Sharpness measures against closed forms and independent float64 references.

* Exact quadratics (a linear model with squared error, so every chunk's loss is ``g.u + u^T H u / 2`` in
  the perturbation): one SAM step is ``rho ||g|| + rho^2 g^T H g / (2 ||g||^2)`` (``p = 2``) or
  ``rho ||g||_1 + rho^2 s^T H s / 2`` with ``s = sign(g)`` (``p = inf``), exactly; the true maximum over
  the l2 ball comes from the trust-region secular equation, over the box from its vertices.
* Non-quadratic models: a brute-force per-chunk loop with plain autograd on the same seeded partition,
  and the full-batch SAM step computed by hand with ``torch.func``.
* Invariances: vmap path == Python loop, ``m = N`` == full batch for every seed, adaptive sharpness
  unchanged by a ReLU rescaling that changes plain sharpness.
* Stochastic measures are checked on fixed seeds (deterministic tests): per-draw values against the
  documented noise draws, and means within 4 standard errors of closed-form expectations.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from landscape import sharpness
from landscape.sharpness import apgd_checkpoints, ascend

from .test_objective import cnn_data, dense_reference, mlp_data, small_cnn, small_mlp

F64 = torch.float64
INF = math.inf


# ----------------------------------------------------------------------------------------- helpers
def partition(n: int, m: int, seed: int) -> torch.Tensor:
    """The documented partition: ``randperm(n)`` from ``Generator().manual_seed(seed)``, cut in rows of m;
    for m = 1 every example is its own chunk, in the order of the data (read batch by batch)."""
    if m == 1:
        return torch.arange(n).reshape(n, 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: (n // m) * m].reshape(n // m, m)


def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.squeeze(-1) - y) ** 2).mean()


def linear_problem(n: int = 12, d: int = 3, seed: int = 0):
    """``nn.Linear(d, 1)`` in float64 with squared error: every chunk's loss is exactly quadratic in the
    flat parameters ``theta = [weight, bias]``, with features ``phi_i = [x_i, 1]``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1).double()
    return model, X, y


def theta_of(model: nn.Linear) -> np.ndarray:
    return torch.cat([model.weight.detach().flatten(), model.bias.detach()]).numpy().astype(np.float64)


def set_theta(model: nn.Linear, theta: np.ndarray) -> None:
    d = model.weight.shape[1]
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(theta[:d]).reshape(1, d))
        model.bias.copy_(torch.as_tensor(theta[d:]))


def chunk_quadratic(theta: np.ndarray, X: torch.Tensor, y: torch.Tensor, idx) -> tuple[float, np.ndarray, np.ndarray]:
    """``(L_S, g_S, H_S)`` of ``L_S(theta) = mean_{i in S} (phi_i . theta - y_i)^2`` in closed form."""
    phi = np.concatenate([X.numpy()[idx], np.ones((len(idx), 1))], axis=1)
    r = phi @ theta - y.numpy()[idx]
    m = len(idx)
    return float((r**2).mean()), 2.0 / m * phi.T @ r, 2.0 / m * phi.T @ phi


def one_step_closed_form(g: np.ndarray, H: np.ndarray, rho: float, p: float, c: np.ndarray | None = None) -> float:
    """One SAM step on ``g.e + e^T H e / 2`` with ``e = c u``: exact for a quadratic."""
    c = np.ones_like(g) if c is None else c
    gu, Hu = c * g, c[:, None] * H * c[None, :]
    if p == INF:
        s = np.sign(gu)
        return rho * np.abs(gu).sum() + rho**2 / 2 * s @ Hu @ s
    return rho * np.linalg.norm(gu) + rho**2 / 2 * (gu @ Hu @ gu) / (gu @ gu)


def ball_maximum(g: np.ndarray, H: np.ndarray, rho: float) -> float:
    """``max_{||u||_2 <= rho} g.u + u^T H u / 2`` for a PSD ``H`` (generic case, ``g`` not orthogonal to the
    top eigenvector): ``u = (mu I - H)^{-1} g`` with ``mu > lambda_max`` solving ``||u|| = rho``."""
    lam, V = np.linalg.eigh(H)
    gt = V.T @ g
    assert abs(gt[-1]) > 1e-8 * np.linalg.norm(g)  # not the hard case

    def norm(mu: float) -> float:
        return float(np.sqrt(((gt / (mu - lam)) ** 2).sum()))

    lo, hi = lam[-1], lam[-1] + np.linalg.norm(g) / rho + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
    u = V @ (gt / (hi - lam))
    best = float(g @ u + u @ H @ u / 2)
    # sanity of the reference itself: no point of a dense sample of the sphere does better
    z = np.random.default_rng(0).standard_normal((20000, len(g)))
    z = rho * z / np.linalg.norm(z, axis=1, keepdims=True)
    assert (z @ g + 0.5 * np.einsum("ni,ij,nj->n", z, H, z)).max() <= best + 1e-12
    return best


def box_maximum(g: np.ndarray, H: np.ndarray, half_widths: np.ndarray) -> float:
    """``max_{|e_i| <= h_i} g.e + e^T H e / 2`` for a PSD ``H``: a convex function peaks at a vertex."""
    best = -math.inf
    for signs in itertools.product((-1.0, 1.0), repeat=len(g)):
        e = np.asarray(signs) * half_widths
        best = max(best, float(g @ e + e @ H @ e / 2))
    return best


def full_batch_loss(model: nn.Module, loss_fn, X, y):
    """``params -> L(params)`` on a float64 copy of ``model`` (buffers fixed, eval mode)."""
    reference = copy.deepcopy(model).to(F64).eval()
    buffers = {k: v.detach() for k, v in reference.named_buffers()}
    params = {k: v.detach() for k, v in reference.named_parameters()}
    X = X.to(F64) if X.is_floating_point() else X

    def loss(p, index=None):
        xs, ys = (X, y) if index is None else (X[index], y[index])
        return loss_fn(functional_call(reference, (p, buffers), (xs,)), ys)

    return params, loss


def flat_norm(tensors: dict, p: float = 2.0) -> torch.Tensor:
    flat = torch.cat([t.flatten() for t in tensors.values()])
    return flat.abs().max() if p == INF else flat.norm()


def relu_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def rescaled(model: nn.Module, a: float) -> nn.Module:
    """First layer (weight and bias) times ``a``, second layer's weight over ``a``: the same function."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[0].weight.mul_(a)
        out[0].bias.mul_(a)
        out[2].weight.div_(a)
    return out


def state_of(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def assert_unchanged(model: nn.Module, before) -> None:
    state, flags = before
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------- exact quadratics, closed forms
@pytest.mark.parametrize("m", [1, 4, 12])
@pytest.mark.parametrize("p", [2.0, INF])
@pytest.mark.parametrize("adaptive", [False, True])
def test_one_step_equals_the_closed_form_on_an_exact_quadratic(m, p, adaptive):
    model, X, y = linear_problem(n=12)
    theta = theta_of(model)
    c = np.abs(theta) + 0.1 if adaptive else None
    for rho in (1e-3, 0.3):
        result = sharpness.m_sharpness(model, squared_error, (X, y), m=m, rho=rho, p=p, adaptive=adaptive, eta=0.1,
                                       seed=2, dtype=F64, progress=False)
        chunks = partition(12, m, seed=2)
        expected = []
        for idx in chunks.tolist():
            _, g, H = chunk_quadratic(theta, X, y, idx)
            expected.append(one_step_closed_form(g, H, rho, p, c))
        expected = np.asarray(expected)
        assert result.per_chunk.shape == (12 // m,)
        np.testing.assert_allclose(result.per_chunk, expected, rtol=1e-10)
        assert result.value == pytest.approx(expected.mean(), rel=1e-10)
        if m < 12:
            assert result.std_error == pytest.approx(expected.std(ddof=1) / math.sqrt(len(expected)), rel=1e-8)
        else:
            assert result.std_error is None
        assert result.measure == ("adaptive_worst" if adaptive else "m_sharpness")


def test_small_rho_matches_the_second_order_expansion_on_cross_entropy():
    """rho ||g|| + rho^2 g^T H g / (2 ||g||^2) with the dense Hessian, to 1e-4 relative (error O(rho^3))."""
    model = small_mlp()
    X, y = mlp_data()
    _, _, _, gradient, hessian = dense_reference(model, X, y)
    for rho in (1e-3, 1e-2):
        expected = rho * gradient.norm() + rho**2 / 2 * (gradient @ hessian @ gradient) / (gradient @ gradient)
        result = sharpness.m_sharpness(model, F.cross_entropy, (X, y), m=len(y), rho=rho, dtype=F64, progress=False)
        assert result.value == pytest.approx(float(expected), rel=1e-4)


def test_gradient_along_the_top_eigenvector_gives_rho_g_plus_rho2_lambda_max_over_2():
    model, X, y = linear_problem(n=12)
    _, _, H = chunk_quadratic(theta_of(model), X, y, list(range(12)))
    lam, V = np.linalg.eigh(H)
    phi = np.concatenate([X.numpy(), np.ones((12, 1))], axis=1)
    minimum = np.linalg.lstsq(phi, y.numpy(), rcond=None)[0]
    delta, rho = 0.02, 0.05
    set_theta(model, minimum + delta * V[:, -1])  # gradient = delta * lambda_max * v_max
    _, g, _ = chunk_quadratic(theta_of(model), X, y, list(range(12)))
    np.testing.assert_allclose(g, delta * lam[-1] * V[:, -1], atol=1e-12)
    expected = rho * delta * lam[-1] + rho**2 * lam[-1] / 2
    assert expected == pytest.approx(ball_maximum(g, H, rho), rel=1e-10)  # it is the true maximum
    for steps in (1, 3):
        result = sharpness.m_sharpness(model, squared_error, (X, y), m=12, rho=rho, steps=steps, dtype=F64,
                                       progress=False)
        assert result.value == pytest.approx(expected, rel=1e-10)


def test_near_a_minimum_many_steps_reach_rho2_lambda_max_over_2():
    """A tiny gradient in a generic direction: one step sees the Rayleigh quotient of g, many PGD steps
    (a shifted power iteration) find the top eigenvector, and the value tends to rho^2 lambda_max / 2."""
    model, X, y = linear_problem(n=12)
    _, _, H = chunk_quadratic(theta_of(model), X, y, list(range(12)))
    lam = np.linalg.eigvalsh(H)
    phi = np.concatenate([X.numpy(), np.ones((12, 1))], axis=1)
    minimum = np.linalg.lstsq(phi, y.numpy(), rcond=None)[0]
    direction = np.array([1.0, -1.0, 1.0, 1.0]) / 2.0
    set_theta(model, minimum + 1e-6 * direction)
    _, g, _ = chunk_quadratic(theta_of(model), X, y, list(range(12)))
    rho = 0.05
    limit = rho**2 * lam[-1] / 2
    kwargs = dict(m=12, rho=rho, dtype=F64, progress=False)
    one = sharpness.m_sharpness(model, squared_error, (X, y), steps=1, **kwargs).value
    many = sharpness.m_sharpness(model, squared_error, (X, y), steps=60, **kwargs).value
    assert many == pytest.approx(limit, rel=1e-4)
    assert many == pytest.approx(ball_maximum(g, H, rho), rel=1e-6)
    assert many <= ball_maximum(g, H, rho) * (1 + 1e-12)
    assert one == pytest.approx(one_step_closed_form(g, H, rho, 2.0), rel=1e-8)
    assert one < 0.95 * many  # the gradient direction is far from the top eigenvector


def test_step_size_is_the_pgd_step_alpha():
    """Gradient along v_max: steps of alpha = rho/2 walk along v_max, so after k steps u = min(k/2, 1) rho v."""
    model, X, y = linear_problem(n=12)
    _, _, H = chunk_quadratic(theta_of(model), X, y, list(range(12)))
    lam, V = np.linalg.eigh(H)
    phi = np.concatenate([X.numpy(), np.ones((12, 1))], axis=1)
    set_theta(model, np.linalg.lstsq(phi, y.numpy(), rcond=None)[0] + 0.02 * V[:, -1])
    gamma, rho = 0.02 * lam[-1], 0.05

    def along(t):
        return gamma * t + lam[-1] * t**2 / 2

    kwargs = dict(m=12, rho=rho, step_size=rho / 2, dtype=F64, progress=False)
    first = sharpness.m_sharpness(model, squared_error, (X, y), steps=1, **kwargs)
    assert first.value == pytest.approx(along(rho / 2), rel=1e-10)
    assert first.settings["step_size"] == rho / 2
    for steps in (2, 4):
        value = sharpness.m_sharpness(model, squared_error, (X, y), steps=steps, **kwargs).value
        assert value == pytest.approx(along(rho), rel=1e-10)


def test_multi_step_is_between_one_step_and_the_true_maximum_per_chunk():
    model, X, y = linear_problem(n=12)
    theta = theta_of(model)
    rho = 0.5  # large enough that the curvature term matters
    kwargs = dict(m=4, rho=rho, seed=1, dtype=F64, progress=False)
    one = sharpness.m_sharpness(model, squared_error, (X, y), steps=1, **kwargs).per_chunk
    pgd = sharpness.m_sharpness(model, squared_error, (X, y), steps=5, **kwargs).per_chunk
    apgd = sharpness.m_sharpness(model, squared_error, (X, y), steps=40, ascent="apgd", **kwargs).per_chunk
    truth = np.asarray([ball_maximum(*chunk_quadratic(theta, X, y, idx)[1:], rho) for idx in partition(12, 4, 1).tolist()])
    assert np.all(pgd >= one - 1e-15) and np.any(pgd > one * (1 + 1e-3))
    assert np.all(pgd <= truth * (1 + 1e-12)) and np.all(apgd <= truth * (1 + 1e-12))
    np.testing.assert_allclose(apgd, truth, rtol=1e-3)


# ------------------------------------------------------------------------- ascend on stacks directly
def quadratic_stack(G: int = 6, seed: int = 0):
    """G independent problems ``f(u) = g.u + u^T H u / 2`` on 5 coordinates split into two tensors."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((G, 5, 5))
    H = np.einsum("gij,gkj->gik", A, A) / 5
    g = rng.standard_normal((G, 5)) * rng.uniform(0.01, 1.0, size=(G, 1))  # gradients small to large
    Ht, gt = torch.as_tensor(H), torch.as_tensor(g)

    def flat(u):
        return torch.cat([u["a"].reshape(u["a"].shape[0], -1), u["b"]], dim=1)

    def f(u):
        v = flat(u)
        return (gt * v).sum(1) + 0.5 * torch.einsum("gi,gij,gj->g", v, Ht, v)

    def value_and_grad(u):
        v = flat(u)
        grad = gt + torch.einsum("gij,gj->gi", Ht, v)
        return f(u), {"a": grad[:, :4].reshape(-1, 2, 2), "b": grad[:, 4:]}

    zeros = {"a": torch.zeros(G, 2, 2, dtype=F64), "b": torch.zeros(G, 1, dtype=F64)}
    return g, H, value_and_grad, f, zeros


def test_ascend_on_a_stack_of_quadratics_l2():
    g, H, value_and_grad, value, zeros = quadratic_stack()
    rho = 0.7
    truth = np.asarray([ball_maximum(g[i], H[i], rho) for i in range(len(g))])
    base, one = ascend(value_and_grad, value, zeros, rho, 2.0, 1)
    assert torch.equal(base, torch.zeros(len(g), dtype=F64))
    np.testing.assert_allclose(one.numpy(), [one_step_closed_form(g[i], H[i], rho, 2.0) for i in range(len(g))],
                               rtol=1e-12)
    _, pgd = ascend(value_and_grad, value, zeros, rho, 2.0, 10, "pgd")
    _, apgd = ascend(value_and_grad, value, zeros, rho, 2.0, 100, "apgd")
    assert torch.all(pgd >= one) and np.all(pgd.numpy() <= truth * (1 + 1e-12))
    assert np.all(apgd.numpy() <= truth * (1 + 1e-12))
    np.testing.assert_allclose(apgd.numpy(), truth, rtol=1e-3)


def test_ascend_on_a_stack_of_quadratics_linf():
    """A convex quadratic peaks over the box at a vertex; ascent guarantees a first-order (KKT) local
    maximum: a vertex ``e = rho s`` with ``sign(g + H e) = s``. Where that vertex is unique it is the global one."""
    g, H, value_and_grad, value, zeros = quadratic_stack(seed=1)
    rho = 0.4
    truth = np.asarray([box_maximum(g[i], H[i], np.full(5, rho)) for i in range(len(g))])
    _, one = ascend(value_and_grad, value, zeros, rho, INF, 1)
    np.testing.assert_allclose(one.numpy(), [one_step_closed_form(g[i], H[i], rho, INF) for i in range(len(g))],
                               rtol=1e-12)
    _, apgd = ascend(value_and_grad, value, zeros, rho, INF, 100, "apgd")
    assert torch.all(apgd >= one - 1e-15)
    assert np.all(apgd.numpy() <= truth * (1 + 1e-12))
    unique = 0
    for i in range(len(g)):
        vertices = [rho * np.asarray(s) for s in itertools.product((-1.0, 1.0), repeat=5)]
        kkt = [e for e in vertices if np.all(np.sign(e) * (g[i] + H[i] @ e) > 0)]
        values = np.asarray([g[i] @ e + e @ H[i] @ e / 2 for e in kkt])
        assert np.min(np.abs(values - float(apgd[i]))) <= 1e-12 * abs(float(apgd[i])), i  # a KKT vertex's value
        if len(kkt) == 1:
            unique += 1
            assert float(apgd[i]) == pytest.approx(truth[i], rel=1e-3)
    assert unique >= 1


def test_the_value_is_the_best_iterate_not_the_last():
    """f(u) = u - 0.75 u^2 on |u| <= 1: PGD with alpha = rho oscillates 0 -> 1 -> 0 -> 1 (the gradient at 1 is
    -0.5), so iterates alternate between f = 0.25 and f = 0; the true maximum is 1/3 at u = 2/3."""

    def value(u):
        return u["u"][:, 0] - 0.75 * u["u"][:, 0] ** 2

    def value_and_grad(u):
        return value(u), {"u": 1 - 1.5 * u["u"]}

    zeros = {"u": torch.zeros(1, 1, dtype=F64)}
    for p in (2.0, INF):
        for steps in (1, 2, 4):
            base, best = ascend(value_and_grad, value, zeros, 1.0, p, steps, "pgd")
            assert float(base) == 0.0 and float(best) == pytest.approx(0.25, rel=1e-14), (p, steps)
        _, best = ascend(value_and_grad, value, zeros, 1.0, p, 30, "apgd")
        assert 0.25 <= float(best) <= 1 / 3 + 1e-15
    # Auto-PGD overshoots too (u_2 = P(1 + 0.75 (-1 - 1) + 0.25 (1 - 0)) = -0.25), then halves and restarts
    _, two = ascend(value_and_grad, value, zeros, 1.0, 2.0, 2, "apgd")
    assert float(two) == pytest.approx(0.25, rel=1e-14)
    for steps in range(2, 16):
        _, best = ascend(value_and_grad, value, zeros, 1.0, 2.0, steps, "apgd")
        assert float(best) == pytest.approx(apgd_reference(np.array([1.0]), np.array([[-1.5]]), 1.0, steps),
                                            rel=1e-14), steps


def apgd_reference(g: np.ndarray, H: np.ndarray, rho: float, steps: int) -> float:
    """Auto-PGD (Croce & Hein 2020, Alg. 1) for one problem max g.u + u^T H u / 2 on ||u||_2 <= rho, written
    out with the module's conventions: eta_0 = 2 rho, momentum alpha = 0.75, the value is the best of
    u_1 .. u_steps; at a checkpoint w_j (after evaluating u_{w_j}) halve eta and restart from the best point
    when fewer than 75% of the steps since w_{j-1} increased f, or when neither eta nor the best value changed."""

    def f(u):
        return float(g @ u + u @ H @ u / 2)

    def grad(u):
        return g + H @ u

    def proj(u):
        n = np.linalg.norm(u)
        return u if n <= rho else u * rho / n

    def step(u, gr, eta):
        return proj(u + eta * gr / np.linalg.norm(gr))

    eta, checkpoints = 2 * rho, apgd_checkpoints(steps)
    prev, u = np.zeros_like(g), step(np.zeros_like(g), grad(np.zeros_like(g)), 2 * rho)
    f_prev, best, best_u = 0.0, -math.inf, None
    increases, last, eta_last, best_last = 0, 0, eta, -math.inf
    for k in range(1, steps + 1):
        fk = f(u)
        if fk > best:
            best, best_u = fk, u
        if k == steps:
            return best
        increases += fk > f_prev
        f_prev = fk
        if k in checkpoints:
            halve = increases < 0.75 * (k - last) or (eta == eta_last and best == best_last)
            eta_last, best_last = eta, best
            if halve:
                eta, u, prev = eta / 2, best_u, best_u
            increases, last = 0, k
        z = step(u, grad(u), eta)
        prev, u = u, proj(u + 0.75 * (z - u) + 0.25 * (u - prev))


def test_apgd_matches_an_explicit_reference_on_every_problem_of_a_stack():
    g, H, value_and_grad, value, zeros = quadratic_stack(seed=2)
    rho = 0.7
    for steps in (2, 3, 12, 25):
        _, apgd = ascend(value_and_grad, value, zeros, rho, 2.0, steps, "apgd")
        expected = [apgd_reference(g[i], H[i], rho, steps) for i in range(len(g))]
        np.testing.assert_allclose(apgd.numpy(), expected, rtol=1e-12, err_msg=str(steps))
    # the second iterate uses the momentum term: it differs from a plain projected step of 2 rho
    _, two = ascend(value_and_grad, value, zeros, rho, 2.0, 2, "apgd")
    _, one = ascend(value_and_grad, value, zeros, rho, 2.0, 1, "apgd")
    assert torch.any(two > one * (1 + 1e-6))


def test_apgd_checkpoints_follow_croce_and_hein():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]

    def reference(steps):  # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in exact decimals
        p = [0, 22]
        while p[-1] < 100:
            p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
        return sorted({-(-q * steps // 100) for q in p[1:]} - {0} - set(range(steps, 10 * steps)))

    for steps in (1, 5, 10, 37, 100, 1000):
        assert apgd_checkpoints(steps) == reference(steps), steps


# ------------------------------------------------------------------------- brute force and invariances
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("steps", [1, 2])
def test_per_chunk_values_match_a_brute_force_autograd_loop(m, steps):
    model = small_mlp()
    X, y = mlp_data()
    rho, seed = 0.1, 5
    params, loss = full_batch_loss(model, F.cross_entropy, X, y)
    expected = []
    for idx in partition(len(y), m, seed):
        u = {k: torch.zeros_like(v, requires_grad=True) for k, v in params.items()}
        base = loss({k: params[k] + u[k] for k in params}, idx)
        grads = torch.autograd.grad(base, list(u.values()))
        values = []
        for step in range(steps):
            norm = torch.sqrt(sum((gr**2).sum() for gr in grads))
            new = {k: (u[k] + rho * gr / norm).detach() for (k, gr) in zip(u, grads)}
            new_norm = flat_norm(new)
            u = {k: (t * min(1.0, rho / float(new_norm))).requires_grad_() for k, t in new.items()}
            value = loss({k: params[k] + u[k] for k in params}, idx)
            values.append(float(value.detach()))
            if step + 1 < steps:
                grads = torch.autograd.grad(value, list(u.values()))
        expected.append(max(values) - float(base.detach()))
    expected = np.asarray(expected)
    result = sharpness.m_sharpness(model, F.cross_entropy, (X, y), m=m, rho=rho, steps=steps, seed=seed, dtype=F64,
                                   progress=False)
    np.testing.assert_allclose(result.per_chunk, expected, rtol=1e-10, atol=1e-14)
    assert result.value == pytest.approx(expected.mean(), rel=1e-10)
    assert result.std_error == pytest.approx(expected.std(ddof=1) / math.sqrt(len(expected)), rel=1e-8)
    assert result.settings["n_chunks"] == len(y) // m
    assert result.settings["n_examples_used"] == (len(y) // m) * m and result.settings["n_examples"] == len(y)
    other = sharpness.m_sharpness(model, F.cross_entropy, (X, y), m=m, rho=rho, steps=steps, seed=seed + 1,
                                  dtype=F64, progress=False)
    if m == 1:  # every example is its own chunk whatever the seed: the same values, permuted
        np.testing.assert_allclose(np.sort(other.per_chunk), np.sort(result.per_chunk), rtol=1e-12)
    else:  # another partition: other chunks
        assert not np.allclose(np.sort(other.per_chunk), np.sort(result.per_chunk))


@pytest.mark.parametrize("p", [2.0, INF])
def test_m_equal_to_n_is_the_full_batch_sam_step_for_every_seed(p):
    model = small_mlp()
    X, y = mlp_data()
    rho = 0.05
    params, loss = full_batch_loss(model, F.cross_entropy, X, y)
    g = torch.func.grad(loss)(params)
    if p == INF:
        eps = {k: rho * t.sign() for k, t in g.items()}
    else:
        norm = flat_norm(g)
        eps = {k: rho * t / norm for k, t in g.items()}
    expected = float(loss({k: params[k] + eps[k] for k in params}) - loss(params))
    for seed in (0, 3, 11):
        result = sharpness.m_sharpness(model, F.cross_entropy, (X, y), m=len(y), rho=rho, p=p, seed=seed,
                                       dtype=F64, batch_size=10, progress=False)
        assert result.value == pytest.approx(expected, rel=1e-10), seed
        assert result.settings["n_chunks"] == 1 and result.std_error is None
    sub_batched = sharpness.m_sharpness(model, F.cross_entropy, (X, y), m=len(y), rho=rho, p=p,
                                        examples_per_call=16, dtype=F64, progress=False)
    assert sub_batched.settings["vectorised"] is False
    assert sub_batched.value == pytest.approx(expected, rel=1e-10)


VMAP_CASES = [(steps, adaptive, p, ascent) for steps in (1, 3) for adaptive in (False, True) for p in (2.0, INF)
              for ascent in ("pgd",)] + [(4, False, 2.0, "apgd"), (4, True, INF, "apgd")]


@pytest.fixture(scope="module")
def cnn_objective():
    return sharpness.sharpness_objective(small_cnn(), F.cross_entropy, cnn_data(n=26), dtype=F64)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_vmap_path_equals_the_python_loop(cnn_objective, m):
    for steps, adaptive, p, ascent in VMAP_CASES:
        kwargs = dict(m=m, rho=0.2, steps=steps, adaptive=adaptive, p=p, ascent=ascent, seed=4,
                      objective=cnn_objective, progress=False)
        batched = sharpness.m_sharpness(None, None, None, batched=True, **kwargs)
        looped = sharpness.m_sharpness(None, None, None, batched=False, **kwargs)
        assert batched.settings["vectorised"] and not looped.settings["vectorised"]
        assert len(batched.per_chunk) == 26 // m
        case = (steps, adaptive, p, ascent)
        assert np.all(batched.per_chunk > 0), case
        np.testing.assert_allclose(batched.per_chunk, looped.per_chunk, rtol=1e-6, atol=1e-12, err_msg=str(case))
        assert batched.value == pytest.approx(looped.value, rel=1e-6), case


def test_vmapped_m1_on_a_conv1d_network_equals_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 5, padding=2), nn.ReLU(), nn.Conv1d(4, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 7, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(20, 1, 16, generator=g, dtype=F64), torch.randint(0, 3, (20,), generator=g))
    for adaptive in (False, True):
        kwargs = dict(m=1, rho=0.1, adaptive=adaptive, progress=False, examples_per_call=8)
        batched = sharpness.m_sharpness(model, F.cross_entropy, data, **kwargs)
        looped = sharpness.m_sharpness(model, F.cross_entropy, data, batched=False, **kwargs)
        np.testing.assert_allclose(batched.per_chunk, looped.per_chunk, rtol=1e-10, atol=1e-14)


class ClassToken(nn.Module):
    """timm's ViT in small: a class token and a position embedding meet in ``cat([cls, x]) + pos``, so that
    vmap returns the class token's gradient as a slice of the position embedding's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(1, 3, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.fc(torch.tanh(h).mean(1))


@pytest.mark.parametrize("adaptive", [False, True])
def test_vmapped_gradients_sharing_memory_are_scaled_once(adaptive):
    g = torch.Generator().manual_seed(2)
    data = (torch.randn(6, 2, 4, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g))
    objective = sharpness.sharpness_objective(ClassToken(), F.cross_entropy, data, dtype=F64)
    at_origin = torch.vmap(torch.func.grad(objective.batch_loss), in_dims=(None, 0))
    grads = at_origin(objective.params, (data[0][:, None], data[1][:, None]))
    assert grads["cls"].untyped_storage().data_ptr() == grads["pos"].untyped_storage().data_ptr()  # the hazard
    kwargs = dict(m=1, rho=0.1, adaptive=adaptive, objective=objective, progress=False)
    batched = sharpness.m_sharpness(None, None, None, **kwargs)
    looped = sharpness.m_sharpness(None, None, None, batched=False, **kwargs)
    assert batched.settings["method"] == "vmap"
    np.testing.assert_allclose(batched.per_chunk, looped.per_chunk, rtol=1e-10, atol=1e-15)


class OutOfMemoryUnderVmap(nn.Module):
    """Runs out of memory when vmapped (as a large model on a GPU may), and works one chunk at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor(1.0))  # outside the per-layer rules: m = 1 goes to vmap too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch._C._functorch.is_batchedtensor(x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.fc(x) * self.scale


@pytest.mark.parametrize("m", [1, 2])
def test_running_out_of_memory_under_vmap_is_raised_not_turned_into_the_loop(m):
    data = (torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,)))
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        sharpness.m_sharpness(OutOfMemoryUnderVmap(), F.cross_entropy, data, m=m, rho=0.1, dtype=F64, progress=False)
    looped = sharpness.m_sharpness(OutOfMemoryUnderVmap(), F.cross_entropy, data, m=m, rho=0.1, dtype=F64,
                                   batched=False, progress=False)
    assert looped.settings["method"] == "loop" and looped.value > 0


@pytest.mark.parametrize("m, examples_per_call, chunks_per_call, vectorised", [
    (8, 3, 1, False),  # chunks larger than a call: one chunk at a time in sub-batches of 3, 3, 2
    (3, 10, 3, True),  # 8 chunks in groups of 3, 3, 2
    (1, 5, 5, True),
])
def test_examples_per_call_does_not_change_the_value(cnn_objective, m, examples_per_call, chunks_per_call, vectorised):
    for steps, p in ((1, 2.0), (3, INF)):
        kwargs = dict(m=m, rho=0.2, steps=steps, p=p, seed=4, objective=cnn_objective, progress=False)
        default = sharpness.m_sharpness(None, None, None, **kwargs)
        split = sharpness.m_sharpness(None, None, None, examples_per_call=examples_per_call, **kwargs)
        assert split.settings["chunks_per_call"] == chunks_per_call
        assert split.settings["vectorised"] is vectorised
        np.testing.assert_allclose(split.per_chunk, default.per_chunk, rtol=1e-9, atol=1e-14)


def test_rescaling_a_relu_layer_leaves_adaptive_sharpness_unchanged_but_not_plain_sharpness():
    model = relu_mlp()
    X, y = mlp_data(n=24)
    X = X.double()
    other = rescaled(model, 5.0)
    with torch.no_grad():
        torch.testing.assert_close(other(X), model(X), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(other[0].weight, model[0].weight)

    def both(fn, **kwargs):
        return [fn(net, F.cross_entropy, (X, y), dtype=F64, progress=False, **kwargs).value for net in (model, other)]

    for p, m, steps in itertools.product((2.0, INF), (4, None), (1, 3)):
        a, b = both(sharpness.adaptive_sharpness, rho=0.1, kind="worst", p=p, m=m, steps=steps, seed=2)
        assert a > 0 and b == pytest.approx(a, rel=1e-5), (p, m, steps)
    a, b = both(sharpness.adaptive_sharpness, rho=0.1, kind="average", n_samples=8)
    assert a != 0 and b == pytest.approx(a, rel=1e-5)
    a, b = both(sharpness.m_sharpness, m=4, rho=0.05, seed=2)
    assert abs(b - a) > 0.1 * abs(a), (a, b)
    a, b = both(sharpness.average_sharpness, rho=0.05, adaptive=False, n_samples=8)
    assert abs(b - a) > 0.1 * abs(a), (a, b)


def test_curve_equals_separate_calls_and_rejects_chunks_larger_than_the_data():
    model = small_mlp()
    X, y = mlp_data()
    curve = sharpness.m_sharpness_curve(model, F.cross_entropy, (X, y), ms=(1, 5, 41), rho=0.05, steps=2, seed=3,
                                        dtype=F64, progress=False)
    assert curve.m == [1, 5, 41]
    for m, value, std_error in zip(curve.m, curve.values, curve.std_errors):
        alone = sharpness.m_sharpness(model, F.cross_entropy, (X, y), m=m, rho=0.05, steps=2, seed=3, dtype=F64,
                                      progress=False)
        assert value == pytest.approx(alone.value, rel=1e-10)
        assert std_error == alone.std_error or std_error == pytest.approx(alone.std_error, rel=1e-8)
    # more examples per chunk: the worst case of an average is below the average of worst cases
    assert curve.values[0] > curve.values[1] > curve.values[2] > 0
    with pytest.raises(ValueError, match="m must be at most the number of examples \\(41\\)"):
        sharpness.m_sharpness_curve(model, F.cross_entropy, (X, y), ms=(4, 42), progress=False)
    with pytest.raises(ValueError, match="ms must list"):
        sharpness.m_sharpness_curve(model, F.cross_entropy, (X, y), ms=(), progress=False)


# --------------------------------------------------------------------------------- average sharpness
def noise_draw(model: nn.Module, seed: int) -> np.ndarray:
    """The documented draw: Generator(seed), randn float64 per parameter in named_parameters order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(p.shape, generator=generator, dtype=F64).flatten()
                      for _, p in model.named_parameters()]).numpy()


@pytest.mark.parametrize("adaptive", [True, False])
def test_average_sharpness_draws_are_the_documented_gaussian_draws(adaptive):
    model, X, y = linear_problem(n=12)
    theta = theta_of(model)
    _, g, H = chunk_quadratic(theta, X, y, list(range(12)))
    c = np.abs(theta) + 0.2 if adaptive else np.ones_like(theta)
    rho, seed = 0.3, 7
    result = sharpness.average_sharpness(model, squared_error, (X, y), rho, adaptive=adaptive, eta=0.2, n_samples=6,
                                         seed=seed, dtype=F64, progress=False)
    expected = []
    for j in range(6):
        e = rho * c * noise_draw(model, seed + j)
        expected.append(g @ e + e @ H @ e / 2)
    expected = np.asarray(expected)
    np.testing.assert_allclose(result.per_chunk, expected, rtol=1e-10)
    assert result.value == pytest.approx(expected.mean(), rel=1e-10)
    assert result.std_error == pytest.approx(expected.std(ddof=1) / math.sqrt(6), rel=1e-10)
    assert result.settings["loss"] == pytest.approx(chunk_quadratic(theta, X, y, list(range(12)))[0], rel=1e-12)
    shifted = sharpness.average_sharpness(model, squared_error, (X, y), rho, adaptive=adaptive, eta=0.2, n_samples=6,
                                          seed=seed + 1, dtype=F64, progress=False)
    np.testing.assert_allclose(shifted.per_chunk[:-1], result.per_chunk[1:], rtol=1e-12)  # draw j uses seed + j
    assert shifted.per_chunk[-1] != result.per_chunk[0]


@pytest.mark.parametrize("noise, p, factor", [("gaussian", 2.0, 1.0), ("uniform", INF, 1 / 3), ("uniform", 2.0, 1 / 6)])
def test_average_sharpness_expectation_matches_rho2_trace_over_2(noise, p, factor):
    """E[g.e + e^T H e / 2] with e = rho c z and E[z z^T] = factor I: rho^2/2 factor tr(C H C); factor is
    1 (Gaussian), 1/3 (uniform in the box), 1/(n + 2) = 1/6 (uniform in the l2 ball of R^4)."""
    model, X, y = linear_problem(n=12)
    phi = np.concatenate([X.numpy(), np.ones((12, 1))], axis=1)
    # near the least-squares minimum, so the linear term's spread does not drown the curvature term
    set_theta(model, np.linalg.lstsq(phi, y.numpy(), rcond=None)[0] + 0.05 * np.array([1.0, -1.0, 1.0, 1.0]))
    theta = theta_of(model)
    _, _, H = chunk_quadratic(theta, X, y, list(range(12)))
    c = np.abs(theta)
    rho = 0.2
    expected = rho**2 / 2 * factor * float(np.trace(c[:, None] * H * c[None, :]))
    result = sharpness.average_sharpness(model, squared_error, (X, y), rho, noise=noise, p=p, n_samples=2000,
                                         seed=0, dtype=F64, progress=False)
    assert result.std_error == pytest.approx(result.per_chunk.std(ddof=1) / math.sqrt(2000), rel=1e-12)
    assert abs(result.value - expected) <= 4 * result.std_error, (result.value, expected, result.std_error)
    assert result.std_error < 0.05 * expected  # tight enough to tell 1, 1/3 and 1/6 apart


class Offset(nn.Module):
    """``f(x; w) = w`` broadcast; with the losses below, L(w) is a norm of ``w - w0``."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], -1)


@pytest.mark.parametrize("noise, p", [("uniform", INF), ("uniform", 2.0), ("gaussian", 2.0)])
def test_uniform_noise_lies_in_the_ball(noise, p):
    """With L(w) = ||w - w0||_p, each draw's increase is rho ||z||_p: at most rho for uniform noise in the
    unit p-ball, with E||z|| = n / (n + 1) (both for the l2 ball and the box's l-infinity norm)."""
    n = 3
    w0 = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    data = (torch.zeros(4, 1, dtype=F64), w0.expand(4, -1).clone())

    def norm_loss(out, target):
        diff = out - target
        return (diff.abs().amax(-1) if p == INF else diff.norm(dim=-1)).mean()

    rho = 0.1
    result = sharpness.average_sharpness(Offset(w0), norm_loss, data, rho, noise=noise, p=p, adaptive=False,
                                         n_samples=400, seed=0, dtype=F64, progress=False)
    radii = result.per_chunk / rho
    assert result.settings["loss"] == 0.0
    if noise == "uniform":
        assert radii.max() <= 1 + 1e-12 and radii.min() > 0
        assert abs(radii.mean() - n / (n + 1)) <= 4 * radii.std(ddof=1) / math.sqrt(len(radii))
    else:
        assert radii.max() > 1.5  # Gaussian noise is not confined to the ball
    again = sharpness.average_sharpness(Offset(w0), norm_loss, data, rho, noise=noise, p=p, adaptive=False,
                                        n_samples=400, seed=0, dtype=F64, progress=False)
    np.testing.assert_array_equal(again.per_chunk, result.per_chunk)


# ----------------------------------------------------------------------------------------- Keskar
def test_keskar_sharpness_of_a_linear_loss_is_the_box_corner():
    """L(theta) = a.theta + 2: the box maximum is sum_i |a_i| eps (|theta_i| + 1)."""
    model, X, y = linear_problem(n=12)

    def linear_loss(out, target):
        return (out.squeeze(-1) * target).mean() + 2.0

    theta = theta_of(model)
    phi = np.concatenate([X.numpy(), np.ones((12, 1))], axis=1)
    a = (y.numpy()[:, None] * phi).mean(0)
    loss = a @ theta + 2.0
    for epsilon in (1e-3, 0.05):
        expected = 100 * np.sum(np.abs(a) * epsilon * (np.abs(theta) + 1)) / (1 + loss)
        for ascent, steps in (("apgd", 10), ("pgd", 1)):
            result = sharpness.keskar_sharpness(model, linear_loss, (X, y), epsilon, steps, ascent=ascent, dtype=F64,
                                                progress=False)
            assert result.value == pytest.approx(expected, rel=1e-10), (epsilon, ascent)
            assert result.settings["loss"] == pytest.approx(loss, rel=1e-12)
            assert result.measure == "keskar" and result.std_error is None


def test_keskar_sharpness_of_a_quadratic_is_below_the_best_vertex():
    model, X, y = linear_problem(n=12)
    theta = theta_of(model)
    loss, g, H = chunk_quadratic(theta, X, y, list(range(12)))
    epsilon = 0.5
    widths = epsilon * (np.abs(theta) + 1)
    best = 100 * box_maximum(g, H, widths) / (1 + loss)
    sign_step = 100 * one_step_closed_form(g, H, epsilon, INF, np.abs(theta) + 1) / (1 + loss)
    one = sharpness.keskar_sharpness(model, squared_error, (X, y), epsilon, 1, ascent="pgd", dtype=F64, progress=False)
    many = sharpness.keskar_sharpness(model, squared_error, (X, y), epsilon, 20, dtype=F64, progress=False)
    assert one.value == pytest.approx(sign_step, rel=1e-10)
    assert sign_step <= many.value <= best * (1 + 1e-12)
    assert many.value == pytest.approx(best, rel=1e-3)


# ------------------------------------------------------------------------------------ PAC-Bayes
def confident_problem():
    """small_mlp in float64 on labels it predicts itself: accuracy 1."""
    model = small_mlp().double()
    X, _ = mlp_data()
    X = X.double()
    with torch.no_grad():
        y = model(X).argmax(1)
    return model, X, y


def perturbed_accuracy(model, X, y, sigma, n_samples, seed, magnitude_aware=False, epsilon=1e-3) -> float:
    params = {k: v.detach() for k, v in model.named_parameters()}
    accs = []
    for j in range(n_samples):
        generator = torch.Generator().manual_seed(seed + j)
        noisy = {}
        for k, w in params.items():
            z = torch.randn(w.shape, generator=generator, dtype=F64)
            scale = torch.sqrt(sigma**2 * w**2 + epsilon**2) if magnitude_aware else sigma
            noisy[k] = w + scale * z
        with torch.no_grad():
            accs.append(float((functional_call(model, noisy, (X,)).argmax(1) == y).double().mean()))
    return float(np.mean(accs))


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_pac_bayes_sigma_is_the_edge_of_the_accuracy_drop(magnitude_aware):
    model, X, y = confident_problem()
    lo, hi, iterations, n_samples, seed, drop = 1e-4, 10.0, 16, 6, 3, 0.1
    result = sharpness.pac_bayes_flatness(model, F.cross_entropy, (X, y), accuracy_drop=drop,
                                          magnitude_aware=magnitude_aware, n_samples=n_samples, sigma_range=(lo, hi),
                                          iterations=iterations, seed=seed, dtype=F64, progress=False)
    sigma = result.settings["sigma"]
    assert result.settings["bracketed"] is True and result.settings["accuracy"] == 1.0
    assert result.value == pytest.approx(1 / sigma**2, rel=1e-12)
    at = perturbed_accuracy(model, X, y, sigma, n_samples, seed, magnitude_aware)
    assert at == pytest.approx(result.settings["perturbed_accuracy"], abs=1e-12)
    assert at >= 1.0 - drop
    upper = sigma * (hi / lo) ** (1 / 2**iterations)  # the other end of the last bisection bracket
    assert perturbed_accuracy(model, X, y, upper, n_samples, seed, magnitude_aware) < 1.0 - drop
    assert perturbed_accuracy(model, X, y, 1.1 * sigma, n_samples, seed, magnitude_aware) < 1.0 - drop
    assert lo < sigma < hi


def test_pac_bayes_unbracketed_returns_the_upper_bound():
    model, X, y = confident_problem()
    result = sharpness.pac_bayes_flatness(model, F.cross_entropy, (X, y), sigma_range=(1e-9, 1e-7), iterations=3,
                                          dtype=F64, progress=False)
    assert result.settings["bracketed"] is False
    assert result.settings["sigma"] == 1e-7 and result.value == pytest.approx(1e14, rel=1e-12)
    assert result.settings["perturbed_accuracy"] == 1.0


# ------------------------------------------------------------------------- the user's model, errors, JSON
def test_the_users_model_is_unchanged_by_every_measure():
    model = small_cnn().train()
    model[1].eval()  # mixed flags must come back as they were
    before = state_of(model)
    data = cnn_data(n=12)
    common = dict(dtype=F64, progress=False)
    sharpness.m_sharpness(model, F.cross_entropy, data, m=4, rho=0.05, steps=2, **common)
    assert_unchanged(model, before)
    sharpness.m_sharpness(model, F.cross_entropy, data, m=3, rho=0.05, steps=2, batched=False, **common)
    sharpness.m_sharpness_curve(model, F.cross_entropy, data, ms=(1, 12), rho=0.05, **common)
    sharpness.adaptive_sharpness(model, F.cross_entropy, data, 0.05, p=INF, steps=2, ascent="apgd", **common)
    sharpness.adaptive_sharpness(model, F.cross_entropy, data, 0.05, kind="average", n_samples=2, **common)
    sharpness.average_sharpness(model, F.cross_entropy, data, 0.05, noise="uniform", n_samples=2, **common)
    sharpness.keskar_sharpness(model, F.cross_entropy, data, 1e-3, 2, **common)
    sharpness.pac_bayes_flatness(model, F.cross_entropy, data, iterations=2, n_samples=2, **common)
    assert_unchanged(model, before)


ERRORS = [
    (sharpness.m_sharpness, dict(m=0, rho=0.1), ValueError, "m must be an integer >= 1"),
    (sharpness.m_sharpness, dict(m=2.5, rho=0.1), TypeError, "m must be an integer"),
    (sharpness.m_sharpness, dict(m=42, rho=0.1), ValueError, "m must be at most the number of examples \\(41\\)"),
    (sharpness.m_sharpness, dict(m=4, rho=0.0), ValueError, "rho must be a finite number > 0"),
    (sharpness.m_sharpness, dict(m=4, rho=-1.0), ValueError, "rho must be"),
    (sharpness.m_sharpness, dict(m=4, rho=math.nan), ValueError, "rho must be"),
    (sharpness.m_sharpness, dict(m=4, rho=0.1, p=3), ValueError, "p must be 2 or math.inf"),
    (sharpness.m_sharpness, dict(m=4, rho=0.1, p=1.0), ValueError, "p must be 2 or math.inf"),
    (sharpness.m_sharpness, dict(m=4, rho=0.1, ascent="foo"), ValueError, "unknown ascent 'foo'"),
    (sharpness.m_sharpness, dict(m=4, rho=0.1, steps=0), ValueError, "steps must be an integer >= 1"),
    (sharpness.m_sharpness, dict(m=4, rho=0.1, step_size=0.0), ValueError, "step_size must be"),
    (sharpness.m_sharpness, dict(m=4, rho=0.1, examples_per_call=0), ValueError, "examples_per_call must be"),
    (sharpness.average_sharpness, dict(rho=0.1, noise="foo"), ValueError, "unknown noise 'foo'"),
    (sharpness.average_sharpness, dict(rho=0.1, n_samples=0), ValueError, "n_samples must be"),
    (sharpness.average_sharpness, dict(rho=0.0), ValueError, "rho must be"),
    (sharpness.adaptive_sharpness, dict(rho=0.1, kind="foo"), ValueError, "unknown kind 'foo'"),
    (sharpness.adaptive_sharpness, dict(rho=0.1, p=3), ValueError, "p must be 2 or math.inf"),
    (sharpness.keskar_sharpness, dict(epsilon=0.0), ValueError, "epsilon must be"),
    (sharpness.keskar_sharpness, dict(steps=0), ValueError, "steps must be"),
    (sharpness.keskar_sharpness, dict(ascent="foo"), ValueError, "unknown ascent 'foo'"),
    (sharpness.pac_bayes_flatness, dict(accuracy_drop=1.5), ValueError, "accuracy_drop must be in"),
    (sharpness.pac_bayes_flatness, dict(sigma_range=(1.0, 0.5)), ValueError, "sigma_range must be"),
    (sharpness.pac_bayes_flatness, dict(iterations=0), ValueError, "iterations must be"),
]


@pytest.mark.parametrize("fn, kwargs, error, match", ERRORS, ids=[f"{e[0].__name__}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_arguments_are_named(fn, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(small_mlp(), F.cross_entropy, mlp_data(), progress=False, **kwargs)


def test_results_and_curves_serialise_to_json_with_their_settings():
    model = small_mlp()
    data = mlp_data(n=16)
    common = dict(dtype=F64, progress=False)
    result = sharpness.m_sharpness(model, F.cross_entropy, data, m=4, rho=0.05, steps=2, p=INF, **common)
    loaded = json.loads(json.dumps(result.to_dict()))
    assert loaded["measure"] == "m_sharpness" and loaded["value"] == result.value
    assert loaded["std_error"] == result.std_error
    assert {k: loaded[k] for k in ("rho", "m", "p", "steps", "ascent", "seed", "n_chunks", "adaptive")} == \
        {"rho": 0.05, "m": 4, "p": "inf", "steps": 2, "ascent": "pgd", "seed": 0, "n_chunks": 4, "adaptive": False}
    curve = sharpness.m_sharpness_curve(model, F.cross_entropy, data, ms=(2, 16), rho=0.05, **common)
    loaded = json.loads(json.dumps(curve.to_dict()))
    assert loaded["m"] == [2, 16] and loaded["n_chunks"] == [8, 1]
    assert loaded["value"] == curve.values and loaded["std_error"] == [curve.std_errors[0], None]
    assert loaded["rho"] == 0.05 and loaded["p"] == 2.0 and loaded["steps"] == 1
    others = [
        sharpness.adaptive_sharpness(model, F.cross_entropy, data, 0.1, eta=0.01, **common),
        sharpness.adaptive_sharpness(model, F.cross_entropy, data, 0.1, kind="average", n_samples=3, **common),
        sharpness.keskar_sharpness(model, F.cross_entropy, data, 1e-3, 2, **common),
        sharpness.pac_bayes_flatness(model, F.cross_entropy, data, iterations=2, n_samples=2, **common),
    ]
    for res, measure, keys in zip(others, ["adaptive_worst", "average", "keskar", "pac_bayes"],
                                  [("rho", "p", "m", "steps", "eta"), ("rho", "noise", "n_samples", "seed"),
                                   ("epsilon", "steps", "ascent", "loss", "max_loss"),
                                   ("sigma", "accuracy", "perturbed_accuracy", "bracketed")]):
        loaded = json.loads(json.dumps(res.to_dict()))
        assert loaded["measure"] == measure and loaded["value"] == res.value
        assert all(k in loaded for k in keys), (measure, keys)
    assert json.loads(json.dumps(others[0].to_dict()))["eta"] == 0.01
    assert json.loads(json.dumps(others[0].to_dict()))["m"] == 16


def test_curve_reports_the_chunks_per_call_of_every_m():
    model, data = small_cnn(), cnn_data(n=40)
    curve = sharpness.m_sharpness_curve(model, F.cross_entropy, data, ms=(2, 16), rho=0.05, examples_per_call=32,
                                        dtype=torch.float64, progress=False)
    saved = curve.to_dict()
    assert saved["m"] == [2, 16] and saved["n_chunks"] == [20, 2]
    assert saved["chunks_per_call"] == [16, 2] and saved["vectorised"] == [True, True]


def test_average_adaptive_sharpness_rejects_worst_case_settings():
    model, data = small_cnn(), cnn_data(n=40)
    with pytest.raises(ValueError, match=r"\['m', 'steps'\] apply to kind='worst' only"):
        sharpness.adaptive_sharpness(model, F.cross_entropy, data, 0.1, kind="average", m=4, steps=3, progress=False)
