"""Shared fixtures: a real agent in a subprocess on a temporary mount.

``agent_factory(...)`` starts ``fsagent run`` as a child process with its own mount
point and state dir, waits until the mount is served *by that process* (the
``status`` file carries its pid: after a kill -9 the kernel may still answer stat
from its caches, so a mere ``stat`` proves nothing), and always tears it down:
SIGTERM, then SIGKILL, then a lazy unmount, even when the test failed. An agent that
does not die (a thread blocked on a request nobody will answer) gets its FUSE
connection aborted, so no process, pytest's own temp clean-up included, can hang on a
dead mount in a later run.

Waiting: the CI machine may be busy (two cores, other suites running at once), so a
test never assumes something happened after a fixed sleep and never reads a value
another process writes before that value is whole. It polls (``wait_for``) for the
complete value, with a deadline (``PATIENCE``) generous enough that only a real fault
reaches it: a deadline bounds how long a broken run takes, it is not what a test checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsagent.service.mountpoint import abort_connection, is_mount_point, lazy_unmount

FSAGENT = [sys.executable, "-m", "fsagent"]

# Seconds to wait for something that normally takes well under one: start-up, a state
# change, a file another process writes. Only a fault should ever use it up.
PATIENCE = 60.0


class AgentProcess:
    def __init__(self, base: Path, *, config: str | None = None, args: list[str] = (),
                 mount: Path | None = None, state: Path | None = None,
                 env: dict | None = None):
        self.base = base
        self.mount = mount or base / "mnt"
        self.state = state or base / "state"
        self.config_path = None
        self.extra_args = list(args)
        self.env = env
        if config is not None:
            self.config_path = base / "fsagent.toml"
            self.config_path.write_text(config)
        self.proc: subprocess.Popen | None = None
        self.log_path = base / f"agent-{time.monotonic_ns()}.log"
        self.logs: list[Path] = []

    @property
    def socket(self) -> Path:
        return self.state / "rpc.sock"

    @property
    def uploads(self) -> Path:
        return self.mount / "uploads"

    @property
    def jobs(self) -> Path:
        return self.mount / "jobs"

    def argv(self) -> list[str]:
        argv = FSAGENT + ["run", "--mount", str(self.mount), "--state-dir", str(self.state),
                          "--log-level", "debug"]
        if self.config_path:
            argv += ["--config", str(self.config_path)]
        return argv + self.extra_args

    def start(self, timeout: float = PATIENCE, *, wait: bool = True) -> AgentProcess:
        """Start the agent; with ``wait=False`` return at once (readiness is the test's)."""
        self.log_path = self.base / f"agent-{len(self.logs)}.log"
        self.logs.append(self.log_path)
        log = open(self.log_path, "wb")
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.status()["pid"] == self.proc.pid:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready after {timeout}s:\n{self.log()}")

    def status(self) -> dict:
        return json.loads((self.mount / "status").read_text())

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = PATIENCE) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        try:
            self.proc.wait(PATIENCE / 2)
        except subprocess.TimeoutExpired:
            # Stuck in uninterruptible sleep on a FUSE request (possibly on its own
            # mount): aborting the connection fails that request and lets it die.
            abort_connection(self.mount)
            self.proc.wait(PATIENCE / 2)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill9()
        if is_mount_point(self.mount):
            abort_connection(self.mount)
            lazy_unmount(self.mount)


@pytest.fixture
def agent_factory(tmp_path):
    """Make (not start) agents: ``agent_factory(config=..., args=[...]).start()``."""
    made: list[AgentProcess] = []

    def make(**kwargs) -> AgentProcess:
        a = AgentProcess(tmp_path, **kwargs)
        made.append(a)
        return a

    yield make
    failures = []
    for a in made:
        try:
            a.cleanup()
        except Exception as e:  # keep cleaning the others
            failures.append(e)
    if failures:
        raise failures[0]


@pytest.fixture
def agent(agent_factory) -> AgentProcess:
    """A running agent with the default configuration."""
    return agent_factory().start()


def run_fsagent(*args: str, cwd: Path | None = None,
                timeout: float = PATIENCE) -> subprocess.CompletedProcess:
    """Run the CLI to completion (for commands that exit)."""
    return subprocess.run(FSAGENT + list(args), capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


@pytest.fixture
def cli():
    """``cli("run", "--mount", ...)`` runs the fsagent command to completion."""
    return run_fsagent


# -- a second, unprivileged user (multi-user lab machines) --------------------------------------

OTHER_USER = "fsagent-test"


class OtherUser:
    """An unprivileged local user; ``run(argv)`` runs a command as that user."""

    def __init__(self, name: str):
        import pwd
        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, pw.pw_uid, pw.pw_gid

    def run(self, *argv: str, timeout: float = PATIENCE,
            **kwargs) -> subprocess.CompletedProcess:
        # setpriv changes uid/gid and drops root's supplementary groups: nothing inherited.
        return subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
             "--", *argv], capture_output=True, text=True, timeout=timeout, **kwargs)

    def run_in_groups(self, groups: list[int], *argv: str, timeout: float = PATIENCE,
                      **kwargs) -> subprocess.CompletedProcess:
        """``run``, with ``groups`` as the only supplementary groups."""
        return subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
             f"--groups={','.join(map(str, groups))}", "--", *argv],
            capture_output=True, text=True, timeout=timeout, **kwargs)


def _ensure_user(name: str) -> None:
    import pwd
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    result = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                             "/usr/sbin/nologin", name], capture_output=True, text=True)
    # 9: created meanwhile by another test run (other worktrees share this machine).
    if result.returncode not in (0, 9):
        raise RuntimeError(f"useradd {name}: {result.stderr.strip()}")


@pytest.fixture(scope="session")
def other_user() -> OtherUser:
    """A second local user (created once, idempotently; needs root, as `make test` has)."""
    _ensure_user(OTHER_USER)
    return OtherUser(OTHER_USER)


THIRD_USER = "fsagent-test2"
TEST_GROUP = "fsagent-rpc-test"


@pytest.fixture(scope="session")
def third_user() -> OtherUser:
    """Another unprivileged user, so rules between two ordinary users can be shown."""
    _ensure_user(THIRD_USER)
    return OtherUser(THIRD_USER)


@pytest.fixture(scope="session")
def test_group() -> tuple[str, int]:
    """``(name, gid)`` of a local group nobody is a member of (created once)."""
    import grp
    try:
        return TEST_GROUP, grp.getgrnam(TEST_GROUP).gr_gid
    except KeyError:
        pass
    result = subprocess.run(["groupadd", "--system", TEST_GROUP], capture_output=True,
                            text=True)
    if result.returncode not in (0, 9):  # 9: another test run created it meanwhile
        raise RuntimeError(f"groupadd {TEST_GROUP}: {result.stderr.strip()}")
    return TEST_GROUP, grp.getgrnam(TEST_GROUP).gr_gid


@pytest.fixture
def shared_dir():
    """A directory every user can traverse (pytest's tmp_path is private to root)."""
    import shutil
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="fsagent-shared-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    if not is_mount_point(path / "mnt"):
        shutil.rmtree(path, ignore_errors=True)


def wait_for(predicate, timeout: float = PATIENCE, what: str = "condition",
             interval: float = 0.05):
    """Poll ``predicate`` until it returns something true (returned), or fail.

    ``predicate`` must judge a complete value: reading a file another process writes, it
    returns false for a missing, empty or half-written one rather than raising on it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
