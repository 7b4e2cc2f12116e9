"""msgpack-RPC for fsagent: a sans-IO protocol core, a trio server and a trio client.

Public surface:

* ``open_client(socket_path | tcp=(host, port), token=..., ssl_context=...)``: an async
  context manager yielding a ``Client`` (``await client.call(method, *params)``,
  ``client.notifications`` a channel of ``Notification``); ``call_sync(socket, method,
  *params)`` for synchronous code.
* ``RpcError(name, message)`` / ``OmeroFSError(message)``: what methods raise and what
  clients catch; on the wire an error is ``[name, message]``.
* ``current_peer()``: inside a method, the ``Peer`` (connection) being served; methods
  use ``peer.notify(...)`` and ``peer.on_close(...)``.
* ``Connection`` and its events: the sans-IO protocol, for tests and other transports.
* ``RpcComponent``: the agent component serving every component's ``rpc_methods()``.
* ``add_rpc_commands``: ``fsagent call``/``status``/``watch``; ``cli_support`` (a public
  module) holds what every command talking to an agent shares (``fsagent jobs`` too).
"""

from ._cli import add_rpc_commands
from ._client import Client, call_sync, open_client
from ._component import RpcComponent
from ._errors import OmeroFSError, RpcError
from ._protocol import (NEED_DATA, Connection, LocalProtocolError, Notification,
                        ProtocolError, Request, Response)
from ._server import Peer, RpcServer, current_peer

__all__ = [
    "Client", "call_sync", "open_client", "OmeroFSError", "RpcError", "Connection",
    "LocalProtocolError", "NEED_DATA", "Notification", "ProtocolError", "Request",
    "Response", "Peer", "RpcServer", "current_peer", "RpcComponent", "add_rpc_commands",
]
