"""Issue 12: filesets, one import job per set of verified uploads, on a real mount.

Each grouping mode (``directory``, ``manifest``, ``file``) is driven with the real tools
(rsync, cp, sha256sum) and checked from the outside: ``user.fsagent.job`` on each
upload, ``jobs.json``, each job's ``fileset.json``, ``filesets.json`` while a set waits,
and the repository manifest (one row per file). The crash tests kill the agent while a
fileset is being collected and while its import runs, and count: every file imported
exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

from pynvim.msgpack_rpc import socket_session

from conftest import wait_for
from integrity_util import import_jobs, job_state, members_of, skipped_by, task_attrs
from rpcutil import text

QUICK = "settle_seconds = 0.3\nstore_reserve_bytes = 0\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tree(root: Path, dirs: int, files: int, size: int = 300) -> dict[str, bytes]:
    out = {}
    for d in range(dirs):
        (root / f"d{d}").mkdir(parents=True, exist_ok=True)
        for i in range(files):
            data = os.urandom(size + i)
            (root / f"d{d}" / f"f{i:03d}.tif").write_bytes(data)
            out[f"d{d}/f{i:03d}.tif"] = data
    return out


def filesets(agent) -> list[dict]:
    return json.loads((agent.mount / "filesets.json").read_text())


def settled_imports(agent) -> list[dict] | None:
    """The import jobs once nothing is collected, pending or running."""
    if filesets(agent):
        return None
    found = import_jobs(agent.mount)
    if any(job_state(j) in ("pending", "running") for j in found):
        return None
    return found


def manifest_rows(agent) -> dict[str, tuple]:
    conn = sqlite3.connect(f"file:{agent.state / 'fsagent.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT path, size, sha256, task, job_id FROM manifest").fetchall()
    finally:
        conn.close()
    return {r[0]: r[1:] for r in rows}


def import_problems(agent, files: dict[str, bytes], base: str) -> tuple[list[str], list]:
    found = settled_imports(agent)
    if found is None:
        return ["imports not settled"], []
    by_id = {j["ID"]: j for j in found}
    imported = Counter((m["task"], m["sha256"]) for j in found if job_state(j) == "success"
                       for m in members_of(j) if not skipped_by(j, m["task"]))
    rows = manifest_rows(agent)
    problems = []
    for rel, data in files.items():
        attrs = task_attrs(agent.uploads / base / rel)
        if attrs.get("sha256") != sha(data):
            problems.append(f"{rel}: {attrs}")
            continue
        job = by_id.get(attrs.get("job"))
        if job is None or job_state(job) != "success":
            problems.append(f"{rel}: its job {attrs.get('job')} is {job and job_state(job)}")
        if imported[attrs["task"], sha(data)] != 1:
            problems.append(f"{rel}: imported {imported[attrs['task'], sha(data)]} times")
        row = rows.get(os.path.join(base, rel))
        if row != (len(data), sha(data), attrs["task"], attrs.get("job")):
            problems.append(f"{rel}: manifest row {row}")
    if len(rows) != len(files):
        problems.append(f"{len(rows)} manifest rows for {len(files)} files")
    return problems, found


def check_imported_once(agent, files: dict[str, bytes], base: str = "") -> list[dict]:
    """Every file complete, named by exactly one successful import that did not skip it,
    and recorded once in the manifest by that job; returns the import jobs. Polls: a
    job's end (and its manifest rows) is committed a moment after jobs.json shows it."""
    up = agent.uploads
    for rel in files:
        wait_for(lambda: task_attrs(up / base / rel).get("state") == "complete",
                 what=f"{rel} to complete")
    last: list[str] = []

    def clean():
        nonlocal last
        last, found = import_problems(agent, files, base)
        return not last and found
    try:
        return wait_for(clean, what="every file imported exactly once")
    except AssertionError:
        raise AssertionError("\n".join(last[:20])) from None


# -- directory -------------------------------------------------------------------------------


