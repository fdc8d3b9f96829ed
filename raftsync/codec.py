"""The wire form of state-machine commands, results and queries (msgpack, versioned).

A command is ``bytes([CODEC_VERSION]) + msgpack([op, session_id, seq, acked_below, args])``.
``session_id``/``seq``/``acked_below`` implement exactly-once application of retried
commands (Raft thesis §6.3): the machine keeps each session's results for seqs at or
above ``acked_below``. Commands proposed by the engine itself (keepalives, expiries,
barriers) use session 0 and are naturally idempotent.

A result is ``msgpack([status, payload])``; ``status`` is :class:`Status`. Results are
bytes so a retried command returns the byte-identical original answer.

Every command is kept well under PySyncObj's 64 KiB append-entries batch so a single
entry never needs a chunked transmission.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import msgpack

from .errors import BadRequest, Conflict, NotFound, NotHeld, RaftsyncError, SessionExpired, TooLarge

CODEC_VERSION = 1
MAX_COMMAND_BYTES = 48 * 1024
MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 32 * 1024
MAX_NAME_BYTES = 256
# SESSION_EXPIRED's payload when the machine still knows the ended session's results and
# this command is not among them: it never applied and never will.
NOT_APPLIED = "not applied"


class Op(IntEnum):
    """Command opcodes. Numbers are part of the log format: never renumber."""

    OPEN_SESSION = 1
    KEEPALIVE = 2
    CLOSE_SESSION = 3
    EXPIRE_SESSION = 4
    BARRIER = 5
    KV_PUT = 10
    KV_DELETE = 11
    KV_EXPIRE = 12
    LOCK_ACQUIRE = 20
    LOCK_RELEASE = 21
    LOCK_WITHDRAW = 22
    LEADER_CAMPAIGN = 30
    LEADER_RESIGN = 31
    LEADER_WITHDRAW = 32
    LEADER_PROCLAIM = 33
    SEM_ACQUIRE = 40
    SEM_RELEASE = 41
    SEM_WITHDRAW = 42
    RW_ACQUIRE = 43
    RW_RELEASE = 44
    RW_WITHDRAW = 45
    EVENTS_PUBLISH = 60
    EVENTS_COMMIT = 61
    EVENTS_CONFIGURE = 62
    EVENTS_DELETE = 63
    EVENTS_DELETE_GROUP = 64
    EVENTS_TRIM = 65
    TASK_SUBMIT = 50
    TASK_WORKER = 51
    TASK_COMPLETE = 52
    TASK_FAIL = 53
    TASK_PROGRESS = 54
    TASK_CANCEL = 55
    TASK_EXPIRE = 56
    TASK_SCHEDULE = 57
    TASK_SLOT = 58
    TASK_TICK = 59


class Query(IntEnum):
    """Read-only queries, run against a replica's machine (never logged)."""

    KV_GET = 1
    KV_RANGE = 2
    SESSION_INFO = 3
    LOCK_INFO = 4
    LEADER_INFO = 5
    LEADER_QUEUE = 6
    SEM_INFO = 7
    RW_INFO = 8
    EVENTS_READ = 20
    EVENTS_INFO = 21
    TASK_JOB = 15
    TASK_INFO = 16
    TASK_SCHEDULES = 17


class Status(IntEnum):
    """Result status codes. Numbers are part of the log format: never renumber."""

    OK = 0
    BAD_COMMAND = 1
    SESSION_EXPIRED = 2
    STALE = 3
    NOT_FOUND = 4
    CONFLICT = 5
    NOT_HELD = 6
    TOO_LARGE = 7
    INTERNAL = 8


def encode_command(op: int, session_id: int, seq: int, acked_below: int, args: list[Any]) -> bytes:
    """Encode a command; raises :class:`TooLarge` past ``MAX_COMMAND_BYTES``."""
    data = bytes((CODEC_VERSION,)) + msgpack.packb([int(op), session_id, seq, acked_below, args], use_bin_type=True)
    if len(data) > MAX_COMMAND_BYTES:
        raise TooLarge(f"command is {len(data)} bytes, limit {MAX_COMMAND_BYTES}")
    return data


