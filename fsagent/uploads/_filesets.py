"""Filesets: which verified uploads are imported together, one import job each.

Design notes
------------
* **What a fileset is.** OMERO imports a *fileset*: the files of one acquisition, uploaded
  one by one, verified together, imported by one background job with one handle
  (``../shared/seeds``, ImportProcess). fsagent groups verified uploads into filesets by
  the ``import_grouping`` setting:

  - ``directory`` (default): uploads that complete in one directory form a fileset until
    none has completed there for ``fileset_quiet_seconds``; ``fileset_max_files`` and
    ``fileset_max_bytes`` close a fileset early (the next uploads start another), so one
    job never grows without bound.
  - ``manifest``: the files one checksum manifest lists (``SHA256SUMS``, ``MD5SUMS``,
    ``SHA1SUMS``, ``NAME.sha256`` ...; ``_manifests.py``), with the manifest itself, form
    a fileset once every listed file is complete, i.e. verified against the manifest
    (the uploads' own verification is the set's ``verifyUpload``). Until then the
    fileset waits and ``filesets.json`` names what it waits for, and any listed file
    that failed, with its error; re-sending that file releases the set. Manifests that
    list the same files (``MD5SUMS`` and ``SHA256SUMS`` side by side) make one fileset.
    A file no manifest lists waits for one (``unlisted``); listed files that were
    imported already (by an earlier fileset) do not hold a set back.
  - ``file``: no collector; the hand-off submits one job per file as it completes.
* **Pure.** No I/O and no clock: the hand-off (``_handoff.py``) says what completed and
  when, reads manifests for the collector, asks it what is ready (``take_ready``) and
  submits each ready fileset as one import job.
* **Nothing here is durable, on purpose.** The members of a fileset being collected are
  exactly the complete uploads that have no import job yet, and both facts are in the
  tasks' records; the job's ID is recorded on every member in the transaction that
  records the job. After a crash the hand-off collects every complete upload without a
  job again: no upload is lost, none is in two jobs.
* **Members are checked when they leave**, not tracked on every change: a member that
  was removed, rewritten or given a job meanwhile is dropped by the hand-off when the
  fileset is taken, and a manifest set looks its files up afresh each time it is asked
  whether it is ready (a manifest that is gone dissolves its set; its files wait again).
"""

from __future__ import annotations

import dataclasses
import heapq
import os
from collections.abc import Callable, Container, Iterable
from typing import Any

from ._manifests import manifest_kind
from ._task import State, Task

__all__ = ["Fileset", "FilesetCollector", "GROUPINGS", "VIEW_LIMIT"]

GROUPINGS = ("directory", "manifest", "file")
VIEW_LIMIT = 100  # paths listed per fileset in filesets.json (the counts are whole)
# A manifest set is checked in full (every listed path looked up) when it has as many
# members as it lists, else at most this often while completions arrive: a manifest of
# 10,000 files must not cost 10,000 look-ups per completion.
MANIFEST_RECHECK_SECONDS = 0.5

Lookup = Callable[[bytes], "Task | None"]


