"""The benchmark suite's CPU smoke mode (tiny sizes, Triton interpreter, one rep): CI runs it so
the suite cannot rot. Numbers from here mean nothing; that every file is written and every provider
that can run on CPU produced a finite number means everything."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import DEVICE, kernel_backends

benchmarks = pytest.importorskip("benchmarks")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert benchmarks.main(["--smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_files_written(smoke_run):
    out, _ = smoke_run
    for name in ("results.csv", "results.json", "summary.md", "norms.png", "attention.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(list(out.iterdir())) <= 6  # few files: the GPU run brings back at most 8


def test_rows_finite_and_stamped(smoke_run):
    out, result = smoke_run
    rows = result["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok, "no provider ran"
    for r in ok:
        for key in ("gpu", "driver", "cuda", "torch", "triton", "commit"):
            assert r[key], key
        if r["pass"] == "mem":  # attention's peak-memory rows (on a GPU): MiB as the value, no time
            assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]) and r["value"] >= 0, r
            continue
        for key in ("value", "ms", "ms_p20", "ms_p80"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["provider"], key, r)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_expected_providers_ran(smoke_run):
    _, result = smoke_run
    ran = {(r["op"], r["provider"], r["pass"]) for r in result["rows"] if r["status"] == "ok"}
    for op in ("layer_norm", "rms_norm", "softmax"):
        for provider in ("tfkernels-triton", "torch", "torch.compile"):
            for pass_ in ("fwd", "bwd"):
                assert (op, provider, pass_) in ran, (op, provider, pass_, result["notes"])
    for pass_ in ("fwd", "bwd", "fwd+bwd"):
        assert ("attention", "sdpa-math", pass_) in ran
    import tfkernels

    if hasattr(tfkernels, "attention"):
        for pass_ in ("fwd", "bwd", "fwd+bwd"):
            assert ("attention", "tfkernels-triton", pass_) in ran, result["notes"]
        # the GQA configs: checked against SDPA on the first K/V head's group, and timed
        gqa = {(r["provider"], r["pass"]) for r in result["rows"]
               if r["suite"] == "attention" and r["status"] == "ok" and r["Hkv"] < r["H"]}
        assert {("tfkernels-triton", "fwd+bwd"), ("sdpa-math", "fwd+bwd")} <= gqa, gqa
    assert not [r for r in result["rows"] if r["status"] == "failed"], "a provider failed its correctness check"
    # a missing provider is a note, never an error
    assert any("flash-attn" in k for k in result["notes"])


def test_summary_and_compare(smoke_run):
    out, result = smoke_run
    summary = (out / "summary.md").read_text()
    assert "GB/s" in summary and "TFLOP/s" in summary and result["env"]["commit"] in summary
    assert "### D=32, causal, GQA 2:1, fwd+bwd" in summary and "### D=32, non-causal, fwd" in summary
    from benchmarks import report

    table = report.compare(out / "results.json", result["rows"], threshold=10.0)  # same run: nothing moves
    assert "0 regressions" in table and "| norms | layer_norm | tfkernels-triton | fwd |" in table


def test_summary_device_time_table():
    """The norms' CUDA-graph rows (GPU only, so built by hand here): GB/s and the graph time's share
    of the do_bench time, 'not captured' with the reason where capture failed, no table without them."""
    from benchmarks import report

    def row(provider, **extra):
        return dict(suite="norms", op="layer_norm", provider=provider, x=1024, N=1024, M=4096, status="ok",
                    metric="GB/s", value=70.0, pct_copy=2.3, ms=0.34, bytes=24_000_000, **{"pass": "bwd"}, **extra)

    env = dict(gpu="g", driver="d", cuda="c", torch="t", triton="tr", python="p", commit="abc", date="today")
    cfg = dict(dtype="bf16", warmup_ms=1, rep_ms=1)
    rows = [row("tfkernels-triton", ms_graph=0.017, value_graph=1411.8),
            row("torch.compile", graph_note="RuntimeError: operation not permitted when stream is capturing")]
    md = report.summary_md(dict(env=env, config=cfg, rows=rows))
    graph = md.split("device time alone (CUDA graph replay)")[1]
    assert "| 1024 | 1,412 (5%) | not captured |" in graph
    assert "`layer_norm/torch.compile` not captured: RuntimeError: operation not permitted" in graph
    assert "device time alone" not in report.summary_md(dict(env=env, config=cfg, rows=[row("torch")]))


def test_bad_only_is_rejected():
    with pytest.raises(SystemExit):
        benchmarks.main(["--smoke", "--only", "nope"])


def test_mistakes_rejected_before_the_sweep(tmp_path, capsys):
    """Options that used to fail only after the whole run (a GPU session's minutes), or never."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    not_results = tmp_path / "other.json"
    not_results.write_text('{"a": 1}')
    for argv, message in ((["--out", str(a_file)], "is a file"),
                          (["--compare", str(tmp_path / "missing.json")], "--compare"),
                          (["--compare", str(not_results)], "no 'rows'"),
                          (["--compare", str(a_file)], "--compare"),  # not JSON
                          (["--budget", "-5"], "--budget must be > 0"),
                          (["--rep", "0"], "--rep must be >= 1")):
        with pytest.raises(SystemExit) as exc:
            benchmarks.main(["--smoke", "--only", "softmax", "--out", str(tmp_path / "run"), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv
    # a misspelt provider would still have run
    assert benchmarks.main(["--smoke", "--only", "softmax", "--skip", "torch.compil", "--out", str(tmp_path / "r")]) == 2
    assert "--skip: unknown provider(s) torch.compil" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "r").exists()


def test_finetune_bench_smoke(tmp_path):
    """benchmarks/bench_finetune.py on CPU (tiny BERT classifier, 2 timed steps): both kernel sets
    time a step, the rows are stamped, and they start from the same loss (same weights, same data)."""
    from benchmarks import bench_finetune

    js, cs = tmp_path / "ft.json", tmp_path / "ft.csv"
    argv = ["--preset", "tiny", "--arch", "bert", "--batch", "4", "--seq", "32", "--steps", "2", "--warmup", "1",
            "--device", "cpu", "--json", str(js), "--csv", str(cs)]
    assert bench_finetune.main(argv) == 0
    rows = json.loads(js.read_text())["rows"]
    assert sorted(r["provider"] for r in rows) == ["tfkernels", "torch"]
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("ms", "ms_p20", "ms_p80", "samples_per_s", "tokens_per_s", "real_tokens_per_s", "flops_per_token"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["provider"], key, r)
        for key in ("gpu", "driver", "cuda", "torch", "triton", "commit"):
            assert r[key], key
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-4)
    with open(cs) as f:
        assert len(list(csv.DictReader(f))) == 2


def test_window_bench_smoke(tmp_path):
    """benchmarks/bench_window.py on CPU: the window and the full causal rows pass the correctness
    check against SDPA's dense mask and are timed; the table is written. The pair count is exact."""
    from benchmarks import bench_window
    from benchmarks._util import BenchConfig

    assert bench_window.pairs(5, 2) == 1 + 2 + 2 + 2 + 2 and bench_window.pairs(5, None) == 15
    assert int(bench_window.dense_mask(40, 8, "cpu").sum()) == bench_window.pairs(40, 8)
    cfg = BenchConfig(device=DEVICE, dtype=__import__("torch").float32, dtype_name="float32", quick=False, smoke=True,
                      warmup_ms=1, rep_ms=1)
    rows = bench_window.run(cfg, log=lambda *a: None)
    ok = {(r["provider"], r["T"], r["W"], r["pass"]) for r in rows if r["status"] == "ok"}
    assert all(r["status"] == "ok" for r in rows), rows
    for pass_ in ("fwd", "fwd+bwd"):
        assert ("tfkernels-triton", 48, 8, pass_) in ok and ("sdpa-mask", 48, 8, pass_) in ok
        assert ("tfkernels-triton-full", 48, None, pass_) in ok
    assert all(math.isfinite(r["tflops"]) and r["tflops"] > 0 for r in rows)
    md = bench_window.table(rows, {"gpu": "cpu"}, "float32")
    assert md.count("| tfkernels-triton |") == 1 and "| 48 | full | tfkernels-triton-full |" in md


def test_documents_bench_smoke(tmp_path):
    """benchmarks/bench_documents.py on CPU: every provider passes the correctness check against
    SDPA's dense mask and is timed; lengths fill the row; the pair count matches the dense mask."""
    from benchmarks import bench_documents as bd
    from benchmarks._util import BenchConfig

    for T, L in ((48, 16), (48, "mixed"), (4096, "mixed"), (100, 30), (48, None)):
        assert sum(bd.lengths(T, L)) == T and min(bd.lengths(T, L)) > 0
        assert int(bd.dense_mask(bd.document_ids(T, L, "cpu")).sum()) == bd.pairs(T, L)
    cfg = BenchConfig(device=DEVICE, dtype=__import__("torch").float32, dtype_name="float32", quick=False, smoke=True,
                      warmup_ms=1, rep_ms=1)
    rows = bd.run(cfg, log=lambda *a: None)
    assert rows and all(r["status"] == "ok" for r in rows), rows
    ok = {(r["provider"], r["T"], r["L"], r["pass"]) for r in rows}
    for pass_ in ("fwd", "fwd+bwd"):
        for name in ("tfkernels-triton", "tfkernels-triton-varlen", "tfkernels-triton-mask", "sdpa-mask"):
            assert (name, 48, 16, pass_) in ok and (name, 48, "mixed", pass_) in ok
        assert ("tfkernels-triton-full", 48, None, pass_) in ok
    md = bd.table(rows, {"gpu": "cpu"}, "float32")
    assert "| 48 | 16 | tfkernels-triton |" in md and "| 48 | full | tfkernels-triton-full |" in md


def test_decode_bench_smoke(tmp_path):
    """benchmarks/bench_decode.py on CPU: every kvcache provider (split, one pass, paged), the training
    kernel and SDPA pass the correctness check against fp32 math and are timed; the table is written."""
    from benchmarks import bench_decode

    assert bench_decode.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    names = {r["provider"] for r in rows}
    assert {"tfkernels-triton", "tfkernels-triton-nosplit", "tfkernels-triton-paged", "tfkernels-attention",
            "sdpa"} <= names
    assert all(r["status"] == "ok" and r["GBps"] > 0 for r in rows), rows
    md = (tmp_path / "decode.md").read_text()
    assert "| 4/2 | 2 | 40 | tfkernels-triton-paged |" in md
    assert "| 4/2 left-padded | 3 | 40 | tfkernels-triton |" in md  # cache_leftpad against the masked providers
    # the CUDA-graph column (GPU only): built from rows by hand
    row = dict(kind="gqa", B=1, Hq=32, Hkv=8, L=4096, D=128, status="ok", ms=0.414, GBps=40.5)
    md = bench_decode.table([dict(row, provider="tfkernels-triton", ms_graph=0.021),
                             dict(row, provider="tfkernels-cuda", graph_note="RuntimeError: capture")], {}, "bf16")
    assert "| 32/8 | 1 | 4096 | tfkernels-triton | 414 | 21.0 |" in md
    assert "| 32/8 | 1 | 4096 | tfkernels-cuda | 414 | not captured |" in md


@pytest.mark.skipif("cuda" not in kernel_backends(), reason="needs the cuda backend (built, or emulated on CPU)")
def test_head256_bench_smoke(tmp_path):
    """benchmarks/bench_head256.py on CPU (emulated cuda backend): both dK/dV variants (two launches,
    and one with TFKERNELS_CUDA_DKDV_PASSES=1) and Triton pass against SDPA in fp32 and are timed; the
    knob is restored afterwards."""
    import os

    from benchmarks import bench_head256

    assert bench_head256.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "head256.json").read_text())["rows"]
    ok = {(r["provider"], r["mode"], r["pass"]) for r in rows if r["status"] == "ok"}
    for name in ("tfkernels-cuda", "tfkernels-cuda-1launch", "tfkernels-triton"):
        for mode in ("", "causal"):
            assert {(name, mode, "fwd"), (name, mode, "fwd+bwd")} <= ok
    assert "TFKERNELS_CUDA_DKDV_PASSES" not in os.environ
    assert "| 40 | causal | tfkernels-cuda-1launch |" in (tmp_path / "head256.md").read_text()


