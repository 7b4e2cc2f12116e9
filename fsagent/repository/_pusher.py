"""The push: a fileset's objects to the store, resumable, verified, several in flight.

Design notes
------------
* **Concurrency.** Two limits over the whole agent (``CapacityLimiter``s; two
  imports running at once share them). ``repository.concurrency`` bounds requests
  with a large body (parts, single PUTs over ``SMALL_BODY``): they wait on bandwidth,
  and a multipart object fans its parts out to that limit, so one big file uses every
  slot; at most that many multipart objects are in progress at once.
  ``repository.small_concurrency`` (default 8) bounds the others (small PUTs, HEADs,
  listings): they wait on the store's latency, one round trip each, so more of them in
  flight keep a distant store busy. Each push runs the larger of the two as object
  workers. Requests block, so each runs in a worker thread of its limiter: a request
  waits on the network for seconds, and holding the agent's own ``worker_threads``
  (FUSE writes, hashing) that long would stall the mount. Reading a body and hashing
  it happens in the same thread as its request.
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
  The same probe object carries ``sha256`` metadata: the store must report it back,
  with the object's size and its MD5 as ETag, for ``confirm_by_listing``.
* **Every object is checked before the import succeeds.** A multipart object, and
  any object of a store that failed the probe, by its HEAD (``_push.check_object``:
  size, ``sha256`` metadata, the checksum where verified, an MD5-form ETag). A single
  PUT on a store that passed it is checked in two steps instead, for one listing per
  directory (of up to 1,000 keys a page) instead of one HEAD per object, which was
  half the requests of a fileset of small files (``_confirm``): (1) its answer: a 2xx,
  an MD5-form ETag equal to the MD5 of the bytes we read and sent (the store computed
  it over what it received), and a checksum, if the answer carries one, equal to the
  upload's verified SHA-256; where the store verifies checksums (probed: it refused a
  wrong one) the PUT carried that SHA-256, so its acceptance is the store's proof it
  received exactly the verified bytes. (2) Once a batch (``CONFIRM_BATCH``, and at the
  end of the push) is acknowledged, a ranged listing of their keys per directory
  (``list_range``): each key must be listed with the size pushed and that MD5 as
  ETag. That is what a HEAD proved: the object exists after the write, with the size
  and the MD5 of the bytes the store holds (the check fails, as the HEAD did, if the
  store's copy is other bytes or another size: ``test_an_object_the_store_holds_wrong``).
  Stricter than the HEAD alone: an object the store answered with an MD5 ETag must
  keep reporting that ETag (rclone's gateway lists a file removed under it from its
  cache, with an empty ETag; a HEAD held only MD5-form ETags to the MD5).
  What a HEAD showed besides is the metadata and the checksum the store reports; both
  came in the same signed request the store acknowledged, and the probe showed this
  store keeps metadata and reports it back (and the checksum where it verifies). A key
  the listing does not show (a store whose listings lag) and keys of a directory with
  fewer than ``LIST_AT_LEAST`` of them get their HEAD and the full check, the ETag
  held to the answer's. An object counts as done (``ObjectsDone``, its
  ``repo_objects`` row) only once checked.
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
    ObjectPlan, Part, Progress, b64, backoff_delay, check_listed, check_object,
    check_put_answer, composite_sha256, confirm_groups, effective_part_size, md5_etag,
    md5_matches_etag, multipart_etag, object_key, resume_parts, split_parts,
)
from ._s3 import RangeReader, StoreError, open_for_reading

__all__ = ["Pusher", "PushFailed", "PushJob"]

log = logging.getLogger(__name__)

SMALL_BODY = 2**20     # bodies up to this are read once into memory
READ_CHUNK = 2**20
MAX_DIGEST_RETRIES = 5  # a body that never matches its digest: the file keeps changing
MAX_UPLOAD_RESTARTS = 3  # a multipart upload the store forgot, started again this often
CONFIRM_BATCH = 1000   # single PUTs confirmed by a listing once this many wait (and at the end)
LIST_AT_LEAST = 3      # fewer objects under one prefix are HEADed, not listed


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


@dataclasses.dataclass
class _Unconfirmed:
    """A single PUT the store acknowledged as we sent it, not yet seen in a listing."""

    plan: ObjectPlan
    etag: str                 # as the store answered
    md5_hex: str              # what its ETag must be
    checksum: str | None      # the x-amz-checksum-sha256 sent (for a HEAD, if needed)


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


def _put_file(store, real: str, plan: ObjectPlan,
              checksums: bool) -> tuple[tuple[str, str | None], bytes]:
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


def _put_bytes(store, plan: ObjectPlan,
               checksums: bool) -> tuple[tuple[str, str | None], bytes]:
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
                 small_concurrency: int | None = None,
                 shutting_down: trio.Event | None = None):
        self.store = store
        self.db = db
        self.uploads_dir = uploads_dir
        self.prefix = prefix
        self.part_size = part_size
        self.concurrency = concurrency
        self.limiter = trio.CapacityLimiter(concurrency)   # parts, bodies over SMALL_BODY
        self.small_concurrency = small_concurrency or concurrency
        # Small bodies, HEADs, listings: latency-bound, so more of them in flight.
        self.small_limiter = trio.CapacityLimiter(self.small_concurrency)
        # Multipart objects in progress at once (their parts share ``limiter``).
        self.multipart_slots = trio.CapacityLimiter(concurrency)
        self.metrics = metrics
        self.target = target
        self.checksums: bool | None = None   # None until probed
        # Whether the store keeps the user metadata it is given and reports the MD5 of
        # a single PUT as its ETag (probed with the checksum): single PUTs are then
        # confirmed by a listing, not one HEAD each (see the design notes).
        self.confirm_by_listing: bool | None = None
        self._probe_lock = trio.Lock()
        self.last_error: str | None = None
        self.active: dict[str, Progress] = {}   # job ID -> progress of its running push
        # The cache (``_cache.py``): an evicted upload is fetched back before its bytes
        # are read for a push; it is told when objects were verified (it may evict).
        self.before_read: Callable[[str], Any] | None = None
        self.pushed: Callable[[], None] | None = None

    # -- one request, retried -------------------------------------------------------------

    async def _attempt(self, job: PushJob, what: str, fn: Callable, *args: Any,
                       upload_id: str | None = None, small: bool = False) -> Any:
        """``fn(*args)`` in a worker thread, retried while it fails transiently.
        ``upload_id``: the multipart upload it belongs to (NoSuchUpload: ``_UploadGone``);
        ``small``: a request without a large body (``small_limiter``)."""
        attempt = 0
        limiter = self.small_limiter if small else self.limiter
        while True:
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
            except StoreError as e:
                if e.kind == "permission" and await trio.to_thread.run_sync(
                        self.store.bucket_missing, limiter=self.small_limiter):
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
        """Whether the store verifies ``x-amz-checksum-sha256`` (found out once, with
        ``confirm_by_listing``)."""
        async with self._probe_lock:
            if self.checksums is None:
                self.checksums, self.confirm_by_listing = await self._probe(job)
                log.info("repository %s %s x-amz-checksum-sha256; single PUTs are "
                         "confirmed by %s", self.store.where,
                         "verifies" if self.checksums else "does not verify",
                         "listings" if self.confirm_by_listing else "one HEAD each")
            return self.checksums

    async def _probe(self, job: PushJob) -> tuple[bool, bool]:
        key = object_key(self.prefix, f".fsagent-probe-{secrets.token_hex(8)}")
        body = b"fsagent checksum probe\n"
        md5 = hashlib.md5(body).digest()
        wrong = b64(hashlib.sha256(b"not the body").digest())
        sha = hashlib.sha256(body).digest()
        right = b64(sha)
        metadata = {"sha256": sha.hex()}

        def put(checksum: str | None) -> bool:
            try:
                self.store.put_object(key, body, b64(md5), checksum, metadata)
                return True
            except StoreError as e:
                if e.kind in ("digest", "request"):
                    return False
                raise

        try:
            # A store that takes a body whose checksum is wrong does not verify it; one
            # that refuses the right one refuses the header itself. Either way the
            # objects go without it, and so does the probe's second PUT.
            verifies = not await self._attempt(job, "the checksum probe", put, wrong,
                                               small=True)
            if verifies and not await self._attempt(job, "the checksum probe", put, right,
                                                    small=True):
                verifies = False
            if not verifies and not await self._attempt(job, "the checksum probe", put,
                                                        None, small=True):
                raise PushFailed("request", f"{self.store.where} refused a small PUT (the "
                                 "checksum probe) with nothing but its Content-MD5")
            head = await self._attempt(job, "the checksum probe", self.store.head_object,
                                       key, small=True)
            if head is None:
                return False, False
            meta = {k.lower(): v for k, v in (head.get("metadata") or {}).items()}
            listable = (head["size"] == len(body) and meta.get("sha256") == sha.hex()
                        and md5_matches_etag(md5, head.get("etag") or ""))
            return verifies and head.get("checksum_sha256") == right, listable
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(self.store.delete_object, key,
                                                  limiter=self.small_limiter)
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
        unconfirmed: list[_Unconfirmed] = []
        workers = max(self.concurrency, self.small_concurrency)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(workers, len(todo))):
                    nursery.start_soon(self._worker, job, queue, checksums, uploads, parts,
                                       progress, etags, unconfirmed)
            await self._confirm(job, unconfirmed, progress, etags)
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

    async def _worker(self, job, queue, checksums, uploads, parts, progress, etags,
                      unconfirmed: list[_Unconfirmed]):
        for plan in queue:
            if plan.multipart(self.part_size):
                async with self.multipart_slots:
                    etag = await self._push_multipart(job, plan, checksums,
                                                      uploads.get(plan.key), parts, progress)
                self._verified(job, plan, etag, progress, etags)
                continue
            pending = await self._push_single(job, plan, checksums, progress)
            if isinstance(pending, str):
                self._verified(job, plan, pending, progress, etags)
                continue
            unconfirmed.append(pending)
            if len(unconfirmed) >= CONFIRM_BATCH:
                # Taken whole before the first await: no other worker confirms them too.
                batch = unconfirmed[:]
                del unconfirmed[:]
                await self._confirm(job, batch, progress, etags)

    def _verified(self, job: PushJob, plan: ObjectPlan, etag: str, progress: Progress,
                  etags: dict[str, str]) -> None:
        """``plan``'s object is in the store as pushed: counted, recorded (a re-run of
        the import skips it)."""
        etags[plan.key] = etag
        progress.objects_done += 1
        self.metrics.objects_pushed.inc()
        self.db.stage(("repo-object", self.target, plan.key), _UPSERT_OBJECT,
                      (self.target, plan.key, plan.sha256, plan.size, etag, plan.task,
                       job.job_id, time.time()))
        self._report(job, progress)

    async def _confirm(self, job: PushJob, batch: list[_Unconfirmed], progress: Progress,
                       etags: dict[str, str]) -> None:
        """Check single PUTs the store acknowledged (``_push_single``) against what it
        lists: per prefix, one ranged listing of their keys (size and ETag, the MD5 we
        sent); a key not listed, or under a prefix with only a few of them, by its own
        HEAD (the full ``check_object``). Raises ``PushFailed`` on the first mismatch."""
        if not batch:
            return
        by_key = {u.plan.key: u for u in batch}
        groups, single = confirm_groups(by_key, at_least=LIST_AT_LEAST)
        for prefix, keys in groups:
            listed = await self._attempt(
                job, f"listing {prefix or 'the bucket'}", self.store.list_range, prefix,
                keys[0], keys[-1], 2 + len(keys) // 500, small=True)
            for key in keys:
                u = by_key[key]
                entry = listed.get(key)
                if entry is None:
                    single.append(key)  # not listed (yet): its HEAD says
                    continue
                why = check_listed(entry, u.plan, expected_etag=u.md5_hex)
                if why is not None:
                    self.metrics.errors.labels("verify").inc()
                    raise PushFailed("verify", f"{self.store.where}: {key!r} does not match "
                                     f"what was sent: {why}")
                self._verified(job, u.plan, u.etag, progress, etags)
        for key in single:
            u = by_key[key]
            head = await self._verify(job, u.plan, u.md5_hex, u.checksum, etag_required=True)
            self._verified(job, u.plan, head.get("etag") or u.etag, progress, etags)

    def _report(self, job: PushJob, progress: Progress) -> None:
        job.content.update(progress.content())
        job.set_progress(progress.bytes_sent, progress.bytes_total + 1)
        job.message = (f"pushing: {progress.objects_done} of {progress.objects_total} "
                       f"objects, {progress.bytes_sent} of {progress.bytes_total} bytes")

    def _name(self, plan: ObjectPlan) -> str:
        return os.path.basename(plan.path or plan.key)

    async def _verify(self, job: PushJob, plan: ObjectPlan, expected_etag: str,
                      expected_checksum: str | None, etag_required: bool = False) -> dict:
        head = await self._attempt(job, f"checking {self._name(plan)}",
                                   self.store.head_object, plan.key, small=True)
        if head is None:
            raise PushFailed("verify", f"{self.store.where}: {plan.key!r} is missing right "
                             "after it was stored")
        why = check_object(head, plan, expected_etag=expected_etag,
                           expected_checksum=expected_checksum, etag_required=etag_required)
        if why is not None:
            self.metrics.errors.labels("verify").inc()
            raise PushFailed("verify", f"{self.store.where}: {plan.key!r} does not match "
                             f"what was sent: {why}")
        return head

    async def _push_single(self, job, plan: ObjectPlan, checksums: bool,
                           progress: Progress) -> str | _Unconfirmed:
        """One PUT: the ETag of the object, verified by its HEAD, or (a store that
        ``confirm_by_listing``) what ``_confirm`` checks it against later."""
        name = self._name(plan)
        small = plan.size <= SMALL_BODY
        if plan.path is None:
            (etag, echoed), md5 = await self._attempt(job, f"{name}", _put_bytes, self.store,
                                                      plan, checksums, small=small)
        else:
            real = str(self.uploads_dir / plan.path)
            (etag, echoed), md5 = await self._attempt(job, f"{name}", _put_file, self.store,
                                                      real, plan, checksums, small=small)
        self.metrics.bytes_pushed.inc(plan.size)
        progress.bytes_sent += plan.size
        expected = b64(bytes.fromhex(plan.sha256)) if checksums else None
        why = check_put_answer(etag, echoed, expected_etag=md5.hex(),
                               expected_checksum=expected)
        if why is not None:
            self.metrics.errors.labels("verify").inc()
            raise PushFailed("verify", f"{self.store.where}: {plan.key!r} does not match "
                             f"what was sent: {why}")
        if self.confirm_by_listing and md5_etag(etag):
            self._report(job, progress)
            return _Unconfirmed(plan, etag, md5.hex(), expected)
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
