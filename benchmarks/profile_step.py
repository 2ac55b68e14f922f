"""Where a training step's time goes: torch.profiler over a few steps of the trainer, per kernel.

    python benchmarks/profile_step.py --out /tmp/prof                 # gpt2-124m, B=16, T=1024, bf16
    python benchmarks/profile_step.py --out /tmp/prof --only tfkernels --trace

Written after the first H100 run, where the GPT-2 124M step was slower on tfkernels than on plain
PyTorch (180k against 272k tokens/s eager) with kernels that the suite times as faster (attention)
or slower (the norms' backwards at short rows): the kernel tables alone cannot say which calls of
the step cost the difference, nor whether the GPU waits on the host. For each of `torch` and
`tfkernels` (eager; `--compile` for both compiled) this trains `--warmup` steps, then profiles
`--steps` more and writes OUT/profile-<run>.txt:

- per step: wall time, device (kernel) time, and their ratio, the GPU's busy share: well under 100%
  means the step waits on the host (Python overhead, launches, a synchronisation);
- the top kernels by device time, and the top operators by host (CPU) time, per step;
- the tfkernels operators' host time per call (`tfkernels::*`), the launch overhead to cut;
- the host-device synchronisations per step (CUDA only: `torch.cuda.set_sync_debug_mode("warn")`
  over the profiled steps), by the source line that made them: one inside a layer turns the host's
  time into GPU idle time, which a kernel table cannot show.

`--trace` also writes the Chrome trace (tens of MB at gpt2-124m). On CPU (no GPU) it runs the same
code with CPU activity only: a check of the script, with `--preset tiny`.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import env_info  # noqa: E402
from tfkernels.train import TrainConfig, train  # noqa: E402


def _device_us(evt) -> float:
    """An event's self device time in us (torch renamed cuda_* to device_* in 2.4)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def _is_kernel(evt) -> bool:
    kind = getattr(evt, "device_type", None)
    return kind is not None and str(kind).endswith(("CUDA", "PrivateUse1")) and _device_us(evt) > 0


def sync_report(records, steps: int) -> list[str]:
    """Lines for the synchronising calls among warnings `records` (None: not measured)."""
    if records is None:
        return ["", "## host-device synchronisations: not measured (no CUDA)"]
    syncs = [w for w in records if "synchroniz" in str(w.message).lower()]
    where: dict = {}
    for w in syncs:
        key = f"{w.filename}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    lines = ["", f"## host-device synchronisations: {len(syncs) / steps:.1f} per step", ""]
    for key, n in sorted(where.items(), key=lambda kv: -kv[1]):
        lines.append(f"{n / steps:6.1f}x  {key}")
    return lines


def summarize(events, steps: int, wall_s: float, name: str, top: int = 25, syncs=None) -> str:
    """The text report of one run from profiler key averages (`events`) over `steps` steps."""
    kernels = sorted((e for e in events if _is_kernel(e)), key=_device_us, reverse=True)
    device_ms = sum(_device_us(e) for e in kernels) / 1e3 / steps
    wall_ms = wall_s * 1e3 / steps
    host = sorted((e for e in events if not _is_kernel(e) and e.self_cpu_time_total > 0),
                  key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = [f"# {name}: {steps} profiled steps", "",
             f"wall {wall_ms:.2f} ms/step, kernels {device_ms:.2f} ms/step, GPU busy "
             + (f"{100 * device_ms / wall_ms:.0f}%" if device_ms else "n/a (no device activity)"), "",
             f"## top {top} kernels by device time (ms per step, calls per step)", ""]
    for e in kernels[:top]:
        lines.append(f"{_device_us(e) / 1e3 / steps:9.3f} ms  {e.count / steps:6.1f}x  {e.key[:110]}")
    lines += ["", f"## top {top} operators by host self time (ms per step, calls per step)", ""]
    for e in host[:top]:
        lines.append(f"{e.self_cpu_time_total / 1e3 / steps:9.3f} ms  {e.count / steps:6.1f}x  {e.key[:110]}")
    ours = [e for e in events if e.key.startswith("tfkernels::")]
    if ours:
        lines += ["", "## tfkernels operators: host time per call (us, total incl. children)", ""]
        for e in sorted(ours, key=lambda e: e.cpu_time_total, reverse=True):
            lines.append(f"{e.cpu_time_total / max(e.count, 1):9.1f} us  {e.count / steps:6.1f}x  {e.key}")
    lines += sync_report(syncs, steps)
    return "\n".join(lines) + "\n"


def profile_run(kernels: str, args, out: Path) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities)
    state = {"t0": None}
    last = args.warmup + args.steps
    cuda = torch.cuda.is_available()
    catcher = warnings.catch_warnings(record=True)

    def on_step(step, _loss):
        # on_step runs after optimizer step `step` (1-based): the profile spans steps warmup + 1 .. last
        if step == args.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.start()
            if cuda:  # every synchronising call of the profiled steps becomes a recorded warning
                state["syncs"] = catcher.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            state["t0"] = time.perf_counter()
        elif step == last:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
                catcher.__exit__(None, None, None)
                torch.cuda.synchronize()
            state["wall"] = time.perf_counter() - state["t0"]
            prof.stop()

    name = kernels + ("+compile" if args.compile else "")
    cfg = TrainConfig(model="gpt", preset=args.preset, kernels=kernels, backend=args.backend, compile=args.compile,
                      # one step past the profile: the trainer evaluates after its last step, before on_step
                      data="random", max_steps=last + 1, batch_size=args.batch_size, block_size=args.block_size,
                      precision=args.precision, device=args.device, out=str(out / "runs" / name), eval_interval=0,
                      eval_steps=1, log_interval=10**6, save=False, plot=False, tensorboard=False, progress=False)
    torch._dynamo.reset()
    train(cfg, on_step=on_step)
    if "wall" not in state:
        raise RuntimeError(f"{name}: the profiled steps did not run (warmup {args.warmup}, steps {args.steps})")
    text = summarize(prof.key_averages(), args.steps, state["wall"], name, args.top, state.get("syncs"))
    (out / f"profile-{name}.txt").write_text(text)
    if args.trace:
        prof.export_chrome_trace(str(out / f"trace-{name}.json"))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for profile-<run>.txt (and trace-<run>.json)")
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--precision", default="auto")
    p.add_argument("--backend", default=None, help="tfkernels backend (default automatic)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="profile the torch.compile'd step (both runs)")
    p.add_argument("--warmup", type=int, default=5, help="steps before the profile (compile, allocator, autotune)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--only", default="torch,tfkernels", help="comma list of kernels settings: torch, tfkernels")
    p.add_argument("--trace", action="store_true", help="also write the Chrome trace")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    runs = [k.strip() for k in args.only.split(",") if k.strip()]
    if not runs or any(k not in ("torch", "tfkernels") for k in runs):
        p.error(f"--only: expected a comma list of torch, tfkernels; got {args.only!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = env_info("cuda" if torch.cuda.is_available() else "cpu")
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    for kernels in runs:
        print(profile_run(kernels, args, out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
