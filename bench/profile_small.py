"""Profile the small-file path of uploads/ (not a test): what one 4 KiB file costs the agent.

Starts a real agent (the tests' ``AgentProcess``), ``rsync -a``'s ``--files`` x
``--size`` bytes in ``--dirs`` directories into ``uploads/``, waits until every upload
is complete (and, with ``--jobs``, every import job has ended), and prints:

* agent CPU per file (utime + stime of the whole process, ``/proc/PID/stat``) at the
  end of the rsync, when all uploads are complete, and when the jobs are done;
* FUSE requests per file by operation (``fsagent_fuse_requests_total`` from
  ``MOUNT/metrics``, before minus after; the metrics reads themselves add a handful);
* with ``--untracked``: the same rsync into ``uploads/.~tmp~/`` (rsync's
  ``--delay-updates`` directory: nothing in it is an upload task), so the numbers are
  the FUSE path alone, without completion, SQLite and import jobs;
* with ``--pyspy PATH`` (a py-spy binary): a sampling profile of the agent over the
  same window (``--gil``: only the thread holding the GIL is sampled, so the shares
  are of Python work, not of threads waiting in fsync or epoll), summed per layer
  (see ``LAYERS``) and per FUSE handler.

Usage: ``python bench/profile_small.py [--files 2000] [--dirs 20] [--pyspy /tmp/pyspy/bin/py-spy]``
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import AgentProcess  # noqa: E402  (the tests' real-agent harness)

CONFIG = ("recent_uploads = 100000\nsettle_seconds = 10\nlog_level = 'warning'\n")

# (layer, pattern matched against one frame): the first layer, in this order, that any
# frame of a sample matches takes the sample. Inner work first, so SQLite under a
# handler counts as SQLite, and a handler's own Python as "FUSE handlers".
LAYERS = [
    ("SQLite (fsagent/db.py)", re.compile(r"fsagent/db\.py|sqlite3")),
    ("job engine (fsagent/jobs)", re.compile(r"fsagent/jobs/")),
    ("hashing", re.compile(r"_hashing\.py|hashlib")),
    ("checkpoints/sync", re.compile(r"_checkpoints\.py|_writer\.py")),
    ("completion + hand-off", re.compile(r"_completion\.py|_handoff\.py|_manifests\.py")),
    ("FUSE handlers (fs/, uploads/ nodes + component)",
     re.compile(r"fsagent/fs/_operations\.py")),
    ("pyfuse3 request loop (no handler frame)", re.compile(r"pyfuse3")),
    ("other uploads/", re.compile(r"fsagent/uploads/")),
    ("other fsagent", re.compile(r"fsagent/(?!cli\.py|__main__\.py)")),
    ("trio scheduler, worker threads", re.compile(r"trio/|threading\.py")),
]


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fuse_requests(agent: AgentProcess) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for line in (agent.mount / "metrics").read_text().splitlines():
        m = re.match(r'fsagent_fuse_requests_total\{op="(\w+)"\} (\d+)', line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def make_tree(base: Path, files: int, dirs: int, size: int) -> Path:
    src = base / "src"
    per_dir = -(-files // dirs)
    n = 0
    for d in range(dirs):
        (src / f"d{d:03d}").mkdir(parents=True)
        for i in range(per_dir):
            if n == files:
                break
            (src / f"d{d:03d}" / f"f{i:05d}").write_bytes(os.urandom(size))
            n += 1
    return src


def wait_until(what, predicate, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def layer_table(raw: Path) -> tuple[collections.Counter, collections.Counter, int]:
    """Samples per layer and per FUSE handler from py-spy's raw (collapsed) output."""
    layers: collections.Counter = collections.Counter()
    handlers: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for name, pattern in LAYERS:
            if any(pattern.search(f) for f in frames):
                layers[name] += n
                break
        else:
            layers["unattributed"] += n
        # The guard's wrapper keeps its own code name: the handler is the frame after it.
        for i, f in enumerate(frames[:-1]):
            if f.startswith("_guard.<locals>.guarded (fsagent/fs/_operations.py"):
                m = re.match(r"Filesystem\.(\w+) ", frames[i + 1])
                handlers[m.group(1) if m else frames[i + 1].split(" (")[0]] += n
                break
    return layers, handlers, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--dirs", type=int, default=20)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--jobs", action="store_true", help="also wait until every import ended")
    ap.add_argument("--untracked", action="store_true",
                    help="rsync into uploads/.~tmp~/ (no tasks): the FUSE path alone")
    ap.add_argument("--pyspy", help="path of a py-spy binary: profile the agent (200 Hz)")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--keep-profile", type=Path, help="where to keep py-spy's raw output")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="profile-small-", dir=args.dir or Path.cwd()))
    agent = None
    spy = None
    try:
        src = make_tree(base, args.files, args.dirs, args.size)
        os.sync()
        (base / "a").mkdir()
        agent = AgentProcess(base / "a", config=CONFIG, args=["--log-level", "warning"]).start()
        pid = agent.proc.pid
        raw = args.keep_profile or base / "pyspy.txt"
        if args.pyspy:
            spy = subprocess.Popen([args.pyspy, "record", "-r", "200", "-p", str(pid), "-o",
                                    str(raw), "--format", "raw", "--gil"]
                                   + (["--native"] if args.native else ["--nonblocking"]),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches
        req0, cpu0, t0 = fuse_requests(agent), cpu_seconds(pid), time.monotonic()
        dest = agent.uploads / "small"
        if args.untracked:
            (agent.uploads / ".~tmp~").mkdir()
            dest = agent.uploads / ".~tmp~" / "small"
        subprocess.run(["rsync", "-a", f"{src}/", dest], check=True)
        t_rsync, cpu_rsync = time.monotonic() - t0, cpu_seconds(pid) - cpu0
        req1 = fuse_requests(agent)

        def complete() -> int:
            return agent.status()["uploads"]["tasks"]["complete"]

        if not args.untracked:
            wait_until("complete", lambda: complete() >= args.files)
        t_complete, cpu_complete = time.monotonic() - t0, cpu_seconds(pid) - cpu0
        t_jobs = cpu_jobs = None
        if args.jobs:
            def jobs_idle() -> bool:
                counts = agent.status()["jobs"]["counts"]
                return counts["pending"] + counts["running"] == 0
            wait_until("jobs", jobs_idle)
            t_jobs, cpu_jobs = time.monotonic() - t0, cpu_seconds(pid) - cpu0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        if agent is not None:
            agent.cleanup()
    n = args.files
    print(f"{n} x {args.size} B files in {args.dirs} dirs, rsync -a into uploads/")
    print(f"  rsync done      {t_rsync:7.2f} s  agent CPU {cpu_rsync:6.2f} s "
          f"= {1000 * cpu_rsync / n:.3f} ms/file")
    print(f"  all complete    {t_complete:7.2f} s  agent CPU {cpu_complete:6.2f} s "
          f"= {1000 * cpu_complete / n:.3f} ms/file")
    if t_jobs is not None:
        print(f"  imports ended   {t_jobs:7.2f} s  agent CPU {cpu_jobs:6.2f} s "
              f"= {1000 * cpu_jobs / n:.3f} ms/file")
    delta = req1 - req0
    print(f"  FUSE requests during rsync: {sum(delta.values())} = "
          f"{sum(delta.values()) / n:.2f}/file")
    print("    " + ", ".join(f"{op} {c / n:.2f}" for op, c in delta.most_common()))
    if args.pyspy and raw.exists():
        layers, handlers, total = layer_table(raw)
        print(f"  py-spy: {total} samples (all threads, non-idle)")
        for name, c in layers.most_common():
            print(f"    {100 * c / total:5.1f}%  {name}")
        fuse = sum(handlers.values())
        print("    FUSE handler samples by op (incl. what they call): " + ", ".join(
            f"{op} {100 * c / total:.1f}%" for op, c in handlers.most_common()))
        if args.keep_profile is None:
            raw.unlink()
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
