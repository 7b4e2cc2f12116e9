"""The ``uploads/`` tree: passthrough nodes over the real backing directory.

Design notes
------------
* **A real tree underneath.** ``MOUNT/uploads/REL`` is ``config.uploads_dir/REL``: a
  real file, directory or symlink on the state disk. Mode, owner, nanosecond times,
  symlink targets and ``user.*`` xattrs live there, so they are exactly what the
  client set (rsync's quick check relies on size and mtime being exact) and other
  components read uploads as plain files.
* **Node identity.** A node knows its parent and its name, so its path follows
  renames of any directory above it for free. Each directory caches the child nodes
  the kernel still holds (dropped in ``forgotten``), so a name keeps one inode.
* **Thin.** Nodes do the syscalls on the backing tree and report what happened to the
  component (``UploadsComponent``: created, opened for writing, wrote, closed,
  truncated, renamed, unlinked, declared something); the component owns the tasks.
  Metadata syscalls (lstat, mkdir, rename, chmod, ...) run inline: they are short and
  doing them in a thread would cost more than the call. Data moves (``read``, large
  ``write``, ``fsync``) go to worker threads.
* **Any length.** Every syscall goes through ``BackingTree.at`` (``longpaths.py``): the
  absolute backing path when it fits in ``PATH_MAX``, a path relative to an open
  directory otherwise, so every path a local disk accepts works here too.
* **Special files.** FIFOs, sockets and (for root) device nodes are created as on a
  local disk (``mknod``; ``bind`` and ``cp -a`` come here too) and are nothing more:
  ``UploadSpecial`` reports no events, so they never become upload tasks. The kernel
  serves their opens itself; the agent only keeps their inode, mode, owner and times.
* **What the kernel may cache.** While the agent runs it is the only writer of the
  backing tree (its directory's own mode keeps others out; recovery changes files only
  before the mount), and every change a client makes arrives through the kernel, which
  updates or drops what it cached: a create, mkdir, rename or unlink fixes the
  directory entries and the directories' attributes, a write drops the file's size and
  times (the next stat asks), a setattr's answer is the new attributes, xattrs are
  never cached. So entries, attributes and *missing* names (negative entries) are
  cached for ``CACHE_SECONDS``, which saves rsync's second stat of every name it is
  about to create (and, on a re-run within that time, most of its quick check). The
  one change the agent makes on its own is cutting a file back after a queued write
  failed (``_writes.py``): the handle that saw it drops the kernel's attributes of
  that file (``FileHandle``). A lookup's ``lstat`` is also its answer's attributes
  (``looked_up``): one stat per lookup, not two.
* **Evicted files** (repository backend ``s3``, ``fsagent/repository/_cache.py``): the
  backing file of an upload verified in the store may be a hole of the right size. The
  nodes only ask: an open for writing and a truncate call ``need_local`` first (the
  component has the cache fetch the bytes back whole), except when they empty the
  file (``O_TRUNC``, a truncate to 0: ``emptying``, nothing fetched), an open notes the cache's record
  on its handle (``copy_opened``), and a read through a handle whose record says
  evicted is ``read_back`` from the store instead of ``pread``. Nothing else changes.
* **Errors** from the backing filesystem are passed to the client with their errno
  (ENOSPC, EEXIST, ENOTEMPTY, ...): ``backing_errors`` turns ``OSError`` into
  ``FUSEError``. Only ``user.*`` xattrs are stored (ENOTSUP otherwise); the
  ``user.fsagent.*`` names are the task's own and are answered by the component.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat

import pyfuse3
from pyfuse3 import EntryAttributes, FUSEError

from ..fs import Handle, Node
from ._task import is_utf8

__all__ = ["UploadDir", "UploadFile", "UploadSymlink", "UploadSpecial", "FileHandle",
           "attributes_from_stat"]

FSAGENT_XATTR = b"user.fsagent."
# Advertised I/O size: cp and friends size their buffers from st_blksize, and fewer,
# larger FUSE writes (libfuse allows 1 MiB) halve the per-request overhead.
IO_BLOCK = 1 << 20
_OPEN_FLAGS_KEPT = os.O_ACCMODE | os.O_TRUNC | os.O_EXCL | os.O_NOFOLLOW
_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
# How long the kernel may keep entries, attributes and negative entries of uploads/
# (see "What the kernel may cache"). A bound, not a promise: nothing here relies on
# the kernel keeping them.
CACHE_SECONDS = 60.0


class _BackingErrors:
    """``with backing_errors():`` an ``OSError`` from the backing tree becomes the
    client's ``FUSEError`` with the same errno. A plain class: it is entered on every
    request, and a generator-based context manager costs several times more."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None and issubclass(kind, OSError):
            raise FUSEError(error.errno or errno.EIO) from None
        return False


