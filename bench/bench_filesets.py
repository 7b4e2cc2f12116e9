"""Benchmark many small files into uploads/ until imported (issue 12; not a test).

Prints one table: the machine, the agent's config, then the rows the issue's targets name.

A. ``rsync -a`` of 5,000 x 4 KiB files in 50 directories into ``MOUNT/uploads/A``, timed
   from rsync's start until every upload is ``complete`` and every import job it names
   succeeded, against the same ``rsync -a`` + ``sync`` into a plain directory on the same
   disk. Runs are interleaved (plain, agent, plain, agent, ...; ``--runs``), each into a
   new directory (nothing is removed until the end: see ``plain_run``) from a quiet disk
   (``quiet_disk``); medians,
   min-max and the ratio of medians. Each agent run uses a **fresh agent** (new state dir,
   empty database and job history): the job history fills up and starts evicting after
   ``job_history`` jobs, and the task table grows with every run, so a reused agent would
   make run 3 measure a different agent than run 1, and its CPU delta would include the
   previous run's eviction and bookkeeping. Also per run: the agent's CPU (utime + stime
   of all its threads from ``/proc/PID/stat``, delta over the timed span) in total and per
   file, the FUSE requests per file (``MOUNT/metrics``), the import jobs created and the
   distinct jobs the uploads name.
B. ``--big``: 100,000 x 1 KiB files in 1,000 directories (``--big-files N`` scales it
   down, 100 files a directory), copied in with ``rsync -a`` (not ``cp -r``: rsync's
   rename-into-place completes each file at once, where a file ``cp`` wrote waits
   ``settle_seconds``, which would measure the settle timer), until every upload is
   complete and imported. VmRSS is sampled every 0.5 s throughout (and VmHWM, the
   kernel's peak, read at the end); then ``ls MOUNT/jobs/``, ``cat MOUNT/uploads.json``,
   ``cat MOUNT/status`` and ``fsagent status`` are timed once each (each a new process,
   as a user would run it; the Python start-up alone is timed beside ``fsagent status``).
   While rsync runs, a progress line every ``--progress-every`` seconds (60) gives the
   files completed and the agent's CPU per file in that interval: a cost that grows with
   the files already there shows as a rising column.

**"Every import succeeded"**, checked without trusting a sleep: the ``status`` file is
polled until it shows every task ``complete`` (count = files sent, no other state) and
no job pending, running or paused; that poll's time ends the span (the CPU sample is
taken right after it). Then, outside the span, every uploaded file's
``user.fsagent.state`` and ``user.fsagent.job`` are read: each must be complete and name a
job, and the distinct job IDs must be as many as the import jobs the agent had created
at that poll (jobs listed in ``status`` plus ``evicted``; the agent is fresh, so every
job is an import). A job still listed in ``jobs.json`` must be ``Success``; one evicted
by ``job_history`` (default 1,000) is gone, so ``MOUNT/metrics`` must count as many
successful import runs (``fsagent_job_duration_seconds_count{kind="import",
state="success"}``) as jobs created, and no failed or cancelled one. An upload whose
import had not been handed off yet at that poll makes the counts differ, and polling
resumes (the span then ends later).

**Which code runs.** ``python -m fsagent`` imports the ``fsagent`` package from its working
directory first, so the agent could run a different tree than the one you meant. This
script runs every agent and CLI with the working directory set to its own work dir (no
``fsagent`` there) and ``PYTHONPATH`` set to the tree this script lives in, checks that
an agent with that environment imports ``fsagent`` from that tree, and prints the tree
and its commit. To bench a commit while its checkout keeps changing, run it from a
snapshot (what ``make bench-filesets`` does)::

    make bench-filesets                                   # A, 3 runs, on HEAD's snapshot
    make bench-filesets BENCH_ARGS="--big"                # A and B (100,000 files)
    make bench-filesets BENCH_ARGS="--skip-a --big --big-files 10000"   # a quick B

or by hand::

    git archive HEAD | tar -x -C /tmp/code && git rev-parse HEAD > /tmp/code/COMMIT
    .venv/bin/python /tmp/code/bench/bench_filesets.py [--runs 3] [--big] [--dir DIR]

Work files go to a temp dir under ``--dir`` (default: the current directory), which is
where the plain-directory baseline and the agents' state dirs live (same disk). The
agents run with main's defaults: no config file (``fsagent config`` output is printed),
mount and state dir as the tests' harness (``tests/conftest.py``) passes them, log level
``--log-level`` (default ``info``, the default of ``fsagent run``; the harness would
otherwise pass ``debug``). Every agent is stopped and its mount removed on the way out,
Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import AgentProcess  # noqa: E402  (the tests' real-agent harness)

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the code and the machine ------------------------------------------------------------

def agent_env() -> dict:
    """The environment of every agent and CLI process: this script's tree first."""
    return {"PYTHONPATH": str(ROOT)}


