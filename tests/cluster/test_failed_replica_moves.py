"""A replica that fails on its node moves to the next node by itself (real nodes, real model).

Node b cannot start engines (its engine start timeout is 50 ms, so every start "never became
ready"). The deployment's name is chosen so that rendezvous hashing puts its one replica on b
first: b's replica fails, b gossips it as failed, and the next node in rendezvous order loads
it. Requests to any node then succeed, and b keeps its failed record (with the reason) instead
of retrying forever, until the deployment changes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import NodeProcess, get_json, needs_llama, wait_for
from test_routing import call, chat_body, three_nodes

from meshnode.mesh.hashing import rendezvous_top

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, needs_llama]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    with three_nodes(tmp_path_factory.mktemp("failover"),  # b cannot start an engine in time
                     env={"b": {"MESHNODE_ENGINE_START_TIMEOUT_S": "0.05"}}) as out:
        yield out


def test_failed_replica_moves_to_the_next_node(nodes: dict[str, NodeProcess]) -> None:
    ids = {m["name"]: m["node_id"] for m in get_json(nodes["a"].url + "/v1/cluster/nodes")["data"]}
    # Same machine, same RAM: equal weights, so the order is the ids' rendezvous order.
    weights = {node_id: 1.0 for node_id in ids.values()}
    name = next(f"smol-{i}" for i in range(1000)
                if rendezvous_top(f"smol-{i}", weights, 1) == [ids["b"]])
    status, _, body = call(nodes["a"].url + "/v1/deployments", "POST",
                           {"model": "smollm2-135m-instruct", "name": name})
    assert status in (200, 201), body

    def placed() -> dict[str, str]:
        view = get_json(nodes["c"].url + f"/v1/deployments/{name}")
        return {p["node"]: p["state"] for p in view["placed"]}

    settled = wait_for(lambda: (p := placed()).get("b") == "failed"
                       and "ready" in p.values() and p, 180, "moved off b")
    holder = next(n for n, s in settled.items() if s == "ready")
    assert holder in ("a", "c")
    for n in nodes.values():
        wait_for(lambda n=n: any(p["node"] == holder and p["state"] == "ready" for p in
                                 get_json(n.url + f"/v1/deployments/{name}")["placed"]),
                 10, "every node sees the new holder ready")
    for n in nodes.values():
        status, headers, body = call(n.url + "/v1/chat/completions", "POST",
                                     {**chat_body("Hi"), "model": name})
        assert status == 200, body
        assert headers["X-Served-By"] == holder
    view = get_json(nodes["b"].url + f"/v1/deployments/{name}")
    failed = next(p for p in view["placed"] if p["node"] == "b")
    assert "ready" in failed["reason"]  # why it failed there ("never became ready ...")
    # Still settled a moment later: b does not take it back, no second replica appears.
    wait_for(lambda: placed() == settled, 5, "stable")
    assert sorted(placed().values()) == ["failed", "ready"]
    # A change of the deployment (here a scale from c) lets b try again: its record goes,
    # its new try fails the same way, and the second replica goes to the third node.
    since = failed["since"]
    status, _, body = call(nodes["c"].url + f"/v1/deployments/{name}", "PATCH", {"replicas": 2})
    assert status == 200, body
    wait_for(lambda: any(p["node"] == "b" and p["state"] == "failed" and p["since"] > since
                         for p in get_json(nodes["b"].url + f"/v1/deployments/{name}")["placed"]),
             60, "b tried again")
    wait_for(lambda: placed() == {"a": "ready", "b": "failed", "c": "ready"}, 120,
             "two replicas, on a and c")
