"""`tfkernels finetune | export` (and `tfkernels eval` on a fine-tuned checkpoint, via cli.cmd_eval).

    tfkernels finetune --ckpt runs/tiny --task classify --train builtin --out runs/ft
    tfkernels finetune --ckpt runs/tiny --train train.csv --eval dev.csv --out runs/ft --freeze
    tfkernels eval --ckpt runs/ft [--data dev.jsonl] [--png cm.png]
    tfkernels export --ckpt runs/tiny --out hf/tiny --format hf

Every FinetuneConfig field is a flag (`max_steps` -> `--max-steps`). With --resume the run's saved
options are restored (as `pretrain --resume` does) and the flags given override them, e.g.
`tfkernels finetune --out runs/ft --resume --max-steps 200`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from .finetune import FinetuneConfig

HELP = {
    "ckpt": "pretrained checkpoint file or run directory (from `tfkernels pretrain`; required, except "
            "with --resume, which takes the run's)",
    "task": "classify (sequence classification)",
    "train": "labelled CSV/JSONL (text, optional text_pair, label), builtin, or hf:NAME[:CONFIG][@SPLIT]",
    "eval": "labelled evaluation file (default: builtin:eval for --train builtin)",
    "out": "run directory: ckpt.pt, metrics.csv, confusion.png, tb/",
    "resume": "continue from OUT/ckpt.pt with the run's saved options (flags given override them)",
    "overwrite": "start over in an OUT that already holds a run: delete its ckpt.pt, metrics.csv, loss.png, "
                 "confusion.png, tb/ and tokenizer.json first (without --resume or --overwrite, such an OUT is an "
                 "error)",
    "init": "pretrained (default) or scratch (same architecture, random weights: the baseline)",
    "freeze": "train the classification head only", "max_len": "truncate inputs to this many tokens",
    "eval_steps": "eval batches per evaluation (0 = the whole eval set)",
}


def _flag_type(field):
    hint = typing.get_type_hints(FinetuneConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The flags, over the run's saved options when resuming (the defaults otherwise)."""
    flags = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(FinetuneConfig)}}
    merged = {}
    out = flags.get("out")
    if flags.get("resume") and out and (Path(out) / "ckpt.pt").is_file():
        from . import checkpoint
        saved = checkpoint.load(Path(out) / "ckpt.pt").get("finetune_config")
        if saved is None:
            raise ValueError(f"--out {out} holds a pretraining run, not a fine-tuning run; resume it with "
                             f"`tfkernels pretrain --out {out} --resume`")
        # as pretrain --resume: not the saved resume/overwrite (they exclude each other) nor the backend
        merged.update({k: v for k, v in saved.items() if k not in ("resume", "overwrite", "backend")})
    merged.update(flags)
    if "ckpt" not in merged:
        raise ValueError("--ckpt is required: the pretrained checkpoint (or run directory) to fine-tune")
    return FinetuneConfig.from_dict(merged)


def cmd_finetune(args) -> int:
    from .finetune import evaluate_checkpoint, finetune
    from .trainer import run_command

    fcfg = finetune_config(args)
    s, status = run_command(finetune, fcfg)
    if s is None:  # stopped by Ctrl-C / SIGTERM
        return status
    losses = s["losses"]
    if losses:
        print(f"done: {s['step']} steps in {s['seconds']:.1f}s, loss {losses[min(losses)]:.3f} -> {losses[max(losses)]:.3f}")
    rep = evaluate_checkpoint(s["checkpoint"], kernels=fcfg.kernels, backend=fcfg.backend, device=fcfg.device)
    print_report(rep)
    print(f"wrote {s['checkpoint']}, {Path(fcfg.out) / 'metrics.csv'}")
    return 0


def print_report(rep: dict) -> None:
    print(f"eval on {rep['data']} ({rep['n']} examples): accuracy {rep['accuracy']:.4f}, macro-F1 {rep['macro_f1']:.4f}, "
          f"loss {rep['loss']:.4f}")
    print(rep["confusion_text"])
    print(f"confusion matrix: {rep['png']}")


def cmd_eval_classifier(args) -> int:
    from .finetune import evaluate_checkpoint

    rep = evaluate_checkpoint(args.ckpt, args.data, args.batch_size or 32, getattr(args, "png", None),
                              args.kernels, args.backend, args.device)
    print_report(rep)
    if getattr(args, "json", False):
        print(json.dumps({k: v for k, v in rep.items() if k != "confusion_text"}, indent=1))
    return 0


def cmd_export(args) -> int:
    from ..export import export_hf

    if args.format != "hf":
        raise ValueError(f"--format {args.format!r}: only 'hf' is supported")
    info = export_hf(args.ckpt, args.out)
    print(f"wrote a Hugging Face {info['architecture']} ({info['model_type']}) to {info['out']}: "
          f"{', '.join(info['files'])}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained checkpoint for sequence classification",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = _flag_type(f)
        kw = dict(default=argparse.SUPPRESS, help=HELP.get(f.name))
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=typ, metavar=f.name.upper(), **kw)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="export a pretrained or fine-tuned checkpoint to Hugging Face format")
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    p.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--format", default="hf", help="hf (transformers: GPT-2, Llama or XLM-RoBERTa-XL for BERT; *ForSequenceClassification for a fine-tuned classifier)")
    p.set_defaults(func=cmd_export)
