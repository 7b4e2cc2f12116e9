"""Logs: journald's format when stderr is the journal, one line per event that matters."""

from __future__ import annotations

import logging
import os
import re
import signal

from fsagent.logs import JournalFormatter, stderr_is_journal

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
    assert agent.proc.wait(10) == 0
    assert len(agent.log().splitlines()) == len(before.splitlines()) + 2  # stop, stopped
