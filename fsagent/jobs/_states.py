"""The job state machine: one transition table, nothing else.

Design notes
------------
* **One table.** ``TRANSITIONS`` maps ``(verb, state)`` to the next state. Every
  state change anywhere in the engine goes through ``next_state``, so the rules live
  here and nowhere else (h11's approach): a handler cannot invent a move.
* **Verbs.** Users say ``pause``, ``resume``, ``cancel``, ``retry`` (the ``control``
  file, the RPC methods, the CLI). The engine says ``start``, ``succeed``, ``fail``
  and ``requeue`` (a job found ``running`` when the agent starts was interrupted by a
  stop or a crash; it goes back to the queue).
* **Idempotence.** Files-as-API convention: repeating a verb whose result already
  holds is not an error (``echo pause > control`` twice). ``HOLDS`` says which state
  already satisfies which user verb; ``next_state`` returns the state unchanged then.
* **Errors name the job, the verb and the state**, so a refused ``echo`` or RPC call
  explains itself: ``job 'exp1': cannot retry a running job``.
* Pure: no I/O, no clock. The engine persists and schedules; this module decides.
"""

from __future__ import annotations

import enum

__all__ = [
    "State", "IllegalMove", "UnknownVerb", "TRANSITIONS", "USER_VERBS", "ENGINE_VERBS",
    "FINAL_STATES", "next_state", "ErrorCode",
]


class State(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def orthanc(self) -> str:
        """The spelling of Orthanc's job records (``"Success"``), used in info.json."""
        return self.value.capitalize()


P, R, Z = State.PENDING, State.RUNNING, State.PAUSED
S, F, C = State.SUCCESS, State.FAILURE, State.CANCELLED

FINAL_STATES = frozenset({S, F, C})
USER_VERBS = ("cancel", "pause", "resume", "retry")
ENGINE_VERBS = ("start", "succeed", "fail", "requeue")

TRANSITIONS: dict[tuple[str, State], State] = {
    ("start", P): R,
    ("succeed", R): S,
    ("fail", R): F,
    ("requeue", R): P,
    # A running job stops cooperatively at its next step; it is paused from now on.
    ("pause", P): Z,
    ("pause", R): Z,
    ("resume", Z): P,
    # OMERO's rule: a cancelled job never starts (no move leaves CANCELLED but retry).
    ("cancel", P): C,
    ("cancel", Z): C,
    ("cancel", R): C,
    # The kind resets its work when the job runs again.
    ("retry", F): P,
    ("retry", C): P,
}

# User verbs whose outcome already holds in these states: a repeat is a no-op.
HOLDS: dict[str, frozenset[State]] = {
    "pause": frozenset({Z}),
    "resume": frozenset({P, R}),
    "cancel": frozenset({C}),
    "retry": frozenset({P}),
}


class IllegalMove(Exception):
    """A verb that the job's current state does not allow (EBUSY on the control file)."""

    def __init__(self, job_id: str, verb: str, state: State):
        article = "an" if state.value[0] in "aeiou" else "a"
        super().__init__(f"job {job_id!r}: cannot {verb} {article} {state.value} job")
        self.job_id, self.verb, self.state = job_id, verb, state


class UnknownVerb(Exception):
    """Not a verb at all (EINVAL on the control file)."""

    def __init__(self, job_id: str, verb: str):
        super().__init__(f"job {job_id!r}: unknown verb {verb!r}; "
                         f"expected one of {', '.join(USER_VERBS)}")
        self.job_id, self.verb = job_id, verb


def next_state(job_id: str, verb: str, state: State) -> State:
    """The state after ``verb``; raises ``UnknownVerb`` or ``IllegalMove``."""
    if verb not in USER_VERBS and verb not in ENGINE_VERBS:
        raise UnknownVerb(job_id, verb)
    try:
        return TRANSITIONS[verb, state]
    except KeyError:
        if state in HOLDS.get(verb, ()):
            return state
        raise IllegalMove(job_id, verb, state) from None


class ErrorCode(enum.IntEnum):
    """``ErrorCode`` of info.json and the number in the ``error`` file."""

    SUCCESS = 0
    INTERNAL = 1          # the kind raised something unexpected (a bug, or the disk)
    BAD_INPUT = 2         # a path vanished or escaped uploads/ between submit and run
    CHANGED = 3           # the uploaded file no longer matches what the upload verified
    COMMAND_FAILED = 4    # import_command exited non-zero
    COMMAND_NOT_FOUND = 5  # import_command's executable does not exist
    REPOSITORY = 6        # the repository refused the push, or an object did not verify
