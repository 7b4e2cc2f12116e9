"""``uploads/``: every file written there is a durable, resumable, verified upload.

Public surface: ``UploadsComponent`` (listed in ``fsagent.agent.build_components``) and
``add_upload_commands`` (``fsagent upload``/``uploads``, over RPC: ``_cli.py``).
It adds ``MOUNT/uploads/`` (a passthrough tree over ``config.uploads_dir``) and
``MOUNT/uploads.json`` (the task list) to the mount. Inside:

* ``_task.py`` — the task state machine (one transition table) and completion rules;
* ``_store.py`` — ``Task`` records in memory and their rows in SQLite;
* ``_nodes.py`` — the FUSE nodes and handles over the backing tree;
* ``_hashing.py`` — on-the-fly hashing of the write stream, and re-hashing;
* ``_manifests.py`` — MD5SUMS/SHA1SUMS/SHA256SUMS and NAME.md5/.sha1/.sha256;
* ``_component.py`` — the component: write path, checkpoints, crash recovery,
  verification, the import hand-off and ``uploads.json``.
* ``_service.py`` — ``UploadTasks.*`` and ``ImportProcess.*`` over msgpack-RPC;
  ``_processes.py`` — import processes (one explicit fileset each) and their rows.
"""

import importlib

from ._cli import add_upload_commands

__all__ = ["UploadsComponent", "add_upload_commands"]


def __getattr__(name: str):
    # The component (FUSE, the job hand-off, the repository cache) on first use only
    # (PEP 562): ``fsagent upload`` builds its parser from this package and needs none
    # of it.
    if name != "UploadsComponent":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = importlib.import_module("._component", __name__).UploadsComponent
    globals()[name] = value
    return value
