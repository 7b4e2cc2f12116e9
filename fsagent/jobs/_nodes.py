"""The ``jobs/`` tree: every job as a directory of one-value files.

Design notes
------------
* **Thin.** Every node calls one engine verb (``submit_spec_text``, ``control``,
  ``set_priority``, ``wait``) and maps the engine's exceptions to an errno
  (``_ERRNO``); the same verbs serve RPC and the CLI.
* **Validated in write().** ``control``, ``priority`` and ``spec`` check what is
  written inside ``write()`` and fail that write (EINVAL: not understood; EBUSY: not in
  this state), because shells report write errors but ignore errors at close. A
  trailing newline is accepted and O_TRUNC (setattr size=0) is a no-op. A refused
  ``spec`` leaves its reason in ``jobs/NAME/message``.
* **configfs-style submission.** ``mkdir jobs/NAME`` makes a draft whose only file is
  ``spec``; a valid ``spec`` turns it into a pending job with that ID; ``rmdir`` removes
  a draft (a real job is ENOTEMPTY). A spec that spans several kernel write chunks
  (each a multiple of 4 KiB) is accumulated until it parses; a short write that does
  not parse is final and refused at once.
* **``jobs.json``** is never rendered whole (``JobsListing``): ~15 MB for a thousand
  fileset imports, and a rendering's peak stays in the agent's RSS. Its records are
  built at open, but a finished job's spec, nearly all of those bytes, stays packed
  until a read reaches it.
* **Reading.** Value files render on open (``DynamicFile``: direct_io, one snapshot per
  handle). ``wait`` blocks its read until the job is finished and ends with ESHUTDOWN
  if the agent stops first. ``outputs/*`` are real files under the state dir, read
  with ``pread`` in worker threads; outputs are immutable, so the kernel may cache
  them. ``log`` is the job's log file (if it has one: most jobs have no directory)
  followed by the lines not yet written to it (``_log.py``), read live (direct_io):
  a log without a file is served from memory on the event loop, one with a file in a
  worker thread.
* **Who may steer a job.** ``control``, ``priority`` (writing) and ``rmdir`` belong to
  the job's owner and root; anyone else gets EPERM from the handler, which checks the
  request's uid (``may_manage``). The modes say "writable by all" (0222, 0666) so the
  kernel's ``default_permissions`` check lets the request reach that handler: modes
  alone could only answer EACCES, and "not yours" is EPERM, as for a sticky directory.
  A job with no owner (submitted over RPC, or by the agent) belongs to the agent's uid.
* Nodes are cached per job, so a job keeps its inode numbers while the kernel knows
  them and ``ls jobs/`` of 10,000 jobs creates no garbage beyond the listing.
* **Why one module** (it is over 500 lines): it is one FUSE tree, a dozen small node
  classes (one per kind of file) that share one errno table (``_ERRNO``), one owner rule
  (``may_manage``) and one node cache; split, each would import the others' privates.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import stat
from collections.abc import Iterable

from pyfuse3 import FUSEError

from ..fs import DynamicFile, Handle, Node, make_attributes
from ._engine import (
    BadSpec, Engine, JobExists, JobNotFinished, NoSuchJob, PackedSpec, ShuttingDown,
    valid_job_name,
)
from ._states import IllegalMove, State, UnknownVerb

__all__ = ["JobsDirectory", "JobsJson", "JobsListing", "render_jobs_json"]

_ERRNO = {
    NoSuchJob: errno.ENOENT,
    UnknownVerb: errno.EINVAL,
    BadSpec: errno.EINVAL,
    IllegalMove: errno.EBUSY,
    JobExists: errno.EEXIST,
    ShuttingDown: errno.ESHUTDOWN,
}
_SPEC_LIMIT = 1 << 20
_PAGE = 4096


def _fuse_error(e: Exception) -> FUSEError:
    return FUSEError(_ERRNO[type(e)])


def _uid(ctx) -> int | None:
    return getattr(ctx, "uid", None)


def may_manage(owner_uid: int | None, ctx) -> None:
    """EPERM unless the request comes from the job's owner or root."""
    uid = _uid(ctx)
    owner = os.getuid() if owner_uid is None else owner_uid
    if uid is not None and uid != 0 and uid != owner:
        raise FUSEError(errno.EPERM)


