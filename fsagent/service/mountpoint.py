"""Preparing the mount point and the state directory before anything is mounted.

Design notes
------------
* **One agent per state dir.** ``lock_state_dir`` takes an ``flock`` on
  ``STATE/agent.lock`` for the life of the process. The kernel drops it when the
  process dies, however it dies, so a lock we can take means no agent is alive there.
* **Stale mounts.** After ``kill -9`` the kernel keeps the mount, and every request
  fails with ENOTCONN ("Transport endpoint is not connected"). The kernel may still
  answer ``stat`` from its attribute cache, so liveness is judged by ``listdir``
  (opendir is never cached): ENOTCONN/ECONNABORTED means stale, and a lazy unmount
  (``fusermount3 -uz``, as systemd's ExecStartPre also does) clears it. A live mount
  of anything else is never touched: that is an error for the operator.
* **Hung connections.** A lazy unmount only detaches the name: processes already
  blocked in a request on a connection whose server will never answer (a server
  stuck in uninterruptible sleep, or a /dev/fuse descriptor leaked to a child) stay
  blocked. ``abort_connection`` writes to the connection's ``abort`` file in fusectl
  (``/sys/fs/fuse/connections/<minor>/``, found from mountinfo, never by touching the
  mount), which fails every pending and future request with ENOTCONN.
* Every problem is a ``MountPointError`` naming the setting, so the CLI can print
  one line and exit 2 before mounting.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess
from pathlib import Path

from ..config import ConfigError

__all__ = ["MountPointError", "lock_state_dir", "prepare_mount_point", "is_mount_point",
           "lazy_unmount", "abort_connection"]

log = logging.getLogger(__name__)

_STALE_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}


class MountPointError(ConfigError):
    """The mount point or state dir cannot be used. One-line message, names the setting."""


def lock_state_dir(state_dir: Path) -> int:
    """Create the state dir, take its lock, return the lock fd (keep it open)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise MountPointError("state_dir", f"cannot use {state_dir}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise MountPointError(
            "state_dir", f"{state_dir} is in use by another fsagent (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entry(path: Path) -> dict | None:
    """The /proc/self/mountinfo entry whose mount point is ``path`` (last one wins)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape_mountinfo(fields[4]) == str(path):
                fstype, source = (right.split() + ["", ""])[:2]
                found = {"fstype": fstype, "source": source, "device": fields[2]}
    return found


def is_mount_point(path: Path) -> bool:
    return mount_entry(path) is not None


def lazy_unmount(path: Path) -> None:
    """Detach a mount even if busy: ``fusermount3 -uz``, or ``umount -l`` as root."""
    commands = []
    if shutil.which("fusermount3"):
        commands.append(["fusermount3", "-uz", str(path)])
    if os.geteuid() == 0 and shutil.which("umount"):
        commands.append(["umount", "-l", str(path)])
    errors = []
    for argv in commands:
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode == 0 and not is_mount_point(path):
            return
        errors.append(f"{argv[0]}: {result.stderr.strip() or 'exit ' + str(result.returncode)}")
    raise MountPointError("mount", f"cannot clear stale mount at {path}: {'; '.join(errors)}")


FUSECTL = Path("/sys/fs/fuse/connections")


def abort_connection(path: Path) -> bool:
    """Abort the FUSE connection mounted at ``path``; True if there was one to abort.

    Needs root (fusectl is root-only) and mounts fusectl if nothing has. Never stats
    ``path`` itself: on a hung connection that would block the caller too.
    """
    entry = mount_entry(path)
    if entry is None or not entry["fstype"].startswith("fuse"):
        return False
    minor = entry["device"].partition(":")[2]
    if not (FUSECTL / minor).exists() and os.geteuid() == 0:
        # Usually systemd mounts fusectl at boot; containers often do not.
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)],
                       capture_output=True)
    try:
        with open(FUSECTL / minor / "abort", "w") as f:
            f.write("1")
    except OSError as e:
        log.warning("cannot abort the FUSE connection of %s: %s", path, e.strerror)
        return False
    return True


def prepare_mount_point(mount: Path) -> None:
    """Make ``mount`` an empty directory we can mount on, clearing a stale fsagent mount."""
    entry = mount_entry(mount)
    if entry is not None:
        try:
            os.listdir(mount)
        except OSError as e:
            if e.errno not in _STALE_ERRNOS:
                raise MountPointError("mount", f"{mount}: {e.strerror}") from None
            log.warning("clearing stale mount at %s (%s) left by a crashed agent",
                        mount, e.strerror)
            lazy_unmount(mount)
        else:
            raise MountPointError(
                "mount", f"{mount} is already mounted ({entry['fstype']} from "
                f"{entry['source']}); is another fsagent running?"
            )
    try:
        mount.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise MountPointError("mount", f"{mount} exists and is not a directory") from None
    except OSError as e:
        raise MountPointError("mount", f"cannot create {mount}: {e.strerror}") from None
    if not mount.is_dir():
        raise MountPointError("mount", f"{mount} is not a directory")
    try:
        entries = os.listdir(mount)
    except OSError as e:
        raise MountPointError("mount", f"cannot read {mount}: {e.strerror}") from None
    if entries:
        raise MountPointError(
            "mount", f"{mount} is not empty ({len(entries)} entries); files there would be "
            "hidden by the mount"
        )
    if not os.access(mount, os.W_OK | os.X_OK):
        raise MountPointError("mount", f"{mount} is not writable by uid {os.getuid()}")
