"""The ``rpc`` component: serves every component's ``rpc_methods()`` on the agent's sockets.

Design notes
------------
* The method table is collected when the component starts serving, from every
  component's ``rpc_methods()``: the RPC layer knows nothing of FileServer, monitors,
  uploads or jobs. Two components claiming one name is a start-up error.
* The Unix socket (``config.socket_path``, mode 0660, group ``rpc_group`` if set) is
  always served: the group decides who may use the API. TCP is
  opt-in (``rpc_tcp_listen``) and always requires the shared token
  (``rpc_token``; the config refuses TCP without one), optionally over TLS
  (``rpc_tls_cert``/``rpc_tls_key``): the defaults expose nothing beyond the machine.
* **Events** (``Events.subscribe``/``unsubscribe``) are served here because they are a
  property of a connection: the first subscribe of a connection makes its
  ``Subscriber`` (``fsagent/events.py``) over the connection's outbox, starts its pump
  in this component's nursery (so it outlives the request), and drops it from the hub
  when the connection closes.
"""

from __future__ import annotations

import functools
import logging
import ssl
from typing import Any

import trio

from ..component import Component, Host
from ..config import group_id
from ..events import Subscriber, UnknownTopic
from ._errors import RpcError
from ._server import Peer, RpcServer, bind_unix_listener, current_peer

__all__ = ["RpcComponent"]

log = logging.getLogger(__name__)


class RpcComponent(Component):
    name = "rpc"

    def __init__(self, agent: Host):
        super().__init__(agent)
        self.server: RpcServer | None = None
        self.tcp_addresses: list[str] = []
        self._subscribers: dict[int, Subscriber] = {}  # by Peer.id
        self._nursery: trio.Nursery | None = None
        m = agent.metrics
        m.counter("fsagent_rpc_requests_total", "RPC requests answered",
                  collect=lambda: self.server.requests_total if self.server else 0)
        m.counter("fsagent_rpc_errors_total", "RPC error replies, by error name",
                  labels=("error",), collect=lambda: {
                      (n,): c for n, c in (self.server.errors_by_name if self.server else {}).items()})
        m.gauge("fsagent_rpc_clients", "Open RPC connections",
                collect=lambda: len(self.server.peers) if self.server else 0)
        m.gauge("fsagent_events_subscribers", "RPC connections subscribed to change events",
                collect=lambda: agent.events.status()["subscribers"])
        m.counter("fsagent_events_coalesced_total", "Change events replaced by a newer one "
                  "for the same upload or job while a slow subscriber's outbox was full",
                  collect=lambda: agent.events.status()["coalesced"])

    def status(self) -> dict[str, Any]:
        out = {"socket": str(self.agent.config.socket_path), "tcp": self.tcp_addresses}
        if self.server is not None:
            out.update(self.server.status())
        out["events"] = self.agent.events.status()
        return out

    def rpc_methods(self) -> dict:
        return {"Agent.status": self.agent_status,
                "Events.subscribe": self.events_subscribe,
                "Events.unsubscribe": self.events_unsubscribe}

    async def events_subscribe(self, topics) -> None:
        """This connection receives ``uploadChanged``/``jobChanged`` for ``topics``."""
        _named_topics(self.agent.events, topics)
        peer = current_peer()
        sub = self._subscribers.get(peer.id)
        if sub is None:
            if peer.closed.is_set() or self._nursery is None:
                return  # gone already (or the server is stopping): nobody to tell
            sub = self._subscribers[peer.id] = Subscriber(_PeerSink(peer), peer.label)
            self._nursery.start_soon(sub.pump)
            peer.on_close(self._peer_closed)
        self.agent.events.subscribe(sub, topics)

    async def events_unsubscribe(self, topics) -> None:
        """This connection stops receiving ``topics``' notifications."""
        _named_topics(self.agent.events, topics)
        sub = self._subscribers.get(current_peer().id)
        if sub is not None:
            self.agent.events.unsubscribe(sub, topics)

    def _peer_closed(self, peer: Peer) -> None:
        sub = self._subscribers.pop(peer.id, None)
        if sub is not None:
            self.agent.events.drop(sub)

    async def agent_status(self) -> dict[str, Any]:
        """What ``MOUNT/status`` shows (this component's section counts RPC clients)."""
        return self.agent.status()

    def _collect_methods(self) -> dict:
        methods: dict = {}
        for component in self.agent.components:
            for name, fn in component.rpc_methods().items():
                if name in methods:
                    raise RuntimeError(f"RPC method {name} is served twice ({component.name})")
                methods[name] = fn
        return methods

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.agent.config
        self.server = RpcServer(
            self._collect_methods(), max_message_size=cfg.rpc_max_message_bytes,
            max_in_flight=cfg.rpc_max_in_flight, outbox_bytes=cfg.rpc_outbox_bytes,
            token=cfg.rpc_token)
        group = group_id(cfg.rpc_group) if cfg.rpc_group is not None else None
        unix = await bind_unix_listener(cfg.socket_path, group=group)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery  # event subscribers' pumps
            await nursery.start(functools.partial(
                self.server.serve_listeners, [unix], require_auth=False))
            log.info("RPC on %s (%d methods)", cfg.socket_path, len(self.server.methods))
            if cfg.rpc_tcp_listen is not None:
                host, port = cfg.rpc_tcp_listen
                listeners = await trio.open_tcp_listeners(port, host=host or None)
                if cfg.rpc_tls_cert is not None:
                    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                    context.load_cert_chain(cfg.rpc_tls_cert, cfg.rpc_tls_key)
                    listeners = [trio.SSLListener(l, context, https_compatible=False)
                                 for l in listeners]
                await nursery.start(functools.partial(
                    self.server.serve_listeners, listeners, require_auth=True))
                for listener in listeners:
                    sock = getattr(listener, "transport_listener", listener).socket
                    addr = sock.getsockname()
                    self.tcp_addresses.append(f"{addr[0]}:{addr[1]}")
                log.info("RPC on TCP %s%s (token required)", ", ".join(self.tcp_addresses),
                         " with TLS" if cfg.rpc_tls_cert else "")
            task_status.started()


def _named_topics(hub, topics) -> None:
    """Refuse anything but a list of known topic names (``BadArgument``)."""
    if not isinstance(topics, (list, tuple)):
        raise RpcError("BadArgument", f"topics is a list of topic names, got {topics!r}")
    try:
        hub.named(topics)
    except UnknownTopic as e:
        raise RpcError("BadArgument", str(e)) from None


class _PeerSink:
    """A subscriber's ``Sink`` (fsagent/events.py): the connection's outbox."""

    def __init__(self, peer: Peer):
        self._peer = peer

    def try_send(self, method: str, params: list) -> bool:
        return self._peer.notify_nowait(method, params)

    async def send(self, method: str, params: list) -> None:
        await self._peer.notify(method, params)
