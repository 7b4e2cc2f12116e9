"""The push: a fileset's objects to the store, resumable, verified, several in flight.

Design notes
------------
* **Concurrency.** ``repository.concurrency`` bounds the requests in flight over the
  whole agent (one ``CapacityLimiter``; two imports running at once share it). Each
  push runs that many object workers; a multipart object fans its parts out to the
  same limit, so one big file uses every slot and a thousand small ones do too.
  Requests block, so each runs in a worker thread of that limiter: a request waits on
  the network for seconds, and holding the agent's own ``worker_threads`` (FUSE
  writes, hashing) that long would stall the mount. Reading a body and hashing it
  happens in the same thread as its request.
* **One pass over the bytes we must hash, none we need not.** A single PUT carries
  the upload's verified SHA-256 as ``x-amz-checksum-sha256`` (where the store verifies
  it), so the store proves it received exactly the verified bytes without us hashing
  them again; its Content-MD5 is computed in one read, then the body is streamed
  (``RangeReader``) from the page cache. A part needs its own MD5 (and SHA-256 where
  checksums are verified): one read to hash, one to send, never the part in memory
  (small bodies, up to 1 MiB, are read once into memory).
* **Durable state** (``repo_uploads``, ``repo_parts``, ``repo_objects`` in the
  database). A multipart upload's ID is flushed before its first part is sent, so a
  crash never forgets an upload whose parts are on the server. A part's record (ETag,
  MD5, SHA-256) and an object's verification are staged (written by the periodic
  flush): losing the last few to a crash costs nothing, because a resumed upload asks
  the server (ListParts) and checks an unrecorded part by its local MD5 instead of
  sending it again (``_push.resume_parts``). A verified object's row lets a re-run of
  the import skip it.
* **Failures.** ``StoreError.transient`` ones are retried with capped exponential
  backoff, for as long as the job runs, each attempt shown in the job's message
  (``retrying part 7 of big.tif (attempt 3): connection refused``) and counted; the
  others (credentials, missing bucket, permission, a refused request) end the push at
  once with ``PushFailed`` and a description naming the store. A multipart upload the
  store no longer knows (a store that keeps them in memory, restarted) starts again:
  there is nothing on the server to resume.
* **Checksum probe.** Whether the store verifies ``x-amz-checksum-sha256`` is found
  out once per run, by putting a small probe object with a wrong checksum (a store
  that verifies refuses it) and then a right one (it must report it back); the
  probe is deleted. A store that accepts the wrong one does not verify, so the header
  is not sent and objects are held to Content-MD5, size, ETag and metadata instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio

from ._push import (
    ObjectPlan, Part, Progress, b64, backoff_delay, check_object, composite_sha256,
    effective_part_size, md5_matches_etag, multipart_etag, object_key, resume_parts,
    split_parts,
)
from ._s3 import RangeReader, StoreError, open_for_reading

__all__ = ["Pusher", "PushFailed", "PushJob"]

log = logging.getLogger(__name__)

SMALL_BODY = 2**20     # bodies up to this are read once into memory
READ_CHUNK = 2**20
MAX_DIGEST_RETRIES = 5  # a body that never matches its digest: the file keeps changing
MAX_UPLOAD_RESTARTS = 3  # a multipart upload the store forgot, started again this often


class PushFailed(Exception):
    """The push cannot succeed by trying again: the job fails with this description."""

    def __init__(self, kind: str, description: str):
        super().__init__(description)
        self.kind = kind
        self.description = description


class _UploadGone(Exception):
    """The store does not know the multipart upload any more (NoSuchUpload)."""

    def __init__(self, upload_id: str):
        super().__init__(upload_id)
        self.upload_id = upload_id


class PushJob(Protocol):
    """What a push needs of the job it runs for (the import's ``RunContext``)."""

    job_id: str
    message: str
    content: dict[str, Any]

    def log(self, line: str) -> None: ...
    def set_progress(self, done: int, total: int) -> None: ...


@dataclasses.dataclass
class PushMetrics:
    bytes_pushed: Any
    objects_pushed: Any
    errors: Any      # labelled by kind
    retries: Any


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """What ends a nursery of workers: the first error that is not a cancellation (the
    others were cancelled because of it), so callers see a ``PushFailed``, not a group."""
    leaves, stack = [], [group]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack[:0] = list(e.exceptions)
        else:
            leaves.append(e)
    for e in leaves:
        if not isinstance(e, trio.Cancelled):
            return e
    return group


# -- blocking work (worker threads) ---------------------------------------------------------


def _hash_range(fd: int, offset: int, size: int, want_sha: bool,
                keep: bool) -> tuple[bytes, bytes | None, bytes | None]:
    """(MD5, SHA-256 or None, the bytes if ``keep``) of ``size`` bytes from ``offset``."""
    md5 = hashlib.md5()
    sha = hashlib.sha256() if want_sha else None
    kept = bytearray() if keep else None
    pos, end = offset, offset + size
    while pos < end:
        chunk = os.pread(fd, min(READ_CHUNK, end - pos), pos)
        if not chunk:
            raise OSError(5, "the file is shorter than when its push began")
        md5.update(chunk)
        if sha is not None:
            sha.update(chunk)
        if kept is not None:
            kept += chunk
        pos += len(chunk)
    return md5.digest(), (sha.digest() if sha else None), (bytes(kept) if keep else None)


def _put_file(store, real: str, plan: ObjectPlan, checksums: bool) -> tuple[str, bytes]:
    """PUT one file as one object; (ETag, MD5)."""
    fd = open_for_reading(real)
    try:
        small = plan.size <= SMALL_BODY
        md5, _, data = _hash_range(fd, 0, plan.size, False, small)
        body = data if small else RangeReader(fd, 0, plan.size)
        sha = b64(bytes.fromhex(plan.sha256)) if checksums else None
        return store.put_object(plan.key, body, b64(md5), sha, plan.metadata), md5
    finally:
        os.close(fd)


def _put_bytes(store, plan: ObjectPlan, checksums: bool) -> tuple[str, bytes]:
    md5 = hashlib.md5(plan.body).digest()
    sha = b64(hashlib.sha256(plan.body).digest()) if checksums else None
    return store.put_object(plan.key, plan.body, b64(md5), sha, plan.metadata), md5


def _send_part(store, real: str, key: str, upload_id: str, part: Part,
               checksums: bool) -> tuple[str, bytes, bytes | None]:
    """Upload one part; (ETag, MD5, SHA-256 or None)."""
    fd = open_for_reading(real)
    try:
        md5, sha, _ = _hash_range(fd, part.offset, part.size, checksums, False)
        etag = store.upload_part(key, upload_id, part.number,
                                 RangeReader(fd, part.offset, part.size), b64(md5),
                                 b64(sha) if sha else None)
        return etag, md5, sha
    finally:
        os.close(fd)


def _hash_part(real: str, part: Part) -> tuple[bytes, bytes]:
    fd = open_for_reading(real)
    try:
        md5, sha, _ = _hash_range(fd, part.offset, part.size, True, False)
        return md5, sha
    finally:
        os.close(fd)


# -- database (worker thread, via Database.run) ------------------------------------------------

_UPSERT_UPLOAD = ("INSERT OR REPLACE INTO repo_uploads (target, key, sha256, size, part_size, "
                  "upload_id, checksums, job_id, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_UPSERT_PART = ("INSERT OR REPLACE INTO repo_parts (upload_id, number, size, etag, md5, "
                "sha256) VALUES (?, ?, ?, ?, ?, ?)")
_UPSERT_OBJECT = ("INSERT OR REPLACE INTO repo_objects (target, key, sha256, size, etag, task, "
                  "job_id, verified) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_DELETE_UPLOAD = "DELETE FROM repo_uploads WHERE target = ? AND key = ?"
_DELETE_PARTS = "DELETE FROM repo_parts WHERE upload_id = ?"


def _load_state(conn, target: str, keys: list[str]) -> tuple[dict, dict, dict]:
    """(verified objects key -> (sha256, size), uploads key -> row, parts upload_id ->
    {number: (size, etag, md5, sha256)}) for ``keys``."""
    verified, uploads, parts = {}, {}, {}
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        marks = ",".join("?" * len(chunk))
        for key, sha, size in conn.execute(
                f"SELECT key, sha256, size FROM repo_objects WHERE target = ? AND key IN "
                f"({marks})", (target, *chunk)):
            verified[key] = (sha, size)
        for key, sha, size, part_size, upload_id, checksums in conn.execute(
                f"SELECT key, sha256, size, part_size, upload_id, checksums FROM repo_uploads "
                f"WHERE target = ? AND key IN ({marks})", (target, *chunk)):
            uploads[key] = (sha, size, part_size, upload_id, bool(checksums))
    for _, _, _, upload_id, _ in uploads.values():
        parts[upload_id] = {n: (size, etag, md5, sha) for n, size, etag, md5, sha in
                            conn.execute("SELECT number, size, etag, md5, sha256 FROM "
                                         "repo_parts WHERE upload_id = ?", (upload_id,))}
    return verified, uploads, parts


# -- the pusher ---------------------------------------------------------------------------------


class Pusher:
    """Pushes objects to one store for every import of the agent."""

    def __init__(self, *, store, db, uploads_dir, prefix: str, part_size: int,
                 concurrency: int, metrics: PushMetrics, target: str,
                 shutting_down: trio.Event | None = None):
        self.store = store
        self.db = db
        self.uploads_dir = uploads_dir
        self.prefix = prefix
        self.part_size = part_size
        self.concurrency = concurrency
        self.limiter = trio.CapacityLimiter(concurrency)
        self.metrics = metrics
        self.target = target
        self.checksums: bool | None = None   # None until probed
        self._probe_lock = trio.Lock()
        self.last_error: str | None = None
        self.active: dict[str, Progress] = {}   # job ID -> progress of its running push
        # The cache (``_cache.py``): an evicted upload is fetched back before its bytes
        # are read for a push; it is told when objects were verified (it may evict).
        self.before_read: Callable[[str], Any] | None = None
        self.pushed: Callable[[], None] | None = None

    # -- one request, retried -------------------------------------------------------------

    async def _attempt(self, job: PushJob, what: str, fn: Callable, *args: Any,
                       upload_id: str | None = None) -> Any:
        """``fn(*args)`` in a worker thread, retried while it fails transiently.
        ``upload_id``: the multipart upload it belongs to (NoSuchUpload: ``_UploadGone``)."""
        attempt = 0
        while True:
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
            except StoreError as e:
                if e.kind == "permission" and await trio.to_thread.run_sync(
                        self.store.bucket_missing, limiter=self.limiter):
                    e = StoreError("bucket", False, f"{self.store.where}: the bucket does not "
                                   f"exist (NoSuchBucket; the store answered {e.code}); "
                                   "create it or fix repository.bucket", "NoSuchBucket")
                self.metrics.errors.labels(e.kind).inc()
                self.last_error = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {what}: {e}"
                if upload_id is not None and e.code == "NoSuchUpload":
                    raise _UploadGone(upload_id) from None
                if not e.transient or (e.kind == "digest" and attempt >= MAX_DIGEST_RETRIES):
                    raise PushFailed(e.kind, str(e)) from None
                attempt += 1
                self.metrics.retries.inc()
                progress = self.active.get(job.job_id)
                if progress is not None:
                    progress.retries += 1
                job.message = f"retrying {what} (attempt {attempt + 1}): {e}"
                job.log(job.message)
                await trio.sleep(backoff_delay(attempt))

    # -- the checksum probe ---------------------------------------------------------------

    async def probe(self, job: PushJob) -> bool:
        """Whether the store verifies ``x-amz-checksum-sha256`` (found out once)."""
        async with self._probe_lock:
            if self.checksums is None:
                self.checksums = await self._probe(job)
                log.info("repository %s %s x-amz-checksum-sha256", self.store.where,
                         "verifies" if self.checksums else "does not verify")
            return self.checksums

    async def _probe(self, job: PushJob) -> bool:
        key = object_key(self.prefix, f".fsagent-probe-{secrets.token_hex(8)}")
        body = b"fsagent checksum probe\n"
        md5 = b64(hashlib.md5(body).digest())
        wrong = b64(hashlib.sha256(b"not the body").digest())
        right = b64(hashlib.sha256(body).digest())

        def put(sha: str) -> bool:
            try:
                self.store.put_object(key, body, md5, sha, {})
                return True
            except StoreError as e:
                if e.kind in ("digest", "request"):
                    return False
                raise

        try:
            if await self._attempt(job, "the checksum probe", put, wrong):
                return False  # it took a body whose checksum is wrong: no verification
            if not await self._attempt(job, "the checksum probe", put, right):
                return False  # it refuses the header itself
            head = await self._attempt(job, "the checksum probe", self.store.head_object, key)
            return head is not None and head.get("checksum_sha256") == right
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(self.store.delete_object, key,
                                                  limiter=self.limiter)
                except StoreError:
                    pass  # a probe object left behind is harmless; the next probe replaces it

    # -- a push ---------------------------------------------------------------------------------

    async def push(self, job: PushJob, objects: list[ObjectPlan],
                   progress: Progress | None = None) -> dict[str, str]:
        """Push and verify ``objects``; key -> the ETag the store reports. Raises
        ``PushFailed`` (the job fails) or is cancelled (paused, cancelled, stopping).
        ``progress`` accumulates over the calls of one job run."""
        checksums = await self.probe(job)
        verified, uploads, parts = await self.db.run(
            _load_state, self.target, [o.key for o in objects])
        progress = progress if progress is not None else Progress()
        progress.objects_total += len(objects)
        progress.bytes_total += sum(o.size for o in objects)
        for o in objects:
            if o.multipart(self.part_size):
                progress.parts_total += len(split_parts(
                    o.size, effective_part_size(o.size, self.part_size)))
        self.active[job.job_id] = progress
        etags: dict[str, str] = {}
        todo: list[ObjectPlan] = []
        for o in objects:
            if verified.get(o.key) == (o.sha256, o.size) and o.path is not None:
                progress.objects_done += 1
                progress.bytes_sent += o.size
                if o.multipart(self.part_size):
                    progress.parts_done += len(split_parts(
                        o.size, effective_part_size(o.size, self.part_size)))
                etags[o.key] = ""
            else:
                todo.append(o)
        if len(todo) < len(objects):
            job.log(f"{len(objects) - len(todo)} of {len(objects)} objects were verified "
                    "in the store by an earlier run; not sent again")
        self._report(job, progress)
        if self.before_read is not None:
            for o in todo:
                if o.path is not None and o.task is not None:
                    await self.before_read(o.task)
        queue = iter(todo)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(self.concurrency, len(todo))):
                    nursery.start_soon(self._worker, job, queue, checksums, uploads, parts,
                                       progress, etags)
        except BaseExceptionGroup as group:
            first = _first_error(group)
            if first is group:
                raise
            raise first from None
        finally:
            self.active.pop(job.job_id, None)
        job.content.update(progress.content())
        if self.pushed is not None:
            self.pushed()
        return etags

    async def _worker(self, job, queue, checksums, uploads, parts, progress, etags):
        for plan in queue:
            if plan.multipart(self.part_size):
                etag = await self._push_multipart(job, plan, checksums, uploads.get(plan.key),
                                                  parts, progress)
            else:
                etag = await self._push_single(job, plan, checksums, progress)
            etags[plan.key] = etag
            progress.objects_done += 1
            self.metrics.objects_pushed.inc()
            self.db.stage(("repo-object", self.target, plan.key), _UPSERT_OBJECT,
                          (self.target, plan.key, plan.sha256, plan.size, etag, plan.task,
                           job.job_id, time.time()))
            self._report(job, progress)

    def _report(self, job: PushJob, progress: Progress) -> None:
        job.content.update(progress.content())
        job.set_progress(progress.bytes_sent, progress.bytes_total + 1)
        job.message = (f"pushing: {progress.objects_done} of {progress.objects_total} "
                       f"objects, {progress.bytes_sent} of {progress.bytes_total} bytes")

    def _name(self, plan: ObjectPlan) -> str:
        return os.path.basename(plan.path or plan.key)

    async def _verify(self, job: PushJob, plan: ObjectPlan, expected_etag: str,
                      expected_checksum: str | None) -> dict:
        head = await self._attempt(job, f"checking {self._name(plan)}",
                                   self.store.head_object, plan.key)
        if head is None:
            raise PushFailed("verify", f"{self.store.where}: {plan.key!r} is missing right "
                             "after it was stored")
        why = check_object(head, plan, expected_etag=expected_etag,
                           expected_checksum=expected_checksum)
        if why is not None:
            self.metrics.errors.labels("verify").inc()
            raise PushFailed("verify", f"{self.store.where}: {plan.key!r} does not match "
                             f"what was sent: {why}")
        return head

    async def _push_single(self, job, plan: ObjectPlan, checksums: bool,
                           progress: Progress) -> str:
        name = self._name(plan)
        if plan.path is None:
            etag, md5 = await self._attempt(job, f"{name}", _put_bytes, self.store, plan,
                                            checksums)
        else:
            real = str(self.uploads_dir / plan.path)
            etag, md5 = await self._attempt(job, f"{name}", _put_file, self.store, real, plan,
                                            checksums)
        self.metrics.bytes_pushed.inc(plan.size)
        progress.bytes_sent += plan.size
        expected = b64(bytes.fromhex(plan.sha256)) if checksums else None
        head = await self._verify(job, plan, md5.hex(), expected)
        return head.get("etag") or etag

    async def _push_multipart(self, job, plan: ObjectPlan, checksums: bool,
                              recorded_upload, parts_by_upload, progress: Progress) -> str:
        for _ in range(MAX_UPLOAD_RESTARTS):
            counted = [0, 0]   # parts, bytes this attempt added to the progress
            try:
                return await self._push_multipart_once(job, plan, checksums, recorded_upload,
                                                       parts_by_upload, progress, counted)
            except _UploadGone as gone:
                # A store that keeps multipart uploads in memory forgets them when it
                # restarts: nothing is left to resume, so the object starts again.
                job.log(f"{self._name(plan)}: the store no longer has multipart upload "
                        f"{gone.upload_id[:16]}...; starting it again")
                await self._forget_upload(job, plan.key, gone.upload_id, abort=False)
                recorded_upload = None
                progress.parts_done -= counted[0]
                progress.bytes_sent -= counted[1]
        raise PushFailed("request", f"{self.store.where}: the multipart upload of "
                         f"{plan.key!r} vanished {MAX_UPLOAD_RESTARTS} times")

    async def _push_multipart_once(self, job, plan: ObjectPlan, checksums: bool,
                                   recorded_upload, parts_by_upload, progress: Progress,
                                   counted: list[int]) -> str:
        name = self._name(plan)
        real = str(self.uploads_dir / plan.path)
        part_size = effective_part_size(plan.size, self.part_size)
        upload_id = None
        done: dict[int, tuple[str, bytes, bytes | None]] = {}  # number -> etag, md5, sha
        if recorded_upload is not None:
            sha, size, rec_part_size, rec_id, rec_checksums = recorded_upload
            if (sha, size) == (plan.sha256, plan.size) and rec_checksums == checksums:
                part_size = rec_part_size
                upload_id = rec_id
            else:
                await self._forget_upload(job, plan.key, rec_id, abort=True)
        parts = split_parts(plan.size, part_size)
        by_number = {p.number: p for p in parts}
        if upload_id is not None:
            listed = await self._attempt(job, f"the parts of {name}", self.store.list_parts,
                                         plan.key, upload_id)
            if listed is None:
                job.log(f"{name}: the store no longer has multipart upload "
                        f"{upload_id[:16]}...; starting it again")
                await self._forget_upload(job, plan.key, upload_id, abort=False)
                upload_id = None
            else:
                recorded = parts_by_upload.get(upload_id, {})
                decision = resume_parts(parts, {n: (r[0], r[1]) for n, r in recorded.items()},
                                        listed)
                for n, etag in decision.done.items():
                    r = recorded[n]
                    sha = bytes.fromhex(r[3]) if r[3] else None
                    if checksums and sha is None:
                        sha = (await self._attempt(job, f"part {n} of {name}", _hash_part,
                                                   real, by_number[n]))[1]
                    done[n] = (etag, bytes.fromhex(r[2]), sha)
                for n, etag in decision.check_locally.items():
                    md5, sha = await trio.to_thread.run_sync(_hash_part, real, by_number[n],
                                                             limiter=self.limiter)
                    if md5_matches_etag(md5, etag):
                        done[n] = (etag, md5, sha)
                        self._stage_part(upload_id, by_number[n], etag, md5, sha)
                if done:
                    job.log(f"{name}: resuming multipart upload; {len(done)} of "
                            f"{len(parts)} parts are on the server already")
        if upload_id is None:
            # An upload begun for this key that we hold no record of: the agent died
            # between the store's answer to CreateMultipartUpload and the record. Nobody
            # will resume or complete it, and the store keeps (and bills) its parts.
            try:
                unrecorded = await self._attempt(job, f"listing the uploads of {name}",
                                                 self.store.unfinished_uploads, plan.key)
            except PushFailed as e:  # a store without ListMultipartUploads: push anyway
                job.log(f"{name}: cannot list its unfinished uploads ({e.description})")
                unrecorded = []
            for stale in unrecorded:
                job.log(f"{name}: aborting multipart upload {stale[:16]}..., begun but "
                        "never recorded")
                await self._forget_upload(job, plan.key, stale, abort=True)
            upload_id = await self._attempt(job, f"starting {name}",
                                            self.store.create_multipart, plan.key,
                                            plan.metadata, checksums)
            self.db.stage(("repo-upload", self.target, plan.key), _UPSERT_UPLOAD,
                          (self.target, plan.key, plan.sha256, plan.size, part_size,
                           upload_id, int(checksums), job.job_id, time.time()))
            # Durable before any part is sent: a crash must not forget parts on the server.
            await self.db.flush()
        for n in done:
            progress.parts_done += 1
            progress.bytes_sent += by_number[n].size
            counted[0] += 1
            counted[1] += by_number[n].size
        self._report(job, progress)

        async def send(part: Part) -> None:
            etag, md5, sha = await self._attempt(
                job, f"part {part.number} of {name}", _send_part, self.store, real, plan.key,
                upload_id, part, checksums, upload_id=upload_id)
            done[part.number] = (etag, md5, sha)
            self._stage_part(upload_id, part, etag, md5, sha)
            self.metrics.bytes_pushed.inc(part.size)
            progress.parts_done += 1
            progress.bytes_sent += part.size
            counted[0] += 1
            counted[1] += part.size
            self._report(job, progress)

        todo = iter([p for p in parts if p.number not in done])

        async def part_worker() -> None:
            for part in todo:
                await send(part)

        # ``concurrency`` workers per file (the limiter bounds the agent's requests):
        # no task per part for a file of thousands of parts.
        try:
            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(self.concurrency):
                        nursery.start_soon(part_worker)
            except BaseExceptionGroup as group:
                first = _first_error(group)
                if first is group:
                    raise
                raise first from None
        except OSError:
            # The file could not be read: removed or renamed away mid-push. Nothing will
            # resume this upload (a renamed file is pushed at its new key), and a store
            # keeps the parts of an unfinished upload (and bills them): it goes.
            await self._forget_upload(job, plan.key, upload_id, abort=True)
            raise
        ordered = [(n, *done[n]) for n in sorted(done)]
        listing = [(n, etag, b64(sha) if (checksums and sha) else None)
                   for n, etag, _, sha in ordered]
        expected_etag = multipart_etag(md5 for _, _, md5, _ in ordered)
        expected_checksum = (composite_sha256(sha for _, _, _, sha in ordered)
                             if checksums else None)
        try:
            await self._attempt(job, f"completing {name}", self.store.complete_multipart,
                                plan.key, upload_id, listing, upload_id=upload_id)
        except _UploadGone:
            # A completion the store carried out but whose answer was lost is retried
            # into NoSuchUpload: the object itself says whether it is there.
            head = await self._attempt(job, f"checking {name}", self.store.head_object,
                                       plan.key)
            if head is None or check_object(head, plan, expected_etag=expected_etag,
                                            expected_checksum=expected_checksum):
                raise
        head = await self._verify(job, plan, expected_etag, expected_checksum)
        self.db.stage(("repo-upload", self.target, plan.key), _DELETE_UPLOAD,
                      (self.target, plan.key))
        self.db.stage(("repo-parts", upload_id), _DELETE_PARTS, (upload_id,))
        return head.get("etag", "")

    def _stage_part(self, upload_id: str, part: Part, etag: str, md5: bytes,
                    sha: bytes | None) -> None:
        self.db.stage(("repo-part", upload_id, part.number), _UPSERT_PART,
                      (upload_id, part.number, part.size, etag, md5.hex(),
                       sha.hex() if sha else None))

    async def _forget_upload(self, job, key: str, upload_id: str, *, abort: bool) -> None:
        if abort:
            try:
                await trio.to_thread.run_sync(self.store.abort_multipart, key, upload_id,
                                              limiter=self.limiter)
            except StoreError as e:
                job.log(f"could not abort the old multipart upload of {key!r}: {e}")
        self.db.stage(("repo-upload", self.target, key), _DELETE_UPLOAD, (self.target, key))
        self.db.stage(("repo-parts", upload_id), _DELETE_PARTS, (upload_id,))

    async def delete(self, job: PushJob, key: str) -> None:
        """Remove an object pushed for a version that changed meanwhile."""
        await self._attempt(job, f"removing {key}", self.store.delete_object, key)
        self.db.stage(("repo-object", self.target, key),
                      "DELETE FROM repo_objects WHERE target = ? AND key = ?",
                      (self.target, key))
