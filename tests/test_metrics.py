"""Metrics: the registry's exposition (checked by prometheus_client's own parser), the
mount's ``metrics`` file, and the optional HTTP listener."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import PATIENCE
from fsagent.config import ConfigError, load_config
from fsagent.service.metrics import Registry
from fsagent.service.metrics_http import BadRequest, parse_request_head, route


def parse(text: str) -> dict:
    """{family name: {(sample name, sorted labels): value}}, via the reference parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = (family.type, {
            (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples})
    return out


def sample(families: dict, family: str, name: str | None = None, **labels) -> float:
    return families[family][1][(name or family, tuple(sorted(labels.items())))]


# -- the registry ------------------------------------------------------------------------------


def test_exposition_parses_and_carries_every_kind():
    r = Registry()
    c = r.counter("fsagent_things", "Things, counted")  # _total is added
    c.inc()
    c.inc(2.5)
    by_state = r.counter("fsagent_uploads_finished_total", "By outcome", labels=("state",))
    by_state.labels("complete").inc()
    by_state.labels(state='odd "value"\\\n').inc(4)
    g = r.gauge("fsagent_queue", "Queue length")
    g.set(7)
    g.dec(2)
    r.gauge("fsagent_jobs", "Jobs by state and kind", labels=("state", "kind"),
            collect=lambda: {("running", "import"): 2, ("queued", "archive"): 1})
    h = r.histogram("fsagent_job_duration_seconds", "Job run time", labels=("kind",),
                    buckets=(1, 10))
    h.labels("import").observe(0.5)
    h.labels("import").observe(5)
    h.labels("import").observe(50)
    families = parse(r.render().decode())
    assert families["fsagent_things"][0] == "counter"
    assert sample(families, "fsagent_things", "fsagent_things_total") == 3.5
    assert sample(families, "fsagent_uploads_finished", "fsagent_uploads_finished_total",
                  state="complete") == 1
    assert sample(families, "fsagent_uploads_finished", "fsagent_uploads_finished_total",
                  state='odd "value"\\\n') == 4
    assert sample(families, "fsagent_queue") == 5
    assert sample(families, "fsagent_jobs", state="running", kind="import") == 2
    assert sample(families, "fsagent_jobs", state="queued", kind="archive") == 1
    hist = "fsagent_job_duration_seconds"
    assert families[hist][0] == "histogram"
    assert sample(families, hist, hist + "_bucket", kind="import", le="1.0") == 1
    assert sample(families, hist, hist + "_bucket", kind="import", le="10.0") == 2
    assert sample(families, hist, hist + "_bucket", kind="import", le="+Inf") == 3
    assert sample(families, hist, hist + "_count", kind="import") == 3
    assert sample(families, hist, hist + "_sum", kind="import") == 55.5


def test_programming_errors_fail_loudly():
    r = Registry()
    c = r.counter("fsagent_x_total", "x")
    with pytest.raises(ValueError):
        r.counter("fsagent_x_total", "again")
    with pytest.raises(ValueError):
        c.inc(-1)
    with pytest.raises(ValueError):
        r.gauge("bad name", "x")
    with pytest.raises(ValueError):
        r.gauge("fsagent_y", "y", labels=("le",))
    labelled = r.gauge("fsagent_z", "z", labels=("state",))
    with pytest.raises(ValueError):
        labelled.set(1)
    with pytest.raises(ValueError):
        labelled.labels("a", "b")
    with pytest.raises(TypeError):
        r.counter("fsagent_c", "c", labels=("k",)).labels("v").set(3)


def test_updates_from_threads_are_not_lost():
    r = Registry()
    c = r.counter("fsagent_n_total", "n")
    h = r.histogram("fsagent_h_seconds", "h")

    def work():
        for _ in range(20000):
            c.inc()
            h.observe(0.002)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value() == 80000
    assert h.count() == 80000


def test_nan_and_empty_families_parse():
    r = Registry()
    r.gauge("fsagent_unknown", "not known yet", collect=lambda: float("nan"))
    r.counter("fsagent_errors_total", "none yet", labels=("op",), collect=dict)
    families = parse(r.render().decode())
    assert math.isnan(sample(families, "fsagent_unknown"))
    assert families["fsagent_errors"][1] == {}


# -- the HTTP core, on bytes ---------------------------------------------------------------------


def test_http_core():
    assert parse_request_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == (
        "GET", "/metrics")
    for bad in (b"\x16\x03\x01 TLS hello\r\n\r\n", b"GET /metrics\r\n\r\n", b"\r\n\r\n",
                b"get /metrics HTTP/1.1\r\n\r\n"):
        with pytest.raises(BadRequest):
            parse_request_head(bad)
    body = b"x 1\n"
    ok = route("GET", "/metrics", lambda: body, "text/plain")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nx 1\n")
    assert b"Content-Length: 4\r\n" in ok
    assert route("HEAD", "/metrics", lambda: body, "text/plain").endswith(b"\r\n\r\n")
    assert route("GET", "/", lambda: body, "t").startswith(b"HTTP/1.1 404 ")
    post = route("POST", "/metrics", lambda: body, "t")
    assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post


def test_metrics_listen_is_checked_like_every_setting(tmp_path):
    for bad in ("9464", "localhost", "host:http", "host:70000", ":9464"):
        with pytest.raises(ConfigError, match="metrics_listen"):
            load_config(None, {"metrics_listen": bad}, cwd=tmp_path)
    assert load_config(None, {"metrics_listen": "[::1]:9464"}, cwd=tmp_path).metrics_listen


# -- the agent ---------------------------------------------------------------------------------


def read_metrics(agent) -> dict:
    return parse((agent.mount / "metrics").read_text())


def test_metrics_file_parses_and_counters_move(agent):
    path = agent.mount / "metrics"
    st = os.stat(path)
    assert st.st_mode & 0o777 == 0o444
    before = read_metrics(agent)
    reads = sample(before, "fsagent_fuse_requests", "fsagent_fuse_requests_total", op="read")
    for _ in range(5):
        (agent.mount / "status").read_bytes()
    after = read_metrics(agent)
    assert sample(after, "fsagent_fuse_requests", "fsagent_fuse_requests_total",
                  op="read") >= reads + 5
    assert sample(after, "fsagent_fuse_requests", "fsagent_fuse_requests_total",
                  op="open") >= 5
    assert sample(after, "fsagent_uptime_seconds") > sample(before, "fsagent_uptime_seconds")
    vfs = os.statvfs(agent.state)
    assert abs(sample(after, "fsagent_store_free_bytes") - vfs.f_bavail * vfs.f_frsize) < 2**28
    assert sample(after, "fsagent_store_size_bytes") == vfs.f_blocks * vfs.f_frsize
    assert sample(after, "fsagent_build_info", version=agent.status()["version"]) == 1
    assert sample(after, "fsagent_previous_run_clean") == 1
    assert after["fsagent_fuse_errors"][1] == {}  # no unexpected failures
    assert after["fsagent_db_flush_seconds"][0] == "histogram"


def test_checkpoint_latency_survives_into_the_next_run(agent):
    assert math.isnan(sample(read_metrics(agent), "fsagent_last_checkpoint_seconds"))
    assert agent.stop() == 0
    agent.start()
    families = read_metrics(agent)
    seconds = sample(families, "fsagent_last_checkpoint_seconds")
    assert 0 <= seconds < 5
    assert sample(families, "fsagent_last_checkpoint_timestamp_seconds") > 0
    assert "checkpoint took" in agent.log()


def test_a_crash_shows_in_the_metrics(agent):
    agent.kill9()
    agent.start()
    assert sample(read_metrics(agent), "fsagent_previous_run_clean") == 0


def test_metrics_over_http(agent_factory):
    agent = agent_factory(config='metrics_listen = "127.0.0.1:0"\n').start()
    address = agent.status()["metrics_listen"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=PATIENCE) as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        families = parse(r.read().decode())
    assert sample(families, "fsagent_previous_run_clean") == 1
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{address}/", timeout=PATIENCE)
    assert e.value.code == 404
    # Garbage and a client that says nothing are answered or dropped; the agent lives on.
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=PATIENCE) as s:
        s.sendall(b"\x16\x03\x01garbage\r\n\r\n")
        answer = b""
        while len(answer) < 13 and (more := s.recv(100)):  # a stream: it may come in parts
            answer += more
        assert answer.startswith(b"HTTP/1.1 400 ")
    idle = socket.create_connection((host, int(port)), timeout=PATIENCE)
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=PATIENCE) as r:
        assert r.status == 200  # an idle connection blocks nobody
    idle.close()
    assert agent.status()["pid"] == agent.proc.pid


