"""Benchmark ``fsagent upload`` (RPC) against ``cp``/``rsync`` into the mount (issue 13; not
a test).

Prints the machine, then one table with the issue's two comparisons, each measured side
by side in one run, interleaved (the order of the methods rotates every round), medians
and min-max:

A. One big random file (``--size-mib``, default 2048): ``cp`` into ``MOUNT/uploads/``
   with its size declared first (``user.fsagent.size``), timed until the task is
   ``complete`` (``user.fsagent.state``, polled every 10 ms), against ``fsagent upload``
   of the same file over the Unix socket and over TCP on loopback (``--connect``, token),
   timed until the command returns: it returns after ``verifyUpload``, which answers
   once the file is complete and its hash matches, so both end at "complete".
B. A tree of ``--files`` (5,000) x 4 KiB files in directories of 100: ``rsync -a`` into
   the mount, timed until every task is ``complete`` (``MOUNT/status`` polled), against
   ``fsagent upload`` of the tree over the Unix socket until it returns.

Every measured run gets a **fresh agent** (new state dir; TCP on with a token): the task
table and job history a previous run left would make later runs measure another agent.
Per run also: the agent's CPU (utime + stime of all its threads, ``/proc/PID/stat``,
delta over the timed span) and the client's (``cp``/``rsync``/``fsagent upload``, from
``wait4``'s rusage). The source files are read once before the runs (page cache), so no
method pays for the first read.

Targets (issue 13): upload <= 1.25x cp for the big file over both transports; upload
<= 1.5x rsync for the tree.

Which code runs: as ``bench_filesets.py`` (this script reuses its helpers): agents and
CLIs get ``PYTHONPATH`` = the tree this script lives in; ``make bench-upload-rpc`` runs
it from a ``git archive`` snapshot of HEAD. ``--quick``: 256 MiB, 1,000 files, 2 rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import bench_filesets as bf  # noqa: E402  (the machine, the code, CPU of a pid)
from conftest import AgentProcess  # noqa: E402  (bench_filesets put tests/ on the path)

TOKEN = "bench-upload-rpc-token-0123456789"
CONFIG = (f'rpc_tcp_listen = "127.0.0.1:0"\nrpc_token = "{TOKEN}"\n')


def start_agent(base: Path, log_level: str) -> AgentProcess:
    base.mkdir()
    agent = AgentProcess(base, config=CONFIG, args=["--log-level", log_level],
                         env=bf.agent_env()).start()
    environ = open(f"/proc/{agent.proc.pid}/environ", "rb").read().split(b"\0")
    assert f"PYTHONPATH={bf.ROOT}".encode() in environ, "agent runs with another PYTHONPATH"
    return agent


def run_client(argv: list[str]) -> float:
    """Run ``argv`` to completion (checked); its CPU seconds (user + system)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, **bf.agent_env()))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited {proc.returncode}: "
                           f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
    proc.stderr.close()
    return usage.ru_utime + usage.ru_stime


def upload_argv(agent: AgentProcess, transport: str, src: Path, to: str) -> list[str]:
    argv = [sys.executable, "-m", "fsagent", "upload", "--to", to, str(src)]
    if transport == "unix":
        return argv + ["--socket", str(agent.socket)]
    token = agent.base / "token"
    token.write_text(TOKEN)
    return argv + ["--connect", agent.status()["rpc"]["tcp"][0], "--token-file", str(token)]


