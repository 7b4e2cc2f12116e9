"""A model-based crash workload for ``uploads/`` (issue 10, deliverable 2).

Used by ``tests/test_crash_model.py`` (a short run in ``make test``) and by
``bench/soak_crash.py`` (``make soak``: thousands of rounds).

Design notes
------------
* **A round**: two or three worker threads drive a seeded random workload through the
  mount (cp-like writes, cp, appends, pwrite at random offsets through O_RDWR, truncate by
  path and by descriptor, renames of files (also over existing ones) and of directories
  whose imports are pending, unlink, mkdir, declared sha256/size, fsync on the writer's
  descriptor, fsync on a read-only descriptor and coreutils ``sync FILE``, ``rsync -a``
  re-runs and ``rsync --inplace`` of small source trees, a writer that keeps its file
  open). The agent is stopped at a random moment (SIGKILL mostly, SIGTERM sometimes;
  often a few ms after an operation's last ``close``), restarted on the same state, and
  every invariant is checked once every file has settled.
* **Who touches what.** Each worker owns a subtree ``wN/``; ``shared/`` is used by all of
  them, one operation at a time (a lock held for the whole operation). So the model
  always knows the order of the steps on a path; "several writers at once" means several
  files (and several paths of the same directories) written concurrently, which is what
  the agent's bookkeeping has to keep apart.
* **The model** tracks each file as a *lineage* (it follows renames; created by a create
  or an rsync rename into place; ended by unlink or a rename over it). A lineage knows
  its content if every acknowledged step was applied, and the *candidates*: each state
  it may be in after a crash since its last durable anchor. Writes are candidates of the
  form "base with the first j bytes of this write applied, for any j" (the kernel splits
  a write; queued write-behind pieces may be lost), so the model never demands an
  ordering it was not promised. A step in flight when the agent stopped has an unknown
  outcome: both the before and the after are allowed (and, for renames, unlinks and
  creates, both places).
* **What may be demanded after a crash** (README "Durability and crashes"): data is
  durable on an acknowledged ``fsync`` on *any* descriptor (the issue: ``sync FILE``) and
  when the file is ``complete``. A file not touched since such an anchor must hold exactly
  that content; otherwise it must be a prefix of a candidate, and at least as long as the
  durable length (truncations lower it). A file that was seen complete and was not touched
  since (a rename is not a touch) must still be complete, with the same task, hash and job,
  at the first look after the restart. After a clean stop (SIGTERM) nothing is cut: every
  lineage without a step in flight holds exactly its content.
* **Imports**: every file complete at the check has a successful import of its task, size
  and hash, recorded in the manifest (``integrity_util.import_problems``); and each
  version is imported once: the model counts, per SHA-256, how many times some file
  *became* that content (an operation that ended with it, a cut-back observed after a
  restart, a file reopened for writing when the agent stopped) and no SHA-256 may have
  more successful imports than that. (A plain "no (task, sha256) twice" would be wrong:
  ``rsync --inplace`` restoring a file, or a crash cutting a file back to a version that
  was imported before, makes a real new version with the same bytes.)
* **Also**: read-back through the mount equals the model's content while the agent runs;
  ``complete`` implies the recorded hash is the bytes' hash (while running and after);
  ``uploads.json`` lists no path that does not exist (nor one path twice); no traceback in
  any agent log; no operation fails while the agent runs.
* **Reproducible**: every choice (operations, paths, sizes, stop kind and moment, config)
  comes from ``random.Random`` seeded from the run's seed, the round and the worker; the
  bytes are fresh random data (only their uniqueness matters). Thread timing still varies,
  so a seed replays the same workload and the same stop points, not the same interleaving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

from conftest import AgentProcess
from fsagent.service.mountpoint import abort_connection
from integrity_util import (import_jobs, import_problems, job_state, look, manifest,
                            manifest_problems, members_of, sha256_bytes, skipped_by,
                            task_attrs)

# -- candidates: what a file may hold after a crash -----------------------------------------


@dataclasses.dataclass(frozen=True)
class Partial:
    """``base`` with the first j bytes of ``data`` written at ``off``, for any j."""
    base: bytes
    off: int
    data: bytes


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo = 0
    step = 4096
    while lo < n:
        hi = min(n, lo + step)
        if a[lo:hi] != b[lo:hi]:
            while a[lo] == b[lo]:
                lo += 1
            return lo
        lo = hi
    return n


def _agree_from(o: bytes, base: bytes, start: int) -> int:
    """Smallest t >= start such that o[t:] == base[t:len(o)] (len(o) if none)."""
    end = len(o)
    if end > len(base):
        return end
    t = end
    step = 4096
    while t > start:
        lo = max(start, t - step)
        if o[lo:t] != base[lo:t]:
            t2 = t
            while t2 > lo and o[t2 - 1] == base[t2 - 1]:
                t2 -= 1
            return t2
        t = lo
    return start


def admits(observed: bytes, candidate) -> bool:
    """Whether ``observed`` is a prefix of a state ``candidate`` allows."""
    if isinstance(candidate, bytes):
        return candidate.startswith(observed)
    base, off, data = candidate.base, candidate.off, candidate.data
    if base.startswith(observed):
        return True  # j = 0
    n = len(observed)
    head = min(off, n)
    ext = base[:head] + bytes(max(0, head - len(base)))
    if observed[:head] != ext:
        return False
    if n <= off:
        return True  # the write extended it past here; the hole reads as zeros
    k = _common_prefix(observed[off:], data)
    s = _agree_from(observed, base, off)
    j = max(1, s - off, n - off if n > len(base) else 1)
    if j > len(data):
        return False
    return min(j, n - off) <= k


def apply_write(base: bytes, off: int, data: bytes) -> bytes:
    if off > len(base):
        base = base + bytes(off - len(base))
    return base[:off] + data + base[off + len(data):]


def resize(base: bytes, size: int) -> bytes:
    return base[:size] if size <= len(base) else base + bytes(size - len(base))


# -- the model ---------------------------------------------------------------------------


class Lineage:
    """One file, followed across renames; see the design notes."""

    def __init__(self, lid: int, path: str, content: bytes = b""):
        self.id = lid
        self.path: str | None = path
        self.maybe: set[str | None] = set()  # other places it may be after a stop
        self.content = content
        self.candidates: list = [content]
        self.floor = 0                   # bytes that must survive a crash
        self.exact = False               # an anchor holds and nothing touched it since
        self.uncertain = False           # a step that may change it was in flight
        self.reopened = False            # a writer had it open when the agent stopped
        self.complete_seen: tuple | None = None  # (task, sha256, job) seen, untouched since
        self.relabelled = False          # renamed (or its metadata set) since seen complete
        self.declared_size: int | None = None
        self.declared_sha: str | None = None
        self._streaming = False          # the last candidate is the write still going on

    def possible(self) -> set[str | None]:
        return {self.path} | self.maybe

    def touch(self) -> None:
        self.exact = False
        self.complete_seen = None
        self.relabelled = False
        self._streaming = False

    def write(self, off: int, data: bytes) -> None:
        last = self.candidates[-1] if self.candidates else None
        if self._streaming and isinstance(last, Partial) and last.off + len(last.data) == off:
            # The next piece of one sequential stream: one candidate for all of it (the
            # same states as one per piece, without a copy of the file per piece).
            self.candidates[-1] = Partial(last.base, last.off, last.data + data)
        else:
            self.candidates.append(Partial(self.content, off, data))
        self.content = apply_write(self.content, off, data)
        self.touch()
        self._streaming = True

    def truncate(self, size: int) -> None:
        self.content = resize(self.content, size)
        self.candidates.append(self.content)
        self.floor = min(self.floor, size)
        self.touch()

    def replace_in_place(self, content: bytes) -> None:
        """What rsync --inplace does: write the new content from offset 0 over the old,
        then truncate to its length."""
        self.write(0, content)
        self.truncate(len(content))

    def anchor(self) -> None:
        """Everything it holds now is durable (fsync acknowledged, or seen complete)."""
        self.candidates = [self.content]
        self.floor = len(self.content)
        self.exact = True
        self._streaming = False

    def describe(self) -> str:
        where = self.path if not self.maybe else f"{self.path} or {sorted(map(str, self.maybe))}"
        return (f"lineage {self.id} at {where}: {len(self.content)} bytes sha256 "
                f"{sha256_bytes(self.content)[:16]} floor {self.floor} exact {self.exact} "
                f"uncertain {self.uncertain} reopened {self.reopened} "
                f"complete_seen {self.complete_seen}")


class Model:
    def __init__(self):
        self.lock = threading.RLock()
        self.lineages: dict[int, Lineage] = {}
        self.dirs: set[str] = set()
        self.allowance: Counter[str] = Counter()  # sha256 -> versions that became it
        self.sources: dict[str, list[str]] = {}  # sha256 -> "path (how)" of each, to report
        self._next = 0

    def new(self, path: str, content: bytes = b"") -> Lineage:
        self._next += 1
        lin = Lineage(self._next, path, content)
        self.lineages[lin.id] = lin
        return lin

    def at(self, path: str) -> Lineage | None:
        for lin in self.lineages.values():
            if lin.path == path and not lin.maybe:
                return lin
        return None

    def end(self, lin: Lineage) -> None:
        self.lineages.pop(lin.id, None)

    def files_under(self, prefix: str) -> list[Lineage]:
        return sorted((lin for lin in self.lineages.values()
                       if lin.path and lin.path.startswith(prefix + "/")),
                      key=lambda lin: lin.path)

    def became(self, content: bytes, path: str, how: str) -> None:
        digest = sha256_bytes(content)
        self.allowance[digest] += 1
        self.sources.setdefault(digest, []).append(f"{path} ({how})")


# -- one round's stop coordination ------------------------------------------------------


class Stopped(Exception):
    """The agent was stopped (or something failed): this worker ends its round."""


class RoundState:
    def __init__(self, model: Model):
        self.model = model
        self.stopping = False
        self.ops_done = 0
        self.trigger_after: int | None = None
        self.trigger_delay = 0.0
        self.triggered = threading.Event()
        self.violations: list[str] = []
        self.log: list[str] = []
        self.t0 = time.monotonic()

    def note(self, who: str, text: str) -> None:
        self.log.append(f"{time.monotonic() - self.t0:8.3f} {who:8} {text}")


# -- the workers ---------------------------------------------------------------------------

SIZES = [(0, 0, 1), (1, 4096, 20), (4096, 65536, 30), (65536, 600_000, 15),
         (600_000, 3 * 2**20, 3)]


class Worker:
    def __init__(self, name: str, area: str, run: Run, rs: RoundState, rng: random.Random):
        self.name, self.area, self.run, self.rs, self.rng = name, area, run, rs, rng
        self.model = run.model
        self.up = run.agent.uploads
        self.open_writers: dict[int, Lineage] = {}  # fd -> lineage
        self.open_fds: set[int] = set()
        self._opened: Lineage | None = None  # the lineage an open's ack made or chose

    # -- steps ------------------------------------------------------------------------------

    def step(self, desc: str, fn, ack=None, maybe=None):
        """Run one syscall (or tool); ``ack`` on success while the agent ran, ``maybe``
        if it was in flight when the agent was stopped (its outcome is unknown)."""
        if self.rs.stopping:
            raise Stopped
        try:
            result, error = fn(), None
        except (OSError, subprocess.SubprocessError) as e:
            result, error = None, e
        with self.model.lock:
            if self.rs.stopping:
                self.rs.note(self.name, f"{desc}: in flight at the stop"
                             + (f" ({_short(error)})" if error else ""))
                if maybe:
                    maybe()
                raise Stopped
            if error is not None:
                self.rs.violations.append(f"{desc} failed while the agent ran: "
                                          f"{_short(error)}")
                self.rs.note(self.name, f"{desc}: FAILED {_short(error)}")
                if maybe:
                    maybe()
                raise Stopped
            self.rs.note(self.name, f"{desc}: ok")
            if ack:
                ack(result)
        return result

    def close_all(self) -> None:
        with self.model.lock:
            for lin in self.open_writers.values():
                lin.reopened = True
                lin.touch()
        for fd in list(self.open_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.open_fds.clear()
        self.open_writers.clear()

    def open_fd(self, rel: str, flags: int, lin: Lineage | None, desc: str, ack=None,
                maybe=None) -> int:
        self._opened = None

        def fn():
            fd = os.open(self.up / rel, flags, 0o644)
            self.open_fds.add(fd)  # closed by close_all even if the stop comes now
            return fd

        def acked(fd):
            if ack:
                ack(fd)
            if flags & os.O_ACCMODE != os.O_RDONLY:
                self.open_writers[fd] = self._opened or lin
        return self.step(desc, fn, acked, maybe)

    def close_fd(self, fd: int, desc: str) -> None:
        def fn():
            self.open_fds.discard(fd)
            os.close(fd)

        def acked(_):
            self.open_writers.pop(fd, None)
        self.step(desc, fn, acked)

    # -- choosing ---------------------------------------------------------------------------

    def size(self) -> int:
        lo, hi, _ = self.rng.choices(SIZES, weights=[w for _, _, w in SIZES])[0]
        return self.rng.randint(lo, hi)

    def files(self) -> list[Lineage]:
        with self.model.lock:
            return [lin for lin in self.model.files_under(self.area) if not lin.maybe]

    def dirs(self) -> list[str]:
        with self.model.lock:
            return sorted(d for d in self.model.dirs
                          if d == self.area or d.startswith(self.area + "/"))

    def new_name(self, directory: str | None = None) -> str:
        directory = directory or self.rng.choice(self.dirs())
        while True:
            rel = f"{directory}/f{self.rng.randrange(10**6)}"
            with self.model.lock:
                if self.model.at(rel) is None and rel not in self.model.dirs:
                    return rel

    def pick_file(self) -> Lineage | None:
        files = self.files()
        return self.rng.choice(files) if files else None

    def target_path(self) -> tuple[str, Lineage | None]:
        """A path to write: an existing file (often) or a new name."""
        existing = self.pick_file()
        if existing is not None and self.rng.random() < 0.6:
            return existing.path, existing
        return self.new_name(), None

    # -- operations ---------------------------------------------------------------------------

    def op_write(self) -> None:
        """cp-like: open (create or O_TRUNC), write in chunks, maybe fsync, close."""
        rel, lin = self.target_path()
        content = os.urandom(self.size())
        fsync_at = self.rng.choice([None, None, None, "middle", "end"])
        model = self.model

        def created(fd):
            self._opened = lin or model.new(rel)
            self._opened.truncate(0)

        def maybe_created():
            target = lin
            if target is None:
                target = model.new(rel)
                target.maybe = {None}
            target.truncate(0)
            _mark(target)

        fd = self.open_fd(rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, lin,
                          f"open({rel}, O_CREAT|O_TRUNC)", created, maybe_created)
        lin = self.open_writers[fd]
        self._write_chunks(fd, lin, 0, content, fsync_at)
        self.close_fd(fd, f"close({rel})")
        with model.lock:
            model.became(lin.content, lin.path, "write")

    def _write_chunks(self, fd, lin, off, content, fsync_at=None) -> None:
        view, pos = memoryview(content), 0
        chunk = self.rng.choice([4096, 65536, 131072, 1 << 20]) if len(content) < 2**20 \
            else self.rng.choice([65536, 1 << 20])
        while pos < len(content):
            n = min(len(content) - pos, chunk)
            piece = bytes(view[pos:pos + n])
            at = off + pos

            def acked(written, at=at, piece=piece):
                lin.write(at, piece[:written])

            def maybe(at=at, piece=piece):
                lin.write(at, piece)
                lin.uncertain = True
            written = self.step(f"pwrite({lin.path}, {len(piece)} @ {at})",
                                lambda at=at, piece=piece: os.pwrite(fd, piece, at), acked, maybe)
            if written <= 0:
                with self.model.lock:
                    self.rs.violations.append(f"pwrite({lin.path}) wrote {written} bytes")
                raise Stopped
            pos += written
            if fsync_at == "middle" and pos >= len(content) // 2:
                self.fsync(fd, lin, "writer")
                fsync_at = None
        if fsync_at:
            self.fsync(fd, lin, "writer")

    def fsync(self, fd, lin, kind: str) -> None:
        self.step(f"fsync({lin.path}) on the {kind} descriptor", lambda: os.fsync(fd),
                  lambda _: lin.anchor())

    def op_cp(self) -> None:
        """coreutils cp from a local file (new content) over an existing file or a new one;
        often the same size as the file it replaces."""
        rel, lin = self.target_path()
        size = len(lin.content) if lin is not None and self.rng.random() < 0.5 else self.size()
        content = os.urandom(size)
        src = self.run.scratch / f"{self.name}-cp"
        src.write_bytes(content)
        model = self.model

        def ack(_):
            target = lin or model.new(rel)
            target.truncate(0)
            target.write(0, content)
            model.became(content, rel, "cp")

        def maybe():
            target = lin
            if target is None:
                target = model.new(rel)
                target.maybe = {None}
            target.truncate(0)
            target.write(0, content)
            target.uncertain = True
            target.reopened = True
        self.step(f"cp {len(content)} bytes -> {rel}", lambda: _run(["cp", src, self.up / rel]),
                  ack, maybe)

    def op_append(self) -> None:
        lin = self.pick_file()
        if lin is None:
            return self.op_write()
        content = os.urandom(self.rng.randint(1, 100_000))
        fd = self.open_fd(lin.path, os.O_WRONLY | os.O_APPEND, lin,
                          f"open({lin.path}, O_APPEND)", lambda _: lin.touch(),
                          lambda: _mark(lin))
        self._write_chunks(fd, lin, len(lin.content), content,
                           self.rng.choice([None, None, "end"]))
        self.close_fd(fd, f"close({lin.path})")
        with self.model.lock:
            self.model.became(lin.content, lin.path, "append")

    def op_pwrite(self) -> None:
        """O_RDWR, 1-3 pwrites at random offsets (inside the file, or a little past its
        end), maybe an fsync, close: often a same-size change of a complete file."""
        lin = self.pick_file()
        if lin is None:
            return self.op_write()
        fd = self.open_fd(lin.path, os.O_RDWR, lin, f"open({lin.path}, O_RDWR)",
                          lambda _: lin.touch(), lambda: _mark(lin))
        for _ in range(self.rng.randint(1, 3)):
            size = len(lin.content)
            n = self.rng.randint(1, max(1, min(300_000, size or 4096)))
            off = self.rng.randint(0, size + (4096 if self.rng.random() < 0.2 else 0))
            if self.rng.random() < 0.7:
                off = min(off, max(0, size - n))  # same size
            self._write_chunks(fd, lin, off, os.urandom(n))
        if self.rng.random() < 0.3:
            self.fsync(fd, lin, "writer")
        self.close_fd(fd, f"close({lin.path})")
        with self.model.lock:
            self.model.became(lin.content, lin.path, "pwrite")

    def op_truncate_path(self) -> None:
        lin = self.pick_file()
        if lin is None:
            return
        size = self._new_size(lin)
        model = self.model

        def ack(_):
            lin.truncate(size)
            model.became(lin.content, lin.path, "truncate")
        self.step(f"truncate({lin.path}, {size})",
                  lambda: os.truncate(self.up / lin.path, size), ack,
                  lambda: _truncated_maybe(lin, size))

    def _new_size(self, lin: Lineage) -> int:
        size = len(lin.content)
        new = self.rng.randint(0, size) if size and self.rng.random() < 0.85 \
            else size + self.rng.randint(1, 5000)
        return new if new != size else size + 1

    def op_truncate_fd(self) -> None:
        """open O_RDWR, ftruncate, sometimes a write after it, close."""
        lin = self.pick_file()
        if lin is None:
            return
        fd = self.open_fd(lin.path, os.O_RDWR, lin, f"open({lin.path}, O_RDWR)",
                          lambda _: lin.touch(), lambda: _mark(lin))
        size = self._new_size(lin)

        self.step(f"ftruncate({lin.path}, {size})", lambda: os.ftruncate(fd, size),
                  lambda _: lin.truncate(size), lambda: _truncated_maybe(lin, size))
        if self.rng.random() < 0.4:
            self._write_chunks(fd, lin, len(lin.content), os.urandom(self.rng.randint(1, 9000)))
        self.close_fd(fd, f"close({lin.path})")
        with self.model.lock:
            self.model.became(lin.content, lin.path, "ftruncate")

    def op_rename_file(self) -> None:
        """mv a b: to a new name (maybe in another directory) or over an existing file."""
        lin = self.pick_file()
        if lin is None:
            return
        files = [f for f in self.files() if f is not lin]
        over = self.rng.choice(files) if files and self.rng.random() < 0.4 else None
        new = over.path if over else self.new_name()
        old = lin.path
        model = self.model

        def ack(_):
            if over is not None:
                model.end(over)
            lin.path = new
            lin.relabelled = True

        def maybe():
            lin.maybe = {new}
            lin.relabelled = True
            if over is not None:
                over.maybe = {None}
        self.step(f"rename({old} -> {new}{' over a file' if over else ''})",
                  lambda: os.rename(self.up / old, self.up / new), ack, maybe)

    def op_rename_dir(self) -> None:
        """mv a directory of the area (imports of its files may be pending)."""
        dirs = [d for d in self.dirs() if d != self.area]
        if not dirs:
            return self.op_mkdir()
        old = self.rng.choice(dirs)
        parent = self.rng.choice([d for d in self.dirs()
                                  if d != old and not d.startswith(old + "/")])
        new = f"{parent}/d{self.rng.randrange(10**6)}"
        self._rename_dir(old, new)

    def _rename_dir(self, old: str, new: str) -> None:
        model = self.model

        def moved(path: str) -> str:
            return new + path[len(old):]

        def ack(_):
            for lin in model.files_under(old):
                lin.path = moved(lin.path)
            model.dirs = {moved(d) if d == old or d.startswith(old + "/") else d
                          for d in model.dirs}

        def maybe():
            for lin in model.files_under(old):
                lin.maybe = {moved(lin.path)}
        self.step(f"rename(dir {old} -> {new})",
                  lambda: os.rename(self.up / old, self.up / new), ack, maybe)

    def op_unlink(self) -> None:
        lin = self.pick_file()
        if lin is None:
            return
        model = self.model

        def maybe():
            lin.maybe = {None}
        self.step(f"unlink({lin.path})", lambda: os.unlink(self.up / lin.path),
                  lambda _: model.end(lin), maybe)

    def op_mkdir(self) -> None:
        dirs = self.dirs()
        if len(dirs) > 6:
            return
        new = f"{self.rng.choice(dirs)}/d{self.rng.randrange(10**6)}"
        model = self.model
        self.step(f"mkdir({new})", lambda: os.mkdir(self.up / new),
                  lambda _: model.dirs.add(new))

    def op_declare(self) -> None:
        """setfattr user.fsagent.sha256 (the true hash) or user.fsagent.size (the size)."""
        lin = self.pick_file()
        if lin is None or lin.declared_sha or lin.declared_size is not None:
            return
        # In flight at the stop, it may or may not have been declared: the model assumes
        # it was (a declaration only excuses a later failure, never demands one).
        if self.rng.random() < 0.7:
            value = sha256_bytes(lin.content)

            def ack(_=None):
                lin.declared_sha = value
                lin.complete_seen = None
            self.step(f"setxattr({lin.path}, sha256)",
                      lambda: os.setxattr(self.up / lin.path, "user.fsagent.sha256",
                                          value.encode()), ack, ack)
        else:
            value = len(lin.content)

            def ack(_=None):
                lin.declared_size = value
                lin.complete_seen = None
            self.step(f"setxattr({lin.path}, size {value})",
                      lambda: os.setxattr(self.up / lin.path, "user.fsagent.size",
                                          str(value).encode()), ack, ack)

    def op_sync_file(self) -> None:
        """fsync on a read-only descriptor, or coreutils `sync FILE` (the same thing)."""
        lin = self.pick_file()
        if lin is None:
            return
        if self.rng.random() < 0.5:
            self.step(f"sync {lin.path}", lambda: _run(["sync", self.up / lin.path]),
                      lambda _: lin.anchor())
        else:
            fd = self.open_fd(lin.path, os.O_RDONLY, lin, f"open({lin.path}, O_RDONLY)")
            self.fsync(fd, lin, "read-only")
            self.close_fd(fd, f"close({lin.path}, read-only)")

    def op_hold(self) -> None:
        """A writer writes (up to 3 MiB), `sync FILE` or fsync on a read-only descriptor,
        keeps the file open a while (maybe writing more), then closes it."""
        rel, lin = self.target_path()
        append = lin is not None and self.rng.random() < 0.5
        model = self.model

        def opened(fd):
            self._opened = lin or model.new(rel)
            if not append:
                self._opened.truncate(0)
            self._opened.touch()

        def maybe():
            target = lin
            if target is None:
                target = model.new(rel)
                target.maybe = {None}
            elif not append:
                target.truncate(0)
            _mark(target)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        fd = self.open_fd(rel, flags, lin, f"open({rel}, hold{' append' if append else ''})",
                          opened, maybe)
        lin = self.open_writers[fd]
        content = os.urandom(self.rng.randint(1, 3 * 2**20))
        self._write_chunks(fd, lin, len(lin.content) if append else 0, content)
        if self.rng.random() < 0.8:
            if self.rng.random() < 0.5:
                self.step(f"sync {rel} (writer open)", lambda: _run(["sync", self.up / rel]),
                          lambda _: lin.anchor())
            else:
                ro = self.open_fd(rel, os.O_RDONLY, lin, f"open({rel}, O_RDONLY)")
                self.fsync(ro, lin, "read-only")
                self.close_fd(ro, f"close({rel}, read-only)")
        self.pause(self.rng.uniform(0.05, 0.4))
        if self.rng.random() < 0.4:
            self._write_chunks(fd, lin, len(lin.content), os.urandom(self.rng.randint(1, 50_000)))
        self.close_fd(fd, f"close({rel}) after holding it")
        with model.lock:
            model.became(lin.content, lin.path, "hold")

    def op_rsync(self) -> None:
        """rsync -a (or --inplace) of one of this worker's small source trees into a
        directory of the area; the source changes a little between runs; sometimes the
        destination directory is renamed at once (its imports still pending)."""
        tree = self.run.source_tree(self, self.rng.randrange(2))
        dst = f"{self.area}/rs{tree.index}"
        inplace = self.rng.random() < 0.35
        tree.mutate(self.rng)
        model = self.model
        argv = ["rsync", "-a", "-i"] + (["--inplace"] if inplace else []) + \
            [f"{tree.root}/", f"{self.up / dst}/"]

        def ack(result):
            items = [line.split(" ", 1) for line in result.stdout.splitlines() if " " in line]
            sent = {name for code, name in items if code.startswith(">f")}
            retimed = {name for code, name in items if code.startswith(".f")}
            model.dirs.add(dst)
            for name in tree.names():
                for sub in _parents(name):
                    model.dirs.add(f"{dst}/{sub}")
                if name in retimed and model.at(f"{dst}/{name}") is not None:
                    model.at(f"{dst}/{name}").relabelled = True  # mode/times set, no data
                if name not in sent:
                    continue
                content = tree.content[name]
                rel = f"{dst}/{name}"
                old = model.at(rel)
                if inplace and old is not None:
                    old.replace_in_place(content)
                else:
                    if old is not None:
                        model.end(old)  # the temp file renamed over it is a new task
                    model.new(rel, content)
                model.became(content, rel, "rsync")

        def maybe():
            model.dirs.add(dst)
            for name in tree.names():
                content = tree.content[name]
                rel = f"{dst}/{name}"
                old = model.at(rel)
                if inplace and old is not None:
                    old.replace_in_place(content)
                    _mark(old)
                    continue
                if old is not None:
                    old.maybe = {None}
                new = model.new(rel, content)
                new.maybe = {None}
                new.uncertain = True
                model.became(content, rel, "rsync in flight")
        self.step(f"rsync -a{' --inplace' if inplace else ''} source {tree.index} -> {dst}",
                  lambda: _run(argv), ack, maybe)
        if self.rng.random() < 0.35:
            self._rename_dir(dst, f"{self.area}/moved{self.rng.randrange(10**6)}")

    def op_observe(self) -> None:
        """Look at a file: read-back and the complete-hash invariant, while it runs."""
        lin = self.pick_file()
        if lin is None:
            return
        rel = lin.path
        try:
            attrs, data = look(self.up / rel)
        except AssertionError:
            return  # its state kept changing while it was read: nothing to judge
        except OSError as e:
            with self.model.lock:
                if not self.rs.stopping:
                    self.rs.violations.append(f"looking at {rel} failed while the agent ran: "
                                              f"{_short(e)}")
            raise Stopped from None
        with self.model.lock:
            if self.rs.stopping:
                raise Stopped
            state = attrs.get("state")
            self.rs.note(self.name, f"look({rel}): {state} {len(data)} bytes job "
                         f"{attrs.get('job', '')[:8]}")
            if data != lin.content:
                self.rs.violations.append(
                    f"{rel}: read back {len(data)} bytes sha256 {sha256_bytes(data)[:16]}, "
                    f"not the {len(lin.content)} bytes written (sha256 "
                    f"{sha256_bytes(lin.content)[:16]}) while the agent ran")
            if state == "complete" and attrs.get("sha256") != sha256_bytes(data):
                self.rs.violations.append(
                    f"{rel}: complete with sha256 {attrs.get('sha256')} but its {len(data)} "
                    f"bytes hash to {sha256_bytes(data)} (while the agent ran)")
            if state == "complete" and attrs.get("job") and data == lin.content \
                    and attrs.get("sha256") == sha256_bytes(data):
                lin.anchor()
                lin.complete_seen = (attrs.get("task"), attrs["sha256"], attrs["job"])
                lin.relabelled = False

    def pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.rs.stopping:
                raise Stopped
            time.sleep(0.01)

    def op_sleep(self) -> None:
        self.pause(self.rng.uniform(0.1, 0.6))

    OPS = {"write": 12, "cp": 8, "append": 6, "pwrite": 9, "truncate_path": 5,
           "truncate_fd": 4, "rename_file": 7, "rename_dir": 3, "unlink": 3, "mkdir": 2,
           "declare": 2, "sync_file": 5, "hold": 3, "rsync": 5, "observe": 10, "sleep": 10}

    def work(self) -> None:
        names, weights = zip(*(self.run.ops or self.OPS).items())
        try:
            while not self.rs.stopping:
                name = self.rng.choices(names, weights)[0]
                shared = self.rng.random() < 0.15
                area = self.area
                if shared:
                    if not self.run.shared_lock.acquire(blocking=False):
                        shared = False
                    else:
                        self.area = "shared"
                try:
                    getattr(self, f"op_{name}")()
                finally:
                    self.close_all()
                    if shared:
                        self.area = area
                        self.run.shared_lock.release()
                with self.model.lock:
                    self.rs.ops_done += 1
                    if self.rs.ops_done == self.rs.trigger_after:
                        self.rs.triggered.set()
        except Stopped:
            return  # the round is over (the agent was stopped): this worker is done
        except Exception:
            with self.model.lock:
                self.rs.violations.append(f"worker {self.name} crashed:\n"
                                          f"{traceback.format_exc()}")
        finally:
            self.close_all()


def _truncated_maybe(lin: Lineage, size: int) -> None:
    """A truncate whose outcome the stop left unknown: either size is allowed."""
    lin.truncate(size)
    lin.uncertain = True


def _mark(lin: Lineage) -> None:
    """A writer's open was in flight at the stop: the file may count as reopened."""
    lin.uncertain = True
    lin.reopened = True
    lin.touch()


