"""Hostile input on a node's Raft port: the node drops it and keeps serving.

Every attack goes to 127.0.0.1 only, and every loop is bounded in count and in time.
The attacked node is the Raft leader, whose tick thread every commit passes through.
"""

import os
import pickle
import random
import selectors
import socket
import struct
import threading
import time
import zlib

from pysyncobj.encryptor import getEncryptor

from tests.integration.util import wait_for

MIB = 1024 * 1024
RSS_GROWTH_LIMIT = 64 * MIB
CONNECTION_TIMEOUT = 3.5  # the engine's conf.connectionTimeout with the default election timeouts


def _rss(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _host_port(address):
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1"
    return host, int(port)


class _RssWatch(threading.Thread):
    """Samples an engine's RSS every 20 ms; ``peak`` is the largest sample."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.baseline = self.peak = _rss(pid)
        self.stop = threading.Event()

    def run(self):
        deadline = time.monotonic() + 60
        while not self.stop.wait(0.02) and time.monotonic() < deadline:
            try:
                self.peak = max(self.peak, _rss(self.pid))
            except OSError:
                return  # the engine died: the liveness checks report it

    def growth(self):
        return self.peak - self.baseline


class _Writer(threading.Thread):
    """Writes through each node in turn until stopped; records outcomes and latencies."""

    def __init__(self, nodes):
        super().__init__(daemon=True)
        self.nodes = nodes
        self.ok = 0
        self.errors = []
        self.slowest = 0.0
        self.stop = threading.Event()

    def run(self):
        deadline = time.monotonic() + 60
        for i in range(20000):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            started = time.monotonic()
            try:
                self.nodes[i % len(self.nodes)].call("kv_write", key=f"during/{i}", value=b"%d" % i, timeout=5,
                                                     rpc_timeout=10)
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.errors.append(repr(exc))
            self.slowest = max(self.slowest, time.monotonic() - started)


def _closed_by_peer(sock):
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # reset


def _wait_all_closed(socks, timeout):
    """How many of ``socks`` the node closed within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_closed_by_peer(s) for s in socks):
        time.sleep(0.05)
    return sum(_closed_by_peer(s) for s in socks)


def _close_all(socks):
    for sock in socks:
        sock.close()


