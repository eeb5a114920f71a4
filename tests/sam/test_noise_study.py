"""The label-noise study: noisy training labels through the real runs, the table, resuming after an interruption."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
import torch

import sam.noise_study as noise_study
from sam.compare import load_noise_table
from sam.data import load_dataset
from sam.noise_study import NoiseStudyConfig, format_noise_table, noise_study_runs, noise_table, run_noise_study
from sam.trainer import TrainConfig, load_run

TINY = TrainConfig(epochs=1, batch_size=256, lr=0.05)
N_TRAIN = 1437  # digits: 1797 images, 20% held out (stratified)


def _quiet(message: str) -> None:
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two optimizers, two rates, two seeds, one epoch each: 8 digits runs."""
    config = NoiseStudyConfig(rates=[0.0, 0.4], optimizers=["sgd", "sam"], seeds=[0, 1], recipe=TINY)
    out = tmp_path_factory.mktemp("noise")
    result = run_noise_study(config, out, progress=False, log=_quiet)
    return config, out, result


def test_runs_cover_every_optimizer_rate_and_seed_with_the_recipe():
    recipe = dataclasses.replace(TINY, optimizer="asam", rho=0.7, label_noise=0.9, seed=5)  # per-run fields: ignored
    config = NoiseStudyConfig(rates=[0.2, 0.6], optimizers=["sgd", "sam", "asam"], seeds=[3, 4], rhos={"sam": 0.1},
                              recipe=recipe)
    specs = dict(noise_study_runs(config))
    assert len(specs) == 3 * 2 * 2
    assert specs["sgd-noise0.2-seed3"] == dataclasses.replace(TINY, label_noise=0.2, seed=3)
    assert specs["sam-noise0.6-seed4"] == dataclasses.replace(TINY, optimizer="sam", rho=0.1, label_noise=0.6, seed=4)
    assert specs["asam-noise0.2-seed4"].rho is None  # no rho given for asam: its own default
    assert {c.epochs for c in specs.values()} == {1}
    assert "optimizer" not in config.to_dict()["recipe"] and config.to_dict()["recipe"]["epochs"] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rates": []}, "rates must list at least one value"),
        ({"rates": [0.2, 0.2]}, "rates must not repeat a value"),
        ({"rates": [1.5]}, r"noise rates are fractions in \[0, 1\]; got 1.5"),
        ({"optimizers": ["sgd", "lbfgs"]}, "unknown optimizer 'lbfgs' in optimizers; choose from adam, adamw, asam"),
        ({"seeds": [-1]}, "seeds are integers >= 0; got -1"),
        ({"rhos": {"sgd": 0.1}}, r"rhos are given per SAM variant \(asam, every_k_sam, gsam, msam, multistep_sam, sam\); got 'sgd'"),
        ({"rhos": {"sam": -0.1}}, "rho of 'sam' must be a finite number >= 0"),
    ],
)
def test_bad_study_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NoiseStudyConfig(**kwargs)


def test_each_run_trains_on_exactly_the_requested_fraction_of_flipped_labels_and_clean_test_labels(study):
    config, out, result = study
    clean_train, clean_test, _ = load_dataset("digits")
    flipped_positions = {}
    for row in result.runs:
        run = load_run(out / "runs" / row["name"])
        saved = json.loads((out / "runs" / row["name"] / "config.json").read_text())["config"]
        assert (saved["label_noise"], saved["seed"], saved["optimizer"]) == (row["noise"], row["seed"], row["optimizer"])
        changed = run.train.y != clean_train.y
        assert int(changed.sum()) == round(row["noise"] * N_TRAIN)  # 575 at 40%: exactly, and each to another class
        assert row["flipped"] == pytest.approx(round(row["noise"] * N_TRAIN) / N_TRAIN, abs=1e-12)
        assert torch.equal(run.test.y, clean_test.y) and torch.equal(run.test.x, clean_test.x)
        flipped_positions[(row["optimizer"], row["noise"], row["seed"])] = changed
    # fixed seeds: SGD and SAM see the very same noisy labels; another seed flips other labels
    assert torch.equal(flipped_positions[("sgd", 0.4, 0)], flipped_positions[("sam", 0.4, 0)])
    assert not torch.equal(flipped_positions[("sgd", 0.4, 0)], flipped_positions[("sgd", 0.4, 1)])
    noisy = load_run(out / "runs" / "sam-noise0.4-seed1").train.y
    assert torch.equal(noisy, load_dataset("digits", label_noise=0.4, noise_seed=1)[0].y)


