"""A node process for tests, demo and bench: a raftsync Node plus a control port.

Started by the launcher as ``python -m cluster.agent`` with the node's settings in
``RAFTSYNC_*`` variables. It listens on a loopback control port (msgpack frames:
``[request_id, op, args]`` -> ``[request_id, ok, result_or_error]``) and runs each
request on its own worker thread, so a blocked ``lock_acquire`` never holds up others.
It prints one line ``READY <json>`` on stdout once the control port is open.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from raftsync import Node, RaftsyncError
from raftsync.channel import FrameDecoder, pack_frame

from .load import burn_cpu


class Agent:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.handles: dict[str, Any] = {}
        self.sessions: dict[str, Any] = {}
        self.events: list[list[Any]] = []
        self._events_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="agent")
        self._burners: list[threading.Thread] = []

    def record(self, *event: Any) -> None:
        with self._events_lock:
            self.events.append([time.monotonic(), *event])

    # -- ops ---------------------------------------------------------------------------

    def op_ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "engine_pid": self.node.engine_pid}

    def op_wait_ready(self, timeout: float = 20.0) -> bool:
        self.node.wait_ready(timeout)
        return True

    def op_status(self) -> dict[str, Any]:
        return self.node.status()

    def op_kv_write(self, key: str, value: bytes, if_version: int | None = None, ttl: float | None = None,
                    timeout: float | None = 10.0) -> list[int]:
        record = self.node.data().write(key, value, ttl=ttl, if_version=if_version, timeout=timeout)
        return [record.version, record.revision]

    def op_kv_read(self, key: str, consistency: str = "linearizable", timeout: float | None = 10.0) -> list[Any]:
        record = self.node.data().read(key, consistency=consistency, timeout=timeout)
        return [record.value, record.version, record.revision]

    def op_kv_delete(self, key: str, if_version: int | None = None, timeout: float | None = 10.0) -> int:
        return self.node.data().delete(key, if_version=if_version, timeout=timeout)

    def op_kv_dump(self, prefix: str = "", consistency: str = "linearizable") -> list[list[Any]]:
        return [[r.key, r.value, r.version, r.revision] for r in self.node.data().dump(prefix, consistency)]

    def _new_handle(self, kind: str, name: str, ttl: float | None, session: str | None,
                    permits: int = 1) -> Any:
        """kind: "lock", "sem" (with permits), "read" or "write" (an RWLock handle)."""
        explicit = self.sessions[session] if session else None
        if kind == "lock":
            return self.node.lock(name, ttl=ttl, session=explicit)
        if kind == "sem":
            return self.node.semaphore(name, permits, ttl=ttl, session=explicit)
        rwlock = self.node.rwlock(name, ttl=ttl, session=explicit)
        return rwlock.read_lock() if kind == "read" else rwlock.write_lock()

    def _lock(self, handle: str, name: str | None = None, ttl: float | None = None, session: str | None = None,
              kind: str = "lock", permits: int = 1) -> Any:
        lock = self.handles.get(handle)
        if lock is None:
            if name is None:
                raise KeyError(f"no lock handle {handle!r}")
            lock = self.handles[handle] = self._new_handle(kind, name, ttl, session, permits)
        return lock

    def op_session_open(self, name: str, ttl: float) -> int:
        session = self.sessions[name] = self.node.session(ttl)
        session.on_lost(lambda s: self.record("session_lost", name, s.lost_reason))
        return session.id

    def op_session_close(self, name: str) -> bool:
        self.sessions[name].close()
        return True

    def op_lock_acquire(self, handle: str, name: str, timeout: float | None = None,
                        ttl: float | None = None, session: str | None = None, kind: str = "lock",
                        permits: int = 1) -> int:
        lease = self._lock(handle, name, ttl, session, kind, permits).acquire(timeout=timeout)
        self.record("granted", handle, lease.token)
        lease.on_lost(lambda lost: self.record("lost", handle, lost.token))
        return lease.token

    def op_lock_release(self, handle: str, timeout: float | None = None) -> bool:
        self.record("release_called", handle)
        self._lock(handle).release(timeout=timeout)
        self.record("released", handle)
        return True

    def op_lock_state(self, handle: str) -> dict[str, Any]:
        lock = self._lock(handle)
        lease = lock._lease
        return {"held": lock.held, "token": lease.token if lease else 0,
                "lost": bool(lease and lease.lost.is_set()), "valid": bool(lease and lease.valid)}

    def op_lock_contend(self, name: str, iterations: int, hold: float = 0.0, kind: str = "lock",
                        permits: int = 1) -> list[list[float]]:
        """Acquire/hold/release ``iterations`` times with a fresh handle; returns
        [token, acquired_at, released_at] per hold (monotonic clock, comparable across
        processes on one host)."""
        lock = self._new_handle(kind, name, None, None, permits)
        holds = []
        for _ in range(iterations):
            lease = lock.acquire(timeout=60)
            acquired = time.monotonic()
            if hold:
                time.sleep(hold)
            released = time.monotonic()
            lock.release()
            holds.append([lease.token, acquired, released])
        return holds

    def op_lock_info(self, name: str, table: str = "lock") -> Any:
        """[holder, token, waiters] of a lock (table="leader": of an election), or None."""
        from raftsync.codec import Query, encode_query
        from raftsync.replica import deadline_after
        query = Query.LOCK_INFO if table == "lock" else Query.LEADER_QUEUE
        status, payload = self.node._replica.query(encode_query(query, [name]), "linearizable", deadline_after(10))
        return payload

    def op_leader_campaign(self, handle: str, group: str, candidate_id: str, value: bytes = b"",
                           timeout: float | None = None) -> int:
        election = self.handles.get(handle)
        if election is None:
            election = self.handles[handle] = self.node.leader(group)
        term = election.campaign(candidate_id, value, timeout=timeout)
        self.record("elected", handle, term.term)
        term.on_revoked(lambda revoked: self.record("revoked", handle, revoked.term))
        return term.term

    def op_leader_resign(self, handle: str) -> bool:
        self.handles[handle].term.resign()
        return True

    def op_leader_proclaim(self, handle: str, value: bytes) -> bool:
        self.handles[handle].term.proclaim(value)
        return True

    def op_leader_current(self, group: str, consistency: str = "linearizable") -> list[Any] | None:
        info = self.node.leader(group).current(consistency)
        return None if info is None else [info.id, info.value, info.term]

    def op_observe_start(self, name: str, group: str) -> bool:
        """Record every leadership change of ``group`` as events ("observed", name, info)."""
        stream = self.node.leader(group).observe()

        def run() -> None:
            for info in stream:
                self.record("observed", name, None if info is None else [info.id, info.value, info.term])
        threading.Thread(target=run, daemon=True).start()
        return True

    def op_watch_start(self, name: str, prefix: str, from_revision: int | None = None) -> bool:
        """Record every change under ``prefix`` as events ("change", name, [rev, key, value, version])."""
        stream = self.node.data().watch(prefix, from_revision)

        def run() -> None:
            try:
                for change in stream:
                    self.record("change", name, [change.revision, change.key, change.value, change.version])
            except RaftsyncError as exc:
                self.record("watch_error", name, type(exc).__name__)
        threading.Thread(target=run, daemon=True).start()
        return True

    def op_write_flood(self, name: str, threads: int = 4, size: int = 32 * 1024, seconds: float = 5.0,
                       timeout: float = 2.0, max_writes: int = 2000) -> bool:
        """Start ``threads`` writers of ``size``-byte values for ``seconds`` (each call with
        ``timeout``); each records ("flood_done", name, [thread, calls, slowest call s,
        {error name: count}]) when it stops."""
        def run(index: int) -> None:
            data, value = self.node.data(), b"x" * size
            calls, slowest, errors = 0, 0.0, {}
            end = time.monotonic() + seconds
            while time.monotonic() < end and calls < max_writes:
                started = time.monotonic()
                try:
                    data.write(f"flood/{name}/{index}", value, timeout=timeout)
                except RaftsyncError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                slowest = max(slowest, time.monotonic() - started)
                calls += 1
            self.record("flood_done", name, [index, calls, slowest, errors])
        for index in range(threads):
            threading.Thread(target=run, args=(index,), daemon=True).start()
        return True

    def op_test_hook(self, name: str, args: dict[str, Any] | None = None, **more: Any) -> Any:
        """Arm a test hook in this node's engine (engine/core.py _TEST_HOOKS, or the Raft
        message hooks of engine/faults.py); the node must run with test_hooks=True."""
        return self.node._replica.test_hook(name, {**(args or {}), **more})

    def op_events(self) -> list[list[Any]]:
        with self._events_lock:
            return list(self.events)

    def op_session_id(self) -> int:
        return self.node.default_session.id

    def op_burn_cpu(self, threads: int, seconds: float) -> bool:
        """Pure-Python CPU load in this (the app's) process, as a busy application would."""
        self._burners.extend(burn_cpu(threads, seconds))
        return True

    def op_sessions(self) -> list[list[Any]]:
        """This node's live sessions: [id, ttl, safe_until, lost] (monotonic clock)."""
        keeper = self.node._replica.sessions
        with keeper._lock:
            return [[s.id, s.ttl, s.safe_until, s.lost.is_set()] for s in keeper._sessions.values()]

    def op_monotonic(self) -> float:
        return time.monotonic()

    # -- events ------------------------------------------------------------------------

    def op_events_publish(self, topic: str, payload: Any, key: str | None = None, timeout: float | None = 10.0) -> int:
        return self.node.events(topic).publish(payload, key=key, timeout=timeout)

    def op_events_publish_many(self, topic: str, payloads: list[Any], timeout: float | None = 10.0) -> list[int]:
        return self.node.events(topic).publish_many(payloads, timeout=timeout)

    def op_events_read_all(self, topic: str, consistency: str = "linearizable") -> list[list[Any]]:
        """Every retained event of ``topic``: [offset, payload, key, stamp]."""
        stream = self.node.events(topic)
        info = stream.info(consistency=consistency, timeout=10)
        events, offset = [], info.first_offset
        while offset < info.next_offset:
            batch = stream.read(offset, consistency=consistency, timeout=10)
            events.extend([e.offset, e.payload, e.key, list(e.stamp)] for e in batch)
            offset += len(batch)
        return events

    def op_events_info(self, topic: str) -> dict[str, Any]:
        info = self.node.events(topic).info(timeout=10)
        return {"first": info.first_offset, "next": info.next_offset, "groups": info.groups}

    def op_events_configure(self, topic: str, **retention: Any) -> dict[str, Any]:
        info = self.node.events(topic).configure(timeout=10, **retention)
        return {"first": info.first_offset, "next": info.next_offset}

    def op_events_publish_load(self, name: str, topic: str, count: int, timeout: float = 2.0, batch: int = 1,
                               pause: float = 0.0, seconds: float = 60.0) -> bool:
        """Publish ``count`` events with unique payloads "<name>-<i>" in the background, one
        call per ``batch``; records ("published", name, [payload, offset]) for each
        acknowledged one, ("publish_unknown", name, payload) for each OutcomeUnknown,
        ("publish_failed", name, [payload, error]) for an error that says nothing was
        sent, and ("publish_done", name, attempts) at the end."""
        from raftsync.errors import OutcomeUnknown

        def run() -> None:
            stream = self.node.events(topic)
            end = time.monotonic() + seconds
            attempts = 0
            for start in range(0, count, batch):
                if time.monotonic() >= end:
                    break
                payloads = [f"{name}-{i}" for i in range(start, min(count, start + batch))]
                attempts += 1
                try:
                    offsets = stream.publish_many(payloads, timeout=timeout) if batch > 1 else [
                        stream.publish(payloads[0], timeout=timeout)]
                except OutcomeUnknown:
                    for payload in payloads:
                        self.record("publish_unknown", name, payload)
                except RaftsyncError as exc:
                    for payload in payloads:
                        self.record("publish_failed", name, [payload, type(exc).__name__])
                else:
                    for payload, offset in zip(payloads, offsets):
                        self.record("published", name, [payload, offset])
                if pause:
                    time.sleep(pause)
            self.record("publish_done", name, attempts)
        threading.Thread(target=run, daemon=True).start()
        return True

    def op_events_follow(self, name: str, topic: str, from_offset: int | None = 0, group: str | None = None) -> bool:
        """Record every event of ``topic`` as ("event", name, [offset, payload, stamp]) in
        the background (a subscription acknowledging per batch if ``group``)."""
        subscription = self.node.events(topic).subscribe(group=group, from_offset=from_offset, timeout=10)
        self.handles[f"follow/{name}"] = subscription

        def run() -> None:
            try:
                for event in subscription:
                    self.record("event", name, [event.offset, event.payload, list(event.stamp)])
            except RaftsyncError as exc:
                self.record("follow_error", name, type(exc).__name__)
        threading.Thread(target=run, daemon=True).start()
        return True

    def op_events_subscribe(self, name: str, topic: str, group: str | None = None, from_offset: int | None = None,
                            ack: str = "explicit") -> int:
        """Open a subscription kept as ``name``; returns where it starts."""
        subscription = self.handles[f"sub/{name}"] = self.node.events(topic).subscribe(
            group=group, from_offset=from_offset, ack=ack, timeout=10)
        return subscription.position

    def op_events_consume(self, name: str, count: int, ack_each: bool = False, timeout: float = 10.0,
                          stamps: bool = False) -> list[list[Any]]:
        """Take ``count`` events from subscription ``name`` ([offset, payload] each, and
        the stamp if ``stamps``), acknowledging each one after taking it if ``ack_each``."""
        subscription = self.handles[f"sub/{name}"]
        taken = []
        for _ in range(count):
            event = subscription.get(timeout=timeout)
            taken.append([event.offset, event.payload] + ([list(event.stamp)] if stamps else []))
            if ack_each:
                subscription.ack(event, timeout=timeout)
        return taken

    def op_events_ack(self, name: str) -> int:
        """Acknowledge every event subscription ``name`` delivered; the group's offset."""
        return self.handles[f"sub/{name}"].ack(timeout=10)

    def op_hlc(self) -> list[int]:
        return list(self.node.hlc())

    # -- tasks ---------------------------------------------------------------------------

    def _tasks(self, pool: int = 4) -> Any:
        """This agent's one Tasks object: a submitter, and a worker once it has handlers."""
        tasks = self.handles.get("tasks")
        if tasks is None:
            tasks = self.handles["tasks"] = self.node.tasks(pool=pool)
        return tasks

    def op_tasks_start(self, pool: int = 4, handlers: list[str] | None = None) -> int:
        """Serve test handlers (all by default): "echo" returns its payload with where and
        how it ran; "sleep" sleeps payload["seconds"] (only on attempt 1 if
        payload["first_only"]) unless cancelled; "fail" raises; "noop" returns None. Each
        records ("task_start", name, [job id, attempt, token, schedule, slot, monotonic])
        and ("task_end", name, [job id, attempt, token, cancelled])."""
        tasks = self._tasks(pool)
        address = self.node.address

        def recorded(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
            def handler(job: Any) -> Any:
                self.record("task_start", job.name, [job.id, job.attempt, job.token, job.schedule, job.slot,
                                                     time.monotonic()])
                try:
                    return run(job)
                finally:
                    self.record("task_end", job.name, [job.id, job.attempt, job.token, job.cancelled.is_set()])
            return handler

        def echo(job: Any) -> Any:
            return {"payload": job.payload, "node": address, "attempt": job.attempt, "token": job.token}

        def sleep(job: Any) -> Any:
            payload = job.payload or {}
            if job.attempt == 1 or not payload.get("first_only"):
                job.cancelled.wait(payload.get("seconds", 1.0))
            return {"node": address, "attempt": job.attempt, "token": job.token}

        def fail(job: Any) -> Any:
            raise RuntimeError(f"failing on attempt {job.attempt}")

        available = {"echo": echo, "sleep": sleep, "fail": fail, "noop": lambda job: None}
        for name in handlers or sorted(available):
            tasks.register(name, recorded(available[name]))
        return tasks.worker_id

    def op_tasks_close(self, timeout: float = 10.0) -> bool:
        self._tasks().close(timeout)
        return True

    def op_task_submit(self, name: str, payload: Any = None, **options: Any) -> list[Any]:
        job = self._tasks().submit(name, payload, request_timeout=options.pop("request_timeout", 20.0), **options)
        return [job.id, job.created]

    def op_task_submit_many(self, name: str, count: int, threads: int = 8, payload: Any = None,
                            **options: Any) -> list[list[Any]]:
        """Submit ``count`` jobs from ``threads`` threads; [job id, monotonic time just before
        its submit call] each, in submit order per thread ([None, "Error: text"] for a
        submit that raised)."""
        tasks = self._tasks()
        submitted: list[list[Any]] = []
        guard = threading.Lock()
        numbers = iter(range(count))

        def run() -> None:
            while True:
                with guard:
                    number = next(numbers, None)
                if number is None:
                    return
                started = time.monotonic()
                try:
                    job = tasks.submit(name, payload if payload is not None else number, request_timeout=30,
                                       **options)
                    outcome = [job.id, started]
                except RaftsyncError as exc:
                    outcome = [None, f"{type(exc).__name__}: {exc}"]
                with guard:
                    submitted.append(outcome)
        workers = [threading.Thread(target=run) for _ in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(120)
        return submitted

    def op_task_results(self, job_ids: list[int], timeout: float = 60.0) -> list[list[Any]]:
        """[job id, state, result or error] of each job once finished (one deadline for all)."""
        from raftsync import JobFailed
        deadline = time.monotonic() + timeout
        results = []
        for job_id in job_ids:
            job = self._tasks().job(job_id)
            try:
                results.append([job_id, "done", job.result(timeout=max(0.0, deadline - time.monotonic()))])
            except JobFailed as exc:
                results.append([job_id, exc.state, exc.error])
        return results

    def op_task_status(self, job_id: int, consistency: str = "linearizable") -> dict[str, Any]:
        from dataclasses import asdict
        return asdict(self._tasks().job(job_id).status(consistency))

    def op_task_cancel(self, job_id: int) -> bool:
        return self._tasks().job(job_id).cancel(timeout=10)

    def op_task_complete_raw(self, job_id: int, token: int, result: Any = None) -> str:
        """Send a completion for (job, token) from this node's default session, as a late
        or forged result would come; returns the machine's answer (OK, NOT_HELD, ...)."""
        import msgpack
        from raftsync.codec import Op, Status
        from raftsync.replica import deadline_after
        replica = self.node._replica
        status, _ = replica.submit(replica.sessions.default(deadline_after(10)), Op.TASK_COMPLETE,
                                   [job_id, token, msgpack.packb(result)], deadline_after(10), "raw complete")
        return Status(status).name

    def op_task_schedule(self, name: str, handler: str, **options: Any) -> int:
        return self._tasks().schedule(name, handler, request_timeout=20, **options)

    def op_task_unschedule(self, name: str) -> bool:
        self._tasks().unschedule(name, request_timeout=20)
        return True

    def op_task_schedules(self) -> list[list[Any]]:
        return [[s.name, s.handler, s.every, s.cron, s.last_slot, s.version, s.skipped]
                for s in self._tasks().schedules()]

    def op_task_info(self) -> dict[str, Any]:
        return self._tasks().info()

    def op_task_stats(self) -> dict[str, int]:
        tasks = self._tasks()
        with tasks._guard:
            return dict(tasks.stats)

    # -- bench ops (bench/): each times its operations in this app process -------------

    def op_bench_writes(self, count: int, size: int = 100, warmup: int = 20, max_seconds: float = 30.0,
                        key_prefix: str = "bench/write/") -> dict[str, Any]:
        """Sequential synchronous ``data().write`` of ``size``-byte values over 1000 keys,
        each call timed with ``time.perf_counter`` in this app process (see bench.timing)."""
        from bench.timing import timed_loop
        data, value = self.node.data(), b"x" * size
        return timed_loop(lambda i: data.write(f"{key_prefix}{i % 1000}", value, timeout=10),
                          count, warmup, max_seconds)

    def op_bench_lock_cycles(self, count: int, name: str = "bench/lock", warmup: int = 20,
                             max_seconds: float = 30.0) -> dict[str, Any]:
        """Sequential uncontended ``acquire()`` + ``release()`` of one lock handle, each
        cycle timed with ``time.perf_counter`` in this app process (see bench.timing)."""
        from bench.timing import timed_loop
        lock = self.node.lock(name)

        def cycle(_: int) -> None:
            lock.acquire(timeout=10)
            lock.release()
        return timed_loop(cycle, count, warmup, max_seconds)

    def op_bench_task_latency(self, count: int, name: str = "noop", max_seconds: float = 30.0) -> list[list[Any]]:
        """One job at a time (submit, wait for its result): [job id, monotonic time just
        before the submit call, monotonic time the result was back] each."""
        tasks = self._tasks()
        rows = []
        end = time.monotonic() + max_seconds
        for number in range(count):
            if time.monotonic() >= end:
                break
            started = time.monotonic()
            job = tasks.submit(name, number, request_timeout=10)
            job.result(timeout=10)
            rows.append([job.id, started, time.monotonic()])
        return rows

    def op_bench_reads(self, count: int, consistency: str = "linearizable", warmup: int = 20,
                       max_seconds: float = 30.0, key: str = "bench/read", size: int = 100) -> dict[str, Any]:
        """Writes ``key`` once, then sequential ``data().read(key, consistency)``, each
        timed with ``time.perf_counter`` in this app process (see bench.timing)."""
        from bench.timing import timed_loop
        data = self.node.data()
        data.write(key, b"x" * size, timeout=10)
        return timed_loop(lambda i: data.read(key, consistency=consistency, timeout=10),
                          count, warmup, max_seconds)

    def op_bench_events_consumer(self, name: str, topic: str, count: int, max_seconds: float = 60.0) -> int:
        """Start a subscriber on ``topic`` (from its end) in the background that takes up to
        ``count`` events; for each it notes time.monotonic() on delivery minus the
        publisher's time.monotonic() in the payload (``"t"``): publish-to-consume latency
        on one host. Returns where it starts; the result comes from bench_events_consumed."""
        subscription = self.node.events(topic).subscribe(batch_size=1000, timeout=10)
        done = threading.Event()
        result: dict[str, Any] = {"latencies": [], "received": 0, "elapsed": 0.0, "error": None}
        self.handles[f"bench-consumer/{name}"] = (done, result)

        def run() -> None:
            latencies = result["latencies"]
            deadline = time.monotonic() + max_seconds
            first = None
            try:
                while len(latencies) < count and time.monotonic() < deadline:
                    try:
                        event = subscription.get(timeout=max(0.0, deadline - time.monotonic()))
                    except RaftsyncError as exc:
                        if not isinstance(exc, TimeoutError):
                            result["error"] = f"{type(exc).__name__}: {exc}"
                        break
                    now = time.monotonic()
                    first = first or now
                    latencies.append(now - event.payload["t"])
                result["elapsed"] = (time.monotonic() - first) if first else 0.0
            finally:
                subscription.close()
                done.set()
        threading.Thread(target=run, daemon=True).start()
        return subscription.position

    def op_bench_events_consumed(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        done, result = self.handles.pop(f"bench-consumer/{name}")
        done.wait(timeout)
        return {"latencies": result["latencies"], "elapsed": result["elapsed"], "failures": 0,
                "first_error": result["error"]}

    def op_bench_events_publish(self, topic: str, count: int, size: int = 100, batch: int = 1, threads: int = 1,
                                warmup: int = 20, max_seconds: float = 30.0) -> dict[str, Any]:
        """``threads`` publishers, each timing sequential ``publish`` calls (``batch`` 1) or
        ``publish_many`` calls of ``batch`` events, ``size`` bytes of padding each, with
        time.monotonic() at the call in the payload (for consumers' latency). Latencies
        are per call; ``events`` is how many events were published in the timed part."""
        from bench.timing import timed_loop
        stream = self.node.events(topic)
        pad = b"x" * size

        def call(_: int) -> None:
            if batch == 1:
                stream.publish({"t": time.monotonic(), "pad": pad}, timeout=10)
            else:
                now = time.monotonic()
                stream.publish_many([{"t": now, "pad": pad}] * batch, timeout=10)

        results: list[dict[str, Any]] = []
        workers = [threading.Thread(target=lambda: results.append(timed_loop(call, count, warmup, max_seconds)))
                   for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        merged = {"latencies": [x for r in results for x in r["latencies"]],
                  "elapsed": max(r["elapsed"] for r in results),
                  "failures": sum(r["failures"] for r in results),
                  "first_error": next((r["first_error"] for r in results if r["first_error"]), None)}
        merged["events"] = len(merged["latencies"]) * batch
        return merged

    # -- serving -----------------------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        send_lock = threading.Lock()
        decoder = FrameDecoder()

        def reply(message: list[Any]) -> None:
            with send_lock:
                try:
                    conn.sendall(pack_frame(message))
                except OSError:
                    pass

        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            for request_id, op, args in decoder.feed(data):
                self._pool.submit(self._run, request_id, op, args, reply)

    def _run(self, request_id: int, op: str, args: dict[str, Any], reply: Callable[[list[Any]], None]) -> None:
        method = getattr(self, f"op_{op}", None)
        if method is None:
            reply([request_id, False, ["AgentError", f"unknown op {op}"]])
            return
        try:
            reply([request_id, True, method(**args)])
        except RaftsyncError as exc:
            reply([request_id, False, [type(exc).__name__, str(exc)]])
        except Exception as exc:
            logging.exception("op %s failed", op)
            reply([request_id, False, ["AgentError", f"{type(exc).__name__}: {exc}"]])


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s agent[%(process)d] %(levelname)s %(name)s: %(message)s")
    extra = json.loads(os.environ.get("RAFTSYNC_AGENT_SETTINGS", "{}"))
    node = Node.from_env(**extra)
    agent = Agent(node)
    listener = socket.create_server(("127.0.0.1", 0))
    node.start()
    print("READY " + json.dumps({"control_port": listener.getsockname()[1], "pid": os.getpid(),
                                 "engine_pid": node.engine_pid}), flush=True)
    agent.serve(listener)
    return 0


if __name__ == "__main__":
    sys.exit(main())