def _parents(name: str) -> list[str]:
    parts = name.split("/")[:-1]
    return ["/".join(parts[:i + 1]) for i in range(len(parts))]


def _short(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        return f"{e.cmd[0]} exited {e.returncode}: {(e.stderr or '').strip()[-300:]}"
    if isinstance(e, OSError):
        return f"{type(e).__name__} [{errno.errorcode.get(e.errno, e.errno)}] {e.strerror}"
    return repr(e)


def _run(argv) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=True,
                          timeout=120)


# -- rsync sources ---------------------------------------------------------------------------


class SourceTree:
    """A small local tree rsync copies from; each change gets a new, unique mtime second
    (rsync's quick check compares whole seconds)."""

    clock = 1_600_000_000

    def __init__(self, root: Path, index: int, rng: random.Random):
        self.root, self.index = root, index
        self.content: dict[str, bytes] = {}
        root.mkdir(parents=True, exist_ok=True)
        for i in range(rng.randint(3, 10)):
            self._put(f"{'sub/' if i % 3 == 2 else ''}s{i}", rng)

    def names(self) -> list[str]:
        return sorted(self.content)

    def _put(self, name: str, rng: random.Random) -> None:
        data = os.urandom(rng.choice([rng.randint(0, 3000), rng.randint(3000, 200_000)]))
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        SourceTree.clock += 10
        os.utime(path, (SourceTree.clock, SourceTree.clock))
        self.content[name] = data

    def mutate(self, rng: random.Random) -> None:
        for name in self.names():
            if rng.random() < 0.3:
                self._put(name, rng)
        if rng.random() < 0.3:
            self._put(f"s{len(self.content) + rng.randrange(1000)}", rng)


