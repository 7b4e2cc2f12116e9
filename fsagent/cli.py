"""The ``fsagent`` command.

Exit codes: 0 success, 1 an unexpected failure (with a traceback in the log), 2 a usage
or configuration problem, reported as one line on stderr with nothing mounted.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import sys

import trio

from . import __version__
from .config import LOG_LEVELS, SETTINGS, ConfigError, load_config
from .db import DatabaseError
from .service.logs import configure_logging

__all__ = ["main", "build_parser"]

log = logging.getLogger("fsagent")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like a bad config value
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fsagent",
        description="Lab-machine agent: a FUSE mount for resumable, verified uploads, "
        "jobs as files, and an inotify monitor served over msgpack-RPC.",
    )
    parser.add_argument("--version", action="version", version=f"fsagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    run = sub.add_parser(
        "run", help="mount and serve in the foreground until SIGTERM/SIGINT",
        description="Mount the filesystem and run every service in the foreground. "
        "Flags override the config file; the config file overrides the embedded "
        "defaults (see the README's configuration reference).",
    )
    run.add_argument("--config", metavar="FILE", help="TOML config file")
    run.add_argument("--mount", metavar="DIR", help="mount point (default ./mnt)")
    run.add_argument("--state-dir", metavar="DIR",
                     help="database and uploaded data (default ./.fsagent)")
    run.add_argument("--socket", metavar="PATH",
                     help="RPC Unix socket (default STATE_DIR/rpc.sock)")
    run.add_argument("--log-level", metavar="LEVEL", choices=LOG_LEVELS,
                     help=f"one of {', '.join(LOG_LEVELS)} (default info)")
    run.add_argument("--export-root", metavar="DIR", action="append", dest="export_roots",
                     help="a directory FileServer and monitors may serve (repeatable; "
                     "replaces export_roots from the config)")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser(
        "config", help="print the resolved configuration, or one setting's value",
        description="Resolve the configuration exactly as `fsagent run` would (defaults, "
        "then --config FILE) and print it as TOML, or print one setting's bare value "
        "(what scripts and the systemd unit use: `fsagent config --config F mount`).",
    )
    config.add_argument("--config", metavar="FILE", help="TOML config file")
    config.add_argument("setting", nargs="?", metavar="SETTING",
                        choices=[s.name for s in SETTINGS], help="print only this value")
    config.set_defaults(func=cmd_config)
    from .rpc import add_rpc_commands
    add_rpc_commands(sub)
    from .jobs import add_jobs_commands
    add_jobs_commands(sub)
    from .uploads import add_upload_commands
    add_upload_commands(sub)
    return parser


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return json.dumps(f"{value[0]}:{value[1]}")  # a parsed HOST:PORT, printed as given
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(json.dumps(str(v)) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def cmd_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.setting:
        value = getattr(config, args.setting.replace(".", "_"))
        print("" if value is None else value)
        return 0
    for s in SETTINGS:
        value = getattr(config, s.attr)
        print(f"# {s.name} = (unset)" if value is None else f"{s.name} = {_toml_value(value)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .agent import run_agent

    overrides = {
        "mount": args.mount, "state_dir": args.state_dir, "socket": args.socket,
        "log_level": args.log_level, "export_roots": args.export_roots,
    }
    config = load_config(args.config, overrides)
    configure_logging(config.log_level_number)
    # A watchdog kill (SIGABRT) or a crash prints every thread's stack to the log.
    faulthandler.enable()
    trio.run(run_agent, config)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatabaseError) as e:
        print(f"fsagent: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
