"""raftsync: distributed Data, Leader, Lock (and more) for a group of Python peers.

The nodes form a Raft group (PySyncObj) and share one deterministic state machine;
there is no external coordinator. See DESIGN.md in the repository for the contract.
"""

from .data import Change, Data, Record
from .events import Event, Events, Subscription, TopicInfo
from .leader import Election, LeaderInfo, Term
from .errors import (BadRequest, Closed, Compacted, ConfigError, ConfigWarning, Conflict, LockTimeout, NoQuorum,
                     NotFound, NotHeld, RaftsyncError, SessionExpired, Timeout, TooLarge)
from .lock import Lease, Lock, RWLock, Semaphore
from .node import Node
from .session import Session
from .errors import ClockUnsynchronized
from .errors import JobFailed, UnknownHandler
from .tasks import Job, JobContext, JobStatus, ScheduleInfo, Tasks
from .time import Clock, HLCTimestamp, HybridLogicalClock, LocalClock, NtpClock, TimeInterval
from .watch import WatchStream

__version__ = "0.1.0"

__all__ = [
    "Node", "Session", "Data", "Record", "Change", "Lock", "Lease", "Semaphore", "RWLock", "Election", "Term", "LeaderInfo",
    "WatchStream", "Events", "Event", "Subscription", "TopicInfo",
    "RaftsyncError", "BadRequest", "Closed", "Compacted", "ConfigError", "ConfigWarning", "Conflict", "LockTimeout",
    "NoQuorum", "NotFound", "NotHeld", "SessionExpired", "Timeout", "TooLarge",
    "Clock", "LocalClock", "NtpClock", "TimeInterval", "HybridLogicalClock", "HLCTimestamp", "ClockUnsynchronized",
    "Tasks", "Job", "JobContext", "JobStatus", "ScheduleInfo", "JobFailed", "UnknownHandler",
]
