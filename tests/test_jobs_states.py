"""The job state machine, pure: every (verb, state) pair has exactly one outcome."""

from __future__ import annotations

import itertools

import pytest

from fsagent.jobs import IllegalMove, State, TRANSITIONS, UnknownVerb
from fsagent.jobs._states import ENGINE_VERBS, USER_VERBS, next_state

P, R, Z = State.PENDING, State.RUNNING, State.PAUSED
S, F, C = State.SUCCESS, State.FAILURE, State.CANCELLED

# The rules, written out independently of the table they check.
EXPECTED = {
    ("start", P): R, ("succeed", R): S, ("fail", R): F, ("requeue", R): P,
    ("pause", P): Z, ("pause", R): Z, ("resume", Z): P,
    ("cancel", P): C, ("cancel", Z): C, ("cancel", R): C,
    ("retry", F): P, ("retry", C): P,
    # repeats of a verb whose result already holds
    ("pause", Z): Z, ("cancel", C): C, ("resume", P): P, ("resume", R): R, ("retry", P): P,
}


@pytest.mark.parametrize("verb,state", list(itertools.product(USER_VERBS + ENGINE_VERBS,
                                                              State)))
def test_every_pair(verb, state):
    if (verb, state) in EXPECTED:
        assert next_state("j1", verb, state) is EXPECTED[verb, state]
    else:
        with pytest.raises(IllegalMove) as e:
            next_state("j1", verb, state)
        assert (e.value.job_id, e.value.verb, e.value.state) == ("j1", verb, state)


def test_illegal_move_names_the_job_the_verb_and_the_state():
    with pytest.raises(IllegalMove, match=r"job 'exp1': cannot retry a running job"):
        next_state("exp1", "retry", R)
    with pytest.raises(IllegalMove, match=r"job 'x': cannot pause an? success job"):
        next_state("x", "pause", S)


def test_unknown_verb():
    with pytest.raises(UnknownVerb, match=r"job 'j': unknown verb 'explode'"):
        next_state("j", "explode", P)


def test_a_cancelled_job_never_starts_and_only_retry_leaves_cancelled():
    leaving = {verb for (verb, state), to in TRANSITIONS.items() if state is C and to is not C}
    assert leaving == {"retry"}
    with pytest.raises(IllegalMove):
        next_state("j", "start", C)


def test_final_states():
    assert {s for s in State if s.final} == {S, F, C}
    assert S.orthanc == "Success"