def test_directory_mode_one_import_per_directory(agent_factory, tmp_path):
    """rsync -a of 3 directories x 20 files: 3 import jobs, one per directory, each with
    its 20 files in fileset.json and Content; every upload names its directory's job."""
    agent = agent_factory(config=QUICK).start()
    files = make_tree(tmp_path / "src", 3, 20)
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/", f"{agent.uploads / 'run1'}/"],
                   check=True)
    found = check_imported_once(agent, files, "run1")
    assert len(found) == 3, [j["Content"] for j in found]
    for job in found:
        content = job["Content"]
        assert content["Files"] == content["Imported"] == 20 and content["Skipped"] == []
        root = content["Root"]
        assert root in ("run1/d0", "run1/d1", "run1/d2")
        assert content["Bytes"] == sum(len(d) for r, d in files.items()
                                       if f"run1/{r}".startswith(root + "/"))
        listing = json.loads((agent.jobs / job["ID"] / "outputs" / "fileset.json").read_text())
        assert listing["job"] == job["ID"] and listing["root"] == root
        assert sorted(f["path"] for f in listing["files"]) == sorted(
            f"run1/{r}" for r in files if f"run1/{r}".startswith(root + "/"))
        for f in listing["files"]:
            data = files[f["path"][len("run1/"):]]
            assert (f["size"], f["sha256"], f["imported"]) == (len(data), sha(data), True)
            assert task_attrs(agent.uploads / f["path"])["job"] == job["ID"]
            assert f["task"] == task_attrs(agent.uploads / f["path"])["task"]


def test_directory_mode_caps_split_a_big_directory(agent_factory, tmp_path):
    """fileset_max_files = 7: 20 files in one directory make 3 filesets (7, 7, 6)."""
    agent = agent_factory(config=QUICK + "fileset_max_files = 7\n"
                                          "fileset_quiet_seconds = 3\n").start()
    files = make_tree(tmp_path / "src", 1, 20)
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/", f"{agent.uploads}/"], check=True)
    found = check_imported_once(agent, files)
    assert sorted(j["Content"]["Files"] for j in found) == [6, 7, 7]


def test_a_waiting_directory_set_is_visible(agent_factory, tmp_path):
    """While its quiet window runs, a set shows in filesets.json; complete uploads have no
    job yet; then one job takes them all."""
    agent = agent_factory(config=QUICK + "fileset_quiet_seconds = 4\n").start()
    files = make_tree(tmp_path / "src", 1, 5)
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/", f"{agent.uploads}/"], check=True)
    waiting = wait_for(lambda: [f for f in filesets(agent) if f["files"] == 5],
                       what="the set of 5 to show")
    assert waiting[0]["root"] == "d0" and waiting[0]["grouping"] == "directory"
    assert waiting[0]["bytes"] == sum(len(d) for d in files.values())
    assert 0 < waiting[0]["quietInSeconds"] <= 4
    assert import_jobs(agent.mount) == []
    status = agent.status()["uploads"]
    assert status["import_grouping"] == "directory" and status["collecting"] == 5
    found = check_imported_once(agent, files)
    assert len(found) == 1


def test_file_mode_one_job_per_file(agent_factory, tmp_path):
    agent = agent_factory(config=QUICK + 'import_grouping = "file"\n').start()
    files = make_tree(tmp_path / "src", 1, 6)
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/", f"{agent.uploads}/"], check=True)
    found = check_imported_once(agent, files)
    assert len(found) == 6
    assert all("Path" in j["Content"] and j["Outputs"] == [] for j in found)
    assert filesets(agent) == []


# -- manifest --------------------------------------------------------------------------------


def write_sums(directory: Path, names: list[str]) -> None:
    out = subprocess.run(["sha256sum", *names], cwd=directory, check=True,
                         capture_output=True).stdout
    (directory / "SHA256SUMS").write_bytes(out)


