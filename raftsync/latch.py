"""A one-shot event with callbacks: how a Session is lost and a Lease/Term ends."""

from __future__ import annotations

import threading
from typing import Any, Callable


class Latch:
    """Set at most once; callbacks registered before that are handed back by ``fire``,
    callbacks registered after it are reported as late so the caller runs them at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._callbacks: list[Callable[[Any], None]] = []
        self._guard = threading.Lock()

    def add(self, callback: Callable[[Any], None]) -> bool:
        """Keep ``callback`` for ``fire``; False if already fired (run it yourself)."""
        with self._guard:
            if self.event.is_set():
                return False
            self._callbacks.append(callback)
            return True

    def fire(self, before: Callable[[], None] | None = None) -> list[Callable[[Any], None]]:
        """Set the event (once); returns the callbacks to run, [] if it was already set.
        ``before`` runs under the guard just before the event is set."""
        with self._guard:
            if self.event.is_set():
                return []
            if before is not None:
                before()
            self.event.set()
            callbacks, self._callbacks = self._callbacks, []
            return callbacks
