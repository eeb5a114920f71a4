"""Tests for the SAM family in sam.optim, driven through ``opt.step(closure)`` and ``sam.step.train_step``.

Every "Must hold" item of SPEC section 1 is checked for every optimizer registered in
``sam.optim.OPTIMIZERS``. References are independent: closed forms, float64 hand computations with
``torch.autograd.grad`` on a copy of the model, or a plain ``torch.optim`` run.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sam.optim import (
    ASAM,
    BASE_OPTIMIZERS,
    GSAM,
    MSAM,
    OPTIMIZERS,
    SAM,
    EveryKSAM,
    MultiStepSAM,
    available_optimizers,
    create,
    frozen_running_stats,
)
from sam.perturbation import sam_perturbation
from sam.step import train_step

F64 = torch.float64
BATCH = 16
NAMES = sorted(OPTIMIZERS)

# Small-but-meaningful settings per registered wrapper: m-SAM splits a batch of 16 into 4 chunks,
# multi-step takes 2 ascent steps, every-k alternates SAM and plain steps.
WRAPPER_KWARGS: dict[str, dict] = {
    "sam": {},
    "asam": {},
    "msam": {"m": 4},
    "gsam": {"alpha": 0.4},
    "multistep_sam": {"steps": 2},
    "every_k_sam": {"k": 2},
}
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 1e-2}),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def build(
    name: str,
    params,
    *,
    rho: float = 0.05,
    base: str = "sgd",
    base_kwargs: dict | None = None,
    **overrides,
) -> SAM:
    cls, kwargs = BASES[base]
    kwargs = dict(kwargs if base_kwargs is None else base_kwargs)
    return OPTIMIZERS[name](cls(params, **kwargs), **{**WRAPPER_KWARGS[name], "rho": rho, **overrides})


def mlp_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


def conv_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).double()


def mlp(seed: int = 0) -> nn.Module:
    """No BatchNorm: the forward is a pure function of the weights (chunk-wise = batch-wise)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


MODELS: dict[str, tuple[Callable[[int], nn.Module], tuple[int, ...]]] = {
    "mlp_bn": (mlp_bn, (5,)),
    "conv_bn": (conv_bn, (2, 5, 5)),
    "mlp": (mlp, (5,)),
}


def make(kind: str, seed: int = 0) -> nn.Module:
    return MODELS[kind][0](seed)


def data(kind: str, seed: int = 1, batch: int = BATCH) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(batch, *MODELS[kind][1], generator=gen, dtype=F64)
    y = torch.randint(0, 3, (batch,), generator=gen)
    return x, y


def closure_step(
    opt: SAM,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    scaler: torch.amp.GradScaler | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    log: list | None = None,
) -> Tensor:
    """``opt.step(closure)``; BatchNorm statistics frozen while perturbed (and on m-SAM chunks after the first)."""

    def backward(loss: Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if isinstance(opt, MSAM):

        def chunk_closure(chunk: slice) -> Tensor:
            if log is not None:
                log.append((chunk, opt.is_perturbed, torch.is_grad_enabled()))
            opt.zero_grad()
            with frozen_running_stats(model, enabled=opt.is_perturbed or chunk.start > 0):
                loss = loss_fn(model(x[chunk]), y[chunk])
            backward(loss)
            return loss

        return opt.step(chunk_closure, batch_size=x.shape[0], grad_scaler=scaler)

    def closure() -> Tensor:
        if log is not None:
            log.append((slice(None), opt.is_perturbed, torch.is_grad_enabled()))
        opt.zero_grad()
        with frozen_running_stats(model, enabled=opt.is_perturbed):
            loss = loss_fn(model(x), y)
        backward(loss)
        return loss

    return opt.step(closure, grad_scaler=scaler)


def ts_step(opt, model, x, y, *, scaler=None, loss_fn=F.cross_entropy, **kwargs):
    return train_step(model, opt, loss_fn, x, y, grad_scaler=scaler, **kwargs)


def manual_step(opt: SAM, model: nn.Module, x: Tensor, y: Tensor) -> None:
    """A hand-written loop: backward, first_step, backward, (end_chunk), second_step."""
    chunks = opt.chunks(x.shape[0]) if isinstance(opt, MSAM) else [slice(0, x.shape[0])]
    steps = opt.ascent_steps
    opt.zero_grad()
    for i, chunk in enumerate(chunks):
        with frozen_running_stats(model, enabled=i > 0):
            F.cross_entropy(model(x[chunk]), y[chunk]).backward()
        for _ in range(steps):
            opt.first_step(zero_grad=True)
            with frozen_running_stats(model):
                F.cross_entropy(model(x[chunk]), y[chunk]).backward()
        if isinstance(opt, MSAM):
            opt.end_chunk((chunk.stop - chunk.start) / x.shape[0])
    opt.second_step(zero_grad=True)


def base_step(opt: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor) -> None:
    """The plain torch.optim step that rho = 0 must reproduce."""
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


DRIVERS = {"closure": closure_step, "train_step": ts_step}


def snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1).to(F64) for t in tensors])


class PassRecorder:
    """Records the parameters at every forward of ``model`` (pass 1 at w, ascent passes at w + eps)."""

    def __init__(self, model: nn.Module) -> None:
        self.snaps: list[list[Tensor]] = []
        self._h = model.register_forward_pre_hook(lambda m, args: self.snaps.append(snapshot(m)))

    def clear(self) -> None:
        self.snaps.clear()

    def remove(self) -> None:
        self._h.remove()


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def expected_forwards(opt: SAM) -> int:
    """Forward-backward passes of the next step: (1 + ascent steps) per chunk."""
    n_chunks = len(opt.chunks(BATCH)) if isinstance(opt, MSAM) else 1
    return n_chunks * (1 + opt.ascent_steps)


def test_every_registered_optimizer_has_test_settings() -> None:
    assert set(WRAPPER_KWARGS) == set(OPTIMIZERS)
    assert available_optimizers() == sorted({*OPTIMIZERS, *BASE_OPTIMIZERS})
    for name, cls in OPTIMIZERS.items():
        assert issubclass(cls, SAM), name


