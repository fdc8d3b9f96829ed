"""Node configuration: one schema, read from arguments, environment or a TOML file.

Precedence: explicit arguments > ``RAFTSYNC_*`` environment > TOML file > defaults.
Every problem raises :class:`ConfigError` naming the setting and why.

``data_dir`` defaults, like etcd's ``<name>.etcd``, to ``raftsync-<host>_<port>`` in the
working directory: a member restarted at the same address must find its term, vote and
log again, or it may vote twice in one term. Memory only is ``data_dir=":memory:"``
(argument, ``RAFTSYNC_DATA_DIR`` or TOML alike).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .time import parse_server

ENGINES = ("process", "thread")
MEMORY_ONLY = ":memory:"
MAX_VOTERS = 9


@dataclass
class NodeConfig:
    """Everything a node needs. Times are in seconds."""

    self_address: str
    peers: list[str] = field(default_factory=list)
    password: str | None = None
    data_dir: str | None = None
    session_ttl: float = 10.0
    engine: str = "process"
    election_timeout: tuple[float, float] = (0.4, 0.8)
    heartbeat_interval: float = 0.05
    compaction_min_entries: int = 5000
    quorum_timeout: float = 5.0
    attempt_timeout: float = 1.0
    start_timeout: float = 15.0
    bind_retries: int = 20
    test_hooks: bool = False
    ntp_servers: list[str] = field(default_factory=list)   # node.time: NtpClock over these, else LocalClock

    def validate(self) -> "NodeConfig":
        _check_address("self_address", self.self_address)
        if not isinstance(self.peers, (list, tuple)):
            raise ConfigError("peers", "must be a list of 'host:port' strings")
        self.peers = [str(p) for p in self.peers]
        for peer in self.peers:
            _check_address("peers", peer)
        if self.self_address in self.peers:
            self.peers = [p for p in self.peers if p != self.self_address]
        voters = len(self.peers) + 1
        if voters > MAX_VOTERS:
            raise ConfigError("peers", f"a group has 1 to {MAX_VOTERS} voters; this one would have {voters}")
        if self.password is not None and (not isinstance(self.password, str) or not self.password):
            raise ConfigError("password", "must be a non-empty string")
        if self.password is None and not all(_is_loopback(a) for a in [self.self_address, *self.peers]):
            raise ConfigError("password", "required when any address is not loopback: PySyncObj's wire "
                                          "format is pickle, so an open port would run anyone's code")
        if self.engine not in ENGINES:
            raise ConfigError("engine", f"must be one of {ENGINES}, not {self.engine!r}")
        _positive("session_ttl", self.session_ttl, minimum=0.3)
        _positive("heartbeat_interval", self.heartbeat_interval)
        _positive("quorum_timeout", self.quorum_timeout)
        _positive("attempt_timeout", self.attempt_timeout)
        _positive("start_timeout", self.start_timeout)
        try:
            low, high = (float(x) for x in self.election_timeout)
        except (TypeError, ValueError):
            raise ConfigError("election_timeout", "must be a pair (min, max) of seconds") from None
        if not 3 * self.heartbeat_interval < low < high:
            raise ConfigError("election_timeout", "needs 3*heartbeat_interval < min < max")
        self.election_timeout = (low, high)
        if isinstance(self.bind_retries, bool) or not isinstance(self.bind_retries, int) or self.bind_retries < 1:
            raise ConfigError("bind_retries", "must be an int >= 1 (attempts, 0.5 s apart)")
        if not isinstance(self.compaction_min_entries, int) or self.compaction_min_entries < 2:
            raise ConfigError("compaction_min_entries", "must be an int >= 2")
        if self.data_dir is None:
            self.data_dir = default_data_dir(self.self_address)
        elif not isinstance(self.data_dir, (str, os.PathLike)) or not os.fspath(self.data_dir):
            raise ConfigError("data_dir", f"must be a directory path or {MEMORY_ONLY!r}, not {self.data_dir!r}")
        else:
            self.data_dir = os.fspath(self.data_dir)
        if isinstance(self.ntp_servers, str) or not isinstance(self.ntp_servers, (list, tuple)):
            raise ConfigError("ntp_servers", "must be a list of 'host' or 'host:port' strings")
        for server in self.ntp_servers:
            if not isinstance(server, str):
                raise ConfigError("ntp_servers", f"{server!r} is not a 'host' or 'host:port' string")
            parse_server(server, "ntp_servers")
        self.ntp_servers = [s.strip() for s in self.ntp_servers]
        return self

    @property
    def memory_only(self) -> bool:
        return self.data_dir == MEMORY_ONLY

    def start_warnings(self) -> list[str]:
        """What a member with this config should warn about when it starts."""
        voters = len(self.peers) + 1
        messages = []
        if voters % 2 == 0:
            messages.append(f"a group of {voters} voters needs {voters // 2 + 1} for a quorum and so tolerates "
                            f"no more failures than one of {voters - 1}; prefer an odd number")
        if self.memory_only and voters > 1:
            messages.append(f"{self.self_address} keeps its Raft term, vote and log in memory only "
                            f"(data_dir={MEMORY_ONLY!r}): never restart it under the same address, or it may vote "
                            f"twice in one term and a committed write can be lost")
        return messages

    def engine_config(self) -> dict[str, Any]:
        """What the engine needs, as plain msgpack-able values."""
        return {
            "self_address": self.self_address,
            "peers": list(self.peers),
            "password": self.password,
            "data_dir": None if self.memory_only else self.data_dir,
            "election_timeout": list(self.election_timeout),
            "heartbeat_interval": self.heartbeat_interval,
            "compaction_min_entries": self.compaction_min_entries,
            "bind_retries": self.bind_retries,
            "test_hooks": self.test_hooks,
        }


_ENV = {
    "RAFTSYNC_SELF": "self_address",
    "RAFTSYNC_PEERS": "peers",
    "RAFTSYNC_PASSWORD": "password",
    "RAFTSYNC_DATA_DIR": "data_dir",
    "RAFTSYNC_SESSION_TTL": "session_ttl",
    "RAFTSYNC_ENGINE": "engine",
    "RAFTSYNC_COMPACTION_MIN_ENTRIES": "compaction_min_entries",
    "RAFTSYNC_QUORUM_TIMEOUT": "quorum_timeout",
    "RAFTSYNC_NTP_SERVERS": "ntp_servers",
}
_FIELDS = {f.name for f in fields(NodeConfig)}


def load_config(arguments: dict[str, Any], environ: dict[str, str] | None = None,
                toml_path: str | None = None) -> NodeConfig:
    """Merge arguments, environment and an optional TOML file into a validated config."""
    merged: dict[str, Any] = {}
    if toml_path:
        merged.update(_read_toml(toml_path))
    environ = os.environ if environ is None else environ
    for variable, name in _ENV.items():
        if variable in environ:
            merged[name] = _from_env(name, environ[variable])
    merged.update({k: v for k, v in arguments.items() if v is not None})
    unknown = set(merged) - _FIELDS
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown setting")
    if "self_address" not in merged:
        raise ConfigError("self_address", "missing (argument, RAFTSYNC_SELF or 'self_address' in the TOML file)")
    return NodeConfig(**merged).validate()


def _read_toml(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("config_file", f"{path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config_file", f"{path} is not valid TOML: {exc}") from None
    return dict(data.get("raftsync", data))


def _from_env(name: str, raw: str) -> Any:
    if name in ("peers", "ntp_servers"):
        return [p.strip() for p in raw.split(",") if p.strip()]
    if name in ("session_ttl", "quorum_timeout"):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(name, f"must be a number of seconds, not {raw!r}") from None
    if name == "compaction_min_entries":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(name, f"must be an integer, not {raw!r}") from None
    return raw


def default_data_dir(self_address: str) -> str:
    """``raftsync-<host>_<port>`` in the working directory, as an absolute path."""
    host, port = self_address.rsplit(":", 1)
    safe_host = re.sub(r"[^A-Za-z0-9.-]", "_", host.strip("[]"))
    return os.path.abspath(f"raftsync-{safe_host}_{port}")


def _check_address(setting: str, address: Any) -> None:
    if not isinstance(address, str) or ":" not in address:
        raise ConfigError(setting, f"{address!r} is not 'host:port'")
    host, port = address.rsplit(":", 1)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(setting, f"{address!r} is not 'host:port' with a port in 1..65535")


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def _positive(setting: str, value: Any, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= minimum:
        raise ConfigError(setting, f"must be a number > {minimum}, not {value!r}")
