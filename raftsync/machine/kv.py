"""The replicated key/value map, its change history and per-record TTLs.

Every key carries a ``version`` (writes since it was created, starting at 1) and a
``revision`` (the machine index of its last change, strictly increasing across the
whole map, like etcd's mod_revision). ``if_version`` makes a write or delete a
compare-and-set: ``0`` means "must not exist".

A record may carry a TTL; the machine only stores it. The Raft leader measures it on
its monotonic clock from when it applied the write and proposes ``KV_EXPIRE`` naming
the revision it saw, so a newer write always wins over a stale expiry.

The history (every change, oldest first, bounded by count and bytes) lets a watch
resume from a revision in commit order, including across a snapshot install; a
revision older than what is kept raises Compacted.
"""

from __future__ import annotations

from typing import Any, Callable

from ..codec import MAX_KEY_BYTES, MAX_VALUE_BYTES, Op, Query, Status, encode_result
from .effects import RecordDeleted, RecordWritten
from .history import History
from .sessions import MAX_TTL_MS
from .table import Context, Invalid, Reader, Table, WatchKind, arity, bytes_arg, int_arg, str_arg

HISTORY_MAX_ENTRIES = 10000
HISTORY_MAX_BYTES = 16 * 1024 * 1024


OK = encode_result(Status.OK)


