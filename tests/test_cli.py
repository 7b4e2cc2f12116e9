"""The command line: help, and every configuration error as one line + exit 2."""

from __future__ import annotations

import os

import pytest

from fsagent.service.mountpoint import is_mount_point


def test_help_lists_commands_and_flags(cli):
    top = cli("--help")
    assert top.returncode == 0 and "run" in top.stdout
    run = cli("run", "--help")
    assert run.returncode == 0
    for flag in ("--config", "--mount", "--state-dir", "--socket", "--log-level"):
        assert flag in run.stdout


def test_version(cli):
    from fsagent import __version__
    assert cli("--version").stdout.strip() == f"fsagent {__version__}"


def _assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


CASES = {
    "unknown key": ("setle_seconds = 3\n", ["setle_seconds", "unknown setting"]),
    "bad log level": ('log_level = "loud"\n', ["log_level", "loud"]),
    "bad integer": ('worker_threads = "many"\n', ["worker_threads", "integer"]),
    "integer too small": ("worker_threads = 0\n", ["worker_threads", "at least 1"]),
    "bool for integer": ("worker_threads = true\n", ["worker_threads", "integer"]),
    "bad number": ('shutdown_timeout = "soon"\n', ["shutdown_timeout", "number"]),
    "bad bool": ('allow_other = "perhaps"\n', ["allow_other", "true or false"]),
    "mount not a string": ("mount = 5\n", ["mount", "path"]),
    "invalid toml": ("mount = \n", ["config", "not valid TOML"]),
    "state inside mount": ('mount = "m"\nstate_dir = "m/state"\n', ["state_dir", "inside"]),
    "ca_file missing": ('[repository]\nca_file = "nope.pem"\n',
                        ["repository.ca_file", "nope.pem", "not a readable PEM"]),
    "ca_file not PEM": ('[repository]\nca_file = "c.toml"\n',
                        ["repository.ca_file", "c.toml", "not a readable PEM"]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_config_is_one_line_and_exit_2(cli, tmp_path, case):
    text, words = CASES[case]
    (tmp_path / "c.toml").write_text(text)
    result = cli("run", "--config", str(tmp_path / "c.toml"), cwd=tmp_path)
    _assert_one_line_error(result, *words)
    assert not (tmp_path / "m").exists() or not is_mount_point(tmp_path / "m")
    assert not is_mount_point(tmp_path / "mnt")


def test_missing_config_file(cli, tmp_path):
    _assert_one_line_error(cli("run", "--config", str(tmp_path / "nope.toml")), "config",
                           "no such file")


def test_bad_flag_value(cli, tmp_path):
    result = cli("run", "--log-level", "loud", cwd=tmp_path)
    _assert_one_line_error(result, "--log-level")


def test_mount_point_is_a_file(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = cli("run", "--mount", str(tmp_path / "afile"), "--state-dir",
                 str(tmp_path / "s"), cwd=tmp_path)
    _assert_one_line_error(result, "mount:", "not a directory")
    assert not is_mount_point(tmp_path / "afile")


def test_mount_point_not_empty(cli, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "data.tif").write_text("x")
    result = cli("run", "--mount", str(tmp_path / "full"), "--state-dir",
                 str(tmp_path / "s"), cwd=tmp_path)
    _assert_one_line_error(result, "mount:", "not empty")
    assert not is_mount_point(tmp_path / "full")


def test_mount_point_under_a_file(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = cli("run", "--mount", str(tmp_path / "afile" / "mnt"), "--state-dir",
                 str(tmp_path / "s"), cwd=tmp_path)
    _assert_one_line_error(result, "mount:")


def test_state_dir_unusable(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = cli("run", "--mount", str(tmp_path / "m"), "--state-dir",
                 str(tmp_path / "afile"), cwd=tmp_path)
    _assert_one_line_error(result, "state_dir:")
    assert not is_mount_point(tmp_path / "m")


def test_flags_override_config_and_config_paths_are_relative_to_the_file(agent_factory,
                                                                         tmp_path):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "c.toml").write_text('mount = "from-config"\nlog_level = "warning"\n')
    from fsagent.config import load_config
    cfg = load_config(conf_dir / "c.toml", {"log_level": "debug"}, cwd=tmp_path)
    assert cfg.mount == conf_dir / "from-config"
    assert cfg.log_level == "debug"
    assert cfg.state_dir == tmp_path / ".fsagent"
    assert cfg.socket_path == tmp_path / ".fsagent" / "rpc.sock"


def test_config_prints_the_resolved_settings(cli, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('mount = "m"\nallow_other = true\nmetrics_listen = "127.0.0.1:9464"\n')
    one = cli("config", "--config", str(conf), "mount")
    assert one.returncode == 0 and one.stdout == f"{tmp_path / 'm'}\n"
    assert cli("config", "--config", str(conf), "socket").stdout == "\n"  # unset: empty
    full = cli("config", "--config", str(conf))
    assert full.returncode == 0
    import tomllib
    parsed = tomllib.loads(full.stdout)  # the output is itself a valid config
    assert parsed["allow_other"] is True and parsed["mount"] == str(tmp_path / "m")
    import dataclasses
    from fsagent.config import load_config
    (tmp_path / "again.toml").write_text(full.stdout)
    assert load_config(tmp_path / "again.toml") == dataclasses.replace(
        load_config(conf), config_file=tmp_path / "again.toml")


def test_config_errors_are_one_line(cli, tmp_path):
    _assert_one_line_error(cli("config", "--config", str(tmp_path / "nope.toml")), "no such file")
    _assert_one_line_error(cli("config", "mountt"), "invalid choice")
