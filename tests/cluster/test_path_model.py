"""A model given by path, launched from a node that does not have the file (real nodes, real
SmolLM2): the launching node asks its peers, the replica settles on the node that has the
file, and requests entering anywhere reach it.

Two nodes on one machine see one filesystem, so node b runs in its own mount namespace
(`unshare --mount`) where a folder of b's own is bound over MODELS: there b sees the GGUF,
while a sees MODELS empty. Needs root (skips without it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NodeProcess, get_json, needs_llama, wait_for, write_gguf
from test_routing import alive, call, chat_body

from meshnode.mesh.hashing import rendezvous_top
from meshnode.node import CATALOGUE, locate

pytestmark = [
    pytest.mark.cluster, pytest.mark.e2e, needs_llama,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="needs root and unshare (a mount namespace per node)"),
]

BIND = 'mount --bind "$0" "$1" && shift && exec "$@"'


def test_launch_by_path_from_a_node_without_the_file(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp: Path = tmp_path_factory.mktemp("pathmodel")
    models, b_models = tmp / "models", tmp / "b-models"
    models.mkdir()
    b_models.mkdir()
    smol = locate(CATALOGUE["smollm2-135m-instruct"], tmp)
    (b_models / "smol.gguf").symlink_to(smol)
    write_gguf(b_models / "enc.gguf", **{"general.architecture": "bert"})
    nodes: list[NodeProcess] = []
    try:
        a = NodeProcess(tmp / "a", "--name", "a", "--mesh-preset", "local", "--no-mdns")
        nodes.append(a)
        b = NodeProcess(tmp / "b", "--name", "b", "--mesh-preset", "local", "--no-mdns",
                        "--join", a.gossip, wrap=("unshare", "--mount", "--propagation",
                                                  "private", "sh", "-c", BIND,
                                                  str(b_models), str(models)))
        nodes.append(b)
        wait_for(lambda: alive(a) == {"a", "b"}, 20, "joined")
        wait_for(lambda: [m["http"] for m in get_json(a.url + "/v1/cluster/nodes")["data"]
                          if m["name"] == "b"] == [b.url.removeprefix("http://")], 10,
                 "a knows b's port (bound after joining)")
        path = str(models / "smol.gguf")
        assert not os.path.exists(path)  # a's view (and this test's)

        # b answers for its file; bad paths are refused before any file is looked at.
        spec = get_json(b.url + f"/internal/v1/model-file?path={path}")
        assert spec["abilities"] == ["chat", "completion"] and spec["size_mb"] > 50
        for query, code in ((f"path={models}/none.gguf", 404), ("path=smol.gguf", 400),
                            ("path=/etc/passwd", 400), ("path=/m/a%00.gguf", 400),
                            ("", 400)):
            status, _, body = call(b.url + f"/internal/v1/model-file?{query}")
            assert status == code, (query, body)

        # Which engines could run it: a says it has no such file, b answers for its own.
        rows = get_json(a.url + f"/v1/engines?model={path}")["data"]
        assert [(r["node"], r["engine"] or "-") for r in rows][:2] == [("a", "-"),
                                                                        ("b", "llama.cpp")], rows
        assert "model file not found" in rows[0]["reason"], rows
        assert rows[1]["available"] and rows[1]["default"]
        cli = subprocess.run([sys.executable, "-m", "meshnode", "engines", path, "--endpoint",
                              a.url], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        header, *lines = cli.stdout.splitlines()
        assert header.split() == ["NODE", "ENGINE", "CAN", "RUN", "DEFAULT", "WHY", "NOT"]
        assert lines[0].split()[:3] == ["a", "-", "no"] and "model file not found" in lines[0]
        assert any(line.split()[:4] == ["b", "llama.cpp", "yes", "*"] for line in lines)
        unknown = subprocess.run([sys.executable, "-m", "meshnode", "engines", "no-such-model",
                                  "--endpoint", a.url], capture_output=True, text=True,
                                 timeout=60)
        assert unknown.returncode == 1 and "unknown model 'no-such-model'" in unknown.stderr

        # A name whose rendezvous order puts a first: a fails (no file), b takes it over.
        ids = {m["name"]: m["node_id"] for m in get_json(a.url + "/v1/cluster/nodes")["data"]}
        name = next(f"by-path-{i}" for i in range(1000)
                    if rendezvous_top(f"by-path-{i}", {i: 1.0 for i in ids.values()}, 1)
                    == [ids["a"]])
        status, _, body = call(a.url + "/v1/deployments", "POST", {"model": path, "name": name})
        assert status == 201, body
        assert json.loads(body)["model"] == path

        def placed(name: str = name) -> dict[str, tuple[str, str]]:
            view = get_json(a.url + f"/v1/deployments/{name}")
            return {p["node"]: (p["state"], p.get("reason", "")) for p in view["placed"]}

        settled = wait_for(lambda: (p := placed()).get("b", ("",))[0] == "ready" and p,
                           120, "ready on b")
        assert settled["a"][0] == "failed" and "model file not found" in settled["a"][1]
        for entry in (a, b):
            status, headers, body = call(entry.url + "/v1/chat/completions", "POST",
                                         {**chat_body("Name a colour."), "model": name,
                                          "max_tokens": 8})
            assert status == 200, body
            assert headers["X-Served-By"] == "b"
            assert json.loads(body)["choices"][0]["message"]["content"].strip()

        # What a model serves comes with the deployment: a, without the file, lists the
        # encoder's abilities as b read them (its own fallback would say chat), also once
        # its own replica failed (b's fails too: the file is a header without weights).
        status, _, body = call(a.url + "/v1/deployments", "POST",
                               {"model": str(models / "enc.gguf"), "name": "enc"})
        assert status == 201, body
        assert get_json(a.url + "/v1/deployments/enc")["abilities"] == ["embed", "rerank"]
        wait_for(lambda: {n: s for n, (s, _) in placed("enc").items()} == {
            "a": "failed", "b": "failed"}, 60, "enc failed on both")
        assert get_json(a.url + "/v1/deployments/enc")["abilities"] == ["embed", "rerank"]

        # No node has it, or a relative path: refused, nothing written.
        status, _, body = call(a.url + "/v1/deployments", "POST",
                               {"model": str(models / "none.gguf"), "name": "none"})
        assert status == 404, body
        assert b"is not on this node nor on b" in body, body
        status, _, body = call(a.url + "/v1/deployments", "POST",
                               {"model": "models/none.gguf", "name": "none"})
        assert status == 400 and b"absolute path" in body, body
        assert sorted(d["name"] for d in get_json(a.url + "/v1/deployments")["data"]) == \
            sorted([name, "enc"])
    finally:
        for n in reversed(nodes):
            n.stop(signal.SIGTERM)
