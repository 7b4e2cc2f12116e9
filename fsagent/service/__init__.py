"""Service plumbing: what makes the agent a well-behaved daemon, not what it does.

Modules (each owns one thing; the agent wires them up, no capability imports them):

* ``mountpoint`` — the state-dir lock (one agent per state dir), stale-mount detection,
  lazy unmount and aborting a dead FUSE connection.
* ``sdnotify`` — the sd_notify protocol (READY=1, WATCHDOG=1, STATUS=, STOPPING=1).
* ``liveness`` — when to send them: readiness through the mount, the watchdog's round
  trip, the STATUS= line.
* ``logs`` — stderr logging, journal-aware.
* ``metrics`` — the registry components register their metrics with, and the
  Prometheus text exposition.
* ``metrics_http`` — the optional ``metrics_listen`` HTTP endpoint.
* ``agent_metrics`` — the agent's own metrics (FUSE traffic, database flushes,
  checkpoints, store, uptime).

These depend on the standard library, trio, ``fsagent.config`` and each other only; the
agent is reached through the small protocols they declare (``liveness.Supervised``,
``agent_metrics.Measured``), never by importing ``fsagent.agent``.
"""