# --------------------------------------------------------------------------- #
# 1. rho = 0 is exactly the base optimizer
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("kind", ["mlp_bn", "conv_bn"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("name", NAMES)
def test_rho_zero_is_bitwise_the_base_optimizer(name: str, base: str, kind: str, driver: str) -> None:
    model = make(kind)
    ref = copy.deepcopy(model)
    init = snapshot(model)
    over = {"m": BATCH} if name == "msam" else {}  # m >= batch: one chunk, bitwise
    opt = build(name, model.parameters(), rho=0.0, base=base, **over)
    cls, kwargs = BASES[base]
    ref_opt = cls(ref.parameters(), **kwargs)
    for step in range(5):
        x, y = data(kind, seed=step)
        DRIVERS[driver](opt, model, x, y)
        base_step(ref_opt, ref, x, y)
    assert_same_model(model, ref)  # parameters and BatchNorm running statistics
    assert not all(torch.equal(a, b) for a, b in zip(init, model.parameters()))


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("base", sorted(BASES))
def test_rho_zero_msam_with_chunks_matches_base_to_rounding(base: str, driver: str) -> None:
    # Chunk gradients weighted by chunk size sum to the batch gradient up to rounding. (With BatchNorm,
    # chunks are normalised with their own statistics, so m < batch is a different objective.)
    model = make("mlp")
    ref = copy.deepcopy(model)
    opt = build("msam", model.parameters(), rho=0.0, base=base, m=5)  # chunks 5, 5, 5, 1
    cls, kwargs = BASES[base]
    ref_opt = cls(ref.parameters(), **kwargs)
    for step in range(5):
        x, y = data("mlp", seed=step)
        DRIVERS[driver](opt, model, x, y)
        base_step(ref_opt, ref, x, y)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- #
# 2. parameters restored bit for bit after pass 1
# --------------------------------------------------------------------------- #
def mixed_linear(dtype: torch.dtype) -> nn.Module:
    """Weights of magnitudes 1e-8 and 1e3, where (w + eps) - eps != w in floating point."""
    lin = nn.Linear(6, 3).to(dtype)
    mags = torch.tensor([1e-8, 1e3, 0.7, -1e-8, -1e3, 3e-8], dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([mags, -mags.flip(0), mags * 0.5]))
        lin.bias.copy_(torch.tensor([1e-8, -1e3, 0.7], dtype=dtype))
    return lin


def _restore_data(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, 6, generator=gen).to(dtype), torch.randint(0, 3, (BATCH,), generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_mixed_magnitudes_make_naive_restore_inexact(dtype: torch.dtype) -> None:
    """Precondition for the restore tests: subtracting eps again would not give w back."""
    model = mixed_linear(dtype)
    x, y = _restore_data(dtype)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    eps = sam_perturbation(grads, 0.05)
    mismatch = sum(int(((w + e) - e != w).sum()) for w, e in zip(model.parameters(), eps))
    assert mismatch > 0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", NAMES)
def test_restore_is_bitwise_after_first_step(name: str, dtype: torch.dtype) -> None:
    model = mixed_linear(dtype)
    x, y = _restore_data(dtype)
    opt = build(name, model.parameters())
    w0 = snapshot(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert not opt.is_perturbed
    for _ in range(opt.ascent_steps):
        assert opt.first_step(zero_grad=True) is True
        assert opt.is_perturbed
        assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
        F.cross_entropy(model(x), y).backward()
    opt.restore()
    assert not opt.is_perturbed
    for a, b in zip(w0, model.parameters()):
        assert torch.equal(a, b)
    opt.restore()  # idempotent
    for a, b in zip(w0, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", NAMES)
def test_second_step_with_zero_lr_leaves_weights_bitwise(name: str, dtype: torch.dtype, driver: str) -> None:
    model = mixed_linear(dtype)
    x, y = _restore_data(dtype)
    opt = build(name, model.parameters(), base_kwargs={"lr": 0.0})
    w0 = snapshot(model)
    rec = PassRecorder(model)
    perturbed_passes = 0
    for _ in range(3):
        rec.clear()
        DRIVERS[driver](opt, model, x, y)
        perturbed_passes += sum(not all(torch.equal(a, b) for a, b in zip(w0, s)) for s in rec.snaps)
        for a, b in zip(w0, model.parameters()):
            assert torch.equal(a, b)
    assert perturbed_passes > 0


# --------------------------------------------------------------------------- #
# 3. parameters without a gradient are skipped
# --------------------------------------------------------------------------- #
class WithDeadParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.frozen = nn.Linear(5, 3)
        self.frozen.requires_grad_(False)
        self.unused = nn.Parameter(torch.randn(4))
        self.branch = nn.Parameter(torch.randn(3))
        self.use_branch = True

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x) + self.frozen(x)
        return out + self.branch if self.use_branch else out


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("name", NAMES)
def test_params_without_grad_are_never_perturbed_changed_or_restored_stale(name, base, driver) -> None:
    model = WithDeadParams().double()
    opt = build(name, model.parameters(), base=base)
    rec = PassRecorder(model)
    names = [n for n, _ in model.named_parameters()]
    idx = {n: names.index(n) for n in ("frozen.weight", "frozen.bias", "unused", "branch")}

    def check(values: dict[str, Tensor], step_seed: int, *, branch_has_grad: bool) -> None:
        rec.clear()
        x, y = data("mlp_bn", seed=step_seed)
        n_passes = expected_forwards(opt)
        DRIVERS[driver](opt, model, x, y)
        assert len(rec.snaps) == n_passes
        for snap in rec.snaps:  # never perturbed, in any pass
            for n in ("frozen.weight", "frozen.bias", "unused"):
                assert torch.equal(snap[idx[n]], values[n]), n
            if not branch_has_grad:
                assert torch.equal(snap[idx["branch"]], values["branch"])
        for n in ("frozen.weight", "frozen.bias", "unused"):
            assert torch.equal(dict(model.named_parameters())[n], values[n]), n
        moved = not torch.equal(model.branch, values["branch"])
        assert moved == branch_has_grad

    for step in range(2):  # every_k: a SAM step and a plain step
        values = {n: p.detach().clone() for n, p in model.named_parameters()}
        check(values, step, branch_has_grad=True)
    # Change the skipped parameters by hand; stop using `branch` (it had a gradient until now).
    with torch.no_grad():
        model.unused.fill_(7.0)
        model.frozen.weight.mul_(2.0)
        model.branch.copy_(torch.tensor([1.5, -2.5, 3.5]))
    model.use_branch = False
    for step in range(2, 4):
        values = {n: p.detach().clone() for n, p in model.named_parameters()}
        check(values, step, branch_has_grad=False)
    assert torch.equal(model.branch, torch.tensor([1.5, -2.5, 3.5], dtype=F64))
    assert (model.unused == 7.0).all()
    for n in ("frozen.weight", "frozen.bias", "unused"):
        assert model.get_parameter(n) not in opt.state


# --------------------------------------------------------------------------- #
# 4. BatchNorm running statistics are updated once per step, in pass 1
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("kind", ["mlp_bn", "conv_bn"])
@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_statistics_updated_once_per_step_at_w(name: str, kind: str, driver: str) -> None:
    model = make(kind)
    opt = build(name, model.parameters())
    rec = PassRecorder(model)
    for step in range(3):
        x, y = data(kind, seed=step)
        first = x[: opt.m] if isinstance(opt, MSAM) else x  # m-SAM: statistics from the first chunk
        ref = copy.deepcopy(model)
        with torch.no_grad():
            ref(first)  # one train-mode forward at w
        counts = [bn.num_batches_tracked.clone() for bn in batchnorms(model)]
        n_passes = expected_forwards(opt)
        rec.clear()
        DRIVERS[driver](opt, model, x, y)
        assert len(rec.snaps) == n_passes
        for bn, bn_ref, n0 in zip(batchnorms(model), batchnorms(ref), counts):
            assert bn.num_batches_tracked.item() == n0.item() + 1
            assert torch.equal(bn.running_mean, bn_ref.running_mean)
            assert torch.equal(bn.running_var, bn_ref.running_var)


# --------------------------------------------------------------------------- #
# 5. clipping applies to the final gradient only
# --------------------------------------------------------------------------- #
def _scales(opt: SAM, weights: list[Tensor]) -> list[Tensor | float]:
    """ASAM's T for each tensor (1 for plain tensors)."""
    group = opt.param_groups[0]
    if not group["adaptive"]:
        return [1.0] * len(weights)
    return [w.abs() + group["eta"] if (w.ndim > 1 or opt.adaptive_biases) else 1.0 for w in weights]


@pytest.mark.parametrize("name", NAMES)
def test_clipping_applies_to_final_gradient_only(name: str) -> None:
    rho, c = 0.05, 1e-2
    model = make("mlp_bn")
    opt = build(name, model.parameters(), rho=rho, base_kwargs={"lr": 0.1})
    rec = PassRecorder(model)
    final = []
    opt.base_optimizer.register_step_pre_hook(
        lambda o, args, kwargs: final.append(flat(p.grad for p in model.parameters() if p.grad is not None))
    )
    x, y = data("mlp_bn")
    result = ts_step(opt, model, x, y, max_grad_norm=c)
    assert result.grad_norm.item() > 10 * c  # the raw final gradient is much larger than c
    w = rec.snaps[0]
    scales = _scales(opt, w)
    norms = [
        torch.linalg.vector_norm(flat((s - a) / t for s, a, t in zip(snap, w, scales))).item()
        for snap in rec.snaps[1:]
    ]
    nonzero = [n for n in norms if n > 0]
    assert nonzero, "no pass ran at a perturbed point"
    # Every perturbation of a one-step variant, and the first of multi-step, has norm rho: the raw
    # gradient was used, not the clipped one (clipping first would not change a unit direction, but a
    # clipped-then-rescaled or unscaled gradient would still have to give norm rho).
    check = nonzero[:1] if isinstance(opt, MultiStepSAM) else nonzero
    for n in check:
        assert n == pytest.approx(rho, rel=1e-9)
    for n in nonzero:
        assert n <= rho * (1 + 1e-9)
    assert len(final) == 1
    assert torch.linalg.vector_norm(final[0]).item() <= c + 1e-6
    assert torch.linalg.vector_norm(final[0]).item() == pytest.approx(c, rel=1e-4)


def _grads_at(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(m.parameters(), params):
            p.copy_(v)
    loss = F.cross_entropy(m(x), y)
    return list(torch.autograd.grad(loss, list(m.parameters())))


@pytest.mark.parametrize("max_norm", [1e-2, 1e3])
def test_sam_clipped_update_matches_hand_computation(max_norm: float) -> None:
    rho, lr = 0.05, 0.1
    model = make("mlp_bn")
    hand_model = copy.deepcopy(model)
    x, y = data("mlp_bn")
    w = snapshot(model)
    g = _grads_at(model, w, x, y)
    gn = torch.linalg.vector_norm(flat(g))
    w_eps = [a + rho * b / gn for a, b in zip(w, g)]
    gp = _grads_at(model, w_eps, x, y)
    gpn = torch.linalg.vector_norm(flat(gp)).item()
    coef = min(1.0, max_norm / (gpn + 1e-6))
    want = [a - lr * coef * b for a, b in zip(w, gp)]

    opt = SAM(torch.optim.SGD(model.parameters(), lr=lr), rho=rho)
    result = ts_step(opt, model, x, y, max_grad_norm=max_norm)
    assert result.grad_norm.item() == pytest.approx(gpn, rel=1e-12)
    for a, b in zip(model.parameters(), want):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-14)

    # The same in a hand-written loop: restore, clip, second_step.
    opt2 = SAM(torch.optim.SGD(hand_model.parameters(), lr=lr), rho=rho)
    opt2.zero_grad()
    F.cross_entropy(hand_model(x), y).backward()
    opt2.first_step(zero_grad=True)
    with frozen_running_stats(hand_model):
        F.cross_entropy(hand_model(x), y).backward()
    opt2.restore()
    nn.utils.clip_grad_norm_(hand_model.parameters(), max_norm)
    opt2.second_step(zero_grad=True)
    assert_same_model(model, hand_model)


# --------------------------------------------------------------------------- #
# 6. AMP: inf/NaN in pass 1 skips the whole step
# --------------------------------------------------------------------------- #
def _inf_on_call(n: int) -> Callable[[Tensor, Tensor], Tensor]:
    calls = [0]

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        calls[0] += 1
        loss = F.cross_entropy(out, target)
        return loss * math.inf if calls[0] == n else loss

    return loss_fn


def _spy_first_step(opt: SAM, monkeypatch) -> list[bool]:
    returned: list[bool] = []
    original = opt.first_step

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        returned.append(out)
        return out

    monkeypatch.setattr(opt, "first_step", spy)
    return returned


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("name", NAMES)
def test_amp_overflow_in_pass1_skips_whole_step(name: str, driver: str, monkeypatch) -> None:
    model = make("mlp_bn")
    opt = build(name, model.parameters())  # SGD with momentum: a step would create momentum buffers
    scaler = torch.amp.GradScaler("cpu")
    returned = _spy_first_step(opt, monkeypatch)
    w0 = snapshot(model)
    x, y = data("mlp_bn")
    out = DRIVERS[driver](opt, model, x, y, scaler=scaler, loss_fn=_inf_on_call(1))
    assert returned == [False]
    if driver == "train_step":
        assert out.skipped is True
    for a, b in zip(w0, model.parameters()):
        assert torch.equal(a, b)
    assert not opt.is_perturbed
    assert len(opt.base_optimizer.state) == 0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    scale = scaler.get_scale()
    scaler.update()
    assert scaler.get_scale() == scale * scaler.get_backoff_factor()
    # The next, finite step runs normally.
    returned.clear()
    n_ascents = expected_forwards(opt) - expected_forwards(opt) // (1 + opt.ascent_steps)
    DRIVERS[driver](opt, model, x, y, scaler=scaler)
    assert returned == [True] * n_ascents
    assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(opt.base_optimizer.state) > 0


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("name", NAMES)
def test_amp_overflow_in_pass2_also_leaves_weights_untouched(name: str, driver: str) -> None:
    model = make("mlp_bn")
    opt = build(name, model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    w0 = snapshot(model)
    x, y = data("mlp_bn")
    DRIVERS[driver](opt, model, x, y, scaler=scaler, loss_fn=_inf_on_call(2))
    for a, b in zip(w0, model.parameters()):
        assert torch.equal(a, b)
    assert len(opt.base_optimizer.state) == 0
    scale = scaler.get_scale()
    scaler.update()
    assert scaler.get_scale() == scale * scaler.get_backoff_factor()


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("name", NAMES)
def test_amp_scaler_step_matches_unscaled_run(name: str, driver: str) -> None:
    model = make("mlp_bn")
    ref = copy.deepcopy(model)
    opt = build(name, model.parameters())
    ref_opt = build(name, ref.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        x, y = data("mlp_bn", seed=step)
        DRIVERS[driver](opt, model, x, y, scaler=scaler)
        scaler.update()
        DRIVERS[driver](ref_opt, ref, x, y)
    assert scaler.get_scale() == 2.0**10  # no overflow happened
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_amp_bf16_autocast_with_scaler_smoke() -> None:
    model = mlp_bn().float()
    opt = build("sam", model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    x, y = data("mlp_bn")
    w0 = snapshot(model)
    out = train_step(model, opt, F.cross_entropy, x.float(), y, grad_scaler=scaler, autocast_dtype=torch.bfloat16)
    scaler.update()
    assert not out.skipped and torch.isfinite(out.loss)
    assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


# --------------------------------------------------------------------------- #
# 7. state_dict round-trips
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("via_bytes", [False, True], ids=["dict", "torch.save"])
@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str, base: str, driver: str, via_bytes: bool) -> None:
    over = {"k": 3} if name == "every_k_sam" else {}  # 4 steps before saving: phase 1 of 3
    model = make("mlp_bn")
    opt = build(name, model.parameters(), base=base, **over)
    for step in range(4):
        DRIVERS[driver](opt, model, *data("mlp_bn", seed=step))
    # torch's state_dict() holds references to the live buffers: copy it, as a checkpoint would.
    opt_sd, model_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    assert "sam" in opt_sd and opt_sd["sam"]["step_count"] == 4
    if via_bytes:
        buf = io.BytesIO()
        torch.save({"opt": opt_sd, "model": model_sd}, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        opt_sd, model_sd = loaded["opt"], loaded["model"]

    model2 = make("mlp_bn", seed=123)
    model2.load_state_dict(model_sd)
    opt2 = build(name, model2.parameters(), base=base, **over)
    opt2.load_state_dict(opt_sd)
    assert opt2.step_count == opt.step_count == 4
    assert opt2.ascent_steps == opt.ascent_steps
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    for step in range(4, 7):
        x, y = data("mlp_bn", seed=step)
        DRIVERS[driver](opt, model, x, y)
        DRIVERS[driver](opt2, model2, x, y)
    assert_same_model(model, model2)
    assert opt2.step_count == opt.step_count == 7


def test_every_k_phase_matters_for_the_round_trip() -> None:
    """Control for the test above: without the saved step counter the runs would differ."""
    model = make("mlp_bn")
    opt = build("every_k_sam", model.parameters(), k=3)
    for step in range(4):
        closure_step(opt, model, *data("mlp_bn", seed=step))
    sd = opt.state_dict()
    sd.pop("sam")
    model2 = copy.deepcopy(model)
    opt2 = build("every_k_sam", model2.parameters(), k=3)
    opt2.load_state_dict(sd)
    assert opt2.step_count == 0
    x, y = data("mlp_bn", seed=4)
    closure_step(opt, model, x, y)
    closure_step(opt2, model2, x, y)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_loading_a_plain_base_optimizer_checkpoint() -> None:
    model = make("mlp_bn")
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    base_step(plain, model, *data("mlp_bn"))
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    opt.load_state_dict(plain.state_dict())
    closure_step(opt, model, *data("mlp_bn", seed=2))
    assert opt.param_groups[0]["rho"] == 0.05


# --------------------------------------------------------------------------- #
# 8. LR schedulers attach and step without warnings
# --------------------------------------------------------------------------- #
LR0, ETA_MIN, T_MAX = 0.1, 1e-3, 4
SCHEDULERS = {
    "cosine": (
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T_MAX, eta_min=ETA_MIN),
        lambda t: ETA_MIN + (LR0 - ETA_MIN) * (1 + math.cos(math.pi * t / T_MAX)) / 2,
    ),
    "step": (
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda t: LR0 * 0.5 ** (t // 2),
    ),
}


@pytest.mark.parametrize("attach", ["wrapper+closure", "base+train_step", "base+manual"])
@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_attaches_and_steps_without_warnings(name: str, sched: str, attach: str) -> None:
    make_sched, closed_form = SCHEDULERS[sched]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = make("mlp_bn")
        opt = build(name, model.parameters(), base_kwargs={"lr": LR0, "momentum": 0.9})
        assert opt.param_groups is opt.base_optimizer.param_groups
        target = opt if attach.startswith("wrapper") else opt.base_optimizer
        scheduler = make_sched(target)
        drive = {"wrapper+closure": closure_step, "base+train_step": ts_step, "base+manual": manual_step}[attach]
        lrs = []
        for epoch in range(6):
            x, y = data("mlp_bn", seed=epoch)
            lrs.append(opt.param_groups[0]["lr"])
            w = snapshot(model)
            drive(opt, model, x, y)
            assert not all(torch.equal(a, b) for a, b in zip(w, model.parameters()))
            scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([closed_form(t) for t in range(7)], rel=1e-12)
    assert opt.base_optimizer.param_groups[0]["lr"] == lrs[-1]
    assert scheduler.get_last_lr()[0] == pytest.approx(lrs[-1], rel=1e-12)


# --------------------------------------------------------------------------- #
# 9. step(closure) follows torch.optim conventions
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", NAMES)
def test_step_returns_first_loss_and_calls_closure_one_plus_ascent_times(name: str) -> None:
    model = make("mlp")
    opt = build(name, model.parameters())
    for step in range(4):
        x, y = data("mlp", seed=step)
        with torch.no_grad():
            loss_at_w = F.cross_entropy(model(x), y)
        ascent = opt.ascent_steps
        log: list = []
        losses: list[Tensor] = []

        def loss_fn(out: Tensor, target: Tensor) -> Tensor:
            loss = F.cross_entropy(out, target)
            losses.append(loss)
            return loss

        returned = closure_step(opt, model, x, y, log=log, loss_fn=loss_fn)
        n_chunks = len(opt.chunks(BATCH)) if isinstance(opt, MSAM) else 1
        assert len(log) == n_chunks * (1 + ascent)
        # Calls at w are not perturbed; each is followed by `ascent` perturbed calls.
        assert [perturbed for _, perturbed, _ in log] == ([False] + [True] * ascent) * n_chunks
        if isinstance(opt, MSAM):
            assert [c for c, _, _ in log[:: 1 + ascent]] == opt.chunks(BATCH)
            torch.testing.assert_close(returned, loss_at_w, rtol=1e-12, atol=0.0)
        else:
            assert returned is losses[0]
            assert torch.equal(returned.detach(), loss_at_w)


def test_every_k_closure_calls_follow_2_1_1() -> None:
    model = make("mlp_bn")
    opt = build("every_k_sam", model.parameters(), k=3)
    counts = []
    for step in range(6):
        log: list = []
        closure_step(opt, model, *data("mlp_bn", seed=step), log=log)
        counts.append(len(log))
    assert counts == [2, 1, 1, 2, 1, 1]
    # The same phase through train_step, counted as forward passes.
    model2 = make("mlp_bn")
    opt2 = build("every_k_sam", model2.parameters(), k=3)
    rec = PassRecorder(model2)
    counts2 = []
    for step in range(6):
        rec.clear()
        ts_step(opt2, model2, *data("mlp_bn", seed=step))
        counts2.append(len(rec.snaps))
    assert counts2 == [2, 1, 1, 2, 1, 1]
    assert_same_model(model, model2)


@pytest.mark.parametrize("name", NAMES)
def test_step_inside_no_grad_runs_closure_with_grad(name: str) -> None:
    model = make("mlp_bn")
    opt = build(name, model.parameters())
    w0 = snapshot(model)
    log: list = []
    with torch.no_grad():
        loss = closure_step(opt, model, *data("mlp_bn"), log=log)
    assert log and all(grad_enabled for _, _, grad_enabled in log)
    assert torch.isfinite(loss)
    assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_step_without_closure_raises_helpful_error(name: str) -> None:
    model = make("mlp")
    opt = build(name, model.parameters())
    w0 = snapshot(model)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    if name == "msam":
        with pytest.raises(RuntimeError, match="batch_size"):
            opt.step(lambda chunk: torch.zeros(()))
    for a, b in zip(w0, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_drivers_agree_bitwise(name: str) -> None:
    """step(closure), train_step and a hand-written loop are the same algorithm."""
    models = [make("conv_bn") for _ in range(3)]
    opts = [build(name, m.parameters()) for m in models]
    for step in range(3):
        x, y = data("conv_bn", seed=step)
        closure_step(opts[0], models[0], x, y)
        ts_step(opts[1], models[1], x, y)
        manual_step(opts[2], models[2], x, y)
    assert_same_model(models[0], models[1])
    assert_same_model(models[0], models[2])


# --------------------------------------------------------------------------- #
# 10. the in-place perturbation equals sam_perturbation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("sam", {"p": 2.0}),
        ("sam", {"p": math.inf}),
        ("sam", {"p": 3.0}),
        ("sam", {"adaptive": True, "rho": 0.5}),
        ("sam", {"adaptive": True, "rho": 0.5, "adaptive_biases": True}),
        ("sam", {"adaptive": True, "rho": 0.5, "p": math.inf}),
        ("asam", {"rho": 0.5}),
        ("asam", {"rho": 0.5, "eta": 0.1}),
    ],
)
def test_in_place_perturbation_equals_sam_perturbation(name: str, kwargs: dict) -> None:
    model = make("mlp_bn")
    opt = build(name, model.parameters(), **{"rho": 0.05, **kwargs})
    x, y = data("mlp_bn")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    w0 = snapshot(model)
    adaptive = opt.param_groups[0]["adaptive"]
    eta = opt.param_groups[0]["eta"]
    biases = kwargs.get("adaptive_biases", False)
    scales = [w.abs() + eta if adaptive and (w.ndim > 1 or biases) else None for w in w0]
    want = sam_perturbation(grads, opt.param_groups[0]["rho"], p=opt.p, scales=scales)
    opt.first_step()
    for w, p, e in zip(w0, model.parameters(), want):
        torch.testing.assert_close(p.detach() - w, e, rtol=1e-9, atol=1e-15)
    if adaptive and opt.p == 2.0:  # explicit closed form: eps = rho T^2 g / ||T g||_2, T = 1 on 1-D tensors
        t = [s if s is not None else torch.ones_like(w) for s, w in zip(scales, w0)]
        denom = torch.linalg.vector_norm(flat(a * b for a, b in zip(t, grads)))
        rho = opt.param_groups[0]["rho"]
        for w, p, a, g in zip(w0, model.parameters(), t, grads):
            torch.testing.assert_close(p.detach() - w, rho * a**2 * g / denom, rtol=1e-9, atol=1e-15)
    opt.restore()


# --------------------------------------------------------------------------- #
# 11. SAM on a quadratic
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("p", [2.0, math.inf])
def test_sam_step_on_quadratic_closed_form(p: float) -> None:
    torch.manual_seed(3)
    n, lr, rho = 6, 0.05, 0.3
    m = torch.randn(n, n, dtype=F64)
    a = m @ m.T + torch.eye(n, dtype=F64)
    w = nn.Parameter(torch.randn(n, dtype=F64))
    opt = SAM(torch.optim.SGD([w], lr=lr), rho=rho, p=p)
    for _ in range(3):
        w_old = w.detach().clone()
        g = a @ w_old
        eps = rho * g / torch.linalg.vector_norm(g) if p == 2.0 else rho * torch.sign(g)
        want = w_old - lr * a @ (w_old + eps)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = 0.5 * w @ a @ w
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert loss.item() == pytest.approx((0.5 * w_old @ a @ w_old).item(), rel=1e-14)
        torch.testing.assert_close(w.detach(), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- #
# 12. GSAM
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_gsam_final_gradient_closed_form(alpha: float) -> None:
    model = make("mlp")
    opt = GSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, alpha=alpha)
    x, y = data("mlp")
    seen: list[Tensor] = []

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seen.append(flat(p.grad for p in model.parameters()))
        return loss

    final = []
    opt.base_optimizer.register_step_pre_hook(lambda o, a, k: final.append(flat(p.grad for p in model.parameters())))
    opt.step(closure)
    g, g_p = seen
    g_perp = g - torch.dot(g, g_p) / torch.dot(g_p, g_p) * g_p
    want = g_p - alpha * g_perp
    torch.testing.assert_close(final[0], want, rtol=1e-10, atol=1e-12)
    assert abs(torch.dot(g_perp, g_p).item()) < 1e-12 * torch.dot(g, g).item()
    if alpha > 0:
        assert not torch.allclose(final[0], g_p, rtol=1e-6, atol=0)


@pytest.mark.parametrize("lr_min", [0.0, 0.01])
def test_gsam_rho_follows_lr_schedule(lr_min: float) -> None:
    rho, rho_min, lr_max = 0.1, 0.02, 0.2
    model = make("mlp")
    opt = GSAM(torch.optim.SGD(model.parameters(), lr=lr_max), rho=rho, rho_min=rho_min, lr_min=lr_min)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=lr_min)
    rec = PassRecorder(model)
    seen = []
    for step in range(5):
        group = opt.param_groups[0]
        lr = group["lr"]
        want = rho_min + (rho - rho_min) * (lr - lr_min) / (lr_max - lr_min)
        assert opt.rho_t(group) == pytest.approx(want, rel=1e-12)
        rec.clear()
        closure_step(opt, model, *data("mlp", seed=step))
        w, w_eps = rec.snaps
        assert torch.linalg.vector_norm(flat(a - b for a, b in zip(w_eps, w))).item() == pytest.approx(
            want, rel=1e-9
        )
        seen.append(want)
        sched.step()
    assert seen[0] == pytest.approx(rho) and seen[-1] == pytest.approx(rho_min)


def test_gsam_constant_rho_without_rho_min() -> None:
    model = make("mlp")
    opt = GSAM(torch.optim.SGD(model.parameters(), lr=0.2), rho=0.07)
    for lr in (0.2, 0.02, 0.0):
        opt.param_groups[0]["lr"] = lr
        assert opt.rho_t(opt.param_groups[0]) == 0.07


def test_gsam_add_param_group_with_rho_schedule() -> None:
    model = make("mlp")
    extra = nn.Parameter(torch.randn(3, dtype=F64))
    params = list(model.parameters())
    opt = GSAM(torch.optim.SGD(params[:2], lr=0.1), rho=0.1, rho_min=0.01)
    opt.add_param_group({"params": params[2:] + [extra]})
    x, y = data("mlp")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x) + extra, y)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.rho_t(opt.param_groups[1]) == pytest.approx(0.1)


# --------------------------------------------------------------------------- #
# 13. m-SAM
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("m", [BATCH, BATCH + 5])
def test_msam_with_m_at_least_batch_is_sam_bitwise(m: int, driver: str) -> None:
    model = make("conv_bn")
    ref = copy.deepcopy(model)
    opt = build("msam", model.parameters(), m=m)
    ref_opt = build("sam", ref.parameters())
    for step in range(3):
        x, y = data("conv_bn", seed=step)
        DRIVERS[driver](opt, model, x, y)
        DRIVERS[driver](ref_opt, ref, x, y)
    assert_same_model(model, ref)


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("m", [1, 4, 5])
def test_msam_matches_hand_written_chunk_loop(m: int, driver: str) -> None:
    rho, lr = 0.05, 0.1
    model = make("mlp")
    opt = MSAM(torch.optim.SGD(model.parameters(), lr=lr), rho=rho, m=m)
    w = snapshot(model)
    for step in range(2):
        x, y = data("mlp", seed=step)
        total = [torch.zeros_like(t) for t in w]
        for start in range(0, BATCH, m):
            xc, yc = x[start : start + m], y[start : start + m]
            g = _grads_at(model, w, xc, yc)
            gn = torch.linalg.vector_norm(flat(g))
            gp = _grads_at(model, [a + rho * b / gn for a, b in zip(w, g)], xc, yc)
            for t, b in zip(total, gp):
                t += (xc.shape[0] / BATCH) * b
        w = [a - lr * t for a, t in zip(w, total)]
        DRIVERS[driver](opt, model, x, y)
        for a, b in zip(model.parameters(), w):
            torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)
    # A genuinely different update from SAM on the whole batch.
    ref = make("mlp")
    ref_opt = SAM(torch.optim.SGD(ref.parameters(), lr=lr), rho=rho)
    for step in range(2):
        closure_step(ref_opt, ref, *data("mlp", seed=step))
    assert not all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(model.parameters(), ref.parameters()))


def test_msam_chunks() -> None:
    opt = build("msam", make("mlp").parameters(), m=5)
    assert opt.chunks(16) == [slice(0, 5), slice(5, 10), slice(10, 15), slice(15, 16)]
    assert opt.chunks(3) == [slice(0, 3)]
    with pytest.raises(ValueError, match="batch_size"):
        opt.chunks(0)


def test_msam_restore_before_end_chunk_raises() -> None:
    model = make("mlp")
    opt = build("msam", model.parameters(), m=4)
    x, y = data("mlp")
    for chunk in opt.chunks(BATCH)[:2]:
        F.cross_entropy(model(x[chunk]), y[chunk]).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x[chunk]), y[chunk]).backward()
        if chunk.start == 0:
            opt.end_chunk(0.25)
    with pytest.raises(RuntimeError, match="end_chunk"):
        opt.second_step()


