"""Sweeps: grids parsed into typed values, their product trained resumably, the summary of what each run reached."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import pytest
import torch.nn.functional as F

from landscape import hessian
from sam.analyses import HessianSettings
from sam.cli import main
from sam.sweep import (
    SweepFailed,
    format_summary,
    grid_keys,
    parse_grid,
    parse_grid_spec,
    run_sweep,
    summary_rows,
    sweep_points,
)
from sam.trainer import TrainConfig, load_run, load_run_config, train

TINY = TrainConfig(epochs=1, batch_size=256, lr=0.05, test_fraction=0.5)  # 899 training images, 4 steps an epoch
GRID = {"optimizer": ["sgd", "sam"], "seed": [0, 1]}
NAMES = ["optimizer=sgd,seed=0", "optimizer=sgd,seed=1", "optimizer=sam,seed=0", "optimizer=sam,seed=1"]
TIMING = ("time", "step_time", "images_per_sec")  # wall-clock measurements: differ from run to run


def _quiet(message: str) -> None:
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Two optimizers times two seeds, one epoch each: 4 digits runs."""
    out = tmp_path_factory.mktemp("sweep")
    result = run_sweep(TINY, GRID, out, progress=False, log=_quiet)
    return out, result


def _last_metrics(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def _mtimes(out):
    return {p.relative_to(out): p.stat().st_mtime_ns for p in sorted((out / "runs").rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- grids


def test_grid_keys_take_either_spelling_and_the_type_of_their_field():
    assert parse_grid_spec("label-noise=0,0.2") == ("label_noise", [0.0, 0.2])
    assert parse_grid_spec("label_noise=0.4") == ("label_noise", [0.4])
    assert parse_grid_spec("seed=0,1,2") == ("seed", [0, 1, 2])
    assert parse_grid_spec("optimizer=sgd,sam") == ("optimizer", ["sgd", "sam"])
    assert parse_grid_spec("rho=none,0.05") == ("rho", [None, 0.05])
    assert parse_grid_spec("batch-size=64") == ("batch_size", [64])
    assert parse_grid_spec("nesterov=true,false") == ("nesterov", [True, False])
    assert parse_grid_spec("augment=on,auto") == ("augment", [True, None])
    assert parse_grid_spec("lr-milestones=0.5:0.75,0.3") == ("lr_milestones", [[0.5, 0.75], [0.3]])
    assert parse_grid_spec("lr=1e-1") == ("lr", [0.1])
    assert parse_grid(["optimizer=sgd", "m=4,8"]) == [("optimizer", ["sgd"]), ("m", [4, 8])]
    assert set(grid_keys()) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize(
    "specs, message",
    [
        (["rho"], r"--grid takes KEY=V1,V2,... \(e.g. rho=0.05,0.1\); got 'rho'"),
        (["=0.1"], "--grid takes KEY=V1,V2"),
        (["rhoo=0.1"], (r"--grid rhoo=0.1: unknown key 'rhoo'; valid keys are the training options dataset, "
                        r"data_root, .*label_noise.*rho.*seed.*\(with dashes or underscores\)")),
        (["seed=0,1.5"], "--grid seed=0,1.5: seed takes an integer; got '1.5'"),
        (["rho=0.1,big"], "--grid rho=0.1,big: rho takes a number or none; got 'big'"),
        (["nesterov=maybe"], "--grid nesterov=maybe: nesterov takes true or false; got 'maybe'"),
        (["lr-milestones=0.5;0.75"], "lr_milestones takes numbers separated by ':'"),
        (["seed="], "--grid seed=: give one or more values separated by commas"),
        (["seed=0,,1"], "--grid seed=0,,1: give one or more values"),
        (["seed=0,1,0"], "--grid seed=0,1,0: seed value 0 is given twice"),
        (["label_noise=0.2", "label-noise=0.4"], (r"--grid label-noise=0.4: label_noise is already in the grid "
                                                  r"\(--grid label_noise=0.2\)")),
    ],
)
def test_bad_grids_are_refused_naming_the_key_and_value(specs, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(specs)


def test_points_are_the_product_of_the_grids_in_order_with_file_safe_names():
    points = sweep_points(TINY, parse_grid(["optimizer=sgd,sam", "rho=0.05,0.1", "seed=1"]))
    assert [name for name, _ in points] == ["optimizer=sgd,rho=0.05,seed=1", "optimizer=sgd,rho=0.1,seed=1",
                                            "optimizer=sam,rho=0.05,seed=1", "optimizer=sam,rho=0.1,seed=1"]
    assert points[3][1] == dataclasses.replace(TINY, optimizer="sam", rho=0.1, seed=1)
    named = dict(sweep_points(TINY, {"data-root": ["/data/c10", None], "lr_milestones": [[0.5, 0.75]],
                                     "augment": [False]}))
    assert list(named) == ["data_root=_data_c10,lr_milestones=0.5_0.75,augment=false",
                           "data_root=none,lr_milestones=0.5_0.75,augment=false"]
    assert named["data_root=none,lr_milestones=0.5_0.75,augment=false"].data_root is None
    assert sweep_points(TINY, parse_grid(["seed=0,1"])) == sweep_points(TINY, parse_grid(["seed=0,1"]))


def test_invalid_points_and_clashing_names_are_refused_naming_them():
    with pytest.raises(ValueError, match="grid point optimizer=sam,rho=-1.0: rho must be a finite number >= 0"):
        sweep_points(TINY, {"optimizer": ["sam"], "rho": [0.1, -1.0]})
    with pytest.raises(ValueError, match="grid point optimizer=lbfgs: unknown optimizer 'lbfgs'; choose one of adam"):
        sweep_points(TINY, {"optimizer": ["lbfgs"]})
    with pytest.raises(ValueError, match="grid point dataset=cifar10: dataset 'cifar10' needs data_root"):
        sweep_points(TINY, parse_grid(["dataset=cifar10"]))
    with pytest.raises(ValueError, match=r"both get the run name 'data_root=a_b'"):
        sweep_points(TINY, {"data_root": ["a/b", "a b"]})
    with pytest.raises(ValueError, match="a sweep needs at least one grid"):
        sweep_points(TINY, {})


# ------------------------------------------------------------------------------------------- summary


def test_summary_holds_each_runs_grid_values_and_last_metrics(swept):
    out, result = swept
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(NAMES)
    assert [row["run"] for row in result.rows] == NAMES and result.trained == NAMES and result.failed == {}
    saved = json.loads((out / "summary.json").read_text())
    with open(out / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:8] == ["run", "optimizer", "seed", "epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
    assert saved["rows"] == result.rows and len(table) == 4
    assert saved["recipe"]["grid"] == [["optimizer", ["sgd", "sam"]], ["seed", [0, 1]]]
    for row, written, name in zip(result.rows, table, NAMES):
        run_dir = out / "runs" / name
        config = load_run_config(run_dir)
        assert (row["optimizer"], row["seed"]) == (config.optimizer, config.seed) and row["run"] == name
        last = _last_metrics(run_dir)
        assert {k: row[f"final_{k}" if k == "lr" else k] for k in last} == last
        assert "lr" not in row and row["epoch"] == 1
        assert written["run"] == name and written["optimizer"] == config.optimizer and int(written["seed"]) == config.seed
        for key, value in last.items():
            assert float(written[f"final_{key}" if key == "lr" else key]) == value, key  # CSV floats round-trip
    assert summary_rows(out / "runs", sweep_points(TINY, GRID), list(GRID)) == result.rows
    text = format_summary(result.rows)
    assert text.splitlines()[0].split() == ["run", "train_acc", "test_acc", "test_loss"] and NAMES[3] in text


def test_a_rerun_trains_nothing_and_rewrites_the_same_summary(swept, tmp_path):
    out, result = swept
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "summary.csv").unlink()
    (copy / "runs" / NAMES[0] / "state.pt").unlink()  # deleted to save space: the run is still finished
    before = _mtimes(copy)
    again = run_sweep(TINY, GRID, copy, progress=False, log=_quiet)
    assert again.trained == [] and again.rows == result.rows
    assert _mtimes(copy) == before  # no run file rewritten: nothing retrained
    assert (copy / "summary.csv").read_text() == (out / "summary.csv").read_text()


def test_a_changed_recipe_is_refused_naming_the_keys_and_the_flag(swept):
    out, _ = swept
    before = (out / "sweep.json").read_text()
    with pytest.raises(ValueError, match=r"holds a sweep with another recipe \(grid.seed: saved \[0, 1\], given "
                                         r"\[0, 1, 2\]\); pass --overwrite to replace it"):
        run_sweep(TINY, {**GRID, "seed": [0, 1, 2]}, out, progress=False, log=_quiet)
    with pytest.raises(ValueError, match=r"\(base.lr: saved 0.05, given 0.02\)"):
        run_sweep(dataclasses.replace(TINY, lr=0.02), GRID, out, progress=False, log=_quiet)
    with pytest.raises(ValueError, match=r"grid order: saved \['optimizer', 'seed'\], given \['seed', 'optimizer'\]"):
        run_sweep(TINY, {"seed": [0, 1], "optimizer": ["sgd", "sam"]}, out, progress=False, log=_quiet)
    assert (out / "sweep.json").read_text() == before


# ------------------------------------------------------------------------------------------- resuming


def test_a_killed_sweep_resumes_its_interrupted_run_trains_the_missing_one_and_overwrites_a_broken_one(tmp_path):
    base = dataclasses.replace(TINY, epochs=2)
    points = sweep_points(base, {"seed": [0, 1]})
    first_dir = tmp_path / "runs" / points[0][0]

    def killed(epoch, metrics):
        raise KeyboardInterrupt  # as if killed after the first epoch's checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(points[0][1], first_dir, progress=False, on_epoch_end=killed)
    first_epoch = (first_dir / "metrics.jsonl").read_text()
    result = run_sweep(base, {"seed": [0, 1]}, tmp_path, progress=False, log=_quiet)
    assert result.trained == ["seed=0", "seed=1"] and [row["epoch"] for row in result.rows] == [2, 2]
    assert (first_dir / "metrics.jsonl").read_text().startswith(first_epoch)  # epoch 1 kept, not trained again
    assert result.rows[0] == {"run": "seed=0", "seed": 0, **{
        ("final_lr" if k == "lr" else k): v for k, v in _last_metrics(first_dir).items()}}

    second_dir = tmp_path / "runs" / "seed=1"
    for name in ("model.pt", "state.pt"):
        (second_dir / name).unlink()  # two epochs of metrics and nothing to continue from
    kept = {k: v for k, v in _mtimes(tmp_path).items() if k.parts[1] == "seed=0"}
    with pytest.raises(SweepFailed, match=r"seed=1: FileExistsError: .*without its resume state.*pass --overwrite"):
        run_sweep(base, {"seed": [0, 1]}, tmp_path, progress=False, log=_quiet)
    again = run_sweep(base, {"seed": [0, 1]}, tmp_path, overwrite=True, progress=False, log=_quiet)
    assert again.trained == ["seed=1"] and (second_dir / "model.pt").exists()
    assert {k: v for k, v in _mtimes(tmp_path).items() if k.parts[1] == "seed=0"} == kept


def test_overwrite_accepts_a_new_recipe_keeping_the_runs_that_did_not_change(tmp_path):
    run_sweep(TINY, {"seed": [0]}, tmp_path, progress=False, log=_quiet)
    kept = _mtimes(tmp_path)
    with pytest.raises(ValueError, match=r"grid.seed: saved \[0\], given \[0, 1\]"):
        run_sweep(TINY, {"seed": [0, 1]}, tmp_path, progress=False, log=_quiet)
    grown = run_sweep(TINY, {"seed": [0, 1]}, tmp_path, overwrite=True, progress=False, log=_quiet)
    assert grown.trained == ["seed=1"] and [row["run"] for row in grown.rows] == ["seed=0", "seed=1"]
    assert {k: v for k, v in _mtimes(tmp_path).items() if k.parts[1] == "seed=0"} == kept  # not retrained
    assert json.loads((tmp_path / "sweep.json").read_text())["grid"] == [["seed", [0, 1]]]
    slower = dataclasses.replace(TINY, lr=0.02)
    with pytest.raises(ValueError, match=r"base.lr: saved 0.05, given 0.02"):
        run_sweep(slower, {"seed": [0, 1]}, tmp_path, progress=False, log=_quiet)
    changed = run_sweep(slower, {"seed": [0, 1]}, tmp_path, overwrite=True, progress=False, log=_quiet)
    assert changed.trained == ["seed=0", "seed=1"]  # their saved config differs: trained again from scratch
    assert {load_run_config(tmp_path / "runs" / name).lr for name in ("seed=0", "seed=1")} == {0.02}


def test_a_failed_run_is_named_and_the_others_finish_and_are_summarised(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "seed=1").write_text("not a run directory")
    lines = []
    with pytest.raises(SweepFailed, match=r"1 of 2 runs failed \(seed=1: FileExistsError: .*seed=1 is a file, not a "
                                          r"run directory"):
        run_sweep(TINY, {"seed": [0, 1]}, tmp_path, progress=False, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("sweep: run seed=1 failed: FileExistsError")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [row["run"] for row in saved["rows"]] == ["seed=0"]


def test_two_jobs_give_the_summary_of_one(swept, tmp_path):
    _, result = swept
    parallel = run_sweep(TINY, GRID, tmp_path, jobs=2, progress=False, log=_quiet)
    assert parallel.trained == NAMES and [row["run"] for row in parallel.rows] == NAMES
    for one, two in zip(result.rows, parallel.rows):
        assert one.keys() == two.keys()
        for key in one:
            if isinstance(one[key], float) and key not in TIMING:  # other thread counts may round otherwise
                assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), (one["run"], key)
            elif key not in TIMING:
                assert two[key] == one[key], (one["run"], key)


# ------------------------------------------------------------------------------------------- Hessian


def test_hessian_columns_are_landscape_hessian_on_the_saved_model(tmp_path):
    small = dataclasses.replace(TINY, test_fraction=0.9)  # 179 training images: cheap Hessian-vector products
    settings = HessianSettings(k=1, trace_matvecs=6)
    result = run_sweep(small, {"optimizer": ["sam"]}, tmp_path, hessian=settings, progress=False, log=_quiet)
    row = result.rows[0]
    run_dir = tmp_path / "runs" / "optimizer=sam"
    saved = json.loads((run_dir / "hessian.json").read_text())
    run = load_run(run_dir)
    data = (run.train.x, run.train.y)
    eig = hessian.top_eigenvalues(run.model, F.cross_entropy, data, k=1, tol=settings.tol, seed=settings.seed,
                                  hvp_method=saved["hvp_method"], progress=False)
    trace = hessian.hessian_trace(run.model, F.cross_entropy, data, method="hutch++", n_matvecs=6, seed=settings.seed,
                                  hvp_method=saved["hvp_method"], progress=False)
    assert row["lambda_max"] == pytest.approx(float(eig.eigenvalues[0]), rel=1e-5)
    assert row["trace"] == pytest.approx(trace.value, rel=1e-5)
    assert row["trace_std_error"] == pytest.approx(trace.std_error, rel=1e-4, abs=1e-6)
    with open(tmp_path / "summary.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["lambda_max"]) == row["lambda_max"]
    mtime = (run_dir / "hessian.json").stat().st_mtime_ns
    again = run_sweep(small, {"optimizer": ["sam"]}, tmp_path, hessian=settings, progress=False, log=_quiet)
    assert again.rows == result.rows and (run_dir / "hessian.json").stat().st_mtime_ns == mtime  # kept


# ----------------------------------------------------------------------------------------------- CLI


def test_help_documents_the_sweep_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("--out OUT sweep directory", "--grid KEY=V1,V2,...", "label-noise or label_noise",
                     "--jobs JOBS runs trained at once", "(default: 1)", "--hessian also compute each run's lambda_max",
                     "--trace-matvecs", "(default: 99)", "--overwrite accept a recipe", "--no-progress", "--preset NAME",
                     "--label-noise LABEL_NOISE", "--epochs EPOCHS", "summary.csv and summary.json", "exits with code 1"):
        assert fragment in text, fragment
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text


def test_the_command_runs_the_sweep_and_refuses_what_it_cannot_do(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), "--grid", "label-noise=0,0.1", "--epochs", "1", "--batch-size", "256",
            "--test-fraction", "0.9", "--no-progress"]
    assert main([*argv, "--hessian", "--trace-matvecs", "3"]) == 0
    printed = capsys.readouterr().out
    assert "2 runs (2 trained, 0 finished before); wrote" in printed and "lambda_max" in printed
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["run"], r["label_noise"]) for r in rows] == [("label_noise=0.0", 0.0), ("label_noise=0.1", 0.1)]
    assert all(r["lambda_max"] > 0 and r["trace"] is not None for r in rows)
    assert load_run_config(out / "runs" / "label_noise=0.1") == dataclasses.replace(
        TrainConfig(), epochs=1, batch_size=256, test_fraction=0.9, label_noise=0.1)

    assert main([*argv, "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "error:" in err and "base.epochs: saved 1, given 2" in err and "pass --overwrite" in err

    assert main([*argv, "--label-noise", "0.3"]) == 2
    assert "--label-noise is given both as a flag and in --grid" in capsys.readouterr().err
    assert main([*argv[:3], "--grid", "sede=1"]) == 2
    assert "unknown key 'sede'; valid keys are the training options" in capsys.readouterr().err

    blocked = tmp_path / "blocked"
    (blocked / "runs").mkdir(parents=True)
    (blocked / "runs" / "seed=0").write_text("")
    assert main(["sweep", "--out", str(blocked), "--grid", "seed=0", "--epochs", "1", "--no-progress"]) == 1
    assert "sam-landscape sweep: 1 of 1 runs failed (seed=0: FileExistsError" in capsys.readouterr().err


def test_a_dataset_grid_gives_each_point_its_datasets_own_model_unless_one_is_chosen():
    from sam.sweep import sweep_points
    from sam.trainer import TrainConfig

    points = dict(sweep_points(TrainConfig(), [("dataset", ["digits", "mnist1d"])]))
    assert [c.model for c in points.values()] == ["digits_cnn", "mnist1d_mlp"]
    chosen = dict(sweep_points(TrainConfig(dataset="mnist1d", model="mnist1d_cnn"), [("seed", [0, 1])]))
    assert {c.model for c in chosen.values()} == {"mnist1d_cnn"}
