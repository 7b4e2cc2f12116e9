"""The RPC server on a live agent: transports, concurrency, limits, bad clients."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import time

import msgpack
import pytest
import trio

from conftest import PATIENCE
from fsagent.rpc import RpcError, open_client
from fsagent.rpc._server import RECEIVE_BYTES
from rpcutil import export_agent, rss_kib

TOKEN = "correct-horse-battery-staple"


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def raw_socket(agent) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(agent.socket))
    s.settimeout(PATIENCE)
    return s


def read_messages(sock: socket.socket, count: int) -> list:
    unpacker = msgpack.Unpacker(raw=False)
    out = []
    while len(out) < count:
        data = sock.recv(65536)
        if not data:
            break
        unpacker.feed(data)
        out.extend(unpacker)
    return out


def test_unix_socket_mode_is_0660(agent):
    assert stat.S_IMODE(os.stat(agent.socket).st_mode) == 0o660
    assert stat.S_ISSOCK(os.stat(agent.socket).st_mode)


async def test_requests_run_concurrently_and_reply_out_of_order(agent_factory, tmp_path):
    agent, data = export_agent(agent_factory, tmp_path)
    big = data / "big"
    with open(big, "wb") as f:
        f.truncate(512 * 2**20)  # sparse: hashing it takes a while without disk I/O
    (data / "small").write_bytes(b"x")
    s = raw_socket(agent)
    s.sendall(pack([0, 0, "FileServer.getSHA1", [str(big)]])
              + pack([0, 1, "FileServer.getSize", [str(data / "small")]]))
    first, second = read_messages(s, 2)
    assert first == [1, 1, None, 1]  # the quick one overtakes the slow one
    assert second[:3] == [1, 0, None] and len(second[3]) == 40


async def test_unknown_method_is_an_error_reply_not_a_disconnect(agent):
    s = raw_socket(agent)
    s.sendall(pack([2, b"nvim_set_client_info", ["x", {}]])  # unknown notification: ignored
              + pack([0, 5, b"No.such", [1, 2]]) + pack([0, 6, "MonitorServer.getMonitorState",
                                                         ["nope"]]))
    replies = read_messages(s, 2)
    assert [1, 5, ["NoSuchMethod", "no such method: No.such"], None] in replies
    assert [1, 6, ["OmeroFSError", "no such monitor: 'nope'"], None] in replies


async def test_garbage_closes_only_that_connection(agent):
    good = raw_socket(agent)
    bad = raw_socket(agent)
    bad.sendall(b"\xc1garbage")
    assert bad.recv(100) == b""  # closed by the agent
    good.sendall(pack([0, 1, "MonitorServer.getMonitorState", ["x"]]))
    assert read_messages(good, 1)[0][1] == 1
    assert "closing RPC connection" in agent.log() and "undecodable" in agent.log()


async def test_oversized_message_closes_that_connection(agent_factory, tmp_path):
    agent = agent_factory(config="rpc_max_message_bytes = 4096\n").start()
    bad = raw_socket(agent)
    bad.sendall(pack([0, 1, "FileServer.getSize", ["x" * 10000]]))
    assert bad.recv(100) == b""
    assert "message larger than 4096 bytes" in agent.log()
    async with open_client(agent.socket) as c:
        with pytest.raises(RpcError, match="no such monitor"):
            await c.call("MonitorServer.getMonitorState", "x")


async def test_half_closed_client_still_gets_its_replies(agent):
    s = raw_socket(agent)
    s.sendall(b"".join(pack([0, i, "MonitorServer.getMonitorState", [str(i)]])
                       for i in range(20)))
    s.shutdown(socket.SHUT_WR)
    assert sorted(m[1] for m in read_messages(s, 20)) == list(range(20))


async def test_a_client_that_never_reads_cannot_grow_memory(agent_factory, tmp_path):
    agent, data = export_agent(agent_factory, tmp_path, config=(
        "rpc_outbox_bytes = 1048576\nrpc_max_in_flight = 8\n"))
    (data / "f").write_bytes(os.urandom(256 * 1024))
    request = [str(data / "f"), 0, 256 * 1024]
    before = rss_kib(agent.proc.pid)
    s = raw_socket(agent)
    s.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 8
    # Requests asking for GiBs of replies, many more bytes of them than one read of the
    # agent (RECEIVE_BYTES) and the socket's buffers hold; the agent must stop reading.
    count = max(4000, 8 * RECEIVE_BYTES // len(pack([0, 0, "FileServer.readBlock", request])))
    frames = b"".join(pack([0, i, "FileServer.readBlock", request]) for i in range(count))
    while sent < len(frames) and time.monotonic() < deadline:
        try:
            sent += s.send(frames[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    time.sleep(1)
    grown_mib = (rss_kib(agent.proc.pid) - before) / 1024
    assert sent < len(frames), "the agent read everything: no backpressure"
    assert grown_mib < 64, f"agent grew by {grown_mib:.0f} MiB for a client that never reads"
    # Other clients are served meanwhile.
    async with open_client(agent.socket) as c:
        assert await c.call("FileServer.getSize", str(data / "f")) == 256 * 1024
    s.close()


def _tcp_address(agent) -> tuple[str, int]:
    host, port = agent.status()["rpc"]["tcp"][0].rsplit(":", 1)
    return host, int(port)


async def test_tcp_requires_the_token_first(agent_factory):
    agent = agent_factory(config=f'rpc_tcp_listen = "127.0.0.1:0"\nrpc_token = "{TOKEN}"\n'
                          ).start()
    host, port = _tcp_address(agent)
    with socket.create_connection((host, port), timeout=PATIENCE) as s:
        s.sendall(pack([0, 1, "MonitorServer.getMonitorState", ["x"]]))
        reply = read_messages(s, 1)[0]
        assert reply[2][0] == "AuthenticationRequired"
        assert s.recv(10) == b""
    with socket.create_connection((host, port), timeout=PATIENCE) as s:
        s.sendall(pack([0, 1, "auth", ["wrong-token-wrong-token"]]))
        assert read_messages(s, 1)[0][2] == ["AuthenticationFailed", "wrong token"]
        assert s.recv(10) == b""
    async with open_client(tcp=(host, port), token=TOKEN) as c:
        with pytest.raises(RpcError, match="no such monitor"):
            await c.call("MonitorServer.getMonitorState", "x")


async def test_a_bulk_sender_has_a_big_send_buffer_and_no_low_water_mark(agent_factory):
    # open_client(send_buffer=...) is what `fsagent upload` uses: on TCP trio's 16 KiB
    # TCP_NOTSENT_LOWAT cut each 4 MiB chunk into ~22 sends (bulk_sender in _client.py);
    # on a Unix socket the default send buffer made it wait every ~200 KiB.
    agent = agent_factory(config=f'rpc_tcp_listen = "127.0.0.1:0"\nrpc_token = "{TOKEN}"\n'
                          ).start()
    host, port = _tcp_address(agent)
    wanted = 4 * 2**20
    wmem_max = int(open("/proc/sys/net/core/wmem_max").read())
    granted = 2 * min(wanted, wmem_max)  # Linux doubles SO_SNDBUF, capped at wmem_max
    async with open_client(tcp=(host, port), token=TOKEN, send_buffer=wanted) as bulk, \
            open_client(tcp=(host, port), token=TOKEN) as plain, \
            open_client(agent.socket, send_buffer=wanted) as unix, \
            open_client(agent.socket) as plain_unix:
        tcp_options = (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        assert bulk._stream.getsockopt(*tcp_options) == 0
        assert plain._stream.getsockopt(*tcp_options) == 2**14  # trio's default
        send_buffer = (socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert unix._stream.getsockopt(*send_buffer) == granted
        assert plain_unix._stream.getsockopt(*send_buffer) < granted
        # A write large enough to go out as header + payload is one request to the
        # agent (an answer about its process, not a protocol error), and the
        # connection carries on.
        for client in (bulk, unix):
            with pytest.raises(RpcError) as caught:
                await client.call("ImportProcess.write", "no-such-process", 0, 0,
                                  os.urandom(2 * 2**20))
            assert caught.value.name == "NoSuchProcess"
            with pytest.raises(RpcError, match="no such monitor"):
                await client.call("MonitorServer.getMonitorState", "x")


async def test_tcp_over_tls(agent_factory, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    agent = agent_factory(config=(
        f'rpc_tcp_listen = "127.0.0.1:0"\nrpc_token = "{TOKEN}"\n'
        f'rpc_tls_cert = "{cert}"\nrpc_tls_key = "{key}"\n')).start()
    host, port = _tcp_address(agent)
    context = ssl.create_default_context(cafile=str(cert))
    async with open_client(tcp=(host, port), token=TOKEN, ssl_context=context,
                           server_hostname="localhost") as c:
        with pytest.raises(RpcError, match="no such monitor"):
            await c.call("MonitorServer.getMonitorState", "x")
    # plaintext on the TLS port gets nowhere
    with socket.create_connection((host, port), timeout=PATIENCE) as s:
        s.sendall(pack([0, 1, "auth", [TOKEN]]))
        s.settimeout(2)
        try:
            answer = s.recv(100)
        except (ConnectionResetError, TimeoutError):
            answer = b""
        assert not answer.startswith(b"\x94")  # a TLS alert or nothing, never a reply


def test_tcp_without_a_token_is_refused(cli, tmp_path):
    r = cli("run", "--mount", str(tmp_path / "m"), "--state-dir", str(tmp_path / "s"),
            "--config", str(_write(tmp_path / "c.toml", 'rpc_tcp_listen = "127.0.0.1:0"\n')))
    assert r.returncode == 2 and "rpc_tcp_listen: TCP needs rpc_token" in r.stderr


def _write(path, text):
    path.write_text(text)
    return path


async def test_many_clients_concurrently(agent_factory, tmp_path):
    agent, data = export_agent(agent_factory, tmp_path)
    (data / "f").write_bytes(b"abc")
    results = []

    async def one():
        async with open_client(agent.socket) as c:
            async with trio.open_nursery() as n:
                for _ in range(50):
                    n.start_soon(lambda: _append(results, c.call("FileServer.getSize",
                                                                 str(data / "f"))))

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(one)
    assert results == [3] * 500


async def _append(results, coro):
    results.append(await coro)
