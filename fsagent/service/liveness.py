"""Telling the service manager the truth: ready, alive, what we are doing.

Design notes
------------
* **Ready means answering.** The kernel can answer ``stat`` of a dead mount from its
  caches (FIELD-NOTES §3), and ``pyfuse3.init`` returning only means the mount call
  succeeded. READY=1 is sent once a worker thread has read the ``user.fsagent.pid``
  xattr of ``MOUNT/status`` through the kernel (xattrs are never cached) and found
  this process's pid: the full path kernel → FUSE session → event loop → node → reply
  works. Probes never open a file on our own mount: a descriptor open there when we
  are killed would hang our exit forever on a FLUSH nobody can answer
  (``fsagent.agent.StatusFile``).
* **Alive means the loop turns and the mount answers.** Each watchdog tick runs on the
  event loop (a blocked loop cannot tick) and then ``stat``s ``MOUNT/status`` from a
  worker thread (``DynamicFile`` has ``attr_timeout = 0``, so every stat is a
  ``getattr`` our loop must answer). Only a probe answered within the interval earns
  a WATCHDOG=1. A probe thread stuck in the kernel is never joined twice: probes hold
  a ``CapacityLimiter(1)``, so a wedged mount stops the pings instead of piling up
  threads. systemd then kills us (``WatchdogSignal=``, SIGABRT: faulthandler prints
  every thread's stack to the journal) and ``Restart=on-failure`` brings us back.
* **STATUS=** is one short line built from the agent's counts and each component's
  ``counts()``; it is re-sent only when it changes, at most every ``STATUS_INTERVAL``.
* **Proving the watchdog.** ``FSAGENT_DEBUG_STALL_SECONDS=N`` in the environment (off
  unless set; documented in the README) makes SIGUSR2 block the event loop for N
  seconds with a plain ``time.sleep``: the tests use it to show the pings stop, and
  an operator can use it once to see systemd restart a hung agent.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Protocol

import trio

from .sdnotify import Notifier

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["supervise", "Supervised", "DEBUG_STALL_ENV", "STATUS_INTERVAL"]

log = logging.getLogger(__name__)

DEBUG_STALL_ENV = "FSAGENT_DEBUG_STALL_SECONDS"
STATUS_INTERVAL = 1.0
READY_RETRY = 0.05


class Supervised(Protocol):
    """What liveness needs of the agent it supervises (``fsagent.agent.Agent``)."""

    config: Config  # the mount point: probes go through MOUNT/status
    pid: int  # what MOUNT/status's user.fsagent.pid must carry for READY=1
    serving: trio.Event  # set here once READY=1 is sent

    def status_line(self) -> str:
        """The one-line STATUS= text (may raise: a component's counts() bug)."""
        ...


def _read_status_pid(path: str) -> int | None:
    try:
        return int(os.getxattr(path, "user.fsagent.pid"))
    except (OSError, ValueError):
        return None


async def _probe(limiter: trio.CapacityLimiter, fn, *args):
    # abandon_on_cancel: a probe stuck in the kernel must not hold up shutdown; the
    # limiter stays held until that thread returns, so no second probe piles up.
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=True)


async def wait_until_serving(agent: Supervised, limiter: trio.CapacityLimiter) -> None:
    """Return once ``MOUNT/status``, read through the kernel, carries our pid."""
    path = os.fspath(agent.config.mount / "status")
    while await _probe(limiter, _read_status_pid, path) != agent.pid:
        await trio.sleep(READY_RETRY)


def _stat_ok(path: str) -> bool:
    try:
        os.stat(path)
    except OSError:
        return False
    return True


async def _watchdog(agent: Supervised, notifier: Notifier, limiter: trio.CapacityLimiter,
                    interval: float) -> None:
    path = os.fspath(agent.config.mount / "status")
    deadline = trio.current_time()
    while True:
        deadline += interval
        answered = False
        with trio.move_on_at(deadline):
            answered = await _probe(limiter, _stat_ok, path)
        if answered:
            notifier.watchdog()
        else:
            log.warning("liveness probe of %s got no answer within %.1fs; "
                        "not pinging the watchdog", path, interval)
        # After a stall, resume from now rather than firing the missed ticks at once.
        deadline = max(deadline, trio.current_time())
        await trio.sleep_until(deadline)


def _status_line(agent: Supervised) -> str:
    # A component's counts() failing is its bug, logged; it must not stop the agent.
    try:
        return agent.status_line()
    except Exception:
        log.exception("building the STATUS= line failed")
        return f"serving {agent.config.mount}"


async def _status_updates(agent: Supervised, notifier: Notifier, last: str) -> None:
    while True:
        await trio.sleep(STATUS_INTERVAL)
        line = _status_line(agent)
        if line != last:
            notifier.status(line)
            last = line


async def _debug_stall(seconds: float) -> None:
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        async for _ in signals:
            log.warning("debug: SIGUSR2: blocking the event loop for %gs (%s is set)",
                        seconds, DEBUG_STALL_ENV)
            time.sleep(seconds)  # deliberately blocking: that is the point
            log.warning("debug: event loop unblocked")


def _debug_stall_seconds() -> float | None:
    raw = os.environ.get(DEBUG_STALL_ENV)
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a number", DEBUG_STALL_ENV, raw)
        return None
    return seconds if seconds > 0 else None


async def supervise(agent: Supervised, notifier: Notifier, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Readiness, watchdog and STATUS= for the agent; runs until cancelled."""
    task_status.started()
    limiter = trio.CapacityLimiter(1)
    stall = _debug_stall_seconds()
    async with trio.open_nursery() as nursery:
        if stall is not None:
            nursery.start_soon(_debug_stall, stall)
        await wait_until_serving(agent, limiter)
        line = _status_line(agent)
        notifier.ready(line)
        agent.serving.set()
        log.debug("mount answers; told the service manager READY=1")
        interval = notifier.watchdog_interval
        if interval is not None:
            nursery.start_soon(_watchdog, agent, notifier, limiter, interval)
        if notifier.enabled:
            nursery.start_soon(_status_updates, agent, notifier, line)
