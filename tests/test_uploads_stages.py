"""The stages of uploads/ without a mount: space, checkpoints, recovery, the table, completion.

Each stage takes its collaborators as arguments (``_component.py`` wires them), so these
tests give them real parts where they are cheap: a real ``Database`` on ``tmp_path``, real
files under a real ``BackingTree``, real worker threads (``trio.to_thread.run_sync``), a
real ``BackingWriter`` and metrics registry. Only two things are stand-ins: the free space
of the disk (``statvfs`` is injected, so the numbers are exact) and the hand-off to the
job engine (``FakeHandOff`` records submits and cancels and answers ``job_state``).
The mount tests (test_uploads*.py) prove the same behaviour end to end; these pin each
rule to its stage, so a broken rule fails here with its name on it.
"""

from __future__ import annotations

import ast
import hashlib
import os
import time
from pathlib import Path

import pytest
import trio
import trio.testing

import fsagent.uploads
from fsagent.db import Database
from fsagent.longpaths import BackingTree
from fsagent.service.metrics import Registry
from fsagent.uploads import _checkpoints, _completion
from fsagent.uploads._checkpoints import SYNCFS_AT, Checkpointer
from fsagent.uploads._completion import Completion
from fsagent.uploads._hashing import StreamHasher
from fsagent.uploads._names import Names, trackable
from fsagent.uploads._recovery import cut_back, fingerprint, plan_recovery
from fsagent.uploads._space import SpaceAccounting
from fsagent.uploads._store import TaskTable, load_tasks
from fsagent.uploads._task import (
    TRANSITIONS, Event, State, Task, next_state,
)
from fsagent.uploads._writer import BackingWriter
from fsagent.uploads._writes import WritePath
from integrity_util import require_generation, reuse_inode
from test_uploads_units import rule  # completion_event with every fact at its default

KiB, MiB = 1024, 1024 * 1024


# -- real parts, and the two stand-ins -------------------------------------------------------

@pytest.fixture
def db(tmp_path):
    database = Database.open(tmp_path / "state" / "fsagent.sqlite")
    yield database
    database.close()


@pytest.fixture
def store(tmp_path) -> Path:
    d = tmp_path / "uploads"
    d.mkdir()
    return d


@pytest.fixture
def paths(store) -> BackingTree:
    return BackingTree(os.fsencode(store))


async def to_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


async def committed_row(db: Database, t: Task):
    """``(state, bytes_present, durable_offset)`` of ``t`` as committed in SQLite."""
    return await db.run(lambda conn: conn.execute(
        "SELECT state, bytes_present, durable_offset FROM upload_tasks WHERE task_id = ?",
        (t.task_id,)).fetchone())


class Disk:
    """``statvfs`` of a disk with exactly ``free`` bytes available (4 KiB blocks)."""

    def __init__(self, free: int):
        self.free = free
        self.asked: list[bytes] = []

    def statvfs(self, path: bytes) -> os.statvfs_result:
        self.asked.append(path)
        blocks = self.free // 4096
        return os.statvfs_result((4096, 4096, 1 << 30, blocks, blocks, 0, 0, 0, 0, 255))


class FakeHandOff:
    """In place of ``ImportHandOff`` and the engine behind it: records the submits and
    releases completion makes, and answers ``job_state``/``import_state`` from ``jobs``
    (``skipped``: a fileset's import that ran without importing the task)."""

    def __init__(self):
        self.jobs: dict[str, str] = {}      # job ID -> state word
        self.ends: dict[str, str] = {}      # job ID -> how a running job ends
        self.calls: list[tuple[str, str]] = []
        self.skipped: set[tuple[str, str]] = set()   # (job, task): ran without importing it
        self.gate: trio.Event | None = None          # settled_state waits for it

    def job_state(self, job: str) -> str | None:
        return self.jobs.get(job)

    async def settled_state(self, job: str) -> str | None:
        """A running job ends as ``ends[job]`` says (default: it stays running), once
        ``gate`` (if set) is."""
        if self.gate is not None:
            await self.gate.wait()
        if self.jobs.get(job) == "running" and job in self.ends:
            self.jobs[job] = self.ends[job]
        return self.jobs.get(job)

    async def submit(self, t: Task) -> None:
        job = f"job-{len(self.calls)}"
        t.job, t.job_sha256 = job, t.computed["sha256"]
        self.jobs[job] = "queued"
        self.calls.append(("submit", job))

    def import_state(self, job: str, t: Task) -> str | None:
        if (job, t.task_id) in self.skipped:
            return "skipped"
        return self.jobs.get(job)

    async def release(self, job: str, t: Task) -> None:
        self.calls.append(("release", job))

    def moved(self, t: Task) -> None:
        self.calls.append(("moved", t.task_id))


def to_complete(t: Task) -> Task:
    """Walk ``t`` (partial) to complete through the table, as the component would."""
    t.apply(Event.SETTLED)
    t.apply(Event.VERIFIED)
    return t


# -- space accounting ---------------------------------------------------------------------

def test_space_reserve_is_kept_back_from_free_space(store):
    disk = Disk(free=1 * MiB)
    space = SpaceAccounting(os.fsencode(store), 256 * KiB, disk.statvfs)
    t = Task(rel=b"a")
    assert space.room_for(t) == 768 * KiB
    assert space.fits(t, 768 * KiB) and not space.fits(t, 768 * KiB + 1)
    assert disk.asked[-1] == os.fsencode(store)  # the store's own filesystem is asked
    disk.free = 200 * KiB  # less than the reserve: nothing fits, shrinking still does
    assert space.room_for(t) == -56 * KiB
    assert not space.fits(t, 1) and space.fits(t, -10) and space.fits(t, 0)


def test_space_declarations_of_other_uploads_reserve_room_not_the_tasks_own(store):
    disk = Disk(free=1 * MiB)
    space = SpaceAccounting(os.fsencode(store), 0, disk.statvfs)
    a, b = Task(rel=b"a", present=100 * KiB), Task(rel=b"b")
    assert space.declare(a, 400 * KiB)
    assert a.declared_size == 400 * KiB and a in space.declared
    # a still has 300 KiB to write: that is reserved against everyone else...
    assert space.room_for(b) == 1 * MiB - 300 * KiB
    assert not space.fits(b, 1 * MiB - 300 * KiB + 1)
    # ...but not against a itself, which may use the room it reserved.
    assert space.room_for(a) == 1 * MiB
    a.present = 350 * KiB  # a wrote more: its remaining reservation shrinks
    assert space.room_for(b) == 1 * MiB - 50 * KiB
    a.present = 500 * KiB  # beyond its declaration (it will fail): reserves nothing
    assert space.room_for(b) == 1 * MiB


