"""Shared machinery of the benchmark suite: environment record, timing, copy bandwidth,
correctness checks, providers that may be missing.

Timing. On CUDA every number comes from `triton.testing.do_bench(fn, warmup, rep,
quantiles=[0.5, 0.2, 0.8])`: CUDA events around each call, warm-up first, median with the 20th and
80th percentiles. In Triton 3.6 `do_bench` zeroes a 256 MiB buffer
(`driver.get_empty_cache_for_benchmark` / `clear_cache` in triton/backends/nvidia/driver.py)
before every timed call, outside the events, so the L2 (50 MiB on H100) never holds the inputs:
no input rotation is needed on top. On CPU (smoke mode) a perf_counter loop stands in; those
numbers only prove the suite runs.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Correctness: a provider passes when its normalised error (max |out - ref| / max |ref|, against an
# fp32 reference on the same inputs) is at most max(TOL_FLOOR[dtype], ERR_FACTOR x the error of
# PyTorch's own implementation in the same dtype) -- flash-attention's rule "at most a few times
# PyTorch's numerical error", with a floor so an exact baseline does not make the bar zero.
TOL_FLOOR = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # fp32 allows TF32 dots
ERR_FACTOR = 4.0


class Unavailable(Exception):
    """A provider that cannot run here (not installed, not built, wrong device): skipped with a note."""


@dataclass
class Timing:
    ms: float
    ms_p20: float
    ms_p80: float


@dataclass
class BenchConfig:
    """What the command line asked for, as the sweeps need it."""

    device: str
    dtype: torch.dtype
    dtype_name: str
    quick: bool
    smoke: bool
    warmup_ms: int
    rep_ms: int
    skip: frozenset = frozenset()  # provider names not to run (--skip)
    deadline: float = math.inf  # time.time() after which no new shape is started (--budget)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def out_of_time(self) -> bool:
        return time.time() > self.deadline


# ----------------------------------------------------------------------------- environment


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except Exception:
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_commit() -> str:
    """TFKERNELS_COMMIT if set (a copy of the tree without .git), else `git rev-parse`."""
    if os.environ.get("TFKERNELS_COMMIT"):
        return os.environ["TFKERNELS_COMMIT"]
    sha = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if sha is None:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return sha + ("-dirty" if dirty else "")


def print_versions(names) -> None:
    """One line per module: its version and where it was imported from, or why it is absent (the
    GPU scripts log this so a result can be traced to what was installed)."""
    import importlib

    for name in names:
        try:
            m = importlib.import_module(name)
            print(f"  {name:22s} {getattr(m, '__version__', 'present')}  {getattr(m, '__file__', '') or ''}")
        except Exception as e:
            print(f"  {name:22s} absent ({type(e).__name__})")


def env_info(device: str) -> dict:
    """GPU name, driver, CUDA, torch, triton versions and the commit: stamped on every row."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "absent"
    info = {
        "gpu": "cpu",
        "driver": "n/a",
        "cuda": torch.version.cuda or "n/a",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if smi:
            info["driver"] = smi.splitlines()[0].strip()
        else:
            try:  # the CUDA driver API version, when nvidia-smi is not on PATH
                v = torch._C._cuda_getDriverVersion()
                info["driver"] = f"CUDA driver API {v // 1000}.{v % 1000 // 10}"
            except Exception:
                pass
    else:
        info["gpu"] = "cpu (" + (platform.processor() or platform.machine()) + ")"
    return info


def gpu_slug(info: dict) -> str:
    name = info["gpu"].lower().replace("nvidia", "").split("(")[0]
    slug = "-".join("".join(c if c.isalnum() else " " for c in name).split())
    return slug or "gpu"


# ----------------------------------------------------------------------------- timing


def bench(fn, cfg: BenchConfig) -> Timing:
    """Median and 20/80 quantiles of fn's time in ms (do_bench on CUDA, perf_counter on CPU)."""
    if cfg.cuda:
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80)
    if not cfg.smoke:  # smoke: the correctness check already ran (and compiled) fn once
        fn()
    reps = 1 if cfg.smoke else 5
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) == 1:
        return Timing(times[0], times[0], times[0])
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), q[1], q[7])


def bench_device(fn, cfg: BenchConfig) -> Optional[Timing]:
    """fn's device time alone, in ms: `do_bench_cudagraph` captures many calls in one CUDA graph
    and replays it, so nothing on the host (Python, argument checks, launches, the autograd engine's
    thread) is in it. Beside `bench`'s time, the difference is what a call's host side costs when
    its kernels are shorter. No L2 flush between the captured calls: inputs under ~50 MB (an H100's
    L2) may be served from L2. None off CUDA; raises when fn cannot be captured (a host sync)."""
    if not cfg.cuda:
        return None
    from triton.testing import do_bench_cudagraph

    # 20 ms of calls a graph (fewer when the first estimate is host-bound), replayed 10 times
    med, p20, p80 = do_bench_cudagraph(fn, rep=min(cfg.rep_ms, 20), quantiles=[0.5, 0.2, 0.8])
    return Timing(med, p20, p80)


def copy_bandwidth(cfg: BenchConfig) -> dict:
    """Measured device-to-device copy bandwidth: dst.copy_(src), bytes read + written, median."""
    nbytes = 2**30 if cfg.cuda else 2**24  # 1 GiB on the GPU, 16 MiB for the CPU smoke run
    src = torch.randn(nbytes // 4, device=cfg.device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), cfg)
    del src, dst
    gbs = 2 * nbytes / (t.ms * 1e-3) / 1e9
    return {"copy_GBps": gbs, "copy_bytes": nbytes, "copy_ms": t.ms}


def empty_cache(cfg: BenchConfig) -> None:
    if cfg.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def short(err: BaseException, n: int = 160) -> str:
    msg = f"{type(err).__name__}: {err}".replace("\n", " ")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


# ----------------------------------------------------------------------------- correctness


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in fp32; inf when out holds NaN/inf that ref does not."""
    out, ref = out.float(), ref.float()
    if out.shape != ref.shape:
        return math.inf
    diff = (out - ref).abs().max().item()
    if not math.isfinite(diff):
        return math.inf
    return diff / max(ref.abs().max().item(), 1e-6)


def max_rel_err(outs, refs) -> float:
    return max(rel_err(o, r) for o, r in zip(outs, refs))


def tolerance(dtype: torch.dtype, baseline_err: float | None) -> float:
    base = 0.0 if baseline_err is None or not math.isfinite(baseline_err) else baseline_err
    return max(TOL_FLOOR[dtype], ERR_FACTOR * base)


def fmt(x, digits: int | None = None) -> str:
    """A number for a table: `digits` decimals, or by magnitude (1234, 123.4 -> 123, 12.3, 0.0123)."""
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    if digits is None:
        digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else None
    return f"{x:,.{digits}f}" if digits is not None else f"{x:.3g}"
