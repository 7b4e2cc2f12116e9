"""POSIX conformance of ``uploads/``: pjdfstest, built from source, run through the mount.

pjdfstest is the conformance suite FreeBSD, ZFS and JuiceFS run: a small C program that
makes one syscall per invocation (optionally as another uid) and ~240 TAP test files of
shell that drive it. It is third-party code, so the project does not carry it: it comes
as a tarball in ``../shared/tools/`` beside the clone (the README there says where it is
from). A missing tarball fails the test, with the path it looked at: a CI run that
checked nothing must not be green.

Set-up: the tarball is built once per content (``autoreconf -ifs && ./configure && make
pjdfstest``) into ``.build/pjdfstest-<sha256 prefix>/`` in the clone (gitignored), so a
re-run reuses the build and a new tarball gets a fresh one. The build happens in a
temporary directory and is renamed into place, so an interrupted build is never mistaken
for a finished one. The agent runs with ``allow_other`` in a directory every user can
traverse, because pjdfstest switches to uids 65534/65533 to check the permission rules,
and ``prove -r -v -j2`` runs with ``MOUNT/uploads/`` as its working directory (the test
files use random names, so two at a time do not collide; on 2 cores it takes a third
off the run, which mostly waits in pjdfstest's `sleep 1` checks of ctime).

Verdict per test file, from prove's own summary (the harness is tested on a small real TAP suite at the
end): every file passes, except the ones in
``EXPECTED_FAILURES``, which are the files that need hard links (fsagent refuses link()
with EPERM by design; the README says why). An expected failure must still fail for
that reason (its first failing assertion is a ``link`` answered with EPERM), and the test
fails as soon as one passes, so the list cannot outlive its reason. The README's
"Conformance" section lists the same files; a test below holds the two together. The
agent must also stop cleanly and log no traceback over the whole run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT.parent / "shared" / "tools"
TARBALL = TOOLS / "pjdfstest-85a8aea.tar.gz"
BUILD_ROOT = ROOT / ".build"
README = ROOT / "README.md"

PROVE_JOBS = 2
PROVE_TIMEOUT = 600  # seconds; the run takes 2-3 min, and a hung FUSE request must not hang CI

# Test file (relative to pjdfstest's tests/) -> the hard link it needs. Only files whose
# failures all come from link() answering EPERM belong here (README, "Conformance").
EXPECTED_FAILURES = {
    "link/00.t": "link() of each file type; nlink and ctime of both names",
    "link/02.t": "a link() with a NAME_MAX-long name that must succeed",
    "link/03.t": "a link() with a PATH_MAX-long path that must succeed",
    "link/06.t": "a link() as another user, allowed by search permission",
    "link/07.t": "a link() as another user, allowed by write permission",
    "link/09.t": "link() then unlink of the source, before the ENOENT case",
    "rename/00.t": "rename of a hard-linked name keeps nlink 2",
    "rename/23.t": "rename over a destination that has a second link",
    "unlink/00.t": "unlink of one of two links updates the other's nlink and ctime",
}


# -- build -----------------------------------------------------------------------------

def build_pjdfstest(tarball: Path = TARBALL, build_root: Path = BUILD_ROOT) -> Path:
    """The built pjdfstest source tree for ``tarball`` (building it unless already built)."""
    if not tarball.is_file():
        pytest.fail(f"pjdfstest tarball not found at {tarball}: the conformance test needs "
                    f"../shared/tools/ beside the clone (CI provides it)", pytrace=False)
    missing = [t for t in ("prove", "autoreconf", "automake", "cc", "make", "tar")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"tools missing to build/run pjdfstest: {missing}; `make test` installs "
                    f"them (APT_PACKAGES in the Makefile)", pytrace=False)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    built = build_root / f"pjdfstest-{digest[:16]}"
    if (built / "pjdfstest").is_file():
        return built
    build_root.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="building-", dir=build_root))
    try:
        _run(["tar", "-xzf", str(tarball), "-C", str(work)], work)
        (src,) = [p for p in work.iterdir() if p.is_dir()]
        for argv in (["autoreconf", "-ifs"], ["./configure"], ["make", "pjdfstest"]):
            _run(argv, src)
        try:
            src.rename(built)
        except OSError:
            # Another run finished the same build first (rename refuses a non-empty target).
            if not (built / "pjdfstest").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return built


def _run(argv: list[str], cwd: Path) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"building pjdfstest: {' '.join(argv)} exited {result.returncode} in "
                    f"{cwd}:\n{(result.stdout + result.stderr)[-3000:]}", pytrace=False)


# -- prove's output ----------------------------------------------------------------------

@dataclass
class FileResult:
    failed: bool = False
    not_ok: list[str] = field(default_factory=list)  # failing assertions, TODOs left out
    summary: list[str] = field(default_factory=list)  # prove's summary lines for the file


_HEADER = re.compile(r"^(?P<path>/\S+\.t) \.+ ?$")
_SUMMARY_FILE = re.compile(r"^(?P<path>/\S+\.t)\s+\((?P<counts>.*)\)$")
_SUMMARY_LABEL = re.compile(r"^\s+(?P<label>[A-Z][A-Za-z -]+):")


def parse_prove(output: str, tests: Path) -> dict[str, FileResult]:
    """Per test file (``"link/00.t"``): whether prove counts it failed, and its ``not ok``s.

    prove -v with several jobs and its output not a terminal prints each file's TAP as
    one block, after a ``PATH .. `` header line, when the file ends. Whether a file
    failed is read from the "Test Summary Report", which is prove's own verdict (failed
    assertions, a non-zero exit, a bad plan); a file listed there only for passing TODOs
    did not fail.
    """
    prefix = str(tests) + "/"
    results: dict[str, FileResult] = {}
    current: FileResult | None = None
    lines = output.splitlines()
    summary_at = next((i for i, line in enumerate(lines)
                       if line.startswith("Test Summary Report")), len(lines))
    for line in lines[:summary_at]:
        m = _HEADER.match(line)
        if m and m["path"].startswith(prefix):
            current = results.setdefault(m["path"][len(prefix):], FileResult())
        elif current is not None and line.startswith("not ok") and "# TODO" not in line:
            current.not_ok.append(line)
    current = None
    for line in lines[summary_at + 1:]:
        m = _SUMMARY_FILE.match(line)
        if m and m["path"].startswith(prefix):
            current = results.setdefault(m["path"][len(prefix):], FileResult())
            current.summary.append(m["counts"])
            # "Wstat: 256 (exited 1) Tests: 1 Failed: 0"
            wstat = re.search(r"Wstat: (\d+)", m["counts"])
            failed = re.search(r"Failed: (\d+)", m["counts"])
            if not wstat or not failed or int(wstat[1]) or int(failed[1]):
                current.failed = True
        elif current is not None and line.startswith(" "):
            current.summary.append(line.strip())
            label = _SUMMARY_LABEL.match(line)
            # Anything prove lists but passing TODOs (bad plan, exit status...) is a failure.
            if label and label["label"] != "TODO passed":
                current.failed = True
        else:
            current = None
    return results


_LINK_EPERM = re.compile(r"tried '(?:-\S+ \S+ )*(?:-- )?link \S+ \S+', expected \S+, got EPERM$")


def fails_for_hard_links(result: FileResult) -> bool:
    """The first failing assertion is a link() answered with EPERM (the rest follow from it)."""
    return bool(result.not_ok) and bool(_LINK_EPERM.search(result.not_ok[0]))


def _short(line: str) -> str:
    # pjdfstest's long-path tests print paths of thousands of characters.
    line = re.sub(r"[0-9a-f]{40,}", lambda m: f"<{len(m[0])} hex chars>", line)
    line = re.sub(r"(?:<\d+ hex chars>/){2,}", lambda m: f"<{m[0].count('/')} long dirs>/", line)
    return line if len(line) <= 300 else line[:300] + "..."


def run_prove(tests: Path, cwd: Path, log: Path, jobs: int = PROVE_JOBS,
              timeout: float = PROVE_TIMEOUT) -> tuple[int, str]:
    """``prove -r -v -jN TESTS`` in ``cwd``: its exit code and output (also kept in ``log``)."""
    with open(log, "wb") as out:
        # Its own session, so a timeout can kill prove and every test script under it.
        prove = subprocess.Popen(["prove", "-r", "-v", f"-j{jobs}", str(tests)], cwd=cwd,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            prove.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(prove.pid, signal.SIGKILL)
            prove.wait()
            pytest.fail(f"prove did not finish in {timeout}s; output so far in {log}",
                        pytrace=False)
    return prove.returncode, log.read_text(errors="replace")


def verdict(results: dict[str, FileResult], expected: dict[str, str]) -> list[str]:
    """What is wrong with a run: unexpected failures, expected ones that pass or fail first
    on something other than a refused link(). Empty when the run is as documented."""
    problems = []
    for name, result in sorted(results.items()):
        details = "\n      ".join(_short(x) for x in (result.not_ok[:6] or result.summary))
        if name in expected:
            if not result.failed:
                problems.append(f"{name} now PASSES: remove it from EXPECTED_FAILURES in "
                                f"{Path(__file__).name} and from the README's Conformance list")
            elif not fails_for_hard_links(result):
                problems.append(f"{name} is an expected (hard link) failure, but its first "
                                f"failure is something else:\n      {details}")
        elif result.failed:
            problems.append(f"{name} FAILS {'; '.join(result.summary)}\n      {details}")
    problems += [f"{name} is in EXPECTED_FAILURES but prove did not run it"
                 for name in sorted(set(expected) - set(results))]
    return problems


# -- the tests -------------------------------------------------------------------------

def test_pjdfstest_passes_in_uploads_except_hard_links(agent_factory, shared_dir, tmp_path):
    pjdfstest = build_pjdfstest()
    tests = pjdfstest / "tests"
    all_files = sorted(str(p.relative_to(tests)) for p in tests.rglob("*.t"))

    agent = agent_factory(mount=shared_dir / "mnt", state=shared_dir / "state",
                          config="allow_other = true\n").start()
    started = time.monotonic()
    code, output = run_prove(tests, agent.uploads, tmp_path / "prove.log")
    seconds = time.monotonic() - started
    print(f"pjdfstest: {len(all_files)} files in {seconds:.0f}s with prove -j{PROVE_JOBS}")

    assert re.search(r"^Result: (PASS|FAIL)$", output, re.M), (
        f"prove ended without a result (exit {code}):\n{output[-3000:]}")
    results = parse_prove(output, tests)
    assert sorted(results) == all_files, (
        f"prove did not report every test file: missing "
        f"{sorted(set(all_files) - set(results))}, unknown {sorted(set(results) - set(all_files))}")
    problems = verdict(results, EXPECTED_FAILURES)
    if problems:
        failed = sum(r.failed for r in results.values())
        pytest.fail(f"pjdfstest in uploads/: {len(all_files) - failed}/{len(all_files)} files "
                    f"pass ({seconds:.0f}s; full output in {tmp_path / 'prove.log'}):\n  "
                    + "\n  ".join(problems), pytrace=False)

    assert agent.stop() == 0, agent.log()[-3000:]
    assert "Traceback" not in agent.log(), agent.log()


def test_readme_lists_the_expected_failures():
    text = README.read_text()
    m = re.search(r"^## Conformance\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README has no '## Conformance' section"
    listed = set(re.findall(r"^\| `([a-z_]+/\d+\.t)` \|", m.group(1), re.M))
    assert listed == set(EXPECTED_FAILURES), (
        f"README Conformance list and EXPECTED_FAILURES differ: only in README "
        f"{sorted(listed - set(EXPECTED_FAILURES))}, only in the test "
        f"{sorted(set(EXPECTED_FAILURES) - listed)}")


# -- the harness itself, on a real prove run of a small TAP suite -------------------------

_SUITE = {
    # name: (TAP lines, exit code)
    "a/00.t": (["1..2", "ok 1", "ok 2"], 0),
    "a/01.t": (["1..3", "ok 1", "not ok 2 - tried 'link f g', expected 0, got EPERM",
                "not ok 3 - tried 'lstat g type', expected regular, got ENOENT"], 0),
    "a/02.t": (["1..2", "not ok 1 - tried 'mkfifo f 0644', expected 0, got EPERM",
                "not ok 2 - tried '-u 65534 -g 65534 link f g', expected 0, got EPERM"], 0),
    "a/03.t": (["1..1", "ok 1"], 0),
    "a/04.t": (["1..2", "ok 1", "not ok 2 # TODO POSIX allows either"], 0),
    "a/05.t": (["1..1", "ok 1 # TODO passes anyway"], 0),  # listed in prove's summary
    "b/00.t": (["1..3", "ok 1", "ok 2"], 0),  # fewer tests than planned
    "b/01.t": (["1..1", "ok 1"], 1),          # all ok, then a non-zero exit
}


def test_harness_reads_prove_and_judges_each_file(tmp_path):
    suite = tmp_path / "tests"
    for name, (lines, code) in _SUITE.items():
        path = suite / name
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"echo \"{line}\"\n" for line in lines)
        path.write_text(f"#!/bin/sh\n{body}exit {code}\n")
        path.chmod(0o755)
    code, output = run_prove(suite, tmp_path, tmp_path / "prove.log", jobs=2, timeout=60)
    assert code != 0
    results = parse_prove(output, suite)
    assert sorted(results) == sorted(_SUITE)
    assert {n for n, r in results.items() if r.failed} == {"a/01.t", "a/02.t", "b/00.t",
                                                           "b/01.t"}
    assert results["a/01.t"].not_ok == [_SUITE["a/01.t"][0][2], _SUITE["a/01.t"][0][3]]
    assert results["a/04.t"].not_ok == []  # a TODO is not a failure
    assert results["a/05.t"].summary[-1].startswith("TODO passed:")

    problems = verdict(results, {"a/01.t": "", "a/02.t": "", "a/03.t": ""})
    assert [p.split()[0] for p in problems] == ["a/02.t", "a/03.t", "b/00.t", "b/01.t"]
    assert "first failure is something else" in problems[0] and "mkfifo" in problems[0]
    assert "now PASSES" in problems[1]
    assert verdict(results, {"a/01.t": "", "a/02.t": "", "b/00.t": "", "b/01.t": ""})[:1] == [
        problems[0]]
    assert verdict({n: r for n, r in results.items() if n != "a/03.t"}, {"a/03.t": ""}) \
        [-1] == "a/03.t is in EXPECTED_FAILURES but prove did not run it"


def test_a_missing_tarball_fails_the_run_instead_of_skipping(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="tarball not found at .*absent.tar.gz"):
        build_pjdfstest(tmp_path / "absent.tar.gz", tmp_path / "build")
