"""``fsagent call`` and ``fsagent watch`` against a live agent."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from conftest import FSAGENT, PATIENCE, wait_for
from rpcutil import export_agent


def test_call_prints_json_and_exit_codes(agent_factory, tmp_path, cli):
    agent, data = export_agent(agent_factory, tmp_path)
    (data / "a.tif").write_bytes(b"abc")
    sock = ["--socket", str(agent.socket)]
    r = cli("call", *sock, "FileServer.getStats", str(data / "a.tif"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["size"] == 3
    r = cli("call", *sock, "FileServer.readBlock", json.dumps(str(data / "a.tif")), "1", "5")
    assert json.loads(r.stdout) == {"base64": "YmM="}
    r = cli("call", *sock, "FileServer.getSize", "/etc/shadow")
    assert r.returncode == 3
    assert r.stderr == "fsagent: OmeroFSError: not under an exported root: /etc/shadow\n"
    r = cli("call", *sock, "No.such")
    assert r.returncode == 3 and r.stderr.startswith("fsagent: NoSuchMethod:")
    # the socket found from --state-dir, as `run` would place it
    r = cli("call", "--state-dir", str(agent.state), "FileServer.fileExists", str(data))
    assert r.returncode == 0 and r.stdout.strip() == "true"


def test_call_without_an_agent_is_exit_2(cli, tmp_path):
    r = cli("call", "--socket", str(tmp_path / "none.sock"), "FileServer.getSize", "/x")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "cannot connect" in r.stderr


def test_watch_prints_events_as_json_lines(agent_factory, tmp_path):
    # A grace longer than any wait below: the monitor must go because watch destroys
    # it on the way out, not because its client left.
    agent, data = export_agent(agent_factory, tmp_path,
                               config="monitor_grace_seconds = 3600\n")
    proc = subprocess.Popen(FSAGENT + ["watch", "--socket", str(agent.socket), str(data),
                                       "--recurse", "--whitelist", "tif"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        header = json.loads(proc.stdout.readline())
        assert header["watching"] == str(data)
        (data / "sub").mkdir()
        time.sleep(0.2)
        (data / "sub" / "a.tif").write_bytes(b"x")
        (data / "b.txt").write_bytes(b"x")
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
        assert (first["type"], first["fileId"]) == ("Create", f"{data}/sub")
        assert (second["type"], second["fileId"]) == ("Create", f"{data}/sub/a.tif")
        assert second["monitorId"] == header["monitorId"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(PATIENCE)
    assert proc.returncode == 130
    wait_for(lambda: agent.status()["monitors"]["monitors"] == {},
             what="the monitor destroyed on the way out")


def test_status_over_rpc_matches_the_status_file(agent_factory, tmp_path, cli):
    # No settling during the test: the upload (and its job counts) must hold still
    # between the reads compared below.
    agent, data = export_agent(agent_factory, tmp_path, config="settle_seconds = 3600\n")
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 100_000)
    subprocess.run(["cp", str(src), str(agent.uploads / "a.bin")], check=True)
    # a second client holding a started monitor
    watcher = subprocess.Popen(FSAGENT + ["watch", "--socket", str(agent.socket), str(data)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(watcher.stdout.readline())["watching"] == str(data)
        sock = ["--socket", str(agent.socket)]
        r = cli("status", *sock, "--json")
        assert r.returncode == 0, r.stderr
        over_rpc = json.loads(r.stdout)
        from_file = agent.status()
        for volatile in ("uptime_seconds", "store_free_bytes", "rpc", "uploads"):
            over_rpc.pop(volatile), from_file.pop(volatile)
        assert over_rpc == from_file
        # The agent drops a finished call's connection when it reads the end of it, on
        # its own time: each count below is polled until that earlier call has gone
        # (a connection that never went would keep it too high).

        def clients_over_rpc(n):
            status = json.loads(cli("status", *sock, "--json").stdout)
            return status if status["rpc"]["connections"] == n else None

        over_rpc = wait_for(lambda: clients_over_rpc(2),  # the watcher and this call
                            what="2 RPC connections: the watcher and this call")
        assert sum(over_rpc["uploads"]["tasks"].values()) == 1
        assert len(over_rpc["monitors"]["monitors"]) == 1
        # the file carries the same sections: uploads by state, monitors, RPC clients
        from_file = wait_for(lambda: (s := agent.status())["rpc"]["connections"] == 1 and s,
                             what="1 RPC connection: the watcher only")
        assert from_file["uploads"]["tasks"] == over_rpc["uploads"]["tasks"]
        assert from_file["monitors"] == over_rpc["monitors"]

        def text_with_clients(n):
            r = cli("status", *sock)
            assert r.returncode == 0, r.stderr
            return r if f"rpc:      {n} clients on {agent.socket}\n" in r.stdout else None

        r = wait_for(lambda: text_with_clients(2), what="2 RPC clients in the text status")
        lines = r.stdout.splitlines()
        from fsagent import __version__
        assert lines[0].startswith(f"fsagent {__version__} (pid {agent.proc.pid}), up ")
        assert f"mount:    {agent.mount} " in r.stdout
        assert " free of " in r.stdout
        state = next(s for s, n in over_rpc["uploads"]["tasks"].items() if n)
        assert f"uploads:  1 {state}\n" in r.stdout
        assert "monitors: 1 (1 Started)\n" in r.stdout
        # found from --state-dir like `call`
        assert cli("status", "--state-dir", str(agent.state)).returncode == 0
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(PATIENCE)


def test_status_without_an_agent_is_one_line_and_exit_2(cli, tmp_path):
    r = cli("status", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "cannot connect" in r.stderr
