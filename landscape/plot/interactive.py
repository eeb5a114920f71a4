"""Interactive figures (plotly) mirroring :mod:`landscape.plot.figures`: same inputs, a ``plotly`` Figure out.

Rotate the 3D surfaces, hover for values, toggle models in the legend. The figures are what
:mod:`landscape.plot.report` embeds in the self-contained HTML report; none is ever shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from .figures import PALETTE, _check_2d, _reduction_order, _shared_zmax, surface_z, trajectory_in_plane

__all__ = [
    "surface_3d",
    "surface_contours",
    "slices_1d",
    "interpolation",
    "hessian_spectrum",
    "m_sharpness",
    "kendall_vs_m",
    "training_curves",
    "label_noise",
    "error_reduction",
    "error_vs_rho",
    "spectrum_evolution",
]

_LAYOUT = {"template": "plotly_white", "font": {"size": 12}, "margin": {"l": 50, "r": 20, "t": 75, "b": 45}}


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _finish(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title=title, height=height, **_LAYOUT)
    return fig


def surface_3d(surfaces: Mapping[str, Any], *, zmax: float | None = None) -> go.Figure:
    """Lit 3D surfaces side by side, shared z-range and colours, ``z = log(min(L, zmax) + 0.1)``."""
    _check_2d(surfaces)
    cap = _shared_zmax(surfaces, zmax)
    zs = {label: surface_z(s.loss, cap) for label, s in surfaces.items()}
    lo, hi = min(float(np.nanmin(z)) for z in zs.values()), float(np.log(cap + 0.1))
    fig = make_subplots(rows=1, cols=len(surfaces), specs=[[{"type": "scene"}] * len(surfaces)],
                        subplot_titles=list(surfaces))
    for i, (label, s) in enumerate(surfaces.items()):
        fig.add_trace(go.Surface(
            x=s.coords[0], y=s.coords[1], z=zs[label].T, cmin=lo, cmax=hi, colorscale="RdBu_r", name=label,
            showscale=i == len(surfaces) - 1, customdata=np.asarray(s.loss).T,
            hovertemplate="alpha %{x:.3f}<br>beta %{y:.3f}<br>loss %{customdata:.4g}<extra>" + label + "</extra>",
            lighting={"ambient": 0.5, "diffuse": 0.8, "specular": 0.2, "roughness": 0.6},
            lightposition={"x": -1000, "y": 1000, "z": 2000}), row=1, col=i + 1)
    scene = {"xaxis_title": "alpha", "yaxis_title": "beta", "zaxis_title": "log(min(L, zmax) + 0.1)",
             "zaxis": {"range": [lo, hi]}, "aspectmode": "cube"}
    fig.update_scenes(**scene)
    return _finish(fig, "Loss surfaces (same directions, shared z-range)", height=480)


def surface_contours(surfaces: Mapping[str, Any], *, zmax: float | None = None,
                     trajectories: Mapping[str, Any] | None = None) -> go.Figure:
    """Contour plots of ``log(min(L, zmax) + 0.1)``, one panel per model, shared levels; training paths
    as in :func:`landscape.plot.figures.surface_contours` (given, or the PCA path saved with a surface)."""
    _check_2d(surfaces)
    cap = _shared_zmax(surfaces, zmax)
    zs = {label: surface_z(s.loss, cap) for label, s in surfaces.items()}
    lo, hi = min(float(np.nanmin(z)) for z in zs.values()), float(np.log(cap + 0.1))
    fig = make_subplots(rows=1, cols=len(surfaces), subplot_titles=list(surfaces))
    for i, (label, s) in enumerate(surfaces.items()):
        fig.add_trace(go.Contour(x=s.coords[0], y=s.coords[1], z=zs[label].T, zmin=lo, zmax=hi, colorscale="RdBu_r",
                                 name=label, showscale=i == 0, contours={"showlabels": True}), row=1, col=i + 1)
        path = trajectory_in_plane(s, (trajectories or {}).get(label))
        if path is not None:
            fig.add_trace(go.Scatter(x=path[:, 0], y=path[:, 1], mode="lines+markers", name=f"{label}: training path",
                                     line={"color": "black", "width": 1}, marker={"size": 4}), row=1, col=i + 1)
            fig.update_xaxes(range=[s.coords[0][0], s.coords[0][-1]], row=1, col=i + 1)
            fig.update_yaxes(range=[s.coords[1][0], s.coords[1][-1]], row=1, col=i + 1)
        fig.update_xaxes(title_text="alpha (direction 1)", row=1, col=i + 1)
        fig.update_yaxes(title_text="beta (direction 2)", row=1, col=i + 1, scaleanchor=f"x{i + 1 if i else ''}")
    return _finish(fig, "Loss contours")


def slices_1d(slices: Mapping[str, Any]) -> go.Figure:
    """1D slices of several models overlaid: loss (log scale) and accuracy."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "accuracy (%)"])
    for i, (label, s) in enumerate(slices.items()):
        fig.add_trace(go.Scatter(x=s.coords[0], y=s.loss, name=label, line={"color": _colour(i)}, legendgroup=label), 1, 1)
        fig.add_trace(go.Scatter(x=s.coords[0], y=100 * np.asarray(s.accuracy), name=label, line={"color": _colour(i)},
                                 legendgroup=label, showlegend=False), 1, 2)
    fig.update_yaxes(type="log", title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="accuracy (%)", row=1, col=2)
    fig.update_xaxes(title_text="alpha")
    return _finish(fig, "1D slices along the same direction")


