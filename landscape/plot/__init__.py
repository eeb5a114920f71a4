"""Figures of the minima: publication plots (:mod:`.figures`, matplotlib), interactive ones
(:mod:`.interactive`, plotly) and a self-contained HTML report (:mod:`.report`)."""

from . import figures, interactive, report
from .figures import save_figure
from .report import Section, write_report, write_surface_report

__all__ = ["figures", "interactive", "report", "save_figure", "Section", "write_report", "write_surface_report"]
