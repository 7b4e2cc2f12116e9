"""The ``import`` kind: what happens to a verified fileset.

Design notes
------------
* Submitted by the uploads component (``agent.jobs.submit("import", spec)``) when a
  fileset of complete, verified uploads is ready (``fsagent/uploads/_filesets.py``).
  Spec, for a fileset: ``{"root", "files": [[task, path, size, sha256, mtime_ns],
  ...]}`` (paths relative to uploads/; ``root`` the directory it was collected in);
  for one file (``import_grouping = "file"``, or by hand): ``{"task", "path", "size",
  "sha256", "mtime_ns"}``.
* **Manifest first.** Each file is recorded in the repository manifest (path, size,
  SHA-256, mtime, task, job); ``verify`` jobs check against it. A row stays at the
  file's path: when the upload is renamed later, the uploads component moves it.
  Without an ``import_command`` the rows ride in the transaction that records the job's
  success (one fsync per import, not two, and one import per fileset, not per file);
  with one, they are committed before the command runs. Files are not hashed again
  (the uploads just did), but a file whose size no longer matches the verified one is
  not recorded as if it did.
* **A job follows its uploads, not the paths they had.** An upload may be renamed (or
  its directory moved) between its verification and the job's run, so ``run`` asks
  the uploads component for each task by ID (``ctx.upload_task``) and imports it at
  the path it has *now*. The version must still be the one verified: a task that is
  no longer ``complete`` with the spec's SHA-256 (rewritten meanwhile), or no longer
  naming this job as its import (``user.fsagent.job``: it left the import when it
  changed, and the same bytes written back are a new version with an import of their
  own, else they would be imported twice), is ``CHANGED``; one that was removed
  ``BAD_INPUT``. A one-file import fails with that code; a
  fileset's import records the others, lists the file as skipped in ``fileset.json``
  and ``Content.Skipped`` (task IDs), and fails only if it could record none. The
  uploads component starts a new import when a version comes back ``complete`` and its
  job did not import it, so each version is imported exactly once. A task the agent
  does not know (an import submitted by hand) is taken at its path, as given.
* **A failed stat is not a verdict.** The paths are stat-ed in a worker thread while
  renames through the mount run on the event loop: a directory renamed away and back
  during that stat leaves a member's path the same before and after, yet the stat
  found nothing there, and nothing would ever import that unchanged version again
  (found under load: a fileset renamed every few ms, 531 of 600 files skipped). So a
  stat that failed is taken again on the event loop right after the last look at the
  task (no await between), where no rename can interleave (the FUSE handler moves the
  file and its task in one step): only that stat may skip a member the agent still
  knows as the verified version.
* **Outputs.** A fileset's import publishes ``fileset.json``: root, and each file's
  path, size, SHA-256, task, and whether it was imported (with the reason if not).
  ``Content`` carries ``Root``, ``Files``, ``Bytes``, ``Imported`` and ``Skipped``; a
  one-file import's carries ``Path``, ``Size``, ``SHA256``, ``Task`` and publishes no
  outputs (no directory on disk for the common small job).
* **Then ``import_command``**, if configured: an argv list (no shell, so nothing in a
  file name can become shell syntax). With ``{fileset}`` (the path of
  ``fileset.json``, valid while the command runs) or ``{root}`` (the fileset's
  directory) in it, it runs once for the fileset; otherwise once per recorded file with
  ``{path}`` (absolute path of the stored file), ``{sha256}`` and ``{task}``.
  stdout and stderr go into the job's log; exit status 0 is success. ``{path}`` is
  the absolute path even when it is longer than ``PATH_MAX`` (an upload reached step
  by step): the manifest row is right, but a command that opens such a path gets
  ENAMETOOLONG and fails the job, visibly. Cancelling or pausing the job terminates
  the command (trio: SIGTERM, then SIGKILL). A crash during the command runs the job
  again: commands must be idempotent (the manifest rows are: one per path).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time

import trio

from .. import longpaths
from ..repository import PushFailed
from ._kinds import (JobFailed, Kind, Resolver, RunContext, SpecError, confine, only_keys,
                     register)
from ._states import ErrorCode

__all__ = ["Import", "import_tasks", "stage_manifest_move"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA256_ANY_CASE = re.compile(r"[0-9a-fA-F]{64}")
MAX_FILESET_FILES = 100_000   # a spec beyond this is refused (the collector caps far lower)
SKIPPED_LOG_LINES = 100       # per-file lines in the log for skipped files; then a count
MAX_PUSH_ROUNDS = 8           # pushes of members that moved during the last one; then fail


def _int(value, key: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f'"{key}" must be an integer, got {value!r}')
    if minimum is not None and value < minimum:
        raise SpecError(f'"{key}" must be at least {minimum}, got {value}')
    return value


def _sha256(value) -> str:
    if not isinstance(value, str) or not _SHA256_ANY_CASE.fullmatch(value):
        raise SpecError('"sha256" must be 64 hexadecimal digits')
    return value if _SHA256.fullmatch(value) else value.lower()


def _task_id(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SpecError(f'"task" must be a string, got {value!r}')
    return str(value)


def _members(spec: dict) -> list[list]:
    """The spec's files as ``[task, path, size, sha256, mtime_ns]``, either form."""
    if "files" in spec:
        return spec["files"]
    return [[spec["task"], spec["path"], spec["size"], spec["sha256"], spec["mtime_ns"]]]


