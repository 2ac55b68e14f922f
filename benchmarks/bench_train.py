"""End-to-end training throughput: the same GPT on tfkernels vs plain PyTorch, eager and compiled.

    python benchmarks/bench_train.py --out benchmarks/results/train-h100        # gpt2-124m, T=1024, bf16

Runs four short trainings in this process (kernels tfkernels|torch x compile off|on) on random
tokens (throughput does not depend on the text) and writes OUT/bench_train.json and
OUT/bench_train.md: tokens/s (after the first steps, so compilation is excluded), MFU
(6N + 12·L·H·Dh·T FLOPs per token over the GPU's dense bf16 peak), peak memory, and the speedup
over plain PyTorch + torch.compile. Each run is a few hundred steps at most; keep it under ~90 s.

`--ablate` adds two eager runs that swap in one half of the kernels each, to say which half a
difference to plain PyTorch comes from: `tfkernels-norms` (the fused norms, SDPA's attention) and
`tfkernels-attention` (the fused attention, torch's norms).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import env_info  # noqa: E402  (GPU, driver, CUDA, torch, triton, commit: TFKERNELS_COMMIT too)
from tfkernels.train import TrainConfig, train  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for bench_train.json / .md")
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--model", default="gpt")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=None, help="default: the preset's (1024 for gpt2-124m)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--backend", default=None, help="tfkernels backend (default automatic)")
    p.add_argument("--device", default="auto")
    p.add_argument("--only", default=None, help="comma list of run names to do, e.g. tfkernels,torch+compile")
    p.add_argument("--ablate", action="store_true", help="also tfkernels-norms and tfkernels-attention (eager)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    runs = [("torch", False), ("tfkernels", False), ("torch", True), ("tfkernels", True)]
    if args.ablate:
        runs += [("tfkernels-norms", False), ("tfkernels-attention", False)]
    results = []
    for name_kernels, compiled in runs:
        name = name_kernels + ("+compile" if compiled else "")
        kernels, _, part = name_kernels.partition("-")
        if args.only and name not in args.only.split(","):
            continue
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        cfg = TrainConfig(model=args.model, preset=args.preset, kernels=kernels, backend=args.backend,
                          compile=compiled, data="random", max_steps=args.steps, batch_size=args.batch_size,
                          block_size=args.block_size, precision=args.precision, device=args.device,
                          out=str(out / "runs" / name), eval_interval=0, eval_steps=1, log_interval=10,
                          save=False, plot=False, tensorboard=False, progress=False)
        t0 = time.perf_counter()
        try:
            with only_half(part):
                s = train(cfg)
        except Exception as err:  # record and go on: one failing configuration should not hide the others
            print(f"{name}: FAILED {err!r}", flush=True)
            results.append({"name": name, "error": repr(err)})
            continue
        if s.get("interrupted"):  # the trainer turns Ctrl-C / SIGINT (a timeout) into a summary: stop here
            print(f"{name}: interrupted after {s['step']} steps; not recorded, later runs skipped", flush=True)
            results.append({"name": name, "error": f"interrupted after {s['step']} steps"})
            break
        losses = s["losses"]
        r = {"name": name, "kernels": kernels, "compile": compiled, "tokens_per_s": s.get("tokens_per_s"),
             "mfu": s.get("mfu"), "peak_mem_gb": s.get("peak_mem_gb"), "wall_s": time.perf_counter() - t0,
             "first_loss": losses[min(losses)], "last_loss": losses[max(losses)], "backend": s["backend"],
             "precision": s["precision"], "n_params": s["n_params"], "tokens_per_step": s["tokens_per_step"]}
        print(json.dumps(r), flush=True)
        results.append(r)
        _write(out, args, results)  # after every run: a run killed later (a GPU command's time limit) keeps these
    print(_write(out, args, results))


@contextlib.contextmanager
def only_half(part: str):
    """While building and training: "norms" keeps tfkernels' norms and gives the GPT SDPA's attention;
    "attention" keeps tfkernels' attention and gives it torch's norms; "" changes nothing."""
    import torch.nn.functional as F

    import tfkernels.model as M

    saved = (M.make_norm, M.tf_attention)
    if part == "norms":
        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False, document_ids=None,
                 backend=None):
            if document_ids is not None:
                raise ValueError("tfkernels-norms: SDPA takes no document_ids")
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                                  enable_gqa=enable_gqa)
        M.tf_attention = sdpa
    elif part == "attention":
        M.make_norm = lambda cfg: saved[0](dataclasses.replace(cfg, kernels="torch"))
    elif part:
        raise ValueError(f"unknown half {part!r}")
    try:
        yield
    finally:
        M.make_norm, M.tf_attention = saved


def _write(out: Path, args, results: list) -> str:
    """Write bench_train.json / .md for the runs so far; returns the markdown."""
    base = next((r for r in results if r["name"] == "torch+compile" and r.get("tokens_per_s")), None)
    for r in results:
        if base and r.get("tokens_per_s"):
            r["speedup_vs_torch_compile"] = r["tokens_per_s"] / base["tokens_per_s"]
    env = {**env_info("cuda" if torch.cuda.is_available() else "cpu"), "preset": args.preset, "steps": args.steps,
           "batch_size": args.batch_size, "block_size": args.block_size}
    (out / "bench_train.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    lines = [f"# Training throughput: {args.model} {args.preset}", "",
             " ".join(f"{k}={v}" for k, v in env.items()), "",
             "| run | tokens/s | MFU | peak mem (GB) | vs torch+compile | loss first -> last | wall (s) |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['tokens_per_s'] or 0:,.0f} | {_pct(r['mfu'])} | {_num(r['peak_mem_gb'])} | "
                     f"{_num(r.get('speedup_vs_torch_compile'), 'x')} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
                     f"{r['wall_s']:.0f} |")
    (out / "bench_train.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def _pct(v):
    return f"{v:.1%}" if v else "-"


def _num(v, suffix=""):
    return f"{v:.2f}{suffix}" if v else "-"


if __name__ == "__main__":
    main()
