"""A job is cheap: no directory without a reason, log lines batched, nothing lost that
matters in a crash.

Design notes
------------
* The state dir is looked at directly (``STATE/jobs/``): what is *not* on disk is the
  point of these tests, and the mount cannot show that.
* ``db_flush_seconds = 3600`` keeps the periodic writer from running during a test, so
  "buffered, not yet written" is a state a test can hold and look at without racing
  the writer; explicit durability points (a submit, a job's end, ``wait``) still write
  the database at once, and a stop (SIGTERM) writes the logs.
"""

from __future__ import annotations

import os

from jobs_util import (
    GATED_IMPORT, control, import_spec, info, open_gate, put, read, started_pid, status,
    submit, uploads_dir, wait_status, wait_until,
)

SLOW_FLUSH = "db_flush_seconds = 3600\n"


def job_dirs(agent) -> list[str]:
    try:
        return sorted(os.listdir(agent.state / "jobs"))
    except FileNotFoundError:
        return []


def test_a_finished_import_has_no_directory_and_still_serves_its_files(agent_factory):
    # One job per file (a fileset's import has an output, fileset.json, so a directory).
    agent = agent_factory(config="settle_seconds = 0.3\nimport_grouping = \"file\"\n").start()
    job = submit(agent, "imp", import_spec(agent, "exp/a.tif", b"pixels"))
    assert read(job / "wait") == "success\n"
    # An upload written through the mount gets its import the same way.
    (agent.uploads / "b.tif").write_bytes(b"more pixels")
    wait_until(lambda: os.getxattr(agent.uploads / "b.tif", "user.fsagent.state")
               == b"complete")
    uploaded = agent.jobs / os.getxattr(agent.uploads / "b.tif", "user.fsagent.job").decode()
    assert read(uploaded / "wait") == "success\n"
    for j in (job, uploaded):
        assert sorted(os.listdir(j)) == sorted(["spec", "status", "progress", "message",
                                                "error", "info.json", "priority", "control",
                                                "wait", "log", "outputs"])
        assert status(j) == "success" and os.listdir(j / "outputs") == []
        assert info(j)["Outputs"] == [] and info(j)["State"] == "Success"
        log = read(j / "log")
        assert "started (import)" in log and "recorded " in log and "success: " in log
        assert os.stat(j / "log").st_size == len(log.encode())
    assert job_dirs(agent) == []
    agent.stop()  # a clean stop writes kept logs; these were not kept
    assert job_dirs(agent) == []
    agent.start()
    assert status(job) == "success" and read(job / "log") == ""  # memory only: gone


def test_log_lines_are_batched_and_read_through_the_mount_at_once(agent_factory):
    agent = agent_factory(config=SLOW_FLUSH).start()
    spec = import_spec(agent, "c.txt", b"1234")
    put(agent, "c.txt", b"12345")  # changed since "verified": the import fails
    job = submit(agent, "bad", spec)
    assert read(job / "wait") == "failure\n"
    log = read(job / "log")
    assert "started (import)" in log and "failure: 'c.txt' is 5 bytes now" in log
    # A failed job's log is kept, but written with the next batch, not line by line.
    assert not (agent.state / "jobs" / "bad" / "log").exists()
    control(job, "retry")
    assert read(job / "wait") == "failure\n"
    log = read(job / "log")
    assert log.count("started (import)") == 2 and "retry: failure -> pending" in log
    assert agent.stop() == 0  # the shutdown checkpoint writes the batch
    on_disk = (agent.state / "jobs" / "bad" / "log").read_text()
    assert on_disk == log
    agent.start()
    assert read(job / "log") == log


def test_command_output_and_buffered_lines_read_in_order(agent_factory):
    agent = agent_factory(config=SLOW_FLUSH + 'import_command = ["sh", "-c", '
                          '"echo from the command; exit 3"]\n').start()
    job = submit(agent, "cmd", import_spec(agent, "f.txt"))
    assert read(job / "wait") == "failure\n"
    log = read(job / "log")
    order = [log.index(s) for s in ("started (import)", "running import_command",
                                    "\nfrom the command\n", "failure: import_command")]
    assert order == sorted(order), log
    # The command wrote into the file; the failure line is still only in memory.
    on_disk = (agent.state / "jobs" / "cmd" / "log").read_text()
    assert "from the command" in on_disk and "failure:" not in on_disk
    assert log.startswith(on_disk)


