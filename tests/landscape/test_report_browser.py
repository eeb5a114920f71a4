"""The HTML report in a real browser: every figure renders in headless Chromium, with no JavaScript error.

Needs ``/usr/bin/chromium``, ``/usr/bin/chromedriver`` (Debian packages ``chromium`` and ``chromium-driver``)
and ``selenium`` (the ``test`` extra). Without them the tests are skipped, unless
``SAM_LANDSCAPE_REQUIRE_BROWSER=1`` is set (CI sets it), in which case they fail: a missing browser must
never pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from landscape.plot import interactive
from landscape.plot.report import Section, write_report
from landscape.surface import SurfaceResult

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REQUIRE_ENV = "SAM_LANDSCAPE_REQUIRE_BROWSER"
RENDER_TIMEOUT_S = 20.0

TITLE = "SAM vs SGD: landscape report (browser test)"
SUMMARY_COLUMNS = ["optimizer", "test_acc", "lambda_max", "sharpness"]
SUMMARY_ROWS = [
    {"optimizer": "SGD", "test_acc": 0.9012, "lambda_max": 41.5, "sharpness": 0.0731},
    {"optimizer": "SAM", "test_acc": 0.9187, "lambda_max": 12.25, "sharpness": 0.0214},
]


def _unavailable(reason: str) -> None:
    """Skip, or fail when the environment demands a browser."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires the browser test to run")
    pytest.skip(f"{reason} (install the Debian packages chromium and chromium-driver, and selenium)")


# ----------------------------------------------------------------------------------------------------------
# Synthetic but realistic inputs for every interactive figure
# ----------------------------------------------------------------------------------------------------------


def _bowl(curvature: tuple[float, float], n: int = 15, radius: float = 1.0) -> SurfaceResult:
    """A quadratic bowl ``0.05 + a x^2 + b y^2`` with a matching accuracy that falls off with the loss."""
    coords = [np.linspace(-radius, radius, n), np.linspace(-radius, radius, n)]
    x, y = np.meshgrid(*coords, indexing="ij")
    loss = 0.05 + curvature[0] * x**2 + curvature[1] * y**2
    accuracy = np.clip(0.98 * np.exp(-0.4 * (loss - 0.05)), 0.1, 1.0)
    return SurfaceResult(coords=coords, loss=loss, accuracy=accuracy)


def _line(values: np.ndarray, t: np.ndarray) -> SurfaceResult:
    return SurfaceResult(coords=[t], loss=values, accuracy=np.clip(0.99 - 0.3 * np.log1p(values), 0.1, 1.0))


