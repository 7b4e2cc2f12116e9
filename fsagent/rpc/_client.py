"""The trio msgpack-RPC client used by the CLI, the tests and other components.

Design notes
------------
* A thin loop around ``_protocol.Connection``, like the server: one background task
  reads, turning responses into the result of the waiting ``call`` (calls may be
  issued concurrently from many tasks and are matched by msgid) and notifications
  into ``client.notifications``, a bounded channel. A client that stops consuming
  notifications stops reading, which pushes back on the server instead of growing
  memory on either side.
* ``open_client`` is the one way in: Unix socket by default, TCP (optionally TLS)
  with the token sent as the first call. ``call_sync`` runs one call in its own
  ``trio.run`` for synchronous code such as the CLI.
* **Bulk requests.** A request whose last parameter is a large ``bytes`` (an upload's
  chunk) is written as its header and then that object, uncopied
  (``Connection.send_request_parts``); ``open_client(send_buffer=...)`` tunes the
  socket for a client that streams such requests (``bulk_sender``).
* Error replies raise ``RpcError`` (``OmeroFSError`` for that name); a dropped
  connection raises ``trio.BrokenResourceError`` in every waiting call.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import trio

from ._errors import RpcError
from ._protocol import NEED_DATA, Connection, Notification, ProtocolError, Response

__all__ = ["Client", "open_client", "call_sync", "bulk_sender"]

# The client trusts the agent it talks to, so it accepts large replies
# (getBulkDirectory of a big folder, readBlock up to its cap).
CLIENT_MAX_MESSAGE_SIZE = 1 << 30
CLIENT_MAX_CONTAINER_LEN = 1 << 24


class Client:
    def __init__(self, stream: trio.abc.Stream, *, notification_buffer: int = 1024):
        self._stream = stream
        self._conn = Connection(max_message_size=CLIENT_MAX_MESSAGE_SIZE,
                                max_container_len=CLIENT_MAX_CONTAINER_LEN)
        self._send_lock = trio.Lock()
        self._waiting: dict[int, list] = {}   # msgid -> [Event, Response | None]
        self._notify_send, self.notifications = trio.open_memory_channel(notification_buffer)
        self._broken: BaseException | None = None

    async def call(self, method: str, *params: Any) -> Any:
        """Call ``method(*params)``; returns its result or raises ``RpcError``."""
        if self._broken is not None:
            raise trio.BrokenResourceError(f"connection lost: {self._broken}")
        # A large last parameter (an upload's chunk) goes out as is, after its header,
        # instead of being copied twice into one packed frame (``send_request_parts``).
        msgid, parts = self._conn.send_request_parts(method, params)
        slot = [trio.Event(), None]
        self._waiting[msgid] = slot
        try:
            async with self._send_lock:
                for part in parts:
                    await self._stream.send_all(part)
            await slot[0].wait()
        finally:
            self._waiting.pop(msgid, None)
        response = slot[1]
        if response is None:
            raise trio.BrokenResourceError(f"connection lost: {self._broken}")
        if response.error is not None:
            raise RpcError.from_wire(response.error)
        return response.result

    async def _read_loop(self) -> None:
        try:
            while True:
                event = self._conn.next_event()
                if event is NEED_DATA:
                    data = await self._stream.receive_some(1 << 20)
                    if not data:
                        raise EOFError("the agent closed the connection")
                    self._conn.receive_data(data)
                elif isinstance(event, Response):
                    slot = self._waiting.get(event.msgid)
                    if slot is not None:
                        slot[1] = event
                        slot[0].set()
                elif isinstance(event, Notification):
                    await self._notify_send.send(event)
                elif isinstance(event, ProtocolError):
                    raise ValueError(f"protocol error from the agent: {event.reason}")
        except (EOFError, ValueError, trio.BrokenResourceError, trio.ClosedResourceError,
                ssl.SSLError) as e:
            self._broken = e
        finally:
            if self._broken is None:
                self._broken = trio.ClosedResourceError("client closed")
            for slot in self._waiting.values():
                slot[0].set()
            self._notify_send.close()


@contextlib.asynccontextmanager
async def open_client(socket_path: str | os.PathLike | None = None, *,
                      tcp: tuple[str, int] | None = None, token: str | None = None,
                      ssl_context: ssl.SSLContext | None = None,
                      server_hostname: str | None = None,
                      notification_buffer: int = 1024,
                      send_buffer: int | None = None) -> AsyncIterator[Client]:
    """Connect to an agent: ``socket_path`` (Unix) or ``tcp=(host, port)``.

    ``send_buffer``: for a client that streams large requests (``fsagent upload``): a
    Unix socket's SO_SNDBUF; on TCP, no ``TCP_NOTSENT_LOWAT`` (``bulk_sender``)."""
    if (socket_path is None) == (tcp is None):
        raise ValueError("give exactly one of socket_path and tcp")
    if socket_path is not None:
        stream: trio.abc.Stream = await trio.open_unix_socket(os.fspath(socket_path))
    else:
        host, port = tcp
        stream = await trio.open_tcp_stream(host, port)
    if send_buffer is not None:
        bulk_sender(stream, send_buffer)
    if tcp is not None and ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname or host)
    client = Client(stream, notification_buffer=notification_buffer)
    try:
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(client._read_loop)
            if tcp is not None and token is not None:
                await client.call("auth", token)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader task never raises, so a group holds the caller's one exception:
        # hand it back as it was raised, not wrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def bulk_sender(stream: trio.SocketStream, send_buffer: int) -> None:
    """Tune a plain socket stream for requests of megabytes (``open_client(send_buffer=)``).

    * Unix socket: SO_SNDBUF = ``send_buffer`` (the kernel doubles it, capped at twice
      ``net.core.wmem_max``). The default (~200 KiB) makes the client wait for the agent
      every ~200 KiB of a 4 MiB write (8 interleaved 1 GiB uploads: median 7.43 s
      against 10.07 s).
    * TCP: TCP_NOTSENT_LOWAT off (0: the system's default, unlimited unless
      ``net.ipv4.tcp_notsent_lowat`` says otherwise). trio sets it to 16 KiB on every TCP
      stream, a good choice for interactive traffic but not for bulk: each ``send`` then
      stops ~16 KiB past what the kernel has sent, so a 4 MiB chunk took ~22 ``send``
      calls and as many trips through trio's scheduler and epoll (strace of a 1 GiB
      upload over loopback: 5,761 sends and 6,815 epoll_waits, against 535 and 2,436
      on the Unix socket; 860 and 2,454 with the mark off). Nothing here needs the
      mark: replies are matched by msgid and each file has a few chunks in flight.
      SO_SNDBUF is left to TCP's autotuning, which grows the buffer to what the path
      needs (up to ``net.ipv4.tcp_wmem``'s maximum): a fixed size would only save
      ~300 of those sends per GiB on loopback and could starve a long, fast link.
    """
    if stream.socket.family in (socket.AF_INET, socket.AF_INET6):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 0)
    else:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)


def call_sync(socket_path: str | os.PathLike, method: str, *params: Any) -> Any:
    """One call from synchronous code (starts and ends its own trio run)."""

    async def one_call():
        async with open_client(socket_path) as client:
            return await client.call(method, *params)

    return trio.run(one_call)
