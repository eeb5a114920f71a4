"""The data of the paper's figures: error reduction and error against rho from a sweep, the Hessian spectrum
along training from snapshots; and ``sam-landscape plot`` writing them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

from sam.analyses import HessianSettings
from sam.cli import main
from sam.figure_data import error_reduction_table, error_vs_rho_table, load_sweep, snapshot_epochs, spectrum_evolution
from sam.sweep import run_sweep
from sam.trainer import TrainConfig, load_run, train

TINY = TrainConfig(epochs=1, batch_size=256, lr=0.05, test_fraction=0.5)  # digits: 4 steps an epoch
GRID = {"optimizer": ["sgd", "msam"], "rho": [0.05, 0.1], "m": [8, 64], "seed": [0, 1]}


def _quiet(message: str) -> None:
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """SGD and m-SAM at two rho and two m, two seeds each: 16 one-epoch digits runs."""
    out = tmp_path_factory.mktemp("sweep")
    run_sweep(TINY, GRID, out, progress=False, log=_quiet)
    return out


def _set_test_acc(sweep_dir, run, accuracy):
    """Rewrite the last epoch's test accuracy of a run (the figures read it from metrics.jsonl)."""
    path = sweep_dir / "runs" / run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    last = json.loads(lines[-1])
    last["test_acc"] = accuracy
    path.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")


