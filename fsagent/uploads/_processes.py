"""Import processes: one explicit fileset (``ImportProcess.*``), its record and its rows.

Design notes
------------
* **What a process is.** OMERO's ImportProcess: a client names a root and the files it
  will send (``uploads/ROOT/PATH``, each with its size and, optionally, its SHA-256),
  sends their bytes, then asks for them to be verified and imported *together*: one
  process is one fileset is one import job, whatever ``import_grouping`` says. The
  files are ordinary upload tasks (``_task.py``); the process adds only the list, its
  owner and, once submitted, its job.
* **Pure.** This module checks arguments and keeps records; it does no I/O but the
  SQL it hands to ``Database`` (staged rows, and ``load_processes`` at start-up).
  ``_service.py`` drives it.
* **Durable before answered.** ``create`` returns a process ID only after its rows
  are committed, so after a ``kill -9`` the same ``create`` finds the same process
  (``create_key``: owner, root and the files of the first call, as given) and the
  client resumes from ``getUploadOffset``. A process with a job is finished: its key
  no longer matches, so the same arguments later make a new process (a new import).
* **The job is recorded with the job.** ``record_job`` is called by the hand-off in
  the same staging step as the import job's own row (``_handoff.py``: no await
  between), so the process and the job commit together or not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sqlite3
import time
from typing import Any

from ..rpc import RpcError

__all__ = ["ProcessFile", "Process", "MAX_FILES_PER_CALL", "check_relative_path",
           "check_files", "check_sha256", "create_key", "load_processes"]

MAX_FILES_PER_CALL = 4096
NAME_MAX = 255
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def bad(message: str) -> RpcError:
    return RpcError("BadArgument", message)


def check_relative_path(value: Any, what: str = "path", *, empty_ok: bool = False) -> str:
    """A path relative to ``uploads/`` as the API allows it (see API13): UTF-8 text
    (msgpack bin is accepted if it decodes), not absolute, no empty, ``.`` or ``..``
    component, no NUL, no name over 255 bytes. Returns it as ``str``."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"{what} {value!r} is not UTF-8") from None
    if not isinstance(value, str):
        raise bad(f"{what} must be a string, not {type(value).__name__}")
    if value == "" and empty_ok:
        return value
    if not value:
        raise bad(f"{what} is empty")
    if "\0" in value:
        raise bad(f"{what} {value!r} contains NUL")
    if value.startswith("/"):
        raise bad(f"{what} {value!r} is absolute; paths are relative to uploads/")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{what} {value!r} is not UTF-8") from None
    for part in encoded.split(b"/"):
        if part in (b"", b".", b".."):
            raise bad(f"{what} {value!r} has an empty, '.' or '..' component")
        if len(part) > NAME_MAX:
            raise bad(f"{what} {value!r} has a name longer than {NAME_MAX} bytes")
    return value


def check_sha256(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not _HEX64.match(value.strip().lower()):
        raise bad(f"{what} must be 64 hex digits (SHA-256), not {value!r}")
    return value.strip().lower()


def check_size(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad(f"{what} must be a non-negative integer, not {value!r}")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessFile:
    path: str            # relative to the process root
    size: int
    sha256: str | None


def check_files(files: Any, *, already: int = 0) -> list[ProcessFile]:
    """``[{path, size, sha256?}, ...]`` as ``ProcessFile``s, or ``BadArgument``."""
    if not isinstance(files, list) or not files:
        raise bad("files must be a non-empty list of {path, size, sha256?}")
    if len(files) > MAX_FILES_PER_CALL:
        raise bad(f"{len(files)} files in one call; at most {MAX_FILES_PER_CALL} "
                  "(add more with ImportProcess.addFiles)")
    out = []
    for n, item in enumerate(files, start=already):
        if not isinstance(item, dict):
            raise bad(f"files[{n}] must be a map {{path, size, sha256?}}")
        item = {(k.decode() if isinstance(k, bytes) else k): v for k, v in item.items()}
        unknown = set(item) - {"path", "size", "sha256"}
        if unknown:
            raise bad(f"files[{n}]: unknown key(s) {sorted(map(str, unknown))}")
        path = check_relative_path(item.get("path"), f"files[{n}].path")
        size = check_size(item.get("size"), f"files[{n}].size")
        sha = item.get("sha256")
        out.append(ProcessFile(path, size, None if sha is None else
                               check_sha256(sha, f"files[{n}].sha256")))
    return out


def create_key(owner: int, root: str, files: list[ProcessFile]) -> str:
    """What makes two ``create`` calls the same process (see the design notes)."""
    text = json.dumps([owner, root, [[f.path, f.size, f.sha256] for f in files]],
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(eq=False)
class Process:
    pid: str
    owner: int
    root: str
    key: str
    files: list[ProcessFile]
    created: float = dataclasses.field(default_factory=time.time)
    job: str | None = None

    def rel(self, i: int) -> bytes:
        """``uploads/``-relative path of file ``i``."""
        path = self.files[i].path
        return os.fsencode(f"{self.root}/{path}" if self.root else path)

    @property
    def root_rel(self) -> bytes:
        return os.fsencode(self.root)

    def stage(self, db, first: int = 0) -> None:
        """Stage the process row and the rows of files ``first`` and after."""
        db.stage(("import_process", self.pid),
                 "INSERT INTO import_processes (pid, owner, root, create_key, job, created) "
                 "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(pid) DO UPDATE SET job = excluded.job",
                 (self.pid, self.owner, self.root, self.key, self.job, self.created))
        for i in range(first, len(self.files)):
            f = self.files[i]
            db.stage(("import_process_file", self.pid, i),
                     "INSERT OR REPLACE INTO import_process_files (pid, i, path, size, sha256) "
                     "VALUES (?, ?, ?, ?, ?)", (self.pid, i, f.path, f.size, f.sha256))

    @staticmethod
    def stage_delete(db, pid: str) -> None:
        db.stage(("import_process", pid), "DELETE FROM import_processes WHERE pid = ?", (pid,))
        db.stage(("import_process_files", pid),
                 "DELETE FROM import_process_files WHERE pid = ?", (pid,))

    def stage_job(self, db) -> None:
        db.stage(("import_process", self.pid),
                 "UPDATE import_processes SET job = ? WHERE pid = ?", (self.job, self.pid))


def load_processes(conn: sqlite3.Connection) -> list[Process]:
    processes: dict[str, Process] = {}
    for pid, owner, root, key, job, created in conn.execute(
            "SELECT pid, owner, root, create_key, job, created FROM import_processes"):
        processes[pid] = Process(pid=pid, owner=owner, root=root, key=key, files=[],
                                 created=created, job=job)
    for pid, i, path, size, sha in conn.execute(
            "SELECT pid, i, path, size, sha256 FROM import_process_files ORDER BY pid, i"):
        p = processes.get(pid)
        if p is not None and i == len(p.files):
            p.files.append(ProcessFile(path, size, sha))
    return list(processes.values())
