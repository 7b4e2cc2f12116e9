"""The systemd units and ``make install``.

There is no systemd PID 1 in CI, so the units are proven in three ways: the units that
``make install`` writes pass ``systemd-analyze verify`` without a single warning; their
``ExecStartPre=`` and ``ExecStart=`` lines, run the way systemd runs them (``$$`` ->
``$``, ``${STATE_DIRECTORY}`` etc. from the environment, a NOTIFY_SOCKET), clear a stale
mount and bring the agent to READY=1; and every directive is there and commented.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import PATIENCE
from fsagent.config import load_config
from fsagent.service.mountpoint import is_mount_point
from test_sdnotify import FakeServiceManager

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def section(text: str, name: str) -> str:
    m = re.search(rf"^\[{name}\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert m, name
    return m.group(1)


# What a build or a run leaves in a checkout (see .gitignore): not part of the source.
_NOT_SOURCE = {".git", ".venv", "build", ".pytest_cache", ".hypothesis", ".fsagent", "mnt"}


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """A private copy of the source tree for ``make install`` to build in: pip builds in
    the tree it installs from (build/, *.egg-info), so two runs of the suite sharing a
    checkout, or a developer's own build, would collide in the real one."""
    copy = tmp_path_factory.mktemp("source") / "fsagent"

    def ignore(directory, names):
        top = Path(directory) == ROOT
        return {n for n in names if n == "__pycache__" or n.endswith(".egg-info")
                or (top and n in _NOT_SOURCE)}

    shutil.copytree(ROOT, copy, symlinks=True, ignore=ignore)
    return copy


