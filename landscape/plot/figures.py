"""Publication figures (matplotlib) comparing minima, in the style of Foret et al. 2021 and Li et al. 2018.

Every function takes plain results keyed by a label (``{"SGD": ..., "SAM": ...}``) and returns a
:class:`matplotlib.figure.Figure` built without pyplot (no global state, never shown). Sizes fit a
paper: :data:`ONE_COLUMN` (3.25 in) or :data:`TWO_COLUMN` (6.75 in) wide; fonts are 8 pt; colours
come from the Okabe-Ito colour-blind-safe palette; :func:`save_figure` writes PNG and PDF with the text
kept as text (TrueType, ``pdf.fonttype = 42``).

Inputs (:func:`landscape.surface.load`, :func:`sam.compare.load_hessian` and :func:`sam.compare.load_metrics`
read them back from saved results; :func:`hessian_data` builds a Hessian entry from the API's results):

* a surface: anything with ``.coords`` (one array per axis) and ``.loss`` / ``.accuracy`` arrays shaped
  like the grid, e.g. a :class:`landscape.surface.SurfaceResult`;
* a Hessian: a dict with ``"eigenvalues"`` (descending) and optionally ``"density_grid"`` and
  ``"density"``;
* a sharpness curve: a dict with ``"m"``, ``"value"`` and ``"std_error"`` lists;
* training metrics: a list of per-epoch dicts with ``epoch``, ``train_loss``, ``test_loss``,
  ``train_acc``, ``test_acc``;
* the paper's sweep figures (:mod:`sam.figure_data` builds them from a sweep directory): error-reduction
  rows (``setting``, ``reduction``, ``reduction_spread`` as fractions), error-vs-rho lines (``label``,
  ``rho``, ``error``, ``spread`` lists) and baselines (``label``, ``error``, ``spread``), and spectra over
  training (``{run label: [{"epoch", "eigenvalues", "density_grid", "density"}, ...]}``).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import LightSource
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..storage import atomic_write

__all__ = [
    "ONE_COLUMN",
    "TWO_COLUMN",
    "PALETTE",
    "paper_style",
    "surface_z",
    "save_figure",
    "surface_3d",
    "surface_contours",
    "trajectory_in_plane",
    "slices_1d",
    "interpolation",
    "hessian_data",
    "hessian_spectrum",
    "m_sharpness",
    "kendall_vs_m",
    "training_curves",
    "label_noise",
    "error_reduction",
    "error_vs_rho",
    "spectrum_evolution",
]

ONE_COLUMN = 3.25  # inches
TWO_COLUMN = 6.75
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
"""Okabe & Ito (2008): distinguishable with every common colour-vision deficiency."""
SURFACE_CMAP = "coolwarm"

_RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "font.family": "DejaVu Sans",
    "mathtext.fontset": "dejavusans",
    "pdf.fonttype": 42,  # TrueType: text stays text in the PDF
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.3,
    "legend.frameon": False,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
}


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """The house style (fonts, sizes, vector text) for figures made or saved inside the block."""
    with matplotlib.rc_context(_RC):
        yield


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def surface_z(loss: np.ndarray, zmax: float) -> np.ndarray:
    """``z = log(min(L, zmax) + 0.1)``: the height drawn for a loss (Foret et al. 2021, Fig. 1)."""
    return np.log(np.minimum(np.asarray(loss, dtype=np.float64), zmax) + 0.1)


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 200) -> list[Path]:
    """Write ``fig`` as ``stem.png`` and ``stem.pdf`` (atomically: a temp file, then a rename)."""
    paths = []
    with paper_style():
        for fmt in formats:
            path = Path(f"{stem}.{fmt}")  # appended: a stem with a dot in it ("run.v2_3d") keeps its name
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=dpi)
            atomic_write(path, lambda f, data=buffer.getvalue(): f.write(data))
            paths.append(path)
    return paths


def trajectory_in_plane(surface: Any, given: Any = None) -> np.ndarray | None:
    """A training path's ``(m, 2)`` coordinates in ``surface``'s plane: ``given``, else the PCA path saved
    with the surface (``surface.meta["pca"]["coordinates"]``), else ``None``.

    Raises:
        ValueError: the coordinates are not an ``(m, 2)`` array.
    """
    if given is None:
        given = (getattr(surface, "meta", None) or {}).get("pca", {}).get("coordinates")
    if given is None:
        return None
    path = np.asarray(given, dtype=float)
    if path.ndim != 2 or path.shape[1] != 2 or not len(path):
        raise ValueError(f"a trajectory must be (m, 2) coordinates in the plane; got shape {path.shape}")
    return path


def _check_2d(surfaces: Mapping[str, Any]) -> None:
    if not surfaces:
        raise ValueError("pass at least one surface, e.g. {'SGD': sgd_surface, 'SAM': sam_surface}")
    for label, s in surfaces.items():
        if len(s.coords) != 2 or np.asarray(s.loss).ndim != 2:
            raise ValueError(f"surface {label!r} must be 2D (two coordinate arrays and a 2D loss grid)")


def _shared_zmax(surfaces: Mapping[str, Any], zmax: float | None) -> float:
    """The cap of every panel: the given one, or the largest loss over all panels."""
    if zmax is not None:
        return float(zmax)
    return float(max(np.nanmax(np.asarray(s.loss)) for s in surfaces.values()))


def surface_3d(surfaces: Mapping[str, Any], *, zmax: float | None = None, elevation: float = 35.0,
               azimuth: float = -60.0, width: float = TWO_COLUMN) -> Figure:
    """Lit 3D loss surfaces side by side (Foret et al. 2021, Fig. 1): same axes, shared z-range and
    colours, ``z = log(min(L, zmax) + 0.1)``, cool-to-warm colour map, lit from the upper left.

    Args:
        surfaces: label -> 2D surface, drawn left to right (use the same direction recipe for all).
        zmax: loss cap; default the largest loss over all panels.
    """
    _check_2d(surfaces)
    cap = _shared_zmax(surfaces, zmax)
    zs = {label: surface_z(s.loss, cap) for label, s in surfaces.items()}
    lo, hi = min(float(np.nanmin(z)) for z in zs.values()), float(np.log(cap + 0.1))
    light = LightSource(azdeg=315, altdeg=45)
    cmap = matplotlib.colormaps[SURFACE_CMAP]
    with paper_style():
        fig = Figure(figsize=(width, width / len(surfaces) * 0.85))
        for i, (label, s) in enumerate(surfaces.items()):
            ax = fig.add_subplot(1, len(surfaces), i + 1, projection="3d")
            a, b = np.meshgrid(s.coords[0], s.coords[1], indexing="ij")
            z = zs[label]
            colours = light.shade(z, cmap=cmap, vmin=lo, vmax=hi, blend_mode="soft")
            ax.plot_surface(a, b, z, facecolors=colours, rstride=1, cstride=1, linewidth=0, antialiased=False, shade=False)
            ax.set(zlim=(lo, hi), xlabel=r"$\alpha$", ylabel=r"$\beta$", zlabel=r"$\log(\min(L, z_{max}) + 0.1)$", title=label)
            ax.view_init(elev=elevation, azim=azimuth)
            ax.grid(False)
        fig.subplots_adjust(left=0.0, right=0.95, wspace=0.05)
    return fig


def surface_contours(surfaces: Mapping[str, Any], *, levels: int = 12, zmax: float | None = None,
                     trajectories: Mapping[str, Any] | None = None, width: float = TWO_COLUMN) -> Figure:
    """Contour plots of the loss, one panel per model, shared levels of ``log(min(L, zmax) + 0.1)``.

    ``trajectories`` (label -> ``(m, 2)`` coordinates in the plane) draws a training path on a panel, as
    in Li et al. 2018, Fig. 9; by default a surface along PCA directions saved by ``sam-landscape surface
    --directions pca`` draws its own (``meta["pca"]["coordinates"]``). The axes keep the grid's extent.
    """
    _check_2d(surfaces)
    paths = {label: trajectory_in_plane(s, (trajectories or {}).get(label)) for label, s in surfaces.items()}
    cap = _shared_zmax(surfaces, zmax)
    zs = {label: surface_z(s.loss, cap) for label, s in surfaces.items()}
    lo, hi = min(float(np.nanmin(z)) for z in zs.values()), float(np.log(cap + 0.1))
    bounds = np.linspace(lo, hi, levels)
    with paper_style():
        fig = Figure(figsize=(width, width / len(surfaces) * 0.9), layout="constrained")
        axes = fig.subplots(1, len(surfaces), squeeze=False)[0]
        for ax, (label, s) in zip(axes, surfaces.items()):
            filled = ax.contourf(s.coords[0], s.coords[1], zs[label].T, levels=bounds, cmap=SURFACE_CMAP, extend="neither")
            lines = ax.contour(s.coords[0], s.coords[1], zs[label].T, levels=bounds[::2], colors="k", linewidths=0.4,
                               linestyles="solid")
            ax.clabel(lines, fmt=lambda v: f"{np.exp(v) - 0.1:.2g}", fontsize=5)
            ax.plot([0], [0], marker="*", color="k", markersize=6, linestyle="none")
            if paths[label] is not None:
                path = paths[label]
                ax.plot(path[:, 0], path[:, 1], color="k", marker="o", markersize=1.5, linewidth=0.7, label="training path")
                ax.plot(path[:1, 0], path[:1, 1], marker="o", markersize=4, markerfacecolor="white", color="k",
                        linestyle="none")
                ax.set(xlim=(s.coords[0][0], s.coords[0][-1]), ylim=(s.coords[1][0], s.coords[1][-1]))
            ax.set(xlabel=r"$\alpha$ (direction 1)", ylabel=r"$\beta$ (direction 2)", title=label, aspect="equal")
            ax.grid(False)
        fig.colorbar(filled, ax=list(axes), label=r"$\log(\min(L, z_{max}) + 0.1)$", shrink=0.9)
    return fig


def slices_1d(slices: Mapping[str, Any], *, width: float = TWO_COLUMN) -> Figure:
    """1D slices ``L(w + alpha d)`` of several models overlaid: loss (log scale) and accuracy."""
    if not slices:
        raise ValueError("pass at least one 1D slice")
    with paper_style():
        fig = Figure(figsize=(width, width * 0.36), layout="constrained")
        loss_ax, acc_ax = fig.subplots(1, 2)
        for i, (label, s) in enumerate(slices.items()):
            if len(s.coords) != 1:
                raise ValueError(f"slice {label!r} must be 1D")
            loss_ax.plot(s.coords[0], s.loss, color=_colour(i), label=label)
            acc_ax.plot(s.coords[0], 100 * np.asarray(s.accuracy), color=_colour(i), label=label)
        loss_ax.set(yscale="log", xlabel=r"$\alpha$", ylabel="loss", title="1D slice: loss")
        acc_ax.set(xlabel=r"$\alpha$", ylabel="accuracy (%)", title="1D slice: accuracy")
        loss_ax.legend()
    return fig


def interpolation(train: Any, test: Any | None = None, *, labels: tuple[str, str] = ("SGD", "SAM"),
                  width: float = TWO_COLUMN) -> Figure:
    """Loss and accuracy along ``w_a + t (w_b - w_a)`` (Goodfellow et al. 2015), train and test splits."""
    with paper_style():
        fig = Figure(figsize=(width, width * 0.36), layout="constrained")
        loss_ax, acc_ax = fig.subplots(1, 2)
        for split, s, style in (("train", train, "-"), ("test", test, "--")):
            if s is None:
                continue
            loss_ax.plot(s.coords[0], s.loss, style, color=PALETTE[0], label=split)
            acc_ax.plot(s.coords[0], 100 * np.asarray(s.accuracy), style, color=PALETTE[1], label=split)
        for ax in (loss_ax, acc_ax):
            for t, name in ((0.0, labels[0]), (1.0, labels[1])):
                ax.axvline(t, color="0.5", linewidth=0.6, linestyle=":")
                ax.annotate(name, (t, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7)
            ax.set_xlabel(f"t  (0: {labels[0]}, 1: {labels[1]})")
            ax.legend()
        loss_ax.set(yscale="log", ylabel="loss")
        acc_ax.set(ylabel="accuracy (%)")
    return fig


def hessian_data(eigen: Any, density: Any | None = None) -> dict[str, Any]:
    """What :func:`hessian_spectrum` takes, from :func:`landscape.hessian.top_eigenvalues` (``.eigenvalues``)
    and optionally :func:`landscape.hessian.spectral_density` (``.grid``, ``.density``)."""
    out: dict[str, Any] = {"eigenvalues": np.asarray(eigen.eigenvalues, dtype=np.float64)}
    if density is not None:
        out.update(density_grid=np.asarray(density.grid, dtype=np.float64), density=np.asarray(density.density, dtype=np.float64))
    return out


def hessian_spectrum(hessians: Mapping[str, Mapping[str, Any]], *, width: float = TWO_COLUMN) -> Figure:
    """Top-k eigenvalues, ``lambda_max`` and ``lambda_max / lambda_5``, and the eigenvalue density on a log
    scale (Foret et al. 2021, Fig. 3 left; Ghorbani et al. 2019)."""
    if not hessians:
        raise ValueError("pass at least one Hessian result")
    with_density = any("density" in h for h in hessians.values())
    with paper_style():
        fig = Figure(figsize=(width, width * 0.32), layout="constrained")
        axes = fig.subplots(1, 3 if with_density else 2)
        top_ax, bar_ax = axes[0], axes[1]
        labels = list(hessians)
        for i, (label, h) in enumerate(hessians.items()):
            values = np.asarray(h["eigenvalues"], dtype=np.float64)
            top_ax.plot(np.arange(1, len(values) + 1), values, "o-", color=_colour(i), label=label, markersize=3)
        top_ax.set(xlabel="index i", ylabel=r"$\lambda_i$", title="top Hessian eigenvalues")
        top_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        top_ax.legend()
        width_bar = 0.8 / len(labels)
        for i, (label, h) in enumerate(hessians.items()):
            values = np.asarray(h["eigenvalues"], dtype=np.float64)
            heights = [values[0], values[0] / values[4]] if len(values) >= 5 else [values[0]]  # the ratio needs 5
            bars = bar_ax.bar(np.arange(len(heights)) + (i - (len(labels) - 1) / 2) * width_bar, heights, width_bar,
                              color=_colour(i), label=label)
            bar_ax.bar_label(bars, fmt="%.3g", fontsize=6)
        with_ratio = all(len(h["eigenvalues"]) >= 5 for h in hessians.values())
        bar_ax.set_xticks([0, 1] if with_ratio else [0],
                          [r"$\lambda_{max}$", r"$\lambda_{max}/\lambda_5$"] if with_ratio else [r"$\lambda_{max}$"])
        bar_ax.set(title="sharpness of the minimum")
        if with_density:
            ax = axes[2]
            for i, (label, h) in enumerate(hessians.items()):
                if "density" in h:
                    ax.semilogy(h["density_grid"], np.maximum(h["density"], 1e-12), color=_colour(i), label=label)
            ax.set(xlabel="eigenvalue", ylabel="density (log)", title="eigenvalue density", ylim=(1e-6, None))
            ax.legend()
    return fig


def m_sharpness(curves: Mapping[str, Mapping[str, Any]], *, title: str = "m-sharpness",
                width: float = ONE_COLUMN) -> Figure:
    """Sharpness against the chunk size ``m`` (log scale) with standard errors, one line per model."""
    if not curves:
        raise ValueError("pass at least one sharpness curve")
    with paper_style():
        fig = Figure(figsize=(width, width * 0.75), layout="constrained")
        ax = fig.subplots()
        for i, (label, c) in enumerate(curves.items()):
            errors = [0.0 if e is None else e for e in c.get("std_error", [None] * len(c["m"]))]
            ax.errorbar(c["m"], c["value"], yerr=errors, fmt="o-", color=_colour(i), label=label, markersize=3, capsize=2)
        ax.set(xscale="log", xlabel="m (examples per perturbation)", ylabel="sharpness", title=title)
        ax.legend()
    return fig


def kendall_vs_m(table: Sequence[Mapping[str, Any]], *, gap: str = "loss_gap", width: float = ONE_COLUMN) -> Figure:
    """Kendall tau between each measure and the generalization gap: lines against ``m`` for the chunked
    measures, dotted horizontal lines for the others (the study's table, :func:`sam.study.kendall_table`)."""
    key = f"tau_{gap}"
    with paper_style():
        fig = Figure(figsize=(width, width * 0.8), layout="constrained")
        ax = fig.subplots()
        measures = list(dict.fromkeys(e["measure"] for e in table))
        for i, measure in enumerate(measures):
            entries = [e for e in table if e["measure"] == measure and e[key] is not None]
            if not entries:
                continue
            if entries[0]["m"] is None:
                ax.axhline(entries[0][key], color=_colour(i), linestyle=":", linewidth=1.0, label=measure)
            else:
                entries.sort(key=lambda e: e["m"])
                ax.plot([e["m"] for e in entries], [e[key] for e in entries], "o-", color=_colour(i), label=measure, markersize=3)
        ax.set(xscale="log", xlabel="m", ylabel=f"Kendall tau with {gap.replace('_', ' ')}", title="sharpness vs generalization")
        ax.legend(fontsize=5, ncol=2)
    return fig


def training_curves(metrics: Mapping[str, Sequence[Mapping[str, Any]]], *, width: float = TWO_COLUMN) -> Figure:
    """Train (solid) and test (dashed) loss and accuracy against the epoch, one colour per model."""
    if not metrics:
        raise ValueError("pass at least one run's metrics")
    with paper_style():
        fig = Figure(figsize=(width, width * 0.36), layout="constrained")
        loss_ax, acc_ax = fig.subplots(1, 2)
        for i, (label, rows) in enumerate(metrics.items()):
            epochs = [r["epoch"] for r in rows]
            for split, style in (("train", "-"), ("test", "--")):
                loss_ax.plot(epochs, [r[f"{split}_loss"] for r in rows], style, color=_colour(i), label=f"{label} {split}")
                acc_ax.plot(epochs, [100 * r[f"{split}_acc"] for r in rows], style, color=_colour(i), label=f"{label} {split}")
        loss_ax.set(yscale="log", xlabel="epoch", ylabel="loss", title="training curves: loss")
        acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="training curves: accuracy")
        loss_ax.legend(ncol=2)
    return fig


