"""compare over seeds: summary.json with the test accuracy and lambda_max of each side, mean and spread over
its seed runs, against the runs' own metrics and landscape.hessian; seed runs that are not seeds refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch.nn.functional as F

from landscape import hessian
from sam.cli import main
from sam.trainer import load_run

SMALL = ["--surface-steps", "3", "--slice-steps", "3", "--interpolation-steps", "3", "--density-runs", "1",
         "--density-steps", "4", "--trace-matvecs", "3", "--m", "256", "--no-progress", "--device", "cpu"]


def _train(directory, *flags):
    assert main(["train", "--out", str(directory), "--epochs", "1", "--batch-size", "256", "--no-progress",
                 "--device", "cpu", *flags]) == 0
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    return {(optimizer, seed): _train(root / f"{optimizer}-{seed}", "--optimizer", optimizer, "--seed", str(seed))
            for optimizer in ("sgd", "sam") for seed in (0, 1, 2)}


def test_summary_json_averages_each_side_over_its_seeds(runs, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["compare", str(runs["sgd", 0]), str(runs["sam", 0]), "--out", str(out),
                 "--seeds-a", str(runs["sgd", 1]), str(runs["sgd", 2]), "--seeds-b", str(runs["sam", 1]), *SMALL]) == 0
    entries = json.loads((out / "summary.json").read_text())["runs"]
    assert [(e["label"], e["optimizer"], e["rho"], e["seeds"]) for e in entries] == [
        ("SGD", "sgd", None, [0, 1, 2]), ("SAM rho=0.05", "sam", 0.05, [0, 1])]
    for entry, side in zip(entries, ([runs["sgd", s] for s in (0, 1, 2)], [runs["sam", s] for s in (0, 1)])):
        accuracies = [json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"] for run in side]
        assert entry["test_accuracy"] == pytest.approx(np.mean(accuracies), rel=1e-12)
        assert entry["test_accuracy_spread"] == pytest.approx(np.std(accuracies, ddof=1), rel=1e-12)
        tops = []
        for run in side:
            loaded = load_run(run)
            tops.append(float(hessian.top_eigenvalues(loaded.model, F.cross_entropy, (loaded.train.x, loaded.train.y),
                                                      k=1, progress=False).eigenvalues[0]))
        np.testing.assert_allclose(entry["lambda_maxes"], tops, rtol=2e-3)
        assert entry["lambda_max"] == pytest.approx(np.mean(entry["lambda_maxes"]), rel=1e-12)
    report = (out / "report.html").read_text()
    assert "test accuracy over seeds (mean +- std)" in report and "(3 seeds)" in report
    # each seed's lambda_max is kept under its seed, whatever its run directory is called
    assert sorted(p.name for p in (out / "analyses" / "sgd" / "seeds").iterdir()) == ["seed1", "seed2"]
    assert entries[0]["run_dirs"] == [str(runs["sgd", s]) for s in (0, 1, 2)]


def test_one_run_per_side_gives_a_spread_of_zero(runs):
    from sam.compare import seed_summary
    from sam.trainer import load_run_config

    entry = seed_summary("SGD", load_run_config(runs["sgd", 0]), [runs["sgd", 0]], [0.75], [2.5])
    assert (entry["seeds"], entry["test_accuracy"], entry["test_accuracy_spread"]) == ([0], 0.75, 0.0)
    assert (entry["lambda_max"], entry["lambda_max_spread"], entry["rho"]) == (2.5, 0.0, None)


def test_seed_runs_of_other_settings_or_the_same_seed_are_refused(runs, tmp_path, capsys):
    other = _train(tmp_path / "other-lr", "--optimizer", "sgd", "--seed", "3", "--lr", "0.05")
    argv = ["compare", str(runs["sgd", 0]), str(runs["sam", 0]), "--out", str(tmp_path / "c"), *SMALL]
    assert main([*argv, "--seeds-a", str(other)]) == 2
    err = capsys.readouterr().err
    assert "is not another seed of" in err and "its lr differ" in err
    assert main([*argv, "--seeds-a", str(runs["sam", 1])]) == 2
    assert "optimizer" in capsys.readouterr().err
    assert main([*argv, "--seeds-b", str(runs["sam", 0])]) == 2
    assert "both trained with seed 0" in capsys.readouterr().err


def test_an_unfinished_seed_run_or_a_sweep_directory_is_refused(runs, tmp_path, capsys):
    unfinished = _train(tmp_path / "short", "--optimizer", "sgd", "--seed", "5")
    config = json.loads((unfinished / "config.json").read_text())
    config["config"]["epochs"] = 2  # as if it had been stopped after 1 of 2 epochs
    (unfinished / "config.json").write_text(json.dumps(config))
    main_config = json.loads((runs["sgd", 0] / "config.json").read_text())
    assert main_config["config"]["epochs"] == 1
    argv = ["compare", str(runs["sgd", 0]), str(runs["sam", 0]), *SMALL]
    assert main([*argv, "--out", str(tmp_path / "c"), "--seeds-a", str(unfinished)]) == 2
    assert "stopped at epoch 1 of 2" in capsys.readouterr().err
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    assert main([*argv, "--out", str(sweep)]) == 2
    assert "holds a sweep" in capsys.readouterr().err
