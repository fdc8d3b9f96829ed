"""Start the services of a docker-compose file, each in its own network namespace.

No Docker engine is needed: the demo compose file is what the fault tests run.

Per run (a random run id ``rid``):

- a hub namespace ``rs-<rid>-net`` holding a bridge ``br0``; the root namespace is
  left untouched (no interface, route or address is added there);
- per service a namespace ``rs-<rid>-<service>`` joined to the bridge by a veth pair
  (``eth0`` inside, ``v<n>`` in the hub) with an address from 10.77.0.0/24 (private to
  the run's bridge, so concurrent runs do not collide); ``/etc/netns/<ns>/hosts`` maps
  every service name (and ``hostname``) to its address, which ``ip netns exec`` makes
  the service's ``/etc/hosts``;
- the service's ``command`` with its compose ``environment`` (nothing else of the
  runner's environment leaks in, as in a container) runs under ``ip netns exec`` in its
  own process group (app and raftsync engine together), output to
  ``<base_dir>/logs/<service>.log``. ``raftsync ...`` runs as ``<this python> -m
  raftsync ...`` with this checkout on PYTHONPATH, i.e. what the image would contain;
- volumes become directories under ``<base_dir>/volumes/`` (bind mounts: the host
  path); environment values naming a mount target or a path under it are rewritten to
  that directory.

Cleanup: ``close()`` (context manager, atexit, SIGTERM/SIGINT in the CLI) kills every
process of the run's namespaces and deletes them and their ``/etc/netns`` dirs. Each run
first writes ``/run/raftsync-netns/<rid>.json`` naming its runner (pid and start time);
``sweep()`` (run at every start, and by ``python -m cluster.netns sweep``) removes what
runs whose runner is dead left behind, and namespaces of ours that no record claims.

CLI: ``python -m cluster.netns up [-f docker-compose.yml] [--for SECONDS]`` prints every
service's output prefixed with its name until interrupted; ``sweep``; ``ls``.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .compose import ComposeProject, Service, load_compose
from .stopping import stop_and_wait

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("RAFTSYNC_NETNS_STATE_DIR", "/run/raftsync-netns"))
NETNS_DIR = Path("/etc/netns")
PREFIX = "rs-"
SUBNET = ipaddress.ip_network("10.77.0.0/24")
FIRST_HOST = 11


def tool(name: str) -> str:
    """The path of an admin tool, also when PATH lacks the sbin directories."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if os.access(f"{directory}/{name}", os.X_OK):
            return f"{directory}/{name}"
    return name


IP = tool("ip")
FAKETIME_SITE = REPO_ROOT / "cluster" / "faketime_site"
READY_LINE = re.compile(r"raftsync node \S+ ready")
_OUR_NAMESPACE = re.compile(r"^rs-([0-9a-f]{6})-")
# What a container's environment has without being told (the image's ENV): the runner
# passes these and the service's compose environment, nothing else of its own.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}


class RunnerError(Exception):
    """The namespace runner could not do what it was asked."""


def missing_privileges() -> str | None:
    """Why this process cannot run namespaced clusters here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces, a bridge and veth pairs)"
    if not os.path.isabs(IP):
        return "needs iproute2 ('ip' not found)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    result = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    try:
        veth = subprocess.run([IP, "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
                              capture_output=True, text=True)
        bridge = subprocess.run([IP, "-n", probe, "link", "add", "b0", "type", "bridge"],
                                capture_output=True, text=True)
    finally:
        subprocess.run([IP, "netns", "delete", probe], capture_output=True)
    if veth.returncode != 0:
        return f"cannot create veth pairs: {veth.stderr.strip()}"
    if bridge.returncode != 0:
        return f"cannot create a bridge: {bridge.stderr.strip()}"
    return None


def find_faketime() -> str | None:
    """Debian's libfaketime (package faketime), whatever the architecture."""
    import glob
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    return found[0] if found else None


