"""The fileset collector's pure core (``fsagent/uploads/_filesets.py``): grouping by
directory (quiet window, caps) and by manifest (waiting, failing, merging, dissolving),
plus a seeded randomized run that checks the invariants (no upload in two filesets,
every upload taken once, caps held)."""

from __future__ import annotations

import os
import random

import pytest

from fsagent.uploads._filesets import FilesetCollector
from fsagent.uploads._task import State, Task


def task(rel: str, size: int = 10, state: State = State.COMPLETE, job: str | None = None,
         error: str | None = None) -> Task:
    t = Task(rel=rel.encode(), present=size, state=state, job=job, error=error)
    t.computed = {"sha256": "0" * 64}
    return t


def listed(*rels: bytes, digest: str = "0" * 64) -> dict[bytes, tuple[str, str]]:
    return {rel: ("sha256", digest) for rel in rels}


def directory(quiet=1.0, max_files=1000, max_bytes=1 << 40) -> FilesetCollector:
    return FilesetCollector("directory", quiet_seconds=quiet, max_files=max_files,
                            max_bytes=max_bytes)


def names(sets) -> list[list[str]]:
    return [sorted(t.path for t in s.members.values()) for s in sets]


def test_directory_sets_close_after_the_quiet_window():
    c = directory(quiet=2.0)
    a, b, x = task("d1/a"), task("d1/b"), task("d2/x")
    c.add(a, 0.0)
    c.add(x, 0.5)
    c.add(b, 1.5)
    assert c.next_due() == 2.5
    assert c.take_ready(2.4, {}.get) == []
    assert names(c.take_ready(2.5, {}.get)) == [["d2/x"]]
    assert c.next_due() == 3.5
    (s,) = c.take_ready(3.5, {}.get)
    assert names([s]) == [["d1/a", "d1/b"]] and s.root == b"d1"
    assert c.next_due() is None and c.waiting_count == 0


@pytest.mark.parametrize("cap", ["files", "bytes"])
def test_directory_caps_close_a_set_at_once(cap):
    c = directory(max_files=3) if cap == "files" else directory(max_bytes=25)
    ts = [task(f"d/{i}") for i in range(7)]
    for t in ts:
        c.add(t, 0.0)
    assert c.next_due() == float("-inf")
    full = c.take_ready(0.0, {}.get)
    assert [len(s.members) for s in full] == [3, 3]
    assert [len(s.members) for s in c.take_ready(1.0, {}.get)] == [1]


def test_a_member_moved_to_another_directory_moves_with_its_next_completion():
    c = directory()
    t = task("d1/a")
    c.add(t, 0.0)
    t.rel = b"d2/a"
    c.add(t, 0.2)
    assert [s.root for s in c.take_ready(5.0, {}.get)] == [b"d2"]


def test_members_that_changed_are_not_usable():
    c = directory()
    a, b, gone = task("d/a"), task("d/b"), task("d/gone")
    for t in (a, b, gone):
        c.add(t, 0.0)
    b.state = State.RECEIVING
    gone.ended = True
    (s,) = c.take_ready(1.0, {}.get)
    assert [t.path for t in s.usable_members()] == ["d/a"]


def manifest_collector() -> FilesetCollector:
    return FilesetCollector("manifest", quiet_seconds=1, max_files=1000, max_bytes=1 << 40)


def test_manifest_set_waits_for_every_listed_file():
    c = manifest_collector()
    a, b, sums = task("r/a"), task("r/b"), task("r/SHA256SUMS")
    table = {t.rel: t for t in (a, sums)}
    c.add(a, 0.0)
    assert c.view(0.0, table.get)[0]["unlisted"] == ["r/a"]
    c.add(sums, 0.1)
    assert c.is_manifest(sums)
    c.listing(sums, listed(b"r/a", b"r/b"), 0.1)
    (view,) = c.view(0.2, table.get)
    assert view["waitingFor"] == ["r/b"] and view["files"] == 2
    assert c.take_ready(9.0, table.get) == []
    table[b.rel] = b
    c.add(b, 1.0)
    (s,) = c.take_ready(1.0, table.get)
    assert names([s]) == [["r/SHA256SUMS", "r/a", "r/b"]] and s.root == b"r"
    assert c.view(1.0, table.get) == []