def interpolation(train: Any, test: Any | None = None, *, labels: tuple[str, str] = ("SGD", "SAM")) -> go.Figure:
    """Loss and accuracy along ``w_a + t (w_b - w_a)``, train (solid) and test (dashed)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "accuracy (%)"])
    for split, s, dash in (("train", train, "solid"), ("test", test, "dash")):
        if s is None:
            continue
        fig.add_trace(go.Scatter(x=s.coords[0], y=s.loss, name=f"{split} loss", line={"color": PALETTE[0], "dash": dash}), 1, 1)
        fig.add_trace(go.Scatter(x=s.coords[0], y=100 * np.asarray(s.accuracy), name=f"{split} accuracy",
                                 line={"color": PALETTE[1], "dash": dash}), 1, 2)
    for t in (0.0, 1.0):
        fig.add_vline(x=t, line_dash="dot", line_color="gray")
    fig.update_yaxes(type="log", title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="accuracy (%)", row=1, col=2)
    fig.update_xaxes(title_text=f"t (0: {labels[0]}, 1: {labels[1]})")
    return _finish(fig, f"Interpolation from {labels[0]} to {labels[1]}")


def hessian_spectrum(hessians: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """Top-k eigenvalues, ``lambda_max`` and ``lambda_max / lambda_5``, and the eigenvalue density (log)."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=["top eigenvalues", "lambda_max and lambda_max / lambda_5",
                                                        "eigenvalue density (log)"])
    for i, (label, h) in enumerate(hessians.items()):
        values = np.asarray(h["eigenvalues"], dtype=np.float64)
        colour = _colour(i)
        fig.add_trace(go.Scatter(x=np.arange(1, len(values) + 1), y=values, mode="lines+markers", name=label,
                                 line={"color": colour}, legendgroup=label), 1, 1)
        ratio = values[0] / values[4] if len(values) >= 5 else None
        fig.add_trace(go.Bar(x=["lambda_max", "lambda_max / lambda_5"], y=[values[0], ratio], name=label,
                             marker_color=colour, legendgroup=label, showlegend=False, texttemplate="%{y:.3g}"), 1, 2)
        if "density" in h:
            fig.add_trace(go.Scatter(x=h["density_grid"], y=np.maximum(h["density"], 1e-12), name=label,
                                     line={"color": colour}, legendgroup=label, showlegend=False), 1, 3)
    fig.update_yaxes(type="log", range=[-6, None], row=1, col=3)
    fig.update_xaxes(title_text="index i", row=1, col=1)
    fig.update_xaxes(title_text="eigenvalue", row=1, col=3)
    return _finish(fig, "Hessian spectrum")


