"""Which engine runs a model on this node: the choice for a launch, and the table of
GET /v1/engines (each engine, whether it could run the model here, and why not)."""

from __future__ import annotations

from collections.abc import Iterable

from meshnode.engines import EngineOption, EngineUnsupported, Hardware, choose_engine

from .catalogue import ModelSpec
from .errors import InvalidDeployment

__all__ = ["choose", "options"]


def choose(spec: ModelSpec, forced: str | None, engines: list[EngineOption],
           hardware: Hardware, elsewhere: Iterable[str] = ()) -> EngineOption:
    """The engine for `spec` (`forced` if it can run it): one this node has, else one that
    another live node gossips (`elsewhere`: their engines), so a model can be launched from
    any node, a laptop included, for the GPU box that has vLLM; the preference order is this
    node's. InvalidDeployment saying why when no node has one."""
    try:
        return choose_engine(spec.formats, spec.abilities, forced, engines, hardware)
    except EngineUnsupported as exc:
        others = [EngineOption(engine=e, available=True) for e in sorted(set(elsewhere))]
        try:
            return choose_engine(spec.formats, spec.abilities, forced, others, hardware)
        except EngineUnsupported as remote:
            if forced and forced in {o.engine for o in others}:
                why = str(remote)  # another node has it, and it cannot run this model
            elif forced:
                why = f"{exc}; no other live node has {forced!r} either"
            else:
                why = f"{exc}; no other live node has one that can" if others else str(exc)
        raise InvalidDeployment(f"cannot run {spec.name!r}: {why}", param="engine") from None


def options(spec: ModelSpec, engines: list[EngineOption], hardware: Hardware,
            node: str) -> list[dict[str, object]]:
    """One row per engine: engine, available, reason, default (the automatic choice), node."""
    rows: list[dict[str, object]] = []
    for option in engines:
        try:
            choose_engine(spec.formats, spec.abilities, option.engine, engines, hardware)
            rows.append({"engine": option.engine, "available": True, "reason": ""})
        except EngineUnsupported as exc:
            rows.append({"engine": option.engine, "available": False, "reason": str(exc)})
    try:
        best = choose(spec, None, engines, hardware).engine
    except InvalidDeployment:
        best = None
    for row in rows:
        row["default"] = row["engine"] == best
        row["node"] = node
    return rows
