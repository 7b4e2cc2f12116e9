"""MonitorServer on a live agent with real inotify: modes, types, filters, races."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from conftest import PATIENCE
from fsagent.rpc import OmeroFSError, open_client
from rpcutil import batches, create, drain, export_agent, synced


@pytest.fixture
def served(agent_factory, tmp_path):
    return export_agent(agent_factory, tmp_path, config="monitor_grace_seconds = 0.5\n")


def write(path, data=b"x"):
    with open(path, "wb") as f:
        f.write(data)


async def stopped_by_itself(client, monitor_id) -> None:
    """Wait for the monitor to reach Stopped: it stops itself after queueing its last
    batch, so a client can hold that batch a moment before the state changes."""
    with trio.fail_after(PATIENCE):
        while await client.call("MonitorServer.getMonitorState", monitor_id) != "Stopped":
            await trio.sleep(0.02)


async def test_flat_create_modify_delete_and_rename_pairing(served):
    agent, data = served
    (data / "old.tif").write_bytes(b"1")
    async with open_client(agent.socket) as c:
        mid = await create(c, data)
        assert await c.call("MonitorServer.getMonitorState", mid) == "Started"
        write(data / "a.tif")
        write(data / "b.tif")  # the kernel merges identical consecutive events: separate them
        write(data / "a.tif", b"more")
        os.rename(data / "old.tif", data / "new.tif")
        os.unlink(data / "a.tif")
        os.mkdir(data / "sub")
        write(data / "sub" / "ignored-in-flat")
        assert await synced(c, mid) == [
            ("Create", f"{data}/a.tif"), ("Create", f"{data}/b.tif"),
            ("Modify", f"{data}/a.tif"),
            ("Delete", f"{data}/old.tif"), ("Create", f"{data}/new.tif"),
            ("Delete", f"{data}/a.tif"), ("Create", f"{data}/sub")]


async def test_create_is_reported_at_close_not_at_open(served):
    agent, data = served
    async with open_client(agent.socket) as c:
        mid = await create(c, data)
        f = open(data / "slow.tif", "wb")
        f.write(b"partial")
        f.flush()
        assert await synced(c, mid) == []
        f.close()
        assert await synced(c, mid) == [("Create", f"{data}/slow.tif")]


async def test_rename_pair_stays_in_one_batch_even_with_block_size_1(served):
    agent, data = served
    write(data / "a")
    async with open_client(agent.socket) as c:
        mid = await create(c, data, block_size=1)
        for i in range(3):
            write(data / f"n{i}")
        os.rename(data / "a", data / "b")
        await c.call("MonitorServer.sync", mid)
        got = [[(e["type"], e["fileId"]) for e in b] for _, b in batches(c)]
        assert got == [[("Create", f"{data}/n0")], [("Create", f"{data}/n1")],
                       [("Create", f"{data}/n2")],
                       [("Delete", f"{data}/a"), ("Create", f"{data}/b")]]


async def test_recurse_watches_new_directories_and_mkdir_then_fill_races(served):
    agent, data = served
    async with open_client(agent.socket) as c:
        mid = await create(c, data, mode="Recurse", ignore_dirs=True)
        expected = set()
        # Create deep trees and fill them at once: files land before and after the
        # agent's watch on each new directory; none may be lost or doubled.
        for t in range(20):
            d = data / f"t{t}" / "a" / "b"
            os.makedirs(d)
            for i in range(10):
                write(d / f"f{i}")
                expected.add(("Create", f"{d}/f{i}"))
        got = await synced(c, mid)
        assert sorted(got) == sorted(expected) and len(got) == len(expected)
        # and the new directories are watched
        write(data / "t3" / "a" / "late")
        assert await synced(c, mid) == [("Create", f"{data}/t3/a/late")]


async def test_directory_rename_rewrites_the_subtree(served):
    agent, data = served
    os.makedirs(data / "d1" / "inner")
    async with open_client(agent.socket) as c:
        mid = await create(c, data, mode="Recurse")
        os.rename(data / "d1", data / "d2")
        assert await synced(c, mid) == [("Delete", f"{data}/d1"), ("Create", f"{data}/d2")]
        write(data / "d2" / "inner" / "f")
        os.unlink(data / "d2" / "inner" / "f")
        assert await synced(c, mid) == [("Create", f"{data}/d2/inner/f"),
                                        ("Delete", f"{data}/d2/inner/f")]


async def test_follow_reports_files_inside_directories_moved_in(served, tmp_path):
    agent, data = served
    outside = tmp_path / "staging"
    os.makedirs(outside / "run1" / "deep")
    write(outside / "run1" / "a.tif")
    write(outside / "run1" / "deep" / "b.tif")
    os.makedirs(tmp_path / "staging2" / "run2")
    write(tmp_path / "staging2" / "run2" / "c.tif")
    async with open_client(agent.socket) as c:
        follow = await create(c, data, mode="Follow", ignore_dirs=True)
        os.rename(outside / "run1", data / "run1")
        assert sorted(await synced(c, follow)) == [
            ("Create", f"{data}/run1/a.tif"), ("Create", f"{data}/run1/deep/b.tif")]
        # moving it out reports the files as deleted and drops the watches
        os.rename(data / "run1", outside / "run1")
        write(outside / "run1" / "after")
        assert sorted(await synced(c, follow)) == [
            ("Delete", f"{data}/run1/a.tif"), ("Delete", f"{data}/run1/deep/b.tif")]
        await c.call("MonitorServer.destroyMonitor", follow)
        recurse = await create(c, data, mode="Recurse", ignore_dirs=True)
        os.rename(tmp_path / "staging2" / "run2", data / "run2")
        assert await synced(c, recurse) == []  # Recurse: only the (ignored) directory event
        write(data / "run2" / "new.tif")
        assert await synced(c, recurse) == [("Create", f"{data}/run2/new.tif")]


async def test_filters(served):
    agent, data = served
    os.mkdir(data / "skip")
    async with open_client(agent.socket) as c:
        mid = await create(c, data, mode="Recurse", whitelist=["tif", ".CZI", "*.lif"],
                           blacklist=["skip", "*.tmp"], ignore_sys=True, ignore_dirs=True)
        names = ["a.tif", "b.TIF", "c.czi", "d.lif", "e.txt", "f.tmp", ".hidden.tif",
                 "g.tif~", "h.tif.part", "Thumbs.db", ".DS_Store", "x.swp"]
        for n in names:
            write(data / n)
        write(data / "skip" / "in.tif")
        os.mkdir(data / "New Folder")
        write(data / "New Folder" / "z.tif")
        os.mkdir(data / "ok")
        write(data / "ok" / "y.tif")
        assert sorted(await synced(c, mid)) == sorted(
            [("Create", f"{data}/{n}") for n in ("a.tif", "b.TIF", "c.czi", "d.lif")]
            + [("Create", f"{data}/ok/y.tif")])
        status = agent.status()["monitors"]["monitors"][mid]
        assert status["watches"] == 2  # root and ok/: blacklisted and system dirs unwatched


async def test_event_types_and_dir_events(served):
    agent, data = served
    async with open_client(agent.socket) as c:
        mid = await create(c, data, etypes=["Deletion", "Modification"])
        write(data / "f")
        write(data / "g")
        write(data / "f", b"2")
        os.unlink(data / "f")
        os.mkdir(data / "d")
        os.rmdir(data / "d")
        assert await synced(c, mid) == [("Modify", f"{data}/f"), ("Delete", f"{data}/f"),
                                        ("Delete", f"{data}/d")]


async def test_oneshot_delivers_one_batch_then_stops(served):
    agent, data = served
    async with open_client(agent.socket) as c:
        mid = await create(c, data, mtype="OneShot")
        write(data / "first")
        with trio.fail_after(PATIENCE):
            note = await c.notifications.receive()
        assert note.params == [mid, [{"fileId": f"{data}/first", "type": "Create"}]]
        await stopped_by_itself(c, mid)
        write(data / "second")
        await trio.sleep(0.3)
        assert drain(c) == []


async def test_oneshot_with_timeout_reports_timed_out(served):
    agent, data = served
    async with open_client(agent.socket) as c:
        mid = await create(c, data, mtype="OneShot", timeout=0.4)
        with trio.fail_after(PATIENCE):
            note = await c.notifications.receive()
        assert note.params == [mid, [{"fileId": "Timed out", "type": "System"}]]
        await stopped_by_itself(c, mid)


async def test_inactivity_timer_restarts_at_every_event(served):
    agent, data = served
    async with open_client(agent.socket) as c:
        # Events every 0.3 s keep a 2 s timer alive past 2.4 s. (The gap between events
        # is far below the timeout, so that a busy machine delaying one write by well
        # over a second still cannot let the timer run out in between.)
        timeout, gap, count = 2.0, 0.3, 8
        assert gap * count > timeout
        mid = await create(c, data, mtype="Inactivity", timeout=timeout)
        start = trio.current_time()
        for i in range(count):
            await trio.sleep(gap)
            write(data / f"f{i}")
        last_event = trio.current_time()
        events = []
        with trio.fail_after(PATIENCE):
            while ("System", "Inactive") not in events:
                note = await c.notifications.receive()
                events += [(e["type"], e["fileId"]) for e in note.params[1]]
        # Inactive comes a whole timeout after the last event, not after the first.
        assert trio.current_time() - last_event >= timeout - 0.05
        assert trio.current_time() - start >= gap * count + timeout - 0.05
        assert [e for e in events if e[0] == "Create"] == [
            ("Create", f"{data}/f{i}") for i in range(count)]
        await stopped_by_itself(c, mid)


async def test_lifecycle_stop_start_destroy(served):
    agent, data = served
    async with open_client(agent.socket) as c:
        mid = await create(c, data, start=False)
        assert len(mid) == 36 and mid[14] == "1"  # a uuid1
        assert await c.call("MonitorServer.getMonitorState", mid) == "Stopped"
        await c.call("MonitorServer.stopMonitor", mid)  # idempotent
        await c.call("MonitorServer.startMonitor", mid)
        write(data / "a")
        await c.call("MonitorServer.sync", mid)
        await c.call("MonitorServer.stopMonitor", mid)
        await c.call("MonitorServer.stopMonitor", mid)
        write(data / "unseen")
        await c.call("MonitorServer.startMonitor", mid)
        write(data / "b")
        await c.call("MonitorServer.sync", mid)
        assert drain(c, mid) == [("Create", f"{data}/a"), ("Create", f"{data}/b")]
        await c.call("MonitorServer.destroyMonitor", mid)  # stops first
        with pytest.raises(OmeroFSError, match="no such monitor"):
            await c.call("MonitorServer.getMonitorState", mid)
        with pytest.raises(OmeroFSError, match="no such monitor"):
            await c.call("MonitorServer.destroyMonitor", mid)


@pytest.mark.parametrize("args, message", [
    (["Sometimes", ["All"], "Flat"], "mType must be one of"),
    (["Persistent", ["Everything"], "Flat"], "eTypes must be one of"),
    (["Persistent", ["All"], "Deep"], "pMode must be one of"),
])
async def test_bad_arguments_are_errors(served, args, message):
    agent, data = served
    async with open_client(agent.socket) as c:
        with pytest.raises(OmeroFSError, match=message):
            await c.call("MonitorServer.createMonitor", *args, str(data), [], [], 0.0, 0,
                         False, False, True, None)


async def test_monitors_only_inside_exported_roots(served, tmp_path):
    agent, data = served
    os.symlink("/etc", data / "etc")
    async with open_client(agent.socket) as c:
        for path in ["/etc", f"{data}/..", f"{data}/etc"]:
            with pytest.raises(OmeroFSError, match="not under an exported root"):
                await create(c, path, start=False)
        with pytest.raises(OmeroFSError, match="not a directory"):
            write(data / "file")
            await create(c, data / "file", start=False)
        with pytest.raises(OmeroFSError, match="proxy must be nil"):
            await c.call("MonitorServer.createMonitor", "Persistent", ["All"], "Flat",
                         str(data), [], [], 0.0, 0, False, False, True, "proxy")


async def test_disconnected_clients_monitors_are_destroyed_after_grace(agent_factory,
                                                                      tmp_path):
    grace = 3.0
    agent, data = export_agent(agent_factory, tmp_path,
                               config=f"monitor_grace_seconds = {grace}\n")
    async with open_client(agent.socket) as c:
        mid = await create(c, data, mode="Recurse")
    left = trio.current_time()
    # Once the agent has seen the client go, the monitor is kept for the grace...
    with trio.fail_after(PATIENCE):
        while agent.status()["rpc"]["connections"]:
            await trio.sleep(0.02)
    assert mid in agent.status()["monitors"]["monitors"]
    # ...and destroyed when it has passed, not before.
    with trio.fail_after(PATIENCE):
        while agent.status()["monitors"]["monitors"]:
            await trio.sleep(0.02)
    assert trio.current_time() - left >= grace - 0.05
    assert "its client left" in agent.log()


async def test_a_new_connection_can_reattach_within_the_grace(agent_factory, tmp_path):
    agent, data = export_agent(agent_factory, tmp_path, config="monitor_grace_seconds = 30\n")
    async with open_client(agent.socket) as c:
        mid = await create(c, data)
    write(data / "while-away")
    await trio.sleep(0.3)
    async with open_client(agent.socket) as c:
        await c.call("MonitorServer.startMonitor", mid)
        assert await synced(c, mid) == [("Create", f"{data}/while-away")]


async def test_overflow_is_reported_and_rescanned_without_losses(served):
    agent, data = served
    limit = int(open("/proc/sys/fs/inotify/max_queued_events").read())
    count = limit // 2 + 2000  # two events per file: more than the queue holds
    (data / "keep").write_bytes(b"1")
    (data / "gone").write_bytes(b"1")
    (data / "changed").write_bytes(b"1")
    time.sleep(0.1)  # older than the rescan's mtime slack (one kernel clock tick)
    async with open_client(agent.socket) as c:
        mid = await create(c, data, ignore_dirs=True)
        await c.call("MonitorServer.sync", mid)
        os.kill(agent.proc.pid, signal.SIGSTOP)  # the reader stalls for real
        try:
            for i in range(count):
                write(data / f"n{i:06d}")
            os.unlink(data / "gone")
            time.sleep(0.05)
            (data / "changed").write_bytes(b"22")
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        with trio.fail_after(60):
            got = await synced(c, mid)
    assert ("System", "Overflow") in got
    creates = [p for t, p in got if t == "Create"]
    assert sorted(creates) == [f"{data}/n{i:06d}" for i in range(count)]  # each exactly once
    assert ("Delete", f"{data}/gone") in got
    assert ("Modify", f"{data}/changed") in got
    assert not [e for e in got if e[1] == f"{data}/keep"]  # no spurious difference
    # The operator sees it too: counted in the metrics, one WARNING line per overflow.
    from prometheus_client.parser import text_string_to_metric_families
    values = {s.name: s.value for f in text_string_to_metric_families(
        (agent.mount / "metrics").read_text()) for s in f.samples}
    overflows = values["fsagent_monitor_overflows_total"]
    assert overflows >= 1
    assert values["fsagent_monitor_events_delivered_total"] == len(got)
    warned = f"WARNING fsagent.monitor._monitor: monitor {mid} on {data}: inotify queue overflowed"
    assert agent.log().count(warned) == overflows


WATCH_LIMIT_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
open("/proc/sys/user/max_inotify_watches", "w").write("4")
from fsagent.monitor._inotify import InotifyWatcher, walk
from fsagent.monitor._translate import Translator
root = sys.argv[2]
none = lambda p: False
a, b = InotifyWatcher(), InotifyWatcher()
tb = Translator(root + "/b", "Recurse", none)
tb.add_listing(walk(b, root + "/b", recurse=True, excluded=none), report=False)
ta = Translator(root + "/a", "Recurse", none)
ta.add_listing(walk(a, root + "/a", recurse=True, excluded=none), report=False)
print("A", sorted(u[0][1] for u in ta.take_units()))
for d in ("b", "a", "a/1", "a/2", "a/3", "a/4"):
    open(f"{root}/{d}/x", "w").close()
time.sleep(0.05)
tb.feed(b.read_now(), 0.0)
ta.feed(a.read_now(), 0.0)
print("B", [u[0][:2] for u in tb.take_units()])
print("A", sorted(u[0][1] for u in ta.take_units()))
"""


