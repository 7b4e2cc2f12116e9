"""What "complete" must mean, checked from the outside: helpers for the crash tests.

Design notes
------------
* **Everything is read the way a user reads it**: ``user.fsagent.*`` xattrs and the
  bytes through the mount, ``MOUNT/jobs.json`` for import jobs, and the ``manifest``
  table of ``STATE/fsagent.db`` (read-only; the agent keeps writing it meanwhile).
* **A consistent look at one file** (``look``): the state xattrs, then the bytes, then
  the xattrs again; only a look whose two xattr reads agree is used, so a file that
  changes state while it is read is looked at again instead of judged half-way.
* **The import rule** (``import_problems``): a file that is ``complete`` has a
  successful ``import`` job (its ``user.fsagent.job``) whose spec carries this file's
  task, size and SHA-256 (alone, or as one of a fileset's ``files``) and that did not
  skip it, and the manifest holds a row of that job and task recording that size and
  hash (its path may be an older name of the file). This is the one definition both
  the hand-written case tests and the model-based test use.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

FSAGENT_KEYS = ("state", "sha256", "job", "task", "offset", "size", "error")
SETTLED_STATES = ("complete", "failed")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def task_attrs(path: Path | str) -> dict[str, str]:
    """The ``user.fsagent.*`` xattrs present on ``path`` (missing ones are left out)."""
    out = {}
    for key in FSAGENT_KEYS:
        try:
            out[key] = os.getxattr(path, f"user.fsagent.{key}").decode()
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    return out


def look(path: Path | str, tries: int = 50) -> tuple[dict[str, str], bytes]:
    """``(xattrs, bytes)`` of one file, taken so that both describe the same moment:
    the xattrs read before and after the bytes agree (else it is read again)."""
    for _ in range(tries):
        before = task_attrs(path)
        with open(path, "rb") as f:
            data = f.read()
        after = task_attrs(path)
        if before == after:
            return before, data
        time.sleep(0.02)
    raise AssertionError(f"{path}: its upload state kept changing while it was read")


def jobs(mount: Path) -> list[dict]:
    """Every job's info record (``MOUNT/jobs.json``, oldest first)."""
    return json.loads((mount / "jobs.json").read_text())


def import_jobs(mount: Path) -> list[dict]:
    return [j for j in jobs(mount) if str(j.get("Type", "")).lower() == "import"]


def job_state(job: dict) -> str:
    return str(job.get("State", "")).lower()


def spec_of(job: dict) -> dict:
    spec = job.get("Spec") or {}
    return spec if isinstance(spec, dict) else {}


def spec_member(job: dict, task: str | None) -> dict:
    """What import ``job`` was asked to import of upload ``task``: ``{"task", "path",
    "size", "sha256"}`` from a one-file spec or from a fileset's ``files`` ({} if the
    job does not list the task)."""
    spec = spec_of(job)
    if "files" not in spec:
        return spec if spec.get("task") == task else {}
    for entry in spec["files"]:
        if entry[0] == task:
            return dict(zip(("task", "path", "size", "sha256", "mtime_ns"), entry))
    return {}


def members_of(job: dict) -> list[dict]:
    """Every file import ``job`` lists, as ``{"task", "path", "size", "sha256"}``."""
    spec = spec_of(job)
    if "files" not in spec:
        return [spec] if spec else []
    return [dict(zip(("task", "path", "size", "sha256", "mtime_ns"), e)) for e in spec["files"]]


def jobs_listing(found: list[dict], digest: str) -> list[dict]:
    """The import jobs among ``found`` that list a file of SHA-256 ``digest``."""
    return [j for j in found if any(m.get("sha256") == digest for m in members_of(j))]


def skipped_by(job: dict, task: str | None) -> bool:
    """A fileset's import that ran without importing ``task`` (changed or gone)."""
    return task in ((job.get("Content") or {}).get("Skipped") or ())


def manifest(state_dir: Path) -> dict[str, tuple]:
    """``path -> (size, sha256, task, job_id)`` from the manifest table."""
    db = state_dir / "fsagent.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT path, size, sha256, task, job_id FROM manifest").fetchall()
    finally:
        conn.close()
    return {r[0]: tuple(r[1:]) for r in rows}


def imports_finished(mount: Path) -> list[dict] | None:
    """The import jobs, once no fileset is being collected and no import is pending or
    running (else None)."""
    if json.loads((mount / "filesets.json").read_text()):
        return None
    found = import_jobs(mount)
    if any(job_state(j) in ("pending", "running") for j in found):
        return None
    return found


