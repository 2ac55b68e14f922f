"""The benchmark command: `python -m benchmarks` (and `tfkernels bench`, through `main(argv)`).

    python -m benchmarks                          # everything, bf16, full sweeps
    python -m benchmarks --quick                  # fewer sizes (what benchmarks/gpu_run.sh runs)
    python -m benchmarks --only attention --dtype fp16
    python -m benchmarks --only norms,e2e --out /tmp/run --compare benchmarks/results/h100/results.json
    TRITON_INTERPRET=1 python -m benchmarks --smoke --out /tmp/smoke   # CPU, tiny sizes (CI)

Writes results.csv, results.json, summary.md and norms.png / attention.png / attention_memory.png
under --out (default benchmarks/results/<gpu>-<date>). A provider that is missing or fails is
skipped with a note or marked failed; it never stops the run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

SUITES = ("norms", "attention", "e2e")
ONLY = {"attention": ("attention",), "norms": ("layer_norm", "rms_norm", "softmax"), "softmax": ("softmax",),
        "layer_norm": ("layer_norm",), "rms_norm": ("rms_norm",), "e2e": ("e2e",)}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma list of: " + ", ".join(ONLY) + " (default: all)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="benchmark dtype (default bf16; fp32 in --smoke)")
    p.add_argument("--quick", action="store_true", help="fewer sizes (norms N in 1k/4k/16k/64k, attention T in 1k/4k/16k)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 rep; runs on CPU with TRITON_INTERPRET=1 (CI)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<gpu>-<date>)")
    p.add_argument("--compare", default=None, metavar="OLD.json", help="print speedups/regressions against an earlier results.json")
    p.add_argument("--warmup", type=int, default=None, help="do_bench warm-up in ms (default 25, quick 15)")
    p.add_argument("--rep", type=int, default=None, help="do_bench repetition time in ms (default 100, quick 60)")
    p.add_argument("--skip", default="", help="comma list of providers not to run (e.g. sdpa-math,tfkernels-cuda)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no new shape after this many seconds; what ran is still written")
    args = p.parse_args(argv)
    wanted = []
    for name in (args.only.split(",") if args.only else list(ONLY)):
        name = name.strip()
        if name not in ONLY:
            p.error(f"--only: unknown benchmark {name!r}; expected a comma list of {', '.join(ONLY)}")
        wanted += [o for o in ONLY[name] if o not in wanted]
    args.ops = wanted
    # mistakes that would otherwise surface only after the whole sweep (a GPU session's minutes)
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    for name in ("warmup", "rep"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 ms, got {getattr(args, name)}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file; it must be a folder (new or existing)")
    if args.compare:
        try:
            old = json.loads(Path(args.compare).read_text())
            if not isinstance(old, dict) or not isinstance(old.get("rows"), list):
                raise ValueError("it has no 'rows' list (is it a results.json of this suite?)")
        except (OSError, ValueError) as err:
            p.error(f"--compare {args.compare}: {err}")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    cuda = torch.cuda.is_available()
    if args.smoke and not cuda:
        # the Triton kernels run on CPU only through the interpreter; it must be set before they
        # are defined (if tfkernels was already imported without it, tfkernels-triton is skipped)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not cuda and not args.smoke:
        print("benchmarks: no CUDA GPU here; the timing sweeps need one. Use --smoke for the CPU check.",
              file=sys.stderr)
        return 2

    from . import _util, bench_attention, bench_e2e, bench_norms, report

    known = set(bench_norms.PROVIDERS) | set(bench_attention.PROVIDERS)
    unknown = sorted({s.strip() for s in args.skip.split(",") if s.strip()} - known)
    if unknown:  # a misspelt provider would silently still run
        print(f"python -m benchmarks: error: --skip: unknown provider(s) {', '.join(unknown)}; expected a comma "
              f"list of {', '.join(sorted(known))}", file=sys.stderr)
        return 2

    dtype_name = args.dtype or ("fp32" if args.smoke else "bf16")
    cfg = _util.BenchConfig(
        device="cuda" if cuda else "cpu", dtype=_util.DTYPES[dtype_name], dtype_name=dtype_name,
        quick=args.quick, smoke=args.smoke,
        warmup_ms=args.warmup if args.warmup is not None else (15 if args.quick or args.smoke else 25),
        rep_ms=args.rep if args.rep is not None else (60 if args.quick or args.smoke else 100),
        skip=frozenset(s.strip() for s in args.skip.split(",") if s.strip()),
        deadline=time.time() + args.budget if args.budget else float("inf"),
    )
    env = _util.env_info(cfg.device)
    out = Path(args.out) if args.out else (
        _util.REPO / "benchmarks" / "results" / f"{_util.gpu_slug(env)}-{datetime.datetime.now():%Y%m%d-%H%M}")

    def log(msg=""):
        print(msg, flush=True)

    t0 = time.time()
    log(f"tfkernels benchmarks: {env['gpu']} | driver {env['driver']} | CUDA {env['cuda']} | torch {env['torch']} "
        f"| triton {env['triton']} | commit {env['commit']}")
    log(f"dtype {dtype_name}, {'smoke' if cfg.smoke else 'quick' if cfg.quick else 'full'}, "
        f"do_bench warmup {cfg.warmup_ms} ms rep {cfg.rep_ms} ms, out {out}")
    result = {"env": env, "config": {"dtype": dtype_name, "quick": cfg.quick, "smoke": cfg.smoke, "ops": args.ops,
                                     "warmup_ms": cfg.warmup_ms, "rep_ms": cfg.rep_ms, "device": cfg.device,
                                     "skip": sorted(cfg.skip), "budget_s": args.budget},
              "notes": {}, "rows": []}
    rows, notes = [], result["notes"]

    def checkpoint():
        """Write what has run so far: a run killed later (a GPU command's time limit) keeps it."""
        log(f"   [{time.time() - t0:.0f} s]")
        result.update(rows=report.stamp(rows, env), wall_s=time.time() - t0)
        try:
            report.write_all(out, result)
        except Exception as err:  # noqa: BLE001 - the final write reports it
            log(f"   (checkpoint write failed: {_util.short(err)})")

    norm_ops = [o for o in args.ops if o in bench_norms.OPS]
    if norm_ops:
        copy = _util.copy_bandwidth(cfg)
        result.update(copy_GBps=copy["copy_GBps"], copy_bytes=copy["copy_bytes"])
        log(f"\n== norms / softmax (copy bandwidth {copy['copy_GBps']:.0f} GB/s)")
        rows += _guard("norms", lambda: bench_norms.run(cfg, norm_ops, copy["copy_GBps"], notes, log), notes, log)
        checkpoint()
    if "attention" in args.ops:
        log("\n== attention")
        rows += _guard("attention", lambda: bench_attention.run(cfg, notes, log), notes, log)
        checkpoint()
    if "e2e" in args.ops:
        log("\n== end to end")
        rows += _guard("e2e", lambda: bench_e2e.run(cfg, notes, log), notes, log)
        log(f"   [{time.time() - t0:.0f} s]")

    result["rows"] = report.stamp(rows, env)
    result["wall_s"] = time.time() - t0
    if args.compare:
        try:
            result["compare_md"] = report.compare(args.compare, result["rows"])
        except Exception as err:
            result["compare_md"] = f"## Comparison\n\ncould not compare with {args.compare}: {_util.short(err)}"
    paths = report.write_all(out, result)
    if notes:
        log("\nskipped:")
        for k, v in sorted(notes.items()):
            log(f"  {k}: {v}")
    if result.get("compare_md"):
        log("\n" + result["compare_md"])
    n_ok = sum(r["status"] == "ok" for r in rows)
    log(f"\n{n_ok} ok / {len(rows)} rows in {result['wall_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    return 0


def _guard(name, fn, notes, log):
    """A sweep that crashes outright is a note, not an error: the rest of the suite still runs."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        from ._util import short

        notes[name] = f"sweep aborted: {short(err, 300)}"
        log(f"  {name} sweep aborted: {short(err, 300)}")
        return []
