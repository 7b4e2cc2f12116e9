"""Benchmark uploads/ against a plain directory on the same disk (not a test).

Prints one table, as ratios to the baseline the issue names:

1. ``cp`` of a random file into uploads/ until its task is complete with its SHA-256,
   vs ``cp`` + ``sync`` into a plain directory (medians of alternating runs); peak agent
   RSS for two file sizes (it must not grow with the file).
2. ``rsync -a`` of 5,000 x 4 KiB files in 50 directories until all are complete, vs
   the same into a plain directory.
3. Resume: ``rsync --inplace`` killed (agent SIGKILL) at ~50%, restart,
   ``rsync --append-verify``: bytes sent again as a share of the file.

Usage: ``python bench/bench_uploads.py [--size-mib 2048] [--runs 3] [--rss-mib 1024 4096]``
Work files go to ``--dir`` (default: a temp dir under the current directory's disk).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import AgentProcess  # noqa: E402  (the tests' real-agent harness)

CONFIG = "recent_uploads = 10000\nsettle_seconds = 10\nlog_level = 'warning'\n"


def make_random(path: Path, mib: int) -> None:
    if path.exists() and path.stat().st_size == mib << 20:
        return
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def peak_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_agent(base: Path, name: str) -> AgentProcess:
    d = base / name
    d.mkdir()
    return AgentProcess(d, config=CONFIG, args=["--log-level", "warning"]).start()


def wait_complete(path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while os.getxattr(path, "user.fsagent.state") != b"complete":
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    assert len(os.getxattr(path, "user.fsagent.sha256")) == 64


def cp_upload(agent: AgentProcess, src: Path, name: str) -> float:
    dst = agent.uploads / name
    t0 = time.monotonic()
    dst.touch()  # declare the size first (uploadTasks POST), then copy
    os.setxattr(dst, "user.fsagent.size", str(src.stat().st_size).encode())
    subprocess.run(["cp", src, dst], check=True)
    wait_complete(dst)
    elapsed = time.monotonic() - t0
    os.unlink(dst)
    return elapsed


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sha256_gib_per_s() -> float:
    block, h = os.urandom(1 << 20), hashlib.sha256()
    t0 = time.perf_counter()
    for _ in range(512):
        h.update(block)
    return 0.5 / (time.perf_counter() - t0)


def cp_plain(src: Path, dst: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(["cp", src, dst], check=True)
    os.sync()
    elapsed = time.monotonic() - t0
    os.unlink(dst)
    return elapsed


def small_tree(base: Path) -> Path:
    src = base / "small"
    if not src.exists():
        for d in range(50):
            (src / f"d{d:02d}").mkdir(parents=True)
            for i in range(100):
                (src / f"d{d:02d}" / f"f{i:03d}").write_bytes(os.urandom(4096))
    return src


def count_complete(agent: AgentProcess) -> int:
    return agent.status()["uploads"]["tasks"]["complete"]


def bench_small(agent: AgentProcess, base: Path) -> tuple[float, float]:
    src = small_tree(base)
    os.sync()
    plain = base / "plain-small"
    t0 = time.monotonic()
    subprocess.run(["rsync", "-a", f"{src}/", plain], check=True)
    os.sync()
    t_plain = time.monotonic() - t0
    shutil.rmtree(plain)
    before = count_complete(agent)
    t0 = time.monotonic()
    subprocess.run(["rsync", "-a", f"{src}/", agent.uploads / "small"], check=True)
    while count_complete(agent) < before + 5000:
        time.sleep(0.01)
    return time.monotonic() - t0, t_plain


def bench_resume(agent: AgentProcess, src: Path) -> float:
    dst = agent.uploads / "resume.bin"
    backing = agent.state / "data/uploads/resume.bin"
    size = src.stat().st_size
    rsync = subprocess.Popen(["rsync", "--inplace", src, dst])
    while not backing.exists() or backing.stat().st_size < size // 2:
        time.sleep(0.005)
    agent.kill9()
    rsync.wait()
    agent.start()
    out = subprocess.run(["rsync", "--append-verify", "--stats", src, dst], check=True,
                         capture_output=True, text=True).stdout
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
    assert subprocess.run(["cmp", src, dst]).returncode == 0
    os.unlink(dst)
    return sent / size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rss-mib", type=int, nargs=2, default=[1024, 4096])
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-uploads-", dir=args.dir or Path.cwd()))
    agents: list[AgentProcess] = []
    try:
        src = base / "src.bin"
        make_random(src, args.size_mib)
        agent = start_agent(base, "a")
        agents.append(agent)
        fuse, plain, cpu = [], [], []
        for i in range(args.runs):
            plain.append(cp_plain(src, base / "plain.bin"))
            before = cpu_seconds(agent.proc.pid)
            fuse.append(cp_upload(agent, src, f"run{i}.bin"))
            cpu.append(cpu_seconds(agent.proc.pid) - before)
        t_fuse, t_plain = statistics.median(fuse), statistics.median(plain)
        sha = sha256_gib_per_s()

        rss = []
        for mib in args.rss_mib:
            a = start_agent(base, f"rss{mib}")
            agents.append(a)
            f = base / f"rss{mib}.bin"
            make_random(f, mib)
            cp_upload(a, f, "x.bin")
            rss.append(peak_rss_mib(a.proc.pid))
            a.cleanup()
            f.unlink()

        t_small, t_small_plain = bench_small(agent, base)
        resent = bench_resume(agent, src)
    finally:
        for a in agents:
            a.cleanup()
        shutil.rmtree(base, ignore_errors=True)

    rows = [
        (f"cp {args.size_mib} MiB until complete+SHA-256 (median of {args.runs})",
         f"{t_fuse:.2f} s", f"cp+sync plain {t_plain:.2f} s", f"{t_fuse / t_plain:.2f}x",
         "<= 2.0x"),
        ("  runs: fsagent / plain", " ".join(f"{x:.2f}" for x in fuse),
         " ".join(f"{x:.2f}" for x in plain), "", ""),
        (f"  agent CPU for it (all threads; SHA-256 alone at {sha:.2f} GiB/s: "
         f"{args.size_mib / 1024 / sha:.2f} s)", f"{statistics.median(cpu):.2f} s", "", "", ""),
        (f"peak agent RSS, {args.rss_mib[0]} MiB / {args.rss_mib[1]} MiB file",
         f"{rss[0]:.0f} / {rss[1]:.0f} MiB", "", f"{rss[1] / rss[0]:.2f}x", "<= 150 MiB, flat"),
        ("rsync -a 5,000 x 4 KiB in 50 dirs until complete", f"{t_small:.2f} s",
         f"plain {t_small_plain:.2f} s", f"{t_small / t_small_plain:.1f}x", "<= 5 s"),
        (f"resume after kill -9 at ~50% of {args.size_mib} MiB: bytes re-sent",
         f"{resent * 100:.1f}%", "", "", "<= 55%"),
    ]
    print(f"machine: {os.cpu_count()} cores, kernel {os.uname().release}")
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    head = ("work", "fsagent", "baseline", "ratio", "target")
    widths = [max(w, len(h)) for w, h in zip(widths, head)]
    for r in (head, *rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
