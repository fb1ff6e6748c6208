"""meshnode.mesh: cluster membership by SWIM + Lifeguard gossip (after HashiCorp memberlist).

``Swim`` is the sans-I/O protocol core (fed time and packets, returns packets and events);
``Mesh`` drives it over asyncio UDP + TCP. Other packages import from here only.
"""

from .config import MeshConfig
from .delegate import Delegate, StaticDelegate
from .errors import ConfigError, DecodeError, JoinError, MeshError, MeshStateError
from .events import (
    Event,
    MemberAlive,
    MemberDead,
    MemberIndirect,
    MemberJoined,
    MemberLeft,
    MemberLoad,
    MemberSuspected,
    MemberUpdated,
)
from .members import Member, MemberState
from .swim import Output, Swim
from .transport import Mesh, MeshState, PacketSealer, PeerCheck, PlainSealer
from .wire import PROTOCOL_VERSION, Addr

__all__ = [
    "PROTOCOL_VERSION",
    "Addr",
    "ConfigError",
    "DecodeError",
    "Delegate",
    "Event",
    "JoinError",
    "Member",
    "MemberAlive",
    "MemberDead",
    "MemberIndirect",
    "MemberJoined",
    "MemberLeft",
    "MemberLoad",
    "MemberState",
    "MemberSuspected",
    "MemberUpdated",
    "Mesh",
    "MeshConfig",
    "MeshError",
    "MeshState",
    "MeshStateError",
    "Output",
    "PacketSealer",
    "PeerCheck",
    "PlainSealer",
    "StaticDelegate",
    "Swim",
]
