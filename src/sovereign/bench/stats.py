"""Latency samples and percentiles.

Samples are kept raw, in microseconds, in an ``array('I')`` (4 bytes each, cheap to
append and to send between processes), and merged exactly on the coordinator: no
histogram approximation for p99.9.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable


def new_samples() -> array[int]:
    return array("I")


def add_ns(samples: array[int], ns: int) -> None:
    """Record a duration given in nanoseconds (clamped to 0 .. ~71 minutes)."""
    us = ns // 1000
    samples.append(us if 0 <= us < 0xFFFF_FFFF else (0 if us < 0 else 0xFFFF_FFFE))


def merge(parts: Iterable[array[int]]) -> list[int]:
    out: list[int] = []
    for p in parts:
        out.extend(p)
    out.sort()
    return out


def percentile(sorted_us: list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) in milliseconds."""
    if not sorted_us:
        return math.nan
    k = max(0, min(len(sorted_us) - 1, math.ceil(q / 100 * len(sorted_us)) - 1))
    return sorted_us[k] / 1000


def summary(parts: Iterable[array[int]]) -> dict[str, float | int] | None:
    """n, mean, p50, p90, p99, p99.9 and max in ms; None without samples."""
    s = merge(parts)
    if not s:
        return None
    return {
        "n": len(s),
        "mean_ms": round(sum(s) / len(s) / 1000, 3),
        "p50_ms": round(percentile(s, 50), 3),
        "p90_ms": round(percentile(s, 90), 3),
        "p99_ms": round(percentile(s, 99), 3),
        "p999_ms": round(percentile(s, 99.9), 3),
        "max_ms": round(s[-1] / 1000, 3),
    }
