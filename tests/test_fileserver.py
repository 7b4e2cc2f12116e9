"""FileServer over RPC on a live agent: the 14 operations and confinement."""

from __future__ import annotations

import hashlib
import os
import pwd

import pytest

from fsagent.rpc import OmeroFSError, RpcError, open_client
from rpcutil import export_agent


@pytest.fixture
def served(agent_factory, tmp_path):
    agent, data = export_agent(agent_factory, tmp_path,
                               config="readblock_max_bytes = 1048576\n")
    (data / "sub").mkdir()
    (data / "a.tif").write_bytes(b"0123456789")
    (data / "b.txt").write_bytes(b"hello")
    (data / "sub" / "c.tif").write_bytes(os.urandom(3 * 2**20 + 7))
    os.symlink(data / "a.tif", data / "link.tif")
    os.symlink("/etc", data / "etc")
    (tmp_path / "secret").write_text("outside")
    os.symlink(tmp_path / "secret", data / "sub" / "escape")
    return agent, data


async def test_stats_of_a_file(served):
    agent, data = served
    f = data / "a.tif"
    st = os.stat(f)
    owner = pwd.getpwuid(st.st_uid).pw_name
    async with open_client(agent.socket) as c:
        p = str(f)
        assert await c.call("FileServer.fileExists", p) is True
        assert await c.call("FileServer.fileExists", str(data / "nope")) is False
        assert await c.call("FileServer.getSize", p) == 10
        assert await c.call("FileServer.getMTime", p) == pytest.approx(st.st_mtime)
        assert await c.call("FileServer.getCTime", p) == pytest.approx(st.st_ctime)
        assert await c.call("FileServer.getATime", p) == pytest.approx(st.st_atime)
        assert await c.call("FileServer.getOwner", p) == owner
        assert await c.call("FileServer.getBaseName", p) == "a.tif"
        assert await c.call("FileServer.isFile", p) is True
        assert await c.call("FileServer.isDir", p) is False
        assert await c.call("FileServer.isDir", str(data / "sub")) is True
        assert await c.call("FileServer.getStats", p) == {
            "baseName": "a.tif", "owner": owner, "size": 10, "mTime": st.st_mtime,
            "cTime": st.st_ctime, "aTime": st.st_atime, "type": "File"}
        link = await c.call("FileServer.getStats", str(data / "link.tif"))
        assert link["type"] == "Link" and link["baseName"] == "link.tif"
        assert (await c.call("FileServer.getStats", str(data / "sub")))["type"] == "Dir"
        # the root of a mounted filesystem is a Mount
        assert (await c.call("FileServer.getStats", str(data)))["type"] in ("Dir", "Mount")


async def test_listings_and_glob_filter(served):
    agent, data = served
    async with open_client(agent.socket) as c:
        assert await c.call("FileServer.getDirectory", str(data), "") == [
            "a.tif", "b.txt", "etc", "link.tif", "sub"]
        assert await c.call("FileServer.getDirectory", str(data), "*.tif") == [
            "a.tif", "link.tif"]
        bulk = await c.call("FileServer.getBulkDirectory", str(data), "[ab].*")
        assert [(s["baseName"], s["type"], s["size"]) for s in bulk] == [
            ("a.tif", "File", 10), ("b.txt", "File", 5)]
        etc = await c.call("FileServer.getBulkDirectory", str(data), "etc")
        assert etc[0]["type"] == "Link"
        with pytest.raises(OmeroFSError, match="Not a directory"):
            await c.call("FileServer.getDirectory", str(data / "a.tif"), "")