def wait_state(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.getxattr(path, "user.fsagent.state") != b"complete":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not complete after {timeout:.0f} s")
        time.sleep(0.01)


def wait_all_complete(agent: AgentProcess, files: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        tasks = agent.status()["uploads"]["tasks"]
        if tasks.get("complete", 0) == files and all(
                n == 0 for s, n in tasks.items() if s != "complete"):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not all complete after {timeout:.0f} s: {tasks}")
        time.sleep(0.01)


def measure(base: Path, log_level: str, method: str, src: Path, files: int,
            timeout: float) -> dict:
    """One fresh agent, one timed transfer; {"seconds", "agent_cpu", "client_cpu"}."""
    agent = start_agent(base, log_level)
    try:
        pid = agent.proc.pid
        if method == "cp":
            dst = agent.uploads / src.name
            t0, cpu0 = time.monotonic(), bf.cpu_seconds(pid)
            dst.touch()  # declare the size first, as uploadTasks.create does
            os.setxattr(dst, "user.fsagent.size", str(src.stat().st_size).encode())
            client = run_client(["cp", str(src), str(dst)])
            wait_state(dst, timeout)
        elif method == "rsync":
            t0, cpu0 = time.monotonic(), bf.cpu_seconds(pid)
            client = run_client(["rsync", "-a", f"{src}/", str(agent.uploads / src.name)])
            wait_all_complete(agent, files, timeout)
        else:
            transport = method.split("-", 1)[1]
            argv = upload_argv(agent, transport, src, src.name)
            t0, cpu0 = time.monotonic(), bf.cpu_seconds(pid)
            client = run_client(argv)
        elapsed = time.monotonic() - t0
        agent_cpu = bf.cpu_seconds(pid) - cpu0
        if method.startswith("upload") and files > 1:
            wait_all_complete(agent, files, timeout)  # a check, outside the span
        return {"seconds": elapsed, "agent_cpu": agent_cpu, "client_cpu": client}
    finally:
        agent.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def measure_or_report(*args) -> dict | None:
    """``measure``, or None after printing why the run broke (the bench goes on)."""
    try:
        return measure(*args)
    except (RuntimeError, TimeoutError) as e:
        print(f"  BROKEN run ({args[2]}): {e}", flush=True)
        return None


def make_big(path: Path, mib: int) -> Path:
    if not (path.exists() and path.stat().st_size == mib << 20):
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
    return path


def warm(path: Path) -> None:
    """Read every file once, so each method reads from the page cache."""
    for p in [path] if path.is_file() else sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(8 << 20):
                    continue  # reading is the point: the pages stay cached


def rows_for(name: str, results: dict[str, list[dict]], baseline: str, methods: list[str],
             target: str) -> list[tuple[str, ...]]:
    base_t = [r["seconds"] for r in results[baseline]]
    rows: list[tuple[str, ...]] = []
    if not base_t:
        return rows
    methods = [m for m in methods if results[m]]
    for m in methods:
        t = [r["seconds"] for r in results[m]]
        ratio = statistics.median(t) / statistics.median(base_t)
        per_run = " ".join(f"{a / b:.2f}" for a, b in zip(t, base_t))
        rows.append((f"{name}: {m} (s, median [min-max] of {len(t)})", bf.spread(t),
                     f"{baseline}: {bf.spread(base_t)}", f"{ratio:.2f}x (runs {per_run})",
                     target))
    for m in [baseline, *methods]:
        rows.append((f"  {m}: agent CPU / client CPU (s)",
                     f"{bf.spread([r['agent_cpu'] for r in results[m]])} / "
                     f"{bf.spread([r['client_cpu'] for r in results[m]])}", "", "", ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=2048, help="A: the big file (MiB)")
    ap.add_argument("--files", type=int, default=5000, help="B: 4 KiB files (100 a dir)")
    ap.add_argument("--runs", type=int, default=3, help="rounds (each method once a round)")
    ap.add_argument("--quick", action="store_true", help="256 MiB, 1,000 files, 2 rounds")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--log-level", default="warning", help="the agents' log level")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the work dir goes (default: the current directory)")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.files, args.runs = 256, 1000, 2

    base = Path(tempfile.mkdtemp(prefix="bench-upload-rpc-", dir=args.dir or Path.cwd()))
    os.chdir(base)  # no fsagent package here: `python -m fsagent` takes PYTHONPATH's
    header = [
        f"machine: {os.cpu_count()} cores, kernel {os.uname().release}, MemAvailable "
        f"{bf.mem_available_mib()} MiB, load average at start {bf.load_average()}, "
        f"{bf.io_pressure()}",
        f"work dir: {base} on {bf.disk_of(base)}",
        f"code: {bf.ROOT} ({bf.code_version()}); agents import fsagent from "
        f"{bf.check_code_tree()}",
        f"agents: fresh per run, log level {args.log_level}, config: "
        f"{CONFIG.strip().replace(chr(10), '; ')}",
    ]
    for line in header:
        print(line, flush=True)
    rows: list[tuple[str, ...]] = []
    run_no = 0
    try:
        if not args.skip_a:
            src = make_big(base / "big.bin", args.size_mib)
            warm(src)
            methods = ["cp", "upload-unix", "upload-tcp"]
            results: dict[str, list[dict]] = {m: [] for m in methods}
            for i in range(args.runs):
                order = methods[i % 3:] + methods[:i % 3]
                for m in order:
                    run_no += 1
                    r = measure_or_report(base / f"agent{run_no}", args.log_level, m, src,
                                          1, args.timeout)
                    if r is None:
                        continue
                    results[m].append(r)
                    print(f"  A round {i + 1} {m}: {r['seconds']:.2f} s, agent CPU "
                          f"{r['agent_cpu']:.2f} s, client CPU {r['client_cpu']:.2f} s, "
                          f"load {bf.load_average()}", flush=True)
            rows += rows_for(f"A {args.size_mib} MiB until complete", results, "cp",
                             ["upload-unix", "upload-tcp"], "<= 1.25x")
            src.unlink()
        if not args.skip_b:
            src = bf.make_tree(base / "src-b" / "tree", args.files, 4096)
            (src / ".made").unlink()  # the marker is no upload
            warm(src)
            methods = ["rsync", "upload-unix"]
            results = {m: [] for m in methods}
            for i in range(args.runs):
                for m in (methods if i % 2 == 0 else methods[::-1]):
                    run_no += 1
                    r = measure_or_report(base / f"agent{run_no}", args.log_level, m, src,
                                          args.files, args.timeout)
                    if r is None:
                        continue
                    results[m].append(r)
                    print(f"  B round {i + 1} {m}: {r['seconds']:.2f} s, agent CPU "
                          f"{r['agent_cpu']:.2f} s, client CPU {r['client_cpu']:.2f} s, "
                          f"load {bf.load_average()}", flush=True)
            rows += rows_for(f"B {args.files:,} x 4 KiB until complete", results, "rsync",
                             ["upload-unix"], "<= 1.5x")
    finally:
        os.chdir("/")
        shutil.rmtree(base, ignore_errors=True)
    print(f"load average at end {bf.load_average()}, MemAvailable "
          f"{bf.mem_available_mib()} MiB, {bf.io_pressure()}")
    bf.print_table(rows)


if __name__ == "__main__":
    main()
