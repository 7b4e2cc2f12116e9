"""The crash soak (issue 10): many rounds of the model-based crash workload (not a test).

Each round: two or three writers drive a random workload through the mount, the agent is
killed with SIGKILL (sometimes stopped with SIGTERM) at a random moment, restarted on the
same state, and every invariant of ``tests/crash_model.py`` is checked. A fresh state
directory every ``--rounds-per-state`` rounds keeps the job history small.

Usage: ``python bench/soak_crash.py [--rounds 2000] [--seed N] [--rounds-per-state 50]
[--dir DIR] [--keep-going]``. Prints the rounds played and the violations (with the seed,
the rerun command and the failing round's operations); exit status 1 if there were any.
With ``--keep-going`` a round with violations does not end the soak: the next seed starts.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from crash_model import play, report  # noqa: E402  (the tests' workload and checks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--rounds-per-state", type=int, default=50)
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    p.add_argument("--keep-going", action="store_true",
                   help="after a failing seed, go on with a new one")
    args = p.parse_args()
    seed = args.seed or random.randrange(1, 10**9)
    base = Path(tempfile.mkdtemp(prefix="fsagent-soak-", dir=args.dir))
    started = time.monotonic()
    total_rounds, failures = 0, []

    def progress(played, run, problems):
        done = total_rounds + played
        if problems or done % 25 == 0:
            print(f"[{time.monotonic() - started:7.0f} s] round {done}: "
                  f"{'VIOLATIONS' if problems else 'ok'}", flush=True)

    while total_rounds < args.rounds:
        result = play(base / f"seed{seed}", seed, args.rounds - total_rounds,
                      rounds_per_state=args.rounds_per_state, progress=progress)
        total_rounds += result["rounds"]
        if result["violations"]:
            failures.append(result)
            print(report(result, f"python bench/soak_crash.py --seed {seed} "
                                 f"--rounds {result['rounds']}"), flush=True)
            if not args.keep_going:
                break
            seed = random.randrange(1, 10**9)
    violations = sum(len(r["violations"]) for r in failures)
    print(f"soak: {total_rounds} rounds, {violations} violations "
          f"({len(failures)} failing seeds) in {time.monotonic() - started:.0f} s")
    if failures:
        print(f"the failing rounds' state dirs and agent logs are kept in {base}")
        return 1
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