def test_profile_step_smoke(tmp_path):
    """benchmarks/profile_step.py on CPU: a tiny GPT on the Triton kernels (interpreter) profiled for
    one step after one warm-up; the report names the tfkernels operators and their host time."""
    from benchmarks import profile_step

    assert profile_step.main(["--out", str(tmp_path), "--preset", "tiny", "--batch-size", "2", "--block-size", "16",
                              "--warmup", "1", "--steps", "1", "--only", "tfkernels", "--backend", "triton",
                              "--device", DEVICE]) == 0
    text = (tmp_path / "profile-tfkernels.txt").read_text()
    assert "1 profiled steps" in text and "ms/step" in text
    assert "tfkernels::attention_fwd" in text and "tfkernels::layer_norm_bwd" in text
    with pytest.raises(SystemExit):
        profile_step.main(["--out", str(tmp_path), "--only", "jax"])
    # the synchronisation report: per step, by source line (on CPU "not measured")
    assert ("host-device synchronisations: not measured" in text) != torch.cuda.is_available()
    import warnings

    recs = [warnings.WarningMessage("called a synchronizing CUDA operation", UserWarning, f, n)
            for f, n in (("a.py", 3), ("a.py", 3), ("b.py", 9), ("a.py", 3))] + [
        warnings.WarningMessage("something else", UserWarning, "c.py", 1)]
    lines = profile_step.sync_report(recs, steps=2)
    assert lines[1] == "## host-device synchronisations: 2.0 per step"
    assert lines[3:] == ["   1.5x  a.py:3", "   0.5x  b.py:9"]


