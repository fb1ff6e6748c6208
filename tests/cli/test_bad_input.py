"""Bad flags through the real command: a clear one-line error and exit 1, never a traceback.
`launch --chat-template FILE` with a file it cannot use fails before any request (the
endpoint here answers nothing); `start` with a model or a setting it cannot use fails
before serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NodeProcess, get_json

NOWHERE = "http://127.0.0.1:9"  # discard port: a request sent there would fail differently


@pytest.mark.parametrize(("content", "why"), [
    (None, "No such file or directory"),
    (b"\xff\xfe\x00bad", "not UTF-8 text"),
    (b"  \n", "is empty"),
])
def test_an_unusable_template_file_is_refused_by_name(tmp_path: Path, content: bytes | None,
                                                      why: str) -> None:
    path = tmp_path / "template.jinja"
    if content is not None:
        path.write_bytes(content)
    run = subprocess.run([sys.executable, "-m", "meshnode", "launch", "gemma-3-270m",
                          "--chat-template", str(path), "--endpoint", NOWHERE],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1, run
    assert run.stderr.startswith("meshnode: ") and str(path) in run.stderr, run.stderr
    assert why in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize(("flags", "says"), [
    (["--model", "/nonexistent/model.gguf"], "cannot start the node: model file not found"),
    (["--model", "no-such-model"], "cannot start the node: unknown model 'no-such-model'"),
    (["--join", "seed:http"], "invalid --join 'seed:http'"),
    (["--name", "bad name"], "invalid node name 'bad name'"),
])
def test_start_refuses_what_it_cannot_use(tmp_path: Path, flags: list[str], says: str) -> None:
    run = subprocess.run([sys.executable, "-m", "meshnode", "start", "--http-port", "0",
                          "--gossip-port", "0", "--no-mdns", "--data-dir", str(tmp_path),
                          *flags], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1, run
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("meshnode: ") and says in last, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def meshnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshnode", *args], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize("endpoint", ["notaurl", "http://127.0.0.1:99999", "ftp://host"])
def test_an_endpoint_that_is_not_a_node_url_is_refused(endpoint: str) -> None:
    run = meshnode("ps", "--endpoint", endpoint)
    assert run.returncode == 1, run
    assert run.stderr.startswith(f"meshnode: invalid endpoint '{endpoint}'"), run.stderr
    assert "Traceback" not in run.stderr


def test_an_endpoint_that_answers_no_json_is_named() -> None:
    import http.server
    import threading

    class Html(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>a web server, not a node</html>")

        def log_message(self, *args: object) -> None:
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Html) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            run = meshnode("ps", "--endpoint", url)
        finally:
            server.shutdown()
    assert run.returncode == 1, run
    assert "not JSON: is it a meshnode node?" in run.stderr and url in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(("content", "mode", "says"), [
    (b"junk", 0o600, "not a PEM private key"),
    (None, 0o644, "run `chmod 600"),
])
def test_start_names_a_node_key_it_cannot_use(tmp_path: Path, content: bytes | None, mode: int,
                                              says: str) -> None:
    key = tmp_path / "node_key.pem"
    if content is None:  # a real key, left readable by others
        from meshnode.mesh.identity import NodeIdentity
        NodeIdentity.load_or_create(tmp_path)
    else:
        key.write_bytes(content)
    key.chmod(mode)
    before = key.read_bytes()
    run = meshnode("start", "--http-port", "0", "--gossip-port", "0", "--no-mdns",
                   "--data-dir", str(tmp_path))
    assert run.returncode == 1, run
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("meshnode: node key in ") and says in last, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert key.read_bytes() == before  # never replaced


def test_a_user_key_for_no_model_is_refused_not_made_a_key_for_all(tmp_path: Path) -> None:
    run = meshnode("keys", "create", "--role", "user", "--models", ",,", "--data-dir",
                   str(tmp_path))
    assert run.returncode == 1, run
    assert "models names no deployment" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "api_keys.json").exists()
    run = meshnode("keys", "create", "--role", "user", "--models", "chat-a", "--data-dir",
                   str(tmp_path))
    assert run.returncode == 0 and "models: chat-a" in run.stdout, run


@pytest.mark.e2e
@pytest.mark.parametrize(("args", "says"), [
    (["gemma-3-270m", "--context-length", "40000"],
     "context_length 40000 is more than gemma-3-270m's context window of 32768 tokens"),
    (["smollm2-135m-instruct", "--", "--max-num-seqs", "2"],
     "the llama.cpp engine runs inside meshnode and takes none"),
])
def test_launch_options_reach_the_node_and_its_refusal_is_printed(
        node: NodeProcess, args: list[str], says: str) -> None:
    """--context-length and the engine arguments after -- are sent; the node's 400 is the
    command's one-line error, and nothing is launched."""
    before = get_json(node.url + "/v1/deployments")["data"]
    run = meshnode("launch", "--name", "refused", "--endpoint", node.url, *args)
    assert run.returncode == 1, run
    assert run.stderr.startswith("meshnode: ") and says in run.stderr, run.stderr
    assert get_json(node.url + "/v1/deployments")["data"] == before
