"""What one FUSE request costs a pyfuse3 server that does nothing (issue 12; not a test).

The agent's CPU per small file is bounded below by the requests the kernel sends for it
(``rsync -a``: 18 per file, see README "Small files on the FUSE path") times what
pyfuse3 under trio costs per request before any handler runs. This bench measures that
floor: a filesystem with one file whose ``getattr`` returns a constant (attributes never
cached, so every ``stat`` is one request), served in its own process, and ``--requests``
``stat`` calls from this one. It prints the server's CPU per request (utime and stime
from ``/proc/PID/stat``) and the client's wall time per call, for pyfuse3's worker
model as the agent runs it (``max_tasks=1000``: a second reader task takes the fd while
the first handles a request) and with a single worker (``max_tasks=1``: no hand-off,
but one slow request would stall the mount, so the agent cannot use it). Runs are
interleaved; medians and min-max.

Usage: ``python bench/fuse_floor.py [--requests 50000] [--runs 3]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = r'''
import errno, stat, sys
import pyfuse3, trio

class Constant(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o644)
        e.st_nlink = 1
        e.attr_timeout = 0
        e.entry_timeout = 3600
        return e

    async def lookup(self, parent, name, ctx=None):
        if name == b"f":
            return await self.getattr(2)
        raise pyfuse3.FUSEError(errno.ENOENT)

pyfuse3.init(Constant(), sys.argv[1], ["fsname=fsagent-floor"])
try:
    trio.run(lambda: pyfuse3.main(max_tasks=int(sys.argv[2])))
finally:
    pyfuse3.close(unmount=False)
'''

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> tuple[float, float]:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def is_mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in open("/proc/self/mounts"))


def one_run(work: Path, max_tasks: int, requests: int) -> dict:
    mount = work / f"mnt-{max_tasks}"
    mount.mkdir(exist_ok=True)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(mount), str(max_tasks)])
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mount):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the floor server did not mount (exit {server.poll()})")
            time.sleep(0.02)
        target = str(mount / "f")
        os.stat(target)  # the lookup, once
        user0, sys0 = cpu(server.pid)
        t0 = time.perf_counter()
        for _ in range(requests):
            os.stat(target)
        wall = time.perf_counter() - t0
        user1, sys1 = cpu(server.pid)
        return {"user_us": (user1 - user0) / requests * 1e6,
                "sys_us": (sys1 - sys0) / requests * 1e6,
                "wall_us": wall / requests * 1e6}
    finally:
        subprocess.run(["fusermount3", "-u", str(mount)], check=False)
        server.wait(timeout=30)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, kernel {os.uname().release}, load "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}; pyfuse3 under trio, "
          f"{args.requests} getattr requests a run, {args.runs} interleaved runs")
    results: dict[int, list[dict]] = {1000: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="fsagent-floor-") as tmp:
        for _ in range(args.runs):
            for max_tasks in results:
                results[max_tasks].append(one_run(Path(tmp), max_tasks, args.requests))
    print(f"{'server':44} | {'CPU/request us (user+sys)':26} | {'user':18} | {'sys':18} | "
          f"{'client wall/stat us':20} | x18 (rsync, ms/file)")
    for max_tasks, runs in results.items():
        total = [r["user_us"] + r["sys_us"] for r in runs]
        label = ("pyfuse3.main(max_tasks=1000), as the agent" if max_tasks == 1000
                 else "pyfuse3.main(max_tasks=1), one worker")
        print(f"{label:44} | {spread(total):26} | {spread([r['user_us'] for r in runs]):18} | "
              f"{spread([r['sys_us'] for r in runs]):18} | "
              f"{spread([r['wall_us'] for r in runs]):20} | "
              f"{statistics.median(total) * 18 / 1000:.2f}")


if __name__ == "__main__":
    main()
