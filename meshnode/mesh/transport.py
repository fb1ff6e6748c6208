"""Mesh: the asyncio UDP + TCP transport that drives the Swim core.

    async with Mesh(MeshConfig.lan(), node_id=..., bind=("0.0.0.0", 7701)) as mesh:
        await mesh.join([("10.0.0.2", 7701)])
        async for event in mesh.events(): ...
        await mesh.leave()

One UDP socket and one TCP listener share the gossip port. UDP carries probes and gossip;
TCP carries push-pull exchanges and fallback pings, one request and one reply frame per
connection (4-byte length prefix, capped at stream_max_bytes, stream_timeout_s per exchange).
The core is called only from the event loop thread, so it needs no lock.

Security seams (the crypto lives elsewhere): ``sealer`` wraps every datagram (seal before
send, open after receive; identity by default), ``server_ssl`` / ``client_ssl`` make every TCP
exchange TLS, and ``peer_check`` vets the peer of every TLS connection after the handshake.
``request()`` / ``on_request`` carry an application exchange (the sealer's key exchange) over
the same authenticated TCP path: its frames start with REQUEST_MARK (0xc1, a byte msgpack never
uses, so no Packet starts with it) and never reach the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, Protocol, Self

import structlog

from . import wire
from .binding import bind_pair, is_wildcard, outbound_ip
from .config import MeshConfig
from .delegate import Delegate
from .errors import DecodeError, JoinError, MeshError, MeshStateError
from .events import Event
from .eventstream import EventStream
from .members import Member
from .swim import Output, Swim
from .wire import Addr

__all__ = ["REQUEST_MARK", "Mesh", "MeshState", "PacketSealer", "PeerCheck", "PlainSealer",
           "RequestHandler"]

log = structlog.get_logger("meshnode.mesh")

UDP_RCVBUF = 4 << 20
"""Receive buffer asked for the gossip socket (bytes; the kernel caps it at net.core.rmem_max).
The default (~208 KB) holds ~150 datagrams of kernel overhead: a flood of forged datagrams, or a
busy event loop, would then make the kernel drop genuine probes and acks, which reads as a
failed node. memberlist asks for 2 MB for the same reason."""


class PacketSealer(Protocol):
    """Authenticates datagrams. ``open`` returns None for a datagram to drop (forged,
    replayed, unknown sender); it must be cheap for garbage, as anyone can send it. ``seal``
    returns None when the datagram cannot be sent yet (no key for that peer): the sealer may
    keep it and send it later through ``Mesh.send_sealed``; the mesh counts it otherwise."""

    overhead: int  # bytes seal() adds at most; the core builds packets that much smaller

    def seal(self, data: bytes, addr: Addr) -> bytes | None: ...

    def open(self, data: bytes, addr: Addr) -> bytes | None: ...


class PlainSealer:
    """No authentication: datagrams pass unchanged (tests, loopback clusters)."""

    overhead = 0

    def seal(self, data: bytes, addr: Addr) -> bytes:
        return data

    def open(self, data: bytes, addr: Addr) -> bytes | None:
        return data


PeerCheck = Callable[[ssl.SSLObject | None, Addr], str | None]
"""Called on both ends of every TCP connection after the TLS handshake with the connection's
ssl object and the peer address; raise to refuse the peer (wrong node, revoked). Returns the
peer's node id when the check establishes it (passed to ``on_request``), else None."""

RequestHandler = Callable[[bytes, str | None, Addr], bytes | None]
"""Answers a ``request()`` frame: (payload, peer node id from peer_check, peer address) ->
reply payload, or None to close without a reply. Runs on the event loop: must not block."""

REQUEST_MARK = b"\xc1"


class MeshState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    LEFT = "left"        # left the cluster; still answers until closed
    CLOSED = "closed"


