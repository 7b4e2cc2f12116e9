"""The FUSE adapter in-process: a real mount of a small tree built for the test."""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
import pytest
import trio

from fsagent.fs import Directory, DynamicFile, Filesystem, Node, make_attributes


class BrokenFile(Node):
    """A node with a bug: stat works, open raises something that is not a FUSEError."""

    async def getattr(self, ctx):
        return make_attributes(inode=self.inode, mode=stat.S_IFREG | 0o444, size=3)

    async def open(self, flags, ctx):
        raise RuntimeError("bug in a handler")


class CountingDirectory(Directory):
    """A directory that counts the lookups that reach it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[bytes] = []

    async def lookup(self, name, ctx):
        self.asked.append(name)
        return await super().lookup(name, ctx)


class RemembersMissing(CountingDirectory):
    negative_timeout = 60.0


@pytest.fixture
async def mounted(tmp_path, nursery):
    mount = tmp_path / "mnt"
    mount.mkdir()
    root = Directory({
        b"ok": DynamicFile(lambda: b"fine\n"),
        b"broken": BrokenFile(),
        b"many": Directory({f"f{i:04d}".encode(): DynamicFile(lambda: b"") for i in range(700)}),
        b"asks": CountingDirectory({b"here": DynamicFile(lambda: b"")}),
        b"remembers": RemembersMissing({b"here": DynamicFile(lambda: b"")}),
    })
    fs = Filesystem(root, statfs_path=tmp_path)
    pyfuse3.init(fs, str(mount), set(pyfuse3.default_options) | {"fsname=fsagent-test"})
    done = trio.Event()

    async def serve():
        try:
            await pyfuse3.main()
        finally:
            done.set()

    nursery.start_soon(serve)
    try:
        yield mount, fs
    finally:
        pyfuse3.terminate()
        with trio.move_on_after(5):
            await done.wait()
        pyfuse3.close(unmount=True)


async def test_handler_bug_is_eio_and_the_mount_survives(mounted, caplog):
    mount, fs = mounted
    caplog.set_level(logging.ERROR)
    with pytest.raises(OSError) as e:
        await trio.to_thread.run_sync(lambda: open(mount / "broken").read())
    assert e.value.errno == errno.EIO
    assert fs.handler_errors == 1
    assert "bug in a handler" in caplog.text and "Traceback" in caplog.text
    # ...and everything else still works.
    assert await trio.to_thread.run_sync((mount / "ok").read_text) == "fine\n"


async def test_readdir_pages_through_large_directories(mounted):
    mount, fs = mounted
    names = await trio.to_thread.run_sync(os.listdir, mount / "many")
    assert len(names) == 700 and len(set(names)) == 700


async def test_unsupported_operations_get_clean_errnos(mounted):
    mount, fs = mounted

    def attempts():
        out = {}
        for name, fn in {
            "mkdir in a read-only dir": lambda: os.mkdir(mount / "new"),
            "hard link": lambda: os.link(mount / "ok", mount / "ok2"),
            "write a dynamic file": lambda: open(mount / "ok", "w"),
            "lookup missing": lambda: os.stat(mount / "missing"),
            "setxattr": lambda: os.setxattr(mount / "ok", "user.x", b"1"),
        }.items():
            try:
                fn()
            except OSError as e:
                out[name] = e.errno
        return out

    got = await trio.to_thread.run_sync(attempts)
    assert got == {
        "mkdir in a read-only dir": errno.EACCES,
        "hard link": errno.EPERM,
        "write a dynamic file": errno.EACCES,
        "lookup missing": errno.ENOENT,
        "setxattr": errno.ENOTSUP,
    }
    assert fs.handler_errors == 0


async def test_lookup_counts_return_to_zero_after_forget(mounted):
    mount, fs = mounted
    await trio.to_thread.run_sync(os.listdir, mount / "many")
    assert len(fs._lookups) > 700
    # Dropping the kernel's caches makes it send FORGET for every cached entry.
    await trio.to_thread.run_sync(lambda: open("/proc/sys/vm/drop_caches", "w").write("2"))
    with trio.move_on_after(60):  # the FORGETs arrive as the kernel gets round to them
        while len(fs._lookups) >= 10:
            await trio.sleep(0.05)
    assert len(fs._lookups) < 10
    # Forgotten non-permanent nodes keep working when looked up again.
    assert await trio.to_thread.run_sync((mount / "many" / "f0001").read_bytes) == b""


async def test_missing_names_are_remembered_only_where_the_directory_says_so(mounted):
    mount, fs = mounted

    def stat_missing_twice(directory):
        for _ in range(2):
            with pytest.raises(FileNotFoundError):
                os.stat(mount / directory / "missing")
        return os.stat(mount / directory / "here").st_size  # present names still work

    assert await trio.to_thread.run_sync(stat_missing_twice, "asks") == 0
    assert await trio.to_thread.run_sync(stat_missing_twice, "remembers") == 0
    asks, remembers = fs.root._children[b"asks"], fs.root._children[b"remembers"]
    assert asks.asked.count(b"missing") == 2  # ENOENT: the kernel asks every time
    assert remembers.asked.count(b"missing") == 1  # inode 0 + timeout: asked once
    assert fs.negative_entries == 1 and fs.handler_errors == 0
    # A negative entry holds no inode: nothing to forget, no lookup count for inode 0.
    assert 0 not in fs._lookups and 0 not in fs._nodes
