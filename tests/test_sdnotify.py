"""sd_notify: the protocol on a socket the test owns, and the agent under a fake systemd.

The fake service manager is a datagram socket bound by the test; the agent gets its
address in ``NOTIFY_SOCKET`` exactly as systemd would pass it.
"""

from __future__ import annotations

import datetime
import signal
import sys
import socket
import statistics
import threading
import time
import uuid

import pytest

from conftest import PATIENCE
from fsagent.service.sdnotify import Notifier


class FakeServiceManager:
    """Receives sd_notify datagrams on a socket; records (monotonic time, fields)."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append((time.monotonic(), fields))

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in list(self.messages) if key in m]

    def wait_for(self, key: str, timeout: float = PATIENCE, after: float = 0.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [(t, m) for t, m in self.with_key(key) if t >= after]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def pings(self, start: float, end: float) -> list[float]:
        return [t for t, m in self.with_key("WATCHDOG") if start <= t < end]


@pytest.fixture
def manager():
    m = FakeServiceManager(f"@fsagent-test-{uuid.uuid4().hex}")
    yield m
    m.close()


def _env(manager, **extra) -> dict:
    return {"NOTIFY_SOCKET": manager.address, **extra}


# -- the protocol on its own -----------------------------------------------------------------


def test_notify_to_a_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    m = FakeServiceManager(path)
    try:
        n = Notifier(path)
        assert n.ready("serving /x: 0 open files")
        assert n.watchdog()
        assert n.stopping()
        m.wait_for("STOPPING")
        fields = [f for _, f in m.messages]
        assert fields[0] == {"READY": "1", "STATUS": "serving /x: 0 open files"}
        assert fields[1] == {"WATCHDOG": "1"}
        assert fields[2] == {"STOPPING": "1"}
    finally:
        m.close()


def test_notify_to_an_abstract_socket(manager):
    assert Notifier(manager.address).status("hello")
    assert manager.wait_for("STATUS")[1] == {"STATUS": "hello"}


def test_missing_notify_socket_is_a_no_op():
    n = Notifier.from_environment({})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    assert n.watchdog_interval is None
    assert n.sent == 0


def test_a_vanished_service_manager_is_not_an_error(tmp_path):
    n = Notifier(str(tmp_path / "nobody-listens"))
    assert n.ready() is False  # logged at DEBUG, never raised


def test_multi_line_or_malformed_assignments_are_refused():
    n = Notifier("@x")
    with pytest.raises(ValueError):
        n.notify("STATUS=two\nlines")
    with pytest.raises(ValueError):
        n.notify("READY")


def test_watchdog_interval_is_half_the_deadline_and_only_for_our_pid():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000"}
    assert Notifier.from_environment(env, pid=42).watchdog_interval == 1.5
    assert Notifier.from_environment(dict(env, WATCHDOG_PID="42"), pid=42).watchdog_interval == 1.5
    # A child that inherited the variables must not feed its parent's watchdog.
    assert Notifier.from_environment(dict(env, WATCHDOG_PID="43"), pid=42).watchdog_interval is None
    assert Notifier.from_environment({"WATCHDOG_USEC": "3000000"}).watchdog_interval is None
    assert Notifier.from_environment(dict(env, WATCHDOG_USEC="0")).watchdog_interval is None


# -- the agent under a fake systemd ----------------------------------------------------------


def test_ready_only_once_the_mount_answers(agent_factory, manager):
    # No readiness wait of the fixture's own: READY=1 alone must imply a live mount.
    agent = agent_factory(env=_env(manager)).start(wait=False)
    when, fields = manager.wait_for("READY")
    # At the moment READY=1 arrived, the mount already served this process's status.
    assert agent.status()["pid"] == agent.proc.pid
    assert fields["STATUS"].startswith(f"serving {agent.mount}: ")
    assert len(manager.with_key("READY")) == 1
    assert not manager.with_key("WATCHDOG")  # no WATCHDOG_USEC: no pings


def test_status_line_carries_live_counts(agent_factory, manager):
    agent = agent_factory(env=_env(manager)).start()
    manager.wait_for("READY")
    t0 = time.monotonic()
    files = [open(agent.mount / "status", "rb") for _ in range(3)]
    try:
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            if any("3 open files" in m["STATUS"] for _, m in manager.with_key("STATUS")
                   if _ >= t0):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"STATUS never showed 3 open files: {manager.messages}")
    finally:
        for f in files:
            f.close()


def test_watchdog_pings_at_half_the_deadline(agent_factory, manager):
    agent = agent_factory(env=_env(manager, WATCHDOG_USEC="1000000")).start()
    manager.wait_for("READY")
    start = time.monotonic()
    time.sleep(3.2)
    pings = manager.pings(start, time.monotonic())
    assert 5 <= len(pings) <= 8, pings  # one every 0.5 s
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert 0.35 < statistics.median(gaps) < 0.65, gaps
    assert max(gaps) < 1.0, gaps  # never late enough for systemd to kill us
    assert agent.status()["pid"] == agent.proc.pid


def test_watchdog_pings_stop_while_the_loop_is_blocked(agent_factory, manager):
    agent = agent_factory(env=_env(manager, WATCHDOG_USEC="600000",
                                   FSAGENT_DEBUG_STALL_SECONDS="3")).start()
    manager.wait_for("READY")
    manager.wait_for("WATCHDOG", after=time.monotonic())
    sent = time.monotonic()
    agent.signal(signal.SIGUSR2)
    deadline = time.monotonic() + PATIENCE
    while "blocking the event loop" not in agent.log():
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.02)
    blocked_from = time.monotonic()
    while "event loop unblocked" not in agent.log():
        assert time.monotonic() < blocked_from + PATIENCE, agent.log()
        time.sleep(0.02)
    unblocked = time.monotonic()
    # The loop was blocked for the whole 3 s, by the agent's own clock (its log lines).
    stamps = [datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
              for line in agent.log().splitlines()
              if "blocking the event loop" in line or "event loop unblocked" in line]
    assert len(stamps) == 2 and (stamps[1] - stamps[0]).total_seconds() > 2.9, stamps
    # Not one ping while the loop was blocked, though the deadline (0.6 s) passed many
    # times. The window stays inside the 3 s stall however late this process notices
    # its start or end: the stall starts after the signal was sent and lasts 3 s, so it
    # ends after sent + 3; it starts before its log line is seen, and a ping sent just
    # before that may still be in flight.
    assert manager.pings(blocked_from + 0.1, sent + 2.9) == [], (
        [t - blocked_from for t in manager.pings(blocked_from - 1, unblocked + 1)])
    # And they come back once the loop turns again.
    manager.wait_for("WATCHDOG", after=unblocked)
    assert agent.status()["pid"] == agent.proc.pid


def test_the_debug_stall_is_off_by_default(agent_factory, manager):
    agent = agent_factory(env=_env(manager, WATCHDOG_USEC="600000")).start()
    manager.wait_for("READY")
    # Without FSAGENT_DEBUG_STALL_SECONDS, SIGUSR2 keeps its default action: terminate.
    agent.signal(signal.SIGUSR2)
    assert agent.proc.wait(PATIENCE) == -signal.SIGUSR2
    assert "blocking the event loop" not in agent.log()


def test_stopping_at_sigterm(agent_factory, manager):
    agent = agent_factory(env=_env(manager)).start()
    manager.wait_for("READY")
    sent = time.monotonic()
    agent.signal(signal.SIGTERM)
    when, fields = manager.wait_for("STOPPING", after=sent)
    assert fields["STOPPING"] == "1" and "SIGTERM" in fields["STATUS"]
    assert agent.proc.wait(PATIENCE) == 0
    assert len(manager.with_key("STOPPING")) == 1


def test_status_line_gathers_every_components_counts(tmp_path):
    from fsagent.agent import Agent
    from fsagent.component import Component
    from fsagent.config import load_config
    from fsagent.service.liveness import _status_line

    class Uploads(Component):
        name = "uploads"

        def counts(self):
            return {"uploads receiving": 2}

    class Jobs(Component):
        name = "jobs"

        def counts(self):
            return {"jobs running": 1, "jobs queued": 4}

    class Broken(Component):
        name = "broken"

        def counts(self):
            raise RuntimeError("bug")

    agent = Agent(load_config(None, {"mount": "m", "state_dir": "s"}, cwd=tmp_path))
    agent.components = [Uploads(agent), Jobs(agent)]
    assert _status_line(agent) == (f"serving {tmp_path / 'm'}: uploads receiving 2, "
                                   "jobs running 1, jobs queued 4, starting")
    agent.components.append(Broken(agent))
    assert _status_line(agent) == f"serving {tmp_path / 'm'}"  # logged, not raised


async def test_status_line_follows_uploads_jobs_and_monitors(agent_factory, manager, tmp_path):
    from jobs_util import GATED_IMPORT, import_spec, open_gate, submit
    from rpcutil import create, open_client
    from fsagent.service.liveness import STATUS_INTERVAL
    data = tmp_path / "data"
    data.mkdir()
    # No readiness wait of the fixture's: its reads of MOUNT/status would be open files.
    agent = agent_factory(config=GATED_IMPORT, args=["--export-root", str(data)],
                          env=_env(manager)).start(wait=False)
    _, ready = manager.wait_for("READY")
    assert ready["STATUS"] == (f"serving {agent.mount}: uploads receiving 0, monitors 0, "
                               "jobs running 0, jobs pending 0, 0 open files")
    lags = []

    def shows(*parts: str) -> None:
        """The next STATUS= after now carries ``parts``; note how long it took."""
        changed = time.monotonic()
        deadline = changed + PATIENCE
        while time.monotonic() < deadline:
            for t, m in manager.with_key("STATUS"):
                if t >= changed and all(p in m["STATUS"] for p in parts):
                    lags.append(t - changed)
                    return
            time.sleep(0.02)
        raise AssertionError(f"no STATUS with {parts}: {manager.messages[-3:]}")

    writer = open(agent.uploads / "a.bin", "wb")
    writer.write(b"x" * 1000)
    writer.flush()
    shows("uploads receiving 1", "1 open files")
    job = submit(agent, "j", import_spec(agent, "j.dat"))
    shows("jobs running 1")
    async with open_client(agent.socket) as c:
        await create(c, data)
        shows("monitors 1")
    writer.close()
    shows("uploads receiving 0")
    open_gate(agent, "j.dat")
    shows("jobs running 0")
    assert (job / "status").read_text() == "success\n"
    # Re-sent only on change, within one STATUS_INTERVAL (plus a busy machine's slack).
    assert max(lags) < STATUS_INTERVAL + 1.5, lags


AUDITED_AGENT = r'''
import os, runpy, sys
mount = os.path.realpath(os.environ["AUDIT_MOUNT"])
def hook(event, args):
    if event == "open" and not isinstance(args[0], int):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path == os.devnull:
            os.write(2, b"AUDIT-OK\n")
        elif path == mount or path.startswith(mount + "/"):
            os.write(2, f"OPENED-OWN-MOUNT {path}\n".encode())
sys.addaudithook(hook)
open(os.devnull).close()  # proves the hook sees opens
sys.argv = ["fsagent", *sys.argv[1:]]
runpy.run_module("fsagent", run_name="__main__", alter_sys=True)
'''


def test_the_agent_never_opens_a_file_on_its_own_mount(agent_factory, manager, tmp_path):
    """Killed with a descriptor open on its own mount, the agent's exit would close it
    with a FLUSH only the dying agent could answer: the process hangs in uninterruptible
    sleep for good and the mount stays wedged. So the readiness and watchdog probes,
    and everything else, must reach the mount without opening files there. Every open
    the agent makes is audited (sys.addaudithook) from start-up through watchdog ticks
    to shutdown."""
    wrapper = tmp_path / "audited_agent.py"
    wrapper.write_text(AUDITED_AGENT)
    agent = agent_factory(env=_env(manager, WATCHDOG_USEC="400000",
                                   AUDIT_MOUNT=str(tmp_path / "mnt")))
    argv = agent.argv
    agent.argv = lambda: [sys.executable, str(wrapper), *argv()[3:]]
    agent.start(wait=False)
    manager.wait_for("READY")
    start = time.monotonic()
    time.sleep(1.5)
    assert len(manager.pings(start, time.monotonic())) >= 3  # probes ran
    assert agent.status()["pid"] == agent.proc.pid
    assert agent.stop() == 0
    log = agent.log()
    assert "AUDIT-OK" in log
    assert "OPENED-OWN-MOUNT" not in log, log
