"""End-to-end training step (GPT-2-124M shape, T = 1024) in tokens/s and MFU.

The trainer benchmark lives in `benchmarks/bench_train.py` (owned by the pretraining work); this
module only calls it so that `python -m benchmarks` reports it beside the kernels. Contract:

    benchmarks.bench_train.run(*, dtype: str, quick: bool, smoke: bool, log=print) -> list[dict]

one dict per provider (e.g. "tfkernels", "torch", "torch.compile") with keys `provider`,
`tokens_per_s`, and where known `mfu` (fraction of the GPU's dense peak), `ms` / `ms_p20` /
`ms_p80` (step time), `peak_mem_MiB`, `model`, `T`, `batch`, `status`, `note`. Extra keys are kept.
A bench_train with only `main(argv)` is run with `--out <tmp>` (`--steps 50` in --quick) and its
`bench_train.json` read back; it is skipped in --smoke (no CPU-sized mode). When the module is
absent the suite skips e2e with a note.
"""
from __future__ import annotations

import importlib
import inspect

from . import _util
from ._util import BenchConfig


def run(cfg: BenchConfig, notes: dict, log=print) -> list[dict]:
    if cfg.out_of_time():
        notes["e2e"] = "skipped: time budget (--budget) reached"
        return []
    try:
        bench_train = importlib.import_module("benchmarks.bench_train")
    except ImportError as err:
        notes["e2e"] = f"skipped: benchmarks/bench_train.py not importable ({_util.short(err, 100)})"
        return []
    fn = getattr(bench_train, "run", None)
    if fn is None:
        if not hasattr(bench_train, "main"):
            notes["e2e"] = "skipped: benchmarks.bench_train has neither run(...) nor main(argv)"
            return []
        if cfg.smoke:
            notes["e2e"] = "skipped in --smoke: bench_train has no smoke mode (a GPT-2-124M step is too slow on CPU)"
            return []
        fn = lambda **kw: _via_main(bench_train, **kw)  # noqa: E731
    kwargs = dict(dtype=cfg.dtype_name, quick=cfg.quick, smoke=cfg.smoke, log=log)
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    try:
        result = fn(**kwargs)
    except Exception as err:
        notes["e2e"] = f"failed: {_util.short(err)}"
        log(f"  e2e failed: {_util.short(err)}")
        return []
    rows = []
    for r in result or []:
        if "error" in r and not r.get("tokens_per_s"):
            r = {**r, "status": "failed", "note": _util.short(RuntimeError(r["error"]))}
        r = dict(r)
        tps = r.get("tokens_per_s")
        row = dict(suite="e2e", op=r.pop("model", "gpt2-124m"), provider=r.pop("provider", "?"),
                   **{"pass": "step"}, dtype=cfg.dtype_name, shape=f"T={r.get('T', 1024)}", x=r.get("T", 1024),
                   metric="tokens/s", value=tps, status=r.pop("status", "ok" if tps else "failed"),
                   note=r.pop("note", ""))
        row.update({k: v for k, v in r.items() if k not in row})
        rows.append(row)
        log(f"  e2e {row['op']} {row['provider']:16s} {_util.fmt(tps, 0)} tokens/s"
            + (f"  MFU {100 * row['mfu']:.1f}%" if isinstance(row.get("mfu"), (int, float)) else ""))
    return rows


def _via_main(bench_train, *, dtype, quick, smoke, log=print):
    """Fallback for a bench_train with only main(argv): run it into a temporary folder and read
    its bench_train.json ({"env", "results": [{"name", "tokens_per_s", "mfu", "peak_mem_gb", ...}]})."""
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--out", tmp] + (["--steps", "50"] if quick else [])
        log(f"  bench_train.main({argv[2:]})")
        bench_train.main(argv)
        data = json.loads((Path(tmp) / "bench_train.json").read_text())
    rows = []
    for r in data.get("results", []):
        r = dict(r)
        r["provider"] = r.pop("name", "?")
        if r.get("peak_mem_gb"):
            r["peak_mem_MiB"] = r["peak_mem_gb"] * 1024**3 / 2**20
        if r.get("tokens_per_step") and r.get("tokens_per_s"):
            r["ms"] = 1e3 * r["tokens_per_step"] / r["tokens_per_s"]
        rows.append(r)
    return rows
