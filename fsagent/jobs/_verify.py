"""The ``verify`` kind: re-read stored files and check them against the manifest.

Design notes
------------
* Spec: ``{"paths": ["exp1", ...]}`` (files or directories under uploads/). A path is
  accepted if it exists in uploads/ or the manifest records something at or under it
  (a recorded file that has since vanished is exactly what verify is for).
* Every manifest entry under the paths is re-hashed (SHA-256, 1 MiB chunks, in a worker
  thread, progress by bytes, stoppable after each chunk) and reported ``ok``,
  ``mismatch`` (content or size differs) or ``missing``. Files present under the paths
  but never recorded by an import are reported ``unrecorded``.
* Output ``outputs/report.json``: ``{"summary": {status: count}, "files": [{"path",
  "status", "size", "expected_sha256", "actual_sha256"}]}``. The job succeeds whenever
  the report could be produced; the verdict is in the report, the message and Content.
"""

from __future__ import annotations

import hashlib
import json

from .. import longpaths

from ._kinds import (
    JobFailed, Kind, RunContext, SpecError, collect_files, confine, local_copies, only_keys,
    path_list, register,
)
from ._states import ErrorCode

__all__ = ["Verify"]

CHUNK = 1 << 20
STATUSES = ("ok", "mismatch", "missing", "unrecorded")


def _under(rel: str) -> tuple[str, str]:
    rel = rel.strip("/")
    return rel, rel + "/"


def manifest_under(conn, paths: list[str]) -> dict[str, tuple[int, str]]:
    out = {}
    for p in paths:
        exact, prefix = _under(p)
        rows = conn.execute(
            "SELECT path, size, sha256 FROM manifest"
            " WHERE path = ? OR substr(path, 1, ?) = ?",
            (exact, len(prefix), prefix)).fetchall()
        out.update({path: (size, sha) for path, size, sha in rows})
    return out


@register
class Verify(Kind):
    name = "verify"

    async def validate(self, spec, env):
        only_keys(spec, {"paths"}, {"paths"})
        paths = path_list(spec)
        recorded = await env.db.run(manifest_under, paths)
        for p in paths:
            real = confine(env.uploads_dir, p, must_exist=False)
            exact, prefix = _under(p)
            if not longpaths.exists(real) and not any(r == exact or r.startswith(prefix)
                                              for r in recorded):
                raise SpecError(f"{p!r}: no such file or directory in uploads/, "
                                "and nothing recorded there")
        # The report names files and their state and is readable by every user: only
        # what the job's owner may read (see _kinds.Reader), checked again at run time.
        present = [p for p in paths if longpaths.exists(env.uploads_dir / p)]
        await env.to_thread(collect_files, env.uploads_dir, present, env.owner_uid)
        return {"paths": paths}

    async def run(self, ctx: RunContext) -> None:
        recorded = await ctx.db.run(manifest_under, ctx.spec["paths"])
        # Evicted uploads (repository cache) come back first and stay while it reads.
        async with local_copies(ctx, ctx.spec["paths"]):
            await ctx.to_thread(check_files, ctx, recorded)


def _sha256(ctx: RunContext, path, progress: list[int], total: int) -> str:
    h = hashlib.sha256()
    with longpaths.at(path) as short:  # the path may be past PATH_MAX
        f = open(short, "rb")
    with f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            progress[0] += len(chunk)
            ctx.set_progress(progress[0], total)
            ctx.checkpoint()
    return h.hexdigest()


def check_files(ctx: RunContext, recorded: dict[str, tuple[int, str]]) -> None:
    """Blocking: runs in a worker thread."""
    present = [p for p in ctx.spec["paths"] if longpaths.exists(ctx.uploads_dir / p)]
    try:
        on_disk = {e.name: e for e in collect_files(ctx.uploads_dir, present, ctx.owner_uid)
                   if not e.is_dir}
    except SpecError as e:
        raise JobFailed(ErrorCode.BAD_INPUT, str(e)) from None
    total = sum(e.size for name, e in on_disk.items() if name in recorded)
    progress = [0]
    files = []
    for name in sorted(set(recorded) | set(on_disk)):
        ctx.checkpoint()
        expected = recorded.get(name)
        entry = on_disk.get(name)
        item = {"path": name, "size": entry.size if entry else None,
                "expected_sha256": expected[1] if expected else None, "actual_sha256": None}
        if expected is None:
            item["status"] = "unrecorded"
        elif entry is None:
            item["status"] = "missing"
        else:
            try:
                item["actual_sha256"] = _sha256(ctx, entry.real, progress, total)
            except FileNotFoundError:
                item["status"] = "missing"
            else:
                same = item["actual_sha256"] == expected[1] and entry.size == expected[0]
                item["status"] = "ok" if same else "mismatch"
        files.append(item)
    summary = {s: sum(1 for f in files if f["status"] == s) for s in STATUSES}
    report = ctx.outputs_dir / "report.json"
    with open(report, "w") as f:
        json.dump({"summary": summary, "files": files}, f, indent=2)
        f.write("\n")
    ctx.content = {"FilesCount": len(files), **{s.capitalize(): n for s, n in summary.items()}}
    ctx.message = ", ".join(f"{n} {s}" for s, n in summary.items())
    ctx.log(f"verified: {ctx.message}")
