"""The Raft side of a node: PySyncObj, keepalives, deadlines, read barriers, fan-out.

Runs in a helper process the Node spawns (``python -m raftsync.engine``) or, with
``engine="thread"``, in a thread of the application; the code is the same and talks
to the application's replica only through channel frames.
"""

from .core import Engine, run_engine

__all__ = ["Engine", "run_engine"]
