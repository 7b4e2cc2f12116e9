"""The push plan as a pure core: which objects, which parts, what is done, what to check.

Design notes
------------
* **No I/O here.** Everything the pusher (``_pusher.py``) decides that can be decided
  from values alone lives here, so it is tested without a server: object keys, the
  split of a file into parts, which parts of a resumed multipart upload still have to
  be sent (from what the database recorded and what the server lists), the ETag and
  checksum the server must report for an object, the backoff between attempts, the
  progress record.
* **Layout** (any S3 tool reads it): one object per file at ``PREFIX/PATH`` (``PATH``
  relative to ``uploads/``), with user metadata ``sha256`` (hex, the upload's verified
  digest), ``mtime`` (seconds since the epoch with nanoseconds, rclone's convention,
  so ``rclone copy`` back restores it), ``task`` and ``fileset`` (the import job). A
  fileset's listing is ``PREFIX/ROOT/fileset.json`` (beside its files, where a person
  looks; the latest set of that directory) and ``PREFIX/ROOT/.fileset-JOB.json`` (per
  job, so two sets collected in one directory keep both).
* **Parts.** A file up to ``part_size`` is one PUT. A larger one is a multipart upload
  of ``part_size`` parts, raised (to whole MiB) when the file would need more than
  S3's 10,000 parts. The part size is recorded with the upload ID, so a resumed push
  cuts the file exactly as the first attempt did.
* **Resume is the server's word, checked against ours.** A part counts as sent when
  the server lists it (ListParts) with the size we cut and the ETag it returned when
  we sent it (recorded). A part the server lists that we never recorded (the agent
  died between the server's answer and our record) is checked by its MD5 read again
  from the local file: equal, it is kept, not sent again. A part we recorded that the
  server does not list (a store that lost it) is sent again. No part the server holds
  intact is ever sent twice.
* **What the server must report** (``check_object``): the size; the ``sha256``
  metadata; where the store verifies ``x-amz-checksum-sha256`` (probed, see
  ``_pusher.py``) the full-object checksum of a single PUT, or the composite
  ``base64(sha256(part digests))-N`` of a multipart upload; and an ETag of the MD5
  form (``md5`` or ``md5(part md5s)-N``) must be the one we computed. A store whose
  ETag is not of that form (encryption at rest, some gateways) is not held to it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "MAX_PARTS", "MIN_PART_SIZE", "Part", "ObjectPlan", "Progress", "object_key",
    "fileset_key", "effective_part_size", "split_parts", "multipart_etag",
    "composite_sha256", "object_metadata", "mtime_text", "resume_parts", "check_object",
    "backoff_delay", "b64", "md5_etag", "check_put_answer", "check_listed", "confirm_groups",
]

MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * 2**20
MiB = 2**20
_MD5_ETAG = re.compile(r"[0-9a-f]{32}(-[0-9]+)?")


@dataclasses.dataclass(frozen=True)
class Part:
    number: int     # 1-based, as S3 counts
    offset: int
    size: int


@dataclasses.dataclass
class ObjectPlan:
    """One object to push: a member of the fileset (or its listing)."""

    key: str
    path: str | None          # relative to uploads/; None for a listing built in memory
    size: int
    sha256: str               # hex
    metadata: dict[str, str]
    task: str | None = None
    body: bytes | None = None  # the listing's bytes (``path`` is None)

    def multipart(self, part_size: int) -> bool:
        return self.size > part_size


@dataclasses.dataclass
class Progress:
    """What ``info.json`` shows of a push (``Content``); updated on the event loop."""

    objects_total: int = 0
    objects_done: int = 0
    parts_total: int = 0
    parts_done: int = 0
    bytes_total: int = 0
    bytes_sent: int = 0       # sent in this run, or found on the server already
    retries: int = 0

    def content(self) -> dict[str, int]:
        return {"ObjectsTotal": self.objects_total, "ObjectsDone": self.objects_done,
                "PartsTotal": self.parts_total, "PartsDone": self.parts_done,
                "BytesTotal": self.bytes_total, "BytesSent": self.bytes_sent,
                "Retries": self.retries}


def object_key(prefix: str, path: str) -> str:
    """``PREFIX/PATH``: the upload's path under uploads/, under the agent's prefix."""
    path = path.strip("/")
    return f"{prefix}/{path}" if prefix else path


def fileset_key(prefix: str, root: str, job_id: str | None) -> str:
    """The key of a fileset's listing: ``ROOT/.fileset-JOB.json`` (kept per job), or
    with no job ``ROOT/fileset.json`` (the latest set's, what a person looks for)."""
    name = f".fileset-{job_id}.json" if job_id is not None else "fileset.json"
    return object_key(prefix, f"{root.strip('/')}/{name}" if root.strip("/") else name)


def effective_part_size(size: int, part_size: int) -> int:
    """``part_size``, raised to whole MiB when ``size`` would need more than 10,000
    parts."""
    if size <= part_size * MAX_PARTS:
        return part_size
    needed = -(-size // MAX_PARTS)
    return -(-needed // MiB) * MiB


def split_parts(size: int, part_size: int) -> list[Part]:
    """The parts of a ``size``-byte object, ``part_size`` each, the last one shorter."""
    return [Part(n, offset, min(part_size, size - offset))
            for n, offset in enumerate(range(0, size, part_size), start=1)]


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def multipart_etag(md5_digests: Iterable[bytes]) -> str:
    """The ETag S3 gives a multipart object: md5 of the parts' binary MD5s, ``-N``."""
    digests = list(md5_digests)
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def composite_sha256(sha_digests: Iterable[bytes]) -> str:
    """``x-amz-checksum-sha256`` of a multipart object: the checksum of the parts'
    checksums, ``-N``."""
    digests = list(sha_digests)
    return f"{b64(hashlib.sha256(b''.join(digests)).digest())}-{len(digests)}"


def mtime_text(mtime_ns: int) -> str:
    """Seconds since the epoch with nine decimals (``1732900000.123456789``)."""
    seconds, ns = divmod(mtime_ns, 1_000_000_000)
    return f"{seconds}.{ns:09d}"


def object_metadata(sha256: str, mtime_ns: int | None, task: str | None,
                    fileset: str | None) -> dict[str, str]:
    meta = {"sha256": sha256}
    if mtime_ns is not None:
        meta["mtime"] = mtime_text(mtime_ns)
    if task:
        meta["task"] = str(task)
    if fileset:
        meta["fileset"] = fileset
    return meta


@dataclasses.dataclass(frozen=True)
class ResumeDecision:
    done: dict[int, str]          # part number -> ETag: on the server, intact
    check_locally: dict[int, str]  # listed, never recorded: compare the local MD5 with this ETag
    todo: list[int]               # to send


def _etag(value: str) -> str:
    return value.strip().strip('"').lower()


def resume_parts(parts: list[Part], recorded: Mapping[int, tuple[int, str]],
                 listed: Mapping[int, tuple[int, str]]) -> ResumeDecision:
    """Which parts of a multipart upload are sent already.

    ``recorded``: number -> (size, ETag) we stored when the server acknowledged the
    part; ``listed``: number -> (size, ETag) from the server's ListParts."""
    done, check, todo = {}, {}, []
    for part in parts:
        server = listed.get(part.number)
        ours = recorded.get(part.number)
        if server is None or server[0] != part.size:
            todo.append(part.number)
        elif ours is not None and _etag(ours[1]) == _etag(server[1]):
            done[part.number] = server[1]
        else:
            check[part.number] = server[1]
    return ResumeDecision(done, check, todo)


def md5_matches_etag(md5_digest: bytes, etag: str) -> bool:
    return _etag(etag) == md5_digest.hex()


def check_object(head: Mapping[str, Any], plan: ObjectPlan, *, expected_etag: str,
                 expected_checksum: str | None, etag_required: bool = False) -> str | None:
    """Why the object the server reports is not the one pushed, or None if it is.

    ``head``: ``size``, ``etag``, ``checksum_sha256`` (or None), ``metadata`` (keys
    compared case-insensitively: some stores capitalise them). ``etag_required``: the
    store answered the PUT with ``expected_etag``, so the object must report it, of
    whatever form its ETag is now."""
    if head["size"] != plan.size:
        return f"the store holds {head['size']} bytes, not {plan.size}"
    meta = {k.lower(): v for k, v in (head.get("metadata") or {}).items()}
    if meta.get("sha256", "").lower() != plan.sha256:
        return (f"its sha256 metadata is {meta.get('sha256')!r}, not {plan.sha256}")
    if expected_checksum is not None:
        got = head.get("checksum_sha256")
        if got != expected_checksum:
            return f"its x-amz-checksum-sha256 is {got!r}, not {expected_checksum!r}"
    etag = _etag(head.get("etag") or "")
    md5_form = _MD5_ETAG.fullmatch(etag) and ("-" in etag) == ("-" in expected_etag)
    if etag_required or md5_form:
        if etag != expected_etag:
            return f"its ETag is {etag}, not {expected_etag} (the MD5 we sent)"
    return None


def md5_etag(etag: str) -> bool:
    """Whether ``etag`` is of the MD5 form (``md5`` or ``md5-N``), quotes and case aside."""
    return _MD5_ETAG.fullmatch(_etag(etag)) is not None


def check_put_answer(etag: str, checksum: str | None, *, expected_etag: str,
                     expected_checksum: str | None) -> str | None:
    """Why the answer to a single PUT shows the store took other bytes, or None.

    An ETag of the MD5 form must be the MD5 we computed; a checksum the answer carries
    (some stores echo ``x-amz-checksum-sha256``) must be the one we sent."""
    if md5_etag(etag) and _etag(etag) != expected_etag:
        return f"its ETag is {_etag(etag)}, not {expected_etag} (the MD5 we sent)"
    if expected_checksum is not None and checksum and checksum != expected_checksum:
        return f"its x-amz-checksum-sha256 is {checksum!r}, not {expected_checksum!r}"
    return None


def check_listed(entry: tuple[int, str], plan: ObjectPlan, *,
                 expected_etag: str) -> str | None:
    """Why an object a listing reports (size, ETag) is not the one pushed, or None.
    For objects the store answered with ``expected_etag`` (an MD5): it must list that
    ETag, no other, of whatever form."""
    size, etag = entry
    if size != plan.size:
        return f"the store holds {size} bytes, not {plan.size}"
    if _etag(etag) != expected_etag:
        return f"its ETag is {_etag(etag)}, not {expected_etag} (the MD5 we sent)"
    return None


def confirm_groups(keys: Iterable[str], *, at_least: int) -> tuple[list[tuple[str, list[str]]],
                                                                    list[str]]:
    """How to confirm ``keys`` after their PUTs: (prefix, sorted keys) groups of at
    least ``at_least`` keys directly under one prefix (one ranged listing each), and
    the keys of smaller groups (one HEAD each: as cheap, and the full check)."""
    by_prefix: dict[str, list[str]] = {}
    for key in keys:
        head, slash, _ = key.rpartition("/")
        by_prefix.setdefault(head + slash, []).append(key)
    groups, single = [], []
    for prefix, members in sorted(by_prefix.items()):
        if len(members) >= at_least:
            groups.append((prefix, sorted(members)))
        else:
            single += members
    return groups, single


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` >= 1): 0.5, 1, 2 ...
    up to ``cap``."""
    return min(cap, base * 2 ** (attempt - 1))