def test_space_complete_ended_failed_or_undeclared_uploads_hold_no_reservation(store):
    disk = Disk(free=1 * MiB)
    space = SpaceAccounting(os.fsencode(store), 0, disk.statvfs)
    other = Task(rel=b"other")
    done, gone, bad, dropped = (Task(rel=r) for r in (b"done", b"gone", b"bad", b"dropped"))
    for t in (done, gone, bad, dropped):
        assert space.declare(t, 100 * KiB)
    assert space.room_for(other) == 1 * MiB - 400 * KiB
    done.present = 100 * KiB
    done.apply(Event.SIZE_REACHED)
    done.apply(Event.VERIFIED)
    assert space.room_for(other) == 1 * MiB - 300 * KiB
    gone.apply(Event.UNLINK)
    assert space.room_for(other) == 1 * MiB - 200 * KiB
    bad.apply(Event.FAIL)
    assert space.room_for(other) == 1 * MiB - 100 * KiB
    dropped.declared_size = None  # user.fsagent.size removed
    assert space.room_for(other) == 1 * MiB
    # Complete, ended and undeclared ones are dropped; a failed one is kept, because a
    # re-send (open for writing) makes it an upload in progress again with its size.
    assert set(space.declared) == {bad}
    bad.apply(Event.OPEN_WRITE)
    assert space.room_for(other) == 1 * MiB - 100 * KiB


def test_space_fits_answers_as_the_exact_rule_whatever_happens(store):
    """``fits`` takes a shortcut (the sum of declared sizes) when there is room; seeded
    random histories of declarations, writes, completions, failures, removals and
    undeclarations must never make it answer otherwise than the exact rule."""
    import random
    for seed in range(40):
        rng = random.Random(seed)
        disk = Disk(free=rng.choice([64, 256, 1024]) * KiB)
        space = SpaceAccounting(os.fsencode(store), 0, disk.statvfs)
        tasks = [Task(rel=b"t%d" % i) for i in range(12)]

        def exact(t, growth):
            others = sum(max(0, o.declared_size - o.present) for o in tasks
                         if o is not t and o.declared_size is not None and not o.ended
                         and o.state not in (State.COMPLETE, State.FAILED))
            return growth <= 0 or growth <= disk.free // 4096 * 4096 - others

        for _ in range(300):
            t = rng.choice(tasks)
            what = rng.random()
            if what < 0.3:
                size = rng.randrange(0, 200 * KiB)
                if space.declare(t, size):
                    assert t.declared_size == size
            elif what < 0.6:
                n = rng.randrange(1, 64 * KiB)
                assert space.fits(t, n) == exact(t, n), (seed, t.rel, n)
                if space.fits(t, n):
                    t.present += n
                    disk.free -= n
            elif what < 0.7 and t.state is State.PARTIAL and t.declared_size == t.present:
                t.apply(Event.SIZE_REACHED)
                t.apply(Event.VERIFIED)
            elif what < 0.75 and t.state in (State.PARTIAL, State.VERIFYING):
                t.apply(Event.FAIL)
            elif what < 0.8:
                t.declared_size = None  # user.fsagent.size removed
            n = rng.randrange(1, 256 * KiB)
            for o in tasks:
                assert space.fits(o, n) == exact(o, n), (seed, o.rel, n)


async def test_space_counts_queued_write_behind_bytes_against_free_space(store, paths):
    disk = Disk(free=1 * MiB)
    space = SpaceAccounting(os.fsencode(store), 0, disk.statvfs)
    t, other = Task(rel=b"a"), Task(rel=b"b")
    fd = paths.open(b"a", os.O_RDWR | os.O_CREAT, 0o644)
    gate = trio.Event()

    async def gated_to_thread(fn, *args):
        await gate.wait()  # the disk is slow: the queue holds the bytes until the gate opens
        return await trio.to_thread.run_sync(fn, *args)

    try:
        async with trio.open_nursery() as nursery:
            t.writer = BackingWriter(nursery, gated_to_thread)
            space.writing.add(t)
            data = os.urandom(300 * KiB)
            await t.writer.submit(fd, 0, data)
            assert space.queued_bytes() == 300 * KiB
            # Acknowledged but not on disk: statvfs does not see them, accounting must.
            assert space.room_for(other) == 1 * MiB - 300 * KiB
            assert space.room_for(t) == 1 * MiB - 300 * KiB  # its own queue counts too
            assert not space.fits(other, 1 * MiB - 300 * KiB + 1)
            gate.set()
            await t.writer.drain()
            assert space.queued_bytes() == 0
            assert space.room_for(other) == 1 * MiB
            assert os.pread(fd, len(data) + 1, 0) == data
            t.writer.close()
    finally:
        os.close(fd)


def test_space_declare_refuses_what_cannot_fit_and_changes_nothing(store):
    disk = Disk(free=1 * MiB)
    space = SpaceAccounting(os.fsencode(store), 128 * KiB, disk.statvfs)
    t = Task(rel=b"a", present=200 * KiB)
    # Room: 1 MiB - 128 KiB reserve = 896 KiB beyond the 200 KiB already present.
    assert not space.declare(t, 200 * KiB + 896 * KiB + 1)
    assert t.declared_size is None and t not in space.declared
    other = Task(rel=b"other")
    assert space.room_for(other) == 896 * KiB  # no reservation was left behind
    assert space.declare(t, 200 * KiB + 896 * KiB)
    assert t.declared_size == 1096 * KiB and t in space.declared
    # Now t holds all the room: another upload's declaration cannot fit, and the
    # refusal does not disturb either task.
    assert not space.declare(other, 1)
    assert other.declared_size is None and set(space.declared) == {t}
    assert t.declared_size == 1096 * KiB
    assert space.declare(t, 300 * KiB)  # a smaller declaration always fits
    assert space.room_for(other) == 896 * KiB - 100 * KiB


# -- checkpoints ----------------------------------------------------------------------------

def checkpointer(db, paths, store, to_thread_fn, flush_fn, tasks=None) -> Checkpointer:
    async def then(t):
        raise AssertionError("sync() never considers completion itself")

    return Checkpointer(tasks=tasks or TaskTable(db), paths=paths, root=os.fsencode(store),
                        to_thread=to_thread_fn, flush=flush_fn, checkpoint_bytes=MiB,
                        checkpoint_seconds=60, then=then)


async def test_checkpoint_syncs_data_before_the_durable_offset_is_recorded(db, store, paths):
    tasks = TaskTable(db)
    (store / "a").write_bytes(b"x" * 1000)
    t = tasks.add(Task(rel=b"a", present=1000))
    await db.flush()
    order = []

    async def logging_to_thread(fn, *args):
        # Whatever the checkpointer staged so far is committed now: if the new durable
        # offset had been staged before the data sync, the row would show it here.
        await db.flush()
        order.append(("sync", (await committed_row(db, t))[2]))
        return await trio.to_thread.run_sync(fn, *args)

    async def logging_flush():
        await db.flush()
        order.append(("flush", (await committed_row(db, t))[2]))

    cp = checkpointer(db, paths, store, logging_to_thread, logging_flush, tasks)
    await cp.sync([t])
    assert order == [("sync", 0), ("flush", 1000)]
    assert t.durable == 1000 and t.since_checkpoint == 0 and cp.count == 1
    assert await committed_row(db, t) == ("partial", 1000, 1000)


async def test_checkpoint_applies_queued_writes_before_noting_sizes(db, store, paths):
    """The size a checkpoint records must be on disk when the sync runs: the task's
    write-behind queue is drained first."""
    tasks = TaskTable(db)
    fd = paths.open(b"a", os.O_RDWR | os.O_CREAT, 0o644)
    seen = []

    async def checking_to_thread(fn, *args):
        seen.append((os.fstat(fd).st_size, t.writer.pending))  # before any await
        return await trio.to_thread.run_sync(fn, *args)

    async def flush():
        await db.flush()

    try:
        async with trio.open_nursery() as nursery:
            t = tasks.add(Task(rel=b"a"))
            t.writer = BackingWriter(nursery, to_thread)
            await t.writer.submit(fd, 0, b"y" * (200 * KiB))
            t.present = 200 * KiB
            cp = checkpointer(db, paths, store, checking_to_thread, flush, tasks)
            await cp.sync([t])
            assert seen == [(200 * KiB, 0)]
            assert await committed_row(db, t) == ("partial", 200 * KiB, 200 * KiB)
            t.writer.close()
    finally:
        os.close(fd)