# -- the run ---------------------------------------------------------------------------------


class Run:
    """One agent state (mount + state dir) and its model, over many rounds."""

    def __init__(self, base: Path, seed: int, *, workers: int | None = None,
                 ops: dict[str, int] | None = None, stops: str | None = None):
        self.base, self.seed = base, seed
        self.ops, self.stops = ops, stops  # narrower workloads, to chase one finding
        self.rng = random.Random(seed)
        self.model = Model()
        self.scratch = base / "scratch"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.sources: dict[tuple[str, int], SourceTree] = {}
        self.shared_lock = threading.Lock()
        self.workers = workers or self.rng.choice([2, 3, 3])
        self.config = self._config()
        self.agent = AgentProcess(base, config=self.config)
        self.logs_checked = 0
        self.round = 0
        self.violations: list[str] = []
        self.failed_round_log: list[str] = []

    def _config(self) -> str:
        r = self.rng
        return (f"settle_seconds = 0.3\n"
                f"checkpoint_seconds = {r.choice([0.5, 2.0, 30.0])}\n"
                f"checkpoint_bytes = {r.choice([1 << 20, 64 << 20])}\n"
                f"db_flush_seconds = {r.choice([0.1, 0.5, 2.0])}\n"
                f"max_concurrent_jobs = {r.choice([1, 2])}\n"
                f"store_reserve_bytes = 0\nrecent_uploads = 1000000\n"
                f"job_history = 1000000\nshutdown_timeout = 3\n"
                f"import_grouping = \"{r.choice(['directory', 'directory', 'file'])}\"\n"
                f"fileset_quiet_seconds = {r.choice([0.1, 0.5])}\n"
                f"fileset_max_files = {r.choice([2, 1000])}\n")

    def source_tree(self, worker: Worker, index: int) -> SourceTree:
        key = (worker.name, index)
        if key not in self.sources:
            self.sources[key] = SourceTree(self.scratch / f"src-{worker.name}-{index}", index,
                                           random.Random(f"{self.seed}-{key}"))
        return self.sources[key]

    def start(self) -> None:
        self.agent.start(timeout=30)
        areas = ["shared"] + [f"w{i}" for i in range(self.workers)]
        for area in areas:
            (self.agent.uploads / area).mkdir(exist_ok=True)
            self.model.dirs.add(area)

    def close(self) -> None:
        self.agent.cleanup()

    # -- one round -------------------------------------------------------------------------

    def play_round(self) -> list[str]:
        self.round += 1
        rng = random.Random(f"{self.seed}-round-{self.round}")
        rs = RoundState(self.model)
        how = "SIGTERM" if rng.random() < 0.15 else "SIGKILL"
        how = self.stops or how
        if rng.random() < 0.7:
            rs.trigger_after = rng.randint(3, 40)
            rs.trigger_delay = rng.choice([0.0, rng.uniform(0, 0.02), rng.uniform(0, 0.5)])
            deadline = 20.0
        else:
            deadline = rng.uniform(0.2, 3.0)
        workers = [Worker(f"w{i}", f"w{i}", self, rs,
                          random.Random(f"{self.seed}-{self.round}-{i}"))
                   for i in range(self.workers)]
        threads = [threading.Thread(target=w.work, name=w.name, daemon=True) for w in workers]
        rs.note("main", f"round {self.round}: {how}, "
                + (f"after op {rs.trigger_after} + {rs.trigger_delay * 1000:.1f} ms"
                   if rs.trigger_after else f"at {deadline:.2f} s"))
        for t in threads:
            t.start()
        rs.triggered.wait(deadline)
        if rs.triggered.is_set() and rs.trigger_delay:
            time.sleep(rs.trigger_delay)
        with self.model.lock:
            rs.stopping = True
            rs.note("main", f"{how} (after {rs.ops_done} operations)")
        self._stop(how)
        for t in threads:
            t.join(60)
        if any(t.is_alive() for t in threads):
            abort_connection(self.agent.mount)
            for t in threads:
                t.join(30)
            rs.violations.append("a worker was still blocked on the mount 60 s after the stop")
        self.agent.start(timeout=30)
        problems = rs.violations + Checker(self, rs, clean=how == "SIGTERM").check()
        if problems:
            self.violations += [f"round {self.round}: {p}" for p in problems]
            self.failed_round_log = rs.log
        return problems

    def _stop(self, how: str) -> None:
        proc = self.agent.proc
        if how == "SIGKILL":
            self.agent.kill9()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            self.agent.kill9()


