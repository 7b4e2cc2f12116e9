"""The upload task's life: one transition table, and the pure rules around it.

Design notes
------------
* **One table.** ``TRANSITIONS`` maps ``(state, event)`` to the next state; nothing
  else in fsagent changes a task's state (``Task.apply`` is the only writer of
  ``Task.state``). A pair that is not in the table is a bug in the caller or a race
  we did not expect, and raises ``TaskStateError`` naming the event and the state
  (the h11 way: "cannot <event> an upload that is <state>").
* **States** (what a user sees in ``user.fsagent.state`` and ``uploads.json``):
  ``receiving`` — at least one writer has it open; ``partial`` — closed, not known to
  be complete; ``verifying`` — a completion rule held, hashes are being checked;
  ``complete`` — verified, its import job was handed off; ``failed`` — a hash did not
  match (or the file outgrew its declared size); the data stays so a re-send repairs it.
* **Events** are what happened, not what to do: a writer opened it (``open_write``);
  the last writer closed it (``close``); bytes changed without a writer, e.g. a
  truncate by path (``modify``); a completion rule held (``size_reached``,
  ``hash_declared``, ``renamed_into_place``, ``settled``); the check ended
  (``verified``, ``mismatch``, ``fail``); the agent restarted (``restart``); recovery
  cannot prove a complete file is still the bytes it verified (``recheck``: it is
  hashed again before anyone is told it is complete); the file went away (``unlink``,
  which ends the task: next state ``None``).
* **What ``complete`` promises**: the recorded SHA-256 is the SHA-256 of the file's
  bytes, now and after any crash. So every change of the bytes leaves ``complete``
  first (``open_write``, ``modify``), and ``verifying`` is left by ``modify`` when the
  check finds other bytes than the ones it was asked to confirm.
* **The task** (``Task``, below) is the record the table moves: ``Task.apply`` is the
  only writer of ``state`` and of ``ended`` (set by ``unlink``); it, ``mark_committed``
  and ``set_tracked`` (the only writers of what ``shown`` reads) keep the task table's
  per-state index current (``_store.py``). The other flags are
  facts the rules read, not states: ``tracked`` (False for a temporary name: no row,
  no listing, until ``named``), ``held`` (rsync left it with mtime 0), ``writers``.
* **Which rule holds** is decided by ``completion_event`` from plain facts (writers,
  sizes, declarations, the mtime-0 hold, idle time), so it is unit-tested without a
  mount. The rules, in order: a declared size is authoritative (not reached: wait;
  exceeded: fail); a file rsync left with mtime 0 waits; a client hash means "check
  now"; an rsync rename into place with a real mtime means done; otherwise the file must stay closed and unchanged for
  ``settle_seconds``. A file rsync renamed into place with mtime 0 (its interrupted
  ``--partial``) never settles on its own.
* **Names that are not tasks**: rsync's temp files (``.NAME.XXXXXX``, made by
  mkstemp) and anything under ``.rsync-partial/`` or ``.~tmp~/`` (``--partial-dir``,
  ``--delay-updates``) become tasks only when renamed to a real name.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import sqlite3
import struct
import time
import types
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = [
    "State", "Event", "TRANSITIONS", "TaskStateError", "next_state", "completion_event",
    "is_temporary_path", "is_utf8", "progress_percent", "Task", "COLUMNS",
    "NO_DECLARATIONS", "NO_DIGESTS", "Sha256Only", "digests_of",
]


class State(str, enum.Enum):
    RECEIVING = "receiving"
    PARTIAL = "partial"
    VERIFYING = "verifying"
    COMPLETE = "complete"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class Event(str, enum.Enum):
    OPEN_WRITE = "open_write"
    CLOSE = "close"
    MODIFY = "modify"
    SIZE_REACHED = "size_reached"
    HASH_DECLARED = "hash_declared"
    RENAMED_INTO_PLACE = "renamed_into_place"
    SETTLED = "settled"
    VERIFIED = "verified"
    MISMATCH = "mismatch"
    FAIL = "fail"
    RESTART = "restart"
    RECHECK = "recheck"
    NAMED = "named"
    UNLINK = "unlink"

    def __str__(self) -> str:
        return self.value


R, P, V, C, F = State.RECEIVING, State.PARTIAL, State.VERIFYING, State.COMPLETE, State.FAILED
E = Event
ALL = (R, P, V, C, F)

TRANSITIONS: dict[tuple[State, Event], State | None] = {
    # Any writer reopens the task: a resume, a repair, or a new version of a complete file.
    **{(s, E.OPEN_WRITE): R for s in ALL},
    (R, E.CLOSE): P,
    # Bytes changed with no writer open (truncate by path): back to "not known complete".
    (R, E.MODIFY): R,
    **{(s, E.MODIFY): P for s in (P, V, C, F)},
    # A completion rule held for a closed file.
    (P, E.SIZE_REACHED): V,
    (P, E.HASH_DECLARED): V,
    (P, E.RENAMED_INTO_PLACE): V,
    (P, E.SETTLED): V,
    # A hash declared after the fact re-checks a finished or failed file.
    (C, E.HASH_DECLARED): V,
    (F, E.HASH_DECLARED): V,
    # Recovery could not prove the bytes are the ones verified (renamed, touched, or
    # changed while the agent was down): check them again.
    (C, E.RECHECK): V,
    (V, E.VERIFIED): C,
    (V, E.MISMATCH): F,
    (P, E.FAIL): F,
    (V, E.FAIL): F,
    # After a restart nobody has the file open, and a check in progress starts over.
    (R, E.RESTART): P,
    (V, E.RESTART): P,
    **{(s, E.RESTART): s for s in (P, C, F)},
    # A temporary file (rsync's .NAME.XXXXXX) renamed to a real name becomes a task: a
    # closed file not known to be complete (an open one then gets ``open_write``).
    **{(s, E.NAMED): P for s in ALL},
    **{(s, E.UNLINK): None for s in ALL},
}


class TaskStateError(Exception):
    """An event that the transition table does not allow in the current state."""

    def __init__(self, event: Event, state: State):
        super().__init__(f"cannot {event} an upload that is {state}")
        self.event = event
        self.state = state


def next_state(state: State, event: Event) -> State | None:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TaskStateError(event, state) from None


def completion_event(
    *, writers: int, size: int, declared_size: int | None, has_client_hash: bool,
    renamed_by_rsync: bool, held: bool, idle_seconds: float, settle_seconds: float,
) -> tuple[Event | None, str | None]:
    """Which completion rule holds for a closed partial file, if any.

    Returns ``(event, None)`` when a rule holds, ``(Event.FAIL, reason)`` when the file
    can no longer become what was declared, and ``(None, None)`` to keep waiting.
    """
    if writers:
        return None, None
    if declared_size is not None:
        if size > declared_size:
            return E.FAIL, f"{size} bytes present, more than the declared size {declared_size}"
        if size < declared_size:
            return None, None
        return E.SIZE_REACHED, None
    if held:
        return None, None
    if has_client_hash:
        return E.HASH_DECLARED, None
    if renamed_by_rsync:
        return E.RENAMED_INTO_PLACE, None
    if idle_seconds >= settle_seconds:
        return E.SETTLED, None
    return None, None


_RSYNC_TEMP = re.compile(rb"^\..+\.[A-Za-z0-9]{6}$", re.S)
_TEMP_DIRS = {b".rsync-partial", b".~tmp~"}


def is_temporary_path(rel: bytes) -> bool:
    """True for rsync's temp files and anything inside its partial/delay dirs."""
    parts = rel.split(b"/")
    if any(p in _TEMP_DIRS for p in parts[:-1]):
        return True
    return bool(_RSYNC_TEMP.match(parts[-1]))