def label_noise(rows: Sequence[Mapping[str, Any]], *, width: float = ONE_COLUMN) -> Figure:
    """Clean test accuracy against the label-noise rate, one line per optimizer (mean with spread over
    seeds). ``rows`` have ``optimizer``, ``noise``, ``mean`` and optionally ``spread`` (accuracies in [0, 1])."""
    if not rows:
        raise ValueError("pass at least one label-noise result")
    with paper_style():
        fig = Figure(figsize=(width, width * 0.75), layout="constrained")
        ax = fig.subplots()
        for i, name in enumerate(dict.fromkeys(r["optimizer"] for r in rows)):
            mine = sorted((r for r in rows if r["optimizer"] == name), key=lambda r: r["noise"])
            ax.errorbar([100 * r["noise"] for r in mine], [100 * r["mean"] for r in mine],
                        yerr=[100 * (r.get("spread") or 0.0) for r in mine], fmt="o-", color=_colour(i), label=name,
                        markersize=3, capsize=2)
        ax.set(xlabel="label noise (%)", ylabel="clean test accuracy (%)", title="robustness to label noise")
        ax.legend()
    return fig


def _reduction_order(row: Mapping[str, Any]) -> tuple[float, str]:
    """Sort key of an error-reduction row: by ``reduction``, NaN (a baseline without errors) last, then by
    ``setting``. A NaN key left to ``sorted`` scrambles the order around it."""
    reduction = float(row["reduction"])
    return (math.inf if math.isnan(reduction) else reduction, str(row["setting"]))


