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

from crash_model import play, report

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
