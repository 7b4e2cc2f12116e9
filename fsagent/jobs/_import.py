"""The ``import`` kind: what happens to each verified upload.

Design notes
------------
* Submitted by the uploads component (``agent.jobs.submit("import", spec)``) when an
  upload is complete and its SHA-256 verified. Spec: ``{"task", "path" (relative to
  uploads/), "size", "sha256", "mtime_ns"}``.
* **Manifest first.** The file is recorded in the repository manifest (path, size,
  SHA-256, mtime, task, job); ``verify`` jobs check against it. The row stays at the
  file's path: when the upload is renamed later, the uploads component moves it. Without an
  ``import_command`` the row rides in the transaction that records the job's success
  (one fsync per import, not two: thousands of small files are the common case); with
  one, it is committed before the command runs. The
  file is not hashed again (the upload just did), but a file whose size no longer
  matches the verified one fails the job rather than recording a lie.
* **The job follows its upload, not the path it had.** An upload may be renamed (or
  its directory moved) between its verification and the job's run, so ``run`` asks
  the uploads component for the task by ID (``ctx.upload_task``) and imports it at
  the path it has *now*. The version must still be the one verified: a task that is
  no longer ``complete`` with the spec's SHA-256 (rewritten meanwhile) fails the job
  with ``CHANGED``, and one that was removed with ``BAD_INPUT``; the uploads
  component starts a new import when a version comes back ``complete`` and its job
  did not succeed, so each version is imported exactly once. A spec whose task is
  not an upload the agent knows (an import submitted by hand for a file) is taken
  by its path, as given.
* **Then ``import_command``**, if configured: an argv list from the config with
  ``{path}`` (absolute path of the stored file), ``{sha256}`` and ``{task}``
  substituted per argument. No shell is involved, so nothing in a file name can become
  shell syntax. stdout and stderr go into the job's log; exit status 0 is success.
  ``{path}`` is the absolute path even when it is longer than ``PATH_MAX`` (an upload
  reached step by step): the manifest row is right, but a command that opens such a
  path gets ENAMETOOLONG and fails the job, visibly.
  Cancelling or pausing the job terminates the command (trio: SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time

import trio

from .. import longpaths
from ._kinds import JobFailed, Kind, RunContext, SpecError, confine, only_keys, register
from ._states import ErrorCode

__all__ = ["Import", "stage_manifest_move"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _int(spec: dict, key: str, minimum: int | None = None) -> int:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f'"{key}" must be an integer, got {value!r}')
    if minimum is not None and value < minimum:
        raise SpecError(f'"{key}" must be at least {minimum}, got {value}')
    return value


_RECORD = ("INSERT OR REPLACE INTO manifest (path, size, sha256, mtime_ns, task, job_id, "
           "recorded) VALUES (?, ?, ?, ?, ?, ?, ?)")
_MOVE = "UPDATE OR REPLACE manifest SET path = ? WHERE task = ? AND job_id = ?"


def stage_manifest_move(db, task: str, job_id: str, path: str) -> None:
    """Stage moving the manifest row ``job_id`` recorded for ``task`` to ``path`` (the
    upload was renamed); it replaces a row at ``path`` (a file renamed over) and does
    nothing if the import has not recorded it yet (it will, at the upload's new path).
    Keyed by task: only the last rename matters, and it runs after everything staged
    before it, the import's own row included (``Database.stage`` keeps event order)."""
    db.stage(("manifest-follows", task), _MOVE, (path, task, job_id))


@register
class Import(Kind):
    name = "import"

    async def validate(self, spec, env):
        fields = {"task", "path", "size", "sha256", "mtime_ns"}
        only_keys(spec, fields, fields)
        task = spec["task"]
        if isinstance(task, bool) or not isinstance(task, (str, int)):
            raise SpecError(f'"task" must be a string, got {task!r}')
        real = confine(env.uploads_dir, spec["path"])
        if not stat.S_ISREG(longpaths.stat_follow(real).st_mode):
            raise SpecError(f'{spec["path"]!r} is not a regular file')
        sha256 = spec["sha256"]
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.lower()):
            raise SpecError('"sha256" must be 64 hexadecimal digits')
        return {"task": str(task), "path": spec["path"], "size": _int(spec, "size", 0),
                "sha256": sha256.lower(), "mtime_ns": _int(spec, "mtime_ns")}

    async def run(self, ctx: RunContext) -> None:
        spec = ctx.spec
        path = None
        # The stat runs in a thread: if the upload moved meanwhile, look again. From the
        # last ``_current_path`` to the record below nothing awaits, so nothing moves.
        while path != (now := _current_path(ctx)):
            path = now
            try:
                real = confine(ctx.uploads_dir, path)
                st = await ctx.to_thread(longpaths.stat_follow, real)
            except SpecError as e:
                raise JobFailed(ErrorCode.BAD_INPUT, str(e)) from None
            except (FileNotFoundError, NotADirectoryError):
                st = None
        if st is None:
            raise JobFailed(ErrorCode.BAD_INPUT, f"{path!r} no longer exists in uploads/")
        if st.st_size != spec["size"]:
            raise JobFailed(ErrorCode.CHANGED, f"{path!r} is {st.st_size} bytes now, "
                            f"{spec['size']} when its upload was verified")
        mtime_ns = st.st_mtime_ns if path != spec["path"] else spec["mtime_ns"]
        command = ctx.config.import_command
        row = (path, spec["size"], spec["sha256"], mtime_ns, spec["task"], ctx.job_id)
        # Staged right after the last ``_current_path`` (no await between): a rename of
        # the upload from now on is staged after this row and moves it (uploads keeps
        # the manifest row at the file's path). Keyed by job, not path: two imports at
        # one path in one flush both run, in order.
        ctx.db.stage(("manifest", ctx.job_id), _RECORD, (*row, time.time()))
        if command:
            # The command acts on the outside world: the record is durable before it runs.
            await ctx.db.flush()
        # Otherwise the job's own success record is flushed (one transaction, one fsync)
        # right after this returns and carries the manifest row with it. A crash before
        # that leaves the job to be run again, which records it again.
        ctx.log(f"recorded {path} ({spec['size']} bytes, sha256 {spec['sha256']})")
        ctx.content = {"Path": path, "Size": spec["size"], "SHA256": spec["sha256"],
                       "Task": spec["task"]}
        ctx.set_progress(1, 2)
        ctx.message = "recorded in the manifest"
        if command:
            await self._run_command(ctx, command, str(real))
        ctx.message = f"imported {path}"

    async def _run_command(self, ctx: RunContext, command: tuple[str, ...], path: str):
        values = {"{path}": path, "{sha256}": ctx.spec["sha256"], "{task}": ctx.spec["task"]}
        argv = []
        for arg in command:
            for placeholder, value in values.items():
                arg = arg.replace(placeholder, value)
            argv.append(arg)
        ctx.log(f"running import_command: {argv}")
        ctx.message = f"running {os.path.basename(argv[0])}"
        # The lines logged so far are written first, so the output follows them.
        log_fd = await ctx.to_thread(ctx.log.open_for_append)
        try:
            result = await trio.run_process(argv, stdin=subprocess.DEVNULL, stdout=log_fd,
                                            stderr=subprocess.STDOUT, check=False)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
            raise JobFailed(ErrorCode.COMMAND_NOT_FOUND,
                            f"import_command cannot run {argv[0]!r}: {e.strerror}") from None
        finally:
            os.close(log_fd)
        if result.returncode != 0:
            how = (f"was killed by signal {-result.returncode}" if result.returncode < 0
                   else f"exited with status {result.returncode}")
            raise JobFailed(ErrorCode.COMMAND_FAILED, f"import_command {how}")
        ctx.log("import_command exited with status 0")


def _current_path(ctx: RunContext) -> str:
    """Where the spec's upload is now, if it is still the version that was verified."""
    spec = ctx.spec
    task = ctx.upload_task(spec["task"])
    if task is None:
        return spec["path"]  # not an upload the agent knows: the path is the subject
    if task["state"] == "removed":
        raise JobFailed(ErrorCode.BAD_INPUT, f"upload {spec['task']} ({spec['path']!r}) "
                        "was removed before its import ran")
    if task["state"] != "complete" or task["sha256"] != spec["sha256"]:
        raise JobFailed(ErrorCode.CHANGED, f"{task['path']!r} changed since it was verified "
                        f"(it is {task['state']} now); its new version gets its own import")
    return task["path"]
