"""Outputs of a run: results.csv, results.json, summary.md, and one PNG per sweep
(norms.png, attention.png, attention_memory.png); and `--compare OLD.json`.

Every row carries the environment (GPU, driver, CUDA, torch, triton, commit); results.json also
holds the environment once at the top, the measured copy bandwidth and the skip notes.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ._util import fmt

ENV_KEYS = ("gpu", "driver", "cuda", "torch", "triton", "commit", "date")
ROW_KEYS = ("suite", "op", "provider", "pass", "dtype", "shape", "M", "N", "B", "H", "T", "D", "causal",
            "metric", "value", "value_p20", "value_p80", "pct_copy", "ms", "ms_p20", "ms_p80", "bytes",
            "flops", "err", "tol", "status", "note")
KEY = ("suite", "op", "provider", "pass", "dtype", "shape", "causal")
TFK = "tfkernels-triton"


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def stamp(rows, env):
    return [{**{k: env.get(k) for k in ENV_KEYS}, **r} for r in rows]


def write_all(out: Path, result: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    paths = [out / "results.json", out / "results.csv", out / "summary.md"]
    with open(paths[0], "w") as f:
        json.dump({**result, "rows": [{k: _clean(v) for k, v in r.items()} for r in rows]}, f, indent=1, default=str)
    keys = list(ENV_KEYS) + [k for k in ROW_KEYS]
    keys += sorted({k for r in rows for k in r} - set(keys))
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    paths[2].write_text(summary_md(result))
    paths += plot_all(out, result)
    return paths


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, title):
    """Title, lay out, write and close a figure; returns its path."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _attn_combo(r: dict) -> tuple:
    """An attention table's key: (GQA group, D, causal); group 1 is MHA (rows before GQA had no H_kv)."""
    return (r["H"] // r.get("Hkv", r["H"]), r["D"], r["causal"])


def _attn_title(combo: tuple, sep: str = " ") -> str:
    group, D, causal = combo
    return sep.join([f"D={D}", "causal" if causal else "non-causal"] + ([f"GQA {group}:1"] if group > 1 else []))


def _lines(ax, rows, logy=False):
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (p != TFK, p))
    for p in providers:
        pts = sorted((r["x"], r["value"]) for r in rows if r["provider"] == p and r["status"] == "ok"
                     and isinstance(r.get("value"), (int, float)))
        if pts:
            style = dict(lw=2.2, marker="o") if p.startswith("tfkernels") else dict(lw=1.2, marker=".")
            ax.plot([x for x, _ in pts], [y for _, y in pts], label=p, **style)
        ooms = sorted({r["x"] for r in rows if r["provider"] == p and r["status"] == "oom"})
        for x in ooms:
            ax.annotate("oom", (x, 1), xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=7,
                        color="red")
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)


def plot_all(out: Path, result: dict) -> list[Path]:
    plt = _plt()
    env, rows = result["env"], result["rows"]
    title_env = f"{env['gpu']} | {result['config']['dtype']} | torch {env['torch']} | triton {env['triton']} | {env['commit']}"
    paths = []

    norms = [r for r in rows if r["suite"] == "norms"]
    if norms:
        ops = [o for o in ("layer_norm", "rms_norm", "softmax") if any(r["op"] == o for r in norms)]
        fig, axes = plt.subplots(len(ops), 2, figsize=(12, 3.6 * len(ops)), squeeze=False)
        for i, op in enumerate(ops):
            for j, pass_ in enumerate(("fwd", "bwd")):
                ax = axes[i][j]
                _lines(ax, [r for r in norms if r["op"] == op and r["pass"] == pass_])
                if result.get("copy_GBps"):
                    ax.axhline(result["copy_GBps"], ls="--", color="gray", lw=1, label="copy bandwidth")
                ax.set_title(f"{op} {pass_} (M={norms[0]['M']})")
                ax.set_xlabel("N")
                ax.set_ylabel("GB/s")
                ax.legend(fontsize=7)
        paths.append(_save(fig, out / "norms.png", title_env))

    attn = [r for r in rows if r["suite"] == "attention"]
    if attn:
        combos = sorted({_attn_combo(r) for r in attn})
        fig, axes = plt.subplots(len(combos), 3, figsize=(15, 3.6 * len(combos)), squeeze=False)
        for i, combo in enumerate(combos):
            for j, pass_ in enumerate(("fwd", "bwd", "fwd+bwd")):
                ax = axes[i][j]
                _lines(ax, [r for r in attn if _attn_combo(r) == combo and r["pass"] == pass_])
                ax.set_title(f"{_attn_title(combo)} {pass_}")
                ax.set_xlabel("T (B*T fixed)")
                ax.set_ylabel("TFLOP/s")
                ax.legend(fontsize=7)
        paths.append(_save(fig, out / "attention.png", title_env))

        mem = [r for r in attn if r["pass"] == "mem"]
        if mem:
            fig, axes = plt.subplots(1, len(combos), figsize=(4.5 * len(combos), 3.8), squeeze=False)
            for j, combo in enumerate(combos):
                ax = axes[0][j]
                _lines(ax, [r for r in mem if _attn_combo(r) == combo], logy=True)
                ax.set_title(f"peak memory fwd+bwd, {_attn_title(combo)}", fontsize=9)
                ax.set_xlabel("T (B*T fixed)")
                ax.set_ylabel("MiB")
                ax.legend(fontsize=7)
            paths.append(_save(fig, out / "attention_memory.png", title_env))
    return paths


