"""tfkernels benchmark suite: `python -m benchmarks --help`; `main(argv)` is the entry point that
`tfkernels bench` calls. See benchmarks/README.md for the methodology."""
from .suite import main

__all__ = ["main"]
