"""What a job kind is, the registry of kinds, and the helpers every kind shares.

Design notes
------------
* **A kind is one module** defining a ``Kind`` subclass and registering it with
  ``@register``. It has two methods: ``validate(spec, env)`` (on the event loop, at
  submit time: refuse bad input with ``SpecError`` before anything is queued, and
  return the normalised spec that is stored) and ``run(ctx)`` (the work). The engine
  owns states, persistence and scheduling; a kind never sees them.
* **Cooperative stopping.** Heavy work runs in worker threads (``ctx.to_thread``).
  A thread calls ``ctx.checkpoint()`` between steps (a chunk of bytes, a file); when
  the job is paused, cancelled or the agent stops, that raises ``Stopped`` and the
  thread unwinds. Async parts (a subprocess) are cancelled by trio directly.
* **Outputs** are written into ``ctx.outputs_dir``, a temporary directory; the engine
  publishes it with one rename only when the job succeeds, so ``outputs/`` never shows
  a partial file. The directory is made when a kind first asks for it (reading
  ``ctx.outputs_dir`` creates it: do that in a worker thread, or ``await
  ctx.make_outputs_dir()`` on the event loop), so a job that writes no output has no
  directory on disk at all.
* **The log** is ``ctx.log(line)`` (thread-safe, kept in memory and written in
  batches, see ``_log.py``). A subprocess that should write into the log gets a
  descriptor from ``ctx.log.open_for_append()`` (blocking: a worker thread), which
  writes the lines logged so far first.
* **Paths are confined to uploads/.** ``confine`` refuses absolute paths, ``..``
  components and anything (symlinks included) that resolves outside the uploads
  backing tree; ``collect_files`` applies the same rule to every entry of a directory.
  Kinds call them at validate time (EINVAL for the writer) and again at run time,
  because the tree may have changed in between.
* **Any length.** An upload's path can be longer than ``PATH_MAX`` once the store's
  directory is put in front of it, so the file system calls on the uploads tree go
  through ``longpaths`` (the same answers as ``os``, at any length).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import os
import pwd
import stat
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any

from .. import longpaths
from ._log import JobLog
from ._states import ErrorCode

__all__ = [
    "Kind", "KINDS", "register", "SpecError", "JobFailed", "Stopped", "RunContext",
    "KindEnv", "confine", "collect_files", "FileEntry",
]


class SpecError(Exception):
    """A spec the kind refuses; ``str()`` is the reason shown in the job's ``message``."""


class JobFailed(Exception):
    """The job ends in ``failure`` with this ErrorCode and ErrorDescription."""

    def __init__(self, code: ErrorCode, description: str):
        super().__init__(description)
        self.code = code
        self.description = description


class Stopped(Exception):
    """Raised by ``RunContext.checkpoint`` once the job must stop (pause/cancel/shutdown)."""


@dataclasses.dataclass
class KindEnv:
    """What validation may look at: the uploads tree and the database."""

    uploads_dir: Path
    db: Any
    to_thread: Callable[..., Awaitable[Any]]
    owner_uid: int | None = None  # who submits: a job reads only what they may read