def _error(sweep_dir, run):
    return 1.0 - json.loads((sweep_dir / "runs" / run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]


def _name(optimizer, rho, m, seed):
    return f"optimizer={optimizer},rho={rho!r},m={m},seed={seed}"


@pytest.fixture
def known(swept, tmp_path):
    """A copy of the sweep whose test accuracies are set by hand: the figures' numbers have closed forms."""
    out = tmp_path / "sweep"
    shutil.copytree(swept, out)
    for rho in (0.05, 0.1):
        for m in (8, 64):
            _set_test_acc(out, _name("sgd", rho, m, 0), 0.80)  # e = 0.20
            _set_test_acc(out, _name("sgd", rho, m, 1), 0.75)  # e = 0.25
    accuracies = {(0.05, 8): (0.85, 0.80), (0.1, 8): (0.70, 0.75), (0.05, 64): (0.80, 0.75), (0.1, 64): (0.90, 0.85)}
    for (rho, m), (first, second) in accuracies.items():
        _set_test_acc(out, _name("msam", rho, m, 0), first)
        _set_test_acc(out, _name("msam", rho, m, 1), second)
    return out


def test_load_sweep_reads_every_run_with_its_config_and_final_error(swept):
    keys, runs = load_sweep(swept)
    assert keys == ["optimizer", "rho", "m", "seed"]
    assert len(runs) == 16
    for run in runs:
        assert run.values == {"optimizer": run.config.optimizer, "rho": run.config.rho, "m": run.config.m,
                              "seed": run.config.seed}
        assert run.test_error == pytest.approx(_error(swept, run.name), abs=1e-15)
        assert run.is_baseline == (run.config.optimizer == "sgd")


def test_error_reduction_is_the_mean_over_seeds_of_the_relative_reduction(known):
    rows = error_reduction_table(known)
    by_setting = {row["setting"]: row for row in rows}
    assert set(by_setting) == {"rho=0.05, m=8", "rho=0.1, m=8", "rho=0.05, m=64", "rho=0.1, m=64"}
    # seed 0: (0.20 - 0.15) / 0.20 = 0.25; seed 1: (0.25 - 0.20) / 0.25 = 0.2
    row = by_setting["rho=0.05, m=8"]
    assert row["reductions"] == pytest.approx([0.25, 0.2], abs=1e-12)
    assert row["reduction"] == pytest.approx(0.225, abs=1e-12)
    assert row["reduction_spread"] == pytest.approx(np.std([0.25, 0.2], ddof=1), abs=1e-12)
    assert row["error"] == pytest.approx(0.175) and row["baseline_error"] == pytest.approx(0.225)
    assert row["seeds"] == [0, 1] and row["baseline"] == "sgd" and row["optimizer"] == "msam"
    assert row["runs"] == [_name("msam", 0.05, 8, 0), _name("msam", 0.05, 8, 1)]
    assert row["baseline_runs"] == [_name("sgd", 0.05, 8, 0), _name("sgd", 0.05, 8, 1)]  # matched on rho and m
    # (0.2 - 0.3) / 0.2 = -0.5 and (0.25 - 0.25) / 0.25 = 0: SAM worse here
    assert by_setting["rho=0.1, m=8"]["reduction"] == pytest.approx(-0.25, abs=1e-12)
    assert [row["reduction"] for row in rows] == sorted(row["reduction"] for row in rows)
    assert rows[0]["setting"] == "rho=0.1, m=8" and rows[-1]["setting"] == "rho=0.1, m=64"


def test_error_reduction_of_the_real_sweep_matches_the_metrics(swept):
    for row in error_reduction_table(swept):
        expected = [(_error(swept, b) - _error(swept, s)) / _error(swept, b)
                    for s, b in zip(row["runs"], row["baseline_runs"])]
        assert row["reductions"] == pytest.approx(expected, abs=1e-12)


def test_error_vs_rho_draws_one_line_per_m_and_sgd_once_per_seed(known):
    table = error_vs_rho_table(known)
    lines = {line["label"]: line for line in table["lines"]}
    assert set(lines) == {"m=8", "m=64"}
    assert lines["m=8"]["rho"] == [0.05, 0.1]
    assert lines["m=8"]["error"] == pytest.approx([0.175, 0.275], abs=1e-12)
    assert lines["m=64"]["error"] == pytest.approx([0.225, 0.125], abs=1e-12)
    assert lines["m=64"]["spread"] == pytest.approx([np.std([0.2, 0.25], ddof=1), np.std([0.1, 0.15], ddof=1)], abs=1e-12)
    assert lines["m=8"]["seeds"] == [[0, 1], [0, 1]]
    (baseline,) = table["baselines"]  # SGD at every rho and m is one set of runs, counted once per seed
    assert baseline["label"] == "SGD" and baseline["seeds"] == [0, 1]
    assert baseline["error"] == pytest.approx(0.225) and baseline["spread"] == pytest.approx(np.std([0.2, 0.25], ddof=1))


def test_plain_sam_uses_its_batch_as_m_and_its_default_rho(tmp_path):
    out = tmp_path / "sweep"
    run_sweep(TINY, {"optimizer": ["sgd", "sam"], "rho": [None, 0.1]}, out, progress=False, log=_quiet)
    table = error_vs_rho_table(out)
    (line,) = table["lines"]
    assert line["label"] == f"m={TINY.batch_size}" and line["rho"] == [0.05, 0.1]  # None: SAM's default 0.05
    assert [row["setting"] for row in error_reduction_table(out)] != []


def test_sweeps_without_what_a_figure_needs_are_refused(tmp_path, swept):
    with pytest.raises(FileNotFoundError, match="not a sweep directory"):
        error_reduction_table(tmp_path)
    only_sgd = tmp_path / "sgd"
    run_sweep(TINY, {"seed": [0]}, only_sgd, progress=False, log=_quiet)
    with pytest.raises(ValueError, match="holds no SAM run"):
        error_reduction_table(only_sgd)
    with pytest.raises(ValueError, match="not a sweep over rho"):
        error_vs_rho_table(only_sgd)
    no_baseline = tmp_path / "sam"
    run_sweep(TINY, {"optimizer": ["sam"], "rho": [0.05]}, no_baseline, progress=False, log=_quiet)
    with pytest.raises(ValueError, match="base optimizer"):
        error_reduction_table(no_baseline)


# ------------------------------------------------------------------------------------ spectrum evolution


@pytest.fixture(scope="module")
def snapshotted(tmp_path_factory):
    """SGD and SAM on MNIST-1D's small CNN, 6 epochs, a snapshot every 2."""
    root = tmp_path_factory.mktemp("spectrum")
    runs = []
    for optimizer in ("sgd", "sam"):
        config = TrainConfig(dataset="mnist1d", model="mnist1d_cnn", data_root=str(root / "data"), epochs=6,
                             batch_size=200, optimizer=optimizer, snapshot_every=2)
        runs.append(train(config, root / optimizer, progress=False).out_dir)
    return runs


def _dense_reference_lambda_max(checkpoint):
    """lambda_max by ARPACK on exact Hessian-vector products (plain double backward), in float64."""
    run = load_run(checkpoint)
    model = run.model.double()
    x, y = run.train.x.double(), run.train.y
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])

    def matvec(v):
        hv = torch.autograd.grad(flat @ torch.as_tensor(v, dtype=torch.float64).reshape(-1), params, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).numpy()

    n = flat.numel()
    op = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    return float(scipy.sparse.linalg.eigsh(op, k=1, which="LA", tol=1e-7, return_eigenvectors=False)[0])


