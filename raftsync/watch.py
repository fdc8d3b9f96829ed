"""A stream of changes the engine pushes for one watch (KV prefix or leader group)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import BadRequest, Closed, Compacted, NoQuorum, Timeout
from .replica import deadline_after

T = TypeVar("T")
_watch_ids = itertools.count(1)
_END = object()


def new_watch_id() -> int:
    """A watch id unique in this process (the replica routes pushed changes by it)."""
    return next(_watch_ids)


class WatchStream(Generic[T]):
    """Iterate to receive changes in commit order; ``get(timeout)`` for one; ``close()`` to stop.

    Raises Compacted if the requested history was already trimmed, Closed if the node closed.
    Waiting for a change follows the NoQuorum rule of every wait: with no leader with a
    quorum (or this node's engine silent) for ``quorum_timeout``, ``get`` raises NoQuorum,
    also with ``timeout=None``; call it again to go on waiting (the watch stays).
    Iterating is a standing watcher: it waits through NoQuorum (``get(timeout)`` tells
    of a lost cluster) and ends only with ``close``, Compacted or Closed.
    """

    def __init__(self, replica: Any, kind: str, key: str, from_revision: int | None,
                 convert: Callable[[str, Any], T]) -> None:
        self.id = new_watch_id()
        self._replica = replica
        self._convert = convert
        # pushed changes (or an error, then _END); appended by the reader thread
        self._items: deque[Any] = deque()
        self._arrived = threading.Event()
        self._closed = False
        replica.watch(self.id, kind, key, from_revision, self._deliver)

    def _deliver(self, kind: str, payload: Any) -> None:
        """Reader thread: queue one pushed change (or the end of the stream)."""
        if kind == "compacted":
            self._put(Compacted(f"history before revision {payload} has been trimmed"), _END)
        elif kind == "invalid":
            self._put(BadRequest(f"watch rejected by the engine: {payload}"), _END)
        elif kind == "closed":
            self._put(Closed("the node closed"), _END)
        else:
            self._put(self._convert(kind, payload))

    def _put(self, *items: Any) -> None:
        self._items.extend(items)
        self._arrived.set()

    def get(self, timeout: float | None = None) -> T:
        """The next change; raises Timeout if none arrives in time, NoQuorum (see the class
        docstring), StopIteration once closed."""
        self._replica.check_owner()  # in a forked child nothing would ever arrive
        deadline = deadline_after(timeout)
        started = time.monotonic()
        while not self._items:
            if self._closed:
                raise StopIteration
            self._arrived.clear()
            if self._items:
                break  # arrived before the clear
            if not self._replica.wait_for(self._arrived, deadline, started):
                raise Timeout(f"no change within {timeout}s")
        item = self._items.popleft()
        if item is _END:
            self._closed = True
            raise StopIteration
        if isinstance(item, Exception):
            self.close()
            raise item
        return item

    def __iter__(self) -> Iterator[T]:
        return iterate_through_outages(self.get)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._replica.remove_watch(self.id)
        self._put(_END)

    def __enter__(self) -> "WatchStream[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def iterate_through_outages(get: Callable[[], T]) -> Iterator[T]:
    """Iterate ``get()`` until it raises StopIteration, waiting through NoQuorum (each get
    waits quorum_timeout before it says so: no busy loop), as watchers do."""
    while True:
        try:
            yield get()
        except StopIteration:
            return
        except NoQuorum:
            continue
