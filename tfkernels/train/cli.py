"""`tfkernels pretrain | sample | eval`.

    tfkernels pretrain --model gpt --preset tiny --max-steps 200 --out runs/tiny
    tfkernels pretrain --config run.toml --lr 3e-4          # flags override the config file
    tfkernels pretrain --out runs/tiny --resume             # continue from runs/tiny/ckpt.pt
    tfkernels pretrain --out runs/tiny --overwrite          # start over (an --out holding a run needs one of the two)
    tfkernels sample --ckpt runs/tiny --prompt "def " --max-new-tokens 100
    tfkernels eval --ckpt runs/tiny

Every TrainConfig field is a flag (`max_steps` -> `--max-steps`). Precedence, lowest first: the
defaults, the checkpoint's saved settings (with --resume), the config file (TOML, YAML or JSON with
the same keys), the flags given on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from .trainer import AT_LEAST_0, AT_LEAST_1, TrainConfig, check_ranges, resolve_device

HELP = {
    "model": "gpt (causal LM) or bert (masked LM)", "preset": "tiny, gpt2-124m or bert-base",
    "kernels": "tfkernels (fused ops) or torch (plain PyTorch: SDPA, nn.LayerNorm) — same weights",
    "backend": "tfkernels backend: triton, cuda or torch (default: automatic; torch on CPU)",
    "data": "builtin (offline, from the Python installation), a text/JSONL file or directory, hf:NAME[:CONFIG], or random",
    "data_dir": "where the tokenizer and shards are cached (default ~/.cache/tfkernels/data/...)",
    "out": "run directory: ckpt.pt, metrics.csv, loss.png, tb/", "resume": "continue from OUT/ckpt.pt",
    "overwrite": "start over in an OUT that already holds a run: delete its ckpt.pt, metrics.csv, loss.png, "
                 "tb/ and tokenizer.json first (without --resume or --overwrite, such an OUT is an error)",
    "batch_size": "sequences per micro-batch per process", "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate (default depends on the preset)", "schedule": "cosine, wsd or constant (after warmup)",
    "precision": "auto (bf16 on GPU, fp32 on CPU), bf16, fp16 (with GradScaler) or fp32",
    "compile": "torch.compile the model", "nsp": "BERT next-sentence prediction head and pairs",
    "document_mask": "GPT: attend only within each document of a packed sequence (documents end at "
                     "<|endoftext|>); the fused kernels skip the tiles between documents",
    "eval_interval": "evaluate every N steps (and at the end); 0 = only at the end",
    "eval_steps": "validation batches per evaluation (>= 1)",
    "n_kv_head": "GPT: K/V heads for grouped-query attention, a divisor of n_head (default n_head: MHA); "
                 "the kernels run GQA natively, the Llama export keeps it",
    "ckpt_interval": "checkpoint every N steps (and at the end, and on Ctrl-C); 0 = only then",
}


def _flag_type(field):
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = _flag_type(f)
        kw = dict(default=argparse.SUPPRESS, help=HELP.get(f.name))
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=typ, metavar=f.name.upper(), **kw)


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    if p.suffix == ".toml":
        import tomllib
        data = tomllib.loads(p.read_text())
    elif p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{p}: YAML config files need PyYAML (pip install pyyaml); or use TOML") from None
        data = yaml.safe_load(p.read_text()) or {}
    elif p.suffix == ".json":
        data = json.loads(p.read_text())
    else:
        raise ValueError(f"config file {p}: expected .toml, .yaml/.yml or .json")
    data = data.get("pretrain", data)  # allow a [pretrain] table
    return {k.replace("-", "_"): v for k, v in data.items()}


def pretrain_config(args: argparse.Namespace) -> TrainConfig:
    flags = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    file_cfg = read_config_file(args.config) if getattr(args, "config", None) else {}
    merged = {}
    out = flags.get("out", file_cfg.get("out"))
    if flags.get("resume", file_cfg.get("resume")) and out and (Path(out) / "ckpt.pt").is_file():
        from . import checkpoint
        saved = checkpoint.load(Path(out) / "ckpt.pt")["train_config"]
        # not overwrite: a run started with --overwrite is resumed with --resume, which excludes it
        merged.update({k: v for k, v in saved.items() if k not in ("resume", "overwrite", "backend")})
        if saved.get("model") == "gpt":  # runs from before --nsp was refused for GPT saved it (and ignored it)
            merged.pop("nsp", None)
    merged.update(file_cfg)
    merged.update(flags)
    return TrainConfig.from_dict(merged)


def cmd_pretrain(args) -> int:
    from .trainer import run_command, train

    cfg = pretrain_config(args)
    summary, status = run_command(train, cfg)
    if summary is None:  # stopped by Ctrl-C / SIGTERM
        return status
    rank0 = __import__("os").environ.get("RANK", "0") == "0"
    if rank0:
        losses = summary["losses"]
        if losses:
            first, last = losses[min(losses)], losses[max(losses)]
            print(f"done: {summary['step']} steps in {summary['seconds']:.1f}s, loss {first:.3f} -> {last:.3f}"
                  + (f", {summary['tokens_per_s']:,.0f} tokens/s" if summary.get("tokens_per_s") else "")
                  + (f", MFU {summary['mfu']:.1%}" if summary.get("mfu") else ""))
        print(f"wrote {summary['checkpoint']}, {Path(cfg.out) / 'metrics.csv'}"
              + (f", {summary['plot']}" if summary.get("plot") else ""))
    return 0


# ----------------------------------------------------------------------------- sample / eval

def load_run(ckpt_path: str, kernels=None, backend=None, device="auto"):
    """(model in eval mode, tokenizer or None, checkpoint dict, device) from a checkpoint file or run dir."""
    from ..model import ModelConfig, build_model
    from . import checkpoint
    from .tokenizer import load_tokenizer

    dev = resolve_device(device)
    ck = checkpoint.load(ckpt_path)
    if ck.get("kind") == "classifier":  # its weights do not load into a GPT/BERT: say why, not which keys
        labels = ", ".join(map(str, ck.get("labels", [])))
        raise ValueError(f"{ckpt_path} is a fine-tuned classifier (labels {labels}), not a language model: it "
                         f"cannot generate text or fill [MASK]s. Sample from the checkpoint it "
                         f"was fine-tuned from ({ck.get('pretrained_from', '?')}); `tfkernels eval --ckpt {ckpt_path}` "
                         f"reports its accuracy")
    mcfg = ModelConfig.from_dict(ck["model_config"])
    if kernels:
        mcfg.kernels = kernels
    mcfg.backend = backend if backend else ("torch" if dev.type == "cpu" and mcfg.kernels == "tfkernels" else None)
    model = build_model(mcfg)
    model.load_state_dict(ck["model"])
    model.to(dev).eval()
    run_dir = Path(ckpt_path) if Path(ckpt_path).is_dir() else Path(ckpt_path).parent
    tok = None
    candidates = [run_dir / "tokenizer.json"] + ([Path(ck["data_dir"]) / "tokenizer.json"] if ck.get("data_dir") else [])
    for cand in candidates:
        if cand.is_file():
            tok = load_tokenizer(cand)
            break
    return model, tok, ck, dev


def cmd_sample(args) -> int:
    import torch

    from .tokenizer import MASK

    # before loading anything: --num-samples 0 crashed in generate(), negative --max-new-tokens printed the prompt
    check_ranges(args, {"num_samples": AT_LEAST_1, "max_new_tokens": AT_LEAST_0, "top_k": AT_LEAST_1,
                        "temperature": AT_LEAST_0})
    model, tok, ck, dev = load_run(args.ckpt, args.kernels, args.backend, args.device)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer.json next to {args.ckpt} (was it trained on --data random?)")
    g = torch.Generator(device=dev).manual_seed(args.seed)
    if model.cfg.arch == "gpt":
        # every prompt num_samples times, left-padded to the longest (generate's attention_mask)
        rows = [tok.encode(p or "\n").ids or [0] for p in (args.prompt or [""]) for _ in range(args.num_samples)]
        T = max(len(r) for r in rows)
        x = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=dev)
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=dev)
        y = model.generate(x, args.max_new_tokens, args.temperature, args.top_k or 50, generator=g, attention_mask=mask)
        for row, r in zip(y.tolist(), rows):
            print(tok.decode(row[T - len(r):]))
            print("-" * 40)
        return 0
    if args.prompt and len(args.prompt) > 1:
        raise ValueError("BERT fill-mask takes one --prompt")
    prompt = args.prompt[0] if args.prompt else "def [MASK](self):"
    enc = tok.encode(prompt).ids
    if MASK not in enc:
        raise ValueError("BERT fill-mask: the --prompt must contain [MASK]")
    from .tokenizer import CLS, SEP
    ids = torch.tensor([[CLS] + enc[: model.cfg.block_size - 2] + [SEP]], device=dev)
    with torch.no_grad():
        logits = model(ids).mlm_logits[0].float()                           # (T, V)
    filled = ids[0].clone()
    for pos in (ids[0] == MASK).nonzero().flatten().tolist():
        probs, cand = logits[pos].softmax(-1).topk(args.top_k or 5)
        options = ", ".join(f"{tok.decode([c])!r} {p:.2f}" for p, c in zip(probs.tolist(), cand.tolist()))
        print(f"[MASK] at {pos}: {options}")
        filled[pos] = cand[0]
    print(tok.decode(filled[1:-1].tolist()))
    return 0


def cmd_eval(args) -> int:
    import contextlib

    import torch

    from .data import PreparedData, prepare
    from .trainer import evaluate, make_loaders

    from . import checkpoint
    # 0 eval steps reported val_loss 0, a perfect model
    check_ranges(args, {"eval_steps": AT_LEAST_1, "batch_size": AT_LEAST_1})
    if checkpoint.load(args.ckpt).get("kind") == "classifier":  # a fine-tuned classifier: accuracy, F1, confusion
        from .finetune_cli import cmd_eval_classifier
        return cmd_eval_classifier(args)
    model, tok, ck, dev = load_run(args.ckpt, args.kernels, args.backend, args.device)
    # only what the validation loader needs: the run's other options (resume, eval_steps, ...) play no part here
    saved = ck["train_config"]
    tcfg = TrainConfig.from_dict({k: saved[k] for k in ("batch_size", "seed", "mlm_prob", "val_fraction", "max_bytes")
                                  if k in saved})
    if args.batch_size:
        tcfg.batch_size = args.batch_size
    if args.data:
        # the run's own tokenizer: a new one trained on --data would give the model ids it never learned
        from .finetune import find_tokenizer
        prepared = prepare(args.data, model.cfg.vocab_size, args.data_dir, tcfg.val_fraction, tcfg.max_bytes,
                           tokenizer=find_tokenizer(args.ckpt, ck))
    elif ck.get("data_dir"):
        meta_path = Path(ck["data_dir"]) / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"the run's data dir is gone: {meta_path}; pass --data to prepare it again")
        prepared = PreparedData(Path(ck["data_dir"]), json.loads(meta_path.read_text()))
    else:
        prepared = None
    _, val_fn = make_loaders(tcfg, model.cfg, prepared, 0, 1)
    autocast = contextlib.nullcontext
    if dev.type == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    res = evaluate(model, val_fn(), args.eval_steps, model.cfg.arch, dev, autocast)
    print(json.dumps({"step": ck["step"], **res}, indent=1))
    return 0


def _add_run_flags(p):
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    p.add_argument("--kernels", choices=["tfkernels", "torch"], help="override the checkpoint's kernels")
    p.add_argument("--backend", help="tfkernels backend (default automatic; torch on CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")


def register(sub) -> None:
    """Add pretrain / sample / eval to the `tfkernels` command's subparsers."""
    p = sub.add_parser("pretrain", help="pretrain a GPT or BERT", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML / YAML / JSON file of options (flags override it)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sample", help="generate text (GPT) or fill [MASK]s (BERT) from a checkpoint")
    _add_run_flags(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue (GPT) or with [MASK]s to fill (BERT); GPT takes it more than once: the "
                        "prompts decode together, as one left-padded batch")
    p.add_argument("--max-new-tokens", type=int, default=200, help="GPT: tokens to generate after the prompt (>= 0)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="sample from the k likeliest tokens (GPT, default 50); candidates shown (BERT, default 5)")
    p.add_argument("--num-samples", type=int, default=1, help="GPT: how many continuations (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="validation loss / perplexity / MLM and NSP accuracy of a checkpoint; "
                       "accuracy, macro-F1 and confusion matrix of a fine-tuned classifier")
    _add_run_flags(p)
    p.add_argument("--data", help="evaluate on this corpus's held-out split (encoded with the run's tokenizer) "
                   "instead of the run's validation split (classifier: a labelled CSV/JSONL file, builtin:eval, hf:...)")
    p.add_argument("--png", help="classifier: where to save the confusion matrix (default CKPT_DIR/confusion.png)")
    p.add_argument("--json", action="store_true", help="classifier: also print the report as JSON")
    p.add_argument("--data-dir")
    p.add_argument("--eval-steps", type=int, default=50, help="validation batches (>= 1; a classifier is "
                   "evaluated on its whole eval set)")
    p.add_argument("--batch-size", type=int)
    p.set_defaults(func=cmd_eval)
