"""2D loss surface of a trained digits CNN: our batched grid against the plain loop and loss-landscapes.

Every contender evaluates the whole digits training split (1437 examples, one batch, eval mode, mean
cross-entropy) at every point of the same ``N x N`` grid (default 21 x 21 = 441 points), in one process:

* ``batched Q=..``: :func:`landscape.surface.slice_2d` with ``batched=True, points_per_pass=Q``: the
  parameters of ``Q`` points stacked and the model run under ``torch.vmap``, one pass per ``Q`` points;
* ``plain loop``: the same call with ``batched=False``, one ``functional_call`` per point;
* ``loss-landscapes``: ``loss_landscapes.random_plane(model, Loss(F.cross_entropy, X, y), distance=0.5,
  steps=N, normalization="filter", deepcopy_model=True)`` (pip ``loss-landscapes==3.0.6``): one model
  copy whose parameters are moved in place between points, one ``model(X)`` and ``.item()`` per point.

Both of ours also compute accuracy at every point; loss-landscapes computes only the loss. Each time
is the whole call, set-up included (our directions, determinism check and fingerprint; its deepcopy,
directions and Python filter normalisation).

The directions differ (a speed comparison: the work per point is the same). Ours: Gaussian, filter
normalised, zero on biases and BatchNorm parameters, span ``alpha, beta in [-1, 1]``, so the edge is
``||alpha d|| = ||w||`` (weights only). loss-landscapes: uniform [0, 1) entries, the second direction
made orthogonal to the first, filter normalised *including* biases and BatchNorm parameters (element by
element for 1-D tensors), then each rescaled to norm ``||w|| / (distance * steps)``; the grid runs from
``-steps/2`` to ``steps/2 - 1`` steps along one direction and ``-steps/2 + 1`` to ``steps/2`` along the
other, so its half-width is ``||w|| / (2 distance)``: ``distance=0.5`` matches our span (its ``distance``
is an inverse scale, not a distance).

The limit: one plain forward pass over the data (``model(X)`` and the loss, eval mode, ``no_grad``),
median of many, times the number of points: "one forward pass per point". Each contender's ratio to it
is ``limit time / contender time`` (above 1: faster than one forward pass per point, which batching can
reach). The grids are timed in interleaved rounds (``--repeats``, the order rotating), medians
reported, after a warm-up of every contender on a 3 x 3 grid.

Usage::

    pip install -e ".[bench]"                              # loss-landscapes
    python benchmarks/bench_surface.py                     # CPU, 21 x 21, Q in 4 8 16 32
    python benchmarks/bench_surface.py --quick             # 7 x 7, Q in 8 32 (< 1 min)
    python benchmarks/bench_surface.py --device cuda       # GPU
    python benchmarks/bench_surface.py --json out.json     # also write the numbers
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _cached_run import add_run_arguments, trained_run
from _timing import synchronize, time_steps
from landscape.surface import slice_2d




def patch_loss_landscapes_device() -> None:
    """loss-landscapes draws its directions with ``torch.rand`` on the CPU whatever the model's device; on a
    GPU its in-place ``start_point.sub_(dir)`` then fails. Draw them on the parameters' device instead."""
    import loss_landscapes.main
    import loss_landscapes.model_interface.model_parameters as mp

    def rand_u_like(example_vector):
        return mp.ModelParameters([torch.rand(size=p.size(), dtype=p.dtype, device=p.device) for p in example_vector])

    mp.rand_u_like = rand_u_like  # looked up by orthogonal_to
    loss_landscapes.main.rand_u_like = rand_u_like


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="7 x 7 grid, Q in 8 32: a < 1 minute smoke run")
    parser.add_argument("--steps", type=int, default=None, help="grid points per axis (default 21; --quick: 7)")
    parser.add_argument("--q", type=int, nargs="+", default=None, help="points per pass (default 4 8 16 32; --quick: 8 32)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved timing rounds of the full grids (median)")
    parser.add_argument("--no-loss-landscapes", action="store_true", help="skip the loss-landscapes contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    args.epochs = args.epochs or (3 if args.quick else 30)
    args.steps = args.steps or (7 if args.quick else 21)
    args.q = args.q or ([8, 32] if args.quick else [4, 8, 16, 32])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_ll = not args.no_loss_landscapes
    if use_ll:
        try:
            import loss_landscapes
            import loss_landscapes.metrics
        except ImportError:
            sys.exit("loss-landscapes is not installed: pip install -e '.[bench]'  (or pip install loss-landscapes==3.0.6)")
        patch_loss_landscapes_device()
    wall_start = time.perf_counter()

    run = trained_run(args)
    model = run.model.eval()
    X, y = run.train.x.to(device), run.train.y.to(device)
    loss_fn = F.cross_entropy if run.config.label_smoothing == 0 else (
        lambda out, t: F.cross_entropy(out, t, label_smoothing=run.config.label_smoothing))
    n = args.steps
    points = n * n
    span = ((-1.0, 1.0), (-1.0, 1.0))
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "loss_landscapes": importlib.metadata.version("loss-landscapes") if use_ll else None,
        "threads": torch.get_num_threads(),
        "run_dir": str(run.run_dir),
        "checkpoint_sha256": run.checkpoint_sha256,
        "model": run.config.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_examples": int(X.shape[0]),
        "grid": [n, n],
        "points": points,
        "repeats": args.repeats,
    }
    print(json.dumps(env), flush=True)

    # The contenders, each a full-grid call for a given number of steps per axis.
    results: dict[str, object] = {}

    def ours(steps: int, **kw) -> Callable[[], object]:
        def call():
            return slice_2d(model, loss_fn, (X, y), steps=(steps, steps), span=span, seed=args.seed,
                            batch_size=X.shape[0], progress=False, **kw)
        return call

    def theirs(steps: int) -> Callable[[], object]:
        metric = loss_landscapes.metrics.Loss(loss_fn, X, y)

        def call():
            return loss_landscapes.random_plane(model, metric, distance=0.5, steps=steps, normalization="filter",
                                                deepcopy_model=True)
        return call

    def contenders(steps: int) -> dict[str, Callable[[], object]]:
        out = {f"batched Q={q}": ours(steps, batched=True, points_per_pass=q) for q in args.q}
        out["plain loop"] = ours(steps, batched=False)
        if use_ll:
            out["loss-landscapes"] = theirs(steps)
        return out

    def keep(name: str, fn: Callable[[], object]) -> Callable[[], None]:
        def call():
            results[name] = fn()
        return call

    # The limit: one plain forward pass (and the loss) over the data.
    @torch.no_grad()
    def forward_once():
        return loss_fn(model(X), y)

    limit_times = time_steps({"forward": forward_once}, device, warmup=3, rounds=30 if not args.quick else 10)["forward"]
    forward_s = statistics.median(limit_times)
    limit_s = forward_s * points
    print(f"\none forward pass over the data: {forward_s * 1e3:.2f} ms (median of {len(limit_times)}); "
          f"limit for {points} points: {limit_s:.2f} s", flush=True)

    print("warming up on a 3 x 3 grid ...", flush=True)
    for fn in contenders(3).values():
        fn()
    synchronize(device)
    print(f"timing {n} x {n} grids, {args.repeats} interleaved round(s) ...", flush=True)
    steps_full = {name: keep(name, fn) for name, fn in contenders(n).items()}
    times = time_steps(steps_full, device, warmup=0, rounds=args.repeats)

    # Same surface on both of our paths.
    plain = results["plain loop"].loss
    agree = {name: float(np.max(np.abs(results[name].loss - plain))) for name in results if name.startswith("batched")}
    print("max |loss batched - loss plain| over the grid: "
          + ", ".join(f"{k.removeprefix('batched ')} {v:.1e}" for k, v in agree.items()), flush=True)

    plain_s = statistics.median(times["plain loop"])
    rows = []
    for name, t in times.items():
        wall = statistics.median(t)
        rows.append({"contender": name, "wall_s": wall, "wall_s_all": t, "points_per_s": points / wall,
                     "x_plain_loop": plain_s / wall, "x_limit": limit_s / wall})
    rows.append({"contender": "limit (1 forward/point)", "wall_s": limit_s, "wall_s_all": None,
                 "points_per_s": points / limit_s, "x_plain_loop": plain_s / limit_s, "x_limit": 1.0})
    batched = [r for r in rows if r["contender"].startswith("batched")]
    best = min(batched, key=lambda r: r["wall_s"])
    print(f"\n{n} x {n} grid ({points} points, {int(X.shape[0])} examples each); wall: median of {args.repeats}")
    print(f"{'contender':<26}{'wall s':>9}{'points/s':>10}{'x plain':>9}{'x limit':>9}")
    for r in rows:
        mark = "  <- best Q" if r is best else ""
        print(f"{r['contender']:<26}{r['wall_s']:>9.2f}{r['points_per_s']:>10.1f}{r['x_plain_loop']:>9.2f}"
              f"{r['x_limit']:>9.2f}{mark}")
    if use_ll:
        ll = next(r for r in rows if r["contender"] == "loss-landscapes")
        print(f"best batched vs loss-landscapes: {ll['wall_s'] / best['wall_s']:.2f}x")

    need = 5.0 if device.type == "cuda" else 1.0
    speedup = best["x_plain_loop"]
    goal = {"best": best["contender"], "speedup_vs_plain": speedup, "required": need,
            "met": speedup >= need if device.type == "cuda" else speedup > need}
    print(f"goal: batched {'>= 5x' if device.type == 'cuda' else 'faster than'} the plain loop on "
          f"{device.type}: {best['contender']} is {speedup:.2f}x -> {'MET' if goal['met'] else 'NOT met'}")
    print(f"total wall {time.perf_counter() - wall_start:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "forward_s": forward_s, "limit_s": limit_s,
                                               "batched_vs_plain_max_abs_diff": agree, "rows": rows,
                                               "goal": goal}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
