"""Top Hessian eigenvalues of a trained digits CNN: our Lanczos against PyHessian and SciPy eigsh.

Everything runs on the same trained network and the same objective, in one process: the full digits
training split (1437 examples), the model in eval mode, mean cross-entropy. The reference eigenvalues
come from our thick-restart Lanczos on the float64 Hessian with a tight residual tolerance (default
``1e-10``, ``confirm=True``; ``--quick`` uses float32 and ``1e-5``, still far below the target error).
Our objective is evaluated as one batch of the whole training set (``--batch-size``), like PyHessian's.

Eigensolvers. For top-1 and top-5, each contender is run on the float32 Hessian with a sweep of its own
stopping tolerance, loosest first, until the returned eigenvalues reach the target relative error
(default ``max_i |theta_i - lambda_i| / |lambda_i| <= 1e-3`` against the reference). The report gives
the cheapest run that reached the target (its tolerance, Hessian-vector products and wall time) and
the ratios to our Lanczos. A sweep stops early when a run exhausted its budget (a tighter tolerance
cannot help), and then reports "not reached within N matvecs".

* ``lanczos``: :func:`landscape.lanczos.top_eigenpairs` (``which="LA"``) on the
  :class:`~landscape.objective.HessianOperator`; its count includes the ``k`` products of its explicit
  residual check.
* ``eigsh``: ``scipy.sparse.linalg.eigsh`` (ARPACK) on ``op.to_scipy()``, the same operator, scipy's
  default ``ncv``; products counted by the operator.
* ``pyhessian``: ``pyhessian.hessian(model, criterion, data=(X, y)).eigenvalues(maxIter, tol, top_n)``,
  power iteration with deflation (Yao et al. 2020), the whole training set as its single batch. Its
  products are counted by wrapping ``hessian_vector_product`` (and ``dataloader_hv_product``) in
  ``pyhessian.hessian``'s namespace: in the single-batch mode each call is one product over the full
  training set, so the counts compare one to one with ours. The wall time includes its constructor
  (one forward pass and a backward pass with ``create_graph=True``, whose graph it keeps in memory and
  re-differentiates for every product; possible here because the dataset fits in one batch).
  Its deflated eigenvalues are sorted before the comparison.

Wall times are of single runs (``--repeats N`` re-runs each winner N more times, interleaved, and
reports the median); matvec counts are deterministic for a given ``--seed``.

HVP cost. One full-dataset gradient (``Objective.gradient``), one Hessian-vector product by
forward-over-reverse (``jvp``) and one by double backward, timed in interleaved rounds (medians, after
a warm-up), with PyHessian's products for reference; the ratios HVP / gradient, and the method that
``Objective(hvp_method="auto")`` picks for this model.

Usage::

    pip install -e ".[bench]"                               # PyHessian
    python benchmarks/bench_hessian.py                      # CPU, full sweep (trains the CNN once, ~6 min)
    python benchmarks/bench_hessian.py --quick              # 3-epoch model, coarse sweep (~2 min)
    python benchmarks/bench_hessian.py --device cuda        # GPU
    python benchmarks/bench_hessian.py --run-dir runs/sgd   # an existing run (sam-landscape train)
    python benchmarks/bench_hessian.py --json out.json      # also write the numbers
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from torch import nn

from landscape.lanczos import top_eigenpairs
from landscape.objective import HessianOperator, Objective
from _cached_run import add_run_arguments, trained_run
from _timing import synchronize, time_steps

FULL_TOLS = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5]
QUICK_TOLS = [1e-1, 1e-2, 1e-3, 1e-4]
METHODS = ("lanczos", "eigsh", "pyhessian")
LABELS = {"lanczos": "lanczos (ours)", "eigsh": "scipy eigsh", "pyhessian": "pyhessian power"}


# --------------------------------------------------------------------------- #
# The trained model
# --------------------------------------------------------------------------- #

# --------------------------------------------------------------------------- #
# PyHessian, instrumented
# --------------------------------------------------------------------------- #
class PyHessianCounter:
    """Counts PyHessian's full-dataset Hessian-vector products and its power iterations per eigenvalue.

    ``pyhessian.hessian.hessian.eigenvalues`` calls ``hessian_vector_product`` (single batch, ``data=``) or
    ``self.dataloader_hv_product`` (a loop over every batch of ``dataloader=``) once per iteration; both
    are looked up at call time, so wrapping the module global and the method counts every product. In
    both modes one call is one product with the Hessian of the whole dataset. ``orthnormal(v, found)``
    runs once per iteration with the eigenvectors found so far, which gives the iterations per eigenvalue
    (to tell when ``maxIter`` cut an eigenvalue off).
    """

    def __init__(self) -> None:
        self.module = importlib.import_module("pyhessian.hessian")  # `pyhessian.hessian` is the class
        self.hvps = 0
        self.iterations: list[int] = []
        hvp, dataloader_hvp, orthnormal = (self.module.hessian_vector_product,
                                           self.module.hessian.dataloader_hv_product, self.module.orthnormal)

        @functools.wraps(hvp)
        def counted_hvp(*a, **kw):
            self.hvps += 1
            return hvp(*a, **kw)

        @functools.wraps(dataloader_hvp)
        def counted_dataloader_hvp(*a, **kw):
            self.hvps += 1
            return dataloader_hvp(*a, **kw)

        @functools.wraps(orthnormal)
        def counted_orthnormal(w, v_list):
            index = len(v_list)
            while len(self.iterations) <= index:
                self.iterations.append(0)
            self.iterations[index] += 1
            return orthnormal(w, v_list)

        self.module.hessian_vector_product = counted_hvp
        self.module.hessian.dataloader_hv_product = counted_dataloader_hvp
        self.module.orthnormal = counted_orthnormal
        self.raw_hvp = hvp

    def reset(self) -> None:
        self.hvps = 0
        self.iterations = []


# PyHessian calls ``loss.backward(create_graph=True)``; torch warns about the parameter <-> gradient cycle,
# which is broken here by ``model.zero_grad(set_to_none=True)`` after every use.
_CREATE_GRAPH_WARNING = r"Using backward\(\) with create_graph=True"


def pyhessian_instance(model: nn.Module, criterion: nn.Module, X: torch.Tensor, y: torch.Tensor, device: torch.device,
                       dataloader: bool = False):
    import pyhessian

    # PyHessian reads p.grad after its backward: a stale gradient (with its graph) would be added in.
    model.zero_grad(set_to_none=True)
    if dataloader:  # one batch holding the whole training set
        return pyhessian.hessian(model, criterion, dataloader=[(X, y)], cuda=device.type == "cuda")
    return pyhessian.hessian(model, criterion, data=(X, y), cuda=device.type == "cuda")


# --------------------------------------------------------------------------- #
# One eigensolver run
# --------------------------------------------------------------------------- #
@dataclass
class Attempt:
    method: str
    k: int
    tol: float
    eigenvalues: list[float]
    n_matvecs: int
    wall_s: float
    stopped: bool  # the method's own stopping test fired (False: its budget ran out)
    error: float = math.inf
    reached: bool = False
    extra: dict = field(default_factory=dict)


def relative_error(values: list[float], reference: np.ndarray) -> float:
    """``max_i |theta_i - lambda_i| / |lambda_i|`` over the ``k`` wanted, both sorted descending."""
    k = len(reference)
    if len(values) < k or not all(math.isfinite(v) for v in values):
        return math.inf
    theta = np.sort(np.asarray(values, dtype=np.float64))[::-1][:k]
    return float(np.max(np.abs(theta - reference) / np.abs(reference)))


class Contenders:
    def __init__(self, args: argparse.Namespace, op: HessianOperator, model: nn.Module, criterion: nn.Module,
                 X: torch.Tensor, y: torch.Tensor, counter: PyHessianCounter) -> None:
        self.args, self.op, self.model, self.criterion, self.X, self.y = args, op, model, criterion, X, y
        self.counter = counter
        self.device = torch.device(args.device)

    def run(self, method: str, k: int, tol: float) -> Attempt:
        return getattr(self, f"_{method}")(k, tol)

    def _lanczos(self, k: int, tol: float) -> Attempt:
        synchronize(self.device)
        start = time.perf_counter()
        result = top_eigenpairs(self.op, k=k, which="LA", tol=tol, max_matvecs=self.args.max_matvecs, seed=self.args.seed)
        synchronize(self.device)
        wall = time.perf_counter() - start
        return Attempt("lanczos", k, tol, result.eigenvalues.tolist(), result.n_matvecs, wall, result.converged,
                       extra={"restarts": result.n_restarts})

    def _eigsh(self, k: int, tol: float) -> Attempt:
        n = self.op.shape[0]
        ncv = min(n, max(2 * k + 1, 20))  # scipy's default, to size the restart budget
        maxiter = max(1, self.args.max_matvecs // (ncv - k))
        v0 = torch.randn(n, generator=torch.Generator().manual_seed(self.args.seed), dtype=torch.float64).numpy()
        before = self.op.n_matvecs
        synchronize(self.device)
        start = time.perf_counter()
        stopped = True
        try:
            theta = scipy.sparse.linalg.eigsh(self.op.to_scipy(), k=k, which="LA", tol=tol, v0=v0, ncv=ncv,
                                              maxiter=maxiter, return_eigenvectors=False)
        except scipy.sparse.linalg.ArpackNoConvergence as err:
            theta, stopped = err.eigenvalues, False
        synchronize(self.device)
        wall = time.perf_counter() - start
        return Attempt("eigsh", k, tol, sorted(np.asarray(theta, dtype=np.float64).tolist(), reverse=True),
                       self.op.n_matvecs - before, wall, stopped)

    def _pyhessian(self, k: int, tol: float) -> Attempt:
        max_iter = self.args.pyhessian_max_iter
        torch.manual_seed(self.args.seed)  # PyHessian draws its start vectors from the global generator
        synchronize(self.device)
        start = time.perf_counter()
        h = pyhessian_instance(self.model, self.criterion, self.X, self.y, self.device)
        self.counter.reset()
        values, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        synchronize(self.device)
        wall = time.perf_counter() - start
        iterations = list(self.counter.iterations)
        hvps = self.counter.hvps
        del h
        self.model.zero_grad(set_to_none=True)  # drop the gradient graph PyHessian left behind
        stopped = len(iterations) == k and all(i < max_iter for i in iterations)
        return Attempt("pyhessian", k, tol, sorted((float(v) for v in values), reverse=True), hvps, wall, stopped,
                       extra={"iterations_per_eigenvalue": iterations, "returned_order": [float(v) for v in values]})


def sweep(contenders: Contenders, method: str, k: int, tols: list[float], reference: np.ndarray, target: float) -> list[Attempt]:
    """Run ``method`` from the loosest tolerance to the tightest; stop at the first that reaches ``target``."""
    attempts = []
    for tol in tols:
        attempt = contenders.run(method, k, tol)
        attempt.error = relative_error(attempt.eigenvalues, reference[:k])
        attempt.reached = attempt.error <= target
        attempts.append(attempt)
        note = "" if attempt.stopped else "  (budget exhausted)"
        print(f"  top-{k} {LABELS[method]:<16} tol {tol:<7.0e} matvecs {attempt.n_matvecs:>5}  "
              f"{attempt.wall_s:>7.2f} s  max rel err {attempt.error:.2e}{'  reached' if attempt.reached else ''}{note}",
              flush=True)
        if attempt.reached or not attempt.stopped:
            break
    return attempts


def best_of(attempts: list[Attempt]) -> Attempt | None:
    reached = [a for a in attempts if a.reached]
    return min(reached, key=lambda a: (a.n_matvecs, a.wall_s)) if reached else None


# --------------------------------------------------------------------------- #
# HVP cost
# --------------------------------------------------------------------------- #
def bench_hvp(args: argparse.Namespace, objective: Objective, model: nn.Module, criterion: nn.Module,
              X: torch.Tensor, y: torch.Tensor, counter: PyHessianCounter) -> list[dict]:
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    v = {k: torch.randn(t.shape, generator=generator).to(t) for k, t in objective.params.items()}
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    v_list = [v[name] for name in names]
    steps: dict[str, Callable[[], object]] = {
        "gradient": objective.gradient,
        "hvp jvp": lambda: objective.hvp(v, method="jvp"),
        "hvp double_backward": lambda: objective.hvp(v, method="double_backward"),
        # the gradient graph is built once (timed on its own row below) and kept between products
        "hvp graph": lambda: objective.hvp(v, method="graph"),
        "graph setup (grad, create_graph)": lambda: (setattr(objective, "_graph", None), objective.hvp(v, method="graph")),
    }
    try:  # a model with an op without forward-mode AD
        objective.hvp(v, method="jvp")
    except (RuntimeError, NotImplementedError) as err:
        print(f"jvp HVP unavailable for this model: {err}")
        del steps["hvp jvp"]
    single = pyhessian_instance(model, criterion, X, y, device)
    loader = pyhessian_instance(model, criterion, X, y, device, dataloader=True)
    raw_hvp = counter.raw_hvp
    steps["pyhessian setup (grad, create_graph)"] = lambda: pyhessian_instance(model, criterion, X, y, device)
    steps["pyhessian hvp (graph kept)"] = lambda: raw_hvp(single.gradsH, single.params, v_list)
    steps["pyhessian hvp (dataloader)"] = lambda: loader.dataloader_hv_product(v_list)
    times = time_steps(steps, device, args.warmup, args.hvp_rounds)
    del single, loader
    model.zero_grad(set_to_none=True)
    gradient = statistics.median(times["gradient"])
    return [{"step": name, "median_s": statistics.median(t), "ratio_to_gradient": statistics.median(t) / gradient}
            for name, t in times.items()]


def check_same_objective(objective: Objective, model: nn.Module, criterion: nn.Module, X: torch.Tensor,
                         y: torch.Tensor, counter: PyHessianCounter, seed: int) -> dict:
    """Loss and one HVP from both libraries: they must describe the same function."""
    device = torch.device(objective.device)
    h = pyhessian_instance(model, criterion, X, y, device)
    with torch.no_grad():
        theirs_loss = float(criterion(model(X.to(device)), y.to(device)))
    ours_loss = float(objective.loss())
    generator = torch.Generator().manual_seed(seed + 1)
    v = {k: torch.randn(t.shape, generator=generator).to(t) for k, t in objective.params.items()}
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    theirs = torch.cat([t.reshape(-1) for t in counter.raw_hvp(h.gradsH, h.params, [v[n] for n in names])])
    del h
    model.zero_grad(set_to_none=True)
    out = {"loss_ours": ours_loss, "loss_pyhessian": theirs_loss,
           "loss_rel_diff": abs(ours_loss - theirs_loss) / abs(ours_loss)}
    for method in ("double_backward", "jvp", "graph"):
        try:
            hv = objective.hvp(v, method=method)
        except (RuntimeError, NotImplementedError):
            continue
        ours = torch.cat([hv[n].reshape(-1) for n in names])
        out[f"hvp_rel_diff_{method}"] = float(torch.linalg.vector_norm(ours - theirs) / torch.linalg.vector_norm(theirs))
    return out


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #
def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="3-epoch model, tolerances 1e-1..1e-4, fewer timing rounds: a ~2 minute smoke run")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5], help="numbers of top eigenvalues")
    parser.add_argument("--target", type=float, default=1e-3, help="max relative eigenvalue error to reach")
    parser.add_argument("--tols", type=float, nargs="+", default=None, help="tolerance sweep, loosest first")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--max-matvecs", type=int, default=1000, help="budget of lanczos and eigsh per run")
    parser.add_argument("--pyhessian-max-iter", type=int, default=None,
                        help="PyHessian's maxIter (per eigenvalue; default 200, --quick: 100)")
    parser.add_argument("--reference-tol", type=float, default=None,
                        help="residual tolerance of the reference (default 1e-10 in float64, 1e-5 in float32)")
    parser.add_argument("--reference-dtype", choices=("float64", "float32"), default=None,
                        help="dtype of the reference Lanczos (default float64; --quick: float32, 4-6x cheaper on a CPU)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size of our objective (default: the whole training set, as PyHessian's data=)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="extra interleaved timing runs of each method's cheapest configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hvp-rounds", type=int, default=None, help="interleaved rounds of the HVP timing (default 7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    args.epochs = args.epochs or (3 if args.quick else 30)
    args.tols = sorted(args.tols or (QUICK_TOLS if args.quick else FULL_TOLS), reverse=True)
    args.pyhessian_max_iter = args.pyhessian_max_iter or (100 if args.quick else 200)
    args.hvp_rounds = args.hvp_rounds or (3 if args.quick else 7)
    args.reference_dtype = args.reference_dtype or ("float32" if args.quick else "float64")
    args.reference_tol = args.reference_tol or (1e-10 if args.reference_dtype == "float64" else 1e-5)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message=_CREATE_GRAPH_WARNING)
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        sys.exit("PyHessian is not installed: pip install -e '.[bench]'  (or pip install pyhessian==0.1)")
    wall_start = time.perf_counter()

    run = trained_run(args)
    model = run.model.eval()
    X, y = run.train.x.to(device), run.train.y.to(device)
    loss_fn = functools.partial(F.cross_entropy, label_smoothing=run.config.label_smoothing)
    criterion = nn.CrossEntropyLoss(label_smoothing=run.config.label_smoothing)
    batch_size = args.batch_size or X.shape[0]
    counter = PyHessianCounter()

    objective = Objective(model, loss_fn, (X, y), batch_size=batch_size, hvp_method="auto")
    op = objective.hessian_operator()
    train_loss, train_acc = objective.loss_and_accuracy()
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "pyhessian": importlib.metadata.version("pyhessian"),
        "threads": torch.get_num_threads(),
        "run_dir": str(run.run_dir),
        "checkpoint_sha256": run.checkpoint_sha256,
        "model": run.config.model,
        "optimizer": run.config.optimizer,
        "epochs": run.config.epochs,
        "parameters": objective.layout.size,
        "train_examples": objective.n_examples,
        "batches": objective.n_batches,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "hvp_method_auto": objective.hvp_method,
    }
    print(json.dumps(env), flush=True)
    same = check_same_objective(objective, model, criterion, X, y, counter, args.seed)
    diffs = ", ".join(f"{k.removeprefix('hvp_rel_diff_')} {v:.1e}" for k, v in same.items() if k.startswith("hvp_rel"))
    print(f"\nSame objective: loss ours {same['loss_ours']:.6g}, PyHessian {same['loss_pyhessian']:.6g} "
          f"(rel diff {same['loss_rel_diff']:.1e}); ||Hv ours - Hv PyHessian|| / ||Hv PyHessian||: {diffs}", flush=True)

    # Reference: Lanczos (float64), tight tolerance, confirmed (no eigenvalue copy or missed direction).
    kmax = max(args.ks)
    print(f"\ncomputing the reference ({args.reference_dtype}, tol {args.reference_tol:.0e}) ...", flush=True)
    start = time.perf_counter()
    ref_objective = Objective(model, loss_fn, (X, y), batch_size=batch_size, dtype=getattr(torch, args.reference_dtype),
                              hvp_method=objective.hvp_method)
    ref_result = top_eigenpairs(ref_objective.hessian_operator(), k=kmax, which="LA", tol=args.reference_tol,
                                seed=args.seed + 1, confirm=True, max_matvecs=max(1000, 40 * kmax))
    reference = ref_result.eigenvalues.numpy()
    ref_info = {
        "eigenvalues": reference.tolist(),
        "relative_residuals": ref_result.relative_residuals.tolist(),
        "converged": ref_result.converged,
        "n_matvecs": ref_result.n_matvecs,
        "tol": args.reference_tol,
        "dtype": args.reference_dtype,
        "wall_s": time.perf_counter() - start,
    }
    print(f"\nReference: {args.reference_dtype} Lanczos, tol {args.reference_tol:.0e}, confirm=True "
          f"({ref_result.n_matvecs} matvecs, {ref_info['wall_s']:.1f} s, converged={ref_result.converged})")
    for i, (lam, rr) in enumerate(zip(reference, ref_info["relative_residuals"]), 1):
        print(f"  lambda_{i} = {lam:.10g}   (relative residual {rr:.1e})")
    del ref_objective
    if not ref_result.converged:
        print("WARNING: the reference did not converge; errors below are relative to unconverged values")

    # Eigensolvers: tolerance sweeps.
    contenders = Contenders(args, op, model, criterion, X, y, counter)
    print(f"\nTolerance sweeps (target: max relative eigenvalue error <= {args.target:.0e})", flush=True)
    sweeps: dict[tuple[int, str], list[Attempt]] = {}
    for k in args.ks:
        for method in args.methods:
            sweeps[(k, method)] = sweep(contenders, method, k, args.tols, reference, args.target)

    # Optional extra timing runs of each winner, interleaved across methods.
    winners = {key: best_of(attempts) for key, attempts in sweeps.items()}
    walls = {key: [w.wall_s] for key, w in winners.items() if w is not None}
    if args.repeats:
        keys = list(walls)
        for r in range(args.repeats):
            for key in keys[r % len(keys):] + keys[: r % len(keys)]:
                walls[key].append(contenders.run(key[1], key[0], winners[key].tol).wall_s)

    rows = []
    for k in args.ks:
        ours = winners.get((k, "lanczos"))
        for method in args.methods:
            attempts = sweeps[(k, method)]
            best = winners[(k, method)]
            if best is None:
                last = attempts[-1]
                rows.append({"k": k, "method": method, "reached": False, "tol": None, "n_matvecs": None,
                             "wall_s": None, "error": min(a.error for a in attempts),
                             "max_matvecs_tried": max(a.n_matvecs for a in attempts),
                             "note": f"not reached within {last.n_matvecs} matvecs (tightest tol tried {last.tol:.0e})"})
                continue
            wall = statistics.median(walls[(k, method)])
            rows.append({
                "k": k, "method": method, "reached": True, "tol": best.tol, "n_matvecs": best.n_matvecs,
                "wall_s": wall, "wall_s_all": walls[(k, method)], "error": best.error,
                "s_per_matvec": wall / best.n_matvecs,
                "matvecs_vs_ours": best.n_matvecs / ours.n_matvecs if ours else None,
                "wall_vs_ours": wall / statistics.median(walls[(k, "lanczos")]) if ours else None,
                "eigenvalues": best.eigenvalues, **best.extra,
            })

    print(f"\nTop-k to max relative error <= {args.target:.0e}: the cheapest run of each sweep "
          f"(wall: median of {1 + args.repeats})")
    print(f"{'k':>2}  {'method':<17}{'tol':>8}{'matvecs':>9}{'x ours':>8}{'wall s':>9}{'x ours':>8}{'s/matvec':>10}{'rel err':>10}")
    for row in rows:
        if not row["reached"]:
            print(f"{row['k']:>2}  {LABELS[row['method']]:<17}  {row['note']}; best error {row['error']:.1e}")
            continue
        print(f"{row['k']:>2}  {LABELS[row['method']]:<17}{row['tol']:>8.0e}{row['n_matvecs']:>9}"
              f"{_fmt_ratio(row['matvecs_vs_ours']):>8}{row['wall_s']:>9.2f}{_fmt_ratio(row['wall_vs_ours']):>8}"
              f"{row['s_per_matvec']:>10.3f}{row['error']:>10.1e}")

    # HVP cost against one gradient.
    hvp_rows = bench_hvp(args, objective, model, criterion, X, y, counter)
    print(f"\nFull-dataset cost ({objective.n_examples} examples, {objective.n_batches} batch(es); "
          f"median of {args.hvp_rounds}, interleaved)")
    print(f"{'step':<38}{'median s':>10}{'x gradient':>12}")
    for row in hvp_rows:
        print(f"{row['step']:<38}{row['median_s']:>10.4f}{row['ratio_to_gradient']:>12.2f}")
    ours_hvp = {r["step"].removeprefix("hvp "): r for r in hvp_rows if r["step"].startswith("hvp ")}
    fastest = min(ours_hvp, key=lambda m: ours_hvp[m]["median_s"])
    print(f"Objective(hvp_method='auto') picks {objective.hvp_method!r} (timed on the first batch); "
          f"fastest here over the full dataset: {fastest!r}")

    # The goals.
    goals = {}
    top = max(args.ks)
    ours_top, theirs_top = winners.get((top, "lanczos")), winners.get((top, "pyhessian"))
    if ours_top is not None and "pyhessian" in args.methods:
        limit = (theirs_top.n_matvecs if theirs_top else max(a.n_matvecs for a in sweeps[(top, "pyhessian")])) / 3
        met = ours_top.n_matvecs <= limit
        # PyHessian not reaching the target: it needs more than it used, so only `met` is decided.
        goals["topk_matvecs"] = {
            "k": top, "ours": ours_top.n_matvecs, "pyhessian": theirs_top.n_matvecs if theirs_top else None,
            "pyhessian_reached": theirs_top is not None, "limit": limit, "met": met if (theirs_top or met) else None,
        }
        g = goals["topk_matvecs"]
        theirs_text = (f"PyHessian {g['pyhessian']}" if theirs_top
                       else f"PyHessian did not reach the target within {3 * limit:.0f}")
        verdict = {True: "met", False: "NOT met", None: "undecided (raise --pyhessian-max-iter or add tighter --tols)"}
        print(f"\nGoal top-{top} matvecs <= PyHessian / 3: ours {g['ours']}, {theirs_text} -> {verdict[g['met']]}")
    picked = ours_hvp.get(objective.hvp_method)
    if picked is not None:
        goals["hvp_over_gradient"] = {"method": objective.hvp_method, "ratio": picked["ratio_to_gradient"],
                                      "limit": 3.0, "met": picked["ratio_to_gradient"] <= 3.0}
        print(f"Goal HVP <= 3x gradient: {objective.hvp_method} {picked['ratio_to_gradient']:.2f}x "
              f"-> {'met' if goals['hvp_over_gradient']['met'] else 'NOT met'}")
    total = time.perf_counter() - wall_start
    print(f"\nbenchmark wall time {total:.0f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "env": env,
                "settings": {k: v for k, v in vars(args).items() if k != "json"},
                "same_objective": same,
                "reference": ref_info,
                "attempts": [asdict(a) for attempts in sweeps.values() for a in attempts],
                "results": rows,
                "hvp_cost": hvp_rows,
                "hvp_method_auto": objective.hvp_method,
                "hvp_method_fastest": fastest,
                "goals": goals,
                "benchmark_wall_s": total,
            }, f, indent=2, default=float)


if __name__ == "__main__":
    main()
