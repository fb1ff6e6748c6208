"""Retiring: a replica that moved closes once what it serves is done, or at grace_s, unless
its node takes it back. A unit test: the replica is a test double that counts its closes (the
real engine case is tests/cluster/test_drain.py)."""

from __future__ import annotations

import asyncio

import msgspec

from meshnode.node.deployments import Deployment
from meshnode.node.retiring import LINGER_S, Retiring


def dep(**changes: object) -> Deployment:
    d = Deployment.new(name="m", model="smollm2-135m-instruct", engine="llama.cpp", replicas=1,
                       chat_template=None, context_length=2048, origin="a")
    return msgspec.structs.replace(d, **changes) if changes else d


class FakeReplica:
    def __init__(self, state: str = "ready") -> None:
        self.deployment = dep()
        self.in_flight = 0
        self.state = state
        self.closed = 0

    def outdated(self, d: Deployment | None) -> bool:
        return d is None or d.shape != self.deployment.shape

    async def close(self) -> None:
        self.closed += 1


async def _until(cond: object, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_a_moved_replica_lingers_then_closes_when_its_requests_are_done() -> None:
    retiring, replica = Retiring(grace_s=30), FakeReplica()
    replica.in_flight = 1
    retiring.add(replica)  # type: ignore[arg-type]
    assert retiring.get("m") is replica  # still serves what a late peer sends
    await asyncio.sleep(LINGER_S + 0.3)
    assert not replica.closed and retiring.get("m") is replica
    replica.in_flight = 0
    await _until(lambda: replica.closed, 2)
    assert retiring.get("m") is None and replica.closed == 1
    await retiring.close()
    assert replica.closed == 1  # nothing left to close


async def test_a_request_that_never_ends_is_cut_at_grace() -> None:
    retiring, replica = Retiring(grace_s=0.3), FakeReplica()
    replica.in_flight = 1
    retiring.add(replica)  # type: ignore[arg-type]
    await _until(lambda: replica.closed, 2)
    assert retiring.get("m") is None


async def test_taken_back_it_is_not_closed() -> None:
    retiring, replica = Retiring(grace_s=30), FakeReplica()
    retiring.add(replica)  # type: ignore[arg-type]
    assert retiring.take_back(dep(context_length=4096)) is None  # runs something else now
    assert retiring.take_back(dep(version=7)) is replica  # same shape, newer version
    assert retiring.get("m") is None and retiring.take_back(dep()) is None
    await asyncio.sleep(LINGER_S + 0.3)
    assert not replica.closed
    starting = FakeReplica(state="starting")
    retiring.add(starting)  # type: ignore[arg-type]
    assert retiring.take_back(dep()) is None  # only a ready one comes back
    await retiring.close()


async def test_close_closes_every_retiring_replica_at_once() -> None:
    retiring = Retiring(grace_s=30)
    replicas = [FakeReplica(), FakeReplica()]
    replicas[1].deployment = dep(name="n")
    for r in replicas:
        r.in_flight = 1
        retiring.add(r)  # type: ignore[arg-type]
    async with asyncio.timeout(2):
        await retiring.close()
    assert all(r.closed for r in replicas)
    assert retiring.get("m") is None and retiring.get("n") is None
    await retiring.close()  # twice is safe
