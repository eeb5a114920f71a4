"""The trained digits CNN the benchmarks share: an existing run, or one trained once into a cache."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sam.trainer import LoadedRun, TrainConfig, load_run, train

__all__ = ["DEFAULT_CACHE", "add_run_arguments", "trained_run"]

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "sam-landscape-bench"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--run-dir`` and ``--epochs``: where the benchmark runs and which trained model it uses."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run-dir", default=None,
                        help=f"an existing run directory, or where to train one; default: {DEFAULT_CACHE}/digits-sgd")
    parser.add_argument("--epochs", type=int, default=None, help="epochs when training (default 30; --quick: 3)")


def trained_run(args: argparse.Namespace) -> LoadedRun:
    """An existing run from ``--run-dir``, or the digits CNN trained with SGD into the cache (reused)."""
    if args.run_dir is not None and Path(args.run_dir).exists():
        print(f"using the run in {args.run_dir}", flush=True)
        return load_run(args.run_dir, device=args.device)
    run_dir = Path(args.run_dir) if args.run_dir else DEFAULT_CACHE / ("digits-sgd-quick" if args.quick else "digits-sgd")
    config = TrainConfig(optimizer="sgd", epochs=args.epochs, device="cpu")
    start = time.perf_counter()
    train(config, run_dir, resume=True, progress=False)  # a finished run is left as it is
    print(f"trained model in {run_dir} ({config.epochs} epochs SGD; {time.perf_counter() - start:.1f} s, "
          "0 if it was cached)", flush=True)
    return load_run(run_dir, device=args.device)
