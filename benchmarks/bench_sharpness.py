"""m-sharpness of a trained digits CNN over its training set: chunks vectorised with vmap against loops.

Every contender computes the same one-step m-sharpness (rho 0.05, p = 2, the SAM step) over the whole
digits training split (1437 examples; ``N // m`` disjoint chunks of the same seeded partition), in one
process:

* ``vmap E=..``: :func:`landscape.sharpness.m_sharpness` with ``batched=True, examples_per_call=E``:
  ``E / m`` chunks per call, the per-chunk gradients from ``torch.vmap(grad_and_value(...))`` over
  stacked perturbations (``m = 1``: per-example gradients);
* ``loop (ours)``: the same call with ``batched=False``: one ``grad_and_value`` call per chunk;
* ``loop (autograd, in place)``: what one writes by hand with davda54/sam's recipe: per chunk,
  ``loss.backward()`` on the module, ``p.add_(e)`` in place, a second forward, ``p.sub_(e)``.

All three agree to float32 rounding (checked and printed). The times are medians of ``--repeats``
interleaved rounds after a warm-up, so the ratios are the comparison; absolute times come only from a GPU.

Usage::

    python benchmarks/bench_sharpness.py                  # CPU, m in 1 16, E in 32 128 512
    python benchmarks/bench_sharpness.py --quick          # m = 1 on 256 examples (< 30 s)
    python benchmarks/bench_sharpness.py --device cuda    # GPU (E in 256 1024 4096)
    python benchmarks/bench_sharpness.py --json out.json  # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _cached_run import add_run_arguments, trained_run
from _timing import time_steps
from landscape.sharpness import _partition, m_sharpness, sharpness_objective

RHO = 0.05


def autograd_loop(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, m: int, seed: int) -> float:
    """One-step m-sharpness with in-place perturbations of the module, chunk by chunk."""
    params = [p for p in model.parameters() if p.requires_grad]
    chunks = _partition(X.shape[0], m, seed, X.device)
    total = 0.0
    for idx in chunks:
        x, t = X[idx], y[idx]
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        with torch.no_grad():
            norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
            eps = [RHO * p.grad / norm.clamp_min(1e-12) for p in params]
            for p, e in zip(params, eps):
                p.add_(e)
            perturbed = F.cross_entropy(model(x), t)
            for p, e in zip(params, eps):
                p.sub_(e)
        total += float(perturbed - loss.detach())
    return total / chunks.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="m = 1 on the first 256 examples: a smoke run")
    parser.add_argument("--m", type=int, nargs="+", default=None, help="chunk sizes (default 1 16)")
    parser.add_argument("--e", type=int, nargs="+", default=None, help="examples per vmapped call")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    args.epochs = args.epochs or (3 if args.quick else 30)
    device = torch.device(args.device)
    args.m = args.m or ([1] if args.quick else [1, 16])
    args.e = args.e or ([256, 1024, 4096] if device.type == "cuda" else [32, 128, 512])
    if args.threads:
        torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()

    run = trained_run(args)
    model = run.model.eval().to(device)
    X, y = run.train.x.to(device), run.train.y.to(device)
    if args.quick:
        X, y = X[:256], y[:256]
    objective = sharpness_objective(model, F.cross_entropy, (X, y), batch_size=X.shape[0])
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "run_dir": str(run.run_dir),
           "checkpoint_sha256": run.checkpoint_sha256, "parameters": sum(p.numel() for p in model.parameters()),
           "examples": int(X.shape[0]), "rho": RHO, "repeats": args.repeats}
    print(json.dumps(env), flush=True)

    report = []
    for m in args.m:
        values: dict[str, float] = {}

        def ours(name: str, **kw):
            def call():
                values[name] = m_sharpness(None, None, None, m, RHO, objective=objective, progress=False, **kw).value
            return call

        contenders = {f"vmap E={e}": ours(f"vmap E={e}", batched=True, examples_per_call=e) for e in args.e if e >= m}
        contenders["loop (ours)"] = ours("loop (ours)", batched=False)

        def by_hand():
            values["loop (autograd, in place)"] = autograd_loop(model, X, y, m, seed=0)
        contenders["loop (autograd, in place)"] = by_hand

        times = time_steps(contenders, device, warmup=1, rounds=args.repeats)
        loop_s = statistics.median(times["loop (ours)"])
        hand_s = statistics.median(times["loop (autograd, in place)"])
        n_chunks = X.shape[0] // m
        print(f"\nm = {m}: {n_chunks} chunks; value {values['loop (ours)']:.6f}; max |difference| to loop (ours): "
              + ", ".join(f"{k} {abs(v - values['loop (ours)']):.1e}" for k, v in values.items() if k != "loop (ours)"))
        print(f"{'contender':<28}{'wall s':>9}{'chunks/s':>10}{'x loop':>9}{'x autograd':>11}")
        for name, t in times.items():
            wall = statistics.median(t)
            row = {"m": m, "contender": name, "wall_s": wall, "wall_s_all": t, "chunks_per_s": n_chunks / wall,
                   "x_loop": loop_s / wall, "x_autograd_loop": hand_s / wall, "value": values[name]}
            report.append(row)
            print(f"{name:<28}{wall:>9.3f}{row['chunks_per_s']:>10.0f}{row['x_loop']:>9.2f}{row['x_autograd_loop']:>11.2f}")
    print(f"total wall {time.perf_counter() - wall_start:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": report}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
