"""A stream of changes the engine pushes for one watch (KV prefix or leader group)."""

from __future__ import annotations

import itertools
import queue
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import BadRequest, Closed, Compacted, Timeout

T = TypeVar("T")
_watch_ids = itertools.count(1)
_END = object()


def new_watch_id() -> int:
    """A watch id unique in this process (the replica routes pushed changes by it)."""
    return next(_watch_ids)


class WatchStream(Generic[T]):
    """Iterate to receive changes in commit order; ``get(timeout)`` for one; ``close()`` to stop.

    Raises Compacted if the requested history was already trimmed, Closed if the node closed.
    """

    def __init__(self, replica: Any, kind: str, key: str, from_revision: int | None,
                 convert: Callable[[str, Any], T]) -> None:
        self.id = new_watch_id()
        self._replica = replica
        self._convert = convert
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        replica.watch(self.id, kind, key, from_revision, self._deliver)

    def _deliver(self, kind: str, payload: Any) -> None:
        """Reader thread: queue one pushed change (or the end of the stream)."""
        if kind == "compacted":
            self._queue.put(Compacted(f"history before revision {payload} has been trimmed"))
            self._queue.put(_END)
        elif kind == "invalid":
            self._queue.put(BadRequest(f"watch rejected by the engine: {payload}"))
            self._queue.put(_END)
        elif kind == "closed":
            self._queue.put(Closed("the node closed"))
            self._queue.put(_END)
        else:
            self._queue.put(self._convert(kind, payload))

    def get(self, timeout: float | None = None) -> T:
        """The next change; raises Timeout if none arrives in time, StopIteration once closed."""
        self._replica.check_owner()  # in a forked child nothing would ever arrive
        if self._closed and self._queue.empty():
            raise StopIteration
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise Timeout(f"no change within {timeout}s") from None
        if item is _END:
            self._closed = True
            raise StopIteration
        if isinstance(item, Exception):
            self.close()
            raise item
        return item

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                yield self.get()
            except StopIteration:
                return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._replica.remove_watch(self.id)
        self._queue.put(_END)

    def __enter__(self) -> "WatchStream[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