def import_tasks(spec: dict) -> set[str]:
    """The upload task IDs an import spec imports."""
    return {f[0] for f in _members(spec)}


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


def _check_regular(uploads_dir, paths: list[str]) -> None:
    """Worker thread: each path is a regular file inside uploads/ (``SpecError``)."""
    resolver = Resolver()
    for path in paths:
        real = confine(uploads_dir, path, resolver=resolver)
        if not stat.S_ISREG(longpaths.stat_follow(real).st_mode):
            raise SpecError(f"{path!r} is not a regular file")


def _stat_all(uploads_dir, paths: list[str]) -> list[os.stat_result | str]:
    """Worker thread: each path's stat, or why it cannot be imported."""
    out: list[os.stat_result | str] = []
    resolver = Resolver()
    for path in paths:
        try:
            out.append(longpaths.stat_follow(confine(uploads_dir, path, resolver=resolver)))
        except SpecError as e:
            out.append(str(e))
        except (FileNotFoundError, NotADirectoryError):
            out.append(f"{path!r} no longer exists in uploads/")
    return out


def _write_json(path, doc) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


@register
class Import(Kind):
    name = "import"

    async def validate(self, spec, env):
        if "files" in spec or "root" in spec:
            return await self._validate_fileset(spec, env)
        fields = {"task", "path", "size", "sha256", "mtime_ns"}
        only_keys(spec, fields, fields)
        task = _task_id(spec["task"])
        real = confine(env.uploads_dir, spec["path"])
        if not stat.S_ISREG(longpaths.stat_follow(real).st_mode):
            raise SpecError(f'{spec["path"]!r} is not a regular file')
        return {"task": task, "path": spec["path"], "size": _int(spec["size"], "size", 0),
                "sha256": _sha256(spec["sha256"]),
                "mtime_ns": _int(spec["mtime_ns"], "mtime_ns")}

    async def _validate_fileset(self, spec, env):
        only_keys(spec, {"root", "files"}, {"root", "files"})
        root = spec["root"]
        if not isinstance(root, str):
            raise SpecError(f'"root" must be a path relative to uploads/, got {root!r}')
        files = spec["files"]
        if not isinstance(files, list) or not files:
            raise SpecError('"files" must be a non-empty list of [task, path, size, '
                            'sha256, mtime_ns]')
        if len(files) > MAX_FILESET_FILES:
            raise SpecError(f'"files" lists {len(files)} files; at most '
                            f"{MAX_FILESET_FILES} per import")
        out, seen = [], set()
        for entry in files:
            if not isinstance(entry, list) or len(entry) != 5:
                raise SpecError(f'each of "files" is [task, path, size, sha256, mtime_ns], '
                                f"got {entry!r}")
            task, path, size, sha256, mtime_ns = entry
            if not isinstance(path, str):
                raise SpecError(f"{path!r} is not a path")
            task = _task_id(task)
            if task in seen:
                raise SpecError(f"task {task!r} is listed twice")
            seen.add(task)
            out.append([task, path, _int(size, "size", 0), _sha256(sha256),
                        _int(mtime_ns, "mtime_ns")])
        if root:
            confine(env.uploads_dir, root, must_exist=False)
        # Thousands of files: their stats go to a worker thread (the uploads hand-off
        # stages its rows only after this returns, see ``Engine.submit``).
        await env.to_thread(_check_regular, env.uploads_dir, [f[1] for f in out])
        return {"root": root, "files": out}

    async def run(self, ctx: RunContext) -> None:
        spec = ctx.spec
        members = _members(spec)
        fileset = "files" in spec
        repository = ctx.repository
        pushed: dict[str, str] = {}      # task -> the path its object was pushed at
        listing_pushed: bytes | None = None
        for _ in range(MAX_PUSH_ROUNDS):
            recorded, skipped = await _locate(ctx, members)
            if not fileset and skipped:
                raise JobFailed(skipped[0][1], skipped[0][2])
            if not recorded:
                raise JobFailed(skipped[0][1], f"none of the {len(members)} files could "
                                f"be imported; the first: {skipped[0][2]}")
            if repository is None:
                break
            # Push what is not in the store at its path yet. Pushing takes a while and
            # uploads may move or change meanwhile: look again, until a look finds
            # nothing new to push (then no await separates it from the rows below).
            todo = [r for r in recorded if pushed.get(r[0][0]) != r[1]]
            if todo:
                if await self._push(ctx, repository, todo, None, None):
                    pushed.update((m[0], path) for m, path, _ in todo)
                continue
            if fileset:
                doc = _listing(ctx, spec, recorded, skipped, repository)
                body = _json_bytes(doc)
                if body != listing_pushed:
                    if await self._push(ctx, repository, [], spec["root"], body):
                        listing_pushed = body
                    continue
            break
        else:
            raise JobFailed(ErrorCode.REPOSITORY, f"the files kept moving or changing while "
                            f"they were pushed ({MAX_PUSH_ROUNDS} rounds); retry the job")
        now = time.time()
        for m, path, mtime_ns in recorded:
            # Staged right after the last ``_where`` (no await between): a rename of an
            # upload from now on is staged after its row and moves it (uploads keeps the
            # manifest row at the file's path). Keyed by job and task, not path: two
            # imports at one path in one flush both run, in order.
            ctx.db.stage(("manifest", ctx.job_id, m[0]), _RECORD,
                         (path, m[2], m[3], mtime_ns, m[0], ctx.job_id, now))
        if repository is not None:
            # Objects pushed for a member that moved or changed since: the store keeps
            # only what the manifest records.
            now_at = {m[0]: path for m, path, _ in recorded}
            stale = [path for task, path in pushed.items() if now_at.get(task) != path]
            if stale:
                ctx.log(f"removing {len(stale)} objects of files that moved or changed "
                        "during the push")
                await repository.remove_objects(ctx, [repository.key_for(p) for p in stale])
        command = ctx.config.import_command
        if command:
            # The command acts on the outside world: the records are durable before it runs.
            await ctx.db.flush()
        # Otherwise the job's own success record is flushed (one transaction, one fsync)
        # right after this returns and carries the manifest rows with it. A crash before
        # that leaves the job to be run again, which records them again.
        ctx.set_progress(1, 2)
        ctx.message = "recorded in the manifest"
        if "files" not in spec:
            m, path, _ = recorded[0]
            ctx.log(f"recorded {path} ({m[2]} bytes, sha256 {m[3]})")
            ctx.content = {**ctx.content, "Path": path, "Size": m[2], "SHA256": m[3],
                           "Task": m[0]}
            if repository is not None:
                ctx.content["Key"] = repository.key_for(path)
            if command:
                await self._run_command(ctx, command, _per_file_values(ctx, m, path))
            ctx.message = f"imported {path}"
            return
        total = sum(m[2] for m, _, _ in recorded)
        ctx.log(f"recorded {len(recorded)} files ({total} bytes) of fileset "
                f"{spec['root'] or '.'}/" + (f"; skipped {len(skipped)}" if skipped else ""))
        for m, code, reason in skipped[:SKIPPED_LOG_LINES]:
            ctx.log(f"skipped task {m[0]}: {reason} (error {int(code)})")
        if len(skipped) > SKIPPED_LOG_LINES:
            ctx.log(f"... and {len(skipped) - SKIPPED_LOG_LINES} more skipped")
        ctx.content = {**ctx.content, "Root": spec["root"], "Files": len(members),
                       "Bytes": total, "Imported": len(recorded),
                       "Skipped": [m[0] for m, _, _ in skipped]}
        doc = _listing(ctx, spec, recorded, skipped, repository)
        listing = (await ctx.make_outputs_dir()) / "fileset.json"
        await ctx.to_thread(_write_json, listing, doc)
        if command:
            if any("{fileset}" in arg or "{root}" in arg for arg in command):
                root = str(ctx.uploads_dir / spec["root"]) if spec["root"] else str(
                    ctx.uploads_dir)
                await self._run_command(ctx, command, {"{fileset}": str(listing),
                                                       "{root}": root})
            else:
                for n, (m, path, _) in enumerate(recorded):
                    await self._run_command(ctx, command, _per_file_values(ctx, m, path))
                    ctx.set_progress(len(recorded) + n + 1, 2 * len(recorded))
        ctx.message = (f"imported {len(recorded)} files" + (
            f", skipped {len(skipped)} (changed or removed)" if skipped else ""))

    async def _push(self, ctx: RunContext, repository, todo: list, root: str | None,
                    listing: bytes | None) -> bool:
        """Push members (or the listing); False if a file could not be read (it moved
        or vanished between the look and the read: the next round looks again)."""
        try:
            await repository.push_fileset(ctx, todo, fileset="files" in ctx.spec, root=root,
                                          listing=listing)
        except PushFailed as e:
            raise JobFailed(ErrorCode.REPOSITORY, e.description) from None
        except OSError as e:
            ctx.log(f"reading a file to push failed ({e}); looking again")
            return False
        return True

    async def _run_command(self, ctx: RunContext, command: tuple[str, ...],
                           values: dict[str, str]) -> None:
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


