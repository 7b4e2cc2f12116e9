"""Nodes and handles: what the mounted tree is made of.

Design notes
------------
A ``Node`` is one thing in the tree (directory, file, symlink); a ``Handle`` is one
open file. ``Filesystem`` (``_operations.py``) owns inode numbers, lookup counts and
file-handle numbers and turns every kernel request into a method call on a node or a
handle. Each part of the tree (the static root, ``uploads/``, ``jobs/``) provides its
own node classes, so the code that owns a behaviour is the class of the node it
happens on.

Every method's default refuses with the errno a real filesystem would give for an
object that cannot do that (``ENOTDIR`` for lookups on a file, ``EPERM`` for hard
links, ...). Methods raise ``pyfuse3.FUSEError`` for expected failures; anything
else is a bug, which ``Filesystem`` logs and turns into ``EIO``.

``DynamicFile`` implements the files-as-API convention: content is rendered when
the file is opened and every read on that handle is served from that snapshot
(consistent partial reads), with ``direct_io`` so the kernel neither caches it nor
cuts reads at a stale ``st_size``. Its ``st_size`` is the size of a rendering too: a new
one, or, for a read-only document that opts in (``reuse_size_for``: ``status``,
``uploads.json``, ...), the last one made for a stat if it is younger than that. A
``cat`` asks for the attributes three times (lookup, getattr twice) right before it
opens, and a big document (``uploads.json`` of a large store) should not be rendered
four times for one read: with the reuse it is rendered twice (the lookup, the open).
The open always renders afresh, so what is read is always current; only the size a
``stat`` reports may be that old, as a kernel's attribute cache would make it. Files
that are written to (a job's ``priority``) do not opt in: a stat right after a write
must see the new size.
"""

from __future__ import annotations

import abc
import errno
import inspect
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Union

import pyfuse3
from pyfuse3 import EntryAttributes, FUSEError

__all__ = [
    "Node", "Handle", "Directory", "DynamicFile", "SnapshotHandle", "make_attributes",
    "fuse_error",
]


def fuse_error(code: int) -> FUSEError:
    return FUSEError(code)


def make_attributes(
    *, inode: int, mode: int, size: int = 0, nlink: int = 1, uid: int | None = None,
    gid: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
    ctime_ns: int | None = None, entry_timeout: float = 1.0, attr_timeout: float = 1.0,
) -> EntryAttributes:
    now = time.time_ns()
    a = EntryAttributes()
    a.st_ino = inode
    a.generation = 0
    a.entry_timeout = entry_timeout
    a.attr_timeout = attr_timeout
    a.st_mode = mode
    a.st_nlink = nlink
    a.st_uid = os.getuid() if uid is None else uid
    a.st_gid = os.getgid() if gid is None else gid
    a.st_rdev = 0
    a.st_size = size
    a.st_blksize = 128 * 1024
    a.st_blocks = (size + 511) // 512
    a.st_atime_ns = now if atime_ns is None else atime_ns
    a.st_mtime_ns = now if mtime_ns is None else mtime_ns
    a.st_ctime_ns = now if ctime_ns is None else ctime_ns
    return a


class Handle:
    """One open file. ``direct_io``/``keep_cache``/``nonseekable`` go into FileInfo."""

    direct_io = False
    keep_cache = False
    nonseekable = False

    def __init__(self, node: Node):
        self.node = node

    async def read(self, offset: int, size: int) -> bytes:
        raise fuse_error(errno.EBADF)

    async def write(self, offset: int, data: bytes) -> int:
        raise fuse_error(errno.EBADF)

    async def flush(self) -> None:
        pass

    async def fsync(self, datasync: bool) -> None:
        pass

    async def release(self) -> None:
        pass


