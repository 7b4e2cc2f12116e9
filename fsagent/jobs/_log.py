"""Job logs: lines kept in memory, written to ``STATE/jobs/<id>/log`` in batches.

Design notes
------------
* **A job is cheap.** Thousands of small imports each log a few lines ("started",
  "recorded ...", "success"). Opening and appending a file per line, on the event loop,
  and a directory per job that eviction must ``rmtree`` later, cost more than the
  import itself. So a line is appended to an in-memory list (``JobLog.__call__``,
  thread-safe, no system call) and the engine writes the lines of every log that has
  some to write in one worker-thread call (``JobLogs.write_pending``) every
  ``db_flush_seconds`` and at each checkpoint (shutdown).
* **Which lines reach the disk.** Only a log that is *kept* is written: the job has
  a directory anyway (outputs, or an ``import_command`` writing into the log), it
  failed, was cancelled, paused, resumed or retried, it was requeued after a stop, it
  ran longer than one flush interval, or its lines outgrew ``MEMORY_LIMIT``. The lines
  of a short job that succeeds without outputs stay in memory only: such a job never
  gets a directory. Its ``log`` reads the same through the mount while the agent runs;
  after a restart it reads empty (its row in SQLite, ``info.json``, is the record).
* **What a crash loses.** The job's state is the truth and lives in SQLite; its log
  is a convenience. A kill -9 loses the lines not yet written: at most the last
  ``db_flush_seconds`` (plus one write) of a kept log, and every line of a job that
  was not kept. After the restart the log shows what was written before the crash,
  then the line the engine adds when it requeues a job that was running.
* **Reading sees every line.** The mount serves a log as its file followed by the
  lines not yet written. Two locks make that exact: ``mem`` guards the lists (held for
  an append or a swap, never across I/O, so the event loop never waits on a disk) and
  ``io`` is held while lines move from a list into the file, and while a reader takes
  the file and the list together, so a reader sees a line exactly once.
* **A command's output** goes into the file directly: ``open_for_append()`` (blocking,
  call it in a worker thread) writes the lines logged so far, then returns an
  ``O_APPEND`` descriptor for the command's stdout and stderr. Lines logged after it
  follow the output written so far.
* **Eviction** marks a log gone (nothing more is written) and removes its job's
  directory under ``io`` (``remove_dirs``), so a batch being written cannot put it back.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

__all__ = ["JobLog", "JobLogs", "MEMORY_LIMIT"]

log = logging.getLogger(__name__)

# Bytes of lines a log that is not kept may hold in memory; beyond that it is written
# (a job's lines in memory stay until it is evicted: job_history of them at most).
MEMORY_LIMIT = 4096


class JobLogs:
    """Every job's log of one engine: the locks and the logs with lines to write."""

    def __init__(self, jobs_dir: Path):
        self.jobs_dir = jobs_dir
        self.mem = threading.Lock()
        self.io = threading.Lock()
        self._dirty: dict[str, JobLog] = {}   # kept logs with lines not yet written

    def new(self, job_id: str, *, on_disk: bool) -> JobLog:
        return JobLog(self, job_id, on_disk=on_disk)

    @property
    def pending(self) -> bool:
        """Some kept log has lines to write (read on the event loop; a hint)."""
        return bool(self._dirty)

    def write_pending(self) -> int:
        """Blocking (a worker thread): write every kept log's lines; returns how many
        logs were written."""
        with self.io:
            with self.mem:
                dirty, self._dirty = self._dirty, {}
                batch = [(entry, entry._take()) for entry in dirty.values()]
            for entry, lines in batch:
                entry._write(lines)
        return len(batch)

    def forget(self, logs: list[JobLog]) -> None:
        """Evicted jobs: write nothing more for them (event loop, no I/O)."""
        with self.mem:
            for entry in logs:
                entry.gone = True
                entry.lines.clear()
                entry.buffered = 0
                self._dirty.pop(entry.job_id, None)

    def remove_dirs(self, dirs: list[Path]) -> None:
        """Blocking: remove evicted jobs' directories, each under ``io`` (a batch being
        written when the job was evicted has finished, and cannot recreate it)."""
        for d in dirs:
            with self.io:
                shutil.rmtree(d, ignore_errors=True)