class RunContext:
    """A running job as its kind sees it. Methods marked thread-safe may be called from
    worker threads; the rest only on the event loop."""

    def __init__(self, *, job_id: str, spec: dict, config, db,
                 make_outputs_dir: Callable[[], Path], log: JobLog,
                 to_thread: Callable[..., Awaitable[Any]], owner_uid: int | None = None,
                 upload_task: Callable[[str], dict[str, Any] | None] | None = None,
                 repository: Any = None):
        self.job_id = job_id
        self.owner_uid = owner_uid
        self.spec = spec
        self.config = config
        self.db = db
        self.uploads_dir: Path = config.uploads_dir
        # Thread-safe: ``log(line)`` appends one line to the job's log (no I/O);
        # ``log.open_for_append()`` (blocking) is a descriptor for a command's output.
        self.log = log
        self.to_thread = to_thread
        self._make_outputs_dir = make_outputs_dir
        self._outputs_dir: Path | None = None
        self._outputs_lock = threading.Lock()
        # Event loop only. What the uploads component knows of an upload task right now
        # (``{"path", "state", "size", "sha256", "job"}``, ``{"state": "removed"}`` for
        # one that ended, None for an ID it never had); see ``Agent.upload_task``.
        self.upload_task = upload_task or (lambda task_id: None)
        # The repository component when imports push to an object store
        # (``repository.backend = "s3"``), else None (``Host.repository``).
        self.repository = repository
        self.repository_progress = None  # the push's progress over this run (repository)
        self.progress = 0
        self.message = ""
        self.content: dict[str, Any] = {}
        self._stop = threading.Event()

    @property
    def outputs_dir(self) -> Path:
        """Thread-safe, and blocking the first time: the run's (temporary) outputs
        directory, created by this first access. Read it in a worker thread, or call
        ``make_outputs_dir`` on the event loop."""
        with self._outputs_lock:
            if self._outputs_dir is None:
                self._outputs_dir = self._make_outputs_dir()
            return self._outputs_dir

    async def make_outputs_dir(self) -> Path:
        """``outputs_dir`` from the event loop (the mkdir runs in a worker thread)."""
        return await self.to_thread(lambda: self.outputs_dir)

    @property
    def has_outputs_dir(self) -> bool:
        """Whether the run asked for its outputs directory (so it has one)."""
        return self._outputs_dir is not None

    def set_progress(self, done: int, total: int) -> None:
        """Thread-safe. Progress as a share of ``total`` units (bytes, files)."""
        self.progress = 100 if total <= 0 else min(99, done * 100 // total)

    def request_stop(self) -> None:
        self._stop.set()

    def checkpoint(self) -> None:
        """Thread-safe. Raise ``Stopped`` if the job has to stop at this step."""
        if self._stop.is_set():
            raise Stopped()


class Kind(abc.ABC):
    name = "kind"

    @abc.abstractmethod
    async def validate(self, spec: dict[str, Any], env: KindEnv) -> dict[str, Any]:
        """Check ``spec`` (without its "type"); return what is stored and run."""

    @abc.abstractmethod
    async def run(self, ctx: RunContext) -> None:
        """Do the work; raise ``JobFailed`` for an expected failure."""


KINDS: dict[str, Kind] = {}


def register(cls: type[Kind]) -> type[Kind]:
    KINDS[cls.name] = cls()
    return cls


# -- spec helpers ---------------------------------------------------------------------


def only_keys(spec: dict, allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SpecError(f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(spec))
    if missing:
        raise SpecError(f"missing field {missing[0]!r}")


def path_list(spec: dict) -> list[str]:
    paths = spec.get("paths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise SpecError('"paths" must be a non-empty list of paths relative to uploads/')
    return paths


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root + os.sep)


@functools.lru_cache(maxsize=8)
def _real_root(uploads_dir: str) -> str:
    # The store's own path does not move while the agent runs (it holds the state dir's
    # lock); resolving it once spares a stat per component for every file confined.
    return os.path.realpath(uploads_dir)


def local_copies(ctx: RunContext, paths: list[str]):
    """``async with local_copies(ctx, paths)``: around a kind that reads uploads' backing
    files directly. With the S3 repository's cache, evicted uploads under ``paths`` are
    fetched back first and none is evicted until the block ends; otherwise nothing."""
    repo = ctx.repository
    return contextlib.nullcontext() if repo is None else repo.local_copies(paths)


class Resolver:
    """``os.path.realpath`` for a batch of paths (one worker thread's pass over a
    fileset's members): each directory is resolved once, and a name in it then costs
    one ``lstat`` unless it is a symlink (resolved in full, as realpath would). The
    answers are those of realpath at the moment each directory was first resolved: a
    batch is one look at the store, as one realpath per file would be."""

    def __init__(self) -> None:
        self._directories: dict[str, str] = {}

    def realpath(self, path: str) -> str:
        parent, _, name = path.rpartition("/")
        if not parent or name in ("", ".", ".."):
            return longpaths.realpath(path)
        real_parent = self._directories.get(parent)
        if real_parent is None:
            real_parent = self._directories[parent] = longpaths.realpath(parent)
        candidate = (real_parent.rstrip("/") or "") + "/" + name
        try:
            is_link = stat.S_ISLNK(longpaths.lstat(candidate).st_mode)
        except OSError:
            return candidate  # as realpath: what cannot be looked at is taken as it is
        return longpaths.realpath(candidate) if is_link else candidate


def confine(uploads_dir: Path, rel: str, *, must_exist: bool = True,
            resolver: Resolver | None = None) -> Path:
    """The real path of ``uploads/<rel>``; ``SpecError`` if it escapes or is missing.
    ``resolver``: one ``Resolver`` shared by the calls of one batch (cheaper)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise SpecError(f"{rel!r} is not a path")
    pure = PurePosixPath(rel)
    if pure.is_absolute():
        raise SpecError(f"{rel!r}: absolute paths are refused; give a path relative to uploads/")
    if ".." in pure.parts:
        raise SpecError(f"{rel!r}: '..' is refused; paths stay inside uploads/")
    full = uploads_dir / pure
    root = _real_root(str(uploads_dir))
    real = (resolver.realpath if resolver is not None else longpaths.realpath)(str(full))
    if not _inside(real, root):
        raise SpecError(f"{rel!r} resolves outside uploads/ (a symlink?); refused")
    if must_exist and not longpaths.exists(real):
        raise SpecError(f"{rel!r}: no such file or directory in uploads/")
    return Path(real)


@dataclasses.dataclass(frozen=True)
class FileEntry:
    name: str        # path relative to uploads/, '/'-separated (the archive member name)
    real: Path       # where to read it (maybe past PATH_MAX: open it through longpaths.at)
    size: int
    is_dir: bool
    mtime: float


class Reader:
    """Whether a uid may read a file or list a directory, by its mode bits.

    The agent runs as root and reads the store for every job, but a job's outputs are
    readable by every user of the mount, so a job may take only what its owner could
    read through the mount (``default_permissions``: the classic owner/group/other
    bits, the owner's supplementary groups included). Root and an unknown owner (the
    agent's own jobs) may read everything.
    """

    def __init__(self, uid: int | None):
        self.uid = uid
        self.gids: set[int] = set()
        if uid not in (None, 0):
            try:
                entry = pwd.getpwuid(uid)
                self.gids = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
            except KeyError:  # a uid without a passwd entry has no groups to use
                self.gids = set()

    def may(self, st: os.stat_result, is_dir: bool) -> bool:
        if self.uid in (None, 0):
            return True
        need = 0o5 if is_dir else 0o4  # a directory is listed and entered
        if st.st_uid == self.uid:
            bits = st.st_mode >> 6
        elif st.st_gid in self.gids:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        return bits & need == need


def collect_files(uploads_dir: Path, paths: list[str],
                  owner_uid: int | None = None) -> list[FileEntry]:
    """Every file and directory under ``paths`` (blocking: call in a worker thread).

    Symlinks are followed only to targets inside uploads/ (an escaping one is a
    ``SpecError``); symlinked directories are listed but not descended into, so a
    cycle cannot make the walk endless. Anything ``owner_uid`` may not read is a
    ``SpecError`` too (``Reader``).
    """
    root = os.path.realpath(uploads_dir)
    reader = Reader(owner_uid)
    seen: dict[str, FileEntry] = {}

    def add(name: str, path: str) -> str | None:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            # Only a file put into the store by hand can have one (the mount refuses
            # such names): say which, rather than failing deep inside zipfile or JSON.
            raise SpecError(f"{name!r}: the name is not UTF-8; rename it in the store "
                            "to include it") from None
        real = longpaths.realpath(path)
        if not _inside(real, root):
            raise SpecError(f"{name!r} resolves outside uploads/ (a symlink?); refused")
        try:
            st = longpaths.stat_follow(real)
        except FileNotFoundError:
            raise SpecError(f"{name!r}: no such file or directory in uploads/") from None
        is_dir = stat.S_ISDIR(st.st_mode)
        if not is_dir and not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{name!r} is neither a regular file nor a directory")
        if real != root and not reader.may(st, is_dir):  # uploads/ itself is 1777
            raise SpecError(f"{name!r}: uid {owner_uid} may not read it, so this job may "
                            "not either (its outputs are readable by every user)")
        seen.setdefault(name, FileEntry(name, Path(real), 0 if is_dir else st.st_size,
                                        is_dir, st.st_mtime))
        return real if is_dir and not longpaths.islink(path) else None

    for rel in paths:
        confine(uploads_dir, rel)
        name = PurePosixPath(rel).as_posix().strip("/") or "."
        top = add(name, str(uploads_dir / rel))
        if top is None:
            continue
        for dirpath, dirnames, filenames in longpaths.walk(top):
            dirnames.sort()
            base = os.path.relpath(dirpath, root).replace(os.sep, "/")
            for d in list(dirnames):
                if add(f"{base}/{d}", os.path.join(dirpath, d)) is None:
                    dirnames.remove(d)  # a symlinked directory: listed, not followed
            for f in sorted(filenames):
                add(f"{base}/{f}", os.path.join(dirpath, f))
    return sorted(seen.values(), key=lambda e: e.name)
