"""``sam-landscape plot KIND``: the paper's sweep and training-dynamics figures from saved sweeps and runs.

* ``plot error-reduction SWEEP_DIR``: SAM's relative test-error reduction over SGD per setting (Fig. 1 left);
* ``plot error-vs-rho SWEEP_DIR``: test error against rho, one line per m (Fig. 3 middle);
* ``plot spectrum-evolution RUN [RUN ...] --out DIR``: the Hessian spectrum at several epochs (Fig. 3 left).

Each writes ``NAME.png`` and ``NAME.pdf`` (matplotlib), ``NAME.html`` (plotly, self-contained, with the
numbers in a table) and ``NAME.json`` (the numbers) into ``--out``. Figures are drawn again from the
data on every call; the Hessian analyses of ``spectrum-evolution`` are saved under ``OUT/analyses`` and
reused.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from landscape.storage import atomic_write_json

from ..analyses import HessianSettings, Inputs
from ..figure_data import SPECTRUM, error_reduction_table, error_vs_rho_table, spectrum_evolution
from ._options import add_command, add_progress_flag, device_name, named_by_flag, positive_int

NAME = "plot"
KINDS = ("error-reduction", "error-vs-rho", "spectrum-evolution")
_SWEEP_KINDS = {
    "error-reduction": ("SAM's relative test-error reduction over SGD for every setting of a sweep (matched on every "
                        "other grid key), spread over seeds, sorted"),
    "error-vs-rho": "test error against rho, one line per m, with seed bands, from a sweep over rho",
}


def register(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands, NAME, help="the paper's sweep and training-dynamics figures (error-reduction, error-vs-rho, "
        "spectrum-evolution)",
        description="Draw a figure of Foret et al. (2021) from saved results: NAME.png, NAME.pdf, a self-contained "
        "NAME.html and the numbers in NAME.json. KIND is error-reduction SWEEP_DIR (Fig. 1 left), error-vs-rho "
        "SWEEP_DIR (Fig. 3 middle) or spectrum-evolution RUN [RUN ...] (Fig. 3 left).")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", parser_class=type(parser))
    kinds.required = True
    for kind, help_text in _SWEEP_KINDS.items():
        sub = add_command(kinds, kind, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        sub.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR", help="a directory of sam-landscape sweep")
        sub.add_argument("--out", type=Path, default=None, help="where the figure goes (default: SWEEP_DIR/figures)")
        add_progress_flag(sub)  # nothing long runs here; accepted as every command accepts it
        sub.set_defaults(handler=run)
    sub = add_command(
        kinds, "spectrum-evolution", help="the Hessian spectrum at several epochs of each run, from its snapshots",
        description="The top Hessian eigenvalues and the eigenvalue density (SLQ) of the training loss at several "
        "epochs of each run, from the weights train --snapshot-every N saves (and the final model.pt). The analyses "
        "go to OUT/analyses and are reused when made with the same settings.")
    sub.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run directories trained with --snapshot-every")
    sub.add_argument("--out", type=Path, required=True, help="where the analyses and the figure go")
    sub.add_argument("--epochs", type=_epoch_list, default=None, metavar="E1,E2,...",
                     help="the epochs to analyse (default: --count epochs spread over those each run holds)")
    sub.add_argument("--count", type=positive_int, default=4, help="how many epochs by default, first and last included")
    sub.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                     help="one name per run (default: its optimizer and rho)")
    sub.add_argument("--k", type=positive_int, default=SPECTRUM.k, help="top eigenvalues per epoch")
    sub.add_argument("--density", action=argparse.BooleanOptionalAction, default=True,
                     help="the eigenvalue density (SLQ); without it the top eigenvalues alone")
    sub.add_argument("--density-runs", type=positive_int, default=SPECTRUM.density_runs, help="SLQ runs per epoch")
    sub.add_argument("--density-steps", type=positive_int, default=SPECTRUM.density_steps, help="Lanczos steps per SLQ run")
    sub.add_argument("--batch-size", type=positive_int, default=2048, help="examples per forward pass")
    sub.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="precision of the analyses")
    sub.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    sub.add_argument("--seed", type=int, default=0, help="seed of the random start vectors")
    sub.add_argument("--overwrite", action="store_true", help="compute the saved analyses again")
    add_progress_flag(sub)
    sub.set_defaults(handler=run)
    parser.set_defaults(handler=run)
    return parser


def _epoch_list(text: str) -> list[int]:
    try:
        epochs = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes epochs joined by commas, e.g. 1,50,200; got {text!r}") from None
    if any(e < 1 for e in epochs):
        raise argparse.ArgumentTypeError(f"epochs are >= 1; got {text!r}")
    return epochs


def run(args: argparse.Namespace) -> int:
    if args.kind == "spectrum-evolution":
        out = args.out
        data = _spectra(args)
        rows = [{"run": label, "epoch": e["epoch"], "lambda_max": e["lambda_max"],
                 **({"lambda_max / lambda_5": e["eigenvalues"][0] / e["eigenvalues"][4]} if len(e["eigenvalues"]) >= 5 else {})}
                for label, entries in data.items() for e in entries]
        saved = _write(out, "spectrum_evolution", lambda m: m.spectrum_evolution(data), data,
                       "Hessian spectrum during training", rows,
                       "Top eigenvalues (Lanczos) and eigenvalue density (stochastic Lanczos quadrature) of the training "
                       "loss at several epochs of each run (Foret et al. 2021, Fig. 3 left).")
    else:
        out = args.out if args.out is not None else args.sweep_dir / "figures"
        if args.kind == "error-reduction":
            table = error_reduction_table(args.sweep_dir)
            rows = [{"setting": r["setting"], "seeds": len(r["seeds"]),
                     "SGD error (%)": _pm(r["baseline_error"], r["baseline_error_spread"]),
                     "SAM error (%)": _pm(r["error"], r["error_spread"]),
                     "error reduction (%)": _pm(r["reduction"], r["reduction_spread"])} for r in table]
            saved = _write(out, "error_reduction", lambda m: m.error_reduction(table), table,
                           f"SAM vs SGD across the settings of {args.sweep_dir}", rows,
                           "Relative test-error reduction (e_SGD - e_SAM) / e_SGD per seed, mean and standard deviation "
                           "over seeds, settings sorted (Foret et al. 2021, Fig. 1 left).")
        else:
            lines = error_vs_rho_table(args.sweep_dir)
            rows = [{"line": line["label"], "rho": rho, "seeds": len(seeds), "test error (%)": _pm(error, spread)}
                    for line in lines["lines"]
                    for rho, error, spread, seeds in zip(line["rho"], line["error"], line["spread"], line["seeds"])]
            rows += [{"line": base["label"], "rho": "-", "seeds": len(base["seeds"]),
                      "test error (%)": _pm(base["error"], base["spread"])} for base in lines["baselines"]]
            saved = _write(out, "error_vs_rho", lambda m: m.error_vs_rho(lines["lines"], lines["baselines"]), lines,
                           f"Test error against rho in {args.sweep_dir}", rows,
                           "Mean test error over seeds with a band of one standard deviation, one line per m, the "
                           "number of examples that share a perturbation (Foret et al. 2021, Fig. 3 middle).")
    print(f"wrote {', '.join(str(p) for p in saved)}")
    return 0


def _pm(value: float, spread: float) -> str:
    return f"{100 * value:.2f} +- {100 * spread:.2f}"


def _spectra(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    settings = named_by_flag(lambda: HessianSettings(
        k=args.k, trace=False, density=args.density, density_runs=args.density_runs,
        density_steps=args.density_steps, seed=args.seed), ["k", "density_runs", "density_steps", "seed"])
    inputs = named_by_flag(lambda: Inputs(batch_size=args.batch_size, dtype=args.dtype, device=args.device),
                           ["batch_size", "dtype", "device"])
    return spectrum_evolution(args.runs, args.out / "analyses", epochs=args.epochs, count=args.count, settings=settings,
                              inputs=inputs, labels=args.labels, overwrite=args.overwrite, progress=args.progress)


def _write(out: Path, stem: str, draw: Callable[[Any], Any], data: Any, title: str,
           rows: Sequence[Mapping[str, Any]], caption: str) -> list[Path]:
    """The figure as PNG and PDF, a report with its plotly twin and the numbers, and the numbers as JSON."""
    from landscape.plot import figures, interactive  # a second to import: only where a figure is drawn
    from landscape.plot.report import Section, write_report

    out.mkdir(parents=True, exist_ok=True)
    paths = figures.save_figure(draw(figures), out / stem)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    paths.append(write_report(out / f"{stem}.html", title, columns, rows, [Section(title, [draw(interactive)], caption)],
                              footer="sam-landscape plot"))
    atomic_write_json(out / f"{stem}.json", _plain(data))
    return [*paths, out / f"{stem}.json"]


def _plain(value: Any) -> Any:
    """Arrays as lists, for JSON."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