@pytest.fixture(scope="module")
def installed(tmp_path_factory, source_tree):
    """``make install`` into a scratch tree, with the paths the tests can own."""
    base = tmp_path_factory.mktemp("install")
    paths = {"PREFIX": base / "opt", "BINDIR": base / "bin", "SYSCONFDIR": base / "etc",
             "UNITDIR": base / "units", "DOCDIR": base / "doc"}
    result = subprocess.run(["make", "-s", "install"] + [f"{k}={v}" for k, v in paths.items()],
                            cwd=source_tree, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return paths


def test_install_puts_everything_in_place(installed):
    fsagent = installed["BINDIR"] / "fsagent"
    assert os.access(fsagent, os.X_OK)
    version = subprocess.run([fsagent, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("fsagent ")
    etc = installed["SYSCONFDIR"] / "fsagent"
    assert (etc / "fsagent.toml.example").read_text() == (UNITS / "fsagent.toml.example").read_text()
    assert (etc / "fsagent.toml").exists()
    assert (installed["DOCDIR"] / "README.md").exists()
    for unit in ("fsagent.service", "fsagent@.service"):
        text = (installed["UNITDIR"] / unit).read_text()
        assert f"{fsagent} run --config {etc}/" in text
        # Nothing still points at the default locations.
        assert not re.search(r"(?<![\w.-])(/usr/local/bin|/etc/fsagent)/", text), text


def _verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_units_pass_systemd_analyze_verify(installed):
    units = installed["UNITDIR"]
    instance = units / "fsagent@lab1.service"
    if not instance.exists():
        instance.symlink_to("fsagent@.service")
    for unit in (units / "fsagent.service", instance):
        result = _verify(unit)
        # verify exits 0 even for unknown keys or bad values; it must say nothing at all.
        assert result.returncode == 0 and result.stdout + result.stderr == "", (
            result.stdout + result.stderr)


def test_verify_would_catch_a_broken_unit(installed, tmp_path):
    bad = tmp_path / "fsagent-bad.service"
    bad.write_text((installed["UNITDIR"] / "fsagent.service").read_text()
                   .replace("KillMode=mixed", "KillMode=mixd"))
    assert "kill mode" in _verify(bad).stderr


def test_the_unit_has_what_the_issue_asks(installed):
    d = directives((UNITS / "fsagent.service").read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"] and d["KillMode"] == ["mixed"]
    assert d["WatchdogSec"] and d["TimeoutStopSec"]
    assert d["StateDirectory"] == ["fsagent"] and d["RuntimeDirectory"] == ["fsagent"]
    assert d["ExecStartPre"][0].startswith("-") and "fusermount3 -uz" in d["ExecStartPre"][0]
    assert d["DeviceAllow"] == ["/dev/fuse rw"]
    # TimeoutStopSec covers the default shutdown_timeout with room for a checkpoint.
    stop = int(d["TimeoutStopSec"][0].rstrip("s"))
    assert stop >= load_config(None).shutdown_timeout + 30
    for namespaced in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateMounts",
                       "MountFlags", "PrivateDevices", "PrivateUsers", "ProtectKernelTunables"):
        assert namespaced not in d, f"{namespaced} would hide the FUSE mount"


def test_every_directive_is_commented():
    for unit in ("fsagent.service", "fsagent@.service"):
        service = section((UNITS / unit).read_text(), "Service")
        for block in re.split(r"\n\s*\n", service):
            lines = [line for line in block.splitlines() if line.strip()]
            if lines and not lines[0].startswith("["):
                assert lines[0].startswith("#") or unit == "fsagent@.service", (
                    f"{unit}: uncommented block:\n{block}")


def test_the_template_is_the_unit_per_instance():
    single = section((UNITS / "fsagent.service").read_text(), "Service")
    template = section((UNITS / "fsagent@.service").read_text(), "Service")
    expected = (single.replace("/etc/fsagent/fsagent.toml", "/etc/fsagent/%i.toml")
                .replace("StateDirectory=fsagent\n", "StateDirectory=fsagent/%i\n")
                .replace("RuntimeDirectory=fsagent\n", "RuntimeDirectory=fsagent/%i\n"))
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("#")]
    assert strip(template) == strip(expected)
    install = lambda name: section((UNITS / name).read_text(), "Install")
    assert install("fsagent.service") == install("fsagent@.service")


def test_the_production_config_example_is_valid(installed):
    example = UNITS / "fsagent.toml.example"
    config = load_config(example)
    assert config.allow_other is True
    assert config.mount == Path("/srv/fsagent")


def _command(unit_text: str, key: str, env: dict[str, str]) -> list[str]:
    """The argv systemd would run for ``key=`` (one line, no specifiers)."""
    line = directives(unit_text)[key][0].lstrip("-")
    line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line).replace("$$", "$")
    return shlex.split(line)


def _installed_config(installed, mount: Path) -> None:
    (installed["SYSCONFDIR"] / "fsagent" / "fsagent.toml").write_text(
        f'mount = "{mount}"\nlog_level = "info"\n')


def test_exec_start_pre_clears_a_stale_mount(installed, agent_factory, tmp_path):
    dead = agent_factory().start()
    dead.kill9()
    assert is_mount_point(dead.mount)  # dead: every access fails with ENOTCONN
    _installed_config(installed, dead.mount)
    unit = (installed["UNITDIR"] / "fsagent.service").read_text()
    result = subprocess.run(_command(unit, "ExecStartPre", {}), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert not is_mount_point(dead.mount)
    # With nothing mounted it fails, and the "-" prefix tells systemd to carry on.
    again = subprocess.run(_command(unit, "ExecStartPre", {}), capture_output=True, text=True)
    assert again.returncode != 0 and directives(unit)["ExecStartPre"][0].startswith("-")


def test_exec_start_runs_like_under_systemd(installed, tmp_path):
    mount, state, runtime = tmp_path / "mnt", tmp_path / "state", tmp_path / "run"
    runtime.mkdir()
    _installed_config(installed, mount)
    unit = (installed["UNITDIR"] / "fsagent.service").read_text()
    manager = FakeServiceManager(f"@fsagent-unit-{uuid.uuid4().hex}")
    env = {"STATE_DIRECTORY": str(state), "RUNTIME_DIRECTORY": str(runtime)}
    proc = subprocess.Popen(
        _command(unit, "ExecStart", env), stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, NOTIFY_SOCKET=manager.address, WATCHDOG_USEC="2000000", **env))
    try:
        manager.wait_for("READY")
        manager.wait_for("WATCHDOG")
        status = (mount / "status").read_text()
        assert f'"pid": {proc.pid}' in status and str(runtime / "rpc.sock") in status
        assert (state / "fsagent.db").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(PATIENCE) == 0
        manager.wait_for("STOPPING")
        assert not is_mount_point(mount)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if is_mount_point(mount):
            subprocess.run(["fusermount3", "-uz", str(mount)])
        manager.close()


def test_upgrade_keeps_the_config_and_replaces_the_units(installed, source_tree):
    conf = installed["SYSCONFDIR"] / "fsagent" / "fsagent.toml"
    conf.write_text('mount = "/srv/mine"\n')
    unit = installed["UNITDIR"] / "fsagent.service"
    unit.write_text("stale\n")
    result = subprocess.run(["make", "-s", "install"] + [f"{k}={v}" for k, v in installed.items()],
                            cwd=source_tree, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert conf.read_text() == 'mount = "/srv/mine"\n'
    assert "Type=notify" in unit.read_text()
