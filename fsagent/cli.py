"""The ``fsagent`` command.

Exit codes: 0 success, 1 an unexpected failure (with a traceback in the log), 2 a usage
or configuration problem, reported as one line on stderr with nothing mounted.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from . import __version__
from .config import LOG_LEVELS, ConfigError, load_config
from .db import DatabaseError

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
    from .rpc._cli import add_rpc_commands
    add_rpc_commands(sub)
    return parser


def _setup_logging(level: int) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pyfuse3 logs every request at DEBUG; keep it one notch quieter than ours.
    logging.getLogger("pyfuse3").setLevel(max(level, logging.INFO))


def cmd_run(args: argparse.Namespace) -> int:
    from .agent import run_agent

    overrides = {
        "mount": args.mount, "state_dir": args.state_dir, "socket": args.socket,
        "log_level": args.log_level, "export_roots": args.export_roots,
    }
    config = load_config(args.config, overrides)
    _setup_logging(config.log_level_number)
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
