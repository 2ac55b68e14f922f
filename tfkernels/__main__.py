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


def _register_bench(sub) -> None:
    """`tfkernels bench ...` forwards to the benchmark suite (`python -m benchmarks`), which lives in
    the repository's benchmarks/ folder rather than in the installed package."""
    p = sub.add_parser("bench", help="run the benchmark suite (from a tfkernels checkout)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)

    def run(args) -> int:
        try:
            import benchmarks
        except ImportError:
            raise FileNotFoundError("the benchmark suite is the benchmarks/ folder of a tfkernels checkout: "
                                    "run `tfkernels bench` from the repository root") from None
        return benchmarks.main(args.args) or 0

    p.set_defaults(func=run)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tfkernels", description="fused Transformer kernels for PyTorch: "
                                     "pretraining and tools")
    argv = sys.argv[1:] if argv is None else list(argv)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
    parser._bench_run = _register_bench(sub)
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to the suite's own parser
        args = argparse.Namespace(command="bench", args=argv[1:], func=parser._bench_run)
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"tfkernels {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # e.g. a second Ctrl-C during training (the first one stops and saves)
        print(f"tfkernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
