"""Peak memory of streamed analyses on a dataset ten times larger than the memory budget.

The data are a ``Dataset`` that draws every image from its index (seeded), so no copy of the whole
dataset exists anywhere: a streamed analysis must hold one batch at a time. Each measurement runs in a
fresh process (``--case``), after the model is built and one two-example forward and backward has loaded
the kernels; what is reported is the growth of memory over that baseline:

* ``one batch forward+backward``: the reference, one batch of ``--batch-size`` examples, loss and
  gradient (the memory any training step needs);
* ``hessian top-1 (Lanczos)``: :func:`landscape.hessian.top_eigenvalues`, ``k=1``, Hessian-vector products
  over all batches (the data size exceeds ``memory_budget``, so the objective streams by default);
* ``trace (Hutchinson)``, ``m-sharpness m=1`` (batch by batch), ``surface 1D`` (5 points);
* ``kept (stream=False)``: the same top eigenvalue with the data kept, for contrast;
* ``one batch Hessian-vector product``: the floor of every Hessian method, one double-backward product on
  one batch (a second reference).

CPU: the growth of the peak resident set size (``ru_maxrss``) over the resident size at the baseline.
CUDA: ``torch.cuda.max_memory_allocated`` over the allocation at the baseline. The claim checked is the
issue's: a streamed analysis within 2x of one batch's forward and backward.

Usage::

    python benchmarks/bench_streaming.py                   # CPU: budget 4 MiB, data 40 MiB
    python benchmarks/bench_streaming.py --device cuda --budget-mib 256
    python benchmarks/bench_streaming.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

CASES = ["batch", "hvp", "hessian", "trace", "sharpness", "sharpness32", "surface", "kept"]
LABELS = {
    "batch": "one batch forward+backward",
    "hvp": "one batch Hessian-vector product (double backward)",
    "hessian": "hessian top-1 (Lanczos), streamed",
    "trace": "trace (Hutchinson, 4 products), streamed",
    "sharpness": "m-sharpness m=1, streamed (examples_per_call=128, the CPU default)",
    "sharpness32": "m-sharpness m=1, streamed, examples_per_call=32",
    "surface": "surface 1D (5 points), streamed",
    "kept": "hessian top-1, data kept (stream=False)",
}


class SeededImages(Dataset):
    """``n`` images of ``3 x size x size`` and labels, each drawn from its index: no stored copy."""

    def __init__(self, n: int, size: int, classes: int = 10) -> None:
        self.n, self.size, self.classes = n, size, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g), int(torch.randint(self.classes, (), generator=g))


def network(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(2 * width, 10)).eval()


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(case: str, args: argparse.Namespace) -> dict:
    from landscape import hessian, sharpness, surface

    device = torch.device(args.device)
    image_bytes = 3 * args.size * args.size * 4
    budget = args.budget_mib * 2**20
    n = 10 * budget // image_bytes
    model = network(args.width).to(device)
    data = SeededImages(n, args.size)
    loader = DataLoader(data, batch_size=args.batch_size)
    x, y = next(iter(DataLoader(data, batch_size=2)))
    F.cross_entropy(model(x.to(device)), y.to(device)).backward()  # kernels loaded
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = current_bytes(device)
    start = time.perf_counter()
    options = {"memory_budget": budget, "device": device}
    if case == "batch":
        xb, yb = next(iter(loader))
        F.cross_entropy(model(xb.to(device)), yb.to(device)).backward()
        value = float(sum(p.grad.norm() ** 2 for p in model.parameters()) ** 0.5)
    elif case == "hvp":
        xb, yb = next(iter(loader))
        params = list(model.parameters())
        gradient = torch.autograd.grad(F.cross_entropy(model(xb.to(device)), yb.to(device)), params, create_graph=True)
        product = torch.autograd.grad(gradient, params, grad_outputs=[torch.ones_like(p) for p in params])
        value = float(sum(h.sum() for h in product))
    elif case == "hessian":
        value = float(hessian.top_eigenvalues(model, F.cross_entropy, loader, k=1, max_matvecs=args.matvecs,
                                              **options).eigenvalues[0])
    elif case == "kept":
        value = float(hessian.top_eigenvalues(model, F.cross_entropy, loader, k=1, max_matvecs=args.matvecs,
                                              stream=False, **options).eigenvalues[0])
    elif case == "trace":
        value = float(hessian.hessian_trace(model, F.cross_entropy, loader, method="hutchinson", n_matvecs=4,
                                            **options).value)
    elif case == "sharpness":
        value = float(sharpness.m_sharpness(model, F.cross_entropy, loader, m=1, rho=0.05, **options).value)
    elif case == "sharpness32":
        value = float(sharpness.m_sharpness(model, F.cross_entropy, loader, m=1, rho=0.05, examples_per_call=32,
                                            **options).value)
    elif case == "surface":
        value = float(surface.slice_1d(model, F.cross_entropy, loader, steps=5, seed=0, **options).loss[2])
    else:
        raise ValueError(f"unknown case {case!r}; choose one of {CASES}")
    return {"case": case, "growth_bytes": peak_bytes(device) - base, "value": value,
            "seconds": time.perf_counter() - start, "examples": n, "dataset_bytes": n * image_bytes,
            "budget_bytes": budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget-mib", type=int, default=4, help="memory_budget; the data are 10x this")
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--width", type=int, default=16, help="channels of the first convolutions")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--matvecs", type=int, default=4, help="Lanczos products (each one pass over the data)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args)), flush=True)
        return
    passed = [f"--device={args.device}", f"--budget-mib={args.budget_mib}", f"--size={args.size}",
              f"--width={args.width}", f"--batch-size={args.batch_size}", f"--matvecs={args.matvecs}"]
    rows = {}
    for case in CASES:
        done = subprocess.run([sys.executable, __file__, *passed, "--case", case], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
        rows[case] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{case}: {rows[case]['growth_bytes'] / 2**20:.1f} MiB in {rows[case]['seconds']:.1f} s", flush=True)
    reference = rows["batch"]["growth_bytes"]
    first = rows["batch"]
    print(f"{platform.node()} torch {torch.__version__} {args.device}; dataset {first['examples']} images "
          f"({first['dataset_bytes'] / 2**20:.0f} MiB) = 10x memory_budget {args.budget_mib} MiB; batch "
          f"{args.batch_size} ({args.batch_size * 3 * args.size**2 * 4 / 2**20:.1f} MiB of input)")
    product = rows["hvp"]["growth_bytes"]
    print("| analysis | peak growth MiB | x one batch fwd+bwd | x one batch HVP | s |\n|---|---:|---:|---:|---:|")
    for case, row in rows.items():
        print(f"| {LABELS[case]} | {row['growth_bytes'] / 2**20:.1f} | {row['growth_bytes'] / reference:.2f} | "
              f"{row['growth_bytes'] / product:.2f} | {row['seconds']:.1f} |")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
