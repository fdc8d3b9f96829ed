"""What every table of the state machine declares, and the helpers tables share.

A table (sessions, kv, locks, elections, semaphores, ...) owns one part of the state and
declares to :class:`~raftsync.machine.StateMachine`, which loops over its tables:
- ``commands``: op -> handler(ctx, session_id, args) for commands a client session sends
  (applied at most once per (session, seq));
- ``engine_commands``: op -> handler(ctx, args) for session-free commands the engine
  proposes (expiries, ...), which must be idempotent;
- ``queries``: query kind -> handler(args, reader) -> result bytes (read-only);
- ``end_session(ctx, session_id)``: release what an ending session held;
- ``holdings()``: the grants that exist now, as effects (re-announced after a snapshot);
- ``deadlines()``: (kind, key, token, seconds) of every TTL a new Raft leader must measure;
  ``expiry_ops``: deadline kind -> the op that expires one, with args [key, token];
- ``watch_kinds``: watch kind -> WatchKind (a bounded history a watch resumes from);
- ``leader_duties()``: LeaderDuty objects for work only the Raft leader does with its
  own clocks (e.g. proposing due schedule slots), kept by the engine, not in the state;
- ``to_state()`` / ``load_state(state)``: its part of a snapshot, as msgpack-able data.

Handlers never raise except :class:`Invalid` for a malformed command (answered
BAD_COMMAND); they append effects to ``ctx.effects``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .history import History


class Invalid(Exception):
    """Raised by argument checks inside handlers; turned into BAD_COMMAND by apply."""


class Context:
    """What a handler sees of the command being applied."""

    __slots__ = ("index", "effects")

    def __init__(self, index: int, effects: list) -> None:
        self.index = index  # the machine index of this command: revision / fencing token
        self.effects = effects


@dataclass(frozen=True)
class WatchKind:
    """A kind of watch: resume from ``history``; ``match(key, entry_key)`` says whether an
    entry concerns the watched key; ``payload(entry)`` is what the watcher is sent;
    ``initial(key)``, if given, is sent first (the current value)."""

    history: Callable[[], History]
    match: Callable[[str, str], bool]
    payload: Callable[[list[Any]], Any]
    initial: Callable[[str], Any] | None = None


class LeaderDuty:
    """Leader-only work a table needs done with the Raft leader's clocks, outside the pure
    machine: the engine creates each once (``Table.leader_duties``), tells it when this
    node becomes leader, and on every tick while it leads asks it for commands to
    propose. It gets the clocks as arguments (it never reads one itself), must not block
    or raise, and must not propose the same thing on every tick: the machine
    de-duplicates what it applies, but the log should not fill with repeats."""

    def became_leader(self, machine: Any, monotonic_now: float, wall_now: float) -> None:
        """This node now leads; ``machine`` is the current state (it may be replaced by a
        snapshot later: always use the one passed in)."""

    def due(self, machine: Any, monotonic_now: float, wall_now: float) -> list[bytes]:
        """Commands (encoded) to propose now."""
        return []


def _no_remaining(kind: str, key: Any, token: int) -> float | None:
    return None


class Reader:
    """What a query sees beyond its table: the machine's index, and the reading node's
    estimate of a deadline's seconds left (None where it measures none), for display."""

    def __init__(self, remaining: Callable[[str, Any, int], float | None] = _no_remaining) -> None:
        self.remaining = remaining
        self.index = 0  # set by the machine for each query


class Table:
    name = ""
    expiry_ops: dict[str, int] = {}

    def commands(self) -> dict[int, Callable[[Context, int, list[Any]], bytes]]:
        return {}

    def engine_commands(self) -> dict[int, Callable[[Context, list[Any]], bytes]]:
        return {}

    def queries(self) -> dict[int, Callable[[list[Any], Reader], bytes]]:
        return {}

    def watch_kinds(self) -> dict[str, WatchKind]:
        return {}

    def end_session(self, ctx: Context, session_id: int) -> None:
        pass

    def holdings(self) -> Iterable[tuple]:
        return ()

    def leader_duties(self) -> list[LeaderDuty]:
        return []

    def deadlines(self) -> Iterable[tuple[str, Any, int, float]]:
        return ()

    def to_state(self) -> Any:
        raise NotImplementedError

    def load_state(self, state: Any) -> None:
        raise NotImplementedError


# -- argument checks shared by the tables ----------------------------------------------


def str_arg(value: Any, limit: int, what: str) -> str:
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > limit:
        raise Invalid(f"{what} must be a non-empty str of at most {limit} bytes")
    return value


def int_arg(value: Any, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise Invalid(f"{what} must be an int >= {minimum}")
    return value


def bool_arg(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"{what} must be a bool")
    return value


def bytes_arg(value: Any, limit: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) > limit:
        raise Invalid(f"{what} must be bytes of at most {limit}")
    return value


def arity(args: list[Any], counts: tuple[int, ...], usage: str) -> None:
    if len(args) not in counts:
        raise Invalid(usage)
