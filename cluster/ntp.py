"""A small NTP server on loopback for tests and the demo (there is no internet here).

``NtpResponder(offset=0.5)`` answers NTPv1-4 client requests (mode 3) with server
replies (mode 4) whose clock runs ``offset`` seconds ahead of this host's, claiming the
given root delay, root dispersion, stratum, precision and leap indicator; it echoes the
request's transmit timestamp byte for byte as the origin timestamp, as RFC 5905 asks.
``answer=False`` binds the port and never reads it: a dead server that never answers.
``return_delay`` holds each reply after stamping it, like a slow return path, so the
measured offset is wrong by return_delay/2 and the round trip shows it.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from typing import Any

NTP_DELTA = 2208988800          # seconds from 1900-01-01 (NTP epoch) to 1970-01-01
_HEADER = struct.Struct("!B B b b I I 4s")


def _ntp_bytes(unix_seconds: float) -> bytes:
    seconds = int(unix_seconds)
    fraction = int((unix_seconds - seconds) * 2 ** 32) & 0xFFFFFFFF
    return struct.pack("!II", seconds + NTP_DELTA, fraction)


def _short(seconds: float) -> int:
    """NTP's 16.16 fixed point (root delay and root dispersion)."""
    return min(0xFFFFFFFF, int(round(seconds * 2 ** 16)))


class NtpResponder:
    def __init__(self, offset: float = 0.0, *, root_delay: float = 0.0, root_dispersion: float = 0.001,
                 stratum: int = 2, precision: int = -20, leap: int = 0, return_delay: float = 0.0,
                 answer: bool = True, host: str = "127.0.0.1", port: int = 0) -> None:
        self.offset = offset
        self.root_delay = root_delay
        self.root_dispersion = root_dispersion
        self.stratum = stratum
        self.precision = precision
        self.leap = leap
        self.return_delay = return_delay
        self.answer = answer
        self.answered = 0
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((host, port))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"{host}:{port}"

    def start(self) -> "NtpResponder":
        if self.answer and self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"ntp-responder-{self.address}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._socket.close()

    def __enter__(self) -> "NtpResponder":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._socket], [], [], 0.05)
            if not readable:
                continue
            try:
                request, client = self._socket.recvfrom(512)
            except OSError:
                return
            received = time.time() + self.offset
            if len(request) < 48 or request[0] & 0x7 != 3:
                continue                     # not a client request: a real server ignores it
            version = request[0] >> 3 & 0x7
            header = _HEADER.pack(self.leap << 6 | version << 3 | 4, self.stratum, 4, self.precision,
                                  _short(self.root_delay), _short(self.root_dispersion), b"LOCL")
            reference = _ntp_bytes(received - 1.0)
            reply = header + reference + request[40:48] + _ntp_bytes(received) + _ntp_bytes(time.time() + self.offset)
            if self.return_delay:
                self._stop.wait(self.return_delay)
            try:
                self._socket.sendto(reply, client)
                self.answered += 1
            except OSError:
                return
