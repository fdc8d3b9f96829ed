"""A started Node belongs to the process that started it; a forked child drops its copies.

``os.fork()`` (multiprocessing's fork start method, prefork servers) copies the app's end
of every Node's channel into the child, where no raftsync thread runs. Left alone, the
copy would
- let the child write frames on the parent's channel: the engine's answers go to the
  parent's reader, the child's command takes the parent's next (session, seq) so the
  parent's own next command is answered as a retry of the child's, and a child's
  ``close()`` stops the parent's engine;
- keep the engine's channel open after the parent dies, so the engine never sees EOF;
- for ``engine="thread"``, also keep the engine's Raft port and peer connections open.

So, in the child, right after the fork, each started replica closes its copies (close()
only, never shutdown(), which would act on the sockets the parent shares) and from then
on every call on the Node raises Closed naming the owner process.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Protocol

log = logging.getLogger("raftsync.fork_guard")


class _Releasable(Protocol):
    def _release_after_fork(self) -> None: ...


_started: "weakref.WeakSet[_Releasable]" = weakref.WeakSet()


def track(replica: _Releasable) -> None:
    """Have ``replica`` drop its sockets in any child forked from now on."""
    _started.add(replica)


def _after_fork_in_child() -> None:
    # Runs in the child, which has only the forking thread: nothing here may take a
    # lock another thread of the parent could have held at the fork.
    for replica in list(_started):
        try:
            replica._release_after_fork()
        except Exception:
            log.exception("could not release a node's sockets in a forked child")
    _started.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