def check_code_tree() -> str:
    """Where ``python -m fsagent`` imports from with our cwd and env (must be ROOT)."""
    out = subprocess.run(
        [sys.executable, "-c", "import fsagent, os; print(os.path.realpath(fsagent.__file__))"],
        env=dict(os.environ, **agent_env()), capture_output=True, text=True, check=True)
    where = Path(out.stdout.strip())
    if ROOT.resolve() not in where.parents:
        raise SystemExit(f"python -m fsagent would import {where}, not the tree under {ROOT}")
    return str(where.parent)


def code_version() -> str:
    commit_file = ROOT / "COMMIT"  # written beside a snapshot by `make bench-filesets`
    if commit_file.exists():
        return f"snapshot of {commit_file.read_text().strip()[:12]}"
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return f"checkout at {head}" + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no COMMIT file, not a git checkout)"


def load_average() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def mem_available_mib() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return -1


def disk_of(path: Path) -> str:
    out = subprocess.run(["df", "-h", "--output=source,fstype,avail,size", str(path)],
                         capture_output=True, text=True).stdout.splitlines()
    src, fstype, avail, size = out[-1].split() if len(out) > 1 else ("?",) * 4
    return f"{src} ({fstype}) {avail} free of {size}"


def io_pressure() -> str:
    try:
        some = open("/proc/pressure/io").readline()  # "some avg10=... avg60=..."
        return "io pressure some " + " ".join(some.split()[1:3])
    except OSError:
        return "io pressure n/a"


def disk_written_sectors() -> int:
    """Sectors written to every disk so far (``/proc/diskstats``, whole devices)."""
    total = 0
    for line in open("/proc/diskstats"):
        fields = line.split()
        if len(fields) > 9 and not fields[2].startswith(("loop", "ram")):
            total += int(fields[9])
    return total


def quiet_disk(timeout: float = 15.0) -> float:
    """``sync``, then wait until the disks wrote nothing for 0.5 s (or ``timeout``); the
    seconds waited. Before every run, plain or agent: the previous run's writes (the
    agent's database, its checkpoints) are not the next run's to pay for, whichever
    side it is on."""
    t0 = time.monotonic()
    os.sync()
    last = disk_written_sectors()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        now = disk_written_sectors()
        if now == last:
            break
        last = now
    return time.monotonic() - t0


# -- the agent from outside ---------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def proc_status_kib(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


