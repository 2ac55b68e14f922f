"""The pretraining loop (GPT causal LM, BERT masked LM with optional next-sentence prediction).

    from tfkernels.train import TrainConfig, train
    summary = train(TrainConfig(model="gpt", preset="tiny", max_steps=200, out="runs/tiny"))

One process = one device; under `torchrun` each process takes one GPU (or CPU with gloo) and the
model is wrapped in DistributedDataParallel. Mixed precision: bf16 autocast on GPU (fp16 with a
GradScaler by `precision="fp16"`), fp32 on CPU. AdamW (fused on CUDA) with weight decay on matmul
weights only; warmup + cosine, warmup-stable-decay (WSD) or constant LR; gradient clipping.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import _config
from ..model import ModelConfig, build_model, flops_per_token, make_config
from . import checkpoint as ckpt_io
from .data import LMLoader, MLMLoader, RandomLoader, check_bert_block_size, prepare
from .metrics import MetricsLog, peak_flops, plot_loss
from .tokenizer import EOS

DEFAULT_LR = {"tiny": 2e-3, "gpt2-124m": 6e-4, "bert-base": 1e-4}


def flag(name: str) -> str:
    """The command-line flag of a config field (block_size -> --block-size): errors name what users type."""
    return "--" + name.replace("_", "-")


# Allowed values of the numeric options, as (test, description); None (unset: the preset's value or
# the default) is always allowed. Checked up front, so that a bad value is one clear error instead of
# a crash deep in the model or the loop, or a silently meaningless run (eval_steps=0 reported val_loss 0).
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
RANGES = {
    **dict.fromkeys(("max_steps", "batch_size", "grad_accum", "eval_steps", "log_interval", "max_bytes",
                     "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head"), AT_LEAST_1),
    **dict.fromkeys(("eval_interval", "ckpt_interval", "warmup_steps", "weight_decay", "grad_clip"), AT_LEAST_0),
    "lr": (lambda v: v > 0, "> 0"),
    "val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "mlm_prob": (lambda v: 0 < v <= 1, "in (0, 1]"),
    **dict.fromkeys(("dropout", "beta1", "beta2"), (lambda v: 0 <= v < 1, "in [0, 1)")),
    **dict.fromkeys(("min_lr_ratio", "decay_frac"), (lambda v: 0 <= v <= 1, "in [0, 1]")),
}


def check_ranges(cfg, ranges: dict) -> None:
    """ValueError naming the flag of the first field of `cfg` outside its range (fields it lacks are skipped)."""
    for name, (ok, what) in ranges.items():
        v = getattr(cfg, name, None)
        if v is None:
            continue
        try:
            good = not isinstance(v, bool) and ok(v)
        except TypeError:  # a string from a config file
            good = False
        if not good:
            raise ValueError(f"{flag(name)} must be {what}, got {v!r}")


def resolve_device(spec: str) -> torch.device:
    """--device: auto (cuda when available, else cpu), cpu, cuda, cuda:N, ...; one clear error for a
    device this torch cannot use (torch itself fails later with an AssertionError traceback)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {spec!r}: {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {spec}: {why}; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """While training: the first SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers send before they
    kill a job: SLURM preemption, Kubernetes, torchrun tearing down its workers) only sets `requested`
    and records `signum`; the loop checks it between whole steps, so it stops after the step in
    progress, saves and returns. A second Ctrl-C raises KeyboardInterrupt at once (a person who wants
    out now); a repeated SIGTERM is ignored: a scheduler signals every process of a job, and torchrun
    forwards the one it gets, so a worker can get two within milliseconds, and the save is the point
    (the scheduler kills the job after its grace period anyway). A KeyboardInterrupt raised wherever the signal
    happened to land could fall between the optimizer update and the bookkeeping of its step, and the
    checkpoint then held updated weights with the previous step's position: resuming applied that step
    twice. Installed in the main thread only (signal handlers can only be set there, and only it gets
    signals); the previous handlers are restored on exit."""

    def __init__(self, on_first=None):
        self.requested, self.signum, self.on_first, self._previous = False, None, on_first, {}

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested, self.signum = True, signum
        if self.on_first is not None:
            self.on_first(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                previous = signal.signal(sig, self._handle)
                if previous is None:  # a handler not set from Python: restore the usual one
                    previous = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
                self._previous[sig] = previous
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        return False


StopOnCtrlC = StopOnSignal  # the name before SIGTERM was handled too


def interrupted_exit_code(summary: dict) -> int:
    """The exit status of a command whose run a signal stopped (saved, resumable, but not finished):
    128 + the signal's number, as a shell reports a process a signal ended, so that a scheduler sees the
    run did not finish: 130 after Ctrl-C (as before), 143 after SIGTERM (what SLURM, Kubernetes and
    torchrun send before they kill a job; a requeued / restarted job then continues with --resume)."""
    return 128 + (summary.get("stop_signal") or signal.SIGINT)


def run_command(run, cfg):
    """`run(cfg)` for a CLI command: (summary, None) when it finished, or (None, exit status) when a
    signal stopped it and it saved (`interrupted_exit_code`); a second Ctrl-C propagates as
    KeyboardInterrupt, which __main__ turns into 130."""
    summary = run(cfg)
    if summary["interrupted"]:
        return None, interrupted_exit_code(summary)
    return summary, None


# What a run writes into --out; --overwrite deletes these, not the whole directory (which may be `.`
# or hold the user's own files), so that nothing stale (a checkpoint of a run with save=False,
# TensorBoard events, a plot, another corpus's tokenizer) mixes with the new run.
RUN_FILES = ("ckpt.pt", "metrics.csv", "loss.png", "tokenizer.json", "confusion.png", "tb")


def check_out(cfg: "TrainConfig") -> Path:
    """--out must be a directory (or not exist yet); one that holds a run needs --resume or --overwrite."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a run directory (a new one, or a run to --resume)")
    if (out / "ckpt.pt").is_file() and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--out {out} already holds a run (ckpt.pt); pass --resume to continue it "
                         f"or --overwrite to start over")
    return out


def strict_from_dict(cls, d: dict, what: str):
    """cls(**d) for a config dataclass, naming unknown keys instead of a bare TypeError."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} option(s): {', '.join(unknown)}")
    return cls(**d)


@dataclass
class TrainConfig:
    # what to train
    model: str = "gpt"                   # "gpt" or "bert"
    preset: str = "tiny"                 # see tfkernels.model.PRESETS
    kernels: str = "tfkernels"           # "tfkernels" or "torch" (plain PyTorch, same parameters)
    backend: Optional[str] = None        # tfkernels backend; None = automatic ("torch" on CPU, logged)
    # model overrides (None = the preset's value)
    block_size: Optional[int] = None
    vocab_size: Optional[int] = None
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    n_kv_head: Optional[int] = None      # GPT: grouped-query attention's K/V heads (default n_head)
    dropout: Optional[float] = None
    norm: Optional[str] = None
    mlp: Optional[str] = None
    pos: Optional[str] = None
    nsp: Optional[bool] = None
    document_mask: bool = False          # GPT: attend only within each <|endoftext|>-delimited document
    # data
    data: str = "builtin"                # "builtin", a path, "hf:NAME[:CONFIG]" or "random"
    data_dir: Optional[str] = None       # default ~/.cache/tfkernels/data/<source>-<vocab>
    max_bytes: int = 4_000_000           # cap on corpus text (builtin and hf)
    val_fraction: float = 0.05
    shard_dtype: Optional[str] = None    # None = uint16 when the vocabulary fits, else uint32
    mlm_prob: float = 0.15
    # optimisation
    max_steps: int = 200
    batch_size: int = 16                 # sequences per micro-batch per process
    grad_accum: int = 1
    lr: Optional[float] = None           # None = DEFAULT_LR[preset]
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"             # "cosine", "wsd" or "constant" (all after linear warmup)
    warmup_steps: Optional[int] = None   # None = max_steps // 10, at most 1000
    decay_frac: float = 0.2              # WSD: the final fraction of steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0               # 0 = off
    precision: str = "auto"              # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16", "fp32"
    compile: bool = False
    seed: int = 1337
    device: str = "auto"
    # bookkeeping
    out: str = "runs/run"
    resume: bool = False
    overwrite: bool = False              # start over in an --out that holds a run (else that is an error)
    eval_interval: int = 100             # also at the last step; 0 = only at the last step
    eval_steps: int = 10
    log_interval: int = 10
    ckpt_interval: int = 0               # 0 = at the end (and on Ctrl-C) only
    save: bool = True                    # False = no checkpoints at all (benchmarks)
    tensorboard: bool = True
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        if self.model not in ("gpt", "bert"):
            raise ValueError(f"model={self.model!r}; expected 'gpt' or 'bert'")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"schedule={self.schedule!r}; expected 'cosine', 'wsd' or 'constant'")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision={self.precision!r}; expected 'auto', 'bf16', 'fp16' or 'fp32'")
        check_ranges(self, RANGES)
        if self.model == "gpt" and self.nsp:  # model_config() would drop it: say so instead of training without it
            raise ValueError("--nsp (next-sentence prediction) is a BERT option; --model gpt has no NSP head")
        if self.model == "bert" and self.document_mask:
            raise ValueError("--document-mask is a GPT option (it keeps attention inside each document packed into a "
                             "GPT sequence); --model bert does not support it")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite deletes it: pass one of them")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return strict_from_dict(cls, d, "training")

    def model_config(self, vocab_size: Optional[int] = None) -> ModelConfig:
        over = {k: getattr(self, k) for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head",
                                             "dropout", "norm", "mlp", "pos", "nsp", "kernels", "backend")}
        if self.model == "gpt":
            over.pop("nsp")
            # eos_id: the tokenizer's <|endoftext|>, which data.prepare puts after every document
            over.update(document_mask=self.document_mask, eos_id=EOS)
        if vocab_size is not None:
            over["vocab_size"] = vocab_size
        return make_config(self.model, self.preset, **over)


