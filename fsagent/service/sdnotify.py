"""The sd_notify protocol: telling systemd we are ready, alive, busy or stopping.

Design notes
------------
* **The protocol** (sd_notify(3)): one datagram of newline-separated ``KEY=VALUE``
  assignments, sent to the ``AF_UNIX`` datagram socket named by ``$NOTIFY_SOCKET``.
  A leading ``@`` names a Linux abstract socket (the ``@`` becomes a NUL byte).
  Without ``NOTIFY_SOCKET`` (a terminal, a test, ``Type=simple``) every call is a
  no-op, so the agent never has to ask whether it runs under systemd.
* **Never block, never crash.** The send uses ``MSG_DONTWAIT``: if systemd's queue is
  full we lose one notification rather than stall the event loop that serves the
  mount. A send that fails is logged once at DEBUG and otherwise ignored: the service
  manager going away must not take the mount down with it.
* **Watchdog.** ``WATCHDOG_USEC`` is the deadline; like sd_event we ping every half of
  it. ``WATCHDOG_PID``, when set, names the process the watchdog is meant for; any
  other process (a child that inherited the environment) must stay silent. *What*
  proves liveness is not this module's business: see ``liveness.py`` here.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams to one socket, or does nothing if there is none."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.sent = 0
        self._failed_before = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None,
                         pid: int | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        usec = None
        raw = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        if raw.isdigit() and int(raw) > 0 and watchdog_pid in ("", str(pid)):
            usec = int(raw)
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the deadline), or None: no watchdog."""
        if self.address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2e6

    def _sockaddr(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        return self.address

    def notify(self, *assignments: str) -> bool:
        """Send ``"READY=1"``, ``"STATUS=..."`` etc. in one datagram; True if sent."""
        if self.address is None:
            return False
        for a in assignments:
            if "=" not in a or "\n" in a:
                raise ValueError(f"not a single-line KEY=VALUE assignment: {a!r}")
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message, socket.MSG_DONTWAIT, self._sockaddr())
        except OSError as e:
            if not self._failed_before:
                log.debug("sd_notify to %s failed: %s", self.address, e)
                self._failed_before = True
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))
