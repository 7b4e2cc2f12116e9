"""Which paths a monitor reports: whitelist, blacklist and system files.

Design notes
------------
* **Whitelist** entries are extensions or globs: ``tif``, ``.tif`` and ``*.tif`` all
  mean "names ending in .tif"; anything with a glob character is a glob on the file
  name. Case-insensitive. Empty means every file. It applies to files only (a
  client that wants no directory events sets ``ignoreDirEvents``).
* **Blacklist** entries are case-insensitive globs matched against every path
  component below the monitored root and against the whole path. A blacklisted
  directory is not even watched, so nothing under it costs a watch or an event.
* **System files** (``ignoreSysFiles``) are matched the same way: dotfiles,
  editor/partial files, NFS and macOS droppings, Windows' folder litter. OMERO.fs on
  Linux accepted these options and ignored them.
"""

from __future__ import annotations

import fnmatch
import os
import re

__all__ = ["Filters", "SYSTEM_FILE_GLOBS"]

SYSTEM_FILE_GLOBS = (
    ".*", "*~", ".#*", "*.swp", "*.part", "*.crdownload", ".nfs*", "._*", ".ds_store",
    "thumbs.db", "desktop.ini", "$recycle.bin", "lost+found", "untitled folder",
    "new folder",
)


def _compile(globs) -> re.Pattern | None:
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g.lower())})" for g in globs))


def _whitelist_glob(entry: str) -> str:
    entry = entry.strip()
    if any(c in entry for c in "*?["):
        return entry
    return "*." + entry.lstrip(".")


class Filters:
    def __init__(self, root: str, whitelist=(), blacklist=(), ignore_sys_files=False):
        self.root = root.rstrip("/") or "/"
        self._white = _compile([_whitelist_glob(w) for w in whitelist if w.strip()])
        self._black = _compile([b for b in blacklist if b])
        self._sys = _compile(SYSTEM_FILE_GLOBS) if ignore_sys_files else None

    def _components(self, path: str) -> list[str]:
        rel = os.path.relpath(path, self.root)
        return [] if rel == "." else rel.lower().split("/")

    def excluded(self, path: str) -> bool:
        """True if ``path`` (or a directory above it, below the root) is blacklisted or a
        system file: it is neither reported nor, for a directory, watched."""
        if self._black is None and self._sys is None:
            return False
        parts = self._components(path)
        for pattern in (self._black, self._sys):
            if pattern is None:
                continue
            if any(pattern.fullmatch(p) for p in parts):
                return True
        return self._black is not None and bool(self._black.fullmatch(path.lower()))

    def wanted_file(self, path: str) -> bool:
        """Whitelist check for a file's name."""
        return self._white is None or bool(
            self._white.fullmatch(os.path.basename(path).lower()))