def lr_lambda(cfg: TrainConfig):
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, cfg.max_steps // 10)
    total, floor = cfg.max_steps, cfg.min_lr_ratio

    def f(step: int) -> float:  # step 0 is the first optimizer step
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "wsd":
            decay_start = int(total * (1 - cfg.decay_frac))
            if step < decay_start:
                return 1.0
            return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
        progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _forward(model, batch: dict, arch: str):
    """(loss, BertOutput or logits) for a batch already on the device."""
    if arch == "gpt":
        logits, loss = model(batch["idx"], batch["targets"])
        return loss, logits
    out = model(batch["input_ids"], batch.get("segment_ids"), batch.get("attention_mask"),
                batch["mlm_labels"], batch.get("nsp_labels"))
    return out.loss, out


@torch.no_grad()
def evaluate(model, loader, steps: int, arch: str, device, autocast) -> dict:
    """Validation loss and perplexity (GPT: LM loss; BERT: MLM loss per masked token over all the
    batches, not a mean of per-batch means, which weighs a batch with few masked tokens more), MLM
    and NSP accuracy."""
    if steps < 1:  # 0 batches would report loss 0 / perplexity 1, a perfect model
        raise ValueError(f"--eval-steps must be >= 1, got {steps}")
    was_training = model.training
    model.eval()
    tot_loss = n = mlm_hit = mlm_n = nsp_hit = nsp_n = 0
    for _ in range(steps):
        batch = {k: v.to(device) for k, v in next(loader).items()}
        with autocast():
            loss, out = _forward(model, batch, arch)
        if arch == "bert":
            sel = batch["mlm_labels"] != -100
            mlm_hit += (out.mlm_logits.argmax(-1)[sel] == batch["mlm_labels"][sel]).sum().item()
            mlm_n += sel.sum().item()
            tot_loss += out.mlm_loss_sum.item()
            if out.nsp_logits is not None:
                nsp_hit += (out.nsp_logits.argmax(-1) == batch["nsp_labels"]).sum().item()
                nsp_n += batch["nsp_labels"].numel()
        else:
            tot_loss += loss.item()
            n += 1
    model.train(was_training)
    val_loss = tot_loss / max(1, mlm_n if arch == "bert" else n)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
            "mlm_acc": mlm_hit / mlm_n if mlm_n else None, "nsp_acc": nsp_hit / nsp_n if nsp_n else None}


