"""What the agent keeps in memory (issue 12: 100,000 files in 1,000 fileset imports
under 200 MiB), checked structurally, not by timing or RSS: a finished job's record on
the real engine in-process, and what the agent imports at start-up. (The per-upload
records: ``test_uploads_units.py``, the fingerprint and node tests.)

Design notes
------------
* The engine is built on its real parts (``Config``, ``Database``, ``EventHub``,
  ``Registry``) with a host that offers what ``Engine`` uses; state changes go through
  ``Engine._apply`` (where every one happens) and start-up through ``Engine.load``, so
  both routes by which a job becomes a finished one in memory are covered.
* "Holds no per-file list" is checked structurally: nothing reachable from the job
  record is a list of members (``gc.get_referents`` walk), and the spec is kept as
  bytes. What the files show must not change: ``jobs.json`` must be the very bytes the
  old rendering gave (``json.dumps`` of every ``info()``, joined), and ``info()`` must
  still carry the whole ``Spec``.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import trio

from fsagent.config import load_config
from fsagent.db import Database
from fsagent.events import EventHub
from fsagent.jobs._engine import Engine, Job, PackedSpec
from fsagent.jobs._nodes import JobsListing, render_jobs_json
from fsagent.jobs._states import State
from fsagent.service.metrics import Registry


class _Host:
    """The parts of the agent ``Engine`` uses, real ones."""

    def __init__(self, tmp_path):
        self.config = load_config(overrides={"mount": str(tmp_path / "mnt"),
                                             "state_dir": str(tmp_path / "state")})
        self.db = Database.open(self.config.database_path)
        self.metrics = Registry()
        self.events = EventHub()
        self.shutting_down = trio.Event()

    async def to_thread(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args)


def _fileset_spec(files: int) -> dict:
    return {"root": "exp/d0", "files": [
        [f"{i:032x}", f"exp/d0/f{i:05d}", 1024, f"{i:064x}", 1796010932448152930 + i]
        for i in range(files)]}


def _add(engine: Engine, job_id: str, spec: dict, seq: int) -> Job:
    job = Job(job_id, seq, "import", spec, State.PENDING, created=1e9 + seq,
              updated=1e9 + seq, message="queued")
    engine.jobs[job_id] = job
    engine._track(job, None)
    return job


def _lists_reachable(obj, limit: int = 20000) -> list[list]:
    """Every list reachable from ``obj`` (a bounded walk of its references)."""
    seen, todo, found = set(), [obj], []
    while todo and len(seen) < limit:
        o = todo.pop()
        if id(o) in seen or isinstance(o, (type, trio.Event)):
            continue
        seen.add(id(o))
        if isinstance(o, list):
            found.append(o)
        todo.extend(gc.get_referents(o))
    return found


def _old_rendering(engine: Engine) -> bytes:
    lines = ",\n".join(json.dumps(job.info(), separators=(",", ":"))
                       for job in engine.listing())
    return ("[\n" + lines + "\n]\n" if lines else "[]\n").encode()


def _check_reads(listing: JobsListing, expected: bytes) -> None:
    """Reads of any offset and size, across pieces, give the document's bytes; a
    listing holds its finished jobs' specs packed, nothing unpacked but the last read."""
    assert listing.size == len(expected)
    assert any(isinstance(p, PackedSpec) for p in listing.pieces)
    for size in (1, 7, 4096, 131072, len(expected) + 10):
        got = b"".join(listing.read(offset, size) for offset in range(0, listing.size, size))
        assert got == expected, size
    for offset in (0, 5, listing.ends[0] - 1, listing.ends[0], listing.size - 1):
        assert listing.read(offset, 300) == expected[offset : offset + 300]
    assert listing.read(listing.size, 10) == b"" == listing.read(listing.size + 5, 10)


def test_a_finished_fileset_import_keeps_no_member_list_and_shows_the_same(tmp_path):
    host = _Host(tmp_path)
    engine = Engine(host)
    assert render_jobs_json(engine) == b"[]\n" == _old_rendering(engine)
    spec = _fileset_spec(300)
    done = _add(engine, "done", spec, 1)
    running = _add(engine, "running", _fileset_spec(3), 2)
    for verb in ("start", "succeed"):
        engine._apply(done, verb)
    engine._apply(running, "start")
    assert done.state is State.SUCCESS
    # Finished: the spec is kept as bytes and no list of members hangs off the record.
    assert [x for x in _lists_reachable(done) if len(x) >= 3] == []
    assert isinstance(done.stored_spec, PackedSpec)
    # Still running: its spec is the dict the run reads.
    assert running.stored_spec["files"][0][1] == "exp/d0/f00000"
    # What the files show is unchanged: the whole spec in info(), jobs.json the same bytes.
    assert done.info()["Spec"] == spec and done.spec == spec
    assert json.loads(done.info_json()) == done.info()
    rendered = render_jobs_json(engine)
    assert rendered == _old_rendering(engine)
    _check_reads(JobsListing(engine), rendered)
    assert [j["Spec"] for j in json.loads(rendered)] == [spec, _fileset_spec(3)]
    # A failed job is packed too, and a retry runs it again with the spec as a dict.
    engine._apply(running, "fail")
    assert isinstance(running.stored_spec, PackedSpec)
    engine._apply(running, "retry")
    assert running.state is State.PENDING and running.stored_spec == _fileset_spec(3)
    engine._apply(running, "start")
    # The row written, and the job loaded from it at the next start: packed again.
    engine._stage(done)
    engine._stage(running)
    host.db.flush_sync()
    host.metrics = Registry()  # the next start's engine registers its metrics afresh
    again = Engine(host)
    again.load()
    assert isinstance(again.jobs["done"].stored_spec, PackedSpec)
    assert again.jobs["done"].spec == spec and again.jobs["done"].state is State.SUCCESS
    assert [x for x in _lists_reachable(again.jobs["done"]) if len(x) >= 3] == []
    # (the running job was requeued: pending, its spec a dict)
    assert again.jobs["running"].stored_spec == _fileset_spec(3)
    assert render_jobs_json(again) == _old_rendering(again)
    _check_reads(JobsListing(again), _old_rendering(again))
    host.db.close()


def test_the_agent_does_not_load_the_s3_client_unless_it_makes_one():
    """botocore's session and config are ~7 MiB of RSS; with the local backend (the
    default) nothing uses them."""
    code = ("import sys, fsagent.agent, fsagent.cli; "
            "print(sorted(m for m in sys.modules if m in ('botocore.session', "
            "'botocore.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
