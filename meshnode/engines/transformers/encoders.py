"""Embeddings and rerank with transformers, reproducing sentence-transformers without it.

A sentence-transformers folder lists its pipeline in modules.json:

    Transformer (the folder, or 0_Transformer/ in old saves; max_seq_length and do_lower_case
                 in its sentence_bert_config.json)
    -> Pooling  (1_Pooling/config.json: cls | max | mean | mean_sqrt_len_tokens | weightedmean |
                 lasttoken, concatenated in that order when several are set)
    -> Dense    (optional: linear layer + activation, weights in model.safetensors)
    -> Normalize (optional: L2)

A folder without modules.json is read as sentence-transformers reads one: Transformer + mean
pooling. A folder whose model is `*ForSequenceClassification` with one label is a cross-encoder
and serves rerank only: score = activation(logit), sigmoid unless its config names another,
as sentence-transformers' CrossEncoder.predict does.

Inputs longer than the model's max_seq_length are refused (400), never truncated silently.
Token-id inputs are the text's tokens without special tokens; the model's own ([CLS] ... [SEP])
are added, so ids and their text give the same vector.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EngineFailed, InvalidRequest

__all__ = ["BATCH_SIZE", "CrossEncoder", "SentenceEncoder", "is_cross_encoder"]

BATCH_SIZE = 32
"""Inputs per forward pass (sentence-transformers' default): inputs are sorted by length so a
batch pads little; larger batches pad more and gain little on CPU."""

_POOLING_ORDER = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean",
                   "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean",
                   "pooling_mode_lasttoken": "lasttoken"}
_ACTIVATIONS = {"Identity", "Tanh", "Sigmoid", "ReLU", "GELU"}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise EngineFailed(f"cannot read {path}: {exc}") from exc


def is_cross_encoder(folder: Path) -> bool:
    config = _json(folder / "config.json")
    return (not (folder / "modules.json").is_file()
            and any(a.endswith("ForSequenceClassification") for a in config.get("architectures", []))
            and len(config.get("id2label", {"0": ""})) == 1)


def _activation(torch: Any, name: str | None, default: str) -> Any:
    short = (name or default).rsplit(".", 1)[-1]
    if short not in _ACTIVATIONS:
        raise EngineFailed(f"unsupported activation function {name!r}")
    return getattr(torch.nn, short)()


class _Tokens:
    """Tokenize without truncation, add the special tokens, check lengths, pad batches."""

    def __init__(self, torch: Any, tokenizer: Any, max_length: int, lower: bool) -> None:
        self._torch = torch
        self._tok = tokenizer
        self.max_length = max_length
        self._lower = lower
        self.vocab = len(tokenizer)
        probe = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
        at = next((i for i in range(len(full)) if full[i:i + len(probe)] == probe), 0)
        self._prefix, self._suffix = full[:at], full[at + len(probe):]
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._left = tokenizer.padding_side == "left"
        self._types = "token_type_ids" in tokenizer.model_input_names

    def ids(self, inputs: list[str | list[int]], param: str) -> list[list[int]]:
        texts = [x.lower() if self._lower else x for x in inputs if isinstance(x, str)]
        encoded = iter(self._tok(texts, add_special_tokens=False)["input_ids"] if texts else [])
        out = []
        for i, item in enumerate(inputs):
            if isinstance(item, list):
                if any(t < 0 or t >= self.vocab for t in item):
                    raise InvalidRequest(f"token ids must be in [0, {self.vocab})", param=param)
                body = item
            else:
                body = next(encoded)
            ids = [*self._prefix, *body, *self._suffix]
            if len(ids) > self.max_length:
                where = f"{param}[{i}]" if len(inputs) > 1 else param
                raise InvalidRequest(f"{where} is {len(ids)} tokens; this model takes at most "
                                     f"{self.max_length}", param=param)
            out.append(ids)
        return out

    def batch(self, rows: list[list[int]], types: list[list[int]] | None = None) -> dict[str, Any]:
        torch = self._torch
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        type_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            span = slice(width - len(row), width) if self._left else slice(0, len(row))
            ids[r, span] = torch.tensor(row)
            mask[r, span] = 1
            if types is not None:
                type_ids[r, span] = torch.tensor(types[r])
        features = {"input_ids": ids, "attention_mask": mask}
        if self._types:
            features["token_type_ids"] = type_ids
        return features


def _batches(lengths: list[int]) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + BATCH_SIZE] for i in range(0, len(order), BATCH_SIZE)]


class SentenceEncoder:
    def __init__(self, torch: Any, transformers: Any, folder: Path) -> None:
        self._torch = torch
        modules = _json(folder / "modules.json") or [
            {"path": "", "type": "Transformer"}, {"path": "1_Pooling", "type": "Pooling"}]
        kinds = [(m["type"].rsplit(".", 1)[-1], folder / m.get("path", "")) for m in modules]
        if not kinds or kinds[0][0] != "Transformer":
            raise EngineFailed(f"{folder}: the first sentence-transformers module must be a "
                               f"Transformer, not {kinds[0][0] if kinds else 'nothing'}")
        base = kinds[0][1]  # the folder itself, or 0_Transformer/ in older saves
        st = _json(base / "sentence_bert_config.json")
        self.model = transformers.AutoModel.from_pretrained(str(base)).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
        max_length = st.get("max_seq_length") or min(
            tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", 512))
        self.tokens = _Tokens(torch, tokenizer, int(max_length), bool(st.get("do_lower_case")))
        self._steps = [self._module(kind, path) for kind, path in kinds[1:]]
        self.context_length = self.tokens.max_length

    def _module(self, kind: str, path: Path) -> Any:
        torch = self._torch
        if kind == "Pooling":
            config = _json(path / "config.json")
            mode = config.get("pooling_mode") or [
                m for k, m in _LEGACY_POOLING.items() if config.get(k)] or ["mean"]
            modes = [mode] if isinstance(mode, str) else list(mode)
            if unknown := set(modes) - set(_POOLING_ORDER):
                raise EngineFailed(f"unsupported pooling mode(s) {sorted(unknown)} in {path}")
            return lambda h, mask: torch.cat([_pool(torch, m, h, mask) for m in modes], dim=-1)
        if kind == "Normalize":
            return lambda x, mask: torch.nn.functional.normalize(x, p=2, dim=1)
        if kind == "Dense":
            config = _json(path / "config.json")
            weights = path / "model.safetensors"
            if not weights.is_file():
                raise EngineFailed(f"{path}: Dense weights must be in model.safetensors")
            from safetensors.torch import load_file
            state = load_file(str(weights))
            linear = torch.nn.Linear(config["in_features"], config["out_features"],
                                     bias=config.get("bias", True))
            linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
            act = _activation(torch, config.get("activation_function"), "Tanh")
            return lambda x, mask: act(linear(x))
        raise EngineFailed(f"unsupported sentence-transformers module {kind!r} in {path}")

    def encode(self, inputs: list[str | list[int]], param: str) -> tuple[list[list[float]], int]:
        """One vector per input, in order, and the tokens used (special tokens included)."""
        torch = self._torch
        rows = self.tokens.ids(inputs, param)
        vectors: list[list[float]] = [[] for _ in rows]
        with torch.inference_mode():
            for batch in _batches([len(r) for r in rows]):
                features = self.tokens.batch([rows[i] for i in batch])
                hidden = self.model(**features).last_hidden_state
                mask = features["attention_mask"]
                for step in self._steps:
                    hidden = step(hidden, mask)
                for i, v in zip(batch, hidden.float().tolist()):
                    vectors[i] = v
        return vectors, sum(map(len, rows))


def _pool(torch: Any, mode: str, h: Any, mask: Any) -> Any:
    """sentence-transformers' Pooling over token embeddings h [B, T, D] with mask [B, T]."""
    m = mask.unsqueeze(-1).to(h.dtype)
    if mode == "cls":
        first = mask.to(torch.int).argmax(dim=1)
        return h[torch.arange(h.shape[0]), first]
    if mode == "max":
        return h.masked_fill(m == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        total = (h * m).sum(dim=1)
        count = torch.clamp(m.sum(dim=1), min=1e-9)
        return total / (count if mode == "mean" else torch.sqrt(count))
    if mode == "weightedmean":
        weights = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        weights = weights - mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
        wm = m * weights
        return (h * wm).sum(dim=1) / torch.clamp(wm.sum(dim=1), min=1e-9)
    # lasttoken: the last attended position, whichever side the padding is on
    values, flipped = mask.flip(1).max(1)
    last = torch.where(values == 0, h.shape[1] - 1, h.shape[1] - 1 - flipped)
    return (h * m)[torch.arange(h.shape[0]), last]


class CrossEncoder:
    """Scores (query, document) pairs with a sequence-classification model (one label)."""

    def __init__(self, torch: Any, transformers: Any, folder: Path) -> None:
        self._torch = torch
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(folder)).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        config = self.model.config
        max_length = min(tokenizer.model_max_length,
                         getattr(config, "max_position_embeddings", 512))
        self.tokens = _Tokens(torch, tokenizer, int(max_length), False)
        st = getattr(config, "sentence_transformers", None) or {}
        name = st.get("activation_fn") or getattr(config, "sbert_ce_default_activation_function",
                                                  None)
        self._activation = _activation(torch, name, "Sigmoid")
        self._tokenizer = tokenizer
        self.context_length = self.tokens.max_length

    def scores(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        torch = self._torch
        tok = self._tokenizer
        encoded = tok([query] * len(documents), documents)
        rows = encoded["input_ids"]
        types = encoded.get("token_type_ids") or [[0] * len(r) for r in rows]
        for i, row in enumerate(rows):
            if len(row) > self.tokens.max_length:
                raise InvalidRequest(
                    f"query + documents[{i}] are {len(row)} tokens; this model takes at most "
                    f"{self.tokens.max_length}", param="documents")
        scores = [0.0] * len(rows)
        with torch.inference_mode():
            for batch in _batches([len(r) for r in rows]):
                features = self.tokens.batch([rows[i] for i in batch], [types[i] for i in batch])
                logits = self.model(**features).logits[:, 0]
                for i, s in zip(batch, self._activation(logits).float().tolist()):
                    scores[i] = s
        return scores, sum(map(len, rows))
