"""The model-based crash test (issue 10): a short seeded run of ``crash_model``.

A random workload through the mount, the agent killed (or stopped) at random moments and
restarted on the same state, every invariant checked after each restart; see
``tests/crash_model.py`` for what is checked and why. The long run is ``make soak``
(``bench/soak_crash.py``).

The seed is ``DEFAULT_SEED`` unless ``FSAGENT_CRASH_SEED`` is set (``random`` picks a new
one each run), and is printed with the failing round's operations on failure. The suite
replays one workload on every run, so a red run is a finding, not a roll of the dice;
exploring new seeds is the soak's job (``make soak``, thousands of rounds).
``FSAGENT_CRASH_ROUNDS`` (default 40) and ``FSAGENT_CRASH_SECONDS`` (default 75: no new
round starts after that) bound the run.
"""

from __future__ import annotations

import os
import random

from crash_model import Lineage, _match, play, report

DEFAULT_SEED = 20261129


def test_random_workload_with_crashes_keeps_every_invariant(tmp_path):
    choice = os.environ.get("FSAGENT_CRASH_SEED", "")
    seed = random.randrange(1, 10**9) if choice == "random" else int(choice or DEFAULT_SEED)
    rounds = int(os.environ.get("FSAGENT_CRASH_ROUNDS", "40"))
    budget = float(os.environ.get("FSAGENT_CRASH_SECONDS", "75"))
    result = play(tmp_path, seed, rounds, budget_seconds=budget)
    rerun = (f"FSAGENT_CRASH_SEED={seed} FSAGENT_CRASH_ROUNDS={result['rounds']} "
             f"python -m pytest tests/test_crash_model.py")
    print(report(result, rerun))
    assert not result["violations"], report(result, rerun)
    assert result["rounds"] >= min(5, rounds), f"only {result['rounds']} rounds in {budget} s"


def test_a_file_renamed_over_an_identical_one_is_matched_to_the_renamed_one():
    """Soak seed 35001 (round 419): ``rsync`` put the same bytes at ``rs1/s1`` and at
    ``moved/s1``, then ``rename(rs1/s1 -> moved/s1)`` was cut short by the kill and had
    happened. The one file found, ``moved/s1``, fits both lineages; it must go to the
    renamed one (which cannot be gone), not to the replaced one (which may be)."""
    replaced = Lineage(1, "moved/s1", b"same")
    replaced.maybe = {None}
    renamed = Lineage(2, "rs1/s1", b"same")
    renamed.maybe = {"moved/s1"}
    observed = {"moved/s1": ({}, b"same")}
    claims = {"moved/s1": [replaced, renamed], "rs1/s1": [renamed]}
    fits = {("moved/s1", 1): True, ("moved/s1", 2): True}
    assert _match(observed, claims, fits) == {"moved/s1": renamed}
    # Had the rename not happened, each file is its own lineage's.
    observed["rs1/s1"] = ({}, b"same")
    fits[("rs1/s1", 2)] = True
    assert _match(observed, claims, fits) == {"moved/s1": replaced, "rs1/s1": renamed}
    # A path only a lineage that may be gone fits still goes to it when nothing else can.
    fits[("moved/s1", 2)] = False
    del observed["rs1/s1"]
    assert _match(observed, claims, fits) == {"moved/s1": replaced}