def is_utf8(name: bytes) -> bool:
    """Upload paths travel as text (SQLite, JSON, msgpack-RPC, ZIP member names), so a
    name that is not UTF-8 cannot be an upload: the mount refuses it with EILSEQ and a
    file put into the store by hand with one is not a task."""
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def progress_percent(present: int, declared_size: int | None, state: State) -> float | None:
    """Bytes present / declared size as 0-100; 100 once complete; None if unknown."""
    if state is State.COMPLETE:
        return 100.0
    if declared_size is None:
        return None
    if declared_size == 0:
        return 100.0 if present == 0 else 0.0
    return round(min(100.0, 100.0 * present / declared_size), 2)


# -- the task ------------------------------------------------------------------------

NO_DECLARATIONS: Mapping[str, str] = types.MappingProxyType({})
NO_DIGESTS: Mapping[str, str] = types.MappingProxyType({})


class Sha256Only(Mapping):
    """``{"sha256": hex}`` in 56 bytes instead of a dict's 184: the digests of nearly
    every complete upload (a store keeps 100,000 and more). Read-only, like every
    ``Task.computed`` (replaced, never changed in place)."""

    __slots__ = ("hex",)

    def __init__(self, hex: str):
        self.hex = hex

    def __getitem__(self, algorithm: str) -> str:
        if algorithm == "sha256":
            return self.hex
        raise KeyError(algorithm)

    def get(self, algorithm: str, default=None):
        return self.hex if algorithm == "sha256" else default

    def __iter__(self):
        return iter(("sha256",))

    def __len__(self) -> int:
        return 1

    def __repr__(self) -> str:
        return f"{{'sha256': {self.hex!r}}}"


