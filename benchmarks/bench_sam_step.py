"""Time one training step of SGD, every SAM variant and a naive Python-loop SAM, side by side.

Full step: ResNet-20 on a CIFAR-shaped batch (128 x 3 x 32 x 32) on the CPU, or WRN-16-8 with bf16
autocast on a GPU (``--device cuda``). Every optimizer runs in the same process, in interleaved rounds
(the order rotates each round), and the report gives the median step time and its ratio to SGD. The
floor for SAM is 2.0: two forward-backward passes.

With ``--compile``, SGD and SAM also run with the model under ``torch.compile`` (as ``train --compile``
does), side by side with the eager ones in the same rounds; each compiled step's ratio is to the compiled
SGD step. Base optimizers take the trainer's update: fused on CUDA, foreach on the CPU; on CUDA the model
and batch are channels-last, as the trainer's defaults there.

Perturbation overhead: ``first_step`` + ``restore`` alone on the model's parameters with a fixed random
gradient, the library's fused ``torch._foreach_*`` implementation against the per-parameter loop.

Usage::

    python benchmarks/bench_sam_step.py                      # CPU, ResNet-20
    python benchmarks/bench_sam_step.py --device cuda        # GPU, WRN-16-8, bf16
    python benchmarks/bench_sam_step.py --compile            # eager and compiled side by side
    python benchmarks/bench_sam_step.py --quick              # toy size: a smoke run in seconds
    python benchmarks/bench_sam_step.py --json out.json      # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _timing import time_steps
from sam.models import build_model
from sam.optim import create
from sam.step import train_step
from sam.trainer import optimizer_update_kwargs


class LoopSAM:
    """The straightforward baseline: SAM written as Python loops over the parameters.

    This is how SAM is usually written by hand (e.g. the popular davda54/sam): per-parameter norms,
    a per-parameter ``e_w`` allocated every step, and a host-side loop for every operation.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05) -> None:
        self.base = base
        self.rho = rho
        self.param_groups = base.param_groups
        self.old: dict[torch.Tensor, torch.Tensor] = {}

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self) -> None:
        grad_norm = torch.norm(torch.stack([p.grad.norm(2) for p in self.params()]), 2)
        scale = self.rho / (grad_norm + 1e-12)
        for p in self.params():
            self.old[p] = p.data.clone()
            p.add_(p.grad * scale)

    @torch.no_grad()
    def second_step(self) -> None:
        for p in self.params():
            p.data = self.old[p]
        self.base.step()

    def zero_grad(self) -> None:
        self.base.zero_grad(set_to_none=True)


def loop_sam_step(model, optimizer: LoopSAM, x, y, autocast_dtype) -> None:
    def forward_backward():
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    optimizer.zero_grad()
    forward_backward()
    optimizer.first_step()
    optimizer.zero_grad()
    forward_backward()
    optimizer.second_step()


VARIANTS: dict[str, dict] = {
    "sgd": {},
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5},
    "msam (m=32)": {"rho": 0.05, "m": 32},
    "gsam": {"rho": 0.05, "alpha": 0.4},
    "multistep_sam (2 steps)": {"rho": 0.05, "steps": 2},
    "every_k_sam (k=2)": {"rho": 0.05, "k": 2},
}


def _registry_name(label: str) -> str:
    return label.split(" ")[0]




