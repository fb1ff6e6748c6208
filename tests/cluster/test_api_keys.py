"""API keys on real `meshnode start` processes: 401/403 rules, replication, revocation.

Nodes run with `--api-keys required` on loopback (an open cluster that still wants keys), so
these tests do not depend on the signed-cluster start; the first admin key is written into
n0's data dir by `meshnode keys create --data-dir` before the node starts (the bootstrap path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import NodeProcess, needs_llama, wait_for

pytestmark = pytest.mark.cluster


def call(url: str, key: str | None = None, body: object = None,
         method: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def meshnode(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MESHNODE_API_KEY"}
    if key is not None:
        env["MESHNODE_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "meshnode", *args], check=False,
                          capture_output=True,
                          text=True, env=env, timeout=60)


def create_key(*args: str, key: str | None = None) -> tuple[str, str]:
    """(id, key) from `meshnode keys create ...`."""
    out = meshnode("keys", "create", *args, key=key)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return lines[0].split()[3], lines[1]



def assert_invalid_key(status: int, body: dict) -> None:
    assert status == 401, body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"


@pytest.fixture
def pair(tmp_path: Path):
    (tmp_path / "n0").mkdir()
    admin_id, admin = create_key("--role", "admin", "--name", "root", "--data-dir",
                                 str(tmp_path / "n0"))
    nodes: list[NodeProcess] = []
    try:
        nodes.append(NodeProcess(tmp_path / "n0", "--name", "n0", "--mesh-preset", "local",
                                 "--api-keys", "required"))
        nodes.append(NodeProcess(tmp_path / "n1", "--name", "n1", "--mesh-preset", "local",
                                 "--api-keys", "required", "--join", nodes[0].gossip))
        yield nodes, admin_id, admin
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)


def test_keys_401_403_replication_and_revocation(pair) -> None:
    (n0, n1), admin_id, admin = pair
    # /health stays open; everything else wants a key.
    assert call(n0.url + "/health")[0] == 200
    assert_invalid_key(*call(n0.url + "/v1/models"))
    assert_invalid_key(*call(n0.url + "/v1/models", key="not-a-key"))
    wrong = admin[:-1] + ("B" if admin.endswith("A") else "A")
    assert_invalid_key(*call(n0.url + "/v1/models", key=wrong))  # right id, wrong secret
    assert call(n0.url + "/v1/models", key=admin)[0] == 200
    # The key written into n0's data dir before start replicates to n1 (never the key: a hash).
    start = time.monotonic()
    wait_for(lambda: call(n1.url + "/v1/models", key=admin)[0] == 200, 20,
             "admin key replicated to n1")
    print(f"key replication took {time.monotonic() - start:.2f}s")
    assert admin.split("_", 2)[2] not in (tmp_path_of(n1) / "api_keys.json").read_text()

    user_id, user = create_key("--role", "user", "--models", "allowed-model", "--endpoint",
                               n1.url, key=admin)
    wait_for(lambda: call(n0.url + "/v1/models", key=user)[0] == 200, 20,
             "user key made on n1 replicated to n0")
    for node in (n0, n1):
        status, body = call(node.url + "/v1/deployments", key=user)
        assert status == 403 and body["error"]["type"] == "permission_error", body
        status, body = call(node.url + "/v1/keys", key=user)
        assert status == 403, body
        status, body = call(node.url + "/v1/chat/completions", key=user,
                            body={"model": "other-model", "messages": []})
        assert status == 403 and body["error"]["param"] == "model", body
        # An allowed model passes auth (and then is simply not deployed: 404).
        status, body = call(node.url + "/v1/chat/completions", key=user,
                            body={"model": "allowed-model",
                                  "messages": [{"role": "user", "content": "hi"}]})
        assert status == 404 and body["error"]["code"] == "model_not_found", body

    # keys list: a table with both keys, never a secret.
    out = meshnode("keys", "list", "--endpoint", n0.url, key=admin)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0].split() == ["ID", "NAME", "ROLE", "MODELS", "CREATED",
                                                 "EXPIRES", "STATE"]
    assert admin_id in out.stdout and user_id in out.stdout and "mnk_" not in out.stdout
    # Bad input changes nothing: an admin key with a model list is refused.
    out = meshnode("keys", "create", "--role", "admin", "--models", "x", "--endpoint", n0.url,
                   key=admin)
    assert out.returncode == 1 and "admin key may use every model" in out.stderr
    assert len(call(n0.url + "/v1/keys", key=admin)[1]["data"]) == 2

    # Revoked on n0 -> refused on every node once replicated.
    out = meshnode("keys", "revoke", user_id, "--endpoint", n0.url, key=admin)
    assert out.returncode == 0, out.stderr
    assert_invalid_key(*call(n0.url + "/v1/models", key=user))
    start = time.monotonic()
    wait_for(lambda: call(n1.url + "/v1/models", key=user)[0] == 401, 20,
             "revocation replicated to n1")
    print(f"revocation replication took {time.monotonic() - start:.2f}s")
    states = {k["id"]: k["state"] for k in call(n1.url + "/v1/keys", key=admin)[1]["data"]}
    assert states == {admin_id: "active", user_id: "revoked"}


def test_expired_key_is_refused(pair) -> None:
    (n0, n1), _, admin = pair
    _, short = create_key("--role", "user", "--expires", "2s", "--endpoint", n0.url, key=admin)
    assert call(n0.url + "/v1/models", key=short)[0] == 200
    wait_for(lambda: call(n0.url + "/v1/models", key=short)[0] == 401, 10, "key expired")
    assert_invalid_key(*call(n1.url + "/v1/models", key=short))


def test_cli_written_key_reaches_a_running_node(pair) -> None:
    """`keys create --data-dir` next to a running node: it reloads the file and replicates."""
    (n0, n1), _, _ = pair
    late_id, late = create_key("--role", "admin", "--data-dir", str(tmp_path_of(n1)))
    for node in (n1, n0):
        wait_for(lambda node=node: call(node.url + "/v1/keys", key=late)[0] == 200, 20,
                 f"late key accepted by {node.url}")
    out = meshnode("keys", "revoke", late_id, "--data-dir", str(tmp_path_of(n0)))
    assert out.returncode == 0, out.stderr
    for node in (n0, n1):
        wait_for(lambda node=node: call(node.url + "/v1/keys", key=late)[0] == 401, 20,
                 f"late key refused by {node.url}")


def test_openai_client_with_a_key(pair) -> None:
    import openai
    (_, n1), _, admin = pair
    wait_for(lambda: call(n1.url + "/v1/models", key=admin)[0] == 200, 20, "replicated")
    with openai.OpenAI(base_url=n1.url + "/v1", api_key=admin, max_retries=0) as client:
        assert client.models.list().data == []
    with openai.OpenAI(base_url=n1.url + "/v1", api_key="mnk_bad", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as err:
            client.models.list()
        assert err.value.code == "invalid_api_key"


@needs_llama
def test_openai_chat_with_a_user_key(tmp_path: Path) -> None:
    """Real weights through a real socket: a user key allowed this model can chat with it."""
    import openai
    data = tmp_path / "n"
    data.mkdir()
    _, admin = create_key("--role", "admin", "--data-dir", str(data))
    node = NodeProcess(data, "--api-keys", "required", "--model", "smollm2-135m-instruct",
                       "--no-mdns")
    try:
        wait_for(lambda: call(node.url + "/v1/deployments/smollm2-135m-instruct",
                              key=admin)[1].get("status") == "ready", 120, "model ready")
        _, user = create_key("--role", "user", "--models", "smollm2-135m-instruct",
                             "--endpoint", node.url, key=admin)
        with openai.OpenAI(base_url=node.url + "/v1", api_key=user, max_retries=0) as client:
            reply = client.chat.completions.create(
                model="smollm2-135m-instruct", max_tokens=8,
                messages=[{"role": "user", "content": "Say hello."}])
            assert reply.choices[0].message.content
            with pytest.raises(openai.PermissionDeniedError):
                client.models.with_raw_response.retrieve("gemma-3-270m")
        # A key limited to other models does not even see this one listed.
        _, other = create_key("--role", "user", "--models", "gemma-3-270m", "--endpoint",
                              node.url, key=admin)
        assert [m["id"] for m in call(node.url + "/v1/models", key=admin)[1]["data"]] == \
            ["smollm2-135m-instruct"]
        assert call(node.url + "/v1/models", key=other)[1]["data"] == []
    finally:
        node.stop()


def tmp_path_of(node: NodeProcess) -> Path:
    return node.data_dir
