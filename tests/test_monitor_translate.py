"""The monitor's pure core on synthetic inotify events (no I/O)."""

from __future__ import annotations

from inotify_simple import Event
from inotify_simple import flags as F

from fsagent.monitor._translate import MOVE_PAIR_SECONDS, Translator, WalkResult


def tree(mode="Recurse"):
    tr = Translator("/r", mode, lambda p: p.endswith(".skip"))
    tr.add_listing(WalkResult("/r", watched=[("/r", 1), ("/r/d", 2), ("/r/d/e", 3)],
                              entries=[("/r/d", True, 0), ("/r/d/e", True, 0),
                                       ("/r/d/e/f", False, 0), ("/r/g", False, 0)]),
                   report=False)
    tr.finalize_listing()
    assert tr.take_units() == []
    return tr


def test_rename_pairs_across_reads():
    tr = tree()
    tr.feed([Event(1, F.MOVED_FROM, 77, "g")], now=0.0)
    assert tr.take_units() == []  # waiting for its other half
    tr.feed([Event(1, F.MOVED_TO, 77, "h")], now=MOVE_PAIR_SECONDS / 2)
    assert tr.take_units() == [[("Delete", "/r/g", False), ("Create", "/r/h", False)]]


def test_unpaired_moved_from_becomes_a_delete_after_the_window():
    tr = tree()
    tr.feed([Event(1, F.MOVED_FROM, 5, "g")], now=0.0)
    assert tr.next_deadline() == MOVE_PAIR_SECONDS
    tr.feed([], now=MOVE_PAIR_SECONDS)
    assert tr.take_units() == [[("Delete", "/r/g", False)]]


def test_directory_rename_rewrites_watches_and_known_paths():
    tr = tree()
    tr.feed([Event(1, F.MOVED_FROM | F.ISDIR, 9, "d"), Event(1, F.MOVED_TO | F.ISDIR, 9, "n")],
            now=0.0)
    assert tr.take_units() == [[("Delete", "/r/d", True), ("Create", "/r/n", True)]]
    assert tr.wd_path == {1: "/r", 2: "/r/n", 3: "/r/n/e"}
    tr.feed([Event(3, F.CLOSE_WRITE, 0, "f"), Event(3, F.DELETE, 0, "f")], now=0.0)
    assert tr.take_units() == [[("Modify", "/r/n/e/f", False)], [("Delete", "/r/n/e/f", False)]]


def test_watch_dropped_only_on_in_ignored():
    tr = tree()
    tr.feed([Event(3, F.DELETE, 0, "f"), Event(3, F.DELETE_SELF, 0, ""),
             Event(2, F.DELETE | F.ISDIR, 0, "e")], now=0.0)
    assert 3 in tr.wd_path  # not before IN_IGNORED
    tr.feed([Event(3, F.IGNORED, 0, "")], now=0.0)
    assert 3 not in tr.wd_path
    assert tr.take_units() == [[("Delete", "/r/d/e/f", False)], [("Delete", "/r/d/e", True)]]


def test_overflow_then_rescan_reports_only_differences():
    tr = tree()
    tr.feed([Event(-1, F.Q_OVERFLOW, 0, "")], now=0.0)
    assert tr.need_rescan and tr.take_units() == [[("System", "Overflow", False)]]
    tr.apply_rescan(WalkResult("/r", watched=[("/r", 1), ("/r/d", 2)],
                               entries=[("/r/d", True, 0), ("/r/g", False, 500),
                                        ("/r/new", False, 0)]), modified_since_ns=100)
    tr.finalize_listing()
    assert tr.take_units() == [[("Delete", "/r/d/e/f", False)], [("Delete", "/r/d/e", True)],
                               [("Modify", "/r/g", False)], [("Create", "/r/new", False)]]
    assert tr.unwatch == [3]


def test_excluded_names_and_pending_files():
    tr = tree()
    tr.feed([Event(1, F.CREATE, 0, "a.skip"), Event(1, F.CLOSE_WRITE, 0, "a.skip"),
             Event(1, F.CREATE, 0, "p"), Event(1, F.DELETE, 0, "p")], now=0.0)
    assert tr.take_units() == []  # excluded, and a file deleted before its close
    tr.feed([Event(1, F.CREATE | F.ISDIR, 0, "new")], now=0.0)
    assert tr.walk_requests == [("/r/new", True)]