_BACKING_ERRORS = _BackingErrors()


def backing_errors() -> _BackingErrors:
    return _BACKING_ERRORS


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    # Python's os.rename has no flags; both paths may be /proc/self/fd/N/NAME (longpaths.py).
    if _libc.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, ctypes.c_uint(flags)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def attributes_from_stat(inode: int, st: os.stat_result, timeout: float) -> EntryAttributes:
    a = EntryAttributes()
    a.st_ino = inode
    a.generation = 0
    a.entry_timeout = timeout
    a.attr_timeout = timeout
    a.st_mode = st.st_mode
    a.st_nlink = st.st_nlink
    a.st_uid = st.st_uid
    a.st_gid = st.st_gid
    a.st_rdev = st.st_rdev  # device nodes: major and minor as the disk has them
    a.st_size = st.st_size
    a.st_blksize = IO_BLOCK
    a.st_blocks = st.st_blocks
    a.st_atime_ns = st.st_atime_ns
    a.st_mtime_ns = st.st_mtime_ns
    a.st_ctime_ns = st.st_ctime_ns
    return a


class _Entry(Node):
    """Common to every node under uploads/: where it lives, attributes, user xattrs."""

    entry_timeout = attr_timeout = CACHE_SECONDS
    # Slots, no __dict__ (``Node`` has none either): the kernel keeps a node per file it
    # has seen, 100,000 and more, and a dict's values cost ~50 bytes more per node.
    __slots__ = ("uploads", "parent", "name", "detached", "looked_up", "inode")

    def __init__(self, uploads, parent: UploadDir | None, name: bytes):
        self.uploads = uploads  # the UploadsComponent
        self.parent = parent
        self.name = name
        self.detached = False  # unlinked or replaced: may still be open, has no path
        # The lstat a lookup just made, taken by the getattr that answers the same
        # lookup (``Filesystem.lookup`` calls it next, with no await in between).
        self.looked_up: os.stat_result | None = None
        self.inode: int | None = None  # the Filesystem's, given on first use (``Node``)

    @property
    def rel(self) -> bytes:
        # A loop, not recursion through the parents' ``rel``: every request asks for
        # it, some several times. ENOENT if this node or any directory above it was
        # unlinked or replaced.
        names = []
        node = self
        while node.parent is not None:
            if node.detached:
                raise FUSEError(errno.ENOENT)
            names.append(node.name)
            node = node.parent
        if node.detached:
            raise FUSEError(errno.ENOENT)
        names.reverse()
        return b"/".join(names)

    def place(self):
        """``with node.place() as path``: a path to the backing object (``longpaths.py``)."""
        return self.uploads.paths.at(self.rel)

    def stat(self) -> os.stat_result:
        with backing_errors(), self.place() as path:
            return os.lstat(path)

    async def getattr(self, ctx) -> EntryAttributes:
        st = self.looked_up
        if st is None:
            st = self.stat()
        else:
            self.looked_up = None
        return attributes_from_stat(self.inode, st, self.attr_timeout)

    async def setattr(self, attr, fields, fh, ctx) -> EntryAttributes:
        with backing_errors(), self.place() as path:
            if fields.update_size:
                await self.truncate(attr.st_size, fh)
            # A symlink's mode cannot change (the node's class is what lstat said).
            if fields.update_mode and not isinstance(self, UploadSymlink):
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                # Both given (utimensat from cp -p, rsync, tar): no stat for the other.
                st = None if fields.update_atime and fields.update_mtime else self.stat()
                atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)
                if fields.update_mtime:
                    self.uploads.mtime_set(self.rel, mtime)
        self.uploads.attributes_changed(self.rel)
        return await self.getattr(ctx)

    async def truncate(self, size: int, fh) -> None:
        raise FUSEError(errno.EISDIR if self.is_directory else errno.EINVAL)

    # -- xattrs: user.* lives on the backing file; user.fsagent.* is the task's ------------

    async def getxattr(self, name: bytes, ctx) -> bytes:
        if name.startswith(FSAGENT_XATTR):
            value = self.uploads.task_xattrs(self.rel).get(name)
            if value is None:
                raise FUSEError(pyfuse3.ENOATTR)
            return value
        if not name.startswith(b"user."):
            raise FUSEError(pyfuse3.ENOATTR)
        with backing_errors(), self.place() as path:
            return os.getxattr(path, name, follow_symlinks=False)

    async def listxattr(self, ctx) -> list[bytes]:
        with backing_errors(), self.place() as path:
            stored = [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]
        own = list(self.uploads.task_xattrs(self.rel))
        return own + [n for n in stored if n.startswith(b"user.")
                      and not n.startswith(FSAGENT_XATTR)]

    async def setxattr(self, name: bytes, value: bytes, ctx) -> None:
        if name.startswith(FSAGENT_XATTR) and self.uploads.is_task(self.rel):
            await self.uploads.declare(self.rel, name, value)
            return
        if not name.startswith(b"user."):
            raise FUSEError(errno.ENOTSUP)
        with backing_errors(), self.place() as path:
            os.setxattr(path, name, value, follow_symlinks=False)
        self.uploads.attributes_changed(self.rel)

    async def removexattr(self, name: bytes, ctx) -> None:
        if name.startswith(FSAGENT_XATTR) and self.uploads.is_task(self.rel):
            await self.uploads.undeclare(self.rel, name)
            return
        if not name.startswith(b"user."):
            raise FUSEError(errno.ENOTSUP)
        with backing_errors(), self.place() as path:
            os.removexattr(path, name, follow_symlinks=False)
        self.uploads.attributes_changed(self.rel)

    def forgotten(self) -> None:
        if self.parent is not None:
            self.parent.forget_child(self.name, self)