def test_manifest_mode_waits_for_a_missing_file_then_imports_the_set(agent_factory, tmp_path):
    """SHA256SUMS lists 4 files; 3 are sent with it: the set waits, filesets.json names the
    missing one, nothing is imported; the 4th arrives: one job imports the 4 and the
    manifest. A complete file that no manifest lists waits as `unlisted`."""
    agent = agent_factory(config=QUICK + 'import_grouping = "manifest"\n').start()
    src = tmp_path / "run"
    files = make_tree(src, 1, 4)
    write_sums(src / "d0", sorted(os.listdir(src / "d0")))
    (agent.uploads / "d0").mkdir()
    for name in ("f000.tif", "f001.tif", "f002.tif", "SHA256SUMS"):
        subprocess.run(["cp", src / "d0" / name, agent.uploads / "d0"], check=True)
    (agent.uploads / "stray.bin").write_bytes(b"listed nowhere")

    def waiting_set():
        sets = [f for f in filesets(agent) if f.get("manifests") == ["d0/SHA256SUMS"]]
        return sets and sets[0]["files"] == 4 and sets[0]
    waiting = wait_for(waiting_set, what="the manifest set to wait with 3 files + SHA256SUMS")
    assert waiting["waitingFor"] == ["d0/f003.tif"] and waiting["failed"] == []
    unlisted = wait_for(lambda: [f for f in filesets(agent) if f.get("unlisted")],
                        what="the stray file to show as unlisted")
    assert unlisted[0]["unlisted"] == ["stray.bin"]
    assert import_jobs(agent.mount) == []

    subprocess.run(["cp", src / "d0" / "f003.tif", agent.uploads / "d0"], check=True)
    job = wait_for(lambda: [j for j in import_jobs(agent.mount) if job_state(j) == "success"],
                   what="the set's import")
    assert len(job) == 1
    listing = json.loads((agent.jobs / job[0]["ID"] / "outputs" / "fileset.json").read_text())
    assert sorted(f["path"] for f in listing["files"]) == [
        "d0/SHA256SUMS", "d0/f000.tif", "d0/f001.tif", "d0/f002.tif", "d0/f003.tif"]
    for rel, data in files.items():
        attrs = task_attrs(agent.uploads / rel)
        assert (attrs["job"], attrs["sha256"]) == (job[0]["ID"], sha(data))
    # the stray file still waits for a manifest that lists it
    assert [f.get("unlisted") for f in filesets(agent)] == [["stray.bin"]]
    assert task_attrs(agent.uploads / "stray.bin").get("job", "") == ""


def test_manifest_set_held_back_by_a_failing_file_then_repaired(agent_factory, tmp_path):
    """A listed file whose bytes do not match the manifest fails verification: the set
    is held back and filesets.json names that file and its error; re-sending the right
    bytes releases the set and one job imports them all."""
    agent = agent_factory(config=QUICK + 'import_grouping = "manifest"\n').start()
    src = tmp_path / "run"
    files = make_tree(src, 1, 3)
    write_sums(src / "d0", sorted(os.listdir(src / "d0")))
    (agent.uploads / "d0").mkdir()
    (agent.uploads / "d0" / "SHA256SUMS").write_bytes((src / "d0" / "SHA256SUMS").read_bytes())
    for name in ("f000.tif", "f002.tif"):
        subprocess.run(["cp", src / "d0" / name, agent.uploads / "d0"], check=True)
    (agent.uploads / "d0" / "f001.tif").write_bytes(b"corrupted in transit")

    def held():
        sets = [f for f in filesets(agent) if f.get("manifests") == ["d0/SHA256SUMS"]]
        return sets and sets[0]["failed"] and sets[0]
    waiting = wait_for(held, what="the set to be held back by f001.tif")
    assert [f["path"] for f in waiting["failed"]] == ["d0/f001.tif"]
    assert "sha256 mismatch" in waiting["failed"][0]["error"]
    # The same over msgpack-RPC, from a third-party client (pynvim's session).
    session = socket_session(str(agent.socket))
    try:
        over_rpc = text(session.request("Uploads.filesets"))
    finally:
        session.close()
    held_rpc = [f for f in over_rpc if f.get("manifests") == ["d0/SHA256SUMS"]]
    assert [f["path"] for f in held_rpc[0]["failed"]] == ["d0/f001.tif"]
    assert task_attrs(agent.uploads / "d0" / "f001.tif")["state"] == "failed"
    assert import_jobs(agent.mount) == []

    subprocess.run(["cp", src / "d0" / "f001.tif", agent.uploads / "d0"], check=True)
    found = check_imported_once(agent, {**files, "d0/SHA256SUMS":
                                        (src / "d0" / "SHA256SUMS").read_bytes()})
    assert len(found) == 1 and found[0]["Content"]["Files"] == 4


