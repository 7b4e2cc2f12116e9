"""``fsagent upload`` and ``fsagent uploads``: RPC uploads from a shell.

Design notes
------------
* **One command, one fileset.** ``fsagent upload SRC...`` makes one ``ImportProcess``
  (API13.md): ``create`` (then ``addFiles`` past ``maxFilesPerCall``) declares every
  file's path and size, which reserves the space up front (``NoSpace`` before a byte is
  sent); ``write`` streams the bytes; ``verifyUpload`` hands over the SHA-256 of every
  file as this client read it and returns the import job; ``--wait`` follows it with
  ``Jobs.wait``.
* **Where files land**: ``uploads/DIR/``. A directory SRC's *contents* go into DIR, a
  file SRC goes into DIR by its name (``cp -r SRC/. FILE MOUNT/uploads/DIR/``); two
  sources giving the same path is a usage error. ``--to`` defaults to the first SRC's
  name (a file's without its extension): ``fsagent upload /data/run42`` makes
  ``uploads/run42/...``, ``fsagent upload scan.tif`` makes ``uploads/scan/scan.tif``.
  Inside a tree, symlinks, sockets, FIFOs and devices are skipped (said on stdout) and
  empty directories are not made: a fileset is regular files. A SRC named on the
  command line is followed if it is a symlink, as ``cp -H`` does.
* **Hashes: declared up front for small files, at verifyUpload for big ones.** A file
  of at most one chunk is hashed before ``create`` and its SHA-256 declared there (a
  second read of a small file costs nothing, and the agent checks it the moment the
  file is complete); its bytes are kept from that read until they are sent (up to
  ``SMALL_CACHE_BYTES`` in all), so a tree of small files costs one ``write`` per file
  and no second read. A bigger file is hashed *while* it is sent, in the same worker
  thread that reads it, and its hash goes to ``verifyUpload``: hashing first would read
  a 2 GiB file twice and keep the link idle meanwhile. The rule depends only on the
  sizes, so a re-run declares exactly what the first run did.
* **Resume is a re-run.** ``create`` is idempotent on the agent (same owner, root,
  paths, sizes and declared hashes as an unfinished process: the same ID), so the same
  command after Ctrl-C, a lost network or an agent restart gets the same process
  (the agent knows it by the first call's files; ``addFiles`` then sends only the ones
  it lacks). One ``getProcess`` shows every file's offset; a file the agent holds part
  of asks ``getUploadOffset`` (the durable offset) and continues from there, after
  re-reading and hashing the prefix locally (the hash covers the whole file). A
  complete big file is only hashed; a complete small one not even that (the agent
  checked it against the hash declared for it). ``resume: PATH from N of M bytes``
  says what was resumed, and the final line says how many bytes this run sent.
* **Throughput.** ``--jobs N`` files stream at once; each keeps up to ``DEPTH`` chunks
  in flight on the one connection (the client matches replies by msgid), chunks of
  ``min(maxWriteBytes, CHUNK_CAP)``. Reading and hashing run in worker threads
  (``hashlib`` and ``pread`` release the GIL), so the next chunk is read while the
  previous ones travel. Chunks of one file are put on the wire in offset order (each
  write task hands the turn to the next one just before it sends); a ``BadOffset``
  anyway (the agent lost what was in flight) makes that file ask ``getUploadOffset``
  and start over from there, a few times at most. On a Unix socket the client asks for
  a send buffer of one chunk (``SEND_BUFFER``), on TCP for no low-water mark
  (``rpc.bulk_sender``); either way each chunk goes out after its header without
  being copied (``send_request_parts``).
* **Errors.** Exit 2 with one line on stderr when nothing can be done: bad arguments,
  the agent unreachable, a bad token, and any refusal by the agent (``PermissionDenied``,
  ``NoSpace``, a lost connection ...; ``fsagent: NAME: message``). Exit 1 when the
  upload ran but did not succeed: verification failed (each failing file listed), a
  source could not be read or changed while it was sent, or with ``--wait`` the import
  job did not end in ``success``. Ctrl-C (or SIGTERM) stops at once, exit 130: what the
  agent has is kept and a re-run continues.
* **Progress** on stdout: on a terminal, tqdm bars (overall, and one per big file in
  flight, with bytes/s and ETA); otherwise a plain line every ``--interval`` seconds.
  Notes (``resume:``, ``skipped:``) and the summary are plain lines either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

import trio

from ..rpc import RpcError
from ..rpc.cli_support import (
    CannotConnect, add_connection_options, open_agent, run_client,
)

__all__ = ["add_upload_commands"]

EXIT_FAILED = 1
EXIT_CANNOT = 2
EXIT_INTERRUPTED = 130

# The largest chunk one write carries, whatever maxWriteBytes allows: big enough that a
# round trip per chunk costs little, small enough that DEPTH chunks per file times
# --jobs files stay a modest amount of memory (4 x 4 x 4 MiB = 64 MiB by default).
CHUNK_CAP = 4 * 2**20
# Chunks in flight per file: enough to keep the agent busy while the next one is read.
DEPTH = 4
DEFAULT_JOBS = 4
# Small files hashed up front per worker-thread trip (one thread hop each would cost
# more than hashing a 4 KiB file).
HASH_BATCH = 64
# Small files' bytes kept from hashing until they are sent, at most this much in all
# (the rest are read again): a tree of small files then costs one RPC call per file
# and no second trip to a worker thread.
SMALL_CACHE_BYTES = 64 * 2**20
# Largest read when hashing the part of a file the agent already has.
HASH_READ_BYTES = 8 * 2**20
# How often a file whose writes keep being refused at the wrong offset starts over.
MAX_RESYNCS = 3
DEFAULT_INTERVAL = 10.0
# SO_SNDBUF on the Unix socket: one chunk fits, so the client is not woken for every
# ~200 KiB the agent reads (the kernel caps it at net.core.wmem_max, 4 MiB here).
# Interleaved 1 GiB uploads on a loaded machine: client and agent CPU ~7-10% lower.
# On TCP it asks for no TCP_NOTSENT_LOWAT instead (``rpc._client.bulk_sender``).
SEND_BUFFER = 4 * 2**20


class UsageError(Exception):
    """Bad arguments or sources; one line."""


class Fatal(Exception):
    """The upload cannot go on (the agent refused, the connection is gone); one line."""


class SourceFailed(Exception):
    """One source file could not be read, or changed while it was sent."""


@dataclasses.dataclass
class Source:
    index: int
    local: str          # the path to open
    path: str           # relative to the root, "/"-separated
    size: int
    declared: str | None = None   # SHA-256 declared at create (files of one chunk)
    content: bytes | None = None  # a small file's bytes as hashed, kept until sent
    sha256: str | None = None     # as read while sending (or re-hashed on resume)
    resumed_from: int = 0
    sent: int = 0

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"path": self.path, "size": self.size}
        if self.declared is not None:
            spec["sha256"] = self.declared
        return spec


# -- arguments -----------------------------------------------------------------------------

def add_upload_commands(sub) -> None:
    upload = sub.add_parser(
        "upload", help="upload files and directory trees as one fileset (over RPC)",
        description="Upload SRC files and trees into uploads/DIR/ as one fileset "
        "(ImportProcess): sizes declared up front, several files streamed at once, "
        "SHA-256 verified end to end, then one import job. Re-running the same command "
        "after an interruption resumes where the agent's durable offsets are. A "
        "directory's contents go into DIR, a file goes into DIR by its name. Exit 0 "
        "done, 1 verification or (with --wait) the import failed, 2 bad arguments or "
        "the agent unreachable or refusing, 130 interrupted.")
    upload.add_argument("sources", metavar="SRC", nargs="+",
                        help="a file or directory to upload")
    upload.add_argument("--to", metavar="DIR", help="the fileset's directory under "
                        "uploads/ (default: the first SRC's name, a file's without its "
                        "extension)")
    upload.add_argument("--wait", action="store_true", help="wait for the import job; "
                        "exit 1 unless it ends in success")
    upload.add_argument("--jobs", metavar="N", type=_positive_int, default=DEFAULT_JOBS,
                        help=f"files sent at once (default {DEFAULT_JOBS})")
    upload.add_argument("--bwlimit", metavar="RATE", type=_rate, default=None,
                        help="at most RATE bytes per second, with suffix K, M or G "
                        "(powers of 1024); a bare number is KiB/s, as rsync reads it")
    upload.add_argument("--interval", metavar="SECONDS", type=_positive_float,
                        default=DEFAULT_INTERVAL, help="a progress line every SECONDS "
                        f"when stdout is not a terminal (default {DEFAULT_INTERVAL:g})")
    add_connection_options(upload)
    upload.set_defaults(func=cmd_upload)

    uploads = sub.add_parser(
        "uploads", help="list the agent's upload tasks (over RPC)",
        description="One line per upload task (UploadTasks.list, as uploads.json): "
        "ID, state, progress, bytes, path, import job, error; --json prints the "
        "records.")
    uploads.add_argument("--json", action="store_true", help="print the task records")
    add_connection_options(uploads)
    uploads.set_defaults(func=cmd_uploads)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected more than 0, got {text}")
    return value


_RATE_UNITS = {"": 1024, "K": 1024, "M": 1024**2, "G": 1024**3}


def _rate(text: str) -> float:
    number, unit = text.rstrip("KMGkmg"), text[len(text.rstrip("KMGkmg")):].upper()
    try:
        value = float(number) * _RATE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected RATE like 500K or 20M, got "
                                         f"{text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a rate above 0, got {text!r}")
    return value


# -- sources -------------------------------------------------------------------------------

def _check_name(path: str, what: str, shown: str | None = None) -> None:
    """``UsageError`` unless ``path`` is UTF-8; the message shows ``shown`` (default
    ``path``) as the bytes it is, since it cannot be printed as text."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(path if shown is None else shown)
        raise UsageError(f"{what} is not UTF-8 (upload paths are text): {raw!r}") from None