class JobLog:
    """One job's log. Calling it appends a line (thread-safe, no I/O)."""

    def __init__(self, logs: JobLogs, job_id: str, *, on_disk: bool):
        self._logs = logs
        self.job_id = job_id
        self.lines: list[bytes] = []   # logged, not yet in the file
        self.buffered = 0              # bytes in ``lines``
        # The job's directory may exist (so the file may): readers look at the file.
        self.on_disk = on_disk
        # Lines go to the file (a job with a directory keeps its log in it).
        self.kept = on_disk
        self.gone = False              # evicted

    @property
    def dir(self) -> Path:
        return self._logs.jobs_dir / self.job_id

    @property
    def path(self) -> Path:
        return self.dir / "log"

    def __call__(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
        data = f"{stamp} {line.rstrip()}\n".encode("utf-8", "replace")
        logs = self._logs
        with logs.mem:
            if self.gone:
                return
            self.lines.append(data)
            self.buffered += len(data)
            if self.buffered > MEMORY_LIMIT:
                self.kept = True
            if self.kept:
                logs._dirty[self.job_id] = self

    def keep(self, *, made_dir: bool = False) -> None:
        """Thread-safe: from now on this log's lines are written to its file.
        ``made_dir``: the job's directory is about to be made (outputs), so readers
        and eviction must look at the disk from now on."""
        logs = self._logs
        with logs.mem:
            if self.gone:
                return
            self.kept = True
            self.on_disk = self.on_disk or made_dir
            if self.lines:
                logs._dirty[self.job_id] = self

    def open_for_append(self) -> int:
        """Blocking: write the lines logged so far, then return a descriptor appending
        to the file (for a command's stdout and stderr; the caller closes it)."""
        self.keep()
        logs = self._logs
        with logs.io:
            with logs.mem:
                logs._dirty.pop(self.job_id, None)
                lines = self._take()
            self._write(lines)
            self.dir.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    # -- reading (the mount) ---------------------------------------------------------

    def memory_only(self) -> bytes | None:
        """Event loop: the whole log if it has no file, else None (read it with
        ``read``). No I/O."""
        with self._logs.mem:
            return None if self.on_disk else b"".join(self.lines)

    def size(self) -> int:
        """Bytes in the log now (a ``stat`` of the file if it has one)."""
        with self._logs.mem:
            on_disk, buffered = self.on_disk, self.buffered
        if not on_disk:
            return buffered
        try:
            return os.stat(self.path).st_size + buffered
        except OSError:
            return buffered

    def read(self, fd: int | None, offset: int, size: int) -> tuple[int | None, bytes]:
        """Blocking: ``size`` bytes at ``offset`` of the file followed by the lines not
        yet written. ``fd`` is the reader's descriptor on the file (None: open it now
        if the file exists); returns it with the data (the caller closes it)."""
        logs = self._logs
        with logs.io:
            if fd is None:
                try:
                    fd = os.open(self.path, os.O_RDONLY)
                except FileNotFoundError:
                    fd = None  # nothing written yet: only the lines kept in memory
            file_size = os.fstat(fd).st_size if fd is not None else 0
            out = b""
            if fd is not None and offset < file_size:
                out = os.pread(fd, min(size, file_size - offset), offset)
            if len(out) < size:
                with logs.mem:
                    tail = b"".join(self.lines)
                start = offset + len(out) - file_size
                out += tail[start : start + size - len(out)]
        return fd, out

    # -- writing (``io`` held) -------------------------------------------------------------

    def _take(self) -> list[bytes]:
        """``mem`` held: the lines to write now; the log has a file from now on."""
        lines, self.lines, self.buffered = self.lines, [], 0
        self.on_disk = True
        return lines

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"".join(lines)
        try:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except FileNotFoundError:
                self.dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as e:
            # A job's log is a convenience: a full or failing disk must not turn into a
            # failed job or a dead engine. The agent's own log keeps the lines.
            log.warning("cannot append to %s (%s): %s", self.path, e.strerror,
                        data.decode("utf-8", "replace").rstrip())
