"""A hardened PySyncObj transport for the Raft port.

PySyncObj's own ``TCPTransport`` trusts whatever reaches the port: a 4-byte length
prefix of up to 2 GiB is buffered in full before anything is checked (a memory and,
through ``bytes +=`` re-copying, a CPU denial of service), silent connections that
never identify stay open forever, ``syncobj_admin`` utility commands are served to any
connection, and a message the handlers do not expect raises into the tick loop.

``RaftTransport`` keeps PySyncObj's wire (pickle, Fernet-encrypted when a password is
set) and its handshake, and adds limits around them:

- a frame whose declared length is negative or over ``MAX_FRAME_BYTES`` drops its
  connection as soon as the 4-byte prefix arrives; until a connection is trusted (an
  incoming one: it identified as a configured peer, which needs the password; an
  outgoing one: the peer's first frame decrypted), the limit is
  ``MAX_UNAUTHENTICATED_BYTES`` for a frame and, plus one recv, for all bytes received;
- a frame that fails decryption or unpickling drops its connection (as upstream), and
  any exception while handling a connection's events drops that connection instead of
  escaping into PySyncObj's tick loop;
- at most ``MAX_UNKNOWN_CONNECTIONS`` incoming connections may be waiting to identify
  (the oldest is closed), and each gets ``conf.connectionTimeout`` to do so;
- utility messages (``syncobj_admin``: status/add/remove/set_version/transfer) are
  refused: membership and leadership are managed through raftsync, not the Raft port.

It is the seam where a later issue replaces the pickle wire entirely: the engine only
passes ``transportClass=RaftTransport`` to ``SyncObj``.

Everything here runs on PySyncObj's tick thread. It relies on internals of
``pysyncobj==0.3.17`` (pinned exactly): the name-mangled ``_TcpConnection__*`` and
``_TcpServer__*`` members and ``TCPTransport``'s private helpers; each use says why.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import struct
import time

from pysyncobj.monotonic import monotonic as monotonicTime
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.tcp_server import TcpServer
from pysyncobj.transport import TCPTransport
from pysyncobj.dns_resolver import globalDnsResolver

from .faults import InboundFaults

log = logging.getLogger("raftsync.engine.transport")

# What PySyncObj really sends (with raftsync's settings): append_entries batches of
# entries until their command bytes reach appendEntriesBatchSizeBytes (64 KiB), so at
# most 64 KiB plus one entry (commands are <= codec.MAX_COMMAND_BYTES = 48 KiB);
# a single entry of >= 64 KiB would go in 64 KiB pieces; snapshots go in
# logCompactionBatchSize (64 KiB) chunks; forwarded commands are one command each.
# Pickle + zlib add little, Fernet adds base64 (x4/3) and ~60 bytes: frames stay under
# ~200 KiB. 8 MiB leaves 40x headroom and still bounds a connection's buffer.
MAX_FRAME_BYTES = 8 * 1024 * 1024
# Until a connection is trusted, its frames and (plus one recv) all its bytes stay
# under this. A real peer sends two ~150-byte frames first: its random key, then its
# address; only after the address can a big frame follow (in the same recv, perhaps).
MAX_UNAUTHENTICATED_BYTES = 64 * 1024
# Incoming connections that have not yet identified as a peer; more close the oldest.
MAX_UNKNOWN_CONNECTIONS = 64
# Once a whole frame is buffered, stop reading at this much so the parser runs first
# (upstream reads until the socket is empty, unbounded while the peer keeps sending,
# and its parser re-copies the rest of the buffer after every frame).
READ_AHEAD_BYTES = 256 * 1024
# Connections accepted per readiness event (upstream: one), and the listen backlog
# (upstream: 5), so that a flood of connects does not crowd out real peers.
ACCEPTS_PER_EVENT = 16
LISTEN_BACKLOG = 128
# accept() errors that concern one pending connection or a passing resource shortage;
# upstream unbinds the server for good on any of them, leaving the node deaf.
_TRANSIENT_ACCEPT_ERRORS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EMFILE,
                            errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_LENGTH = struct.Struct("i")  # upstream packs the length as a native signed int


class _Throttled:
    """Warn at most once per ``interval`` seconds, counting what was suppressed, so a
    hostile client cannot flood the engine's log."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        suppressed, self._suppressed, self._next = self._suppressed, 0, now + self._interval
        if suppressed:
            message += " (%d more Raft port warnings suppressed)"
            args += (suppressed,)
        log.warning(message, *args, exc_info=exc_info)