def test_snapshot_epochs_list_the_snapshots_and_the_final_weights(snapshotted):
    sgd = snapshotted[0]
    assert list(snapshot_epochs(sgd)) == [2, 4, 6]
    assert snapshot_epochs(sgd)[6].name == "epoch_0006.pt"
    (sgd / "snapshots" / "epoch_0006.pt").rename(sgd / "snapshots" / "moved.pt")
    try:
        assert snapshot_epochs(sgd)[6] == sgd / "model.pt"  # the last epoch's weights are model.pt's
    finally:
        (sgd / "snapshots" / "moved.pt").rename(sgd / "snapshots" / "epoch_0006.pt")


def test_spectrum_at_each_epoch_is_that_epochs_hessian(snapshotted, tmp_path):
    settings = HessianSettings(k=3, trace=False, density=True, density_runs=2, density_steps=20, tol=1e-6, seed=0)
    spectra = spectrum_evolution(snapshotted, tmp_path, epochs=[2, 6], settings=settings, progress=False, log=_quiet)
    assert list(spectra) == ["SGD", "SAM rho=0.05"]
    for run, label in zip(snapshotted, spectra):
        entries = spectra[label]
        assert [e["epoch"] for e in entries] == [2, 6]
        for entry in entries:
            assert entry["checkpoint"] == str(run / "snapshots" / f"epoch_{entry['epoch']:04d}.pt")
            assert entry["eigenvalues"][0] == entry["lambda_max"] and len(entry["eigenvalues"]) == 3
            grid, density = entry["density_grid"], entry["density"]
            assert density.shape == grid.shape and np.all(density >= 0)
            assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=0.05)  # a density: mass one
        assert entries[0]["lambda_max"] != entries[1]["lambda_max"]
    # the weights of that epoch, not the final ones: float64 references at an early and a final snapshot
    for entry in (spectra["SGD"][0], spectra["SAM rho=0.05"][1]):
        assert entry["lambda_max"] == pytest.approx(_dense_reference_lambda_max(entry["checkpoint"]), rel=1e-4)
    assert (tmp_path / "sgd" / "epoch_0002" / "hessian.json").exists()


def test_spectrum_epochs_default_to_evenly_spread_and_analyses_are_reused(snapshotted, tmp_path):
    settings = HessianSettings(k=1, trace=False, density=False)
    spectra = spectrum_evolution(snapshotted[:1], tmp_path, count=2, settings=settings, progress=False, log=_quiet)
    assert [e["epoch"] for e in spectra["SGD"]] == [2, 6]  # first and last of 2, 4, 6
    assert "density" not in spectra["SGD"][0]
    saved = tmp_path / "sgd" / "epoch_0006" / "hessian.json"
    before = saved.stat().st_mtime_ns
    lines = []
    again = spectrum_evolution(snapshotted[:1], tmp_path, count=2, settings=settings, progress=False, log=lines.append)
    assert saved.stat().st_mtime_ns == before
    assert again["SGD"][1]["lambda_max"] == spectra["SGD"][1]["lambda_max"]
    with pytest.raises(ValueError, match="other settings"):
        spectrum_evolution(snapshotted[:1], tmp_path, count=2, settings=HessianSettings(k=2, trace=False),
                           progress=False, log=_quiet)


