"""The models researchers bring: Hugging Face transformers and timm, built tiny from configs (no download).

Against dense float64 Hessians (``torch.func.hessian`` with the math attention kernel): the top
eigenvalue, under a batching other than the reference's single batch; the surface's centre equals the
loss; m-sharpness runs. transformers and timm are optional extras; the test command installs them.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape import hessian, sharpness, surface
from landscape.batches import causal_lm_cross_entropy
from landscape.objective import Objective, ParamLayout

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

F64 = torch.float64
VOCAB, T = 16, 6
# Dense references by finite differences take two gradients per parameter: a subset keeps them fast. Each
# holds layer-norm parameters beside the weights before them, where PyTorch's own second derivatives fail.
GPT2_PARAMS = ["transformer.h.0.attn.c_proj.weight", "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
               "transformer.ln_f.weight", "transformer.ln_f.bias"]
VIT_PARAMS = ["blocks.0.attn.proj.weight", "blocks.0.norm2.weight", "blocks.0.norm2.bias", "norm.weight", "norm.bias",
              "head.weight", "head.bias"]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=8, depth=1,
                             num_heads=1, mlp_ratio=1.0, num_classes=3).eval()


def padded_text(n: int = 6, labels: str = "tokens") -> dict[str, torch.Tensor]:
    """Token ids padded to T with an attention mask; labels per token (-100 on padding) or per sequence."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    lengths = torch.tensor([T, 3, 5, 2, T, 4, 3, 5][:n])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if labels == "tokens":
        batch["labels"] = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    else:
        batch["labels"] = torch.randint(0, 3, (n,), generator=g)
    return batch


def dense_top(model: torch.nn.Module, loss_of, names: list[str] | None = None, step: float = 1e-5) -> torch.Tensor:
    """The eigenvalues, descending, of the float64 Hessian of ``loss_of(model_at_params)`` by central
    differences of exact gradients: no second-order autodiff, whose layer-norm formula PyTorch gets wrong
    (pytorch/pytorch#196700), so the reference is independent of what is tested."""
    reference = copy.deepcopy(model).to(F64)
    params = {k: v.detach() for k, v in reference.named_parameters()}
    chosen = {k: v for k, v in params.items() if names is None or k in names}
    layout = ParamLayout.of(chosen)

    def loss(flat):
        return loss_of(lambda *args, **kwargs: torch.func.functional_call(
            reference, {**params, **layout.unflatten(flat)}, args, kwargs))

    gradient = torch.func.grad(loss)
    flat = layout.flatten(chosen)
    basis = torch.eye(flat.numel(), dtype=F64)
    with sdpa_kernel([SDPBackend.MATH]):
        columns = [(gradient(flat + step * e) - gradient(flat - step * e)) / (2 * step) for e in basis]
    matrix = torch.stack(columns, dim=1)
    return torch.linalg.eigvalsh((matrix + matrix.T) / 2).flip(0)


def test_gpt2_with_padding_and_its_own_loss_matches_the_dense_hessian_under_another_batching():
    model, data = tiny_gpt2(), padded_text()
    with torch.no_grad():
        whole = float(copy.deepcopy(model).to(F64)(**data).loss)  # the model's loss over every real token at once
    objective = Objective(model, None, data, dtype=F64, batch_size=4)  # batches of 4 and 2 sequences
    assert objective.protocol.label_shift == 1
    assert float(objective.loss()) == pytest.approx(whole, rel=1e-6)  # the model computes its loss in float32
    # the reference: the same objective (next-token cross-entropy over the real tokens) all in float64
    inputs = {k: v for k, v in data.items() if k != "labels"}
    dense = dense_top(model, lambda call: causal_lm_cross_entropy(call(**inputs).logits, data["labels"]), GPT2_PARAMS)
    top = hessian.top_eigenvalues(model, None, data, k=2, tol=1e-8, dtype=F64, batch_size=4, params=GPT2_PARAMS,
                                  progress=False)
    torch.testing.assert_close(top.eigenvalues, dense[:2], rtol=1e-5, atol=1e-9)  # float32 inside the model's loss
    streamed = hessian.top_eigenvalues(model, None, data, k=1, tol=1e-8, dtype=F64, batch_size=2, stream=True,
                                       params=GPT2_PARAMS, progress=False)
    assert float(streamed.eigenvalues[0]) == pytest.approx(float(top.eigenvalues[0]), rel=1e-6)


