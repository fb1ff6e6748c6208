"""Rerank with an embedding model: cosine similarity of each document to the query."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["cosine_scores"]


def cosine_scores(query: Sequence[float], documents: Sequence[Sequence[float]]) -> list[float]:
    qn = math.sqrt(sum(x * x for x in query)) or 1.0
    scores = []
    for d in documents:
        dn = math.sqrt(sum(x * x for x in d)) or 1.0
        scores.append(sum(a * b for a, b in zip(query, d)) / (qn * dn))
    return scores