async def test_read_block_and_sha1(served):
    agent, data = served
    big = data / "sub" / "c.tif"
    content = big.read_bytes()
    async with open_client(agent.socket) as c:
        assert await c.call("FileServer.readBlock", str(data / "a.tif"), 3, 4) == b"3456"
        assert await c.call("FileServer.readBlock", str(data / "a.tif"), 8, 100) == b"89"
        assert await c.call("FileServer.readBlock", str(data / "a.tif"), 50, 10) == b""
        assert await c.call("FileServer.readBlock", str(big), 2**20, 2**20) == \
            content[2**20:2**21]
        with pytest.raises(OmeroFSError, match="exceeds the readBlock cap of 1048576"):
            await c.call("FileServer.readBlock", str(big), 0, 2**20 + 1)
        with pytest.raises(OmeroFSError, match="non-negative"):
            await c.call("FileServer.readBlock", str(big), -1, 10)
        with pytest.raises(OmeroFSError, match="Is a directory"):
            await c.call("FileServer.readBlock", str(data / "sub"), 0, 10)
        assert await c.call("FileServer.getSHA1", str(big)) == hashlib.sha1(content).hexdigest()
        assert await c.call("FileServer.getSHA1", str(data / "link.tif")) == \
            hashlib.sha1(b"0123456789").hexdigest()


ESCAPES = ["/etc/shadow", "/etc", "{data}/../secret", "{data}/sub/../../secret",
           "{data}/etc/passwd", "{data}/sub/escape", "{data}/etc", "relative/path",
           "{data}/sub/escape/.."]


@pytest.mark.parametrize("op", ["fileExists", "getATime", "getBaseName", "getCTime",
                                "getMTime", "getOwner", "getSHA1", "getSize", "getStats",
                                "isDir", "isFile"])
async def test_every_op_refuses_escapes(served, op):
    agent, data = served
    async with open_client(agent.socket) as c:
        for escape in ESCAPES:
            path = escape.format(data=data)
            with pytest.raises(OmeroFSError) as info:
                await c.call(f"FileServer.{op}", path)
            assert info.value.to_wire()[0] == "OmeroFSError"
            assert ("not under an exported root: " + path in info.value.message
                    or "not an absolute path" in info.value.message), info.value


async def test_listing_and_reading_ops_refuse_escapes(served):
    agent, data = served
    async with open_client(agent.socket) as c:
        with pytest.raises(OmeroFSError, match="not under an exported root: /etc/shadow"):
            await c.call("FileServer.readBlock", "/etc/shadow", 0, 10)
        with pytest.raises(OmeroFSError, match="not under an exported root"):
            await c.call("FileServer.readBlock", f"{data}/sub/escape", 0, 10)
        with pytest.raises(OmeroFSError, match="not under an exported root"):
            await c.call("FileServer.getDirectory", f"{data}/..", "")
        with pytest.raises(OmeroFSError, match="not under an exported root"):
            await c.call("FileServer.getBulkDirectory", f"{data}/etc", "*")
        # the raw wire form is [name, message]
        with pytest.raises(RpcError) as info:
            await c.call("FileServer.getSize", "/etc/shadow")
        assert info.value.to_wire() == ["OmeroFSError", "not under an exported root: /etc/shadow"]


async def test_missing_file_and_bad_arguments(served):
    agent, data = served
    async with open_client(agent.socket) as c:
        with pytest.raises(OmeroFSError, match="No such file"):
            await c.call("FileServer.getSize", str(data / "gone"))
        with pytest.raises(OmeroFSError, match="expected a path string"):
            await c.call("FileServer.getSize", 42)
        with pytest.raises(RpcError) as info:
            await c.call("FileServer.getSize")
        assert info.value.name == "InvalidParams"


async def test_nothing_is_exported_by_default(agent):
    async with open_client(agent.socket) as c:
        with pytest.raises(OmeroFSError, match="not under an exported root: /tmp"):
            await c.call("FileServer.getDirectory", "/tmp", "")


def test_export_root_must_exist(cli, tmp_path):
    r = cli("run", "--mount", str(tmp_path / "m"), "--state-dir", str(tmp_path / "s"),
            "--export-root", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert "export_roots" in r.stderr and "not a directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
