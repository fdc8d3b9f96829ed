"""Entry point of the engine helper process: ``python -m raftsync.engine --fd N``.

The app passes one end of a socketpair as fd N. The engine exits when that channel
reaches EOF (its app died or closed the node); PR_SET_PDEATHSIG is a second guard.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(prog="raftsync.engine")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, default=0)
    args = parser.parse_args()
    _die_with_parent()
    if args.parent and os.getppid() != args.parent:
        return 1  # the app died before we armed PDEATHSIG
    logging.basicConfig(level=os.environ.get("RAFTSYNC_ENGINE_LOG", "WARNING"),
                        format="%(asctime)s engine[%(process)d] %(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=args.fd)
    from .core import run_engine

    try:
        engine = run_engine(sock, in_process=False)
    except Exception as exc:
        logging.getLogger("raftsync.engine").error("engine failed to start: %s", exc)
        return 2
    engine.stopped.wait()
    # Let the tick thread close the Raft port and journal before the process goes.
    thread = engine._raft._SyncObj__thread if engine._raft is not None else None
    if thread is not None:
        thread.join(timeout=2.0)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
