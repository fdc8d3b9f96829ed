"""Typed errors: the only exceptions raftsync lets reach an application.

No PySyncObj exception or integer error code crosses the public API; every failure
is one of these classes, all subclasses of :class:`RaftsyncError`.
"""

from __future__ import annotations


class RaftsyncError(Exception):
    """Base class of every error raftsync raises."""


class ConfigError(RaftsyncError, ValueError):
    """A setting is missing or invalid; the message names the setting and why."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


class NotFound(RaftsyncError, KeyError):
    """The key (or other named object) does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the plain message
        return str(self.args[0]) if self.args else "not found"


class Conflict(RaftsyncError):
    """A compare-and-set precondition (``if_version``) did not hold."""


class LockTimeout(RaftsyncError):
    """A lock was not acquired within the caller's timeout (``timeout=0``: it was busy)."""


class NotHeld(RaftsyncError):
    """Release of a lock this handle does not hold (never acquired, or its lease was lost)."""


class SessionExpired(RaftsyncError):
    """The session the call used has expired or was closed; what it held is released."""


class NoQuorum(RaftsyncError):
    """The cluster has had no leader (no quorum) for longer than the node's quorum timeout."""


class Timeout(RaftsyncError, TimeoutError):
    """The caller's deadline passed before anything was sent, or a read got no answer."""


class OutcomeUnknown(Timeout):
    """A command was sent and no answer came by the deadline: it may or may not have
    applied (and may still apply). Whatever it may have taken (a lock grant) or was
    meant to give back (a release) is settled in the background."""


class QuorumLostOutcomeUnknown(OutcomeUnknown, NoQuorum):
    """A command was sent, then the cluster had no quorum for ``quorum_timeout``: both an
    :class:`OutcomeUnknown` and a :class:`NoQuorum`, so either ``except`` catches it."""


class TooLarge(RaftsyncError, ValueError):
    """A key, value, command or frame is over its size limit."""


class Compacted(RaftsyncError):
    """A watch revision or event offset has already been trimmed from history."""


class Closed(RaftsyncError):
    """The node (or the handle) has been closed; no further calls are accepted."""


class BadRequest(RaftsyncError, ValueError):
    """The state machine rejected a malformed or unknown command."""


class ConfigWarning(UserWarning):
    """A setting is allowed but risky (an even group size, a memory-only member of a group);
    issued with :func:`warnings.warn` when a node starts."""


class ClockUnsynchronized(RaftsyncError):
    """A clock cannot give the time within a known error bound: no NTP poll has
    succeeded, the responding servers do not agree (no majority), or the local kernel
    reports its clock unsynchronized. ``now_interval()`` raises it rather than invent
    a bound; ``physical_time()`` still answers, best effort."""


class JobFailed(RaftsyncError):
    """A task job ended without a result: dead-lettered after its attempts (``error`` is
    the last attempt's error text) or cancelled (``state == "cancelled"``)."""

    def __init__(self, message: str, job_id: int = 0, state: str = "dead", error: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state
        self.error = error


class UnknownHandler(BadRequest):
    """A job or schedule names a handler no worker has registered with the cluster."""
