"""``MonitorServer.<op>`` over RPC: create, start, stop, destroy, query and sync monitors.

Design notes
------------
* Arguments are validated here, once, with OMERO.fs's enum names
  (``Persistent|OneShot|Inactivity``, ``Creation|Modification|Deletion|All``,
  ``Flat|Recurse|Follow``); a bad one is an ``OmeroFSError`` naming the argument.
* The path must be a directory inside an exported root after resolving symlinks and
  ``..`` (the same ``Confinement`` as FileServer: ``fsagent/confinement.py``); the
  monitor watches the resolved path and reports resolved paths.
* ``proxy`` must be nil: events go to the connection that created the monitor, as
  ``fsEventHappened(monitorId, events)`` notifications. When that connection closes,
  its monitors wait ``monitor_grace_seconds`` for a ``startMonitor`` from a new
  connection (which re-attaches them), then are destroyed.
* **Observability.** One INFO line when a monitor is created and when it is destroyed
  (by the client or after its grace); the monitor itself logs its System events
  (overflows and watch errors at WARNING). ``fsagent_monitor_events_delivered_total``
  and ``fsagent_monitor_overflows_total`` are counted by the monitors, across their
  lifetimes; ``fsagent_monitors{state}`` is counted at scrape time.
* ``platformCheck`` true on anything but Linux is an error, as the reference allows.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from typing import Any

import trio

from ..component import Component, Host
from ..confinement import Confinement
from ..rpc import OmeroFSError, Peer, current_peer
from ._inotify import load_library
from ._monitor import (MONITOR_TYPES, PATH_MODES, STARTED, STOPPED, WATCH_EVENT_TYPES,
                       Monitor, MonitorCounters, MonitorSpec)

__all__ = ["MonitorServer"]

log = logging.getLogger(__name__)


def _str_list(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise OmeroFSError(f"{name} must be a list of strings, got {value!r:.80}")
    return tuple(value)


def _choice(name: str, value: Any, choices) -> str:
    if value not in choices:
        raise OmeroFSError(f"{name} must be one of {', '.join(choices)}, got {value!r:.40}")
    return value


class MonitorServer(Component):
    name = "monitors"

    def __init__(self, agent: Host):
        super().__init__(agent)
        cfg = agent.config
        self.confinement = Confinement(cfg.export_roots)
        self.flush_ms = cfg.monitor_flush_ms
        self.grace = cfg.monitor_grace_seconds
        self.max_pending = cfg.monitor_max_pending_events
        self.monitors: dict[str, Monitor] = {}
        self._watched_peers: set[int] = set()
        self._nursery: trio.Nursery | None = None
        load_library()  # components are built before the mount: no fork while it serves
        m = agent.metrics
        self.counters = MonitorCounters(
            delivered=m.counter("fsagent_monitor_events_delivered_total", "File events "
                                "sent to monitor clients (fsEventHappened entries)"),
            overflows=m.counter("fsagent_monitor_overflows_total", "inotify queue "
                                "overflows a monitor recovered from with a rescan"))
        m.gauge("fsagent_monitors", "Monitors by state", labels=("state",),
                collect=self._count_by_state)
        # The walker's read-lease probe (monitor/_inotify.py) may see a lease broken by a
        # writer; the kernel then sends SIGIO, whose default action would kill the agent.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGIO, signal.SIG_IGN)

    def _count_by_state(self) -> dict[tuple[str], int]:
        out = {(STARTED,): 0, (STOPPED,): 0}
        for m in self.monitors.values():
            out[(m.state,)] = out.get((m.state,), 0) + 1
        return out

    def counts(self) -> dict[str, int]:
        return {"monitors": len(self.monitors)}

    def status(self) -> dict[str, Any]:
        return {"monitors": {mid: m.status() for mid, m in self.monitors.items()}}

    def rpc_methods(self) -> dict:
        return {f"MonitorServer.{op}": getattr(self, op) for op in (
            "createMonitor", "startMonitor", "stopMonitor", "destroyMonitor",
            "getMonitorState", "sync")}

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _get(self, monitor_id: Any) -> Monitor:
        monitor = self.monitors.get(monitor_id) if isinstance(monitor_id, str) else None
        if monitor is None:
            raise OmeroFSError(f"no such monitor: {monitor_id!r:.80}")
        return monitor

    def _track(self, peer: Peer) -> None:
        if peer.id not in self._watched_peers:
            self._watched_peers.add(peer.id)
            peer.on_close(self._peer_closed)

    def _peer_closed(self, peer: Peer) -> None:
        self._watched_peers.discard(peer.id)
        if any(m.peer is peer for m in self.monitors.values()) and self._nursery:
            self._nursery.start_soon(self._reap, peer)

    async def _reap(self, peer: Peer) -> None:
        await trio.sleep(self.grace)
        for monitor in [m for m in self.monitors.values() if m.peer is peer]:
            log.info("destroying monitor %s on %s: its client left %.0f s ago",
                     monitor.id, monitor.spec.root, self.grace)
            await self._destroy(monitor)

    async def _destroy(self, monitor: Monitor) -> None:
        try:
            await monitor.destroy()
        finally:
            if self.monitors.pop(monitor.id, None) is not None:
                log.info("monitor %s on %s destroyed (%d events delivered)", monitor.id,
                         monitor.spec.root, monitor.events_sent)

    # -- the operations -------------------------------------------------------------------

    async def createMonitor(self, mType, eTypes, pMode, pathString, whitelist, blacklist,
                            timeout, blockSize, ignoreSysFiles, ignoreDirEvents,
                            platformCheck, proxy):
        mtype = _choice("mType", mType, MONITOR_TYPES)
        mode = _choice("pMode", pMode, PATH_MODES)
        if not isinstance(eTypes, (list, tuple)) or not eTypes:
            raise OmeroFSError(f"eTypes must be a non-empty list, got {eTypes!r:.80}")
        kinds: set[str] = set()
        for e in eTypes:
            _choice("eTypes", e, tuple(WATCH_EVENT_TYPES))
            kinds |= ({"Create", "Modify", "Delete"} if e == "All"
                      else {WATCH_EVENT_TYPES[e]})
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or math.isnan(timeout):
            raise OmeroFSError(f"timeout must be a number of seconds, got {timeout!r:.40}")
        if isinstance(blockSize, bool) or not isinstance(blockSize, int) or blockSize < 0:
            raise OmeroFSError(f"blockSize must be an integer >= 0, got {blockSize!r:.40}")
        for name, value in (("ignoreSysFiles", ignoreSysFiles),
                            ("ignoreDirEvents", ignoreDirEvents),
                            ("platformCheck", platformCheck)):
            if not isinstance(value, bool):
                raise OmeroFSError(f"{name} must be true or false, got {value!r:.40}")
        if platformCheck and not sys.platform.startswith("linux"):
            raise OmeroFSError(f"this monitor needs Linux (inotify); platform is {sys.platform}")
        if proxy is not None:
            raise OmeroFSError("proxy must be nil: events go to the creating connection")
        root = self.confinement.resolve(pathString)
        if not os.path.isdir(root):
            raise OmeroFSError(f"not a directory: {pathString}")
        spec = MonitorSpec(mtype, frozenset(kinds), mode, root,
                           _str_list("whitelist", whitelist),
                           _str_list("blacklist", blacklist), float(timeout), blockSize,
                           ignoreSysFiles, ignoreDirEvents)
        peer = current_peer()
        monitor = Monitor(spec, peer, agent=self.agent, flush_ms=self.flush_ms,
                          max_pending=self.max_pending, counters=self.counters)
        self.monitors[monitor.id] = monitor
        self._track(peer)
        log.info("monitor %s: %s %s on %s for %s", monitor.id, mtype, mode, root, peer.label)
        return monitor.id

    async def startMonitor(self, monitorId):
        monitor = self._get(monitorId)
        peer = current_peer()
        if monitor.peer is not peer and monitor.peer.closed.is_set():
            monitor.attach(peer)
            self._track(peer)
        await monitor.start(self._nursery)
        return None

    async def stopMonitor(self, monitorId):
        await self._get(monitorId).stop()
        return None

    async def destroyMonitor(self, monitorId):
        await self._destroy(self._get(monitorId))
        return None

    async def getMonitorState(self, monitorId):
        return self._get(monitorId).state

    async def sync(self, monitorId):
        await self._get(monitorId).sync()
        return None
