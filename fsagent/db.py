"""The one SQLite database: schema, migrations, and the only connection.

Design notes
------------
* **One owner.** This module owns the connection, the pragmas and every migration.
  Other modules never open the file; they pass functions to ``Database.run`` (worker
  thread) or stage writes with ``Database.stage``.
* **Migrations per component.** ``MIGRATIONS`` maps a component name ("agent",
  "uploads", "jobs", ...) to its ordered list of SQL scripts; the table
  ``schema_version`` records how many of each have run. Components evolve
  independently and append-only: never edit a shipped script, add the next one.
  A database written by a newer fsagent (more scripts applied than this one knows)
  is refused rather than guessed at.
* **Durability.** WAL with ``synchronous=FULL``: a committed transaction survives
  power loss. That costs one fsync per commit, so callers never commit per FUSE call:
  per-file bookkeeping (bytes present, timestamps) goes through ``stage()``, which
  coalesces by key and is written by ``flush()`` in one transaction, every
  ``db_flush_seconds`` and at explicit durability points (checkpoints, shutdown).
* **Staged writes keep event order and stay together.** A flush runs the staged
  statements in the order they were last staged (re-staging a key moves it to the
  end, so a row that follows a rename is written after the row it follows), and it
  takes its batch on the event loop: writes staged with no ``await`` between them
  are always in the same transaction. The upload hand-off relies on that (a task's
  record of its import job and the job itself commit together or not at all).
* **Threads.** The connection is used from one worker thread at a time
  (``CapacityLimiter(1)`` plus a lock for the synchronous start-up/shutdown path), so
  no SQLite call ever runs on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

__all__ = ["Database", "DatabaseError", "MIGRATIONS"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class DatabaseError(Exception):
    pass


MIGRATIONS: dict[str, Sequence[str]] = {
    "agent": (
        # 1: one row per agent start; `stopped` stays NULL until a clean shutdown, so the
        # next start can tell a crash (kill -9, power loss) from a clean stop.
        """
        CREATE TABLE agent_runs (
            id INTEGER PRIMARY KEY,
            pid INTEGER NOT NULL,
            version TEXT NOT NULL,
            started REAL NOT NULL,
            stopped REAL
        );
        """,
    ),
    "uploads": (
        # 1: one row per upload task (fsagent/uploads/_store.py); durable_offset is what
        # crash recovery cuts an unfinished upload back to.
        """
        CREATE TABLE upload_tasks (
            task_id TEXT PRIMARY KEY,
            path TEXT NOT NULL,
            state TEXT NOT NULL,
            bytes_present INTEGER NOT NULL,
            durable_offset INTEGER NOT NULL,
            declared_size INTEGER,
            client_md5 TEXT,
            client_sha1 TEXT,
            client_sha256 TEXT,
            md5 TEXT,
            sha1 TEXT,
            sha256 TEXT,
            job TEXT,
            error TEXT,
            held INTEGER NOT NULL DEFAULT 0,
            renamed_by_rsync INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            completed REAL
        );
        CREATE INDEX upload_tasks_path ON upload_tasks(path);
        CREATE INDEX upload_tasks_completed ON upload_tasks(completed);
        """,
        # 2: crash consistency (fsagent/uploads/_store.py). `ino` is the backing file's
        # inode, so recovery finds a task whose rename was not yet recorded; `fp_*` are
        # the backing file's size, mtime and ctime when it was verified, so recovery can
        # tell a complete file nobody touched from one it must hash again; `job_sha256`
        # is the SHA-256 of the version `job` imports, so one version is imported once.
        """
        ALTER TABLE upload_tasks ADD COLUMN ino INTEGER;
        ALTER TABLE upload_tasks ADD COLUMN fp_size INTEGER;
        ALTER TABLE upload_tasks ADD COLUMN fp_mtime_ns INTEGER;
        ALTER TABLE upload_tasks ADD COLUMN fp_ctime_ns INTEGER;
        ALTER TABLE upload_tasks ADD COLUMN job_sha256 TEXT;
        UPDATE upload_tasks SET job_sha256 = sha256 WHERE job IS NOT NULL;
        """,
        # 3: import processes (ImportProcess.*, fsagent/uploads/_processes.py): one
        # explicit fileset each. `create_key` finds an unfinished process again when a
        # client re-runs the same create after a restart; `job` is set once its import
        # job was submitted (in the same transaction as the job).
        """
        CREATE TABLE import_processes (
            pid TEXT PRIMARY KEY,
            owner INTEGER NOT NULL,
            root TEXT NOT NULL,
            create_key TEXT NOT NULL,
            job TEXT,
            created REAL NOT NULL
        );
        CREATE INDEX import_processes_key ON import_processes(create_key);
        CREATE TABLE import_process_files (
            pid TEXT NOT NULL,
            i INTEGER NOT NULL,
            path TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT,
            PRIMARY KEY (pid, i)
        );
        """,
        # 4: `ino_generation` is the backing inode's generation (FS_IOC_GETVERSION):
        # an inode number is reused once its file is removed, so recovery matches a row
        # to a file by (ino, generation) (fsagent/uploads/_recovery.py). NULL: unknown
        # (older rows, filesystems without generations), matched by number as before.
        """
        ALTER TABLE upload_tasks ADD COLUMN ino_generation INTEGER;
        """,
    ),
    "jobs": (
        # 1: one row per job (fsagent/jobs/_engine.py writes it) and the repository
        # manifest that import jobs fill and verify jobs check.
        """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            spec TEXT NOT NULL,
            state TEXT NOT NULL,
            priority INTEGER NOT NULL,
            progress INTEGER NOT NULL,
            message TEXT NOT NULL,
            error_code INTEGER NOT NULL,
            error_description TEXT NOT NULL,
            content TEXT NOT NULL,
            outputs TEXT NOT NULL,
            owner_uid INTEGER,
            created REAL NOT NULL,
            completed REAL,
            runtime REAL NOT NULL,
            updated REAL NOT NULL
        );
        CREATE TABLE manifest (
            path TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            mtime_ns INTEGER NOT NULL,
            task TEXT,
            job_id TEXT,
            recorded REAL NOT NULL
        );
        """,
    ),
    "repository": (
        # 1: the S3 push's durable state (fsagent/repository/_pusher.py). `target` is
        # endpoint + bucket, so a changed configuration never reuses another store's rows.
        # repo_uploads: a multipart upload begun (its ID recorded before any part is
        # sent); repo_parts: its parts the server acknowledged, with the ETag it returned
        # and the part's MD5/SHA-256, so a resumed push sends only the others (checked
        # against the server's ListParts). repo_objects: objects verified by a HEAD
        # (size, checksum), so a re-run of an import skips them.
        """
        CREATE TABLE repo_uploads (
            target TEXT NOT NULL,
            key TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            part_size INTEGER NOT NULL,
            upload_id TEXT NOT NULL,
            checksums INTEGER NOT NULL,
            job_id TEXT,
            created REAL NOT NULL,
            PRIMARY KEY (target, key)
        );
        CREATE TABLE repo_parts (
            upload_id TEXT NOT NULL,
            number INTEGER NOT NULL,
            size INTEGER NOT NULL,
            etag TEXT NOT NULL,
            md5 TEXT NOT NULL,
            sha256 TEXT,
            PRIMARY KEY (upload_id, number)
        );
        CREATE TABLE repo_objects (
            target TEXT NOT NULL,
            key TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            etag TEXT,
            task TEXT,
            job_id TEXT,
            verified REAL NOT NULL,
            PRIMARY KEY (target, key)
        );
        """,
        # 2: the local disk as a cache (fsagent/repository/_cache.py). repo_cache: an
        # upload whose local copy is being evicted ("evicting", written durably before
        # the first byte is punched) or was ("evicted"): its bytes are read from `key`,
        # and start-up never trusts the local bytes of such a file. The times and inode
        # are the file's before the punch (restored after it). repo_deletes: objects of
        # files removed from uploads/ still to be deleted (or moved under deleted/).
        """
        CREATE TABLE repo_cache (
            task TEXT PRIMARY KEY,
            target TEXT NOT NULL,
            key TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            ino INTEGER NOT NULL,
            atime_ns INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            state TEXT NOT NULL,
            since REAL NOT NULL
        );
        CREATE TABLE repo_deletes (
            target TEXT NOT NULL,
            key TEXT NOT NULL,
            task TEXT,
            keep INTEGER NOT NULL,
            recorded REAL NOT NULL,
            PRIMARY KEY (target, key)
        );
        """,
    ),
    "ops": (
        # 1: one row per completed shutdown checkpoint (components' checkpoint() and the
        # final flush), so the next run can report how long a stop takes.
        """
        CREATE TABLE checkpoints (
            run_id INTEGER PRIMARY KEY REFERENCES agent_runs(id),
            finished REAL NOT NULL,
            seconds REAL NOT NULL
        );
        """,
    ),
}


class Database:
    """The agent's SQLite state. Create with ``Database.open``."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self._conn = conn
        self.path = path
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        # key -> (sql, params); a later stage() with the same key replaces the earlier.
        self._staged: dict[Any, tuple[str, Sequence[Any]]] = {}
        # Every stage() bumps _staged_gen; a committed flush sets _durable_gen to the
        # generation its batch covered. flush() returns at once when everything staged
        # so far is durable, and otherwise waits for the commit that makes it so, even
        # if another flush took its rows.
        self._staged_gen = 0
        self._durable_gen = 0
        self.run_id: int | None = None
        self.previous_run_clean: bool = True
        self.flush_count = 0
        self.flush_failures = 0
        # Called with each flush's duration in seconds (from the flushing thread).
        self.on_flush: Callable[[float], None] | None = None

    # -- opening and migrating --------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> Database:
        """Open (creating if needed) and migrate. Synchronous: call before serving."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as e:
            raise DatabaseError(f"cannot open database {path}: {e}") from None
        db = cls(conn, path)
        db._migrate()
        return db

    def _migrate(self) -> None:
        conn = self._conn
        with self._lock:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            applied = dict(conn.execute("SELECT component, version FROM schema_version"))
            for component, version in applied.items():
                known = len(MIGRATIONS.get(component, ()))
                if version > known:
                    raise DatabaseError(
                        f"{self.path}: component {component!r} is at schema version "
                        f"{version}, this fsagent knows only {known}; refusing to downgrade"
                    )
            for component, scripts in MIGRATIONS.items():
                have = applied.get(component, 0)
                for number, script in enumerate(scripts[have:], start=have + 1):
                    log.info("migrating %s schema to version %d", component, number)
                    with self._transaction():
                        for statement in _split_statements(script):
                            conn.execute(statement)
                        conn.execute(
                            "INSERT INTO schema_version(component, version) VALUES (?, ?)"
                            " ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                            (component, number),
                        )

    def schema_versions(self) -> dict[str, int]:
        with self._lock:
            return dict(self._conn.execute("SELECT component, version FROM schema_version"))

    # -- agent runs: crash detection ----------------------------------------------------

    def begin_run(self, pid: int, version: str) -> None:
        """Record this start; remember whether the previous run stopped cleanly."""
        with self._lock, self._transaction():
            row = self._conn.execute(
                "SELECT stopped FROM agent_runs ORDER BY id DESC LIMIT 1"
            ).fetchone()
            self.previous_run_clean = row is None or row[0] is not None
            cur = self._conn.execute(
                "INSERT INTO agent_runs(pid, version, started) VALUES (?, ?, ?)",
                (pid, version, time.time()),
            )
            self.run_id = cur.lastrowid

    def end_run(self) -> None:
        """Mark this run clean. Call last, after everything else is durable."""
        self.flush_sync()
        with self._lock, self._transaction():
            self._conn.execute(
                "UPDATE agent_runs SET stopped = ? WHERE id = ?", (time.time(), self.run_id)
            )

    # -- running work -------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a worker thread, inside one transaction."""
        async with self._limiter:
            return await trio.to_thread.run_sync(self._run_locked, fn, args)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """The same, on the calling thread: only for start-up and shutdown."""
        return self._run_locked(fn, args)

    def _run_locked(self, fn: Callable[..., T], args: tuple) -> T:
        with self._lock, self._transaction():
            return fn(self._conn, *args)

    @contextlib.contextmanager
    def _transaction(self):
        # isolation_level=None puts sqlite3 in autocommit mode, so transactions are
        # explicit here: one BEGIN..COMMIT (one fsync) per unit of work, never per statement.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    # -- batched bookkeeping --------------------------------------------------------------

    def stage(self, key: Any, sql: str, params: Sequence[Any]) -> None:
        """Queue a write for the next flush; a later write with the same key replaces it.

        Cheap and synchronous: safe to call from any FUSE handler on the event loop.
        """
        self._staged.pop(key, None)  # to the end: statements run in event order
        self._staged[key] = (sql, params)
        self._staged_gen += 1  # after the insert: a flush that reads the count has the row

    def unstage(self, key: Any) -> None:
        """Drop a staged write that has not been flushed (its change was rolled back)."""
        self._staged.pop(key, None)

    @property
    def staged_count(self) -> int:
        return len(self._staged)

    @property
    def staged_generation(self) -> int:
        """A mark for what is staged now: ``flush(through=mark)`` makes at least that
        durable (and returns at once if a flush already did)."""
        return self._staged_gen

    async def flush(self, *, through: int | None = None) -> None:
        """Write everything staged so far in one transaction (one fsync).

        Returns once everything staged before the call (or before the ``through``
        mark) is durable, including what a flush already in progress took with it: so
        it waits for that flush (it holds the limiter) even when nothing is left staged
        for itself.
        """
        wanted = self._staged_gen if through is None else through
        if self._durable_gen >= wanted:
            return
        async with self._limiter:
            if self._durable_gen >= wanted:
                return
            # The batch is taken here, on the event loop, not in the thread: stage()
            # calls with no await between them land in one batch (see the design notes).
            # Holding the limiter, no thread is using the connection, so the lock is free.
            with self._lock:
                covered, batch = self._take_batch()
            if not batch:
                return
            try:
                await trio.to_thread.run_sync(self._write_batch, batch, covered)
            except BaseException:
                self._restore_batch(batch)
                raise

    def flush_sync(self) -> None:
        """The same, on the calling thread: only for start-up and shutdown."""
        with self._lock:
            covered, batch = self._take_batch()
        if not batch:
            return
        try:
            self._write_batch(batch, covered)
        except BaseException:
            self._restore_batch(batch)
            raise

    def _take_batch(self) -> tuple[int, dict[Any, tuple[str, Sequence[Any]]]]:
        if not self._staged:
            # No flush is in flight (callers hold the limiter or the lock) and a failed
            # one puts its batch back, so everything staged so far is durable.
            self._durable_gen = max(self._durable_gen, self._staged_gen)
            return self._staged_gen, {}
        covered = self._staged_gen  # read before the swap: see stage()
        batch, self._staged = self._staged, {}
        return covered, batch

    def _write_batch(self, batch: dict[Any, tuple[str, Sequence[Any]]], covered: int) -> None:
        started = time.monotonic()
        with self._lock:
            try:
                with self._transaction():
                    for sql, params in batch.values():
                        self._conn.execute(sql, params)
            except BaseException:
                self.flush_failures += 1
                raise
            self.flush_count += 1
            self._durable_gen = max(self._durable_gen, covered)
        if self.on_flush is not None:
            self.on_flush(time.monotonic() - started)

    def _restore_batch(self, batch: dict[Any, tuple[str, Sequence[Any]]]) -> None:
        """Nothing was written (the transaction rolled back): put the batch back before
        anything staged since, which is newer and wins (and runs later)."""
        for key, value in self._staged.items():
            batch.pop(key, None)
            batch[key] = value
        self._staged = batch

    async def flush_periodically(
        self, interval: float, *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await trio.sleep(interval)
            try:
                await self.flush()
            except sqlite3.Error as e:
                # Disk full or I/O error: the batch is kept and retried next round; the
                # agent keeps serving (bookkeeping lags, data already on disk is safe).
                log.error("database flush failed (%s); %d writes kept for retry", e,
                          len(self._staged))

    def close(self) -> None:
        self.flush_sync()
        with self._lock:
            self._conn.close()


def _split_statements(script: str) -> list[str]:
    """Split a migration script into statements (sqlite3 runs one per execute).

    A ``;`` ends a statement only where SQLite agrees the text so far is complete, so
    semicolons inside strings and trigger bodies are kept.
    """
    statements, start = [], 0
    for i, ch in enumerate(script):
        if ch == ";" and sqlite3.complete_statement(script[start : i + 1]):
            statements.append(script[start : i + 1].strip())
            start = i + 1
    if script[start:].strip():
        raise DatabaseError(f"incomplete SQL statement in migration: {script[start:].strip()[:60]}")
    return statements
