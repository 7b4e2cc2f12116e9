"""``fsagent jobs ...`` and the ``Jobs.*`` RPC methods against a live agent."""

from __future__ import annotations

import json
import subprocess
import time

from conftest import PATIENCE
from fsagent.rpc import RpcError, call_sync
from jobs_util import (
    GATED_IMPORT, import_spec, open_gate, put, read, status, submit, wait_status,
)


def jobs_cli(cli, agent, *args):
    return cli("jobs", *args[:1], *(("--socket", str(agent.socket)) if args else ()),
               *args[1:])


def test_submit_list_show_wait(agent, cli):
    put(agent, "exp/a.txt", b"alpha")
    r = jobs_cli(cli, agent, "submit", "archive", "--path", "exp", "--compression",
                 "deflate", "--priority", "3", "--id", "cli1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "cli1\n"
    r = jobs_cli(cli, agent, "wait", "cli1")
    assert (r.returncode, r.stdout) == (0, "success\n")
    r = jobs_cli(cli, agent, "show", "cli1")
    record = json.loads(r.stdout)
    assert record["State"] == "Success" and record["Priority"] == 3
    assert record["Spec"] == {"paths": ["exp"], "compression": "deflate"}
    # The same job through the files: one engine behind both.
    assert read(agent.jobs / "cli1" / "status") == "success\n"
    r = jobs_cli(cli, agent, "list")
    assert r.returncode == 0 and r.stdout.startswith("cli1\tsuccess\t100%\tarchive\t3\t")
    assert [j["ID"] for j in json.loads(jobs_cli(cli, agent, "list", "--json").stdout)] \
        == ["cli1"]
    r = jobs_cli(cli, agent, "submit", "archive", "--spec", '{"paths": ["exp/a.txt"]}')
    job_id = r.stdout.strip()
    assert r.returncode == 0 and len(job_id) == 36  # a generated UUID
    assert jobs_cli(cli, agent, "wait", job_id).stdout == "success\n"


def test_control_verbs_and_refusals(agent_factory, cli):
    agent = agent_factory(config=GATED_IMPORT).start()
    job = submit(agent, "g", import_spec(agent, "g.dat"))
    assert jobs_cli(cli, agent, "pause", "g").stdout == "paused\n"
    assert status(job) == "paused"
    assert jobs_cli(cli, agent, "resume", "g").stdout in ("pending\n", "running\n")
    wait_status(job, "running")  # retry of a pending job is a no-op, of a running one refused
    r = jobs_cli(cli, agent, "retry", "g")
    assert r.returncode == 2
    assert r.stderr.startswith("fsagent: IllegalMove: job 'g': cannot retry a ")
    assert r.stderr.count("\n") == 1
    assert jobs_cli(cli, agent, "cancel", "g").stdout == "cancelled\n"
    r = jobs_cli(cli, agent, "wait", "g")
    assert (r.returncode, r.stdout) == (1, "cancelled\n")
    assert jobs_cli(cli, agent, "retry", "g").stdout == "pending\n"
    open_gate(agent, "g.dat")
    assert jobs_cli(cli, agent, "wait", "g").stdout == "success\n"
    # Bad input: one line, exit 2, nothing changed.
    r = jobs_cli(cli, agent, "show", "nope")
    assert (r.returncode, r.stderr) == (2, "fsagent: NoSuchJob: no job 'nope'\n")
    r = jobs_cli(cli, agent, "submit", "archive", "--path", "../etc")
    assert r.returncode == 2 and "BadSpec" in r.stderr and "'..' is refused" in r.stderr
    r = jobs_cli(cli, agent, "submit", "explode")
    assert r.returncode == 2 and "unknown job type 'explode'" in r.stderr
    r = jobs_cli(cli, agent, "submit", "archive", "--spec", "{nope")
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    r = jobs_cli(cli, agent, "submit", "archive", "--path", "g.dat", "--id", "g")
    assert r.returncode == 2 and "JobExists" in r.stderr
    assert [j["ID"] for j in json.loads(jobs_cli(cli, agent, "list", "--json").stdout)] \
        == ["g"]
    # remove: only finished jobs; then it is gone, files and all
    live = submit(agent, "live", import_spec(agent, "live.dat"))
    wait_status(live, "running")
    r = jobs_cli(cli, agent, "remove", "live")
    assert (r.returncode, r.stderr) == (2, "fsagent: JobNotFinished: job 'live' is running; "
                                           "only a finished job can be removed (cancel it "
                                           "first)\n")
    assert jobs_cli(cli, agent, "remove", "g").returncode == 0
    assert not (agent.jobs / "g").exists() and not (agent.state / "jobs" / "g").exists()
    r = jobs_cli(cli, agent, "remove", "g")
    assert (r.returncode, r.stderr) == (2, "fsagent: NoSuchJob: no job 'g'\n")
    open_gate(agent, "live.dat")


def test_cli_without_an_agent_is_one_line_and_exit_2(cli, tmp_path):
    r = cli("jobs", "list", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot connect" in r.stderr


def test_rpc_methods_share_the_engine_with_the_files(agent_factory):
    agent = agent_factory(config=GATED_IMPORT).start()
    sock = str(agent.socket)
    job_id = call_sync(sock, "Jobs.submit", "import", {
        k: v for k, v in import_spec(agent, "r.dat").items() if k != "type"})
    wait_status(agent.jobs / job_id, "running")
    waiter = subprocess.Popen(["cat", str(agent.jobs / job_id / "wait")],
                              stdout=subprocess.PIPE)
    try:
        time.sleep(0.3)
        try:
            call_sync(sock, "Jobs.bogus")
        except RpcError as e:
            assert e.name == "NoSuchMethod"
        try:
            call_sync(sock, "Jobs.retry", job_id)
            raise AssertionError("retry of a running job was accepted")
        except RpcError as e:
            assert e.name == "IllegalMove" and job_id in e.message and "running" in e.message
        assert call_sync(sock, "Jobs.cancel", job_id) == "cancelled"
        assert waiter.communicate(timeout=PATIENCE)[0] == b"cancelled\n"
    finally:
        waiter.kill()
    assert call_sync(sock, "Jobs.show", job_id)["State"] == "Cancelled"
    try:
        call_sync(sock, "Jobs.set_priority", job_id, 5)
        raise AssertionError("priority of a cancelled job was changed")
    except RpcError as e:
        assert e.name == "IllegalMove"