def two_manifests(src: Path) -> tuple[dict[str, bytes], bytes]:
    """Three files in ``src/d0`` with their SHA256SUMS; returns the files and the MD5SUMS
    that lists them too (not written: the caller sends it its own way)."""
    files = make_tree(src, 1, 3)
    names = sorted(os.listdir(src / "d0"))
    write_sums(src / "d0", names)
    md5 = subprocess.run(["md5sum", *names], cwd=src / "d0", check=True,
                         capture_output=True).stdout
    return files, md5


def test_two_manifests_listing_the_same_files_make_one_set(agent_factory, tmp_path):
    agent = agent_factory(config=QUICK + 'import_grouping = "manifest"\n').start()
    src = tmp_path / "run"
    files, md5 = two_manifests(src)
    (src / "d0" / "MD5SUMS").write_bytes(md5)
    subprocess.run(["rsync", "-a", f"{src}/", f"{agent.uploads}/"], check=True)
    found = check_imported_once(agent, {
        **files, "d0/SHA256SUMS": (src / "d0" / "SHA256SUMS").read_bytes(),
        "d0/MD5SUMS": md5})
    assert len(found) == 1 and found[0]["Content"]["Files"] == 5, [
        (j["Content"], [m["path"] for m in members_of(j)]) for j in found]


def test_a_manifest_still_being_written_holds_back_the_set_of_the_files_it_lists(
        agent_factory, tmp_path):
    """MD5SUMS is sent first but is still being written (held open) when SHA256SUMS and
    the three files it lists are complete. Their set must wait for MD5SUMS (it lists the
    same files: one fileset), not be imported without it; filesets.json shows it waiting.
    Then MD5SUMS is finished: one job imports all five."""
    agent = agent_factory(config=QUICK + 'import_grouping = "manifest"\n').start()
    src = tmp_path / "run"
    files, md5 = two_manifests(src)
    (agent.uploads / "d0").mkdir()
    with open(agent.uploads / "d0" / "MD5SUMS", "wb") as incoming:
        incoming.write(md5[:10])
        incoming.flush()
        subprocess.run(["rsync", "-a", f"{src}/", f"{agent.uploads}/"], check=True)
        sent = [*files, "d0/SHA256SUMS"]
        wait_for(lambda: all(task_attrs(agent.uploads / rel).get("state") == "complete"
                             for rel in sent), what="the listed files and SHA256SUMS")
        # Waiting (or, the bug, already taken: then its job shows up instead).
        waiting = wait_for(lambda: [s for s in filesets(agent) if s["files"] == 4
                                    and s.get("heldBy") == ["d0/MD5SUMS"]]
                           or import_jobs(agent.mount), what="the set, waiting or taken")
        assert not import_jobs(agent.mount), f"imported without MD5SUMS: {waiting}"
        assert waiting[0]["waitingForCount"] == 0, waiting
        incoming.write(md5[10:])
    found = check_imported_once(agent, {
        **files, "d0/SHA256SUMS": (src / "d0" / "SHA256SUMS").read_bytes(),
        "d0/MD5SUMS": md5})
    assert len(found) == 1 and found[0]["Content"]["Files"] == 5, [
        (j["Content"], [m["path"] for m in members_of(j)]) for j in found]


# -- import_command with the fileset -----------------------------------------------------------


