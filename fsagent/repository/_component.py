"""``RepositoryComponent``: the repository backend the imports push to, its status and
metrics.

Design notes
------------
* **Backends behind one contract** (S3QL style). ``repository.backend = "local"`` is
  today's behaviour: the import records the fileset in the manifest and the data stays
  in the state directory; ``push`` is never called (``host.repository`` is None).
  ``"s3"`` adds the object store: ``S3Store`` (``_s3.py``) is the adapter, ``Pusher``
  (``_pusher.py``) the resumable push, ``_push.py`` the plan. Another store (a second
  adapter with the same methods as ``S3Store``) changes nothing above the adapter.
* **The import asks, the repository pushes.** The ``import`` kind hands its members to
  ``push_fileset`` after it found where each upload is now and before it records them
  in the manifest, so an import succeeds only once every object is verified in the
  store; a failed push records nothing and stays retryable.
* **Backlog** (``status``, ``fsagent_repository_waiting_*``): files and bytes of
  import jobs that have not finished (pending, paused, running), less what a running
  push has verified; the sums of a job's spec are kept per job (a spec never changes),
  so a status read costs one pass over the unfinished imports, no I/O. Imports that
  failed are counted apart (``failed_files``): their data waits for a ``retry``.
  Uploads still being collected into a fileset are under ``uploads`` (``collecting``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Any

import trio

from ..component import Component, Host
from ..config import read_credentials
from ._cache import Cache
from ._push import ObjectPlan, Progress, fileset_key, object_key, object_metadata
from ._pusher import Pusher, PushFailed, PushMetrics
from ._s3 import S3Store

__all__ = ["RepositoryComponent"]

log = logging.getLogger(__name__)
# botocore and urllib3 log every request, headers included, at debug: far too much at
# the agent's debug level, and a signed request is nothing a journal should keep.
for _noisy in ("botocore", "urllib3"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


class RepositoryComponent(Component):
    name = "repository"

    def __init__(self, agent: Host):
        super().__init__(agent)
        cfg = agent.config
        self.backend = cfg.repository_backend
        m = agent.metrics
        self.metrics = PushMetrics(
            bytes_pushed=m.counter("fsagent_repository_pushed_bytes_total",
                                   "Bytes the repository's store acknowledged (objects and "
                                   "parts)"),
            objects_pushed=m.counter("fsagent_repository_objects_pushed_total",
                                     "Objects pushed and verified in the store"),
            errors=m.counter("fsagent_repository_push_errors_total",
                             "Failed requests to the store, by kind", labels=("kind",)),
            retries=m.counter("fsagent_repository_retries_total",
                              "Requests to the store tried again after a transient error"),
        )
        m.gauge("fsagent_repository_waiting_files", "Files of unfinished imports not yet "
                "verified in the store", collect=lambda: self.backlog()[0])
        m.gauge("fsagent_repository_waiting_bytes", "Bytes of unfinished imports not yet "
                "verified in the store", collect=lambda: self.backlog()[1])
        cache_metrics = {
            "evictions": m.counter("fsagent_repository_evictions_total",
                                   "Local copies of verified uploads evicted (read back "
                                   "from the store from then on)"),
            "fetched_back": m.counter("fsagent_repository_fetched_back_total",
                                      "Evicted uploads fetched back whole before a "
                                      "write"),
            "read_back": m.counter("fsagent_repository_read_back_bytes_total",
                                   "Bytes of evicted uploads read back from the store"),
            "deleted": m.counter("fsagent_repository_objects_deleted_total",
                                 "Objects deleted (or moved under deleted/) because "
                                 "their file was removed from uploads/"),
            "delete_errors": m.counter("fsagent_repository_delete_errors_total",
                                       "Failed deletes of removed files' objects "
                                       "(tried again later)"),
        }
        self._spec_sums: dict[str, tuple[int, int]] = {}
        self.pusher: Pusher | None = None
        self.cache: Cache | None = None
        if self.backend == "s3":
            store = S3Store(endpoint=cfg.repository_endpoint, bucket=cfg.repository_bucket,
                            region=cfg.repository_region,
                            path_style=cfg.repository_path_style,
                            credentials=read_credentials(cfg.repository_credentials_file),
                            concurrency=cfg.repository_concurrency
                            + cfg.repository_small_concurrency,
                            ca_file=(None if cfg.repository_ca_file is None
                                     else str(cfg.repository_ca_file)))
            target = f"{cfg.repository_endpoint or 'aws:' + cfg.repository_region}/" \
                     f"{cfg.repository_bucket}"
            self.pusher = Pusher(store=store, db=agent.db, uploads_dir=cfg.uploads_dir,
                                 prefix=cfg.repository_prefix,
                                 part_size=cfg.repository_part_size,
                                 concurrency=cfg.repository_concurrency,
                                 small_concurrency=cfg.repository_small_concurrency,
                                 metrics=self.metrics, target=target)
            self.cache = Cache(host=agent, store=store, target=target,
                               prefix=cfg.repository_prefix,
                               cache_bytes=cfg.repository_cache_bytes,
                               free_floor=cfg.repository_cache_free_floor_bytes,
                               keep_deleted=cfg.repository_keep_deleted,
                               concurrency=cfg.repository_concurrency,
                               metrics=cache_metrics)
            self.pusher.before_read = self.cache.ensure_local
            self.pusher.pushed = self.cache.wake
        cache_status = (lambda key: 0) if self.cache is None else \
            (lambda key: self.cache.status()[key])
        m.gauge("fsagent_repository_cache_bytes", "Bytes of local copies of uploads "
                "verified in the store (evictable)", collect=lambda: cache_status("local_bytes"))
        m.gauge("fsagent_repository_evicted_bytes", "Bytes of uploads evicted from the local "
                "disk (read back from the store)", collect=lambda: cache_status("evicted_bytes"))
        m.gauge("fsagent_repository_evicted_files", "Uploads evicted from the local disk",
                collect=lambda: cache_status("evicted_files"))

    # -- what the import kind calls ------------------------------------------------------

    @property
    def pushes(self) -> bool:
        return self.pusher is not None

    async def push_fileset(self, job, members: list[tuple[list, str, int]], *,
                           fileset: bool, root: str | None = None,
                           listing: bytes | None = None) -> dict[str, str]:
        """Push ``members`` (``([task, path, size, sha256, mtime_ns], path now,
        mtime_ns)``) and, for a fileset, its ``listing`` (``fileset.json``, under
        ``root``) beside them; ``fileset``: their metadata names the job as their
        fileset. Returns path -> object key. Raises ``PushFailed``."""
        prefix = self.agent.config.repository_prefix
        fileset = job.job_id if fileset else None
        plans, keys = [], {}
        for m, path, mtime_ns in members:
            key = object_key(prefix, path)
            keys[path] = key
            plans.append(ObjectPlan(key=key, path=path, size=m[2], sha256=m[3], task=m[0],
                                    metadata=object_metadata(m[3], mtime_ns, m[0], fileset)))
        if listing is not None:
            sha = hashlib.sha256(listing).hexdigest()
            for key in (fileset_key(prefix, root or "", job.job_id),
                        fileset_key(prefix, root or "", None)):
                plans.append(ObjectPlan(key=key, path=None, size=len(listing), sha256=sha,
                                        body=listing,
                                        metadata=object_metadata(sha, None, None, fileset)))
        # One progress record per job run, over every call (members, then the listing).
        progress = getattr(job, "repository_progress", None)
        if progress is None:
            progress = job.repository_progress = Progress()
        await self.pusher.push(job, plans, progress)
        return keys

    def key_for(self, path: str) -> str:
        """The object key of the upload at ``path`` (relative to uploads/)."""
        return object_key(self.agent.config.repository_prefix, path)

    def describe(self) -> dict[str, Any]:
        """Where objects go, for ``fileset.json``."""
        cfg = self.agent.config
        return {"endpoint": cfg.repository_endpoint, "bucket": cfg.repository_bucket,
                "prefix": cfg.repository_prefix}

    def local_copies(self, paths: list[str]):
        """``async with``: the backing files of ``paths`` are whole (evicted ones fetched
        back) and stay so until the block ends (``Cache.local_copies``)."""
        if self.cache is None:
            return contextlib.nullcontext()
        return self.cache.local_copies(paths)

    async def remove_objects(self, job, keys: list[str]) -> None:
        for key in keys:
            await self.pusher.delete(job, key)

    # -- status and metrics --------------------------------------------------------------

    def _unfinished_imports(self) -> list[tuple[str, str, dict]]:
        jobs = self.agent.jobs
        if jobs is None or not hasattr(jobs, "unfinished_imports"):
            return []
        return jobs.unfinished_imports()

    def _sums(self, job_id: str, spec: dict) -> tuple[int, int]:
        sums = self._spec_sums.get(job_id)
        if sums is None:
            files = spec.get("files") or [[spec.get("task"), spec.get("path"),
                                           spec.get("size", 0), None, None]]
            sums = (len(files), sum(int(f[2] or 0) for f in files))
            self._spec_sums[job_id] = sums
        return sums

    def backlog(self) -> tuple[int, int, int, int]:
        """(files, bytes) waiting to be pushed, and (files, bytes) of failed imports."""
        if self.pusher is None:
            return 0, 0, 0, 0
        files = size = failed_files = failed_bytes = 0
        seen = set()
        for job_id, state, spec in self._unfinished_imports():
            seen.add(job_id)
            n, b = self._sums(job_id, spec)
            if state == "failure":
                failed_files += n
                failed_bytes += b
                continue
            progress = self.pusher.active.get(job_id)
            if progress is not None:
                n -= min(n, progress.objects_done)
                b -= min(b, progress.bytes_sent)
            files += n
            size += b
        for gone in set(self._spec_sums) - seen:
            del self._spec_sums[gone]
        return files, size, failed_files, failed_bytes

    def status(self) -> dict[str, Any]:
        cfg = self.agent.config
        if self.pusher is None:
            return {"backend": "local"}
        files, size, failed_files, failed_bytes = self.backlog()
        checks = {None: "not probed yet", True: "verified by the store",
                  False: "not verified by the store (Content-MD5, ETag and size are)"}
        return {"backend": "s3", "endpoint": cfg.repository_endpoint,
                "bucket": cfg.repository_bucket, "prefix": cfg.repository_prefix,
                "checksum_sha256": checks[self.pusher.checksums],
                "waiting_files": files, "waiting_bytes": size,
                "failed_files": failed_files, "failed_bytes": failed_bytes,
                "pushing": {job: p.content() for job, p in self.pusher.active.items()},
                "last_error": self.pusher.last_error, "cache": self.cache.status()}

    def counts(self) -> dict[str, int]:
        if self.pusher is None:
            return {}
        return {"files waiting for the repository": self.backlog()[0]}

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.pusher is not None:
            cfg = self.agent.config
            log.info("repository: s3 %s bucket %s prefix %r (part size %d, %d in flight, "
                     "%d for small objects)", cfg.repository_endpoint or "AWS",
                     cfg.repository_bucket, cfg.repository_prefix, cfg.repository_part_size,
                     cfg.repository_concurrency, cfg.repository_small_concurrency)
            task_status.started()
            await self.cache.serve()
            return
        task_status.started()


__all__ += ["PushFailed"]
