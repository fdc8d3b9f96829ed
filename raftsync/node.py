"""Node: the facade an application holds. Config, lifecycle and factories only."""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

from .config import NodeConfig, load_config
from .data import Data
from .errors import Closed, ConfigError, ConfigWarning, RaftsyncError
from .events import Events
from .leader import Election
from .lock import Lock, RWLock, Semaphore
from .replica import Replica, deadline_after
from .session import Session
from .tasks import Tasks
from .time import Clock, HLCTimestamp, HybridLogicalClock, clock_from_config


class Node:
    """A member of a raftsync group.

    ``Node("127.0.0.1:7001", peers=[...], password=..., data_dir=...)``; settings not
    given as arguments come from ``RAFTSYNC_*`` environment variables, then from
    ``config_file`` (TOML), then defaults. ``start()`` spawns the engine and returns;
    ``wait_ready()`` blocks until there is a leader and the default session is open.
    """

    def __init__(self, self_address: str | None = None, peers: list[str] | None = None, *,
                 password: str | None = None, data_dir: str | None = None,
                 session_ttl: float | None = None, engine: str | None = None,
                 config_file: str | None = None, environ: dict[str, str] | None = None,
                 clock: Clock | None = None, **settings: Any) -> None:
        arguments = dict(self_address=self_address, peers=peers, password=password, data_dir=data_dir,
                         session_ttl=session_ttl, engine=engine, **settings)
        self.config: NodeConfig = load_config(arguments, environ, config_file)
        if clock is not None and not isinstance(clock, Clock):
            raise ConfigError("clock", f"must be a raftsync.time.Clock, not {clock!r}")
        if clock is not None and self.config.ntp_servers:
            raise ConfigError("clock", "give either clock= or ntp_servers, not both")
        self._clock = clock             # a clock passed in stays the caller's to close
        self._owns_clock = False
        self._hlc: HybridLogicalClock | None = None
        self._replica = Replica(self.config)
        self._started = False
        self._closed = False
        self._lifecycle = threading.Lock()

    @classmethod
    def from_env(cls, config_file: str | None = None, **overrides: Any) -> "Node":
        """A node configured from ``RAFTSYNC_*`` variables (and an optional TOML file)."""
        return cls(config_file=config_file, **overrides)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "Node":
        with self._lifecycle:
            if self._closed:
                raise Closed("node is closed")
            if not self._started:
                for message in self.config.start_warnings():
                    warnings.warn(message, ConfigWarning, stacklevel=2)
                self._replica.start()
                if self._clock is None:
                    self._clock, self._owns_clock = clock_from_config(self.config), True
                self._hlc = HybridLogicalClock(self._clock)
                self._started = True
        return self

    def wait_ready(self, timeout: float | None = 10.0) -> "Node":
        """Block until the group has a leader and this node's default session is open."""
        self._require_started()
        # Waiting for the cluster to form is the point here: no NoQuorum before the deadline.
        self._replica.sessions.default(deadline_after(timeout), no_quorum=False)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Close this node's sessions (releasing what they hold) and stop its engine."""
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            if self._started:
                try:
                    self._replica.close(timeout)
                finally:
                    if self._owns_clock:
                        self._clock.close()

    def __enter__(self) -> "Node":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _require_started(self) -> None:
        if self._closed:
            raise Closed("node is closed")
        if not self._started:
            raise RaftsyncError("node is not started: call start() first")
        self._replica.check_owner()

    # -- state ---------------------------------------------------------------------------

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """Role, leader, term, commit/applied index and quorum as this node sees them."""
        self._require_started()
        return self._replica.status(timeout)

    @property
    def address(self) -> str:
        return self.config.self_address

    @property
    def engine_pid(self) -> int | None:
        return self._replica.engine_pid

    @property
    def time(self) -> Clock:
        """This node's clock: ``clock=`` if given, an ``NtpClock`` over the
        ``ntp_servers`` setting, else a ``LocalClock`` (see ``raftsync.time``)."""
        self._require_started()
        return self._clock

    def hlc(self, received: HLCTimestamp | list[int] | None = None) -> HLCTimestamp:
        """A new stamp from this node's hybrid logical clock (driven by ``node.time``):
        larger than every stamp this node issued before, and larger than ``received``
        (a stamp from another node, merged in: pass it when you receive a message)."""
        self._require_started()
        return self._hlc.now() if received is None else self._hlc.update(received)

    # -- factories -------------------------------------------------------------------

    def session(self, ttl: float | None = None, timeout: float | None = 10.0) -> Session:
        """Open a new session (default TTL: the node's ``session_ttl``)."""
        self._require_started()
        return self._replica.sessions.open(self.config.session_ttl if ttl is None else ttl, deadline_after(timeout))

    @property
    def default_session(self) -> Session:
        self._require_started()
        return self._replica.sessions.default(time.monotonic())

    def data(self, prefix: str = "") -> Data:
        """The KV map, optionally scoped to keys starting with ``prefix``."""
        self._require_started()
        return Data(self._replica, prefix)

    def lock(self, name: str, ttl: float | None = None, session: Session | None = None) -> Lock:
        """A handle on the distributed lock ``name``.

        ``ttl``: how long after this process goes silent the lock is freed (default: the
        node's session TTL). ``session``: hold it under an explicit session instead.
        """
        self._require_started()
        return Lock(self._replica, name, ttl=ttl, session=session)

    def leader(self, group: str, ttl: float | None = None, session: Session | None = None) -> Election:
        """A handle on the leader election of ``group`` (one candidate per handle)."""
        self._require_started()
        return Election(self._replica, group, ttl=ttl, session=session)

    def semaphore(self, name: str, permits: int, ttl: float | None = None,
                  session: Session | None = None) -> Semaphore:
        """A handle on the counting semaphore ``name`` with ``permits`` holders at most."""
        self._require_started()
        return Semaphore(self._replica, name, permits, ttl=ttl, session=session)

    def rwlock(self, name: str, ttl: float | None = None, session: Session | None = None) -> RWLock:
        """The read/write lock ``name``; take handles with ``read_lock()`` / ``write_lock()``."""
        self._require_started()
        return RWLock(self._replica, name, ttl=ttl, session=session)

    def events(self, topic: str) -> Events:
        """A handle on the event stream ``topic`` (publish, subscribe, consumer groups)."""
        self._require_started()
        return Events(self._replica, topic, self._hlc)

    def tasks(self, pool: int = 10, session: Session | None = None) -> Tasks:
        """Submit jobs and schedules; with handlers (``@tasks.handler(name)``), also a worker
        running up to ``pool`` jobs at once. ``session``: register the worker under an
        explicit session instead of the node's default one."""
        self._require_started()
        return Tasks(self._replica, pool, session=session)