def default_root(first_source: str) -> str:
    name = os.path.basename(os.path.normpath(os.path.abspath(first_source)))
    if os.path.isfile(first_source):
        name = os.path.splitext(name)[0] or name
    return name


def normalise_root(root: str) -> str:
    if root.startswith("/"):
        raise UsageError(f"--to {root}: give a directory relative to uploads/")
    parts = root.rstrip("/").split("/")
    if root.rstrip("/") == "" or any(p in ("", ".", "..") for p in parts) or "\0" in root:
        raise UsageError(f"--to {root!r}: not a directory name under uploads/ (no empty, "
                         "'.' or '..' parts)")
    _check_name(root, f"--to {root!r}")
    return "/".join(parts)


def collect_sources(sources: list[str], to: str | None) -> tuple[str, list[Source],
                                                                  list[str]]:
    """(root, files sorted by path, skipped local paths); ``UsageError`` if unusable."""
    if not sources:
        raise UsageError("nothing to upload: give at least one SRC")
    root = normalise_root(to if to is not None else default_root(sources[0]))
    found: dict[str, Source] = {}
    skipped: list[str] = []

    def add(local: str, rel: str, size: int) -> None:
        _check_name(rel, "a source's name", shown=local)
        if rel in found:
            raise UsageError(f"two sources give {root}/{rel}: {found[rel].local} and {local}")
        found[rel] = Source(index=-1, local=local, path=rel, size=size)

    for src in sources:
        try:
            st = os.stat(src)
        except OSError as e:
            raise UsageError(f"{src}: {e.strerror}") from None
        name = os.path.basename(os.path.normpath(src))
        if stat.S_ISREG(st.st_mode):
            add(src, name, st.st_size)
        elif stat.S_ISDIR(st.st_mode):
            _walk(src, add, skipped)
        else:
            raise UsageError(f"{src}: not a regular file or a directory")
    files = [found[rel] for rel in sorted(found)]
    for i, f in enumerate(files):
        f.index = i
    if not files:
        raise UsageError(f"no regular files in {' '.join(sources)}")
    return root, files, skipped


