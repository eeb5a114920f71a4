"""2D loss surface of a trained digits CNN: our timed default against the plain loop, batched passes,
loss-landscapes and the forward-only limit, side by side in one process.

Every contender evaluates the digits training split (1437 examples, one batch, eval mode, mean
cross-entropy) at every point of the same ``N x N`` grid (default 21 x 21 = 441 points):

* ``ours, auto (default)``: :func:`landscape.surface.slice_2d` as a user calls it. It times the loop, the
  loop with channels-last convolution kernels and batched passes of ``Q = 2, 4, ...`` on the first
  points of the grid (which stay part of it) and evaluates the rest with the fastest; its choice, with
  the timings, is printed and saved (``landscape._surface_plan``);
* ``ours, plain loop``: the same call with ``batched=False``, one forward pass per point in the
  model's own layout (the reference path);
* ``ours, batched Q=..``: ``points_per_pass=Q``: the parameters of ``Q`` points stacked, the model run
  under ``torch.vmap``, one pass per ``Q`` points;
* ``loss-landscapes``: ``loss_landscapes.random_plane(model, Loss(F.cross_entropy, X, y), distance=0.5,
  steps=N, normalization="filter", deepcopy_model=True)`` (pip ``loss-landscapes==3.0.6``): one model
  copy whose parameters are moved in place between points, one ``model(X)`` and ``.item()`` per point;
* ``limit: forward only``: one plain forward pass over the data (``model(X)`` and the loss, eval mode,
  ``no_grad``) at each of the ``N * N`` points of our grid, the weights of a model copy set in place
  between passes (``torch._foreach`` ops, 0.1 ms): "one forward pass per point", with nothing else. The
  goals are measured against it;
* ``limit: forward only at w``: ``N * N`` passes at the trained weights, as in earlier versions of this
  benchmark. On the CPU it is slower than at the grid's points (denormal arithmetic near the minimum:
  93.9 ms per pass at ``w`` against 86.9-88.4 at ``(0.5, 0.5)``, ``(-1, 1)`` and ``(1, 1)``, all 83.7-87.0
  with ``torch.set_flush_denormal(True)``, 1 thread), so it is a reference only;
* ``limit: forward only, channels-last`` (with ``--device cpu``): the grid's points with the model
  converted to channels-last: the limit of the layout our default may choose (a reference).

Ours also compute accuracy at every point; loss-landscapes computes only the loss. Each time is the
whole call, set-up included (our objective and its determinism check, fingerprints, directions and the
timing of the candidates; its deepcopy, directions and Python filter normalisation). The directions
differ (a speed comparison: the work per point is the same). Ours: Gaussian, filter normalised, zero on
biases and BatchNorm parameters, ``alpha, beta in [-1, 1]``. loss-landscapes: uniform directions
normalised per filter including biases, ``distance=0.5`` giving the same half-width (its ``distance``
is an inverse scale).

Everything is timed in interleaved rounds (``--repeats``, the order rotating), synchronised on a GPU,
medians reported, after a warm-up of every contender on a 3 x 3 grid. Ratios are speeds: ``x plain loop
= loop time / contender time`` (above 1: faster), likewise ``x loss-landscapes`` and ``x limit``.

Goals (issue #19): the default at most 5% slower than the plain loop (``x plain loop >= 1/1.05``); on
the CPU at or above loss-landscapes (``x loss-landscapes >= 1``) and within 5% of the forward-only
limit (``x limit >= 1/1.05``).

Usage::

    pip install -e ".[bench]"                                   # loss-landscapes
    flock /tmp/bench.lock python benchmarks/bench_surface.py --repeats 3   # CPU, 21 x 21
    python benchmarks/bench_surface.py --quick --json out.json  # 9 x 9 on 256 examples (< 1 min)
    python benchmarks/bench_surface.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from _cached_run import add_run_arguments, trained_run
from _timing import synchronize, time_steps
from landscape.directions import random_plane
from landscape.surface import slice_2d

AUTO, LOOP, LL = "ours, auto (default)", "ours, plain loop", "loss-landscapes"
LIMIT, LIMIT_W, LIMIT_CL = "limit: forward only", "limit: forward only at w", "limit: forward only, channels-last"


def patch_loss_landscapes_device() -> None:
    """loss-landscapes draws its directions with ``torch.rand`` on the CPU whatever the model's device; on a
    GPU its in-place ``start_point.sub_(dir)`` then fails. Draw them on the parameters' device instead."""
    import loss_landscapes.main
    import loss_landscapes.model_interface.model_parameters as mp

    def rand_u_like(example_vector):
        return mp.ModelParameters([torch.rand(size=p.size(), dtype=p.dtype, device=p.device) for p in example_vector])

    mp.rand_u_like = rand_u_like  # looked up by orthogonal_to
    loss_landscapes.main.rand_u_like = rand_u_like