class UploadDir(_Entry):
    is_directory = True
    negative_timeout = CACHE_SECONDS  # names appear only through the mount
    __slots__ = ("_cache",)

    def __init__(self, uploads, parent: UploadDir | None, name: bytes):
        super().__init__(uploads, parent, name)
        self._cache: dict[bytes, _Entry] = {}

    def child(self, name: bytes, mode: int) -> _Entry:
        kind = (UploadFile if stat.S_ISREG(mode) else UploadDir if stat.S_ISDIR(mode)
                else UploadSymlink if stat.S_ISLNK(mode) else UploadSpecial)
        node = self._cache.get(name)
        if type(node) is not kind:
            node = kind(self.uploads, self, name)
            self._cache[name] = node
        return node

    async def getattr(self, ctx) -> EntryAttributes:
        attrs = await super().getattr(ctx)
        if self.parent is None:
            # uploads/ is the machine's shared drop box, like /tmp: everyone may create,
            # and with default_permissions the kernel's sticky-bit rule keeps users from
            # removing or renaming (or renaming over) each other's entries (EPERM).
            # Shown here only: the backing directory keeps its own mode, so nobody writes
            # into the store behind the agent's back.
            attrs.st_mode = stat.S_IFDIR | 0o1777
        return attrs

    def forget_child(self, name: bytes, node: _Entry) -> None:
        if self._cache.get(name) is node:
            del self._cache[name]

    def _place(self, name: bytes):
        """``with self._place(name) as path``: the backing path of child ``name``."""
        if b"/" in name or name in (b".", b".."):
            raise FUSEError(errno.EINVAL)
        return self.uploads.paths.at(self._child_rel(name))

    def _new_place(self, name: bytes):
        """``_place`` for a name being created: a name that is not UTF-8 (``is_utf8``)
        is refused up front with EILSEQ ("Invalid or incomplete multibyte or wide
        character") and nothing is created."""
        if not is_utf8(name):
            raise FUSEError(errno.EILSEQ)
        return self._place(name)

    def _child_rel(self, name: bytes) -> bytes:
        rel = self.rel
        return rel + b"/" + name if rel else name

    async def lookup(self, name: bytes, ctx) -> Node:
        with backing_errors(), self._place(name) as path:
            st = os.lstat(path)
        node = self.child(name, st.st_mode)
        node.looked_up = st  # the answer's attributes (see "What the kernel may cache")
        return node

    async def children(self, ctx):
        out = []
        # By descriptor: each entry's stat is then relative to it (fstatat), whatever
        # the length of this directory's path plus the entry's name.
        with backing_errors():
            fd = self.uploads.paths.open(self.rel, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        try:
                            mode = entry.stat(follow_symlinks=False).st_mode
                        except FileNotFoundError:
                            continue
                        name = os.fsencode(entry.name)
                        out.append((name, self.child(name, mode)))
            finally:
                os.close(fd)
        return out

    def _own(self, path: bytes, ctx, *, fd: int | None = None) -> None:
        # The agent creates the backing object; hand it to the client's uid/gid as a
        # local filesystem would (only possible, and only needed, when we are root).
        if os.geteuid() == 0 and ctx is not None:
            if fd is not None:
                os.fchown(fd, ctx.uid, ctx.gid)
            else:
                os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)

    async def create(self, name: bytes, mode: int, flags: int, ctx):
        with backing_errors(), self._new_place(name) as path:
            fd = os.open(path, (flags & _OPEN_FLAGS_KEPT) | os.O_CREAT, 0o600)
            try:
                os.fchmod(fd, stat.S_IMODE(mode))
                self._own(path, ctx, fd=fd)
            except OSError:
                os.close(fd)
                raise
        node = self.child(name, stat.S_IFREG)
        handle = await node.opened(fd, flags, created=True)
        return node, handle

    async def mkdir(self, name: bytes, mode: int, ctx) -> Node:
        with backing_errors(), self._new_place(name) as path:
            os.mkdir(path, 0o700)
            os.chmod(path, stat.S_IMODE(mode))
            self._own(path, ctx)
        return self.child(name, stat.S_IFDIR)

    async def mknod(self, name: bytes, mode: int, rdev: int, ctx) -> Node:
        kind = stat.S_IFMT(mode)
        if kind in (0, stat.S_IFREG):
            # mknod(2) of a regular file arrives here, not in create: it is an empty
            # file written by nobody, so it is an upload like `touch`'s.
            node, handle = await self.create(name, stat.S_IFREG | stat.S_IMODE(mode),
                                             os.O_WRONLY | os.O_EXCL, ctx)
            await handle.release()
            return node
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            # The kernel already asks for CAP_MKNOD; the agent (root) would otherwise
            # create a device for anyone, so only root's own requests pass.
            if ctx is None or ctx.uid != 0:
                raise FUSEError(errno.EPERM)
        elif kind not in (stat.S_IFIFO, stat.S_IFSOCK):
            raise FUSEError(errno.EINVAL)
        with backing_errors(), self._new_place(name) as path:
            os.mknod(path, kind | 0o600, rdev)
            os.chmod(path, stat.S_IMODE(mode))
            self._own(path, ctx)
        return self.child(name, kind)

    async def symlink(self, name: bytes, target: bytes, ctx) -> Node:
        with backing_errors(), self._new_place(name) as path:
            os.symlink(target, path)
            self._own(path, ctx)
        return self.child(name, stat.S_IFLNK)

    async def unlink(self, name: bytes, ctx) -> None:
        with backing_errors(), self._place(name) as path:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise FUSEError(errno.EISDIR)
            os.unlink(path)
        node = self._cache.pop(name, None)
        if node is not None:
            node.detached = True
        await self.uploads.unlinked(self._child_rel(name))

    async def rmdir(self, name: bytes, ctx) -> None:
        with backing_errors(), self._place(name) as path:
            os.rmdir(path)
        node = self._cache.pop(name, None)
        if node is not None:
            node.detached = True

    async def rename(self, name: bytes, new_parent: Node, new_name: bytes, flags: int, ctx):
        if not isinstance(new_parent, UploadDir):
            raise FUSEError(errno.EXDEV)
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise FUSEError(errno.EINVAL)  # RENAME_EXCHANGE would swap two tasks' paths
        with backing_errors(), self._place(name) as old, \
                new_parent._new_place(new_name) as new:
            is_dir = stat.S_ISDIR(os.lstat(old).st_mode)
            if flags:
                renameat2(old, new, flags)
            else:
                os.rename(old, new)
        old_rel, new_rel = self._child_rel(name), new_parent._child_rel(new_name)
        replaced = new_parent._cache.pop(new_name, None)
        if replaced is not None:
            replaced.detached = True
        node = self._cache.pop(name, None)
        if node is not None:
            node.parent, node.name = new_parent, new_name
            new_parent._cache[new_name] = node
        await self.uploads.renamed(old_rel, new_rel, is_dir)