def make_loaders(cfg: TrainConfig, mcfg: ModelConfig, prepared, rank: int, world: int):
    """(train loader for this rank, a function making a fresh deterministic val loader)."""
    B, T = cfg.batch_size, mcfg.block_size
    if prepared is None:  # random tokens
        train_loader = RandomLoader(mcfg.arch, mcfg.vocab_size, T, B, seed=cfg.seed, rank=rank, world=world,
                                    nsp=mcfg.nsp)
        return train_loader, lambda: RandomLoader(mcfg.arch, mcfg.vocab_size, T, B, seed=cfg.seed + 7, nsp=mcfg.nsp)

    def loader(split, shuffle, seed, rank, world):
        tokens = prepared.tokens(split)
        if mcfg.arch == "gpt":
            return LMLoader(tokens, T, B, seed=seed, rank=rank, world=world, shuffle=shuffle)
        return MLMLoader(tokens, prepared.segments(split), T, B, prepared.vocab_size, cfg.mlm_prob, mcfg.nsp,
                         seed=seed, rank=rank, world=world, shuffle=shuffle)

    return loader("train", True, cfg.seed, rank, world), lambda: loader("val", False, cfg.seed + 7, 0, 1)


def restore_rank_state(resume: dict, train_loader, seed: int, rank: int, world: int, ckpt_path) -> None:
    """This rank's loader position and generator and its RNG states from a checkpoint.

    Checkpoints hold every rank's ("rank_states"; older ones rank 0's only, as "data" and "rng"). From
    a run with another number of processes the continuation cannot be exact: each rank takes the saved
    state of its own rank where there is one, else rank 0's data position with its own freshly seeded
    generator and RNG (taking rank 0's would give two ranks the same masks and dropout)."""
    states = resume.get("rank_states") or [{"data": resume["data"], "rng": resume["rng"]}]
    if len(states) != world and rank == 0:
        warnings.warn(f"{ckpt_path} holds the data and RNG states of {len(states)} process(es), this run has "
                      f"{world}: resuming from them, but not exactly where an uninterrupted run would be")
    if rank < len(states):
        train_loader.load_state_dict(states[rank]["data"])
        ckpt_io.set_rng_state(states[rank]["rng"])
        return
    data = dict(states[0]["data"])
    if "gen" in data:
        data["gen"] = train_loader.state_dict()["gen"]
    train_loader.load_state_dict(data)
    torch.manual_seed(seed + rank)


