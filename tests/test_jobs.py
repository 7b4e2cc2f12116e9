"""The job engine through the mount: states, control, priorities, wait, restart, history."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import signal
import subprocess
import time

import pytest

from conftest import PATIENCE
from jobs_util import (
    GATED_IMPORT, control, import_spec, info, open_gate, put, read, started_pid, status,
    submit, uploads_dir, wait_status, wait_until, write,
)

ONE_AT_A_TIME = "max_concurrent_jobs = 1\n" + GATED_IMPORT


def gated(agent, name: str, rel: str | None = None, **spec_extra) -> os.PathLike:
    spec = import_spec(agent, rel or f"{name}.dat")
    spec.update(spec_extra)
    return submit(agent, name, spec)


def bash(script: str) -> subprocess.CompletedProcess:
    # bash, not sh: dash reports every write error as "I/O error", hiding the errno.
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True)


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def wait_blocked_reading(procs, path) -> None:
    """Wait until every process in ``procs`` has ``path`` open and sits in read(2) on
    it: only then does it stand for a blocked request (a fixed sleep only hopes so)."""
    target = os.path.realpath(path)

    def blocked(proc) -> bool:
        assert proc.poll() is None, f"{proc.args} ended: {proc.returncode}"
        try:
            fds = {os.readlink(f"/proc/{proc.pid}/fd/{fd}"): int(fd)
                   for fd in os.listdir(f"/proc/{proc.pid}/fd")}
            if target not in fds:
                return False
            if platform.machine() != "x86_64":
                return True  # opened; the read follows at once (numbering below is x86-64's)
            # /proc/PID/syscall: the number of the call it is blocked in, then its
            # arguments: read(2) is 0, and its first argument the descriptor.
            call = open(f"/proc/{proc.pid}/syscall").read().split()
        except FileNotFoundError:
            return False
        return call[:2] == ["0", hex(fds[target])]

    wait_until(lambda: all(blocked(p) for p in procs),
               what=f"{len(procs)} readers blocked in read(2) on {path}")


def test_job_directory_files(agent_factory):
    agent = agent_factory(config=GATED_IMPORT).start()
    job = gated(agent, "j1")
    wait_status(job, "running")
    assert sorted(os.listdir(job)) == sorted(["spec", "status", "progress", "message",
                                              "error", "info.json", "priority", "control",
                                              "wait", "log", "outputs"])
    assert read(job / "status") == "running\n"
    assert read(job / "error") == ""
    assert read(job / "priority") == "0\n"
    assert os.listdir(job / "outputs") == []
    record = info(job)
    assert set(record) >= {"ID", "Type", "State", "Progress", "Priority", "Message",
                           "ErrorCode", "ErrorDescription", "CreationTime", "CompletionTime",
                           "EffectiveRuntime", "Timestamp", "Content", "Outputs"}
    assert (record["ID"], record["Type"], record["State"]) == ("j1", "import", "Running")
    assert record["CompletionTime"] is None
    assert "started (import)" in read(job / "log")
    open_gate(agent, "j1.dat")
    wait_status(job, "success")
    record = info(job)
    assert record["State"] == "Success" and record["Progress"] == 100
    assert record["ErrorCode"] == 0 and record["ErrorDescription"] == "Success"
    assert record["CompletionTime"] >= record["CreationTime"]
    assert read(job / "progress") == "100\n"
    listing = json.loads(read(agent.mount / "jobs.json"))
    assert [r["ID"] for r in listing] == ["j1"] and listing[0]["State"] == "Success"
    assert agent.status()["jobs"]["counts"]["success"] == 1


def test_every_state_move_through_the_control_file(agent_factory):
    agent = agent_factory(config=ONE_AT_A_TIME).start()
    verbs = ("cancel", "pause", "resume", "retry")
    # Finished jobs first, while nothing blocks the single slot.
    made = {}
    for v in verbs:
        open_gate(agent, f"s-{v}.dat")
        made["success", v] = gated(agent, f"s-{v}")
        wait_status(made["success", v], "success")
        put(agent, f"f-{v}.dat.go", b"")
        put(agent, f"f-{v}.dat.fail", b"")
        made["failure", v] = gated(agent, f"f-{v}")
        wait_status(made["failure", v], "failure")
    blocker = gated(agent, "blocker")
    wait_status(blocker, "running")
    for v in verbs:
        made["pending", v] = gated(agent, f"p-{v}")
        made["paused", v] = gated(agent, f"z-{v}")
        control(made["paused", v], "pause")
        made["cancelled", v] = gated(agent, f"c-{v}")
        control(made["cancelled", v], "cancel")
    expected = {
        ("pending", "cancel"): "cancelled", ("pending", "pause"): "paused",
        ("pending", "resume"): "pending", ("pending", "retry"): "pending",
        ("paused", "cancel"): "cancelled", ("paused", "pause"): "paused",
        ("paused", "resume"): "pending", ("paused", "retry"): errno.EBUSY,
        ("cancelled", "cancel"): "cancelled", ("cancelled", "pause"): errno.EBUSY,
        ("cancelled", "resume"): errno.EBUSY, ("cancelled", "retry"): "pending",
        ("success", "cancel"): errno.EBUSY, ("success", "pause"): errno.EBUSY,
        ("success", "resume"): errno.EBUSY, ("success", "retry"): errno.EBUSY,
        ("failure", "cancel"): errno.EBUSY, ("failure", "pause"): errno.EBUSY,
        ("failure", "resume"): errno.EBUSY, ("failure", "retry"): "pending",
    }
    for (state, verb), outcome in expected.items():
        job = made[state, verb]
        assert status(job) == state, (state, verb)
        if isinstance(outcome, int):
            assert errno_of(control, job, verb) == outcome, (state, verb)
            assert status(job) == state  # a refused verb changes nothing
        else:
            control(job, verb)
            assert status(job) == outcome, (state, verb)
    # Running: resume holds already, retry is illegal, pause and cancel stop the run.
    control(blocker, "resume")
    assert status(blocker) == "running"
    assert errno_of(control, blocker, "retry") == errno.EBUSY
    assert status(blocker) == "running"
    control(blocker, "pause")
    assert status(blocker) == "paused"
    # The slot is free: the oldest pending job starts; cancel it while it runs.
    nxt = made["pending", "resume"]
    wait_status(nxt, "running")
    control(nxt, "cancel")
    assert status(nxt) == "cancelled"
    assert "cancel: running -> cancelled" in read(nxt / "log")
    # Unknown verbs are EINVAL and change nothing.
    assert errno_of(control, blocker, "explode") == errno.EINVAL
    assert errno_of(control, blocker, "") == errno.EINVAL
    assert status(blocker) == "paused"


def test_cancel_pending_running_and_finished(agent_factory):
    agent = agent_factory(config=ONE_AT_A_TIME).start()
    running = gated(agent, "run")
    wait_status(running, "running")
    pid = started_pid(agent, "run.dat")
    pending = gated(agent, "pend")
    assert status(pending) == "pending"
    assert bash(f"echo cancel > {pending}/control").returncode == 0
    assert status(pending) == "cancelled"
    assert bash(f"echo cancel > {running}/control").returncode == 0
    assert status(running) == "cancelled"
    # The running import_command was terminated, not left behind.
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="the command to end")
    # A cancelled pending job never runs, even once the slot is free: "done", submitted
    # after it, gets the single slot and finishes, so the queue was served meanwhile.
    open_gate(agent, "pend.dat")
    open_gate(agent, "done.dat")
    done = gated(agent, "done")
    wait_status(done, "success")
    assert status(pending) == "cancelled"
    assert "started" not in read(pending / "log")
    assert not (uploads_dir(agent) / "pend.dat.pid").exists()
    assert info(pending)["EffectiveRuntime"] == 0
    # Finished: cancel is EBUSY on success, a no-op on cancelled.
    r = bash(f"echo cancel > {done}/control")
    assert r.returncode != 0 and "Device or resource busy" in r.stderr
    assert status(done) == "success"
    control(running, "cancel")
    assert status(running) == "cancelled"


def test_priorities_order_the_queue(agent_factory):
    agent = agent_factory(config=ONE_AT_A_TIME).start()
    blocker = gated(agent, "blocker")
    wait_status(blocker, "running")
    put(agent, "small.txt", b"hello")
    order = [("a", 0), ("b", 5), ("c", -3), ("d", 5), ("e", 1)]
    for name, prio in order:
        submit(agent, name, {"type": "archive", "paths": ["small.txt"], "priority": prio})
    # Re-prioritise a pending job through its priority file.
    write(agent.jobs / "c" / "priority", "9\n")
    assert read(agent.jobs / "c" / "priority") == "9\n"
    assert errno_of(write, agent.jobs / "c" / "priority", "high") == errno.EINVAL
    assert errno_of(write, blocker / "priority", "3") == errno.EBUSY
    open_gate(agent, "blocker.dat")
    for name, _ in order:
        wait_status(agent.jobs / name, "success")
    started = sorted(order, key=lambda o: info(agent.jobs / o[0])["CompletionTime"])
    assert [name for name, _ in started] == ["c", "b", "d", "e", "a"]


def test_wait_blocks_until_the_job_ends(agent_factory):
    agent = agent_factory(config=GATED_IMPORT).start()
    job = gated(agent, "w")
    waiter = subprocess.Popen(["cat", str(job / "wait")], stdout=subprocess.PIPE)
    try:
        wait_blocked_reading([waiter], job / "wait")
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(0.7)
        # While it blocks, the mount answers everything else.
        wait_status(job, "running")
        open_gate(agent, "w.dat")
        out, _ = waiter.communicate(timeout=PATIENCE)
        assert out == b"success\n"
    finally:
        waiter.kill()
    # On a finished job it returns at once.
    assert read(job / "wait") == "success\n"


def test_many_blocked_waits_do_not_stall_the_mount(agent_factory):
    agent = agent_factory(config=GATED_IMPORT).start()
    job = gated(agent, "w")
    wait_status(job, "running")
    waiters = [subprocess.Popen(["cat", str(job / "wait")], stdout=subprocess.PIPE)
               for _ in range(150)]  # more than pyfuse3's default of 99 request tasks
    try:
        wait_blocked_reading(waiters, job / "wait")  # 150 requests held by the agent
        # Another read is answered, in a separate process so that a stalled mount fails
        # the test (TimeoutExpired) instead of hanging it. A stall would be for good; the
        # bound only has to be generous for a busy machine.
        t0 = time.monotonic()
        reader = subprocess.run(["cat", str(job / "status")], capture_output=True,
                                timeout=PATIENCE)
        assert reader.stdout == b"running\n"
        assert time.monotonic() - t0 < 10
        open_gate(agent, "w.dat")
        for w in waiters:
            assert w.communicate(timeout=PATIENCE)[0] == b"success\n"
    finally:
        for w in waiters:
            w.kill()


def test_a_blocked_wait_ends_when_the_agent_stops(agent_factory):
    # A long shutdown_timeout: were the blocked request to hold the stop up, the stop
    # would take all of it, far past the (busy-machine) bound below.
    agent = agent_factory(config="shutdown_timeout = 120\n" + GATED_IMPORT).start()
    job = gated(agent, "w")
    waiter = subprocess.Popen(["cat", str(job / "wait")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        wait_blocked_reading([waiter], job / "wait")
        t0 = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.proc.wait(PATIENCE) == 0
        assert time.monotonic() - t0 < 30
        waiter.wait(PATIENCE)
        assert waiter.returncode != 0  # not a final status: the job did not end
    finally:
        waiter.kill()


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_restart_with_pending_and_running_jobs(agent_factory, how):
    agent = agent_factory(config="settle_seconds = 0.3\nimport_grouping = \"file\"\n"
                          + ONE_AT_A_TIME).start()
    # Written through the mount, so the uploads component has them durable: after a
    # kill -9 it cuts back files it never acknowledged (those written behind its back).
    for name in ("done", "run", "pend", "paused"):
        (agent.uploads / f"{name}.dat").write_bytes(b"data")
    for name in ("done", "run", "pend", "paused"):
        wait_until(lambda: os.getxattr(agent.uploads / f"{name}.dat",
                                       "user.fsagent.state") == b"complete")
    wait_until(lambda: len(os.listdir(agent.jobs)) == 4
               and all(status(agent.jobs / j) == "success" for j in os.listdir(agent.jobs)),
               what="the uploads' own import jobs")
    open_gate(agent, "done.dat")
    done = gated(agent, "done")
    wait_status(done, "success")
    running = gated(agent, "run")
    wait_status(running, "running")
    # "running" is set as the command is spawned; wait until it really runs (it wrote
    # its pid), or the stop may come before it did and leave nothing to restart from.
    first_pid = started_pid(agent, "run.dat")
    pending = gated(agent, "pend", priority=2)
    paused = gated(agent, "paused")
    control(paused, "pause")
    if how == "kill9":
        agent.kill9()
        # Its command outlives it (orphaned, waiting for a gate that opens only at the
        # end): end it, so that it cannot be mistaken for the re-run below.
        with contextlib.suppress(ProcessLookupError):
            os.kill(first_pid, signal.SIGKILL)
    else:
        assert agent.stop() == 0
    (uploads_dir(agent) / "run.dat.pid").unlink()
    agent.start()
    jobs = agent.jobs
    mine = sorted(n for n in os.listdir(jobs) if len(n) != 36)  # not the uploads' UUIDs
    assert mine == ["done", "paused", "pend", "run"]
    assert status(done) == "success" and info(done)["Content"]["Path"] == "done.dat"
    assert status(paused) == "paused"
    # The interrupted job was requeued with a message; "pend" (priority 2) runs first.
    assert "interrupted" in read(running / "log")
    wait_status(pending, "running")
    assert status(running) == "pending"
    assert "interrupted" in read(running / "message")
    open_gate(agent, "pend.dat")
    wait_status(running, "running")
    started_pid(agent, "run.dat", other_than=first_pid)  # it ran again: a new command
    open_gate(agent, "run.dat")
    wait_status(running, "success")
    assert status(pending) == "success"


def test_history_eviction_by_count(agent_factory):
    agent = agent_factory(config="job_history = 2\nmax_concurrent_jobs = 1\n").start()
    put(agent, "f.txt", b"abc")
    for name in ("h1", "h2", "h3", "h4"):
        job = submit(agent, name, {"type": "archive", "paths": ["f.txt"]})
        wait_status(job, "success")
    wait_until(lambda: sorted(os.listdir(agent.jobs)) == ["h3", "h4"])
    # Outputs go too: removed from the disk after the jobs leave the listing (and their
    # removal is committed), so that is waited for in turn.
    wait_until(lambda: sorted(os.listdir(agent.state / "jobs")) == ["h3", "h4"],
               what="the evicted jobs' directories to be removed")
    assert [r["ID"] for r in json.loads(read(agent.mount / "jobs.json"))] == ["h3", "h4"]
    agent.stop()
    agent.start()
    assert sorted(os.listdir(agent.jobs)) == ["h3", "h4"]


def test_history_eviction_by_age_spares_live_jobs(agent_factory):
    agent = agent_factory(config="job_ttl = 1\n" + GATED_IMPORT).start()
    put(agent, "f.txt", b"abc")
    old = submit(agent, "old", {"type": "archive", "paths": ["f.txt"]})
    wait_status(old, "success")
    live = gated(agent, "live")
    wait_status(live, "running")
    wait_until(lambda: "old" not in os.listdir(agent.jobs))
    wait_until(lambda: not (agent.state / "jobs" / "old").exists())
    time.sleep(1.5)
    assert status(live) == "running"  # older than job_ttl, but not finished: kept
    open_gate(agent, "live.dat")
    wait_status(live, "success")


def test_mkdir_and_rmdir_of_drafts(agent):
    d = agent.jobs / "draft1"
    os.mkdir(d)
    assert os.listdir(d) == ["spec"]
    assert "draft1" in os.listdir(agent.jobs)
    assert errno_of(os.mkdir, d) == errno.EEXIST
    assert errno_of(os.mkdir, agent.jobs / "bad name!") == errno.EINVAL
    os.rmdir(d)
    assert "draft1" not in os.listdir(agent.jobs)
    put(agent, "f.txt")
    job = submit(agent, "real", {"type": "archive", "paths": ["f.txt"]})
    wait_status(job, "success")
    assert errno_of(write, job / "spec", '{"type":"archive","paths":["f.txt"]}') == errno.EBUSY
    assert json.loads(read(job / "spec")) == {"type": "archive", "priority": 0,
                                              "paths": ["f.txt"], "compression": "store"}
    assert errno_of(os.mkdir, job) == errno.EEXIST


def test_rmdir_removes_a_finished_job_with_its_outputs_and_refuses_a_live_one(agent_factory):
    agent = agent_factory(config=GATED_IMPORT).start()
    put(agent, "f.txt")
    done = submit(agent, "done", {"type": "archive", "paths": ["f.txt"]})
    wait_status(done, "success")
    assert (agent.state / "jobs" / "done" / "outputs" / "archive.zip").exists()
    live = submit(agent, "live", import_spec(agent, "live.dat"))
    wait_status(live, "running")
    assert errno_of(os.rmdir, live) == errno.EBUSY  # cancel it first
    os.rmdir(done)
    assert not done.exists() and "done" not in os.listdir(agent.jobs)
    assert not (agent.state / "jobs" / "done").exists()
    assert [j["ID"] for j in json.loads(read(agent.mount / "jobs.json"))
            if j["ID"] in ("done", "live")] == ["live"]
    assert errno_of(os.rmdir, done) == errno.ENOENT
    open_gate(agent, "live.dat")
    wait_status(live, "success")
    agent.stop()
    agent.start()
    assert "done" not in os.listdir(agent.jobs) and "live" in os.listdir(agent.jobs)
    os.mkdir(agent.jobs / "done")  # the name is free again


BAD_SPECS = [
    ("not json", "spec is not valid JSON"),
    ('["archive"]', "JSON object"),
    ('{"paths": ["f.txt"]}', '"type"'),
    ('{"type": "explode", "paths": ["f.txt"]}', "unknown job type 'explode'"),
    ('{"type": "archive"}', "missing field 'paths'"),
    ('{"type": "archive", "paths": ["f.txt"], "colour": 1}', "unknown field 'colour'"),
    ('{"type": "archive", "paths": []}', "non-empty list"),
    ('{"type": "archive", "paths": ["f.txt"], "compression": "lzma"}', "compression"),
    ('{"type": "archive", "paths": ["f.txt"], "priority": "high"}', "priority"),
    ('{"type": "archive", "paths": ["../state/fsagent.db"]}', "'..' is refused"),
    ('{"type": "archive", "paths": ["/etc/passwd"]}', "absolute paths are refused"),
    ('{"type": "archive", "paths": ["nothere"]}', "no such file or directory"),
    ('{"type": "archive", "paths": ["out"]}', "resolves outside uploads/"),
    ('{"type": "archive", "paths": ["d"]}', "resolves outside uploads/"),
    ('{"type": "verify", "paths": ["nothere"]}', "nothing recorded there"),
    ('{"type": "import", "path": "f.txt"}', "missing field"),
    ('{"type": "import", "task": "t", "path": "f.txt", "size": 1, "sha256": "zz",'
     ' "mtime_ns": 0}', "sha256"),
    ('{"type": "import", "task": "t", "path": "d", "size": 1, "sha256": "' + "0" * 64
     + '", "mtime_ns": 0}', "not a regular file"),
]


def test_bad_specs_are_refused_at_write_time(agent):
    put(agent, "f.txt")
    os.symlink("/etc/passwd", uploads_dir(agent) / "out")
    put(agent, "d/ok.txt")
    os.symlink("/etc", uploads_dir(agent) / "d" / "escape")
    for i, (text, reason) in enumerate(BAD_SPECS):
        d = agent.jobs / f"bad{i}"
        os.mkdir(d)
        r = bash(f"echo '{text}' > {d}/spec")
        assert r.returncode != 0 and "Invalid argument" in r.stderr, text
        assert reason in read(d / "message"), (text, read(d / "message"))
        assert sorted(os.listdir(d)) == ["message", "spec"]
        os.rmdir(d)
    assert os.listdir(agent.jobs) == []
    assert json.loads(read(agent.mount / "jobs.json")) == []
    assert agent.status()["jobs"]["runs_started"] == 0
    # After refusals the same draft still accepts a good spec.
    d = agent.jobs / "good"
    os.mkdir(d)
    with pytest.raises(OSError):
        write(d / "spec", "{bad")
    write(d / "spec", '{"type": "archive", "paths": ["f.txt", "d/ok.txt"]}')
    wait_status(d, "success")


def test_a_spec_larger_than_one_write_is_accumulated(agent):
    for i in range(400):
        put(agent, f"many/file-with-a-long-name-{i:04d}.txt", b"z")
    spec = {"type": "archive",
            "paths": [f"many/file-with-a-long-name-{i:04d}.txt" for i in range(400)]}
    text = json.dumps(spec, indent=4)
    assert len(text) > 3 * 4096
    os.mkdir(agent.jobs / "big")
    with open(agent.jobs / "big" / "spec", "w") as f:  # buffered: 8 KiB writes
        f.write(text)
    job = agent.jobs / "big"
    wait_status(job, "success")
    assert info(job)["Content"]["InstancesCount"] == 400


def test_the_engine_survives_a_database_it_cannot_write(agent_factory):
    """The disk under the state dir fails (the WAL made immutable: every commit gets a
    real I/O error). A job that ends meanwhile keeps its end staged and recorded once
    writes work again; a submit in the meantime fails and queues nothing; the agent
    never goes down."""
    agent = agent_factory(config=GATED_IMPORT).start()
    job = submit(agent, "g", import_spec(agent, "g.dat"))
    wait_status(job, "running")
    wal = agent.state / "fsagent.db-wal"
    subprocess.run(["chattr", "+i", wal], check=True)
    try:
        open_gate(agent, "g.dat")
        wait_status(job, "success")  # in memory at once; on disk once it can be
        os.mkdir(agent.jobs / "late")
        assert errno_of(write, agent.jobs / "late" / "spec",
                        '{"type": "archive", "paths": ["g.dat"]}') == errno.EIO
        assert os.listdir(agent.jobs / "late") == ["spec"]  # still a draft: nothing queued
        # The end's own flush and then the periodic ones fail while the WAL is immutable.
        wait_until(lambda: "recording its end failed; kept staged for retry" in agent.log(),
                   what="the job's end to fail to be recorded")
        flush_failures = agent.log().count("database flush failed")
        wait_until(lambda: agent.log().count("database flush failed") > flush_failures,
                   what="a periodic flush to fail")
        assert agent.proc.poll() is None, agent.log()
    finally:
        subprocess.run(["chattr", "-i", wal], check=True)
    assert read(job / "wait") == "success\n"  # returns once the end is durable
    assert "recording its end failed; kept staged for retry" in agent.log()
    late = submit(agent, "late2", {"type": "archive", "paths": ["g.dat"]})
    assert read(late / "wait") == "success\n"
    agent.kill9()  # nothing may depend on a clean stop now
    agent.start()
    assert status(job) == "success" and status(late) == "success"
