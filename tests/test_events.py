"""``Events.subscribe``: uploadChanged/jobChanged notifications (issue 13, point 4).

Design notes
------------
* The hub (``fsagent/events.py``) is tested alone first, with a fake clock and a fake
  outbox whose room the test sets: ordering, the rate limit of progress-only changes,
  coalescing for a subscriber whose outbox is full, and nothing kept without a
  subscriber.
* Then on a live agent with the real RPC client: uploads written with ``cp`` and their
  import jobs, a job cancelled through its ``control`` file, unsubscribe, refusals, and
  a subscriber that does not read while hundreds of files are uploaded.
* "Nothing arrived" is proven with a round trip, not a pause: notifications and
  replies share one FIFO outbox per connection, so once ``Agent.status`` has answered,
  every notification queued before it has been read.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest
import trio
import trio.testing

from conftest import PATIENCE, wait_for
from fsagent.events import JOBS, UPLOADS, EventHub, Subscriber, UnknownTopic
from fsagent.rpc import RpcError, open_client
from jobs_util import GATED_IMPORT, import_spec, submit, wait_status

QUICK = 'settle_seconds = 0.3\nimport_grouping = "file"\n'


# -- the hub alone -------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeOutbox:
    """A Sink with ``room`` messages of space (None: unlimited)."""

    def __init__(self, room=None):
        self.room = room
        self.got: list[tuple[str, dict]] = []
        self.space = trio.Event()

    def try_send(self, method, params) -> bool:
        if self.room is not None and self.room <= 0:
            return False
        if self.room is not None:
            self.room -= 1
        self.got.append((method, params[0]))
        return True

    async def send(self, method, params) -> None:
        while not self.try_send(method, params):
            await self.space.wait()
            self.space = trio.Event()

    def grow(self, n) -> None:
        self.room += n
        self.space.set()


def rec(key, state, offset=0):
    return {"taskID": key, "state": state, "offset": offset}


def states(outbox, key=None):
    return [(r["taskID"], r["state"], r["offset"]) for _, r in outbox.got
            if key is None or r["taskID"] == key]


def hub_with(room=None, topics=(UPLOADS,)):
    clock = FakeClock()
    hub = EventHub(clock=clock)
    outbox = FakeOutbox(room)
    sub = Subscriber(outbox)
    hub.subscribe(sub, list(topics))
    return hub, clock, outbox, sub


def test_hub_delivers_every_state_move_in_order_even_within_one_instant():
    hub, clock, outbox, _ = hub_with()
    uploads = hub.topic(UPLOADS)
    for state in ("partial", "receiving", "partial", "verifying", "complete"):
        hub.publish(uploads, "a", rec("a", state))   # no time passes at all
        hub.publish(uploads, "b", rec("b", state))
    assert [s for _, s, _ in states(outbox, "a")] == [
        "partial", "receiving", "partial", "verifying", "complete"]
    assert states(outbox)[:4] == [("a", "partial", 0), ("b", "partial", 0),
                                  ("a", "receiving", 0), ("b", "receiving", 0)]
    assert outbox.got[0][0] == "uploadChanged"


def test_hub_rate_limits_progress_only_changes_and_sends_the_latest():
    hub, clock, outbox, _ = hub_with()
    uploads = hub.topic(UPLOADS)
    hub.publish(uploads, "a", rec("a", "receiving", 0))
    for i in range(1, 50):  # 49 progress changes in 0.098 s
        clock.now += 0.002
        hub.publish(uploads, "a", rec("a", "receiving", i))
    assert states(outbox) == [("a", "receiving", 0)]
    assert hub.next_due() == pytest.approx(100.25)
    clock.now = 100.2
    assert hub.tick() == 0  # not due yet
    clock.now = 100.25
    assert hub.tick() == 1
    assert states(outbox) == [("a", "receiving", 0), ("a", "receiving", 49)]
    assert hub.next_due() is None
    # Over 10 s of changes every 10 ms, at most 4 per second go out (plus the first).
    for i in range(1000):
        clock.now += 0.01
        hub.publish(uploads, "a", rec("a", "receiving", 100 + i))
        if hub.next_due() is not None and hub.next_due() <= clock.now:
            hub.tick()
    sent = len(states(outbox)) - 2
    assert 36 <= sent <= 41, sent
    assert states(outbox)[-1][2] >= 1100 - 26  # never more than ~0.25 s stale
    # A state move is never held back, and it supersedes the held progress.
    hub.publish(uploads, "a", rec("a", "receiving", 5000))
    hub.publish(uploads, "a", rec("a", "partial", 5000))
    assert states(outbox)[-1] == ("a", "partial", 5000)
    assert hub.next_due() is None
    # A record equal to the last one sent is not sent again.
    clock.now += 10
    n = len(outbox.got)
    hub.publish(uploads, "a", rec("a", "partial", 5000))
    assert len(outbox.got) == n


async def test_hub_coalesces_for_a_full_outbox_and_ends_with_the_latest():
    hub, clock, outbox, sub = hub_with(room=2)
    uploads = hub.topic(UPLOADS)
    for key in ("a", "b", "c"):
        for state in ("partial", "receiving", "partial", "verifying", "complete"):
            hub.publish(uploads, key, rec(key, state))
    # Room for two; the rest waits, one record per task, the latest of each.
    assert states(outbox) == [("a", "partial", 0), ("a", "receiving", 0)]
    assert list(sub.pending) == [("uploadChanged", k) for k in "abc"]
    assert [r["state"] for r in sub.pending.values()] == ["complete"] * 3
    assert sub.coalesced == 15 - 2 - 3
    assert hub.status()["coalesced"] == 10 and hub.status()["pending"] == 3
    # Nothing bypasses what is pending (order per task), even with room again.
    outbox.room = 1
    hub.publish(uploads, "d", rec("d", "partial"))
    assert len(outbox.got) == 2 and ("uploadChanged", "d") in sub.pending
    outbox.room = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sub.pump)
        await trio.testing.wait_all_tasks_blocked()
        outbox.grow(100)
        await trio.testing.wait_all_tasks_blocked()
        assert not sub.pending
        # Caught up: the next record goes straight out again.
        clock.now += 1
        hub.publish(uploads, "a", rec("a", "partial", 7))
        assert states(outbox)[-1] == ("a", "partial", 7) and not sub.pending
        hub.drop(sub)
        await trio.testing.wait_all_tasks_blocked()
    last = {}
    for key, state, _ in states(outbox):
        last[key] = state
    assert last == {"a": "partial", "b": "complete", "c": "complete", "d": "partial"}
    assert not uploads.active and not hub.subscribers
    assert hub.status()["coalesced"] == 10  # kept after the subscriber left


def test_hub_keeps_nothing_without_a_subscriber_and_refuses_unknown_topics():
    hub, clock, outbox, sub = hub_with(topics=(JOBS,))
    uploads, jobs = hub.topic(UPLOADS), hub.topic(JOBS)
    assert not uploads.active and jobs.active
    hub.publish(uploads, "a", rec("a", "partial"))
    assert outbox.got == [] and uploads._last == {}
    hub.publish(jobs, "j", {"ID": "j", "State": "Pending"})
    assert outbox.got == [("jobChanged", {"ID": "j", "State": "Pending"})]
    with pytest.raises(UnknownTopic, match="unknown topic 'nope'; known: jobs, uploads"):
        hub.subscribe(sub, [UPLOADS, "nope"])
    assert not uploads.active  # all or nothing
    hub.subscribe(sub, [b"uploads"])  # msgpack bin, as some clients send
    assert uploads.active
    hub.unsubscribe(sub, [JOBS])
    assert not jobs.active and jobs._last == {} and sub.topics == {UPLOADS}


def test_hub_polls_only_for_a_topic_with_a_subscriber():
    hub, clock, outbox, sub = hub_with(topics=(JOBS,))
    uploads = hub.topic(UPLOADS)
    offsets = iter(range(100))
    polled = []

    def poll():
        polled.append(clock.now)
        hub.publish(uploads, "a", rec("a", "receiving", next(offsets)))

    hub.add_poller(uploads, poll)
    hub.poll()
    assert polled == []
    hub.subscribe(sub, [UPLOADS])
    hub.poll()
    clock.now += 0.25
    hub.poll()
    hub.poll()  # nothing new (the same instant): held for the rate limit, not sent
    assert states(outbox) == [("a", "receiving", 0), ("a", "receiving", 1)]
    clock.now += 0.25
    hub.tick()
    assert states(outbox)[-1] == ("a", "receiving", 2)


# -- a live agent --------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def collapse(values):
    """Consecutive repeats as one: the state moves of a sequence of records."""
    out = []
    for v in values:
        if not out or out[-1] != v:
            out.append(v)
    return out


async def records_until(client, done, *, timeout=PATIENCE):
    """Notifications as (method, record) until ``done(list so far)`` holds."""
    got = []
    with trio.fail_after(timeout):
        while not done(got):
            note = await client.notifications.receive()
            got.append((note.method, note.params[0]))
    return got


async def cp(*argv, timeout=PATIENCE):
    return await trio.to_thread.run_sync(lambda: subprocess.run(
        ["cp", *argv], check=True, capture_output=True, timeout=timeout))


async def test_upload_and_its_import_arrive_in_order(agent_factory, tmp_path):
    agent = agent_factory(config=QUICK).start()
    data = os.urandom(300_000)
    (tmp_path / "scan.tif").write_bytes(data)
    async with open_client(agent.socket) as client:
        assert await client.call("Events.subscribe", ["uploads", "jobs"]) is None
        await cp(tmp_path / "scan.tif", agent.uploads / "scan.tif")

        def finished(got):
            ups = [r for m, r in got if m == "uploadChanged"]
            if not ups or ups[-1]["state"] != "complete":
                return False
            job = ups[-1]["job"]
            return any(m == "jobChanged" and r["ID"] == job and r["State"] == "Success"
                       for m, r in got)

        got = await records_until(client, finished)
    ups = [r for m, r in got if m == "uploadChanged"]
    assert {r["path"] for r in ups} == {"scan.tif"} and len({r["taskID"] for r in ups}) == 1
    # Every state move, in order (the first "partial" is the task made at create).
    moves = collapse(r["state"] for r in ups)
    assert moves in (["partial", "receiving", "partial", "verifying", "complete"],
                     ["receiving", "partial", "verifying", "complete"]), moves
    final = ups[-1]
    assert final["sha256"] == sha256(data) and final["offset"] == len(data)
    assert final["progress"] == 100.0 and final["error"] is None
    assert set(final) >= {"taskID", "path", "state", "offset", "size", "progress",
                          "sha256", "job", "error", "updated"}
    assert final["taskID"] == os.getxattr(agent.uploads / "scan.tif",
                                          "user.fsagent.task").decode()
    jobs = [r for m, r in got if m == "jobChanged" and r["ID"] == final["job"]]
    assert collapse(r["State"] for r in jobs) == ["Pending", "Running", "Success"]
    assert jobs[-1]["Type"] == "import" and jobs[-1]["Progress"] == 100
    assert "Spec" not in jobs[-1]  # the member list stays out of every record
    async with open_client(agent.socket) as client:
        spec = (await client.call("Jobs.show", final["job"]))["Spec"]
    assert spec["task"] == final["taskID"]  # one job per file (the grouping)
    assert spec["sha256"] == sha256(data)


async def test_the_offset_of_a_file_being_written_is_sent_while_it_is_written(
        agent_factory):
    # No checkpoint by time while the test runs: only the poll can tell the offset.
    agent = agent_factory(config=QUICK + "checkpoint_seconds = 3600\n").start()
    chunk = os.urandom(100_000)
    async with open_client(agent.socket) as client:
        await client.call("Events.subscribe", ["uploads"])
        fd = await trio.to_thread.run_sync(
            os.open, agent.uploads / "slow.dat", os.O_WRONLY | os.O_CREAT)
        try:
            for n in (1, 2, 3):
                await trio.to_thread.run_sync(os.write, fd, chunk)
                got = await records_until(client, lambda got: got and got[-1][1]["state"]
                                          == "receiving"
                                          and got[-1][1]["offset"] == n * len(chunk))
                assert got[-1][1]["path"] == "slow.dat"
        finally:
            await trio.to_thread.run_sync(os.close, fd)
        got = await records_until(client, lambda got: got and got[-1][1]["state"]
                                  == "complete")
    assert got[-1][1]["offset"] == 3 * len(chunk)
    assert got[-1][1]["sha256"] == sha256(chunk * 3)


async def test_a_job_cancelled_through_its_control_file_arrives_cancelled(agent_factory):
    agent = agent_factory(config="max_concurrent_jobs = 1\n" + GATED_IMPORT).start()
    async with open_client(agent.socket) as client:
        await client.call("Events.subscribe", ["jobs"])
        job = await trio.to_thread.run_sync(
            lambda: submit(agent, "run", import_spec(agent, "run.dat")))
        await trio.to_thread.run_sync(wait_status, job, "running")
        result = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["bash", "-c", f"echo cancel > {job}/control"], capture_output=True))
        assert result.returncode == 0, result.stderr
        got = await records_until(client, lambda got: got and got[-1][1]["State"]
                                  == "Cancelled")
    assert {m for m, _ in got} == {"jobChanged"} and {r["ID"] for _, r in got} == {"run"}
    assert collapse(r["State"] for _, r in got) == ["Pending", "Running", "Cancelled"]
    assert got[-1][1]["Message"] == "cancelled while running"


async def test_unsubscribe_stops_them_and_bad_topics_are_refused(agent_factory, tmp_path):
    agent = agent_factory(config=QUICK).start()
    for name in ("a.dat", "b.dat", "c.dat"):
        (tmp_path / name).write_bytes(name.encode() * 1000)

    def complete(name):
        return lambda: os.getxattr(agent.uploads / name, "user.fsagent.state") == b"complete"

    async with open_client(agent.socket) as client:
        for bad, why in ((["uploads", "nope"], "unknown topic 'nope'"),
                         ("uploads", "topics is a list"), ([7], "unknown topic 7")):
            with pytest.raises(RpcError) as e:
                await client.call("Events.subscribe", bad)
            assert e.value.name == "BadArgument" and why in e.value.message
        with pytest.raises(RpcError, match="unknown topic 'nope'") as e:
            await client.call("Events.unsubscribe", ["nope"])
        assert e.value.name == "BadArgument"
        # A refused subscribe subscribed to nothing (not even its good topic).
        await cp(tmp_path / "a.dat", agent.uploads / "a.dat")
        await trio.to_thread.run_sync(wait_for, complete("a.dat"))
        await client.call("Agent.status")  # a round trip: anything queued came first
        assert client.notifications.statistics().current_buffer_used == 0

        await client.call("Events.subscribe", ["uploads"])
        await cp(tmp_path / "b.dat", agent.uploads / "b.dat")
        got = await records_until(client, lambda got: got and got[-1][1]["path"] == "b.dat"
                                  and got[-1][1]["state"] == "complete")
        assert {r["path"] for _, r in got} == {"b.dat"}

        await client.call("Events.unsubscribe", ["uploads"])
        await cp(tmp_path / "c.dat", agent.uploads / "c.dat")
        await trio.to_thread.run_sync(wait_for, complete("c.dat"))
        status = await client.call("Agent.status")
        assert client.notifications.statistics().current_buffer_used == 0
        assert status["rpc"]["events"]["subscribers"] == 1
        assert status["rpc"]["events"]["topics"] == {"uploads": 0, "jobs": 0}
    # The connection closed: the agent forgets its subscription (once it has seen the
    # close, which may come after another client's call).
    async with open_client(agent.socket) as other:
        with trio.fail_after(PATIENCE):
            while (await other.call("Agent.status"))["rpc"]["events"]["subscribers"]:
                await trio.sleep(0.05)


async def test_a_subscriber_that_does_not_read_stalls_nothing_and_ends_up_current(
        agent_factory, tmp_path):
    # A small outbox, long names (big records): the silent subscriber's outbox and
    # socket buffer fill after a few hundred records, so most changes are coalesced.
    agent = agent_factory(config=QUICK + "rpc_outbox_bytes = 65536\n").start()
    first, more = tmp_path / "first", tmp_path / "more"
    contents = {}
    for folder, n in ((first, 200), (more, 20)):
        folder.mkdir()
        for i in range(n):
            name = f"{folder.name}-{i:03d}-" + "x" * 150 + ".dat"
            contents[f"{folder.name}/{name}"] = data = f"{folder.name} {i}\n".encode() * 50
            (folder / name).write_bytes(data)

    async with open_client(agent.socket, notification_buffer=1) as silent, \
            open_client(agent.socket) as probe:
        await silent.call("Events.subscribe", ["uploads", "jobs"])
        await cp("-r", first, agent.uploads / "first")

        def all_complete(prefix):
            def check():
                uploads = agent.uploads / prefix
                return all(os.getxattr(uploads / name, "user.fsagent.state") == b"complete"
                           for name in os.listdir(uploads))
            return check

        await trio.to_thread.run_sync(wait_for, all_complete("first"))
        started = time.monotonic()
        await cp("-r", more, agent.uploads / "more", timeout=30)
        copied_in = time.monotonic() - started
        assert copied_in < 20, f"cp of 20 files took {copied_in:.1f}s with a silent subscriber"
        await trio.to_thread.run_sync(wait_for, all_complete("more"))
        events = (await probe.call("Agent.status"))["rpc"]["events"]
        # The silent subscriber was really behind: records were coalesced, and what
        # waits is at most one per upload and job (440), not one per change.
        assert events["coalesced"] > 0, events
        assert 0 < events["pending"] <= 2 * len(contents), events

        # Now it reads: it ends with every upload's latest record, complete.
        last: dict[str, dict] = {}

        async def consume():
            async for note in silent.notifications:
                if note.method == "uploadChanged":
                    last[note.params[0]["path"]] = note.params[0]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            with trio.fail_after(PATIENCE):
                while not (last.keys() >= contents.keys() and all(
                        last[p]["state"] == "complete" for p in contents)):
                    await trio.sleep(0.05)
                # Everything still pending or queued comes before this reply.
                while (await silent.call("Agent.status"))["rpc"]["events"]["pending"]:
                    await trio.sleep(0.05)
                await silent.call("Agent.status")
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    for path, data in contents.items():
        assert last[path]["state"] == "complete", (path, last[path])
        assert last[path]["sha256"] == sha256(data) and last[path]["job"], path