def test_busy_metrics_port_is_a_one_line_config_error(agent_factory, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        agent = agent_factory(config=f'metrics_listen = "127.0.0.1:{port}"\n')
        result = subprocess.run(agent.argv(), capture_output=True, text=True,
                                timeout=PATIENCE)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsagent: error: metrics_listen: ")
    assert not os.path.ismount(agent.mount)
    assert not (agent.state / "fsagent.db").exists()  # nothing touched


# -- the docs and the dashboard name real metrics ----------------------------------------------


def _exported_names(agent) -> tuple[set[str], set[str]]:
    """(family names as documented, every sample name) of a live agent's metrics."""
    families, samples = set(), set()
    for family in text_string_to_metric_families((agent.mount / "metrics").read_text()):
        families.add(family.name + ("_total" if family.type == "counter" else ""))
        samples.update(s.name for s in family.samples)
    return families, samples


def test_readme_metrics_table_is_what_the_agent_exports(agent):
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = re.search(r"<!-- metrics-table:[^>]*-->\n(.*?)<!-- /metrics-table -->", readme, re.S)
    assert table, "README lacks the metrics table markers"
    documented = set(re.findall(r"^\| `(\w+)", table.group(1), re.M))
    assert documented == _exported_names(agent)[0]


def test_grafana_dashboard_queries_only_exported_metrics(agent):
    import json
    import re
    from pathlib import Path
    dashboard = json.loads((Path(__file__).resolve().parent.parent / "contrib" /
                            "grafana-fsagent.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bfsagent_\w+", e)}
    documented, samples = _exported_names(agent)
    # (A labelled counter or histogram with no series yet, like the FUSE errors or the job
    # durations before the first run, has no samples: its family name must be exported.)
    series_of = {n: re.sub(r"_(bucket|count|sum)$", "", n) for n in used}
    unknown = {n for n in used if n not in samples | documented
               and series_of[n] not in documented}
    assert used and not unknown, unknown
    # Every agent-level metric but two supplementary timestamps is on the dashboard.
    supplementary = {"fsagent_start_time_seconds", "fsagent_last_checkpoint_timestamp_seconds"}
    assert documented - supplementary <= set(series_of.values())


def test_database_flushes_feed_the_latency_histogram(tmp_path):
    from fsagent.db import Database
    db = Database.open(tmp_path / "x.db")
    flush_seconds = Registry().histogram("fsagent_db_flush_seconds", "h")
    db.on_flush = flush_seconds.observe
    db.flush_sync()  # nothing staged: no transaction, nothing observed
    assert flush_seconds.count() == 0
    db.stage("run", "INSERT INTO agent_runs(pid, version, started) VALUES (?, ?, ?)",
             (1, "test", 0.0))
    db.flush_sync()
    assert db.flush_count == 1 and flush_seconds.count() == 1
    db.close()


def test_upload_metrics_move_with_a_real_upload(agent_factory, tmp_path):
    # No settling during the test: the upload's state must hold still between the
    # metrics and the status read compared below.
    agent = agent_factory(config="settle_seconds = 3600\n").start()
    before = read_metrics(agent)
    received = sample(before, "fsagent_upload_bytes_received",
                      "fsagent_upload_bytes_received_total")
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(300_000))
    subprocess.run(["cp", str(src), str(agent.uploads / "a.bin")], check=True)
    after = read_metrics(agent)
    assert sample(after, "fsagent_upload_bytes_received",
                  "fsagent_upload_bytes_received_total") == received + 300_000
    by_state = {dict(labels)["state"]: v for (_, labels), v in after["fsagent_uploads"][1].items()}
    assert sum(by_state.values()) == 1
    assert by_state == {s: float(n) for s, n in agent.status()["uploads"]["tasks"].items()}


