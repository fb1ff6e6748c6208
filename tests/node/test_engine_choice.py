"""Launching from any node: the engine is chosen from this node's, else from what the other
live nodes gossip, so a laptop can launch vLLM for the GPU box."""

from __future__ import annotations

import pytest

from meshnode.engines import EngineOption, Hardware
from meshnode.node import InvalidDeployment, find_spec
from meshnode.node.engine_choice import choose

LAPTOP = Hardware(cpus=8, ram_mb=16000)
HERE = [EngineOption(engine="llama.cpp", available=True),
        EngineOption(engine="vllm", available=False, reason="package 'vllm' is not installed"),
        EngineOption(engine="sglang", available=False, reason="needs a CUDA GPU")]
SMOL = find_spec("smollm2-135m-instruct")  # GGUF: llama.cpp here, vLLM converts it


def test_this_nodes_engines_come_first() -> None:
    assert choose(SMOL, None, HERE, LAPTOP, {"vllm"}).engine == "llama.cpp"
    assert choose(SMOL, "llama.cpp", HERE, LAPTOP, {"vllm"}).engine == "llama.cpp"


def test_a_forced_engine_only_another_node_has_is_accepted() -> None:
    assert choose(SMOL, "vllm", HERE, LAPTOP, {"vllm", "llama.cpp"}).engine == "vllm"
    with pytest.raises(InvalidDeployment, match="not installed; no other live node has 'vllm'"):
        choose(SMOL, "vllm", HERE, LAPTOP, {"llama.cpp"})
    with pytest.raises(InvalidDeployment, match="cannot load this model's formats"):
        choose(SMOL, "sglang", HERE, LAPTOP, {"sglang"})  # GGUF: not on any node
    with pytest.raises(InvalidDeployment, match="unknown engine 'tgi'"):
        choose(SMOL, "tgi", HERE, LAPTOP, {"tgi"})


def test_with_no_engine_here_another_nodes_one_is_chosen() -> None:
    none_here = [EngineOption(engine="llama.cpp", available=False, reason="not installed")]
    assert choose(SMOL, None, none_here, LAPTOP, {"vllm"}).engine == "vllm"
    with pytest.raises(InvalidDeployment, match="no other live node has one that can"):
        choose(SMOL, None, none_here, LAPTOP, {"sglang"})