def _connect(address, count, timeout=3.0):
    """Up to ``count`` connections to ``address`` (connected together, within ``timeout``)."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(_host_port(address))
        socks.append(sock)
    connected = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_WRITE)
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                selector.unregister(key.fileobj)
                if key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected.append(key.fileobj)
    _close_all(s for s in socks if s not in connected)
    assert len(connected) == count, f"only {len(connected)} of {count} connections to {address} were accepted"
    return connected


def _send_some(sock, data):
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError:
        return -1


def _random_bytes(address, rng):
    """(a) Connections that send 64-96 KiB of random bytes."""
    socks = _connect(address, 30)
    for sock in socks:
        _send_some(sock, rng.randbytes(rng.randint(64 * 1024, 96 * 1024)))
    return socks


def _fake_frames(address, rng):
    """(b) Frames with valid length prefixes and garbage bodies (random, Fernet-looking,
    zlib of a pickle), including empty, negative and just-over-the-budget lengths."""
    socks = _connect(address, 30)
    bodies = [
        lambda: rng.randbytes(rng.randint(1, 2000)),
        lambda: b"gAAAAA" + rng.randbytes(rng.randint(100, 60000)),
        lambda: zlib.compress(pickle.dumps({"type": "append_entries", "term": 10 ** 9})),
        lambda: b"",
    ]
    for i, sock in enumerate(socks):
        frames = b"".join(struct.pack("i", len(body)) + body for body in (rng.choice(bodies)() for _ in range(3)))
        if i % 5 == 0:
            frames = struct.pack("i", -rng.randint(1, 2 ** 31)) + rng.randbytes(100)
        elif i % 5 == 1:
            frames = struct.pack("i", 65 * 1024) + rng.randbytes(65 * 1024)
        _send_some(sock, frames)
    return socks


def _huge_prefixes(address, connections=16, per_connection=8 * MIB, seconds=5.0):
    """(c) Declare 0x7fffffff-byte frames, then stream bytes into them (bounded per
    connection and in time). Returns (bytes the node accepted, connections it closed)."""
    socks = _connect(address, connections)
    chunk = os.urandom(64 * 1024)
    sent = [_send_some(sock, struct.pack("i", 0x7FFFFFFF)) for sock in socks]
    live = {i for i, n in enumerate(sent) if n == 4}
    deadline = time.monotonic() + seconds
    while live and time.monotonic() < deadline:
        for i in list(live):
            n = _send_some(socks[i], chunk)
            if n < 0:
                live.discard(i)
            else:
                sent[i] += n
                if sent[i] >= per_connection:
                    live.discard(i)
        time.sleep(0.001)
    # A trickle on whatever is still open keeps it from timing out while we look at RSS.
    for _ in range(10):
        for sock in socks:
            _send_some(sock, b"x")
        time.sleep(0.05)
    closed = _wait_all_closed(socks, 1.0)
    _close_all(socks)
    return sum(max(0, n) for n in sent), closed


def test_garbage_on_the_raft_port_is_dropped_and_writes_keep_committing(cluster):
    target = cluster.leader()
    for node in cluster.nodes:
        node.call("kv_write", key=f"before/{node.index}", value=b"1")
    commit_before = {n.index: n.call("status")["commit_index"] for n in cluster.nodes}
    rng = random.Random(1234)
    watch = _RssWatch(target.engine_pid)
    writer = _Writer(cluster.nodes)
    problems = []  # every check runs; all findings are reported together
    progress = {}  # phase -> writes committed while it ran
    watch.start()
    writer.start()
    try:
        def phase(name, attack):
            ok_before = writer.ok
            result = attack()
            progress[name] = writer.ok - ok_before
            return result

        # (a) and (b), in rounds for 1.5 s each: the node must close every connection itself.
        def rounds(name, attack):
            deadline = time.monotonic() + 1.5
            for _ in range(20):
                if time.monotonic() > deadline:
                    return
                socks = attack(target.address, rng)
                closed = _wait_all_closed(socks, 2.0)
                _close_all(socks)
                if closed != len(socks):
                    problems.append(f"{name}: the node kept {len(socks) - closed} of {len(socks)} connections open")
                    return

        phase("random bytes", lambda: rounds("random bytes", _random_bytes))
        phase("fake frames", lambda: rounds("fake frames", _fake_frames))

        # (c) huge length prefixes: nothing of it may be buffered.
        accepted, closed = phase("huge prefixes", lambda: _huge_prefixes(target.address))
        if watch.growth() >= RSS_GROWTH_LIMIT:
            problems.append(f"huge prefixes: engine RSS grew by {watch.growth() / MIB:.0f} MiB "
                            f"(the node took {accepted / MIB:.0f} MiB)")
        if closed != 16:
            problems.append(f"huge prefixes: the node kept {16 - closed} of 16 connections open")

        # (d) a flood of silent connections: at most 64 may wait to identify, and those
        # only for the connection timeout.
        def flood():
            socks = _connect(target.address, 200)
            # Those over the limit are closed at once; give a slow machine until well
            # before the connection timeout, which would close the rest anyway.
            deadline = time.monotonic() + CONNECTION_TIMEOUT - 1.5
            while sum(_closed_by_peer(s) for s in socks) < 200 - 64 and time.monotonic() < deadline:
                time.sleep(0.05)
            return socks

        socks = phase("flood", flood)
        try:
            closed_soon = sum(_closed_by_peer(s) for s in socks)
            if closed_soon < 200 - 64:
                problems.append(f"flood: {200 - closed_soon} unidentified connections kept open")
            closed_later = _wait_all_closed(socks, CONNECTION_TIMEOUT + 2.0)
            if closed_later != 200:
                problems.append(f"flood: {200 - closed_later} silent connections never timed out")
        finally:
            _close_all(socks)
    finally:
        writer.stop.set()
        writer.join(15)
        watch.stop.set()
        watch.join(5)

    print(f"writes per phase {progress}, slowest {writer.slowest:.2f}s, errors {len(writer.errors)}, "
          f"engine RSS growth {watch.growth() / MIB:.1f} MiB")
    if not _alive(target.engine_pid):
        problems.append("the attacked engine died")
    if "failed _onTick" in target.log_tail(2000):
        problems.append("an exception escaped into PySyncObj's tick loop")
    if writer.errors:
        problems.append(f"writes failed during the attacks: {writer.errors[:5]}")
    if not all(count > 0 for count in progress.values()):
        problems.append(f"no write committed during a phase: {progress}")
    if writer.slowest >= 5.0:
        problems.append(f"a write took {writer.slowest:.1f}s during the attacks")
    assert not problems, "\n".join(problems)
    # Afterwards every node still takes writes and every commit index moved on.
    for node in cluster.nodes:
        node.call("kv_write", key=f"after/{node.index}", value=b"2", timeout=5)
    for node in cluster.nodes:
        wait_for(lambda: node.call("status")["commit_index"] > commit_before[node.index] + writer.ok, 5,
                 f"commit index advancing on {node.address}")


class _PeerWire:
    """PySyncObj 0.3.17's wire, spoken by someone who knows the cluster password:
    frames of a native 4-byte length and Fernet(zlib(pickle(message)))."""

    def __init__(self, address, fernet):
        self.sock = socket.create_connection(_host_port(address), timeout=2)
        self.fernet = fernet
        self.buffer = b""
        self.their_key = None

    def send(self, message):
        data = self.fernet.encrypt_at_time(zlib.compress(pickle.dumps(message, 2), 3), int(time.monotonic()))
        self.sock.sendall(struct.pack("i", len(data)) + data)

    def recv(self):
        """The next message, "closed" when the node closed the connection, or "silent"."""
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack_from("i", self.buffer)
                if len(self.buffer) >= 4 + length:
                    data, self.buffer = self.buffer[4:4 + length], self.buffer[4 + length:]
                    return pickle.loads(zlib.decompress(self.fernet.decrypt(data)))  # our own cluster's reply
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return "silent"
            except OSError:
                return "closed"
            if not chunk:
                return "closed"
            self.buffer += chunk
        return "silent"

    def exchange_keys(self):
        my_key = os.urandom(32)
        self.send(my_key)
        reply = self.recv()
        assert isinstance(reply, tuple) and reply[0] == my_key, reply
        self.their_key = reply[1]

    def send_keyed(self, message):
        self.send((self.their_key, message))


def test_admin_commands_and_malformed_identities_are_refused(cluster):
    target = cluster.leader()
    fernet = getEncryptor(cluster.password)
    commit_before = target.call("status")["commit_index"]
    problems = []

    def attempt(what, messages, exchange_keys=True):
        wire = _PeerWire(target.address, fernet)
        try:
            if exchange_keys:
                wire.exchange_keys()
            for message in messages:
                (wire.send_keyed if exchange_keys else wire.send)(message)
            reply = wire.recv()
            if reply != "closed":
                problems.append(f"{what}: the node did not close the connection but answered {reply!r:.160}")
        finally:
            wire.sock.close()

    # syncobj_admin's commands, which PySyncObj itself serves to any connection.
    # (transfer names a follower: a refused transfer leaves the target leading, below)
    follower = next(node for node in cluster.nodes if node is not target)
    for command in (["status"], ["transfer", follower.address], ["set_version", 99]):
        attempt(f"admin command {command[0]}", [command])
    # Identities that are no address (upstream raises TypeError for an unhashable one),
    # and a key that is not bytes.
    for identity in ({"type": "request_vote"}, 12345):
        attempt(f"identity {identity!r}", [identity])
    attempt("a key that is a dict", [{"not": "a key"}], exchange_keys=False)
    # A key exchange (which a replayed first frame would also get through) does not
    # make a connection trusted with big frames: only identifying as a peer does.
    wire = _PeerWire(target.address, fernet)
    try:
        wire.exchange_keys()
        wire.sock.sendall(struct.pack("i", 0x7FFFFFFF) + b"x" * 1000)
        reply = wire.recv()
        if reply != "closed":
            problems.append(f"a huge frame after the key exchange: the node answered {reply!r:.160}")
    finally:
        wire.sock.close()

    if "failed _onTick" in target.log_tail(2000):
        problems.append("an exception escaped into PySyncObj's tick loop")
    assert not problems, "\n".join(problems)
    assert target.call("status")["role"] == "leader"
    for node in cluster.nodes:
        node.call("kv_write", key=f"after/{node.index}", value=b"1", timeout=5)
    assert target.call("status")["commit_index"] >= commit_before + 3
