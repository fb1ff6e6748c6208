"""Moving a replica loses no request (real nodes, real SmolLM2).

Stopping a node moves its replicas first: on SIGTERM the holder gossips that it is stopping,
placement loads the replica on another node while the holder keeps serving, and the holder
exits once the new replica is ready. Requests sent through another node all the while are
answered: none gets the 503 of a model with no ready replica.

A replica that moves (here: re-pinned to another node) takes no new request once its new
holder is ready, and closes only after the requests it is serving are done: a stream it was
serving runs to its end; pinned back meanwhile, its node takes it back without a reload.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import (NodeProcess, counting_stream, get_json, needs_llama, pid_alive,
                      wait_for)
from test_routing import call, one_replica, ready_nodes, three_nodes

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, needs_llama]

NAME = "moving"


@pytest.fixture
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    with three_nodes(tmp_path_factory.mktemp("drain"), "--drain", "60", "--grace", "30") as out:
        yield out


@contextmanager
def requests_through(entry: NodeProcess) -> Iterator[list[tuple[int, str, float]]]:
    """One 1-token request after another through `entry` while the block runs (once the
    first is answered): (status, serving node, seconds) of each."""
    answers: list[tuple[int, str, float]] = []
    done = threading.Event()

    def send() -> None:
        while not done.is_set():
            started = time.monotonic()
            status, headers, _ = call(entry.url + "/v1/completions", "POST",
                                      {"model": NAME, "prompt": "Hi", "max_tokens": 1})
            answers.append((status, headers.get("X-Served-By", ""),
                            time.monotonic() - started))

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_for(lambda: answers, 30, "a first answer")
        yield answers
    finally:
        done.set()
        sender.join(60)


def handed_on(answers: list[tuple[int, str, float]], old: str) -> str:
    """Every request was answered, first by `old`, then by one other node: that node."""
    assert [a[0] for a in answers] == [200] * len(answers), answers
    served = [a[1] for a in answers]
    new = served[-1]
    assert served[0] == old and new != old and set(served) == {old, new}, served
    return new


def test_moving_a_replica_loses_no_request(nodes: dict[str, NodeProcess]) -> None:
    holder, entry = one_replica(nodes, NAME)

    # 1. SIGTERM the holder: it serves until the replica is ready elsewhere, then exits.
    engine = nodes[holder].engine_pids()[NAME]
    with requests_through(entry) as answers:
        stopping = nodes[holder].proc
        stopping.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: next(m for m in get_json(entry.url + "/v1/cluster/nodes")["data"]
                              if m["name"] == holder)["draining"], 10, "seen stopping")
        stopping.wait(90)
        exited = time.monotonic() - signalled
        count = len(answers)
        wait_for(lambda: len(answers) > count + 5, 30, "answers after the exit")
    new = handed_on(answers, holder)
    assert stopping.returncode == 0 and not pid_alive(engine)  # its moved engine closed too
    print(f"drain: {holder} exited {exited:.1f} s after SIGTERM; {len(answers)} requests, "
          f"slowest {max(a[2] for a in answers):.2f} s; served by {holder} then {new}")
    assert ready_nodes(entry, NAME) == [new]
    out = stopping.stdout.read().decode() if stopping.stdout else ""
    assert f"stopping: serving {NAME} until ready on other nodes" in out, out
    log = nodes[holder].log_path.read_text()
    drained = [json.loads(line) for line in log.splitlines() if '"node.drained"' in line]
    assert drained and drained[0]["left"] == [], drained

    # 2. Re-pin it to the last node while the current holder streams an answer, and 3. pin
    # it back while the stream still runs: the node takes its replica back, engine and all.
    # The stream ends normally ([DONE]): a moved replica is not closed under it.
    last = next(n for n in "abc" if n not in (holder, new))
    entry = nodes[last]
    engine = nodes[new].engine_pids()[NAME]
    with counting_stream(entry.url, NAME, max_tokens=1500) as (s, seen):
        for pin in (last, new):
            status, _, body = call(entry.url + f"/v1/deployments/{NAME}", "PATCH",
                                   {"nodes": [pin]})
            assert status == 200, body
            wait_for(lambda pin=pin: ready_nodes(entry, NAME) == [pin], 60, f"moved to {pin}")
        while chunk := s.recv(65536):
            seen += chunk
    events = [line[6:] for line in seen.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", events[-3:]
    assert nodes[new].engine_pids()[NAME] == engine
    assert '"replica.reclaimed"' in nodes[new].log_path.read_text()
    status, headers, _ = call(entry.url + "/v1/completions", "POST",
                              {"model": NAME, "prompt": "Hi", "max_tokens": 1})
    assert (status, headers["X-Served-By"]) == (200, new)