# --------------------------------------------------------------------------- #
# 14. multi-step SAM
# --------------------------------------------------------------------------- #
def _multistep_one_vs_sam(driver: str, rtol: float) -> None:
    """steps=1 (projection of a point on the sphere: the identity) is SAM, perturbed points included."""
    model = make("conv_bn")
    ref = copy.deepcopy(model)
    opt = build("multistep_sam", model.parameters(), steps=1)
    ref_opt = build("sam", ref.parameters())
    rec, ref_rec = PassRecorder(model), PassRecorder(ref)
    for step in range(3):
        x, y = data("conv_bn", seed=step)
        DRIVERS[driver](opt, model, x, y)
        DRIVERS[driver](ref_opt, ref, x, y)
    assert len(rec.snaps) == len(ref_rec.snaps) == 6
    for snap, ref_snap in zip(rec.snaps, ref_rec.snaps):  # the perturbed points themselves
        for a, b in zip(snap, ref_snap):
            torch.testing.assert_close(a, b, rtol=rtol, atol=0.0)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_multistep_with_one_step_is_sam(driver: str) -> None:
    _multistep_one_vs_sam(driver, rtol=1e-12)


def test_multistep_three_steps_projected_ascent_matches_hand_computation() -> None:
    rho, lr = 0.2, 0.1
    model = make("mlp")
    opt = MultiStepSAM(torch.optim.SGD(model.parameters(), lr=lr), rho=rho, steps=3)
    x, y = data("mlp")
    w = snapshot(model)
    delta = [torch.zeros_like(t) for t in w]
    deltas = []
    for _ in range(3):
        g = _grads_at(model, [a + d for a, d in zip(w, delta)], x, y)
        gn = torch.linalg.vector_norm(flat(g))
        delta = [d + rho * b / gn for d, b in zip(delta, g)]
        dn = torch.linalg.vector_norm(flat(delta))
        delta = [d * min(1.0, rho / dn.item()) for d in delta]
        deltas.append(delta)
    g_final = _grads_at(model, [a + d for a, d in zip(w, delta)], x, y)
    want = [a - lr * b for a, b in zip(w, g_final)]

    rec = PassRecorder(model)
    log: list = []
    closure_step(opt, model, x, y, log=log)
    assert len(log) == 4
    assert len(rec.snaps) == 4
    for snap, d_hand in zip(rec.snaps[1:], deltas):
        d = [s - a for s, a in zip(snap, w)]
        assert torch.linalg.vector_norm(flat(d)).item() <= rho + 1e-12
        torch.testing.assert_close(flat(d), flat(d_hand), rtol=1e-9, atol=1e-13)
    # The ascent moves along the sphere: later perturbations differ from the first.
    assert not torch.allclose(flat(deltas[0]), flat(deltas[2]), rtol=1e-6)
    for a, b in zip(model.parameters(), want):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_multistep_perturbation_stays_in_ball(p: float) -> None:
    rho = 0.05
    model = make("mlp_bn")
    opt = build("multistep_sam", model.parameters(), rho=rho, steps=3, p=p, step_size=0.04)
    rec = PassRecorder(model)
    closure_step(opt, model, *data("mlp_bn"))
    w = rec.snaps[0]
    assert len(rec.snaps) == 4
    for snap in rec.snaps[1:]:
        d = flat(s - a for s, a in zip(snap, w))
        assert torch.linalg.vector_norm(d, p).item() <= rho * (1 + 1e-12)