def bench_full_step(args: argparse.Namespace, device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if cuda else None
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    update = optimizer_update_kwargs(device)  # the trainer's choice
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    steps: dict[str, Callable[[], None]] = {}
    periods: dict[str, int] = {}
    variants = {f"{label} compiled": kwargs for label, kwargs in VARIANTS.items() if label in ("sgd", "sam")
                } if args.compile else {}
    for label, kwargs in {**VARIANTS, **variants}.items():
        torch.manual_seed(0)
        model = build_model(args.model).to(device, memory_format=memory_format)
        optimizer = create(_registry_name(label), model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                           **update, **kwargs)
        network = torch.compile(model) if label.endswith("compiled") else model
        # every_k_sam alternates SAM and plain steps: time a whole period so that the median is fair.
        period = kwargs.get("k", 1)
        steps[label] = (
            lambda m=network, o=optimizer, n=period: [
                train_step(m, o, F.cross_entropy, x, y, autocast_dtype=autocast_dtype) for _ in range(n)
            ]
        )
        periods[label] = period
    torch.manual_seed(0)
    loop_model = build_model(args.model).to(device)
    loop = LoopSAM(torch.optim.SGD(loop_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4))
    steps["loop SAM (baseline)"] = lambda: loop_sam_step(loop_model, loop, x, y, autocast_dtype)

    times = time_steps(steps, device, args.warmup, args.rounds)
    rows = []
    for name, values in times.items():
        median = statistics.median(values) / periods.get(name, 1)
        sgd = statistics.median(times["sgd compiled" if name.endswith("compiled") else "sgd"])  # period 1
        rows.append({
            "optimizer": name,
            "median_s": median,
            "ratio_to_sgd": median / sgd,
            "images_per_s": args.batch_size / median,
        })
    return rows


def bench_perturbation(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for model_name in args.overhead_models:
        torch.manual_seed(0)
        model = build_model(model_name).to(device)
        params = list(model.parameters())
        grads = [torch.randn_like(p) for p in params]

        def set_grads():
            for p, g in zip(params, grads):
                p.grad = g.clone() if p.grad is None else p.grad.copy_(g)

        fused = create("sam", params, lr=0.0, rho=0.05)
        loop = LoopSAM(torch.optim.SGD(params, lr=0.0), rho=0.05)
        set_grads()

        def fused_step():
            fused.first_step()
            fused.restore()

        def loop_step():
            loop.first_step()
            with torch.no_grad():
                for p in loop.params():
                    p.data = loop.old[p]

        times = time_steps({"foreach (sam.optim.SAM)": fused_step, "python loop": loop_step}, device, 3, args.overhead_rounds)
        fused_median = statistics.median(times["foreach (sam.optim.SAM)"])
        loop_median = statistics.median(times["python loop"])
        rows.append({
            "model": model_name,
            "tensors": len(params),
            "parameters": sum(p.numel() for p in params),
            "foreach_ms": 1e3 * fused_median,
            "loop_ms": 1e3 * loop_median,
            "loop_over_foreach": loop_median / fused_median,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="default: resnet20 on CPU, wrn16_8 on CUDA")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--overhead-models", nargs="+", default=["resnet20", "wrn16_8"])
    parser.add_argument("--overhead-rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--compile", action="store_true", help="also time SGD and SAM under torch.compile")
    parser.add_argument("--quick", action="store_true", help="batch 16, 2 rounds, ResNet-20 only: a smoke run")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.model = args.model or ("wrn16_8" if device.type == "cuda" else "resnet20")
    if args.quick:
        args.model, args.batch_size, args.warmup, args.rounds = "resnet20", 16, 1, 2
        args.overhead_models, args.overhead_rounds = ["resnet20"], 3
    if args.threads:
        torch.set_num_threads(args.threads)

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "batch_size": args.batch_size,
        "autocast": "bf16" if device.type == "cuda" else "none",
        "memory_format": "channels_last" if device.type == "cuda" else "contiguous",
        "optimizer_update": "fused" if device.type == "cuda" else "foreach",
    }
    print(json.dumps(env))
    full = bench_full_step(args, device)
    print(f"\nFull training step ({args.model}, batch {args.batch_size}, {env['autocast']} autocast, median of {args.rounds})")
    print(f"{'optimizer':<26}{'median s':>10}{'x SGD':>8}{'img/s':>10}")
    for row in full:
        print(f"{row['optimizer']:<26}{row['median_s']:>10.4f}{row['ratio_to_sgd']:>8.2f}{row['images_per_s']:>10.1f}")
    overhead = bench_perturbation(args, device)
    print(f"\nPerturbation overhead: first_step + restore, median of {args.overhead_rounds}")
    print(f"{'model':<10}{'tensors':>8}{'params':>12}{'foreach ms':>12}{'loop ms':>10}{'loop/foreach':>14}")
    for row in overhead:
        print(f"{row['model']:<10}{row['tensors']:>8}{row['parameters']:>12}{row['foreach_ms']:>12.3f}{row['loop_ms']:>10.3f}{row['loop_over_foreach']:>14.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "full_step": full, "perturbation": overhead}, f, indent=2)


if __name__ == "__main__":
    main()
