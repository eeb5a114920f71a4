"""m = 1 sharpness of Hugging Face causal language models: the per-layer rules against loops, in one process.

The models are built from configs (random weights, nothing downloaded): GPT-2 (transformers' ``Conv1D``
layers, the token embedding tied to the output layer, LayerNorm) and Llama (``LlamaRMSNorm``, untied),
each on ``--sequences`` right-padded sequences of random tokens (lengths uniform in ``[length / 2,
length]``, attention mask 0 and labels -100 on the padding), batches of 32, the model's own loss. Every
contender computes the same one-step m = 1 sharpness (rho 0.05, p = 2) over all of them:

* ``default``: :func:`landscape.sharpness.m_sharpness` as users call it, the per-layer rules of
  :mod:`landscape._layer_rules` (``settings["method"] == "layer_rules"``);
* ``loop (ours)``: ``batched=False``, one ``grad_and_value`` call per sequence; vmap cannot take these
  models (transformers' mask code branches on the data), so without the rules this is what runs;
* ``loop (autograd, in place)``: by hand, per sequence: ``model(**one).loss.backward()``, ``p.add_(e)``, a
  second forward, ``p.sub_(e)``.

Values agree to float32 rounding (printed). Times are medians of ``--repeats`` interleaved rounds after a
warm-up; the ratios are the comparison, absolute times only from a GPU.

Usage::

    python benchmarks/bench_sharpness_lm.py                  # CPU: 256 sequences of 64 tokens
    python benchmarks/bench_sharpness_lm.py --quick          # toy size (< 1 min)
    python benchmarks/bench_sharpness_lm.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from _timing import ratios_to_loops, timed_rounds
from landscape.sharpness import m_sharpness, sharpness_objective

RHO = 0.05


def build(family: str, vocab: int, width: int, layers: int, length: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=length, n_embd=width, n_layer=layers,
                                         n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=length, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def sequences(n: int, vocab: int, length: int, device: torch.device, batch: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    data = {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}
    return [{k: v[i : i + batch].to(device) for k, v in data.items()} for i in range(0, n, batch)]


def autograd_loop(model: torch.nn.Module, batches: list[dict]) -> float:
    """One-step m = 1 sharpness with in-place perturbations of the module, sequence by sequence."""
    params = [p for p in model.parameters() if p.requires_grad]
    increases = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            for p in params:
                p.grad = None
            loss = model(**one).loss
            loss.backward()
            with torch.no_grad():
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
                norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
                eps = [RHO * g / norm.clamp_min(1e-12) for g in grads]
                for p, e in zip(params, eps):
                    p.add_(e)
                increases.append(float(model(**one).loss - loss.detach()))
                for p, e in zip(params, eps):
                    p.sub_(e)
    return sum(increases) / len(increases)


def bench_family(args: argparse.Namespace, family: str) -> list[dict]:
    device = torch.device(args.device)
    model = build(family, args.vocab, args.width, args.layers, args.length).to(device)
    batches = sequences(args.sequences, args.vocab, args.length, device)
    objective = sharpness_objective(model, None, batches)
    values: dict[str, float] = {}
    methods: dict[str, str] = {}

    def ours(name: str, **kw) -> Callable[[], None]:
        def call() -> None:
            result = m_sharpness(None, None, None, 1, RHO, objective=objective, progress=False, **kw)
            values[name], methods[name] = result.value, result.settings["method"]
        return call

    def by_hand() -> None:
        values["loop (autograd, in place)"] = autograd_loop(model, batches)
        methods["loop (autograd, in place)"] = "autograd"

    contenders = {"default": ours("default"), "loop (ours)": ours("loop (ours)", batched=False),
                  "loop (autograd, in place)": by_hand}
    times = timed_rounds(contenders, device, warmup=1, rounds=args.repeats)
    if methods["default"] != "layer_rules":  # the benchmark would time something else
        raise SystemExit(f"{family}: the default ran {methods['default']!r}, not the layer rules")
    loop, hand = "loop (ours)", "loop (autograd, in place)"
    ratios = ratios_to_loops(times, loop, hand)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{family}: {n_params} parameters, {args.sequences} sequences of <= {args.length} tokens; value "
          f"{values[loop]:.6f}; |difference| to loop (ours): "
          + ", ".join(f"{k} {abs(v - values[loop]):.1e}" for k, v in values.items() if k != loop))
    print(f"{'contender':<30}{'method':>13}{'wall s':>9}{'x loop':>9}{'x autograd':>11}{'cpu s':>9}{'x loop':>9}")
    rows = []
    for name in contenders:
        row = {"model": family, "parameters": n_params, "contender": name, "method": methods[name], **ratios[name],
               "value": values[name]}
        rows.append(row)
        print(f"{name:<30}{row['method']:>13}{row['wall_s']:>9.3f}{row['x_loop']:>9.2f}{row['x_autograd_loop']:>11.2f}"
              f"{row['cpu_s']:>9.3f}{row['x_loop_cpu']:>9.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="toy size: 32 sequences of 16 tokens, 2 layers")
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--sequences", type=int, default=None, help="sequences (default 256; --quick 32)")
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence at most (default 64; --quick 16)")
    parser.add_argument("--width", type=int, default=128, help="hidden size")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default 4; --quick 2)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default 5; --quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.sequences = args.sequences or (32 if args.quick else 256)
    args.length = args.length or (16 if args.quick else 64)
    args.layers = args.layers or (2 if args.quick else 4)
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    device = torch.device(args.device)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(), "rho": RHO}
    print(json.dumps(env), flush=True)
    rows = [row for family in args.models for row in bench_family(args, family)]
    speedups = {r["model"]: r["x_loop"] for r in rows if r["contender"] == "default"}
    print("\nm = 1 default / loop (ours): " + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items()))
    out = {"env": env, "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows,
           "m1_speedup_over_loop": speedups, "benchmark_wall_s": time.perf_counter() - start}
    print(f"total wall {out['benchmark_wall_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