def test_import_command_runs_once_per_fileset_with_its_list(agent_factory, tmp_path):
    """`{fileset}` in import_command: it runs once per set and reads fileset.json."""
    record = tmp_path / "runs"
    record.mkdir()
    argv = ["sh", "-c", 'cp "$0" "$1/run-$$.json"', "{fileset}", str(record)]
    agent = agent_factory(config=QUICK + f"import_command = {json.dumps(argv)}\n").start()
    files = make_tree(tmp_path / "src", 2, 4)
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/", f"{agent.uploads}/"], check=True)
    found = check_imported_once(agent, files)
    assert len(found) == 2
    runs = [json.loads(p.read_text()) for p in record.iterdir()]
    assert sorted(r["root"] for r in runs) == ["d0", "d1"]
    assert sorted(f["path"] for r in runs for f in r["files"]) == sorted(files)


def test_members_changed_before_the_import_runs_are_skipped_and_imported_again(
        agent_factory, tmp_path):
    """Fileset d1 waits behind d0's import (one job at a time, d0's gated): one of its
    files is removed and another rewritten with other bytes. d1's import records the
    rest and lists those two as skipped (with reasons); the rewritten file's new version
    gets its own import; nothing is imported twice."""
    gate, started = tmp_path / "gate", tmp_path / "started"
    # Only d0's import waits for the gate ({root} is the fileset's absolute directory).
    argv = ["sh", "-c", 'touch "$1"; [ "${2##*/}" != d0 ] || while [ ! -e "$0" ]; do '
            'sleep 0.05; done', str(gate), str(started), "{root}"]
    config = QUICK + "max_concurrent_jobs = 1\n" + f"import_command = {json.dumps(argv)}\n"
    agent = agent_factory(config=config).start()
    files = make_tree(tmp_path / "src", 2, 5)
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/d0", f"{agent.uploads}/"], check=True)
    wait_for(started.exists, what="d0's import to start")
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/d1", f"{agent.uploads}/"], check=True)
    d1_job = wait_for(lambda: task_attrs(agent.uploads / "d1/f000.tif").get("job"),
                      what="d1's fileset to be submitted")
    os.unlink(agent.uploads / "d1/f001.tif")
    new = os.urandom(999)
    (agent.uploads / "d1/f002.tif").write_bytes(new)
    gate.touch()
    del files["d1/f001.tif"]
    files["d1/f002.tif"] = new
    found = check_imported_once(agent, files)
    job = next(j for j in found if j["ID"] == d1_job)
    assert job["Content"]["Files"] == 5 and job["Content"]["Imported"] == 3
    assert len(job["Content"]["Skipped"]) == 2
    listing = json.loads((agent.jobs / d1_job / "outputs" / "fileset.json").read_text())
    skipped = {f["path"]: f["reason"] for f in listing["files"] if not f["imported"]}
    assert set(skipped) == {"d1/f001.tif", "d1/f002.tif"}
    assert "removed" in skipped["d1/f001.tif"] and "changed" in skipped["d1/f002.tif"]
    assert task_attrs(agent.uploads / "d1/f002.tif")["job"] != d1_job


def test_a_member_written_back_with_its_bytes_after_leaving_the_import_is_imported_once(
        agent_factory, tmp_path):
    """d1's fileset waits behind d0's gated import; one of its files is rewritten with
    other bytes (it leaves d1's import, its new version gets its own) and then with its
    original bytes again (a new version once more, with its own import). d1's import,
    when it runs, finds the very bytes its spec names, but the file is not its any
    more: it must skip it, or those bytes are imported twice (once by d1's job, once by
    the file's own)."""
    gate, started = tmp_path / "gate", tmp_path / "started"
    argv = ["sh", "-c", 'touch "$1"; [ "${2##*/}" != d0 ] || while [ ! -e "$0" ]; do '
            'sleep 0.05; done', str(gate), str(started), "{root}"]
    config = QUICK + "max_concurrent_jobs = 1\n" + f"import_command = {json.dumps(argv)}\n"
    agent = agent_factory(config=config).start()
    files = make_tree(tmp_path / "src", 2, 5)
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/d0", f"{agent.uploads}/"], check=True)
    wait_for(started.exists, what="d0's import to start")
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/d1", f"{agent.uploads}/"], check=True)
    target = agent.uploads / "d1/f002.tif"
    d1_job = wait_for(lambda: task_attrs(target).get("job"),
                      what="d1's fileset to be submitted")
    original, other = files["d1/f002.tif"], os.urandom(777)
    target.write_bytes(other)
    wait_for(lambda: task_attrs(target).get("sha256") == sha(other)
             and task_attrs(target).get("state") == "complete", what="the other bytes")
    target.write_bytes(original)
    wait_for(lambda: task_attrs(target).get("sha256") == sha(original)
             and task_attrs(target).get("state") == "complete"
             and task_attrs(target).get("job") not in (None, "", d1_job),
             what="the original bytes back, with an import of their own")
    gate.touch()
    found = check_imported_once(agent, files)
    job = next(j for j in found if j["ID"] == d1_job)
    assert job["Content"]["Imported"] == 4 and len(job["Content"]["Skipped"]) == 1


