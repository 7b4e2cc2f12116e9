"""The README tells the truth about the code."""

from __future__ import annotations

import re
from pathlib import Path

from fsagent.config import reference_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_settings_table_matches_config():
    m = re.search(r"<!-- settings-table:[^>]*-->\n(.*?)\n<!-- /settings-table -->", README,
                  re.S)
    assert m, "README lacks the settings table markers"
    assert m.group(1).strip() == reference_markdown().strip(), (
        "README settings table is stale; paste the output of "
        "`python -c 'from fsagent.config import reference_markdown as r; print(r())'`")


def test_readme_shows_the_two_commands():
    assert "make run" in README and "make test" in README


def test_ci_runs_make_test():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec make test$", ci, re.M)


def test_every_module_is_in_the_architecture_table():
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "fsagent").rglob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    missing = [m for m in modules if f"`{m}`" not in README]
    assert not missing, f"README architecture section does not name: {missing}"