class RssSampler:
    """VmRSS of ``pid`` every ``interval`` seconds in a thread, until ``stop()``."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                self.samples.append(proc_status_kib(self.pid, "VmRSS"))
            except OSError:
                return  # the agent is gone; the caller finds out
            if self._stop.wait(self.interval):
                return


def metric_samples(agent: AgentProcess) -> dict[str, float]:
    """``MOUNT/metrics`` as {'name{labels}': value}."""
    out = {}
    for line in (agent.mount / "metrics").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def fuse_requests(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("fsagent_fuse_requests_total"))


def import_runs(metrics: dict[str, float], state: str) -> int:
    return int(metrics.get(
        f'fsagent_job_duration_seconds_count{{kind="import",state="{state}"}}', 0))


def jobs_created(status: dict) -> int:
    """Jobs the agent ever had: listed now plus evicted (the agent is fresh: all imports)."""
    jobs = status.get("jobs", {})
    return sum(jobs.get("counts", {}).values()) + jobs.get("evicted", 0)


def all_settled(status: dict, files: int) -> bool:
    tasks = status["uploads"]["tasks"]
    counts = status["jobs"]["counts"]
    return (tasks.get("complete", 0) == files
            and all(n == 0 for s, n in tasks.items() if s != "complete")
            and counts.get("pending", 0) == counts.get("running", 0)
            == counts.get("paused", 0) == 0)


class ImportCheck:
    """What the per-file pass found (outside the timed span)."""

    def __init__(self):
        self.files = 0
        self.not_complete: list[str] = []
        self.no_job: list[str] = []
        self.jobs: set[str] = set()
        self.listed_success = self.listed_other = self.evicted = 0
        self.seconds = 0.0


def check_imports(agent: AgentProcess, dest: Path) -> ImportCheck:
    c = ImportCheck()
    t0 = time.monotonic()
    for dirpath, _dirs, names in os.walk(dest):
        for name in names:
            path = os.path.join(dirpath, name)
            c.files += 1
            if os.getxattr(path, "user.fsagent.state") != b"complete":
                c.not_complete.append(path)
            job = os.getxattr(path, "user.fsagent.job").decode()
            if job:
                c.jobs.add(job)
            else:
                c.no_job.append(path)
    listed = {j["ID"]: j["State"] for j in json.loads((agent.mount / "jobs.json").read_text())}
    for job in c.jobs:
        state = listed.get(job)
        if state is None:
            c.evicted += 1  # only finished jobs are evicted; the metrics say how they ended
        elif state == "Success":
            c.listed_success += 1
        else:
            c.listed_other += 1
    c.seconds = time.monotonic() - t0
    return c


class Broken(Exception):
    """The agent did not import everything (a failed upload or job): the run is void."""


def wait_imported(agent: AgentProcess, dest: Path, files: int, t_start: float,
                  cpu_start: float, *, interval: float, timeout: float) -> dict:
    """Poll until all ``files`` under ``dest`` are complete and imported; see module doc."""
    deadline = t_start + timeout
    pid = agent.proc.pid
    while True:
        status = agent.status()
        if all_settled(status, files):
            t_end = time.monotonic()
            cpu_end = cpu_seconds(pid)
            rss_end = proc_status_kib(pid, "VmRSS")
            created = jobs_created(status)
            check = check_imports(agent, dest)
            metrics = metric_samples(agent)
            if check.not_complete or check.listed_other:
                raise Broken(f"not complete: {check.not_complete[:3]}; "
                             f"{check.listed_other} listed jobs not Success")
            failed = import_runs(metrics, "failure") + import_runs(metrics, "cancelled")
            if failed:
                raise Broken(f"{failed} import runs failed or were cancelled")
            other_kinds = [k for k, v in metrics.items() if k.startswith("fsagent_jobs{")
                           and 'kind="import"' not in k and v]
            if other_kinds:
                raise Broken(f"jobs other than imports in a fresh agent: {other_kinds}")
            if (check.files == files and not check.no_job and len(check.jobs) == created
                    and import_runs(metrics, "success") == created):
                return {"seconds": t_end - t_start, "cpu": cpu_end - cpu_start,
                        "rss_end_kib": rss_end,
                        "jobs_created": created, "jobs_named": len(check.jobs),
                        "evicted": check.evicted, "check": check, "metrics": metrics,
                        "status": status}
            # A hand-off not made yet at that poll: the counts differ; poll again.
        if agent.proc.poll() is not None:
            raise Broken(f"agent exited {agent.proc.returncode}:\n{agent.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not all imported after {timeout:.0f} s: "
                               f"uploads {status['uploads']['tasks']}, "
                               f"jobs {status['jobs']}")
        time.sleep(interval)


def start_agent(base: Path, log_level: str) -> AgentProcess:
    base.mkdir()
    # No config file: main's defaults. The harness passes --log-level debug; ours comes
    # after it and wins.
    agent = AgentProcess(base, args=["--log-level", log_level], env=agent_env()).start()
    environ = open(f"/proc/{agent.proc.pid}/environ", "rb").read().split(b"\0")
    assert f"PYTHONPATH={ROOT}".encode() in environ, "agent runs with another PYTHONPATH"
    assert not (Path(os.readlink(f"/proc/{agent.proc.pid}/cwd")) / "fsagent").exists()
    return agent


def stop_agent(agent: AgentProcess) -> None:
    # Its files stay until the work dir goes, as the plain copies do (``plain_run``):
    # removing them here would slow the next run's creates, whichever side it is.
    agent.cleanup()


# -- the trees ----------------------------------------------------------------------------

def make_tree(path: Path, files: int, size: int, per_dir: int = 100) -> Path:
    """``files`` random files of ``size`` bytes, ``per_dir`` a directory (made once)."""
    marker = path / ".made"
    if marker.exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    for i in range(files):
        d = path / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        (d / f"f{i % per_dir:03d}").write_bytes(os.urandom(size))
    marker.touch()
    return path


def rsync_cmd(src: Path, dest: Path) -> list[str]:
    return ["rsync", "-a", "--exclude=/.made", f"{src}/", str(dest)]


def plain_run(src: Path, dest: Path) -> float:
    """``rsync -a`` + ``sync`` into ``dest``, a new directory, kept (removed with the work
    dir at the end) as each agent run's state dir is. On this VM's ext4 the cost of
    creating a file swings ~10x with the disk's state: a 5,000-file rsync into new
    directories one after another took 2.85, 0.62, 0.27, 0.27 s, and into a directory
    re-made where the last copy was removed 2.7-2.9 s every time, which is what this
    bench did before 2026-11-30 (the ratios it printed until then were against that
    slow baseline). Read the per-run ratios, not only the ratio of the medians."""
    t0 = time.monotonic()
    subprocess.run(rsync_cmd(src, dest), check=True)
    os.sync()
    return time.monotonic() - t0


def agent_run(base: Path, src: Path, files: int, log_level: str, *, interval: float,
              timeout: float, sample_rss: bool = False, progress_every: float = 0) -> dict:
    agent = start_agent(base, log_level)
    try:
        pid = agent.proc.pid
        requests_before = fuse_requests(metric_samples(agent))
        dest = agent.uploads / src.name
        sampler = RssSampler(pid) if sample_rss else None
        if sampler:
            sampler.__enter__()
        try:
            t0, cpu0 = time.monotonic(), cpu_seconds(pid)
            if progress_every:
                t_rsync = rsync_with_progress(agent, src, dest, t0, cpu0, progress_every)
            else:
                subprocess.run(rsync_cmd(src, dest), check=True)
                t_rsync = time.monotonic() - t0
            result = wait_imported(agent, dest, files, t0, cpu0, interval=interval,
                                   timeout=timeout)
        finally:
            if sampler:
                sampler.__exit__()
        result["rsync_seconds"] = t_rsync
        result["requests_per_file"] = (fuse_requests(result["metrics"]) - requests_before) / files
        if sampler:
            result["rss_max_kib"] = max(sampler.samples)
            result["rss_samples"] = len(sampler.samples)
            result["hwm_kib"] = proc_status_kib(pid, "VmHWM")
            result.update(answer_times(agent))
        return result
    finally:
        stop_agent(agent)


def rsync_with_progress(agent: AgentProcess, src: Path, dest: Path, t0: float, cpu0: float,
                        every: float) -> float:
    """rsync, printing every ``every`` s how far the agent got: whether the cost per file
    grows with the number of files already there shows in the per-interval columns."""
    rsync = subprocess.Popen(rsync_cmd(src, dest))
    last = (0.0, 0, 0.0)
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):  # still running: report
            rsync.wait(every)
        now, cpu = time.monotonic() - t0, cpu_seconds(agent.proc.pid) - cpu0
        done = agent.status()["uploads"]["tasks"].get("complete", 0)
        dt, dn, dcpu = now - last[0], done - last[1], cpu - last[2]
        print(f"    {now:7.1f} s: {done:7,} complete ({dn / dt:6.1f}/s, "
              f"{dcpu * 1000 / max(dn, 1):5.2f} ms CPU/file in this interval), "
              f"VmRSS {proc_status_kib(agent.proc.pid, 'VmRSS') / 1024:.0f} MiB, "
              f"load {load_average()}", flush=True)
        last = (now, done, cpu)
        if rsync.returncode is not None:
            if rsync.returncode:
                raise Broken(f"rsync exited {rsync.returncode}")
            return time.monotonic() - t0


def timed(argv: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, **agent_env()), **kwargs)
    return time.monotonic() - t0, done


def answer_times(agent: AgentProcess) -> dict:
    """Each of the user's look-ups, one new process each, as typed in a shell."""
    out = {}
    out["ls_jobs"], done = timed(["ls", str(agent.jobs)], check=True)
    out["ls_jobs_entries"] = len(done.stdout.splitlines())
    out["cat_uploads_json"], done = timed(["cat", str(agent.mount / "uploads.json")],
                                          check=True)
    out["uploads_json_bytes"] = len(done.stdout)
    out["uploads_json_entries"] = len(json.loads(done.stdout))
    out["cat_status"], _ = timed(["cat", str(agent.mount / "status")], check=True)
    out["cat_jobs_json"], done = timed(["cat", str(agent.mount / "jobs.json")], check=True)
    out["jobs_json_bytes"] = len(done.stdout)
    out["fsagent_status"], done = timed([sys.executable, "-m", "fsagent", "status",
                                         "--socket", str(agent.socket)])
    if done.returncode != 0:
        raise Broken(f"fsagent status exited {done.returncode}: {done.stderr.decode()}")
    out["python_startup"], _ = timed([sys.executable, "-c", "import fsagent.cli"],
                                     check=True)
    return out


