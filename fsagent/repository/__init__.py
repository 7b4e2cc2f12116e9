"""The repository: where verified uploads go when they leave the machine.

Public surface:

* ``RepositoryComponent`` — the agent component named ``"repository"``: the backend
  chosen by ``repository.backend`` (``local``: the data stays in the state directory;
  ``s3``: an S3-compatible object store), ``push_fileset`` for the ``import`` kind, the
  ``repository`` section of ``status`` and the ``fsagent_repository_*`` metrics.
* ``PushFailed`` — a push that cannot succeed by trying again (credentials, bucket,
  permission, an object the store reports differently): the import fails with it.

Inside: ``_push`` (the plan, a pure core: keys, parts, resume decisions, what the
store must report, backoff), ``_s3`` (the botocore adapter and its error kinds),
``_pusher`` (the resumable, concurrent push and its durable state), ``_cache`` (the
local disk as a cache: eviction, read-back, fetch-back, deletes on unlink),
``_component``.
"""

from ._component import RepositoryComponent
from ._pusher import PushFailed

__all__ = ["RepositoryComponent", "PushFailed"]
