"""``confine`` with a batch ``Resolver``: the same answers as one realpath per file.

An import resolves every member of its fileset in one worker-thread pass; the resolver
takes each directory's real path once. These tests hold it to ``os.path.realpath`` on
random trees of directories, files and symlinks (to files, to directories, dangling,
escaping, in loops), and to ``confine``'s refusals.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from fsagent.jobs._kinds import Resolver, SpecError, confine


def _random_tree(root: Path, outside: Path, rng: random.Random) -> list[str]:
    """Build a tree under ``root``; return every path in it (relative), some missing."""
    dirs = [root]
    names: list[Path] = []
    for i in range(40):
        parent = rng.choice(dirs)
        kind = rng.choice(["dir", "file", "file", "link"])
        path = parent / f"n{i}"
        if kind == "dir":
            path.mkdir()
            dirs.append(path)
        elif kind == "file":
            path.write_bytes(b"x")
        else:
            target = rng.choice([
                rng.choice(dirs + names + [root]),        # inside: a directory or file
                outside,                                   # escaping
                parent / "missing",                        # dangling
                path,                                      # a loop onto itself
            ])
            if rng.random() < 0.5:
                target = os.path.relpath(target, parent)
            os.symlink(target, path)
        names.append(path)
    paths = [str(p.relative_to(root)) for p in names]
    # Names below each entry (through symlinked directories too) and missing ones.
    paths += [f"{p}/{rng.choice(['n1', 'n2', 'x', 'n30'])}" for p in paths]
    return paths


@pytest.mark.parametrize("seed", range(8))
def test_a_resolver_answers_as_realpath_for_every_path_of_a_random_tree(tmp_path, seed):
    rng = random.Random(seed)
    root = tmp_path / "uploads"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    paths = _random_tree(root, outside, rng)
    resolver = Resolver()
    for rel in rng.sample(paths, len(paths)) * 2:  # the second pass hits the cache
        full = str(root / rel)
        assert resolver.realpath(full) == os.path.realpath(full), rel


def test_confine_with_a_resolver_refuses_what_confine_refuses(tmp_path):
    root = tmp_path / "uploads"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"f")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    os.symlink(outside, root / "escape")
    os.symlink(outside / "secret", root / "d" / "leak")
    resolver = Resolver()
    assert confine(root, "d/f", resolver=resolver) == root / "d" / "f"
    for rel, words in [("escape/secret", "resolves outside"), ("d/leak", "resolves outside"),
                       ("d/missing", "no such file"), ("../outside/secret", "'..'")]:
        with pytest.raises(SpecError, match=words):
            confine(root, rel, resolver=resolver)
        with pytest.raises(SpecError, match=words):
            confine(root, rel)
