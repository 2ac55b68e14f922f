"""Decoding against a KV cache: one new query per sequence, time and read bandwidth of the split-KV
kernels against the training kernel, SDPA and FlashAttention's decoding kernel.

    python -m benchmarks.bench_decode [--quick] [--out DIR]     # GPU: writes DIR/decode.md, decode.json
    TRITON_INTERPRET=1 python -m benchmarks.bench_decode --smoke  # CPU: tiny sizes, one rep

Shapes: bf16, D = 128, T_q = 1, every row's cache full to L keys. "gqa": H_q = 32, H_kv = 8
(Llama-3-8B's heads); "mha": H_q = H_kv = 32; "gqa-leftpad": gqa with a batch of prompts of
different lengths, left-padded (row b's keys start at b * L / (2 B): a quarter of the slots are
padding on average), as a Hugging Face generate on a padded batch decodes them: the kvcache
providers take cache_leftpad, the attention ones the (B, 1, 1, L) boolean mask. Providers:
  tfkernels-triton          kvcache_attention, automatic split count (`_auto_splits`)
  tfkernels-triton-nosplit  kvcache_attention, num_splits=1: what the splits buy at small batch
  tfkernels-triton-paged    kvcache_attention on a paged cache (16-key pages, shuffled)
  tfkernels-cuda(-paged)    the same op on backend="cuda" (csrc/kvcache.cu), dense and paged: its
                            tensor-core kernel (fp16/bf16, D <= 128)
  tfkernels-cuda-fma        the cuda backend's FMA kernel (TFKERNELS_CUDA_DECODE=fma; fp32's and
                            D = 256's), dense: what the tensor cores buy
  tfkernels-attention       tfkernels.attention with T_q = 1 (the training kernel; what a model
                            without the decoding op runs): one program per query head
  sdpa                      F.scaled_dot_product_attention, (B, H, L, D) cache, enable_gqa
  flash-attn-2              flash_attn_with_kvcache, when flash_attn is installed

The work is reading the cache: bytes = 2 (K and V) * B * L * H_kv * D * 2, GB/s = bytes / time, to
compare with the copy bandwidth (~3.0 TB/s on an H100). Correctness: each provider's output
against fp32 math on the same cache, within the dtype's tolerance, before timing.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from . import _masked, _util
from ._util import BenchConfig, Unavailable

PAGE = 16


def configs(quick: bool, smoke: bool):
    """(name, B, H_q, H_kv, L, D)."""
    if smoke:
        return [("gqa", 2, 4, 2, 40, 32), ("mha", 1, 2, 2, 24, 32), ("gqa-leftpad", 3, 4, 2, 40, 32)]
    lens = (4096, 32768) if quick else (1024, 4096, 16384, 65536)
    out = []
    for B in ((1, 16) if quick else (1, 4, 16, 64)):
        for L in lens:
            if B * L <= 2 ** 20:  # caches up to 2 GiB (gqa) / 8 GiB (mha) of bf16
                out.append(("gqa", B, 32, 8, L, 128))
    for B, L in (((1, 16384), (16, 4096)) if quick else ((1, 4096), (1, 32768), (16, 4096), (64, 2048))):
        out.append(("mha", B, 32, 32, L, 128))
    for B, L in (((16, 4096),) if quick else ((4, 16384), (16, 4096), (64, 2048))):
        out.append(("gqa-leftpad", B, 32, 8, L, 128))
    return out


class Inputs:
    """One shape's tensors: q (B, 1, H_q, D); the cache dense (B, L, H_kv, D), in SDPA's layout
    (B, H_kv, L, D), and paged (B * L / PAGE shuffled pages) with its block table. Left-padded
    (kind "gqa-leftpad"): pad (B,) int32, row b's first key, and mask (B, 1, 1, L) bool; else None."""

    def __init__(self, kind, B, Hq, Hkv, L, D, cfg: BenchConfig):
        g = torch.Generator(device=cfg.device).manual_seed(B * 7919 + L)
        kw = dict(device=cfg.device, dtype=cfg.dtype, generator=g)
        self.q = torch.randn(B, 1, Hq, D, **kw)
        self.k, self.v = torch.randn(B, L, Hkv, D, **kw), torch.randn(B, L, Hkv, D, **kw)
        self.k_sdpa, self.v_sdpa = self.k.transpose(1, 2).contiguous(), self.v.transpose(1, 2).contiguous()
        self.lens = torch.full((B,), L, dtype=torch.int32, device=cfg.device)
        pages = -(-L // PAGE)
        order = torch.randperm(B * pages, generator=torch.Generator().manual_seed(L)).to(cfg.device)
        self.table = order.view(B, pages).to(torch.int32)
        kp = torch.zeros(B * pages, PAGE, Hkv, D, device=cfg.device, dtype=cfg.dtype)
        vp = torch.zeros_like(kp)
        pad = pages * PAGE - L
        kp[order] = F.pad(self.k, (0, 0, 0, 0, 0, pad)).view(B * pages, PAGE, Hkv, D)
        vp[order] = F.pad(self.v, (0, 0, 0, 0, 0, pad)).view(B * pages, PAGE, Hkv, D)
        self.k_pages, self.v_pages = kp, vp
        self.pad = self.mask = None
        self.keys = B * L  # keys read
        if kind.endswith("leftpad"):
            self.pad = (torch.arange(B, device=cfg.device) * L // (2 * B)).to(torch.int32)
            self.mask = (torch.arange(L, device=cfg.device) >= self.pad[:, None])[:, None, None, :]
            self.keys = B * L - int(self.pad.sum())

    def reference(self):
        q = self.q.float().transpose(1, 2)
        return F.scaled_dot_product_attention(q, self.k_sdpa.float(), self.v_sdpa.float(), attn_mask=self.mask,
                                              enable_gqa=True).transpose(1, 2)


def _fma_kernel(fn):
    """fn with the cuda backend's decoding kernel forced to its FMA variant (csrc/kvcache.cu reads
    TFKERNELS_CUDA_DECODE at every launch; a CUDA graph keeps the kernel it captured)."""
    def call(x):
        os.environ["TFKERNELS_CUDA_DECODE"] = "fma"
        try:
            return fn(x)
        finally:
            os.environ.pop("TFKERNELS_CUDA_DECODE", None)
    return call


def providers(cfg: BenchConfig) -> dict:
    """name -> fn(inputs) -> out (B, 1, H_q, D); an Unavailable says why one is skipped."""
    import tfkernels

    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    out = {}
    if cfg.cuda or interp:
        out["tfkernels-triton"] = lambda x: tfkernels.kvcache_attention(x.q, x.k, x.v, x.lens, cache_leftpad=x.pad,
                                                                        backend="triton")
        out["tfkernels-triton-nosplit"] = lambda x: tfkernels.kvcache_attention(
            x.q, x.k, x.v, x.lens, cache_leftpad=x.pad, num_splits=1, backend="triton")
        out["tfkernels-triton-paged"] = lambda x: tfkernels.kvcache_attention(
            x.q, x.k_pages, x.v_pages, x.lens, block_table=x.table, cache_leftpad=x.pad, backend="triton")
        out["tfkernels-attention"] = lambda x: tfkernels.attention(
            x.q.transpose(1, 2), x.k_sdpa, x.v_sdpa, attn_mask=x.mask, enable_gqa=True, backend="triton").transpose(1, 2)
    else:
        for name in ("tfkernels-triton", "tfkernels-triton-nosplit", "tfkernels-triton-paged", "tfkernels-attention"):
            out[name] = Unavailable("Triton on CPU needs TRITON_INTERPRET=1")
    if cfg.cuda:
        out["tfkernels-cuda"] = lambda x: tfkernels.kvcache_attention(x.q, x.k, x.v, x.lens, cache_leftpad=x.pad,
                                                                      backend="cuda")
        out["tfkernels-cuda-paged"] = lambda x: tfkernels.kvcache_attention(
            x.q, x.k_pages, x.v_pages, x.lens, block_table=x.table, cache_leftpad=x.pad, backend="cuda")
        out["tfkernels-cuda-fma"] = _fma_kernel(out["tfkernels-cuda"])
    else:
        for name in ("tfkernels-cuda", "tfkernels-cuda-paged", "tfkernels-cuda-fma"):
            out[name] = Unavailable("the CUDA C++ backend needs a GPU")
    out["sdpa"] = lambda x: F.scaled_dot_product_attention(x.q.transpose(1, 2), x.k_sdpa, x.v_sdpa, attn_mask=x.mask,
                                                           enable_gqa=True).transpose(1, 2)
    try:
        if not cfg.cuda:
            raise ImportError("needs a GPU")
        from flash_attn import flash_attn_with_kvcache

        out["flash-attn-2"] = lambda x: flash_attn_with_kvcache(x.q, x.k, x.v, cache_seqlens=x.lens,
                                                                cache_leftpad=x.pad)
    except ImportError as err:
        out["flash-attn-2"] = Unavailable(f"flash_attn: {_util.short(err, 80)}")
    return out


def run(cfg: BenchConfig, log=print) -> list[dict]:
    rows = []
    provs = providers(cfg)
    for name, fn in provs.items():
        if isinstance(fn, Unavailable):
            log(f"  {name}: skipped ({fn})")
    for kind, B, Hq, Hkv, L, D in configs(cfg.quick, cfg.smoke):
        if cfg.out_of_time():
            log("  out of time budget: no more shapes")
            break
        keys = dict(kind=kind, B=B, Hq=Hq, Hkv=Hkv, L=L, D=D)
        try:
            x = Inputs(kind, B, Hq, Hkv, L, D, cfg)
        except Exception as e:  # noqa: BLE001 — an OOM at the largest shapes is a row
            rows.append(dict(keys, provider="-", status="oom" if _util.is_oom(e) else "failed", note=_util.short(e)))
            continue
        ref = x.reference()
        base = _util.rel_err(provs["sdpa"](x), ref)  # the dtype's own error, as the tolerance's base
        tol = _util.tolerance(cfg.dtype, base)
        nbytes = 2 * x.keys * Hkv * D * x.k.element_size()  # the keys read (not the padding)
        for name, fn in provs.items():
            if isinstance(fn, Unavailable) or name in cfg.skip:
                continue
            tag = f"{kind} B={B:<3d} L={L:<6d} {name:26s}"
            try:
                with torch.no_grad():
                    err = _util.rel_err(fn(x), ref)
                    if not err <= tol:
                        log(f"  {tag} FAILED correctness (rel err {err:.2e} > tol {tol:.2e})")
                        rows.append(dict(keys, provider=name, status="failed", err=err, tol=tol))
                        continue
                    t = _util.bench(lambda: fn(x), cfg)
                gbs = nbytes / (t.ms * 1e-3) / 1e9
                row = dict(keys, provider=name, status="ok", err=err, tol=tol, ms=t.ms, ms_p20=t.ms_p20,
                           ms_p80=t.ms_p80, GBps=gbs, bytes=nbytes)
                rows.append(row)
                log(f"  {tag} {t.ms * 1e3:9.1f} us {gbs:8.1f} GB/s" + _device_time(row, fn, x, cfg))
            except Exception as e:  # noqa: BLE001 — recorded, the other providers still run
                status = "oom" if _util.is_oom(e) else "failed"
                rows.append(dict(keys, provider=name, status=status, note=_util.short(e)))
                log(f"  {tag} {status}: {_util.short(e)}")
        del x
        _util.empty_cache(cfg)
    return rows


def _device_time(row: dict, fn, x, cfg: BenchConfig) -> str:
    """The call replayed from a CUDA graph (`_util.bench_device`: no host work in it) into row's
    ms_graph, or graph_note when it cannot be captured; the text for the log line."""
    if not cfg.cuda:
        return ""
    try:
        with torch.no_grad():
            t = _util.bench_device(lambda: fn(x), cfg)
    except Exception as e:  # noqa: BLE001 -- recorded; the do_bench time stands
        row["graph_note"] = _util.short(e)
        torch.cuda.synchronize()
        return "  (graph: not captured)"
    row["ms_graph"] = t.ms
    return f"  (graph {t.ms * 1e3:.1f} us)"


def table(rows: list[dict], info: dict, dtype_name: str) -> str:
    lines = [f"# Decoding against a KV cache, {info.get('gpu')}", "",
             "Environment: " + ", ".join(f"{k} {info[k]}" for k in ("gpu", "driver", "cuda", "torch", "triton", "commit")
                                         if k in info), "",
             f"`python -m benchmarks.bench_decode`: {dtype_name}, T_q = 1, D = 128, every cache full to L keys "
             "(gqa-leftpad: from row b's first key, b * L / (2 B)); time (median, microseconds) and the cache's "
             "bytes read per second (K and V, the padding not counted). graph us: the same call replayed from a "
             "CUDA graph (device time alone, no host work; L2 not flushed): far below us, the call's time is "
             "its host side.", "",
             "| heads | B | L | provider | us | graph us | GB/s | vs sdpa | status |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    sdpa = {(r["kind"], r["B"], r["L"]): r["ms"] for r in rows if r["provider"] == "sdpa" and r["status"] == "ok"}
    for r in sorted(rows, key=lambda r: (r["kind"], r["B"], r["L"], r["provider"])):
        ok = r["status"] == "ok"
        base = sdpa.get((r["kind"], r["B"], r["L"]))
        speed = f"{base / r['ms']:.2f}x" if ok and base else ""
        heads = f"{r['Hq']}/{r['Hkv']}" + (" left-padded" if r["kind"].endswith("leftpad") else "")
        graph = (_util.fmt(r["ms_graph"] * 1e3) if r.get("ms_graph") is not None
                 else "not captured" if r.get("graph_note") else "")
        lines.append(f"| {heads} | {r['B']} | {r['L']} | {r['provider']} | {_util.fmt(r['ms'] * 1e3) if ok else ''} "
                     f"| {graph} | {_util.fmt(r['GBps']) if ok else ''} | {speed} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return _masked.main(argv, __doc__, run, table, "decode.md", "decode.json")


if __name__ == "__main__":
    sys.exit(main())
