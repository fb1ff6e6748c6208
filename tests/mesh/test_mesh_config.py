"""MeshConfig: memberlist's defaults, presets, validation, and the scaling formulas."""

from __future__ import annotations

import dataclasses
import math

import pytest

from meshnode.mesh import ConfigError, MeshConfig
from meshnode.mesh.config import push_pull_scale, retransmit_limit, suspicion_timeout


def test_lan_defaults_are_memberlists() -> None:
    cfg = MeshConfig.lan()
    assert cfg == MeshConfig()
    assert (cfg.probe_interval_s, cfg.probe_timeout_s, cfg.indirect_checks) == (1.0, 0.5, 3)
    assert (cfg.suspicion_mult, cfg.suspicion_max_timeout_mult) == (4, 6)
    assert (cfg.gossip_interval_s, cfg.gossip_nodes, cfg.retransmit_mult) == (0.2, 3, 4)
    assert (cfg.push_pull_interval_s, cfg.gossip_to_the_dead_s) == (30.0, 30.0)
    assert (cfg.awareness_max_multiplier, cfg.udp_buffer) == (8, 1400)


def test_local_preset_is_faster_and_overridable() -> None:
    cfg = MeshConfig.local(gossip_nodes=4)
    assert cfg.probe_interval_s < MeshConfig.lan().probe_interval_s
    assert cfg.gossip_nodes == 4


def test_frozen() -> None:
    cfg = MeshConfig.lan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.probe_interval_s = 2.0  # type: ignore[misc]


def test_every_field_is_documented() -> None:
    import inspect

    import meshnode.mesh.config as module

    source = inspect.getsource(module.MeshConfig)
    for f in dataclasses.fields(MeshConfig):
        after = source.split(f"    {f.name}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), f"{f.name} has no docstring"


@pytest.mark.parametrize("bad", [
    {"probe_timeout_s": 1.0},
    {"probe_interval_s": 0},
    {"gossip_nodes": 0},
    {"udp_buffer": 100},
    {"meta_max_bytes": 5000},
    {"udp_buffer": 1000, "meta_max_bytes": 1024},
    {"reap_after_s": 1.0},
    {"push_pull_interval_s": -1},
])
def test_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        MeshConfig.lan(**bad)


def test_formulas() -> None:
    # min suspicion = mult * max(1, log10 n) * interval
    assert suspicion_timeout(4, 1, 1.0) == 4.0
    assert suspicion_timeout(4, 10, 1.0) == 4.0
    assert suspicion_timeout(4, 1000, 1.0) == pytest.approx(12.0)
    # retransmits = mult * ceil(log10(n + 1))
    assert [retransmit_limit(4, n) for n in (1, 9, 10, 99, 100, 1000)] == [4, 4, 8, 8, 12, 16]
    # push-pull: flat to 32 nodes, then * (ceil(log2 n - 5) + 1)
    assert push_pull_scale(30, 32) == 30
    assert push_pull_scale(30, 33) == 60
    assert push_pull_scale(30, 64) == 60
    assert push_pull_scale(30, 1000) == 30 * (math.ceil(math.log2(1000) - 5) + 1) == 180
