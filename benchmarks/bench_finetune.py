"""Fine-tuning throughput: one classifier training step, kernels=tfkernels vs kernels=torch.

    python benchmarks/bench_finetune.py                      # CUDA: bert-base, B=32, T=128, bf16, eager
    python benchmarks/bench_finetune.py --compile --json ft.json --csv ft.csv   # + torch.compile runs
    python benchmarks/bench_finetune.py --preset gpt2-124m --seq 512 --batch 16
    python benchmarks/bench_finetune.py --preset tiny --batch 4 --seq 32 --steps 2 --warmup 1   # CPU smoke

No checkpoint and no network: the base model is built from the preset with random weights (a step
costs the same whatever the weights) and wrapped in the fine-tuning `Classifier` of
tfkernels/train/finetune.py. Batches are random token ids (never zeros) with random lengths in
[T/2, T], one of them T, padded on the right as the fine-tuning loader pads them (BERT masks the
padding out of attention, GPT pools the last real token).

The step is the trainer's (tfkernels/train/trainer.py): bf16 autocast on CUDA (fp32 on CPU), forward
with labels, backward, gradient clipping at 1.0, AdamW (fused on CUDA; weight decay 0.01 on matrices,
as fine-tuning uses), zero_grad(set_to_none=True); torch.compile wraps the model, not the optimizer.

Timing: --warmup steps first (Triton autotuning and torch.compile happen there), then --steps steps,
each between two CUDA events and synchronized like the trainer's per-step loss.item(); the median is
the headline, the 20th/80th percentiles are kept. On CPU a perf_counter stands in (proves it runs).

Numbers: samples/s = B / median step; tokens/s counts all B*T positions (padding is computed too;
`real_tokens_per_s` counts the others); MFU = FLOPs/token x tokens/s / the GPU's dense bf16 peak
(tfkernels.train.metrics.peak_flops; empty when unknown), FLOPs/token = 6N + 12*L*H*Dh*T (the
trainer's formula, tfkernels.model.flops_per_token) with T the benchmarked length and N only the
parameters that do a matmul at every position: the blocks and the final norm. The token embedding
is left out, unlike pretraining, because no LM head runs (it is only a lookup here).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_finetune.py`
from benchmarks import _util  # noqa: E402
from benchmarks.report import ENV_KEYS, stamp  # noqa: E402
from tfkernels import _backend, _config  # noqa: E402
from tfkernels.model import PRESETS, build_model, flops_per_token, make_config  # noqa: E402
from tfkernels.train.finetune import Classifier  # noqa: E402
from tfkernels.train.metrics import peak_flops  # noqa: E402

WEIGHT_DECAY, BETAS, LR, GRAD_CLIP = 0.01, (0.9, 0.95), 3e-4, 1.0  # FinetuneConfig / TrainConfig defaults


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model size (default bert-base on CUDA, tiny on CPU)")
    p.add_argument("--arch", default=None, choices=("gpt", "bert"),
                   help="default: gpt for gpt* presets, else bert")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--seq", type=int, default=128, help="sequence length T (default 128; at most the preset's block size)")
    p.add_argument("--labels", type=int, default=2, help="number of classes (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--kernels", default="tfkernels,torch", help="comma list of tfkernels, torch (default both)")
    p.add_argument("--compile", action="store_true", help="also run each kernel set under torch.compile")
    p.add_argument("--backend", default=None, help="tfkernels backend (default automatic; 'torch' on CPU, as the trainer)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", default=None, metavar="PATH", help="write {env, config, rows} here")
    p.add_argument("--csv", default=None, metavar="PATH", help="write one stamped row per run here")
    args = p.parse_args(argv)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if not kernels or any(k not in ("tfkernels", "torch") for k in kernels):
        p.error(f"--kernels: expected a comma list of tfkernels, torch; got {args.kernels!r}")
    args.kernels = kernels
    for name in ("batch", "seq", "labels", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def make_batches(arch: str, vocab: int, B: int, T: int, n_labels: int, device, n: int = 4, seed: int = 0):
    """n random batches in the fine-tuning loader's layout (made on the device before timing)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
        lengths[0] = T  # the loader trims a batch to its longest example
        pos = torch.arange(T)[None, :]
        real = pos < lengths[:, None]
        ids = torch.randint(1, vocab, (B, T), generator=g) * real       # pad id 0 after the end
        seg = ((pos >= lengths[:, None] // 2) & real).long() if arch == "bert" else torch.zeros_like(ids)
        labels = torch.randint(0, n_labels, (B,), generator=g)
        out.append({k: v.to(device) for k, v in
                    dict(input_ids=ids, segment_ids=seg, lengths=lengths, labels=labels).items()})
    return out


def matmul_params(model: Classifier) -> int:
    """N of 6N: the parameters applied at every position (blocks + final norm)."""
    tr = model.base.transformer
    return sum(p.numel() for m in (tr.h, tr.ln_f) for p in m.parameters())


def _timer(cuda: bool):
    """(start(), stop() -> ms) around one step: CUDA events on the GPU, perf_counter on CPU."""
    if cuda:
        ev = {}

        def start():
            ev["a"], ev["b"] = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev["a"].record()

        def stop():
            ev["b"].record()
            ev["b"].synchronize()
            return ev["a"].elapsed_time(ev["b"])
        return start, stop
    t = {}

    def start():
        t["a"] = time.perf_counter()

    def stop():
        return (time.perf_counter() - t["a"]) * 1e3
    return start, stop


def run_one(args, kernels: str, compiled: bool, device: torch.device, amp_dtype, log=print) -> dict:
    """Build, warm up and time one configuration; returns its row (status ok / oom / failed)."""
    name = kernels + ("+compile" if compiled else "")
    cuda = device.type == "cuda"
    backend = args.backend
    if kernels == "tfkernels" and backend is None and not cuda and _config.env_backend() is None:
        backend = "torch"  # the trainer's choice: the Triton interpreter is far too slow to train with
    mcfg = make_config(args.arch, args.preset, kernels=kernels, backend=backend)
    if kernels == "torch":
        backend = "-"  # plain PyTorch modules: no tfkernels backend involved
    elif backend is None:  # what the automatic choice picks here ("auto" = Triton with the CUDA extension as fallback)
        backend = _backend.resolve(None, torch.empty(1, device=device), "attention")
    B, T = args.batch, args.seq
    row = dict(suite="finetune", op=f"{args.arch}-{args.preset}", provider=name, **{"pass": "step"},
               dtype="bf16" if amp_dtype else "fp32", shape=f"B={B} T={T}", B=B, T=T, metric="samples/s",
               kernels=kernels, backend=backend, compile=compiled, status="ok", note="")
    if T > mcfg.block_size:
        return {**row, "status": "failed", "note": f"--seq {T} exceeds the preset's block size {mcfg.block_size}"}
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed)  # the same weights for every configuration
    try:
        model = Classifier(build_model(mcfg), args.labels).to(device)
        model.train()
        n_mm = matmul_params(model)
        opt = torch.optim.AdamW(model.optim_groups(WEIGHT_DECAY), lr=LR, betas=BETAS, fused=cuda)
        run_model = torch.compile(model) if compiled else model
        autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        batches = make_batches(args.arch, mcfg.vocab_size, B, T, args.labels, device, seed=args.seed)

        def step(b):
            with autocast():
                _, loss = run_model(b["input_ids"], b["segment_ids"], b["lengths"], b["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        t0 = time.perf_counter()
        losses = [step(batches[i % len(batches)]).item() for i in range(args.warmup)]
        warm_s = time.perf_counter() - t0
        start, stop = _timer(cuda)
        times = []
        for i in range(args.steps):
            start()
            loss = step(batches[(args.warmup + i) % len(batches)])
            times.append(stop())
            losses.append(loss.item())  # already synchronized by stop()
    except Exception as err:  # one failing configuration must not hide the others
        row.update(status="oom" if _util.is_oom(err) else "failed", note=_util.short(err))
        log(f"  {name}: {row['status']}: {row['note']}")
        return row
    if not all(math.isfinite(v) for v in losses):
        return {**row, "status": "failed", "note": f"non-finite loss {losses}"}
    ms = statistics.median(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [ms] * 9
    ms_p20, ms_p80 = q[1], q[7]
    real = sum(int(b["lengths"].sum()) for b in batches) / len(batches)  # non-padding tokens per step
    fpt = flops_per_token(dataclasses.replace(mcfg, block_size=T), n_mm)
    peak = peak_flops(device)
    tps = B * T / (ms / 1e3)
    row.update(value=B / (ms / 1e3), value_p20=B / (ms_p80 / 1e3), value_p80=B / (ms_p20 / 1e3),
               ms=ms, ms_p20=ms_p20, ms_p80=ms_p80, samples_per_s=B / (ms / 1e3), tokens_per_s=tps,
               real_tokens_per_s=real / (ms / 1e3), mfu=fpt * tps / peak if peak else None,
               flops_per_token=fpt, flops=fpt * B * T, matmul_params=n_mm,
               peak_mem_MiB=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
               warmup_s=warm_s, steps=args.steps, warmup=args.warmup, first_loss=losses[0], last_loss=losses[-1])
    return row


def run(args, log=print, on_rows=None) -> tuple[dict, list[dict]]:
    """(env, rows) for every requested configuration, rows stamped with the environment;
    on_rows(env, rows) is called after each configuration (main writes the files there)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    args.preset = args.preset or ("bert-base" if cuda else "tiny")
    args.arch = args.arch or ("gpt" if args.preset.startswith("gpt") else "bert")
    args.steps = args.steps if args.steps is not None else (30 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    precision = args.precision if args.precision != "auto" else ("bf16" if cuda else "fp32")
    amp_dtype = torch.bfloat16 if precision == "bf16" else None
    env = _util.env_info(device.type)
    log(f"fine-tuning step: {args.arch} {args.preset}, B={args.batch} T={args.seq}, {precision} on {env['gpu']} | "
        f"driver {env['driver']} | CUDA {env['cuda']} | torch {env['torch']} | triton {env['triton']} | "
        f"commit {env['commit']}")
    rows = []
    for compiled in ([False, True] if args.compile else [False]):  # eager first: compiling is the slow part
        for kernels in args.kernels:
            r = run_one(args, kernels, compiled, device, amp_dtype, log)
            rows.append(r)
            if r["status"] == "ok":
                log(f"  {r['provider']:18s} {r['ms']:8.2f} ms/step  {r['samples_per_s']:9,.1f} samples/s  "
                    f"{r['tokens_per_s']:11,.0f} tokens/s" + (f"  MFU {r['mfu']:.1%}" if r.get("mfu") else ""))
            _speedups(rows)
            if on_rows is not None:
                on_rows(env, stamp(rows, env))
    return env, stamp(rows, env)


def _speedups(rows: list[dict]) -> None:
    """speedup_vs_torch: plain PyTorch's step time over this one's, with the same compile setting."""
    for r in rows:
        base = next((b for b in rows if b["kernels"] == "torch" and b["compile"] == r["compile"]
                     and b["status"] == "ok"), None)
        if base and r["status"] == "ok":
            r["speedup_vs_torch"] = base["ms"] / r["ms"]


def table(env: dict, rows: list[dict]) -> str:
    r0 = rows[0] if rows else {}
    lines = [f"Fine-tuning throughput: {r0.get('op')} + classifier head, {r0.get('shape')}, {r0.get('dtype')}",
             f"{env['gpu']} | driver {env['driver']} | CUDA {env['cuda']} | torch {env['torch']} | "
             f"triton {env['triton']} | commit {env['commit']} | {env['date']}", "",
             "| run | backend | ms/step (p20-p80) | samples/s | tokens/s | MFU | peak MiB | vs torch |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    f = _util.fmt
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['provider']} | {r['backend']} | {r['status']}: {r['note'][:90]} | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        sp = f"{r['speedup_vs_torch']:.2f}x" if r.get("speedup_vs_torch") else "-"
        lines.append(f"| {r['provider']} | {r['backend']} | {r['ms']:.2f} ({r['ms_p20']:.2f}-{r['ms_p80']:.2f}) | "
                     f"{f(r['samples_per_s'])} | {f(r['tokens_per_s'], 0)} | {mfu} | {f(r.get('peak_mem_MiB'), 0)} | {sp} |")
    return "\n".join(lines)


def write(args, env: dict, rows: list[dict]) -> None:
    """--json {env, config, rows} and --csv (one stamped row per configuration)."""
    config = {k: v for k, v in vars(args).items() if k not in ("json", "csv")}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
        Path(args.json).write_text(json.dumps({"env": env, "config": config, "rows": clean}, indent=1, default=str))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        keys = list(ENV_KEYS) + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ENV_KEYS]
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows({k: ("" if r.get(k) is None else r[k]) for k in keys} for r in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    # files rewritten after every configuration: a run killed later (a GPU command's time limit) keeps these
    env, rows = run(args, on_rows=lambda env, rows: write(args, env, rows))
    print("\n" + table(env, rows), flush=True)
    return 0 if rows and all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