def test_a_failed_listed_file_holds_the_set_back_with_its_error():
    c = manifest_collector()
    a, sums = task("a"), task("MD5SUMS")
    bad = task("b", state=State.FAILED, error="b: md5 mismatch")
    table = {t.rel: t for t in (a, sums, bad)}
    c.add(a, 0.0)
    c.add(sums, 0.0)
    c.listing(sums, listed(b"a", b"b"), 0.0)
    (view,) = c.view(0.0, table.get)
    assert view["failed"] == [{"path": "b", "error": "b: md5 mismatch"}]
    assert c.take_ready(5.0, table.get) == []
    bad.state, bad.error = State.COMPLETE, None  # re-sent: verified now
    c.add(bad, 6.0)
    assert names(c.take_ready(6.0, table.get)) == [["MD5SUMS", "a", "b"]]


def test_a_listed_file_imported_before_does_not_hold_the_set():
    c = manifest_collector()
    old = task("a", job="earlier-job")
    sums = task("SHA256SUMS")
    table = {t.rel: t for t in (old, sums)}
    c.add(sums, 0.0)
    c.listing(sums, listed(b"a"), 0.0)
    assert names(c.take_ready(0.0, table.get)) == [["SHA256SUMS"]]


def test_two_manifests_listing_the_same_files_are_one_set():
    c = manifest_collector()
    a, b, s1, s2 = task("a"), task("b"), task("SHA256SUMS"), task("MD5SUMS")
    table = {t.rel: t for t in (a, b, s1, s2)}
    for t in (a, b):
        c.add(t, 0.0)
    c.add(s1, 0.0)
    c.listing(s1, listed(b"a", b"b"), 0.0)
    c.add(s2, 0.0)
    c.listing(s2, listed(b"a", b"b"), 0.0)
    (s,) = c.take_ready(0.0, table.get)
    assert names([s]) == [["MD5SUMS", "SHA256SUMS", "a", "b"]]


def test_a_listed_file_whose_hash_differs_from_the_manifest_holds_the_set():
    """A file the manifest's own directory rules did not check (in a subdirectory) is
    checked against the manifest when the set is: a different hash holds it back."""
    c = manifest_collector()
    a, sums = task("run/sub/a"), task("run/SHA256SUMS")
    table = {t.rel: t for t in (a, sums)}
    c.add(a, 0.0)
    c.add(sums, 0.0)
    c.listing(sums, listed(b"run/sub/a", digest="1" * 64), 0.0)
    (view,) = c.view(0.0, table.get)
    assert view["failed"] == [{"path": "run/sub/a", "error": "run/sub/a: sha256 " + "0" * 64
                               + " differs from run/SHA256SUMS: " + "1" * 64}]
    assert c.take_ready(1.0, table.get) == []
    a.computed["sha256"] = "1" * 64  # re-sent with the right bytes
    c.add(a, 2.0)
    assert names(c.take_ready(2.0, table.get)) == [["run/SHA256SUMS", "run/sub/a"]]


def test_a_removed_manifest_dissolves_its_set():
    c = manifest_collector()
    a, sums = task("a"), task("SHA256SUMS")
    table = {t.rel: t for t in (a, sums)}
    c.add(a, 0.0)
    c.add(sums, 0.0)
    c.listing(sums, listed(b"a", b"missing"), 0.0)
    sums.ended = True
    del table[sums.rel]
    assert c.take_ready(1.0, table.get) == []
    assert c.view(1.0, table.get) == [{"grouping": "manifest", "root": None, "files": 1,
                                       "bytes": 10, "unlisted": ["a"], "note":
                                       "complete, but no checksum manifest lists these "
                                       "files yet"}]