def _walk(top: str, add, skipped: list[str]) -> None:
    pending = [(top, "")]
    while pending:
        directory, rel = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
            for entry in entries:
                child = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, child))
                elif entry.is_file(follow_symlinks=False):
                    add(entry.path, child, entry.stat(follow_symlinks=False).st_size)
                else:
                    skipped.append(entry.path)
        except OSError as e:
            raise UsageError(f"cannot read {e.filename or directory}: {e.strerror}") from None


# -- reading and hashing (worker threads) --------------------------------------------------

def _read_small(f: Source) -> tuple[str, bytes]:
    """A small file whole and its SHA-256 (``SourceFailed`` if its size changed)."""
    with open(f.local, "rb") as fh:
        data = fh.read(f.size + 1)
    if len(data) != f.size:
        raise SourceFailed(f"is {len(data)} bytes now, {f.size} when it was listed")
    return hashlib.sha256(data).hexdigest(), data


def _hash_files(files: list[Source]) -> list[tuple[str, bytes] | Exception]:
    """``_read_small`` for a batch (one worker-thread trip)."""
    out: list[tuple[str, bytes] | Exception] = []
    for f in files:
        try:
            out.append(_read_small(f))
        except (OSError, SourceFailed) as e:
            out.append(e)
    return out


def _hash_prefix(fd: int, length: int, hasher) -> None:
    offset = 0
    while offset < length:
        data = os.pread(fd, min(HASH_READ_BYTES, length - offset), offset)
        if not data:
            raise SourceFailed(f"ends at {offset} bytes, before the {length} the agent has")
        hasher.update(data)
        offset += len(data)


