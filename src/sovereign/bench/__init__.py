"""``sovereign-bench``: the load tool (issue 5).

picows clients under uvloop, spread over several processes and 127.0.0.x source
addresses, drive a real server (spawned pinned to one core, or already running) through
one of five scenarios — ``relay``, ``fanout``, ``resume``, ``idle``, ``mixed`` — and
report throughput and latency next to the server's CPU seconds (all threads) and the
load generator's, so every figure is "per server CPU-second" and a saturated client is
visible. See ``docs/performance.md`` and ``sovereign-bench --help``.

Layout: :mod:`~sovereign.bench.cli` (flags, orchestration), :mod:`.coordinator` (phases,
workers, accounting), :mod:`.worker` (one load process), :mod:`.scenarios` (what each
scenario does on both sides), :mod:`.client` (cheap picows clients), :mod:`.server`
(spawn, provisioning), :mod:`.procfs` (CPU and RSS), :mod:`.stats`, :mod:`.report`,
:mod:`.profile` (py-spy).
"""
