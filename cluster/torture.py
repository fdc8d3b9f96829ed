"""Randomized fault schedules against docker-compose.yml's members in network namespaces.

    python -m cluster.torture --schedules N --seed S [--steps K] [--out DIR]

Each schedule starts the compose file's services through the namespace runner (each
member also running the demo workload with a history), waits until they replicate,
then applies ``--steps`` faults drawn from the seed: isolating a member or the Raft
leader, a majority/minority split, a bridge member seeing both halves, one-way cuts,
flapping partitions, pausing a member's process group (past the election timeout or
past the session TTL), SIGKILL and restart from its volume, and wall-clock skews (with
libfaketime). Then every fault stops and the schedule checks liveness (every member
writes, reads its peers, takes the lock, publishes and consumes events, runs a job and
sees one of its jobs finish within ``--recovery`` seconds) and safety over every
member's history (cluster/checker.py: KV linearizability and lost writes, lock and
leader holds, events and task jobs).

Printed per schedule and in total: operations checked, faults injected, violations.
A violating schedule keeps its logs and histories under ``--out`` and writes
``violations.txt`` there, with each non-linearizable key's history shrunk to a minimal
failing one. Exit status 1 if any schedule found a violation, 2 if it could not run.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checker import shrink
from .history import check_workload
from .nemesis import Nemesis, missing_nftables
from .netns import REPO_ROOT, NamespaceCluster, RunnerError, find_faketime, missing_privileges
from .workload_log import all_live, leads_since, log_marks, member_live, missing_liveness, peer_counters_seen

SESSION_TTL = 3.0
ELECTION_TIMEOUT_MAX = 0.8


@dataclass
class Outcome:
    index: int
    operations: int = 0
    counts: dict[str, int] = field(default_factory=dict)   # operations by kind: kv, events, tasks
    checked: str = ""                                        # what the checks covered
    faults: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    directory: Path | None = None


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)   # polling the members' logs
    return False


class Schedule:
    """One randomized schedule: ``steps`` faults on a running cluster."""

    def __init__(self, cluster: NamespaceCluster, nemesis: Nemesis, rng: random.Random, faketime: bool) -> None:
        self.cluster, self.nemesis, self.rng, self.faketime = cluster, nemesis, rng, faketime
        self.members = list(cluster.services)
        self.described: list[str] = []
        self.crashed: list[str] = []

    def _target(self) -> str:
        if self.rng.random() < 0.5:
            try:
                return self.nemesis.raft_leader(timeout=5)
            except RunnerError:
                pass
        return self.rng.choice([m for m in self.members if self.cluster.services[m].running] or self.members)

    def _hold(self, low: float, high: float) -> float:
        seconds = self.rng.uniform(low, high)
        time.sleep(seconds)   # how long the fault lasts: the schedule's timing
        return seconds

    def step(self) -> None:
        kinds = ["isolate", "split", "bridge", "one-way", "flap", "pause", "kill"] + (["skew"] if self.faketime else [])
        kind = self.rng.choice(kinds)
        getattr(self, "_" + kind.replace("-", "_"))()
        if self.rng.random() < 0.6:
            self.nemesis.heal()

    def _isolate(self) -> None:
        target = self._target()
        self.nemesis.isolate(target)
        self.described.append(f"isolate {target} {self._hold(0.5, 4):.1f}s")

    def _split(self) -> None:
        shuffled = self.rng.sample(self.members, len(self.members))
        cut = self.rng.randint(1, len(shuffled) - 1)
        minority, majority = shuffled[:cut], shuffled[cut:]
        self.nemesis.partition(set(minority), set(majority))
        self.described.append(f"split {','.join(minority)}|{','.join(majority)} {self._hold(0.5, 4):.1f}s")

    def _bridge(self) -> None:
        middle = self._target()
        self.nemesis.bridge(middle)
        self.described.append(f"bridge {middle} {self._hold(0.5, 4):.1f}s")

    def _one_way(self) -> None:
        src = self._target()
        dsts = self.rng.sample([m for m in self.members if m != src], self.rng.randint(1, len(self.members) - 1))
        if self.rng.random() < 0.5:
            pairs, text = [(src, d) for d in dsts], f"{src}->{','.join(dsts)}"
        else:
            pairs, text = [(d, src) for d in dsts], f"{','.join(dsts)}->{src}"
        self.nemesis.cut(pairs, "one-way")
        self.described.append(f"drop {text} {self._hold(0.5, 4):.1f}s")

    def _flap(self) -> None:
        groups = [[{m}] for m in self.rng.sample(self.members, len(self.members))]
        count, period = self.rng.randint(3, 8), self.rng.uniform(0.2, 0.6)
        self.nemesis.flap(groups, period=period, count=count)
        self.described.append(f"flap x{count} every {period:.1f}s")

    def _pause(self) -> None:
        target = self._target()
        if not self.cluster.services[target].running:
            return
        self.nemesis.pause(target)
        # past the election timeout, sometimes past the session TTL
        seconds = self._hold(2 * ELECTION_TIMEOUT_MAX, SESSION_TTL + 2)
        self.nemesis.resume(target)
        self.described.append(f"pause {target} {seconds:.1f}s")

    def _kill(self) -> None:
        target = self._target()
        if not self.cluster.services[target].running:
            return
        self.nemesis.kill(target)
        seconds = self._hold(0.5, 4)
        # not waiting for its ready line: a partition still in place may keep it from a leader
        self.nemesis.restart(target, wait=False)
        self.described.append(f"kill {target}, restart after {seconds:.1f}s")

    def _skew(self) -> None:
        target = self.rng.choice(self.members)
        offset = self.rng.choice([-1, 1]) * self.rng.choice([1, 30, 600, 3600, 86400]) * self.rng.uniform(1, 2)
        self.nemesis.skew(target, offset)
        self.described.append(f"skew {target} {offset:+.0f}s")

    def end(self) -> None:
        """Every fault stops: resume, heal, start what is down (clock skews stay)."""
        self.nemesis.stop_all()
        for name, service in self.cluster.services.items():
            if not service.running:
                self.crashed.append(f"{name} exited by itself ({service.process.returncode}) during the faults")
                self.nemesis.restart(name, wait=False)


def run_schedule(index: int, seed: int, steps: int, out: Path, compose: Path, recovery: float,
                 interval: str, keep: bool = False) -> Outcome:
    rng = random.Random(f"{seed}/{index}")
    outcome = Outcome(index)
    directory = out / f"schedule-{index:03d}"
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "history").mkdir(parents=True)
    faketime = find_faketime() is not None
    password = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(24))

    def environment(service):
        return {"RAFTSYNC_PASSWORD": password, "RAFTSYNC_DEMO_INTERVAL": interval,
                "RAFTSYNC_SESSION_TTL": str(SESSION_TTL),
                "RAFTSYNC_WORKLOAD_HISTORY": str(directory / "history" / f"{service.name}.jsonl")}

    cluster = NamespaceCluster(compose, base_dir=directory, environment=environment, faketime=faketime)
    nemesis = Nemesis(cluster)
    schedule = Schedule(cluster, nemesis, rng, faketime)
    try:
        cluster.start(timeout=60)
        if not _wait(lambda: all(len(peer_counters_seen(s.log_text())) == len(cluster.services) - 1
                                 for s in cluster.services.values()), 60):
            outcome.violations.append("liveness: the members never replicated before the faults")
        else:
            try:
                for _ in range(steps):
                    schedule.step()
            except RunnerError as exc:
                outcome.violations.append(f"harness: a fault could not be applied: {exc}")
            schedule.end()
            outcome.violations += [f"liveness: {text}" for text in schedule.crashed]
            marks = log_marks(cluster)
            try:
                cluster.wait_ready(timeout=recovery)
            except RunnerError as exc:
                outcome.violations.append(f"liveness: after the faults stopped, {exc}")
            if not _wait(lambda: all_live(cluster, marks), recovery):
                stuck = {n: missing_liveness(s.log_text()[marks[n]:]) for n, s in cluster.services.items()
                         if not member_live(s.log_text()[marks[n]:])}
                outcome.violations.append(f"liveness: {recovery:.0f}s after the faults stopped, not every member "
                                          "writes, reads its peers, takes the lock, publishes and consumes events "
                                          f"and runs jobs (still missing: {stuck or 'see logs'})")
            elif not _wait(lambda: leads_since(cluster, list(cluster.services), marks), 30):
                outcome.violations.append("liveness: no member reports that it leads after the faults")
        codes = cluster.stop_services()
        unclean = [name for name, code in codes.items() if code != 0]
        if unclean:
            outcome.violations.append(f"liveness: {unclean} did not stop cleanly on SIGTERM ({codes})")
    finally:
        cluster.close()
    outcome.faults = schedule.described
    report = check_workload(sorted((directory / "history").glob("*.jsonl")), deaths=nemesis.deaths,
                            time_limit=120)
    outcome.operations = report.operations
    outcome.counts = dict(report.counts)
    outcome.checked = _checked(report)
    if report.kv.verdict == "unknown":
        outcome.violations.append(f"undecided: the linearizability search ran out of time on {report.kv.unknown}")
    outcome.violations += [f"not linearizable: key {key}" for key in report.kv.violations]
    outcome.violations += [f"{v.kind}: {v.message}" for v in report.violations]
    if outcome.violations:
        outcome.directory = directory
        with open(directory / "violations.txt", "w") as handle:
            handle.write(f"seed {seed} schedule {index}\nfaults: {outcome.faults}\n\n")
            handle.write("\n".join(outcome.violations) + "\n\n" + report.explain() + "\n")
        for key, result in report.kv.violations.items():
            minimal = shrink(result.ops, time_limit=30)
            with open(directory / f"minimal-{key.replace('/', '_')}.jsonl", "w") as handle:
                for op in minimal:
                    handle.write(json.dumps({"process": op.process, "f": op.f, "key": op.key, "value": op.value,
                                             "expected": op.expected, "invoke": op.invoke,
                                             "complete": op.complete, "outcome": op.outcome,
                                             "result": dict(op.result or {})}) + "\n")
    elif not keep:
        shutil.rmtree(directory, ignore_errors=True)
    return outcome


def _checked(report) -> str:
    parts = [f"{report.kv.operations} kv operations on {len(report.kv.keys)} keys", f"{report.holds} holds"]
    if report.events:
        e = report.events
        parts.append(f"{e['checked']} of {e['acknowledged']} acknowledged events in {e['reads']} final reads "
                     f"({e['trimmed']} trimmed), {e['deliveries']} deliveries")
    if report.tasks:
        t = report.tasks
        parts.append(f"{t['checked']} of {t['jobs']} acknowledged jobs with a final status, "
                     f"{t['effects']} task effects")
    return "; ".join(parts)


def _breakdown(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in counts.items()) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.torture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=int, default=5, help="how many randomized schedules")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random; printed)")
    parser.add_argument("--steps", type=int, default=4, help="faults per schedule")
    parser.add_argument("--first", type=int, default=0,
                        help="index of the first schedule (schedule i of a seed draws the same faults)")
    parser.add_argument("--out", default=str(REPO_ROOT / ".runs" / "torture"),
                        help="where violating schedules keep logs, histories and violations.txt")
    parser.add_argument("-f", "--file", default=str(REPO_ROOT / "docker-compose.yml"))
    parser.add_argument("--recovery", type=float, default=60.0, help="liveness deadline after the faults stop (s)")
    parser.add_argument("--interval", default="0.05", help="the workload's pause between operations (s)")
    parser.add_argument("--keep", action="store_true", help="keep every schedule's logs and histories, not only "
                        "those of violating schedules")
    args = parser.parse_args(argv)
    why = missing_privileges() or missing_nftables()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    out = Path(args.out)
    print(f"torture: {args.schedules} schedules, seed {seed}, {args.steps} faults each; "
          f"wall-clock skew {'on' if find_faketime() else 'off (no libfaketime)'}", flush=True)
    totals = {"operations": 0, "faults": 0, "violations": 0}
    kinds: dict[str, int] = {}
    for index in range(args.first, args.first + args.schedules):
        started = time.monotonic()
        outcome = run_schedule(index, seed, args.steps, out, Path(args.file), args.recovery, args.interval,
                               args.keep)
        totals["operations"] += outcome.operations
        totals["faults"] += len(outcome.faults)
        totals["violations"] += len(outcome.violations)
        for kind, count in outcome.counts.items():
            kinds[kind] = kinds.get(kind, 0) + count
        print(f"schedule {index}: {outcome.operations} operations ({_breakdown(outcome.counts)}), "
              f"{len(outcome.faults)} faults ({'; '.join(outcome.faults)}), {len(outcome.violations)} violations "
              f"[{time.monotonic() - started:.0f}s]", flush=True)
        print(f"  checked: {outcome.checked}", flush=True)
        for violation in outcome.violations:
            print(f"  VIOLATION {violation}", flush=True)
        if outcome.directory:
            print(f"  kept in {outcome.directory}", flush=True)
    print(f"total: {args.schedules} schedules, {totals['operations']} operations ({_breakdown(kinds)}), "
          f"{totals['faults']} faults, {totals['violations']} violations (seed {seed})", flush=True)
    return 1 if totals["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
