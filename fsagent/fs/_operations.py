"""``Filesystem``: the pyfuse3 adapter. Kernel requests in, node/handle calls out.

Design notes
------------
* **Thin.** This class only translates: inode number -> ``Node``, file handle ->
  ``Handle``, FUSE arguments -> method calls, results -> pyfuse3 structures. What a
  request *means* is decided by the node it lands on (see ``_nodes.py``).
* **Inode numbers** come from one counter and are never reused while the process
  lives. A node keeps its number for as long as the kernel holds a reference to it
  (lookup count > 0); ``forget`` drops non-permanent nodes at zero and tells the
  node (``Node.forgotten``) so providers can drop their caches. The kernel's lookup
  count goes up on every successful lookup/create/mkdir/symlink and on every entry
  ``readdir_reply`` accepts (pyfuse3 uses readdirplus).
* **Negative entries.** A lookup of a missing name in a directory whose node has a
  ``negative_timeout`` is answered with inode 0 and that entry timeout instead of
  ENOENT: the kernel then remembers the name is missing (``Node.negative_timeout``
  says when that is sound). No inode, no lookup count: the kernel sends no forget.
* **Robust handlers.** Every handler runs inside ``_guard``: a ``FUSEError`` is the
  answer; any other exception is a bug, logged with its traceback and answered with
  EIO. Under trio an escaping exception would tear down pyfuse3's nursery and with
  it the mount, so nothing else may escape (``forget`` must not raise at all).
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
from collections.abc import Callable

import pyfuse3
from pyfuse3 import FUSEError

from ._nodes import Handle, Node, fuse_error

__all__ = ["Filesystem"]

log = logging.getLogger(__name__)


def _guard(method: Callable) -> Callable:
    name = method.__name__

    @functools.wraps(method)
    async def guarded(self: Filesystem, *args):
        self.requests[name] += 1
        try:
            return await method(self, *args)
        except FUSEError:
            raise
        except Exception:
            self.handler_errors += 1
            self.errors[name] += 1
            log.exception("FUSE %s%r failed; answering EIO", name, _short(args))
            raise FUSEError(errno.EIO) from None

    return guarded


def _short(args: tuple) -> tuple:
    # Keep log lines readable: write buffers can be a megabyte.
    return tuple(f"<{len(a)} bytes>" if isinstance(a, bytes) and len(a) > 64 else a
                 for a in args if not isinstance(a, pyfuse3.RequestContext))


def _negative_entry(timeout: float) -> pyfuse3.EntryAttributes:
    """"No such name, and remember that for ``timeout`` seconds" (inode 0)."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = timeout
    return entry


class _DirHandle:
    __slots__ = ("node", "entries")

    def __init__(self, node: Node, entries: list[tuple[bytes, Node]]):
        self.node = node
        self.entries = entries


