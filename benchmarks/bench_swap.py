"""Forward+backward step time of a mid-size Hugging Face model, unswapped vs tfkernels.swap (bf16, CUDA).

    python benchmarks/bench_swap.py --out benchmarks/results/swap            # GPT-2 small (124M)
    python benchmarks/bench_swap.py --model llama --out benchmarks/results/swap

The model is built from a config (no download) with random weights. Each variant runs `--warmup`
steps, then `--steps` timed steps (CUDA events, median reported): forward with labels -> loss ->
backward, on a batch of `--batch` x `--seq` tokens. Writes bench_swap_<model>.json and .md to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tfkernels  # noqa: E402
from benchmarks._util import env_info  # noqa: E402


def build(name: str):
    import transformers as tf

    if name == "gpt2":  # GPT-2 small: 12 x 768, 12 heads, 124M parameters
        cfg = tf.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(cfg)
    if name == "llama":  # Llama-style ~125M: 12 x 768, 12 heads / 4 kv heads (GQA), RMSNorm, SwiGLU
        cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)
        return tf.LlamaForCausalLM(cfg)
    raise ValueError(f"--model must be gpt2 or llama, got {name!r}")


def time_steps(model, ids, warmup: int, steps: int) -> list:
    model.train()
    for _ in range(warmup):
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(input_ids=ids, labels=ids).loss.backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        model.zero_grad(set_to_none=True)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--backend", default=None, help="tfkernels backend for the swapped model (default: automatic)")
    p.add_argument("--out", default="benchmarks/results/swap")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_swap needs a CUDA GPU")

    import transformers

    torch.manual_seed(0)
    base = build(args.model).to("cuda", torch.bfloat16)
    swapped = copy.deepcopy(base)
    _, report = tfkernels.swap(swapped, backend=args.backend, return_report=True)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device="cuda")

    with torch.no_grad():  # same model, same answer
        l0 = base(input_ids=ids[:2, :256], labels=ids[:2, :256]).loss.item()
        l1 = swapped(input_ids=ids[:2, :256], labels=ids[:2, :256]).loss.item()

    results = {}
    for name, model in (("unswapped (" + base.config._attn_implementation + ")", base), ("tfkernels.swap", swapped)):
        torch.cuda.reset_peak_memory_stats()
        t = time_steps(model, ids, args.warmup, args.steps)
        results[name] = {"median_ms": statistics.median(t), "min_ms": min(t),
                         "tokens_per_s": args.batch * args.seq / (statistics.median(t) / 1e3),
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    names = list(results)
    speedup = results[names[0]]["median_ms"] / results[names[1]]["median_ms"]

    env = env_info("cuda")  # driver, CUDA, and the commit (TFKERNELS_COMMIT on a copy without .git)
    commit = env["commit"]
    meta = {"gpu": torch.cuda.get_device_name(), "driver": env["driver"], "cuda": env["cuda"],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": getattr(__import__("triton"), "__version__", "?"), "tfkernels": tfkernels.__version__,
            "commit": commit, "python": platform.python_version(), "model": args.model,
            "params_M": sum(p.numel() for p in base.parameters()) / 1e6, "dtype": "bfloat16",
            "batch": args.batch, "seq": args.seq, "steps": args.steps, "backend": args.backend or "auto",
            "replaced": len(report), "loss_check": {"unswapped": l0, "swapped": l1}}
    out = {"meta": meta, "results": results, "speedup": speedup}

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_swap_{args.model}")
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=2)
    lines = [f"# swap: fwd+bwd step, {args.model} ({meta['params_M']:.0f}M params), bf16, "
             f"batch {args.batch} x seq {args.seq}", "",
             f"{meta['gpu']} · torch {meta['torch']} · transformers {meta['transformers']} · "
             f"triton {meta['triton']} · tfkernels {meta['tfkernels']} ({commit})", "",
             "| variant | median ms | min ms | tokens/s | peak GiB |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_mem_gib']:.2f} |")
    lines += ["", f"speedup: {speedup:.3f}x · loss check (bs 2, T 256): {l0:.4f} vs {l1:.4f}"]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
