"""The mounted filesystem.

Public surface:

* ``Filesystem`` — the pyfuse3 ``Operations`` adapter (inode and handle tables,
  error guard). Thin: it forwards every request to a ``Node`` or ``Handle``.
* ``Node``, ``Handle`` and the ready-made ``Directory``, ``DynamicFile`` and
  ``SnapshotHandle`` — what trees are built from; ``make_attributes`` fills
  ``EntryAttributes``.

Which node classes make up which part of the tree is decided by the module that owns
that part: the root in ``fsagent.agent``, ``uploads/`` and ``jobs/`` in their own
packages.
"""

from ._nodes import (
    Directory,
    DynamicFile,
    Handle,
    Node,
    SnapshotHandle,
    fuse_error,
    make_attributes,
)
from ._operations import Filesystem

__all__ = [
    "Directory", "DynamicFile", "Filesystem", "Handle", "Node", "SnapshotHandle",
    "fuse_error", "make_attributes",
]
