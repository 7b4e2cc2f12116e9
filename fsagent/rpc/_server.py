"""The trio msgpack-RPC server: a thin I/O loop around ``_protocol.Connection``.

Design notes
------------
* **One task per connection reads**, one task writes, and every request runs in its
  own task, so a slow ``getSHA1`` never holds up a ``getSize`` behind it; replies go
  out in completion order (msgpack-RPC allows it: they carry the msgid).
* **Bounded everything.** At most ``max_in_flight`` requests run per connection:
  when the cap is reached the reader stops reading, so the kernel's socket buffer
  and then the client's ``send`` push back. Replies and notifications queue in an
  outbox bounded in bytes; a handler (or a monitor) that finds it full waits. So a
  client that sends and never reads costs at most ``max_in_flight`` replies plus
  the outbox, never memory without bound.
* **Errors close one connection.** A malformed frame or an oversized message is a
  ``ProtocolError`` event: we log the reason and close that connection; the server
  and other clients carry on. An unknown method, bad params or a failing method are
  error *replies* ``[name, message]``, not disconnects; unknown notifications are
  ignored (pynvim sends one on connect).
* **Authentication** (TCP only): the first request must be ``auth(token)``; anything
  else, or a wrong token, gets an error reply and the connection is closed.
* **Who is calling.** ``current_peer()`` gives a method the ``Peer`` it is serving
  (a context variable set per connection), so the monitor can send notifications to
  the connection that created a monitor and learn when it goes away.
  ``Peer.notify_nowait`` queues a notification only if the outbox has room at once:
  event subscriptions (``fsagent/events.py``) keep what does not fit themselves,
  coalesced, rather than wait.
* **End of input.** A client may half-close after its last request (``nc -N``): the
  replies still in flight are written before the connection closes.
"""

from __future__ import annotations

import collections
import contextvars
import hmac
import inspect
import itertools
import logging
import os
import socket as _stdlib_socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ._errors import (AUTH_FAILED, AUTH_REQUIRED, INTERNAL_ERROR, INVALID_PARAMS,
                      NO_SUCH_METHOD, RpcError)
from ._protocol import (NEED_DATA, Connection, Notification, ProtocolError, Request,
                        Response)

__all__ = ["RpcServer", "Peer", "current_peer", "bind_unix_listener"]

log = logging.getLogger(__name__)

Method = Callable[..., Awaitable[Any]]

# One read from a connection: big enough that a multi-MiB write (``ImportProcess.write``)
# is a few reads, not hundreds; the unpacker still holds at most one message's bytes.
RECEIVE_BYTES = 1 << 20
_current_peer: contextvars.ContextVar[Peer] = contextvars.ContextVar("fsagent_rpc_peer")
_peer_ids = itertools.count(1)
# How long a connection closed for a protocol error may still drain queued replies.
_DRAIN_SECONDS = 5.0
# A TCP client that does not finish its TLS handshake is dropped after this long.
_HANDSHAKE_SECONDS = 10.0


def current_peer() -> Peer:
    """The connection whose request is being served (raises LookupError outside one)."""
    return _current_peer.get()