def _figures() -> list[tuple[str, list[Any], str]]:
    """(section title, figures, text) for every function in :mod:`landscape.plot.interactive`."""
    surfaces = {"SGD": _bowl((4.0, 2.5)), "SAM": _bowl((1.2, 0.8))}

    alpha = np.linspace(-1.0, 1.0, 41)
    slices = {"SGD": _line(0.05 + 4.0 * alpha**2, alpha), "SAM": _line(0.05 + 1.2 * alpha**2, alpha)}

    t = np.linspace(-0.5, 1.5, 41)
    outside = np.clip(-t, 0, None) + np.clip(t - 1, 0, None)
    barrier = 0.05 + 2.0 * np.sin(np.pi * np.clip(t, 0, 1)) ** 2 + 0.5 * outside
    train, test = _line(barrier, t), _line(barrier * 1.3 + 0.1, t)

    grid = np.linspace(-5.0, 50.0, 200)

    def density(centre: float, width: float) -> np.ndarray:
        bulk = np.exp(-0.5 * (grid / 0.5) ** 2)
        outlier = 0.01 * np.exp(-0.5 * ((grid - centre) / width) ** 2)
        d = bulk + outlier
        return d / np.trapezoid(d, grid) if hasattr(np, "trapezoid") else d / np.trapz(d, grid)

    hessians = {
        "SGD": {"eigenvalues": [41.5, 30.2, 22.7, 15.1, 9.8], "density_grid": grid, "density": density(40.0, 3.0)},
        "SAM": {"eigenvalues": [12.25, 10.1, 8.4, 6.9, 5.3], "density_grid": grid, "density": density(11.0, 1.5)},
    }

    curves = {
        "SGD": {"m": [1, 4, 16], "value": [0.21, 0.12, 0.073], "std_error": [0.02, 0.011, 0.006]},
        "SAM": {"m": [1, 4, 16], "value": [0.08, 0.045, 0.021], "std_error": [0.01, 0.005, None]},
    }

    kendall = [
        {"measure": "m-sharpness", "m": 1, "tau_loss_gap": 0.62, "tau_error_gap": 0.55},
        {"measure": "m-sharpness", "m": 4, "tau_loss_gap": 0.48, "tau_error_gap": 0.41},
        {"measure": "m-sharpness", "m": 16, "tau_loss_gap": 0.31, "tau_error_gap": 0.27},
        {"measure": "adaptive m-sharpness", "m": 1, "tau_loss_gap": 0.58, "tau_error_gap": 0.5},
        {"measure": "adaptive m-sharpness", "m": 4, "tau_loss_gap": 0.44, "tau_error_gap": None},
        {"measure": "adaptive m-sharpness", "m": 16, "tau_loss_gap": 0.29, "tau_error_gap": 0.22},
        {"measure": "lambda_max", "m": None, "tau_loss_gap": 0.25, "tau_error_gap": 0.2},
        {"measure": "trace", "m": None, "tau_loss_gap": 0.18, "tau_error_gap": 0.15},
    ]

    epochs = np.arange(1, 21)

    def run(rate: float, final_acc: float) -> list[dict[str, float]]:
        return [{"epoch": int(e), "train_loss": float(2.3 * np.exp(-rate * e) + 0.01),
                 "test_loss": float(2.3 * np.exp(-rate * e) + 0.3 + 0.002 * e),
                 "train_acc": float(1.0 - 0.9 * np.exp(-rate * e)),
                 "test_acc": float(final_acc - 0.8 * np.exp(-rate * e))} for e in epochs]

    metrics = {"SGD": run(0.35, 0.90), "SAM": run(0.25, 0.92)}

    noise_rows = [{"optimizer": opt, "noise": noise, "mean": base - drop * noise, "spread": 0.004 + 0.01 * noise}
                  for opt, base, drop in (("SGD", 0.93, 0.55), ("SAM", 0.94, 0.3))
                  for noise in (0.0, 0.2, 0.4, 0.6, 0.8)]
    noise_rows[-1]["spread"] = None  # missing spreads must render as zero-length error bars

    reductions = [{"setting": f"model={model}, label_noise={noise}", "reduction": r, "reduction_spread": sd}
                  for model, noise, r, sd in (("mlp", 0, 0.089, 0.034), ("mlp", 0.2, 0.047, 0.02),
                                              ("cnn", 0, 0.158, 0.099), ("cnn", 0.2, -0.02, 0.029))]
    rho = [0.0, 0.05, 0.1, 0.2, 0.4]
    rho_lines = [{"label": f"m={m}", "rho": rho, "error": [0.33 - slope * r for r in rho], "spread": [0.01] * 5}
                 for m, slope in ((25, 0.25), (100, 0.2))]
    spectra = {label: [{"epoch": e, "eigenvalues": np.array([top, 0.6 * top, 0.3 * top]) * (1 + e / 100),
                        "density_grid": grid, "density": density(top * (1 + e / 100), 0.5)} for e in (50, 100, 200)]
               for label, top in (("SGD", 20.0), ("SAM", 6.0))}
    spectra["SAM"][0].pop("density")  # an epoch without a density: its top eigenvalues as markers

    called: set[str] = set()

    def fig(name: str, *args: Any, **kwargs: Any) -> Any:
        called.add(name)
        return getattr(interactive, name)(*args, **kwargs)

    sections = [
        ("Loss surfaces", [fig("surface_3d", surfaces), fig("surface_contours", surfaces)],
         "Filter-normalised random directions, 15 x 15 grid."),
        ("1D slices", [fig("slices_1d", slices)], ""),
        ("Interpolation", [fig("interpolation", train, test)], "From the SGD to the SAM solution."),
        ("Hessian spectrum", [fig("hessian_spectrum", hessians)], "Lanczos top-5 and SLQ density."),
        ("m-sharpness", [fig("m_sharpness", curves)], ""),
        ("Sharpness vs generalization", [fig("kendall_vs_m", kendall), fig("kendall_vs_m", kendall, gap="error_gap")],
         ""),
        ("Training", [fig("training_curves", metrics)], ""),
        ("Label noise", [fig("label_noise", noise_rows)], "Clean test accuracy <with> label noise & spread."),
        ("Spectrum during training", [fig("spectrum_evolution", spectra)], "Epochs 50, 100 and 200."),
        ("Across settings", [fig("error_reduction", reductions), fig("error_vs_rho", rho_lines, [
            {"label": "SGD", "error": 0.33, "spread": 0.01}])], "Error reduction; error against rho."),
    ]
    missing = set(interactive.__all__) - called
    assert not missing, f"interactive figures not covered by the browser test: {sorted(missing)}"
    return sections


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    sections = [Section(title, figures=figs, text=text) for title, figs, text in _figures()]
    path = write_report(tmp_path_factory.mktemp("report") / "report.html", TITLE, SUMMARY_COLUMNS, SUMMARY_ROWS,
                        sections, footer="synthetic data")
    return {"path": path, "sections": sections, "n_figures": sum(len(s.figures) for s in sections)}


