"""``fsagent upload`` and ``fsagent uploads``: the real command against a live agent.

Every test runs ``python -m fsagent upload ...`` as a subprocess (stdout a pipe, so the
plain-lines display) against an agent from ``agent_factory``, and checks the result
through the mount (``sha256sum`` of what arrived) and the agent's own records. The
interruption tests never sleep-and-hope: they wait until the agent has durably received
part of the file (``ImportProcess.getUploadOffset`` syncs what is pending first) before
they kill the agent or interrupt the client.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import FSAGENT, PATIENCE, wait_for
from fsagent.rpc import call_sync

TOKEN = "upload-cli-token-0123456789"
BIG = 200 * 2**20


def upload_argv(*args: str) -> list[str]:
    return FSAGENT + ["upload", *args]


def run_upload(*args: str, timeout: float = 4 * PATIENCE) -> subprocess.CompletedProcess:
    return subprocess.run(upload_argv(*args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def sha256_of(path: Path) -> str:
    # sha256sum reads through the mount like any tool would.
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[0]


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 * 2**20))
            f.write(block)
            left -= len(block)
    return path


def make_tree(base: Path) -> Path:
    tree = base / "run42"
    (tree / "a" / "b" / "deeper").mkdir(parents=True)
    (tree / "empty").mkdir()  # an empty directory: not part of a fileset
    (tree / "empty.txt").write_bytes(b"")
    (tree / "a" / "hello.txt").write_bytes(b"hello\n")
    (tree / "a" / "b" / "deeper" / "x.dat").write_bytes(os.urandom(70_000))
    random_file(tree / "a" / "b" / "big.bin", 3 * 2**20)
    return tree


def local_digests(tree: Path) -> dict[str, str]:
    return {str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tree.rglob("*")) if p.is_file()}


def assert_arrived(agent, tree: Path, root: str) -> None:
    for rel, digest in local_digests(tree).items():
        assert sha256_of(agent.uploads / root / rel) == digest, rel


def records(agent, prefix: str) -> list[dict]:
    """The complete uploads.json records under ``prefix`` ([] while it is half-written)."""
    try:
        tasks = json.loads((agent.mount / "uploads.json").read_text())
    except ValueError:
        return []
    return [t for t in tasks if t["path"].startswith(prefix)]


def job_of(stdout: str) -> str:
    m = re.search(r"^verified: \d+ files; import job (\S+)$", stdout, re.M)
    assert m, stdout
    return m[1]


def assert_plain(stdout: str) -> None:
    assert "\r" not in stdout and "\x1b" not in stdout, repr(stdout)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_tree_arrives_byte_identical_as_one_fileset(agent, tmp_path):
    tree = make_tree(tmp_path)
    link = tree / "a" / "link-to-hello"
    link.symlink_to("hello.txt")  # not a regular file: skipped, and said so
    r = run_upload("--socket", str(agent.socket), str(tree))
    link.unlink()  # so that local_digests() below lists what was uploaded
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert_plain(r.stdout)
    lines = r.stdout.splitlines()
    assert lines[0] == f"skipped: {link} (not a regular file or directory)"
    assert lines[1].startswith("upload: 4 files, 3.1 MiB into uploads/run42/ (process ")
    assert re.search(r"^uploaded: 4 of 4 files, .*; sent 3215734 bytes this run$",
                     r.stdout, re.M), r.stdout
    assert "resume:" not in r.stdout
    assert_arrived(agent, tree, "run42")
    assert not (agent.uploads / "run42" / "empty").exists()
    assert not os.path.lexists(agent.uploads / "run42" / "a" / "link-to-hello")
    job = job_of(r.stdout)
    # One import job for the whole fileset, named by every file of it.
    done = wait_for(lambda: (lambda rs: rs if len(rs) == 4 and all(
        t["state"] == "complete" and t["job"] for t in rs) else None)(
        records(agent, "run42/")), what="four complete uploads with their job")
    assert {t["job"] for t in done} == {job}
    assert (agent.jobs / job).is_dir()
    # `fsagent uploads`: the same records, as a table and as JSON.
    listed = subprocess.run(FSAGENT + ["uploads", "--socket", str(agent.socket), "--json"],
                            capture_output=True, text=True, timeout=PATIENCE)
    assert listed.returncode == 0, listed.stderr
    by_path = {t["path"]: t for t in json.loads(listed.stdout)}
    assert {"run42/a/b/big.bin", "run42/empty.txt"} <= set(by_path)
    assert by_path["run42/a/b/big.bin"]["size"] == 3 * 2**20
    assert by_path["run42/a/b/big.bin"]["sha256"] == \
        local_digests(tree)["a/b/big.bin"]
    table = subprocess.run(FSAGENT + ["uploads", "--socket", str(agent.socket)],
                           capture_output=True, text=True, timeout=PATIENCE)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if "\trun42/a/hello.txt\t" in line)
    assert row.split("\t")[1:4] == ["complete", "100%", "6/6"]


def test_wait_follows_the_import_job(agent, tmp_path):
    src = tmp_path / "scan.tif"
    src.write_bytes(os.urandom(5000))
    other = tmp_path / "scan.xml"
    other.write_bytes(b"<scan/>")
    r = run_upload("--socket", str(agent.socket), "--wait", str(src), str(other))
    assert r.returncode == 0, r.stderr
    job = job_of(r.stdout)
    assert re.search(rf"^import job {re.escape(job)}: success$", r.stdout, re.M), r.stdout
    assert (agent.jobs / job / "status").read_text() == "success\n"
    # The default DIR: the first SRC's name without its extension.
    assert sha256_of(agent.uploads / "scan" / "scan.xml") == \
        hashlib.sha256(b"<scan/>").hexdigest()
    assert sha256_of(agent.uploads / "scan" / "scan.tif") == \
        hashlib.sha256(src.read_bytes()).hexdigest()
    # The same command again: every file is complete, nothing is sent, and the job that
    # imported them is the one named.
    again = run_upload("--socket", str(agent.socket), "--wait", str(src), str(other))
    assert again.returncode == 0, again.stderr
    assert re.search(r"sent 0 bytes this run$", again.stdout, re.M), again.stdout
    assert job_of(again.stdout) == job


def _start_slow_upload(agent, src: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start uploading ``src`` at 20 MiB/s; returns the process and its ImportProcess
    ID, once the agent durably holds part of the file."""
    proc = subprocess.Popen(upload_argv("--socket", str(agent.socket), "--bwlimit", "20M",
                                        "--interval", "1", *extra, str(src)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    header = proc.stdout.readline()
    m = re.match(r"upload: 1 files, .* \(process (\S+)\)$", header)
    assert m, (header, proc.stderr.read() if proc.poll() is not None else "")
    pid = m[1]
    wait_for(lambda: call_sync(agent.socket, "ImportProcess.getUploadOffset", pid, 0) > 0,
             what="part of the file durable on the agent")
    return proc, pid


def _resumed(stdout: str, path: str) -> tuple[int, int]:
    """(offset resumed from, bytes sent) as the re-run printed them."""
    m = re.search(rf"^resume: {re.escape(path)} from (\d+) of (\d+) bytes$", stdout, re.M)
    assert m, stdout
    sent = re.search(r"sent (\d+) bytes this run$", stdout, re.M)
    assert sent, stdout
    return int(m[1]), int(sent[1])


@pytest.mark.slow
def test_resume_after_the_agent_is_killed(agent_factory, tmp_path):
    agent = agent_factory().start()
    src = random_file(tmp_path / "src" / "big.bin", BIG)
    proc, pid = _start_slow_upload(agent, src)
    durable = call_sync(agent.socket, "ImportProcess.getUploadOffset", pid, 0)
    agent.kill9()
    out, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 2, (out, err)
    assert "run the same command again to resume" in one_line(err)
    assert_plain(out)
    agent.start()  # the same state dir
    r = run_upload("--socket", str(agent.socket), str(src))
    assert r.returncode == 0, r.stderr
    resumed, sent = _resumed(r.stdout, "big/big.bin")
    assert durable <= resumed < BIG
    assert sent == BIG - resumed < BIG
    assert sha256_of(agent.uploads / "big" / "big.bin") == \
        hashlib.sha256(src.read_bytes()).hexdigest()
    job_of(r.stdout)


@pytest.mark.slow
def test_resume_after_ctrl_c(agent, tmp_path):
    src = random_file(tmp_path / "src" / "big.bin", BIG)
    proc, pid = _start_slow_upload(agent, src)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 130, (out, err)
    assert one_line(err) == ("fsagent upload: interrupted; run the same command again "
                             "to resume")
    # Periodic plain lines while it ran (every second: --interval 1).
    assert_plain(out)
    r = run_upload("--socket", str(agent.socket), str(src))
    assert r.returncode == 0, r.stderr
    resumed, sent = _resumed(r.stdout, "big/big.bin")
    assert 0 < resumed < BIG and sent == BIG - resumed
    # The same process: the re-run's create returned the interrupted one's ID.
    assert f"(process {pid})" in r.stdout.splitlines()[0]
    assert sha256_of(agent.uploads / "big" / "big.bin") == \
        hashlib.sha256(src.read_bytes()).hexdigest()


def test_periodic_plain_progress_lines(agent, tmp_path):
    src = random_file(tmp_path / "p.bin", 8 * 2**20)
    r = run_upload("--socket", str(agent.socket), "--bwlimit", "4M", "--interval", "0.5",
                   str(src))
    assert r.returncode == 0, r.stderr
    assert_plain(r.stdout)
    progress = [line for line in r.stdout.splitlines() if line.startswith("progress: ")]
    assert progress, r.stdout
    assert re.fullmatch(r"progress: [\d.]+ (B|KiB|MiB) of 8\.0 MiB \(\d+%\), [01] of 1 "
                        r"files, [\d.]+ (B|KiB|MiB)/s, ETA (\d+:\d\d:\d\d|\?)",
                        progress[0]), progress[0]


def test_a_changed_source_fails_verification_listing_the_file(agent, tmp_path):
    src = random_file(tmp_path / "src" / "big.bin", BIG)
    proc, _ = _start_slow_upload(agent, src)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 130
    # The first bytes change between the runs (same size): what the agent holds is no
    # longer what this client hashes.
    with open(src, "r+b") as f:
        f.write(b"\0" * 4096)
    r = run_upload("--socket", str(agent.socket), str(src))
    assert r.returncode == 1, (r.stdout, r.stderr)
    err = r.stderr.splitlines()
    assert err[0] == "fsagent: upload: verification failed:"
    assert re.fullmatch(r"  big/big\.bin: expected [0-9a-f]{64}, got [0-9a-f]{64}", err[1]), err
    assert "run the same command again to send them anew" in err[-1]
    # As the message says: remove it through the mount and run again.
    os.unlink(agent.uploads / "big" / "big.bin")
    r = run_upload("--socket", str(agent.socket), str(src))
    assert r.returncode == 0, r.stderr
    assert re.search(rf"sent {BIG} bytes this run$", r.stdout, re.M), r.stdout
    assert sha256_of(agent.uploads / "big" / "big.bin") == \
        hashlib.sha256(src.read_bytes()).hexdigest()


def test_over_tcp_with_a_token_and_a_bad_token(agent_factory, tmp_path):
    agent = agent_factory(config=f'rpc_tcp_listen = "127.0.0.1:0"\nrpc_token = "{TOKEN}"\n'
                          ).start()
    address = agent.status()["rpc"]["tcp"][0]
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    tree = make_tree(tmp_path)
    r = run_upload("--connect", address, "--token-file", str(token), "--to", "tcp/run",
                   str(tree))
    assert r.returncode == 0, r.stderr
    assert_arrived(agent, tree, "tcp/run")
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token-at-all")
    r = run_upload("--connect", address, "--token-file", str(bad), str(tree))
    assert r.returncode == 2
    assert one_line(r.stderr) == f"fsagent: error: {address}: AuthenticationFailed: wrong token"
    r = run_upload("--connect", address, "--token-file", str(tmp_path / "missing"),
                   str(tree))
    assert r.returncode == 2
    assert one_line(r.stderr).startswith("fsagent: error: cannot read --token-file ")
    r = run_upload("--connect", address, str(tree))
    assert r.returncode == 2
    assert one_line(r.stderr) == \
        "fsagent: error: --connect needs --token-file (the agent's rpc_token)"


def test_unreachable_agent_and_bad_arguments_are_one_line_exit_2(tmp_path):
    src = tmp_path / "f.txt"
    src.write_text("x")
    r = run_upload("--socket", str(tmp_path / "no.sock"), str(src))
    assert r.returncode == 2
    assert one_line(r.stderr) == (f"fsagent: error: cannot connect to {tmp_path}/no.sock: "
                                  "No such file or directory")
    # A TCP port nobody listens on (bound, never listening).
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        token = tmp_path / "t"
        token.write_text(TOKEN)
        r = run_upload("--connect", f"127.0.0.1:{port}", "--token-file", str(token),
                       str(src))
    assert r.returncode == 2
    assert one_line(r.stderr).startswith(f"fsagent: error: cannot connect to 127.0.0.1:{port}")
    r = run_upload("--socket", str(tmp_path / "no.sock"))
    assert r.returncode == 2
    assert one_line(r.stderr) == \
        "fsagent upload: error: the following arguments are required: SRC"
    r = run_upload("--socket", str(tmp_path / "no.sock"), str(tmp_path / "missing"))
    assert r.returncode == 2
    assert one_line(r.stderr) == \
        f"fsagent upload: error: {tmp_path}/missing: No such file or directory"
    r = run_upload("--socket", str(tmp_path / "no.sock"), "--to", "../out", str(src))
    assert r.returncode == 2 and "'..'" in one_line(r.stderr)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / os.fsdecode(b"\xff.bin")).write_bytes(b"x")
    r = run_upload("--socket", str(tmp_path / "no.sock"), str(odd))
    assert r.returncode == 2
    assert one_line(r.stderr) == ("fsagent upload: error: a source's name is not UTF-8 "
                                  "(upload paths are text): "
                                  + repr(os.fsencode(odd) + b"/\xff.bin"))
    r = subprocess.run(FSAGENT + ["uploads", "--socket", str(tmp_path / "no.sock")],
                       capture_output=True, text=True, timeout=PATIENCE)
    assert r.returncode == 2 and "cannot connect" in one_line(r.stderr)


def test_store_full_is_one_line_exit_2(agent, tmp_path):
    # A sparse file far larger than the store: refused at create, before a byte is read.
    huge = tmp_path / "huge.img"
    with open(huge, "wb") as f:
        f.truncate(8 * 2**40)
    r = run_upload("--socket", str(agent.socket), str(huge))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert one_line(r.stderr).startswith("fsagent: NoSpace: ")


def test_another_users_files_are_permission_denied(shared_dir, agent_factory, other_user,
                                                   test_group):
    name, gid = test_group
    sock = shared_dir / "rpc.sock"
    agent = agent_factory(mount=shared_dir / "mnt", state=shared_dir / "state",
                          config=f'allow_other = true\nrpc_group = "{name}"\n'
                          f'socket = "{sock}"\n').start()
    src = shared_dir / "data.txt"
    src.write_text("root's data\n")
    src.chmod(0o644)
    r = run_upload("--socket", str(sock), "--to", "shared", str(src))
    assert r.returncode == 0, r.stderr
    theirs = other_user.run_in_groups([gid], *upload_argv("--socket", str(sock), "--to",
                                                          "shared", str(src)))
    assert theirs.returncode == 2, (theirs.stdout, theirs.stderr)
    assert one_line(theirs.stderr).startswith("fsagent: PermissionDenied: ")
    assert sha256_of(agent.uploads / "shared" / "data.txt") == \
        hashlib.sha256(b"root's data\n").hexdigest()


def test_tty_shows_bars(agent, tmp_path):
    """On a terminal the display is tqdm's: carriage returns and a rate in B/s."""
    import fcntl
    import pty
    import struct
    import termios
    src = random_file(tmp_path / "t.bin", 12 * 2**20)
    leader, follower = pty.openpty()
    # A terminal of 30 x 100 (a fresh pty reports 0 x 0).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(upload_argv("--socket", str(agent.socket), "--bwlimit", "8M",
                                        str(src)), stdout=follower, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    os.close(follower)
    output = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        output += data
    os.close(leader)
    assert proc.wait(PATIENCE) == 0, proc.stderr.read()
    text = output.decode(errors="replace")
    assert "\r" in text and "B/s" in text and "100%" in text, text
    assert re.search(r"^verified: 1 files; import job \S+\r?$", text, re.M), text