def _run(argv: list[str], check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RunnerError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


# -- ownership records and the sweep ---------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live runner from a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _runner_alive(record: dict[str, Any]) -> bool:
    return _start_time(int(record.get("pid", 0))) == record.get("start_time")


def list_namespaces() -> list[str]:
    result = _run([IP, "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def namespace_pids(namespace: str) -> list[int]:
    result = _run([IP, "netns", "pids", namespace], check=False)
    return [int(p) for p in result.stdout.split() if p.isdigit()]


def _destroy_namespace(namespace: str, deadline: float) -> None:
    """Kill every process in ``namespace`` (stopped ones too), then delete it."""
    while time.monotonic() < deadline:
        pids = namespace_pids(namespace)
        if not pids:
            break
        for pid in pids:
            for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    kill()
                except (ProcessLookupError, PermissionError):
                    pass
        time.sleep(0.05)  # the kernel reaps them asynchronously; poll until the list is empty
    if namespace in list_namespaces():
        _run([IP, "netns", "delete", namespace], check=False)
    shutil.rmtree(NETNS_DIR / namespace, ignore_errors=True)


def _destroy_run(record: dict[str, Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    present = set(list_namespaces())
    # services first, the hub (bridge) last
    for namespace in sorted(record.get("namespaces", []), key=lambda n: n.endswith("-net")):
        if namespace in present or (NETNS_DIR / namespace).exists():
            _destroy_namespace(namespace, deadline)
    if record.get("owns_base_dir") and record.get("base_dir"):
        shutil.rmtree(record["base_dir"], ignore_errors=True)


def sweep(state_dir: Path | None = None) -> list[str]:
    """Remove what dead runs left behind; returns the run ids cleaned up."""
    state_dir = Path(state_dir or STATE_DIR)
    cleaned: list[str] = []
    claimed: set[str] = set()
    if state_dir.is_dir():
        for path in sorted(state_dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = None
            if record is None:
                # a record being written this instant is complete within a moment;
                # only an old unreadable file is garbage
                if time.time() - path.stat().st_mtime > 60:
                    path.unlink(missing_ok=True)
                continue
            if _runner_alive(record):
                claimed.add(record["run_id"])
                continue
            _destroy_run(record)
            path.unlink(missing_ok=True)
            cleaned.append(record["run_id"])
    # namespaces of ours that no record claims: their run died before, or after losing, its record
    orphans: dict[str, list[str]] = {}
    for namespace in list_namespaces() + [p.name for p in NETNS_DIR.glob(f"{PREFIX}*")]:
        match = _OUR_NAMESPACE.match(namespace)
        if match and match.group(1) not in claimed:
            orphans.setdefault(match.group(1), []).append(namespace)
    for run_id, namespaces in orphans.items():
        # a run writes its record before creating anything: one that started since we
        # read the records has one by now
        if (state_dir / f"{run_id}.json").exists():
            continue
        _destroy_run({"namespaces": sorted(set(namespaces))})
        if run_id not in cleaned:
            cleaned.append(run_id)
    return cleaned


# -- a run -------------------------------------------------------------------------------------


@dataclass
class ServiceProcess:
    service: Service
    namespace: str
    address: str
    log_path: Path
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    process: subprocess.Popen | None = None
    starts: int = 0
    ready_lines_before: int = 0
    exit_codes: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(empty log)"


class NamespaceCluster:
    """The services of a compose file, each in its own network namespace.

    ``environment``: extra variables for every service (a dict, or a function of the
    Service returning one), applied over the compose environment, e.g. a random
    password or the demo workload's history path. ``ready``: the line each service
    prints once it serves (default: ``raftsync node run``'s ready line); None waits
    for nothing.
    """

    def __init__(self, compose_file: str | os.PathLike = REPO_ROOT / "docker-compose.yml", *,
                 base_dir: str | os.PathLike | None = None,
                 environment: dict[str, str] | Callable[[Service], dict[str, str]] | None = None,
                 compose_environ: dict[str, str] | None = None, ready: re.Pattern | None = READY_LINE,
                 python: str = sys.executable, state_dir: str | os.PathLike | None = None,
                 faketime: bool = False) -> None:
        self.project: ComposeProject = load_compose(compose_file, compose_environ)
        self.state_dir = Path(state_dir or STATE_DIR)
        self.run_id = self._fresh_run_id()
        self._owns_base_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix=f"raftsync-netns-{self.run_id}-"))
        self.state_path = self.state_dir / f"{self.run_id}.json"
        self.hub = f"{PREFIX}{self.run_id}-net"
        self.python = python
        self.ready = ready
        self._extra_env = environment
        self.faketime_library = find_faketime() if faketime else None
        if faketime and self.faketime_library is None:
            raise RunnerError("faketime=True needs libfaketime (apt-get install faketime)")
        self._closed = False
        self._close_lock = threading.Lock()
        hosts = list(SUBNET.hosts())
        if len(self.project.services) > len(hosts) - FIRST_HOST:
            raise RunnerError("too many services for one /24")
        self.services: dict[str, ServiceProcess] = {}
        for index, service in enumerate(self.project.services.values()):
            self.services[service.name] = self._plan(service, str(hosts[FIRST_HOST - 1 + index]))

    def _fresh_run_id(self) -> str:
        """A run id no record or namespace uses (close() deletes by name: never share one)."""
        taken = set()
        if os.geteuid() == 0 and os.path.isabs(IP):
            taken = {m.group(1) for m in map(_OUR_NAMESPACE.match, list_namespaces()) if m}
        while True:
            run_id = secrets.token_hex(3)
            if run_id not in taken and not (self.state_dir / f"{run_id}.json").exists():
                return run_id

    # -- planning --------------------------------------------------------------------------

    def _plan(self, service: Service, address: str) -> ServiceProcess:
        mounts = {}
        for mount in service.volumes:
            host = Path(mount.source) if not mount.named else self.base_dir / "volumes" / mount.source
            mounts[mount.target] = host
        env = dict(BASE_ENV)
        env["HOME"] = str(self.base_dir / "home" / service.name)
        env["PYTHONPATH"] = str(REPO_ROOT)
        env.update(service.environment)
        extra = self._extra_env(service) if callable(self._extra_env) else (self._extra_env or {})
        env.update(extra)
        env = {key: _map_path(value, mounts) for key, value in env.items()}
        if self.faketime_library:
            # each member's wall clock follows the offset in its own file (Nemesis.skew);
            # monotonic clocks stay real (Python's waits need them)
            env.update({"LD_PRELOAD": self.faketime_library, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                        "FAKETIME_TIMESTAMP_FILE": str(self.clock_file(service.name)), "FAKETIME_NO_CACHE": "1",
                        "PYTHONPATH": f"{FAKETIME_SITE}{os.pathsep}{env['PYTHONPATH']}"})
        argv = list(service.command)
        if argv[0] == "raftsync":
            argv = [self.python, "-m", "raftsync", *argv[1:]]
        elif argv[0] in ("python", "python3"):
            argv = [self.python, *argv[1:]]
        return ServiceProcess(service, f"{PREFIX}{self.run_id}-{service.name}", address,
                              self.base_dir / "logs" / f"{service.name}.log", argv, env,
                              self.base_dir / "work" / service.name)

    def clock_file(self, name: str) -> Path:
        """The file holding the service's wall-clock offset under libfaketime ("+0", "-90s")."""
        return self.base_dir / "clock" / name

    @property
    def namespaces(self) -> list[str]:
        return [self.hub] + [s.namespace for s in self.services.values()]

    def _write_record(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        record = {"run_id": self.run_id, "pid": os.getpid(), "start_time": _start_time(os.getpid()),
                  "namespaces": self.namespaces, "base_dir": str(self.base_dir),
                  "owns_base_dir": self._owns_base_dir, "compose_file": str(self.project.path)}
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record))
        temporary.replace(self.state_path)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "NamespaceCluster":
        """Sweep dead runs, build the network, start every service, wait until all are ready."""
        why = missing_privileges()
        if why:
            raise RunnerError(why)
        sweep(self.state_dir)
        # the record exists before anything it names, so a crash at any point is swept
        self._write_record()
        atexit.register(self.close)
        try:
            self._build_network()
            for service in self.services.values():
                self.start_service(service.name, wait=False)
            self.wait_ready(timeout=timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _build_network(self) -> None:
        _run([IP, "netns", "add", self.hub])
        _run([IP, "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run([IP, "-n", self.hub, "link", "set", "br0", "up"])
        _run([IP, "-n", self.hub, "link", "set", "lo", "up"])
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        for service in self.services.values():
            names = [service.name] + ([service.service.hostname] if service.service.hostname
                                      and service.service.hostname != service.name else [])
            hosts.append(f"{service.address}\t{' '.join(names)}")
        for index, service in enumerate(self.services.values()):
            namespace, hub_side = service.namespace, f"v{index}"
            (NETNS_DIR / namespace).mkdir(parents=True, exist_ok=True)
            (NETNS_DIR / namespace / "hosts").write_text("\n".join(hosts) + "\n")
            _run([IP, "netns", "add", namespace])
            _run([IP, "-n", self.hub, "link", "add", hub_side, "type", "veth", "peer", "name", "eth0",
                  "netns", namespace])
            _run([IP, "-n", self.hub, "link", "set", hub_side, "master", "br0"])
            _run([IP, "-n", self.hub, "link", "set", hub_side, "up"])
            _run([IP, "-n", namespace, "addr", "add", f"{service.address}/{SUBNET.prefixlen}", "dev", "eth0"])
            _run([IP, "-n", namespace, "link", "set", "eth0", "up"])
            _run([IP, "-n", namespace, "link", "set", "lo", "up"])

    def start_service(self, name: str, wait: bool = True, timeout: float = 60.0) -> ServiceProcess:
        """(Re)start a service from its volumes; with ``wait``, until its ready line."""
        service = self.services[name]
        if service.running:
            raise RunnerError(f"{name} is already running")
        for directory in [service.cwd, Path(service.env["HOME"]), service.log_path.parent,
                          *self._volume_dirs(service)]:
            directory.mkdir(parents=True, exist_ok=True)
        if self.faketime_library and not self.clock_file(name).exists():
            self.clock_file(name).parent.mkdir(parents=True, exist_ok=True)
            self.clock_file(name).write_text("+0\n")
        service.ready_lines_before = self._ready_lines(service)
        with open(service.log_path, "ab") as log:
            log.write(f"--- runner: start #{service.starts + 1} of {name} in {service.namespace} "
                      f"({service.address})\n".encode())
            log.flush()
            service.process = subprocess.Popen([IP, "netns", "exec", service.namespace, *service.argv],
                                               env=service.env, cwd=service.cwd, stdin=subprocess.DEVNULL,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        service.starts += 1
        if wait:
            self.wait_ready([name], timeout)
        return service

    def _volume_dirs(self, service: ServiceProcess) -> list[Path]:
        return [self.base_dir / "volumes" / m.source for m in service.service.volumes if m.named]

    def _ready_lines(self, service: ServiceProcess) -> int:
        return len(self.ready.findall(service.log_text())) if self.ready is not None else 0

    def wait_ready(self, names: list[str] | None = None, timeout: float = 60.0) -> None:
        """Until each service (since its last start) printed its ready line; raises RunnerError
        naming the service and its log tail when one exits or the deadline passes."""
        if self.ready is None:
            return
        pending = list(names or self.services)
        deadline = time.monotonic() + timeout
        while pending:
            for name in list(pending):
                service = self.services[name]
                if self._ready_lines(service) > service.ready_lines_before:
                    pending.remove(name)
                elif not service.running:
                    raise RunnerError(f"{name} exited ({service.process and service.process.returncode}) "
                                      f"before it was ready; log:\n{service.log_tail()}")
            if pending and time.monotonic() > deadline:
                raise RunnerError(f"not ready within {timeout}s: {pending}; log of {pending[0]}:\n"
                                  f"{self.services[pending[0]].log_tail()}")
            if pending:
                time.sleep(0.05)  # polling the log files: the pollable condition is a line in a file

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to the service's whole process group (app and engine); a SIGSTOP
        has taken effect when this returns."""
        service = self.services[name]
        if service.process is None:
            raise RunnerError(f"{name} was never started")
        if sig == signal.SIGSTOP:
            stop_and_wait(service.process.pid, group=True)
            return
        try:
            os.killpg(service.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self, name: str, timeout: float = 10.0) -> None:
        """SIGKILL the service's process group and reap it; nothing of it stays in its namespace."""
        service = self.services[name]
        if service.process is None:
            return
        self.signal(name, signal.SIGKILL)
        try:
            service.exit_codes.append(service.process.wait(timeout))
        except subprocess.TimeoutExpired:
            raise RunnerError(f"{name} did not die within {timeout}s of SIGKILL") from None
        deadline = time.monotonic() + timeout
        while namespace_pids(service.namespace):  # a child that left the group (none should)
            if time.monotonic() > deadline:
                raise RunnerError(f"processes left in {service.namespace}: {namespace_pids(service.namespace)}")
            for pid in namespace_pids(service.namespace):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def pause(self, name: str) -> None:
        self.signal(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.signal(name, signal.SIGCONT)

    def stop_service(self, name: str, timeout: float = 15.0) -> int | None:
        """SIGTERM to the main process (SIGCONT to the group first, in case it is paused),
        then SIGKILL to the group after ``timeout``."""
        service = self.services[name]
        if not service.running:
            return service.process.returncode if service.process else None
        self.signal(name, signal.SIGCONT)
        self._terminate(service)
        try:
            code = service.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(name)
            return None
        service.exit_codes.append(code)
        return code

    @staticmethod
    def _terminate(service: ServiceProcess) -> None:
        # like `docker stop`: SIGTERM to the service's main process only; it shuts down
        # what it started (raftsync's engine) itself
        try:
            service.process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop_services(self, names: list[str] | None = None, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM several services at once (so none waits on a quorum already gone), then
        wait; SIGKILL what is still running after ``timeout``. Returns the exit codes."""
        names = [n for n in (names or list(self.services)) if self.services[n].running]
        for name in names:
            self.signal(name, signal.SIGCONT)
            self._terminate(self.services[name])
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for name in names:
            process = self.services[name].process
            try:
                codes[name] = process.wait(max(0.1, deadline - time.monotonic()))
                self.services[name].exit_codes.append(codes[name])
            except subprocess.TimeoutExpired:
                self.kill(name)
                codes[name] = None
        return codes

    def exec(self, name: str, argv: list[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` in the service's namespace (its /etc/hosts), not in its process group."""
        return subprocess.run([IP, "netns", "exec", self.services[name].namespace, *argv],
                              capture_output=True, text=True, timeout=timeout, **kwargs)

    def close(self) -> None:
        """Kill every service and remove namespaces, /etc/netns dirs, the record (and the
        base dir if the run created it). Safe to call twice and from atexit."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        for service in self.services.values():
            if service.process is not None:
                try:
                    os.killpg(service.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for service in self.services.values():
            if service.process is not None:
                try:
                    service.process.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        _destroy_run({"namespaces": self.namespaces, "base_dir": str(self.base_dir),
                      "owns_base_dir": False})
        self.state_path.unlink(missing_ok=True)
        if self._owns_base_dir and not os.environ.get("RAFTSYNC_NETNS_KEEP"):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "NamespaceCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def follow(self, stop: threading.Event, out: Any = None) -> None:
        """Print every service's new log lines, prefixed with its name, until ``stop``."""
        out = out or sys.stdout
        offsets = {name: 0 for name in self.services}
        width = max(len(name) for name in self.services)
        while not stop.is_set():
            for name, service in self.services.items():
                try:
                    with open(service.log_path, "rb") as handle:
                        handle.seek(offsets[name])
                        chunk = handle.read()
                except OSError:
                    continue
                complete = chunk.rfind(b"\n") + 1
                offsets[name] += complete
                for line in chunk[:complete].decode(errors="replace").splitlines():
                    print(f"{name:<{width}} | {line}", file=out)
            out.flush()
            stop.wait(0.2)


def _map_path(value: str, mounts: dict[str, Path]) -> str:
    """A container path under a mount target, as the host directory behind it."""
    for target, host in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if value == target:
            return str(host)
        if value.startswith(target + "/"):
            return str(host / value[len(target) + 1:])
    return value


def iter_our_runs(state_dir: Path | None = None) -> Iterator[dict[str, Any]]:
    state_dir = Path(state_dir or STATE_DIR)
    for path in sorted(state_dir.glob("*.json")) if state_dir.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        record["alive"] = _runner_alive(record)
        yield record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.netns", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the compose file's services in namespaces and follow their output")
    up.add_argument("-f", "--file", default=str(REPO_ROOT / "docker-compose.yml"))
    up.add_argument("--for", dest="seconds", type=float, default=None, help="stop after this many seconds")
    up.add_argument("--base-dir", default=None, help="keep logs and volumes here (default: a temporary dir)")
    up.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for every service (repeatable)")
    up.add_argument("--quiet", action="store_true", help="do not print the services' output")
    commands.add_parser("sweep", help="remove what dead runs left behind")
    commands.add_parser("ls", help="list runs and whether their runner is alive")
    args = parser.parse_args(argv)
    if args.command == "sweep":
        for run_id in sweep():
            print(f"removed leftovers of run {run_id}")
        return 0
    if args.command == "ls":
        for record in iter_our_runs():
            print(f"{record['run_id']} pid={record['pid']} {'alive' if record['alive'] else 'DEAD'} "
                  f"{record.get('compose_file')} {record.get('base_dir')}")
        return 0
    extra = dict(item.split("=", 1) for item in args.env)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    cluster = NamespaceCluster(args.file, base_dir=args.base_dir, environment=extra)
    try:
        cluster.start()
        addresses = " ".join(f"{s.name}={s.address}" for s in cluster.services.values())
        print(f"RUNNING run={cluster.run_id} base_dir={cluster.base_dir} {addresses}", flush=True)
        if args.seconds is not None:
            threading.Timer(args.seconds, stop.set).start()
        if args.quiet:
            stop.wait()
        else:
            cluster.follow(stop)
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
