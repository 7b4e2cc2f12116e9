"""RPC and monitor benchmarks against a live agent; prints a table against issue 5's targets.

Not a test. Run: .venv/bin/python bench/bench_rpc.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import AgentProcess  # noqa: E402
from fsagent.rpc import open_client  # noqa: E402


async def bench_get_size(sock: str, path: str, seconds: float = 3.0) -> float:
    done = 0
    async with open_client(sock) as c:
        deadline = trio.current_time() + seconds

        async def worker():
            nonlocal done
            while trio.current_time() < deadline:
                await c.call("FileServer.getSize", path)
                done += 1

        start = trio.current_time()
        async with trio.open_nursery() as n:
            for _ in range(64):
                n.start_soon(worker)
        return done / (trio.current_time() - start)


async def bench_read_block(sock: str, path: str, size: int) -> float:
    block = 2**20
    async with open_client(sock) as c:
        start = trio.current_time()
        total = 0
        for _ in range(3):
            offsets = iter(range(0, size, block))

            async def worker():
                nonlocal total
                for off in offsets:
                    total += len(await c.call("FileServer.readBlock", path, off, block))

            async with trio.open_nursery() as n:
                for _ in range(4):
                    n.start_soon(worker)
        return total / (trio.current_time() - start) / 1e6


async def bench_many_files(sock: str, root: Path, count: int) -> tuple[int, int, float]:
    target = root / "many"
    target.mkdir()
    async with open_client(sock, notification_buffer=100000) as c:
        mid = await c.call("MonitorServer.createMonitor", "Persistent", ["All"], "Flat",
                           str(target), [], [], 0.0, 0, False, True, False, None)
        await c.call("MonitorServer.startMonitor", mid)
        seen: set[str] = set()
        system: list[str] = []

        async def consume():
            async for note in c.notifications:
                for e in note.params[1]:
                    (seen.add if e["type"] == "Create" else system.append)(e["fileId"])

        async with trio.open_nursery() as n:
            n.start_soon(consume)
            start = time.monotonic()

            def create():
                for i in range(count):
                    with open(target / f"f{i:06d}", "wb") as f:
                        f.write(b"x")

            await trio.to_thread.run_sync(create)
            await c.call("MonitorServer.sync", mid)
            elapsed = time.monotonic() - start
            await trio.sleep(0.1)
            n.cancel_scope.cancel()
        return len(seen), len(system), elapsed


async def bench_latency(sock: str, root: Path, count: int, rate: float) -> list[float]:
    target = root / "latency"
    target.mkdir()
    closed_at: dict[str, float] = {}
    latencies: list[float] = []
    async with open_client(sock) as c:
        mid = await c.call("MonitorServer.createMonitor", "Persistent", ["Creation"], "Flat",
                           str(target), [], [], 0.0, 1, False, True, False, None)
        await c.call("MonitorServer.startMonitor", mid)

        async def consume():
            async for note in c.notifications:
                now = time.perf_counter()
                for e in note.params[1]:
                    if e["fileId"] in closed_at:
                        latencies.append(now - closed_at[e["fileId"]])

        async with trio.open_nursery() as n:
            n.start_soon(consume)
            start = time.perf_counter()
            for i in range(count):
                await trio.sleep_until(trio.current_time() + max(
                    0, start + i / rate - time.perf_counter()))
                path = str(target / f"f{i:05d}")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                os.write(fd, b"x")
                os.close(fd)
                closed_at[path] = time.perf_counter()
            await c.call("MonitorServer.sync", mid)
            await trio.sleep(0.1)
            n.cancel_scope.cancel()
    return latencies


def machine() -> str:
    disk = subprocess.run(["df", "-hT", tempfile.gettempdir()], capture_output=True,
                          text=True).stdout.splitlines()[-1].split()
    return f"{os.cpu_count()} cores, Linux {os.uname().release}, {tempfile.gettempdir()} on {disk[1]}"


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-rpc-"))
    data = base / "data"
    data.mkdir()
    # the later --log-level wins over the fixture's debug level
    agent = AgentProcess(base, args=["--export-root", str(data), "--log-level", "warning"])
    try:
        agent.start()
        sock = str(agent.socket)
        (data / "small").write_bytes(b"x" * 100)
        big = data / "big"
        with open(big, "wb") as f:
            for _ in range(256):
                f.write(os.urandom(2**20))
        rate = trio.run(bench_get_size, sock, str(data / "small"))
        mbps = trio.run(bench_read_block, sock, str(big), 256 * 2**20)
        seen, system, elapsed = trio.run(bench_many_files, sock, data, 50_000)
        lat = sorted(trio.run(bench_latency, sock, data, 3000, 1000.0))
        p50 = statistics.median(lat) * 1000
        p99 = lat[int(len(lat) * 0.99) - 1] * 1000
        rows = [
            ("getSize, 64 in flight, Unix socket", f"{rate:,.0f} calls/s", "20,000 calls/s",
             rate / 20000),
            ("readBlock 1 MiB blocks", f"{mbps:,.0f} MB/s", "500 MB/s", mbps / 500),
            ("50,000 files → Create events", f"{seen:,} in {elapsed:.1f} s"
             + (f" ({system} System)" if system else ""), "50,000, none lost", seen / 50000),
            ("close → notification, 1,000 files/s, blockSize 1",
             f"p50 {p50:.2f} ms, p99 {p99:.2f} ms ({len(lat)} events)", "p99 ≤ 50 ms",
             50 / p99 if p99 else float("inf")),
        ]
        print(f"machine: {machine()}")
        print(f"| {'work':<50} | {'result':<40} | {'target':<18} | ratio |")
        print(f"|{'-' * 52}|{'-' * 42}|{'-' * 20}|-------|")
        for work, result, target, ratio in rows:
            print(f"| {work:<50} | {result:<40} | {target:<18} | {ratio:5.2f} |")
    finally:
        agent.cleanup()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