class UploadSymlink(_Entry):
    __slots__ = ()

    async def readlink(self, ctx) -> bytes:
        with backing_errors(), self.place() as path:
            return os.readlink(path)


class UploadSpecial(_Entry):
    """A FIFO, socket or device node: stored and described, never an upload task."""

    __slots__ = ()


# The open handles of a file nobody has open: one shared empty set instead of a set per
# node (216 bytes each; the kernel keeps a node per file it has seen, 100,000 and more).
_NO_HANDLES: frozenset = frozenset()


class UploadFile(_Entry):
    __slots__ = ("handles",)

    def __init__(self, uploads, parent: UploadDir | None, name: bytes):
        super().__init__(uploads, parent, name)
        self.handles: set[FileHandle] | frozenset = _NO_HANDLES

    def writing_task(self):
        """The task of a handle open for writing, if any (its queued writes are ours)."""
        for handle in self.handles:
            if handle.task is not None:
                return handle.task
        return None

    async def getattr(self, ctx) -> EntryAttributes:
        writing = self.writing_task()
        if writing is not None:
            self.looked_up = None  # queued writes may land first: stat after them
            await self.uploads.drain(writing)  # the size includes acknowledged writes
        return await super().getattr(ctx)

    def invalidate_attributes(self) -> None:
        """The agent changed the backing file on its own (cut it back after a failed
        queued write): the kernel must ask for its attributes again."""
        if self.inode is None:
            return
        try:
            # Attributes only: no page-cache work, so it cannot wait on a request in
            # flight (the kernel takes no lock that a request holds).
            pyfuse3.invalidate_inode(self.inode, attr_only=True)
        except OSError:
            pass  # the kernel no longer has the inode: nothing cached to drop

    async def setattr(self, attr, fields, fh, ctx) -> EntryAttributes:
        # Queued writes land first: a later pwrite would move the mtime rsync just set.
        await self.uploads.drain(self.writing_task())
        return await super().setattr(attr, fields, fh, ctx)

    def stat(self) -> os.stat_result:
        # An open file answers from its descriptor: cheaper than a path walk, and it
        # still works after the file was unlinked or replaced while open.
        for handle in self.handles:
            with backing_errors():
                return os.fstat(handle.fd)
        return super().stat()

    async def truncate(self, size: int, fh) -> None:
        if size:
            await self.uploads.need_local(self.rel)  # an evicted copy comes back whole first
        await self.uploads.changing(self.rel)  # a complete task leaves complete first
        async with self.uploads.emptying(self.rel) if size == 0 else contextlib.nullcontext():
            if isinstance(fh, FileHandle):
                os.ftruncate(fh.fd, size)
            else:
                with self.place() as path:
                    os.truncate(path, size)
        self.uploads.truncated(self.rel, size)

    async def open(self, flags: int, ctx) -> Handle:
        if flags & os.O_TRUNC and flags & os.O_ACCMODE == os.O_RDONLY:
            # Linux empties the file even so, with no writer to tell the task: made the
            # truncate by path it is (a new version), then opened as asked.
            await self.truncate(0, None)
            flags &= ~os.O_TRUNC
        if flags & os.O_TRUNC:
            # Its bytes go: an evicted copy is forgotten, not fetched back (cp over it).
            async with self.uploads.emptying(self.rel):
                with backing_errors():
                    fd = self.uploads.paths.open(self.rel,
                                                 flags & _OPEN_FLAGS_KEPT & ~os.O_EXCL)
        else:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                await self.uploads.need_local(self.rel)  # an evicted copy comes back first
            with backing_errors():
                fd = self.uploads.paths.open(self.rel, flags & _OPEN_FLAGS_KEPT & ~os.O_EXCL)
        return await self.opened(fd, flags, created=False)

    async def opened(self, fd: int, flags: int, *, created: bool) -> FileHandle:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        task = None
        try:
            task = await self.uploads.opened(self.rel, writable=writable,
                                             truncated=bool(flags & os.O_TRUNC) or created)
        except BaseException:
            os.close(fd)
            raise
        handle = FileHandle(self, fd, task, writable)
        handle.cached = self.uploads.copy_opened(self.rel)
        if self.handles is _NO_HANDLES:
            self.handles = set()
        self.handles.add(handle)
        return handle


