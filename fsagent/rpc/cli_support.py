"""What every command that talks to a running agent shares: finding its socket and one call.

Design notes
------------
* Used by ``fsagent call``/``status``/``watch`` (``rpc/_cli.py``) and ``fsagent jobs``
  (``jobs/_cli.py``), so the socket is found by one rule everywhere: ``--socket``, else
  ``--config``'s ``socket``/``state_dir`` (``--state-dir`` overriding), else the
  defaults, exactly as ``fsagent run`` resolves it.
* ``run_client`` turns the ways a call can fail into one line on stderr and an exit
  code: 2 cannot connect or the connection dropped, ``EXIT_ERROR_REPLY`` (3) the agent
  answered with an error (``fsagent: NAME: message``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from ..config import load_config
from ._client import Client, open_client
from ._errors import RpcError

__all__ = ["EXIT_ERROR_REPLY", "add_socket_options", "socket_path", "run_client"]

EXIT_ERROR_REPLY = 3


def add_socket_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH", help="the agent's RPC Unix socket "
                        "(default: from --config, else STATE_DIR/rpc.sock)")
    parser.add_argument("--config", metavar="FILE", help="TOML config the agent runs with")
    parser.add_argument("--state-dir", metavar="DIR", help="the agent's state dir")


def socket_path(args: argparse.Namespace) -> Path:
    """The agent's socket from the options ``add_socket_options`` added."""
    config = load_config(args.config, {"socket": args.socket, "state_dir": args.state_dir})
    return config.socket_path


def run_client(args: argparse.Namespace, body: Callable[[Client], Awaitable[int]]) -> int:
    """Connect to the agent, run ``await body(client)``, return its exit code."""
    path = socket_path(args)

    async def main():
        try:
            client_cm = open_client(path)
            async with client_cm as client:
                return await body(client)
        except OSError as e:
            print(f"fsagent: error: cannot connect to {path}: {e.strerror or e}",
                  file=sys.stderr)
            return 2
        except RpcError as e:
            print(f"fsagent: {e.name}: {e.message}", file=sys.stderr)
            return EXIT_ERROR_REPLY
        except trio.BrokenResourceError as e:
            print(f"fsagent: error: the agent dropped the connection: {e}", file=sys.stderr)
            return 2

    return trio.run(main)
