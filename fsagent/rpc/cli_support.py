"""What every command that talks to a running agent shares: finding it and one call.

Design notes
------------
* Used by ``fsagent call``/``status``/``watch`` (``rpc/_cli.py``), ``fsagent jobs``
  (``jobs/_cli.py``) and ``fsagent upload``/``uploads`` (``uploads/_cli.py``), so the
  socket is found by one rule everywhere: ``--socket``, else ``--config``'s
  ``socket``/``state_dir`` (``--state-dir`` overriding), else the defaults, exactly as
  ``fsagent run`` resolves it.
* A command that may also reach an agent on another machine adds
  ``add_connection_options``: ``--connect HOST:PORT --token-file F [--tls-ca F]``
  (the agent's ``rpc_tcp_listen``, ``rpc_token`` and, for TLS, the CA that signed
  ``rpc_tls_cert``). The token is read from a file, never from the command line,
  where every user on the machine could read it in ``ps``.
* ``open_agent`` connects (and authenticates) and turns every way that can fail into
  ``CannotConnect`` with one line naming the agent: refused, no such socket, bad token,
  TLS. What fails after the connection is up is the caller's to report.
* ``run_client`` turns the ways a call can fail into one line on stderr and an exit
  code: 2 cannot connect or the connection dropped, ``EXIT_ERROR_REPLY`` (3) the agent
  answered with an error (``fsagent: NAME: message``).
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import trio

from ..config import load_config
from ._client import Client, open_client
from ._errors import RpcError

__all__ = ["EXIT_ERROR_REPLY", "CannotConnect", "add_socket_options",
           "add_connection_options", "socket_path", "open_agent", "run_client"]

EXIT_ERROR_REPLY = 3


class CannotConnect(Exception):
    """The agent could not be reached or refused us; ``str()`` is one line."""


def add_socket_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH", help="the agent's RPC Unix socket "
                        "(default: from --config, else STATE_DIR/rpc.sock)")
    parser.add_argument("--config", metavar="FILE", help="TOML config the agent runs with")
    parser.add_argument("--state-dir", metavar="DIR", help="the agent's state dir")


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """``add_socket_options`` plus TCP: ``--connect``, ``--token-file``, ``--tls-ca``."""
    add_socket_options(parser)
    parser.add_argument("--connect", metavar="HOST:PORT", help="reach the agent over TCP "
                        "(its rpc_tcp_listen) instead of its Unix socket")
    parser.add_argument("--token-file", metavar="FILE", help="with --connect: a file "
                        "holding the agent's rpc_token")
    parser.add_argument("--tls-ca", metavar="FILE", help="with --connect: speak TLS and "
                        "trust the agent's certificate if FILE (PEM) signed it")


def socket_path(args: argparse.Namespace) -> Path:
    """The agent's socket from the options ``add_socket_options`` added."""
    config = load_config(args.config, {"socket": args.socket, "state_dir": args.state_dir})
    return config.socket_path


def _parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise CannotConnect(f"--connect: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CannotConnect(f"cannot read --token-file {path}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    if not token:
        raise CannotConnect(f"--token-file {path} is empty")
    return token


def _target(args: argparse.Namespace) -> tuple[str, dict]:
    """(a name for messages, ``open_client`` keyword arguments) from the options."""
    connect = getattr(args, "connect", None)
    token_file = getattr(args, "token_file", None)
    tls_ca = getattr(args, "tls_ca", None)
    if connect is None:
        if token_file or tls_ca:
            raise CannotConnect("--token-file and --tls-ca go with --connect HOST:PORT")
        path = socket_path(args)
        return str(path), {"socket_path": path}
    if args.socket:
        raise CannotConnect("give --socket or --connect, not both")
    if not token_file:
        raise CannotConnect("--connect needs --token-file (the agent's rpc_token)")
    host, port = _parse_host_port(connect)
    kwargs: dict = {"tcp": (host, port), "token": _read_token(token_file)}
    if tls_ca:
        try:
            kwargs["ssl_context"] = ssl.create_default_context(cafile=tls_ca)
        except (OSError, ssl.SSLError) as e:
            raise CannotConnect(f"cannot use --tls-ca {tls_ca}: "
                                f"{getattr(e, 'strerror', None) or e}") from None
    return f"{host}:{port}", kwargs


@contextlib.asynccontextmanager
async def open_agent(args: argparse.Namespace, *,
                     send_buffer: int | None = None) -> AsyncIterator[Client]:
    """Connect to the agent the options name; ``CannotConnect`` if that fails.

    Only failures while connecting and authenticating become ``CannotConnect``: an
    ``OSError`` or ``RpcError`` raised by the body passes through unchanged.
    ``send_buffer`` goes to ``open_client`` (a client streaming large requests)."""
    where, kwargs = _target(args)
    kwargs["send_buffer"] = send_buffer
    connected = False
    try:
        async with open_client(**kwargs) as client:
            connected = True
            yield client
    except OSError as e:  # refused, no such socket, permission, TLS (SSLError)
        if connected:
            raise
        raise CannotConnect(f"cannot connect to {where}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    except RpcError as e:  # the agent refused the token (AuthenticationFailed)
        if connected:
            raise
        raise CannotConnect(f"{where}: {e.name}: {e.message}") from None
    except trio.BrokenResourceError as e:  # closed during the TLS handshake or auth
        if connected:
            raise
        cause = e.__cause__ or e
        raise CannotConnect(f"cannot connect to {where}: {cause}") from None


def run_client(args: argparse.Namespace, body: Callable[[Client], Awaitable[int]]) -> int:
    """Connect to the agent, run ``await body(client)``, return its exit code."""

    async def main():
        try:
            async with open_agent(args) as client:
                return await body(client)
        except CannotConnect as e:
            print(f"fsagent: error: {e}", file=sys.stderr)
            return 2
        except RpcError as e:
            print(f"fsagent: {e.name}: {e.message}", file=sys.stderr)
            return EXIT_ERROR_REPLY
        except trio.BrokenResourceError as e:
            print(f"fsagent: error: the agent dropped the connection: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # e.g. stdout is a pipe that was closed
            print(f"fsagent: error: {e.strerror or e}", file=sys.stderr)
            return 2

    return trio.run(main)
