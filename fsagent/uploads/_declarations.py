"""Declarations: what a client says about an upload through ``user.fsagent.*`` xattrs.

Design notes
------------
* **Declarable** (ImportProcess.verifyUpload, uploadTasks POST): ``size`` (an integer;
  it reserves space and fails with ENOSPC at once if the store cannot hold it), and
  ``md5``, ``sha1``, ``sha256`` (hex of the right length; EINVAL otherwise). A hash
  declared before any byte was hashed joins the on-the-fly hash stream.
* **Status attributes** (``task``, ``state``, ``offset``, ``progress``, ``job``,
  ``error``) are derived: setting one is EPERM, removing one succeeds and changes
  nothing, so ``rsync -aX`` (which removes attributes its source lacks) runs cleanly.
* These functions only read and change the ``Task``; the component stages the row
  and asks completion whether the declaration completes (or re-checks) the upload.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable

from pyfuse3 import FUSEError

from ._manifests import ALGORITHMS, DIGEST_HEX_LENGTH
from ._space import SpaceAccounting
from ._task import Task

__all__ = ["FSAGENT_XATTR", "STATUS_KEYS", "DECLARABLE_KEYS", "task_xattrs", "declare",
           "undeclare"]

FSAGENT_XATTR = b"user.fsagent."
STATUS_KEYS = {b"task", b"state", b"offset", b"progress", b"job", b"error"}
DECLARABLE_KEYS = {b"size", b"md5", b"sha1", b"sha256"}
_HEX = re.compile(r"^[0-9a-f]+$")


def task_xattrs(t: Task) -> dict[bytes, bytes]:
    """Every ``user.fsagent.*`` attribute of an upload task, as ``getfattr`` shows it."""
    p = t.progress
    out = {
        b"user.fsagent.task": t.task_id.encode(),
        b"user.fsagent.state": t.shown.value.encode(),
        b"user.fsagent.offset": str(t.present).encode(),
    }
    if t.declared_size is not None:
        out[b"user.fsagent.size"] = str(t.declared_size).encode()
    out[b"user.fsagent.progress"] = b"" if p is None else f"{p:g}".encode()
    for algorithm in ALGORITHMS:
        value = t.computed.get(algorithm) if algorithm == "sha256" else None
        value = value or t.client.get(algorithm)
        if value:
            out[FSAGENT_XATTR + algorithm.encode()] = value.encode()
    out[b"user.fsagent.job"] = (t.job or "").encode()
    out[b"user.fsagent.error"] = (t.error or "").encode()
    return out


def declare(t: Task, key: bytes, value: bytes, space: SpaceAccounting,
            new_hasher: Callable[[Task], None]) -> None:
    """Apply one declaration (``key`` without the prefix) or raise the errno."""
    if key in STATUS_KEYS:
        raise FUSEError(errno.EPERM)
    if key not in DECLARABLE_KEYS:
        raise FUSEError(errno.EINVAL)
    text = value.decode("ascii", "replace").strip().lower()
    if key == b"size":
        if not text.isdigit():
            raise FUSEError(errno.EINVAL)
        if not space.declare(t, int(text)):
            raise FUSEError(errno.ENOSPC)
        return
    algorithm = key.decode()
    if len(text) != DIGEST_HEX_LENGTH[algorithm] or not _HEX.match(text):
        raise FUSEError(errno.EINVAL)
    t.client = {**t.client, algorithm: text}  # never in place: the empty one is shared
    if t.hasher is not None and not t.hasher.includes(algorithm) and t.hasher.position == 0:
        new_hasher(t)  # nothing hashed yet: include it on the fly


def undeclare(t: Task, key: bytes) -> bool:
    """Remove a declaration; False when nothing changed (a derived attribute), ENODATA
    when there is no such declaration."""
    if key in STATUS_KEYS:
        return False
    if key == b"size" and t.declared_size is not None:
        t.declared_size = None
    elif key.decode("ascii", "replace") in t.client:
        t.client = {a: v for a, v in t.client.items() if a != key.decode()}
    elif key == b"sha256" and t.computed.get("sha256"):
        return False
    else:
        raise FUSEError(errno.ENODATA)
    return True
