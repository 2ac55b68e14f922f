"""Integer helpers for launch grids and block sizes, in plain Python.

`triton.cdiv` and `triton.next_power_of_2` are `constexpr_function`s since Triton 3.5: a host call
unwraps its arguments as constexprs first, about 2 us each on this project's CPU machine against
0.03 us for the arithmetic. A launcher calls them a few times per op call, on the host time that
bounds every small-shape call (`python -m benchmarks.host_overhead`). Same results for the
non-negative ints the launchers pass.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
