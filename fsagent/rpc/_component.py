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
"""

from __future__ import annotations

import functools
import logging
import ssl
from typing import Any

import trio

from ..component import Component, Host
from ..config import group_id
from ._server import RpcServer, bind_unix_listener

__all__ = ["RpcComponent"]

log = logging.getLogger(__name__)


class RpcComponent(Component):
    name = "rpc"

    def __init__(self, agent: Host):
        super().__init__(agent)
        self.server: RpcServer | None = None
        self.tcp_addresses: list[str] = []
        m = agent.metrics
        m.counter("fsagent_rpc_requests_total", "RPC requests answered",
                  collect=lambda: self.server.requests_total if self.server else 0)
        m.counter("fsagent_rpc_errors_total", "RPC error replies, by error name",
                  labels=("error",), collect=lambda: {
                      (n,): c for n, c in (self.server.errors_by_name if self.server else {}).items()})
        m.gauge("fsagent_rpc_clients", "Open RPC connections",
                collect=lambda: len(self.server.peers) if self.server else 0)

    def status(self) -> dict[str, Any]:
        out = {"socket": str(self.agent.config.socket_path), "tcp": self.tcp_addresses}
        if self.server is not None:
            out.update(self.server.status())
        return out

    def rpc_methods(self) -> dict:
        return {"Agent.status": self.agent_status}

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