def test_table_is_mean_and_spread_of_the_runs_clean_test_accuracy_and_compare_reads_it(study):
    config, out, result = study
    final = {}
    for name, _ in noise_study_runs(config):
        lines = (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
        final[name] = json.loads(lines[-1])["test_acc"]
    rows = load_noise_table(out)  # what sam-landscape compare --noise-study reads
    assert [(r["optimizer"], r["noise"]) for r in rows] == [("sgd", 0.0), ("sgd", 0.4), ("sam", 0.0), ("sam", 0.4)]
    for row in rows:
        accuracies = [final[f"{row['optimizer']}-noise{row['noise']:g}-seed{s}"] for s in (0, 1)]
        assert row["accuracies"] == accuracies
        assert row["mean"] == pytest.approx((accuracies[0] + accuracies[1]) / 2, abs=1e-12)
        assert row["spread"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2 ** 0.5, abs=1e-12)
        assert row["n_seeds"] == 2 and row["rho"] == (0.1 if row["optimizer"] == "sam" else None)
    saved = json.loads((out / "noise_study.json").read_text())
    assert saved["config"] == config.to_dict() and len(saved["runs"]) == 8
    csv_lines = (out / "noise_study.csv").read_text().splitlines()
    assert csv_lines[0] == "optimizer,rho,noise,mean,spread,min,max,n_seeds,train_acc" and len(csv_lines) == 5
    assert len((out / "noise_runs.csv").read_text().splitlines()) == 9
    assert (out / "label_noise.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "label_noise.pdf").read_bytes()[:4] == b"%PDF"
    html = (out / "label_noise.html").read_text()
    assert "plotly" in html and "clean test accuracy (%)" in html
    assert "sgd" in format_noise_table(result.table) and "+-" in format_noise_table(result.table)


def test_noise_table_with_one_seed_has_no_spread():
    runs = [{"optimizer": "sam", "rho": 0.1, "noise": r, "seed": 0, "test_acc": a, "train_acc": t}
            for r, a, t in ((0.0, 0.98, 1.0), (0.6, 0.75, 0.55))]
    table = noise_table(runs)
    assert [(r["noise"], r["mean"], r["spread"], r["train_acc"]) for r in table] == [(0.0, 0.98, None, 1.0), (0.6, 0.75, None, 0.55)]
    three = noise_table([{**runs[0], "seed": s, "test_acc": a} for s, a in ((0, 0.9), (1, 0.8), (2, 0.7))])
    assert three[0]["spread"] == pytest.approx(statistics.stdev([0.9, 0.8, 0.7])) == pytest.approx(0.1)


def test_another_recipe_in_the_same_directory_is_an_error_naming_the_keys(study):
    config, out, _ = study
    other = NoiseStudyConfig(rates=[0.0, 0.4], optimizers=["sgd", "sam"], seeds=[0, 1], rhos={"sam": 0.2},
                             recipe=dataclasses.replace(TINY, epochs=2))
    with pytest.raises(ValueError, match=r"holds a noise study with different settings \(recipe.epochs: saved 1, given 2; "
                                         r"rhos: saved \{'sam': 0.1\}, given \{'sam': 0.2\}\)"):
        run_noise_study(other, out, progress=False, log=_quiet)
    assert json.loads((out / "noise_study_config.json").read_text()) == config.to_dict()  # left as it was


class _Interrupt(Exception):
    pass


def test_an_interrupted_study_resumes_without_retraining_finished_runs(tmp_path, monkeypatch):
    config = NoiseStudyConfig(rates=[0.0, 0.5], optimizers=["sgd", "sam"], seeds=[0],
                              recipe=dataclasses.replace(TINY, epochs=2))
    names = [name for name, _ in noise_study_runs(config)]
    assert names == ["sgd-noise0-seed0", "sgd-noise0.5-seed0", "sam-noise0-seed0", "sam-noise0.5-seed0"]

    def interrupt(name, epoch, metrics):  # killed after the first epoch of the third run
        if name == names[2] and epoch == 1:
            raise _Interrupt

    out = tmp_path / "study"
    with pytest.raises(_Interrupt):
        run_noise_study(config, out, progress=False, log=_quiet, on_epoch_end=interrupt)
    runs = out / "runs"
    assert not (out / "noise_study.json").exists() and not (runs / names[3]).exists()
    finished = {n: ((runs / n / "model.pt").stat().st_mtime_ns, (runs / n / "metrics.jsonl").read_text()) for n in names[:2]}
    first_epoch = (runs / names[2] / "metrics.jsonl").read_text()
    assert len(first_epoch.splitlines()) == 1

    trained = []
    real_train = noise_study.train

    def spy(run_config, run_dir, **kwargs):
        trained.append(run_dir.name)
        assert kwargs["resume"] is True
        return real_train(run_config, run_dir, **kwargs)

    monkeypatch.setattr(noise_study, "train", spy)
    result = run_noise_study(config, out, progress=False, log=_quiet)
    assert trained == names[2:]  # the finished runs were not trained again
    for name, (stamp, metrics) in finished.items():
        assert (runs / name / "model.pt").stat().st_mtime_ns == stamp
        assert (runs / name / "metrics.jsonl").read_text() == metrics
    resumed = (runs / names[2] / "metrics.jsonl").read_text().splitlines()
    assert resumed[0] == first_epoch.strip() and len(resumed) == 2  # epoch 1 kept, only epoch 2 trained
    assert [r["trained"] for r in result.runs] == [False, False, True, True]

    # the resumed run ends with the weights of an uninterrupted one
    alone = real_train(dict(noise_study_runs(config))[names[2]], tmp_path / "alone", progress=False)
    for key, value in torch.load(runs / names[2] / "model.pt", weights_only=True).items():
        assert torch.equal(value, alone.model.state_dict()[key].cpu()), key

    trained.clear()
    again = run_noise_study(config, out, progress=False, log=_quiet)
    assert trained == [] and again.table == result.table
