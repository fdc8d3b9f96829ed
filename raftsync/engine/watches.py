"""Watches: the app asked to hear about every change of some key (a key prefix, a
group name, ...) in commit order.

Runs on the tick thread like the rest of the engine, right after each apply. A watch
kind is declared by a machine table (``WatchKind``: a bounded history, how an entry
matches the watched key, what the watcher is sent). Every watch resumes from that
history: live, after each apply; from ``from_revision`` when it starts; after a
snapshot install, replaying what the snapshot skipped. Where the history no longer
reaches back far enough the watch reports ``compacted``: a watcher never silently
skips a change.
"""

from __future__ import annotations

from typing import Any, Callable

from ..channel import Msg
from ..machine import StateMachine
from ..machine.table import WatchKind

_NOTHING = object()


class _Watch:
    __slots__ = ("kind", "key", "covered", "last_payload")

    def __init__(self, kind: str, key: str, covered: int) -> None:
        self.kind = kind
        self.key = key
        self.covered = covered  # every change up to this revision has been sent
        self.last_payload: Any = _NOTHING


class Watches:
    def __init__(self, send: Callable[[list[Any]], None]) -> None:
        self._send = send
        self._watches: dict[int, _Watch] = {}

    def add(self, machine: StateMachine, watch_id: int, kind: str, key: str, from_revision: int | None) -> None:
        spec = machine.watch_kinds.get(kind)
        if spec is None or not isinstance(key, str) or not (from_revision is None or type(from_revision) is int):
            self._notify(watch_id, "invalid", f"unknown watch kind {kind!r} or bad arguments")
            return
        watch = self._watches[watch_id] = _Watch(kind, key, machine.index if from_revision is None
                                                 else from_revision)
        if spec.initial is not None and from_revision is None:
            # The current value first; a watch from a revision replays history instead
            # (sending the present first would then go back in time).
            watch.last_payload = spec.initial(key)
            self._notify(watch_id, kind, watch.last_payload)
        self._catch_up(machine, watch_id, watch)

    def remove(self, watch_id: int) -> None:
        self._watches.pop(watch_id, None)

    def _notify(self, watch_id: int, kind: str, payload: Any) -> None:
        self._send([Msg.NOTIFY, ["watch", watch_id, kind, payload]])

    def _catch_up(self, machine: StateMachine, watch_id: int, watch: _Watch) -> None:
        # Looked up each time: a snapshot install replaces the machine and its tables.
        spec: WatchKind = machine.watch_kinds[watch.kind]
        history = spec.history()
        if history.last_revision > watch.covered:
            changes = history.since(watch.covered, lambda entry_key: spec.match(watch.key, entry_key))
            if changes is None:
                self._notify(watch_id, "compacted", history.compacted_revision)
                del self._watches[watch_id]
                return
            for entry in changes:
                payload = spec.payload(entry)
                if payload != watch.last_payload:
                    watch.last_payload = payload
                    self._notify(watch_id, watch.kind, payload)
        watch.covered = max(watch.covered, machine.index)

    def on_applied(self, machine: StateMachine) -> None:
        """After each apply, and after a snapshot replaced the machine."""
        for watch_id, watch in list(self._watches.items()):
            self._catch_up(machine, watch_id, watch)
