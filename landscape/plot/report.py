"""A self-contained HTML report: a summary table and sections of interactive plotly figures.

The plotly.js library is inlined once (about 4.7 MB), so the file opens anywhere with no network.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..storage import atomic_write_text

__all__ = ["Section", "html_report", "write_report", "write_surface_report"]


@dataclass
class Section:
    """A titled part of the report: a paragraph and figures."""

    title: str
    figures: list[go.Figure] = field(default_factory=list)
    text: str = ""


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return html.escape("" if value is None else str(value))


def _table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_STYLE = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table.summary { border-collapse: collapse; margin: 1em 0; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
p.note { color: #555; }
"""


def html_report(title: str, summary_columns: Sequence[str], summary_rows: Sequence[Mapping[str, Any]],
                sections: Sequence[Section], *, footer: str = "") -> str:
    """The report as one HTML string: title, summary table, then every section with its figures.

    Every section gets an anchor ``id="section-N"`` and a ``<section data-title=...>`` element, so tests
    and readers can find it.
    """
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             "<h2 id='summary'>Summary</h2>", _table(summary_columns, summary_rows)]
    included = False
    for i, section in enumerate(sections):
        parts.append(f"<section id='section-{i}' data-title='{html.escape(section.title, quote=True)}'>")
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p class='note'>{html.escape(section.text)}</p>")
        for fig in section.figures:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=not included, config={"displaylogo": False}))
            included = True
        parts.append("</section>")
    if footer:
        parts.append(f"<p class='note'>{html.escape(footer)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, *args: Any, **kwargs: Any) -> Path:
    """:func:`html_report` written atomically to ``path``."""
    path = Path(path)
    atomic_write_text(path, html_report(*args, **kwargs))
    return path


def write_surface_report(surfaces: Mapping[str, Any], stem: str | Path, *, split: str = "train",
                         other: str | None = None, zmax: float | None = None) -> list[Path]:
    """Surfaces of one run (or several, same recipe) as publication figures and one HTML page.

    2D: lit 3D surfaces and contours with a shared z-range (a PCA plane with its training path,
    :func:`.figures.surface_contours`) as ``STEM_3d`` and ``STEM_contours`` (``.png`` + ``.pdf``); 1D: the
    slices overlaid, ``STEM.png/.pdf``; a single line to the model ``other`` (an interpolation): loss and
    accuracy along it. ``STEM.html`` holds the interactive figures and a table with the loss and accuracy
    at the model itself (the origin; blank when the grid has no point there) and the loss range. Files
    are written atomically and replaced on every call.

    Returns:
        The paths written.
    """
    from . import figures, interactive

    stem = Path(stem)
    if other is not None:
        if len(surfaces) != 1:
            raise ValueError(f"an interpolation to {other!r} takes one line; got {len(surfaces)}")
        [(label, line)] = surfaces.items()
        train, test = (line, None) if split == "train" else (None, line)
        static = {"": figures.interpolation(train, test, labels=(label, other))}
        dynamic = [interactive.interpolation(train, test, labels=(label, other))]
        title = f"Interpolation from {label} to {other} ({split} split)"
    elif next(iter(surfaces.values())).loss.ndim == 2:
        static = {"_3d": figures.surface_3d(surfaces, zmax=zmax), "_contours": figures.surface_contours(surfaces, zmax=zmax)}
        dynamic = [interactive.surface_3d(surfaces, zmax=zmax), interactive.surface_contours(surfaces, zmax=zmax)]
        title = f"2D loss surfaces ({split} split)"
    else:
        static = {"": figures.slices_1d(surfaces)}
        dynamic = [interactive.slices_1d(surfaces)]
        title = f"1D loss slices ({split} split)"
    written = [path for suffix, fig in static.items() for path in figures.save_figure(fig, f"{stem}{suffix}")]
    rows = [{"model": label, "loss at the model": _at_origin(s, s.loss), "accuracy at the model": _at_origin(s, s.accuracy),
             "lowest loss": float(np.nanmin(s.loss)), "highest loss": float(np.nanmax(s.loss))}
            for label, s in surfaces.items()]
    written.append(write_report(Path(f"{stem}.html"), title, list(rows[0]), rows, [Section(title, dynamic)]))
    return written


def _at_origin(surface: Any, values: Any) -> float | None:
    """``values`` at the grid point at the origin (the model itself); ``None`` when there is none."""
    index = tuple(int(np.argmin(np.abs(c))) for c in surface.coords)
    if any(abs(c[i]) > 1e-12 * max(1.0, float(np.abs(c).max())) for c, i in zip(surface.coords, index)):
        return None
    return float(np.asarray(values)[index])
