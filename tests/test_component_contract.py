"""Components reach the agent only through ``Host``, and the agent is a ``Host``.

``fsagent/component.py`` names what a component may use of the agent. These checks keep
that list true in both directions: the code of the capabilities (read with ``ast``) uses
no attribute of ``agent``/``self.agent`` that ``Host`` does not name, and ``Agent`` has
every member ``Host`` names.
"""

from __future__ import annotations

import ast
from pathlib import Path

from fsagent.agent import Agent
from fsagent.component import Host, JobHandOff
from fsagent.config import load_config
from fsagent.jobs import JobsComponent

ROOT = Path(__file__).resolve().parent.parent / "fsagent"
# Not components: the agent itself, the contract, and the service plumbing the agent
# drives (each of those modules declares the narrower protocol it needs).
NOT_COMPONENTS = {Path("agent.py"), Path("component.py")}
# How the code names the host: ``agent``/``self.agent``, and a stage's ``self._agent``.
_HOST_NAMES = {"agent", "_agent"}


def _members(protocol) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n in vars(protocol) if not n.startswith("_")}
    return names


def _agent_uses() -> dict[str, list[str]]:
    """``{attribute: ["path:line", ...]}`` for every ``<...>agent.<attribute>`` read
    (and a stage's ``self._agent``)."""
    uses: dict[str, list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel in NOT_COMPONENTS or rel.parts[0] == "service":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id in _HOST_NAMES) or (
                    isinstance(owner, ast.Attribute) and owner.attr in _HOST_NAMES):
                uses.setdefault(node.attr, []).append(f"fsagent/{rel}:{node.lineno}")
    return uses


def test_components_use_only_what_host_names():
    uses = _agent_uses()
    assert {"config", "to_thread", "jobs"} <= set(uses)  # the scan sees real uses
    unknown = {attr: where for attr, where in uses.items() if attr not in _members(Host)}
    assert not unknown, (
        "components use agent attributes Host (fsagent/component.py) does not name; "
        f"add them there or go through a Host member: {unknown}")


def test_the_agent_is_a_host_and_the_jobs_component_a_hand_off(tmp_path):
    agent = Agent(load_config(None, {"mount": "m", "state_dir": "s"}, cwd=tmp_path))
    missing = {name for name in _members(Host) if not hasattr(agent, name)}
    assert not missing, f"Agent lacks Host members: {missing}"
    assert agent.jobs is None  # no components built yet: no job engine to hand off to
    missing = {name for name in _members(JobHandOff) if not hasattr(JobsComponent, name)}
    assert not missing, f"JobsComponent lacks JobHandOff verbs: {missing}"