def test_rpc_metrics_move_with_real_calls(agent, cli):
    before = read_metrics(agent)
    sock = ["--socket", str(agent.socket)]
    assert cli("status", *sock).returncode == 0
    assert cli("call", *sock, "No.such").returncode == 3
    after = read_metrics(agent)
    assert sample(after, "fsagent_rpc_requests", "fsagent_rpc_requests_total") == \
        sample(before, "fsagent_rpc_requests", "fsagent_rpc_requests_total") + 2
    assert sample(after, "fsagent_rpc_errors", "fsagent_rpc_errors_total",
                  error="NoSuchMethod") == 1
    # The agent drops each connection when it reads its end, on its own time.
    from conftest import wait_for
    wait_for(lambda: sample(read_metrics(agent), "fsagent_rpc_clients") == 0,
             what="no RPC clients left")


# -- metrics (and their log lines) that move with real uploads, jobs and monitors --------------


def _upload_with_declared_hash(path, data: bytes, declared: bytes) -> None:
    import hashlib
    with open(path, "wb") as f:  # declared while a writer holds it: checked at close
        os.setxattr(path, "user.fsagent.sha256", hashlib.sha256(declared).hexdigest().encode())
        f.write(data)


def test_verification_failures_and_completions_are_counted(agent):
    from conftest import wait_for
    up = agent.uploads
    failures = "fsagent_upload_verification_failures"

    def counts():
        m = read_metrics(agent)
        return (sample(m, "fsagent_uploads_completed", "fsagent_uploads_completed_total"),
                {r: sample(m, failures, failures + "_total", reason=r)
                 for r in ("mismatch", "size", "unreadable")})

    assert counts() == (0, {"mismatch": 0, "size": 0, "unreadable": 0})  # series exist at 0
    good, bad = os.urandom(200_000), os.urandom(200_000)
    _upload_with_declared_hash(up / "ok.bin", good, good)
    _upload_with_declared_hash(up / "bad.bin", bad, good)

    def settled():
        states = [os.getxattr(up / n, "user.fsagent.state") for n in ("ok.bin", "bad.bin")]
        return states == [b"complete", b"failed"]

    wait_for(settled, what="ok.bin complete and bad.bin failed")
    assert counts() == (1, {"mismatch": 1, "size": 0, "unreadable": 0})
    log = agent.log()
    assert "INFO fsagent.uploads._component: upload complete: ok.bin (200000 bytes" in log
    assert re.search(r"WARNING fsagent\.uploads\._component: upload \S+ failed: bad\.bin: "
                     r"sha256 mismatch", log), log
    # A re-send repairs it: one more completion, the failure count stays.
    _upload_with_declared_hash(up / "bad.bin", good, good)
    wait_for(lambda: os.getxattr(up / "bad.bin", "user.fsagent.state") == b"complete")
    assert counts() == (2, {"mismatch": 1, "size": 0, "unreadable": 0})