# ----------------------------------------------------------------------------- markdown


def _table(rows, xname, cell, providers, speedup=True):
    xs = sorted({r["x"] for r in rows})
    head = f"| {xname} | " + " | ".join(providers) + (f" | {TFK} vs best other |" if speedup else " |")
    lines = [head, "|" + "---|" * (len(providers) + 1 + speedup)]
    for x in xs:
        by_p = {r["provider"]: r for r in rows if r["x"] == x}
        cells = [cell(by_p.get(p)) for p in providers]
        lines.append(f"| {x} | " + " | ".join(cells) + (f" | {_speedup(by_p)} |" if speedup else " |"))
    return "\n".join(lines)


def _graph_cell(r):
    """The CUDA-graph replay's GB/s (device time alone) and how much of the do_bench time it is."""
    if r is None or r["status"] != "ok":
        return "-" if r is None else r["status"]
    if r.get("value_graph") is None:
        return "not captured" if r.get("graph_note") else "-"
    return f"{fmt(r['value_graph'])} ({100 * r['ms_graph'] / r['ms']:.0f}%)"


def _speedup(by_p):
    mine = by_p.get(TFK)
    if not mine or mine["status"] != "ok":
        return "-"
    others = [r["value"] for p, r in by_p.items() if p != TFK and r["status"] == "ok"
              and not p.startswith("tfkernels")]
    if not others:
        return "-"
    if mine["metric"] == "MiB":
        return f"{min(others) / mine['value']:.2f}x less" if mine["value"] else "-"
    return f"{mine['value'] / max(others):.2f}x"


def _cell(r, pct=False):
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"]
    s = fmt(r.get("value"))
    if pct and r.get("pct_copy") is not None:
        s += f" ({r['pct_copy']:.0f}%)"
    return s


def _providers(rows):
    return sorted({r["provider"] for r in rows}, key=lambda p: (not p.startswith("tfkernels"), p))


