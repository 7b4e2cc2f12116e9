"""Helpers for tests of the RPC API against a live agent."""

from __future__ import annotations

import trio

from fsagent.rpc import open_client

ALL = ["All"]


def text(value):
    """msgpack str/bin as Python str, recursively (pynvim's session keeps bin as bytes)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [text(v) for v in value]
    if isinstance(value, dict):
        return {text(k): text(v) for k, v in value.items()}
    return value


def export_agent(agent_factory, tmp_path, *, config: str = "", args=()):
    """A started agent exporting ``tmp_path/data``; returns (agent, data_dir)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    agent = agent_factory(config=config or None,
                          args=["--export-root", str(data), *args]).start()
    return agent, data.resolve()


async def create(client, path, *, mtype="Persistent", etypes=ALL, mode="Flat",
                 whitelist=(), blacklist=(), timeout=0.0, block_size=0,
                 ignore_sys=False, ignore_dirs=False, start=True):
    mid = await client.call("MonitorServer.createMonitor", mtype, list(etypes), mode,
                            str(path), list(whitelist), list(blacklist), timeout,
                            block_size, ignore_sys, ignore_dirs, False, None)
    if start:
        await client.call("MonitorServer.startMonitor", mid)
    return mid


def batches(client) -> list[list[dict]]:
    """Every fsEventHappened batch already received, without waiting."""
    out = []
    while True:
        try:
            note = client.notifications.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return out
        assert note.method == "fsEventHappened"
        out.append(note.params)


def drain(client, monitor_id=None) -> list[tuple[str, str]]:
    """Every (type, path) already received, without waiting."""
    return [(e["type"], e["fileId"]) for mid, batch in batches(client)
            if monitor_id is None or mid == monitor_id for e in batch]


async def synced(client, monitor_id) -> list[tuple[str, str]]:
    """sync, then every event delivered so far."""
    await client.call("MonitorServer.sync", monitor_id)
    return drain(client, monitor_id)


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


__all__ = ["export_agent", "create", "drain", "synced", "batches", "open_client", "rss_kib"]