def m_sharpness(curves: Mapping[str, Mapping[str, Any]], *, title: str = "m-sharpness") -> go.Figure:
    """Sharpness against ``m`` (log scale) with standard errors."""
    fig = go.Figure()
    for i, (label, c) in enumerate(curves.items()):
        errors = [0.0 if e is None else e for e in c.get("std_error", [None] * len(c["m"]))]
        fig.add_trace(go.Scatter(x=c["m"], y=c["value"], error_y={"type": "data", "array": errors}, name=label,
                                 mode="lines+markers", line={"color": _colour(i)}))
    fig.update_xaxes(type="log", title_text="m (examples per perturbation)")
    fig.update_yaxes(title_text="sharpness")
    return _finish(fig, title)


def kendall_vs_m(table: Sequence[Mapping[str, Any]], *, gap: str = "loss_gap") -> go.Figure:
    """Kendall tau between each measure and the gap against ``m`` (dotted lines: measures without m)."""
    key = f"tau_{gap}"
    fig = go.Figure()
    for i, measure in enumerate(dict.fromkeys(e["measure"] for e in table)):
        entries = sorted((e for e in table if e["measure"] == measure and e[key] is not None), key=lambda e: e["m"] or 0)
        if not entries:
            continue
        if entries[0]["m"] is None:
            fig.add_hline(y=entries[0][key], line_dash="dot", line_color=_colour(i), annotation_text=measure)
        else:
            fig.add_trace(go.Scatter(x=[e["m"] for e in entries], y=[e[key] for e in entries], name=measure,
                                     mode="lines+markers", line={"color": _colour(i)}))
    fig.update_xaxes(type="log", title_text="m")
    fig.update_yaxes(title_text=f"Kendall tau with {gap.replace('_', ' ')}")
    return _finish(fig, "Sharpness vs generalization")


def training_curves(metrics: Mapping[str, Sequence[Mapping[str, Any]]]) -> go.Figure:
    """Train (solid) and test (dashed) loss and accuracy per epoch."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "accuracy (%)"])
    for i, (label, rows) in enumerate(metrics.items()):
        epochs = [r["epoch"] for r in rows]
        for split, dash in (("train", "solid"), ("test", "dash")):
            style = {"color": _colour(i), "dash": dash}
            fig.add_trace(go.Scatter(x=epochs, y=[r[f"{split}_loss"] for r in rows], name=f"{label} {split}", line=style,
                                     legendgroup=f"{label} {split}"), 1, 1)
            fig.add_trace(go.Scatter(x=epochs, y=[100 * r[f"{split}_acc"] for r in rows], name=f"{label} {split}",
                                     line=style, legendgroup=f"{label} {split}", showlegend=False), 1, 2)
    fig.update_yaxes(type="log", title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="accuracy (%)", row=1, col=2)
    fig.update_xaxes(title_text="epoch")
    return _finish(fig, "Training curves")


def label_noise(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Clean test accuracy against the label-noise rate, one line per optimizer."""
    fig = go.Figure()
    for i, name in enumerate(dict.fromkeys(r["optimizer"] for r in rows)):
        mine = sorted((r for r in rows if r["optimizer"] == name), key=lambda r: r["noise"])
        fig.add_trace(go.Scatter(x=[100 * r["noise"] for r in mine], y=[100 * r["mean"] for r in mine], name=name,
                                 error_y={"type": "data", "array": [100 * (r.get("spread") or 0.0) for r in mine]},
                                 mode="lines+markers", line={"color": _colour(i)}))
    fig.update_xaxes(title_text="label noise (%)")
    fig.update_yaxes(title_text="clean test accuracy (%)")
    return _finish(fig, "Robustness to label noise")


