"""The agent: one trio nursery that owns the mount and every service.

Design notes
------------
* **Components.** Each capability (uploads, jobs, the RPC server, the monitor) is a
  ``Component`` (``fsagent/component.py``): it may add entries to the mounted root,
  contribute a section to ``status``, run long-lived tasks in the agent's nursery
  (``serve``), and make its state durable at shutdown (``checkpoint``).
  ``build_components`` is the one list of them; adding a capability is adding a line
  there. The agent is the components' ``Host``: they reach it only through that
  protocol, and import nothing of this module, so the imports run one way.
* **Start-up order.** Lock the state dir (one agent per state), open and migrate the
  database, clear a stale mount, build the tree, mount, start the services, and only
  then log "mounted": nothing is served before the state it serves is ready.
* **Shutdown order** (SIGTERM or SIGINT): ``pyfuse3.terminate()`` stops taking new
  requests while in-flight ones finish (bounded by ``shutdown_timeout``, after which
  they are cancelled); the services are cancelled; every component checkpoints
  (shielded from cancellation); the database is flushed; the filesystem is
  unmounted; the run is marked clean. A second signal skips the wait. If the mount
  vanishes underneath us (an admin's ``fusermount3 -u``), the same path runs.
* **Blocking work** goes through ``agent.to_thread`` (a shared CapacityLimiter of
  ``worker_threads``), so no component can starve the event loop or the machine.
* **Under systemd** (``fsagent/service/liveness.py``): READY=1 once the mount answers, a
  watchdog fed by a real round trip through the mount, STATUS= from ``counts()``,
  STOPPING=1 as soon as shutdown begins. **Metrics**: ``agent.metrics`` is the one
  registry, served as ``MOUNT/metrics`` (and over HTTP with ``metrics_listen``);
  components register theirs in ``__init__``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from . import __version__
from .component import Component, JobHandOff
from .config import Config
from .db import Database
from .events import EventHub
from .fileserver import FileServer
from .fs import Directory, DynamicFile, Filesystem, Node
from .jobs import JobsComponent
from .monitor import MonitorServer
from .repository import RepositoryComponent
from .rpc import RpcComponent
from .service import liveness, metrics_http
from .service.agent_metrics import last_checkpoint, record_checkpoint, register_agent_metrics
from .service.metrics import CONTENT_TYPE, Registry
from .service.mountpoint import lock_state_dir, prepare_mount_point
from .service.sdnotify import Notifier
from .uploads import UploadsComponent

__all__ = ["Agent", "run_agent"]

log = logging.getLogger(__name__)

# How long a stat of status/metrics may report the size of the last stat's rendering
# (``fs.DynamicFile``); a read always renders afresh.
STATUS_STAT_SECONDS = 0.25
FUSE_MAX_TASKS = 1000  # concurrent FUSE requests (blocking `wait` reads included)


def build_components(agent: Agent) -> list[Component]:
    """Every capability of the agent, in start-up order."""
    return [
        UploadsComponent(agent),
        FileServer(agent),
        MonitorServer(agent),
        RepositoryComponent(agent),  # before jobs: imports push through it
        JobsComponent(agent),
        RpcComponent(agent),  # last: serves the rpc_methods() of everything above
    ]


class Agent:
    """The running agent: owns the nursery, the mount and the state; the ``Host``
    (``fsagent/component.py``) its components are given."""

    def __init__(self, config: Config):
        self.config = config
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.pid = os.getpid()
        self.limiter = trio.CapacityLimiter(config.worker_threads)
        self.db: Database | None = None
        self.fs: Filesystem | None = None
        self.components: list[Component] = []
        self.mounted = trio.Event()
        self.serving = trio.Event()  # the mount answered a read: READY=1 was sent
        self.shutting_down = trio.Event()
        self._lock_fd: int | None = None
        self.metrics = Registry()
        self.events = EventHub()  # uploads and jobs publish, RPC connections subscribe
        self.notifier = Notifier.from_environment()
        self.metrics_address: str | None = None  # bound metrics_listen, once listening
        self.last_checkpoint: tuple[float, float] | None = None  # (finished, seconds)
        self._stopping_announced = False

    # -- the Host protocol (fsagent/component.py): what components use -----------------

    async def to_thread(self, fn: Callable, *args: Any) -> Any:
        """Run blocking work in a worker thread under the agent's capacity limit."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    @property
    def jobs(self) -> JobHandOff | None:
        """The one route into the job engine (the component named "jobs"): uploads submit
        an "import" job through it when a file is verified, and cancel or look up that
        job through it later. None when the agent runs without a job engine."""
        try:
            return self.component("jobs")
        except KeyError:
            return None

    @property
    def repository(self) -> RepositoryComponent | None:
        """The repository component when imports push to an object store; None for the
        local backend (or without one)."""
        try:
            repository = self.component("repository")
        except KeyError:
            return None
        return repository if repository.pushes else None

    def upload_task(self, task_id: str) -> dict[str, Any] | None:
        """What the uploads component knows of upload task ``task_id`` now (import jobs
        follow their upload by ID: it may have been renamed, rewritten or removed since
        the job was submitted); None without an uploads component or for an unknown ID."""
        try:
            uploads = self.component("uploads")
        except KeyError:
            return None
        return uploads.describe_task(task_id)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def store_space(self) -> tuple[int | None, int | None]:
        """(free, total) bytes of the state directory's filesystem, or (None, None)."""
        try:
            st = os.statvfs(self.config.state_dir)
        except OSError:
            return None, None
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def status(self) -> dict[str, Any]:
        free, total = self.store_space()
        out: dict[str, Any] = {
            "version": __version__,
            "pid": self.pid,
            "started": self.started_wall,
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "mount": str(self.config.mount),
            "state_dir": str(self.config.state_dir),
            "socket": str(self.config.socket_path),
            "store_free_bytes": free,
            "store_total_bytes": total,
            "previous_run_clean": self.db.previous_run_clean if self.db else None,
            "metrics_listen": self.metrics_address,
        }
        for c in self.components:
            section = c.status()
            if section:
                out[c.name] = section
        return out

    def render_status(self) -> bytes:
        return (json.dumps(self.status(), indent=2, sort_keys=True) + "\n").encode()

    def status_line(self) -> str:
        """One line for systemd's STATUS=: where we serve and the components' counts."""
        parts = [f"{name} {n}" for c in self.components for name, n in c.counts().items()]
        parts.append(f"{self.fs.open_handles} open files" if self.fs else "starting")
        errors = sum(self.fs.errors.values()) if self.fs else 0
        if errors:
            parts.append(f"{errors} FUSE errors")
        text = f"serving {self.config.mount}: " + ", ".join(parts)
        return text.replace("\n", " ")

    def _announce_stopping(self, why: str) -> None:
        if not self._stopping_announced:
            self._stopping_announced = True
            self.notifier.stopping(why)

    # -- lifecycle ------------------------------------------------------------------------

    def _prepare(self) -> None:
        cfg = self.config
        self._lock_fd = lock_state_dir(cfg.state_dir)
        prepare_mount_point(cfg.mount)
        cfg.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database.open(cfg.database_path)
        self.db.begin_run(self.pid, __version__)
        if not self.db.previous_run_clean:
            log.warning("the previous agent did not stop cleanly; recovering")
        self.last_checkpoint = self.db.run_sync(last_checkpoint)
        self.components = build_components(self)
        entries: dict[bytes, Node] = {
            # A cat stats these three times before it opens: render them once for that.
            b"status": StatusFile(self.render_status, self.pid),
            b"metrics": DynamicFile(self.metrics.render, reuse_size_for=STATUS_STAT_SECONDS),
        }
        for component in self.components:
            for name, node in component.root_entries().items():
                if name in entries:
                    raise RuntimeError(f"{component.name} adds {name!r} twice to the root")
                entries[name] = node
        self.fs = Filesystem(Directory(entries), statfs_path=cfg.state_dir)
        for node in entries.values():
            self.fs.register(node, permanent=True)
        register_agent_metrics(self)

    def _mount_options(self) -> set[str]:
        options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
        options |= {"fsname=fsagent", "subtype=fsagent"}
        if self.config.allow_other:
            options.add("allow_other")
        return options

    async def run(self) -> None:
        cfg = self.config
        # Bind before touching any state: a busy port is a config error, nothing mounted.
        listeners = await metrics_http.bind(cfg.metrics_listen) if cfg.metrics_listen else []
        # A subprocess started from the event loop (an import_command) must not vfork:
        # vfork suspends this thread until the child execs, and the child first closes
        # its inherited descriptors; if one is a file on our own mount (a worker thread
        # reading it), that close waits for a FLUSH only this thread can answer. A plain
        # fork leaves the loop free to answer. (CPython's documented switch, 3.10+.)
        subprocess._USE_VFORK = False
        self._prepare()
        pyfuse3.init(self.fs, str(cfg.mount), self._mount_options())
        unmounted = False
        try:
            self.mounted.set()
            async with trio.open_nursery() as nursery:
                for component in self.components:
                    await nursery.start(component.serve)
                nursery.start_soon(self.db.flush_periodically, cfg.db_flush_seconds)
                nursery.start_soon(self.events.run)  # rate-limited events, when due
                if listeners:
                    self.metrics_address = metrics_http.bound_address(listeners)
                    await nursery.start(metrics_http.serve, listeners, self.metrics.render,
                                        CONTENT_TYPE)
                await nursery.start(liveness.supervise, self, self.notifier)
                fuse_done = trio.Event()
                nursery.start_soon(self._fuse_main, fuse_done, nursery.cancel_scope)
                nursery.start_soon(self._watch_signals, fuse_done, nursery.cancel_scope)
                log.info("mounted at %s (state %s, pid %d)", cfg.mount, cfg.state_dir,
                         self.pid)
        finally:
            with trio.CancelScope(shield=True):
                self.shutting_down.set()
                self._announce_stopping("checkpointing and unmounting")
                checkpoint_started = time.monotonic()
                for component in reversed(self.components):
                    try:
                        await component.checkpoint()
                    except Exception:
                        log.exception("checkpoint of %s failed", component.name)
                await self.db.flush()
                checkpoint_seconds = time.monotonic() - checkpoint_started
                try:
                    pyfuse3.close(unmount=True)
                    unmounted = True
                except Exception:
                    log.exception("unmounting %s failed", cfg.mount)
                if unmounted:
                    self.db.run_sync(record_checkpoint, self.db.run_id, checkpoint_seconds)
                    self.db.end_run()
                self.db.close()
                log.info("unmounted %s; stopped cleanly (checkpoint took %.3fs)", cfg.mount,
                         checkpoint_seconds)

    async def _fuse_main(self, fuse_done: trio.Event, cancel_scope: trio.CancelScope) -> None:
        try:
            # Each blocked read of a jobs/<id>/wait file holds one request task until its
            # job ends; pyfuse3's default of 99 would let 99 waiters stall the mount.
            await pyfuse3.main(max_tasks=FUSE_MAX_TASKS)
        finally:
            fuse_done.set()
            if not self.shutting_down.is_set():
                log.info("FUSE session ended (mount removed externally?); shutting down")
            cancel_scope.cancel()

    async def _watch_signals(self, fuse_done: trio.Event, cancel_scope: trio.CancelScope):
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: finishing in-flight requests, then unmounting",
                         signal.Signals(signum).name)
                self._announce_stopping(f"{signal.Signals(signum).name}: stopping")
                self.shutting_down.set()
                pyfuse3.terminate()
                break
            # Wait for in-flight requests, but not forever; a second signal cuts it short.
            with trio.move_on_after(self.config.shutdown_timeout):
                async with trio.open_nursery() as waiters:
                    async def second_signal():
                        async for _ in signals:
                            log.warning("second signal: not waiting for in-flight requests")
                            waiters.cancel_scope.cancel()
                    waiters.start_soon(second_signal)
                    await fuse_done.wait()
                    waiters.cancel_scope.cancel()
            cancel_scope.cancel()


async def run_agent(config: Config) -> None:
    await Agent(config).run()


class StatusFile(DynamicFile):
    """``MOUNT/status``; its ``user.fsagent.pid`` xattr is what readiness probes read.

    The agent must never hold a file descriptor on its own mount: if it is killed while
    one is open, the kernel closes that descriptor during exit with a FLUSH that only
    this (dying) process could answer, and the exit hangs in uninterruptible sleep for
    good, keeping the mount wedged. A getxattr reaches our loop (xattrs are never cached)
    without leaving a descriptor behind, so ``liveness`` uses it instead of reading.
    """

    PID_XATTR = b"user.fsagent.pid"

    def __init__(self, render, pid: int):
        super().__init__(render, reuse_size_for=STATUS_STAT_SECONDS)
        self.pid = pid

    async def getxattr(self, name: bytes, ctx) -> bytes:
        if name == self.PID_XATTR:
            return str(self.pid).encode()
        return await super().getxattr(name, ctx)

    async def listxattr(self, ctx) -> list[bytes]:
        return [self.PID_XATTR]