async def test_checkpoint_never_lowers_an_offset_an_fsync_raised_meanwhile(db, store, paths):
    tasks = TaskTable(db)
    (store / "a").write_bytes(b"x" * 1000)
    t = tasks.add(Task(rel=b"a", present=1000))

    async def to_thread_with_fsync_meanwhile(fn, *args):
        result = await trio.to_thread.run_sync(fn, *args)
        # While the checkpoint (which noted 1000 bytes) synced, the client wrote up to
        # 3000 and fsync'd: fsync records its own offset (the component's fsync path).
        with open(store / "a", "ab") as f:
            f.write(b"z" * 2000)
        t.present = 3000
        cp.synced(t, 3000, t.shrinks)
        return result

    async def flush():
        await db.flush()

    cp = checkpointer(db, paths, store, to_thread_with_fsync_meanwhile, flush, tasks)
    await cp.sync([t])
    assert t.durable == 3000  # not 1000: recovery would cut fsync'd bytes
    assert await committed_row(db, t) == ("partial", 3000, 3000)
    # And plainly: an older, smaller size noted later never lowers the offset.
    cp.synced(t, 500, t.shrinks)
    assert t.durable == 3000
    await db.flush()
    assert (await committed_row(db, t))[2] == 3000


async def test_checkpoint_offset_follows_a_cut_made_since_the_size_was_noted(db, store, paths):
    """Offsets only grow unless the file was cut since the size was noted: then the old
    size proves nothing about the bytes now below it."""
    tasks = TaskTable(db)
    (store / "a").write_bytes(b"x" * 1000)
    t = tasks.add(Task(rel=b"a", present=1000, durable=400))  # 400 from an earlier one
    writes = WritePath(paths=paths, space=SpaceAccounting(os.fsencode(store), 0),
                       checkpoints=None, to_thread=to_thread, counters={})

    async def to_thread_with_truncate_meanwhile(fn, *args):
        result = await trio.to_thread.run_sync(fn, *args)
        # Meanwhile: truncated to 100 bytes, then rewritten up to 1500 (not synced).
        os.truncate(store / "a", 100)
        writes.resized(t, 100)
        with open(store / "a", "ab") as f:
            f.write(b"n" * 1400)
        t.present = 1500
        return result

    async def flush():
        await db.flush()

    cp = checkpointer(db, paths, store, to_thread_with_truncate_meanwhile, flush, tasks)
    await cp.sync([t])
    # The noted 1000 bytes were synced, but bytes 100..1000 are not those any more: the
    # offset is what the cut left (min(400, 100)), not raised to the noted size.
    assert t.durable == 100
    assert (await committed_row(db, t))[2] == 100
    assert t.since_checkpoint == 1400
    # A size noted after the cut counts again, and the offset grows from there.
    cp.synced(t, 1500, t.shrinks)
    assert t.durable == 1500
    # A size noted before the cut never lowers nor raises it.
    cp.synced(t, 2000, t.shrinks - 1)
    assert t.durable == 1500


@pytest.mark.parametrize("n", [SYNCFS_AT - 1, SYNCFS_AT])
async def test_checkpoint_uses_one_syncfs_for_many_files(db, store, paths, n):
    tasks = TaskTable(db)
    batch = []
    for i in range(n):
        (store / f"f{i}").write_bytes(b"q" * (i + 1))
        batch.append(tasks.add(Task(rel=f"f{i}".encode(), present=i + 1)))
    calls = []

    async def recording_to_thread(fn, *args):
        calls.append((fn, args))
        return await trio.to_thread.run_sync(fn, *args)

    async def flush():
        await db.flush()

    cp = checkpointer(db, paths, store, recording_to_thread, flush, tasks)
    await cp.sync(batch)
    assert len(calls) == 1  # one hop for the whole batch, either way
    fn, args = calls[0]
    if n >= SYNCFS_AT:
        assert fn is _checkpoints._syncfs and args == (os.fsencode(store),)
    else:
        assert fn is not _checkpoints._syncfs  # fdatasync of each file
    assert [t.durable for t in batch] == [i + 1 for i in range(n)]


async def test_checkpoint_skips_untracked_and_ended_tasks(db, store, paths):
    tasks = TaskTable(db)
    (store / ".a.XXXXXX").write_bytes(b"1234")
    (store / "b").write_bytes(b"1234")
    temp = tasks.add(Task(rel=b".a.XXXXXX", present=4, tracked=False))
    gone = tasks.add(Task(rel=b"b", present=4))
    tasks.remove(gone)
    calls = []

    async def recording_to_thread(fn, *args):
        calls.append(fn)
        return await trio.to_thread.run_sync(fn, *args)

    async def flush():
        await db.flush()

    cp = checkpointer(db, paths, store, recording_to_thread, flush, tasks)
    await cp.sync([temp, gone])
    assert calls == [] and cp.count == 0
    assert temp.durable == 0 and gone.durable == 0
    assert await committed_row(db, gone) is None


# -- crash recovery -------------------------------------------------------------------------

async def stored_rows(db: Database, tasks: list[Task]) -> list[Task]:
    """The tasks as the next start loads them: through a real row and back."""
    table = TaskTable(db)
    for t in tasks:
        table.add(t)
    await db.flush()
    return await db.run(load_tasks)


def write(path: Path, data: bytes) -> os.stat_result:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return os.lstat(path)


@pytest.mark.parametrize("state", [State.RECEIVING, State.PARTIAL, State.VERIFYING,
                                   State.FAILED])
async def test_recovery_cuts_unfinished_uploads_back_after_an_unclean_stop(
        db, store, paths, state):
    st = write(store / "a", b"d" * 1000)
    t = Task(rel=b"a", state=state, present=1000, durable=600, ino=st.st_ino,
             computed={"sha256": "0" * 64})
    [row] = await stored_rows(db, [t])
    plan = plan_recovery([row], paths.walk_files(), clean=False, trackable=trackable,
                          generation=paths.inode_generation)
    assert plan.cuts == [(b"a", 600)]
    assert plan.tasks == [row] and row.present == 600 and row.durable == 600
    assert row.state is (State.FAILED if state is State.FAILED else State.PARTIAL)
    assert row.computed == {}  # the hashes described bytes that are gone
    cut_back(paths, plan.cuts)
    assert (store / "a").read_bytes() == b"d" * 600


async def test_recovery_keeps_everything_after_a_clean_stop(db, store, paths):
    st = write(store / "a", b"d" * 1000)
    t = Task(rel=b"a", state=State.RECEIVING, present=1000, durable=600, ino=st.st_ino,
             computed={"sha256": "0" * 64})
    [row] = await stored_rows(db, [t])
    plan = plan_recovery([row], paths.walk_files(), clean=True, trackable=trackable,
                          generation=paths.inode_generation)
    assert plan.cuts == []
    assert row.present == 1000 and row.durable == 600 and row.state is State.PARTIAL
    # Even after a clean stop the stream hashes of an unfinished upload are stale: the
    # next writer starts a new stream.
    assert row.computed == {}


