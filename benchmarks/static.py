"""Static check of the Triton kernels for a GPU that is not here: compile, shared memory, registers.

The CPU tests run the Triton kernels in the interpreter, which never compiles them, uses small
tiles, and widens bf16 dots (see attention._dot). This tool compiles the launches a real GPU would
get instead: it calls the ops' own launchers (attention, softmax, LayerNorm/RMSNorm; their real
block sizes, warps and stages for the chosen GPU) on CPU tensors, with a stand-in Triton driver
that answers the device queries for that GPU and launches nothing. Triton's ahead-of-time
compiler turns each launch into a cubin for the target; the report gives, per kernel launch:

- shared memory, against the GPU's per-block limit. As on the real GPU, a launch over the limit
  raises OutOfResources and the launcher retries its fallback config, so the report shows whether
  the tuned config fits or the launch silently drops to the slow fallback;
- registers per thread and local memory per thread (stack frame + local: register spills, as
  Triton kernels have no local arrays), from `cuobjdump -res-usage` on the cubin;
- the tensor-core instructions in its SASS (`cuobjdump -sass`): HGMMA is Hopper's warpgroup MMA
  (wgmma), HMMA the warp-level mma.sync of sm_80. A Hopper matrix kernel with only HMMA runs on the
  slower path (roughly 2/3 of the tensor-core peak at best), which no other static number shows.

No GPU, CUDA driver or CUDA build of torch is needed, only Triton (3.3 or newer) and its bundled
ptxas. Run it without TRITON_INTERPRET:

    python -m benchmarks.static --gpu sm_90                  # the full matrix, a table
    python -m benchmarks.static --gpu sm_80 --quick --json out.json

tests/test_triton_static.py runs the quick matrix for sm_80 and sm_90 in CI.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

# per-block shared-memory opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin), SM count
GPUS = {
    "sm_80": SimpleNamespace(arch=80, major=8, max_shared=166912, sms=108, name="A100"),
    "sm_86": SimpleNamespace(arch=86, major=8, max_shared=101376, sms=84, name="RTX 3090 / A10"),
    "sm_89": SimpleNamespace(arch=89, major=8, max_shared=101376, sms=128, name="L40 / RTX 4090"),
    "sm_90": SimpleNamespace(arch=90, major=9, max_shared=232448, sms=132, name="H100"),
}


@dataclass
class Launch:
    """One compiled kernel launch."""
    case: str
    kernel: str
    config: dict  # the launch's constexpr block sizes, num_warps, num_stages
    shared: int  # bytes per block
    fits: bool  # shared <= the GPU's limit (False: the launch raised OutOfResources)
    regs: Optional[int] = None  # per thread (None when the launch did not fit: never loaded)
    spill: Optional[int] = None  # bytes of local memory per thread (stack frame + local): register spills
    mma: Optional[dict] = None  # tensor-core SASS instructions: {"HGMMA": n, "HMMA": n} (absent: none)
    compile_s: float = 0.0


@dataclass
class Report:
    gpu: str
    triton: str
    launches: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # (case, message) for launches that failed to compile


# ----------------------------------------------------------------------------------------------
# the stand-in driver
# ----------------------------------------------------------------------------------------------

def _cuobjdump() -> Optional[str]:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def inspect_cubin(cubin: bytes) -> tuple[dict, Optional[dict]]:
    """From one cubin (written to a file once): `cuobjdump -res-usage` as {'REG': n, 'LOCAL': bytes,
    'SHARED': bytes, ...}, and the tensor-core instructions of its SASS as {"HGMMA": n, "HMMA": n}
    ({} and None without cuobjdump)."""
    tool = _cuobjdump()
    if tool is None:
        return {}, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    use = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL|CONSTANT\[\d+\]|TEXTURE|SURFACE|SAMPLER):(\d+)", res)}
    # an instruction line: /*0420*/  @!P0 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass)
    return use, {op: ops.count(op) for op in _MMA_OPS if op in ops}


_MMA_OPS = ("HGMMA", "HMMA")  # fp8 (QGMMA) and integer MMAs are not used here


def _make_driver(gpu: SimpleNamespace, report: Report):
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    state = {"case": "?", "t0": time.perf_counter()}

    class StaticDriver(DriverBase):
        """Answers Triton's device queries for `gpu`; compiles, never loads or launches."""

        @classmethod
        def is_active(cls):
            return False

        def __init__(self):
            super().__init__()
            props = {"max_shared_mem": gpu.max_shared, "multiprocessor_count": gpu.sms, "arch": f"sm_{gpu.arch}",
                     "max_num_regs": 65536, "warpSize": 32}
            self.utils = SimpleNamespace(get_device_properties=lambda device: props, load_binary=self._load_binary)

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return GPUTarget("cuda", gpu.arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("the static driver does not run kernels")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def launcher_cls(self, src, metadata):
            # called once the kernel is compiled, before the shared-memory check: record it here
            consts = {}
            for key, value in getattr(src, "constants", {}).items():
                name = src.fn.arg_names[key[0]] if isinstance(key, tuple) else key
                if name.isupper():  # the constexpr parameters (BLOCK_M, IS_CAUSAL, ...)
                    consts[name] = getattr(value, "value", value)
            consts.update(num_warps=metadata.num_warps, num_stages=metadata.num_stages)
            now = time.perf_counter()
            report.launches.append(Launch(state["case"], metadata.name, consts, metadata.shared,
                                          metadata.shared <= gpu.max_shared, compile_s=round(now - state["t0"], 2)))
            state["t0"] = now
            return lambda *args, **kwargs: None

        def _load_binary(self, name, cubin, shared, device):
            launch = report.launches[-1]
            use, launch.mma = inspect_cubin(cubin)
            launch.regs = use.get("REG")
            launch.spill = use.get("STACK", 0) + use.get("LOCAL", 0) if use else None
            return None, None, launch.regs or 0, 0, 1024

    return StaticDriver(), state


# ----------------------------------------------------------------------------------------------
# the cases: the ops' launchers on CPU tensors
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _matmul_tf32(flag: bool):
    """torch's fp32 matmul flag, which the fp32 attention kernels read per call, set for one case and
    restored after it (left set, it leaked into the tests that share the process). Through
    fp32_precision where torch has it: reading the legacy allow_tf32 after that was set raises."""
    import torch

    matmul = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    saved = getattr(matmul, attr)
    setattr(matmul, attr, ("tf32" if flag else "ieee") if attr == "fp32_precision" else flag)
    try:
        yield
    finally:
        setattr(matmul, attr, saved)


def _attention_case(dtype, D, causal=False, mask=None, dropout=0.0, tf32=False, T=1024, Hq=4, Hkv=4, backward=True,
                    window=(-1, -1), softcap=0.0, docs=False):
    import torch
    A = importlib.import_module("tfkernels.ops.attention")  # the package exports a function by that name

    def run():
        with _matmul_tf32(tf32):  # fp32 inputs: TF32 or IEEE dots (read per call)
            body()

    def body():
        q = torch.randn(1, Hq, T, D, dtype=dtype)
        k = torch.randn(1, Hkv, T, D, dtype=dtype)
        v = torch.randn(1, Hkv, T, D, dtype=dtype)
        m = None
        if mask == "bool":
            m = torch.ones(T, T, dtype=torch.bool).expand(1, Hq, T, T)
        elif mask == "float":
            m = torch.zeros(1, 1, T, T, dtype=dtype).expand(1, Hq, T, T)
        seed = torch.tensor([1234], dtype=torch.int64) if dropout else None
        scale = D ** -0.5
        # documents: packed rows of 300-token documents (the ids' values do not change the code)
        doc = (torch.arange(T, dtype=torch.int32) // 300)[None] if docs else None
        out, lse = A._triton_fwd(q, k, v, m, doc, doc, dropout, seed, causal, scale, *window, softcap)
        if backward:
            A._triton_bwd(torch.randn_like(q), q, k, v, m, doc, doc, out, lse, None, dropout, seed, causal, scale,
                          *window, softcap, mask == "float")
    return run


def _kvcache_case(dtype, D, Hq=32, Hkv=8, Tq=1, page=0, splits=4, window=(-1, -1), softcap=0.0, tf32=False,
                  leftpad=False):
    """A decode step against a 4k-key cache: the split kernel and the combine (splits > 1)."""
    import torch
    KV = importlib.import_module("tfkernels.ops.kvcache")

    def run():
        with _matmul_tf32(tf32):
            body()

    def body():
        B, S = 2, 4096
        q = torch.randn(B, Tq, Hq, D, dtype=dtype)
        table = None
        if page:
            kc = torch.randn(B * S // page, page, Hkv, D, dtype=dtype)
            table = torch.arange(B * S // page, dtype=torch.int32).view(B, S // page)
        else:
            kc = torch.randn(B, S, Hkv, D, dtype=dtype)
        lens = torch.full((B,), S, dtype=torch.int32)
        pad = torch.tensor([0, 100], dtype=torch.int32) if leftpad else None
        KV._triton_fwd(q, kc, kc, lens, table, None, pad, D ** -0.5, window[1] == 0, window[0], -1, softcap, splits)
    return run


def _rows_case(op, dtype, N, M=64):
    import torch
    _norm = importlib.import_module("tfkernels.ops._norm")
    softmax = importlib.import_module("tfkernels.ops.softmax")

    def run():
        x = torch.randn(M, N, dtype=dtype)
        if op == "softmax":
            y = softmax._triton_fwd(x)
            softmax._triton_bwd(torch.randn_like(y), y)
        else:
            is_rms = op == "rms_norm"
            w = torch.randn(N, dtype=dtype)
            b = None if is_rms else torch.randn(N, dtype=dtype)
            y, mean, rstd = _norm.norm_fwd(x, w, b, 1e-5, is_rms)
            _norm.norm_bwd(torch.randn_like(y), x, w, mean, rstd, b is not None, is_rms)
    return run


def cases(quick: bool) -> dict[str, Callable[[], None]]:
    """name -> a callable that makes the launches. `quick`: the subset CI compiles (about a minute
    per GPU on 2 cores)."""
    import torch
    # name -> (dtype, allow_tf32): fp32 attention runs IEEE or TF32 dots, per torch's matmul flag
    dts = {"fp16": (torch.float16, False), "bf16": (torch.bfloat16, False), "fp32": (torch.float32, False),
           "fp32-tf32": (torch.float32, True)}
    # (dtype, D, causal, mask ("bool", "float", "gqa": no mask, grouped K/V heads, or "window":
    # sliding window (255, 0) with softcap 50, Gemma 2's; "docs": document ids), dropout_p)
    if quick:
        attn = [("bf16", 128, True, None, 0.0), ("bf16", 64, True, "gqa", 0.0), ("bf16", 256, False, None, 0.0),
                ("fp32", 64, True, None, 0.0), ("fp16", 128, False, "bool", 0.1), ("fp32-tf32", 128, False, None, 0.0),
                ("bf16", 128, True, "window", 0.0), ("bf16", 128, True, "docs", 0.0)]
        rows = [("softmax", "bf16", 4096), ("layer_norm", "bf16", 4096), ("rms_norm", "fp32", 65536)]
        kv = [("bf16", 128, 16, "")]
    else:
        attn = [(dt, D, c, None, 0.0) for dt in dts for D in (64, 128, 256) for c in (False, True)]
        attn += [("bf16", 128, False, "bool", 0.0), ("bf16", 128, True, "float", 0.0), ("bf16", 128, False, None, 0.1),
                 ("fp16", 80, False, None, 0.0), ("bf16", 96, True, None, 0.0), ("bf16", 128, True, "gqa", 0.0),
                 ("bf16", 128, True, "window", 0.0), ("bf16", 256, True, "window", 0.0), ("fp16", 64, True, "window", 0.0),
                 ("bf16", 64, True, "docs", 0.0), ("bf16", 128, True, "docs", 0.0), ("bf16", 256, True, "docs", 0.0),
                 ("fp32", 128, False, "docs", 0.0), ("fp16", 64, False, "docs", 0.0), ("fp32", 64, True, "docs", 0.0),
                 ("fp32", 256, True, "docs", 0.0), ("fp32-tf32", 128, True, "docs", 0.0),
                 ("bf16", 64, True, "gqa", 0.0), ("fp16", 64, False, "gqa", 0.0), ("bf16", 256, True, "gqa", 0.0),
                 ("fp32", 128, True, "gqa", 0.0), ("fp32-tf32", 128, True, "gqa", 0.0)]
        rows = [(op, dt, N) for op in ("softmax", "layer_norm", "rms_norm") for dt in ("fp16", "bf16", "fp32")
                for N in (768, 4096, 65536)]
        # (dtype, D, page size (0: dense), extra: "mha" 32 K/V heads, "window" (1023, 0) + softcap 30,
        # "chunk" 4 new tokens of a chunked prefill/speculative step, "nosplit")
        kv = [("bf16", 128, 0, ""), ("bf16", 128, 16, ""), ("bf16", 64, 0, "mha"), ("fp16", 128, 256, ""),
              ("bf16", 256, 0, ""), ("bf16", 128, 0, "window"), ("bf16", 128, 0, "chunk"), ("fp32", 128, 0, ""), ("fp32", 256, 0, ""),
              ("fp32", 64, 16, ""), ("fp32-tf32", 128, 0, ""), ("bf16", 128, 0, "nosplit"),
              ("bf16", 128, 0, "leftpad")]
    out = {}
    for dt, D, causal, mask, p in attn:
        gqa = mask == "gqa"  # 4 query heads per K/V head (the kernels' GROUP loop is not specialised away)
        window = mask == "window"
        docs = mask == "docs"
        mask = None if gqa or window or docs else mask
        name = f"attention {dt} D={D}" + (" causal" if causal else "") + (f" {mask}-mask" if mask else "") \
               + (" gqa" if gqa else "") + (" window+softcap" if window else "") + (" docs" if docs else "") \
               + (f" dropout={p}" if p else "")
        out[name] = _attention_case(dts[dt][0], D, causal, mask, p, tf32=dts[dt][1], Hkv=1 if gqa else 4,
                                    window=(255, 0) if window else (-1, -1), softcap=50.0 if window else 0.0,
                                    docs=docs)
    for op, dt, N in rows:
        out[f"{op} {dt} N={N}"] = _rows_case(op, dts[dt][0], N)
    for dt, D, page, extra in kv:
        name = f"kvcache {dt} D={D}" + (f" paged{page}" if page else "") + (f" {extra}" if extra else "")
        out[name] = _kvcache_case(dts[dt][0], D, Hkv=32 if extra == "mha" else 8, Tq=4 if extra == "chunk" else 1,
                                  page=page, splits=1 if extra == "nosplit" else 4,
                                  window=(1023, 0) if extra == "window" else (-1, -1),
                                  softcap=30.0 if extra == "window" else 0.0, tf32=dts[dt][1], leftpad=extra == "leftpad")
    return out


def run(gpu_name: str, quick: bool = False, only: Optional[str] = None) -> Report:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("benchmarks.static compiles kernels: run it without TRITON_INTERPRET=1")
    import triton
    from triton.runtime import driver as triton_driver
    attention = importlib.import_module("tfkernels.ops.attention")

    gpu = GPUS[gpu_name]
    report = Report(gpu=f"{gpu_name} ({gpu.name})", triton=triton.__version__)
    drv, state = _make_driver(gpu, report)
    triton_driver.set_active(drv)
    kvcache = importlib.import_module("tfkernels.ops.kvcache")
    attention._gpu_major = kvcache._gpu_major = lambda x: gpu.major  # the launchers pick this GPU's configs
    for name, make_launches in cases(quick).items():
        if only and only not in name:
            continue
        state["case"], state["t0"] = name, time.perf_counter()
        try:
            make_launches()
        except Exception as e:  # noqa: BLE001 — reported, the other cases still run
            report.errors.append((name, f"{type(e).__name__}: {e}".splitlines()[0][:500]))
    return report


def _mma_text(mma: Optional[dict]) -> str:
    if mma is None:
        return ""
    return ", ".join(f"{op} x{n}" for op, n in mma.items()) or "none"


def _table(report: Report) -> str:
    lines = [f"# Triton kernels compiled for {report.gpu}, Triton {report.triton}", "",
             "| case | kernel | config | shared KB | fits | regs | spill B | tensor-core SASS |",
             "|---|---|---|---:|:-:|---:|---:|---|"]
    for l in report.launches:
        cfg = ", ".join(f"{k}={v}" for k, v in l.config.items() if k.startswith("BLOCK") or k.startswith("num_"))
        lines.append(f"| {l.case} | {l.kernel} | {cfg} | {l.shared / 1024:.1f} | {'yes' if l.fits else '**no**'} "
                     f"| {'' if l.regs is None else l.regs} | {'' if l.spill is None else l.spill} "
                     f"| {_mma_text(l.mma)} |")
    for case, msg in report.errors:
        lines.append(f"| {case} | **compile error** | {msg} | | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", choices=sorted(GPUS), default="sm_90")
    ap.add_argument("--quick", action="store_true", help="the CI subset")
    ap.add_argument("--only", help="run the cases whose name contains this")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args(argv)
    report = run(args.gpu, args.quick, args.only)
    print(_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": report.gpu, "triton": report.triton, "launches": [asdict(l) for l in report.launches],
                       "errors": report.errors}, f, indent=1)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
