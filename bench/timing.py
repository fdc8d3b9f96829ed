"""The timed loop every bench op runs inside the process under measurement.

Both systems use this same code: raftsync's agent ops (``cluster/agent.py``,
``op_bench_*``) and the bare PySyncObj harness (``bench/bare_pysyncobj.py``), so the
figures differ only by what ``operation`` does.
"""

from __future__ import annotations

import time
from typing import Any, Callable

# Warm-up iterations get at most this long, whatever their count.
MAX_WARMUP_SECONDS = 5.0


def timed_loop(operation: Callable[[int], Any], count: int, warmup: int, max_seconds: float) -> dict[str, Any]:
    """Call ``operation(i)`` sequentially, timing each call with ``time.perf_counter``.

    First ``warmup`` untimed calls (bounded by MAX_WARMUP_SECONDS), then up to ``count``
    timed calls, stopping early once ``max_seconds`` have passed. A call that raises is
    counted as a failure and left out of the latencies.

    Returns ``{"latencies": [seconds, ...], "elapsed": seconds of the timed part,
    "failures": int, "first_error": str | None}`` (plain types: it crosses a socket).
    """
    warmup_deadline = time.perf_counter() + min(MAX_WARMUP_SECONDS, max_seconds)
    for i in range(warmup):
        if time.perf_counter() >= warmup_deadline:
            break
        try:
            operation(i)
        except Exception:
            pass
    latencies: list[float] = []
    failures = 0
    first_error: str | None = None
    started = time.perf_counter()
    deadline = started + max_seconds
    for i in range(count):
        if time.perf_counter() >= deadline:
            break
        before = time.perf_counter()
        try:
            operation(warmup + i)
        except Exception as exc:
            failures += 1
            if first_error is None:
                first_error = f"{type(exc).__name__}: {exc}"
            continue
        latencies.append(time.perf_counter() - before)
    return {"latencies": latencies, "elapsed": time.perf_counter() - started,
            "failures": failures, "first_error": first_error}