def test_a_kill9_keeps_job_states_and_loses_only_unwritten_log_lines(agent_factory):
    agent = agent_factory(config=SLOW_FLUSH + GATED_IMPORT).start()
    # Not gated (task t2): its command exits at once, after the lines before it were
    # written (the command's output goes into the file); the rest stays in memory.
    ok = submit(agent, "ok", import_spec(agent, "ok.dat", task="t2"))
    assert read(ok / "wait") == "success\n"
    assert "success: imported ok.dat" in read(ok / "log")
    spec = import_spec(agent, "bad.dat", b"1234", task="t2")
    put(agent, "bad.dat", b"12345")
    bad = submit(agent, "bad", spec)
    assert read(bad / "wait") == "failure\n"
    running = submit(agent, "run", import_spec(agent, "run.dat"))
    first_pid = started_pid(agent, "run.dat")  # its command runs: lines before it written
    assert "failure:" in read(bad / "log")  # buffered, not written: lost in the crash
    agent.kill9()
    os.kill(first_pid, 9)
    (uploads_dir(agent) / "run.dat.pid").unlink()
    agent.start()
    # The states are the database's, and right.
    assert status(ok) == "success" and info(ok)["Content"]["Path"] == "ok.dat"
    assert status(bad) == "failure" and read(bad / "error").startswith("3 ")
    # What the logs show: what was written before the crash. "bad" failed before any
    # command ran, so all its lines were in memory: its log is empty now. "ok" shows
    # the lines up to its command, not its end. The running job shows the lines up to
    # its command, then the requeue at start-up.
    assert read(bad / "log") == ""
    log = read(ok / "log")
    assert "running import_command" in log and "success:" not in log
    log = read(running / "log")
    assert "running import_command" in log and "interrupted" in log
    assert log.index("running import_command") < log.index("interrupted")
    assert job_dirs(agent) == ["ok", "run"]
    started_pid(agent, "run.dat", other_than=first_pid)
    open_gate(agent, "run.dat")
    wait_status(running, "success")


def test_outputs_make_a_directory_with_the_log_in_it(agent_factory):
    agent = agent_factory().start()
    put(agent, "f.txt", b"abc")
    job = submit(agent, "zip", {"type": "archive", "paths": ["f.txt"]})
    assert read(job / "wait") == "success\n"
    # The log is written with the next batch (db_flush_seconds): it may not be there yet.
    assert set(os.listdir(agent.state / "jobs" / "zip")) in ({"outputs"}, {"outputs", "log"})
    assert os.listdir(agent.state / "jobs" / "zip" / "outputs") == ["archive.zip"]
    log = read(job / "log")
    wait_until(lambda: (agent.state / "jobs" / "zip" / "log").exists()
               and (agent.state / "jobs" / "zip" / "log").read_text() == log,
               what="the archive's log to be written with the next batch")


def test_directories_of_jobs_that_no_longer_exist_are_removed_at_start(agent_factory):
    agent = agent_factory()
    ghost = agent.state / "jobs" / "ghost" / "outputs"
    ghost.mkdir(parents=True)
    (ghost / "archive.zip").write_bytes(b"left by a crash after an eviction")
    agent.start()
    wait_until(lambda: job_dirs(agent) == [], what="the orphan directory to be removed")
    assert "ghost" not in os.listdir(agent.jobs)


def test_evicting_many_jobs_without_directories(agent_factory):
    agent = agent_factory(config="job_history = 10\n").start()
    names = [f"e{i:03d}" for i in range(150)]
    for name in names:
        submit(agent, name, import_spec(agent, f"{name}.dat", task=name))

    def all_ended():
        jobs = agent.status()["jobs"]
        return jobs["counts"]["success"] + jobs["evicted"] == len(names)

    wait_until(all_ended, what="every job to succeed (or be evicted after it did)")
    assert 0 < len(os.listdir(agent.jobs)) <= 10 and agent.status()["jobs"]["evicted"] >= 140
    assert job_dirs(agent) == []
