"""The SQLite state: migrations, crash detection, batched writes, worker threads."""

from __future__ import annotations

import time

import pytest
import trio

from fsagent import db as dbmod
from fsagent.db import Database, DatabaseError


def test_migrations_run_once_and_are_recorded(tmp_path):
    d = Database.open(tmp_path / "a.db")
    assert d.schema_versions()["agent"] == len(dbmod.MIGRATIONS["agent"])
    d.close()
    d = Database.open(tmp_path / "a.db")  # re-open: nothing re-applied, no error
    assert d.schema_versions()["agent"] == len(dbmod.MIGRATIONS["agent"])
    assert d.run_sync(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    d.close()


def test_new_component_migrations_apply_on_an_existing_database(tmp_path, monkeypatch):
    Database.open(tmp_path / "a.db").close()
    monkeypatch.setitem(dbmod.MIGRATIONS, "extra", (
        "CREATE TABLE t1 (x INTEGER);",
        "ALTER TABLE t1 ADD COLUMN y TEXT; CREATE INDEX t1_y ON t1(y);",
    ))
    d = Database.open(tmp_path / "a.db")
    assert d.schema_versions()["extra"] == 2
    d.run_sync(lambda c: c.execute("INSERT INTO t1(x, y) VALUES (1, 'a')"))
    d.close()


def test_a_newer_schema_is_refused(tmp_path):
    d = Database.open(tmp_path / "a.db")
    d.run_sync(lambda c: c.execute("UPDATE schema_version SET version = 99"))
    d.close()
    with pytest.raises(DatabaseError, match="refusing to downgrade"):
        Database.open(tmp_path / "a.db")


def test_failed_migration_leaves_nothing_half_done(tmp_path, monkeypatch):
    monkeypatch.setitem(dbmod.MIGRATIONS, "extra", (
        "CREATE TABLE good (x INTEGER); CREATE TABLE good (x INTEGER);",  # 2nd fails
    ))
    with pytest.raises(Exception):
        Database.open(tmp_path / "a.db")
    monkeypatch.delitem(dbmod.MIGRATIONS, "extra")
    d = Database.open(tmp_path / "a.db")
    assert "extra" not in d.schema_versions()
    assert d.run_sync(lambda c: c.execute(
        "SELECT count(*) FROM sqlite_master WHERE name = 'good'").fetchone()[0]) == 0


def test_unclean_previous_run_is_detected(tmp_path):
    d = Database.open(tmp_path / "a.db")
    d.begin_run(1, "x")
    assert d.previous_run_clean
    d.close()  # no end_run: as after kill -9
    d = Database.open(tmp_path / "a.db")
    d.begin_run(2, "x")
    assert not d.previous_run_clean
    d.end_run()
    d.close()
    d = Database.open(tmp_path / "a.db")
    d.begin_run(3, "x")
    assert d.previous_run_clean


async def test_staged_writes_coalesce_into_one_transaction(tmp_path, monkeypatch):
    monkeypatch.setitem(dbmod.MIGRATIONS, "extra", ("CREATE TABLE c (k TEXT PRIMARY KEY, n INT);",))
    d = Database.open(tmp_path / "a.db")
    for i in range(10_000):  # e.g. one per FUSE write
        d.stage(("c", i % 10), "INSERT OR REPLACE INTO c(k, n) VALUES (?, ?)", (str(i % 10), i))
    assert d.staged_count == 10
    await d.flush()
    assert d.flush_count == 1
    rows = await d.run(lambda c: dict(c.execute("SELECT k, n FROM c")))
    assert rows == {str(k): 9990 + k for k in range(10)}
    await d.flush()  # nothing staged: no transaction at all
    assert d.flush_count == 1
    d.close()


async def test_database_work_runs_off_the_event_loop(tmp_path):
    d = Database.open(tmp_path / "a.db")
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    def slow_query(conn):
        # Blocks its thread until the loop has ticked 20 times: it returns only if the
        # loop kept running meanwhile, however slow the machine (the deadline only ends
        # a run where it did not).
        deadline = time.monotonic() + 60
        while ticks < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        return ticks

    async with trio.open_nursery() as n:
        n.start_soon(ticker)
        seen = await d.run(slow_query)
        n.cancel_scope.cancel()
    assert seen >= 20  # the loop kept running while the "query" blocked its thread
    d.close()


async def test_a_failed_flush_keeps_the_batch_for_the_next_one(tmp_path, monkeypatch):
    monkeypatch.setitem(dbmod.MIGRATIONS, "extra", (
        "CREATE TABLE c (k TEXT PRIMARY KEY, n INT CHECK (n >= 0));",))
    d = Database.open(tmp_path / "a.db")
    d.stage("a", "INSERT OR REPLACE INTO c(k, n) VALUES (?, ?)", ("a", 1))
    d.stage("bad", "INSERT OR REPLACE INTO c(k, n) VALUES (?, ?)", ("bad", -1))  # fails
    with pytest.raises(Exception):
        await d.flush()
    assert d.flush_failures == 1 and d.staged_count == 2
    assert await d.run(lambda c: c.execute("SELECT count(*) FROM c").fetchone()[0]) == 0
    # Newer writes staged after the failure win over the kept ones.
    d.stage("a", "INSERT OR REPLACE INTO c(k, n) VALUES (?, ?)", ("a", 2))
    d.stage("bad", "INSERT OR REPLACE INTO c(k, n) VALUES (?, ?)", ("bad", 5))  # repaired
    await d.flush()
    rows = await d.run(lambda c: dict(c.execute("SELECT k, n FROM c")))
    assert rows == {"a": 2, "bad": 5}
    d.close()


async def test_flush_waits_for_a_flush_in_progress_even_with_nothing_staged(tmp_path,
                                                                           monkeypatch):
    """A caller that staged a row, then saw another flush take it, must not be told it
    is durable before that flush commits (Jobs wait relies on this)."""
    import sqlite3
    monkeypatch.setitem(dbmod.MIGRATIONS, "extra", ("CREATE TABLE w (k TEXT PRIMARY KEY);",))
    d = Database.open(tmp_path / "a.db")
    d.stage("k", "INSERT INTO w(k) VALUES (?)", ("k",))
    # Another process's write lock makes the first flush slow after it took the batch
    # (its BEGIN IMMEDIATE waits out SQLite's busy timeout, here long enough that the
    # lock is surely released first, however slow the machine).
    d.run_sync(lambda c: c.execute("PRAGMA busy_timeout=60000"))
    other = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    second_done = []

    async def second():
        await d.flush()
        # What a caller may now rely on: the row is committed (read it outside our lock).
        with sqlite3.connect(tmp_path / "a.db") as reader:
            second_done.append(reader.execute("SELECT count(*) FROM w").fetchone()[0])

    async with trio.open_nursery() as n:
        n.start_soon(d.flush)
        with trio.fail_after(60):  # the first flush takes the batch, then waits for the lock
            while d.staged_count:
                await trio.sleep(0.01)
        n.start_soon(second)
        await trio.sleep(0.3)
        assert second_done == []  # nothing left to stage, yet it waits for that commit
        other.execute("ROLLBACK")
    assert second_done == [1]
    other.close()
    d.close()


async def test_staged_writes_run_in_event_order(tmp_path, monkeypatch):
    """Re-staging a key moves it to the end: a row that follows another write (the
    manifest row that follows a rename) runs after it, whatever was staged first."""
    monkeypatch.setitem(dbmod.MIGRATIONS, "extra", ("CREATE TABLE m (k TEXT PRIMARY KEY, "
                                                    "v TEXT);",))
    d = Database.open(tmp_path / "a.db")
    d.stage("move", "UPDATE m SET v = 'moved' WHERE k = 'x'", ())  # nothing to move yet
    d.stage("record", "INSERT INTO m(k, v) VALUES ('x', 'recorded')", ())
    d.stage("move", "UPDATE m SET v = 'moved' WHERE k = 'x'", ())  # a later rename
    await d.flush()
    assert await d.run(lambda c: c.execute("SELECT v FROM m").fetchone()[0]) == "moved"
    d.close()