class FileHandle(Handle):
    # An evicted upload's record (fsagent/repository/_cache.py): while it says evicted,
    # reads come from the store, not from the punched backing file.
    cached = None

    def __init__(self, node: UploadFile, fd: int, task, writable: bool):
        super().__init__(node)
        self.fd = fd
        self.task = task
        self.writable = writable

    async def read(self, offset: int, size: int) -> bytes:
        cached = self.cached
        if cached is not None and cached.evicted:
            return await self.node.uploads.read_back(self, offset, size)
        await self.node.uploads.drain(self.task or self.node.writing_task())
        with backing_errors():
            return await self.node.uploads.agent.to_thread(os.pread, self.fd, size, offset)

    # A failed queued write cuts the file back (``_writes.py``), on whichever of these
    # calls reports it: then the kernel's cached size is wrong (``_cut_back_check``).

    async def write(self, offset: int, data: bytes) -> int:
        shrinks = self._shrinks()
        try:
            return await self.node.uploads.write(self, offset, data)
        finally:
            self._cut_back_check(shrinks)

    async def flush(self) -> None:
        # close() returns flush's answer: a queued write that failed is reported here.
        shrinks = self._shrinks()
        try:
            await self.node.uploads.settle_writes(self.task, self.fd)
        finally:
            self._cut_back_check(shrinks)

    async def fsync(self, datasync: bool) -> None:
        shrinks = self._shrinks()
        try:
            await self.node.uploads.fsync(self)
        finally:
            self._cut_back_check(shrinks)

    def _shrinks(self) -> int | None:
        return None if self.task is None else self.task.shrinks

    def _cut_back_check(self, shrinks: int | None) -> None:
        if shrinks is not None and self.task.shrinks != shrinks:
            self.node.invalidate_attributes()

    async def release(self) -> None:
        if self.task is not None:
            shrinks = self.task.shrinks
            await self.node.uploads.released(self.task, self.fd)
            self._cut_back_check(shrinks)
        handles = self.node.handles
        if self in handles:
            handles.discard(self)
            if not handles:
                self.node.handles = _NO_HANDLES
        with backing_errors():
            os.close(self.fd)
        if self.writable and self.task is not None:
            await self.node.uploads.closed(self.task)
