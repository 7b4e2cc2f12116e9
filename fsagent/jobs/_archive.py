"""The ``archive`` kind: a ZIP of uploaded files and directories (Orthanc's archive job).

Design notes
------------
* **Streamed.** Each member is copied in 1 MiB chunks through ``ZipFile.open(info,
  "w")``; no file is ever held in memory, whatever its size. ZIP64 extra fields are
  forced for any member whose size could pass 4 GiB (zipfile decides the same for the
  central directory of an archive that grows past 4 GiB or 65,535 entries).
* **Progress by bytes**, updated after every chunk; ``ctx.checkpoint()`` after every
  chunk is where a pause, cancel or shutdown stops the work.
* The member list is collected (and confined to uploads/) again at run time: the tree
  may have changed since the spec was accepted, and a path that vanished or now
  escapes ends the job in failure, naming the path.
* ``store`` (default) copies bytes as they are, ``deflate`` compresses them.
* Spec: ``{"paths": ["exp1", "run2/a.tif"], "compression": "store"|"deflate"}``.
  Output: ``outputs/archive.zip``. Content: ``InstancesCount`` (files),
  ``UncompressedSizeMB`` (as Orthanc reports it), ``Compression``.
"""

from __future__ import annotations

import os
import zipfile

from .. import longpaths

from ._kinds import (
    JobFailed, Kind, RunContext, SpecError, collect_files, confine, local_copies, only_keys,
    path_list, register,
)
from ._states import ErrorCode

__all__ = ["Archive"]

CHUNK = 1 << 20
COMPRESSION = {"store": zipfile.ZIP_STORED, "deflate": zipfile.ZIP_DEFLATED}
# zipfile switches to ZIP64 for sizes above this; streamed members must say so up front.
_ZIP64_LIMIT = (1 << 31) - 1


@register
class Archive(Kind):
    name = "archive"

    async def validate(self, spec, env):
        only_keys(spec, {"paths", "compression"}, {"paths"})
        paths = path_list(spec)
        compression = spec.get("compression", "store")
        if compression not in COMPRESSION:
            raise SpecError(f'"compression" must be one of {", ".join(COMPRESSION)}, '
                            f"got {compression!r}")
        for p in paths:
            confine(env.uploads_dir, p)
        # The whole tree, in a worker thread: a nested symlink out of uploads/ is refused
        # now, while the writer is still there to read why.
        await env.to_thread(collect_files, env.uploads_dir, paths, env.owner_uid)
        return {"paths": paths, "compression": compression}

    async def run(self, ctx: RunContext) -> None:
        # Evicted uploads (repository cache) come back first and stay while it reads.
        async with local_copies(ctx, ctx.spec["paths"]):
            await ctx.to_thread(build_archive, ctx)


def build_archive(ctx: RunContext) -> None:
    """Blocking: runs in a worker thread."""
    try:
        entries = collect_files(ctx.uploads_dir, ctx.spec["paths"], ctx.owner_uid)
    except SpecError as e:
        raise JobFailed(ErrorCode.BAD_INPUT, str(e)) from None
    compression = COMPRESSION[ctx.spec["compression"]]
    files = [e for e in entries if not e.is_dir]
    total = sum(e.size for e in files)
    ctx.log(f"archiving {len(files)} files, {total} bytes ({ctx.spec['compression']})")
    done = 0
    path = ctx.outputs_dir / "archive.zip"
    with open(path, "wb") as raw, zipfile.ZipFile(raw, "w", compression,
                                                  allowZip64=True) as zf:
        for entry in entries:
            ctx.checkpoint()
            with longpaths.at(entry.real) as real:  # the path may be past PATH_MAX
                info = zipfile.ZipInfo.from_file(real, entry.name, strict_timestamps=False)
            if entry.is_dir:
                zf.writestr(info, b"")
                continue
            info.compress_type = compression
            try:
                with longpaths.at(entry.real) as real:
                    src = open(real, "rb")
            except FileNotFoundError:
                raise JobFailed(ErrorCode.BAD_INPUT,
                                f"{entry.name!r} vanished from uploads/") from None
            with src, zf.open(info, "w", force_zip64=entry.size * 1.05 > _ZIP64_LIMIT) as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    done += len(chunk)
                    ctx.set_progress(done, total)
                    ctx.checkpoint()
            ctx.message = f"{done * 100 // max(total, 1)}% ({done} of {total} bytes)"
        ctx.message = f"{len(files)} files, {total} bytes"
    size = os.path.getsize(path)
    ctx.content = {"InstancesCount": len(files), "UncompressedSizeMB": total // (1 << 20),
                   "ArchiveSizeBytes": size, "Compression": ctx.spec["compression"]}
    ctx.log(f"archive.zip: {size} bytes")