class _Outbox:
    """A FIFO of encoded messages bounded in bytes (one message larger than the bound
    is let through alone, or nothing that large could ever be sent)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._closed = False
        self._space = trio.lowlevel.ParkingLot()
        self._data = trio.lowlevel.ParkingLot()

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    async def put(self, data: bytes) -> None:
        while (not self._closed and self._bytes
               and self._bytes + len(data) > self.max_bytes):
            await self._space.park()
        if self._closed:
            raise trio.ClosedResourceError("connection closed")
        self._append(data)

    def put_nowait(self, data: bytes) -> bool:
        """Queue ``data`` only if it fits now and nobody is waiting for room (a waiting
        reply keeps its turn); False otherwise, or once closed."""
        if (self._closed or len(self._space)
                or (self._bytes and self._bytes + len(data) > self.max_bytes)):
            return False
        self._append(data)
        return True

    def _append(self, data: bytes) -> None:
        self._items.append(data)
        self._bytes += len(data)
        self._data.unpark_all()

    async def take(self, limit: int) -> bytes | None:
        """Up to ``limit`` bytes of whole messages joined (at least one); None at the end."""
        while not self._items:
            if self._closed:
                return None
            await self._data.park()
        parts = [self._items.popleft()]
        size = len(parts[0])
        while self._items and size + len(self._items[0]) <= limit:
            parts.append(self._items.popleft())
            size += len(parts[-1])
        self._bytes -= size
        self._space.unpark_all()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        self._closed = True
        self._space.unpark_all()
        self._data.unpark_all()


class Peer:
    """One client connection, as the methods see it."""

    def __init__(self, label: str, outbox: _Outbox, conn: Connection,
                 uid: int | None = None, groups: frozenset[int] = frozenset()):
        self.id = next(_peer_ids)
        self.label = label
        self.uid = uid  # the client's uid on the Unix socket (SO_PEERCRED); None on TCP
        # Its gid and supplementary groups at connect time (empty on TCP), for the
        # rules a local disk applies to group-writable directories.
        self.groups = groups
        self._outbox = outbox
        self._conn = conn
        self.closed = trio.Event()
        self._on_close: list[Callable[[Peer], None]] = []

    def __repr__(self) -> str:
        return f"<Peer {self.id} {self.label}>"

    async def notify(self, method: str, params: list) -> None:
        """Queue a notification (waits while the outbox is full).

        Raises ``trio.ClosedResourceError`` once the connection is gone.
        """
        if self.closed.is_set():
            raise trio.ClosedResourceError("connection closed")
        await self._outbox.put(self._conn.send_notification(method, params))

    def notify_nowait(self, method: str, params: list) -> bool:
        """Queue a notification if the outbox has room now; False if not (full, or the
        connection is gone). For publishers that must never wait (``fsagent/events.py``)."""
        if self.closed.is_set():
            return False
        return self._outbox.put_nowait(self._conn.send_notification(method, params))

    def on_close(self, callback: Callable[[Peer], None]) -> None:
        """Call ``callback(peer)`` (synchronously, in the server's task) at disconnect."""
        if self.closed.is_set():
            callback(self)
        else:
            self._on_close.append(callback)

    def _mark_closed(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._outbox.close()
        for callback in self._on_close:
            try:
                callback(self)
            except Exception:
                log.exception("close callback of %s failed", self)


def _arity_checker(fn: Method) -> Callable[[list], str | None]:
    """A function returning why ``params`` cannot be passed to ``fn``, or None."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return lambda params: None

    def check(params: list) -> str | None:
        try:
            sig.bind(*params)
        except TypeError as e:
            return str(e)
        return None

    return check


class RpcServer:
    """Serves ``methods`` (``{"Name.op": async fn(*params)}``) on any trio stream."""

    def __init__(self, methods: dict[str, Method], *, max_message_size: int,
                 max_in_flight: int, outbox_bytes: int, token: str | None = None):
        self.methods = dict(methods)
        self._checks = {name: _arity_checker(fn) for name, fn in self.methods.items()}
        self.max_message_size = max_message_size
        self.max_in_flight = max_in_flight
        self.outbox_bytes = outbox_bytes
        self.token = token
        self.peers: set[Peer] = set()
        self.connections_total = 0
        self.protocol_errors = 0
        self.requests_total = 0
        self.errors_by_name: dict[str, int] = {}  # error replies, by error name

    def status(self) -> dict[str, Any]:
        return {"connections": len(self.peers), "connections_total": self.connections_total,
                "protocol_errors": self.protocol_errors, "methods": len(self.methods)}

    # -- listeners ------------------------------------------------------------------------

    async def serve_listeners(self, listeners: list[trio.abc.Listener], *,
                              require_auth: bool,
                              task_status=trio.TASK_STATUS_IGNORED) -> None:
        async def handler(stream: trio.abc.Stream) -> None:
            await self.serve_stream(stream, _label(stream), require_auth=require_auth,
                                    **_unix_peer(stream))

        await trio.serve_listeners(handler, listeners, task_status=task_status)

    # -- one connection -------------------------------------------------------------------

    async def serve_stream(self, stream: trio.abc.Stream, label: str, *,
                           require_auth: bool = False, uid: int | None = None,
                           groups: frozenset[int] = frozenset()) -> None:
        conn = Connection(max_message_size=self.max_message_size)
        outbox = _Outbox(self.outbox_bytes)
        peer = Peer(label, outbox, conn, uid, groups)
        self.peers.add(peer)
        self.connections_total += 1
        _current_peer.set(peer)
        log.debug("connection %d from %s", peer.id, label)
        reason = "closed"
        try:
            if isinstance(stream, trio.SSLStream):
                with trio.move_on_after(_HANDSHAKE_SECONDS) as scope:
                    await stream.do_handshake()
                if scope.cancelled_caught:
                    raise trio.BrokenResourceError("no TLS handshake in time")
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop, stream, outbox, peer, nursery.cancel_scope)
                async with trio.open_nursery() as handlers:
                    reason = await self._read_loop(stream, conn, peer, handlers, require_auth)
                    if reason != "end of input":
                        handlers.cancel_scope.cancel()
                # Every reply that will ever be written is queued: let the writer drain
                # it, but a peer that does not read gets only a short while.
                outbox.close()
                if reason != "end of input":
                    nursery.cancel_scope.deadline = trio.current_time() + _DRAIN_SECONDS
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as group:
            reason = f"transport: {group.exceptions[0]}"
            await trio.aclose_forcefully(stream)
        finally:
            peer._mark_closed()
            self.peers.discard(peer)
            log.debug("connection %d from %s closed: %s", peer.id, label, reason)

    async def _read_loop(self, stream, conn: Connection, peer: Peer,
                         handlers: trio.Nursery, require_auth: bool) -> str:
        in_flight = trio.Semaphore(self.max_in_flight)
        authenticated = not require_auth
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                try:
                    data = await stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, ssl.SSLError) as e:
                    return f"receive failed: {e}"
                if not data:
                    return "end of input"
                conn.receive_data(data)
            elif isinstance(event, Request):
                if not authenticated:
                    ok = await self._authenticate(event, conn, peer)
                    if not ok:
                        return "authentication failed"
                    authenticated = True
                    continue
                await in_flight.acquire()
                handlers.start_soon(self._answer, event, conn, peer, in_flight)
            elif isinstance(event, Notification):
                log.debug("ignoring notification %r from %s", event.method, peer.label)
            elif isinstance(event, ProtocolError):
                self.protocol_errors += 1
                log.warning("closing RPC connection from %s: %s", peer.label, event.reason)
                return f"protocol error: {event.reason}"
            elif isinstance(event, Response):  # pragma: no cover - Connection rejects these
                return "unexpected response"

    async def _authenticate(self, request: Request, conn: Connection, peer: Peer) -> bool:
        if request.method != "auth":
            error = [AUTH_REQUIRED, "call auth(token) before anything else"]
        elif (len(request.params) == 1 and isinstance(request.params[0], (str, bytes))
              and hmac.compare_digest(_as_bytes(request.params[0]), _as_bytes(self.token))):
            await peer._outbox.put(conn.send_response(request.msgid, None, True))
            return True
        else:
            error = [AUTH_FAILED, "wrong token"]
        log.warning("closing RPC connection from %s: %s", peer.label, error[1])
        await peer._outbox.put(conn.send_response(request.msgid, error, None))
        return False

    async def _answer(self, request: Request, conn: Connection, peer: Peer,
                      in_flight: trio.Semaphore) -> None:
        try:
            error, result = await self._call(request, peer)
            try:
                data = conn.send_response(request.msgid, error, result)
            except (TypeError, ValueError, OverflowError) as e:  # result not encodable
                log.error("%s returned an unencodable result: %s", request.method, e)
                data = conn.send_response(
                    request.msgid, [INTERNAL_ERROR, f"unencodable result: {e}"], None)
            await peer._outbox.put(data)
        except trio.ClosedResourceError:
            pass
        finally:
            in_flight.release()

    async def _call(self, request: Request, peer: Peer) -> tuple[Any, Any]:
        self.requests_total += 1
        error, result = await self._invoke(request, peer)
        if error is not None:
            name = str(error[0])
            self.errors_by_name[name] = self.errors_by_name.get(name, 0) + 1
        return error, result

    async def _invoke(self, request: Request, peer: Peer) -> tuple[Any, Any]:
        fn = self.methods.get(request.method)
        if fn is None:
            return [NO_SUCH_METHOD, f"no such method: {request.method}"], None
        try:
            return None, await fn(*request.params)
        except RpcError as e:
            return e.to_wire(), None
        except TypeError as e:
            # Checking the arity only after a TypeError keeps it off the hot path.
            problem = self._checks[request.method](request.params)
            if problem is not None:
                return [INVALID_PARAMS, f"{request.method}: {problem}"], None
            log.exception("RPC method %s failed (from %s)", request.method, peer.label)
            return [INTERNAL_ERROR, f"{type(e).__name__}: {e}"], None
        except Exception as e:
            log.exception("RPC method %s failed (from %s)", request.method, peer.label)
            return [INTERNAL_ERROR, f"{type(e).__name__}: {e}"], None

    async def _write_loop(self, stream, outbox: _Outbox, peer: Peer,
                          connection_scope: trio.CancelScope) -> None:
        try:
            while (data := await outbox.take(256 * 1024)) is not None:
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as e:
            # Nobody reads our replies any more: end the whole connection.
            log.debug("connection %d: send failed: %s", peer.id, e)
            peer._mark_closed()
            connection_scope.cancel()


def _as_bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else value


def _unix_peer(stream: trio.abc.Stream) -> dict:
    """``uid`` and ``groups`` of a Unix-socket client (SO_PEERCRED, then the groups its
    process had when it connected, from ``/proc/PID/status``); nothing on TCP."""
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family != _stdlib_socket.AF_UNIX:
        return {}
    try:
        creds = sock.getsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_PEERCRED, 12)
    except OSError:
        return {}
    pid, uid, gid = (int.from_bytes(creds[i:i + 4], "little") for i in (0, 4, 8))
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
    except (OSError, ValueError):
        pass  # the client already exited, or another pid namespace: its gid only
    return {"uid": uid, "groups": frozenset(groups)}


def _label(stream: trio.abc.Stream) -> str:
    inner = getattr(stream, "transport_stream", stream)
    sock = getattr(inner, "socket", None)
    if sock is None:
        return "stream"
    if sock.family == _stdlib_socket.AF_UNIX:
        try:
            creds = sock.getsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_PEERCRED,
                                    12)
            pid, uid, _ = (int.from_bytes(creds[i:i + 4], "little") for i in (0, 4, 8))
            return f"unix(pid={pid},uid={uid})"
        except OSError:
            return "unix"
    try:
        host, port = sock.getpeername()[:2]
        return f"tcp({host}:{port})"
    except OSError:
        return "tcp"


async def bind_unix_listener(path: Path, mode: int = 0o660,
                             group: int | None = None) -> trio.SocketListener:
    """Listen on a Unix socket at ``path`` with ``mode``; a stale socket file is replaced.

    ``group``: the socket's group (``rpc_group``); with mode 0660 its members may
    connect and other users get EACCES from ``connect(2)``.

    The caller holds the state-dir lock, so a socket file left there is a dead agent's.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    # Bind with a restrictive umask's effect, then set the documented mode: chmod on
    # the path before listen() so nobody outside the group can connect meanwhile.
    old_umask = os.umask(0o177)
    try:
        await sock.bind(os.fspath(path))
    finally:
        os.umask(old_umask)
    if group is not None:
        os.chown(path, -1, group)
    os.chmod(path, mode)
    sock.listen(128)
    return trio.SocketListener(sock)
