"""Summaries of one measurement: percentiles of per-op latency and the op rate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (``fraction`` in (0, 1])."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Summary:
    """One measurement: ``count`` successful sequential ops, latencies in milliseconds."""

    count: int
    failures: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    ops_per_s: float
    first_error: str | None = None

    @classmethod
    def from_loop(cls, loop_result: dict[str, Any]) -> "Summary":
        """From what ``bench.timing.timed_loop`` returned (possibly over a socket)."""
        latencies = sorted(loop_result["latencies"])
        elapsed = loop_result["elapsed"]
        return cls(
            count=len(latencies),
            failures=loop_result["failures"],
            p50_ms=percentile(latencies, 0.50) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
            max_ms=(latencies[-1] * 1000) if latencies else math.nan,
            ops_per_s=len(latencies) / elapsed if elapsed > 0 else math.nan,
            first_error=loop_result.get("first_error"),
        )
