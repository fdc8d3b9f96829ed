"""Waits without a timeout on a node whose engine stalls: a subscription's and a watch's
``get(None)`` raise NoQuorum (the one rule of every wait), never hang, and go on after;
iterating (a standing consumer) waits through it."""

import os
import signal
import threading
import time

import pytest

from cluster.stopping import stop_and_wait
from raftsync.replica import APP_STALL_LIMIT, ENGINE_SILENCE_LIMIT
from cluster.launcher import free_ports
from raftsync import Node
from raftsync.errors import NoQuorum

QUORUM_TIMEOUT = 2.0


def test_subscription_and_watch_waits_without_a_timeout_raise_no_quorum_on_a_stalled_engine(tmp_path):
    with Node(f"127.0.0.1:{free_ports(1)[0]}", peers=[], data_dir=tmp_path / "data", session_ttl=30,
              quorum_timeout=QUORUM_TIMEOUT) as node:
        node.wait_ready(10)
        stream = node.events("t")
        stream.publish("before")
        subscription = stream.subscribe()  # from the end: waits for the next publish
        watch = node.data().watch("k")
        watcher_got, subscriber_got = [], []  # what an iterating watcher and subscriber get

        def first_of(iterable, into):
            for item in iterable:
                into.append(item)
                return
        iterators = [threading.Thread(target=first_of, args=(node.data().watch("k"), watcher_got), daemon=True),
                     threading.Thread(target=first_of, args=(stream.subscribe(), subscriber_got), daemon=True)]
        for thread in iterators:
            thread.start()
        stop_and_wait(node.engine_pid)
        try:
            for call in (lambda: watch.get(None), lambda: subscription.get(None)):
                started = time.monotonic()
                with pytest.raises(NoQuorum):
                    call()
                # quorum_timeout, counted from when the engine went silent (1 s) at the
                # earliest, later by up to the app-stall allowance, plus slack
                assert time.monotonic() - started < QUORUM_TIMEOUT + ENGINE_SILENCE_LIMIT + APP_STALL_LIMIT + 2.0
        finally:
            os.kill(node.engine_pid, signal.SIGCONT)
        # NoQuorum ends neither: once the engine runs again both get what comes next
        node.data().write("k", b"v", timeout=10)
        assert watch.get(timeout=10).value == b"v"
        assert stream.publish("after", timeout=10) == 1
        assert subscription.get(timeout=10).payload == "after"
        for thread in iterators:
            thread.join(10)
        # the stall (longer than quorum_timeout + 1 s) did not end their iterations
        assert [change.value for change in watcher_got] == [b"v"]
        assert [event.payload for event in subscriber_got] == ["after"]