# -- the checks after a restart ---------------------------------------------------------------


class Checker:
    def __init__(self, run: Run, rs: RoundState, *, clean: bool):
        self.run, self.rs, self.clean = run, rs, clean
        self.model = run.model
        self.agent = run.agent
        self.up = run.agent.uploads
        self.problems: list[str] = []

    def fail(self, text: str) -> None:
        self.problems.append(text)

    def check(self) -> list[str]:
        self.first_look()
        observed = self.settle()
        if observed is None:
            return self.problems
        self.match_and_check(observed)
        self.check_imports(observed)
        self.check_listing()
        self.check_logs()
        return self.problems

    def first_look(self) -> None:
        """Complete and untouched since (a rename is not a touch): still complete, with the
        same task, hash and job, before anything could re-verify it."""
        for lin in list(self.model.lineages.values()):
            if lin.complete_seen is None or lin.maybe or lin.relabelled:
                # Renamed (its ctime moved): recovery may hash it again to be sure, so it
                # is judged once settled (same task, hash and job: no second import).
                continue
            try:
                attrs = task_attrs(self.up / lin.path)
            except FileNotFoundError:
                continue  # reported as missing after matching
            self.still_complete(lin.path, lin, attrs, "at the first look")

    def still_complete(self, rel: str, lin: Lineage, attrs: dict, when: str) -> None:
        now = (attrs.get("task"), attrs.get("sha256"), attrs.get("job"))
        if attrs.get("state") != "complete" or now != lin.complete_seen:
            self.fail(f"{rel}: was complete (task, sha256, job = {lin.complete_seen}) and not "
                      f"touched since (renames aside); after the restart, {when}, it is "
                      f"{attrs.get('state')} with {now}")

    def walk(self) -> tuple[set[str], set[str]]:
        files, dirs = set(), set()
        for directory, subdirs, names in os.walk(self.up):
            rel_dir = os.path.relpath(directory, self.up)
            for d in subdirs:
                dirs.add(os.path.normpath(f"{rel_dir}/{d}"))
            for name in names:
                if name.startswith("."):
                    continue  # rsync temp files a stop left behind: not tasks
                files.add(os.path.normpath(f"{rel_dir}/{name}"))
        return files, dirs

    def settle(self) -> dict[str, tuple[dict, bytes]] | None:
        """Wait until every file is complete or failed (or waits for its declared size)
        and no import is pending or running; returns path -> (xattrs, bytes)."""
        deadline = time.monotonic() + 60
        quiet_since, last = None, None
        while True:
            files, dirs = self.walk()
            states = {rel: task_attrs(self.up / rel) for rel in files}
            waiting = {rel: a.get("state") for rel, a in states.items() if not _settled(a)}
            jobs = import_jobs(self.agent.mount)
            busy = [j["ID"] for j in jobs if job_state(j) in ("pending", "running")]
            busy += [f"fileset {f['root']}/ being collected" for f in
                     json.loads((self.agent.mount / "filesets.json").read_text())]
            # Settled = nothing waiting and no import to come, twice 0.5 s apart (an
            # import is submitted a moment after the one before it ended).
            now = (sorted(states.items()), len(jobs))
            if waiting or busy or now != last:
                quiet_since, last = None, now
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 0.5:
                break
            if time.monotonic() > deadline:
                self.fail(f"not settled 60 s after the restart: files {waiting}, "
                          f"imports pending/running {busy[:5]}")
                return None
            time.sleep(0.1)
        with self.model.lock:
            self.model.dirs = dirs | {d for d in self.model.dirs if "/" not in d}
        return {rel: look(self.up / rel) for rel in sorted(files)}

    def match_and_check(self, observed: dict[str, tuple[dict, bytes]]) -> None:
        model = self.model
        lineages = list(model.lineages.values())
        # Which lineage is at each observed path: one whose possible places include it,
        # preferring one whose candidates admit the bytes found there.
        claims: dict[str, list[Lineage]] = {}
        for lin in lineages:
            for p in lin.possible():
                if p is not None:
                    claims.setdefault(p, []).append(lin)
        fits = {(rel, lin.id): self.fits(lin, data) for rel, (_, data) in observed.items()
                for lin in claims.get(rel, [])}
        assignment = _match(observed, claims, fits)
        seen_lineages = set()
        for rel, (attrs, data) in observed.items():
            lin = assignment.get(rel)
            if lin is None:
                self.fail(f"{rel}: a file the model does not have ({len(data)} bytes, "
                          f"{attrs.get('state')}); claimed by "
                          f"{[c.describe() for c in claims.get(rel, [])]}")
                continue
            seen_lineages.add(lin.id)
            if not fits[(rel, lin.id)]:
                self.fail(self.data_problem(rel, lin, data))
            if lin.complete_seen is not None and None not in lin.possible():
                self.still_complete(rel, lin, attrs, "once settled")
            self.check_file(rel, lin, attrs, data)
        for lin in lineages:
            if lin.id in seen_lineages:
                continue
            if None in lin.possible():
                model.end(lin)
            else:
                self.fail(f"{lin.path}: missing after the restart ({lin.describe()})")
                model.end(lin)
        # The model becomes what is there now.
        for rel, (attrs, data) in observed.items():
            lin = assignment.get(rel)
            if lin is None:
                lin = model.new(rel, data)
            changed = data != lin.content
            if lin.uncertain or lin.reopened or changed:
                model.became(data, rel, "after the restart")
            lin.path, lin.maybe = rel, set()
            lin.content, lin.candidates = data, [data]
            lin.floor, lin.exact = 0, False
            lin.uncertain = lin.reopened = lin.relabelled = False
            lin.complete_seen = None
            if attrs.get("state") == "complete" and attrs.get("sha256") == sha256_bytes(data):
                lin.anchor()
                if attrs.get("job"):
                    lin.complete_seen = (attrs.get("task"), attrs["sha256"], attrs["job"])
            if attrs.get("state") == "failed" and lin.declared_sha is None \
                    and lin.declared_size is None:
                self.fail(f"{rel}: failed with nothing declared: {attrs.get('error')}")

    def fits(self, lin: Lineage, data: bytes) -> bool:
        if self.clean and not lin.uncertain:
            return data == lin.content
        if lin.exact and not lin.uncertain:
            return data == lin.content
        return len(data) >= lin.floor and any(admits(data, c) for c in lin.candidates)

    def data_problem(self, rel: str, lin: Lineage, data: bytes) -> str:
        if self.clean and not lin.uncertain:
            why = "a clean stop (SIGTERM) may cut nothing"
        elif lin.exact and not lin.uncertain:
            why = "it was durable (fsync'd or complete) and not touched since"
        elif len(data) < lin.floor:
            why = f"fewer than the {lin.floor} bytes that were durable"
        else:
            why = "not a prefix of anything written to it since its last durable point"
        return (f"{rel}: {len(data)} bytes sha256 {sha256_bytes(data)[:16]} after the "
                f"restart, but {why} ({lin.describe()})")

    def check_file(self, rel: str, lin: Lineage, attrs: dict, data: bytes) -> None:
        if attrs.get("state") == "complete" and attrs.get("sha256") != sha256_bytes(data):
            self.fail(f"{rel}: complete with sha256 {attrs.get('sha256')} but its "
                      f"{len(data)} bytes hash to {sha256_bytes(data)}")

    def check_imports(self, observed: dict[str, tuple[dict, bytes]]) -> None:
        deadline = time.monotonic() + 5
        while True:
            jobs = import_jobs(self.agent.mount)
            by_id = {j["ID"]: j for j in jobs}
            rows = manifest(self.agent.state)
            problems = []
            for rel, (attrs, data) in observed.items():
                if attrs.get("state") == "complete" and attrs.get("sha256") == sha256_bytes(data):
                    problems += import_problems(rel, attrs, data, by_id, rows)
            problems += manifest_problems(by_id, rows)
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the last job's manifest row commits a moment after its end
        self.problems += problems
        done = Counter(m["sha256"] for j in jobs if job_state(j) == "success"
                       for m in members_of(j) if not skipped_by(j, m["task"]))
        for digest, n in done.items():
            if n > self.model.allowance[digest]:
                which = [(j["ID"][:8], m.get("path"), m.get("task", "")[:8])
                         for j in jobs if job_state(j) == "success" for m in members_of(j)
                         if m.get("sha256") == digest and not skipped_by(j, m["task"])]
                self.fail(f"sha256 {digest[:16]}: {n} successful imports, but the model saw "
                          f"{self.model.allowance[digest]} version(s) become it: {which}; "
                          f"it saw them become it at {self.model.sources.get(digest)}")
        for j in jobs:
            if job_state(j) == "failure" and j.get("ErrorCode") == 1:
                self.fail(f"import {j['ID']} failed unexpectedly: {j.get('ErrorDescription')}")

    def check_listing(self) -> None:
        listed = json.loads((self.agent.mount / "uploads.json").read_text())
        paths = [u["path"] for u in listed]
        for p, n in Counter(paths).items():
            if n > 1:
                self.fail(f"uploads.json lists {p!r} {n} times")
        for p in paths:
            if not os.path.lexists(self.up / p):
                self.fail(f"uploads.json lists {p!r}, which does not exist")

    def check_logs(self) -> None:
        logs = self.agent.logs
        for path in logs[max(0, self.run.logs_checked - 1):]:
            text = path.read_text(errors="replace")
            if "Traceback" in text:
                at = text.index("Traceback")
                self.fail(f"{path.name} has a traceback:\n{text[max(0, at - 300):at + 2500]}")
        self.run.logs_checked = len(logs)


