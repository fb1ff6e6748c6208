"""Launch anywhere, route from anywhere: three real nodes on loopback serving real SmolLM2.

One module-scoped cluster; the tests run in file order and each leaves it settled for the
next: launch + routing, stop from another node, kill -9 of the holder (the replica moves) and
the restart of that node (it learns the table), then two replicas (prefix affinity and the
bounded-load rule), then three prefixes on a deployment of three replicas (the assignment).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from conftest import NodeProcess, get_json, needs_llama, wait_for

CHAT = "smollm2-135m-instruct"
pytestmark = [pytest.mark.cluster, pytest.mark.e2e, needs_llama]



def call(url: str, method: str = "GET", body: dict | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def chat_body(prompt: str = "Hi", stream: bool = False, system: str = "Be brief.") -> dict:
    return {"model": CHAT, "max_tokens": 2, "temperature": 0, "stream": stream,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": prompt}]}


def ready_nodes(node: NodeProcess, name: str = CHAT) -> list[str]:
    view = get_json(node.url + f"/v1/deployments/{name}")
    return sorted(p["node"] for p in view["placed"] if p["state"] == "ready")


def all_replicas(nodes: list[NodeProcess], name: str = CHAT) -> list[tuple[str, str]]:
    """(node, state) of every replica of `name` as each node gossips its own."""
    out = []
    for n in nodes:
        for m in get_json(n.url + "/v1/cluster/nodes")["data"]:
            if m["local"]:
                out += [(m["name"], s.split("(")[1].rstrip(")")) for s in m["models"]
                        if s.split("(")[0] == name]
    return sorted(out)


def alive(node: NodeProcess) -> set[str]:
    return {m["name"] for m in get_json(node.url + "/v1/cluster/nodes")["data"]
            if m["state"] == "alive"}


@contextlib.contextmanager
def three_nodes(tmp: Path, *args: str, env: dict[str, dict[str, str]] | None = None
                ) -> Iterator[dict[str, NodeProcess]]:
    """Nodes a, b and c on loopback (local mesh preset, no mDNS; b and c join a), each
    started with `args` and its `env` entry, all alive in every view; killed on exit."""
    out: dict[str, NodeProcess] = {}
    try:
        for name in "abc":
            seed = ("--join", out["a"].gossip) if out else ()
            out[name] = NodeProcess(tmp / name, "--name", name, "--mesh-preset", "local",
                                    "--no-mdns", *args, *seed, env=(env or {}).get(name))
        for n in out.values():
            wait_for(lambda n=n: alive(n) == {"a", "b", "c"}, 20, "joined")
        yield out
    finally:
        for n in out.values():
            n.stop(signal.SIGKILL)


def one_replica(nodes: dict[str, NodeProcess], name: str) -> tuple[str, NodeProcess]:
    """Launch SmolLM2 as `name` (one replica) from node a; (its holder, another node that
    sees it ready there)."""
    status, _, body = call(nodes["a"].url + "/v1/deployments", "POST",
                           {"model": "smollm2-135m-instruct", "name": name})
    assert status == 201, body
    holder = wait_for(lambda: ready_nodes(nodes["a"], name), 120, "ready")[0]
    entry = nodes[next(n for n in nodes if n != holder)]
    wait_for(lambda: ready_nodes(entry, name) == [holder], 10, "entry sees the holder")
    return holder, entry


def state_of(node: NodeProcess, name: str) -> str:
    return next(m["state"] for m in get_json(node.url + "/v1/cluster/nodes")["data"]
                if m["name"] == name)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    with three_nodes(tmp_path_factory.mktemp("routing")) as nodes:
        yield nodes


def test_launch_on_one_node_route_from_every_node(mesh: dict[str, NodeProcess]) -> None:
    status, _, body = call(mesh["a"].url + "/v1/deployments", "POST",
                           {"model": CHAT, "replicas": 1})
    assert status == 201, body
    for n in mesh.values():
        n.wait_ready(CHAT, timeout_s=120)
    holders = {name: ready_nodes(n) for name, n in mesh.items()}
    holder = holders["a"][0]
    assert all(h == [holder] for h in holders.values()), holders
    for name, n in mesh.items():
        models = get_json(n.url + "/v1/models")["data"]
        assert [(m["id"], m["meshnode"]["ready_replicas"]) for m in models] == [(CHAT, 1)]
        status, headers, body = call(n.url + "/v1/chat/completions", "POST", chat_body())
        assert status == 200, body
        assert headers["X-Served-By"] == holder
        assert json.loads(body)["choices"][0]["message"]["content"] is not None
        status, headers, body = call(n.url + "/v1/chat/completions", "POST",
                                     chat_body(stream=True))
        assert status == 200 and headers["X-Served-By"] == holder
        assert headers["Content-Type"].startswith("text/event-stream")
        assert body.rstrip().endswith(b"data: [DONE]")
        client = openai.OpenAI(base_url=n.url + "/v1", api_key="unused", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, max_tokens=2, messages=[{"role": "user", "content": f"Hello {name}"}])
        assert raw.headers["x-served-by"] == holder
        assert raw.parse().choices[0].message.role == "assistant"
    unknown = call(mesh["c"].url + "/v1/chat/completions", "POST",
                   {**chat_body(), "model": "nope"})
    assert unknown[0] == 404


def test_stop_from_another_node_is_gone_everywhere(mesh: dict[str, NodeProcess]) -> None:
    status, _, body = call(mesh["a"].url + "/v1/deployments", "POST",
                           {"model": CHAT, "name": "scratch"})
    assert status == 201, body
    wait_for(lambda: get_json(mesh["c"].url + "/v1/deployments/scratch"), 10, "c sees it")
    status, _, body = call(mesh["c"].url + "/v1/deployments/scratch", "DELETE")
    assert status == 200 and json.loads(body)["status"] == "stopped"
    for n in mesh.values():
        wait_for(lambda n=n: [d["name"] for d in get_json(n.url + "/v1/deployments")["data"]]
                 == [CHAT], 10, "scratch gone")
    wait_for(lambda: all_replicas(list(mesh.values()), "scratch") == [], 30,
             "scratch's replica unloaded")
    assert call(mesh["b"].url + "/v1/deployments/scratch")[0] == 404


def test_killed_holder_moves_and_restarted_node_learns(mesh: dict[str, NodeProcess],
                                                      tmp_path_factory: pytest.TempPathFactory
                                                      ) -> None:
    holder = ready_nodes(mesh["a"])[0]
    mesh[holder].stop(signal.SIGKILL)
    survivors = {k: v for k, v in mesh.items() if k != holder}
    for n in survivors.values():
        wait_for(lambda n=n: state_of(n, holder) == "dead", 20, f"{holder} declared dead")
    new_holder = wait_for(lambda: ready_nodes(next(iter(survivors.values()))), 120,
                          "the replica moved")
    assert new_holder[0] in survivors
    for n in survivors.values():
        wait_for(lambda n=n: ready_nodes(n) == new_holder, 10, "both see the new holder")
        status, headers, body = call(n.url + "/v1/chat/completions", "POST", chat_body())
        assert status == 200, body
        assert headers["X-Served-By"] == new_holder[0]
    assert all_replicas(list(survivors.values())) == [(new_holder[0], "ready")]
    # The killed node restarts (same data dir, new process): it learns the table from a peer.
    old = mesh[holder]
    seed = survivors[new_holder[0]].gossip
    mesh[holder] = NodeProcess(old.data_dir, "--name", holder, "--mesh-preset", "local",
                               "--join", seed)
    wait_for(lambda: [d["name"] for d in get_json(mesh[holder].url + "/v1/deployments")["data"]]
             == [CHAT], 20, "restarted node learned the deployments")
    for n in mesh.values():
        wait_for(lambda n=n: alive(n) == {"a", "b", "c"}, 20, "rejoined")
    # Placement is deterministic: it gets its replica back, and then there is exactly one.
    wait_for(lambda: all_replicas(list(mesh.values())) == [(holder, "ready")], 120,
             "settled on one replica")
    status, headers, _ = call(mesh[new_holder[0]].url + "/v1/chat/completions", "POST",
                              chat_body())
    assert status == 200 and headers["X-Served-By"] == holder


async def test_two_replicas_prefix_affinity_and_bounded_load(
        mesh: dict[str, NodeProcess]) -> None:
    status, _, body = call(mesh["b"].url + f"/v1/deployments/{CHAT}", "PATCH", {"replicas": 2})
    assert status == 200, body
    two = wait_for(lambda: len(ready_nodes(mesh["a"])) == 2 and ready_nodes(mesh["a"]), 120,
                   "two replicas ready")
    for n in mesh.values():
        wait_for(lambda n=n: ready_nodes(n) == two, 10, "every node sees both")
    spare = next(name for name in mesh if name not in two)
    async with aiohttp.ClientSession() as session:
        async def served_by(node: str, body: dict) -> str:
            async with session.post(mesh[node].url + "/v1/chat/completions",
                                    json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
                return resp.headers["X-Served-By"]

        # Same prefix (system + first user message), later turns differ: same replica from
        # every node.
        body = chat_body("Tell me about cats.")
        longer = {**body, "messages": [*body["messages"],
                                       {"role": "assistant", "content": "Cats."},
                                       {"role": "user", "content": "More."}]}
        firsts = {await served_by(n, b) for n in mesh for b in (body, longer)}
        assert len(firsts) == 1
        # Different prefixes spread over both replicas.
        spread = Counter([await served_by(spare, chat_body(f"Question {i}?"))
                          for i in range(8)])
        assert set(spread) == set(two), spread
        # One prompt under several prompt_cache_keys (OpenAI's routing hint, one per user
        # here): each key is its own prefix group, so the keys spread over both replicas.
        keyed = chat_body("One prompt for many users.")
        spread = Counter([await served_by(spare, {**keyed, "prompt_cache_key": f"user-{i}"})
                          for i in range(8)])
        assert set(spread) == set(two), spread
        # 16 at once with one prefix: nobody above ceil(1.25 x the mean).
        hot = chat_body("The same question, sixteen times.")
        got = Counter(await asyncio.gather(*(served_by(spare, {**hot, "max_tokens": 1})
                                             for _ in range(16))))
        assert sum(got.values()) == 16
        assert max(got.values()) <= math.ceil(1.25 * 16 / 2), got


async def test_a_full_holder_refuses_at_the_cap_and_the_entry_moves_on(
        mesh: dict[str, NodeProcess]) -> None:
    """Only a replica knows its own in-flight count exactly: the entering node forwards to
    the prefix's owner with its load cap (X-Meshnode-Hop: 1; cap=N), the owner answers 503
    replica_busy before any byte when it already holds N, and the entering node tries the
    next replica. The last try carries no cap. A refused request moves no prefix.

    On a deployment of its own (two replicas pinned to two nodes) whose only prefix is this
    test's: on a shared one the balanced assignment may move the prefix for the others'
    sake (prefixes.py), which would hide whether the owner refused."""
    name = "admission"
    two = ready_nodes(mesh["a"])
    spare = next(n for n in mesh if n not in two)
    status, _, body = call(mesh[spare].url + "/v1/deployments", "POST",
                           {"model": CHAT, "name": name, "replicas": 2, "nodes": two})
    assert status == 201, body
    for n in mesh.values():
        wait_for(lambda n=n: ready_nodes(n, name) == two, 120, "both replicas ready")
    # SmolLM2 continues this count until max_tokens (1500 tokens: some 15 s).
    count = {"model": name, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 2,
             "temperature": 0}
    async with aiohttp.ClientSession() as session:
        async def post(node: str, body: dict, hop: str | None = None
                       ) -> tuple[int, dict, str]:
            headers = {"X-Meshnode-Hop": hop} if hop is not None else {}
            async with session.post(mesh[node].url + "/v1/completions", json=body,
                                    headers=headers) as resp:
                return resp.status, await resp.json(), resp.headers.get("X-Served-By", "")

        status, _, holder = await post(spare, count)
        assert status == 200
        other = next(n for n in two if n != holder)
        # Two long streams served by the holder itself (the hop header): it holds 2. The
        # second one's head comes only once the first is done (one sequence at a time).
        long = {**count, "stream": True, "max_tokens": 1500}
        streams = [asyncio.create_task(session.post(
            mesh[holder].url + "/v1/completions", json=long, headers={"X-Meshnode-Hop": "1"}))
            for _ in range(2)]

        async def holds(n: int, seen_from: str | None = None) -> None:
            """Until the holder holds n (its own count, refreshed each probe) and, seen from
            node `seen_from`, the replicas' gossiped loads are n and 0: the cap it sizes from
            them is then exact, whatever earlier tests left in its view."""
            want = {holder: n} if seen_from is None else {holder: n, other: 0}
            async with asyncio.timeout(20):
                while True:
                    async with session.get(mesh[seen_from or holder].url
                                           + "/v1/cluster/nodes") as resp:
                        data = (await resp.json())["data"]
                    if all(m["load"] == want[m["name"]] for m in data if m["name"] in want):
                        return
                    await asyncio.sleep(0.05)

        try:
            await holds(2)
            await holds(2, seen_from=spare)
            status, body, _ = await post(holder, count, "1; cap=2")
            assert status == 503 and body["error"]["code"] == "replica_busy", body
            assert "cap of 2" in body["error"]["message"]
            status, body, _ = await post(holder, count, "1; cap=two")
            assert status == 400 and "X-Meshnode-Hop" in body["error"]["message"]
            # From the spare: cap max(ceil(1.25 * 3 / 2), 2) = 2, so the holder refuses and
            # the other replica serves it, with no added error.
            status, body, served = await post(spare, count)
            assert status == 200 and served == other, body
            assert body["choices"][0]["text"]
        finally:
            for task in streams:
                task.cancel()  # the client goes away: the holder stops generating
                with contextlib.suppress(asyncio.CancelledError):
                    (await task).close()
        await holds(0)
        assert (await post(spare, count))[2] == holder  # the spill moved no prefix
        status, _, served = await post(holder, count, "1; cap=1")
        assert status == 200 and served == holder  # under its cap: served
    assert call(mesh["a"].url + f"/v1/deployments/{name}", "DELETE")[0] == 200
    wait_for(lambda: all_replicas(list(mesh.values()), name) == [], 30, "unloaded")


async def test_three_prefixes_settle_on_three_replicas_seen_alike_from_every_node(
        mesh: dict[str, NodeProcess]) -> None:
    """Three system prompts whose first requests enter at three nodes at once (each node
    then chooses alone, maybe the same replica): once the replicas' prefix ledgers are
    gossiped, each prompt has its own replica and every node sends it there."""
    name = "affinity3"
    status, _, body = call(mesh["c"].url + "/v1/deployments", "POST",
                           {"model": CHAT, "name": name, "replicas": 3})
    assert status == 201, body
    for n in mesh.values():
        wait_for(lambda n=n: len(ready_nodes(n, name)) == 3, 180, "three replicas ready")
    systems = [f"You are assistant number {i}. Answer in one word." for i in range(3)]
    async with aiohttp.ClientSession() as session:
        async def served_by(node: str, system: str) -> str:
            req = {**chat_body("Hello?", system=system), "model": name, "max_tokens": 1}
            async with session.post(mesh[node].url + "/v1/chat/completions",
                                    json=req) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
                return resp.headers["X-Served-By"]

        async def mapping() -> list[set[str]]:
            return [{await served_by(n, s) for n in mesh} for s in systems]

        await asyncio.gather(*(served_by(n, s) for n, s in zip(mesh, systems, strict=True)))
        seen: list[set[str]] = []
        async with asyncio.timeout(30):
            while True:
                seen = await mapping()
                if all(len(s) == 1 for s in seen) and len(set().union(*seen)) == 3:
                    break
        assert await mapping() == seen == await mapping(), "the assignment stays put"
    status, _, body = call(mesh["a"].url + f"/v1/deployments/{name}", "DELETE")
    assert status == 200, body


def test_constraints_pin_a_deployment_or_say_why_it_has_no_node(
        mesh: dict[str, NodeProcess], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Launched from a with `nodes: [c]`: the replica runs on c alone, whatever the hash
    says, and a PATCH from b moves the pin to a; launched with a label no node carries:
    unplaced, saying which rule left no node, until a node started with that label joins; a
    bad constraint is a 400 that changes nothing."""
    status, _, body = call(mesh["a"].url + "/v1/deployments", "POST",
                           {"model": CHAT, "name": "pinned", "replicas": 2, "nodes": ["c"]})
    assert status == 201, body
    assert json.loads(body)["nodes"] == ["c"]
    for n in mesh.values():
        wait_for(lambda n=n: ready_nodes(n, "pinned") == ["c"], 120, "pinned to c")
    assert all_replicas(list(mesh.values()), "pinned") == [("c", "ready")]
    view = get_json(mesh["b"].url + "/v1/deployments/pinned")
    assert view["status"] == "partial" and "only 1 node(s) can hold it" in view["message"]
    status, headers, _ = call(mesh["a"].url + "/v1/chat/completions", "POST",
                              {**chat_body(), "model": "pinned"})
    assert status == 200 and headers["X-Served-By"] == "c"
    # PATCH from another node moves the pin; c unloads once a has its replica ready.
    for bad in ({}, {"model": "other"}, {"nodes": [""]}, {"replicas": 0}):
        status, _, body = call(mesh["b"].url + "/v1/deployments/pinned", "PATCH", bad)
        assert status == 400, (bad, body)
        if "model" in bad:
            assert b"stop the deployment and launch it again" in body, body
    assert get_json(mesh["a"].url + "/v1/deployments/pinned")["nodes"] == ["c"]
    status, _, body = call(mesh["b"].url + "/v1/deployments/pinned", "PATCH",
                           {"nodes": ["a"], "replicas": 1})
    assert status == 200, body
    assert json.loads(body)["nodes"] == ["a"] and json.loads(body)["replicas"] == 1
    for n in mesh.values():
        wait_for(lambda n=n: ready_nodes(n, "pinned") == ["a"], 120, "pin moved to a")
    wait_for(lambda: all_replicas(list(mesh.values()), "pinned") == [("a", "ready")], 60,
             "c unloaded its replica")
    status, _, body = call(mesh["c"].url + "/v1/deployments/pinned", "PATCH", {"nodes": []})
    assert status == 200 and json.loads(body)["nodes"] == [], body

    status, _, body = call(mesh["b"].url + "/v1/deployments", "POST",
                           {"model": CHAT, "name": "on-gpu", "labels": ["gpu"]})
    assert status == 201, body
    for n in mesh.values():
        view = wait_for(lambda n=n: get_json(n.url + "/v1/deployments/on-gpu"), 10, "seen")
        assert view["status"] == "unplaced", view
        assert "every label of gpu" in view["message"] and "--label" in view["message"]
    before = [d["name"] for d in get_json(mesh["a"].url + "/v1/deployments")["data"]]
    for bad in ({"labels": ["no spaces"]}, {"nodes": [""]}, {"min_ram_mb": -1},
                {"constraints": {"min_ram_mb": 1 << 40}}):  # unknown: refused, not dropped
        status, _, body = call(mesh["a"].url + "/v1/deployments", "POST",
                               {"model": CHAT, "name": "bad", **bad})
        assert status == 400, body
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error"
        if "constraints" in bad:
            assert error["param"] == "constraints", error
            assert "min_ram_mb" in error["message"], error  # says what a launch takes
    assert [d["name"] for d in get_json(mesh["c"].url + "/v1/deployments")["data"]] == before
    # A node started with the label joins: the deployment goes there by itself.
    gpu = NodeProcess(tmp_path_factory.mktemp("labelled") / "g", "--name", "g",
                      "--mesh-preset", "local", "--label", "gpu", "--label", "zone=1",
                      "--join", mesh["a"].gossip)
    try:
        for n in mesh.values():
            wait_for(lambda n=n: ready_nodes(n, "on-gpu") == ["g"], 120, "placed on g")
        members = get_json(mesh["a"].url + "/v1/cluster/nodes")["data"]
        assert next(m["labels"] for m in members if m["name"] == "g") == ["gpu", "zone=1"]
        assert all(m["ram_mb"] > 0 and m["gpu_mb"] == [] for m in members)  # no GPU here
        status, headers, _ = call(mesh["b"].url + "/v1/chat/completions", "POST",
                                  {**chat_body(), "model": "on-gpu"})
        assert status == 200 and headers["X-Served-By"] == "g"
    finally:
        gpu.stop(signal.SIGKILL)
    for name in ("pinned", "on-gpu"):
        assert call(mesh["c"].url + f"/v1/deployments/{name}", "DELETE")[0] == 200
    wait_for(lambda: all_replicas(list(mesh.values()), "pinned") == [], 30, "unloaded")
