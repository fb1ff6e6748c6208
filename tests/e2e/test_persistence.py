"""A node that restarts alone comes back with its deployments (saved in its data dir)."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import pytest
from conftest import NodeProcess, get_json, needs_llama

pytestmark = [pytest.mark.e2e, needs_llama]
CHAT = "smollm2-135m-instruct"


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_deployments_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "node"
    node = NodeProcess(data, "--name", "solo", "--no-mdns", "--model", CHAT)
    try:
        post(node.url + "/v1/deployments", {"model": CHAT, "name": "second"})
        node.wait_ready(CHAT, "second", timeout_s=300)
        stopped = post(node.url + "/v1/deployments", {"model": CHAT, "name": "third"})
        assert stopped["name"] == "third"
        req = urllib.request.Request(node.url + "/v1/deployments/third", method="DELETE")
        urllib.request.urlopen(req, timeout=60).read()
    finally:
        assert node.stop(signal.SIGTERM) == 0
    assert json.loads((data / "deployments.json").read_bytes())  # saved
    # Same data dir, same --model: no "already exists"; both come back, the stopped one not.
    node = NodeProcess(data, "--name", "solo", "--no-mdns", "--model", CHAT)
    try:
        names = {d["name"] for d in get_json(node.url + "/v1/deployments")["data"]}
        assert names == {CHAT, "second"}
        node.wait_ready(CHAT, "second", timeout_s=300)
        reply = post(node.url + "/v1/chat/completions", {
            "model": "second", "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert reply["choices"][0]["message"]["content"]
    finally:
        node.stop(signal.SIGKILL)