@pytest.mark.parametrize("seed", range(200))
def test_randomized_directory_collection_takes_each_upload_once(seed):
    """Random completions (some repeated, some moved, some changed) over random times:
    every upload still usable is taken exactly once, in one set of its directory, and
    no set exceeds the caps."""
    rng = random.Random(seed)
    c = directory(quiet=rng.choice([0.5, 2.0]), max_files=rng.choice([2, 5, 1000]),
                  max_bytes=rng.choice([45, 1 << 40]))
    tasks = [task(f"d{rng.randrange(4)}/f{i}", size=rng.randrange(1, 20),
                  state=State.RECEIVING) for i in range(60)]
    now, taken = 0.0, []
    for _ in range(300):
        now += rng.choice([0.0, 0.05, 0.3, 1.0])
        t = rng.choice(tasks)
        action = rng.random()
        if t.job:
            continue
        if action < 0.7:
            t.state = State.COMPLETE
            c.add(t, now)
        elif action < 0.8:
            t.rel = f"d{rng.randrange(4)}/{t.path.split('/')[1]}".encode()
        elif action < 0.9:
            t.state = State.RECEIVING
        else:
            for s in c.take_ready(now, {}.get):
                taken.append(s)
                for m in s.usable_members():
                    m.job = f"job-{len(taken)}"
    for t in tasks:
        if t.state is State.RECEIVING:
            t.state = State.COMPLETE
            c.add(t, now)
    for s in c.take_ready(now + 100, {}.get):
        taken.append(s)
        for m in s.usable_members():
            m.job = f"job-{len(taken)}"
    seen: dict[str, int] = {}
    for s in taken:
        assert len(s.members) <= c.max_files
        if len(s.members) > 1:
            assert s.size - max(t.present for t in s.members.values()) < c.max_bytes
        for t in s.usable_members():
            seen[t.task_id] = seen.get(t.task_id, 0) + 1
    assert all(n == 1 for n in seen.values())
    assert all(t.job for t in tasks), [t.path for t in tasks if not t.job]
    assert c.waiting_count == 0


def test_a_big_manifest_set_is_not_checked_in_full_on_every_completion():
    """10,000 listed files arriving one by one, the collector asked after each (as the
    hand-off does): full checks happen when the set is whole and at most every
    MANIFEST_RECHECK_SECONDS meanwhile, not 10,000 times (quadratic)."""
    c = manifest_collector()
    files = [task(f"run/f{i}") for i in range(10_000)]
    sums = task("run/SHA256SUMS")
    table = {sums.rel: sums}
    lookups = 0

    def lookup(rel):
        nonlocal lookups
        lookups += 1
        return table.get(rel)
    c.add(sums, 0.0)
    c.listing(sums, listed(*(t.rel for t in files)), 0.0)
    ready = []
    for i, t in enumerate(files):
        now = i * 0.001  # 10 s for the whole set
        table[t.rel] = t
        c.add(t, now)
        ready += c.take_ready(now, lookup)
    assert names(ready) == [sorted([t.path for t in files] + ["run/SHA256SUMS"])]
    assert lookups < 30 * 10_001, f"{lookups} look-ups for 10,000 completions"


# -- the import's look at its members (fsagent/jobs/_import.py) ---------------------------


def _locate_with_renames(tmp_path, spec: dict, renames: list[tuple[str, str]],
                         tasks: dict[str, dict]):
    """Run the import's ``_locate`` for ``spec`` over real files in ``tmp_path``, with
    ``renames`` (pairs of paths under it) applied while each worker-thread stat runs and
    undone before the event loop looks again: a directory renamed away and back, which
    the mount's event loop does between two looks of a job when renames come every few
    ms. ``tasks``: what the uploads component says of each task (``upload_task``)."""
    import types

    import trio

    from fsagent.jobs._import import _locate, _members
    from fsagent.jobs._kinds import RunContext

    async def to_thread(fn, *args):
        for old, new in renames:
            os.rename(tmp_path / old, tmp_path / new)
        try:
            return await trio.to_thread.run_sync(fn, *args)
        finally:
            for old, new in reversed(renames):
                os.rename(tmp_path / new, tmp_path / old)

    ctx = RunContext(job_id="j", spec=spec, config=types.SimpleNamespace(uploads_dir=tmp_path),
                     db=None, make_outputs_dir=lambda: tmp_path, log=lambda line: None,
                     to_thread=to_thread, upload_task=tasks.get)
    return trio.run(_locate, ctx, _members(spec))