def error_reduction(rows: Sequence[Mapping[str, Any]], *, width: float = ONE_COLUMN) -> Figure:
    """SAM's relative test-error reduction over SGD, one bar per setting, sorted (Foret et al. 2021, Fig. 1 left).

    ``rows`` hold ``setting`` (its label), ``reduction`` = mean over seeds of ``(e_SGD - e_SAM) / e_SGD``
    and ``reduction_spread`` (the standard deviation over seeds, drawn as an error bar), as fractions.
    """
    if not rows:
        raise ValueError("pass at least one error-reduction row ({'setting', 'reduction', 'reduction_spread'})")
    ordered = sorted(rows, key=_reduction_order)
    values = np.array([100 * r["reduction"] for r in ordered], dtype=np.float64)
    spreads = np.array([100 * (r.get("reduction_spread") or 0.0) for r in ordered], dtype=np.float64)
    with paper_style():
        fig = Figure(figsize=(width, max(1.6, 0.9 + 0.22 * len(ordered))), layout="constrained")
        ax = fig.subplots()
        colours = [_colour(0) if v >= 0 else _colour(1) for v in values]
        ax.barh(np.arange(len(ordered)), values, xerr=spreads, color=colours, height=0.7, capsize=2,
                error_kw={"elinewidth": 0.8})
        ax.axvline(0.0, color="black", linewidth=0.6)
        ax.set_yticks(np.arange(len(ordered)), [r["setting"] for r in ordered], fontsize=6)
        ax.set(xlabel="error reduction of SAM over SGD (%)", title="SAM vs SGD across settings")
        ax.grid(axis="y", visible=False)
    return fig


