"""Loaded (through PYTHONPATH) only into members the runner starts under libfaketime.

Debian bookworm's libfaketime 0.9.10 with FAKETIME_DONT_FAKE_MONOTONIC=1 rewrites the
absolute CLOCK_MONOTONIC deadline of clock_nanosleep(TIMER_ABSTIME) by the wall-clock
offset, so every ``time.sleep`` fails with EINVAL. Everything else Python waits with
(select/poll timeouts, Event/Condition/Lock/Queue timeouts, socket timeouts) is relative
or monotonic and works. Sleep through select() instead, which takes a relative timeout.
"""

import os
import select
import time


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        select.select([], [], [], remaining)


if os.environ.get("LD_PRELOAD", "").find("libfaketime") >= 0:
    time.sleep = _sleep
