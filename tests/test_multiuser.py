"""Multi-user lab machines: what ``allow_other`` opens to a second, unprivileged user.

The sticky ``uploads/`` and job-owner rules are proven with the uploads and jobs
components; here is what the agent itself decides: whether other users see the mount.
"""

from __future__ import annotations

import json


def _agent(agent_factory, shared_dir, allow_other: bool):
    return agent_factory(mount=shared_dir / "mnt", state=shared_dir / "state",
                         config=f"allow_other = {str(allow_other).lower()}\n").start()


def test_with_allow_other_another_user_reads_status(shared_dir, agent_factory, other_user):
    agent = _agent(agent_factory, shared_dir, True)
    result = other_user.run("cat", str(agent.mount / "status"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == agent.proc.pid
    listing = other_user.run("ls", str(agent.mount))
    assert listing.stdout.split() == ["jobs", "jobs.json", "metrics", "status", "uploads",
                                      "uploads.json"]
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