# ----------------------------------------------------------------------------------------------------------
# The browser
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver(request: pytest.FixtureRequest) -> Any:
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            _unavailable(f"{binary} is missing")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _unavailable(f"selenium is not installed ({exc})")

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                "--window-size=1400,1000", "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.set_capability("goog:loggingOptions", {"browser": "ALL"})
    try:
        drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as exc:  # noqa: BLE001 - any start-up failure means no usable browser
        _unavailable(f"headless Chromium did not start: {type(exc).__name__}: {exc}")
    request.addfinalizer(drv.quit)
    drv.set_page_load_timeout(60)
    return drv


# Per plot div: has data, an SVG layer, and for 3D scenes a WebGL canvas.
_PLOT_STATE_JS = """
return Array.from(document.querySelectorAll('div.js-plotly-plot')).map(function (gd) {
    var fl = gd._fullLayout || {};
    var is3d = typeof fl._has === 'function' ? fl._has('gl3d') : false;
    return {
        id: gd.id,
        nData: Array.isArray(gd._fullData) ? gd._fullData.length : 0,
        nSvg: gd.querySelectorAll('.main-svg').length,
        is3d: is3d,
        nCanvas: gd.querySelectorAll('.gl-container canvas').length,
        noWebgl: gd.innerText.indexOf('WebGL is not supported') >= 0,
        title: fl.title && fl.title.text ? fl.title.text : null
    };
});
"""


