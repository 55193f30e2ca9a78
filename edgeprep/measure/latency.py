"""Wall-clock latency of a callable: percentiles and a distribution-free CI of the median.

Shared by every runtime's ``profile``. Latency distributions are skewed (a scheduler hiccup makes
one call 10x slower), so the median is the headline number and its confidence interval comes from
order statistics, which assume nothing about the distribution's shape. Memory is not measured
here: this process's RSS is edgeprep's own; edgeprep/measure/memory.py measures each artifact's.
"""
from __future__ import annotations

import gc
import math
import time
from typing import Any, Callable

import numpy as np

from edgeprep.types import LatencyStats

CI_LEVEL = 0.95


def median_ci_ranks(n: int, level: float = CI_LEVEL) -> tuple[int, int]:
    """1-based ranks (lo, hi) so that [x_(lo), x_(hi)] covers the median with >= ``level``.

    The count of samples below the true median is Binomial(n, 1/2). ``lo`` is the largest rank
    with P(B < lo) <= (1 - level) / 2 and ``hi = n + 1 - lo`` by symmetry. Too few samples for
    the level (n < 6 at 95%) give the full range (1, n).
    """
    if n < 1:
        raise ValueError("need at least one sample")
    alpha_half = (1.0 - level) / 2.0
    cdf = 0.0  # P(B <= k - 1) while scanning k = 1, 2, ...
    lo = 0
    for k in range(0, n + 1):
        # log-space pmf: 0.5**n underflows a float for n > 1074
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + n * math.log(0.5))
        if cdf > alpha_half:
            break
        lo = k + 1  # P(B <= k) = P(B < k + 1) <= alpha/2, so rank k + 1 still qualifies
    lo = max(1, min(lo, (n + 1) // 2))
    return lo, n + 1 - lo


def summarize_ns(samples_ns: Any, *, warmup: int, threads: int, batch: int) -> LatencyStats:
    """LatencyStats (milliseconds) from per-call durations in nanoseconds."""
    ms = np.sort(np.asarray(samples_ns, dtype=np.float64)) / 1e6
    n = len(ms)
    if n == 0:
        raise ValueError("no timed calls")
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    lo, hi = median_ci_ranks(n)
    return LatencyStats(p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=float(ms.mean()),
                        ci95_p50_ms=(float(ms[lo - 1]), float(ms[hi - 1])), iters=n, warmup=warmup,
                        threads=threads, batch=batch)


def time_callable(fn: Callable[[], Any], warmup: int, iters: int, threads: int, batch: int) -> LatencyStats:
    """Call ``fn`` ``warmup`` times untimed, then ``iters`` times, timing each call on its own.

    ``threads`` and ``batch`` are recorded, not applied: the caller configured ``fn`` with them.
    The garbage collector is paused while timing so a collection triggered by the harness does
    not land inside one call (it is re-enabled, and run, afterwards).
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    for _ in range(max(0, warmup)):
        fn()
    samples_ns = np.empty(iters, dtype=np.int64)
    clock = time.perf_counter_ns
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for i in range(iters):
            t0 = clock()
            fn()
            samples_ns[i] = clock() - t0
    finally:
        if was_enabled:
            gc.enable()
    return summarize_ns(samples_ns, warmup=max(0, warmup), threads=threads, batch=batch)