async def _locate(ctx: RunContext, members: list[list]) -> tuple[list, list]:
    """Where each member's upload is now, or why it cannot be imported:
    ``(recorded, skipped)`` as ``[(member, path, mtime_ns)]`` and ``[(member, code,
    reason)]``. The stats run in a thread: if an upload moved meanwhile, look again; a
    stat that failed is taken again on the event loop (a rename away and back during the
    thread's stat is not a missing file). The last ``_where`` runs after the last await,
    so a caller that stages rows without awaiting after this returns stages them for
    where the uploads are."""
    stats: dict[int, tuple[str, os.stat_result | str]] = {}
    failures_retried = False
    while True:
        where = [_where(ctx, m) for m in members]
        todo = [(i, path) for i, (path, _, _) in enumerate(where)
                if path is not None and (i not in stats or stats[i][0] != path)]
        if not todo and not failures_retried:
            # Stats that failed get one more round in the thread (the renames that
            # failed them are usually over by now); what still fails is stat-ed on the
            # event loop below, so that round keeps the loop's share small.
            failures_retried = True
            todo = [(i, path) for i, (path, _, _) in enumerate(where)
                    if path is not None and isinstance(stats[i][1], str)]
        if not todo:
            break
        found = await ctx.to_thread(_stat_all, ctx.uploads_dir, [p for _, p in todo])
        for (i, path), st in zip(todo, found):
            stats[i] = (path, st)
    recorded, skipped = [], []
    for i, m in enumerate(members):
        path, code, reason = where[i]
        if path is not None:
            st = stats[i][1]
            if isinstance(st, str):
                # The thread's stat may have run while a rename had the file elsewhere
                # (away and back: the path is the same again, see the notes). On the
                # event loop, after the last look, a stat sees the file where its task
                # says it is. Only after a failure (a race, or a file gone behind the
                # agent's back): ~30 us each, a few syscalls, never a file's bytes.
                st = _stat_all(ctx.uploads_dir, [path])[0]
            if isinstance(st, str):
                code, reason = ErrorCode.BAD_INPUT, st
            elif st.st_size != m[2]:
                code, reason = ErrorCode.CHANGED, (
                    f"{path!r} is {st.st_size} bytes now, {m[2]} when its upload was "
                    "verified")
            else:
                recorded.append((m, path, st.st_mtime_ns if path != m[1] else m[4]))
                continue
        skipped.append((m, code, reason))
    return recorded, skipped