def masked_tokens_per_rank(batches: list, world: int, device) -> float:
    """What each rank divides its micro-batches' summed MLM token losses by, so that the step's gradient
    is that of the mean over every masked token of the step, all micro-batches of all ranks together.

    Averaging each micro-batch's own mean instead weighs a masked token of a micro-batch with few of
    them more (the "gradient accumulation bug"): grad_accum=2 with batch B took a different step from
    grad_accum=1 with batch 2B. The count is all-reduced once per step; DDP then averages the gradients
    over the ranks (divides their sum by world), so each rank divides by count / world. A step without
    masked tokens divides by 1: its MLM loss is 0, as for one batch without any (not 0/0 = nan)."""
    count = sum(int((b["mlm_labels"] != -100).sum()) for b in batches)  # on the CPU: no device sync
    if world > 1:
        total = torch.tensor(count, dtype=torch.int64, device=device)
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        count = int(total.item())
    return max(count, 1) / world


def _log0(msg: str, rank: int) -> None:
    if rank == 0:
        from tqdm import tqdm
        tqdm.write(msg)


def ddp_cuda_device(local_rank: int) -> torch.device:
    """This process's GPU under torchrun: one per local rank. More processes than GPUs is an error
    that says so (CUDA's own, from set_device, is "invalid device ordinal")."""
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise ValueError(f"DDP: local rank {local_rank} needs GPU {local_rank}, but {n} CUDA device(s) are visible: "
                         f"start at most {n} processes per node (--nproc_per_node), or pass --device cpu (gloo)")
    return torch.device("cuda", local_rank)