# --------------------------------------------------------------------------- #
# 16. create()
# --------------------------------------------------------------------------- #
def test_create_splits_wrapper_and_base_kwargs() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = create("sam", model.parameters(), lr=0.1, momentum=0.9, rho=0.1)
    assert type(opt) is SAM
    assert type(opt.base_optimizer) is torch.optim.SGD
    assert all(g["rho"] == 0.1 and g["momentum"] == 0.9 and g["lr"] == 0.1 for g in opt.param_groups)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert len(opt.param_groups[0]["params"]) == 4

    opt = create("MSAM", model.parameters(), base="adamw", lr=1e-3, weight_decay=0.05, m=8, rho=0.2)
    assert type(opt) is MSAM and opt.m == 8
    assert type(opt.base_optimizer) is torch.optim.AdamW
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[0]["rho"] == 0.2

    opt = create("gsam", model.parameters(), lr=0.1, alpha=0.3, rho_min=0.01)
    assert type(opt) is GSAM and opt.alpha == 0.3 and opt.rho_min == 0.01
    opt = create("every_k_sam", model.parameters(), lr=0.1, k=5)
    assert type(opt) is EveryKSAM and opt.k == 5
    opt = create("asam", model.parameters(), lr=0.1)
    assert type(opt) is ASAM and opt.param_groups[0]["adaptive"] is True and opt.param_groups[0]["rho"] == 0.5