# -- crashes -----------------------------------------------------------------------------------


def test_kill9_while_a_fileset_is_collected_imports_each_file_once(agent_factory, tmp_path):
    """kill -9 inside the quiet window (the uploads complete, no job yet): after the
    restart the set is collected again from the complete uploads without a job, and one
    job imports each file exactly once."""
    agent = agent_factory(config=QUICK + "fileset_quiet_seconds = 30\n").start()
    files = make_tree(tmp_path / "src", 2, 10)
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/", f"{agent.uploads}/"], check=True)
    wait_for(lambda: sum(f["files"] for f in filesets(agent)) == 20,
             what="20 complete uploads waiting in their filesets")
    assert import_jobs(agent.mount) == []
    agent.kill9()
    agent.start()
    assert agent.status()["previous_run_clean"] is False
    wait_for(lambda: sum(f["files"] for f in filesets(agent)) == 20,
             what="the filesets to be collected again after the restart")
    assert import_jobs(agent.mount) == []
    agent.stop()  # a clean stop and a short window: the same sets, imported now
    agent.config_path.write_text(QUICK)
    agent.start()
    found = check_imported_once(agent, files)
    assert len(found) == 2


def test_kill9_while_a_fileset_is_imported_imports_each_file_once(agent_factory, tmp_path):
    """kill -9 while the fileset's import_command runs: the job is requeued and runs
    again; each file stays named by that one job and is recorded once."""
    gate = tmp_path / "gate"
    started = tmp_path / "started"
    argv = ["sh", "-c", 'touch "$1"; while [ ! -e "$0" ]; do sleep 0.05; done', str(gate),
            str(started), "{fileset}"]
    agent = agent_factory(config=QUICK + f"import_command = {json.dumps(argv)}\n").start()
    files = make_tree(tmp_path / "src", 1, 12)
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/", f"{agent.uploads}/"], check=True)
    wait_for(started.exists, what="the fileset's import_command to start")
    (job,) = import_jobs(agent.mount)
    assert job_state(job) == "running"
    agent.kill9()
    gate.touch()
    agent.start()
    found = check_imported_once(agent, files)
    assert [j["ID"] for j in found] == [job["ID"]]
    assert found[0]["Content"]["Imported"] == 12


def test_directory_renamed_over_and_over_while_its_fileset_is_submitted(agent_factory,
                                                                        tmp_path):
    """A directory of 600 uploads is renamed every few ms while its fileset falls quiet
    and is submitted (the engine checks 600 paths in a worker thread meanwhile): the
    submission is not a failure (no traceback, no retry delay); each file is imported
    once, at the path it has at the end (found by the crash soak, seed 32001)."""
    agent = agent_factory(config=QUICK + "fileset_quiet_seconds = 0.2\n").start()
    files = make_tree(tmp_path / "src", 1, 600, size=64)
    subprocess.run(["rsync", "-a", f"{tmp_path / 'src'}/d0", f"{agent.uploads}/"], check=True)
    names = ["d0", "d1"]
    for i in range(300):
        os.rename(agent.uploads / names[i % 2], agent.uploads / names[(i + 1) % 2])
        time.sleep(0.005)
    final = names[300 % 2]
    check_imported_once(agent, {f"{final}/{r.split('/', 1)[1]}": d for r, d in files.items()})
    log = agent.log()
    assert "Traceback" not in log and "import not started" not in log, log[-3000:]