def _read_and_hash(fd: int, offset: int, length: int, hasher) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        # A short pread at a regular file's end: the file shrank since it was listed.
        raise SourceFailed(f"ends at {offset + len(data)} bytes, was listed with more")
    hasher.update(data)
    return data


def _check_unchanged(fd: int, size: int) -> None:
    now = os.fstat(fd).st_size
    if now != size:
        raise SourceFailed(f"is {now} bytes now, {size} when the upload started")


# -- the upload ----------------------------------------------------------------------------

class _RateLimit:
    """``--bwlimit``: each chunk waits for its slot so the average stays at ``rate``."""

    def __init__(self, rate: float):
        self.rate = rate
        self._next = 0.0

    async def take(self, nbytes: int) -> None:
        start = max(trio.current_time(), self._next)
        self._next = start + nbytes / self.rate
        await trio.sleep_until(start)


class Upload:
    def __init__(self, client, args: argparse.Namespace, root: str, files: list[Source],
                 display: _Display):
        self.client = client
        self.args = args
        self.root = root
        self.files = files
        self.display = display
        self.pid: str | None = None
        self.chunk = CHUNK_CAP
        self.limit = _RateLimit(args.bwlimit) if args.bwlimit else None
        self.failed: dict[int, str] = {}   # index -> why (local read problems)
        self._fatal: Fatal | None = None
        self._scope: trio.CancelScope | None = None

    async def call(self, method: str, *params):
        """An RPC call whose refusal or lost connection ends the upload (``Fatal``)."""
        try:
            return await self.client.call(method, *params)
        except RpcError as e:
            raise Fatal(f"{e.name}: {e.message}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise Fatal(f"error: lost the connection to the agent ({e}); run the same "
                        "command again to resume") from None

    def fatal(self, e: Fatal) -> None:
        if self._fatal is None:
            self._fatal = e
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> int:
        with trio.CancelScope() as self._scope:
            try:
                return await self._run()
            except Fatal as e:
                self.fatal(e)
        raise self._fatal

    async def _run(self) -> int:
        settings = await self.call("ImportProcess.getImportSettings")
        self.chunk = max(4096, min(CHUNK_CAP, int(settings["maxWriteBytes"])))
        per_call = self.per_call = max(1, int(settings.get("maxFilesPerCall", 4096)))
        await self._declare_small_hashes()
        records = await self._create(per_call)
        offsets = await self._offsets(records)
        present = sum(offsets)
        self.display.begin(self.root, self.pid, self.files, present)
        for f, offset in zip(self.files, offsets):
            if 0 < offset < f.size:
                self.display.note(f"resume: {self.root}/{f.path} from {offset} of "
                                  f"{f.size} bytes")
        todo = iter([(f, o) for f, o in zip(self.files, offsets)])
        async with trio.open_nursery() as nursery:
            for _ in range(min(self.args.jobs, len(self.files))):
                nursery.start_soon(self._worker, todo)
        if self._fatal is not None:
            raise self._fatal
        self.display.finish()
        if self.failed:
            self.display.error(f"fsagent: upload: {len(self.failed)} of {len(self.files)} "
                               "files could not be sent:")
            for index, why in sorted(self.failed.items()):
                self.display.error(f"  {self.files[index].local}: {why}")
            return EXIT_FAILED
        return await self._verify()

    async def _declare_small_hashes(self) -> None:
        small = [f for f in self.files if f.size <= self.chunk]
        limiter = trio.CapacityLimiter(2)
        unreadable: list[str] = []
        cache_left = SMALL_CACHE_BYTES

        async def batch(files: list[Source]) -> None:
            nonlocal cache_left
            results = await trio.to_thread.run_sync(_hash_files, files, limiter=limiter)
            for f, result in zip(files, results):
                if isinstance(result, Exception):
                    unreadable.append(f"error: cannot read {f.local}: "
                                      f"{getattr(result, 'strerror', None) or result}")
                    continue
                f.declared, data = result
                if len(data) <= cache_left:
                    f.content = data
                    cache_left -= len(data)

        async with trio.open_nursery() as nursery:
            for i in range(0, len(small), HASH_BATCH):
                nursery.start_soon(batch, small[i:i + HASH_BATCH])
        if unreadable:
            raise Fatal(unreadable[0])

    async def _create(self, per_call: int) -> list[dict]:
        """Create (or find again) the process with every file; its task records."""
        specs = [f.spec() for f in self.files]
        self.pid = await self.call("ImportProcess.create",
                                   {"root": self.root, "files": specs[:per_call]})
        # create recognises a process by its first call's files; a resumed one may
        # hold some or all of the files that addFiles sent the first time.
        records = (await self.call("ImportProcess.getProcess", self.pid)).get("files") or []
        held = len(records)
        expected = [f"{self.root}/{f.path}" for f in self.files[:held]]
        if held > len(specs) or [r.get("path") for r in records] != expected:
            raise Fatal(f"error: the unfinished upload {self.pid} into uploads/{self.root}/ "
                        f"holds other files than these sources ({held} files; were sources "
                        "added or removed since it started?)")
        for i in range(held, len(specs), per_call):
            await self.call("ImportProcess.addFiles", self.pid, specs[i:i + per_call])
        return records

    async def _offsets(self, records: list[dict]) -> list[int]:
        """Where each file stands on the agent: the process's records (files added just
        now have nothing), getUploadOffset (the durable offset) for each file it holds
        part of."""
        offsets = []
        for f in self.files:
            record = records[f.index] if f.index < len(records) else {}
            offsets.append(int(record.get("offset") or 0))
        for f in self.files:
            if 0 < offsets[f.index] < f.size:
                offsets[f.index] = int(await self.call("ImportProcess.getUploadOffset",
                                                       self.pid, f.index))
        return offsets

    async def _worker(self, todo: Iterable[tuple[Source, int]]) -> None:
        for f, offset in todo:
            try:
                if f.declared is not None:
                    await self._small_file(f, offset)
                else:
                    await self._one_file(f, offset)
            except Fatal as e:
                self.fatal(e)
                return
            except (OSError, SourceFailed) as e:
                why = getattr(e, "strerror", None) or str(e)
                self.failed[f.index] = why
                self.display.file_failed(f, why)

    async def _small_file(self, f: Source, offset: int) -> None:
        """A file of one chunk, hashed and declared before create: one write sends what
        the agent lacks of the bytes that were hashed (kept, or read again and checked)."""
        for attempt in range(MAX_RESYNCS + 1):
            if offset > f.size:
                raise SourceFailed(f"the agent has {offset} bytes, more than the "
                                   f"{f.size} declared")
            f.resumed_from = offset
            if offset == f.size:
                break  # all there, and the agent checked it against the declared hash
            data = f.content
            if data is None:
                digest, data = await trio.to_thread.run_sync(_read_small, f)
                if digest != f.declared:
                    raise SourceFailed("changed since it was hashed (its SHA-256 differs)")
            if self.limit is not None:
                await self.limit.take(f.size - offset)
            try:
                await self.client.call("ImportProcess.write", self.pid, f.index, offset,
                                       data[offset:] if offset else data)
            except RpcError as e:
                if e.name != "BadOffset":
                    raise Fatal(f"{e.name}: {e.message}") from None
                offset = int(await self.call("ImportProcess.getUploadOffset", self.pid,
                                             f.index))
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise Fatal(f"error: lost the connection to the agent ({e}); run the "
                            "same command again to resume") from None
            f.sent += f.size - offset
            self.display.advance(f, f.size - offset)
            break
        else:
            raise Fatal(f"BadOffset: {self.root}/{f.path}: writes refused "
                        f"{MAX_RESYNCS + 1} times at the offset the agent named")
        f.content = None
        f.sha256 = f.declared
        self.display.file_done(f)

    async def _one_file(self, f: Source, offset: int) -> None:
        fd = await trio.to_thread.run_sync(os.open, f.local, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for attempt in range(MAX_RESYNCS + 1):
                if offset > f.size:
                    raise SourceFailed(f"the agent has {offset} bytes, more than the "
                                       f"{f.size} declared")
                f.resumed_from = offset
                hasher = hashlib.sha256()
                if offset:
                    await trio.to_thread.run_sync(_hash_prefix, fd, offset, hasher)
                self.display.file_started(f, offset)
                refused = await self._stream(f, fd, offset, hasher)
                if refused is None:
                    break
                # The agent is somewhere else than this stream: continue from there.
                offset = int(await self.call("ImportProcess.getUploadOffset", self.pid,
                                             f.index))
                self.display.note(f"resync: {self.root}/{f.path} at {offset} bytes "
                                  f"({refused})")
            else:
                raise Fatal(f"BadOffset: {self.root}/{f.path}: writes refused "
                            f"{MAX_RESYNCS + 1} times at the offset the agent named")
            await trio.to_thread.run_sync(_check_unchanged, fd, f.size)
        finally:
            os.close(fd)
        f.sha256 = hasher.hexdigest()
        self.display.file_done(f)

    async def _stream(self, f: Source, fd: int, offset: int, hasher) -> str | None:
        """Send ``[offset, size)``, ``DEPTH`` chunks in flight; the ``BadOffset``
        message if the agent refused one (the caller resyncs), else None."""
        window = trio.Semaphore(DEPTH)
        refused: list[str] = []
        failure: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            turn = trio.Event()
            turn.set()
            position = offset
            while position < f.size and not (refused or failure):
                await window.acquire()
                if refused or failure:
                    break
                length = min(self.chunk, f.size - position)
                try:
                    data = await trio.to_thread.run_sync(_read_and_hash, fd, position,
                                                         length, hasher)
                except (OSError, SourceFailed) as e:
                    failure.append(e)
                    nursery.cancel_scope.cancel()
                    break
                if self.limit is not None:
                    await self.limit.take(length)
                next_turn = trio.Event()
                nursery.start_soon(self._write, f, position, data, turn, next_turn, window,
                                   refused, failure, nursery.cancel_scope)
                turn = next_turn
                position += length
        if failure:
            raise failure[0]
        return refused[0] if refused else None

    async def _write(self, f: Source, offset: int, data: bytes, turn: trio.Event,
                     next_turn: trio.Event, window: trio.Semaphore, refused: list,
                     failure: list, scope: trio.CancelScope) -> None:
        await turn.wait()
        # Handing the turn on before the call: the next task cannot run until this one
        # blocks inside call(), i.e. once its request is queued for the wire first.
        next_turn.set()
        try:
            await self.client.call("ImportProcess.write", self.pid, f.index, offset, data)
        except RpcError as e:
            if e.name == "BadOffset":
                refused.append(e.message)
            else:
                failure.append(Fatal(f"{e.name}: {e.message}"))
            scope.cancel()
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            failure.append(Fatal(f"error: lost the connection to the agent ({e}); run the "
                                 "same command again to resume"))
            scope.cancel()
            return
        finally:
            window.release()
        f.sent += len(data)
        self.display.advance(f, len(data))

    async def _verify(self) -> int:
        hashes = [f.sha256 for f in self.files]
        if len(hashes) > self.per_call:
            # More than a request's msgpack array may hold: the agent takes the 32-byte
            # digests concatenated in one bin instead (ImportProcess.verifyUpload).
            hashes = b"".join(bytes.fromhex(h) for h in hashes)
        try:
            job = await self.client.call("ImportProcess.verifyUpload", self.pid, hashes)
        except RpcError as e:
            if e.name != "VerificationFailed":
                raise Fatal(f"{e.name}: {e.message}") from None
            self.display.error("fsagent: upload: verification failed:")
            for line in e.message.splitlines() or [e.message]:
                self.display.error(f"  {line}")
            # What the agent holds is not what is here now (a source changed between
            # runs, say): only sending those files again from the start mends it.
            self.display.error("  (remove those files from uploads/, with rm through the "
                               "mount or UploadTasks.delete, and run the same command "
                               "again to send them anew)")
            return EXIT_FAILED
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise Fatal(f"error: lost the connection to the agent ({e}); run the same "
                        "command again to resume") from None
        self.display.note(f"verified: {len(self.files)} files; import job {job}")
        if not self.args.wait:
            return 0
        state = await self.call("Jobs.wait", job)
        self.display.note(f"import job {job}: {state}")
        return 0 if state == "success" else EXIT_FAILED


# -- what the user sees --------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Display:
    """Progress and notes on stdout (``LineDisplay`` or ``BarDisplay``)."""

    def __init__(self, out: TextIO, interval: float):
        self.out = out
        self.interval = interval
        self.total = 0
        self.files_total = 0
        self.done_bytes = 0       # acknowledged by the agent (present ones included)
        self.present = 0          # what the agent had before this run
        self.files_done = 0
        self.started = time.monotonic()
        self.root = ""

    def begin(self, root: str, pid: str, files: list[Source], present: int) -> None:
        self.root = root
        self.total = sum(f.size for f in files)
        self.files_total = len(files)
        self.present = self.done_bytes = present
        self.started = time.monotonic()
        self.note(f"upload: {len(files)} files, {human_bytes(self.total)} into "
                  f"uploads/{root}/ (process {pid})"
                  + (f"; the agent has {human_bytes(present)} already" if present else ""))

    def note(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def error(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def file_started(self, f: Source, offset: int) -> None:
        """Plain lines report totals only (the periodic line), not each file's start."""

    def advance(self, f: Source, n: int) -> None:
        self.done_bytes += n

    def file_done(self, f: Source) -> None:
        self.files_done += 1

    def file_failed(self, f: Source, why: str) -> None:
        """Said at the end with the other failures (``error``), not as a progress line."""

    def sent(self) -> int:
        return self.done_bytes - self.present

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.sent() / elapsed
        left = self.total - self.done_bytes
        eta = _clock(left / rate) if rate > 0 else "?"
        percent = 100.0 * self.done_bytes / self.total if self.total else 100.0
        return (f"progress: {human_bytes(self.done_bytes)} of {human_bytes(self.total)} "
                f"({percent:.0f}%), {self.files_done} of {self.files_total} files, "
                f"{human_bytes(rate)}/s, ETA {eta}")

    def finish(self) -> None:
        elapsed = time.monotonic() - self.started
        done_total = self.done_bytes
        self.total = 0   # no more progress lines while verifying and waiting
        self.close()
        self.note(f"uploaded: {self.files_done} of {self.files_total} files, "
                  f"{human_bytes(done_total)} in {elapsed:.1f} s "
                  f"({human_bytes(self.sent() / max(elapsed, 1e-6))}/s); sent "
                  f"{self.sent()} bytes this run")

    def close(self) -> None:
        """Nothing to take down: plain lines leave no bars on the terminal."""

    async def run(self) -> None:
        """Periodic output until cancelled."""
        await trio.sleep_forever()


class LineDisplay(_Display):
    """Not a terminal: one ``progress:`` line every ``interval`` seconds."""

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            if self.total:
                self.note(self.line())


class BarDisplay(_Display):
    """A terminal: tqdm bars, the overall one first, then one per big file in flight."""

    def __init__(self, out: TextIO, interval: float, jobs: int, chunk_hint: int):
        super().__init__(out, interval)
        import tqdm
        self._tqdm = tqdm.tqdm
        self._tqdm.monitor_interval = 0   # no monitor thread: we refresh from trio
        self.overall = None
        self.bars: dict[int, Any] = {}
        self.free_rows = list(range(jobs, 0, -1))
        self.chunk_hint = chunk_hint

    def _bar(self, **kwargs):
        # A terminal that reports no size (a fresh pty, a serial console) is taken as
        # 80 x 24: tqdm would take 0 x 0 and hide every bar.
        try:
            size = os.get_terminal_size(self.out.fileno())
            sized = size.columns > 0 and size.lines > 0
        except (OSError, ValueError):
            sized = False
        width = {"dynamic_ncols": True} if sized else {"ncols": 80, "nrows": 24}
        return self._tqdm(file=self.out, unit="B", unit_scale=True, unit_divisor=1024,
                          mininterval=0.2, **width, **kwargs)

    def begin(self, root, pid, files, present) -> None:
        super().begin(root, pid, files, present)
        self.overall = self._bar(total=self.total, initial=present, desc=root,
                                 position=0, leave=True)
        self.overall.set_postfix_str(f"{self.files_done}/{self.files_total} files")

    def note(self, line: str) -> None:
        if self.overall is None:
            super().note(line)
        else:
            self._tqdm.write(line, file=self.out)

    def file_started(self, f: Source, offset: int) -> None:
        if f.size > self.chunk_hint and self.free_rows and f.index not in self.bars:
            row = self.free_rows.pop()
            name = f.path if len(f.path) <= 40 else "..." + f.path[-37:]
            self.bars[f.index] = (row, self._bar(total=f.size, initial=offset, desc=name,
                                                 position=row, leave=False))

    def advance(self, f: Source, n: int) -> None:
        super().advance(f, n)
        self.overall.update(n)
        if f.index in self.bars:
            self.bars[f.index][1].update(n)

    def _drop(self, f: Source) -> None:
        row_bar = self.bars.pop(f.index, None)
        if row_bar is not None:
            row_bar[1].close()
            self.free_rows.append(row_bar[0])

    def file_done(self, f: Source) -> None:
        super().file_done(f)
        self._drop(f)
        self.overall.set_postfix_str(f"{self.files_done}/{self.files_total} files")

    def file_failed(self, f: Source, why: str) -> None:
        self._drop(f)

    def close(self) -> None:
        for index in list(self.bars):
            self.bars.pop(index)[1].close()
        if self.overall is not None:
            self.overall.close()
            self.overall = None

    async def run(self) -> None:
        # tqdm redraws on update; this keeps rate and ETA moving through a stall.
        while True:
            await trio.sleep(1.0)
            if self.overall is not None:
                self.overall.refresh()


# -- the commands --------------------------------------------------------------------------

def cmd_upload(args: argparse.Namespace) -> int:
    try:
        root, files, skipped = collect_sources(args.sources, args.to)
    except UsageError as e:
        print(f"fsagent upload: error: {e}", file=sys.stderr)
        return EXIT_CANNOT
    out = sys.stdout
    display: _Display = LineDisplay(out, args.interval)
    if out.isatty():
        try:
            display = BarDisplay(out, args.interval, args.jobs, CHUNK_CAP)
        except ImportError:
            pass  # tqdm missing (an install older than this command): plain lines
    for path in skipped:
        display.note(f"skipped: {path} (not a regular file or directory)")
    outcome: dict[str, Any] = {"interrupted": False}

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signal, nursery.cancel_scope, outcome)
            nursery.start_soon(display.run)
            try:
                async with open_agent(args, send_buffer=SEND_BUFFER) as client:
                    outcome["code"] = await Upload(client, args, root, files,
                                                   display).run()
            except CannotConnect as e:
                outcome["error"] = f"fsagent: error: {e}"
            except Fatal as e:
                outcome["error"] = f"fsagent: {e}"
            nursery.cancel_scope.cancel()
        return outcome.get("code", EXIT_CANNOT)

    try:
        code = trio.run(main)
    finally:
        display.close()
    if outcome["interrupted"]:
        print("fsagent upload: interrupted; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if "error" in outcome:
        print(outcome["error"], file=sys.stderr)
        return EXIT_CANNOT
    return code


async def _on_signal(scope: trio.CancelScope, outcome: dict) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            outcome["interrupted"] = True
            scope.cancel()
            return


def _percent(progress) -> str:
    # Rounded down: a task at 99.7% is not done.
    return f"{int(progress)}%" if isinstance(progress, (int, float)) else "?"


def cmd_uploads(args: argparse.Namespace) -> int:
    async def body(client) -> int:
        try:
            records = await client.call("UploadTasks.list")
        except RpcError as e:
            print(f"fsagent: {e.name}: {e.message}", file=sys.stderr)
            return EXIT_CANNOT
        if args.json:
            print(json.dumps(records, indent=2, sort_keys=True))
            return 0
        for r in records:
            size = "?" if r.get("size") is None else r["size"]
            print(f"{r.get('taskID')}\t{r.get('state')}\t{_percent(r.get('progress'))}\t"
                  f"{r.get('offset')}/{size}\t{r.get('path')}\t{r.get('job') or '-'}\t"
                  f"{r.get('error') or ''}")
        return 0

    return run_client(args, body)
