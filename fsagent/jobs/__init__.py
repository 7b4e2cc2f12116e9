"""Jobs: a persistent job engine whose status, control and outputs are files.

Public surface:

* ``JobsComponent`` — the agent component named ``"jobs"``: ``MOUNT/jobs/`` and
  ``MOUNT/jobs.json``, the scheduler task, the ``jobs`` section of ``status``, the
  ``Jobs.*`` RPC methods, and the hand-off verbs the uploads component calls
  (``submit``, ``cancel_if_not_started``, ``job_state``, ``import_state``,
  ``release_import``, ``import_moved``, ``wait_job``).
* ``State``, ``IllegalMove``, ``UnknownVerb``, ``TRANSITIONS`` — the state machine.
* ``KINDS`` — the registry of job kinds (``import``, ``archive``, ``verify``).
* ``add_jobs_commands`` — ``fsagent jobs ...`` (over RPC).

Inside: ``_component`` (``JobsComponent``), ``_states`` (the transition table),
``_engine`` (verbs, scheduler, persistence, history), ``_kinds`` (the kind contract and path confinement),
``_nodes`` (the FUSE tree), one module per kind.
"""

from __future__ import annotations

import importlib

from ._cli import add_jobs_commands
from ._states import TRANSITIONS, IllegalMove, State, UnknownVerb

__all__ = [
    "JobsComponent", "State", "IllegalMove", "UnknownVerb", "TRANSITIONS", "KINDS",
    "BadSpec", "NoSuchJob", "JobExists", "JobNotFinished", "ShuttingDown", "add_jobs_commands",
]

# What only a running agent needs comes from ``_component`` on first use (PEP 562): the
# commands (``fsagent upload``, ``fsagent jobs``) build their parsers from this package,
# and the job kinds pull in the S3 client, ~0.25 s of CPU each command paid for nothing.
_FROM_COMPONENT = {"JobsComponent", "KINDS", "BadSpec", "NoSuchJob", "JobExists",
                   "JobNotFinished", "ShuttingDown"}


def __getattr__(name: str):
    if name not in _FROM_COMPONENT:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("._component", __name__), name)
    globals()[name] = value
    return value
