"""The engine lives exactly as long as the app *process* that started it.

Engine process (``python -m raftsync.engine --parent PID``): the channel reaching EOF
stops it when its app closes the node or dies. EOF needs every copy of the app's end
closed; raftsync closes the copy in any child the app forks (fork_guard), but a fork
that skips Python's at-fork hooks (one done from C) would still hold one. So the
engine also watches the app process itself: a thread blocked on a pidfd of the app
(Linux >= 5.3), or polling getppid() where pidfds are unavailable (the engine is
reparented when the app dies, so its parent pid changes).

Why not PR_SET_PDEATHSIG: it fires when the *thread* that spawned the engine exits, not
the process, so a Node started from a short-lived thread (web frameworks, thread
pools, test harnesses) lost its engine as soon as that thread ended. Spawning from a
dedicated long-lived thread would work but adds a thread per node whose death kills
the engine with SIGKILL; EOF plus this watch follow the process, and stop the engine
the orderly way (Raft port and journal closed) unless it fails to stop in time.

In-process engine (``engine="thread"``): it dies with its app, but a forked child of
the app must not keep its Raft port and peer connections open.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable

log = logging.getLogger("raftsync.engine")

# Where there is no pidfd: how often the watch compares getppid() with the app's pid.
PARENT_POLL_INTERVAL = 0.2


def _open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3, or a sandbox refusing it
        return None


def watch_app(app_pid: int, on_gone: Callable[[], None]) -> bool:
    """Call ``on_gone()`` on a daemon thread once process ``app_pid`` (our parent) has
    exited. Returns False, starting nothing, if it is already gone (or not our parent)."""
    pidfd = _open_pidfd(app_pid)
    # Checked after opening: while app_pid is still our parent it cannot have been
    # reused, so the pidfd refers to the app, not to a later process with its pid.
    if os.getppid() != app_pid:
        if pidfd is not None:
            os.close(pidfd)
        return False
    threading.Thread(target=_wait_for_exit, args=(app_pid, pidfd, on_gone),
                     name="raftsync-app-watch", daemon=True).start()
    return True


def _wait_for_exit(app_pid: int, pidfd: int | None, on_gone: Callable[[], None]) -> None:
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll():  # a pidfd turns readable when its process exits
            pass
    else:
        while os.getppid() == app_pid:
            time.sleep(PARENT_POLL_INTERVAL)
    on_gone()


def release_in_fork_child(channel: socket.socket, raft: Any) -> None:
    """In a forked child of an in-process engine's app: close this process's copies of
    the channel and Raft sockets (close() only: shutdown() would act on the parent's)."""
    sockets = [channel]
    if raft is not None:
        # Why the name-mangled members: pysyncobj is pinned (==0.3.17) and offers no
        # way to reach its sockets; SyncObj.__transport is our RaftTransport.
        transport = raft._SyncObj__transport
        server = getattr(transport, "_server", None)
        if server is not None:
            sockets.append(server._TcpServer__socket)
        for conn in [*transport._connections.values(), *transport._unknownConnections]:
            sockets.append(conn._TcpConnection__socket)
    for sock in sockets:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
