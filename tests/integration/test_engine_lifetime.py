"""The engine lives as long as the app *process* that started the Node: not the thread
that started it, not a forked child of the app. Real processes throughout."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cluster.launcher import _pid_alive, free_ports
from raftsync import Node

from .util import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _single_node(tmp_path, engine="process", address=None, **settings):
    address = address or f"127.0.0.1:{free_ports(1)[0]}"
    return Node(address, peers=[], engine=engine, data_dir=str(tmp_path / "data"), session_ttl=3, **settings)


def test_node_started_from_a_thread_outlives_that_thread(tmp_path):
    node = _single_node(tmp_path)
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

