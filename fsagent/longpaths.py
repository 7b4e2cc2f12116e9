"""Syscalls on paths of any length: ``at``, ``BackingTree`` and friends.

Design notes
------------
* **The problem.** ``MOUNT/uploads/REL`` lives at ``ROOT/REL`` on the state disk. The
  kernel refuses a path argument of ``PATH_MAX`` (4,096) bytes or more with
  ENAMETOOLONG, but a client never hands it one: it walks the mount one name at a time
  (FUSE lookups), and with ``chdir`` and relative names (``rsync``, ``tar``, pjdfstest
  do it) ``REL`` can be any length a local disk allows. So ``ROOT/REL`` can be too long
  for a syscall even when every step the client took was fine. The uploads tree
  (``uploads/_nodes.py``, ``uploads/_component.py``) and the jobs that read it
  (``jobs/_kinds.py``: import, archive, verify) go through this module.
* **Fast path first.** Almost every path is short: when it fits, it is used as is, and
  a request costs exactly the syscalls it cost before (no extra ``open``).
* **Long paths.** Otherwise the parent directory is opened by walking it in pieces that
  each fit (cut at ``/``), each opened relative to the descriptor of the one before
  (``openat`` with ``O_PATH | O_DIRECTORY``), and the object is named
  ``/proc/self/fd/N/NAME``: the kernel resolves the ``N`` magic link to that very
  directory, so the short path means ``PARENT/NAME`` exactly. One form then serves
  every syscall, including the ones Python offers no ``dir_fd`` for (xattrs,
  ``truncate``) and ``lgetxattr`` on a symlink, which no ``O_PATH`` descriptor allows.
  The descriptor is held while the caller uses the path (``at`` is a context manager)
  and closed after; an object opened meanwhile stays open. Names on the way are
  resolved as in the absolute path (symlinks followed), so the answer is the one the
  long path would get if the kernel took it.
* **Errors stay the disk's.** A missing directory on the way is ENOENT, a file on the
  way ENOTDIR, a single name over ``NAME_MAX`` ENAMETOOLONG: what a local disk answers
  for the client's own path.
* **Walks** are iterative and hold one directory descriptor at a time, so neither the
  depth of a tree nor its path lengths meet the recursion or the descriptor limit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

__all__ = ["PATH_MAX", "at", "open_directory", "lstat", "stat_follow", "islink", "exists",
           "realpath", "walk", "BackingTree"]

PATH_MAX = 4096  # Linux: a path argument must be shorter than this, its NUL included
_DIRECTORY_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # as the kernel's path walk


# FS_IOC_GETVERSION, _IOR('v', 1, long): the kernel writes a 32-bit generation into the
# (long-sized) buffer.
_FS_IOC_GETVERSION = 0x80087601


def _inode_generation(fd: int) -> int | None:
    try:
        raw = fcntl.ioctl(fd, _FS_IOC_GETVERSION, bytes(8))
    except OSError:  # ENOTTY, EOPNOTSUPP, EINVAL: this filesystem does not keep one
        return None
    return struct.unpack_from("I", raw)[0]  # native order, at the start of the buffer


def _too_long() -> OSError:
    return OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))


def open_directory(path: bytes) -> int:
    """An ``O_PATH`` descriptor of the directory at absolute ``path``, any length (the
    caller closes it)."""
    fd = None
    try:
        while path:
            if len(path) < PATH_MAX:
                piece, path = path, b""
            else:
                cut = path.rfind(b"/", 1, PATH_MAX - 1)
                if cut <= 0:
                    raise _too_long()  # one name longer than any filesystem allows
                piece, path = path[:cut], path[cut + 1:]
            following = os.open(piece, _DIRECTORY_FLAGS, dir_fd=fd)
            if fd is not None:
                os.close(fd)
            fd = following
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return fd


class at:
    """``with at(path) as short: os.lstat(short)``: ``short`` names absolute ``path``
    (bytes or str, any length) until the block ends."""

    __slots__ = ("_path", "_fd")

    def __init__(self, path: bytes | str | os.PathLike):
        self._path = path
        self._fd = None

    def __enter__(self):
        path = os.fspath(self._path)
        raw = os.fsencode(path)
        if len(raw) < PATH_MAX:
            return path
        parent, _, name = raw.rpartition(b"/")
        self._fd = open_directory(parent or b"/")
        short = b"/proc/self/fd/%d/%s" % (self._fd, name)
        return short if isinstance(path, bytes) else os.fsdecode(short)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lstat(path) -> os.stat_result:
    with at(path) as short:
        return os.lstat(short)


def stat_follow(path) -> os.stat_result:
    """``os.stat`` (symlinks followed) at any length."""
    with at(path) as short:
        return os.stat(short)


def islink(path) -> bool:
    """``os.path.islink`` at any length."""
    try:
        return stat.S_ISLNK(lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def exists(path) -> bool:
    """``os.path.exists`` at any length (a dangling symlink does not exist)."""
    try:
        stat_follow(path)
    except (OSError, ValueError):
        return False
    return True


def realpath(path: str) -> str:
    """``os.path.realpath`` (non-strict) of an absolute ``path`` of any length."""
    if len(os.fsencode(path)) < PATH_MAX:
        return os.path.realpath(path)
    resolved = "/"
    pending = list(reversed(path.split("/")))
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, name)
        try:
            st = lstat(candidate)
        except OSError:
            st = None  # as realpath: what cannot be looked at is taken as it is
        if st is None or not stat.S_ISLNK(st.st_mode):
            resolved = candidate
            continue
        links += 1
        if links > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        with at(candidate) as short:
            target = os.readlink(short)
        if target.startswith("/"):
            resolved = "/"
        pending.extend(reversed(target.split("/")))
    return resolved


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(top)`` at any depth and length: top-down (prune by editing the yielded
    ``dirnames``), a symlink to a directory listed with the directories but never
    descended into, an unreadable directory skipped."""
    pending = [top]
    while pending:
        directory = pending.pop()
        try:
            with at(directory) as short:
                fd = os.open(short, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        dirnames, filenames, links = [], [], set()
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir()  # as os.walk: a link to a directory is one
                        if is_dir and entry.is_symlink():
                            links.add(entry.name)
                    except OSError:
                        is_dir = False
                    (dirnames if is_dir else filenames).append(entry.name)
        finally:
            os.close(fd)
        yield directory, dirnames, filenames
        pending.extend(os.path.join(directory, d) for d in reversed(dirnames)
                       if d not in links)


class BackingTree:
    """A directory tree addressed by paths relative to its ``root`` (``b""`` is the
    root itself); each method raises ``OSError`` as its syscall would."""

    def __init__(self, root: bytes):
        self.root = root

    def path(self, rel: bytes) -> bytes:
        """The absolute path: for messages, and for syscalls through ``at``."""
        return self.root + b"/" + rel if rel else self.root

    def at(self, rel: bytes) -> at:
        """``with tree.at(rel) as path``: a path for ``rel`` any syscall accepts."""
        return at(self.root + b"/" + rel if rel else self.root)

    def lstat(self, rel: bytes) -> os.stat_result:
        with self.at(rel) as path:
            return os.lstat(path)

    def exists(self, rel: bytes) -> bool:
        """Whether something is there (a symlink counts, dangling or not)."""
        try:
            self.lstat(rel)
        except OSError:
            return False
        return True

    def any_exists(self, rels: list[bytes]) -> bool:
        """Whether anything is at any of ``rels`` (``exists`` for each, stopping at the
        first): one ``lstat`` per name, with no context manager per name below PATH_MAX
        (the uploads pipeline asks this for every file it completes)."""
        for rel in rels:
            path = self.root + b"/" + rel if rel else self.root
            try:
                if len(path) < PATH_MAX:
                    os.lstat(path)
                else:
                    self.lstat(rel)
            except OSError:
                continue
            return True
        return False

    def open(self, rel: bytes, flags: int = os.O_RDONLY, mode: int = 0o777) -> int:
        with self.at(rel) as path:
            return os.open(path, flags, mode)

    def identity(self, rel: bytes) -> tuple[os.stat_result, int | None]:
        """``(lstat, inode generation)`` of the file at ``rel``, from one descriptor.

        An inode number alone does not name a file: once a file is removed its number
        is free, and ext4 hands it to the next file created nearby. The generation
        (``FS_IOC_GETVERSION``: ext4, XFS, btrfs) is drawn anew each time an inode is
        allocated, so (number, generation) does. ``None`` where it cannot be had: a
        filesystem without the ioctl (tmpfs), a file the agent may not open, or not a
        regular file (never opened: a FIFO would block). Raises ``OSError`` only as
        ``lstat`` would.
        """
        try:
            fd = self.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                           | os.O_CLOEXEC)
        except OSError:
            return self.lstat(rel), None
        try:
            st = os.fstat(fd)
            return st, (_inode_generation(fd) if stat.S_ISREG(st.st_mode) else None)
        finally:
            os.close(fd)

    def inode_generation(self, rel: bytes) -> int | None:
        """The generation of the inode at ``rel`` (see ``identity``), or ``None``."""
        try:
            return self.identity(rel)[1]
        except OSError:
            return None

    def walk_files(self) -> dict[bytes, os.stat_result]:
        """``{rel: lstat}`` of every regular file in the tree (blocking).

        Entries that vanish meanwhile are skipped; directories are descended into,
        symlinks never; special files are not listed.
        """
        found: dict[bytes, os.stat_result] = {}
        pending = [b""]
        while pending:
            rel_dir = pending.pop()
            try:
                fd = self.open(rel_dir, os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        name = os.fsencode(entry.name)
                        rel = rel_dir + b"/" + name if rel_dir else name
                        try:
                            st = entry.stat(follow_symlinks=False)  # fstatat: any length
                        except FileNotFoundError:
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            pending.append(rel)
                        elif stat.S_ISREG(st.st_mode):
                            found[rel] = st
            finally:
                os.close(fd)
        return found
