"""The agent process end to end: mount, tree, status, signals, crash restart."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import time

import pytest

from conftest import PATIENCE
from fsagent import __version__
from fsagent.service.mountpoint import abort_connection, is_mount_point


def test_mounts_the_tree(agent):
    assert is_mount_point(agent.mount)
    assert sorted(os.listdir(agent.mount)) == ["filesets.json", "jobs", "jobs.json",
                                               "metrics", "status", "uploads",
                                               "uploads.json"]
    assert stat.S_ISDIR(os.stat(agent.mount / "uploads").st_mode)
    assert stat.S_ISDIR(os.stat(agent.mount / "jobs").st_mode)
    st = os.stat(agent.mount / "status")
    assert stat.S_ISREG(st.st_mode)
    assert st.st_mode & 0o777 == 0o444


def test_status_content(agent):
    status = agent.status()
    assert status["version"] == __version__
    assert status["pid"] == agent.proc.pid
    assert status["mount"] == str(agent.mount)
    assert status["state_dir"] == str(agent.state)
    assert status["socket"] == str(agent.state / "rpc.sock")
    vfs = os.statvfs(agent.state)
    assert abs(status["store_free_bytes"] - vfs.f_bavail * vfs.f_frsize) < 256 * 2**20
    assert status["store_total_bytes"] == vfs.f_blocks * vfs.f_frsize
    first = status["uptime_seconds"]
    time.sleep(0.3)
    assert agent.status()["uptime_seconds"] >= first + 0.25  # rendered fresh on each open


def test_status_size_matches_content_and_partial_reads_are_consistent(agent):
    path = agent.mount / "status"
    with open(path, "rb", buffering=0) as f:
        first = f.read(7)
        time.sleep(0.05)
        rest = f.read()
    whole = first + rest
    assert json.loads(whole)["pid"] == agent.proc.pid  # one snapshot, even across reads
    # The reported size is the rendered size (give or take a digit of uptime), so tools
    # that trust st_size see the whole document.
    assert abs(os.stat(path).st_size - len(whole)) <= 3


def test_status_is_read_only(agent):
    with pytest.raises(PermissionError):
        open(agent.mount / "status", "w")


def test_df_reports_the_store(agent):
    mine, store = os.statvfs(agent.mount), os.statvfs(agent.state)
    assert mine.f_blocks * mine.f_frsize == store.f_blocks * store.f_frsize
    assert abs(mine.f_bavail * mine.f_frsize - store.f_bavail * store.f_frsize) < 256 * 2**20
    out = subprocess.run(["df", "--output=target", str(agent.mount)], capture_output=True,
                         text=True, check=True).stdout
    assert str(agent.mount) in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_exits_zero(agent, signum):
    t0 = time.monotonic()
    agent.signal(signum)
    assert agent.proc.wait(10) == 0
    assert time.monotonic() - t0 < 10
    assert not is_mount_point(agent.mount)
    assert "stopped cleanly" in agent.log()


def test_sigterm_with_a_shell_inside_the_mount(agent):
    # A busy mount (a process with its cwd inside) must not block shutdown.
    sh = subprocess.Popen(["sleep", "30"], cwd=agent.uploads)
    try:
        assert agent.stop() == 0
        assert not is_mount_point(agent.mount)
    finally:
        sh.kill()
        sh.wait()


def test_external_unmount_ends_the_agent_cleanly(agent):
    subprocess.run(["fusermount3", "-u", str(agent.mount)], check=True)
    assert agent.proc.wait(PATIENCE) == 0
    assert not is_mount_point(agent.mount)


def test_restart_after_kill9_on_the_same_mount_point(agent):
    agent.kill9()
    # The kernel keeps a dead mount: it is still listed, and every request fails.
    assert is_mount_point(agent.mount)
    with pytest.raises(OSError) as e:
        os.listdir(agent.mount)
    assert e.value.errno == errno.ENOTCONN
    agent.start()
    status = agent.status()
    assert status["pid"] == agent.proc.pid
    assert status["previous_run_clean"] is False
    assert "stale mount" in agent.log()
    assert sorted(os.listdir(agent.mount)) == ["filesets.json", "jobs", "jobs.json",
                                               "metrics", "status", "uploads",
                                               "uploads.json"]
    assert agent.stop() == 0
    agent.start()
    assert agent.status()["previous_run_clean"] is True


def test_second_agent_on_the_same_state_dir_is_refused(agent, agent_factory, tmp_path):
    other = agent_factory(mount=tmp_path / "mnt2", state=agent.state)
    result = subprocess.run(other.argv(), capture_output=True, text=True,
                            timeout=PATIENCE)
    assert result.returncode == 2
    assert "state_dir" in result.stderr and "in use by another fsagent" in result.stderr
    assert not is_mount_point(tmp_path / "mnt2")
    assert agent.status()["pid"] == agent.proc.pid  # the first one is untouched


def test_second_agent_on_a_live_mount_is_refused(agent, agent_factory, tmp_path):
    other = agent_factory(mount=agent.mount, state=tmp_path / "state2")
    result = subprocess.run(other.argv(), capture_output=True, text=True,
                            timeout=PATIENCE)
    assert result.returncode == 2
    assert "mount: " in result.stderr and "already mounted" in result.stderr
    assert agent.status()["pid"] == agent.proc.pid


def test_aborting_a_hung_connection_releases_blocked_readers(agent):
    """A reader blocked on a server that will never answer (here: SIGSTOPped) is
    released with ENOTCONN by abort_connection, which never touches the mount itself;
    this is what test clean-up and .ci/run rely on after a wedged agent."""
    agent.signal(signal.SIGSTOP)
    try:
        reader = subprocess.Popen(["cat", str(agent.mount / "status")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            reader.wait(1.0)  # blocked on the stopped server
        assert abort_connection(agent.mount)
        assert reader.wait(PATIENCE) != 0
        err = reader.stderr.read()
        assert "connection abort" in err or "not connected" in err, err
    finally:
        agent.signal(signal.SIGCONT)
    with pytest.raises(OSError) as e:
        os.listdir(agent.mount)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert not abort_connection(agent.mount / "uploads")  # not a mount point: nothing done
    agent.proc.wait(PATIENCE)  # the agent sees its session end and shuts down by itself
    assert "FUSE session ended" in agent.log()
