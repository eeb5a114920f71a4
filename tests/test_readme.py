"""The README's marked code blocks run as written: the Hugging Face and timm examples of "Analysing your
own model", and the Hugging Face Trainer and PyTorch Lightning recipes of "SAM where you train", each
checked against an independent computation (the loss by the model itself; our own SAM steps on the same
batches). transformers, timm and pytorch-lightning are optional extras that the test command installs.
"""

from __future__ import annotations

import copy
import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from landscape import sharpness
from sam import SAM
from sam.optim import frozen_running_stats

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(kind: str, name: str) -> str:
    """The ```python block right after ``<!-- kind: name -->`` in the README."""
    found = re.findall(rf"<!-- {kind}: {re.escape(name)} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert len(found) == 1, f"README.md has {len(found)} blocks marked <!-- {kind}: {name} -->"
    return found[0]


def run_block(kind: str, name: str) -> dict:
    """Execute a block as a module of its own (classes defined in it pickle and introspect normally)."""
    module = types.ModuleType(f"readme_{kind}_{name.replace('-', '_')}")
    sys.modules[module.__name__] = module
    try:
        exec(compile(readme_block(kind, name), f"README.md <!-- {kind}: {name} -->", "exec"), module.__dict__)
    finally:
        sys.modules.pop(module.__name__)
    return module.__dict__


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.slow
def test_the_hugging_face_example_runs_and_its_surface_centre_is_the_mean_over_real_tokens(quiet):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    names = run_block("example", "hf")
    model, loader, line = names["model"], names["loader"], names["line"]
    # independent: the model's own loss per batch, weighted by its real next-token targets
    total = count = 0.0
    with torch.no_grad():
        for batch in loader:
            n = (batch["labels"][:, 1:] != -100).sum().item()
            total += model(**batch).loss.item() * n
            count += n
    assert line.loss[5] == pytest.approx(total / count, rel=1e-5)
    top, last = names["top"].eigenvalues, names["last"].eigenvalues
    assert top[0] >= top[1] > 0
    assert last[0] <= top[0] * (1 + 1e-3)  # a principal submatrix's eigenvalues interlace the whole's
    assert 0.0 <= line.accuracy[5] <= 1.0
    assert names["sharp"].value > 0
    per_sequence = names["per_sequence"]  # by the per-layer rules, against the loop over sequences
    looped = sharpness.m_sharpness(model, None, loader, m=1, rho=0.05, batched=False, progress=False)
    assert per_sequence.settings["method"] == "layer_rules" and looped.settings["method"] == "loop"
    np.testing.assert_allclose(per_sequence.per_chunk, looped.per_chunk, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_the_timm_example_runs_and_matches_the_loss_and_interlacing(quiet):
    pytest.importorskip("timm")
    names = run_block("example", "timm")
    model, images, plane = names["model"], names["images"], names["plane"]
    x, y = images.tensors
    with torch.no_grad():
        assert plane.loss[2, 2] == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)
    top, head = names["top"].eigenvalues, names["head"].eigenvalues
    assert top[0] >= head[0] * (1 - 1e-3)  # Cauchy interlacing: the head block's top is at most the top
    assert names["trace"].value > 0 and names["sharp"].value > 0


def _max_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.slow
def test_the_hugging_face_trainer_recipe_takes_our_sam_steps(tmp_path, quiet):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    SAMTrainer = run_block("recipe", "hf-trainer")["SAMTrainer"]
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    start = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, 16, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.randint(0, 3, (), generator=g)} for _ in range(16)]
    seen = []

    class Recording(SAMTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append({k: v.clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, seed=0, warmup_steps=0, disable_tqdm=True)
    Recording(model=model, args=args, train_dataset=rows, rho=0.1).train()
    assert len(seen) == 3

    ours = copy.deepcopy(start).train()
    opt = SAM(torch.optim.SGD(ours.parameters(), lr=0.1), rho=0.1)
    for batch in seen:
        def closure():
            opt.zero_grad()
            loss = ours(**batch).loss
            loss.backward()
            return loss
        opt.step(closure)
    assert _max_gap(model, ours) < 1e-6
    assert _max_gap(start, ours) > 1e-2


@pytest.mark.slow
def test_the_lightning_recipe_takes_our_sam_steps_and_counts_them(tmp_path, quiet):
    pl = pytest.importorskip("pytorch_lightning")
    SAMModule = run_block("recipe", "lightning")["SAMModule"]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    start = copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(SAMModule(net, lr=0.1, rho=0.1), loader)
    assert trainer.global_step == 3

    ours = copy.deepcopy(start).train()
    opt = SAM(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    for x, y in list(loader)[:3]:
        opt.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        opt.first_step(zero_grad=True)
        with frozen_running_stats(ours):
            F.cross_entropy(ours(x), y).backward()
        opt.second_step(zero_grad=True)
    assert _max_gap(net, ours) < 1e-6
    for name, buffer in ours.state_dict().items():  # BatchNorm statistics updated once per step, as ours
        assert torch.allclose(net.state_dict()[name].float(), buffer.float(), atol=1e-6), name
    assert _max_gap(start, ours) > 1e-2