def _settled(attrs: dict) -> bool:
    state = attrs.get("state")
    if state in ("complete", "failed"):
        return True
    # A declared size is authoritative: short of it, the file waits (legitimately).
    return state == "partial" and "size" in attrs and \
        int(attrs.get("offset", 0)) < int(attrs["size"] or 0)


def _match(observed, claims, fits) -> dict[str, Lineage]:
    """Paths -> lineages, one to one (Kuhn's augmenting paths from the lineages' side),
    fitting edges first and, in each pass, the lineages that cannot be gone first.

    A lineage the model allows to be gone (``None`` in its possible places) must never
    take a path that only a lineage which cannot be gone could explain: after
    ``rename(A -> B over a file)`` cut short by the kill, a file at B with bytes both
    could have is the renamed one (the other one is gone), not a missing file.
    Augmenting from the lineages' side keeps every lineage matched once it is (a later
    one only moves it to another path), so the order of the passes is the priority."""
    wanted: dict[int, list[str]] = {}
    lineage: dict[int, Lineage] = {}
    for rel in observed:
        for lin in claims.get(rel, []):
            wanted.setdefault(lin.id, []).append(rel)
            lineage[lin.id] = lin
    holder: dict[str, int] = {}  # path -> lineage id

    def attempt(lin_id: int, seen: set, only_fitting: bool) -> bool:
        for rel in wanted[lin_id]:
            if rel in seen or (only_fitting and not fits[(rel, lin_id)]):
                continue
            seen.add(rel)
            other = holder.get(rel)
            if other is None or attempt(other, seen, only_fitting):
                holder[rel] = lin_id
                return True
        return False

    must = [i for i, lin in lineage.items() if None not in lin.possible()]
    may = [i for i, lin in lineage.items() if None in lin.possible()]
    matched: set[int] = set()
    for only_fitting in (True, False):
        for group in (must, may):
            for lin_id in group:
                if lin_id not in matched and attempt(lin_id, set(), only_fitting):
                    matched.add(lin_id)
    return {rel: lineage[lin_id] for rel, lin_id in holder.items()}


