"""Load generators shared by the test agent and the benchmarks."""

from __future__ import annotations

import threading
import time


def burn_cpu(threads: int, seconds: float) -> list[threading.Thread]:
    """Pure-Python CPU load in this process, as a busy application would make: each
    thread holds the GIL for its whole time slice. Returns the (daemon) threads."""
    def burn() -> None:
        end = time.monotonic() + seconds
        x = 0
        while time.monotonic() < end:
            for i in range(10000):
                x += i * i

    started = [threading.Thread(target=burn, daemon=True) for _ in range(threads)]
    for thread in started:
        thread.start()
    return started
