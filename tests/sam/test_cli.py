"""The ``sam-landscape`` command line: help, one-line errors with exit code 2, a real run."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sam.cli import build_parser, main
from sam.trainer import TrainConfig


def _help_text(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_documents_every_flag_with_its_default(capsys):
    text = " ".join(_help_text(capsys).split())
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            assert f"{flag} | --no-{f.name.replace('_', '-')}" in text
        elif f.name == "model":  # it depends on --dataset
            assert "--model {" in text and "default: the dataset's own (digits_cnn; mnist1d_mlp for mnist1d)" in text
        elif f.name == "amp":  # it depends on --device: decided when the config is made
            assert "--amp {auto,none,bf16,fp16}" in text and "else none (default: auto)" in text
        elif f.name == "channels_last":
            assert "--channels-last | --no-channels-last" in text and "default: on for image models on CUDA" in text
        elif value is not None:
            rendered = str(value) if not isinstance(value, list) else str(value)
            assert f"(default: {rendered})" in text, f.name
    for flag in ("--out", "--resume", "--no-progress"):
        assert flag in text


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--out", "x", "--model", "resnet9000"], "invalid choice: 'resnet9000'"),
        (["train", "--out", "x", "--epochs", "many"], "invalid int value: 'many'"),
        (["train"], "the following arguments are required: --out"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_flags_give_one_line_errors_and_exit_code_2(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert fragment in err


def test_missing_dataset_directory_is_a_one_line_error(capsys, tmp_path):
    code = main(["train", "--out", str(tmp_path / "run"), "--dataset", "cifar10", "--data-root", str(tmp_path / "nowhere")])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "nowhere" in err and "not found" in err
    assert not (tmp_path / "run" / "config.json").exists()


def test_bad_values_and_existing_runs_are_one_line_errors(capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "a"), "--lr", "-1"]) == 2
    assert "lr must be a finite number >= 0" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    assert main(["train", "--out", str(tmp_path / "b"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "b" / "config.json").read_text() == "{}"


def test_train_flags_reach_the_saved_config(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["train", "--out", str(out), "--optimizer", "msam", "--m", "8", "--rho", "0.1", "--epochs", "1",
         "--batch-size", "256", "--lr-milestones", "0.3", "0.6", "--schedule", "step", "--no-batchnorm", "--no-progress"]
    )
    assert code == 0
    assert "test acc" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["optimizer"] == "msam" and saved["m"] == 8 and saved["rho"] == 0.1
    assert saved["lr_milestones"] == [0.3, 0.6] and saved["batchnorm"] is False
    assert not any("BatchNorm" in k for k in torch.load(out / "model.pt", weights_only=True))


@pytest.mark.skipif(shutil.which("sam-landscape") is None, reason="console script not installed")
def test_console_script_runs_a_training_job(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        ["sam-landscape", "train", "--optimizer", "sam", "--epochs", "2", "--batch-size", "256", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, check=True,
    )
    assert "run saved in" in done.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_module_entry_point_matches_console_script(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sam.cli", "train", "--help"], capture_output=True, text=True, check=True)
    assert "--optimizer" in done.stdout
    assert build_parser().prog == "sam-landscape"


def _stale_temporary(directory, name: str):
    """A temporary file of an atomic write whose writer was killed (PID 1, as in a container: alive, but not
    holding the file's lock)."""
    from landscape.storage import _host_id

    path = directory / f".{name}.{_host_id()}.1.abcd1234.tmp"
    path.write_bytes(b"half written")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sgd"
    assert main(["train", "--out", str(out), "--epochs", "2", "--batch-size", "256", "--no-progress"]) == 0
    return out


def test_hessian_command_writes_json_and_npz_beside_the_run(trained_run, capsys):
    import numpy as np
    import torch.nn.functional as F

    from landscape import hessian
    from sam.trainer import load_run

    argv = ["hessian", str(trained_run), "--k", "2", "--tol", "1e-3", "--trace-matvecs", "6", "--split", "test",
            "--density", "--density-runs", "2", "--density-steps", "4", "--no-progress"]
    assert main(argv) == 0
    assert "lambda_max" in capsys.readouterr().out
    saved = json.loads((trained_run / "hessian.json").read_text())
    arrays = np.load(trained_run / "hessian.npz")
    assert saved["eigen"]["converged"] and saved["split"] == "test" and saved["n_examples"] == 360
    assert saved["trace"]["n_matvecs"] == 6 and saved["density"]["n_runs"] == 2
    assert np.trapezoid(arrays["density"], arrays["density_grid"]) == pytest.approx(1.0, abs=1e-3)
    assert list(arrays["eigenvalues"]) == saved["eigen"]["eigenvalues"]

    run = load_run(trained_run)
    assert saved["checkpoint_sha256"] == run.checkpoint_sha256
    reference = hessian.top_eigenvalues(run.model, F.cross_entropy, (run.test.x, run.test.y), k=2, tol=1e-6,
                                        method="arpack", progress=False)
    assert arrays["eigenvalues"] == pytest.approx(reference.eigenvalues.numpy(), rel=1e-3)

    # results are never overwritten silently
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (trained_run / "hessian.json").read_text() == json.dumps(saved, indent=2, sort_keys=True) + "\n"
    assert main(["hessian", str(trained_run), "--k", "1", "--no-trace", "--split", "test", "--no-progress", "--overwrite"]) == 0
    assert "density" not in json.loads((trained_run / "hessian.json").read_text())


def test_hessian_command_rejects_a_missing_checkpoint(tmp_path, capsys):
    assert main(["hessian", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_surface_command_compares_two_runs_with_one_recipe_and_resumes(trained_run, tmp_path, capsys):
    import numpy as np

    other = tmp_path / "other"
    assert main(["train", "--out", str(other), "--epochs", "1", "--batch-size", "256", "--no-progress"]) == 0
    argv = ["surface", str(trained_run), "--compare", str(other), "--dim", "2", "--steps", "3", "--split", "test",
            "--no-progress"]
    assert main(argv) == 0
    first = json.loads((trained_run / "surface_2d_test.json").read_text())
    second = json.loads((other / "surface_2d_test.json").read_text())
    assert first["points_done"] == 9 and second["points_done"] == 9
    same_recipe = {k: v for k, v in first["recipe"].items() if k != "model"}
    assert same_recipe == {k: v for k, v in second["recipe"].items() if k != "model"}
    assert first["recipe"]["model"] != second["recipe"]["model"]
    before = np.load(trained_run / "surface_2d_test.npz")["loss"]
    assert "computed 9 of 9 points" in capsys.readouterr().out
    assert main([*argv, "--plot"]) == 0  # complete: resumes with nothing left to do, then draws both
    said = capsys.readouterr().out
    reports = [line for line in said.splitlines() if " points" in line]  # one per run, no "wrote": nothing was
    assert len(reports) == 2 and all("all 9 points were already computed" in r and "wrote" not in r for r in reports)
    np.testing.assert_array_equal(np.load(trained_run / "surface_2d_test.npz")["loss"], before)
    stem = f"surface_2d_test_{trained_run.name}_vs_{other.name}"
    for figure in (f"{stem}_3d", f"{stem}_contours"):
        assert (trained_run / f"{figure}.png").stat().st_size > 0 and (trained_run / f"{figure}.pdf").stat().st_size > 0
    page = (trained_run / f"{stem}.html").read_text()
    assert page.count("<section") == 1 and trained_run.name in page and other.name in page and "plotly" in page
    assert f"<td>{before[1, 1]:.4g}</td>" in page  # the loss at the model, the grid's centre
    assert main([*argv[:4], "--dim", "2", "--steps", "3", "--split", "test", "--seed", "7", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "different recipe (differs in ['seed'" in err and "pass --overwrite to compute it again" in err
    assert "delete" not in err
    assert main(["surface", str(trained_run), "--interpolate", str(other), "--steps", "3", "--split", "test",
                 "--plot", "--no-progress"]) == 0
    assert (trained_run / f"interpolation_test_{trained_run.name}_vs_{other.name}.png").exists()
    assert (trained_run / f"interpolation_test_{trained_run.name}_vs_{other.name}.html").exists()
    for flags, message in ((["--dim", "1"], "--dim has no effect with --interpolate"),
                           (["--directions", "pca"], "--directions has no effect with --interpolate")):
        assert main(["surface", str(trained_run), "--interpolate", str(other), *flags, "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert main([*argv[:2], "--interpolate-buffers", "a", "--no-progress"]) == 2
    assert "--interpolate-buffers needs --interpolate" in capsys.readouterr().err
    assert np.load(trained_run / "interpolation_test.npz")["loss"].shape == (3,)
    # the training split gets its own file beside the test split's, with its own data in the recipe
    assert main([*argv[:4], "--dim", "2", "--steps", "3", "--split", "train", "--no-progress"]) == 0
    train = json.loads((trained_run / "surface_2d.json").read_text())["recipe"]
    assert train["data_sha256"] != first["recipe"]["data_sha256"] and train["seed"] == first["recipe"]["seed"]
    np.testing.assert_array_equal(np.load(trained_run / "surface_2d_test.npz")["loss"], before)


def test_surface_along_pca_and_hessian_directions(tmp_path, capsys):
    import numpy as np

    run = tmp_path / "snap"
    assert main(["train", "--out", str(run), "--epochs", "4", "--batch-size", "256", "--snapshot-every", "1",
                 "--no-progress"]) == 0
    assert main(["surface", str(run), "--directions", "pca", "--steps", "3", "--split", "test", "--no-progress"]) == 0
    saved = json.loads((run / "surface_2d_pca_test.json").read_text())
    assert saved["recipe"]["kind"] == "given" and len(saved["pca"]["coordinates"]) == 4
    assert saved["pca"]["coordinates"][-1] == [0.0, 0.0]  # the final snapshot is the model itself
    beyond = not -1 <= min(min(p) for p in saved["pca"]["coordinates"]) <= max(max(p) for p in saved["pca"]["coordinates"]) <= 1
    assert ("widen --span to draw all of it" in capsys.readouterr().err) == beyond  # said when the path leaves the grid
    assert main(["surface", str(run), "--directions", "pca", "--steps", "3", "--split", "test", "--plot",
                 "--no-progress"]) == 0
    assert '"name":"snap: training path"' in (run / "surface_2d_pca_test.html").read_text()
    ratios = saved["pca"]["explained_variance_ratio"]
    assert ratios == sorted(ratios, reverse=True) and 0.5 < sum(ratios) <= 1.0 + 1e-12
    assert main(["surface", str(run), "--directions", "hessian", "--dim", "1", "--steps", "3", "--split", "test",
                 "--no-progress"]) == 0
    line = np.load(run / "surface_1d_hessian_test.npz")["loss"]
    assert line[1] < line[0] and line[1] < line[2]  # a minimum along the top eigenvector
    assert json.loads((run / "surface_1d_hessian_test.json").read_text())["hessian"]["eigenvalues"][0] > 0


def test_sharpness_command_writes_every_measure_beside_the_run(trained_run, capsys):
    import numpy as np
    import torch.nn.functional as F

    from landscape import sharpness
    from sam.trainer import load_run

    argv = ["sharpness", str(trained_run), "--m", "4", "64", "--rho", "0.05", "--split", "test",
            "--pac-bayes-samples", "2", "--pac-bayes-iterations", "3", "--keskar-steps", "2", "--n-samples", "3",
            "--no-progress"]
    assert main(argv) == 0
    assert "m_sharpness@m=4" in capsys.readouterr().out
    saved = json.loads((trained_run / "sharpness.json").read_text())
    arrays = np.load(trained_run / "sharpness.npz")
    assert set(saved["measures"]) == set(sharpness.MEASURES)
    assert saved["settings"]["ms"] == [4, 64] and saved["split"] == "test" and saved["n_examples"] == 360
    curve = saved["measures"]["m_sharpness"]
    assert curve["m"] == [4, 64] and curve["n_chunks"] == [90, 5]
    assert arrays["m_sharpness_m4"].shape == (90,)
    assert float(arrays["m_sharpness_m4"].mean()) == pytest.approx(curve["value"][0], rel=1e-12)

    run = load_run(trained_run)
    reference = sharpness.m_sharpness(run.model, F.cross_entropy, (run.test.x, run.test.y), m=64, rho=0.05, progress=False)
    assert curve["value"][1] == pytest.approx(reference.value, rel=1e-6)

    assert main(argv) == 2  # never overwritten silently
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["sharpness", str(trained_run), "--measures", "m_sharpness", "--m", "8", "--split", "test",
                 "--overwrite", "--no-progress"]) == 0
    assert set(json.loads((trained_run / "sharpness.json").read_text())["measures"]) == {"m_sharpness"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--m", "0"], "m must be an integer >= 1"),
        (["--m", "100000"], "every m must be at most the number of examples (360)"),
        (["--rho", "-1"], "rho must be a finite number > 0"),
        (["--adaptive-rho-inf", "0"], "adaptive_rho_inf must be a finite number > 0"),
    ],
)
def test_sharpness_command_rejects_bad_settings_in_one_line(trained_run, tmp_path, capsys, argv, message):
    assert main(["sharpness", str(trained_run), "--split", "test", "--out", str(tmp_path), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_sharpness_command_names_the_accepted_measures(trained_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sharpness", str(trained_run), "--measures", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope' (choose from 'm_sharpness'" in capsys.readouterr().err


def test_study_command_runs_a_small_study_and_resumes(tmp_path, capsys):
    argv = ["study", "--out", str(tmp_path / "study"), "--optimizers", "sgd", "sam", "--rhos", "sam=0.05",
            "--lrs", "0.05", "--batch-sizes", "128", "256", "--weight-decays", "0", "--epochs", "1",
            "--measures", "m_sharpness", "average", "--m", "16", "64", "--n-samples", "2", "--no-progress"]
    assert main([*argv, "--max-train-error", "0"]) == 2  # one epoch fits nothing: no models to correlate
    assert "only 0 of 4 models reached training error <= 0.0" in capsys.readouterr().err
    assert len((tmp_path / "study" / "study.csv").read_text().splitlines()) == 5  # the rows that explain it
    argv = [*argv, "--max-train-error", "-1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Kendall tau with loss_gap" in out and "m_sharpness" in out
    rows = (tmp_path / "study" / "study.csv").read_text().splitlines()
    assert len(rows) == 5 and "m_sharpness@m=16" in rows[0]
    kendall = (tmp_path / "study" / "kendall.csv").read_text().splitlines()
    assert kendall[0] == "measure,m,tau_loss_gap,p_loss_gap,tau_error_gap,p_error_gap" and len(kendall) == 4

    model = tmp_path / "study" / "runs" / "sgd-lr0.05-bs128-wd0" / "model.pt"
    stamp = model.stat().st_mtime_ns
    stale = _stale_temporary(tmp_path / "study", "study.json")  # a table a killed study was writing
    assert main(argv) == 0  # resumed: nothing retrained
    assert model.stat().st_mtime_ns == stamp and not stale.exists()
    assert main([*argv, "--rho", "0.1"]) == 2  # another recipe in the same directory
    err = capsys.readouterr().err
    assert "holds a study with different settings (measures)" in err
    assert main(["study", "--rhos", "sam"]) == 2
    assert "--rhos takes NAME=R1,R2" in capsys.readouterr().err


def test_compare_command_writes_every_figure_and_the_report_and_reuses_analyses(trained_run, tmp_path, capsys):
    other = tmp_path / "sam"
    assert main(["train", "--out", str(other), "--optimizer", "sam", "--epochs", "1", "--batch-size", "256", "--no-progress"]) == 0
    out = tmp_path / "compare"
    argv = ["compare", str(trained_run), str(other), "--out", str(out), "--surface-steps", "5", "--slice-steps", "7",
            "--interpolation-steps", "5", "--density-runs", "2", "--density-steps", "6", "--trace-matvecs", "3",
            "--m", "64", "256", "--no-progress"]
    assert main(argv) == 0
    from sam.compare import FIGURES

    for name in FIGURES:
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG" and (out / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
    report = (out / "report.html").read_text()
    # each run is labelled by its optimizer and rho
    for title in ("Summary", "Loss surfaces", "Interpolation from SGD to SAM rho=0.05", "Hessian spectrum", "Sharpness",
                  "Training"):
        assert f">{title}</h2>" in report
    assert "<th>SGD</th><th>SAM rho=0.05</th>" in report
    assert report.count('class="plotly-graph-div"') == 7
    saved = json.loads((out / "analyses" / "sgd" / "hessian.json").read_text())
    assert f"<td>lambda_max</td><td>{saved['lambda_max']:.4g}</td>" in report
    assert "m-sharpness, m = 64" in report

    assert not (out / "label_noise.png").exists() and not (out / "kendall_vs_m.png").exists()

    hessian_file = out / "analyses" / "sam-rho0.05" / "hessian.json"
    stamp = hessian_file.stat().st_mtime_ns
    capsys.readouterr()
    noise = tmp_path / "noise"
    noise.mkdir()
    rows = [{"optimizer": o, "noise": r, "mean": 0.95 - r * s, "spread": 0.01} for o, s in (("sgd", 0.5), ("sam", 0.2))
            for r in (0.0, 0.4)]
    (noise / "noise_study.json").write_text(json.dumps({"table": rows}))
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"kendall": [
        {"measure": "m_sharpness", "m": m, "tau_loss_gap": t, "tau_error_gap": t} for m, t in ((1, 0.8), (16, 0.7))]}))
    # the analyses are reused, only the figures are drawn again, now with the label-noise and study figures
    assert main([*argv, "--noise-study", str(noise), "--study", str(study)]) == 0
    assert hessian_file.stat().st_mtime_ns == stamp
    assert "Hessian spectrum" not in capsys.readouterr().out
    assert (out / "label_noise.png").exists() and (out / "kendall_vs_m.pdf").exists()
    report = (out / "report.html").read_text()
    assert ">Label noise</h2>" in report and report.count('class="plotly-graph-div"') == 9
    (noise / "noise_study.json").write_text(json.dumps({"table": [{"optimizer": "sgd"}]}))
    assert main([*argv, "--noise-study", str(noise)]) == 2
    assert "missing ['noise', 'mean']" in capsys.readouterr().err
    # saved analyses made with other settings are never reused silently
    assert main([*argv, "--rho", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "sharpness.json was computed with other settings or another checkpoint (settings.rho" in err
    assert main([*argv, "--labels", "sgd", "SGD"]) == 2
    assert "the two labels must differ (ignoring case" in capsys.readouterr().err

    assert main(["compare", str(tmp_path / "nope"), str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is not a run directory" in err



def test_train_with_a_preset_saves_the_resolved_config_and_explicit_flags_win(tmp_path, capsys):
    from sam.presets import preset_config

    out = tmp_path / "preset-run"
    assert main(["train", "--preset", "digits-sam", "--epochs", "1", "--batch-size", "256", "--out", str(out),
                 "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert TrainConfig.from_dict(saved) == preset_config("digits-sam", epochs=1, batch_size=256)
    assert saved["optimizer"] == "sam" and saved["rho"] == 0.05  # the preset's, not the flags' defaults
    provenance = json.loads((out / "preset.json").read_text())
    assert provenance["preset"] == "digits-sam" and provenance["overrides"] == {"epochs": 1, "batch_size": 256}

    # an explicit flag overrides the preset even when it repeats the flag's default (TrainConfig: 30 epochs)
    args = build_parser().parse_args(["train", "--out", "x", "--preset", "c10-wrn28-10-sam", "--data-root", "/data",
                                      "--epochs", "30", "--no-augment", "--rho", "0.1"])
    from sam.cli._options import resolve_train_config as _resolve_train_config

    resolved = _resolve_train_config(args)
    assert resolved == preset_config("c10-wrn28-10-sam", data_root="/data", epochs=30, augment=False, rho=0.1)
    assert (resolved.model, resolved.batch_size, resolved.weight_decay) == ("wrn28_10", 128, 5e-4)  # not given: the preset's


def test_train_preset_errors_are_one_line_and_name_the_fix(tmp_path, capsys):
    out = tmp_path / "c10"
    assert main(["train", "--preset", "c10-wrn28-10-sam", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "preset 'c10-wrn28-10-sam' trains on cifar10" in err and "--data-root DIR" in err and "--download" in err
    assert not out.exists()
    assert main(["train", "--dataset", "cifar100", "--out", str(out)]) == 2
    assert "--dataset cifar100 is read from files: pass --data-root DIR (the directory holding cifar-100-python/)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "wrn", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'wrn' (choose from 'c10-wrn28-10-sgd', 'c10-wrn28-10-sam'" in err and "'digits-sam'" in err


def test_presets_command_lists_every_preset_and_shows_one_in_full(capsys):
    from sam.presets import PRESETS

    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in PRESETS)
    assert "paper: test error 2.7%" in text and "paper: lambda_max 24.2, lambda_max/lambda_5 11.4" in text
    assert main(["presets", "c10-wrn40-10-nobn-sam"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["model"] == "wrn40_10" and shown["config"]["batchnorm"] is False and shown["config"]["epochs"] == 300
    assert shown["paper"] == {"lambda_max": 1.0, "lambda_max_over_lambda_5": 2.6}
    assert main(["presets", "nope"]) == 2
    assert "unknown preset 'nope'; choose one of c10-wrn28-10-sgd" in capsys.readouterr().err


def test_noise_study_command_writes_the_table_compare_reads_and_refuses_another_recipe(tmp_path, capsys):
    from sam.compare import load_noise_table

    out = tmp_path / "noise"
    argv = ["noise-study", "--out", str(out), "--rates", "0", "0.5", "--epochs", "1", "--batch-size", "256",
            "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "clean test accuracy (%)" in text and "noise_study.json" in text
    rows = load_noise_table(out)
    assert [(r["optimizer"], r["noise"], r["rho"]) for r in rows] == [("sgd", 0.0, None), ("sgd", 0.5, None),
                                                                       ("sam", 0.0, 0.1), ("sam", 0.5, 0.1)]
    saved = json.loads((out / "runs" / "sam-noise0.5-seed0" / "config.json").read_text())["config"]
    assert (saved["label_noise"], saved["rho"], saved["epochs"], saved["batch_size"]) == (0.5, 0.1, 1, 256)
    stamp = (out / "runs" / "sgd-noise0-seed0" / "model.pt").stat().st_mtime_ns
    stale = [_stale_temporary(out, "noise_study.json"), _stale_temporary(out / "runs" / "sgd-noise0-seed0", "state.pt")]
    assert main(argv) == 0  # resumed: nothing to train
    assert "finished before: not retrained" in capsys.readouterr().out
    assert (out / "runs" / "sgd-noise0-seed0" / "model.pt").stat().st_mtime_ns == stamp
    assert not any(path.exists() for path in stale)

    assert main([*argv, "--lr", "0.2", "--rhos", "sam=0.05"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "holds a noise study with different settings (recipe.lr: saved 0.1, given 0.2; rhos: saved {'sam': 0.1}, " \
        "given {'sam': 0.05})" in err
    assert main(["noise-study", "--rhos", "sam"]) == 2
    assert "--rhos takes NAME=RHO" in capsys.readouterr().err
    assert main(["noise-study", "--preset", "c10-resnet32-noise20-sgd", "--out", str(tmp_path / "c10")]) == 2
    assert "--data-root DIR" in capsys.readouterr().err


def test_noise_study_takes_its_recipe_from_a_preset_with_explicit_flags_on_top():
    from sam.cli._options import resolve_train_config as _resolve_train_config
    from sam.noise_study import NoiseStudyConfig, default_recipe, noise_study_runs
    from sam.presets import preset_config

    args = build_parser().parse_args(["noise-study", "--preset", "c10-resnet32-noise20-sam", "--data-root", "/data",
                                      "--epochs", "5"])
    recipe = _resolve_train_config(args, default_recipe())
    assert recipe == preset_config("c10-resnet32-noise20-sam", data_root="/data", epochs=5)
    runs = dict(noise_study_runs(NoiseStudyConfig(rates=[0.6], optimizers=["sgd"], recipe=recipe)))
    assert runs["sgd-noise0.6-seed0"] == preset_config("c10-resnet32-noise20-sgd", data_root="/data", epochs=5,
                                                       label_noise=0.6)
    plain = _resolve_train_config(build_parser().parse_args(["noise-study"]), default_recipe())
    assert plain == default_recipe()


def test_surface_along_hessian_directions_resumes_without_rerunning_lanczos(tmp_path, monkeypatch, capsys):
    import numpy as np

    from landscape import hessian, surface

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "1", "--batch-size", "256", "--no-progress"]) == 0
    argv = ["surface", str(run), "--directions", "hessian", "--dim", "1", "--steps", "5", "--split", "test",
            "--no-progress"]
    real_save = surface._save
    calls = {"lanczos": 0, "saves": 0}

    def killed_after_two_passes(*args, **kwargs):
        calls["saves"] += 1
        real_save(*args, **kwargs)
        if calls["saves"] == 3:  # the empty grid, then two points
            raise KeyboardInterrupt

    def counted(*args, **kwargs):
        calls["lanczos"] += 1
        return real_top(*args, **kwargs)

    real_top = hessian.top_eigenvalues
    monkeypatch.setattr(hessian, "top_eigenvalues", counted)
    monkeypatch.setattr(surface, "_save", killed_after_two_passes)
    assert main(argv) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err
    saved = json.loads((run / "surface_1d_hessian_test.json").read_text())
    assert saved["points_done"] == 2 and saved["hessian"]["eigenvalues"][0] > 0  # recorded from the first write
    monkeypatch.setattr(surface, "_save", real_save)
    assert main(argv) == 0
    assert calls["lanczos"] == 1  # the resumed run read the directions back
    resumed = np.load(run / "surface_1d_hessian_test.npz")["loss"]
    assert main([*argv, "--overwrite"]) == 0 and calls["lanczos"] == 2
    np.testing.assert_allclose(np.load(run / "surface_1d_hessian_test.npz")["loss"], resumed, rtol=1e-6)
    capsys.readouterr()
    assert main([*argv, "--seed", "3"]) == 2 and calls["lanczos"] == 3  # another start vector: computed afresh ...
    assert "directions_sha256" in capsys.readouterr().err  # ... and refused, not mixed into the saved grid
    assert main([*argv, "--norm", "layer"]) == 2
    assert "--norm shapes random directions only" in capsys.readouterr().err
    assert main(["surface", str(run), "--dim", "1", "--orthogonal", "--no-progress"]) == 2
    assert "--orthogonal needs two directions" in capsys.readouterr().err


def test_a_run_that_diverges_leaves_a_directory_the_same_command_reruns(tmp_path, capsys):
    out = str(tmp_path / "first-epoch")
    diverging = ["train", "--out", out, "--lr", "1e6", "--epochs", "2", "--batch-size", "256", "--no-progress"]
    assert main(diverging) == 1
    err = capsys.readouterr().err
    assert "training loss became nan in epoch 1" in err and "the same --out can be used again" in err
    assert main(diverging) == 1  # the same command runs again (and diverges again), not "already holds a run"
    assert "already holds" not in capsys.readouterr().err
    assert main(["train", "--out", out, "--epochs", "1", "--batch-size", "256", "--no-progress"]) == 0
    assert len((tmp_path / "first-epoch" / "metrics.jsonl").read_text().splitlines()) == 1

    later = tmp_path / "later"
    (later / "snapshots").mkdir(parents=True)
    assert main(["train", "--out", str(later), "--lr", "3000", "--warmup-epochs", "6", "--epochs", "6", "--batch-size",
                 "256", "--snapshot-every", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Last good checkpoint: epoch" in err and "(kept)" in err and "--overwrite" in err
    kept = (later / "model.pt").read_bytes()
    (later / "hessian.json").write_text("{}")  # an analysis of the old weights
    assert main(["train", "--out", str(later), "--epochs", "1", "--batch-size", "256", "--no-progress"]) == 2
    assert "pass --resume to continue it, --overwrite to train it again" in capsys.readouterr().err
    assert (later / "model.pt").read_bytes() == kept
    assert main(["train", "--out", str(later), "--epochs", "1", "--batch-size", "256", "--overwrite", "--no-progress"]) == 0
    assert len((later / "metrics.jsonl").read_text().splitlines()) == 1 and not (later / "snapshots").exists()
    assert json.loads((later / "config.json").read_text())["config"]["lr"] == 0.1
    assert (later / "hessian.json").read_text() == "{}"  # analyses beside the run are not the trainer's to delete


def test_an_interrupted_hessian_analysis_resumes_from_its_last_stage(trained_run, tmp_path, monkeypatch, capsys):
    import numpy as np

    import landscape._results
    import sam.analyses

    flags = ["hessian", str(trained_run), "--k", "2", "--trace-matvecs", "6", "--density", "--density-runs", "3",
             "--density-steps", "5", "--split", "test", "--no-progress"]
    assert main([*flags[:-1], "--out", str(tmp_path / "whole")]) == 0  # with progress: lines in a log
    # Lanczos counts converged eigenvalues (its budget of products is a cap, not a total), Hutch++ its products,
    # and every finished stage is a line
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.split(":")[0] in ("lanczos top-2 LA", "hutch++", "hessian") for line in lines), lines
    lanczos = [line for line in lines if line.startswith("lanczos top-2 LA: ")]
    assert lanczos[-1].startswith("lanczos top-2 LA: 100% (2/2 eigenvalues, ") and "matvecs=" in lanczos[-1]
    assert [line for line in lines if line.startswith("hutch++: ")][-1].startswith("hutch++: 100% (6/6 matvec, ")
    stages = [line for line in lines if line.startswith("hessian: ")]
    assert [line.split("(")[1].split(",")[0] for line in stages] == [f"{i}/5 stages" for i in range(1, 6)]
    assert "lanczos top-2 LA eigenvalues done, first" in stages[0] and "trace (hutch++) done" in stages[1]
    assert "density (SLQ) run 3 of 3 done" in stages[-1]
    real_slq, real_top = sam.analyses.slq_nodes, sam.analyses.hessian.top_eigenvalues
    calls = {"slq": 0, "lanczos": 0}

    def interrupted_slq(*args, **kwargs):
        calls["slq"] += 1
        if calls["slq"] == 2:
            raise KeyboardInterrupt
        return real_slq(*args, **kwargs)

    def counted_lanczos(*args, **kwargs):
        calls["lanczos"] += 1
        return real_top(*args, **kwargs)

    monkeypatch.setattr(sam.analyses, "slq_nodes", interrupted_slq)
    monkeypatch.setattr(sam.analyses.hessian, "top_eigenvalues", counted_lanczos)
    out = tmp_path / "stopped"
    assert main([*flags, "--out", str(out)]) == 130
    assert "interrupted; resume with --resume" in capsys.readouterr().err
    assert (out / "hessian.partial.pt").exists() and not (out / "hessian.json").exists()
    assert main([*flags, "--out", str(out)]) == 2  # the partial analysis is never silently restarted
    assert "pass --resume to continue it, or --overwrite to start again" in capsys.readouterr().err
    assert main([*flags, "--out", str(out), "--k", "3", "--resume"]) == 2
    assert "was started with other settings (differs in ['k'])" in capsys.readouterr().err
    # killed between hessian.npz and hessian.json, the commit point: a lone .npz is no result, the stages resume
    real_json = landscape._results.atomic_write_json

    def killed_before_the_json(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(landscape._results, "atomic_write_json", killed_before_the_json)
    assert main([*flags, "--out", str(out), "--resume"]) == 130
    monkeypatch.setattr(landscape._results, "atomic_write_json", real_json)
    assert (out / "hessian.npz").exists() and (out / "hessian.partial.pt").exists()
    assert not (out / "hessian.json").exists()
    capsys.readouterr()
    assert main([*flags, "--out", str(out)]) == 2
    assert "hessian.partial.pt holds an interrupted Hessian analysis; pass --resume" in capsys.readouterr().err
    assert main([*flags, "--out", str(out), "--resume"]) == 0
    assert calls == {"slq": 4, "lanczos": 1}  # neither Lanczos nor the first SLQ run was repeated
    assert not (out / "hessian.partial.pt").exists()
    whole, resumed = np.load(tmp_path / "whole" / "hessian.npz"), np.load(out / "hessian.npz")
    for name in whole.files:
        np.testing.assert_array_equal(resumed[name], whole[name])
    capsys.readouterr()
    assert main([*flags, "--out", str(out), "--resume"]) == 0  # finished: kept as it is
    assert "already complete, nothing recomputed" in capsys.readouterr().out and calls["lanczos"] == 1
    assert main([*flags, "--out", str(out), "--seed", "1", "--resume"]) == 2
    assert "holds results of other settings (differs in ['seed'])" in capsys.readouterr().err
    # killed after the .json, before the stages were deleted: the result is finished, the stray stages go
    torch.save({"recipe": {}}, out / "hessian.partial.pt")
    assert main([*flags, "--out", str(out), "--resume"]) == 0
    assert "already complete, nothing recomputed" in capsys.readouterr().out
    assert not (out / "hessian.partial.pt").exists() and calls["lanczos"] == 1
    (out / "hessian.json").write_text(json.dumps({"recipe": [1, 2]}))
    assert main([*flags, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "hessian.json holds no 'recipe' object" in err


def test_a_sharpness_npz_without_its_json_is_an_unfinished_result_and_replaced(trained_run, tmp_path, capsys):
    out = tmp_path / "sharp"
    out.mkdir()
    (out / "sharpness.npz").write_bytes(b"PK\x03\x04 written before the kill")
    argv = ["sharpness", str(trained_run), "--measures", "m_sharpness", "--m", "64", "--split", "test", "--out",
            str(out), "--no-progress"]
    assert main(argv) == 0
    import numpy as np

    assert np.load(out / "sharpness.npz")["m_sharpness_m64"].shape == (5,)
    assert json.loads((out / "sharpness.json").read_text())["settings"]["ms"] == [64]
    (out / "sharpness.npz").unlink()
    assert main(argv) == 2  # the .json is the result: never replaced silently, even without its .npz
    assert "sharpness.json already exists (without sharpness.npz, which is written before it); pass --overwrite" in (
        capsys.readouterr().err)


def test_compare_reads_and_checks_everything_else_before_any_analysis(trained_run, tmp_path, monkeypatch, capsys):
    import shutil

    import sam.compare

    def no_analysis(*args, **kwargs):
        raise AssertionError("an analysis started before the inputs were checked")

    for name in ("hessian_analysis", "surface_analysis", "sharpness_analysis"):
        monkeypatch.setattr(sam.compare, name, no_analysis)
    other = tmp_path / "other"
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("hessian*", "sharpness*", "surface*"))
    torch.save({k: v + 0.01 for k, v in torch.load(other / "model.pt", weights_only=True).items()}, other / "model.pt")
    argv = ["compare", str(trained_run), str(other), "--out", str(tmp_path / "cmp"), "--no-progress"]
    without_train_loss = "".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "train_loss"}) + "\n"
                                 for line in (other / "metrics.jsonl").read_text().splitlines())
    for flags, message in ((["--surface-steps", "1"], "--surface-steps must be an integer >= 2; got 1"),
                           (["--trace-matvecs", "2"], "--trace-matvecs must be an integer >= 3; got 2"),
                           (["--rho", "0"], "--rho must be a finite number > 0; got 0.0"),
                           (["--m", "4", "0"], "--m takes one or more chunk sizes, integers >= 1; got [4, 0]"),
                           (["--m", "5000"], f"--m 5000 is more than the 1437 training examples of {trained_run}"),
                           (["--metrics-without-train-loss"], (f"{other / 'metrics.jsonl'}: record 1 has no number "
                                                               "for train_loss"))):
        if flags == ["--metrics-without-train-loss"]:
            flags = []
            (other / "metrics.jsonl").write_text(without_train_loss)
        assert main([*argv, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, (flags, err)
    assert not (tmp_path / "cmp" / "analyses").exists()


def test_compare_reuses_finished_analyses_only_and_overwrite_computes_them_again(trained_run, tmp_path, monkeypatch,
                                                                                capsys):
    """An analysis is finished when its .json, written after its .npz, is there; --overwrite recomputes them all."""
    import shutil

    import sam.compare

    other = tmp_path / "other"
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("hessian*", "sharpness*", "surface*"))
    torch.save({k: v + 0.01 for k, v in torch.load(other / "model.pt", weights_only=True).items()}, other / "model.pt")
    calls = []

    def recording(name):
        def analysis(run, *args, **kwargs):
            calls.append((name, Path(run).name, kwargs.get("overwrite", False), kwargs.get("resume")))
        return analysis

    for name in ("hessian_analysis", "surface_analysis", "sharpness_analysis"):
        monkeypatch.setattr(sam.compare, name, recording(name))
    out = tmp_path / "cmp"
    argv = ["compare", str(trained_run), str(other), "--out", str(out), "--m", "64", "--labels", "sgd", "other",
            "--no-progress"]
    sgd = out / "analyses" / "sgd"
    sgd.mkdir(parents=True)
    (sgd / "hessian.npz").write_bytes(b"PK\x03\x04 killed before its .json")  # unfinished: resumed
    sha = sam.compare.checkpoint_sha256(trained_run / "model.pt")
    (sgd / "sharpness.json").write_text(json.dumps({"checkpoint_sha256": sha, "settings": {"ms": [64], "rho": 0.05,
                                                                                           "seed": 0}}))
    (sgd / "sharpness.npz").write_bytes(b"")  # finished with the same settings: reused
    stale = _stale_temporary(out, "report.html")  # what a killed compare was writing
    assert main(argv) == 2  # the stubs wrote no surfaces to draw
    assert "surface_2d.npz not found" in capsys.readouterr().err
    assert not stale.exists()
    mine = [c for c in calls if c[1] == trained_run.name and c[0] != "surface_analysis"]
    assert mine == [("hessian_analysis", trained_run.name, False, True)]
    (sgd / "sharpness.json").write_text(json.dumps({"checkpoint_sha256": sha, "settings": {"ms": [64], "rho": 0.1,
                                                                                           "seed": 0}}))
    assert main(argv) == 2
    assert "sharpness.json was computed with other settings or another checkpoint (settings.rho: saved [0.1], " \
        "asked [0.05]); pass --overwrite to compute it again" in capsys.readouterr().err
    calls.clear()
    assert main([*argv, "--overwrite"]) == 2
    assert "surface_2d.npz not found" in capsys.readouterr().err
    assert sorted(calls) == sorted(
        [("hessian_analysis", run, True, False) for run in (trained_run.name, "other")]
        + [("surface_analysis", run, True, None) for run in (trained_run.name, "other") for _ in range(2)]
        + [("sharpness_analysis", run, True, None) for run in (trained_run.name, "other")]
        + [("surface_analysis", trained_run.name, True, None)] * 2)  # the interpolation, train and test
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "--overwrite compute every analysis under OUT/analyses again" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["train", "hessian", "surface", "sharpness", "study", "noise-study", "compare", "demo",
                                     "presets", "sweep", "plot", "plot error-reduction", "plot error-vs-rho",
                                     "plot spectrum-evolution"])
def test_help_texts_state_no_meaningless_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
    if command not in ("presets", "plot"):
        assert "--no-progress print no progress (by default: a live bar on a terminal, and plain lines" in text
