"""The channel between an application's replica and its engine: msgpack frames.

A frame is a 4-byte big-endian length followed by a msgpack array whose first
element is a message kind (:class:`Msg`). The same frames run over the socketpair to
the engine process, the socketpair to an in-process engine thread, and (later) a
Unix/TCP socket for client mode.

App -> engine:  HELLO config | SUBMIT req command | READ req query linearizable |
                OWN session_id ttl_ms | DISOWN session_id | PING | STATUS req |
                TEST_DROP_REPLY count | WATCH watch_id kind key from_revision |
                UNWATCH watch_id | CLOSE
Engine -> app:  READY info | FATAL message | RESULT req bytes | FAILED req reason |
                NOTIFY effect | STATE role leader term has_quorum
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import deque
from enum import IntEnum
from typing import Any, Iterator

import msgpack

from .errors import Closed, TooLarge

MAX_FRAME_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")


class Msg(IntEnum):
    HELLO = 1
    SUBMIT = 2
    READ = 3
    OWN = 4
    DISOWN = 5
    PING = 6
    STATUS = 7
    CLOSE = 8
    TEST_DROP_REPLY = 9
    WATCH = 10
    UNWATCH = 11
    READY = 20
    FATAL = 21
    RESULT = 22
    FAILED = 23
    NOTIFY = 24
    STATE = 25


class Failure(IntEnum):
    """Why the engine could not deliver a command's result. All but REJECTED mean
    *unknown outcome*: the command may still apply, so the replica retries it."""

    NO_LEADER = 1
    LEADER_CHANGED = 2
    DISCARDED = 3
    QUEUE_FULL = 4
    UNKNOWN = 5
    REJECTED = 6


def pack_frame(message: list[Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise TooLarge(f"frame of {len(body)} bytes is over {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


class ChannelClosed(Closed, OSError):
    """The channel to the engine is closed (the node was closed or its engine exited)."""


class FrameDecoder:
    """Incremental decoder: feed bytes, iterate complete messages."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> Iterator[list[Any]]:
        self._buffer += data
        while len(self._buffer) >= 4:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self._max_frame:
                raise TooLarge(f"peer sent a frame of {length} bytes")
            if len(self._buffer) < 4 + length:
                return
            body = bytes(self._buffer[4:4 + length])
            del self._buffer[:4 + length]
            message = msgpack.unpackb(body, raw=False, strict_map_key=False)
            if not isinstance(message, list) or not message:
                raise ValueError("frame is not a non-empty array")
            yield message


class BlockingChannel:
    """The app's end: thread-safe sends, one reader calling :meth:`recv`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sock.setblocking(True)
        self._send_lock = threading.Lock()
        self._decoder = FrameDecoder()
        self._pending: deque[list[Any]] = deque()
        self._closed = False

    def send(self, message: list[Any]) -> None:
        frame = pack_frame(message)
        with self._send_lock:
            if self._closed:
                raise ChannelClosed("channel to the engine is closed")
            try:
                self._sock.sendall(frame)
            except OSError as exc:
                raise ChannelClosed(f"channel to the engine is closed: {exc}") from None

    def recv(self) -> list[Any] | None:
        """Next message, or None at EOF."""
        while not self._pending:
            try:
                data = self._sock.recv(256 * 1024)
            except OSError:
                return None
            if not data:
                return None
            self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()

    def abandon(self) -> None:
        """In a forked child: drop this process's copy of the socket without a word to the
        engine. close() only: shutdown() would act on the socket the parent still uses.
        The send lock is replaced, not taken: a parent thread may have held it at the fork."""
        self._send_lock = threading.Lock()
        self._closed = True
        self._sock.close()

    def close(self) -> None:
        with self._send_lock:
            self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
