"""Entry point of the engine helper process: ``python -m raftsync.engine --fd N --parent PID``.

The app passes one end of a socketpair as fd N. The engine exits when that channel
reaches EOF (its app closed the node or died) or when process PID, its app, exits
(see lifeline.py for why that, and not PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

from .lifeline import watch_app

# After its app is gone the engine stops the orderly way; if that has not finished
# within this long (a wedged tick thread), the process exits regardless.
STOP_GRACE = 5.0


def _app_gone(sock: socket.socket) -> None:
    """The app process exited (watch thread): stop as on the channel's EOF."""
    # shutdown() makes the tick thread read EOF on its own socket, so the stop runs the
    # same path, on the tick thread, as when the app closes the node or dies.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    time.sleep(STOP_GRACE)
    os._exit(1)


def main() -> int:
    parser = argparse.ArgumentParser(prog="raftsync.engine")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)
    sock.set_inheritable(False)
    if args.parent and not watch_app(args.parent, lambda: _app_gone(sock)):
        return 1  # the app died before we could watch it
    logging.basicConfig(level=os.environ.get("RAFTSYNC_ENGINE_LOG", "WARNING"),
                        format="%(asctime)s engine[%(process)d] %(levelname)s %(name)s: %(message)s")
    from .core import run_engine

    try:
        engine = run_engine(sock, in_process=False)
    except Exception as exc:
        logging.getLogger("raftsync.engine").error("engine failed to start: %s", exc)
        return 2
    engine.join()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
