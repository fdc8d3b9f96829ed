"""Faults for a NamespaceCluster: network partitions with nftables inside the members'
namespaces, and kills, pauses and restarts of a member's whole process group.

Links are cut by dropping packets at the receiver: each member's namespace gets a table
``inet raftsync_nemesis`` whose input chain drops what comes from the addresses it must
not hear. A cut is directional (``src -> dst``), so one-way drops are the same
mechanism; a partition cuts both ways between groups. Packets are dropped, not refused:
TCP connections hang as on a real broken link. ``heal()`` removes every cut.

Every fault is logged with its ``time.monotonic()`` start and end (``log``), and every
incarnation killed is in ``deaths`` (for cluster/history.py's lock holds).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

from .netns import IP, NamespaceCluster, RunnerError, tool
from .workload_log import last_status

TABLE = "raftsync_nemesis"


def missing_nftables() -> str | None:
    if not os.path.isabs(tool("nft")):
        return "needs nftables ('nft' not found; apt-get install nftables)"
    return None


@dataclass
class Fault:
    kind: str
    target: str
    start: float
    end: float | None = None


@dataclass
class Nemesis:
    cluster: NamespaceCluster
    log: list[Fault] = field(default_factory=list)
    deaths: dict[tuple[str, int], float] = field(default_factory=dict)
    cuts: set[tuple[str, str]] = field(default_factory=set)   # (src, dst): dst hears nothing from src
    paused: set[str] = field(default_factory=set)

    # -- network ------------------------------------------------------------------------------

    @property
    def members(self) -> list[str]:
        return list(self.cluster.services)

    def cut(self, pairs: Iterable[tuple[str, str]], kind: str = "cut") -> None:
        """Add one-way cuts ``src -> dst`` (packets from src never reach dst)."""
        pairs = set(pairs)
        for src, dst in pairs:
            if src not in self.cluster.services or dst not in self.cluster.services or src == dst:
                raise RunnerError(f"bad cut {src} -> {dst}")
        self.cuts |= pairs
        self._apply()
        self.log.append(Fault(kind, ",".join(f"{s}->{d}" for s, d in sorted(pairs)), time.monotonic()))

    def partition(self, *groups: Iterable[str]) -> None:
        """Members of different groups cannot reach each other (both ways); the members
        not named form one more group together (``partition({a})`` isolates ``a``)."""
        groups = [set(g) for g in groups]
        named = set().union(*groups)
        rest = {m for m in self.members if m not in named}
        if rest:
            groups.append(rest)
        side = {member: i for i, group in enumerate(groups) for member in group}
        pairs = {(a, b) for a in self.members for b in self.members if side[a] != side[b]}
        self.cut(pairs, "partition " + " | ".join(",".join(sorted(g)) for g in groups))

    def isolate(self, member: str) -> None:
        self.partition({member})

    def bridge(self, middle: str) -> None:
        """The two other halves cannot reach each other, ``middle`` reaches both."""
        others = [m for m in self.members if m != middle]
        half = len(others) // 2
        left, right = others[:half], others[half:]
        self.cut({(a, b) for a in left for b in right} | {(b, a) for a in left for b in right},
                 f"bridge {middle} between {','.join(left)} | {','.join(right)}")

    def heal(self) -> None:
        if self.cuts:
            self.cuts.clear()
            self._apply()
        now = time.monotonic()
        for fault in self.log:
            if fault.end is None and fault.kind != "kill":
                fault.end = now

    def _apply(self) -> None:
        for member, service in self.cluster.services.items():
            sources = sorted(self.cluster.services[s].address for s, d in self.cuts if d == member)
            rules = f"ip saddr {{ {', '.join(sources)} }} drop" if sources else ""
            # "add table" then "delete table" makes the delete safe when it does not exist yet
            script = (f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
                      f"table inet {TABLE} {{\n  chain input {{\n"
                      f"    type filter hook input priority -10; policy accept;\n    {rules}\n  }}\n}}\n")
            result = subprocess.run([IP, "netns", "exec", service.namespace, tool("nft"), "-f", "-"], input=script,
                                    capture_output=True, text=True, timeout=20)
            if result.returncode != 0:
                raise RunnerError(f"nft in {service.namespace} failed: {result.stderr.strip()}")

    def flap(self, groups: list[list[str]], period: float, count: int, stop: threading.Event | None = None) -> None:
        """Alternate between the partition ``groups[i % len]`` and healed, ``count`` times."""
        stop = stop or threading.Event()
        for i in range(count):
            if stop.is_set():
                break
            self.partition(*groups[i % len(groups)])
            stop.wait(period)   # a fault schedule's timing, not a synchronisation
            self.heal()
            stop.wait(period)

    # -- processes -------------------------------------------------------------------------------

    def kill(self, member: str) -> None:
        """SIGKILL the member's process group (app and engine)."""
        service = self.cluster.services[member]
        pid = service.pid
        self.cluster.kill(member)
        now = time.monotonic()
        self.paused.discard(member)
        self.deaths[(service.env.get("RAFTSYNC_SELF", member), pid)] = now
        self.log.append(Fault("kill", member, now, now))

    def restart(self, member: str, wait: bool = True, timeout: float = 60.0) -> None:
        """Start a killed member again from its volume; with ``wait``, until its ready line
        (which needs a leader it can reach)."""
        start = time.monotonic()
        self.cluster.start_service(member, wait=wait, timeout=timeout)
        self.log.append(Fault("restart", member, start, time.monotonic()))

    def pause(self, member: str) -> None:
        """SIGSTOP the member's process group (app and engine)."""
        self.cluster.pause(member)
        self.paused.add(member)
        self.log.append(Fault("pause", member, time.monotonic()))

    def resume(self, member: str) -> None:
        self.cluster.resume(member)
        self.paused.discard(member)
        now = time.monotonic()
        for fault in self.log:
            if fault.kind == "pause" and fault.target == member and fault.end is None:
                fault.end = now

    def stop_all(self) -> None:
        """End every fault: resume paused members and heal the network."""
        for member in list(self.paused):
            self.resume(member)
        self.heal()

    # -- clocks ------------------------------------------------------------------------------------

    def skew(self, member: str, seconds: float) -> None:
        """Set the member's wall clock ``seconds`` off the host's (app and engine; the
        cluster must run with faketime=True). Monotonic clocks are untouched."""
        path = self.cluster.clock_file(member)
        if self.cluster.faketime_library is None:
            raise RunnerError("skew needs a cluster started with faketime=True")
        temporary = path.with_suffix(".tmp")
        temporary.write_text(f"{seconds:+.0f}\n")
        temporary.replace(path)   # libfaketime re-reads the file on every call: never show it half-written
        self.log.append(Fault("skew", f"{member} {seconds:+.0f}s", time.monotonic()))

    # -- what the members say ------------------------------------------------------------------------

    def raft_leader(self, timeout: float = 30.0) -> str:
        """The member that, in its latest workload status line, reports it leads (the highest
        term if several do); waits for one."""
        deadline = time.monotonic() + timeout
        while True:
            best = None
            for member, service in self.cluster.services.items():
                status = last_status(service.log_text())
                if status and status[1] == "leader":
                    term = int(status[3])
                    if best is None or term > best[0]:
                        best = (term, member)
            if best is not None:
                return best[1]
            if time.monotonic() > deadline:
                raise RunnerError("no member reports that it leads")
            time.sleep(0.1)   # polling the members' logs