@pytest.mark.parametrize("name", NAMES)
def test_create_builds_every_registered_name(name: str) -> None:
    model = nn.Linear(3, 2)
    opt = create(name, model.parameters(), lr=0.1, rho=0.07, **WRAPPER_KWARGS[name])
    assert type(opt) is OPTIMIZERS[name]
    assert opt.param_groups[0]["rho"] == 0.07


@pytest.mark.parametrize("name", sorted(BASE_OPTIMIZERS))
def test_create_base_name_returns_plain_optimizer(name: str) -> None:
    opt = create(name, nn.Linear(3, 2).parameters(), lr=0.1)
    assert type(opt) is BASE_OPTIMIZERS[name]
    assert not isinstance(opt, SAM)


def test_create_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError) as err:
        create("lookahead", nn.Linear(3, 2).parameters(), lr=0.1)
    msg = str(err.value)
    assert "'lookahead'" in msg
    for name in available_optimizers():
        assert name in msg
    with pytest.raises(ValueError, match="base optimizer"):
        create("sam", nn.Linear(3, 2).parameters(), base="lion", lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": -1.0}, "rho"),
        ({"rho": math.nan}, "rho"),
        ({"rho": math.inf}, "rho"),
        ({"rho": True}, "rho"),
        ({"eta": -0.1}, "eta"),
        ({"p": 1}, "p must be > 1"),
        ({"p": 0.5}, "p must be > 1"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_bad_wrapper_arguments_raise(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(name, nn.Linear(3, 2).parameters(), **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("msam", {"m": 0}, "m must be"),
        ("msam", {"m": 2.0}, "m must be"),
        ("multistep_sam", {"steps": 0}, "steps"),
        ("multistep_sam", {"step_size": -1.0}, "step_size"),
        ("every_k_sam", {"k": 0}, "k must be"),
        ("gsam", {"alpha": -0.1}, "alpha"),
        ("gsam", {"rho_min": math.nan}, "rho_min"),
    ],
)
def test_bad_variant_arguments_raise(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create(name, nn.Linear(3, 2).parameters(), lr=0.1, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_wrapping_a_non_optimizer_or_a_sam_raises(name: str) -> None:
    model = nn.Linear(3, 2)
    cls = OPTIMIZERS[name]
    with pytest.raises(TypeError, match="already-built torch.optim.Optimizer"):
        cls(model.parameters())
    with pytest.raises(TypeError, match="already-built torch.optim.Optimizer"):
        cls(torch.optim.SGD)
    inner = SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="cannot wrap another SAM"):
        cls(inner)


# --------------------------------------------------------------------------- #
# Wrapper plumbing: param groups, per-group rho
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", NAMES)
def test_param_groups_and_state_are_the_base_optimizers(name: str) -> None:
    model = make("mlp_bn")
    opt = build(name, model.parameters())
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    closure_step(opt, model, *data("mlp_bn"))
    assert len(opt.state) == len(list(model.parameters()))
    for g in opt.param_groups:
        assert {"rho", "adaptive", "eta", "lr", "momentum"} <= set(g)


def test_per_group_rho_zero_leaves_that_group_unperturbed() -> None:
    model = make("mlp")
    first, last = model[0], model[2]
    base = torch.optim.SGD([{"params": first.parameters()}, {"params": last.parameters()}], lr=0.1)
    opt = SAM(base, rho=0.05)
    opt.param_groups[1]["rho"] = 0.0
    rec = PassRecorder(model)
    closure_step(opt, model, *data("mlp"))
    w, w_eps = rec.snaps
    names = [n for n, _ in model.named_parameters()]
    for n, a, b in zip(names, w, w_eps):
        if n.startswith("2."):
            assert torch.equal(a, b), n
        else:
            assert not torch.equal(a, b), n


# --------------------------------------------------------------------------- #
# 17. frozen_running_stats
# --------------------------------------------------------------------------- #
def test_frozen_running_stats_freezes_and_restores_even_on_error() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False))
    model.append(nn.BatchNorm1d(4, momentum=None))
    x = torch.randn(8, 5)
    before = copy.deepcopy(model.state_dict())
    with frozen_running_stats(model):
        model(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ZeroDivisionError):
        with frozen_running_stats(model):
            assert model[1].track_running_stats is False
            assert model[3].track_running_stats is False
            _ = 1 / 0
    assert model[1].track_running_stats is True
    assert model[3].track_running_stats is True
    assert model[2].track_running_stats is False  # was never tracking: left alone
    with frozen_running_stats(model, enabled=False):
        model(x)
    assert model[1].num_batches_tracked.item() == 1
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


# --------------------------------------------------------------------------- #
# AMP: the optimizer's overflow decision must agree with the scaler's
# --------------------------------------------------------------------------- #
def test_amp_skip_report_agrees_with_weights() -> None:
    w = nn.Parameter(torch.ones(4))
    opt = SAM(torch.optim.SGD([w], lr=0.1), rho=0.05)
    scaler = torch.amp.GradScaler("cpu")  # scale 65536
    scaler.scale((w * 1e15).sum()).backward()  # finite fp32 gradient 6.6e19 per element
    assert torch.isfinite(w.grad).all()
    w0 = w.detach().clone()
    performed = opt.first_step(zero_grad=False, grad_scaler=scaler)
    opt.second_step(grad_scaler=scaler)
    assert performed or torch.equal(w.detach(), w0), "first_step reported a skipped step but the weights moved"


# --------------------------------------------------------------------------- #
# Behaviours added after review: per-group settings, scheduler on the wrapper, every-k and overflow
# --------------------------------------------------------------------------- #
def test_per_group_rho_set_on_the_base_optimizer_is_kept() -> None:
    model = make("mlp")
    first, *rest = list(model.parameters())
    base = torch.optim.SGD([{"params": [first], "rho": 0.0}, {"params": rest}], lr=0.1)
    opt = SAM(base, rho=0.05)
    assert [g["rho"] for g in opt.param_groups] == [0.0, 0.05]
    x, y = data("mlp")
    before = [w.detach().clone() for w in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    after = [w.detach() for w in model.parameters()]
    assert torch.equal(after[0], before[0])  # rho = 0 in its group: not perturbed
    assert all(not torch.equal(a, b) for a, b in zip(after[1:], before[1:]))
    opt.restore()
    assert all(torch.equal(w.detach(), b) for w, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_attached_to_the_wrapper_is_silent_under_train_step(name: str) -> None:
    model = make("mlp_bn")
    opt = build(name, model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = data("mlp_bn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            ts_step(opt, model, x, y)
            scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(BASES["sgd"][1]["lr"] * 0.125)


def test_every_k_retries_the_sam_step_after_an_overflow_skip() -> None:
    model = make("mlp")
    opt = build("every_k_sam", model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = data("mlp")
    scaler.scale(F.cross_entropy(model(x), y).mul(float("inf"))).backward()
    assert opt.ascent_steps == 1
    assert opt.first_step(zero_grad=True, grad_scaler=scaler) is False
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    assert opt.step_count == 0 and opt.ascent_steps == 1  # the skipped SAM step is retried


def test_create_names_arguments_the_wrapper_does_not_take() -> None:
    params = list(make("mlp").parameters())
    with pytest.raises(ValueError, match=r"asam does not take \['adaptive'\]"):
        create("asam", params, lr=0.1, adaptive=True)
    with pytest.raises(ValueError, match=r"sam does not take \['m'\]"):
        create("sam", params, lr=0.1, m=4)
    assert isinstance(create("sam", params, base="SGD", lr=0.1).base_optimizer, torch.optim.SGD)


def test_a_wrapper_that_proxies_attributes_reaches_the_linked_groups_and_state():
    """Lightning's LightningOptimizer subclasses the optimizer's class without its ``__dict__`` and proxies
    missing attributes through ``__getattr__``: ``param_groups`` and ``state`` must raise AttributeError
    (not KeyError) on such an object so that the proxy reaches the real ones."""
    model = torch.nn.Linear(3, 2)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)

    class Proxy:
        def __init__(self, inner):
            self._inner = inner
            self.__class__ = type("ProxySAM", (Proxy, type(inner)), {})

        def __getattr__(self, item):
            return getattr(self._inner, item)

    proxy = Proxy(opt)
    assert isinstance(proxy, SAM)
    assert proxy.param_groups is opt.base_optimizer.param_groups
    assert proxy.state is opt.base_optimizer.state
    model(torch.randn(4, 3)).sum().backward()
    proxy.zero_grad()
    assert all(p.grad is None for p in model.parameters())
