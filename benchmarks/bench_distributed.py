"""Time data-parallel training steps under DDP: SGD, SAM with per-replica and with synchronised eps.

Run under ``torchrun`` (or as a plain script for the one-process baseline)::

    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py            # CPU, Gloo, ResNet-20
    torchrun --nproc_per_node 8 benchmarks/bench_distributed.py --device cuda   # GPUs, NCCL, WRN-16-8 bf16
    python benchmarks/bench_distributed.py                                  # one process, same global batch

Each process trains its share of one fixed global batch (CIFAR-shaped, random) with three contenders
side by side, each with its own copy of the model in DDP, timed in interleaved rounds: SGD (one pass,
one all-reduce: the data-parallel floor), SAM with per-replica perturbations (pass 1 under ``no_sync``:
two passes, one all-reduce) and SAM with ``sync_perturbation`` (two passes, two all-reduces). A DDP
communication hook counts the bytes each step all-reduces. Rank 0 prints median step times, their
ratios to SGD, global images per second and bytes per step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from _timing import time_steps
from sam import distributed
from sam.models import build_model
from sam.optim import create
from sam.step import train_step

CONTENDERS = {"sgd": ("sgd", False), "sam per-replica": ("sam", False), "sam synced": ("sam", True)}


def _counting_hook(counter, bucket):  # type: ignore[no-untyped-def]  # DDP checks real (not string) annotations
    """DDP's default all-reduce, counting the bytes of each bucket."""
    counter["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="default: resnet20 on the CPU, wrn16_8 on a GPU")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default 128 CPU, 1024 GPU)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the numbers to this file (rank 0)")
    args = parser.parse_args()

    distributed.init_from_env(args.device)
    device = distributed.device_for(args.device)
    replicas, rank = distributed.world_size(), distributed.rank()
    model_name = args.model or ("wrn16_8" if device.type == "cuda" else "resnet20")
    batch = args.batch_size or (1024 if device.type == "cuda" else 128)
    if batch % replicas:
        raise SystemExit(f"--batch-size {batch} must be divisible by the number of processes {replicas}")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    share = distributed.shard(batch)
    x, y = x[share].to(device), y[share].to(device)

    steps, bytes_per_step = {}, {}
    for label, (name, sync) in CONTENDERS.items():
        torch.manual_seed(0)
        model = build_model(model_name, num_classes=10, in_channels=3).to(device).train()
        optimizer = create(name, model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        counter = {"bytes": 0}
        network = model
        if distributed.active():
            network = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            network.register_comm_hook(counter, _counting_hook)

        def step(network: Any = network, optimizer: Any = optimizer, sync: bool = sync) -> None:
            train_step(network, optimizer, F.cross_entropy, x, y, autocast_dtype=autocast, sync_perturbation=sync)

        step()
        bytes_per_step[label] = counter["bytes"]
        steps[label] = step
    times = time_steps(steps, device, warmup=args.warmup, rounds=args.rounds)
    medians = {k: statistics.median(v) for k, v in times.items()}
    if rank != 0:
        return
    report: dict[str, Any] = {
        "processes": replicas,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads_per_process": torch.get_num_threads(),
        "model": model_name,
        "global_batch": batch,
        "torch": torch.__version__,
        "contenders": {
            label: {
                "median_step_s": medians[label],
                "vs_sgd": medians[label] / medians["sgd"],
                "images_per_s": batch / medians[label],
                "allreduce_bytes_per_step": bytes_per_step[label],
            }
            for label in CONTENDERS
        },
    }
    print(f"{replicas} process(es) x {report['threads_per_process']} thread(s), {model_name}, global batch {batch}, "
          f"{report['device']}")
    print(f"{'contender':<18}{'step (s)':>10}{'vs SGD':>9}{'images/s':>10}{'all-reduced MB/step':>22}")
    for label, row in report["contenders"].items():
        print(f"{label:<18}{row['median_step_s']:>10.4f}{row['vs_sgd']:>9.2f}{row['images_per_s']:>10.0f}"
              f"{row['allreduce_bytes_per_step'] / 1e6:>22.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
