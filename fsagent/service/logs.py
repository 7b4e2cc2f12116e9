"""Log lines on stderr that read well in a terminal and in the journal.

Design notes
------------
* **Under systemd** stderr is a stream into journald, which timestamps each line
  itself and understands a leading ``<N>`` as the syslog priority (sd-daemon(3)).
  So when stderr *is* that stream we write ``<N>logger: message`` and no timestamp;
  ``journalctl -p warning -u fsagent`` then filters by our levels. "Is that stream"
  is decided the documented way: ``$JOURNAL_STREAM`` holds ``device:inode`` of the
  journal connection, and it must match ``fstat(2)``, or a child that inherited the
  variable but has stderr redirected to a file would write priorities into it.
* **Elsewhere** (a terminal, a test, a file): ``time LEVEL logger: message``.
* **One record, one entry.** journald splits on newlines, so every line of a
  multi-line record (a traceback) carries the record's prefix: a traceback stays at
  error priority instead of turning into info noise.
* **What is logged at INFO** is a policy the rest of the code follows: one line per
  event an operator cares about (mounted, unmounted, an upload completed or failed, a
  job changed state, a monitor error), never per FUSE request or per write. pyfuse3
  logs every request at DEBUG, so it is held at INFO or quieter.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

__all__ = ["configure_logging", "stderr_is_journal", "SYSLOG_PRIORITY"]

# logging level -> syslog priority (sd-daemon.h SD_ERR, SD_WARNING, ...).
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
    logging.DEBUG: 7,
}


def _priority(levelno: int) -> int:
    for level in sorted(SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return 7


def stderr_is_journal(stream: TextIO | None = None, environ=None) -> bool:
    """True if ``stream`` (default stderr) is the journal connection systemd gave us."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``, with the prefix on every line of the record."""

    def __init__(self):
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int, stream: TextIO | None = None) -> logging.Handler:
    """Send every record at ``level`` or above to stderr in the right format."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TERMINAL_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # pyfuse3 logs every request at DEBUG; keep it one notch quieter than ours.
    logging.getLogger("pyfuse3").setLevel(max(level, logging.INFO))
    return handler