def test_spectrum_evolution_names_what_is_missing(snapshotted, tmp_path):
    with pytest.raises(ValueError, match=r"epoch\(s\) \[3\].*epochs \[2, 4, 6\]"):
        spectrum_evolution(snapshotted[:1], tmp_path, epochs=[3], progress=False, log=_quiet)
    with pytest.raises(ValueError, match="one distinct label per run"):
        spectrum_evolution(snapshotted, tmp_path, labels=["a", "A"], progress=False, log=_quiet)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((snapshotted[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="holds no weights yet"):
        spectrum_evolution([empty], tmp_path, progress=False, log=_quiet)


# ------------------------------------------------------------------------------------------------- CLI


def test_plot_commands_write_png_pdf_html_and_the_numbers(known, snapshotted, tmp_path, capsys):
    assert main(["plot", "error-reduction", str(known)]) == 0
    figures = known / "figures"
    for suffix in ("png", "pdf", "html", "json"):
        assert (figures / f"error_reduction.{suffix}").stat().st_size > 0
    assert json.loads((figures / "error_reduction.json").read_text()) == json.loads(json.dumps(error_reduction_table(known)))
    html = (figures / "error_reduction.html").read_text()
    assert "22.50 +- 3.54" in html  # the rho=0.05, m=8 reduction in the report's table
    assert main(["plot", "error-vs-rho", str(known), "--out", str(tmp_path / "rho")]) == 0
    saved = json.loads((tmp_path / "rho" / "error_vs_rho.json").read_text())
    assert [line["label"] for line in saved["lines"]] == ["m=8", "m=64"]
    assert (tmp_path / "rho" / "error_vs_rho.pdf").read_bytes().startswith(b"%PDF")
    assert main(["plot", "spectrum-evolution", *map(str, snapshotted), "--out", str(tmp_path / "spectrum"),
                 "--count", "2", "--k", "2", "--density-runs", "1", "--density-steps", "10", "--no-progress"]) == 0
    spectra = json.loads((tmp_path / "spectrum" / "spectrum_evolution.json").read_text())
    assert [e["epoch"] for e in spectra["SAM rho=0.05"]] == [2, 6] and len(spectra["SGD"][0]["density"]) > 10
    assert "wrote" in capsys.readouterr().out
    assert main(["plot", "error-vs-rho", str(tmp_path / "nowhere")]) == 2
    assert "sam-landscape plot: error:" in capsys.readouterr().err
    assert main(["plot", "spectrum-evolution", str(snapshotted[0]), "--out", str(tmp_path / "s2"), "--epochs", "5"]) == 2
    assert "no weights of epoch(s) [5]" in capsys.readouterr().err


SMALL = ["--surface-steps", "3", "--slice-steps", "3", "--interpolation-steps", "3", "--density-runs", "1",
         "--density-steps", "8", "--trace-matvecs", "3", "--m", "64", "--no-progress", "--device", "cpu"]


def test_compare_adds_the_sweep_and_spectrum_figures_when_given(known, snapshotted, tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", *map(str, snapshotted), "--out", str(out), "--sweep", str(known), "--spectrum-evolution",
                 *SMALL]) == 0
    for name in ("error_reduction", "error_vs_rho", "spectrum_evolution"):
        assert (out / f"{name}.png").exists() and (out / f"{name}.pdf").exists()
    report = (out / "report.html").read_text()
    assert f"Across the settings of {known}" in report and "from the runs&#x27; snapshots" in report
    assert sorted(p.name for p in (out / "analyses" / "spectrum" / "sam-rho0.05").iterdir()) == [
        "epoch_0002", "epoch_0004", "epoch_0006"]
    without_snapshots = tmp_path / "plain"
    train(TrainConfig(epochs=1, batch_size=256), without_snapshots, progress=False)
    assert main(["compare", str(snapshotted[0]), str(without_snapshots), "--out", str(tmp_path / "c2"),
                 "--spectrum-evolution", *SMALL]) == 2
    assert not (tmp_path / "c2" / "analyses").exists()  # refused before any analysis


def test_demo_trains_with_snapshots_and_shows_the_spectrum_evolution(tmp_path):
    from sam.compare import CompareConfig, demo

    config = CompareConfig(surface_steps=3, slice_steps=3, interpolation_steps=3, density_runs=1, density_steps=8,
                           trace_matvecs=3, ms=(64,), device="cpu")
    demo(tmp_path / "figures", tmp_path / "runs", seeds=2, epochs=8, config=config, progress=False, log=_quiet)
    assert sorted(p.name for p in (tmp_path / "runs" / "demo-mnist1d-sgd-e8-seed0" / "snapshots").iterdir()) == [
        "epoch_0002.pt", "epoch_0004.pt", "epoch_0006.pt", "epoch_0008.pt"]
    saved = json.loads((tmp_path / "figures" / "summary.json").read_text())
    assert [(e["label"], e["seeds"]) for e in saved["runs"]] == [("SGD", [0, 1]), ("SAM rho=0.2", [0, 1])]
    assert (tmp_path / "figures" / "spectrum_evolution.png").exists()


def test_demo_names_a_run_left_by_another_recipe_instead_of_resuming_it(tmp_path):
    """A run the demo trained before its recipe changed (here: without snapshots) is neither reused nor
    overwritten: the error names the field, the run and what to do."""
    from sam.compare import demo
    from sam.trainer import ConfigMismatch

    old = tmp_path / "runs" / "demo-digits-sgd-e1-seed0"
    train(TrainConfig(dataset="digits", model="digits_cnn", epochs=1, batch_size=128, lr=0.1, snapshot_every=0,
                      optimizer="sgd", seed=0), old, progress=False)
    before = (old / "config.json").read_bytes()
    with pytest.raises(ConfigMismatch, match=r"snapshot_every: saved 0, given 1\).*another version of the demo's "
                                             r"recipe; remove it, or give the demo another runs directory \(--runs\)"):
        demo(tmp_path / "figures", tmp_path / "runs", dataset="digits", seeds=1, epochs=1, progress=False, log=_quiet)
    assert (old / "config.json").read_bytes() == before and not (tmp_path / "figures").exists()

