"""Test-only fault injection on the Raft messages a node receives.

Inert unless a test sets a hook through the engine, which refuses hooks unless the
node's config has ``test_hooks=True``. Every hook acts on messages *arriving* at this
node, after the transport decoded them, so TCP connections stay up (bytes keep
flowing, nothing times out) and a message held here survives its sender's death.
Setting a hook on every member gives a symmetric fault (e.g. a partition).

Hooks (``configure(name, args)``; each returns ``stats()``):

- ``cut`` ``{"peers": [address, ...]}``: drop every Raft message from these peers
  (replaces the previous set; ``[]`` heals).
- ``delay_appends`` ``{"peers": [...], "delay": seconds or None, "duplicate": bool,
  "count": n or None, "with_entries": bool}``: append_entries from these peers are held
  and delivered ``delay`` seconds later (None: only on ``release_held``); with
  ``duplicate`` the original is delivered at once and the held copy is a stale
  duplicate. ``count`` limits how many messages are affected (None: all until
  cleared); ``with_entries`` affects only appends that carry log entries.
- ``release_held`` ``{}``: deliver every held message now.
- ``withhold_snapshot`` ``{"peers": [...], "count": n or None}``: append_entries that
  carry a snapshot chunk arrive as the leader sends them while its snapshot is not
  ready (``serialized`` None).
- ``clear`` ``{}``: remove every hook and drop held messages.
- ``stats`` ``{}``: just the counters.

Runs on PySyncObj's tick thread (called from the transport).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

log = logging.getLogger("raftsync.engine.faults")


class InboundFaults:
    def __init__(self, deliver: Callable[[Any, Any], None]) -> None:
        self._deliver = deliver
        self._cut: set[str] = set()
        self._delay: dict[str, Any] | None = None
        self._withhold: dict[str, Any] | None = None
        self._held: list[tuple[float, Any, Any]] = []  # (due, node, message), in arrival order
        self._counts = {"dropped": 0, "held": 0, "duplicated": 0, "withheld_snapshots": 0}

    @property
    def active(self) -> bool:
        return bool(self._cut or self._delay or self._withhold or self._held)

    def configure(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name == "cut":
            self._cut = set(args.get("peers") or [])
        elif name == "delay_appends":
            self._delay = {"peers": set(args.get("peers") or []), "delay": args.get("delay"),
                           "duplicate": bool(args.get("duplicate")), "count": args.get("count"),
                           "with_entries": bool(args.get("with_entries"))}
        elif name == "release_held":
            self._release(all_due=True)
        elif name == "withhold_snapshot":
            self._withhold = {"peers": set(args.get("peers") or []), "count": args.get("count")}
        elif name == "clear":
            self._cut, self._delay, self._withhold, self._held = set(), None, None, []
        elif name != "stats":
            raise ValueError(f"unknown transport hook {name!r}")
        return self.stats()

    def stats(self) -> dict[str, Any]:
        return {**self._counts, "holding": len(self._held), "cut": sorted(self._cut)}

    def receive(self, node: Any, message: Any) -> None:
        """Deliver, drop, hold or alter one message from ``node``."""
        address = getattr(node, "address", None)
        if address in self._cut:
            self._counts["dropped"] += 1
            return
        is_append = isinstance(message, dict) and message.get("type") == "append_entries"
        if is_append and self._matches(self._withhold, address) and message.get("serialized") is not None:
            self._use(self._withhold)
            self._counts["withheld_snapshots"] += 1
            message = {k: v for k, v in message.items() if k != "serialized"}
        delay = self._delay
        if is_append and self._matches(delay, address) and (message.get("entries") or not delay["with_entries"]):
            self._use(delay)
            due = float("inf") if delay["delay"] is None else time.monotonic() + delay["delay"]
            self._held.append((due, node, message))
            self._counts["held"] += 1
            if not delay["duplicate"]:
                return
            self._counts["duplicated"] += 1
        self._deliver(node, message)

    def tick(self) -> None:
        if self._held:
            self._release(all_due=False)

    @staticmethod
    def _matches(rule: dict[str, Any] | None, address: str | None) -> bool:
        return bool(rule) and address in rule["peers"] and (rule["count"] is None or rule["count"] > 0)

    @staticmethod
    def _use(rule: dict[str, Any]) -> None:
        if rule["count"] is not None:
            rule["count"] -= 1

    def _release(self, all_due: bool) -> None:
        now = time.monotonic()
        due = [h for h in self._held if all_due or h[0] <= now]
        if not due:
            return
        self._held = [h for h in self._held if not (all_due or h[0] <= now)]
        for _, node, message in due:
            if getattr(node, "address", None) in self._cut:
                self._counts["dropped"] += 1
                continue
            try:
                self._deliver(node, message)
            except Exception:
                log.exception("delivering a held Raft message raised")
