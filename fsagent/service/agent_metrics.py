"""The agent's own metrics: FUSE traffic, database flushes, checkpoints, store, uptime.

Design notes
------------
* Components register their metrics themselves (see ``metrics.py`` here); this
  module holds the ones that belong to the agent as a whole, so ``agent.py`` only
  calls ``register_agent_metrics`` once the filesystem and database exist.
* Most are *collected* from counts the owners keep anyway (``Filesystem.requests``,
  ``Database.flush_count``, ``statvfs`` of the store), so the hot paths gain nothing
  but a dict increment. The database flush latency is *observed* (the flush runs in a
  worker thread and reports its duration through ``Database.on_flush``).
* **Checkpoint latency** matters for one decision: whether ``TimeoutStopSec=`` covers a
  shutdown. A checkpoint happens at shutdown, when nobody is scraping, so its duration
  is stored in SQLite (table ``checkpoints``) and the next run exposes the last one.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, Protocol

from .. import __version__

if TYPE_CHECKING:
    from ..db import Database
    from ..fs import Filesystem
    from .metrics import Registry

__all__ = ["register_agent_metrics", "record_checkpoint", "last_checkpoint", "Measured"]

# The table is the "ops" entry of db.MIGRATIONS.


def record_checkpoint(conn: sqlite3.Connection, run_id: int, seconds: float) -> None:
    conn.execute("INSERT OR REPLACE INTO checkpoints(run_id, finished, seconds)"
                 " VALUES (?, ?, ?)", (run_id, time.time(), seconds))


def last_checkpoint(conn: sqlite3.Connection) -> tuple[float, float] | None:
    """``(finished, seconds)`` of the most recent checkpoint, or None if there was none."""
    return conn.execute("SELECT finished, seconds FROM checkpoints"
                        " ORDER BY finished DESC LIMIT 1").fetchone()


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


class Measured(Protocol):
    """What these metrics read of the agent (``fsagent.agent.Agent``), at render time."""

    metrics: Registry
    fs: Filesystem
    db: Database
    started_wall: float  # time.time() at start
    started: float  # time.monotonic() at start
    last_checkpoint: tuple[float, float] | None  # (finished, seconds), from the database

    def store_space(self) -> tuple[int | None, int | None]:
        """(free, total) bytes of the state directory's filesystem, or (None, None)."""
        ...


def register_agent_metrics(agent: Measured) -> None:
    m, fs, db = agent.metrics, agent.fs, agent.db
    nan = float("nan")
    m.gauge("fsagent_build_info", "Always 1; the version is the label",
            labels=("version",), collect=lambda: {(__version__,): 1})
    m.gauge("fsagent_start_time_seconds", "When this agent started (Unix time)",
            collect=lambda: agent.started_wall)
    m.gauge("fsagent_uptime_seconds", "Seconds since this agent started",
            collect=lambda: time.monotonic() - agent.started)
    m.gauge("fsagent_previous_run_clean", "1 if the run before this one stopped cleanly, "
            "0 after a crash, kill -9 or power loss",
            collect=lambda: 1 if db.previous_run_clean else 0)
    m.counter("fsagent_fuse_requests_total", "FUSE requests handled, by operation",
              labels=("op",), collect=lambda: {(op,): n for op, n in fs.requests.items()})
    m.counter("fsagent_fuse_errors_total", "FUSE requests that failed with an unexpected "
              "exception (answered EIO, traceback in the log), by operation",
              labels=("op",), collect=lambda: {(op,): n for op, n in fs.errors.items()})
    m.gauge("fsagent_fuse_open_handles", "Files and directories open on the mount",
            collect=lambda: fs.open_handles)
    m.counter("fsagent_db_flushes_total", "Batched bookkeeping transactions written",
              collect=lambda: db.flush_count)
    flush_seconds = m.histogram(
        "fsagent_db_flush_seconds", "Duration of one batched bookkeeping transaction",
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
    db.on_flush = flush_seconds.observe
    m.gauge("fsagent_db_staged_writes", "Bookkeeping writes waiting for the next flush",
            collect=lambda: db.staged_count)
    m.gauge("fsagent_last_checkpoint_seconds", "Duration of the last shutdown checkpoint "
            "(this or an earlier run); compare with the unit's TimeoutStopSec",
            collect=lambda: agent.last_checkpoint[1] if agent.last_checkpoint else nan)
    m.gauge("fsagent_last_checkpoint_timestamp_seconds", "When the last shutdown "
            "checkpoint finished (Unix time)",
            collect=lambda: agent.last_checkpoint[0] if agent.last_checkpoint else nan)
    m.gauge("fsagent_store_free_bytes", "Bytes available to the agent on the state "
            "directory's filesystem (where uploads are stored)",
            collect=lambda: _nan_if_none(agent.store_space()[0]))
    m.gauge("fsagent_store_size_bytes", "Size of the state directory's filesystem",
            collect=lambda: _nan_if_none(agent.store_space()[1]))