def test_watch_limit_is_reported_and_other_monitors_keep_working(tmp_path):
    """In a user namespace the watch limit is ours to lower, without touching the host."""
    for d in ["a/1", "a/2", "a/3", "a/4", "b"]:
        os.makedirs(tmp_path / d)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["unshare", "-Ur", sys.executable, "-c", WATCH_LIMIT_SCRIPT, repo,
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "unshare" in r.stderr and "Operation not permitted" in r.stderr:
        pytest.skip("user namespaces are disabled on this machine (physical limit)")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # b took one watch, a and two of its subdirectories the other three: the fourth
    # and fifth directories are reported by name, not swallowed.
    failed = [f"Watch limit reached: {tmp_path}/a/{n}" for n in (1, 2, 3, 4)]
    reported = eval(lines[0][2:])
    assert len(reported) == 2 and set(reported) <= set(failed), lines[0]
    # The other monitor is unaffected, and the rest of this one keeps serving.
    assert eval(lines[1][2:]) == [("Create", f"{tmp_path}/b/x")]
    watched = {f"{tmp_path}/a/{n}" for n in (1, 2, 3, 4)} - {
        m.rsplit(": ", 1)[1] for m in reported}
    assert eval(lines[2][2:]) == sorted([f"{tmp_path}/a/x"] + [f"{d}/x" for d in watched])


async def test_file_still_open_when_its_new_directory_is_listed_is_created_at_close(
        served, tmp_path):
    agent, data = served
    staging = tmp_path / "staging"
    staging.mkdir()
    f = open(staging / "big.tif", "wb")  # opened for writing before the directory arrives
    f.write(b"partial")
    f.flush()
    async with open_client(agent.socket) as c:
        mid = await create(c, data, mode="Follow", ignore_dirs=True)
        os.rename(staging, data / "run")
        assert await synced(c, mid) == []  # listed, but its writer has not closed it
        f.write(b" rest")
        f.close()
        assert await synced(c, mid) == [("Create", f"{data}/run/big.tif")]


async def test_a_name_that_is_not_utf8_arrives_as_bin_and_the_monitor_goes_on(served):
    """An instrument folder may hold a file whose name is not UTF-8. Its event carries
    the raw bytes (msgpack bin), FileServer takes them back as a path, and the monitor
    keeps delivering (such a name used to kill it)."""
    agent, data = served
    odd = os.fsencode(data) + b"/\xff\xfe.tif"
    async with open_client(agent.socket) as c:
        mid = await create(c, data)
        write(odd, b"12345")
        assert await synced(c, mid) == [("Create", odd)]
        assert await c.call("FileServer.getSize", odd) == 5
        assert b"\xff\xfe.tif" in await c.call("FileServer.getDirectory", str(data), "")
        write(data / "next.tif")
        assert await synced(c, mid) == [("Create", f"{data}/next.tif")]
        assert await c.call("MonitorServer.getMonitorState", mid) == "Started"


def test_no_subprocess_is_needed_to_start_monitors_once_loaded():
    """A fork from the event loop can deadlock on our own mount (see _inotify.py)."""
    script = (
        "import subprocess\n"
        "from fsagent.monitor._inotify import InotifyWatcher, load_library\n"
        "load_library()\n"
        "def refuse(*a, **k): raise AssertionError('forked: ' + repr(a[:1]))\n"
        "subprocess.Popen = refuse\n"
        "InotifyWatcher()\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=30)
    assert result.stdout == "ok\n", result.stderr