def digests_of(values: Mapping[str, str]) -> Mapping[str, str]:
    """``values`` (algorithm -> hex) as ``Task.computed`` keeps it: compact when it is
    the SHA-256 alone, shared when empty."""
    if not values:
        return NO_DIGESTS
    if len(values) == 1 and "sha256" in values:
        return Sha256Only(values["sha256"])
    return dict(values)

# A fingerprint packed: size, mtime_ns, ctime_ns (signed: an mtime may be before 1970).
_FINGERPRINT = struct.Struct("=qqq")

COLUMNS = ("task_id", "path", "state", "bytes_present", "durable_offset", "declared_size",
            "client_md5", "client_sha1", "client_sha256", "md5", "sha1", "sha256", "job",
            "error", "held", "renamed_by_rsync", "created", "updated", "completed", "ino",
            "fp_size", "fp_mtime_ns", "fp_ctime_ns", "job_sha256", "ino_generation")


# ``slots``: at 100,000 uploads every byte of a task counts (a dict per instance cost
# ~300 bytes more); nothing sets attributes a task does not declare.
@dataclasses.dataclass(eq=False, slots=True)
class Task:
    rel: bytes                      # path under uploads/
    task_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    state: State = State.PARTIAL
    present: int = 0                # bytes present (the file's size)
    durable: int = 0                # bytes synced to disk and recorded
    declared_size: int | None = None
    # Algorithm -> hex. Replaced, never changed in place: a task with no declaration
    # (nearly all) shares one read-only empty mapping instead of a dict of its own.
    client: Mapping[str, str] = dataclasses.field(default_factory=lambda: NO_DECLARATIONS)
    # Algorithm -> hex of the bytes verified; replaced, never changed in place
    # (``digests_of``: compact or shared, as ``client``).
    computed: Mapping[str, str] = dataclasses.field(default_factory=lambda: NO_DIGESTS)
    job: str | None = None
    error: str | None = None
    held: bool = False              # rsync left it with mtime 0: never settles by itself
    renamed_by_rsync: bool = False
    created: float = dataclasses.field(default_factory=time.time)
    updated: float = dataclasses.field(default_factory=time.time)
    completed: float | None = None
    ino: int | None = None          # the backing file's inode (follows renames)
    ino_generation: int | None = None  # ... and its generation: (ino, this) names the file
    # (size, mtime_ns, ctime_ns) verified, packed (``fingerprint`` reads and sets it): 64
    # bytes, where the tuple and its three ints took ~180 (x 100,000 complete uploads).
    packed_fingerprint: bytes | None = None
    job_sha256: str | None = None   # the SHA-256 of the version ``job`` imports
    # -- runtime only --
    tracked: bool = True
    writers: int = 0
    hasher: Any = None
    writer: Any = None              # BackingWriter: acknowledged writes not yet applied
    generation: int = 0             # bumped on every change of the bytes (or stale check)
    last_change: float = dataclasses.field(default_factory=time.monotonic)
    since_checkpoint: int = 0
    shrinks: int = 0                # bumped when bytes may be cut away (truncate, cut-back)
    timed: bool = False             # a real mtime was set since the bytes last changed
    ended: bool = False
    stored: bool = False            # a row may exist: deleting must reach SQLite
    committed: bool = False         # the current state is durable (see ``shown``)
    # The TaskTable that indexes it by shown state (``_store.py``), and the state it is
    # counted under there (None: not counted). ``apply``, ``mark_committed`` and
    # ``set_tracked`` change what is shown, so they tell the table.
    table: Any = dataclasses.field(default=None, repr=False)
    counted_as: State | None = dataclasses.field(default=None, repr=False)

    @property
    def path(self) -> str:
        return os.fsdecode(self.rel)

    @property
    def fingerprint(self) -> tuple[int, int, int] | None:
        packed = self.packed_fingerprint
        return None if packed is None else _FINGERPRINT.unpack(packed)

    @fingerprint.setter
    def fingerprint(self, value: tuple[int, int, int] | None) -> None:
        self.packed_fingerprint = None if value is None else _FINGERPRINT.pack(*value)

    def apply(self, event: Event) -> State | None:
        """Move along the transition table (raises ``TaskStateError`` if not allowed)."""
        new = next_state(self.state, event)
        if new is None:
            self.ended = True  # the table ends the task (unlink): no state after this
        elif new is not self.state:
            self.state = new
            self.committed = False
        self.updated = time.time()
        if self.table is not None:
            self.table.reindex(self)
        return new

    def mark_committed(self) -> None:
        """The current state's record is durable: ``complete`` may be shown now."""
        self.committed = True
        if self.table is not None:
            self.table.reindex(self)

    def set_tracked(self, tracked: bool) -> None:
        """Become an upload task (a real name) or stop being one (a temporary name)."""
        self.tracked = tracked
        if self.table is not None:
            self.table.reindex(self)

    def supersede_check(self) -> None:
        """A verification in progress is stale (something was declared meanwhile): its
        verdict is dropped, as after a change of the bytes, but the bytes and their
        digests stand."""
        self.generation += 1

    def changed(self) -> None:
        self.generation += 1
        self.last_change = time.monotonic()
        self.computed = NO_DIGESTS
        self.fingerprint = None
        self.timed = False

    @property
    def shown(self) -> State:
        """The state users see (xattrs, uploads.json). ``complete`` is a promise about
        the bytes that must survive a crash, so it is shown only once its record is
        durable; until then the task shows ``verifying``, which it still is on disk."""
        if self.state is State.COMPLETE and not self.committed:
            return State.VERIFYING
        return self.state

    @property
    def progress(self) -> float | None:
        return progress_percent(self.present, self.declared_size, self.shown)

    def summary(self) -> dict[str, Any]:
        """The task as uploads.json shows it."""
        return {
            "taskID": self.task_id, "path": self.path, "state": self.shown.value,
            "offset": self.present, "size": self.declared_size, "progress": self.progress,
            "sha256": self.computed.get("sha256"), "job": self.job, "error": self.error,
            "updated": round(self.updated, 3),
        }

    def row(self) -> tuple:
        return (self.task_id, self.path, self.state.value, self.present, self.durable,
                self.declared_size, self.client.get("md5"), self.client.get("sha1"),
                self.client.get("sha256"), self.computed.get("md5"),
                self.computed.get("sha1"), self.computed.get("sha256"), self.job,
                self.error, int(self.held), int(self.renamed_by_rsync), self.created,
                self.updated, self.completed, self.ino,
                *(self.fingerprint or (None, None, None)), self.job_sha256,
                self.ino_generation)

    @classmethod
    def from_row(cls, row: sqlite3.Row | tuple) -> Task:
        values = dict(zip(COLUMNS, row))
        return cls(
            rel=os.fsencode(values["path"]), task_id=values["task_id"],
            state=State(values["state"]), present=values["bytes_present"],
            durable=values["durable_offset"], declared_size=values["declared_size"],
            client={a: values[f"client_{a}"] for a in ("md5", "sha1", "sha256")
                    if values[f"client_{a}"]} or NO_DECLARATIONS,
            computed=digests_of({a: values[a] for a in ("md5", "sha1", "sha256")
                                 if values[a]}),
            job=values["job"], error=values["error"], held=bool(values["held"]),
            renamed_by_rsync=bool(values["renamed_by_rsync"]), created=values["created"],
            updated=values["updated"], completed=values["completed"], ino=values["ino"],
            packed_fingerprint=(None if values["fp_size"] is None else _FINGERPRINT.pack(
                values["fp_size"], values["fp_mtime_ns"], values["fp_ctime_ns"])),
            job_sha256=values["job_sha256"], ino_generation=values["ino_generation"],
            stored=True, committed=True,
        )