class Filesystem(pyfuse3.Operations):
    """pyfuse3 operations over a tree of ``Node`` objects rooted at ``root``."""

    supports_dot_lookup = False
    enable_writeback_cache = False  # defers write errors; providers decide per need
    enable_acl = False

    def __init__(self, root: Node, *, statfs_path: os.PathLike | str):
        super().__init__()
        self.statfs_path = os.fspath(statfs_path)
        self._nodes: dict[int, Node] = {}
        self._lookups: dict[int, int] = {}
        self._permanent: set[int] = set()
        self._next_inode = pyfuse3.ROOT_INODE
        self._handles: dict[int, Handle | _DirHandle] = {}
        self._next_fh = 1
        self.handler_errors = 0
        self.negative_entries = 0  # lookups answered "missing, remember it" (no ENOENT)
        # Per-operation counts for the metrics: every request, and the unexpected failures.
        self.requests: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.root = root
        self.register(root, permanent=True)

    # -- tables -----------------------------------------------------------------------------

    def register(self, node: Node, *, permanent: bool = False) -> int:
        """Give ``node`` an inode number (once) and make it reachable by it."""
        if node.inode is None:
            node.inode = self._next_inode
            self._next_inode += 1
        self._nodes[node.inode] = node
        if permanent:
            self._permanent.add(node.inode)
        return node.inode

    def node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            # The kernel asked about an inode we forgot: a bookkeeping bug, not user error.
            raise LookupError(f"unknown inode {inode}") from None

    def _open_handle(self, handle: Handle | _DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]  # type: ignore[return-value]
        except KeyError:
            raise fuse_error(errno.EBADF) from None

    @property
    def open_handles(self) -> int:
        return len(self._handles)

    def _file_info(self, handle: Handle) -> pyfuse3.FileInfo:
        fi = pyfuse3.FileInfo(fh=self._open_handle(handle))
        fi.direct_io = handle.direct_io
        fi.keep_cache = handle.keep_cache
        fi.nonseekable = handle.nonseekable
        return fi

    async def _entry(self, node: Node, ctx) -> pyfuse3.EntryAttributes:
        self.register(node)  # a new node needs its inode number before it can describe itself
        attrs = await node.getattr(ctx)
        self._lookups[node.inode] = self._lookups.get(node.inode, 0) + 1
        return attrs

    # -- lookups and attributes -----------------------------------------------------------

    @_guard
    async def lookup(self, parent_inode, name, ctx):
        parent = self.node(parent_inode)
        try:
            node = await parent.lookup(name, ctx)
        except FUSEError as e:
            if e.errno != errno.ENOENT or not parent.negative_timeout:
                raise
            self.negative_entries += 1
            return _negative_entry(parent.negative_timeout)
        return await self._entry(node, ctx)

    async def forget(self, inode_list):
        for inode, count in inode_list:
            try:
                remaining = self._lookups.get(inode, 0) - count
                if remaining > 0:
                    self._lookups[inode] = remaining
                    continue
                self._lookups.pop(inode, None)
                if inode not in self._permanent:
                    node = self._nodes.pop(inode, None)
                    if node is not None:
                        node.forgotten()
            except Exception:
                log.exception("FUSE forget(%d, %d) failed", inode, count)

    @_guard
    async def getattr(self, inode, ctx):
        return await self.node(inode).getattr(ctx)

    @_guard
    async def setattr(self, inode, attr, fields, fh, ctx):
        handle = self._handles.get(fh) if fh is not None else None
        return await self.node(inode).setattr(attr, fields, handle, ctx)

    @_guard
    async def access(self, inode, mode, ctx):
        return await self.node(inode).access(mode, ctx)

    @_guard
    async def statfs(self, ctx):
        st = os.statvfs(self.statfs_path)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(st, field))
        return out

    # -- directories ------------------------------------------------------------------------

    @_guard
    async def opendir(self, inode, ctx):
        node = self.node(inode)
        entries = list(await node.children(ctx))
        return self._open_handle(_DirHandle(node, entries))

    @_guard
    async def readdir(self, fh, start_id, token):
        handle = self._handles[fh]
        assert isinstance(handle, _DirHandle)
        # start_id is the index of the next entry to send; ids are 1-based so 0 = start.
        for index in range(start_id, len(handle.entries)):
            name, node = handle.entries[index]
            self.register(node)
            try:
                attrs = await node.getattr(None)
            except FUSEError:
                continue  # vanished between opendir and readdir
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break
            self._lookups[node.inode] = self._lookups.get(node.inode, 0) + 1

    @_guard
    async def releasedir(self, fh):
        self._handles.pop(fh, None)

    @_guard
    async def fsyncdir(self, fh, datasync):
        pass

    @_guard
    async def mkdir(self, parent_inode, name, mode, ctx):
        node = await self.node(parent_inode).mkdir(name, mode, ctx)
        return await self._entry(node, ctx)

    @_guard
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        node = await self.node(parent_inode).mknod(name, mode, rdev, ctx)
        return await self._entry(node, ctx)

    @_guard
    async def rmdir(self, parent_inode, name, ctx):
        await self.node(parent_inode).rmdir(name, ctx)

    @_guard
    async def unlink(self, parent_inode, name, ctx):
        await self.node(parent_inode).unlink(name, ctx)

    @_guard
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        new_parent = self.node(parent_inode_new)
        await self.node(parent_inode_old).rename(name_old, new_parent, name_new, flags, ctx)

    @_guard
    async def symlink(self, parent_inode, name, target, ctx):
        node = await self.node(parent_inode).symlink(name, target, ctx)
        return await self._entry(node, ctx)

    @_guard
    async def readlink(self, inode, ctx):
        return await self.node(inode).readlink(ctx)

    @_guard
    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = await self.node(inode).link(self.node(new_parent_inode), new_name, ctx)
        return await self._entry(node, ctx)

    # -- files --------------------------------------------------------------------------------

    @_guard
    async def open(self, inode, flags, ctx):
        handle = await self.node(inode).open(flags, ctx)
        return self._file_info(handle)

    @_guard
    async def create(self, parent_inode, name, mode, flags, ctx):
        node, handle = await self.node(parent_inode).create(name, mode, flags, ctx)
        attrs = await self._entry(node, ctx)
        return self._file_info(handle), attrs

    @_guard
    async def read(self, fh, off, size):
        return await self.handle(fh).read(off, size)

    @_guard
    async def write(self, fh, off, buf):
        return await self.handle(fh).write(off, buf)

    @_guard
    async def flush(self, fh):
        await self.handle(fh).flush()

    @_guard
    async def fsync(self, fh, datasync):
        await self.handle(fh).fsync(datasync)

    @_guard
    async def release(self, fh):
        handle = self._handles.pop(fh, None)
        if isinstance(handle, Handle):
            await handle.release()

    # -- extended attributes ----------------------------------------------------------------

    @_guard
    async def getxattr(self, inode, name, ctx):
        return await self.node(inode).getxattr(name, ctx)

    @_guard
    async def listxattr(self, inode, ctx):
        return await self.node(inode).listxattr(ctx)

    @_guard
    async def setxattr(self, inode, name, value, ctx):
        await self.node(inode).setxattr(name, value, ctx)

    @_guard
    async def removexattr(self, inode, name, ctx):
        await self.node(inode).removexattr(name, ctx)
