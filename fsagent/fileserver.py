"""OMERO.fs ``FileServer`` over RPC: stats, listings, blocks and SHA1 of exported files.

Design notes
------------
* **Confinement first** (``fsagent/confinement.py``, shared with the monitors). Every
  path is made absolute-and-real (``os.path.realpath``: symlinks and ``..`` resolved)
  and must then lie in one of ``config.export_roots`` (themselves resolved at load
  time), else ``OmeroFSError("not under an exported root: PATH")``, naming the path as
  the client gave it. OMERO.fs read any path on the machine; with no roots
  configured, this one reads none. A symlink inside a root that points outside is
  refused like any other outside path.
* **Reads are checked again after open.** ``readBlock`` and ``getSHA1`` open the
  resolved path with ``O_NOFOLLOW`` and check where the descriptor really points
  (``/proc/self/fd``), so swapping a directory for a symlink between the check and
  the open cannot escape the root.
* **What runs where.** A stat of a resolved path is a few microseconds and runs on
  the event loop (a worker-thread hop costs more than the call and would cap
  ``getSize`` far below the 20,000 calls/s target); reading blocks, hashing and
  listing directories run in worker threads (``agent.to_thread``). ``getSHA1``
  streams the file in 1 MiB pieces, so its memory does not grow with the file.
* **Shapes** follow the reference: times are float seconds, sizes ints, ``getStats``
  and ``getBulkDirectory`` entries are FileStats maps ``{baseName, owner, size,
  mTime, cTime, aTime, type}`` with ``type`` one of ``File, Dir, Link, Mount,
  Unknown`` (``Link`` for a symlink itself: listings and ``getStats`` do not follow
  the last component). ``getDirectory`` returns names; ``filter`` is a shell glob on
  names (``""`` or ``"*"`` = everything), sorted by name.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import pwd
import stat
from typing import Any

from .component import Component, Host
from .confinement import Confinement
from .rpc import OmeroFSError

__all__ = ["FileServer", "file_stats"]

_SHA1_CHUNK = 1 << 20


_owner_cache: dict[int, str] = {}


def _owner(uid: int) -> str:
    name = _owner_cache.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        _owner_cache[uid] = name
    return name


def _file_type(st: os.stat_result, path: str) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "Link"
    if stat.S_ISDIR(st.st_mode):
        return "Mount" if os.path.ismount(path) else "Dir"
    if stat.S_ISREG(st.st_mode):
        return "File"
    return "Unknown"


def file_stats(path: str, st: os.stat_result) -> dict[str, Any]:
    """A FileStats map for ``path`` whose lstat is ``st``."""
    return {
        "baseName": os.path.basename(path) or path,
        "owner": _owner(st.st_uid),
        "size": st.st_size,
        "mTime": st.st_mtime,
        "cTime": st.st_ctime,
        "aTime": st.st_atime,
        "type": _file_type(st, path),
    }


def _glob(filter_: Any) -> str:
    if filter_ is None or filter_ == "":
        return "*"
    if isinstance(filter_, bytes):
        filter_ = os.fsdecode(filter_)
    if not isinstance(filter_, str):
        raise OmeroFSError(f"filter must be a glob string, got {filter_!r:.80}")
    return filter_


class FileServer(Component):
    """``FileServer.<op>``: the 14 operations of OMERO.fs's FileServer."""

    name = "fileserver"

    def __init__(self, agent: Host):
        super().__init__(agent)
        self.confinement = Confinement(agent.config.export_roots)
        self.readblock_max = agent.config.readblock_max_bytes

    def status(self) -> dict[str, Any]:
        return {"export_roots": list(self.confinement.roots)}

    def rpc_methods(self) -> dict:
        ops = ("fileExists getATime getBaseName getBulkDirectory getCTime getDirectory "
               "getMTime getOwner getSHA1 getSize getStats isDir isFile readBlock").split()
        return {f"FileServer.{op}": getattr(self, op) for op in ops}

    # -- helpers --------------------------------------------------------------------------

    def _stat(self, file_id: Any, *, follow: bool = True) -> tuple[str, os.stat_result]:
        real = self.confinement.resolve(file_id)
        path = real if follow else self.confinement.lexical(file_id)
        try:
            return path, os.stat(path, follow_symlinks=False)
        except OSError as e:
            raise OmeroFSError(f"{file_id}: {e.strerror}") from None

    def _open_confined(self, file_id: Any) -> tuple[int, str]:
        real = self.confinement.resolve(file_id)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise OmeroFSError(f"{file_id}: {e.strerror}") from None
        try:
            self.confinement.check_fd(fd, file_id)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OmeroFSError(f"{file_id}: Is a directory")
        except BaseException:
            os.close(fd)
            raise
        return fd, real

    # -- the operations -------------------------------------------------------------------

    async def fileExists(self, fileId):
        real = self.confinement.resolve(fileId)
        return os.path.lexists(real)

    async def getATime(self, fileId):
        return self._stat(fileId)[1].st_atime

    async def getCTime(self, fileId):
        return self._stat(fileId)[1].st_ctime

    async def getMTime(self, fileId):
        return self._stat(fileId)[1].st_mtime

    async def getBaseName(self, fileId):
        path, _ = self._stat(fileId, follow=False)
        return os.path.basename(path)

    async def getOwner(self, fileId):
        return _owner(self._stat(fileId)[1].st_uid)

    async def getSize(self, fileId):
        return self._stat(fileId)[1].st_size

    async def getStats(self, fileId):
        path, st = self._stat(fileId, follow=False)
        return file_stats(path, st)

    async def isDir(self, fileId):
        return stat.S_ISDIR(self._stat(fileId)[1].st_mode)

    async def isFile(self, fileId):
        return stat.S_ISREG(self._stat(fileId)[1].st_mode)

    async def getDirectory(self, absPath, filter):
        return [name for name, _ in await self._list(absPath, filter, with_stats=False)]

    async def getBulkDirectory(self, absPath, filter):
        return [stats for _, stats in await self._list(absPath, filter, with_stats=True)]

    async def _list(self, abs_path, filter_, *, with_stats: bool):
        real = self.confinement.resolve(abs_path)
        pattern = _glob(filter_)

        def listing():
            out = []
            with os.scandir(real) as it:
                for entry in it:
                    if not fnmatch.fnmatchcase(entry.name, pattern):
                        continue
                    stats = None
                    if with_stats:
                        try:
                            stats = file_stats(entry.path, entry.stat(follow_symlinks=False))
                        except FileNotFoundError:
                            continue  # removed while we listed
                    out.append((entry.name, stats))
            out.sort(key=lambda item: item[0])
            return out

        try:
            return await self.agent.to_thread(listing)
        except OSError as e:
            raise OmeroFSError(f"{abs_path}: {e.strerror}") from None

    async def readBlock(self, fileId, offset, size):
        for name, value in (("offset", offset), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OmeroFSError(f"{name} must be a non-negative integer, got {value!r:.40}")
        if size > self.readblock_max:
            raise OmeroFSError(f"size {size} exceeds the readBlock cap of "
                               f"{self.readblock_max} bytes")

        def read() -> bytes:
            fd, _ = self._open_confined(fileId)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)

        try:
            return await self.agent.to_thread(read)
        except OSError as e:
            raise OmeroFSError(f"{fileId}: {e.strerror}") from None

    async def getSHA1(self, fileId):
        def digest() -> str:
            fd, _ = self._open_confined(fileId)
            h = hashlib.sha1()
            buf = bytearray(_SHA1_CHUNK)
            view = memoryview(buf)
            try:
                while n := os.readv(fd, [buf]):
                    h.update(view[:n])
            finally:
                os.close(fd)
            return h.hexdigest()

        try:
            return await self.agent.to_thread(digest)
        except OSError as e:
            raise OmeroFSError(f"{fileId}: {e.strerror}") from None
