"""m-sharpness of a trained digits CNN over its training set: chunks vectorised with vmap against loops.

Every contender computes the same one-step m-sharpness (rho 0.05, p = 2, the SAM step) over the whole
digits training split (1437 examples; ``N // m`` disjoint chunks of the same seeded partition), in one
process:

* ``default``: :func:`landscape.sharpness.m_sharpness` as users call it. At ``m = 1`` (one step, p = 2)
  that is the per-layer rules of :mod:`landscape._layer_rules` (no per-example weights: ghost norms and
  corrected layer outputs, ``settings["method"] == "layer_rules"``); at ``m > 1``, vmap;
* ``vmap E=..``: ``batched=True, layer_rules=False, examples_per_call=E``: ``E / m`` chunks per call (at
  most ``2**24`` stacked parameter values: 296 chunks of this CNN), the per-chunk gradients from
  ``torch.vmap(grad_and_value(...))`` (``m = 1``: per-example gradients) and the perturbed losses from one
  vmapped call over the stacked perturbed weights;
* ``loop (ours)``: the same call with ``batched=False``: one ``grad_and_value`` call per chunk;
* ``loop (autograd, in place)``: what one writes by hand with davda54/sam's recipe: per chunk,
  ``loss.backward()`` on the module, ``p.add_(e)`` in place, a second forward, ``p.sub_(e)``.

``default`` is the call with every option left to its default for the device (the number the issue's goal
reads: ``m1_speedup_over_loop`` in the JSON, our loop's time over it at m = 1). All agree to
float32 rounding (checked and printed). The times are medians of ``--repeats`` interleaved rounds after a
warm-up (wall, and process CPU time of all threads, which a busy shared machine inflates less), so the
ratios are the comparison; absolute times come only from a GPU.

Usage::

    python benchmarks/bench_sharpness.py                  # CPU, m in 1 16, E in 32 128 512
    python benchmarks/bench_sharpness.py --quick          # toy size: m = 1 on 256 examples (< 1 min)
    python benchmarks/bench_sharpness.py --device cuda    # GPU (E in 256 1024 4096)
    python benchmarks/bench_sharpness.py --json out.json  # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from _cached_run import add_run_arguments, trained_run
from _timing import ratios_to_loops, timed_rounds
from landscape.sharpness import _examples_per_call, _partition, m_sharpness, sharpness_objective

RHO = 0.05


def autograd_loop(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, m: int, seed: int) -> float:
    """One-step m-sharpness with in-place perturbations of the module, chunk by chunk."""
    params = [p for p in model.parameters() if p.requires_grad]
    chunks = _partition(X.shape[0], m, seed).to(X.device)
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


def bench_m(args: argparse.Namespace, objective, model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor,
            m: int) -> list[dict]:
    """Every contender at chunk size ``m``: values, wall and CPU medians, ratios to both loops."""
    device = torch.device(args.device)
    values: dict[str, float] = {}
    methods: dict[str, str] = {}
    per_call: dict[str, int] = {}

    def ours(name: str, **kw) -> Callable[[], None]:
        def call() -> None:
            result = m_sharpness(None, None, None, m, RHO, objective=objective, progress=False, **kw)
            values[name], methods[name] = result.value, result.settings["method"]
            per_call[name] = result.settings["chunks_per_call"] * m
        return call

    contenders = {"default": ours("default")}
    contenders.update({f"vmap E={e}": ours(f"vmap E={e}", batched=True, layer_rules=False, examples_per_call=e)
                       for e in args.e if e >= m})
    contenders["loop (ours)"] = ours("loop (ours)", batched=False)

    def by_hand() -> None:
        values["loop (autograd, in place)"] = autograd_loop(model, X, y, m, seed=0)
    contenders["loop (autograd, in place)"] = by_hand

    times = timed_rounds(contenders, device, warmup=1, rounds=args.repeats)
    loop, hand = "loop (ours)", "loop (autograd, in place)"
    ratios = ratios_to_loops(times, loop, hand)
    n_chunks = X.shape[0] // m
    print(f"\nm = {m}: {n_chunks} chunks; value {values[loop]:.6f}; max |difference| to loop (ours): "
          + ", ".join(f"{k} {abs(v - values[loop]):.1e}" for k, v in values.items() if k != loop))
    print("methods: " + ", ".join(f"{k} {v} (E={per_call[k]})" for k, v in methods.items()))
    print(f"{'contender':<30}{'wall s':>9}{'chunks/s':>10}{'x loop':>9}{'x autograd':>11}{'cpu s':>9}{'x loop':>9}")
    rows = []
    for name in contenders:
        row = {"m": m, "contender": name, "method": methods.get(name, "autograd"),
               "examples_per_call": per_call.get(name), **ratios[name],
               "chunks_per_s": n_chunks / ratios[name]["wall_s"], "value": values[name], "default": name == "default"}
        rows.append(row)
        print(f"{name:<30}{row['wall_s']:>9.3f}{row['chunks_per_s']:>10.0f}{row['x_loop']:>9.2f}"
              f"{row['x_autograd_loop']:>11.2f}{row['cpu_s']:>9.3f}{row['x_loop_cpu']:>9.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="toy size: m = 1 on the 3-epoch model's first 256 examples")
    parser.add_argument("--m", type=int, nargs="+", default=None, help="chunk sizes (default 1 16; --quick: 1)")
    parser.add_argument("--e", type=int, nargs="+", default=None,
                        help="examples per vmapped call besides the default (CPU: 32 128 512; GPU: 256 1024 4096)")
    parser.add_argument("--examples", type=int, default=None, help="use the first N training examples (--quick: 256)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (median; default 5, --quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device takes cpu or cuda; got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.epochs = args.epochs or (3 if args.quick else 30)
    device = torch.device(args.device)
    args.m = args.m or ([1] if args.quick else [1, 16])
    args.e = args.e or ([256, 1024, 4096] if device.type == "cuda" else [32, 128, 512])
    args.examples = args.examples or (256 if args.quick else None)
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()

    run = trained_run(args)
    model = run.model.eval().to(device)
    X, y = run.train.x.to(device), run.train.y.to(device)
    if args.examples:
        X, y = X[: args.examples], y[: args.examples]
    objective = sharpness_objective(model, F.cross_entropy, (X, y), batch_size=X.shape[0])
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "run_dir": str(run.run_dir), "checkpoint_sha256": run.checkpoint_sha256,
           "parameters": sum(p.numel() for p in model.parameters()), "examples": int(X.shape[0]), "rho": RHO,
           "repeats": args.repeats, "vmap_default_examples_per_call": _examples_per_call(device, None)}
    print(json.dumps(env), flush=True)

    report = [row for m in args.m for row in bench_m(args, objective, model, X, y, m)]
    speedups = {m: {r["contender"]: r["x_loop"] for r in report if r["m"] == m} for m in args.m}
    out: dict = {"env": env, "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": report,
                 "speedup_over_loop": speedups}
    default = [r for r in report if r["m"] == 1 and r["default"]]
    if default:
        ratio, cpu_ratio = default[0]["x_loop"], default[0]["x_loop_cpu"]
        out.update({"m1_speedup_over_loop": ratio, "m1_speedup_over_loop_cpu": cpu_ratio,
                    "goal": {"m1_speedup_over_loop": ratio, "limit": 10.0, "met": ratio >= 10.0}})
        print(f"\nGoal m = 1 default >= 10x our loop: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU -> "
              f"{'met' if ratio >= 10 else 'NOT met'}")
    out["benchmark_wall_s"] = time.perf_counter() - wall_start
    print(f"total wall {out['benchmark_wall_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