def train(cfg: TrainConfig, on_step: Optional[Callable[[int, float], None]] = None, task=None) -> dict:
    """Run (or resume) a pretraining run; returns a summary (losses per step, last eval, throughput).

    `on_step(step, loss)` is called after every optimizer step; a KeyboardInterrupt it raises stops the
    run like Ctrl-C (tests use it; under DDP it must raise on every rank at the same step).
    Ctrl-C (SIGINT) or SIGTERM stops after the step in progress, saves a checkpoint there and returns
    with summary["interrupted"] = True and summary["stop_signal"] = the signal's number (SIGINT for a
    stop requested by on_step; under DDP, SIGTERM if any rank got one); a second Ctrl-C raises
    KeyboardInterrupt at once, without saving; a repeated SIGTERM is ignored (see StopOnSignal).

    `task` (optional) replaces the pretraining objective while keeping everything else (fine-tuning,
    see finetune.py). It provides: model_config(cfg), tokenizer_path, build(mcfg, resumed) -> model,
    loaders(cfg, mcfg, rank, world) -> (train loader, val loader factory), forward(model, batch)
    -> (loss, out), evaluate(model, loader, steps, device, autocast) -> dict, tokens(batch) -> int,
    and ckpt_extra() -> dict saved in the checkpoint; optionally flops_per_token(mcfg, model) for MFU.
    """
    # ---- processes and devices
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    ddp = world > 1
    device = resolve_device(cfg.device)
    out = check_out(cfg)  # before anything slow (data preparation) or destructive
    ckpt_path = out / "ckpt.pt"
    if ddp:
        import torch.distributed as dist
        if device.type == "cuda":
            device = ddp_cuda_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.kernels == "tfkernels" and cfg.backend is None and device.type == "cpu" and _config.env_backend() is None:
        cfg.backend = "torch"
        _log0("CPU run: using tfkernels backend='torch' (the Triton interpreter is too slow to train with; "
              "pass --backend triton to use it anyway)", rank)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if amp_dtype is not None:
        autocast = lambda: torch.autocast(device.type, dtype=amp_dtype)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    resume = ckpt_io.load(ckpt_path) if cfg.resume and ckpt_path.is_file() else None
    if cfg.resume and resume is None:
        _log0(f"--resume: no checkpoint at {ckpt_path}; starting from scratch", rank)

    # ---- data (rank 0 prepares; the others wait, then read the cache)
    mcfg = cfg.model_config() if task is None else task.model_config(cfg)
    if task is None and mcfg.arch == "bert":  # before the data is prepared (minutes on a big corpus)
        check_bert_block_size(mcfg.block_size, mcfg.nsp)
    prepared = None
    if task is None and cfg.data != "random":
        def prep():
            return prepare(cfg.data, mcfg.vocab_size, cfg.data_dir, cfg.val_fraction, cfg.max_bytes,
                           cfg.shard_dtype, log=lambda m: _log0(m, rank))
        if ddp:
            import torch.distributed as dist
            if rank == 0:
                prepared = prep()
            dist.barrier()
        prepared = prepared or prep()
    if resume is not None:
        mcfg = ModelConfig.from_dict(resume["model_config"])
        mcfg.kernels, mcfg.backend = cfg.kernels, cfg.backend  # the kernels may change between runs
        if task is None:  # and so may the document mask (no parameters): this run's flag, saved with the run
            mcfg.document_mask = cfg.document_mask
    if task is None:
        train_loader, val_loader_fn = make_loaders(cfg, mcfg, prepared, rank, world)
    else:
        train_loader, val_loader_fn = task.loaders(cfg, mcfg, rank, world)
    try:  # now, not at the first evaluation: a too-small validation split failed there, after training, unsaved
        val_loader_fn()
    except ValueError as err:
        raise ValueError(f"the validation split: {err}, or a larger --val-fraction") from None

    # ---- the run directory: only now that the options, the data and the loaders are known to be good,
    # so that a mistake in them does not cost an --overwrite'd run
    if rank == 0:
        if cfg.overwrite:
            for old in (out / name for name in RUN_FILES):
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink(missing_ok=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # e.g. a parent is a file, or no permission
            raise ValueError(f"--out {out}: cannot create it ({err.strerror or err})") from None
        tokenizer = prepared.dir / "tokenizer.json" if prepared is not None else getattr(task, "tokenizer_path", None)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, out / "tokenizer.json")

    # ---- model, optimizer, schedule
    torch.manual_seed(cfg.seed)
    model = (build_model(mcfg) if task is None else task.build(mcfg, resumed=resume is not None)).to(device)
    n_params = model.num_params()
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.preset, 3e-4)
    opt = torch.optim.AdamW(model.optim_groups(cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2),
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        # The checkpoint gives the optimizer its state (moments, step counts); the hyperparameters are this
        # run's: load_state_dict also puts back the saved lr, weight_decay, betas, eps, so a new --lr or
        # --weight-decay given with --resume was recorded in the checkpoint but never used.
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(resume["optimizer"])
        for group, h in zip(opt.param_groups, hyper):
            group.update(h)
        # the schedule at the saved step on this run's peak lr (and --max-steps/--schedule: see the README):
        # LambdaLR steps once on creation, so last_epoch=step-1 gives lr = lr * schedule(step)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg), last_epoch=resume["step"] - 1)
        scaler.load_state_dict(resume["scaler"])
        restore_rank_state(resume, train_loader, cfg.seed, rank, world, ckpt_path)
        step = resume["step"]
        _log0(f"resumed from {ckpt_path} at step {step}", rank)
    else:
        # every rank starts from the same RNG state regardless of what model building consumed
        torch.manual_seed(cfg.seed + rank)
    run_model = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        run_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        run_model = torch.compile(run_model)

    tokens_per_step = cfg.batch_size * mcfg.block_size * cfg.grad_accum * world
    fpt = task.flops_per_token(mcfg, model) if hasattr(task, "flops_per_token") else flops_per_token(mcfg, n_params)
    peak = peak_flops(device)
    doc_mask = f", document mask (eos_id {mcfg.eos_id})" if mcfg.document_mask else ""
    _log0(f"{mcfg.arch} '{cfg.preset}': {n_params / 1e6:.2f}M params, T={mcfg.block_size}, "
          f"kernels={mcfg.kernels} backend={mcfg.backend}{doc_mask}, {precision} on {device}"
          f"{f' x{world}' if ddp else ''}, {tokens_per_step:,} tokens/step", rank)

    def snapshot():
        return {"step": step, "data": train_loader.state_dict(), "rng": ckpt_io.rng_state()}

    def save(snap):
        if not cfg.save:
            return
        # every rank's loader generator and RNG states (its MLM masks, dropout), not rank 0's alone; all
        # ranks save at the same steps, so this collective is matched
        own = {"data": snap["data"], "rng": snap["rng"]}
        rank_states = [own]
        if ddp:
            rank_states = [None] * world
            torch.distributed.all_gather_object(rank_states, own)
        if rank != 0:
            return
        ckpt_io.save_atomic({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "step": snap["step"], "data": snap["data"], "rng": snap["rng"],
            "rank_states": rank_states,
            "model_config": mcfg.to_dict(), "train_config": asdict(cfg),
            "data_dir": str(prepared.dir) if prepared is not None else None,
            **(task.ckpt_extra() if task is not None else {}),
        }, ckpt_path)

    metrics = MetricsLog(out, resume_step=step, tensorboard=cfg.tensorboard) if rank == 0 else None
    from tqdm import tqdm
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0 or not cfg.progress, dynamic_ncols=True,
               desc=f"{mcfg.arch}-{cfg.preset}")
    losses, last_eval = {}, None
    start_step, t_run = step, time.perf_counter()
    t_log, tok_log = time.perf_counter(), 0
    steady = {"t": None, "step": None}  # throughput after the first steps (compilation, warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    snap = snapshot()
    run_model.train()
    # BERT's MLM loss of a step is a mean over all its masked tokens, whichever micro-batch and rank they
    # are in (one batch of grad_accum x world x batch_size sequences); see masked_tokens_per_rank
    per_token = task is None and mcfg.arch == "bert"
    stop, stop_signal = False, None

    def on_signal(signum):
        _log0(f"{'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name}: stopping after this "
              f"step and saving (a second Ctrl-C or SIGTERM quits at once, without saving)", rank)

    with StopOnSignal(on_signal) as stopper:
        try:
            while step < cfg.max_steps and not stop:
                loss_sum = torch.zeros((), device=device)  # this rank's part of the step's loss
                batches = mlm_denominator = None
                if per_token:
                    batches = [next(train_loader) for _ in range(cfg.grad_accum)]
                    mlm_denominator = masked_tokens_per_rank(batches, world, device)
                for micro in range(cfg.grad_accum):
                    batch = batches[micro] if batches is not None else next(train_loader)
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    sync = contextlib.nullcontext()
                    if ddp and micro < cfg.grad_accum - 1:
                        sync = run_model.no_sync()
                    with sync:
                        with autocast():
                            if task is None:
                                loss, res = _forward(run_model, batch, mcfg.arch)
                            else:
                                loss, res = task.forward(run_model, batch)
                        if per_token:  # NSP: a mean over sequences, as many in every micro-batch
                            part = res.mlm_loss_sum / mlm_denominator
                            if res.nsp_loss is not None:
                                part = part + res.nsp_loss / cfg.grad_accum
                        else:  # as many tokens (GPT) or examples (fine-tuning) in every micro-batch
                            part = loss / cfg.grad_accum
                        scaler.scale(part).backward()
                    loss_sum += part.detach()
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                lr_now = opt.param_groups[0]["lr"]
                scaler.step(opt)
                scaler.update()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                snap = snapshot()
                loss_avg = loss_sum  # the step's loss on this rank's data (the parts are already divided)
                stop_signal = stopper.signum
                if ddp:
                    # the step's loss (the mean over the ranks; for BERT's MLM, whose parts are scaled by world,
                    # the sum) and whether any rank got SIGINT / SIGTERM, in one all-reduce, so that all
                    # ranks stop after the same step (and agree on why: SIGTERM if any rank got one); SUM, then
                    # divide: Gloo refuses ReduceOp.AVG on older torch (2.6 raised)
                    red = torch.stack([loss_avg.float(), torch.tensor(float(stop_signal == signal.SIGINT), device=device),
                                       torch.tensor(float(stop_signal == signal.SIGTERM), device=device)])
                    torch.distributed.all_reduce(red, op=torch.distributed.ReduceOp.SUM)
                    loss_avg = red[0] / world
                    stop_signal = signal.SIGTERM if red[2] > 0 else signal.SIGINT if red[1] > 0 else None
                stop = stop_signal is not None
                loss_val = loss_avg.item()  # synchronizes: the timings below are real
                losses[step] = loss_val
                tok_log += tokens_per_step if task is None else task.tokens_seen(cfg, world)
                if steady["t"] is None and step - start_step >= min(10, max(1, (cfg.max_steps - start_step) // 5)):
                    steady.update(t=time.perf_counter(), step=step)
                bar.update(1)
                do_eval = step == cfg.max_steps or (cfg.eval_interval and step % cfg.eval_interval == 0)
                if step % cfg.log_interval == 0 or do_eval or step == start_step + 1:
                    dt = time.perf_counter() - t_log
                    tps = tok_log / dt if dt > 0 else 0.0
                    t_log, tok_log = time.perf_counter(), 0
                    mfu = fpt * tps / (peak * world) if peak else None
                    row = {"step": step, "loss": loss_val, "lr": lr_now, "tokens_per_s": tps, "mfu": mfu,
                           "elapsed_s": time.perf_counter() - t_run}
                    bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
                    if do_eval:
                        t_eval = time.perf_counter()
                        if task is None:
                            last_eval = evaluate(model, val_loader_fn(), cfg.eval_steps, mcfg.arch, device, autocast)
                        else:
                            last_eval = task.evaluate(model, val_loader_fn(), cfg.eval_steps, device, autocast)
                        if steady["t"] is not None:
                            steady["t"] += time.perf_counter() - t_eval  # eval time is not training throughput
                        row.update(last_eval)
                        extra = "".join(f" {k} {v:.3f}" for k, v in last_eval.items() if v is not None and k != "val_loss")
                        _log0(f"step {step}: loss {loss_val:.4f} val_loss {last_eval['val_loss']:.4f}{extra}", rank)
                        t_log = time.perf_counter()  # eval time is not training throughput
                    if metrics is not None:
                        metrics.write(row)
                if cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step < cfg.max_steps:
                    save(snap)
                if on_step is not None:
                    try:
                        on_step(step, loss_val)
                    except KeyboardInterrupt:  # after a whole step: a stop request, as the first Ctrl-C
                        stop, stop_signal = True, stop_signal or signal.SIGINT
        except KeyboardInterrupt:  # the second signal: the step in progress may be half applied, so no save
            _log0(f"interrupted again: quitting without saving ({ckpt_path} holds the last checkpoint written)", rank)
            if metrics is not None:
                metrics.close()
            raise
        finally:
            bar.close()
    interrupted = stop and step < cfg.max_steps  # a signal during the last step stopped nothing
    if interrupted:
        _log0(f"interrupted ({signal.Signals(stop_signal).name}): saving a checkpoint at step {snap['step']} "
              f"to {ckpt_path} (continue with --resume)", rank)
    t_end = time.perf_counter()
    save(snap)
    summary = {"step": snap["step"], "losses": losses, "eval": last_eval, "interrupted": interrupted,
               "stop_signal": int(stop_signal) if interrupted else None,
               "n_params": n_params, "tokens_per_step": tokens_per_step, "out": str(out), "checkpoint": str(ckpt_path),
               "seconds": t_end - t_run, "device": str(device), "precision": precision,
               "kernels": mcfg.kernels, "backend": mcfg.backend, "compile": cfg.compile}
    if steady["t"] is not None and snap["step"] > steady["step"]:
        tps = tokens_per_step * (snap["step"] - steady["step"]) / (t_end - steady["t"])
        summary["tokens_per_s"] = tps
        summary["mfu"] = fpt * tps / (peak * world) if peak else None
    if device.type == "cuda":
        summary["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if metrics is not None:
        metrics.close()
        if cfg.plot and not interrupted:
            png = plot_loss(metrics.path, out / "loss.png")
            summary["plot"] = str(png) if png else None
    return summary
