"""Membership events, returned by the core in ``Output.events`` (never for the local node).

    MemberJoined     a member is new to us (or came back after leaving)
    MemberUpdated    an alive member changed its meta, name or address
    MemberSuspected  a member missed its probes and may have failed
    MemberAlive      a suspected member refuted (recovered=False), or a member declared dead
                     came back (recovered=True: treat it like a join)
    MemberDead       a member failed (suspicion timed out somewhere in the cluster)
    MemberIndirect   a member did not answer this node's ping but answered through another
                     member's (ping-req): alive, but the direct path from here may be cut
    MemberLeft       a member left gracefully
    MemberLoad       a member's load payload changed
"""

from __future__ import annotations

import msgspec

from .members import Member

__all__ = [
    "Event", "MemberAlive", "MemberDead", "MemberIndirect", "MemberJoined", "MemberLeft",
    "MemberLoad", "MemberSuspected", "MemberUpdated",
]


class Event(msgspec.Struct, frozen=True):
    member: Member


class MemberJoined(Event, frozen=True):
    pass


class MemberUpdated(Event, frozen=True):
    pass


class MemberSuspected(Event, frozen=True):
    pass


class MemberAlive(Event, frozen=True):
    recovered: bool = False


class MemberDead(Event, frozen=True):
    pass


class MemberIndirect(Event, frozen=True):
    pass


class MemberLeft(Event, frozen=True):
    pass


class MemberLoad(Event, frozen=True):
    pass