class Mesh:
    def __init__(self, config: MeshConfig | None = None, *, node_id: str,
                 name: str | None = None, bind: Addr = ("0.0.0.0", 7701),
                 advertise: Addr | None = None, cluster: str = "",
                 delegate: Delegate | None = None, sealer: PacketSealer | None = None,
                 server_ssl: ssl.SSLContext | None = None,
                 client_ssl: ssl.SSLContext | None = None, peer_check: PeerCheck | None = None,
                 on_request: RequestHandler | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 rng: random.Random | None = None, events_max: int = 4096) -> None:
        """``bind`` is where the sockets listen (port 0: any free port); ``advertise`` is the
        address other members use to reach us (default: the bind address, or this host's
        outbound address when binding a wildcard). ``on_event`` is called synchronously for
        every event, in addition to the ``events()`` streams."""
        self.config = config if config is not None else MeshConfig.lan()
        self._node_id = node_id
        self._name = name if name is not None else socket.gethostname()[: wire.NAME_MAX]
        self._bind = bind
        self._advertise_arg = advertise
        self._cluster = cluster
        self._delegate = delegate
        self._sealer: PacketSealer = sealer if sealer is not None else PlainSealer()
        self._server_ssl = server_ssl
        self._client_ssl = client_ssl
        self._peer_check = peer_check
        self._on_request = on_request
        self._on_event = on_event
        self._rng = rng if rng is not None else random.Random()
        self._events_max = events_max
        self._state = MeshState.NEW
        self._swim: Swim | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._streams: list[EventStream] = []
        self._wake = asyncio.Event()
        self._sleep_until = 0.0
        self._left = asyncio.Event()
        self.address: Addr = ("", 0)
        self.stats: Counter[str] = Counter()  # transport counters; the core's are core_stats

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def state(self) -> MeshState:
        return self._state

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._state is not MeshState.NEW:
            raise MeshStateError(f"start() in state {self._state.value}")
        loop = asyncio.get_running_loop()
        tcp, udp = bind_pair(*self._bind)
        try:
            with contextlib.suppress(OSError):
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
            port = tcp.getsockname()[1]
            host, adv_port = self._advertise_arg or (self._bind[0], 0)
            if is_wildcard(host):
                host = outbound_ip()
            self.address = (host, adv_port or port)
            self._swim = Swim(self.config, node_id=self._node_id, name=self._name,
                              addr=self.address, rng=self._rng, now=loop.time(),
                              cluster=self._cluster, delegate=self._delegate,
                              max_packet_bytes=self.config.udp_buffer - self._sealer.overhead,
                              log=log.bind(local=self._name))
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self), sock=udp)
            self._server = await asyncio.start_server(
                self._serve, sock=tcp, ssl=self._server_ssl,
                ssl_handshake_timeout=self.config.stream_timeout_s if self._server_ssl else None)
        except BaseException:
            tcp.close()
            udp.close()
            if self._udp is not None:
                self._udp.close()
            raise
        self._state = MeshState.RUNNING
        self._spawn(self._timer_loop())
        log.info("mesh.start", node=self._node_id, address=self.address, bind=self._bind)

    async def close(self) -> None:
        """Stop at once (without telling anyone: see leave()). Safe to call twice."""
        if self._state is MeshState.CLOSED:
            return
        was_running = self._state is not MeshState.NEW
        self._state = MeshState.CLOSED
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._udp is not None:
            self._udp.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for stream in self._streams:
            stream.end()
        self._streams.clear()
        if was_running:
            log.info("mesh.close", node=self._node_id)

    # ---- operations ------------------------------------------------------------------------

    async def join(self, seeds: Iterable[Addr]) -> int:
        """Full-state exchange with every seed; the number that answered. JoinError if none
        did. Joining more than one seed guards against a seed in a partition of its own."""
        swim = self._running()
        out = swim.join(asyncio.get_running_loop().time(), list(seeds))
        if not out.streams:
            return 0
        results = await asyncio.gather(*(self._exchange(addr, body) for addr, body in out.streams))
        answered = sum(results)
        log.info("mesh.join", seeds=[a for a, _ in out.streams], answered=answered)
        if not answered:
            raise JoinError(f"no seed answered: {[a for a, _ in out.streams]}")
        return answered

    async def leave(self, timeout_s: float = 5.0) -> None:
        """Tell the cluster we leave (members see us as ``left`` rather than dead), and wait
        up to timeout_s for the message to be gossiped. Keeps answering until close()."""
        swim = self._running()
        if self._state is MeshState.RUNNING:
            self._state = MeshState.LEFT
            self._dispatch(swim.leave(asyncio.get_running_loop().time()))
        try:
            async with asyncio.timeout(timeout_s):
                while not swim.leave_done:
                    self._left.clear()
                    await self._left.wait()
        except TimeoutError:
            log.warning("mesh.leave_timeout", node=self._node_id, timeout_s=timeout_s)
        log.info("mesh.leave", node=self._node_id)

    def update_meta(self) -> None:
        """Gossip the delegate's current node_meta() (raises our incarnation)."""
        self._dispatch(self._running().update_meta(asyncio.get_running_loop().time()))

    def members(self) -> list[Member]:
        """Snapshot of every known member (this node included), dead and left ones until
        reaped; filter on ``state``."""
        return self._core().members()

    def local_member(self) -> Member:
        return self._core().local_member()

    def evict(self, node_id: str) -> None:
        """Declare a member dead now, as if our suspicion of it had timed out, and gossip it
        (a revoked node). Nothing happens for the local node or an unknown, dead or left one."""
        swim = self._running()
        member = swim.member(node_id)
        if member is None or node_id == self._node_id or member.state in (
                wire.MemberState.DEAD, wire.MemberState.LEFT):
            return
        packet = wire.pack(self._cluster, [wire.Dead(member.incarnation, node_id,
                                                     self._node_id)])
        self._dispatch(swim.receive(asyncio.get_running_loop().time(), packet, self.address))
        log.info("mesh.evict", node=node_id)

    def deliver(self, data: bytes, addr: Addr) -> None:
        """Feed the core a datagram the sealer opened late (one it kept until its key came)."""
        if self._state is not MeshState.CLOSED and self._swim is not None:
            self._dispatch(self._swim.receive(asyncio.get_running_loop().time(), data, addr))

    def send_sealed(self, data: bytes, addr: Addr) -> None:
        """Send a datagram the sealer has already sealed (one it held back for a key)."""
        udp = self._udp
        if self._state is not MeshState.CLOSED and udp is not None and not udp.is_closing():
            udp.sendto(data, addr)

    async def request(self, addr: Addr, payload: bytes, *, expect: str | None = None) -> bytes:
        """One application request/reply over the gossip TCP path (TLS and peer_check as for
        push-pull) to the ``on_request`` handler of the node at ``addr``; ``expect``: refuse
        unless peer_check names that node. Raises MeshError (or OSError / TimeoutError)."""
        self._running()
        async with asyncio.timeout(self.config.stream_timeout_s):
            reader, writer = await asyncio.open_connection(
                addr[0], addr[1], ssl=self._client_ssl,
                server_hostname=addr[0] if self._client_ssl else None)
            try:
                peer = self._check_peer(writer, addr)
                if expect is not None and peer != expect:
                    raise MeshError(f"peer at {addr} is {peer}, expected {expect}")
                writer.write(wire.frame(REQUEST_MARK + payload))
                await writer.drain()
                reply = await self._read_frame(reader)
            except _PeerRefused as exc:
                raise MeshError(str(exc)) from None
            finally:
                writer.close()
        if not reply.startswith(REQUEST_MARK):
            raise MeshError(f"peer at {addr} answered a request with something else")
        self.stats["request.out"] += 1
        return reply[1:]

    def node_id_at(self, addr: Addr) -> str | None:
        """Id of the member last seen at a gossip address (for a sealer keyed by peer id)."""
        return self._core().node_id_at(addr)

    @property
    def core_stats(self) -> Counter[str]:
        """The protocol core's counters (drops by reason, probes, refutations, bytes)."""
        return self._core().stats

    @property
    def health_score(self) -> int:
        return self._core().health_score

    def events(self) -> AsyncIterator[Event]:
        """A stream of every event from now on; it ends when the Mesh closes. A consumer that
        falls events_max behind loses the oldest (counted in stats['events.dropped'])."""
        closed = self._state is MeshState.CLOSED
        stream = EventStream(self._events_max, self.stats, closed=closed)
        if not closed:
            self._streams.append(stream)
        return stream

    # ---- driving the core ------------------------------------------------------------------

    def _core(self) -> Swim:
        if self._swim is None:
            raise MeshStateError("the mesh has not been started")
        return self._swim

    def _running(self) -> Swim:
        if self._state not in (MeshState.RUNNING, MeshState.LEFT):
            raise MeshStateError(f"not running (state {self._state.value})")
        return self._core()

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mesh.task_failed", node=self._node_id, error=repr(task.exception()))

    async def _timer_loop(self) -> None:
        loop, swim = asyncio.get_running_loop(), self._core()
        while True:
            self._sleep_until = swim.next_deadline()
            delay = self._sleep_until - loop.time()
            if delay > 0:
                self._wake.clear()
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            self._dispatch(swim.tick(loop.time()))

    def _dispatch(self, out: Output) -> None:
        swim = self._core()
        if self._state is MeshState.CLOSED:
            return
        udp = self._udp
        for addr, data in out.packets:
            if udp is not None and not udp.is_closing():
                sealed = self._sealer.seal(data, addr)
                if sealed is None:
                    self.stats["seal.none"] += 1  # the sealer held or dropped it (no key yet)
                else:
                    udp.sendto(sealed, addr)
        for addr, body in out.streams:
            self._spawn(self._exchange(addr, body))
        for event in out.events:
            self._publish(event)
        if swim.next_deadline() < self._sleep_until:
            self._wake.set()
        if swim.leave_done:
            self._left.set()

    def _publish(self, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception as exc:  # noqa: BLE001 - an application bug must not stop the protocol
                log.error("mesh.on_event_failed", node=self._node_id, error=repr(exc))
        for stream in self._streams:
            stream.put(event)

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._state is MeshState.CLOSED or self._swim is None:
            return
        peer = (addr[0], addr[1])
        opened = self._sealer.open(data, peer)
        if opened is None:
            self.stats["drop.unsealed"] += 1
            return
        self._dispatch(self._swim.receive(asyncio.get_running_loop().time(), opened, peer))

    async def _exchange(self, addr: Addr, body: bytes) -> bool:
        """One TCP request/reply; True if a reply was received and accepted by the core."""
        swim, loop = self._core(), asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.stream_timeout_s):
                reader, writer = await asyncio.open_connection(
                    addr[0], addr[1], ssl=self._client_ssl,
                    server_hostname=addr[0] if self._client_ssl else None)
                try:
                    self._check_peer(writer, addr)
                    writer.write(wire.frame(body))
                    await writer.drain()
                    reply = await self._read_frame(reader)
                finally:
                    writer.close()
        except (OSError, TimeoutError, EOFError, DecodeError, _PeerRefused) as exc:
            self.stats["stream.fail"] += 1
            log.debug("mesh.stream_failed", peer=addr, error=repr(exc))
            return False
        accepted = swim.stats["pushpull.in"]
        self._dispatch(swim.on_stream(loop.time(), reply, addr))
        return swim.stats["pushpull.in"] > accepted

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # connections are background tasks too: close() cancels them
            self._tasks.add(task)
        peername = writer.get_extra_info("peername")
        peer: Addr = (peername[0], peername[1]) if peername else ("?", 0)
        try:
            peer_id = self._check_peer(writer, peer)
            async with asyncio.timeout(self.config.stream_timeout_s):
                body = await self._read_frame(reader)
                if body.startswith(REQUEST_MARK):
                    await self._answer_request(writer, body[1:], peer_id, peer)
                    return
                swim = self._core()
                out = swim.on_stream(asyncio.get_running_loop().time(), body, peer)
                if out.reply is not None:
                    writer.write(wire.frame(out.reply))
                    await writer.drain()
            self._dispatch(out)
        except (OSError, TimeoutError, EOFError, DecodeError, _PeerRefused) as exc:
            self.stats["stream.fail"] += 1
            log.debug("mesh.stream_failed", peer=peer, error=repr(exc))
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _answer_request(self, writer: asyncio.StreamWriter, payload: bytes,
                              peer_id: str | None, peer: Addr) -> None:
        handler = self._on_request
        reply = handler(payload, peer_id, peer) if handler is not None else None
        self.stats["request.in"] += 1
        if reply is None:
            self.stats["request.refused"] += 1
            return
        writer.write(wire.frame(REQUEST_MARK + reply))
        await writer.drain()

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes:
        header = await reader.readexactly(wire.FRAME_HEADER.size)
        length = wire.decode_frame_length(header, self.config.stream_max_bytes)
        return await reader.readexactly(length)

    def _check_peer(self, writer: asyncio.StreamWriter, addr: Addr) -> str | None:
        if self._peer_check is None:
            return None
        try:
            return self._peer_check(writer.get_extra_info("ssl_object"), addr)
        except Exception as exc:  # the check raises its own error types
            self.stats["stream.peer_refused"] += 1
            raise _PeerRefused(f"peer {addr} refused: {exc}") from exc


class _PeerRefused(Exception):
    """peer_check refused a connection (internal: the exchange fails quietly)."""


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._mesh._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self._mesh.stats["udp.error"] += 1  # e.g. ICMP port unreachable from a dead peer