@pytest.mark.parametrize("form", ["fileset", "one file"])
def test_a_directory_renamed_away_and_back_while_the_import_stats_it_skips_nothing(
        tmp_path, form):
    """The stats of an import's members run in a worker thread; a directory renamed away
    during one and back before the job looks again leaves every path as it was, but the
    stat found nothing there. Those members are the verified versions, unchanged: the
    import must record them, not skip them (skipped, nothing would import them again:
    "imported 0 times" under load, test_filesets.py, the d0<->d1 renames). A file that
    is really missing is still skipped, and a file that really moved is followed."""
    import hashlib

    from fsagent.jobs._states import ErrorCode

    (tmp_path / "d0").mkdir()
    entries, tasks = [], {}
    for i in range(5):
        data = os.urandom(100 + i)
        (tmp_path / "d0" / f"f{i}").write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        entries.append([f"t{i}", f"d0/f{i}", len(data), sha, 1])
        tasks[f"t{i}"] = {"path": f"d0/f{i}", "state": "complete", "size": len(data),
                          "sha256": sha, "job": "j"}
    if form == "one file":
        t, path, size, sha, mtime_ns = entries[0]
        spec = {"task": t, "path": path, "size": size, "sha256": sha, "mtime_ns": mtime_ns}
        recorded, skipped = _locate_with_renames(tmp_path, spec, [("d0", "d1")], tasks)
        assert skipped == [] and [(m[0], path) for m, path, _ in recorded] == [(t, path)]
        return
    # t3's file is gone behind the agent's back; t4's moved for good (its task says so).
    (tmp_path / "d0" / "f3").unlink()
    (tmp_path / "elsewhere").mkdir()
    os.rename(tmp_path / "d0" / "f4", tmp_path / "elsewhere" / "f4")
    tasks["t4"] = {**tasks["t4"], "path": "elsewhere/f4"}
    spec = {"root": "d0", "files": entries}
    recorded, skipped = _locate_with_renames(tmp_path, spec, [("d0", "d1")], tasks)
    assert sorted((m[0], path) for m, path, _ in recorded) == [
        ("t0", "d0/f0"), ("t1", "d0/f1"), ("t2", "d0/f2"), ("t4", "elsewhere/f4")]
    assert [(m[0], code) for m, code, _ in skipped] == [("t3", ErrorCode.BAD_INPUT)]


def test_the_same_bytes_written_back_after_leaving_the_import_are_not_imported_by_it(
        tmp_path):
    """A member that changed after its fileset was submitted (it left the import: its
    ``user.fsagent.job`` was cleared) and was then written back with the very bytes the
    spec names is a new version with an import of its own: the old import must skip it,
    or those bytes are imported twice. A member still naming the job is imported."""
    import hashlib

    from fsagent.jobs._states import ErrorCode

    entries, tasks = [], {}
    for i, job in enumerate(["j", None, "k"]):
        data = os.urandom(50 + i)
        (tmp_path / f"f{i}").write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        entries.append([f"t{i}", f"f{i}", len(data), sha, 1])
        tasks[f"t{i}"] = {"path": f"f{i}", "state": "complete", "size": len(data),
                          "sha256": sha, "job": job}
    recorded, skipped = _locate_with_renames(tmp_path, {"root": "", "files": entries}, [],
                                             tasks)
    assert [m[0] for m, _, _ in recorded] == ["t0"]
    assert [(m[0], code) for m, code, _ in skipped] == [("t1", ErrorCode.CHANGED),
                                                        ("t2", ErrorCode.CHANGED)]