def decode_command(data: bytes) -> tuple[int, int, int, int, list[Any]]:
    """Decode a command; raises ValueError on anything malformed (the machine maps it to BAD_COMMAND)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 2:
        raise ValueError("not a command")
    if len(data) > MAX_COMMAND_BYTES:
        raise ValueError("command too large")
    if data[0] != CODEC_VERSION:
        raise ValueError(f"unknown codec version {data[0]}")
    body = msgpack.unpackb(data[1:], raw=False, strict_map_key=True, max_bin_len=MAX_COMMAND_BYTES,
                           max_str_len=MAX_COMMAND_BYTES, max_array_len=4096, max_map_len=4096)
    if not isinstance(body, list) or len(body) != 5:
        raise ValueError("command must be a 5-element array")
    op, session_id, seq, acked_below, args = body
    for field in (op, session_id, seq, acked_below):
        if type(field) is not int or field < 0:
            raise ValueError("command header fields must be non-negative integers")
    if not isinstance(args, list):
        raise ValueError("command args must be an array")
    return op, session_id, seq, acked_below, args


def encode_result(status: int, payload: Any = None) -> bytes:
    return msgpack.packb([int(status), payload], use_bin_type=True)


def decode_result(data: bytes) -> tuple[int, Any]:
    status, payload = msgpack.unpackb(data, raw=False)
    return status, payload


def encode_query(query: int, args: list[Any]) -> bytes:
    return msgpack.packb([int(query), args], use_bin_type=True)


def decode_query(data: bytes) -> tuple[int, list[Any]]:
    body = msgpack.unpackb(data, raw=False)
    if not isinstance(body, list) or len(body) != 2 or type(body[0]) is not int or not isinstance(body[1], list):
        raise ValueError("malformed query")
    return body[0], body[1]


def check_key(key: Any, what: str = "key") -> str:
    """Validate a user key/name: a non-empty str of at most MAX_KEY_BYTES UTF-8 bytes."""
    if not isinstance(key, str):
        raise BadRequest(f"{what} must be str, not {type(key).__name__}")
    if not key:
        raise BadRequest(f"{what} must not be empty")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise TooLarge(f"{what} is over {MAX_KEY_BYTES} bytes")
    return key


def check_value(value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise BadRequest(f"value must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) > MAX_VALUE_BYTES:
        raise TooLarge(f"value is {len(value)} bytes, limit {MAX_VALUE_BYTES}")
    return value


def pack_value(value: Any, what: str, limit: int) -> bytes:
    """A user's msgpack value (a task payload, an event) as bytes; BadRequest if msgpack
    cannot encode it, TooLarge over ``limit`` bytes encoded."""
    try:
        data = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"{what} must be a msgpack value: {exc}") from None
    if len(data) > limit:
        raise TooLarge(f"{what} is {len(data)} bytes encoded, limit {limit}")
    return data


def unpack_value(data: bytes | None) -> Any:
    """The value ``pack_value`` made (None stays None). Bytes that are not msgpack (a raw
    command, not this API) are handed over as they are rather than stop a reader."""
    if data is None:
        return None
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return data


def raise_for_status(status: int, payload: Any, what: str = "") -> None:
    """Turn a machine result status into the matching typed exception."""
    if status == Status.OK:
        return
    detail = f"{what}: {payload}" if payload not in (None, []) else what
    if status == Status.NOT_FOUND:
        raise NotFound(what or "not found")
    if status == Status.CONFLICT:
        raise Conflict(detail)
    if status == Status.NOT_HELD:
        raise NotHeld(what or "not held")
    if status == Status.SESSION_EXPIRED:
        raise SessionExpired(what or "session expired")
    if status == Status.TOO_LARGE:
        raise TooLarge(detail)
    if status == Status.BAD_COMMAND:
        raise BadRequest(detail)
    raise RaftsyncError(f"state machine answered {Status(status).name}: {detail}")
