"""The `tfkernels` command (also `python -m tfkernels`).

Subcommands come from modules listed in SUBCOMMANDS; each has `register(subparsers)`, which adds
its parsers and sets `func` (called with the parsed args, returns the exit code). Add a command by
adding a module here (finetune, export and bench follow the same pattern).
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = [
    "tfkernels.train.cli",  # pretrain, sample, eval
    "tfkernels.train.finetune_cli",  # finetune, export
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tfkernels", description="fused Transformer kernels for PyTorch: "
                                     "pretraining and tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"tfkernels {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
