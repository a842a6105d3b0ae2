"""Local sandbox behaviour: commands, files, snapshots, many at once, every isolation mode."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from relayrl.envs import trees
from relayrl.envs.contract import check_sandbox_provider
from relayrl.envs.local_sandbox import LocalSandboxProvider, probe_mode
from relayrl.envs.sandbox import Sandbox, SandboxError, SandboxLimits, SandboxPathError

MODES = ["root", "userns", "none"] if probe_mode() == "root" else [probe_mode()]


def go(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("mode", MODES)
def test_contract_in_every_mode(mode, tmp_path):
    async def main():
        p = LocalSandboxProvider(SandboxLimits(timeout_s=10), root=str(tmp_path), mode=mode)
        try:
            return await check_sandbox_provider(p), p.network_isolated
        finally:
            await p.close()

    results, isolated = go(main())
    bad = {r.name: r.detail for r in results if not r.ok}
    if mode == "none":  # honest about it: no namespace, no network isolation
        assert not isolated and set(bad) == {"network isolation"}
    else:
        assert isolated and bad == {}


def test_commands_files_and_snapshot(tmp_path):
    async def main():
        p = LocalSandboxProvider(SandboxLimits(timeout_s=10), root=str(tmp_path))
        sb = await p.create({"src/a.py": "x = 1\n", "b.bin": b"\x00\x01"})
        assert isinstance(sb, Sandbox)
        r = await sb.exec("pwd; ls -R; printf '\\xff\\xfe'; echo; printf err >&2; exit 3")
        await sb.write_file("src/deep/new.txt", "héllo")
        made = await sb.exec("mkdir -p out && echo made > out/m.txt && python -c 'print(open(\"src/deep/new.txt\").read())'")
        snap = await sb.snapshot()
        await sb.close()
        return r, made, snap, sb.base.exists()

    r, made, snap, exists = go(main())
    assert r.exit_code == 3 and r.stderr == "err" and not r.timed_out
    assert r.stdout.splitlines()[0].endswith("/work") and "a.py" in r.stdout
    assert "\ufffd\ufffd" in r.stdout  # invalid UTF-8 replaced, not raised
    assert made.stdout == "héllo\n"
    assert snap == {"src/a.py": b"x = 1\n", "b.bin": b"\x00\x01", "src/deep/new.txt": "héllo".encode(),
                    "out/m.txt": b"made\n"}
    assert not exists


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../x", "a\x00b"])
def test_paths_outside_the_workspace_are_refused(bad, tmp_path):
    async def main():
        p = LocalSandboxProvider(root=str(tmp_path))
        sb = await p.create()
        try:
            with pytest.raises(SandboxPathError):
                await sb.read_file(bad)
            with pytest.raises(SandboxPathError):
                await sb.write_file(bad, "x")
        finally:
            await sb.close()

    go(main())


def test_missing_file_and_directory_are_path_errors(tmp_path):
    async def main():
        p = LocalSandboxProvider(root=str(tmp_path))
        sb = await p.create({"d/f.txt": "x"})
        try:
            for path, why in (("nope.txt", "no such file"), ("d", "is a directory"), ("d/f.txt/x", "not a directory")):
                with pytest.raises(SandboxPathError, match=why):
                    await sb.read_file(path)
        finally:
            await sb.close()

    go(main())


def test_too_big_a_write_is_refused(tmp_path):
    async def main():
        p = LocalSandboxProvider(SandboxLimits(max_file_bytes=10), root=str(tmp_path))
        sb = await p.create()
        try:
            with pytest.raises(SandboxPathError, match="file size limit"):
                await sb.write_file("a", "x" * 11)
        finally:
            await sb.close()

    go(main())


def test_32_sandboxes_at_once(tmp_path):
    async def one(p, i):
        sb = await p.create({"i.txt": str(i)})
        try:
            r = await sb.exec("sleep 0.2; cat i.txt; echo; id -u")
            return r.stdout.split()
        finally:
            await sb.close()

    async def main():
        p = LocalSandboxProvider(SandboxLimits(timeout_s=30), root=str(tmp_path))
        return await asyncio.gather(*(one(p, i) for i in range(32)))

    outs = go(main())
    assert [o[0] for o in outs] == [str(i) for i in range(32)]
    if probe_mode() == "root":
        assert len({o[1] for o in outs}) == 32  # a uid of its own each
    assert list(tmp_path.iterdir()) == []


def test_closed_sandbox_refuses_commands(tmp_path):
    async def main():
        p = LocalSandboxProvider(root=str(tmp_path))
        sb = await p.create()
        await sb.close()
        with pytest.raises(SandboxError):
            await sb.exec("true")

    go(main())


def test_provider_close_closes_its_sandboxes(tmp_path):
    async def main():
        p = LocalSandboxProvider(root=str(tmp_path))
        await p.create()
        await p.create()
        await p.close()

    go(main())
    assert list(tmp_path.iterdir()) == []


def _walk_reference(root: Path) -> dict[str, bytes]:
    """The obvious snapshot (recursive os.walk, full paths): right for shallow trees only."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = Path(d) / n
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def test_snapshot_walk_equals_the_reference_with_few_descriptors(tmp_path, monkeypatch):
    # A comb (every level has a file and two subdirectories, one a dead end) with the walk held
    # to 3 open directories, so closed ones are reopened from their nearest open ancestor.
    monkeypatch.setattr(trees, "MAX_OPEN_DIRS", 3)

    async def main():
        p = LocalSandboxProvider(SandboxLimits(timeout_s=20), root=str(tmp_path))
        sb = await p.create()
        try:
            await sb.exec("d=.; for i in $(seq 12); do mkdir -p $d/a $d/b/x; echo $i > $d/f$i; "
                          "ln -s /etc/passwd $d/link; d=$d/a; done")
            return await sb.snapshot(), _walk_reference(sb.workspace)
        finally:
            await sb.close()

    snap, reference = go(main())
    assert len(snap) == 12 and snap == reference
    assert snap["a/a/f3"] == b"3\n"


def test_deep_trees_snapshot_and_close(tmp_path):
    depth = 1500

    async def main():
        p = LocalSandboxProvider(SandboxLimits(timeout_s=30), root=str(tmp_path))
        sb = await p.create()
        await sb.exec(f"python -c \"import os\nfor _ in range({depth}): os.mkdir('dd'); os.chdir('dd')\n"
                      f"open('f', 'w').write('x')\"")  # a path of 4,500 bytes: past PATH_MAX
        await sb.write_file("w/" + "d/" * depth + "g", "y")
        snap = await sb.snapshot()
        await sb.close()
        return snap, sb.base.exists()

    snap, exists = go(main())
    assert snap == {"dd/" * depth + "f": b"x", "w/" + "d/" * depth + "g": b"y"}
    assert not exists and list(tmp_path.iterdir()) == []
