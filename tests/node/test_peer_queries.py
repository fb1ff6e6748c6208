"""Questions to every live peer at once: where a model file is, which engines could run a
model; and this node's answer to the first.

The peers here are small aiohttp servers that answer the routes as a node does (found, 404,
broken, silent); tests/cluster/test_path_model.py asks real nodes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from conftest import write_gguf

from meshnode.node import (INTERNAL_ENGINES_PATH, INTERNAL_MODEL_FILE_PATH, InvalidDeployment,
                           ModelNotFound)
from meshnode.node.peer_queries import (Answer, ask_peers, engine_rows, find_spec_anywhere,
                                        local_file_spec)


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
    for bad in ("/m/a\x00.gguf", "~no-such-user-zz/x.gguf", "/" + "a" * 5000 + ".gguf"):
        with pytest.raises(InvalidDeployment, match="invalid model path"):
            local_file_spec(bad)


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    """Peers b..f: b and c have the file (answering different abilities), b answers engine
    rows and c garbage; d has neither (404); e breaks (500); f answers too late. "asked"
    lists what they were asked."""
    specs = {
        "b": local_file_spec(str(write_gguf(tmp_path / "b.gguf",
                                            **{"general.architecture": "bert"}))),
        "c": local_file_spec(str(write_gguf(tmp_path / "c.gguf",
                                            **{"general.architecture": "llama"}))),
    }
    asked: list[str] = []
    runners, urls = [], {}

    async def handler(request: web.Request, name: str) -> web.Response:
        asked.append(f"{name}:{request.path}:{request.query_string}")
        if name == "e":
            return web.Response(status=500, text="broken")
        if name == "g":  # too much
            return web.Response(body=b"x" * (2 << 20), content_type="application/json")
        if name == "f":
            await asyncio.sleep(1.5)
        if name in ("d", "f"):
            return web.json_response({"error": {"message": f"model file not found on {name}"}},
                                     status=404)
        if request.path == INTERNAL_ENGINES_PATH:
            rows = [{"engine": "llama.cpp", "available": True, "reason": "", "default": True,
                     "node": "forged"}]
            return web.json_response({"object": "list", "data": rows if name == "b" else "x"})
        return web.Response(body=msgspec.json.encode(specs[name]),
                            content_type="application/json")

    for name in "bcdefg":
        app = web.Application()
        for path in (INTERNAL_MODEL_FILE_PATH, INTERNAL_ENGINES_PATH):
            app.router.add_get(path, functools.partial(handler, name=name))
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        urls[name] = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield {"urls": urls, "asked": asked}
    finally:
        for runner in runners:
            await runner.cleanup()


def asker(peers: dict[str, object], names: str, timeout_s: float = 0.5):  # noqa: ANN201
    urls: dict[str, str] = peers["urls"]  # type: ignore[assignment]
    contacts = [(n, urls[n], f"id-{n}") for n in reversed(names)]  # any order in, name order out
    return functools.partial(ask_peers, contacts, timeout_s=timeout_s)


async def test_ask_peers_asks_everyone_at_once_and_names_who_did_not_answer(
        peers: dict[str, object]) -> None:
    answers = await asker(peers, "bdefg")(INTERNAL_MODEL_FILE_PATH, {"path": "/m/x.gguf"})
    assert [a.node for a in answers] == ["b", "d", "e", "f", "g"]
    assert [a.status for a in answers] == [200, 404, 0, 0, 0]  # 500, too late, too big
    assert "over 1048576 bytes" in str(answers[4].error)
    assert b'"abilities":["embed","rerank"]' in answers[0].body
    assert answers[2].error is not None and answers[3].error is not None
    assert sorted(peers["asked"]) == [  # type: ignore[arg-type]
        f"{n}:{INTERNAL_MODEL_FILE_PATH}:path=/m/x.gguf" for n in "bdefg"]


async def test_the_first_peer_in_name_order_that_has_the_file_answers(
        peers: dict[str, object]) -> None:
    assert (await find_spec_anywhere("/m/x.gguf", asker(peers, "edcb"))).abilities == (
        "embed", "rerank")  # b's, though c has it too
    assert (await find_spec_anywhere("/m/x.gguf", asker(peers, "edc"))).abilities == (
        "chat", "completion")  # c's


async def test_no_peer_has_the_file(peers: dict[str, object]) -> None:
    with pytest.raises(ModelNotFound) as err:
        await find_spec_anywhere("/m/x.gguf", asker(peers, "def"))
    assert str(err.value) == ("model file not found: /m/x.gguf is not on this node nor on d, "
                              "e, f (e, f did not answer): copy it to a node, or check the path")

    async def nobody(path: str, params: dict[str, str]) -> list[Answer]:
        return []
    with pytest.raises(ModelNotFound, match="no other node is alive to ask"):
        await find_spec_anywhere("/m/x.gguf", nobody)


async def test_only_a_missing_absolute_gguf_path_is_looked_up_on_peers(
        peers: dict[str, object], tmp_path: Path) -> None:
    ask = asker(peers, "bc")
    assert (await find_spec_anywhere("smollm2-135m-instruct", ask)).family == "smollm2"
    here = write_gguf(tmp_path / "here.gguf", **{"general.architecture": "llama"})
    assert (await find_spec_anywhere(str(here), ask)).source.file == str(here)
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        await find_spec_anywhere("nope", ask)
    for relative in ("models/x.gguf", "x.gguf"):
        with pytest.raises(InvalidDeployment, match="give the file's absolute path"):
            await find_spec_anywhere(relative, ask)
    assert peers["asked"] == []


async def test_engine_rows_gather_every_peer_and_say_why_one_has_none(
        peers: dict[str, object]) -> None:
    rows = await engine_rows("/m/x.gguf", asker(peers, "bcdef"))
    assert [(r["node"], r["engine"], r["available"]) for r in rows] == [
        ("b", "llama.cpp", True),  # named by who answered, not by what it says
        ("c", "", False), ("d", "", False), ("e", "", False), ("f", "", False)]
    assert rows[1]["reason"].startswith("answered what is not a list of engines: ")
    assert rows[2]["reason"] == "model file not found on d"
    assert rows[3]["reason"].startswith("did not answer: ")
