"""Benchmarks that print figures (never pass/fail): ``python -m bench.run``.

Modules, one concern each:
- ``timing``: the timed loop every measurement runs inside the measured process.
- ``stats``: percentiles and rates from a list of latencies.
- ``bare_pysyncobj``: a three-process cluster of plain PySyncObj ``SyncObj`` (the
  baseline), with the same bench ops as ``cluster.agent``.
- ``workloads``: the suite of measurements, run the same way against either system.
- ``report``: the printed table and the targets from PEERS.md.
- ``run``: the command line.
- ``events``: event stream figures (``python -m bench.events``): publish latency and
  events/s with and without ``publish_many``, publish -> consume latency across nodes.
- ``tasks``: Tasks figures (``python -m bench.tasks``): jobs/s through a pool of workers
  and submit->start latency.
"""