def test_a_tree_of_small_files_resumes_after_ctrl_c(agent, tmp_path):
    """Small files are declared with their hash and sent in one write each: a re-run
    sends only the files the agent does not have yet."""
    tree = tmp_path / "many"
    for i in range(120):
        (tree / f"d{i // 40}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i // 40}" / f"f{i:03d}").write_bytes(os.urandom(32 * 1024))
    total = 120 * 32 * 1024
    proc = subprocess.Popen(upload_argv("--socket", str(agent.socket), "--bwlimit", "512K",
                                        "--jobs", "1", str(tree)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    wait_for(lambda: sum(t["state"] == "complete" for t in records(agent, "many/")) >= 10,
             what="ten files complete")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 130, (out, err)
    r = run_upload("--socket", str(agent.socket), str(tree))
    assert r.returncode == 0, r.stderr
    sent = int(re.search(r"sent (\d+) bytes this run$", r.stdout, re.M)[1])
    assert 0 < sent <= total - 10 * 32 * 1024
    assert_arrived(agent, tree, "many")


@pytest.mark.slow
def test_more_files_than_one_call_takes(agent, tmp_path):
    tree = tmp_path / "wide"
    for i in range(4100):
        (tree / f"d{i // 1000}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i // 1000}" / f"f{i:04d}").write_bytes(b"%d\n" % i)
    r = run_upload("--socket", str(agent.socket), str(tree))
    assert r.returncode == 0, r.stderr
    assert re.search(r"^uploaded: 4100 of 4100 files, ", r.stdout, re.M), r.stdout
    job = job_of(r.stdout)
    assert os.getxattr(agent.uploads / "wide" / "d4" / "f4099", "user.fsagent.job") == \
        job.encode()


def test_over_tls_with_the_agents_ca(agent_factory, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    agent = agent_factory(config=(
        f'rpc_tcp_listen = "127.0.0.1:0"\nrpc_token = "{TOKEN}"\n'
        f'rpc_tls_cert = "{cert}"\nrpc_tls_key = "{key}"\n')).start()
    port = agent.status()["rpc"]["tcp"][0].rsplit(":", 1)[1]
    token = tmp_path / "token"
    token.write_text(TOKEN)
    src = tmp_path / "over-tls.txt"
    src.write_bytes(b"encrypted on the way\n")
    r = run_upload("--connect", f"localhost:{port}", "--token-file", str(token), "--tls-ca",
                   str(cert), str(src))
    assert r.returncode == 0, r.stderr
    assert sha256_of(agent.uploads / "over-tls" / "over-tls.txt") == \
        hashlib.sha256(b"encrypted on the way\n").hexdigest()
    # Chunks big enough to go out as header + payload (send_request_parts) through TLS:
    # a file of two chunks, a whole one and a short one.
    big = random_file(tmp_path / "tls" / "two-chunks.bin", 4 * 2**20 + 70_000)
    r = run_upload("--connect", f"localhost:{port}", "--token-file", str(token), "--tls-ca",
                   str(cert), str(big))
    assert r.returncode == 0, r.stderr
    assert sha256_of(agent.uploads / "two-chunks" / "two-chunks.bin") == \
        hashlib.sha256(big.read_bytes()).hexdigest()
    # Without the CA the agent's certificate is not trusted: one line, exit 2.
    r = run_upload("--connect", f"localhost:{port}", "--token-file", str(token),
                   "--tls-ca", str(key), str(src))
    assert r.returncode == 2
    assert one_line(r.stderr).startswith("fsagent: error: cannot use --tls-ca ")
    # Plain TCP to the TLS port gets nowhere: one line, exit 2.
    r = run_upload("--connect", f"localhost:{port}", "--token-file", str(token), str(src))
    assert r.returncode == 2
    assert one_line(r.stderr).startswith("fsagent: error: ")
