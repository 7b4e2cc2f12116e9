"""The job kinds through the mount: archive (ZIP64, pause/resume), import, verify."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import zipfile

import pytest

from jobs_util import (
    control, import_spec, info, put, read, status, submit, uploads_dir, wait_status,
    wait_until, write,
)


def manifest(agent) -> dict:
    conn = sqlite3.connect(f"file:{agent.state / 'fsagent.db'}?mode=ro", uri=True)
    try:
        return {row[0]: row[1:] for row in conn.execute(
            "SELECT path, size, sha256, mtime_ns, task, job_id FROM manifest")}
    finally:
        conn.close()


# -- archive --------------------------------------------------------------------------------


def test_archive_of_files_and_directories(agent):
    put(agent, "exp1/a.bin", os.urandom(300_000))
    put(agent, "exp1/sub/b.txt", b"hello\n")
    os.makedirs(uploads_dir(agent) / "exp1" / "empty")
    put(agent, "loose.txt", b"loose")
    os.symlink("a.bin", uploads_dir(agent) / "exp1" / "link-inside")
    for compression in ("store", "deflate"):
        job = submit(agent, compression, {"type": "archive", "paths": ["exp1", "loose.txt"],
                                          "compression": compression})
        assert read(job / "wait") == "success\n"
        assert os.listdir(job / "outputs") == ["archive.zip"]
        out = job / "outputs" / "archive.zip"
        with zipfile.ZipFile(out) as zf:
            assert zf.testzip() is None
            assert sorted(zf.namelist()) == ["exp1/", "exp1/a.bin", "exp1/empty/",
                                             "exp1/link-inside", "exp1/sub/",
                                             "exp1/sub/b.txt", "loose.txt"]
            assert zf.read("exp1/sub/b.txt") == b"hello\n"
            assert zf.read("exp1/link-inside") == zf.read("exp1/a.bin")
            kinds = {i.compress_type for i in zf.infolist() if not i.is_dir()}
            assert kinds == {zipfile.ZIP_STORED if compression == "store"
                             else zipfile.ZIP_DEFLATED}
        record = info(job)
        assert record["Content"]["InstancesCount"] == 4
        assert record["Content"]["UncompressedSizeMB"] == 0
        assert record["Outputs"] == ["archive.zip"]
        assert subprocess.run(["unzip", "-tq", str(out)], capture_output=True).returncode == 0


def test_archive_pause_and_resume_while_running(agent):
    big = uploads_dir(agent) / "big.raw"
    with open(big, "wb") as f:
        f.truncate(1536 << 20)  # sparse; deflate keeps the output small and the run long
    job = submit(agent, "a", {"type": "archive", "paths": ["big.raw"],
                              "compression": "deflate"})
    wait_until(lambda: 0 < int(read(job / "progress")) < 90, what="progress")
    control(job, "pause")
    assert status(job) == "paused"
    frozen = int(read(job / "progress"))
    time.sleep(0.5)
    assert status(job) == "paused" and int(read(job / "progress")) == frozen
    assert os.listdir(job / "outputs") == []
    tmp = agent.state / "jobs" / "a" / "outputs.tmp"
    wait_until(lambda: not tmp.exists(), what="the partial archive to be dropped")
    control(job, "resume")
    assert read(job / "wait") == "success\n"
    with zipfile.ZipFile(job / "outputs" / "archive.zip") as zf:
        assert zf.getinfo("big.raw").file_size == 1536 << 20
    log = read(job / "log")
    assert log.count("started (archive)") == 2 and "pause: running -> paused" in log


def test_archive_zip64_with_a_5_gib_sparse_member(agent):
    big = uploads_dir(agent) / "huge" / "five.raw"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.seek((5 << 30) - 5)
        f.write(b"tail!")
    put(agent, "huge/small.txt", b"small")
    job = submit(agent, "z", {"type": "archive", "paths": ["huge"]})
    assert read(job / "wait") == "success\n", read(job / "message")
    out = job / "outputs" / "archive.zip"
    assert os.stat(out).st_size > 5 << 30
    r = subprocess.run([sys.executable, "-m", "zipfile", "-t", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Done testing" in r.stdout, r.stderr
    r = subprocess.run(["unzip", "-t", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "No errors detected" in r.stdout, r.stdout + r.stderr
    with zipfile.ZipFile(out) as zf:
        member = zf.getinfo("huge/five.raw")
        assert member.file_size == 5 << 30  # the CRC checks above covered its tail
        assert member.extra  # a ZIP64 extended-information field
    assert info(job)["Content"]["UncompressedSizeMB"] == 5 << 10


def test_archive_fails_cleanly_when_its_input_escapes_after_submit(agent_factory):
    agent = agent_factory(config="max_concurrent_jobs = 1\n").start()
    put(agent, "slow.raw")
    with open(uploads_dir(agent) / "slow.raw", "wb") as f:
        f.truncate(1 << 30)
    blocker = submit(agent, "blocker", {"type": "archive", "paths": ["slow.raw"],
                                        "compression": "deflate"})
    put(agent, "exp/a.txt")
    job = submit(agent, "late", {"type": "archive", "paths": ["exp"]})
    assert status(job) == "pending"
    os.symlink("/etc", uploads_dir(agent) / "exp" / "etc")  # after the spec was accepted
    control(blocker, "cancel")
    assert read(job / "wait") == "failure\n"
    assert read(job / "error").startswith("2 ") and "outside uploads/" in read(job / "error")
    assert info(job)["ErrorCode"] == 2 and os.listdir(job / "outputs") == []


def test_a_kind_that_raises_ends_in_failure(agent_factory, tmp_path):
    """The store fills up while an archive is written: zipfile raises OSError(ENOSPC),
    which no kind expects. The job ends in failure with the exception as its
    ErrorDescription, its partial output is gone, and the agent carries on."""
    state = tmp_path / "small-state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", state], check=True)
    try:
        agent = agent_factory(state=state).start()
        with open(uploads_dir(agent) / "sparse.raw", "wb") as f:
            f.truncate(64 << 20)  # takes no room on tmpfs; its archive would take 64 MiB
        job = submit(agent, "raise", {"type": "archive", "paths": ["sparse.raw"]})
        assert read(job / "wait") == "failure\n"
        record = info(job)
        assert record["ErrorCode"] == 1, record
        assert "No space left on device" in record["ErrorDescription"]
        assert read(job / "error").startswith("1 OSError")
        assert os.listdir(job / "outputs") == []
        assert agent.status()["pid"] == agent.proc.pid  # the agent is fine
        assert "Traceback" in agent.log()
        assert shutil.disk_usage(state).used < 8 << 20  # the partial archive was removed
        agent.stop()
    finally:
        subprocess.run(["umount", "-l", state], check=False)


def test_archive_refuses_a_name_that_is_not_utf8(agent):
    # Only a file put into the store by hand can have one: the mount refuses such names.
    d = uploads_dir(agent) / "odd"
    d.mkdir()
    with open(os.path.join(os.fsencode(d), b"\xff\xfe.bin"), "wb") as f:
        f.write(b"x")
    os.mkdir(agent.jobs / "odd-zip")
    with pytest.raises(OSError) as e:
        write(agent.jobs / "odd-zip" / "spec", '{"type": "archive", "paths": ["odd"]}')
    assert e.value.errno == errno.EINVAL
    assert "not UTF-8" in read(agent.jobs / "odd-zip" / "message")
    assert agent.status()["pid"] == agent.proc.pid


# -- import -----------------------------------------------------------------------------------


def test_import_records_the_manifest(agent):
    spec = import_spec(agent, "exp/one.tif", b"pixels", task="task-7")
    job = submit(agent, "imp", spec)
    assert read(job / "wait") == "success\n"
    assert manifest(agent) == {"exp/one.tif": (6, spec["sha256"], spec["mtime_ns"], "task-7",
                                               "imp")}
    assert info(job)["Content"]["SHA256"] == spec["sha256"]


def test_import_fails_if_the_file_changed(agent):
    spec = import_spec(agent, "c.txt", b"1234")
    put(agent, "c.txt", b"12345")
    job = submit(agent, "imp", spec)
    assert read(job / "wait") == "failure\n"
    assert read(job / "error").startswith("3 ")
    assert manifest(agent) == {}


def test_import_command_success(agent_factory, tmp_path):
    argv = ["sh", "-c", 'echo "importing $0 sha=$1 task=$2"; wc -c < "$0"',
            "{path}", "{sha256}", "{task}"]
    agent = agent_factory(config=f"import_command = {json.dumps(argv)}\n").start()
    spec = import_spec(agent, "dir/my file; rm -rf $HOME.txt", b"abcdef", task="t9")
    job = submit(agent, "imp", spec)
    assert read(job / "wait") == "success\n"
    log = read(job / "log")
    real = uploads_dir(agent) / "dir" / "my file; rm -rf $HOME.txt"
    assert f"importing {real} sha={spec['sha256']} task=t9" in log
    assert "\n6\n" in log  # the command read the stored file
    assert "import_command exited with status 0" in log
    assert "dir/my file; rm -rf $HOME.txt" in manifest(agent)


def test_import_command_failure(agent_factory):
    argv = ["sh", "-c", "echo something broke >&2; exit 3"]
    agent = agent_factory(config=f"import_command = {json.dumps(argv)}\n").start()
    job = submit(agent, "imp", import_spec(agent, "f.txt"))
    assert read(job / "wait") == "failure\n"
    assert read(job / "error") == "4 import_command exited with status 3\n"
    assert "something broke" in read(job / "log")
    assert info(job)["ErrorDescription"] == "import_command exited with status 3"
    assert "f.txt" in manifest(agent)  # recorded before the command ran
    # retry runs it again (and fails again, the same way)
    control(job, "retry")
    assert read(job / "wait") == "failure\n"
    assert read(job / "log").count("\nsomething broke\n") == 2


def test_import_command_missing_executable(agent_factory):
    argv = ["/nonexistent/importer", "{path}"]
    agent = agent_factory(config=f"import_command = {json.dumps(argv)}\n").start()
    job = submit(agent, "imp", import_spec(agent, "f.txt"))
    assert read(job / "wait") == "failure\n"
    error = read(job / "error")
    assert error.startswith("5 import_command cannot run '/nonexistent/importer'"), error
    assert "No such file or directory" in error


# -- verify -----------------------------------------------------------------------------------


def test_verify_reports_ok_mismatch_missing_unrecorded(agent):
    files = {"v/ok.txt": b"fine", "v/bad.txt": b"original", "v/gone.txt": b"bye"}
    for i, (rel, data) in enumerate(files.items()):
        assert read(submit(agent, f"i{i}", import_spec(agent, rel, data)) / "wait") \
            == "success\n"
    put(agent, "v/bad.txt", b"origina!")
    (uploads_dir(agent) / "v" / "gone.txt").unlink()
    put(agent, "v/new.txt", b"never imported")
    job = submit(agent, "ver", {"type": "verify", "paths": ["v"]})
    assert read(job / "wait") == "success\n"
    report = json.loads(read(job / "outputs" / "report.json"))
    got = {f["path"]: f["status"] for f in report["files"]}
    assert got == {"v/ok.txt": "ok", "v/bad.txt": "mismatch", "v/gone.txt": "missing",
                   "v/new.txt": "unrecorded"}
    ok = next(f for f in report["files"] if f["path"] == "v/ok.txt")
    assert ok["actual_sha256"] == ok["expected_sha256"] == hashlib.sha256(b"fine").hexdigest()
    assert report["summary"] == {"ok": 1, "mismatch": 1, "missing": 1, "unrecorded": 1}
    assert read(job / "message") == "1 ok, 1 mismatch, 1 missing, 1 unrecorded\n"
    # A recorded file that no longer exists can still be verified by name.
    job = submit(agent, "ver2", {"type": "verify", "paths": ["v/gone.txt"]})
    assert read(job / "wait") == "success\n"
    assert json.loads(read(job / "outputs" / "report.json"))["summary"]["missing"] == 1


@pytest.mark.parametrize("kind", ["archive", "verify"])
def test_outputs_appear_only_on_success(agent, kind):
    put(agent, "big.raw")
    with open(uploads_dir(agent) / "big.raw", "wb") as f:
        f.truncate(1 << 30)
    if kind == "verify":  # verify re-hashes what an import recorded
        spec = import_spec(agent, "small.txt")
        spec.update(path="big.raw", size=1 << 30,
                    sha256=hashlib.sha256(bytes(1 << 30)).hexdigest())
        assert read(submit(agent, "imp", spec) / "wait") == "success\n"
    job = submit(agent, "j", {"type": kind, "paths": ["big.raw"]})
    wait_until(lambda: status(job) == "running" and int(read(job / "progress")) > 0)
    assert os.listdir(job / "outputs") == []
    control(job, "cancel")
    time.sleep(0.3)
    assert os.listdir(job / "outputs") == []
    wait_until(lambda: not (agent.state / "jobs" / "j" / "outputs.tmp").exists())


# -- end to end with uploads ------------------------------------------------------------------


@pytest.mark.parametrize("grouping", ["file", "directory"])
def test_a_file_copied_into_uploads_is_imported(agent_factory, tmp_path, grouping):
    argv = ["sh", "-c", 'echo "imported $0 $1"', "{path}", "{task}"]
    agent = agent_factory(config=f"settle_seconds = 0.3\n"
                                 f"import_grouping = \"{grouping}\"\n"
                                 f"import_command = {json.dumps(argv)}\n").start()
    src = tmp_path / "scan-001.tif"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    os.makedirs(agent.uploads / "exp9")
    subprocess.run(["cp", str(src), str(agent.uploads / "exp9")], check=True)

    def import_job():
        records = json.loads(read(agent.mount / "jobs.json"))
        return next((r for r in records if r["Type"] == "import"), None)

    record = wait_until(import_job, what="an import job")
    job = agent.jobs / record["ID"]
    assert read(job / "wait") == "success\n", read(job / "message")
    sha = hashlib.sha256(data).hexdigest()
    path, size, got_sha, mtime_ns, task, job_id = ("exp9/scan-001.tif",
                                                   *manifest(agent)["exp9/scan-001.tif"])
    assert (size, got_sha, job_id) == (len(data), sha, record["ID"])
    assert mtime_ns == (uploads_dir(agent) / path).stat().st_mtime_ns
    if grouping == "file":
        assert info(job)["Content"] == {"Path": path, "Size": len(data), "SHA256": sha,
                                        "Task": task}
        assert info(job)["Outputs"] == []
    else:  # a fileset of one: its root, counts and fileset.json
        assert info(job)["Content"] == {"Root": "exp9", "Files": 1, "Bytes": len(data),
                                        "Imported": 1, "Skipped": []}
        listing = json.loads(read(job / "outputs" / "fileset.json"))
        assert listing == {"job": record["ID"], "root": "exp9", "files": [
            {"path": path, "size": len(data), "sha256": sha, "task": task,
             "imported": True}]}
    assert f"imported {uploads_dir(agent) / path} {task}" in read(job / "log")
    # and a verify job over the mount agrees with the manifest
    ver = submit(agent, "ver", {"type": "verify", "paths": ["exp9"]})
    assert read(ver / "wait") == "success\n"
    assert json.loads(read(ver / "outputs" / "report.json"))["summary"]["ok"] == 1