async def test_recovery_never_raises_durable_above_the_file_and_never_cuts_up(db, store, paths):
    st = write(store / "a", b"d" * 300)  # shorter than recorded: truncated while down
    t = Task(rel=b"a", state=State.PARTIAL, present=1000, durable=600, ino=st.st_ino)
    [row] = await stored_rows(db, [t])
    plan = plan_recovery([row], paths.walk_files(), clean=False, trackable=trackable,
                          generation=paths.inode_generation)
    assert plan.cuts == []
    assert row.present == 300 and row.durable == 300


def fingerprinted(rel: bytes, st: os.stat_result, **kw) -> Task:
    kw.setdefault("ino", st.st_ino)
    t = to_complete(Task(rel=rel, present=st.st_size, durable=st.st_size,
                         computed={"sha256": "1" * 64}, job="j", **kw))
    t.fingerprint = fingerprint(st)
    return t


async def test_recovery_trusts_complete_rows_only_with_a_matching_fingerprint(
        db, store, paths):
    sts = {name: write(store / name, b"c" * 500) for name in ("same", "size", "mtime",
                                                                "ctime")}
    rows = await stored_rows(db, [fingerprinted(n.encode(), st) for n, st in sts.items()])
    with open(store / "size", "ab") as f:
        f.write(b"!")
    os.utime(store / "mtime", ns=(0, sts["mtime"].st_mtime_ns + 1_000_000_000))
    # Bytes, size and mtime unchanged; only the ctime moves (it ticks with the kernel's
    # coarse clock, so change the mode until it has).
    deadline = time.monotonic() + 10
    while (os.lstat(store / "ctime").st_ctime_ns == sts["ctime"].st_ctime_ns
           and time.monotonic() < deadline):
        os.chmod(store / "ctime", 0o600 if os.lstat(store / "ctime").st_mode & 0o44 else 0o644)
    assert os.lstat(store / "ctime").st_ctime_ns != sts["ctime"].st_ctime_ns

    plan = plan_recovery(rows, paths.walk_files(), clean=False, trackable=trackable,
                          generation=paths.inode_generation)
    by = {t.rel: t for t in plan.tasks}
    assert by[b"same"].state is State.COMPLETE
    assert by[b"same"].fingerprint == fingerprint(sts["same"])
    assert by[b"same"].computed == {"sha256": "1" * 64} and by[b"same"].job == "j"
    for name in (b"size", b"mtime", b"ctime"):
        assert by[name].state is State.VERIFYING, name
        assert by[name].fingerprint is None
        assert by[name].computed == {"sha256": "1" * 64}  # what the recheck compares with
    assert sorted(t.rel for t in plan.recheck) == [b"ctime", b"mtime", b"size"]
    assert plan.cuts == []  # complete files are proven or hashed, never cut
    assert by[b"size"].present == 501


async def test_recovery_matches_a_renamed_file_by_inode(db, store, paths):
    st = write(store / "old.bin", b"r" * 700)
    rows = await stored_rows(db, [fingerprinted(b"old.bin", st)])
    os.rename(store / "old.bin", store / "new.bin")  # the rename's row never got written
    plan = plan_recovery(rows, paths.walk_files(), clean=False, trackable=trackable,
                          generation=paths.inode_generation)
    [t] = plan.tasks
    assert plan.moved == [t] and t.rel == b"new.bin" and t.task_id == rows[0].task_id
    assert plan.adopted == [] and plan.forgotten == []  # not a second task: no re-import


async def test_recovery_matches_a_renamed_directory_by_inode(db, store, paths):
    rows = []
    for name in ("x", "sub/y"):
        st = write(store / "d1" / name, name.encode() * 10)
        rows.append(Task(rel=f"d1/{name}".encode(), present=st.st_size,
                         durable=st.st_size, ino=st.st_ino))
    rows = await stored_rows(db, rows)
    os.rename(store / "d1", store / "d2")
    plan = plan_recovery(rows, paths.walk_files(), clean=False, trackable=trackable,
                          generation=paths.inode_generation)
    assert sorted(t.rel for t in plan.moved) == [b"d2/sub/y", b"d2/x"]
    assert sorted(t.rel for t in plan.tasks) == [b"d2/sub/y", b"d2/x"]
    assert plan.adopted == [] and plan.forgotten == [] and plan.cuts == []


async def test_recovery_forgets_rows_whose_file_is_gone(db, store, paths):
    st = write(store / "gone", b"g")
    keep = write(store / "kept", b"k")
    rows = await stored_rows(db, [Task(rel=b"gone", present=1, ino=st.st_ino),
                                  Task(rel=b"kept", present=1, ino=keep.st_ino)])
    os.unlink(store / "gone")
    plan = plan_recovery(rows, paths.walk_files(), clean=False, trackable=trackable,
                          generation=paths.inode_generation)
    assert [t.rel for t in plan.forgotten] == [b"gone"]
    assert [t.rel for t in plan.tasks] == [b"kept"]


async def test_recovery_adopts_files_with_no_row_and_ignores_untrackable_names(store, paths):
    st = write(store / "d" / "new.bin", b"n" * 333)
    write(store / "d" / ".new.bin.Ab12Cd", b"rsync temp")
    write(store / ".rsync-partial" / "p.bin", b"partial dir")
    write(store / os.fsdecode(b"bad-\xff.bin"), b"not utf-8")
    plan = plan_recovery([], paths.walk_files(), clean=False, trackable=trackable,
                          generation=paths.inode_generation)
    [t] = plan.adopted
    assert plan.tasks == [t]
    assert (t.rel, t.state, t.present, t.durable, t.ino) == (
        b"d/new.bin", State.PARTIAL, 333, 333, st.st_ino)
    assert sorted(plan.ignored) == sorted(
        [b"d/.new.bin.Ab12Cd", b".rsync-partial/p.bin", b"bad-\xff.bin"])
    assert plan.cuts == []  # bytes nobody can prove garbage are kept whole


async def test_recovery_when_an_inode_number_now_belongs_to_another_row(db, store, paths):
    """Row ``a`` remembers inode X; ``a`` is gone and X now belongs to ``b``, which has
    its own row: ``b``'s row keeps its file and ``a`` is forgotten, not moved onto it."""
    st_b = write(store / "b", b"b" * 10)
    a = Task(rel=b"a", present=5, ino=st_b.st_ino)
    b = Task(rel=b"b", present=10, ino=st_b.st_ino)
    rows = await stored_rows(db, [a, b])
    plan = plan_recovery(rows, paths.walk_files(), clean=False, trackable=trackable,
                          generation=paths.inode_generation)
    assert [t.task_id for t in plan.forgotten] == [a.task_id]
    assert [(t.task_id, t.rel) for t in plan.tasks] == [(b.task_id, b"b")]
    assert plan.moved == [] and plan.adopted == []