def loss_landscapes_or_none(wanted: bool) -> tuple[Any, str | None]:
    """The loss_landscapes module, or ``None`` and why it is left out."""
    if not wanted:
        return None, "left out (--no-loss-landscapes)"
    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError:
        return None, "not installed (pip install -e '.[bench]' or loss-landscapes==3.0.6): its row is left out"
    patch_loss_landscapes_device()
    return loss_landscapes, None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="9 x 9 grid on 256 examples, Q in 8 32: a < 1 minute smoke run (the default still timed)")
    parser.add_argument("--steps", type=int, default=None, help="grid points per axis (default 21; --quick: 9)")
    parser.add_argument("--examples", type=int, default=None,
                        help="training examples evaluated at every point (default all 1437; --quick: 256)")
    parser.add_argument("--q", type=int, nargs="+", default=None, help="points per pass of the batched rows "
                        "(default 4 16; --quick: 8 32)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved timing rounds of the full grids (median)")
    parser.add_argument("--no-loss-landscapes", action="store_true", help="skip the loss-landscapes contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args()
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda; got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    args.epochs = args.epochs or (3 if args.quick else 30)
    args.steps = args.steps or (9 if args.quick else 21)
    args.examples = args.examples or (256 if args.quick else None)
    args.q = args.q or ([8, 32] if args.quick else [4, 16])
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loss_landscapes, ll_note = loss_landscapes_or_none(not args.no_loss_landscapes)
    if ll_note:
        print(f"loss-landscapes: {ll_note}", flush=True)
    wall_start = time.perf_counter()

    run = trained_run(args)
    model = run.model.to(device).eval()
    X, y = run.train.x.to(device), run.train.y.to(device)
    if args.examples is not None:
        X, y = X[: args.examples], y[: args.examples]
    loss_fn = F.cross_entropy if run.config.label_smoothing == 0 else (
        lambda out, t: F.cross_entropy(out, t, label_smoothing=run.config.label_smoothing))
    n = args.steps
    points = n * n
    span = ((-1.0, 1.0), (-1.0, 1.0))
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "loss_landscapes": importlib.metadata.version("loss-landscapes") if loss_landscapes else None,
        "loss_landscapes_note": ll_note,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "run_dir": str(run.run_dir),
        "checkpoint_sha256": run.checkpoint_sha256,
        "model": run.config.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_examples": int(X.shape[0]),
        "grid": [n, n],
        "points": points,
        "repeats": args.repeats,
        "quick": args.quick,
    }
    print(json.dumps(env), flush=True)

    results: dict[str, Any] = {}
    choices: list[dict[str, Any]] = []  # the default's choice in every timed round
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last) if device.type == "cpu" else None

    def ours(steps: int, **kw: Any) -> Callable[[], Any]:
        return lambda: slice_2d(model, loss_fn, (X, y), steps=(steps, steps), span=span, seed=args.seed,
                                batch_size=X.shape[0], progress=False, **kw)

    def theirs(steps: int) -> Callable[[], Any]:
        metric = loss_landscapes.metrics.Loss(loss_fn, X, y)
        return lambda: loss_landscapes.random_plane(model, metric, distance=0.5, steps=steps, normalization="filter",
                                                    deepcopy_model=True)

    origin = {k: p.detach() for k, p in model.named_parameters()}
    plane = random_plane(origin, seed=args.seed)  # the directions slice_2d draws with this seed

    def forward_only(net: torch.nn.Module, steps: int, at_w: bool = False) -> Callable[[], Any]:
        net = copy.deepcopy(net).requires_grad_(False)
        names = [k for k, _ in net.named_parameters()]
        weights = [p for _, p in net.named_parameters()]
        coords = np.linspace(-1.0, 1.0, steps).tolist()
        points = [(0.0, 0.0)] * steps * steps if at_w else [(a, b) for a in coords for b in coords]

        @torch.no_grad()
        def call():
            out = None
            for a, b in points:
                if not at_w:
                    torch._foreach_copy_(weights, [origin[k] for k in names])
                    torch._foreach_add_(weights, [plane[0][k] for k in names], alpha=a)
                    torch._foreach_add_(weights, [plane[1][k] for k in names], alpha=b)
                out = loss_fn(net(X), y)
            return out
        return call

    def contenders(steps: int) -> dict[str, Callable[[], Any]]:
        out = {AUTO: ours(steps), LOOP: ours(steps, batched=False)}
        out.update({f"ours, batched Q={q}": ours(steps, points_per_pass=q) for q in args.q})
        if loss_landscapes:
            out[LL] = theirs(steps)
        out[LIMIT] = forward_only(model, steps)
        out[LIMIT_W] = forward_only(model, steps, at_w=True)
        if model_cl is not None:
            out[LIMIT_CL] = forward_only(model_cl, steps)
        return out

    def keep(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def call():
            results[name] = fn()
            if name == AUTO:
                choices.append(results[name].meta["evaluation"])
        return call

    print("warming up on a 3 x 3 grid ...", flush=True)
    for fn in contenders(3).values():
        fn()
    synchronize(device)
    print(f"timing {n} x {n} grids, {args.repeats} interleaved round(s) ...", flush=True)
    times = time_steps({name: keep(name, fn) for name, fn in contenders(n).items()}, device, warmup=0,
                       rounds=args.repeats)

    plain = results[LOOP].loss
    agree = {name: float(np.max(np.abs(r.loss - plain))) for name, r in results.items()
             if name.startswith("ours") and name != LOOP}
    print("max |loss - loss of the plain loop| over the grid: "
          + ", ".join(f"{k.removeprefix('ours, ')} {v:.1e}" for k, v in agree.items()), flush=True)

    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, t in times.items():
        rows.append({"contender": name, "wall_s": median[name], "wall_s_all": t, "points_per_s": points / median[name],
                     "x_plain_loop": median[LOOP] / median[name],
                     "x_loss_landscapes": median[LL] / median[name] if LL in median else None,
                     "x_limit": median[LIMIT] / median[name]})
    print(f"\n{n} x {n} grid ({points} points, {int(X.shape[0])} examples each) on {device.type}; "
          f"wall: median of {args.repeats}")
    print(f"{'contender':<36}{'wall s':>9}{'points/s':>10}{'x loop':>8}{'x LL':>8}{'x limit':>9}")
    for r in rows:
        ll = f"{r['x_loss_landscapes']:>8.2f}" if r["x_loss_landscapes"] is not None else f"{'-':>8}"
        print(f"{r['contender']:<36}{r['wall_s']:>9.2f}{r['points_per_s']:>10.1f}{r['x_plain_loop']:>8.2f}{ll}"
              f"{r['x_limit']:>9.2f}")
    for i, choice in enumerate(choices, start=1):
        timed = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in choice["seconds_per_point"].items())
        print(f"default's choice, round {i}: {choice['method']} Q={choice['points_per_pass']}"
              f"{' channels-last' if choice['channels_last'] else ''} ({choice['chosen_by']}; ms per point: {timed})"
              + (f"; skipped {choice['skipped']}" if choice["skipped"] else ""))

    auto = next(r for r in rows if r["contender"] == AUTO)
    goals = {"auto_vs_plain_loop": {"ratio": auto["x_plain_loop"], "required": 1 / 1.05,
                                    "met": auto["x_plain_loop"] >= 1 / 1.05}}
    if device.type == "cpu":
        goals["auto_vs_loss_landscapes"] = {"ratio": auto["x_loss_landscapes"], "required": 1.0,
                                            "met": None if LL not in median else auto["x_loss_landscapes"] >= 1.0}
        goals["auto_vs_limit"] = {"ratio": auto["x_limit"], "required": 1 / 1.05, "met": auto["x_limit"] >= 1 / 1.05}
    else:
        best = max((r for r in rows if r["contender"].startswith("ours")), key=lambda r: r["x_plain_loop"])
        goals["best_ours_vs_plain_loop_gpu"] = {"best": best["contender"], "ratio": best["x_plain_loop"],
                                                "required": 5.0, "met": best["x_plain_loop"] >= 5.0}
    for name, goal in goals.items():
        verdict = "n/a (no loss-landscapes)" if goal["met"] is None else ("MET" if goal["met"] else "NOT met")
        ratio = "-" if goal["ratio"] is None else f"{goal['ratio']:.3f}"
        print(f"goal {name}: {ratio} (need >= {goal['required']:.3f}) -> {verdict}")
    print(f"total wall {time.perf_counter() - wall_start:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows, "auto_choices": choices,
                                               "max_abs_diff_vs_plain_loop": agree, "goals": goals}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