class JobsListing:
    """``jobs.json`` as it is at one moment, served a piece at a time.

    A thousand fileset imports listing 100,000 files is ~15 MB of JSON; rendered whole
    at each open (and at each stat, for its size), its peak stayed in the agent's RSS.
    Here the document is a list of pieces: bytes (the records, each whole but for a
    finished job's spec) alternating with the packed specs of finished jobs
    (``PackedSpec``, kept by the job anyway: no copy). Every piece's length is known
    without unpacking, so the size is exact, and a read unpacks only the specs it
    covers. The bytes are those of ``json.dumps(info, separators=(",", ":"))`` per
    record, one record per line: a packed spec is immutable, so what a handle reads is
    the listing as it was at open, however the jobs change or go meanwhile."""

    __slots__ = ("pieces", "ends", "size", "_unpacked")

    def __init__(self, engine: Engine):
        pieces: list[bytes | PackedSpec] = []
        buf = bytearray(b"[")
        first = True
        for job in engine.listing():
            buf += b"\n" if first else b",\n"
            first = False
            head, packed = job.info_json_parts()
            buf += head
            if packed is not None:
                pieces += (bytes(buf), packed)
                buf = bytearray(b"}")
        buf += b"]\n" if first else b"\n]\n"
        pieces.append(bytes(buf))
        self.pieces = pieces
        self.ends: list[int] = []
        end = 0
        for piece in pieces:
            end += piece.length if isinstance(piece, PackedSpec) else len(piece)
            self.ends.append(end)
        self.size = end
        self._unpacked: tuple[int, bytes] | None = None  # the last spec read (sequential)

    def _piece(self, i: int) -> bytes:
        piece = self.pieces[i]
        if not isinstance(piece, PackedSpec):
            return piece
        if self._unpacked is None or self._unpacked[0] != i:
            self._unpacked = (i, piece.text().encode("ascii"))
        return self._unpacked[1]

    def read(self, offset: int, size: int) -> bytes:
        out = []
        i = bisect.bisect_right(self.ends, offset)
        while size > 0 and i < len(self.pieces):
            start = self.ends[i - 1] if i else 0
            chunk = self._piece(i)[offset - start : offset - start + size]
            out.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
            i += 1
        return b"".join(out)

    def render(self) -> bytes:
        """The whole document (for tests and small listings)."""
        return self.read(0, self.size)


def render_jobs_json(engine: Engine) -> bytes:
    """``jobs.json`` whole: a JSON array, one job's info record per line."""
    return JobsListing(engine).render()


class _ListingHandle(Handle):
    direct_io = True

    def __init__(self, node: Node, listing: JobsListing):
        super().__init__(node)
        self.listing = listing

    async def read(self, offset: int, size: int) -> bytes:
        return self.listing.read(offset, size)