async def test_recovery_a_path_whose_inode_changed_is_a_new_file(db, store, paths):
    """``a`` was replaced by another file (another inode) and the row's file moved to
    ``b``: the row follows its inode, and the new ``a`` is adopted as a new upload."""
    st_old = write(store / "a", b"o" * 10)
    [row] = await stored_rows(db, [Task(rel=b"a", present=10, durable=10,
                                        ino=st_old.st_ino)])
    os.rename(store / "a", store / "b")
    st_new = write(store / "a", b"new" * 3)
    assert st_new.st_ino != st_old.st_ino
    plan = plan_recovery([row], paths.walk_files(), clean=False, trackable=trackable,
                          generation=paths.inode_generation)
    assert plan.moved == [row] and row.rel == b"b" and row.present == 10
    [adopted] = plan.adopted
    assert (adopted.rel, adopted.ino, adopted.present) == (b"a", st_new.st_ino, 9)


async def test_recovery_never_moves_a_row_onto_a_temporary_name(db, store, paths):
    """The row's file was removed and its inode reused by an rsync temp file before
    the removal reached the database (found by the crash soak: the temp file was then
    imported under the old task). A task never moves to a temporary name, so the row
    is forgotten and the temp file stays what it is: not an upload."""
    st = write(store / "d" / ".s1.myK84B", b"t" * 10)
    [row] = await stored_rows(db, [Task(rel=b"d/s1", state=State.COMPLETE, present=10,
                                        durable=10, ino=st.st_ino,
                                        computed={"sha256": "0" * 64})])
    plan = plan_recovery([row], paths.walk_files(), clean=False, trackable=trackable,
                          generation=paths.inode_generation)
    assert plan.forgotten == [row] and plan.moved == [] and plan.tasks == []
    assert plan.ignored == [b"d/.s1.myK84B"]


async def test_recovery_rows_without_an_inode_match_by_path(db, store, paths):
    st = write(store / "a", b"p" * 10)
    [row] = await stored_rows(db, [Task(rel=b"a", present=10, durable=10)])
    assert row.ino is None  # a row from before inode records
    plan = plan_recovery([row], paths.walk_files(), clean=False, trackable=trackable,
                          generation=paths.inode_generation)
    assert plan.tasks == [row] and plan.moved == [] and plan.adopted == []
    assert row.ino == st.st_ino  # recorded from now on


def identified(paths: BackingTree, rel: bytes) -> dict:
    """The identity a live task records for the file at ``rel``."""
    st, generation = paths.identity(rel)
    return {"ino": st.st_ino,
            "ino_generation": require_generation(generation, paths.path(rel))}


async def test_recovery_a_reused_inode_number_moved_elsewhere_is_a_new_file(db, store, paths):
    """Soak seed 37002: complete ``s1`` removed, its inode number reused by an rsync temp
    file renamed to ``s6``, all before the removal reached the database. By number
    ``s6`` is ``s1`` renamed (it would take ``s1``'s task, import and declared hash); by
    number and generation it is a new file: ``s1``'s row is forgotten, ``s6`` adopted."""
    st = write(store / "d" / "s1", b"1" * 100)
    row = fingerprinted(b"d/s1", st, **identified(paths, b"d/s1"))
    row.client = {"sha256": "1" * 64}
    [row] = await stored_rows(db, [row])
    assert row.ino_generation is not None  # recorded and read back through SQLite
    os.unlink(store / "d" / "s1")
    reused = reuse_inode(store / "d", st.st_ino)
    reused.write_bytes(b"6" * 100)  # same size, other bytes
    os.rename(reused, store / "d" / "s6")
    plan = plan_recovery([row], paths.walk_files(), clean=False, trackable=trackable,
                         generation=paths.inode_generation)
    assert plan.forgotten == [row] and plan.moved == [] and plan.recheck == []
    [adopted] = plan.adopted
    assert adopted.rel == b"d/s6" and adopted.task_id != row.task_id
    assert adopted.client == {} and adopted.job is None
    assert (adopted.ino, adopted.ino_generation) == (st.st_ino, paths.inode_generation(b"d/s6"))


async def test_recovery_a_reused_inode_number_at_the_same_path_is_a_new_file(db, store, paths):
    """``rm a; cp new a`` where the new ``a`` got the old number: the row's durable
    offset is the old file's, so applied to the new one it would cut bytes that were
    never the row's. A new file: adopted whole, nothing cut."""
    st = write(store / "a", b"o" * 1000)
    [row] = await stored_rows(db, [Task(rel=b"a", present=1000, durable=600,
                                        **identified(paths, b"a"))])
    os.unlink(store / "a")
    reused = reuse_inode(store, st.st_ino)
    reused.write_bytes(b"n" * 900)
    os.rename(reused, store / "a")
    plan = plan_recovery([row], paths.walk_files(), clean=False, trackable=trackable,
                         generation=paths.inode_generation)
    assert plan.forgotten == [row] and plan.cuts == []
    [adopted] = plan.adopted
    assert (adopted.rel, adopted.present, adopted.durable) == (b"a", 900, 900)
    assert (store / "a").read_bytes() == b"n" * 900


async def test_recovery_reads_generations_only_where_the_number_may_be_reused(
        db, store, paths):
    """A complete file whose fingerprint matches is its row's without an ``open``; a
    partial one, a moved one and a new one are read once each; the same file and
    generation keep the row, and rows from before generations get theirs recorded."""
    sts = {n: write(store / n, n.encode() * 10) for n in ("done", "part", "old", "moved")}
    rows = [fingerprinted(b"done", sts["done"], **identified(paths, b"done")),
            Task(rel=b"part", present=4, durable=4, **identified(paths, b"part")),
            Task(rel=b"old", present=3, durable=3, ino=sts["old"].st_ino),
            Task(rel=b"moved", present=5, durable=5, **identified(paths, b"moved"))]
    rows = await stored_rows(db, rows)
    os.rename(store / "moved", store / "there")
    write(store / "new", b"n")
    read = []

    def generation(rel):
        read.append(rel)
        return paths.inode_generation(rel)

    plan = plan_recovery(rows, paths.walk_files(), clean=True, trackable=trackable,
                         generation=generation)
    assert sorted(read) == [b"new", b"old", b"part", b"there"]
    by = {t.rel: t for t in plan.tasks}
    assert set(by) == {b"done", b"part", b"old", b"there", b"new"}
    assert [t.rel for t in plan.moved] == [b"there"] and plan.forgotten == []
    assert by[b"done"].state is State.COMPLETE and plan.recheck == []
    for rel, t in by.items():
        assert t.ino_generation == paths.inode_generation(rel), rel


# -- the task and its table -----------------------------------------------------------------

def test_completion_rules_in_order():
    every = dict(has_client_hash=True, renamed_by_rsync=True, idle_seconds=99.0)
    # 0. An open writer: nothing holds, whatever else is true.
    assert rule(writers=1, declared_size=10, **every) == (None, None)
    # 1. A declared size decides alone: reached, exceeded, or short (the later rules,
    #    rsync's mtime-0 hold included, do not apply to a file with a declared size).
    assert rule(declared_size=10, held=True, **every) == (Event.SIZE_REACHED, None)
    event, reason = rule(size=11, declared_size=10, held=True, **every)
    assert event is Event.FAIL
    assert reason == "11 bytes present, more than the declared size 10"
    assert rule(size=9, declared_size=10, **every) == (None, None)
    assert rule(size=0, declared_size=0) == (Event.SIZE_REACHED, None)
    # 2. Held (rsync left it with mtime 0): waits, even with a hash, a rename, and time.
    assert rule(held=True, **every) == (None, None)
    # 3. A client hash: check now, before a rename or settling would.
    assert rule(**every) == (Event.HASH_DECLARED, None)
    # 4. rsync renamed it into place with a real mtime: done, without waiting to settle.
    assert rule(renamed_by_rsync=True, idle_seconds=99.0) == (Event.RENAMED_INTO_PLACE, None)
    assert rule(renamed_by_rsync=True) == (Event.RENAMED_INTO_PLACE, None)
    # 5. Settled: closed and unchanged for settle_seconds, not a moment less.
    assert rule(idle_seconds=10.0) == (Event.SETTLED, None)
    assert rule(idle_seconds=9.999) == (None, None)