def test_job_metrics_and_log_lines_follow_real_jobs(agent_factory):
    import json
    from jobs_util import GATED_IMPORT, import_spec, open_gate, put, submit, wait_status
    agent = agent_factory(config=GATED_IMPORT).start()
    jobs, hist = "fsagent_jobs", "fsagent_job_duration_seconds"
    m = read_metrics(agent)
    assert m[jobs][0] == "gauge" and len(m[jobs][1]) == 6 * 3  # every state x kind, at 0
    assert set(m[jobs][1].values()) == {0}
    ok = submit(agent, "ok", import_spec(agent, "ok.dat"))
    wait_status(ok, "running")
    assert sample(read_metrics(agent), jobs, state="running", kind="import") == 1
    time.sleep(0.3)
    open_gate(agent, "ok.dat")
    wait_status(ok, "success")
    put(agent, "bad.dat.fail", b"")
    open_gate(agent, "bad.dat")
    bad = submit(agent, "bad", import_spec(agent, "bad.dat"))
    wait_status(bad, "failure")
    m = read_metrics(agent)
    assert sample(m, jobs, state="running", kind="import") == 0
    assert sample(m, jobs, state="success", kind="import") == 1
    assert sample(m, jobs, state="failure", kind="import") == 1
    assert m[hist][0] == "histogram"
    assert sample(m, hist, hist + "_count", kind="import", state="success") == 1
    assert sample(m, hist, hist + "_count", kind="import", state="failure") == 1
    ran = sample(m, hist, hist + "_sum", kind="import", state="success")
    assert 0.3 <= ran < 10
    assert abs(ran - json.loads((ok / "info.json").read_text())["EffectiveRuntime"]) < 0.01
    assert sample(m, hist, hist + "_bucket", kind="import", state="success", le="0.1") == 0
    log = agent.log()
    for line in ("job ok (import): submitted -> pending, priority 0",
                 "job ok (import): pending -> running", "job ok (import): running -> success",
                 "job bad (import): running -> failure: error 4: "):
        assert f"INFO fsagent.jobs._engine: {line}" in log, line


async def test_monitor_metrics_and_log_lines(agent_factory, tmp_path):
    from rpcutil import create, export_agent, open_client, synced
    agent, data = export_agent(agent_factory, tmp_path)
    delivered = ("fsagent_monitor_events_delivered", "fsagent_monitor_events_delivered_total")
    async with open_client(agent.socket) as c:
        mid = await create(c, data)
        m = read_metrics(agent)
        assert sample(m, "fsagent_monitors", state="Started") == 1
        assert sample(m, *delivered) == 0
        for i in range(5):
            (data / f"f{i}").write_bytes(b"x")
        got = await synced(c, mid)
        assert len(got) >= 5
        assert sample(read_metrics(agent), *delivered) == len(got)
        await c.call("MonitorServer.stopMonitor", mid)
        assert sample(read_metrics(agent), "fsagent_monitors", state="Stopped") == 1
        await c.call("MonitorServer.destroyMonitor", mid)
    m = read_metrics(agent)
    assert sample(m, "fsagent_monitors", state="Started") == 0
    assert sample(m, "fsagent_monitors", state="Stopped") == 0
    assert sample(m, "fsagent_monitor_overflows", "fsagent_monitor_overflows_total") == 0
    log = agent.log()
    assert f"INFO fsagent.monitor._server: monitor {mid}: Persistent Flat on {data} for unix(" \
        in log
    assert (f"INFO fsagent.monitor._server: monitor {mid} on {data} destroyed "
            f"({len(got)} events delivered)") in log