def _directory(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[0]


def _usable(t: Task) -> bool:
    """Still a member: complete, tracked, not removed, no import yet."""
    return t.state is State.COMPLETE and t.tracked and not t.ended and not t.job


@dataclasses.dataclass(eq=False)
class Fileset:
    key: tuple[str, bytes]          # ("directory", dir) or ("manifest", first manifest)
    root: bytes                     # the directory it was collected in (under uploads/)
    started: float                  # monotonic time its first member joined
    last_added: float = 0.0
    members: dict[str, Task] = dataclasses.field(default_factory=dict)
    size: int = 0                   # bytes of the members (as they joined)
    manifests: dict[bytes, frozenset[bytes]] = dataclasses.field(default_factory=dict)
    # manifest grouping: listed path -> (algorithm, digest, the manifest that lists it)
    digests: dict[bytes, tuple[str, str, bytes]] = dataclasses.field(default_factory=dict)
    closed: bool = False            # ready (quiet or full): takes no new members
    expected: int = 0               # manifest grouping: listed paths + manifests
    dirty: bool = False             # manifest grouping: changed since last checked
    checked_at: float = float("-inf")

    def add(self, t: Task, now: float) -> None:
        old = self.members.get(t.task_id)
        self.size += t.present - (old.present if old is not None else 0)
        self.members[t.task_id] = t
        self.last_added = now

    def drop(self, t: Task) -> None:
        if self.members.pop(t.task_id, None) is not None:
            self.size -= t.present

    def usable_members(self) -> list[Task]:
        return [t for t in self.members.values() if _usable(t)]

    def missing(self, lookup: Lookup) -> tuple[list[str], list[dict[str, str]]]:
        """Manifest sets: (paths it waits for, failed listed files with their error)."""
        waiting, failed = [], []
        for manifest in self.manifests:
            t = lookup(manifest)
            if t is None or t.task_id not in self.members or not _usable(t):
                waiting.append(os.fsdecode(manifest))
        listed = set().union(*self.manifests.values()) if self.manifests else set()
        for rel in sorted(listed):
            t = lookup(rel)
            if t is None or not t.tracked:
                waiting.append(os.fsdecode(rel))
            elif t.state is State.FAILED:
                failed.append({"path": t.path, "error": t.error or "failed verification"})
            elif t.state is State.COMPLETE and t.job:
                continue  # imported by an earlier fileset: does not hold this one back
            elif t.task_id not in self.members or not _usable(t):
                waiting.append(t.path)
            elif rel in self.digests:
                # The set's verifyUpload: a file the manifest's own directory rules did
                # not check (one in a subdirectory, say) is checked here.
                algorithm, expected, manifest = self.digests[rel]
                actual = t.computed.get(algorithm)
                if actual != expected:
                    failed.append({"path": t.path, "error": (
                        f"{t.path}: {algorithm} {actual} differs from "
                        f"{os.fsdecode(manifest)}: {expected}" if actual else
                        f"{t.path}: cannot be checked against {os.fsdecode(manifest)}: its "
                        f"{algorithm} was not computed (declare it before the data)")})
        return waiting, failed


class FilesetCollector:
    """Collects complete uploads into filesets (see the design notes)."""

    def __init__(self, grouping: str, *, quiet_seconds: float, max_files: int,
                 max_bytes: int):
        if grouping not in ("directory", "manifest"):
            raise ValueError(f"no collector for grouping {grouping!r}")
        self.grouping = grouping
        self.quiet_seconds = quiet_seconds
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._sets: dict[tuple[str, bytes], Fileset] = {}
        self._of: dict[str, Fileset] = {}           # task ID -> the set it waits in
        self._full: list[Fileset] = []              # closed by a cap: ready now
        # manifest grouping only
        self._listed: dict[bytes, Fileset] = {}     # listed path -> the set listing it
        self._unlisted: dict[str, Task] = {}        # complete, listed by no manifest yet

    # -- what completed ------------------------------------------------------------------

    def is_manifest(self, t: Task) -> bool:
        return self.grouping == "manifest" and manifest_kind(t.rel.rpartition(b"/")[2]) is not None

    def add(self, t: Task, now: float) -> None:
        """``t`` is complete and has no import job: it waits in a fileset. A manifest
        (manifest grouping) waits until ``listing`` says what it lists."""
        if self.grouping == "directory":
            key = ("directory", _directory(t.rel))
            current = self._of.get(t.task_id)
            if current is not None and current.closed and current.key == key:
                return  # already in a set about to be taken
            if current is not None and (current.key != key or current.closed):
                self.discard(t)
                current = None
            s = current or self._sets.get(key)
            if s is None:
                s = self._sets[key] = Fileset(key=key, root=key[1], started=now)
            s.add(t, now)
            self._of[t.task_id] = s
            if len(s.members) >= self.max_files or s.size >= self.max_bytes:
                self._close(s)
            return
        s = self._of.get(t.task_id) or self._listed.get(t.rel)
        if s is None or self.is_manifest(t):
            self._unlisted[t.task_id] = t   # a manifest waits here for its listing
            return
        self._unlisted.pop(t.task_id, None)
        s.add(t, now)
        s.dirty = True
        self._of[t.task_id] = s

    def listing(self, manifest: Task, listed: dict[bytes, tuple[str, str]],
                now: float) -> None:
        """Manifest grouping: ``manifest`` (complete) lists these paths (under uploads/),
        each with ``(algorithm, digest)``."""
        digests = {rel: (*ad, manifest.rel) for rel, ad in listed.items()}
        listed = frozenset(listed) - {manifest.rel}
        self.discard(manifest)
        sets = {self._listed[rel] for rel in listed if rel in self._listed}
        if not sets:
            s = Fileset(key=("manifest", manifest.rel), root=_directory(manifest.rel),
                        started=now)
            self._sets[s.key] = s
        else:
            s, *others = sorted(sets, key=lambda x: x.started)
            for other in others:  # manifests listing the same files: one fileset
                self._merge(other, into=s)
        s.manifests[manifest.rel] = listed
        for rel in listed:
            s.digests[rel] = digests[rel]
        s.add(manifest, now)
        self._of[manifest.task_id] = s
        self._unlisted.pop(manifest.task_id, None)
        for rel in listed:
            self._listed[rel] = s
        for task_id, t in list(self._unlisted.items()):
            if t.rel in listed and not self.is_manifest(t):
                del self._unlisted[task_id]
                s.add(t, now)
                self._of[task_id] = s
        self._recount(s)

    def discard(self, t: Task) -> None:
        """``t`` no longer waits (it got a job, or the hand-off found it unusable)."""
        self._unlisted.pop(t.task_id, None)
        s = self._of.pop(t.task_id, None)
        if s is None:
            return
        s.drop(t)
        if t.rel in s.manifests:
            self._dissolve(s, t.rel)
        elif not s.members and not s.manifests and self._sets.get(s.key) is s:
            del self._sets[s.key]

    # -- what is ready -------------------------------------------------------------------

    def take_ready(self, now: float, lookup: Lookup, *, poll: bool = False,
                   held: Container[bytes] = ()) -> list[Fileset]:
        """The filesets to import now, taken out of the collector. ``poll``: check every
        manifest set in full (a listed file may have been imported elsewhere, or a
        manifest removed, without a completion here). A manifest set that would be ready
        waits while its directory is in ``held`` (a manifest there is still arriving: it
        may join it); asked only then, so ``held`` may be costly to answer."""
        ready, self._full = self._full, []
        for key, s in list(self._sets.items()):
            if self.grouping == "directory":
                due = now - s.last_added >= self.quiet_seconds
            else:
                if not (s.dirty or poll):
                    continue
                if (len(s.members) < s.expected and not poll
                        and now - s.checked_at < MANIFEST_RECHECK_SECONDS):
                    continue  # stays dirty: checked when its time comes (``next_due``)
                s.dirty, s.checked_at = False, now
                self._forget_gone_manifests(s, lookup)
                if key not in self._sets:
                    continue
                waiting, failed = s.missing(lookup)
                due = bool(s.manifests) and not waiting and not failed
                if due and s.root in held:
                    s.dirty = True  # looked at again when the hold ends (a wake-up)
                    continue
            if due:
                self._close(s)
                ready.append(self._full.pop())
        for s in ready:
            for task_id in s.members:
                if self._of.get(task_id) is s:
                    del self._of[task_id]
            for rel in set().union(*s.manifests.values()) if s.manifests else ():
                if self._listed.get(rel) is s:
                    del self._listed[rel]
        return ready

    def next_due(self) -> float | None:
        """When a directory set next falls quiet, or a changed manifest set is next
        checked; None if nothing waits on a clock (the hand-off still polls)."""
        if self._full:
            return float("-inf")
        if self.grouping != "directory":
            return min((s.checked_at + MANIFEST_RECHECK_SECONDS
                        for s in self._sets.values() if s.dirty), default=None)
        return min((s.last_added + self.quiet_seconds for s in self._sets.values()),
                   default=None)

    @property
    def waiting_count(self) -> int:
        return len(self._of) + len(self._unlisted)

    def view(self, now: float, lookup: Lookup,
             submitting: Iterable[Fileset] = ()) -> list[dict[str, Any]]:
        """The filesets being collected, as ``filesets.json`` shows them; then
        ``submitting``, the ones taken and being handed to the job engine (so a set is
        never out of sight between the two)."""
        out = []
        for s in sorted(self._sets.values(), key=lambda s: s.started):
            out.append(self._view_one(s, now, lookup))
        for s in submitting:
            item = self._view_one(s, now, lookup)
            item["submitting"] = True
            out.append(item)
        unlisted = [t for t in self._unlisted.values() if _usable(t)]
        if unlisted:
            out.append({"grouping": "manifest", "root": None, "files": len(unlisted),
                        "bytes": sum(t.present for t in unlisted),
                        "unlisted": heapq.nsmallest(VIEW_LIMIT, (t.path for t in unlisted)),
                        "note": "complete, but no checksum manifest lists these files yet"})
        return out

    def _view_one(self, s: Fileset, now: float, lookup: Lookup) -> dict[str, Any]:
        members = s.usable_members()
        item: dict[str, Any] = {
            "grouping": self.grouping, "root": os.fsdecode(s.root),
            "files": len(members), "bytes": sum(t.present for t in members),
            "waitingSeconds": round(now - s.started, 3)}
        if self.grouping == "directory":
            item["quietInSeconds"] = round(
                max(0.0, s.last_added + self.quiet_seconds - now), 3)
        else:
            waiting, failed = s.missing(lookup)
            item["manifests"] = sorted(os.fsdecode(m) for m in s.manifests)
            item["waitingFor"] = waiting[:VIEW_LIMIT]
            item["waitingForCount"] = len(waiting)
            item["failed"] = failed[:VIEW_LIMIT]
        return item

    # -- internals -----------------------------------------------------------------------

    def _close(self, s: Fileset) -> None:
        """Out of collection: the next upload for its key starts a new set."""
        if self._sets.get(s.key) is s:
            del self._sets[s.key]
        if not s.closed:
            s.closed = True
            self._full.append(s)

    def _recount(self, s: Fileset) -> None:
        listed = set().union(*s.manifests.values()) if s.manifests else set()
        s.expected = len(listed | set(s.manifests))
        s.dirty = True

    def _merge(self, other: Fileset, *, into: Fileset) -> None:
        for t in other.members.values():
            into.add(t, max(into.last_added, other.last_added))
            self._of[t.task_id] = into
        into.digests.update(other.digests)
        for manifest, listed in other.manifests.items():
            into.manifests[manifest] = listed
            for rel in listed:
                self._listed[rel] = into
        if self._sets.get(other.key) is other:
            del self._sets[other.key]
        self._recount(into)

    def _dissolve(self, s: Fileset, manifest: bytes) -> None:
        """A manifest left its set (removed, rewritten): what only it listed waits again."""
        listed = s.manifests.pop(manifest, frozenset())
        still = set().union(*s.manifests.values()) if s.manifests else set()
        for rel in listed - still:
            s.digests.pop(rel, None)
            if self._listed.get(rel) is s:
                del self._listed[rel]
        for task_id, t in list(s.members.items()):
            if t.rel not in still and t.rel not in s.manifests:
                s.drop(t)
                del self._of[task_id]
                self._unlisted[task_id] = t
        self._recount(s)
        if not s.manifests:
            for task_id, t in list(s.members.items()):
                s.drop(t)
                self._of.pop(task_id, None)
                self._unlisted[task_id] = t
            if self._sets.get(s.key) is s:
                del self._sets[s.key]

    def _forget_gone_manifests(self, s: Fileset, lookup: Lookup) -> None:
        for manifest in list(s.manifests):
            t = lookup(manifest)
            member = next((m for m in s.members.values() if m.rel == manifest), None)
            if member is not None and (member.ended or not member.tracked):
                s.drop(member)
                self._of.pop(member.task_id, None)
                self._dissolve(s, manifest)
            elif t is None and member is None:
                self._dissolve(s, manifest)