class Node(abc.ABC):
    """One object in the tree. ``inode`` is assigned by the Filesystem on first use."""

    # No __dict__ of its own, so that a subclass with ``__slots__`` has none at all (the
    # nodes of uploaded files: one per file the kernel remembers); others get theirs.
    __slots__ = ()
    inode: int | None = None
    entry_timeout = 1.0
    attr_timeout = 1.0
    # For a directory: how long the kernel may remember that a name is *missing* (a
    # negative entry), so a client asking again (rsync stats a name, then its receiver
    # stats it again before creating it) costs no request. Sound only where every name
    # is created through the mount: the kernel drops its negative entry when a create,
    # mkdir, symlink or rename through the mount makes the name, but never hears of a
    # name the agent would make behind its back. 0 (the default): ask every time.
    negative_timeout = 0.0

    # -- attributes ---------------------------------------------------------------------

    @abc.abstractmethod
    async def getattr(self, ctx) -> EntryAttributes:
        """Every concrete node describes itself."""

    async def setattr(self, attr: EntryAttributes, fields, fh: Handle | None, ctx):
        raise fuse_error(errno.EPERM)

    async def access(self, mode: int, ctx) -> bool:
        return True  # permission checks are the kernel's (default_permissions)

    # -- directories ----------------------------------------------------------------------

    async def lookup(self, name: bytes, ctx) -> Node:
        raise fuse_error(errno.ENOTDIR)

    async def children(self, ctx) -> Iterable[tuple[bytes, Node]]:
        raise fuse_error(errno.ENOTDIR)

    async def create(self, name: bytes, mode: int, flags: int, ctx) -> tuple[Node, Handle]:
        raise fuse_error(errno.EACCES if self.is_directory else errno.ENOTDIR)

    async def mkdir(self, name: bytes, mode: int, ctx) -> Node:
        raise fuse_error(errno.EACCES if self.is_directory else errno.ENOTDIR)

    async def mknod(self, name: bytes, mode: int, rdev: int, ctx) -> Node:
        raise fuse_error(errno.EPERM)

    async def symlink(self, name: bytes, target: bytes, ctx) -> Node:
        raise fuse_error(errno.EPERM if self.is_directory else errno.ENOTDIR)

    async def unlink(self, name: bytes, ctx) -> None:
        raise fuse_error(errno.EACCES if self.is_directory else errno.ENOTDIR)

    async def rmdir(self, name: bytes, ctx) -> None:
        raise fuse_error(errno.EACCES if self.is_directory else errno.ENOTDIR)

    async def rename(self, name: bytes, new_parent: Node, new_name: bytes, flags: int, ctx):
        raise fuse_error(errno.EXDEV)

    async def link(self, new_parent: Node, new_name: bytes, ctx) -> Node:
        # Hard links would give one upload two paths; nothing here supports them.
        raise fuse_error(errno.EPERM)

    # -- files ------------------------------------------------------------------------------

    async def open(self, flags: int, ctx) -> Handle:
        raise fuse_error(errno.EISDIR if self.is_directory else errno.EACCES)

    async def readlink(self, ctx) -> bytes:
        raise fuse_error(errno.EINVAL)

    # -- extended attributes --------------------------------------------------------------

    async def getxattr(self, name: bytes, ctx) -> bytes:
        raise fuse_error(pyfuse3.ENOATTR)

    async def listxattr(self, ctx) -> list[bytes]:
        return []

    async def setxattr(self, name: bytes, value: bytes, ctx) -> None:
        raise fuse_error(errno.ENOTSUP)

    async def removexattr(self, name: bytes, ctx) -> None:
        raise fuse_error(errno.ENOTSUP)

    # -- lifetime ---------------------------------------------------------------------------

    is_directory = False

    def forgotten(self) -> None:
        """The kernel dropped its last reference; providers may drop their cache entry."""


class Directory(Node):
    """A read-only directory with a fixed set of children (the root, for example)."""

    is_directory = True

    def __init__(self, children: dict[bytes, Node] | None = None, mode: int = 0o755):
        self._children: dict[bytes, Node] = dict(children or {})
        self.mode = mode
        self.created_ns = time.time_ns()

    def add(self, name: bytes, node: Node) -> Node:
        self._children[name] = node
        return node

    async def getattr(self, ctx) -> EntryAttributes:
        subdirs = sum(1 for n in self._children.values() if n.is_directory)
        return make_attributes(
            inode=self.inode, mode=stat.S_IFDIR | self.mode, nlink=2 + subdirs,
            mtime_ns=self.created_ns, ctime_ns=self.created_ns,
            entry_timeout=self.entry_timeout, attr_timeout=self.attr_timeout,
        )

    async def lookup(self, name: bytes, ctx) -> Node:
        try:
            return self._children[name]
        except KeyError:
            raise fuse_error(errno.ENOENT) from None

    async def children(self, ctx) -> Iterable[tuple[bytes, Node]]:
        return list(self._children.items())


Renderer = Callable[[], Union[bytes, Awaitable[bytes]]]


class SnapshotHandle(Handle):
    """Serves every read from the bytes rendered at open."""

    direct_io = True

    def __init__(self, node: Node, content: bytes):
        super().__init__(node)
        self.content = content

    async def read(self, offset: int, size: int) -> bytes:
        return self.content[offset : offset + size]


class DynamicFile(Node):
    """A read-only file whose content is rendered on open (status, info.json, ...)."""

    entry_timeout = 1.0
    attr_timeout = 0.0  # size changes with content; never let the kernel cache it

    def __init__(self, render: Renderer, mode: int = 0o444, *, reuse_size_for: float = 0.0):
        self._render = render
        self.mode = mode
        self.reuse_size_for = reuse_size_for  # seconds a stat may reuse a rendering's size
        self._sized: tuple[float, int] | None = None  # (monotonic time, size) of the last

    async def render(self) -> bytes:
        result = self._render()
        if inspect.isawaitable(result):
            result = await result
        return result

    async def size(self) -> int:
        """The size of the content: a new rendering's, or the last stat's if it is
        younger than ``reuse_size_for`` (see the notes above)."""
        now = time.monotonic()
        if self._sized is not None and now - self._sized[0] < self.reuse_size_for:
            return self._sized[1]
        size = len(await self.render())
        if self.reuse_size_for:
            self._sized = (now, size)
        return size

    async def getattr(self, ctx) -> EntryAttributes:
        size = await self.size()
        return make_attributes(
            inode=self.inode, mode=stat.S_IFREG | self.mode, size=size,
            entry_timeout=self.entry_timeout, attr_timeout=self.attr_timeout,
        )

    async def open(self, flags: int, ctx) -> Handle:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise fuse_error(errno.EACCES)
        return SnapshotHandle(self, await self.render())
