"""What bench_window and bench_documents share: attention that skips tiles (a window, documents)
against providers that do not, timed over the visible (query, key) pairs only.

Each bench supplies its shapes, providers fn(q, k, v, arg) (arg: the window W, or the document
ids) and the dense mask that defines correctness; this module checks each provider against SDPA in
fp32 with that mask, times forward and forward+backward, and writes the markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import _util
from ._util import BenchConfig

PASSES = ("fwd", "fwd+bwd")


def available(provs: dict, log) -> dict:
    """The providers that can run; the others are logged with the reason."""
    for name, fn in provs.items():
        if isinstance(fn, _util.Unavailable):
            log(f"  {name}: skipped ({fn})")
    return provs


def grads(fn, q, k, v, dout, arg):
    """[out, dq, dk, dv] of fn(q, k, v, arg) for the cotangent dout."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, arg)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def reference(sdpa, q, k, v, dout, arg, dtype):
    """(ref, tol): SDPA's gradients in fp32 on batch 0, heads 0-1, and the tolerance a provider in
    `dtype` is held to (from SDPA's own error in that dtype, as bench_attention)."""
    sl = lambda t: t[:1, :2].float()  # noqa: E731
    ref = grads(sdpa, sl(q), sl(k), sl(v), sl(dout), arg)
    base = grads(sdpa, q[:1, :2], k[:1, :2], v[:1, :2], dout[:1, :2], arg)
    return ref, _util.tolerance(dtype, _util.max_rel_err(base, ref))


def measure(name: str, fn, arg, q, k, v, dout, ref, tol, fwd_flops: float, cfg: BenchConfig, log, tag: str,
            keys: dict) -> list[dict]:
    """Rows for one provider at one shape: checked against ref first, then both passes timed
    (TFLOP/s over fwd_flops, x3.5 for forward+backward); a failure or OOM is a row, not an error."""
    rows = []
    try:
        got = grads(fn, q, k, v, dout, arg)
        err = _util.max_rel_err([t[:1, :2] for t in got], ref)
        del got
        if not err <= tol:
            log(f"  {tag} FAILED correctness (rel err {err:.2e} > tol {tol:.2e})")
            return [dict(keys, provider=name, status="failed", err=err, tol=tol)]
        for pass_ in PASSES:
            if pass_ == "fwd":
                with torch.no_grad():
                    t = _util.bench(lambda: fn(q, k, v, arg), cfg)
            else:
                leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                t = _util.bench(lambda: torch.autograd.grad(fn(*leaves, arg), leaves, dout), cfg)
            fl = fwd_flops * (1.0 if pass_ == "fwd" else 3.5)
            tflops = fl / (t.ms * 1e-3) / 1e12
            rows.append(dict(keys, provider=name, status="ok", err=err, tol=tol, **{"pass": pass_}, ms=t.ms,
                             ms_p20=t.ms_p20, ms_p80=t.ms_p80, tflops=tflops))
            log(f"  {tag} {pass_:7s} {t.ms:9.3f} ms {tflops:8.4g} TFLOP/s")
    except Exception as e:  # noqa: BLE001 — recorded, the other providers still run
        status = "oom" if _util.is_oom(e) else "failed"
        rows.append(dict(keys, provider=name, status=status, note=_util.short(e)))
        log(f"  {tag} {status}: {_util.short(e)}")
    _util.empty_cache(cfg)
    return rows


def table(rows: list[dict], info: dict, title: str, intro: str, col: str, order) -> str:
    """Markdown: one line per (T, rows[col], provider), sorted by T, order(rows[col]), provider."""
    lines = [f"# {title}, {info.get('gpu')}", "",
             "Environment: " + ", ".join(f"{k} {info[k]}" for k in ("gpu", "driver", "cuda", "torch", "triton", "commit")
                                         if k in info), "", intro, "",
             f"| T | {col} | provider | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | status |",
             "|---:|---:|---|---:|---:|---:|---:|---|"]
    by = {}
    for r in rows:
        by.setdefault((r["T"], order(r[col]), r["provider"]), {col: r[col]})[r.get("pass", "-")] = r
    cell = lambda r, key, fmt: (fmt.format(r[key]) if r else "")  # noqa: E731
    for (T, _, name), passes in sorted(by.items()):
        value = passes.pop(col)
        f, fb = passes.get("fwd"), passes.get("fwd+bwd")
        status = next(iter(passes.values()))["status"]
        lines.append(f"| {T} | {value or 'full'} | {name} | {cell(f, 'ms', '{:.3f}')} | {cell(f, 'tflops', '{:.1f}')} "
                     f"| {cell(fb, 'ms', '{:.3f}')} | {cell(fb, 'tflops', '{:.1f}')} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv, doc: str, run, table_fn, out_name: str, json_name: str | None = None) -> int:
    """The command line the standalone benches share (window, documents, decode): --quick, --smoke
    (CPU, TRITON_INTERPRET=1), --out DIR (the table as out_name, and the rows as json_name if given)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes in float32, one rep: on the GPU where there is one, else on CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--out", type=Path, help=f"write {out_name} (and print it)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda  # no GPU: only the tiny sizes make sense
    dtype = torch.float32 if smoke else torch.bfloat16
    cfg = BenchConfig(device="cuda" if cuda else "cpu", dtype=dtype, dtype_name=str(dtype).split(".")[-1],
                      quick=args.quick, smoke=smoke, warmup_ms=25, rep_ms=100)
    info = _util.env_info(cfg.device)
    rows = run(cfg)
    md = table_fn(rows, info, cfg.dtype_name)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / out_name).write_text(md)
        if json_name:
            (args.out / json_name).write_text(json.dumps({"env": info, "rows": [dict(r, **info) for r in rows]},
                                                         indent=1))
    return 0 if rows and all(r["status"] == "ok" for r in rows) else 1
