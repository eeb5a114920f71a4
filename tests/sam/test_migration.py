"""Migrating from davda54/sam: our SAM is theirs step for step; their ASAM is ours with ``eta=0`` and
``adaptive_biases=True`` (the README's migration table).

The reference below is davda54/sam's update written out from its formula (``first_step``:
``e_w = T^2 g rho / (||T g||_2 + 1e-12)`` with ``T = |w|`` on every tensor when adaptive, else 1; then the
base step with the gradient at ``w + e_w`` taken from ``w``), not our code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sam import SAM

F64 = torch.float64


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.LayerNorm(7),
                               torch.nn.Linear(7, 3)).to(F64)


def _batches(n: int = 5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _davda54_steps(model, batches, rho: float, adaptive: bool) -> None:
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    params = list(model.parameters())
    for x, y in batches:
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            scales = [w.abs() if adaptive else torch.ones_like(w) for w in params]
            norm = torch.stack([(t * w.grad).norm(2) for t, w in zip(scales, params)]).norm(2)
            moves = [t.pow(2) * w.grad * (rho / (norm + 1e-12)) for t, w in zip(scales, params)]
            for w, e in zip(params, moves):
                w.add_(e)
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for w, e in zip(params, moves):
                w.sub_(e)
        base.step()


def _our_steps(model, batches, **sam_options) -> None:
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), **sam_options)
    for x, y in batches:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)


def _max_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_sam_matches_davda54_step_for_step(rho):
    theirs, ours = _net(), _net()
    _davda54_steps(theirs, _batches(), rho=rho, adaptive=False)
    _our_steps(ours, _batches(), rho=rho)
    assert _max_gap(theirs, ours) < 1e-12
    assert _max_gap(ours, _net()) > 1e-2  # the weights did move


def test_davda54_asam_is_ours_with_eta_zero_and_biases_scaled():
    theirs, ours, default = _net(), _net(), _net()
    _davda54_steps(theirs, _batches(), rho=1.0, adaptive=True)
    _our_steps(ours, _batches(), rho=1.0, adaptive=True, eta=0.0, adaptive_biases=True)
    _our_steps(default, _batches(), rho=1.0, adaptive=True)
    assert _max_gap(theirs, ours) < 1e-10  # float64 rounding over five steps at rho = 1
    # our default (T = |w| + 0.01 on weight matrices only, Kwon et al. Eq. 9) is a different ball
    assert _max_gap(theirs, default) > 1e-4


def test_the_gap_comes_from_the_biases_and_eta_alone():
    reference = _net()
    _davda54_steps(reference, _batches(), rho=1.0, adaptive=True)
    for options in ({"eta": 0.0}, {"adaptive_biases": True}):
        model = _net()
        _our_steps(model, _batches(), rho=1.0, adaptive=True, **options)
        assert _max_gap(reference, model) > 1e-6, options