_warn = _Throttled()


class GuardedTcpConnection(TcpConnection):
    """A ``TcpConnection`` that validates frame lengths as bytes arrive, bounds what a
    sender not yet trusted may make it buffer, and never raises into the poller.

    Trusted (allowed frames up to ``MAX_FRAME_BYTES``): an outgoing connection once the
    peer's first frame decoded (we dialled a configured peer, and with a password only
    its holder can encrypt a frame), or at once without a password; an incoming one once
    the transport has accepted it as a configured peer (``identified``), since a
    captured first frame of another connection could be replayed but the identification
    that follows cannot.
    """

    def __init__(self, *args, incoming: bool = False, **kwargs) -> None:
        self._incoming = incoming
        self._resetTrust()
        super().__init__(*args, **kwargs)
        # A recv may carry the start of a trusted peer's first big frame along with its
        # identity, so the budget allows one recv on top of MAX_UNAUTHENTICATED_BYTES.
        self._untrustedBudget = MAX_UNAUTHENTICATED_BYTES + self._TcpConnection__recvBufferSize

    def _resetTrust(self) -> None:
        self._decodedFrame = False  # a frame of this connection decrypted and unpickled
        self.identified = False  # set by RaftTransport for an incoming configured peer
        self._untrustedBytes = 0

    @property
    def trusted(self) -> bool:
        if self._incoming:
            return self.identified
        # Without a password nothing authenticates anyone (and the first frame on an
        # outgoing connection may be a big append_entries), so there is nothing to wait for.
        return self._decodedFrame or self.encryptor is None

    # Why: connect() reuses this object for a new outgoing connection (upstream resets
    # its buffers there); the new peer has to earn trust afresh.
    def connect(self, host, port):
        self._resetTrust()
        return super().connect(host, port)

    # Why: upstream's poller callback (reads, parses, and runs the transport's and
    # SyncObj's message callbacks) lets any exception escape into SyncObj._onTick,
    # which aborts that tick and sleeps. A connection whose events raise is dropped.
    def _TcpConnection__processConnection(self, descr, eventType):
        try:
            TcpConnection._TcpConnection__processConnection(self, descr, eventType)
        except Exception:
            _warn.warning("dropping a Raft connection whose input raised", exc_info=True)
            self._drop(None)

    # Why: upstream reads until the socket is empty, appending to its buffer without
    # looking at it. Validate the buffered frame header and the untrusted budget after
    # every read, and stop reading once a whole frame is ready for parsing.
    def _TcpConnection__processRead(self):
        if not self._wantsMoreData():
            return False
        before = len(self._TcpConnection__readBuffer)
        if not TcpConnection._TcpConnection__processRead(self):
            return False
        if not self.trusted:
            self._untrustedBytes += len(self._TcpConnection__readBuffer) - before
        return self._wantsMoreData()

    # Why: upstream parses a frame of any declared length (negative ones included) and
    # gives no sign that a frame decoded, which is the first step to trust.
    def _TcpConnection__processParseMessage(self):
        problem = self._headerProblem()
        if problem:
            self._drop(problem)
            return None
        message = TcpConnection._TcpConnection__processParseMessage(self)
        if message is not None:
            self._decodedFrame = True
        return message

    def _frameLimit(self) -> int:
        return MAX_FRAME_BYTES if self.trusted else MAX_UNAUTHENTICATED_BYTES

    def _headerProblem(self) -> str | None:
        buffer = self._TcpConnection__readBuffer
        if len(buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(buffer)
        if length < 0 or length > self._frameLimit():
            return f"declared frame length {length} (limit {self._frameLimit()})"
        return None

    def _wantsMoreData(self) -> bool:
        """False: stop reading, because the connection was dropped or a whole frame is
        buffered (and, for a trusted connection, the buffer is already large)."""
        trusted = self.trusted
        if not trusted and self._untrustedBytes > self._untrustedBudget:
            return self._drop(f"over {self._untrustedBudget} bytes before it was trusted")
        problem = self._headerProblem()
        if problem:
            return self._drop(problem)
        buffer = self._TcpConnection__readBuffer
        if len(buffer) < _LENGTH.size:
            return True
        incomplete = len(buffer) < _LENGTH.size + _LENGTH.unpack_from(buffer)[0]
        # Untrusted: parse (and perhaps identify) each frame before reading on.
        return incomplete or (trusted and len(buffer) < READ_AHEAD_BYTES)

    def _drop(self, reason: str | None) -> bool:
        if reason:
            _warn.warning("dropping a Raft connection: %s", reason)
        try:
            self.disconnect()
        except Exception:
            _warn.warning("disconnecting a Raft connection raised", exc_info=True)
        return False


class _GuardedTcpServer(TcpServer):
    """A ``TcpServer`` that makes ``GuardedTcpConnection`` objects."""

    def __init__(self, poller, host, port, onNewConnection, sendBufferSize=2 ** 13, recvBufferSize=2 ** 13,
                 connectionTimeout=3.5, keepalive=None) -> None:
        super().__init__(poller, host, port, onNewConnection, sendBufferSize=sendBufferSize,
                         recvBufferSize=recvBufferSize, connectionTimeout=connectionTimeout, keepalive=keepalive)
        self._poller = poller
        self._onNew = onNewConnection
        self._sendBufferSize = sendBufferSize
        self._recvBufferSize = recvBufferSize
        self._connectionTimeout = connectionTimeout
        self._keepalive = keepalive

    # Why: upstream listens with a backlog of 5; during a connection flood the kernel
    # then drops the handshakes of real peers (and retries them only after seconds).
    def bind(self):
        super().bind()
        self._TcpServer__socket.listen(LISTEN_BACKLOG)

    # Why: upstream's accept handler (subscribed by TcpServer.bind under this mangled
    # name) hard-codes TcpConnection, accepts one connection per event, and unbinds the
    # server for good on any accept error, e.g. EMFILE during a connection flood.
    def _TcpServer__onNewConnection(self, descr, event):
        if event & POLL_EVENT_TYPE.READ:
            for _ in range(ACCEPTS_PER_EVENT):
                try:
                    sock, _address = self._TcpServer__socket.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                        _warn.warning("accept on the Raft port failed: %s", exc)
                        break
                    log.error("accept on the Raft port failed; closing it: %s", exc)
                    self.unbind()
                    return
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sendBufferSize)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recvBufferSize)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.setblocking(False)
                    conn = GuardedTcpConnection(poller=self._poller, socket=sock, incoming=True,
                                                timeout=self._connectionTimeout,
                                                sendBufferSize=self._sendBufferSize,
                                                recvBufferSize=self._recvBufferSize, keepalive=self._keepalive)
                except OSError as exc:  # e.g. the client reset the connection already
                    _warn.warning("setting up a Raft connection failed: %s", exc)
                    sock.close()
                    continue
                self._onNew(conn)
        if event & POLL_EVENT_TYPE.ERROR:
            self.unbind()


