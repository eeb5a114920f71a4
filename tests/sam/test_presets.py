"""The paper presets: their resolved configs are the paper's values, overrides win, unknown names are named."""

from __future__ import annotations

import dataclasses

import pytest

from sam.presets import PRESETS, Preset, format_paper, format_presets, preset_config, preset_names
from sam.trainer import TrainConfig

# Foret et al. 2021, Table 6 (CIFAR, WRN-28-10): the values every CIFAR preset must train with.
CIFAR = dict(batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="cosine",
             warmup_epochs=0.0, label_smoothing=0.0, augment=True, base_optimizer="sgd", p=2.0)

PAPER = {
    "c10-wrn28-10-sgd": (dict(dataset="cifar10", model="wrn28_10", epochs=200, optimizer="sgd", rho=None, batchnorm=True),
                         {"test_error_pct": 3.5}),
    "c10-wrn28-10-sam": (dict(dataset="cifar10", model="wrn28_10", epochs=200, optimizer="sam", rho=0.05, batchnorm=True),
                         {"test_error_pct": 2.7}),
    "c100-wrn28-10-sgd": (dict(dataset="cifar100", model="wrn28_10", epochs=200, optimizer="sgd", rho=None),
                          {"test_error_pct": 18.8}),
    "c100-wrn28-10-sam": (dict(dataset="cifar100", model="wrn28_10", epochs=200, optimizer="sam", rho=0.1),
                          {"test_error_pct": 16.5}),
    **{f"c10-resnet32-noise{round(100 * r)}-{o}": (
        dict(dataset="cifar10", model="resnet32", epochs=200, optimizer=o, rho=0.1 if o == "sam" else None, label_noise=r),
        {"clean_test_accuracy_pct": a})
       for o, accuracies in (("sgd", (84.8, 68.8, 48.2, 26.2)), ("sam", (95.1, 93.4, 90.5, 77.9)))
       for r, a in zip((0.2, 0.4, 0.6, 0.8), accuracies)},
    "c10-wrn40-10-nobn-sgd": (dict(dataset="cifar10", model="wrn40_10", batchnorm=False, epochs=300, optimizer="sgd"),
                              {"lambda_max": 24.2, "lambda_max_over_lambda_5": 11.4}),
    "c10-wrn40-10-nobn-sam": (dict(dataset="cifar10", model="wrn40_10", batchnorm=False, epochs=300, optimizer="sam",
                                   rho=0.05), {"lambda_max": 1.0, "lambda_max_over_lambda_5": 2.6}),
}


# Foret et al. 2021, Sec. 3.2 and Table 3: ImageNet-pretrained EfficientNets finetuned with a new head (the
# paper's b7 errors; the presets train the B0 of the same checkpoints at 224 px, recipe of App. C, batch 256)
FINETUNE = {"model": "timm:tf_efficientnet_b0.aa_in1k", "init_from": "timm:tf_efficientnet_b0.aa_in1k",
            "reset_head": True, "image_size": 224, "epochs": 102, "batch_size": 256, "lr": 0.004, "momentum": 0.9,
            "weight_decay": 1e-5, "schedule": "cosine", "augment": True, "base_optimizer": "sgd", "amp": "bf16",
            "classes": None}
FINETUNING = {
    "c10-effnet-b0-finetune-sgd": ({"dataset": "cifar10", "optimizer": "sgd", "rho": None}, 0.95),
    "c10-effnet-b0-finetune-sam": ({"dataset": "cifar10", "optimizer": "sam", "rho": 0.05}, 0.88),
    "c100-effnet-b0-finetune-sgd": ({"dataset": "cifar100", "optimizer": "sgd", "rho": None}, 7.68),
    "c100-effnet-b0-finetune-sam": ({"dataset": "cifar100", "optimizer": "sam", "rho": 0.1}, 7.44),
}


def test_every_paper_run_has_a_preset_and_digits_has_its_stand_ins():
    assert set(preset_names()) == set(PAPER) | set(FINETUNING) | {"digits-sgd", "digits-sam"}
    assert all(isinstance(p, Preset) and p.description and p.reference for p in PRESETS.values())


