"""The baseline: a three-process cluster of plain PySyncObj 0.3.17, driven like raftsync.

Each member is ``python -m bench.bare_pysyncobj --self ADDR --peers A,B``: one
``SyncObj`` subclass with ReplDict-like ``@replicated`` methods (``set``, ``get``, and
an uncontended ``acquire``/``release`` pair), bound to its own 127.0.0.1 port, in
memory (no journal), no password unless one is given, ``appendEntriesUseBatch=False``
and every other setting at PySyncObj's default. Its control loop reads one JSON
request per line on stdin and answers one JSON line on stdout; the bench ops
(``bench_writes``, ``bench_lock_cycles``, ``bench_reads``, ``burn_cpu``, ``status``)
take the same arguments as raftsync's agent ops and time each call inside the
member's own process with the same loop (``bench.timing.timed_loop``).

``BarePySyncObjCluster`` starts the three members on free loopback ports, waits until
each has committed a write, and kills them all on exit (members also die with their
parent through PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSWORD_ENV = "BENCH_BARE_PASSWORD"


class BareError(Exception):
    """A bare PySyncObj member failed an op, did not answer, or did not start."""


# -- the member process ------------------------------------------------------------------

def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _make_syncobj_class() -> type:
    # Imported here so the parent (which only starts members) need not import PySyncObj.
    from pysyncobj import SyncObj, replicated

    class BenchSyncObj(SyncObj):
        """ReplDict-like state plus a minimal lock table; one log entry per call."""

        def __init__(self, self_address: str, peers: list[str], conf: Any) -> None:
            super().__init__(self_address, peers, conf)
            self._values: dict[str, bytes] = {}
            self._lock_owners: dict[str, str] = {}

        @replicated
        def set(self, key: str, value: bytes) -> bool:
            self._values[key] = value
            return True

        @replicated
        def get(self, key: str) -> bytes | None:
            """A read through the log: it returns once the entry is applied here."""
            return self._values.get(key)

        @replicated
        def acquire(self, name: str, owner: str) -> bool:
            if name in self._lock_owners:
                return False
            self._lock_owners[name] = owner
            return True

        @replicated
        def release(self, name: str, owner: str) -> bool:
            if self._lock_owners.get(name) != owner:
                return False
            del self._lock_owners[name]
            return True

        def local_get(self, key: str) -> bytes | None:
            """This replica's value, no round trip (may be stale)."""
            return self._values.get(key)

    return BenchSyncObj