class RaftTransport(TCPTransport):
    """PySyncObj's TCP transport with the limits described in the module docstring."""

    def __init__(self, syncObj, selfNode, otherNodes) -> None:
        # Incoming connections waiting to identify -> when accepted, oldest first.
        # Set before super().__init__, which already creates the server and connections.
        self._unknownSince: dict[TcpConnection, float] = {}
        # Test-only fault injection on received Raft messages; inert until the engine
        # (only with test_hooks in its config) sets a hook.
        self.faults = InboundFaults(super()._onMessageReceived)
        super().__init__(syncObj, selfNode, otherNodes)

    # Why: every Raft message from an identified peer passes here (upstream binds it
    # per connection); the handshake does not, so a test's faults leave connections up.
    def _onMessageReceived(self, node, message):
        if self.faults.active:
            self.faults.receive(node, message)
        else:
            super()._onMessageReceived(node, message)

    # Why: SyncObj registers the syncobj_admin commands (status, add, remove,
    # set_version, transfer) here, and upstream then serves them to any connection that
    # sends a list instead of identifying. Register none; such connections are dropped
    # in _onIncomingMessageReceived below.
    def setOnUtilityMessageCallback(self, message, callback):
        pass

    # Why: same as upstream 0.3.17 (bind host from conf.bindAddress or the node's own
    # address), except for the server class, which makes guarded connections.
    def _createServer(self):
        conf = self._syncObj.conf
        selfAddress = getattr(self._selfNode, "address")
        if conf.bindAddress is not None:
            host, port = conf.bindAddress.rsplit(":", 1)
        elif selfAddress is not None:
            host, port = selfAddress.rsplit(":", 1)
            host = "::" if ":" in host else "0.0.0.0"
        else:
            raise RuntimeError("Unable to determine bind address")
        if host != "0.0.0.0":
            host = globalDnsResolver().resolve(host)
        self._server = _GuardedTcpServer(self._syncObj._poller, host, port,
                                         onNewConnection=self._onNewIncomingConnection,
                                         sendBufferSize=conf.sendBufferSize, recvBufferSize=conf.recvBufferSize,
                                         connectionTimeout=conf.connectionTimeout)

    # Why: same as upstream 0.3.17, except that outgoing connections are guarded too
    # (whatever listens at a peer's address may be hostile, e.g. while the peer is down).
    def addNode(self, node):
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conf = self._syncObj.conf
            conn = GuardedTcpConnection(poller=self._syncObj._poller, timeout=conf.connectionTimeout,
                                        sendBufferSize=conf.sendBufferSize, recvBufferSize=conf.recvBufferSize,
                                        keepalive=conf.tcp_keepalive)
            conn.encryptor = self._syncObj.encryptor
            conn.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, conn))
            conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
            conn.setOnDisconnectedCallback(functools.partial(self._onDisconnected, conn))
            self._connections[node] = conn

    # Why: upstream keeps any number of connections that never identify (a silent one
    # is never even timed out, as timeouts are only checked on socket events). Track
    # them in arrival order and close the oldest beyond MAX_UNKNOWN_CONNECTIONS.
    def _onNewIncomingConnection(self, conn):
        try:
            super()._onNewIncomingConnection(conn)
            self._unknownSince[conn] = monotonicTime()
            self._forgetIdentified()
            while len(self._unknownSince) > MAX_UNKNOWN_CONNECTIONS:
                oldest = next(iter(self._unknownSince))
                _warn.warning("over %d unidentified connections on the Raft port; closing the oldest",
                              MAX_UNKNOWN_CONNECTIONS)
                self._closeUnknown(oldest)
        except Exception:
            _warn.warning("setting up an incoming Raft connection raised", exc_info=True)
            self._closeUnknown(conn)

    # Why: upstream treats the first message after the key exchange as a utility
    # command if it is a list (served to anyone: refused here) and otherwise looks it up
    # as a node address, which raises TypeError for an unhashable value. Only a str
    # (a peer's address, or 'readonly') may identify; the key itself must be bytes.
    def _onIncomingMessageReceived(self, conn, message):
        keyExchanged = conn.sendRandKey or not self._syncObj.encryptor
        if keyExchanged and not isinstance(message, str):
            if isinstance(message, list):
                _warn.warning("refused a utility message (syncobj_admin) on the Raft port")
            else:
                _warn.warning("dropping a Raft connection that identified as a %s", type(message).__name__)
            self._closeUnknown(conn)
            return
        if not keyExchanged and not isinstance(message, bytes):
            _warn.warning("dropping a Raft connection whose key is a %s", type(message).__name__)
            self._closeUnknown(conn)
            return
        super()._onIncomingMessageReceived(conn, message)
        if conn not in self._unknownConnections and conn.state == CONNECTION_STATE.CONNECTED:
            conn.identified = True  # a configured peer (or a read-only node): trusted from now

    # Why: unidentified connections get conf.connectionTimeout to identify; checked
    # here because upstream checks a connection's timeout only when it has events.
    def _onTick(self):
        try:
            super()._onTick()  # binds the server, connects to peers
        except Exception:
            _warn.warning("the Raft transport's tick raised", exc_info=True)
        try:
            self._forgetIdentified()
            deadline = monotonicTime() - self._syncObj.conf.connectionTimeout
            for conn, since in list(self._unknownSince.items()):
                if since >= deadline:
                    break
                _warn.warning("closing a Raft connection that did not identify in time")
                self._closeUnknown(conn)
        except Exception:
            _warn.warning("expiring unidentified Raft connections raised", exc_info=True)
        try:
            self.faults.tick()  # delivers held messages that are due (tests only)
        except Exception:
            _warn.warning("delivering held Raft messages raised", exc_info=True)

    def _forgetIdentified(self) -> None:
        """Forget tracked connections upstream no longer counts as unknown (identified,
        or disconnected and discarded by its _onDisconnected)."""
        for conn in [c for c in self._unknownSince if c not in self._unknownConnections]:
            del self._unknownSince[conn]

    def _closeUnknown(self, conn) -> None:
        self._unknownSince.pop(conn, None)
        self._unknownConnections.discard(conn)
        try:
            conn.disconnect()
        except Exception:
            _warn.warning("disconnecting a Raft connection raised", exc_info=True)