@pytest.mark.parametrize("name", sorted(FINETUNING))
def test_a_finetuning_preset_resolves_to_the_papers_finetuning_recipe(name):
    expected, error = FINETUNING[name]
    config = preset_config(name, data_root="/data")
    assert config == TrainConfig(**{**PRESETS[name].config, "data_root": "/data"})
    for key, value in {**FINETUNE, **expected}.items():
        assert getattr(config, key) == value, key
    assert dict(PRESETS[name].paper) == {"effnet_b7_test_error_pct": error}
    assert "Sec. 3.2, Table 3" in PRESETS[name].reference
    assert format_paper(PRESETS[name].paper) == f"EfficientNet-b7 test error {error:.2f}%"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_a_presets_resolved_config_is_the_papers_recipe(name):
    expected, numbers = PAPER[name]
    config = preset_config(name, data_root="/data")
    resolved = dataclasses.asdict(config)
    for key, value in {**CIFAR, **expected, "data_root": "/data"}.items():
        assert resolved[key] == value, key
    untouched = set(resolved) - set(PRESETS[name].config) - {"data_root"}
    assert all(resolved[k] == getattr(TrainConfig(), k) for k in untouched)  # seed 0, device auto, ...
    assert dict(PRESETS[name].paper) == numbers


def test_digits_presets_are_the_cpu_defaults_with_sam_at_its_default_rho():
    assert preset_config("digits-sgd") == TrainConfig(optimizer="sgd", augment=False)  # None: off for digits too
    assert preset_config("digits-sam") == TrainConfig(optimizer="sam", rho=0.05, augment=False)
    assert PRESETS["digits-sam"].paper == {}


def test_overrides_replace_exactly_the_values_given():
    base = preset_config("c10-resnet32-noise40-sam", data_root="/data")
    changed = preset_config("c10-resnet32-noise40-sam", data_root="/data", epochs=30, rho=0.2, batchnorm=False)
    assert (changed.epochs, changed.rho, changed.batchnorm) == (30, 0.2, False)
    assert dataclasses.replace(changed, epochs=200, rho=0.1, batchnorm=True) == base


def test_presets_are_read_only_data():
    with pytest.raises(TypeError):
        PRESETS["digits-sam"] = PRESETS["digits-sgd"]
    with pytest.raises(TypeError):
        PRESETS["digits-sam"].config["epochs"] = 1
    assert preset_config("digits-sam").epochs == 30


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: preset_config("c10-wrn28-10"), r"unknown preset 'c10-wrn28-10'; choose one of c10-wrn28-10-sgd, c10-wrn28-10-sam, "),
        (lambda: preset_config("digits-sam", epochz=3), r"unknown TrainConfig fields \['epochz'\] in the overrides of preset 'digits-sam'"),
        (lambda: preset_config("c100-wrn28-10-sam"), r"preset 'c100-wrn28-10-sam' trains on cifar100, which is read from files: "
                                                     r"pass data_root \(on the command line --data-root DIR, the directory holding cifar-100-python/\)"),
        (lambda: preset_config("digits-sam", epochs=0), "epochs must be an integer >= 1; got 0"),
        (lambda: Preset("x", "y", {}, {"epoch": 3}), r"preset config keys \['epoch'\] are not TrainConfig fields"),
    ],
)
def test_bad_names_and_values_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_download_instead_of_data_root_is_accepted():
    assert preset_config("c10-wrn28-10-sam", download=True).download is True


def test_the_listing_shows_every_preset_with_the_papers_number():
    text = format_presets()
    for name, preset in PRESETS.items():
        assert name in text and preset.description in text
    assert "paper: clean test accuracy 26.2% [Foret et al. 2021, Sec. 3.3" in text
    assert format_paper(PRESETS["c10-wrn40-10-nobn-sam"].paper) == "lambda_max 1.0, lambda_max/lambda_5 2.6"