def test_host_overhead_smoke():
    """benchmarks/host_overhead.py (in its own process: it patches every Triton launch to a no-op)
    prints a row per call with finite positive times."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--calls", "20"], capture_output=True,
                          text=True, timeout=600, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "host us" not in line]
    assert len(rows) == 16 and all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows), proc.stdout


def test_bench_train_ablation(tmp_path):
    """bench_train --ablate: tfkernels-norms builds the GPT with the fused norms and SDPA's attention,
    tfkernels-attention with torch's norms and the fused attention; both run and are tabled (CPU,
    tiny preset, a few steps, eager only)."""
    from benchmarks import bench_train
    import tfkernels.model as M
    import tfkernels.nn as tnn

    cfg = M.make_config("gpt", "tiny", kernels="tfkernels", n_layer=1, n_head=2, n_embd=32, block_size=16,
                        vocab_size=64)
    with bench_train.only_half("norms"):
        assert isinstance(M.build_model(cfg).transformer.ln_f, tnn.LayerNorm)
        assert M.tf_attention is not tfkernels_attention()
    with bench_train.only_half("attention"):
        assert type(M.build_model(cfg).transformer.ln_f) is torch.nn.LayerNorm
        assert M.tf_attention is tfkernels_attention()
    assert M.tf_attention is tfkernels_attention() and M.make_norm.__name__ == "make_norm"
    bench_train.main(["--out", str(tmp_path), "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--block-size",
                      "16", "--device", "cpu", "--ablate", "--only", "torch,tfkernels-norms,tfkernels-attention"])
    table = (tmp_path / "bench_train.md").read_text()
    for name in ("torch", "tfkernels-norms", "tfkernels-attention"):
        assert f"| {name} | " in table and f"| {name} | failed" not in table, table


def tfkernels_attention():
    import tfkernels

    return tfkernels.attention
