"""Raw inotify events in, OMERO.fs events out: the monitor's pure core (no I/O).

Design notes
------------
* **What we know.** ``known`` maps every path under the root that the client has been
  told about (or that existed when the monitor started) to ``"f"`` (a file), ``"d"``
  (a directory), or ``"p"`` (a file created but not yet closed by its writer: not yet
  reported). ``wd_path``/``path_wd`` map watch descriptors to directories.
* **Create on close, not on create.** ``IN_CREATE`` of a file only notes it as
  pending; ``IN_CLOSE_WRITE`` reports Create for a pending or unknown file, Modify
  for a known one. A file moved in is Create at once. A pending file that is deleted
  was never reported, so its deletion is not either.
* **Renames** pair ``IN_MOVED_FROM``/``IN_MOVED_TO`` by cookie, across reads: an
  unpaired FROM waits ``MOVE_PAIR_SECONDS`` for its TO before it becomes a move out.
  A pair becomes Delete(old)+Create(new) as one unit (never split between
  notifications). A renamed directory has its whole subtree rewritten (watches and
  known paths); a directory moved out has its watches dropped and its known files
  reported deleted.
* **New directories: watch first, then list** (FIELD-NOTES §5). A directory created
  or moved in becomes a *walk request*; the adapter watches and lists it (in a worker
  thread) and hands back the listing with ``add_listing``. Listed entries are
  provisional until the adapter has drained the events queued meanwhile: a file
  whose ``IN_CREATE`` shows up in that drain was created after the watch and will be
  reported at close, and so is one the adapter found still open for writing; the others existed before the watch and are reported by
  ``finalize_listing`` (or silently known, for a start-up scan or a Recurse-mode
  move-in). No losses, no duplicates.
* **Overflow** (``IN_Q_OVERFLOW``, wd -1) → System "Overflow" and ``need_rescan``. The
  rescan listing replaces the watch table and ``known`` is diffed against it: only
  real differences (created, deleted, or modified since the last good read) go out.
* **IN_IGNORED** is the only thing that drops a watch from the tables (a watch
  removed by us is dropped when we ask for its removal).
* The output is a list of *units* (lists of ``(type, path, is_dir)``); filters and
  batching are the monitor's job, not this module's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from inotify_simple import flags as F

__all__ = ["Translator", "WalkResult", "SYNC_PREFIX", "WATCH_MASK", "MOVE_PAIR_SECONDS"]

SYNC_PREFIX = ".fsagent-sync-"
MOVE_PAIR_SECONDS = 0.02
WATCH_MASK = (F.CREATE | F.CLOSE_WRITE | F.DELETE | F.MOVED_FROM | F.MOVED_TO
              | F.DELETE_SELF | F.MOVE_SELF | F.ONLYDIR | F.DONT_FOLLOW | F.EXCL_UNLINK)

Event = tuple[str, str, bool]  # (Create|Modify|Delete|System, path or message, is_dir)


@dataclass
class WalkResult:
    """What the adapter found watching and listing one directory tree, parents first."""

    top: str
    watched: list[tuple[str, int]] = field(default_factory=list)
    entries: list[tuple[str, bool, int]] = field(default_factory=list)  # path, is_dir, mtime_ns
    failures: list[tuple[str, int, str]] = field(default_factory=list)  # path, errno, strerror
    writing: set[str] = field(default_factory=set)  # files open for writing when listed


class Translator:
    def __init__(self, root: str, mode: str, excluded: Callable[[str], bool]):
        self.root = root
        self.mode = mode  # Flat | Recurse | Follow
        self.excluded = excluded
        self.wd_path: dict[int, str] = {}
        self.path_wd: dict[str, int] = {}
        self.known: dict[str, str] = {}
        self._moves: dict[int, tuple[str, bool, float]] = {}  # cookie -> (path, is_dir, deadline)
        self._provisional: dict[str, bool] = {}  # listed path -> report it at finalize
        self.units: list[list[Event]] = []
        self.walk_requests: list[tuple[str, bool]] = []  # (dir, report its content)
        self.unwatch: list[int] = []
        self.need_rescan = False
        self.sync_seen: set[str] = set()

    # -- helpers --------------------------------------------------------------------------

    def _emit(self, *events: Event) -> None:
        self.units.append(list(events))

    def _under(self, path: str) -> list[str]:
        prefix = path + "/"
        return [p for p in self.known if p.startswith(prefix)]

    def _forget_watch(self, path: str) -> None:
        wd = self.path_wd.pop(path, None)
        if wd is not None:
            self.wd_path.pop(wd, None)
            self.unwatch.append(wd)

    def next_deadline(self) -> float | None:
        """When the oldest unpaired IN_MOVED_FROM becomes a move out."""
        return min((d for _, _, d in self._moves.values()), default=None)

    def take_units(self) -> list[list[Event]]:
        units, self.units = self.units, []
        return units

    # -- raw events -----------------------------------------------------------------------

    def feed(self, events, now: float) -> None:
        """Translate ``events`` (objects with wd, mask, cookie, name) read at ``now``."""
        for ev in events:
            self._one(ev.wd, ev.mask, ev.cookie, ev.name, now)
        self.expire_moves(now)

    def expire_moves(self, now: float, *, all_of_them: bool = False) -> None:
        for cookie, (path, is_dir, deadline) in list(self._moves.items()):
            if all_of_them or deadline <= now:
                del self._moves[cookie]
                self._moved_out(path, is_dir)

    def _one(self, wd: int, mask: int, cookie: int, name: str, now: float) -> None:
        if mask & F.Q_OVERFLOW:
            self._emit(("System", "Overflow", False))
            self.need_rescan = True
            return
        directory = self.wd_path.get(wd)
        if directory is None:
            return  # a watch we already dropped
        if mask & F.IGNORED:
            self.wd_path.pop(wd, None)
            if self.path_wd.get(directory) == wd:
                del self.path_wd[directory]
            return
        if mask & (F.DELETE_SELF | F.MOVE_SELF):
            # The kernel queues MOVED_FROM, MOVED_TO, then MOVE_SELF: a watched directory
            # whose MOVED_FROM is still unpaired at its MOVE_SELF has left the tree. Resolve
            # it now, before its watch reports new events under a stale path.
            for cookie, (moved, is_dir, _) in list(self._moves.items()):
                if moved == directory:
                    del self._moves[cookie]
                    self._moved_out(moved, is_dir)
            if directory == self.root:
                what = "removed" if mask & F.DELETE_SELF else "moved away"
                self._emit(("System", f"Watched directory {what}: {self.root}", False))
            return
        path = os.path.join(directory, name) if name else directory
        is_dir = bool(mask & F.ISDIR)
        if name.startswith(SYNC_PREFIX) and directory == self.root:
            if mask & F.CLOSE_WRITE:
                self.sync_seen.add(name)
            return
        if mask & F.MOVED_FROM:
            self._moves[cookie] = (path, is_dir, now + MOVE_PAIR_SECONDS)
            return
        if mask & F.MOVED_TO:
            source = self._moves.pop(cookie, None)
            if source is not None:
                self._renamed(source[0], path, is_dir)
            elif not self.excluded(path):
                self._moved_in(path, is_dir)
            return
        if self.excluded(path):
            return
        if mask & F.CREATE:
            if is_dir:
                if self.known.get(path) != "d":
                    self.known[path] = "d"
                    self._provisional.pop(path, None)
                    self._emit(("Create", path, True))
                    if self.mode != "Flat":
                        self.walk_requests.append((path, True))
            elif path in self._provisional:
                del self._provisional[path]
                self.known[path] = "p"
            elif path not in self.known:
                self.known[path] = "p"
        elif mask & F.CLOSE_WRITE:
            # A listed file whose writer closes it only now was still being written when
            # its directory was listed: this close is its creation, not a modification.
            listed = self._provisional.pop(path, None) is not None
            if self.known.get(path) == "f" and not listed:
                self._emit(("Modify", path, False))
            else:
                self.known[path] = "f"
                self._emit(("Create", path, False))
        elif mask & F.DELETE:
            self._provisional.pop(path, None)
            self._removed(path)

    def _removed(self, path: str, *, moved_away: bool = False) -> None:
        state = self.known.pop(path, None)
        if state == "d":
            for sub in sorted(self._under(path), reverse=True):
                self._removed(sub, moved_away=moved_away)
            if moved_away:  # still exists elsewhere: we stop watching it ourselves
                self._forget_watch(path)
        if state in ("f", "d"):
            self._emit(("Delete", path, state == "d"))

    def _moved_out(self, path: str, is_dir: bool) -> None:
        self._provisional.pop(path, None)
        if path in self.known:
            self._removed(path, moved_away=True)

    def _moved_in(self, path: str, is_dir: bool) -> None:
        if is_dir:
            self.known[path] = "d"
            self._emit(("Create", path, True))
            if self.mode != "Flat":
                self.walk_requests.append((path, self.mode == "Follow"))
        else:
            self.known[path] = "f"
            self._emit(("Create", path, False))

    def _renamed(self, old: str, new: str, is_dir: bool) -> None:
        if self.excluded(new):
            self._moved_out(old, is_dir)
            return
        state = self.known.pop(old, None)
        if state is None:
            self._moved_in(new, is_dir)
            return
        if state == "p":  # still being written: it will be reported at close, by its new name
            self.known[new] = "p"
            return
        self.known[new] = state
        unit: list[Event] = [("Delete", old, state == "d"), ("Create", new, state == "d")]
        if state == "d":
            old_prefix, new_prefix = old + "/", new + "/"
            for sub in sorted(self._under(old)):
                sub_state = self.known.pop(sub)
                moved = new_prefix + sub[len(old_prefix):]
                self.known[moved] = sub_state
                if self.mode == "Follow" and sub_state != "p":
                    unit[1:1] = [("Delete", sub, sub_state == "d")]
                    unit.append(("Create", moved, sub_state == "d"))
            for path in [old] + [p for p in self.path_wd if p.startswith(old_prefix)]:
                wd = self.path_wd.pop(path)
                moved = new if path == old else new_prefix + path[len(old_prefix):]
                self.path_wd[moved] = wd
                self.wd_path[wd] = moved
        self.units.append(unit)

    # -- listings from the adapter --------------------------------------------------------

    def _watch_failed(self, path: str, err: int, strerror: str) -> None:
        import errno as _errno

        if err == _errno.ENOENT or err == _errno.ENOTDIR:
            return  # gone before we could watch it; its deletion is (or will be) an event
        if err == _errno.ENOSPC:
            self._emit(("System", f"Watch limit reached: {path}", False))
        else:
            self._emit(("System", f"Cannot watch {path}: {strerror}", False))

    def add_listing(self, result: WalkResult, *, report: bool) -> None:
        """Take a walk's watches and entries; entries stay provisional until
        ``finalize_listing`` (call it after draining the events queued meanwhile)."""
        for path, wd in result.watched:
            self.wd_path[wd] = path
            self.path_wd[path] = wd
        for path, err, strerror in result.failures:
            self._watch_failed(path, err, strerror)
        for path, is_dir, _ in result.entries:
            if path in self.known:
                continue
            if is_dir:
                self.known[path] = "d"
                if report:
                    self._emit(("Create", path, True))
            elif path in result.writing:
                self.known[path] = "p"  # reported when its writer closes it
            else:
                self.known[path] = "f"
                self._provisional[path] = report

    def finalize_listing(self) -> None:
        for path, report in self._provisional.items():
            if report and self.known.get(path) == "f":
                self._emit(("Create", path, False))
        self._provisional.clear()

    def apply_rescan(self, result: WalkResult, *, modified_since_ns: int) -> None:
        """Replace the watch table with a full rescan's and report only the differences."""
        self.need_rescan = False
        self.expire_moves(0, all_of_them=True)
        new_wds = dict(result.watched)
        for path, wd in list(self.path_wd.items()):
            if new_wds.get(path) != wd and wd not in new_wds.values():
                self.unwatch.append(wd)
        self.wd_path = {wd: path for path, wd in result.watched}
        self.path_wd = {path: wd for path, wd in result.watched}
        for path, err, strerror in result.failures:
            self._watch_failed(path, err, strerror)
        found = {path: (is_dir, mtime) for path, is_dir, mtime in result.entries}
        for path in sorted(self.known, reverse=True):
            if path not in found:
                state = self.known.pop(path)
                if state in ("f", "d"):
                    self._emit(("Delete", path, state == "d"))
        for path, (is_dir, mtime_ns) in found.items():
            state = self.known.get(path)
            if state is None:
                self.known[path] = "d" if is_dir else "f"
                if is_dir:
                    self._emit(("Create", path, True))
                elif path in result.writing:
                    self.known[path] = "p"
                else:
                    self._provisional[path] = True
            elif state == "f" and not is_dir and mtime_ns >= modified_since_ns:
                self._emit(("Modify", path, False))
            elif state == "p":
                self.known[path] = "f"
                self._provisional[path] = True
