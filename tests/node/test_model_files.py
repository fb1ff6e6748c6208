"""A model file given by path: this node's answer for a peer, and the lookup on peers.

The peers here are small aiohttp servers that answer the route as a node does (found, 404,
broken); tests/cluster/test_path_model.py runs the whole launch on real nodes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from conftest import write_gguf

from meshnode.node import INTERNAL_MODEL_FILE_PATH, InvalidDeployment, ModelNotFound
from meshnode.node.model_files import find_spec_anywhere, local_file_spec, peer_file_spec


def test_local_file_spec_reads_the_file_and_refuses_other_paths(tmp_path: Path) -> None:
    chat = write_gguf(tmp_path / "tiny.gguf", **{"general.architecture": "llama"})
    embed = write_gguf(tmp_path / "enc.gguf", **{"general.architecture": "bert"})
    assert local_file_spec(str(chat)).abilities == ("chat", "completion")
    assert local_file_spec(str(embed)).abilities == ("embed", "rerank")
    assert local_file_spec(str(chat)).source.file == str(chat)
    with pytest.raises(ModelNotFound, match="not found"):
        local_file_spec(str(tmp_path / "missing.gguf"))
    for bad in ("tiny.gguf", "models/tiny.gguf", str(tmp_path / "notes.txt"), "/etc/passwd"):
        with pytest.raises(InvalidDeployment, match="absolute path of a .gguf"):
            local_file_spec(bad)


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """Four fake peers: two with the file (answering different abilities), one without, one
    that breaks; name -> base URL."""
    runners = []
    urls = {}
    specs = {
        "b": local_file_spec(str(write_gguf(tmp_path / "b.gguf",
                                            **{"general.architecture": "bert"}))),
        "c": local_file_spec(str(write_gguf(tmp_path / "c.gguf",
                                            **{"general.architecture": "llama"}))),
    }
    asked: list[str] = []

    for name in ("b", "c", "d", "e"):
        async def handler(request: web.Request, name: str = name) -> web.Response:
            asked.append(f"{name}:{request.query['path']}")
            if name == "e":
                return web.Response(status=500, text="broken")
            if name == "d":
                return web.json_response({"error": {"message": "not found"}}, status=404)
            return web.Response(body=msgspec.json.encode(specs[name]),
                                content_type="application/json")

        app = web.Application()
        app.router.add_get(INTERNAL_MODEL_FILE_PATH, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        urls[name] = f"http://127.0.0.1:{runner.addresses[0][1]}"
    urls["asked"] = asked  # type: ignore[assignment]
    try:
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_the_first_peer_in_name_order_that_has_the_file_answers(
        peers: dict[str, str]) -> None:
    everyone = [(n, peers[n], f"id-{n}") for n in ("e", "d", "c", "b")]
    spec = await peer_file_spec("/models/x.gguf", everyone)
    assert spec.abilities == ("embed", "rerank")  # b's, though c answered too
    assert sorted(peers["asked"]) == [f"{n}:/models/x.gguf" for n in "bcde"]  # all at once
    assert (await peer_file_spec("/models/x.gguf", everyone[:3])).abilities == (
        "chat", "completion")  # c's


async def test_no_peer_has_the_file(peers: dict[str, str]) -> None:
    with pytest.raises(ModelNotFound) as err:
        await peer_file_spec("/models/x.gguf", [(n, peers[n], n) for n in ("e", "d")])
    assert str(err.value) == ("model file not found: /models/x.gguf is not on this node nor "
                              "on d, e (e did not answer): copy it to a node, or check the path")
    with pytest.raises(ModelNotFound, match="no other node is alive to ask"):
        await peer_file_spec("/models/x.gguf", [])
    with pytest.raises(ModelNotFound, match="f did not answer"):  # nothing listens there
        await peer_file_spec("/models/x.gguf", [("f", "http://127.0.0.1:9", "f")],
                             timeout_s=2.0)


async def test_find_spec_anywhere_asks_peers_only_for_a_missing_path(
        peers: dict[str, str], tmp_path: Path) -> None:
    everyone = [(n, peers[n], n) for n in ("b", "c")]
    assert (await find_spec_anywhere("smollm2-135m-instruct", everyone)).family == "smollm2"
    here = write_gguf(tmp_path / "here.gguf", **{"general.architecture": "llama"})
    assert (await find_spec_anywhere(str(here), everyone)).source.file == str(here)
    assert peers["asked"] == []
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        await find_spec_anywhere("nope", everyone)
    with pytest.raises(InvalidDeployment, match="give the file's absolute path"):
        await find_spec_anywhere("models/x.gguf", everyone)
    assert peers["asked"] == []
    assert (await find_spec_anywhere("/elsewhere/x.gguf", everyone)).abilities == (
        "embed", "rerank")
