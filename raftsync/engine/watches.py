"""Watches: the app asked to hear about every change of a key prefix or a leader group.

Runs on the tick thread like the rest of the engine, right after each apply, so a
watch sees changes in commit order with no gap between its replay and live events.
Both kinds resume from the machine's bounded histories (KV changes, leadership
changes): after a snapshot install they replay what the snapshot skipped, or report
``compacted`` — an observer never silently skips a change.
"""

from __future__ import annotations

from typing import Any, Callable

from ..channel import Msg
from ..machine import StateMachine

_LEADER_EFFECTS = ("leader_granted", "leader_released", "leader_changed")


class Watches:
    def __init__(self, send: Callable[[list[Any]], None]) -> None:
        self._send = send
        self._kv: dict[int, list[Any]] = {}      # watch id -> [prefix, last revision sent or covered]
        self._leader: dict[int, list[Any]] = {}  # watch id -> [group, last revision covered, last info sent]

    def add(self, machine: StateMachine, watch_id: int, kind: str, key: str, from_revision: int | None) -> None:
        if kind == "kv":
            start = machine.index if from_revision is None else from_revision
            self._kv[watch_id] = [key, start]
            self._catch_up(machine, watch_id)
        elif kind == "leader":
            info = machine.leader_info(key)
            self._leader[watch_id] = [key, machine.index, info]
            self._notify(watch_id, "leader", info)

    def remove(self, watch_id: int) -> None:
        self._kv.pop(watch_id, None)
        self._leader.pop(watch_id, None)

    def _notify(self, watch_id: int, kind: str, payload: Any) -> None:
        self._send([Msg.NOTIFY, ["watch", watch_id, kind, payload]])

    def _catch_up(self, machine: StateMachine, watch_id: int) -> None:
        prefix, last = self._kv[watch_id]
        changes = machine.kv.changes_since(last, prefix)
        if changes is None:
            self._notify(watch_id, "compacted", machine.kv.compacted_revision)
            del self._kv[watch_id]
            return
        for change in changes:
            self._notify(watch_id, "kv", change)
        self._kv[watch_id][1] = max(last, machine.index)

    def on_effects(self, machine: StateMachine, effects: list) -> None:
        if not self._kv and not self._leader:
            return
        for effect in effects:
            kind = effect[0]
            if kind in ("kv_put", "kv_delete") and self._kv:
                key, revision = effect[1], effect[2]
                record = machine.kv.records.get(key) if kind == "kv_put" else None
                change = [revision, key, record[0], record[1]] if record else [revision, key, None, 0]
                for watch_id, watch in self._kv.items():
                    if key.startswith(watch[0]) and revision > watch[1]:
                        watch[1] = revision
                        self._notify(watch_id, "kv", change)
            elif kind in _LEADER_EFFECTS and self._leader:
                for watch_id, watch in list(self._leader.items()):
                    if watch[0] == effect[1]:
                        self._leader_catch_up(machine, watch_id)

    def _leader_catch_up(self, machine: StateMachine, watch_id: int) -> None:
        watch = self._leader[watch_id]
        group = watch[0]
        changes = machine.leader_history.since(watch[1], lambda name: name == group)
        if changes is None:
            self._notify(watch_id, "compacted", machine.leader_history.compacted_revision)
            del self._leader[watch_id]
            return
        for _, _, info in changes:
            if info != watch[2]:
                watch[2] = info
                self._notify(watch_id, "leader", info)
        watch[1] = max(watch[1], machine.index)

    def on_restored(self, machine: StateMachine) -> None:
        for watch_id in list(self._kv):
            self._catch_up(machine, watch_id)
        for watch_id in list(self._leader):
            self._leader_catch_up(machine, watch_id)
