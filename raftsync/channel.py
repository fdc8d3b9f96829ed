"""The channel between an application's replica and its engine: msgpack frames.

A frame is a 4-byte big-endian length followed by a msgpack array whose first
element is a message kind (:class:`Msg`). The same frames run over the socketpair to
the engine process, the socketpair to an in-process engine thread, and (later) a
Unix/TCP socket for client mode.

App -> engine:  HELLO config | SUBMIT req command | READ req query linearizable |
                OWN session_id ttl_ms | DISOWN session_id | PING | STATUS req |
                WATCH watch_id kind key from_revision | UNWATCH watch_id |
                TEST_HOOK req name args (refused unless test_hooks) | CLOSE
Engine -> app:  READY info | FATAL message | RESULT req bytes | FAILED req reason |
                NOTIFY effect | STATE role leader term has_quorum
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections import deque
from enum import IntEnum
from typing import Any, Iterator

import msgpack

from .errors import Closed, Timeout, TooLarge

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
    # 9 was TEST_DROP_REPLY, replaced by TEST_HOOK
    WATCH = 10
    UNWATCH = 11
    TEST_HOOK = 12
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


class ChannelStalled(Timeout):
    """The engine has not read its channel for so long that the backlog is full: nothing
    of this call was sent before its deadline."""


# Frames waiting for a stalled engine beyond this make senders wait (up to their deadline).
MAX_BACKLOG_BYTES = 8 * 1024 * 1024


class BlockingChannel:
    """The app's end: thread-safe sends that never block past the caller's deadline, one
    reader calling :meth:`recv`.

    A send first tries the socket without blocking; what the socket does not take joins a
    backlog that a writer thread drains, so a stalled engine (SIGSTOPped, starved) never
    holds an application thread. Frames are never cut: once a frame is partly sent, the
    rest follows before any other frame.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sock.setblocking(True)
        self._space = threading.Condition()
        self._backlog = bytearray()
        self._writing = 0  # bytes taken by the writer thread and not yet on the socket
        self._writer: threading.Thread | None = None
        self._decoder = FrameDecoder()
        self._pending: deque[list[Any]] = deque()
        self._closed = False

    @property
    def backlog_bytes(self) -> int:
        return len(self._backlog) + self._writing

    def send(self, message: list[Any], deadline: float | None = None) -> None:
        """Queue ``message``; ``deadline`` (monotonic) bounds the wait for backlog space.
        ``None``: a small control frame, queued whatever the backlog holds."""
        frame = pack_frame(message)
        with self._space:
            while True:
                if self._closed:
                    raise ChannelClosed("channel to the engine is closed")
                backlog = self.backlog_bytes
                if backlog == 0 or deadline is None or backlog + len(frame) <= MAX_BACKLOG_BYTES:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChannelStalled(f"the engine has not read {backlog} bytes of its channel")
                self._space.wait(remaining)
            if backlog == 0:
                try:
                    sent = self._sock.send(frame, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    raise ChannelClosed(f"channel to the engine is closed: {exc}") from None
                if sent == len(frame):
                    return
                frame = frame[sent:]
            self._backlog += frame
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="raftsync-channel-writer",
                                                 daemon=True)
                self._writer.start()
            self._space.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._space:
                while not self._backlog and not self._closed:
                    self._space.wait()
                if self._closed:
                    return
                data, self._backlog = bytes(self._backlog), bytearray()
                self._writing = len(data)
            try:
                self._sock.sendall(data)
            except OSError:
                with self._space:
                    self._closed = True
                    self._writing = 0
                    self._space.notify_all()
                return
            with self._space:
                self._writing = 0
                self._space.notify_all()

    def recv(self) -> list[Any] | None:
        """Next message, or None at EOF."""
        while not self._pending:
            try:
                data = self._sock.recv(256 * 1024)
            except OSError:
                return None
            if not data:
                return None
            try:
                self._pending.extend(self._decoder.feed(data))
            except Exception as exc:  # a garbled stream cannot be resynchronised: treat as closed
                logging.getLogger("raftsync.channel").error("bad frame from the engine: %s", exc)
                return None
        return self._pending.popleft()

    def abandon(self) -> None:
        """In a forked child: drop this process's copy of the socket without a word to the
        engine. close() only: shutdown() would act on the socket the parent still uses.
        The send lock is replaced, not taken: a parent thread may have held it at the fork."""
        self._space = threading.Condition()
        self._backlog = bytearray()
        self._closed = True
        self._sock.close()

    def close(self) -> None:
        with self._space:
            self._closed = True
            self._space.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
