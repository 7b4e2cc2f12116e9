"""Multi-user lab machines: what ``allow_other`` opens to other, unprivileged users.

Every rule is shown with real commands (cp, mv, rm, rmdir, bash redirections, the
fsagent CLI) run as two unprivileged users (``other_user`` is A, ``third_user`` is B):
whether other users see the mount at all; ``uploads/`` as a sticky directory whose
entries belong to their creators; jobs readable by all and steered only by their owner
and root (EPERM otherwise); the RPC socket's group.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from conftest import PATIENCE, wait_for
from jobs_util import GATED_IMPORT, import_spec, open_gate


def _agent(agent_factory, shared_dir, allow_other: bool):
    return agent_factory(mount=shared_dir / "mnt", state=shared_dir / "state",
                         config=f"allow_other = {str(allow_other).lower()}\n").start()


def test_with_allow_other_another_user_reads_status(shared_dir, agent_factory, other_user):
    agent = _agent(agent_factory, shared_dir, True)
    result = other_user.run("cat", str(agent.mount / "status"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == agent.proc.pid
    listing = other_user.run("ls", str(agent.mount))
    assert listing.stdout.split() == ["filesets.json", "jobs", "jobs.json", "metrics",
                                      "status", "uploads", "uploads.json"]
    assert other_user.run("head", "-c1", str(agent.mount / "metrics")).stdout == "#"
    # default_permissions: the kernel enforces modes, so status (0444) is not writable.
    write = other_user.run("sh", "-c", f"echo x > {agent.mount / 'status'}")
    assert write.returncode != 0 and "Permission denied" in write.stderr


def test_without_allow_other_another_user_is_refused(shared_dir, agent_factory, other_user):
    agent = _agent(agent_factory, shared_dir, False)
    for argv in (["cat", str(agent.mount / "status")], ["ls", str(agent.mount)],
                 ["stat", str(agent.mount)]):
        result = other_user.run(*argv)
        assert result.returncode != 0, argv
        assert "Permission denied" in result.stderr, result.stderr
    # The agent's own user still has it.
    assert agent.status()["pid"] == agent.proc.pid


# -- the rules between users: uploads/ is sticky, jobs belong to their owners, the RPC group --

EPERM_TEXT = "Operation not permitted"  # strerror(EPERM); EACCES would be "Permission denied"


def _multiuser_agent(agent_factory, shared_dir, extra: str = ""):
    return agent_factory(mount=shared_dir / "mnt", state=shared_dir / "state",
                         config="allow_other = true\nsettle_seconds = 0.5\n" + extra).start()


def _bash(user, script: str, *args: str) -> subprocess.CompletedProcess:
    # bash reports the errno of a failed redirection as it is (dash says "I/O error").
    return user.run("bash", "-c", script, "bash", *args, stdin=subprocess.DEVNULL)


def _refused(result: subprocess.CompletedProcess) -> bool:
    return result.returncode != 0 and EPERM_TEXT in result.stderr


def test_uploads_is_sticky_and_entries_belong_to_their_creators(
        shared_dir, agent_factory, other_user, third_user):
    a, b = other_user, third_user
    agent = _multiuser_agent(agent_factory, shared_dir)
    up = agent.uploads
    assert stat.S_IMODE(os.stat(up).st_mode) == 0o1777
    src = shared_dir / "src.bin"
    src.write_bytes(os.urandom(200_000))
    src.chmod(0o644)
    for user, name in ((a, "a.bin"), (b, "b.bin")):
        result = user.run("cp", str(src), str(up / name))
        assert result.returncode == 0, result.stderr  # every user can upload
    assert a.run("mkdir", str(up / "a-dir")).returncode == 0
    assert a.run("cp", str(src), str(up / "a-dir" / "inner.bin")).returncode == 0
    for name, user in (("a.bin", a), ("b.bin", b), ("a-dir", a), ("a-dir/inner.bin", a)):
        st = os.stat(up / name)
        assert (st.st_uid, st.st_gid) == (user.uid, user.gid), name
        backing = os.stat(agent.state / "data" / "uploads" / name)
        assert backing.st_uid == user.uid, name  # really theirs, not a mask over root's
    # B can neither remove nor rename A's entries, nor replace A's file by a rename.
    assert _refused(b.run("rm", "-f", str(up / "a.bin")))
    assert _refused(b.run("mv", "-f", str(up / "a.bin"), str(up / "mine.bin")))
    assert _refused(b.run("mv", "-f", str(up / "b.bin"), str(up / "a.bin")))
    assert _refused(b.run("mv", str(up / "a-dir"), str(up / "b-dir")))
    assert b.run("rm", "-rf", str(up / "a-dir")).returncode != 0
    # ... and cannot write into it (its mode, 0644, says so: that one is EACCES).
    assert "Permission denied" in _bash(b, 'echo x >> "$1"', str(up / "a.bin")).stderr
    assert (up / "a.bin").read_bytes() == src.read_bytes()
    assert (up / "b.bin").read_bytes() == src.read_bytes()
    assert (up / "a-dir" / "inner.bin").exists()
    # Each may rename and remove their own; root may remove anyone's.
    assert b.run("mv", str(up / "b.bin"), str(up / "b2.bin")).returncode == 0
    assert a.run("rm", str(up / "a-dir" / "inner.bin")).returncode == 0
    assert a.run("rmdir", str(up / "a-dir")).returncode == 0
    os.unlink(up / "b2.bin")
    # A's completed upload became an import job that belongs to A.
    job = wait_for(lambda: _job_of(up / "a.bin"), what="a.bin's import job")
    assert os.stat(agent.jobs / job).st_uid == a.uid
    assert _refused(_bash(b, 'echo cancel > "$1"', str(agent.jobs / job / "control")))


def _job_of(path) -> str | None:
    try:
        return os.getxattr(path, "user.fsagent.job").decode() or None
    except OSError:
        return None


def test_only_a_jobs_owner_or_root_may_steer_it(shared_dir, agent_factory, other_user,
                                                 third_user):
    a, b = other_user, third_user
    agent = _multiuser_agent(agent_factory, shared_dir,
                             "max_concurrent_jobs = 1\n" + GATED_IMPORT)
    blocker = agent.jobs / "blocker"  # root's, holding the only slot: A's job stays pending
    os.mkdir(blocker)
    (blocker / "spec").write_text(json.dumps(import_spec(agent, "blocker.dat")))
    wait_for(lambda: (blocker / "status").read_text() == "running\n", what="blocker running")
    job = agent.jobs / "ja"
    spec = json.dumps(import_spec(agent, "ja.dat"))
    result = _bash(a, 'mkdir "$1" && printf %s "$2" > "$1/spec"', str(job), spec)
    assert result.returncode == 0, result.stderr
    assert os.stat(job).st_uid == a.uid and os.stat(job / "control").st_uid == a.uid

    def value(name):
        return (job / name).read_text().strip()

    # B reads everything, steers nothing: EPERM (not EACCES) for control, priority, rmdir.
    seen = b.run("cat", str(job / "status"), str(job / "priority"), str(job / "info.json"))
    assert seen.returncode == 0 and seen.stdout.startswith("pending\n0\n{")
    assert _refused(_bash(b, 'echo cancel > "$1"', str(job / "control")))
    assert _refused(_bash(b, 'echo 9 > "$1"', str(job / "priority")))
    assert _refused(b.run("rmdir", str(job)))
    assert (value("status"), value("priority")) == ("pending", "0")
    # The owner may.
    assert _bash(a, 'echo 5 > "$1"', str(job / "priority")).returncode == 0
    assert _bash(a, 'echo pause > "$1"', str(job / "control")).returncode == 0
    assert (value("status"), value("priority")) == ("paused", "5")
    assert "Device or resource busy" in a.run("rmdir", str(job)).stderr  # not finished
    # So may root.
    (job / "priority").write_text("7\n")
    (job / "control").write_text("cancel\n")
    assert (value("status"), value("priority")) == ("cancelled", "7")
    # A finished job: B still may not remove it; its owner may.
    assert _refused(b.run("rmdir", str(job)))
    assert a.run("rmdir", str(job)).returncode == 0 and not job.exists()
    # Drafts follow the same rule.
    draft = agent.jobs / "draft-a"
    assert a.run("mkdir", str(draft)).returncode == 0
    assert _refused(b.run("rmdir", str(draft)))
    assert a.run("rmdir", str(draft)).returncode == 0
    open_gate(agent, "blocker.dat")


def test_rpc_group_decides_who_may_connect(shared_dir, agent_factory, other_user,
                                           test_group):
    name, gid = test_group
    sock = shared_dir / "rpc.sock"
    agent = _multiuser_agent(agent_factory, shared_dir, "max_concurrent_jobs = 1\n" +
                             GATED_IMPORT + f'rpc_group = "{name}"\nsocket = "{sock}"\n')
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
    status = [sys.executable, "-m", "fsagent", "status", "--socket", str(sock)]
    outside = other_user.run(*status)
    assert outside.returncode == 2
    assert outside.stderr.strip() == (f"fsagent: error: cannot connect to {sock}: "
                                      "Permission denied")
    inside = other_user.run_in_groups([gid], *status)
    assert inside.returncode == 0, inside.stderr
    assert str(agent.mount) in inside.stdout
    # Over RPC too, a job belongs to whoever submitted it (SO_PEERCRED) and only its
    # owner and root may steer it: the group lets users in, not at each other's jobs.
    os.mkdir(agent.jobs / "roots")
    (agent.jobs / "roots" / "spec").write_text(json.dumps(import_spec(agent, "r.dat")))
    wait_for(lambda: (agent.jobs / "roots" / "status").read_text() == "running\n",
             what="roots running")
    jobs = [sys.executable, "-m", "fsagent", "jobs"]
    refused = other_user.run_in_groups([gid], *jobs, "cancel", "roots", "--socket", str(sock))
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("fsagent: PermissionDenied: job 'roots' belongs to "
                                      "uid 0; only its owner and root may cancel it")
    assert (agent.jobs / "roots" / "status").read_text() == "running\n"
    fields = {k: v for k, v in import_spec(agent, "mine.dat").items() if k != "type"}
    own = other_user.run_in_groups([gid], *jobs, "submit", "import", "--id", "mine",
                                   "--spec", json.dumps(fields), "--socket", str(sock))
    assert own.returncode == 0, own.stderr
    assert os.stat(agent.jobs / "mine").st_uid == other_user.uid
    paused = other_user.run_in_groups([gid], *jobs, "pause", "mine", "--socket", str(sock))
    assert paused.returncode == 0 and paused.stdout.strip() == "paused", paused.stderr
    open_gate(agent, "r.dat")


def test_a_bad_rpc_group_is_a_one_line_config_error(shared_dir, agent_factory, test_group):
    agent = agent_factory(mount=shared_dir / "mnt", state=shared_dir / "state",
                          config='rpc_group = "no-such-group-here"\n')
    result = subprocess.run(agent.argv(), capture_output=True, text=True,
                            timeout=PATIENCE)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fsagent: error: rpc_group: no such group 'no-such-group-here' on this machine"]
    assert not os.path.ismount(agent.mount) and not (agent.state / "fsagent.db").exists()
    # A group may also be given by number.
    from fsagent.config import load_config
    assert load_config(None, {"rpc_group": test_group[1]}, cwd=shared_dir).rpc_group == \
        str(test_group[1])


def test_a_job_takes_only_what_its_owner_may_read(shared_dir, agent_factory, other_user,
                                                 third_user):
    """The agent reads the store as root, and job outputs are readable by every user,
    so an archive (or a verify report) may only cover what its owner could read
    through the mount: B cannot use a job to read A's private files; A and root can."""
    a, b = other_user, third_user
    agent = _multiuser_agent(agent_factory, shared_dir)
    up = agent.uploads
    made = _bash(a, 'umask 077 && mkdir "$1/a-private" && echo secret > "$1/a-private/s.txt" '
                    '&& echo mine > "$1/a-file.txt" && chmod 600 "$1/a-file.txt"', str(up))
    assert made.returncode == 0, made.stderr
    assert _bash(b, 'echo public > "$1/b.txt"', str(up)).returncode == 0
    for kind, paths in (("archive", ["a-file.txt"]), ("archive", ["a-private"]),
                        ("archive", ["b.txt", "a-private/s.txt"]), ("verify", ["a-private"])):
        job = agent.jobs / f"b-{kind}-{len(paths)}-{paths[-1].replace('/', '_')}"
        spec = json.dumps({"type": kind, "paths": paths})
        result = _bash(b, 'mkdir "$1" && printf %s "$2" > "$1/spec"', str(job), spec)
        assert result.returncode != 0 and "Invalid argument" in result.stderr, paths
        assert "may not read it" in (job / "message").read_text(), paths
        assert sorted(os.listdir(job)) == ["message", "spec"]  # a draft: nothing queued
    ok = agent.jobs / "b-own"
    spec = json.dumps({"type": "archive", "paths": ["b.txt"]})
    assert _bash(b, 'mkdir "$1" && printf %s "$2" > "$1/spec"', str(ok), spec).returncode == 0
    assert (ok / "wait").read_text() == "success\n"
    mine = agent.jobs / "a-own"
    spec = json.dumps({"type": "archive", "paths": ["a-private", "a-file.txt", "b.txt"]})
    assert _bash(a, 'mkdir "$1" && printf %s "$2" > "$1/spec"', str(mine), spec).returncode == 0
    assert (mine / "wait").read_text() == "success\n"
    root = agent.jobs / "root-all"
    os.mkdir(root)
    (root / "spec").write_text(json.dumps({"type": "archive", "paths": ["."]}))
    assert (root / "wait").read_text() == "success\n"