def import_problems(rel: str, attrs: dict[str, str], data: bytes,
                    by_id: dict[str, dict], rows: dict[str, tuple]) -> list[str]:
    """Why the complete file ``rel`` (its xattrs and bytes) breaks the import rule."""
    size, digest = len(data), sha256_bytes(data)
    job_id = attrs.get("job", "")
    if not job_id:
        return [f"{rel}: complete with no import job (user.fsagent.job is empty)"]
    job = by_id.get(job_id)
    if job is None:
        return [f"{rel}: complete with import job {job_id}, which does not exist"]
    problems = []
    task = attrs.get("task")
    spec = spec_member(job, task)
    if job_state(job) != "success":
        problems.append(f"{rel}: its import job {job_id} is {job_state(job)} "
                        f"({job.get('ErrorCode')} {job.get('ErrorDescription')!r})")
    if not spec:
        problems.append(f"{rel}: task {task}, but its import job {job_id} does not list "
                        "that task")
        return problems
    if (spec.get("size"), spec.get("sha256")) != (size, digest):
        problems.append(f"{rel}: complete as {size} bytes sha256 {digest}, but its import "
                        f"job {job_id} imported {spec.get('size')} bytes sha256 "
                        f"{spec.get('sha256')}")
    if job_state(job) == "success" and skipped_by(job, task):
        problems.append(f"{rel}: complete, but its import job {job_id} skipped it (changed "
                        "or gone when it ran) and it has no newer import")
    elif job_state(job) == "success":
        mine = [(path, row) for path, row in rows.items()
                if row[3] == job_id and row[2] == task]
        if not mine:
            content = job.get("Content") or {}
            where = content.get("Path", spec.get("path"))
            now = rows.get(where)
            problems.append(
                f"{rel}: import job {job_id} succeeded, but no manifest row records it (the "
                f"row for {where!r}, where it recorded {content.get('Size')} bytes, "
                + ("is gone)" if now is None else f"now belongs to job {now[3]}: {now[0]} "
                   f"bytes sha256 {now[1]})"))
        for path, row in mine:
            if (row[0], row[1]) != (size, digest):
                problems.append(f"{rel}: the manifest row of job {job_id} ({path!r}) records "
                                f"{row[0]} bytes sha256 {row[1]}, not {size} / {digest}")
    return problems


def manifest_problems(by_id: dict[str, dict], rows: dict[str, tuple]) -> list[str]:
    """Each manifest row must record what its job imported."""
    problems = []
    for path, (size, digest, task, job_id) in rows.items():
        job = by_id.get(job_id)
        if job is None:
            continue  # evicted history, or an import from before this state dir's jobs
        spec = spec_member(job, task)
        if (spec.get("size"), spec.get("sha256"), spec.get("task")) != (size, digest, task):
            problems.append(f"manifest row {path!r} (job {job_id}) records {size} bytes "
                            f"sha256 {digest} task {task}; the job imported "
                            f"{spec.get('size')} / {spec.get('sha256')} / {spec.get('task')}")
    return problems


# ext4 (``stat -f`` names it ext2/ext3) hands a freed inode number out again and keeps
# inode generations: there the tests that need either must run, never skip.
_REUSING_FILESYSTEMS = ("ext2/ext3",)


def filesystem_type(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()


def reuse_inode(directory: Path, ino: int, tries: int = 5000) -> Path:
    """Create files in ``directory`` until one gets inode number ``ino`` (freed just
    before), and return it. ext4 gives a new file the lowest free number of its
    directory's group, so the others are kept until then (each fills a lower free
    number) and removed after. A filesystem that never reuses numbers (tmpfs, btrfs)
    cannot have the case: skipped there, a failure on ext4."""
    made = []
    try:
        for i in range(tries):
            candidate = directory / f".reuse-{i}"
            candidate.write_bytes(b"")
            if os.lstat(candidate).st_ino == ino:
                return candidate
            made.append(candidate)
    finally:
        for other in made:
            other.unlink()
    kind = filesystem_type(directory)
    if kind in _REUSING_FILESYSTEMS:
        pytest.fail(f"{kind} did not reuse inode {ino} in {tries} new files")
    pytest.skip(f"{kind} does not hand a freed inode number out again: no reuse to test")


def require_generation(generation: int | None, path: Path) -> int:
    """``generation`` (``BackingTree.identity``'s), which ext4 always has; a filesystem
    without ``FS_IOC_GETVERSION`` (tmpfs) cannot have the case: skipped there."""
    if generation is None:
        kind = filesystem_type(path)
        if kind in _REUSING_FILESYSTEMS:
            pytest.fail(f"{kind} gave no inode generation for {path}")
        pytest.skip(f"{kind} keeps no inode generations (FS_IOC_GETVERSION)")
    return generation