class JobsJson(Node):
    """``MOUNT/jobs.json``: every job's info record (``JobsListing``), a snapshot per
    open, as any rendered file (``fs.DynamicFile``), but never rendered whole."""

    entry_timeout = 1.0
    attr_timeout = 0.0  # the size changes with the jobs

    def __init__(self, engine: Engine):
        self.engine = engine

    async def getattr(self, ctx):
        return make_attributes(inode=self.inode, mode=stat.S_IFREG | 0o444,
                               size=JobsListing(self.engine).size, entry_timeout=1.0,
                               attr_timeout=0.0)

    async def open(self, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FUSEError(errno.EACCES)
        return _ListingHandle(self, JobsListing(self.engine))


class JobsDirectory(Node):
    """``MOUNT/jobs``: one directory per job and per draft."""

    is_directory = True
    entry_timeout = 0.0  # jobs come and go without the kernel hearing of it
    attr_timeout = 0.0

    def __init__(self, engine: Engine):
        self.engine = engine
        self._nodes: dict[str, JobDirectory] = {}

    def _node(self, job_id: str) -> JobDirectory:
        node = self._nodes.get(job_id)
        if node is None:
            node = self._nodes[job_id] = JobDirectory(self.engine, job_id)
        return node

    def _names(self) -> list[str]:
        return [j.id for j in self.engine.listing()] + list(self.engine.drafts)

    async def getattr(self, ctx):
        return make_attributes(inode=self.inode, mode=stat.S_IFDIR | 0o777 | stat.S_ISVTX,
                               nlink=2, entry_timeout=0.0, attr_timeout=0.0)

    async def lookup(self, name: bytes, ctx) -> Node:
        job_id = os.fsdecode(name)
        if job_id not in self.engine.jobs and job_id not in self.engine.drafts:
            raise FUSEError(errno.ENOENT)
        return self._node(job_id)

    async def children(self, ctx) -> Iterable[tuple[bytes, Node]]:
        names = self._names()
        live = set(names)
        for gone in [k for k in self._nodes if k not in live]:
            del self._nodes[gone]  # evicted jobs, removed drafts
        return [(os.fsencode(n), self._node(n)) for n in names]

    async def mkdir(self, name: bytes, mode: int, ctx) -> Node:
        job_id = os.fsdecode(name)
        if not valid_job_name(job_id):
            raise FUSEError(errno.EINVAL)
        try:
            self.engine.create_draft(job_id, _uid(ctx))
        except JobExists as e:
            raise _fuse_error(e) from None
        return self._node(job_id)

    async def rmdir(self, name: bytes, ctx) -> None:
        job_id = os.fsdecode(name)
        if job_id in self.engine.drafts:
            may_manage(self.engine.drafts[job_id].owner_uid, ctx)
            self.engine.remove_draft(job_id)
            self._nodes.pop(job_id, None)
        elif job_id in self.engine.jobs:
            may_manage(self.engine.jobs[job_id].owner_uid, ctx)
            try:
                await self.engine.remove(job_id)
            except JobNotFinished:
                raise FUSEError(errno.EBUSY) from None
            self._nodes.pop(job_id, None)
        else:
            raise FUSEError(errno.ENOENT)


class JobDirectory(Node):
    """``jobs/<id>/``: a draft (``spec``, ``message``) or a job (every file)."""

    is_directory = True
    entry_timeout = 0.0
    attr_timeout = 0.0
    JOB_FILES = ("spec", "status", "progress", "message", "error", "info.json", "priority",
                 "control", "wait", "log", "outputs")

    def __init__(self, engine: Engine, job_id: str):
        self.engine = engine
        self.job_id = job_id
        self._files: dict[str, Node] = {}

    def _owner(self) -> int | None:
        job = self.engine.jobs.get(self.job_id)
        if job is not None:
            return job.owner_uid
        draft = self.engine.drafts.get(self.job_id)
        if draft is not None:
            return draft.owner_uid
        raise FUSEError(errno.ENOENT)

    def _created(self) -> int:
        job = self.engine.jobs.get(self.job_id) or self.engine.drafts.get(self.job_id)
        return int(job.created * 1e9) if job else 0

    def _names(self) -> tuple[str, ...]:
        if self.job_id in self.engine.jobs:
            return self.JOB_FILES
        draft = self.engine.drafts.get(self.job_id)
        if draft is None:
            return ()
        return ("spec", "message") if draft.message else ("spec",)

    async def getattr(self, ctx):
        t = self._created()
        return make_attributes(inode=self.inode, mode=stat.S_IFDIR | 0o755, nlink=3,
                               uid=self._owner(), mtime_ns=t, ctime_ns=t,
                               entry_timeout=0.0, attr_timeout=0.0)

    def _file(self, name: str) -> Node:
        node = self._files.get(name)
        if node is None:
            node = self._files[name] = _make_file(self.engine, self.job_id, name)
        return node

    async def lookup(self, name: bytes, ctx) -> Node:
        n = os.fsdecode(name)
        if n not in self._names():
            raise FUSEError(errno.ENOENT)
        return self._file(n)

    async def children(self, ctx):
        return [(os.fsencode(n), self._file(n)) for n in self._names()]


# -- files ---------------------------------------------------------------------------------


class _JobFile(DynamicFile):
    """A value file of one job, owned by the job's owner."""

    def __init__(self, engine: Engine, job_id: str, render, mode: int = 0o444):
        super().__init__(render, mode)
        self.engine = engine
        self.job_id = job_id

    def owner(self) -> int | None:
        job = self.engine.jobs.get(self.job_id)
        if job is not None:
            return job.owner_uid
        draft = self.engine.drafts.get(self.job_id)
        return draft.owner_uid if draft is not None else None

    async def getattr(self, ctx):
        attrs = await super().getattr(ctx)
        owner = self.owner()
        if owner is not None:
            attrs.st_uid = owner
        return attrs

    def check_manager(self, ctx) -> None:
        job = self.engine.jobs.get(self.job_id)
        if job is None:
            raise FUSEError(errno.ENOENT)
        may_manage(job.owner_uid, ctx)

    async def setattr(self, attr, fields, fh, ctx):
        # O_TRUNC arrives as setattr(size=0) before the write: accept it, change nothing.
        if self.mode & 0o222 and fields.update_size and attr.st_size == 0:
            return await self.getattr(ctx)
        raise FUSEError(errno.EPERM)


def _make_file(engine: Engine, job_id: str, name: str) -> Node:
    def job():
        try:
            return engine.get(job_id)
        except NoSuchJob:
            raise FUSEError(errno.ENOENT) from None

    def line(text: str) -> bytes:
        return f"{text}\n".encode() if text else b""

    if name == "status":
        return _JobFile(engine, job_id, lambda: line(job().state.value))
    if name == "progress":
        return _JobFile(engine, job_id, lambda: line(str(job().live_progress())))
    if name == "message":
        def message():
            if job_id in engine.drafts:
                return line(engine.drafts[job_id].message)
            return line(job().live_message().splitlines()[-1:][0]
                        if job().live_message() else "")
        return _JobFile(engine, job_id, message)
    if name == "error":
        def error():
            j = job()
            return line(f"{j.error_code} {j.error_description}") if j.error_code else b""
        return _JobFile(engine, job_id, error)
    if name == "info.json":
        return _JobFile(engine, job_id,
                        lambda: (json.dumps(job().info(), indent=2) + "\n").encode())
    if name == "spec":
        return SpecFile(engine, job_id)
    if name == "priority":
        return PriorityFile(engine, job_id)
    if name == "control":
        return ControlFile(engine, job_id)
    if name == "wait":
        return WaitFile(engine, job_id)
    if name == "log":
        return LogFile(engine, job_id)
    if name == "outputs":
        return OutputsDirectory(engine, job_id)
    raise KeyError(name)


class _WriteHandle(Handle):
    """A handle on a writable value file: reads come from the snapshot taken at open."""

    direct_io = True

    def __init__(self, node: Node, content: bytes, writer):
        super().__init__(node)
        self.content = content
        self._writer = writer

    async def read(self, offset: int, size: int) -> bytes:
        return self.content[offset : offset + size]

    async def write(self, offset: int, data: bytes) -> int:
        return await self._writer(self, offset, data)


def _one_word(data: bytes) -> str:
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise FUSEError(errno.EINVAL) from None


class ControlFile(_JobFile):
    """Write ``cancel``, ``pause``, ``resume`` or ``retry``."""

    def __init__(self, engine, job_id):
        super().__init__(engine, job_id, lambda: b"", mode=0o222)

    async def open(self, flags, ctx):
        if flags & os.O_ACCMODE != os.O_WRONLY:
            raise FUSEError(errno.EACCES)
        self.check_manager(ctx)
        return _WriteHandle(self, b"", self._write)

    async def _write(self, handle, offset: int, data: bytes) -> int:
        try:
            await self.engine.control(self.job_id, _one_word(data))
        except (UnknownVerb, IllegalMove, NoSuchJob) as e:
            raise _fuse_error(e) from None
        return len(data)


class PriorityFile(_JobFile):
    """Read the priority; write an integer to change it (pending and paused jobs)."""

    def __init__(self, engine, job_id):
        super().__init__(engine, job_id, self._render, mode=0o666)

    def _render(self) -> bytes:
        try:
            return f"{self.engine.get(self.job_id).priority}\n".encode()
        except NoSuchJob:
            raise FUSEError(errno.ENOENT) from None

    async def open(self, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self.check_manager(ctx)
        return _WriteHandle(self, await self.render(), self._write)

    async def _write(self, handle, offset: int, data: bytes) -> int:
        word = _one_word(data)
        try:
            priority = int(word)
        except ValueError:
            raise FUSEError(errno.EINVAL) from None
        try:
            await self.engine.set_priority(self.job_id, priority)
        except (BadSpec, IllegalMove, NoSuchJob) as e:
            raise _fuse_error(e) from None
        return len(data)


class SpecFile(_JobFile):
    """A draft's ``spec``: write the job's JSON to queue it. Read-only once accepted."""

    def __init__(self, engine, job_id):
        super().__init__(engine, job_id, self._render, mode=0o644)

    def _render(self) -> bytes:
        job = self.engine.jobs.get(self.job_id)
        if job is None:
            return b""
        return (json.dumps({"type": job.kind, "priority": job.priority, **job.spec}) + "\n"
                ).encode()

    async def open(self, flags, ctx):
        handle = _WriteHandle(self, await self.render(), self._write)
        handle.buffer = bytearray()
        handle.refused = False
        return handle

    async def _write(self, handle, offset: int, data: bytes) -> int:
        if self.job_id in self.engine.jobs:
            raise FUSEError(errno.EBUSY)  # already submitted: a job's spec is fixed
        draft = self.engine.drafts.get(self.job_id)
        if draft is None:
            raise FUSEError(errno.ENOENT)
        if handle.refused or offset != len(handle.buffer):
            raise FUSEError(errno.EINVAL)
        if len(handle.buffer) + len(data) > _SPEC_LIMIT:
            draft.message = f"spec is larger than {_SPEC_LIMIT} bytes"
            handle.refused = True
            raise FUSEError(errno.EFBIG)
        handle.buffer += data
        try:
            text = handle.buffer.decode("utf-8")
        except UnicodeDecodeError:
            if len(data) % _PAGE == 0:
                return len(data)  # a multi-byte character may straddle kernel chunks
            return self._refuse(handle, draft, "spec is not UTF-8 text")
        if len(data) % _PAGE == 0 and _truncated_json(text):
            return len(data)  # the rest follows in the next chunk of the same write
        try:
            await self.engine.submit_spec_text(self.job_id, text, owner_uid=draft.owner_uid)
        except BadSpec as e:
            return self._refuse(handle, draft, str(e))
        except JobExists as e:
            raise _fuse_error(e) from None
        return len(data)

    @staticmethod
    def _refuse(handle, draft, reason: str) -> int:
        draft.message = reason
        handle.refused = True
        raise FUSEError(errno.EINVAL)


def _truncated_json(text: str) -> bool:
    """True if ``text`` fails to parse only because it ends too early."""
    if not text.strip():
        return True
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
    return False


class _WaitHandle(Handle):
    direct_io = True

    def __init__(self, node: WaitFile):
        super().__init__(node)
        self.content: bytes | None = None

    async def read(self, offset: int, size: int) -> bytes:
        if self.content is None:
            try:
                state = await self.node.engine.wait(self.node.job_id)
            except (NoSuchJob, ShuttingDown) as e:
                raise _fuse_error(e) from None
            self.content = f"{state.value}\n".encode()
        return self.content[offset : offset + size]


class WaitFile(_JobFile):
    """Reading blocks until the job is finished, then returns its final status line."""

    def __init__(self, engine, job_id):
        # The size reported is that of the longest answer; reads are direct_io anyway.
        longest = max(len(s.value) for s in State) + 1
        super().__init__(engine, job_id, lambda: b" " * longest)

    async def open(self, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FUSEError(errno.EACCES)
        return _WaitHandle(self)


class _StoredHandle(Handle):
    keep_cache = True  # published outputs never change

    def __init__(self, node: StoredFile, fd: int):
        super().__init__(node)
        self.fd = fd

    async def read(self, offset: int, size: int) -> bytes:
        return await self.node.to_thread(os.pread, self.fd, size, offset)

    async def release(self) -> None:
        os.close(self.fd)


class StoredFile(Node):
    """A published output: a real, immutable file under the state dir, read-only."""

    attr_timeout = 1.0
    entry_timeout = 1.0

    def __init__(self, path, *, to_thread):
        self.path = path
        self.to_thread = to_thread  # the agent's capacity-limited worker threads

    async def getattr(self, ctx):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise FUSEError(errno.ENOENT) from None
        return make_attributes(inode=self.inode, mode=stat.S_IFREG | 0o444,
                               size=st.st_size, mtime_ns=st.st_mtime_ns,
                               ctime_ns=st.st_mtime_ns, entry_timeout=self.attr_timeout,
                               attr_timeout=self.attr_timeout)

    async def open(self, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FUSEError(errno.EACCES)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FUSEError(errno.ENOENT) from None
        return _StoredHandle(self, fd)


class _LogHandle(Handle):
    direct_io = True  # a growing log: never trust a cached size

    def __init__(self, node: LogFile):
        super().__init__(node)
        self.fd: int | None = None  # opened on the first read that needs the file

    async def read(self, offset: int, size: int) -> bytes:
        entry = self.node.entry()
        data = entry.memory_only()
        if data is not None:
            return data[offset : offset + size]
        self.fd, data = await self.node.engine.agent.to_thread(entry.read, self.fd, offset,
                                                              size)
        return data

    async def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


class LogFile(Node):
    """``jobs/<id>/log``: every line logged so far, written to disk or not yet."""

    attr_timeout = 0.0
    entry_timeout = 0.0

    def __init__(self, engine: Engine, job_id: str):
        self.engine = engine
        self.job_id = job_id

    def entry(self):
        try:
            return self.engine.log_of(self.engine.get(self.job_id))
        except NoSuchJob:
            raise FUSEError(errno.ENOENT) from None

    async def getattr(self, ctx):
        return make_attributes(inode=self.inode, mode=stat.S_IFREG | 0o444,
                               size=self.entry().size(), entry_timeout=0.0,
                               attr_timeout=0.0)

    async def open(self, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FUSEError(errno.EACCES)
        self.entry()  # ENOENT for a job that is gone
        return _LogHandle(self)


class OutputsDirectory(Node):
    """``jobs/<id>/outputs/``: empty until the job succeeds, then its output files."""

    is_directory = True
    entry_timeout = 0.0
    attr_timeout = 0.0

    def __init__(self, engine: Engine, job_id: str):
        self.engine = engine
        self.job_id = job_id
        # Keyed by (name, completion time): a retried job's new archive.zip is a new
        # node with a new inode, so the kernel cannot serve the old one's cached pages.
        self._files: dict[tuple[str, float | None], StoredFile] = {}

    def _names(self) -> list[str]:
        job = self.engine.jobs.get(self.job_id)
        return list(job.outputs) if job is not None and job.state is State.SUCCESS else []

    def _file(self, name: str) -> StoredFile:
        key = (name, self.engine.jobs[self.job_id].completed)
        node = self._files.get(key)
        if node is None:
            path = self.engine.outputs_dir(self.job_id) / name
            node = self._files[key] = StoredFile(path, to_thread=self.engine.agent.to_thread)
        return node

    async def getattr(self, ctx):
        return make_attributes(inode=self.inode, mode=stat.S_IFDIR | 0o555, nlink=2,
                               entry_timeout=0.0, attr_timeout=0.0)

    async def lookup(self, name: bytes, ctx):
        n = os.fsdecode(name)
        if n not in self._names():
            raise FUSEError(errno.ENOENT)
        return self._file(n)

    async def children(self, ctx):
        names = self._names()
        self._files = {k: f for k, f in self._files.items() if k[0] in names}
        return [(os.fsencode(n), self._file(n)) for n in names]
