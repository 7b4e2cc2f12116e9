"""The model-based crash test (issue 10): a short seeded run of ``crash_model``.

A random workload through the mount, the agent killed (or stopped) at random moments and
restarted on the same state, every invariant checked after each restart; see
``tests/crash_model.py`` for what is checked and why. The long run is ``make soak``
(``bench/soak_crash.py``).

The seed is random unless ``FSAGENT_CRASH_SEED`` is set, and is printed with the failing
round's operations on failure. ``FSAGENT_CRASH_ROUNDS`` (default 40) and
``FSAGENT_CRASH_SECONDS`` (default 75: no new round starts after that) bound the run.
"""

from __future__ import annotations

import os
import random

from crash_model import play, report


def test_random_workload_with_crashes_keeps_every_invariant(tmp_path):
    seed = int(os.environ.get("FSAGENT_CRASH_SEED") or random.randrange(1, 10**9))
    rounds = int(os.environ.get("FSAGENT_CRASH_ROUNDS", "40"))
    budget = float(os.environ.get("FSAGENT_CRASH_SECONDS", "75"))
    result = play(tmp_path, seed, rounds, budget_seconds=budget)
    rerun = (f"FSAGENT_CRASH_SEED={seed} FSAGENT_CRASH_ROUNDS={result['rounds']} "
             f"python -m pytest tests/test_crash_model.py")
    print(report(result, rerun))
    assert not result["violations"], report(result, rerun)
    assert result["rounds"] >= min(5, rounds), f"only {result['rounds']} rounds in {budget} s"