def _load(driver: Any, path: Path) -> list[dict[str, Any]]:
    """Open ``path`` and wait until every plot div is rendered; return the per-plot state."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drain entries from earlier pages
    driver.get(path.resolve().as_uri())

    def rendered(drv: Any) -> list[dict[str, Any]] | bool:
        state = drv.execute_script(_PLOT_STATE_JS)
        ready = drv.execute_script("return document.readyState") == "complete"
        done = ready and all(p["nData"] > 0 and p["nSvg"] > 0 and (not p["is3d"] or p["nCanvas"] > 0)
                             for p in state)
        return state if done else False

    try:
        return WebDriverWait(driver, RENDER_TIMEOUT_S, poll_frequency=0.1).until(rendered)
    except TimeoutException:
        state = driver.execute_script(_PLOT_STATE_JS)
        log = driver.get_log("browser")
        pytest.fail(f"plots not rendered within {RENDER_TIMEOUT_S} s: {state}; browser log:\n{_fmt(log)}")


def _severe(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("level") == "SEVERE"]


def _fmt(entries: list[dict[str, Any]]) -> str:
    return "\n".join(f"  [{e.get('level')}] {e.get('source', '')}: {e.get('message')}" for e in entries)


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------


def test_report_renders_every_figure_without_js_errors(driver: Any, report: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    state = _load(driver, report["path"])
    log = driver.get_log("browser")
    severe = _severe(log)
    assert not severe, f"JavaScript errors in the report:\n{_fmt(severe)}"

    assert driver.execute_script("return typeof window.Plotly") == "object", "window.Plotly is not defined"
    assert driver.title == TITLE

    # Every figure written is a rendered plot div with data; the 3D one has a WebGL canvas.
    assert len(state) == report["n_figures"], state
    assert len(driver.find_elements(By.CSS_SELECTOR, "div.js-plotly-plot")) == report["n_figures"]
    empty = [p for p in state if p["nData"] == 0]
    assert not empty, f"plot divs with empty _fullData: {empty}"
    n_data = driver.execute_script(
        "return Array.from(document.querySelectorAll('div.js-plotly-plot')).map(gd => (gd._fullData || []).length)")
    expected = [len(fig.data) for s in report["sections"] for fig in s.figures]
    assert n_data == expected, (n_data, expected)
    scenes = [p for p in state if p["is3d"]]
    assert len(scenes) == 1 and scenes[0]["nCanvas"] > 0, f"the 3D surface did not get a WebGL canvas: {scenes}"
    assert not any(p["noWebgl"] for p in state), f"WebGL unavailable: {state}"
    titles = [p["title"] for p in state]
    assert titles == [fig.layout.title.text for s in report["sections"] for fig in s.figures]

    # Every section heading, in order, with its figures inside it.
    sections = driver.find_elements(By.CSS_SELECTOR, "section[data-title]")
    assert [s.get_attribute("data-title") for s in sections] == [s.title for s in report["sections"]]
    assert [s.find_element(By.TAG_NAME, "h2").text for s in sections] == [s.title for s in report["sections"]]
    assert [len(s.find_elements(By.CSS_SELECTOR, "div.js-plotly-plot")) for s in sections] == \
        [len(s.figures) for s in report["sections"]]
    notes = {s.get_attribute("data-title"): [p.text for p in s.find_elements(By.CSS_SELECTOR, "p.note")]
             for s in sections}
    assert notes["Label noise"] == ["Clean test accuracy <with> label noise & spread."]  # escaped, shown verbatim

    # The summary table: header and one row per summary row.
    header = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "table.summary thead th")]
    assert header == SUMMARY_COLUMNS
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, "table.summary tbody tr")]
    assert rows == [["SGD", "0.9012", "41.5", "0.0731"], ["SAM", "0.9187", "12.25", "0.0214"]]


def test_browser_log_catches_a_javascript_error(driver: Any, report: dict[str, Any], tmp_path: Path) -> None:
    """The SEVERE check is live: a report with a throwing script is caught."""
    source = report["path"].read_text(encoding="utf-8")
    assert source.count("</body>") == 1
    broken = tmp_path / "broken.html"
    broken.write_text(source.replace("</body>", '<script>throw new Error("boom")</script></body>'), encoding="utf-8")

    _load(driver, broken)
    severe = _severe(driver.get_log("browser"))
    assert any("boom" in e.get("message", "") for e in severe), f"the injected error was not logged:\n{_fmt(severe)}"


def test_missing_browser_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the variable set a missing browser is a failure, not a skip."""
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ENV):
        _unavailable("/nonexistent/chromium is missing")
    monkeypatch.delenv(REQUIRE_ENV)
    with pytest.raises(pytest.skip.Exception):
        _unavailable("/nonexistent/chromium is missing")
