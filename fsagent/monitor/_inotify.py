"""The inotify adapter: one inotify instance per monitor, read from trio without a thread.

Design notes
------------
* One instance per monitor keeps monitors independent: an overflow, a watch that
  fails or a client that reads slowly affects only its own monitor.
* The descriptor is non-blocking and awaited with ``trio.lowlevel.wait_readable``;
  reads take everything queued (``FIONREAD``), so one wake-up drains a burst.
* ``walk`` runs in a worker thread: for each directory it adds the watch *first*,
  then lists it, so nothing created in between is missed (the translator sorts out
  what the listing and the queued events both saw). A failed watch (``ENOSPC`` at the
  watch limit, ``EACCES``) is recorded, not raised: the monitor reports it and keeps
  serving the rest. Files of a new directory that some process still has open for
  writing (a read lease is refused) are marked, so they are reported at their close
  rather than at the listing. ``inotify_add_watch`` on an already watched directory returns its
  existing descriptor, which is what lets a rescan rebuild the watch table in place.
* **No subprocess while the mount is served.** inotify_simple loads libc on its first
  ``INotify()`` with ``ctypes.util.find_library``, which runs ``ldconfig -p``. Run from
  the event loop, that fork deadlocks the agent if any of its threads holds a file on
  the mount open (the readiness probe does): the vforked child closes its inherited
  copy, closing means a FUSE FLUSH, and the loop that would answer it waits for the
  child. ``load_library`` makes that first ``INotify()`` at start-up, before mounting.
"""

from __future__ import annotations

import errno
import fcntl
import os

import trio
from inotify_simple import INotify

from ._translate import WATCH_MASK, WalkResult

__all__ = ["InotifyWatcher", "walk", "load_library"]


def load_library() -> None:
    """Let inotify_simple find libc now (it forks ``ldconfig`` once); before mounting."""
    INotify().close()


class InotifyWatcher:
    def __init__(self):
        self._inotify = INotify(nonblocking=True)

    def fileno(self) -> int:
        return self._inotify.fileno()

    def add_watch(self, path: str) -> int:
        return self._inotify.add_watch(path, WATCH_MASK)

    def rm_watch(self, wd: int) -> None:
        try:
            self._inotify.rm_watch(wd)
        except OSError:
            pass  # already gone (its IN_IGNORED is queued or was consumed)

    def read_now(self) -> list:
        """Every event queued right now (possibly none); never blocks."""
        try:
            return self._inotify.read(timeout=0)
        except BlockingIOError:
            return []

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self._inotify.fileno())

    def close(self) -> None:
        try:
            trio.lowlevel.notify_closing(self._inotify.fileno())
        except RuntimeError:
            pass  # not in a trio thread
        self._inotify.close()


def open_for_writing(path: str) -> bool:
    """True if some process has ``path`` open for writing, by asking for a read lease
    (which the kernel refuses with EAGAIN exactly then). Unknown (no lease support, not
    our file) counts as False. A writer opening the file in the microseconds we hold
    the lease waits for our release; its lease-break SIGIO is ignored (see
    ``MonitorServer``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return e.errno == errno.EAGAIN
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def walk(watcher: InotifyWatcher, top: str, *, recurse: bool, excluded,
         with_mtime: bool = False, check_writers: bool = False) -> WalkResult:
    """Watch and list ``top`` (and, if ``recurse``, every directory below it)."""
    result = WalkResult(top)
    stack = [top]
    while stack:
        directory = stack.pop()
        if directory == top or recurse:
            try:
                wd = watcher.add_watch(directory)
            except OSError as e:
                result.failures.append((directory, e.errno, e.strerror or str(e)))
                continue
            result.watched.append((directory, wd))
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            continue  # vanished or unreadable after the watch: its events tell the rest
        for entry in entries:
            path = entry.path
            if excluded(path):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                mtime = entry.stat(follow_symlinks=False).st_mtime_ns if with_mtime else 0
            except OSError:
                continue
            result.entries.append((path, is_dir, mtime))
            if check_writers and not is_dir and open_for_writing(path):
                result.writing.add(path)
            if is_dir and recurse:
                stack.append(path)
    return result
