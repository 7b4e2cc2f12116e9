"""Confinement to ``export_roots``: which client-given paths the RPC services may touch.

Design notes
------------
* Shared by the two services that take paths from RPC clients, ``FileServer``
  (``fsagent/fileserver.py``) and the monitors (``fsagent/monitor/_server.py``), so one
  rule decides for both: a path is made absolute-and-real (``os.path.realpath``:
  symlinks and ``..`` resolved) and must then lie in one of the roots (themselves
  resolved when the ``Confinement`` is made), else ``OmeroFSError("not under an
  exported root: PATH")`` naming the path as the client gave it. No roots, no paths.
* ``check_fd`` checks where an opened descriptor really points (``/proc/self/fd``), so
  a directory swapped for a symlink between ``resolve`` and the open cannot escape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .rpc import OmeroFSError

__all__ = ["Confinement"]


class Confinement:
    """Decides whether a client-given path is inside the exported roots."""

    def __init__(self, roots: tuple[Path, ...] | list[Path]):
        self.roots = tuple(os.path.realpath(r) for r in roots)

    def contains(self, real: str) -> bool:
        return any(real == root or real.startswith(root.rstrip("/") + "/")
                   for root in self.roots)

    def resolve(self, path: Any) -> str:
        """The real path of ``path``, or OmeroFSError if it is not confined."""
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str) or not path:
            raise OmeroFSError(f"expected a path string, got {path!r:.80}")
        if "\0" in path:
            raise OmeroFSError("a path cannot contain NUL")
        if not os.path.isabs(path):
            raise OmeroFSError(f"not an absolute path: {path}")
        real = os.path.realpath(path)
        if not self.contains(real):
            raise OmeroFSError(f"not under an exported root: {path}")
        return real

    def lexical(self, path: str) -> str:
        """``path`` with ``..`` folded but the last component not followed (for lstat);
        only call after ``resolve`` accepted it. The parent is resolved for real."""
        parent, name = os.path.split(os.path.normpath(path))
        real_parent = os.path.realpath(parent)
        if name in ("", ".", "..") or not self.contains(real_parent):
            return os.path.realpath(path)
        return os.path.join(real_parent, name)

    def check_fd(self, fd: int, path: str) -> None:
        real = os.readlink(f"/proc/self/fd/{fd}")
        if not self.contains(real):
            raise OmeroFSError(f"not under an exported root: {path}")