def error_vs_rho(lines: Sequence[Mapping[str, Any]], baselines: Sequence[Mapping[str, Any]] = (), *,
                 width: float = ONE_COLUMN) -> Figure:
    """Test error against rho, one line per m with a band of one standard deviation over seeds
    (Foret et al. 2021, Fig. 3 middle); each baseline (SGD) a dashed horizontal line with its band."""
    if not lines:
        raise ValueError("pass at least one error-vs-rho line ({'label', 'rho', 'error', 'spread'})")
    with paper_style():
        fig = Figure(figsize=(width, width * 0.8), layout="constrained")
        ax = fig.subplots()
        for i, line in enumerate(lines):
            rho = np.asarray(line["rho"], dtype=np.float64)
            error = 100 * np.asarray(line["error"], dtype=np.float64)
            spread = 100 * np.asarray(line.get("spread", np.zeros_like(error)), dtype=np.float64)
            ax.plot(rho, error, "o-", color=_colour(i), label=line["label"], markersize=3)
            ax.fill_between(rho, error - spread, error + spread, color=_colour(i), alpha=0.2, linewidth=0)
        for j, base in enumerate(baselines):
            colour = _colour(len(lines) + j)
            error, spread = 100 * base["error"], 100 * (base.get("spread") or 0.0)
            ax.axhline(error, color=colour, linestyle="--", linewidth=1.0, label=base["label"])
            ax.axhspan(error - spread, error + spread, color=colour, alpha=0.12, linewidth=0)
        ax.set(xlabel=r"$\rho$", ylabel="test error (%)", title=r"test error against $\rho$")
        ax.legend()
    return fig


