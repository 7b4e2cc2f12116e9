"""The pure parts of uploads/: transition table, completion rules, manifests, hashing."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from fsagent.uploads._hashing import StreamHasher, hash_file
from fsagent.uploads._manifests import manifest_kind, parse_manifest
from fsagent.uploads._task import Task
from fsagent.uploads._task import (
    TRANSITIONS, Event, State, TaskStateError, completion_event, is_temporary_path,
    next_state, progress_percent,
)


def test_happy_path_through_the_table():
    s = State.PARTIAL
    for event in (Event.OPEN_WRITE, Event.CLOSE, Event.SETTLED, Event.VERIFIED):
        s = next_state(s, event)
    assert s is State.COMPLETE
    assert next_state(State.VERIFYING, Event.MISMATCH) is State.FAILED
    assert next_state(State.FAILED, Event.OPEN_WRITE) is State.RECEIVING
    assert next_state(State.COMPLETE, Event.OPEN_WRITE) is State.RECEIVING
    assert next_state(State.COMPLETE, Event.HASH_DECLARED) is State.VERIFYING
    assert next_state(State.RECEIVING, Event.RESTART) is State.PARTIAL
    assert all(next_state(s, Event.UNLINK) is None for s in State)


def test_illegal_moves_name_event_and_state():
    with pytest.raises(TaskStateError, match="cannot verified an upload that is partial"):
        next_state(State.PARTIAL, Event.VERIFIED)
    with pytest.raises(TaskStateError, match="cannot close an upload that is complete"):
        next_state(State.COMPLETE, Event.CLOSE)
    # Every completion rule needs a closed, partial file.
    for event in (Event.SIZE_REACHED, Event.SETTLED, Event.RENAMED_INTO_PLACE):
        for state in (State.RECEIVING, State.VERIFYING, State.COMPLETE):
            assert (state, event) not in TRANSITIONS


def test_task_apply_changes_state_only_through_the_table():
    t = Task(rel=b"a")
    t.apply(Event.OPEN_WRITE)
    assert t.state is State.RECEIVING
    with pytest.raises(TaskStateError):
        t.apply(Event.VERIFIED)
    assert t.state is State.RECEIVING


def rule(**kw):
    base = dict(writers=0, size=10, declared_size=None, has_client_hash=False,
                renamed_by_rsync=False, held=False, idle_seconds=0.0, settle_seconds=10.0)
    base.update(kw)
    return completion_event(**base)


def test_completion_rules():
    assert rule() == (None, None)
    assert rule(writers=1, declared_size=10) == (None, None)
    assert rule(declared_size=10) == (Event.SIZE_REACHED, None)
    assert rule(declared_size=11, idle_seconds=99) == (None, None)  # size is authoritative
    event, reason = rule(declared_size=5)
    assert event is Event.FAIL and "more than the declared size 5" in reason
    assert rule(has_client_hash=True) == (Event.HASH_DECLARED, None)
    assert rule(renamed_by_rsync=True) == (Event.RENAMED_INTO_PLACE, None)
    assert rule(idle_seconds=10) == (Event.SETTLED, None)
    # rsync's interrupted --partial (mtime 0) never completes by itself.
    assert rule(held=True, renamed_by_rsync=True, idle_seconds=99,
                has_client_hash=True) == (None, None)


def test_temporary_paths():
    assert is_temporary_path(b".data.bin.Xa9bZ0")
    assert is_temporary_path(b"d/.f.abcdef")
    assert is_temporary_path(b"d/.rsync-partial/f.bin")
    assert is_temporary_path(b".~tmp~/f")
    assert not is_temporary_path(b"data.bin")
    assert not is_temporary_path(b".hidden")
    assert not is_temporary_path(b"d/.data.bin.Xa9b")


def test_progress():
    assert progress_percent(50, 200, State.RECEIVING) == 25.0
    assert progress_percent(50, None, State.PARTIAL) is None
    assert progress_percent(7, None, State.COMPLETE) == 100.0


def test_manifest_formats():
    sha = hashlib.sha256(b"x").hexdigest()
    md5 = hashlib.md5(b"x").hexdigest()
    text = (f"{sha}  a.bin\n{sha} *./b.bin\n\\{sha}  c\\\\d\nSHA256 (e.bin) = {sha}\n"
            f"{md5}  wrong-length\ngarbage line\n").encode()
    got = parse_manifest(text, "sha256")
    assert got == {b"a.bin": sha, b"b.bin": sha, b"c\\d": sha, b"e.bin": sha}
    assert parse_manifest(f"{md5}\n".encode(), "md5", b"f.bin") == {b"f.bin": md5}
    assert parse_manifest(f"{md5}  other\n".encode(), "md5", b"f.bin") == {}
    assert manifest_kind(b"SHA256SUMS") == ("sha256", None)
    assert manifest_kind(b"f.bin.md5") == ("md5", b"f.bin")
    assert manifest_kind(b"f.bin") is None


async def test_stream_hasher_in_order_out_of_order_and_resume(tmp_path):
    data = os.urandom(3 * 2**20 + 123)
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()

    async def to_thread(fn, *args):
        return await trio.to_thread.run_sync(fn, *args)

    async with trio.open_nursery() as nursery:
        h = StreamHasher({"sha256", "md5"}, nursery, to_thread)
        for off in range(0, len(data), 200_000):  # big pieces: through the worker thread
            await h.feed(off, data[off:off + 200_000])
        got = await h.digests(len(data))
        assert got == {"sha256": expected, "md5": hashlib.md5(data).hexdigest()}
        h.close()

        h = StreamHasher({"sha256"}, nursery, to_thread)
        await h.feed(0, data[:4096])
        await h.feed(8192, data[8192:9000])  # a hole: the stream is broken
        assert h.broken and await h.digests(9000) is None

        h = StreamHasher({"sha256"}, nursery, to_thread)  # resume: prefix from disk
        await h.feed_existing(os.fsencode(path), 2**20)
        await h.feed(2**20, data[2**20:])
        assert await h.digests(len(data)) == {"sha256": expected}
        h.close()
    assert hash_file(os.fsencode(path), ["sha256"]) == {"sha256": expected}


def test_row_round_trip():
    t = Task(rel="dir/ü.bin".encode(), declared_size=9, client={"md5": "0" * 32},
             computed={"sha256": "1" * 64}, job="j1", held=True)
    back = Task.from_row(t.row())
    for field in ("rel", "task_id", "state", "declared_size", "client", "computed", "job",
                  "held"):
        assert getattr(back, field) == getattr(t, field)


def test_a_tasks_fingerprint_is_kept_packed_and_reads_and_stores_as_before():
    """100,000 complete uploads each keep a fingerprint: packed, not a tuple of three
    ints (~180 bytes each as objects). It reads as the tuple, travels in its three
    columns and comes back from a row unchanged, before 1970 included."""
    import gc

    from fsagent.uploads._task import COLUMNS

    t = Task(rel=b"exp/a.tif")
    assert t.fingerprint is None
    for proof in [(1024, 1796010932448152930, 1796010932448152931), (0, -5, 2**62)]:
        t.fingerprint = proof
        assert t.fingerprint == proof
        held = gc.get_referents(t)
        assert not [x for x in held if type(x) is tuple]
        assert not [x for x in held if type(x) is int and x in proof[1:]]
        row = dict(zip(COLUMNS, t.row()))
        assert (row["fp_size"], row["fp_mtime_ns"], row["fp_ctime_ns"]) == proof
        assert Task.from_row(t.row()).fingerprint == proof
    t.fingerprint = None
    assert t.fingerprint is None and Task.from_row(t.row()).fingerprint is None


def test_the_node_of_an_uploaded_file_has_no_dict():
    """The kernel keeps a node per file it has seen (100,000 and more after a big copy):
    slots only, and every attribute a node uses is one of them."""
    from fsagent.uploads._nodes import UploadDir, UploadFile, UploadSpecial, UploadSymlink

    root = UploadDir(None, None, b"")
    for kind in (UploadFile, UploadDir, UploadSymlink, UploadSpecial):
        node = kind(None, root, b"name")
        assert not hasattr(node, "__dict__"), kind
        assert node.inode is None and node.looked_up is None and not node.detached
        assert node.rel == b"name"
