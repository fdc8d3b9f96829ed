"""Start N real node processes on free loopback ports and tear them all down.

Each node is ``python -m cluster.agent`` in its own process group (app + engine), with
its own data dir and log file under the cluster's base dir. The launcher waits for
readiness and, used as a context manager or a pytest fixture, kills every process it
started even when a test fails. Tests, the demo and the benchmarks all use it.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import raftsync.errors as errors
from raftsync.channel import FrameDecoder, pack_frame

from .stopping import stop_and_wait

REPO_ROOT = Path(__file__).resolve().parent.parent


class AgentError(Exception):
    """An agent op failed with something that is not a raftsync error."""


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, chosen below the kernel's ephemeral range (32768 and
    up): outgoing connections take ephemeral source ports, and one did take a port handed
    out here before its node could bind it."""
    rng = random.SystemRandom()
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", rng.randrange(20000, 32000)))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class AgentClient:
    """Calls ops on one agent over its control port; raftsync errors are re-raised typed."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, list] = {}
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        decoder = FrameDecoder()
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                for request_id, ok, result in decoder.feed(data):
                    self._waiting[request_id] = [ok, result]
                self._cond.notify_all()

    def call(self, op: str, rpc_timeout: float = 120.0, **args: Any) -> Any:
        """Run ``op(**args)`` on the agent; ``rpc_timeout`` bounds the wait for its answer."""
        request_id = next(self._ids)
        with self._send_lock:
            self._sock.sendall(pack_frame([request_id, op, args]))
        deadline = time.monotonic() + rpc_timeout
        with self._cond:
            while request_id not in self._waiting:
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise AgentError(f"agent connection closed during {op}")
                if remaining <= 0:
                    raise AgentError(f"agent did not answer {op} within {rpc_timeout}s")
                self._cond.wait(remaining)
            ok, result = self._waiting.pop(request_id)
        if ok:
            return result
        name, message = result
        error_class = getattr(errors, name, None)
        if isinstance(error_class, type) and issubclass(error_class, errors.RaftsyncError):
            if error_class is errors.ConfigError:
                raise errors.ConfigError("agent", message)
            raise error_class(message)
        raise AgentError(f"{name}: {message}")

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


class NodeProcess:
    def __init__(self, cluster: "LocalCluster", index: int, address: str) -> None:
        self.cluster = cluster
        self.index = index
        self.address = address
        self.data_dir = cluster.base_dir / f"node{index}" / "data"
        self.log_path = cluster.base_dir / f"node{index}" / "node.log"
        self.process: subprocess.Popen | None = None
        self.client: AgentClient | None = None
        self.pid: int | None = None
        self.engine_pid: int | None = None

    def start(self, timeout: float = 20.0) -> "NodeProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update({
            "RAFTSYNC_SELF": self.address,
            "RAFTSYNC_PEERS": ",".join(a for a in self.cluster.addresses if a != self.address),
            "RAFTSYNC_DATA_DIR": str(self.data_dir),
            "RAFTSYNC_SESSION_TTL": str(self.cluster.session_ttl),
            "RAFTSYNC_ENGINE": self.cluster.engine,
            "RAFTSYNC_AGENT_SETTINGS": json.dumps(self.cluster.settings),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1",
        })
        env.pop("RAFTSYNC_PASSWORD", None)
        if self.cluster.password:
            env["RAFTSYNC_PASSWORD"] = self.cluster.password
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "cluster.agent"], env=env, cwd=str(REPO_ROOT),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                        start_new_session=True)
        log.close()
        info = self._read_ready(timeout)
        self.pid = info["pid"]
        self.engine_pid = info["engine_pid"]
        self.client = AgentClient(info["control_port"])
        return self

    def _read_ready(self, timeout: float) -> dict[str, Any]:
        result: dict[str, Any] = {}

        def read() -> None:
            assert self.process is not None and self.process.stdout is not None
            for raw in self.process.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("READY "):
                    result.update(json.loads(line[6:]))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not result:
            self.kill()
            raise AgentError(f"node {self.address} did not start within {timeout}s; log:\n{self.log_tail()}")
        return result

    def call(self, op: str, rpc_timeout: float = 120.0, **args: Any) -> Any:
        if self.client is None:
            raise AgentError(f"node {self.address} is not running")
        return self.client.call(op, rpc_timeout=rpc_timeout, **args)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_app(self, sig: int) -> None:
        """Signal the app process only (its engine must notice by itself); a SIGSTOP
        has taken effect when this returns."""
        if self.pid is not None:
            if sig == signal.SIGSTOP:
                stop_and_wait(self.pid)
            else:
                os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Signal app and engine together; a SIGSTOP has taken effect when this returns."""
        if self.pid is not None:
            if sig == signal.SIGSTOP:
                stop_and_wait(self.pid, group=True)
                return
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the whole node (app and engine) and reap it."""
        self.signal_group(signal.SIGKILL)
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.client is not None:
            self.client.close()
            self.client = None

    def wait_engine_exit(self, timeout: float) -> bool:
        """True once the engine process is gone (it is not our child: poll its pid)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(self.engine_pid):
                return True
            time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class LocalCluster:
    """N node processes on 127.0.0.1 with a random password; use as a context manager."""

    def __init__(self, size: int = 3, base_dir: str | os.PathLike | None = None, engine: str = "process",
                 session_ttl: float = 3.0, password: str | None = None, encrypted: bool = True,
                 **settings: Any) -> None:
        """``encrypted=False`` runs without a password (allowed on loopback only): for
        benchmarks that compare with unencrypted baselines."""
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="raftsync-cluster-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.engine = engine
        self.session_ttl = session_ttl
        self.password = (password or secrets.token_urlsafe(16)) if encrypted else None
        self.settings = settings
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(size)]
        self.nodes = [NodeProcess(self, i, address) for i, address in enumerate(self.addresses)]

    def start(self, timeout: float = 30.0) -> "LocalCluster":
        try:
            for node in self.nodes:
                node.start(timeout)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            if node.running:
                node.call("wait_ready", timeout=timeout, rpc_timeout=timeout + 5)

    def leader(self, timeout: float = 10.0) -> NodeProcess:
        """The node whose engine is the Raft leader (as the running nodes agree)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.running:
                    try:
                        if node.call("status", rpc_timeout=5)["role"] == "leader":
                            return node
                    except (errors.RaftsyncError, AgentError):
                        pass
            time.sleep(0.05)
        raise AgentError("no leader found")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()