def spectrum_evolution(spectra: Mapping[str, Sequence[Mapping[str, Any]]], *, width: float = TWO_COLUMN) -> Figure:
    """The Hessian spectrum at several epochs of each run (Foret et al. 2021, Fig. 3 left): one panel per
    run with the eigenvalue density (log scale; the top eigenvalues as markers where no density was
    computed), darker for later epochs, and a last panel with ``lambda_max`` against the epoch."""
    if not spectra or not all(spectra.values()):
        raise ValueError("pass each run's spectra: {label: [{'epoch', 'eigenvalues', ...}, ...]}, at least one epoch each")
    with paper_style():
        fig = Figure(figsize=(width, width * 0.3), layout="constrained")
        axes = fig.subplots(1, len(spectra) + 1, squeeze=False)[0]
        cmap = matplotlib.colormaps["viridis"]
        for ax, (label, entries) in zip(axes, spectra.items()):
            ordered = sorted(entries, key=lambda e: e["epoch"])
            for j, entry in enumerate(ordered):
                colour = cmap(0.85 * (1 - j / max(1, len(ordered) - 1)))  # late epochs dark
                if "density" in entry:
                    ax.semilogy(entry["density_grid"], np.maximum(entry["density"], 1e-12), color=colour,
                                label=f"epoch {entry['epoch']}")
                else:
                    values = np.asarray(entry["eigenvalues"], dtype=np.float64)
                    ax.semilogy(values, np.full(len(values), 1.0 / len(values)), "|", color=colour, markersize=8,
                                label=f"epoch {entry['epoch']}")
            with_density = any("density" in e for e in ordered)
            ax.set(xlabel="eigenvalue", ylabel="density (log)" if with_density else "top eigenvalues", title=label)
            if with_density:
                ax.set_ylim(1e-6, None)
            ax.legend(fontsize=5)
        top = axes[-1]
        for i, (label, entries) in enumerate(spectra.items()):
            ordered = sorted(entries, key=lambda e: e["epoch"])
            top.plot([e["epoch"] for e in ordered], [float(np.max(e["eigenvalues"])) for e in ordered], "o-",
                     color=_colour(i), label=label, markersize=3)
        top.set(xlabel="epoch", ylabel=r"$\lambda_{max}$", yscale="log", title=r"$\lambda_{max}$ during training")
        top.legend()
    return fig
