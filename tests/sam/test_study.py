"""The sharpness-vs-generalization study: the grid of models and the Kendall tau table."""

from __future__ import annotations

import itertools

import pytest

from sam.study import StudyConfig, format_kendall, kendall_table, study_grid


def test_grid_is_every_combination_with_rhos_per_sam_variant():
    config = StudyConfig(optimizers=["sgd", "sam"], rhos={"sam": [0.05, 0.1]}, lrs=[0.01, 0.1], batch_sizes=[32],
                         weight_decays=[0.0, 5e-4], n_models=None)
    specs = study_grid(config)
    assert len(specs) == (1 + 2) * 2 * 1 * 2
    names = [name for name, _ in specs]
    assert len(set(names)) == len(names)
    sgd = [c for _, c in specs if c.optimizer == "sgd"]
    assert {c.rho for c in sgd} == {None} and {c.rho for _, c in specs if c.optimizer == "sam"} == {0.05, 0.1}
    assert {(c.lr, c.weight_decay) for c in sgd} == set(itertools.product([0.01, 0.1], [0.0, 5e-4]))
    assert all(c.epochs == config.epochs and c.seed == config.seed for _, c in specs)


def test_a_drawn_family_is_a_seeded_subset_of_the_grid():
    full = dict(study_grid(StudyConfig(n_models=None)))
    drawn = study_grid(StudyConfig(n_models=24))
    assert len(full) == 40 and len(drawn) == 24
    assert all(full[name] == config for name, config in drawn)
    assert [n for n, _ in drawn] == [n for n, _ in study_grid(StudyConfig(n_models=24))]
    assert [n for n, _ in drawn] != [n for n, _ in study_grid(StudyConfig(n_models=24, seed=1))]


def _tau_b_by_pairs(x, y):
    """Kendall's tau from concordant and discordant pairs (no ties)."""
    pairs = list(itertools.combinations(range(len(x)), 2))
    concordant = sum((x[i] - x[j]) * (y[i] - y[j]) > 0 for i, j in pairs)
    discordant = sum((x[i] - x[j]) * (y[i] - y[j]) < 0 for i, j in pairs)
    return (concordant - discordant) / len(pairs)


def test_kendall_table_matches_counting_pairs():
    gaps = [0.10, 0.30, 0.20, 0.50, 0.40, 0.05]
    errors = [0.01, 0.02, 0.05, 0.04, 0.03, 0.06]
    sharp = [1.0, 2.5, 2.0, 4.0, 3.5, 0.5]
    noisy = [3.0, 1.0, 2.0, 0.5, 4.0, 2.5]
    rows = [{"loss_gap": g, "error_gap": e, "s@m=1": a, "s@m=16": b, "flat": 7.0}
            for g, e, a, b in zip(gaps, errors, sharp, noisy)]
    table = kendall_table(rows, ["s@m=1", "s@m=16", "flat"])
    by_key = {(t["measure"], t["m"]): t for t in table}
    assert by_key[("s", 1)]["tau_loss_gap"] == pytest.approx(1.0)
    assert by_key[("s", 1)]["tau_error_gap"] == pytest.approx(_tau_b_by_pairs(sharp, errors))
    assert by_key[("s", 16)]["tau_loss_gap"] == pytest.approx(_tau_b_by_pairs(noisy, gaps))
    assert 0 < by_key[("s", 16)]["p_loss_gap"] <= 1
    assert by_key[("flat", None)]["tau_loss_gap"] is None  # a constant measure has no rank correlation
    text = format_kendall(table)
    assert "m=1" in text and "m=16" in text and "+1.000" in text and "n/a" in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizers": ["adam"]}, "study optimizers are ('sgd', 'sam', 'asam'); got 'adam'"),
        ({"optimizers": ["sam"], "rhos": {}}, "give the rho values of 'sam'"),
        ({"lrs": []}, "lrs must list at least one value"),
        ({"n_models": 2}, "n_models must be >= 3"),
        ({"epochs": 0}, "epochs must be >= 1"),
    ],
)
def test_bad_study_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StudyConfig(**kwargs)