def test_named_and_unlink_go_through_the_table_from_every_state():
    for state in State:
        assert TRANSITIONS[(state, Event.NAMED)] is State.PARTIAL
        assert TRANSITIONS[(state, Event.UNLINK)] is None
        t = Task(rel=b"a", state=state)
        assert t.apply(Event.NAMED) is State.PARTIAL and t.state is State.PARTIAL
        t = Task(rel=b"a", state=state, updated=0.0)
        assert t.apply(Event.UNLINK) is None
        assert t.ended and t.state is state and t.updated > 0  # no state after this


async def test_table_remove_ends_the_task_through_unlink_and_deletes_its_row(db):
    tasks = TaskTable(db)
    ts = [tasks.add(Task(rel=s.value.encode(), state=s)) for s in State]
    await db.flush()
    for t in ts:
        tasks.remove(t)
        assert t.ended and tasks.get(t.rel) is None and tasks.get_id(t.task_id) is None
        tasks.save(t)  # an ended task is never written again
    await db.flush()
    assert await db.run(load_tasks) == []


ALLOWED_STATE_WRITERS = {
    ("_task.py", "Task.apply"),               # the table's one writer of state and ended
    ("_task.py", "TaskStateError.__init__"),  # the exception's record of the refused state
}


def state_writes(source: str, filename: str,
                 watched: frozenset[str] | set[str] = frozenset({"state", "ended"}),
                 ) -> list[tuple[str, str, int]]:
    """Every ``x.state``/``x.ended`` (or other ``watched``) write in ``source``:
    ``(file, where, line)``.

    Counts assignments (plain, augmented, annotated, and unpacking), ``setattr`` /
    ``object.__setattr__`` with those names, and ``dataclasses.replace(..., state=)``.
    """
    found = []

    def targets(node):
        if isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                yield from targets(element)
        elif isinstance(node, ast.Starred):
            yield from targets(node.value)
        else:
            yield node

    class Visitor(ast.NodeVisitor):
        def __init__(self):
            self.scope: list[str] = []

        def _scoped(self, node):
            self.scope.append(node.name)
            self.generic_visit(node)
            self.scope.pop()

        visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _scoped

        def _hit(self, node):
            found.append((filename, ".".join(self.scope), node.lineno))

        def _assigned(self, node, assigned):
            for target in assigned:
                for t in targets(target):
                    if isinstance(t, ast.Attribute) and t.attr in watched:
                        self._hit(node)
            self.generic_visit(node)

        def visit_Assign(self, node):
            self._assigned(node, node.targets)

        def visit_AugAssign(self, node):
            self._assigned(node, [node.target])

        def visit_AnnAssign(self, node):
            self._assigned(node, [node.target])

        def visit_Call(self, node):
            name = ast.unparse(node.func)
            if name in ("setattr", "object.__setattr__") and len(node.args) >= 2:
                if isinstance(node.args[1], ast.Constant) and node.args[1].value in watched:
                    self._hit(node)
            if name.endswith("replace") and any(k.arg in watched for k in node.keywords):
                self._hit(node)
            self.generic_visit(node)

    Visitor().visit(ast.parse(source))
    return found


def test_state_and_ended_are_written_only_by_task_apply():
    package = Path(fsagent.uploads.__file__).parent
    writes = []
    for path in sorted(package.glob("*.py")):
        writes += state_writes(path.read_text(), path.name)
    outside = [w for w in writes if (w[0], w[1]) not in ALLOWED_STATE_WRITERS]
    assert outside == [], "task state changes only through Task.apply (the table)"
    # The scan sees the one real writer (so it is not vacuous)...
    assert {(f, where) for f, where, _ in writes} >= {("_task.py", "Task.apply")}
    assert len([w for w in writes if w[1] == "Task.apply"]) == 2  # state and ended
    # ...and would see a reintroduced direct assignment, in any of its forms.
    sneaky = (
        "class UploadsComponent:\n"
        "    def closed(self, t):\n"
        "        t.state = State.PARTIAL\n"
        "        t.ended = True\n"
        "        t.state: State = State.PARTIAL\n"
        "        a, t.state = 1, State.PARTIAL\n"
        "        setattr(t, 'state', State.PARTIAL)\n"
        "        object.__setattr__(t, 'ended', True)\n"
        "        t2 = dataclasses.replace(t, state=State.FAILED)\n"
        "    t.state = State.COMPLETE\n"
        "t.state = State.COMPLETE\n"
    )
    assert [line for _, _, line in state_writes(sneaky, "_component.py")] == [
        3, 4, 5, 6, 7, 8, 9, 10, 11]


# -- completion: verification and the hand-off ------------------------------------------------

class Stage:
    """A ``Completion`` on real parts, with a ``FakeHandOff`` behind it."""

    def __init__(self, db, paths, nursery, to_thread_fn=to_thread):
        self.tasks = TaskTable(db)
        self.handoff = FakeHandOff()
        self.counters = {"rehashed": 0, "rechecked": 0}
        self.wanted: list[tuple[Task, dict]] = []
        self.metrics = Registry()
        self.completion = Completion(
            tasks=self.tasks, paths=paths, settle_seconds=10, to_thread=to_thread_fn,
            handoff=self.handoff, db=db, metrics=self.metrics, counters=self.counters,
            want_checkpoint=lambda t, **kw: self.wanted.append((t, kw)),
            checkpoint_pending=lambda t: False)
        self.completion.nursery = nursery

    def failures(self, reason: str) -> float:
        return self.metrics["fsagent_upload_verification_failures_total"].value(reason)

    def completed(self) -> float:
        return self.metrics["fsagent_uploads_completed_total"].value()


def verifying(store: Path, name: str, data: bytes, **kw) -> Task:
    """A closed upload whose completion rule held: ``verifying``."""
    st = write(store / name, data)
    t = Task(rel=name.encode(), present=len(data), durable=len(data), ino=st.st_ino, **kw)
    t.apply(Event.SETTLED)
    return t


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_verify_completes_and_hands_off_a_new_version(db, store, paths, nursery):
    s = Stage(db, paths, nursery)
    data = os.urandom(100 * KiB)
    t = s.tasks.add(verifying(store, "a.bin", data))
    await s.completion.verify(t, t.generation)
    assert t.state is State.COMPLETE and t.error is None
    assert t.computed == {"sha256": sha256(data)}
    assert t.fingerprint == fingerprint(os.lstat(store / "a.bin"))
    assert s.handoff.calls == [("submit", "job-0")] and t.job == "job-0"
    assert s.counters["rehashed"] == 1 and s.completed() == 1
    await db.flush()
    assert (await committed_row(db, t))[0] == "complete"