class KeyValue(Table):
    name = "kv"
    expiry_ops = {"kv": Op.KV_EXPIRE}

    def __init__(self) -> None:
        # key -> [value, version, revision, ttl_ms or 0]
        self.records: dict[str, list[Any]] = {}
        # [revision, key, value or None (deleted), version]
        self.history = History(HISTORY_MAX_ENTRIES, HISTORY_MAX_BYTES)


    # -- the table interface ------------------------------------------------------------

    def commands(self) -> dict[int, Callable[[Context, int, list[Any]], bytes]]:
        return {Op.KV_PUT: self._put_command, Op.KV_DELETE: self._delete_command}

    def engine_commands(self) -> dict[int, Callable[[Context, list[Any]], bytes]]:
        return {Op.KV_EXPIRE: self._expire_command}

    def queries(self) -> dict[int, Callable[[list[Any], Reader], bytes]]:
        return {Query.KV_GET: self._get_query, Query.KV_RANGE: self._range_query}

    def watch_kinds(self) -> dict[str, WatchKind]:
        return {"kv": WatchKind(history=lambda: self.history, match=lambda prefix, key: key.startswith(prefix),
                                payload=lambda entry: entry)}

    def deadlines(self):
        for key, (_, _, revision, ttl_ms) in self.records.items():
            if ttl_ms:
                yield "kv", key, revision, ttl_ms / 1000.0

    def _put_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (3, 4), "KV_PUT takes [key, value, if_version, ttl_ms?]")
        key = str_arg(args[0], MAX_KEY_BYTES, "key")
        value = bytes_arg(args[1], MAX_VALUE_BYTES, "value")
        ttl_ms = 0
        if len(args) == 4 and args[3] is not None:
            ttl_ms = int_arg(args[3], "ttl_ms", 1)
            if ttl_ms > MAX_TTL_MS:
                raise Invalid(f"ttl_ms must be at most {MAX_TTL_MS}")
        ok, payload = self.put(key, value, _optional_version(args[2]), ttl_ms, ctx.index)
        if not ok:
            return encode_result(Status.CONFLICT, payload)
        ctx.effects.append(RecordWritten("kv_put", key, ctx.index, ttl_ms))
        return encode_result(Status.OK, payload)

    def _delete_command(self, ctx: Context, session_id: int, args: list[Any]) -> bytes:
        arity(args, (2,), "KV_DELETE takes [key, if_version]")
        key = str_arg(args[0], MAX_KEY_BYTES, "key")
        outcome, payload = self.delete(key, _optional_version(args[1]), ctx.index)
        if outcome == "not_found":
            return encode_result(Status.NOT_FOUND)
        if outcome == "conflict":
            return encode_result(Status.CONFLICT, payload)
        ctx.effects.append(RecordDeleted("kv_delete", key, ctx.index))
        return encode_result(Status.OK, payload)

    def _expire_command(self, ctx: Context, args: list[Any]) -> bytes:
        arity(args, (2,), "KV_EXPIRE takes [key, revision]")
        key = str_arg(args[0], MAX_KEY_BYTES, "key")
        if not self.expire(key, int_arg(args[1], "revision"), ctx.index):
            return encode_result(Status.STALE)
        ctx.effects.append(RecordDeleted("kv_delete", key, ctx.index))
        return OK

    def _get_query(self, args: list[Any], reader: Reader) -> bytes:
        record = self.get(str_arg(args[0], MAX_KEY_BYTES, "key"))
        if record is None:
            return encode_result(Status.NOT_FOUND, reader.index)
        return encode_result(Status.OK, _with_seconds_left(record, reader))

    def _range_query(self, args: list[Any], reader: Reader) -> bytes:
        if not isinstance(args[0], str):
            raise Invalid("prefix must be str")
        return encode_result(Status.OK, [_with_seconds_left(r, reader) for r in self.range(args[0])])

    # -- the map ----------------------------------------------------------------------

    def put(self, key: str, value: bytes, if_version: int | None, ttl_ms: int,
            index: int) -> tuple[bool, list[Any]]:
        """Returns (ok, [revision, version]) or (False, [current_version])."""
        record = self.records.get(key)
        current = record[1] if record is not None else 0
        if if_version is not None and if_version != current:
            return False, [current]
        version = current + 1
        self.records[key] = [value, version, index, ttl_ms]
        self._remember(index, key, value, version)
        return True, [index, version]

    def delete(self, key: str, if_version: int | None, index: int) -> tuple[str, list[Any]]:
        record = self.records.get(key)
        if record is None:
            return "not_found", []
        if if_version is not None and if_version != record[1]:
            return "conflict", [record[1]]
        del self.records[key]
        self._remember(index, key, None, 0)
        return "ok", [index]

    def expire(self, key: str, revision: int, index: int) -> bool:
        record = self.records.get(key)
        if record is None or record[2] != revision or not record[3]:
            return False
        del self.records[key]
        self._remember(index, key, None, 0)
        return True

    def _remember(self, revision: int, key: str, value: bytes | None, version: int) -> None:
        self.history.append([revision, key, value, version])


    def get(self, key: str) -> list[Any] | None:
        record = self.records.get(key)
        if record is None:
            return None
        return [key, record[0], record[1], record[2], record[3]]

    def range(self, prefix: str) -> list[list[Any]]:
        return [[key, r[0], r[1], r[2], r[3]] for key, r in sorted(self.records.items()) if key.startswith(prefix)]

    def to_state(self) -> dict[str, Any]:
        history = self.history.to_state()
        return {"records": [[key, *r] for key, r in sorted(self.records.items())],
                "history": history["entries"], "compacted": history["compacted"]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.records = {key: [value, version, revision, ttl_ms]
                        for key, value, version, revision, ttl_ms in state["records"]}
        self.history.load_state({"entries": state["history"], "compacted": state["compacted"]})


def _optional_version(value: Any) -> int | None:
    return None if value is None else int_arg(value, "if_version")


def _with_seconds_left(record: list[Any], reader: Reader) -> list[Any]:
    """A record as queries answer it: its TTL replaced by the reading node's estimate of
    the seconds left (the full TTL where it measures none; None without a TTL)."""
    key, value, version, revision, ttl_ms = record
    if not ttl_ms:
        return [key, value, version, revision, None]
    left = reader.remaining("kv", key, revision)
    return [key, value, version, revision, ttl_ms / 1000.0 if left is None else max(0.0, left)]
