"""Wall-clock helpers the benchmarks share."""

from __future__ import annotations

import time


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` calls of `fn`, in seconds: the run least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