async def test_verify_uses_the_stream_hash_when_it_covers_the_file(db, store, paths, nursery):
    s = Stage(db, paths, nursery)
    data = os.urandom(100 * KiB)
    t = s.tasks.add(verifying(store, "a.bin", data))
    t.hasher = StreamHasher({"sha256"}, nursery, to_thread)
    await t.hasher.feed(0, data)
    await s.completion.verify(t, t.generation)
    assert t.state is State.COMPLETE and t.computed["sha256"] == sha256(data)
    assert s.counters["rehashed"] == 0 and t.hasher is None  # closed with the verdict


@pytest.mark.parametrize("job_state", ["queued", "running", "success", None])
async def test_verify_same_bytes_with_a_live_import_keep_it(db, store, paths, nursery,
                                                           job_state):
    s = Stage(db, paths, nursery)
    data = b"same bytes"
    t = verifying(store, "a.bin", data, job="j1", job_sha256=sha256(data), completed=1.0)
    s.tasks.add(t)
    if job_state is not None:  # None: evicted from the job history long ago
        s.handoff.jobs["j1"] = job_state
    await s.completion.verify(t, t.generation)
    assert t.state is State.COMPLETE
    assert s.handoff.calls == []  # no second import of the same version
    assert (t.job, t.job_sha256, t.completed) == ("j1", sha256(data), 1.0)
    assert s.completed() == 0  # each version is counted once


async def test_a_rename_while_the_file_is_rehashed_is_followed(db, store, paths, nursery):
    """The directory holding a file is renamed (the rename event lands) between the
    verification reading the task's path and the worker thread opening it: the hash is
    taken at the new path, and the upload completes (it used to fail "cannot read it
    back to hash it: No such file or directory"; found by the crash soak, seed 33002)."""
    (store / "d1").mkdir()
    data = os.urandom(50 * KiB)
    renamed = []

    async def rename_first(fn, *args):
        if not renamed:
            renamed.append(True)
            os.rename(store / "d1", store / "d2")
            s.tasks.move(t, b"d2/a.bin")
        return await to_thread(fn, *args)
    s = Stage(db, paths, nursery, to_thread_fn=rename_first)
    t = s.tasks.add(verifying(store, "d1/a.bin", data))
    await s.completion.verify(t, t.generation)
    assert renamed and t.state is State.COMPLETE, (t.state, t.error)
    assert t.computed["sha256"] == sha256(data) and t.path == "d2/a.bin"


async def test_a_hash_declared_while_verifying_is_checked(db, store, paths, nursery):
    """A verification is waiting (here: for a running import's verdict) when a client
    declares a SHA-256 that the bytes do not have: the check in progress, which read the
    declarations before, must not make the file complete; the declaration decides."""
    s = Stage(db, paths, nursery)
    data = b"same bytes"
    t = s.tasks.add(verifying(store, "a.bin", data, job="j1", job_sha256=sha256(data)))
    s.handoff.jobs["j1"], s.handoff.ends["j1"] = "running", "success"
    s.handoff.gate = trio.Event()
    nursery.start_soon(s.completion.verify, t, t.generation)
    await trio.testing.wait_all_tasks_blocked()
    t.client = {"sha256": "0" * 64}  # declared now (setxattr user.fsagent.sha256)
    await s.completion.declared(t)
    s.handoff.gate.set()
    with trio.fail_after(10):  # the verdicts may wait on worker threads (hash, flush)
        while t.state is State.VERIFYING:
            await trio.sleep(0.01)
    await trio.testing.wait_all_tasks_blocked()
    assert t.state is State.FAILED, (t.state, t.error)
    assert "sha256 mismatch" in t.error


async def test_verify_waits_for_a_running_import_before_keeping_it(db, store, paths, nursery):
    """The import may be checking this very task right now (found not complete, after a
    crash's recheck) and fail: the verdict decides, so the version is not left with a
    failed import (found by the crash soak, seed 9002)."""
    s = Stage(db, paths, nursery)
    data = b"same bytes"
    t = s.tasks.add(verifying(store, "a.bin", data, job="j1", job_sha256=sha256(data)))
    s.handoff.jobs["j1"], s.handoff.ends["j1"] = "running", "failure"
    await s.completion.verify(t, t.generation)
    assert t.state is State.COMPLETE
    assert [c for c in s.handoff.calls if c[0] == "submit"] == [("submit", t.job)]
    assert t.job != "j1"


@pytest.mark.parametrize("job_state", ["failure", "cancelled"])
async def test_verify_same_bytes_whose_import_died_get_a_new_one(db, store, paths, nursery,
                                                                job_state):
    s = Stage(db, paths, nursery)
    data = b"same bytes"
    t = s.tasks.add(verifying(store, "a.bin", data, job="j1", job_sha256=sha256(data)))
    s.handoff.jobs["j1"] = job_state
    await s.completion.verify(t, t.generation)
    assert t.state is State.COMPLETE
    assert s.handoff.calls[-1] == ("submit", t.job) and t.job != "j1"
    assert [c for c in s.handoff.calls if c[0] == "submit"] == [("submit", t.job)]
    assert t.job_sha256 == sha256(data) and s.completed() == 1


async def test_verify_same_bytes_a_fileset_import_skipped_get_a_new_one(db, store, paths,
                                                                        nursery):
    """The fileset's import succeeded but ran while this upload was being rewritten (with
    the same bytes) and skipped it: that version was not imported, so it gets an import."""
    s = Stage(db, paths, nursery)
    data = b"same bytes"
    t = s.tasks.add(verifying(store, "a.bin", data, job="j1", job_sha256=sha256(data)))
    s.handoff.jobs["j1"] = "success"
    s.handoff.skipped.add(("j1", t.task_id))
    await s.completion.verify(t, t.generation)
    assert t.state is State.COMPLETE
    assert [c for c in s.handoff.calls if c[0] == "submit"] == [("submit", t.job)]
    assert t.job != "j1" and t.job_sha256 == sha256(data)


async def test_verify_other_bytes_release_the_old_import_then_submit(db, store, paths,
                                                                     nursery):
    s = Stage(db, paths, nursery)
    data = b"new version"
    t = s.tasks.add(verifying(store, "a.bin", data, job="j1",
                              job_sha256=sha256(b"old version")))
    s.handoff.jobs["j1"] = "queued"
    await s.completion.verify(t, t.generation)
    assert t.state is State.COMPLETE
    assert s.handoff.calls == [("release", "j1"), ("submit", "job-1")]
    assert t.job == "job-1" and t.job_sha256 == sha256(data)


async def test_verify_mismatch_fails_naming_algorithm_source_expected_actual(
        db, store, paths, nursery):
    s = Stage(db, paths, nursery)
    data = b"payload"
    wrong_sha1 = "0" * 40
    t = s.tasks.add(verifying(store, "d/a.bin", data, client={"sha1": wrong_sha1}))
    await s.completion.verify(t, t.generation)
    assert t.state is State.FAILED
    actual = hashlib.sha1(data).hexdigest()
    assert t.error == (f"d/a.bin: sha1 mismatch: expected {wrong_sha1} "
                       f"(user.fsagent.sha1), got {actual}")
    assert s.handoff.calls == [] and t.job is None
    assert s.failures("mismatch") == 1 and s.completed() == 0
    await db.flush()
    assert (await committed_row(db, t))[0] == "failed"