def summary_md(result: dict) -> str:
    env, cfgd, rows = result["env"], result["config"], result["rows"]
    out = ["# tfkernels benchmark summary", ""]
    out.append(f"- GPU: **{env['gpu']}**, driver {env['driver']}, CUDA {env['cuda']}")
    out.append(f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}, commit `{env['commit']}`, {env['date']}")
    out.append(f"- mode: dtype {cfgd['dtype']}, " + ", ".join(k for k in ("quick", "smoke") if cfgd.get(k)) +
               f" (do_bench warmup {cfgd['warmup_ms']} ms, rep {cfgd['rep_ms']} ms; median, 20/80 quantiles in the CSV)")
    if result.get("copy_GBps"):
        out.append(f"- measured copy bandwidth: **{result['copy_GBps']:.0f} GB/s** "
                   f"(`dst.copy_(src)` of {result['copy_bytes'] / 2**20:.0f} MiB, bytes read + written)")
    out.append(f"- wall time: {result.get('wall_s', 0):.0f} s")
    out.append("")

    norms = [r for r in rows if r["suite"] == "norms"]
    if norms:
        out += ["## Softmax / LayerNorm / RMSNorm: GB/s (% of copy bandwidth)", ""]
        for op in ("layer_norm", "rms_norm", "softmax"):
            for pass_ in ("fwd", "bwd"):
                sel = [r for r in norms if r["op"] == op and r["pass"] == pass_]
                if sel:
                    out += [f"### {op} {pass_}, M = {sel[0]['M']}", "",
                            _table(sel, "N", lambda r: _cell(r, pct=True), _providers(sel)), ""]
        graphed = [r for r in norms if r.get("value_graph") is not None or r.get("graph_note")]
        if graphed:
            out += ["## Softmax / LayerNorm / RMSNorm: device time alone (CUDA graph replay)", "",
                    "GB/s of the same calls replayed from a CUDA graph (no host work; no L2 flush, so small N "
                    "may read from L2), and in brackets that time's share of the do_bench time above: "
                    "a small share means the call's host side, not its kernels, set the time above.", ""]
            for op in ("layer_norm", "rms_norm", "softmax"):
                for pass_ in ("fwd", "bwd"):
                    sel = [r for r in graphed if r["op"] == op and r["pass"] == pass_]
                    if sel:
                        out += [f"### {op} {pass_}, M = {sel[0]['M']}", "",
                                _table(sel, "N", _graph_cell, _providers(sel), speedup=False), ""]
            notes = sorted({(r["op"], r["provider"], r["graph_note"]) for r in graphed if r.get("graph_note")})
            out += [f"- `{op}/{p}` not captured: {n}" for op, p, n in notes] + ([""] if notes else [])

    attn = [r for r in rows if r["suite"] == "attention"]
    if attn:
        out += ["## Attention: TFLOP/s (B*T = %d, H*D = %d)" % (attn[0]["B"] * attn[0]["T"], attn[0]["H"] * attn[0]["D"]), ""]
        for combo in sorted({_attn_combo(r) for r in attn}):
            for pass_ in ("fwd", "bwd", "fwd+bwd"):
                sel = [r for r in attn if _attn_combo(r) == combo and r["pass"] == pass_]
                if sel:
                    out += [f"### {_attn_title(combo, ', ')}, {pass_}", "",
                            _table(sel, "T", _cell, _providers(sel)), ""]
        mem = [r for r in attn if r["pass"] == "mem"]
        if mem:
            out += ["## Attention: peak memory of forward+backward (MiB, inputs excluded)", ""]
            for combo in sorted({_attn_combo(r) for r in mem}):
                sel = [r for r in mem if _attn_combo(r) == combo]
                out += [f"### {_attn_title(combo, ', ')}", "",
                        _table(sel, "T", _cell, _providers(sel)), ""]

    e2e = [r for r in rows if r["suite"] == "e2e"]
    if e2e:
        out += ["## End to end: training step", "", "| model | provider | tokens/s | MFU | step ms | peak MiB | status |",
                "|---|---|---|---|---|---|---|"]
        for r in e2e:
            mfu = r.get("mfu")
            out.append(f"| {r['op']} {r['shape']} | {r['provider']} | {fmt(r.get('value'), 0)} | "
                       f"{fmt(100 * mfu, 1) + '%' if isinstance(mfu, (int, float)) else '-'} | {fmt(r.get('ms'), 1)} | "
                       f"{fmt(r.get('peak_mem_MiB'), 0)} | {r['status']} |")
        out.append("")

    bad = [r for r in rows if r["status"] not in ("ok",)]
    if bad:
        out += ["## Failed / out of memory", "", "| suite | op | provider | pass | shape | status | note |",
                "|---|---|---|---|---|---|---|"]
        for r in bad:
            out.append(f"| {r['suite']} | {r['op']} | {r['provider']} | {r['pass']} | {r['shape']}"
                       f"{' causal' if r.get('causal') else ''} | {r['status']} | {str(r.get('note', ''))[:120]} |")
        out.append("")
    if result.get("notes"):
        out += ["## Providers skipped", ""]
        out += [f"- `{k}`: {v}" for k, v in sorted(result["notes"].items())]
        out.append("")
    if result.get("compare_md"):
        out += [result["compare_md"], ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- compare


def compare(old_path, rows, threshold: float = 0.05) -> str:
    """Markdown table of new vs old for rows present and ok in both; ratio > 1 is better."""
    old = json.loads(Path(old_path).read_text())
    old_env = old.get("env", {})
    old_rows = {tuple(r.get(k) for k in KEY): r for r in old["rows"] if r.get("status") == "ok"}
    lines = [f"## Compared with {Path(old_path).name} (commit `{old_env.get('commit', '?')}`, {old_env.get('gpu', '?')})", "",
             "| suite | op | provider | pass | shape | old | new | unit | speedup | |", "|---|---|---|---|---|---|---|---|---|---|"]
    n_reg = n_imp = n = 0
    for r in rows:
        o = old_rows.get(tuple(r.get(k) for k in KEY))
        if o is None or r["status"] != "ok" or not o.get("value") or not r.get("value"):
            continue
        ratio = (o["value"] / r["value"]) if r["metric"] == "MiB" else (r["value"] / o["value"])
        n += 1
        flag = ""
        if ratio < 1 - threshold:
            flag, n_reg = "REGRESSION", n_reg + 1
        elif ratio > 1 + threshold:
            flag, n_imp = "faster", n_imp + 1
        lines.append(f"| {r['suite']} | {r['op']} | {r['provider']} | {r['pass']} | {r['shape']}"
                     f"{' causal' if r.get('causal') else ''} | {fmt(o['value'])} | {fmt(r['value'])} | {r['metric']} | "
                     f"{ratio:.2f}x | {flag} |")
    lines.insert(2, f"{n} rows matched: {n_imp} faster, {n_reg} regressions (threshold {threshold:.0%}; "
                    "for memory, speedup = old / new).\n")
    return "\n".join(lines)
