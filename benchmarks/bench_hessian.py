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

HVP cost (the issue's goal: one product at most 3x one full-dataset gradient). Timed on the training split
cut into batches of ``--hvp-batch-size`` (default 256: six batches, the multi-batch case) and as one batch,
each in interleaved rounds (medians, after a warm-up), every contender in the same process:

* ``gradient``: the baseline, a full-dataset gradient over the same batches the way one writes it by hand:
  ``(n_b / N * loss_fn(model(x_b), y_b)).backward()`` on the module, batch after batch;
* ``Objective.gradient``: ours (``torch.func.grad`` per batch), for reference;
* ``hvp jvp`` / ``hvp double_backward``: a full-dataset product recomputed batch by batch (a forward and
  two differentiations per batch), what streamed data use;
* ``hvp graph``: one backward pass through the kept gradient graph of every batch (what ``auto`` picks
  when that graph fits the memory budget); ``graph build`` is its one-off cost (a forward and a
  ``create_graph`` backward per batch, and one product), paid once per point;
* PyHessian's products over the same data (``dataloader=`` over the same batches, and for one batch its
  kept graph), when PyHessian is installed.

``Objective(hvp_method="auto")``'s choice (one timed product of each method on the first batch) and its
timings are reported beside the ratios; ``hvp_over_gradient_auto`` in the JSON is the ratio of the method
it picked on the multi-batch data. Wall times, and process CPU times (all threads) which a busy shared
machine inflates less.

Usage::

    pip install -e ".[bench]"                               # PyHessian (optional: its rows are left out without it)
    python benchmarks/bench_hessian.py                      # CPU, full sweep (trains the CNN once, ~6 min)
    python benchmarks/bench_hessian.py --quick              # toy size: 3-epoch model, 256 examples (< 1 min)
    python benchmarks/bench_hessian.py --hvp-only           # only the HVP cost
    python benchmarks/bench_hessian.py --device cuda        # GPU (~1 min after training)
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
from _timing import synchronize, timed_rounds

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


def pyhessian_instance(model: nn.Module, criterion: nn.Module, X: torch.Tensor | None, y: torch.Tensor | None,
                       device: torch.device, dataloader: list | None = None):
    """PyHessian on ``(X, y)`` as one batch (``data=``), or on the batches ``dataloader``."""
    import pyhessian

    # PyHessian reads p.grad after its backward: a stale gradient (with its graph) would be added in.
    model.zero_grad(set_to_none=True)
    if dataloader is not None:
        return pyhessian.hessian(model, criterion, dataloader=dataloader, cuda=device.type == "cuda")
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
def bench_hvp(args: argparse.Namespace, model: nn.Module, loss_fn: Callable, criterion: nn.Module, X: torch.Tensor,
              y: torch.Tensor, batch_size: int, counter: PyHessianCounter | None) -> dict:
    """One full-dataset product of every method against one full-dataset gradient over the same batches."""
    device = torch.device(args.device)
    start = time.perf_counter()
    objective = Objective(model, loss_fn, (X, y), batch_size=batch_size, hvp_method="auto")
    construction_s = time.perf_counter() - start
    batches = [(weight, batch) for weight, batch in objective.weighted_batches()]
    generator = torch.Generator().manual_seed(args.seed)
    v = {k: torch.randn(t.shape, generator=generator).to(t) for k, t in objective.params.items()}
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    v_list = [v[name] for name in names]

    def gradient() -> None:  # the baseline: what one writes by hand, on the module, over the same batches
        model.zero_grad(set_to_none=True)
        for weight, (x, t) in batches:
            (weight * loss_fn(model(x), t)).backward()

    def graph_build() -> None:
        objective._graph = None
        objective.hvp(v, method="graph")

    steps: dict[str, Callable[[], object]] = {"gradient": gradient, "Objective.gradient": objective.gradient}
    products = {}
    for method in ("jvp", "double_backward", "graph"):
        try:  # a model with an op without forward-mode AD or double backward
            products[method] = objective.hvp(v, method=method)
        except (RuntimeError, NotImplementedError) as err:
            print(f"{method} HVP unavailable for this model: {err}")
            continue
        steps[f"hvp {method}"] = functools.partial(objective.hvp, v, method=method)
    if "hvp graph" in steps:
        steps["graph build (+1 product)"] = graph_build
    if counter is not None:
        loader = pyhessian_instance(model, criterion, None, None, device, dataloader=[b for _, b in batches])
        steps["pyhessian hvp (dataloader)"] = lambda: loader.dataloader_hv_product(v_list)
        if len(batches) == 1:
            single = pyhessian_instance(model, criterion, X, y, device)
            raw_hvp = counter.raw_hvp
            steps["pyhessian hvp (graph kept)"] = lambda: raw_hvp(single.gradsH, single.params, v_list)
    times = timed_rounds(steps, device, args.warmup, args.hvp_rounds)
    model.zero_grad(set_to_none=True)
    objective._graph = None
    wall = {name: statistics.median(t["wall"]) for name, t in times.items()}
    cpu = {name: statistics.median(t["cpu"]) for name, t in times.items()}
    rows = [{"step": name, "median_s": wall[name], "median_cpu_s": cpu[name],
             "ratio_to_gradient": wall[name] / wall["gradient"], "cpu_ratio_to_gradient": cpu[name] / cpu["gradient"],
             "wall_s_all": times[name]["wall"]} for name in steps]
    reference = products.get("double_backward")
    agreement = {} if reference is None else {
        method: float(torch.linalg.vector_norm(torch.cat([(hv[n] - reference[n]).flatten() for n in names]))
                      / torch.linalg.vector_norm(torch.cat([reference[n].flatten() for n in names])))
        for method, hv in products.items()}
    ratio = {m: wall[f"hvp {m}"] / wall["gradient"] for m in products}
    cpu_ratio = {m: cpu[f"hvp {m}"] / cpu["gradient"] for m in products}
    auto = objective.hvp_method
    return {
        "batch_size": batch_size, "batches": objective.n_batches, "examples": objective.n_examples,
        "hvp_method_auto": auto, "hvp_choice": objective.hvp_choice.to_dict(), "construction_s": construction_s,
        "rows": rows, "hvp_over_gradient": ratio, "hvp_over_gradient_cpu": cpu_ratio,
        "hvp_over_gradient_auto": ratio[auto], "hvp_over_gradient_auto_cpu": cpu_ratio[auto],
        "graph_build_over_gradient": wall["graph build (+1 product)"] / wall["gradient"] if "hvp graph" in steps else None,
        "relative_difference_to_double_backward": agreement,
    }