def _listing(ctx: RunContext, spec: dict, recorded: list, skipped: list,
             repository) -> dict:
    """``fileset.json``: the job's outputs and, with a store, the object beside the files."""
    doc = {"job": ctx.job_id, "root": spec["root"],
           "files": [{"path": path, "size": m[2], "sha256": m[3], "task": m[0],
                      "imported": True} for m, path, _ in recorded]
           + [{"path": m[1], "size": m[2], "sha256": m[3], "task": m[0],
               "imported": False, "reason": reason} for m, _, reason in skipped]}
    if repository is not None:
        doc["repository"] = repository.describe()
        for entry in doc["files"]:
            if entry["imported"]:
                entry["key"] = repository.key_for(entry["path"])
    return doc


def _json_bytes(doc) -> bytes:
    return (json.dumps(doc, indent=1) + "\n").encode("utf-8")


def _per_file_values(ctx: RunContext, m: list, path: str) -> dict[str, str]:
    real = longpaths.realpath(str(ctx.uploads_dir / path))
    return {"{path}": real, "{sha256}": m[3], "{task}": m[0]}


def _where(ctx: RunContext, m: list) -> tuple[str | None, ErrorCode | None, str | None]:
    """Where member ``m``'s upload is now, if it is still the version that was verified:
    ``(path, None, None)``, else ``(None, code, why)``."""
    task_id, spec_path, _, sha256, _ = m
    task = ctx.upload_task(task_id)
    if task is None:
        return spec_path, None, None  # not an upload the agent knows: the path is the subject
    if task["state"] == "removed":
        return None, ErrorCode.BAD_INPUT, (f"upload {task_id} ({spec_path!r}) was removed "
                                           "before its import ran")
    if task["state"] != "complete" or task["sha256"] != sha256:
        return None, ErrorCode.CHANGED, (
            f"{task['path']!r} changed since it was verified (it is {task['state']} now); "
            "its new version gets its own import")
    if task.get("job", ctx.job_id) != ctx.job_id:
        # The same bytes, but as a version that left this import (changed while it was
        # submitted or afterwards, then written back): its own import has it, or will.
        return None, ErrorCode.CHANGED, (
            f"{task['path']!r} left this import (changed since it was verified, then "
            f"back to the same bytes); its import is {task['job'] or 'to come'}")
    return task["path"], None, None
