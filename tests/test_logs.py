"""Logs: journald's format when stderr is the journal, one line per event that matters."""

from __future__ import annotations

import logging
import os
import re
import signal

from conftest import PATIENCE
from fsagent.service.logs import JournalFormatter, stderr_is_journal

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _record(level, msg, exc_info=None):
    return logging.LogRecord("fsagent.x", level, __file__, 1, msg, (), exc_info)


def test_journal_format_has_priority_prefix_on_every_line():
    f = JournalFormatter()
    assert f.format(_record(logging.INFO, "mounted")) == "<6>fsagent.x: mounted"
    assert f.format(_record(logging.WARNING, "w")).startswith("<4>")
    assert f.format(_record(logging.ERROR, "e")).startswith("<3>")
    assert f.format(_record(logging.DEBUG, "d")).startswith("<7>")
    assert f.format(_record(logging.CRITICAL, "c")).startswith("<2>")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys
        text = f.format(_record(logging.ERROR, "failed", sys.exc_info()))
    lines = text.split("\n")
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines
    assert "RuntimeError: boom" in lines[-1]


def test_journal_stream_must_be_our_stderr(tmp_path):
    path = tmp_path / "err"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        assert stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        # Inherited by a process whose stderr went elsewhere: not the journal.
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not stderr_is_journal(stream, {})


def _agent_with_stderr_as_journal(agent_factory, level="info"):
    agent = agent_factory(args=["--log-level", level])
    # start() opens agent-0.log with O_TRUNC: the same inode we announce here.
    path = agent.base / "agent-0.log"
    path.touch()
    st = os.stat(path)
    agent.env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    return agent.start()


def test_under_the_journal_lines_carry_priorities_and_no_timestamps(agent_factory):
    agent = _agent_with_stderr_as_journal(agent_factory)
    assert agent.stop() == 0
    lines = agent.log().splitlines()
    assert lines, "no log at all"
    for line in lines:
        assert re.match(r"^<[0-7]>\S+: ", line), line
        assert not TIMESTAMP.search(line), line
    assert f"<6>fsagent.agent: mounted at {agent.mount}" in agent.log()
    assert "<6>fsagent.agent: SIGTERM: finishing in-flight requests" in agent.log()
    assert f"<6>fsagent.agent: unmounted {agent.mount}; stopped cleanly" in agent.log()


def test_outside_the_journal_lines_are_timestamped(agent_factory):
    agent = agent_factory(args=["--log-level", "info"],
                          env={"JOURNAL_STREAM": "1:1"}).start()
    assert agent.stop() == 0
    for line in agent.log().splitlines():
        assert TIMESTAMP.match(line) and not line.startswith("<"), line


def test_no_per_request_noise_at_info(agent_factory):
    agent = _agent_with_stderr_as_journal(agent_factory)
    before = agent.log()
    for _ in range(100):
        (agent.mount / "status").read_bytes()
        (agent.mount / "metrics").read_bytes()
        os.listdir(agent.mount)
        os.stat(agent.mount / "uploads")
    # 400 opens, reads, lookups and listings later, not one line more.
    assert agent.log() == before
    agent.signal(signal.SIGTERM)
    assert agent.proc.wait(PATIENCE) == 0
    assert len(agent.log().splitlines()) == len(before.splitlines()) + 2  # stop, stopped


def test_an_upload_and_its_import_log_one_line_per_event_not_per_write(agent_factory):
    import hashlib
    from conftest import wait_for
    agent = _agent_with_stderr_as_journal(agent_factory)
    before = agent.log().splitlines()
    data = os.urandom(8 << 20)
    path = agent.uploads / "big.bin"
    with open(path, "wb") as f:
        os.setxattr(path, "user.fsagent.sha256", hashlib.sha256(data).hexdigest().encode())
        for i in range(0, len(data), 64 << 10):
            f.write(data[i:i + (64 << 10)])
            f.flush()  # 128 separate write(2) calls, each one FUSE write at least
    job = wait_for(lambda: os.getxattr(path, "user.fsagent.job").decode(), what="the import")
    wait_for(lambda: (agent.jobs / job / "status").read_text() == "success\n",
             what="the import to succeed")
    new = agent.log().splitlines()[len(before):]
    expected = [
        rf"<6>fsagent\.uploads\._component: upload complete: big\.bin \({len(data)} bytes, "
        r"sha256 [0-9a-f]{64}\)",
        rf"<6>fsagent\.jobs\._engine: job {job} \(import\): submitted -> pending, priority 0, "
        rf"owner uid {os.getuid()}",
        rf"<6>fsagent\.jobs\._engine: job {job} \(import\): pending -> running",
        rf"<6>fsagent\.jobs\._engine: job {job} \(import\): running -> success",
    ]
    assert len(new) == len(expected), new
    for line, pattern in zip(new, expected):
        assert re.fullmatch(pattern, line), (line, pattern)