def resolved_config(work: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "fsagent", "config"], capture_output=True,
                          text=True, env=dict(os.environ, **agent_env()), check=True)
    skip = ("mount", "state_dir", "socket")  # set per agent by the harness
    pairs = [line.removeprefix("# ") for line in done.stdout.splitlines()]
    pairs = [p for p in pairs if "=" in p and p.split("=")[0].strip() not in skip]
    return "; ".join(re.sub(r"\s*=\s*", "=", p) for p in pairs)


# -- the table -----------------------------------------------------------------------------

def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return (fmt.format(statistics.median(values)) + " ["
            + fmt.format(min(values)) + "-" + fmt.format(max(values)) + "]")


def print_table(rows: list[tuple[str, ...]]) -> None:
    head = ("work", "fsagent", "baseline", "ratio", "target")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(5)]
    for r in (head, *rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def rows_a(runs: list[dict], plain: list[float], files: int) -> list[tuple[str, ...]]:
    t = [r["seconds"] for r in runs]
    cpu_ms = [r["cpu"] * 1000 / files for r in runs]
    ratio = statistics.median(t) / statistics.median(plain)
    return [
        (f"A rsync -a {files:,} x 4 KiB in {files // 100} dirs until all complete + "
         f"imported (median [min-max] of {len(runs)}, s)", spread(t),
         f"rsync -a + sync, plain dir: {spread(plain)}", f"{ratio:.1f}x", "<= 5x"),
        ("  runs, in order: fsagent / plain (s)", " ".join(f"{x:.2f}" for x in t),
         " ".join(f"{x:.2f}" for x in plain),
         " ".join(f"{a / b:.0f}x" for a, b in zip(t, plain)), ""),
        ("  rsync itself returned after (s)", spread([r["rsync_seconds"] for r in runs]),
         "", "", ""),
        ("  agent CPU over the span (s, all threads)", spread([r["cpu"] for r in runs]),
         "", "", ""),
        ("  agent CPU per file (ms)", spread(cpu_ms), "", "", "<= 1 ms"),
        ("  FUSE requests per file", spread([r["requests_per_file"] for r in runs], "{:.1f}"),
         "", "", ""),
        ("  import jobs created / distinct jobs the uploads name",
         " / ".join(spread([r[k] for r in runs], "{:.0f}")
                    for k in ("jobs_created", "jobs_named")), "", "", "<= 100"),
        ("  of those evicted by job_history before the end (median)",
         f"{statistics.median(r['evicted'] for r in runs):.0f}", "", "", ""),
    ]


def rows_b(r: dict, plain: float, files: int) -> list[tuple[str, ...]]:
    mib = 1024.0
    return [
        (f"B rsync -a {files:,} x 1 KiB in {max(1, files // 100):,} dirs until all "
         f"complete + imported (s)", f"{r['seconds']:.1f}", f"plain dir + sync: {plain:.2f}",
         f"{r['seconds'] / plain:.0f}x", ""),
        ("  rsync itself returned after (s)", f"{r['rsync_seconds']:.1f}", "", "", ""),
        ("  agent CPU (s) / per file (ms)",
         f"{r['cpu']:.1f} / {r['cpu'] * 1000 / files:.2f}", "", "", ""),
        ("  FUSE requests per file", f"{r['requests_per_file']:.1f}", "", "", ""),
        (f"  agent VmRSS when all imported / max of {r['rss_samples']} samples (every "
         f"0.5 s, to the end) / VmHWM (MiB)",
         f"{r['rss_end_kib'] / mib:.0f} / {r['rss_max_kib'] / mib:.0f} / "
         f"{r['hwm_kib'] / mib:.0f}", "", "", "<= 200 MiB"),
        ("  import jobs created / distinct named / evicted",
         f"{r['jobs_created']:,} / {r['jobs_named']:,} / {r['evicted']:,}", "", "", ""),
        ("  per-file check pass after the span (getxattr x2 each, s)",
         f"{r['check'].seconds:.1f}", "", "", ""),
        (f"  ls MOUNT/jobs/ ({r['ls_jobs_entries']:,} entries, s)", f"{r['ls_jobs']:.3f}",
         "", "", "< 1 s"),
        (f"  cat MOUNT/uploads.json ({r['uploads_json_entries']:,} entries, "
         f"{r['uploads_json_bytes']:,} bytes, s)", f"{r['cat_uploads_json']:.3f}", "", "",
         "< 1 s"),
        ("  fsagent status (s; python start-up + import alone)",
         f"{r['fsagent_status']:.3f}", f"{r['python_startup']:.3f}", "", "< 1 s"),
        (f"  cat MOUNT/status / cat MOUNT/jobs.json ({r['jobs_json_bytes']:,} bytes) (s)",
         f"{r['cat_status']:.3f} / {r['cat_jobs_json']:.3f}", "", "", ""),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="agent runs of A (each with a plain run)")
    ap.add_argument("--files", type=int, default=5000, help="files in A (100 a directory)")
    ap.add_argument("--skip-a", action="store_true", help="only B (with --big)")
    ap.add_argument("--big", action="store_true", help="also run B (100,000 files)")
    ap.add_argument("--big-files", type=int, default=100_000, help="files in B")
    ap.add_argument("--progress-every", type=float, default=60,
                    help="B: seconds between progress lines while rsync runs")
    ap.add_argument("--log-level", default="info", help="the agents' log level")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per agent run")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the work dir goes (default: the current directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (source trees)")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-filesets-", dir=args.dir or Path.cwd()))
    os.chdir(base)  # no fsagent package here: `python -m fsagent` takes PYTHONPATH's
    load_start, mem_start = load_average(), mem_available_mib()
    header = [
        f"machine: {os.cpu_count()} cores, kernel {os.uname().release}, "
        f"MemAvailable {mem_start} MiB, load average at start {load_start}, {io_pressure()}",
        f"work dir: {base} on {disk_of(base)}",
        f"code: {ROOT} ({code_version()}); agents import fsagent from {check_code_tree()}",
        f"agent config (defaults, no config file; --log-level {args.log_level}): "
        f"{resolved_config(base)}",
    ]
    for line in header:
        print(line, flush=True)
    rows: list[tuple[str, ...]] = []
    try:
        if not args.skip_a:
            src = make_tree(base / "src-a" / "A", args.files, 4096)
            os.sync()
            plain, runs = [], []
            for i in range(args.runs):
                quiet_disk()
                plain.append(plain_run(src, base / f"plain-a{i}"))
                quiet_disk()
                try:
                    runs.append(agent_run(base / f"agent-a{i}", src, args.files,
                                          args.log_level, interval=0.05, timeout=args.timeout))
                except (Broken, TimeoutError) as e:
                    print(f"  A run {i + 1}: BROKEN: {e}", flush=True)
                    continue
                print(f"  A run {i + 1}: plain {plain[-1]:.2f} s, fsagent "
                      f"{runs[-1]['seconds']:.2f} s (rsync {runs[-1]['rsync_seconds']:.2f} s),"
                      f" CPU {runs[-1]['cpu']:.1f} s, jobs {runs[-1]['jobs_created']}, "
                      f"load {load_average()}", flush=True)
            if runs:
                rows += rows_a(runs, plain, args.files)
        if args.big:
            src = make_tree(base / "src-b" / "B", args.big_files, 1024)
            quiet_disk()
            plain_b = plain_run(src, base / "plain-b")
            quiet_disk()
            print(f"  B plain: {plain_b:.2f} s; agent run starts, load {load_average()}",
                  flush=True)
            try:
                big = agent_run(base / "agent-b", src, args.big_files, args.log_level,
                                interval=0.5, timeout=args.timeout, sample_rss=True,
                                progress_every=args.progress_every)
                rows += rows_b(big, plain_b, args.big_files)
            except (Broken, TimeoutError) as e:
                print(f"  B: BROKEN: {e}", flush=True)
    finally:
        if not args.keep:
            os.chdir("/")
            shutil.rmtree(base, ignore_errors=True)
    print(f"load average at end {load_average()}, MemAvailable {mem_available_mib()} MiB, "
          f"{io_pressure()}")
    print_table(rows)


if __name__ == "__main__":
    main()
