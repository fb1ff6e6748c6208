"""The public face of meshnode.mesh, and its import boundary."""

from __future__ import annotations

import ast
from pathlib import Path

from meshnode import mesh

MINE = {
    "Addr", "ConfigError", "DecodeError", "Delegate", "Event", "JoinError", "Member",
    "MemberAlive", "MemberDead", "MemberIndirect", "MemberJoined", "MemberLeft", "MemberLoad",
    "MemberState", "MemberSuspected", "MemberUpdated", "Mesh", "MeshConfig", "MeshError",
    "MeshState", "MeshStateError", "Output", "PacketSealer", "PeerCheck", "PlainSealer",
    "PROTOCOL_VERSION", "StaticDelegate", "Swim",
}


def test_exports() -> None:
    assert MINE <= set(mesh.__all__)
    for name in mesh.__all__:
        assert getattr(mesh, name) is not None


def test_errors_share_one_root() -> None:
    for name in ("ConfigError", "DecodeError", "JoinError", "MeshStateError"):
        assert issubclass(getattr(mesh, name), mesh.MeshError)


def test_mesh_imports_nothing_else_from_meshnode() -> None:
    for path in Path(mesh.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                    and node.module.startswith("meshnode")):
                assert node.module.startswith("meshnode.mesh"), (path.name, node.module)


def test_core_has_no_io_or_clock() -> None:
    core = ("swim", "probe", "state", "members", "suspicion", "awareness", "broadcast",
            "timers", "wire", "config", "events", "delegate")
    for name in core:
        source = (Path(mesh.__file__).parent / f"{name}.py").read_text()
        tree = ast.parse(source)
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert not imported & {"asyncio", "socket", "time", "threading", "ssl"}, name
