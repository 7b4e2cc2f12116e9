"""Job engine benchmarks against a live agent; prints a table against issue 4's targets.

Not a test. Run: .venv/bin/python bench/bench_jobs.py

1. `archive` (store) of 1 GiB in 100 files vs `zip -0 -r` of the same tree, run side by
   side (alternating), median of the per-pair ratios; target <= 1.5x. The job's time
   runs from the `spec` write to `wait` returning, so it includes queueing, streaming,
   the fsync of the archive and its publication; `zip` is timed as it exits (no fsync).
2. `ls jobs/` with 10,000 jobs in the engine; target <= 1 s.
3. `jobs/ID/progress` of a running archive, polled every 50 ms: the longest time it
   stayed unchanged while the job ran; target < 1 s.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import AgentProcess  # noqa: E402

ROUNDS = 3


def make_tree(uploads: Path) -> Path:
    tree = uploads / "bench"
    chunk = os.urandom(1 << 20)
    for i in range(100):
        d = tree / f"d{i // 10}"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"f{i:03d}.bin", "wb") as f:
            for _ in range(10 * 1024 // 100):  # ~10.24 MiB each, 1 GiB in all
                f.write(chunk[: 1 << 20])
    subprocess.run(["sync"], check=True)
    return tree


def submit_and_wait(agent: AgentProcess, name: str, spec: dict) -> float:
    t0 = time.perf_counter()
    os.mkdir(agent.jobs / name)
    (agent.jobs / name / "spec").write_text(json.dumps(spec))
    state = (agent.jobs / name / "wait").read_text().strip()
    elapsed = time.perf_counter() - t0
    assert state == "success", (name, state, (agent.jobs / name / "message").read_text())
    return elapsed


def bench_archive(agent: AgentProcess, tree: Path, scratch: Path) -> tuple[list, list]:
    ours, zips = [], []
    for r in range(ROUNDS):
        ours.append(submit_and_wait(agent, f"arch{r}", {"type": "archive",
                                                          "paths": ["bench"]}))
        out = scratch / f"zip{r}.zip"
        t0 = time.perf_counter()
        subprocess.run(["zip", "-0", "-r", "-q", str(out), "bench"], cwd=tree.parent,
                       check=True)
        zips.append(time.perf_counter() - t0)
        out.unlink()
    return ours, zips


def bench_progress(agent: AgentProcess) -> float:
    name = "progress"
    os.mkdir(agent.jobs / name)
    (agent.jobs / name / "spec").write_text(json.dumps({"type": "archive",
                                                        "paths": ["bench"]}))
    last_value, last_change, longest = None, time.perf_counter(), 0.0
    while True:
        status = (agent.jobs / name / "status").read_text().strip()
        now = time.perf_counter()
        if status not in ("pending", "running"):
            break
        value = (agent.jobs / name / "progress").read_text()
        if status == "running":
            if value != last_value:
                if last_value is not None:
                    longest = max(longest, now - last_change)
                last_value, last_change = value, now
        time.sleep(0.05)
    return longest


def bench_listing(agent: AgentProcess, count: int = 10_000) -> tuple[float, float]:
    agent.stop()
    conn = sqlite3.connect(agent.state / "fsagent.db")
    now = time.time()
    with conn:
        conn.executemany(
            "INSERT INTO jobs (id, seq, kind, spec, state, priority, progress, message,"
            " error_code, error_description, content, outputs, owner_uid, created, completed,"
            " runtime, updated) VALUES (?, ?, 'archive', '{\"paths\": [\"bench\"]}',"
            " 'success', 0, 100, 'done', 0, 'Success', '{}', '[]', NULL, ?, ?, 1.0, ?)",
            [(str(uuid.uuid4()), 1000 + i, now, now, now) for i in range(count)])
    conn.close()
    agent.start()
    times, long_times = [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        out = subprocess.run(["ls", str(agent.jobs)], capture_output=True, check=True).stdout
        times.append(time.perf_counter() - t0)
        assert len(out.splitlines()) >= count
        t0 = time.perf_counter()
        subprocess.run(["ls", "-l", str(agent.jobs)], capture_output=True, check=True)
        long_times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(long_times)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-jobs-", dir=ROOT) as tmp:
        base = Path(tmp)
        agent = AgentProcess(base, config="job_history = 20000\nmax_concurrent_jobs = 1\n")
        uploads = agent.state / "data" / "uploads"
        uploads.mkdir(parents=True)
        scratch = base / "scratch"
        scratch.mkdir()
        print("making 1 GiB in 100 files ...", flush=True)
        tree = make_tree(uploads)
        try:
            agent.start()
            ours, zips = bench_archive(agent, tree, scratch)
            gap = bench_progress(agent)
            ls_s, ls_l = bench_listing(agent)
        finally:
            agent.cleanup()
    ratios = [o / z for o, z in zip(ours, zips)]
    uname = os.uname().release
    print(f"\nmachine: {os.cpu_count()} cores, Linux {uname}")
    print(f"{'measure':<52} {'fsagent':>10} {'baseline':>10} {'ratio':>7} {'target':>9}")
    print(f"{'archive 1 GiB / 100 files, store (median s)':<52} "
          f"{statistics.median(ours):>10.2f} {statistics.median(zips):>10.2f} "
          f"{statistics.median(ratios):>7.2f} {'<= 1.5x':>9}")
    print(f"{'  per round (job s / zip -0 -r s)':<52} "
          + ", ".join(f"{o:.2f}/{z:.2f}" for o, z in zip(ours, zips)))
    print(f"{'ls jobs/ with 10,000 jobs (median s)':<52} {ls_s:>10.3f} {'':>10} "
          f"{'':>7} {'<= 1 s':>9}")
    print(f"{'ls -l jobs/ with 10,000 jobs (median s)':<52} {ls_l:>10.3f}")
    print(f"{'longest unchanged progress of a running archive (s)':<52} {gap:>10.2f} "
          f"{'':>10} {'':>7} {'< 1 s':>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
