"""The printed table: raftsync next to bare PySyncObj, with PEERS.md's targets.

Figures only: the target column repeats the goal from PEERS.md and no verdict is
printed (tests never assert timings and neither does the bench).
"""

from __future__ import annotations

import math

from .stats import Summary
from .workloads import ROWS, SuiteResult

# raftsync's targets from PEERS.md ("3 nodes, same box"), by workload and where.
TARGETS: dict[tuple[str, str], str] = {
    ("write", "leader"): "p50 <= 0.8 ms",
    ("write", "follower"): "p50 <= 0.8 ms",
    ("lock", "leader"): "p50 <= 1 ms",
    ("lock", "follower"): "p50 <= 2 ms",
    ("read_linearizable", "leader"): "p50 <= 0.6 ms",
    ("read_linearizable", "follower"): "p50 <= 0.6 ms",
}

HEADERS = ["workload", "raftsync p50 / p99 ms", "n", "ops/s",
           "bare PySyncObj (no batching) p50 / p99 ms", "n", "ops/s", "ratio p50", "target (PEERS.md)"]


def _ms(value: float) -> str:
    """Three significant digits below 1 ms (a local read is microseconds), else 2 or 0 decimals."""
    if math.isnan(value):
        return "-"
    if value < 1:
        return f"{value:#.3g}"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _cells(summary: Summary | None) -> list[str]:
    if summary is None or summary.count == 0:
        failed = f" ({summary.failures} failed)" if summary is not None and summary.failures else ""
        return ["-" + failed, "0", "-"]
    failed = f" ({summary.failures} failed)" if summary.failures else ""
    return [f"{_ms(summary.p50_ms)} / {_ms(summary.p99_ms)}{failed}", str(summary.count),
            f"{summary.ops_per_s:,.0f}"]


def _ratio(ours: Summary | None, bare: Summary | None) -> str:
    if ours is None or bare is None or ours.count == 0 or bare.count == 0 or bare.p50_ms <= 0:
        return "-"
    ratio = ours.p50_ms / bare.p50_ms
    return f"{ratio:.3g}x" if ratio < 100 else f"{ratio:,.0f}x"


def render_table(raftsync: SuiteResult, bare: SuiteResult) -> str:
    """A fixed-width table, one line per Row; ratio = raftsync p50 / bare p50."""
    lines = [HEADERS]
    for row in ROWS:
        ours, theirs = raftsync.summaries.get(row), bare.summaries.get(row)
        lines.append([row.label, *_cells(ours), *_cells(theirs), _ratio(ours, theirs),
                      TARGETS.get((row.workload, row.where), "")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    right_aligned = {2, 3, 5, 6, 7}

    def fmt(line: list[str]) -> str:
        return " | ".join(cell.rjust(w) if i in right_aligned else cell.ljust(w)
                          for i, (cell, w) in enumerate(zip(line, widths))).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([fmt(lines[0]), rule, *(fmt(line) for line in lines[1:])])


def render_notes(*results: SuiteResult) -> str:
    lines = []
    for result in results:
        if result.error:
            lines.append(f"{result.system}: not measured: {result.error}")
        for note in result.notes:
            lines.append(f"{result.system}: {note}")
    return "\n".join(f"- {line}" for line in lines)