def test_gpt2_surface_centre_is_the_loss_and_m_sharpness_runs():
    model, data = tiny_gpt2(), padded_text()
    objective = Objective(model, None, data, dtype=F64, batch_size=4)
    loss, accuracy = objective.loss_and_accuracy()
    plane = surface.slice_2d(model, None, data, steps=3, dtype=F64, batch_size=4, points_per_pass=3, progress=False)
    assert plane.loss[1, 1] == pytest.approx(loss, rel=1e-10)
    assert plane.accuracy[1, 1] == pytest.approx(accuracy, rel=1e-12) and 0 <= accuracy <= 1
    assert not np.allclose(plane.loss, loss)
    with warnings.catch_warnings(record=True):  # Hugging Face attention masks cannot be vmapped over chunks
        warnings.simplefilter("always")
        for m in (1, 2):
            result = sharpness.m_sharpness(model, None, data, m=m, rho=0.05, dtype=F64, progress=False)
            assert math.isfinite(result.value) and result.value > 0 and result.settings["n_chunks"] == 6 // m


def test_bert_sequence_classification_head_alone_against_its_dense_hessian():
    model, data = tiny_bert(), padded_text(labels="sequences")
    head = ["classifier.weight", "classifier.bias"]
    dense = dense_top(model, lambda call: call(**data).loss, head)
    top = hessian.top_eigenvalues(model, None, data, k=2, tol=1e-8, dtype=F64, batch_size=4, params=head,
                                  progress=False)
    torch.testing.assert_close(top.eigenvalues, dense[:2], rtol=1e-6, atol=1e-9)
    objective = Objective(model, None, data, dtype=F64, batch_size=4)
    assert objective.protocol.label_shift == 0 and objective.n_terms == 6
    with torch.no_grad():
        logits = copy.deepcopy(model).to(F64)(**{k: v for k, v in data.items() if k != "labels"}).logits
    assert objective.loss_and_accuracy()[1] == pytest.approx(float((logits.argmax(-1) == data["labels"]).double().mean()))


def test_a_timm_vision_transformer_matches_its_dense_hessian_and_runs_every_analysis():
    model = tiny_vit()
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    dense = dense_top(model, lambda call: F.cross_entropy(call(X.to(F64)), y), VIT_PARAMS)
    top = hessian.top_eigenvalues(model, F.cross_entropy, (X, y), k=2, tol=1e-10, dtype=F64, batch_size=4,
                                  params=VIT_PARAMS, progress=False)
    torch.testing.assert_close(top.eigenvalues, dense[:2], rtol=1e-7, atol=1e-10)
    objective = Objective(model, F.cross_entropy, (X, y), dtype=F64)
    line = surface.slice_1d(model, F.cross_entropy, (X, y), steps=3, dtype=F64, points_per_pass=3, progress=False)
    assert line.loss[1] == pytest.approx(float(objective.loss()), rel=1e-10)
    result = sharpness.m_sharpness(model, F.cross_entropy, (X, y), m=2, rho=0.05, dtype=F64, progress=False)
    assert result.value > 0 and result.settings["n_chunks"] == 5


def test_gpt2_in_float64_with_our_causal_loss_matches_its_dense_hessian_to_float64_precision():
    model, data = tiny_gpt2(), padded_text()
    inputs = {k: v for k, v in data.items() if k != "labels"}
    with torch.no_grad():
        logits = copy.deepcopy(model).to(F64)(**inputs).logits
    real = data["labels"][:, 1:] != -100
    expected = F.cross_entropy(logits[:, :-1][real], data["labels"][:, 1:][real])
    objective = Objective(model, causal_lm_cross_entropy, data, dtype=F64, batch_size=4)
    assert objective.n_terms == int(real.sum())
    assert float(objective.loss()) == pytest.approx(float(expected), rel=1e-13)
    dense = dense_top(model, lambda call: causal_lm_cross_entropy(call(**inputs).logits, data["labels"]), GPT2_PARAMS)
    top = hessian.top_eigenvalues(model, causal_lm_cross_entropy, data, k=2, tol=1e-10, dtype=F64, batch_size=4,
                                  params=GPT2_PARAMS, progress=False)
    torch.testing.assert_close(top.eigenvalues, dense[:2], rtol=1e-7, atol=1e-10)