def print_hvp(cost: dict, rounds: int) -> None:
    print(f"\nFull-dataset cost: {cost['examples']} examples in {cost['batches']} batch(es) of {cost['batch_size']}; "
          f"median of {rounds} interleaved rounds")
    print(f"{'step':<30}{'wall s':>9}{'x gradient':>12}{'cpu s':>9}{'x gradient':>12}")
    for row in cost["rows"]:
        print(f"{row['step']:<30}{row['median_s']:>9.4f}{row['ratio_to_gradient']:>12.2f}"
              f"{row['median_cpu_s']:>9.4f}{row['cpu_ratio_to_gradient']:>12.2f}")
    choice = cost["hvp_choice"]
    timings = ", ".join(f"{m} {s * 1e3:.1f} ms" for m, s in choice["seconds"].items())
    graph = ("" if choice["graph_bytes"] is None else
             f"; kept graph ~{choice['graph_bytes'] / 2**20:.1f} MiB of {choice['graph_budget'] / 2**20:.0f} MiB allowed")
    print(f"Objective(hvp_method='auto') picks {cost['hvp_method_auto']!r}: one product on {choice['probe_examples']} "
          f"examples: {timings}{graph} (construction {cost['construction_s']:.2f} s)")
    diffs = ", ".join(f"{m} {d:.1e}" for m, d in cost["relative_difference_to_double_backward"].items())
    print(f"||Hv - Hv(double_backward)|| / ||Hv(double_backward)||: {diffs}")


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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="toy size: the 3-epoch model on its first 256 examples, top-1 only, coarse tolerances, "
                             "3 timing rounds (< 1 minute on a CPU)")
    parser.add_argument("--hvp-only", action="store_true", help="only the HVP cost (no eigensolver sweeps)")
    parser.add_argument("--examples", type=int, default=None, help="use the first N training examples (--quick: 256)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="numbers of top eigenvalues (default 1 5; --quick: 1)")
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
                        help="batch size of the eigensolvers' objective (default: the whole training set, as PyHessian's data=)")
    parser.add_argument("--hvp-batch-size", type=int, default=None,
                        help="batch size of the multi-batch HVP cost (default 256: six batches; --quick: 64)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="extra interleaved timing runs of each method's cheapest configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hvp-rounds", type=int, default=None, help="interleaved rounds of the HVP timing (default 7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device takes cpu or cuda; got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.epochs = args.epochs or (3 if args.quick else 30)
    args.examples = args.examples or (256 if args.quick else None)
    args.ks = args.ks or ([1] if args.quick else [1, 5])
    args.tols = sorted(args.tols or (QUICK_TOLS if args.quick else FULL_TOLS), reverse=True)
    args.pyhessian_max_iter = args.pyhessian_max_iter or (100 if args.quick else 200)
    args.hvp_rounds = args.hvp_rounds or (3 if args.quick else 7)
    args.hvp_batch_size = args.hvp_batch_size or (64 if args.quick else 256)
    args.reference_dtype = args.reference_dtype or ("float32" if args.quick else "float64")
    args.reference_tol = args.reference_tol or (1e-10 if args.reference_dtype == "float64" else 1e-5)
    return args


def eigensolvers(args: argparse.Namespace, objective: Objective, model: nn.Module, loss_fn: Callable,
                 criterion: nn.Module, X: torch.Tensor, y: torch.Tensor, counter: PyHessianCounter | None) -> dict:
    """The reference eigenvalues, every contender's tolerance sweep, and the top-k goal."""
    methods = [m for m in args.methods if m != "pyhessian" or counter is not None]
    out: dict = {}
    if counter is not None:
        same = check_same_objective(objective, model, criterion, X, y, counter, args.seed)
        diffs = ", ".join(f"{k.removeprefix('hvp_rel_diff_')} {v:.1e}" for k, v in same.items() if k.startswith("hvp_rel"))
        print(f"\nSame objective: loss ours {same['loss_ours']:.6g}, PyHessian {same['loss_pyhessian']:.6g} "
              f"(rel diff {same['loss_rel_diff']:.1e}); ||Hv ours - Hv PyHessian|| / ||Hv PyHessian||: {diffs}",
              flush=True)
        out["same_objective"] = same

    # Reference: Lanczos (float64), tight tolerance, confirmed (no eigenvalue copy or missed direction).
    kmax = max(args.ks)
    print(f"\ncomputing the reference ({args.reference_dtype}, tol {args.reference_tol:.0e}) ...", flush=True)
    start = time.perf_counter()
    ref_objective = Objective(model, loss_fn, (X, y), batch_size=args.batch_size or X.shape[0],
                              dtype=getattr(torch, args.reference_dtype), hvp_method=objective.hvp_method)
    ref_result = top_eigenpairs(ref_objective.hessian_operator(), k=kmax, which="LA", tol=args.reference_tol,
                                seed=args.seed + 1, confirm=True, max_matvecs=max(1000, 40 * kmax))
    reference = ref_result.eigenvalues.numpy()
    out["reference"] = {
        "eigenvalues": reference.tolist(), "relative_residuals": ref_result.relative_residuals.tolist(),
        "converged": ref_result.converged, "n_matvecs": ref_result.n_matvecs, "tol": args.reference_tol,
        "dtype": args.reference_dtype, "wall_s": time.perf_counter() - start,
    }
    print(f"\nReference: {args.reference_dtype} Lanczos, tol {args.reference_tol:.0e}, confirm=True "
          f"({ref_result.n_matvecs} matvecs, {out['reference']['wall_s']:.1f} s, converged={ref_result.converged})")
    for i, (lam, rr) in enumerate(zip(reference, out["reference"]["relative_residuals"]), 1):
        print(f"  lambda_{i} = {lam:.10g}   (relative residual {rr:.1e})")
    del ref_objective
    if not ref_result.converged:
        print("WARNING: the reference did not converge; errors below are relative to unconverged values")

    # Eigensolvers: tolerance sweeps.
    contenders = Contenders(args, objective.hessian_operator(), model, criterion, X, y, counter)
    print(f"\nTolerance sweeps (target: max relative eigenvalue error <= {args.target:.0e})", flush=True)
    sweeps: dict[tuple[int, str], list[Attempt]] = {}
    for k in args.ks:
        for method in methods:
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
        for method in methods:
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
    out["attempts"] = [asdict(a) for attempts in sweeps.values() for a in attempts]
    out["results"] = rows

    top = max(args.ks)
    ours_top, theirs_top = winners.get((top, "lanczos")), winners.get((top, "pyhessian"))
    if ours_top is not None and "pyhessian" in methods:
        limit = (theirs_top.n_matvecs if theirs_top else max(a.n_matvecs for a in sweeps[(top, "pyhessian")])) / 3
        met = ours_top.n_matvecs <= limit
        # PyHessian not reaching the target: it needs more than it used, so only `met` is decided.
        goal = {"k": top, "ours": ours_top.n_matvecs, "pyhessian": theirs_top.n_matvecs if theirs_top else None,
                "pyhessian_reached": theirs_top is not None, "limit": limit, "met": met if (theirs_top or met) else None}
        theirs_text = (f"PyHessian {goal['pyhessian']}" if theirs_top
                       else f"PyHessian did not reach the target within {3 * limit:.0f}")
        verdict = {True: "met", False: "NOT met", None: "undecided (raise --pyhessian-max-iter or add tighter --tols)"}
        print(f"\nGoal top-{top} matvecs <= PyHessian / 3: ours {goal['ours']}, {theirs_text} -> {verdict[goal['met']]}")
        out["goal_topk_matvecs"] = goal
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message=_CREATE_GRAPH_WARNING)
    try:
        import pyhessian  # noqa: F401

        counter: PyHessianCounter | None = PyHessianCounter()
    except ImportError:
        print("PyHessian is not installed (pip install -e '.[bench]'): its rows are left out", flush=True)
        counter = None
    wall_start = time.perf_counter()

    run = trained_run(args)
    model = run.model.eval().to(device)
    X, y = run.train.x.to(device), run.train.y.to(device)
    if args.examples:
        X, y = X[: args.examples], y[: args.examples]
    loss_fn = functools.partial(F.cross_entropy, label_smoothing=run.config.label_smoothing)
    criterion = nn.CrossEntropyLoss(label_smoothing=run.config.label_smoothing)
    objective = Objective(model, loss_fn, (X, y), batch_size=args.batch_size or X.shape[0], hvp_method="auto")
    train_loss, train_acc = objective.loss_and_accuracy()
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "pyhessian": importlib.metadata.version("pyhessian") if counter is not None else None,
        "threads": torch.get_num_threads(),
        "run_dir": str(run.run_dir),
        "checkpoint_sha256": run.checkpoint_sha256,
        "model": run.config.model,
        "optimizer": run.config.optimizer,
        "epochs": run.config.epochs,
        "parameters": objective.layout.size,
        "train_examples": objective.n_examples,
        "train_loss": train_loss,
        "train_acc": train_acc,
    }
    print(json.dumps(env), flush=True)
    out: dict = {"env": env, "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    if not args.hvp_only:
        out.update(eigensolvers(args, objective, model, loss_fn, criterion, X, y, counter))
    del objective

    # HVP cost against one gradient: several batches (the goal's case), then one.
    costs = {"multi_batch": bench_hvp(args, model, loss_fn, criterion, X, y, args.hvp_batch_size, counter)}
    print_hvp(costs["multi_batch"], args.hvp_rounds)
    if args.hvp_batch_size < X.shape[0]:
        costs["one_batch"] = bench_hvp(args, model, loss_fn, criterion, X, y, X.shape[0], counter)
        print_hvp(costs["one_batch"], args.hvp_rounds)
    multi = costs["multi_batch"]
    auto, ratio = multi["hvp_method_auto"], multi["hvp_over_gradient_auto"]
    recomputed = min(multi["hvp_over_gradient"].get(m, math.inf) for m in ("jvp", "double_backward"))
    goal = {"method": auto, "ratio": ratio, "cpu_ratio": multi["hvp_over_gradient_auto_cpu"], "limit": 3.0,
            "met": ratio <= 3.0, "best_recomputed_ratio": recomputed}
    print(f"\nGoal HVP <= 3x gradient ({multi['batches']} batches): auto ({auto}) {ratio:.2f}x wall, "
          f"{goal['cpu_ratio']:.2f}x CPU -> {'met' if goal['met'] else 'NOT met'}; recomputed per batch "
          f"(streamed data) {recomputed:.2f}x")
    total = time.perf_counter() - wall_start
    print(f"\nbenchmark wall time {total:.0f} s")

    if args.json:
        out.update({
            "hvp_cost": costs,
            "hvp_method_auto": auto,
            "hvp_over_gradient_auto": ratio,
            "hvp_over_gradient": multi["hvp_over_gradient"],
            "hvp_choice": multi["hvp_choice"],
            "goals": {**({"topk_matvecs": out.pop("goal_topk_matvecs")} if "goal_topk_matvecs" in out else {}),
                      "hvp_over_gradient": goal},
            "benchmark_wall_s": total,
        })
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=float)


if __name__ == "__main__":
    main()
