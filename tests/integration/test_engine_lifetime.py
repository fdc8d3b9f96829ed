"""The engine lives as long as the app *process* that started the Node: not the thread
that started it, not a forked child of the app. A forked child cannot use (or disturb)
its parent's Node. Real processes throughout."""

import json
import multiprocessing
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cluster.launcher import _pid_alive, free_ports
from raftsync import Node
from raftsync.errors import Closed, ConfigError

from .util import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _single_node(tmp_path, engine="process", address=None, **settings):
    address = address or f"127.0.0.1:{free_ports(1)[0]}"
    return Node(address, peers=[], engine=engine, data_dir=str(tmp_path / "data"), session_ttl=3, **settings)


@pytest.mark.parametrize("engine", ["process", "thread"])
def test_node_started_from_a_thread_outlives_that_thread(engine, tmp_path):
    node = _single_node(tmp_path, engine=engine)
    started = []
    starter = threading.Thread(target=lambda: started.append(node.start().wait_ready(20)))
    starter.start()
    starter.join(30)
    assert started, "the node did not start"
    engine_pid = node.engine_pid
    try:
        kv = node.data("t/")
        lock = node.lock("after-thread")
        ends = time.monotonic() + 3.0
        round_ = 0
        while time.monotonic() < ends:
            round_ += 1
            value = str(round_).encode()
            assert kv.write("k", value).value == value
            assert kv.read("k").value == value
            with lock:
                assert lock.held
            time.sleep(0.02)  # pacing only: keep this load loop light on a shared machine
        assert round_ > 10
        assert _pid_alive(engine_pid)
    finally:
        node.close()
    if engine == "process":
        wait_for(lambda: not _pid_alive(engine_pid), 5, "the engine to exit after close()")


# A small app: starts a Node, optionally leaves a child process behind that shares its
# file table (fork) or not (subprocess), then reports pids and idles until killed.
_APP = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from raftsync import Node
    address, data_dir, child = sys.argv[1:4]
    node = Node(address, peers=[], engine="process", data_dir=data_dir, session_ttl=3).start()
    node.wait_ready(20)
    node.data().write("k", b"v")
    child_pid = None
    if child == "fork":
        child_pid = os.fork()
        if child_pid == 0:
            time.sleep(60)
            os._exit(0)
    elif child == "subprocess":
        child_pid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                     close_fds=False).pid
    print(json.dumps({"engine_pid": node.engine_pid, "child_pid": child_pid}), flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("child", ["none", "fork", "subprocess"])
def test_engine_exits_when_its_app_is_killed(child, tmp_path):
    address = f"127.0.0.1:{free_ports(1)[0]}"
    app = subprocess.Popen([sys.executable, "-c", _APP, address, str(tmp_path / "data"), child],
                           cwd=REPO, stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        line = app.stdout.readline()
        assert line, "the app did not start its node"
        pids = json.loads(line)
        engine_pid, child_pid = pids["engine_pid"], pids["child_pid"]
        assert _pid_alive(engine_pid)
        app.send_signal(signal.SIGKILL)
        app.wait(10)
        killed_at = time.monotonic()
        wait_for(lambda: not _pid_alive(engine_pid), 3, "the engine to exit after its app was SIGKILLed")
        sys.stderr.write(f"engine gone {time.monotonic() - killed_at:.2f}s after the kill ({child})\n")
        if child_pid is not None:
            assert _pid_alive(child_pid)  # the child lived on: it did not keep the engine alive
    finally:
        app.kill()
        app.wait()
        app.stdout.close()
        if child_pid is not None:
            try:
                os.kill(child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _use_parent_node(node, kv, lock):
    """In a forked child: every use of the parent's node must raise Closed naming the
    owner. Exit code 0 if so; otherwise a code saying what happened instead."""
    code = 0
    for call in (lambda: kv.write("k", b"child", timeout=2), lambda: kv.read("k", timeout=2),
                 lambda: kv.read("k", consistency="local", timeout=2), lambda: lock.acquire(timeout=2),
                 lambda: node.status(timeout=2), lambda: node.data("other/")):
        try:
            call()
            code = code or 3
        except Closed as exc:
            if f"belongs to process {os.getppid()}" not in str(exc):
                code = code or 4
        except BaseException:
            code = code or 5
    node.close()  # a no-op in the child: the node is the parent's to close
    return code


def _child_main(node, kv, lock):
    code = 6
    try:
        code = _use_parent_node(node, kv, lock)
    finally:
        os._exit(code)


def _wait_exit(pid, timeout):
    """The child's exit code, or "hung" (then it is killed) if it has not exited in time."""
    pidfd = os.pidfd_open(pid)  # readable once the process has exited
    try:
        exited, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not exited:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "hung"
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
@pytest.mark.parametrize("engine", ["process", "thread"])
def test_forked_child_cannot_use_or_disturb_the_parents_node(engine, how, tmp_path):
    with _single_node(tmp_path, engine=engine) as node:
        node.wait_ready(20)
        kv = node.data("f/")
        kv.write("k", b"before")
        lock = node.lock("parents")
        if how == "os.fork":
            pid = os.fork()
            if pid == 0:
                _child_main(node, kv, lock)
            exit_code = _wait_exit(pid, 30)
        else:
            process = multiprocessing.get_context("fork").Process(target=_child_main, args=(node, kv, lock))
            process.start()
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
            exit_code = process.exitcode
        # The parent's node is undisturbed: its next command is its own (a child's frame
        # would have taken the parent's next (session, seq) and answered it as a retry).
        assert kv.write("k", b"parent").value == b"parent"
        assert kv.read("k").value == b"parent"
        with lock:
            assert lock.held
        assert node.status()["has_quorum"]
        assert exit_code == 0, f"child exit {exit_code}: a use of the parent's node did not raise Closed"


def test_thread_engine_close_frees_its_raft_port(tmp_path):
    """close() returns once the in-process engine's Raft port is closed. (PySyncObj's tick
    thread skipped that cleanup whenever the thread that created the SyncObj ended
    first; a race, hence several rounds.)"""
    for round_ in range(5):
        port = free_ports(1)[0]
        node = _single_node(tmp_path / str(round_), engine="thread", address=f"127.0.0.1:{port}").start()
        node.wait_ready(20)
        node.close()
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as PySyncObj binds
            probe.bind(("127.0.0.1", port))  # EADDRINUSE while the old node still listens
            probe.listen()


def test_thread_engine_port_is_free_after_close_despite_a_forked_child(tmp_path):
    """A forked child must not hold the in-process engine's Raft port: after the parent
    closes its node, a new node binds the same address at once."""
    address = f"127.0.0.1:{free_ports(1)[0]}"
    node = _single_node(tmp_path, engine="thread", address=address).start()
    node.wait_ready(20)
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        node.close()
        try:
            with _single_node(tmp_path, engine="thread", address=address, bind_retries=2) as again:
                again.wait_ready(20)
                assert again.data().write("k", b"v").version >= 1
        except ConfigError as exc:
            pytest.fail(f"the forked child still holds the Raft port: {exc}")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