class BareMember:
    """The ops a member's control loop serves; each bench op times calls in this process."""

    CALL_TIMEOUT = 10.0

    def __init__(self, syncobj: Any) -> None:
        self.syncobj = syncobj
        self.owner = f"pid-{os.getpid()}"

    def op_status(self) -> dict[str, Any]:
        status = self.syncobj.getStatus()
        leader = status["leader"]
        return {"role": {0: "follower", 1: "candidate", 2: "leader"}.get(status["state"], "follower"),
                "term": status["raft_term"], "leader": leader.address if leader is not None else None,
                "has_quorum": status["has_quorum"]}

    def op_wait_ready(self, timeout: float = 30.0) -> bool:
        """Until one synchronous write from this member commits (leader known, links up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.syncobj.set("bench/ready", b"", sync=True, timeout=1.0)
                return True
            except Exception:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def op_bench_writes(self, count: int, size: int = 100, warmup: int = 20, max_seconds: float = 30.0,
                        key_prefix: str = "bench/write/") -> dict[str, Any]:
        """Sequential synchronous ``set`` of ``size``-byte values over 1000 keys."""
        from bench.timing import timed_loop
        value = b"x" * size
        return timed_loop(lambda i: self.syncobj.set(f"{key_prefix}{i % 1000}", value, sync=True,
                                                     timeout=self.CALL_TIMEOUT),
                          count, warmup, max_seconds)

    def op_bench_lock_cycles(self, count: int, name: str = "bench/lock", warmup: int = 20,
                             max_seconds: float = 30.0) -> dict[str, Any]:
        """Sequential synchronous ``acquire`` + ``release``: two log entries per cycle."""
        from bench.timing import timed_loop

        def cycle(_: int) -> None:
            if not self.syncobj.acquire(name, self.owner, sync=True, timeout=self.CALL_TIMEOUT):
                raise BareError(f"lock {name!r} was not free")
            if not self.syncobj.release(name, self.owner, sync=True, timeout=self.CALL_TIMEOUT):
                raise BareError(f"lock {name!r} was not held")
        return timed_loop(cycle, count, warmup, max_seconds)

    def op_bench_reads(self, count: int, consistency: str = "linearizable", warmup: int = 20,
                       max_seconds: float = 30.0, key: str = "bench/read", size: int = 100) -> dict[str, Any]:
        """Writes ``key`` once, then sequential reads: ``linearizable`` = a synchronous
        ``get`` through the log; ``local`` = this replica's dict, in process."""
        from bench.timing import timed_loop
        self.syncobj.set(key, b"x" * size, sync=True, timeout=self.CALL_TIMEOUT)

        def read_local(_: int) -> Any:
            return self.syncobj.local_get(key)

        def read_through_log(_: int) -> Any:
            return self.syncobj.get(key, sync=True, timeout=self.CALL_TIMEOUT)
        return timed_loop(read_local if consistency == "local" else read_through_log, count, warmup, max_seconds)

    def op_burn_cpu(self, threads: int, seconds: float) -> bool:
        """Pure-Python CPU load in this process (the same load as raftsync's agent)."""
        from cluster.load import burn_cpu
        burn_cpu(threads, seconds)
        return True

    def serve(self, requests: Any, answers: Any) -> None:
        """One JSON request per line in, one JSON answer per line out, until EOF."""
        for line in requests:
            request = json.loads(line)
            method = getattr(self, f"op_{request['op']}", None)
            try:
                if method is None:
                    raise BareError(f"unknown op {request['op']}")
                answer = {"id": request["id"], "ok": True, "result": method(**request["args"])}
            except Exception as exc:
                answer = {"id": request["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            answers.write(json.dumps(answer) + "\n")
            answers.flush()


def member_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.bare_pysyncobj")
    parser.add_argument("--self", dest="self_address", required=True)
    parser.add_argument("--peers", required=True, help="comma-separated host:port of the other members")
    args = parser.parse_args(argv)
    _die_with_parent()
    from pysyncobj import SyncObjConf

    conf = SyncObjConf(appendEntriesUseBatch=False, bindAddress=args.self_address,
                       password=os.environ.get(PASSWORD_ENV) or None, dynamicMembershipChange=False)
    syncobj = _make_syncobj_class()(args.self_address, args.peers.split(","), conf)
    syncobj.waitBinded()
    member = BareMember(syncobj)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    member.serve(sys.stdin, sys.stdout)
    syncobj.destroy()
    return 0


# -- the parent side -----------------------------------------------------------------------

class BareNode:
    """One member process, seen from the bench: ``call(op, **args)`` like a NodeProcess."""

    def __init__(self, index: int, address: str, peers: list[str], log_path: Path, password: str | None) -> None:
        self.index = index
        self.address = address
        self.peers = peers
        self.log_path = log_path
        self.password = password
        self.process: subprocess.Popen | None = None
        self._answers: queue.Queue = queue.Queue()
        self._next_id = 0

    def start(self, timeout: float) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop(PASSWORD_ENV, None)
        if self.password:
            env[PASSWORD_ENV] = self.password
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.bare_pysyncobj", "--self", self.address,
                 "--peers", ",".join(self.peers)],
                env=env, cwd=str(REPO_ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True)
        threading.Thread(target=self._read_answers, daemon=True).start()
        ready = self._next_answer(timeout, "start")
        if not ready.get("ready"):
            raise BareError(f"member {self.address} sent {ready!r} instead of ready")

    def _read_answers(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                self._answers.put(json.loads(raw))
            except ValueError:
                continue
        self._answers.put(None)  # EOF: the member is gone

    def _next_answer(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise BareError(f"member {self.address} did not answer {what} within {timeout}s") from None
        if answer is None:
            raise BareError(f"member {self.address} exited during {what}; log:\n{self.log_tail()}")
        return answer

    def call(self, op: str, rpc_timeout: float = 120.0, **args: Any) -> Any:
        """Run ``op(**args)`` in the member; ``rpc_timeout`` bounds the wait for its answer."""
        if self.process is None or self.process.poll() is not None:
            raise BareError(f"member {self.address} is not running")
        self._next_id += 1
        request_id = self._next_id
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"id": request_id, "op": op, "args": args}) + "\n").encode())
        self.process.stdin.flush()
        answer = self._next_answer(rpc_timeout, op)
        if answer.get("id") != request_id:
            raise BareError(f"member {self.address} answered request {answer.get('id')}, not {request_id}")
        if not answer["ok"]:
            raise BareError(f"{op} on {self.address}: {answer['error']}")
        return answer["result"]

    def kill(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class BarePySyncObjCluster:
    """Three bare PySyncObj members on 127.0.0.1; use as a context manager."""

    def __init__(self, size: int = 3, password: str | None = None) -> None:
        from cluster.launcher import free_ports

        self.base_dir = Path(tempfile.mkdtemp(prefix="bench-bare-pysyncobj-"))
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(size)]
        self.nodes = [BareNode(i, address, [a for a in self.addresses if a != address],
                               self.base_dir / f"member{i}.log", password)
                      for i, address in enumerate(self.addresses)]

    def start(self, timeout: float = 30.0) -> "BarePySyncObjCluster":
        try:
            for node in self.nodes:
                node.start(timeout)
            for node in self.nodes:
                node.call("wait_ready", timeout=timeout, rpc_timeout=timeout + 5)
        except BaseException:
            self.stop()
            raise
        return self

    def leader(self, timeout: float = 10.0) -> BareNode:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.call("status", rpc_timeout=5)["role"] == "leader":
                    return node
            time.sleep(0.05)
        raise BareError("no leader found")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> "BarePySyncObjCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(member_main())