# -- driving many rounds -------------------------------------------------------------------------


def play(base: Path, seed: int, rounds: int, *, budget_seconds: float | None = None,
         rounds_per_state: int = 50, progress=None, ops: dict[str, int] | None = None,
         stops: str | None = None) -> dict:
    """Play ``rounds`` rounds (or until ``budget_seconds``), a fresh state dir every
    ``rounds_per_state``; stop at the first round with a violation."""
    started = time.monotonic()
    played, run, state_no = 0, None, 0
    result = {"seed": seed, "rounds": 0, "violations": [], "log": [], "config": ""}
    try:
        while played < rounds:
            if budget_seconds is not None and time.monotonic() - started > budget_seconds:
                break
            if run is None or run.round >= rounds_per_state:
                if run is not None:
                    run.close()
                    shutil.rmtree(run.base, ignore_errors=True)
                state_no += 1
                run = Run(base / f"state{state_no}", seed * 1000 + state_no, ops=ops,
                          stops=stops)
                run.start()
            problems = run.play_round()
            played += 1
            result["rounds"] = played
            if progress:
                progress(played, run, problems)
            if problems:
                result["violations"] = run.violations
                result["log"] = run.failed_round_log
                result["config"] = run.config
                result["state_seed"] = run.seed
                result["round_in_state"] = run.round
                break
    finally:
        if run is not None:
            run.close()
    result["seconds"] = time.monotonic() - started
    return result


def report(result: dict, rerun: str) -> str:
    lines = [f"seed {result['seed']}: {result['rounds']} rounds, "
             f"{len(result['violations'])} violations in {result['seconds']:.0f} s"]
    if result["violations"]:
        lines.append(f"rerun with: {rerun}")
        lines.append(f"state seed {result.get('state_seed')}, round "
                     f"{result.get('round_in_state')} of that state; config:")
        lines += ["    " + line for line in result["config"].splitlines()]
        lines.append("violations:")
        lines += ["  - " + v for v in result["violations"]]
        lines.append("operations of the failing round:")
        lines += ["  " + entry for entry in result["log"]]
    return "\n".join(lines)