def error_reduction(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """SAM's relative test-error reduction over SGD per setting, sorted, with the spread over seeds."""
    if not rows:
        raise ValueError("pass at least one error-reduction row ({'setting', 'reduction', 'reduction_spread'})")
    ordered = sorted(rows, key=_reduction_order)
    values = [100 * r["reduction"] for r in ordered]
    fig = go.Figure(go.Bar(
        x=values, y=[r["setting"] for r in ordered], orientation="h", name="SAM vs SGD",
        marker_color=[_colour(0) if v >= 0 else _colour(1) for v in values],
        error_x={"type": "data", "array": [100 * (r.get("reduction_spread") or 0.0) for r in ordered]},
        hovertemplate="%{y}<br>error reduction %{x:.2f}%<extra></extra>"))
    fig.update_xaxes(title_text="error reduction of SAM over SGD (%)")
    return _finish(fig, "SAM vs SGD across settings", height=max(300, 120 + 28 * len(ordered)))


def error_vs_rho(lines: Sequence[Mapping[str, Any]], baselines: Sequence[Mapping[str, Any]] = ()) -> go.Figure:
    """Test error against rho, one line per m with its seed band; baselines as dashed horizontal lines."""
    if not lines:
        raise ValueError("pass at least one error-vs-rho line ({'label', 'rho', 'error', 'spread'})")
    fig = go.Figure()
    for i, line in enumerate(lines):
        rho = np.asarray(line["rho"], dtype=np.float64)
        error = 100 * np.asarray(line["error"], dtype=np.float64)
        spread = 100 * np.asarray(line.get("spread", np.zeros_like(error)), dtype=np.float64)
        colour = _colour(i)
        fig.add_trace(go.Scatter(x=np.concatenate([rho, rho[::-1]]), y=np.concatenate([error + spread, (error - spread)[::-1]]),
                                 fill="toself", fillcolor=colour, opacity=0.2, line={"width": 0}, hoverinfo="skip",
                                 legendgroup=line["label"], showlegend=False))
        fig.add_trace(go.Scatter(x=rho, y=error, mode="lines+markers", name=line["label"], line={"color": colour},
                                 legendgroup=line["label"], error_y={"type": "data", "array": spread, "visible": False}))
    for j, base in enumerate(baselines):
        fig.add_hline(y=100 * base["error"], line_dash="dash", line_color=_colour(len(lines) + j),
                      annotation_text=f"{base['label']} {100 * base['error']:.2f}%")
    fig.update_xaxes(title_text="rho")
    fig.update_yaxes(title_text="test error (%)")
    return _finish(fig, "Test error against rho")


def spectrum_evolution(spectra: Mapping[str, Sequence[Mapping[str, Any]]]) -> go.Figure:
    """The Hessian eigenvalue density at several epochs of each run, and lambda_max against the epoch."""
    if not spectra or not all(spectra.values()):
        raise ValueError("pass each run's spectra: {label: [{'epoch', 'eigenvalues', ...}, ...]}, at least one epoch each")
    fig = make_subplots(rows=1, cols=len(spectra) + 1, subplot_titles=[*spectra, "lambda_max during training"])
    for col, (label, entries) in enumerate(spectra.items(), start=1):
        ordered = sorted(entries, key=lambda e: e["epoch"])
        for j, entry in enumerate(ordered):
            shade = 0.85 * (1 - j / max(1, len(ordered) - 1))
            colour = sample_colorscale("Viridis", [shade])[0]  # late epochs dark, as in the PNG
            if "density" in entry:
                x, y, mode = entry["density_grid"], np.maximum(entry["density"], 1e-12), "lines"
            else:
                x = np.asarray(entry["eigenvalues"], dtype=np.float64)
                y, mode = np.full(len(x), 1.0 / len(x)), "markers"
            fig.add_trace(go.Scatter(x=x, y=y, mode=mode, name=f"{label} epoch {entry['epoch']}", line={"color": colour},
                                     marker={"color": colour, "symbol": "line-ns-open", "size": 12}), 1, col)
        fig.update_yaxes(type="log", row=1, col=col)
        fig.update_xaxes(title_text="eigenvalue", row=1, col=col)
    for i, (label, entries) in enumerate(spectra.items()):
        ordered = sorted(entries, key=lambda e: e["epoch"])
        fig.add_trace(go.Scatter(x=[e["epoch"] for e in ordered], y=[float(np.max(e["eigenvalues"])) for e in ordered],
                                 mode="lines+markers", name=f"{label} lambda_max", line={"color": _colour(i)}),
                      1, len(spectra) + 1)
    fig.update_yaxes(type="log", row=1, col=len(spectra) + 1)
    fig.update_xaxes(title_text="epoch", row=1, col=len(spectra) + 1)
    return _finish(fig, "Hessian spectrum during training")
