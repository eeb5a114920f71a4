"""Figures: every function returns a figure with the expected panels, labels and data; the report has every section."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
from matplotlib.figure import Figure

from landscape.plot import figures, interactive
from landscape.plot.report import Section, html_report, write_report
from landscape.surface import SurfaceResult

GRID = np.linspace(-1, 1, 9)


def bowl(curvature: float) -> SurfaceResult:
    a, b = np.meshgrid(GRID, GRID, indexing="ij")
    loss = curvature * (a**2 + 0.5 * b**2) + 0.01
    return SurfaceResult([GRID, GRID], loss, np.exp(-loss))


def line(curvature: float, coords=GRID) -> SurfaceResult:
    loss = curvature * coords**2 + 0.01
    return SurfaceResult([coords], loss, np.exp(-loss))


SURFACES = {"SGD": bowl(8.0), "SAM": bowl(2.0)}
SLICES = {"SGD": line(8.0), "SAM": line(2.0)}
HESSIANS = {
    "SGD": {"eigenvalues": [7.8, 7.3, 6.3, 4.5, 3.75], "density_grid": np.linspace(-1, 9, 50), "density": np.full(50, 0.1)},
    "SAM": {"eigenvalues": [5.1, 4.5, 4.4, 3.1, 2.6], "density_grid": np.linspace(-1, 9, 50), "density": np.full(50, 0.1)},
}
CURVES = {"SGD": {"m": [1, 4, 16], "value": [0.35, 0.18, 0.07], "std_error": [0.01, 0.01, None]},
          "SAM": {"m": [1, 4, 16], "value": [0.19, 0.10, 0.04], "std_error": [0.01, 0.005, 0.002]}}
KENDALL = [{"measure": "m_sharpness", "m": m, "tau_loss_gap": t, "tau_error_gap": 0.3} for m, t in ((1, 0.86), (16, 0.85), (256, 0.75))]
KENDALL += [{"measure": "lambda_max", "m": None, "tau_loss_gap": 0.88, "tau_error_gap": 0.4},
            {"measure": "flat", "m": None, "tau_loss_gap": None, "tau_error_gap": None}]
METRICS = {label: [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.2 / e, "train_acc": 1 - 0.1 / e, "test_acc": 0.95 - 0.1 / e}
                   for e in range(1, 6)] for label in ("SGD", "SAM")}
NOISE = [{"optimizer": o, "noise": r, "mean": 0.9 - r * s, "spread": 0.01} for o, s in (("sgd", 0.8), ("sam", 0.4)) for r in (0.0, 0.4, 0.8)]


def test_surface_z_is_the_capped_log():
    loss = np.array([0.0, 1.0, 100.0])
    assert figures.surface_z(loss, 10.0) == pytest.approx(np.log([0.1, 1.1, 10.1]))


def test_surface_3d_has_one_lit_panel_per_model_with_a_shared_z_range():
    fig = figures.surface_3d(SURFACES)
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["SGD", "SAM"] and all(ax.name == "3d" for ax in axes)
    top = np.log(SURFACES["SGD"].loss.max() + 0.1)
    bottom = np.log(0.01 + 0.1)
    for ax in axes:
        assert ax.get_zlim() == pytest.approx((bottom, top))
        assert ax.get_xlabel() == r"$\alpha$" and ax.get_ylabel() == r"$\beta$"
    # the capped heights: the SAM panel drawn from its own (flatter) losses
    capped = figures.surface_3d(SURFACES, zmax=1.0)
    assert capped.axes[0].get_zlim()[1] == pytest.approx(np.log(1.1))


def test_contours_share_levels_and_label_their_axes():
    fig = figures.surface_contours(SURFACES, levels=10)
    panels = [ax for ax in fig.axes if ax.get_title() in SURFACES]
    assert len(panels) == 2 and len(fig.axes) == 3  # plus one shared colour bar
    for ax in panels:
        assert ax.get_xlabel() == r"$\alpha$ (direction 1)" and ax.get_ylabel() == r"$\beta$ (direction 2)"
        assert ax.get_xlim() == pytest.approx((-1, 1)) and ax.get_ylim() == pytest.approx((-1, 1))


def test_contours_draw_a_training_path_given_or_saved_with_a_pca_surface():
    path = np.array([[0.9, -0.6], [0.5, -0.2], [0.2, 0.1], [0.0, 0.0]])
    saved = bowl(2.0)
    saved.meta = {"pca": {"coordinates": path.tolist(), "explained_variance_ratio": [0.8, 0.1]}}
    fig = figures.surface_contours({"SGD": bowl(8.0), "SAM": saved}, trajectories={"SGD": path[::-1] * 0.5})
    sgd, sam = (ax for ax in fig.axes if ax.get_title() in SURFACES)
    drawn = {ax.get_title(): [l for l in ax.get_lines() if l.get_label() == "training path"] for ax in (sgd, sam)}
    np.testing.assert_allclose(np.column_stack(drawn["SAM"][0].get_data()), path)
    np.testing.assert_allclose(np.column_stack(drawn["SGD"][0].get_data()), path[::-1] * 0.5)
    assert sam.get_xlim() == pytest.approx((-1, 1)) and sam.get_ylim() == pytest.approx((-1, 1))
    assert not [l for l in figures.surface_contours(SURFACES).axes[0].get_lines() if l.get_label() == "training path"]
    web = interactive.surface_contours({"SAM": saved})
    assert [t.type for t in web.data] == ["contour", "scatter"]
    np.testing.assert_allclose(np.column_stack([web.data[1].x, web.data[1].y]), path)
    with pytest.raises(ValueError, match=r"\(m, 2\) coordinates in the plane; got shape \(4,\)"):
        figures.surface_contours({"SAM": bowl(2.0)}, trajectories={"SAM": path[:, 0]})


def test_slices_and_interpolation_plot_the_given_data():
    fig = figures.slices_1d(SLICES)
    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_yscale() == "log" and acc_ax.get_ylabel() == "accuracy (%)"
    assert [l.get_label() for l in loss_ax.get_lines()] == ["SGD", "SAM"]
    np.testing.assert_allclose(loss_ax.get_lines()[1].get_ydata(), SLICES["SAM"].loss)
    np.testing.assert_allclose(acc_ax.get_lines()[0].get_ydata(), 100 * SLICES["SGD"].accuracy)

    t = np.linspace(-0.5, 1.5, 9)
    fig = figures.interpolation(line(1.0, t), line(2.0, t))
    loss_ax, acc_ax = fig.axes
    labels = [l.get_label() for l in loss_ax.get_lines() if not l.get_label().startswith("_")]
    assert labels == ["train", "test"]
    assert loss_ax.get_xlabel() == "t  (0: SGD, 1: SAM)"
    np.testing.assert_allclose(loss_ax.get_lines()[1].get_ydata(), line(2.0, t).loss)


def test_hessian_figure_has_eigenvalues_ratio_bars_and_log_density():
    fig = figures.hessian_spectrum(HESSIANS)
    top_ax, bar_ax, density_ax = fig.axes
    np.testing.assert_allclose(top_ax.get_lines()[0].get_ydata(), HESSIANS["SGD"]["eigenvalues"])
    heights = sorted(p.get_height() for p in bar_ax.patches)
    assert heights == pytest.approx(sorted([7.8, 7.8 / 3.75, 5.1, 5.1 / 2.6]))
    assert density_ax.get_yscale() == "log" and density_ax.get_xlabel() == "eigenvalue"
    without = figures.hessian_spectrum({"A": {"eigenvalues": [3.0, 2.0]}})
    assert len(without.axes) == 2
    assert [p.get_height() for p in without.axes[1].patches] == [3.0]  # no lambda_5: no ratio bar
    assert [tick.get_text() for tick in without.axes[1].get_xticklabels()] == [r"$\lambda_{max}$"]


def test_sharpness_kendall_training_and_noise_figures():
    ax = figures.m_sharpness(CURVES).axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "m (examples per perturbation)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SGD", "SAM"]

    ax = figures.kendall_vs_m(KENDALL).axes[0]
    lines = {l.get_label(): l for l in ax.get_lines()}
    np.testing.assert_allclose(lines["m_sharpness"].get_ydata(), [0.86, 0.85, 0.75])
    assert lines["lambda_max"].get_ydata()[0] == pytest.approx(0.88) and "flat" not in lines

    loss_ax, acc_ax = figures.training_curves(METRICS).axes
    assert len(loss_ax.get_lines()) == 4 and loss_ax.get_xlabel() == "epoch"
    np.testing.assert_allclose(acc_ax.get_lines()[1].get_ydata(), [100 * r["test_acc"] for r in METRICS["SGD"]])

    ax = figures.label_noise(NOISE).axes[0]
    assert ax.get_xlabel() == "label noise (%)" and ax.get_ylabel() == "clean test accuracy (%)"


def test_save_figure_writes_png_and_pdf_with_text_as_text(tmp_path):
    paths = figures.save_figure(figures.m_sharpness(CURVES), tmp_path / "fig")
    assert [p.name for p in paths] == ["fig.png", "fig.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = paths[1].read_bytes()
    # fonttype 42: TrueType outlines (embedded as CIDFontType2), never Type 3 bitmaps/paths
    assert pdf.startswith(b"%PDF") and (b"/CIDFontType2" in pdf or b"/TrueType" in pdf) and b"/Type3" not in pdf


def test_surface_report_writes_each_kind_with_the_value_at_the_model(tmp_path):
    from landscape.plot import write_surface_report

    written = write_surface_report(SURFACES, tmp_path / "surface_2d_run.v2")  # a dot in a run's name stays
    assert sorted(p.name for p in written) == sorted(["surface_2d_run.v2_3d.png", "surface_2d_run.v2_3d.pdf",
                                                      "surface_2d_run.v2_contours.png", "surface_2d_run.v2_contours.pdf",
                                                      "surface_2d_run.v2.html"])
    page = (tmp_path / "surface_2d_run.v2.html").read_text()
    assert f"<td>{SURFACES['SGD'].loss[4, 4]:.4g}</td>" in page and "2D loss surfaces (train split)" in page
    even = SurfaceResult([np.linspace(-1, 1, 4)], np.arange(4.0) + 1, np.full(4, 0.5))  # no point at 0
    [png, pdf, page] = write_surface_report({"A": even}, tmp_path / "slice", split="test")
    assert png.name == "slice.png" and "<td>A</td><td></td><td></td><td>1</td><td>4</td>" in page.read_text()
    line = SLICES["SAM"]
    paths = write_surface_report({"SGD": line}, tmp_path / "path", split="test", other="SAM")
    assert "Interpolation from SGD to SAM (test split)" in paths[-1].read_text()
    with pytest.raises(ValueError, match="takes one line; got 2"):
        write_surface_report({"a": line, "b": line}, tmp_path / "two", other="SAM")


def test_figure_functions_reject_the_wrong_inputs():
    with pytest.raises(ValueError, match="must be 2D"):
        figures.surface_3d(SLICES)
    with pytest.raises(ValueError, match="at least one surface"):
        figures.surface_contours({})
    with pytest.raises(ValueError, match="must be 1D"):
        figures.slices_1d(SURFACES)


def test_interactive_figures_carry_the_same_data():
    fig = interactive.surface_3d(SURFACES)
    assert isinstance(fig, go.Figure) and [t.type for t in fig.data] == ["surface", "surface"]
    assert fig.data[0].cmax == fig.data[1].cmax and fig.data[0].cmin == fig.data[1].cmin
    np.testing.assert_allclose(np.asarray(fig.data[1].z), figures.surface_z(SURFACES["SAM"].loss, SURFACES["SGD"].loss.max()).T)
    assert [t.type for t in interactive.surface_contours(SURFACES).data] == ["contour", "contour"]
    hess = interactive.hessian_spectrum(HESSIANS)
    assert [t.type for t in hess.data].count("bar") == 2 and hess.layout.yaxis3.type == "log"
    assert len(interactive.slices_1d(SLICES).data) == 4
    assert len(interactive.training_curves(METRICS).data) == 8
    assert list(interactive.m_sharpness(CURVES).data[0].y) == CURVES["SGD"]["value"]
    assert len(interactive.kendall_vs_m(KENDALL).data) == 1
    assert len(interactive.label_noise(NOISE).data) == 2
    t = np.linspace(-0.5, 1.5, 9)
    assert len(interactive.interpolation(line(1.0, t), line(2.0, t)).data) == 4


def test_report_holds_the_summary_and_every_section_and_is_self_contained(tmp_path):
    sections = [Section("Loss surfaces", [interactive.surface_3d(SURFACES)], "same directions"),
                Section("Hessian spectrum", [interactive.hessian_spectrum(HESSIANS)]),
                Section("Sharpness", [interactive.m_sharpness(CURVES), interactive.kendall_vs_m(KENDALL)])]
    rows = [{"quantity": "lambda_max", "SGD": 7.8, "SAM": 5.1}, {"quantity": "<b>escaped</b>", "SGD": None, "SAM": 1}]
    path = write_report(tmp_path / "report.html", "SGD vs SAM", ["quantity", "SGD", "SAM"], rows, sections)
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<title>SGD vs SAM</title>" in text
    for i, section in enumerate(sections):
        assert f"<section id='section-{i}' data-title='{section.title}'>" in text
    assert text.count('class="plotly-graph-div"') == 4
    assert "<td>7.8</td><td>5.1</td>" in text and "&lt;b&gt;escaped&lt;/b&gt;" in text
    assert text.count("Plotly.newPlot") == 4
    assert "<script src=" not in text and 'src="http' not in text  # plotly.js inlined once, no network
    assert len(text) > 3_000_000
    assert html_report("t", ["q"], [], []).count("plotly") == 0


def test_hessian_data_builds_the_figure_input_from_the_api_results():
    import torch
    import torch.nn.functional as F

    from landscape import hessian

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    data = (torch.randn(40, 4), torch.randint(0, 3, (40,)))
    eigen = hessian.top_eigenvalues(model, F.cross_entropy, data, k=5, progress=False)
    density = hessian.spectral_density(model, F.cross_entropy, data, n_runs=2, n_steps=8, progress=False)
    entry = figures.hessian_data(eigen, density)
    np.testing.assert_allclose(entry["eigenvalues"], eigen.eigenvalues.numpy())
    fig = figures.hessian_spectrum({"model": entry})
    np.testing.assert_allclose(fig.axes[2].get_lines()[0].get_xdata(), np.asarray(density.grid))
    assert "density" not in figures.hessian_data(eigen)


REDUCTIONS = [{"setting": "noise=0.2", "reduction": 0.12, "reduction_spread": 0.03},
              {"setting": "noise=0", "reduction": -0.02, "reduction_spread": 0.01},
              {"setting": "noise=0.4", "reduction": 0.30, "reduction_spread": 0.05}]
RHO_LINES = [{"label": "m=4", "rho": [0.02, 0.05, 0.1], "error": [0.30, 0.27, 0.29], "spread": [0.01, 0.02, 0.01]},
             {"label": "m=128", "rho": [0.02, 0.05, 0.1], "error": [0.32, 0.31, 0.30], "spread": [0.0, 0.01, 0.01]}]
RHO_BASE = [{"label": "SGD", "error": 0.33, "spread": 0.01}]
SPECTRA = {label: [{"epoch": e, "eigenvalues": np.array([top, 0.5, 0.2]) / e**0.5, "density_grid": np.linspace(-1, 9, 40),
                    "density": np.full(40, 0.1)} for e in (1, 10, 50)] for label, top in (("SGD", 8.0), ("SAM", 3.0))}


def test_error_reduction_bars_are_sorted_with_their_seed_spread():
    ax = figures.error_reduction(REDUCTIONS).axes[0]
    bars = ax.patches
    np.testing.assert_allclose([b.get_width() for b in bars], [-2.0, 12.0, 30.0])  # percent, ascending
    assert [t.get_text() for t in ax.get_yticklabels()] == ["noise=0", "noise=0.2", "noise=0.4"]
    segments = ax.collections[0].get_segments()  # the error bars: +- the spread around each bar's end
    np.testing.assert_allclose([s[1][0] - s[0][0] for s in segments], [2.0, 6.0, 10.0])
    assert "error reduction" in ax.get_xlabel()
    fig = interactive.error_reduction(REDUCTIONS)
    assert list(fig.data[0].x) == pytest.approx([-2.0, 12.0, 30.0]) and list(fig.data[0].y)[0] == "noise=0"
    assert list(fig.data[0].error_x.array) == pytest.approx([1.0, 3.0, 5.0])


def test_error_reduction_puts_a_setting_without_baseline_errors_last():
    """A NaN reduction (the baseline made no error) goes last, the others stay sorted around it."""
    rows = [{"setting": "a", "reduction": 0.3, "reduction_spread": 0.0},
            {"setting": "b", "reduction": float("nan"), "reduction_spread": 0.0},
            {"setting": "c", "reduction": -0.2, "reduction_spread": 0.0},
            {"setting": "d", "reduction": 0.1, "reduction_spread": 0.0}]
    ax = figures.error_reduction(rows).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["c", "d", "a", "b"]
    assert list(interactive.error_reduction(rows).data[0].y) == ["c", "d", "a", "b"]


def test_error_vs_rho_draws_a_line_and_band_per_m_and_the_baseline():
    ax = figures.error_vs_rho(RHO_LINES, RHO_BASE).axes[0]
    lines = {l.get_label(): l for l in ax.get_lines()}
    np.testing.assert_allclose(lines["m=4"].get_xdata(), [0.02, 0.05, 0.1])
    np.testing.assert_allclose(lines["m=4"].get_ydata(), [30.0, 27.0, 29.0])
    np.testing.assert_allclose(lines["SGD"].get_ydata(), [33.0, 33.0])
    assert len(ax.collections) == 2  # one seed band per m
    assert ax.get_ylabel() == "test error (%)"
    fig = interactive.error_vs_rho(RHO_LINES, RHO_BASE)
    drawn = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in drawn] == ["m=4", "m=128"] and list(drawn[1].y) == pytest.approx([32.0, 31.0, 30.0])
    assert fig.layout.shapes[0].y0 == pytest.approx(33.0)
    with pytest.raises(ValueError, match="at least one error-vs-rho line"):
        figures.error_vs_rho([])


def test_spectrum_evolution_has_a_panel_per_run_and_lambda_max_over_epochs():
    fig = figures.spectrum_evolution(SPECTRA)
    sgd_ax, sam_ax, top_ax = fig.axes[:3]
    assert sgd_ax.get_title() == "SGD" and sgd_ax.get_yscale() == "log"
    assert [l.get_label() for l in sgd_ax.get_lines()] == ["epoch 1", "epoch 10", "epoch 50"]
    lines = {l.get_label(): l for l in top_ax.get_lines()}
    np.testing.assert_allclose(lines["SAM"].get_ydata(), [3.0, 3.0 / 10**0.5, 3.0 / 50**0.5])
    np.testing.assert_allclose(lines["SGD"].get_xdata(), [1, 10, 50])
    no_density = {"SGD": [{"epoch": 2, "eigenvalues": [4.0, 2.0]}]}
    ax = figures.spectrum_evolution(no_density).axes[0]
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), [4.0, 2.0])  # the top eigenvalues as markers
    fig = interactive.spectrum_evolution(SPECTRA)
    assert len(fig.data) == 2 * 3 + 2 and fig.data[-1].name == "SAM lambda_max"
    with pytest.raises(ValueError, match="at least one epoch each"):
        figures.spectrum_evolution({"SGD": []})