async def test_verify_mismatch_with_a_manifest_names_the_manifest(db, store, paths, nursery):
    s = Stage(db, paths, nursery)
    data = b"payload"
    wrong = sha256(b"something else")
    write(store / "d" / "SHA256SUMS", f"{wrong}  a.bin\n".encode())
    t = s.tasks.add(verifying(store, "d/a.bin", data))
    await s.completion.verify(t, t.generation)
    assert t.state is State.FAILED
    assert t.error == (f"d/a.bin: sha256 mismatch: expected {wrong} (SHA256SUMS), "
                       f"got {sha256(data)}")


async def test_verify_matching_declarations_complete(db, store, paths, nursery):
    s = Stage(db, paths, nursery)
    data = b"payload"
    write(store / "a.bin.md5", f"{hashlib.md5(data).hexdigest()}\n".encode())
    t = s.tasks.add(verifying(store, "a.bin", data,
                              client={"sha1": hashlib.sha1(data).hexdigest()}))
    await s.completion.verify(t, t.generation)
    assert t.state is State.COMPLETE and t.error is None
    assert set(t.computed) == {"md5", "sha1", "sha256"}


@pytest.mark.parametrize("meanwhile", ["write", "reopen", "unlink"])
async def test_verify_superseded_by_a_change_during_the_check(db, store, paths, nursery,
                                                            meanwhile):
    data = b"v1" * 1000
    t = None

    async def to_thread_with_a_change_meanwhile(fn, *args):
        result = await trio.to_thread.run_sync(fn, *args)
        if fn is _completion._hash_file:  # the check read the old bytes; now they change
            if meanwhile == "write":  # a write that arrived while verifying
                t.changed()
            elif meanwhile == "reopen":  # a writer opened it (leaves verifying)
                t.changed()
                t.apply(Event.OPEN_WRITE)
            else:
                s.tasks.remove(t)
        return result

    s = Stage(db, paths, nursery, to_thread_with_a_change_meanwhile)
    t = s.tasks.add(verifying(store, "a.bin", data))
    await s.completion.verify(t, t.generation)
    assert s.handoff.calls == []  # no verdict, no import: that change decides
    assert t.computed == {} and t.fingerprint is None and s.completed() == 0
    assert t.state is {"write": State.VERIFYING, "reopen": State.RECEIVING,
                       "unlink": State.VERIFYING}[meanwhile]


async def test_consider_applies_the_rule_then_verifies(db, store, paths, nursery):
    s = Stage(db, paths, nursery)
    st = write(store / "a.bin", b"12345")
    exact = s.tasks.add(Task(rel=b"a.bin", present=5, declared_size=5, ino=st.st_ino))
    write(store / "b.bin", b"123456")
    over = s.tasks.add(Task(rel=b"b.bin", present=6, declared_size=5))
    write(store / "c.bin", b"1234")
    short = s.tasks.add(Task(rel=b"c.bin", present=4, declared_size=5))
    for t in (exact, over, short):
        await s.completion.consider(t)
    assert exact.state is State.COMPLETE and s.handoff.calls == [("submit", exact.job)]
    assert over.state is State.FAILED and s.failures("size") == 1
    assert over.error == "b.bin: 6 bytes present, more than the declared size 5"
    assert short.state is State.PARTIAL and short.error is None


async def test_recheck_same_bytes_keep_their_import_other_bytes_start_over(
        db, store, paths, nursery):
    s = Stage(db, paths, nursery)
    same, other = b"unchanged", b"changed while the agent was down"
    tasks = []
    for name, data in (("same", same), ("other", other)):
        st = write(store / name, data)
        t = to_complete(Task(rel=name.encode(), present=len(data), ino=st.st_ino,
                             computed={"sha256": sha256(same)}, job=f"j-{name}",
                             job_sha256=sha256(same), declared_size=len(same),
                             client={"sha256": sha256(same)}))
        t.apply(Event.RECHECK)  # what recovery decides for an unproven complete row
        s.handoff.jobs[t.job] = "success"
        tasks.append(s.tasks.add(t))
    for t in tasks:
        await s.completion.recheck(t)
    kept, changed = tasks
    assert kept.state is State.COMPLETE and kept.job == "j-same"
    assert kept.fingerprint == fingerprint(os.lstat(store / "same"))
    assert changed.state is State.PARTIAL and changed.computed == {}
    # The old bytes' declarations are not these bytes' (soak seed 37002: a row matched by
    # a reused inode failed the new file against the old file's declared hash).
    assert changed.client == {} and changed.declared_size is None
    assert kept.client == {"sha256": sha256(same)} and kept.declared_size == len(same)
    assert s.wanted == [(changed, {"consider": True})]  # the rules take it from partial
    assert s.handoff.calls == [] and s.counters["rechecked"] == 2


def test_next_state_is_what_apply_uses():
    # Task.apply moves exactly along next_state for every pair in the table.
    for (state, event), new in TRANSITIONS.items():
        t = Task(rel=b"a", state=state)
        assert t.apply(event) is new is next_state(state, event)
        assert t.state is (state if new is None else new)


async def test_names_a_temp_file_renamed_into_place_is_named_and_unlink_ends_it(
        db, store, paths, nursery):
    s = Stage(db, paths, nursery)
    space = SpaceAccounting(os.fsencode(store), 0)
    writes = WritePath(paths=paths, space=space, checkpoints=None, to_thread=to_thread,
                       counters={})
    cp = checkpointer(db, paths, store, to_thread, db.flush, s.tasks)
    names = Names(tasks=s.tasks, paths=paths, space=space, checkpoints=cp,
                  completion=s.completion, handoff=s.handoff, writes=writes)
    finished = s.tasks.add(Task(rel=b".f.bin.Ab12Cd", tracked=False))
    still_open = s.tasks.add(Task(rel=b".g.bin.Ef34Gh", tracked=False, writers=1))
    for temp, final in ((b".f.bin.Ab12Cd", "f.bin"), (b".g.bin.Ef34Gh", "g.bin")):
        write(store / os.fsdecode(temp), b"rsync wrote this")
        os.utime(store / os.fsdecode(temp), ns=(0, 10**18))  # rsync sets the real mtime
        os.rename(store / os.fsdecode(temp), store / final)
    finished.timed = True
    for temp, final in ((b".f.bin.Ab12Cd", b"f.bin"), (b".g.bin.Ef34Gh", b"g.bin")):
        await names.renamed(temp, final, False)
    assert finished.tracked and finished.state is State.PARTIAL
    assert finished.renamed_by_rsync and finished.present == 16
    assert still_open.tracked and still_open.state is State.RECEIVING  # named, then opened
    assert cp.pending_consideration(finished) and not cp.pending_consideration(still_open)
    await db.flush()
    assert (await committed_row(db, finished))[0] == "partial"
    assert (await committed_row(db, still_open))[0] == "receiving"

    finished.job = "j1"  # an import that has not started yet
    os.unlink(store / "f.bin")
    await names.unlinked(b"f.bin")
    assert finished.ended and s.tasks.get(b"f.bin") is None
    assert names.was_removed(finished.task_id)
    assert s.handoff.calls == [("release", "j1")]
    assert not cp.pending_consideration(finished)
    await db.flush()
    assert await committed_row(db, finished) is None
