"""asyncio transport around the sans-IO RFB core: sockets, layers, throttling.

One `RfbSession` (an asyncio Protocol) per connection passes the socket's
bytes up through its sans-IO layers (TLS, WebSocket) to its
`ServerConnection`, hands input events to its server's display side,
and sends FramebufferUpdates when the client has asked for one (or enabled
continuous updates) and its output queue is short.  Nothing runs on a timer
except the handshake deadline.  The VNC port speaks RFB only, and the
server speaks first: its banner goes out as the connection is made.  A
WebSocket (noVNC) is served only on a port of its own, when asked for.

Updates go one way through updates.py (snapshot, encoder threads, then
the connection's `finish_update`); a session only decides when one may
start: the client asked (or enabled continuous updates), its output queue
is short, and none of its updates is in flight.

`RfbServer` knows nothing of consoles or keymaps: a display owns one
(pyxenfb/vnc.py), gives it the picture and hears of sessions and their
input through the `RfbDisplay` methods.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Protocol

from ..util.logbudget import LogBudget
from ..util.region import DirtyRegion, Rect, clip
from ..util.shorttimer import ShortTimer
from . import encodings as enc
from . import protocol as rfb
from .auth import Blacklist
from .listener import Transport, VncListeners, bind_vnc
from .states import Request, State
from .tls import TLS_RECORD, TlsCredentials, TlsError, TlsKind, TlsStream, server_context
from .updates import ConvertRect, Framebuffer, LinkEstimate, Updates, UpdateJob
from .websocket import WebSocketError, WebSocketStream

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0        # seconds from connect to ClientInit (QEMU, TigerVNC: 10 s or less)
STALL_TIMEOUT = 30.0            # a client with a full output queue must read within this
MAX_UNAUTHENTICATED = 16        # connections still in the handshake, in all
MAX_UNAUTHENTICATED_PER_ADDRESS = 8   # ... and from one address (docs/vnc.md, "Threat model")
MIN_THROTTLE = 1 << 20          # output queue limit floor (bytes)
HARD_LIMIT_FACTOR = 5           # disconnect beyond this many throttle units
# Small changes wait this long before an update goes out, so that a burst
# (a frontend notifies once per changed rect: a clock, then a cursor; fbcon,
# once per line) leaves as one update instead of several (Xvnc: DeferUpdate,
# 1 ms; QEMU sends on a 30 ms refresh timer).  Ours is shorter, on a timerfd
# (util/shorttimer.py): the rects of one burst come tens of µs apart, and a
# 1 ms wait would more than double a lone change's guest-to-client time.  A
# change of at least DEFER_MAX_SHARE of the picture goes at once: it gains
# little from company and would lose frames/s to the wait.
DEFER_UPDATE_S = 0.0003
DEFER_MAX_SHARE = 0.25


class RfbDisplay(Protocol):
    """What a server asks of the display that owns it."""

    def framebuffer(self) -> Framebuffer:
        """The picture shown now."""

    convert_rect: ConvertRect
    """Pixel conversion into a client's format (pyxenfb/convert.py's)."""

    def conversion_path(self, src_fmt, dst_fmt) -> str:
        """How convert_rect converts between these formats, for the log."""

    def pointer_absolute(self) -> bool:
        """Whether the pointer is absolute (else relative) now."""

    def leds(self) -> int:
        """The lock LEDs now (QEMU bits: 1 scroll, 2 num, 4 caps)."""

    def session_attached(self, session: "RfbSession") -> None:
        """ClientInit accepted: the session now gets updates and sends input."""

    def session_input(self, session: "RfbSession", event) -> None:
        """A key, pointer, cut-text or other input event from an attached session."""

    def session_detached(self, session: "RfbSession") -> None:
        """An attached session is gone."""

    def session_free(self) -> None:
        """A session's update is made: a source that holds its changes back
        while every session is busy (RfbServer.all_busy) may send them now."""


class OutputQueue:
    """A session's socket output: its throttle (the write-buffer limit, one
    frame in the client's format), and the hard limit beyond which the
    client is not reading and goes."""

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self.throttle = MIN_THROTTLE

    def fit_frame(self, nbytes: int) -> None:
        self.throttle = max(MIN_THROTTLE, nbytes)
        self.transport.set_write_buffer_limits(high=self.throttle)

    @property
    def pending(self) -> int:
        return self.transport.get_write_buffer_size()

    def over_limit(self) -> int | None:
        """The bytes queued, when beyond the hard limit."""
        pending = self.pending
        return pending if pending > HARD_LIMIT_FACTOR * self.throttle else None

    def room_for(self, request: Request) -> bool:
        """An incremental update waits for a short queue; a full one (the
        client asked for the whole picture) is allowed twice as much."""
        return self.pending <= (self.throttle if request is Request.INCREMENTAL else 2 * self.throttle)


def _peer_name(transport) -> tuple[str, str]:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return host, f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer), str(peer)


class RfbSession(asyncio.Protocol):
    """The server's side of one connection: its layers, handshake deadline,
    throttling, and when its updates start."""

    def __init__(self, server: "RfbServer", mode: Transport):
        self.server = server
        self.mode = Transport(mode)       # a stray string is an error, never a WebSocket
        self.transport: asyncio.Transport | None = None
        self.conn: rfb.ServerConnection | None = None
        # The sans-IO layers between the socket and RFB, bottom first: TLS
        # (VeNCrypt, or wss://) under the WebSocket, each pushed once
        # detection (wss://) or negotiation (VeNCrypt) says it is there.
        self.layers: list[TlsStream | WebSocketStream] = []
        self.ws: WebSocketStream | None = None
        self.tls: TlsStream | None = None
        self.peer = self.host = "?"
        self.authenticated = False
        self.attached = False
        self.exclusive = False
        self.closing = False
        self.dirty = DirtyRegion()
        self.output: OutputQueue | None = None
        self.updates_sent = 0
        self.encoder = enc.Encoder()        # its zlib streams, used by one update at a time
        self._format_logged = False
        self._job: UpdateJob | None = None     # the update in flight
        self.link = LinkEstimate()              # how far the client is: how its updates stream
        self._timers: list[asyncio.TimerHandle] = []
        self._stall: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ connection
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.output = OutputQueue(transport)
        self.host, self.peer = _peer_name(transport)
        server = self.server
        server.clients.append(self)
        loop = asyncio.get_running_loop()
        self.server.budget.info("connect", "VNC: client %s connected", self.peer, what="VNC connections")
        server.make_handshake_room(self)
        if self.mode is not Transport.RFB and server.tls is not None:
            self.mode = Transport.WSS    # TLS first, the WebSocket inside it
        # VeNCrypt on the VNC port; inside wss:// the TLS around the
        # WebSocket protects it: the plain security types, as in QEMU.
        self.conn = self._new_connection(
            tls=server.tls.kind if server.tls and self.mode is Transport.RFB else None)
        self._timers.append(loop.call_later(server.handshake_timeout, self._handshake_expired))
        if self.mode is Transport.RFB:
            self._flush()               # the banner, at once: RFB's server speaks first
        else:
            self.ws = WebSocketStream(server.websocket_origins)
            self.layers.append(self.ws)

    def _new_connection(self, tls: TlsKind | None) -> rfb.ServerConnection:
        server = self.server
        blocked = server.blacklist.blocked_for(self.host)
        fb = server.owner.framebuffer()
        conn = rfb.ServerConnection(
            fb.width, fb.height, server.desktop_name,
            # An empty password (password=on, none set yet) lets nobody in:
            # the protocol core refuses it without counting a guess.
            password=server.password, password_expired=server.password_expired,
            blocked_reason="Too many security failures" if blocked else None,
            lossy=server.lossy, tls=tls, websocket=self.mode is not Transport.RFB)
        server.prepare_connection(conn)
        return conn

    def _handshake_expired(self) -> None:
        if not self.attached:
            self.disconnect(f"no handshake within {self.server.handshake_timeout:g} s")

    # ------------------------------------------------------------ layers
    def data_received(self, data: bytes) -> None:
        if self.closing or self.conn is None:
            return
        if self.mode is Transport.WSS and self.tls is None and not self._tls_detected(data):
            return
        data = self._up(data)
        if data:
            self._feed(data)

    def _tls_detected(self, data: bytes) -> bool:
        """wss://: the first bytes must open TLS, which goes under the WebSocket."""
        if data[:1] != bytes([TLS_RECORD]):
            self.disconnect("plain ws:// refused: TLS is configured, connect with wss://")
            return False
        self._push_tls()
        return True

    def _push_tls(self) -> None:
        self.tls = TlsStream(self.server.tls_context)
        self.layers.insert(0, self.tls)

    def _up(self, data: bytes) -> bytes | None:
        """Socket bytes up through the layers: RFB bytes, or None (nothing
        yet, or closed).  Each layer's replies go down through those below."""
        for below, layer in enumerate(self.layers):
            try:
                data, reply = layer.receive(data)
            except (TlsError, WebSocketError) as exc:
                if exc.reply:
                    self._down(exc.reply, below)
                self.disconnect(f"TLS: {exc}" if layer is self.tls else str(exc))
                return None
            if reply:
                self._down(reply, below)
            if layer is self.tls:
                if self.tls.established and self.conn.state is State.TLS_HANDSHAKE:
                    self._handle_all(self.conn.tls_established())
                    self._flush()
            else:
                self._flush()       # the banner goes out once the WebSocket is open
            if not data or self.closing:
                return None
        return data

    def _down(self, data, below: int | None = None) -> None:
        """Bytes down to the socket through the layers under index `below`
        (through all of them by default)."""
        for layer in reversed(self.layers[:below]):
            data = layer.send(data)
        self.transport.write(data)

    def _feed(self, data: bytes) -> None:
        if not self.attached:
            # Not yet attached: ServerInit must carry today's size and state.
            fb = self.server.owner.framebuffer()
            self.conn.width, self.conn.height = fb.width, fb.height
            self.server.prepare_connection(self.conn)
        try:
            events = self.conn.receive_data(data)
        except rfb.AuthenticationFailed as exc:
            block = self.server.blacklist.failure(self.host)
            if block:
                self.server.budget.warning("blocked", "VNC: address %s blocked for %g s after repeated wrong "
                                           "passwords", self.host, block, what="VNC address blocks")
            self._flush()
            self.disconnect(str(exc))
            return
        except rfb.ProtocolError as exc:
            self._flush()
            self.disconnect(str(exc))
            return
        self._handle_all(events)
        if self.closing:
            return
        self._flush()
        self._maybe_update()

    def _handle_all(self, events) -> None:
        for event in events:
            self._handle(event)
            if self.closing:
                return

    def connection_lost(self, exc) -> None:
        self.disconnect(f"connection lost ({exc})" if exc else "client closed the connection")

    def pause_writing(self) -> None:
        # Output queue full: the client must read some of it in time.
        self._stall = asyncio.get_running_loop().call_later(self.server.stall_timeout, self._stalled)
        self._timers.append(self._stall)

    def _stalled(self) -> None:
        # Reset: close() would wait for the unread bytes, and even abort()
        # leaves the kernel trickling its send buffer to the client.
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()
        self.disconnect(f"not reading its output for {self.server.stall_timeout:g} s")

    def resume_writing(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._timers.remove(self._stall)
            self._stall = None
        self._maybe_update()

    def disconnect(self, reason: str) -> None:
        """Close with a logged reason; idempotent; never blocks."""
        if self.closing:
            return
        self.closing = True
        self.server.budget.info("session-end" if self.attached else "refused", "VNC: client %s disconnected: %s",
                    self.peer, reason, what="VNC sessions ended" if self.attached
                    else "VNC connections closed before ClientInit")
        for timer in self._timers:
            timer.cancel()
        if self.attached:
            self.attached = False
            self.server.owner.session_detached(self)
        if self in self.server.clients:
            self.server.clients.remove(self)
            if not self.server.clients:
                self.server.all_clients_gone()
        if self.conn is not None:
            self.conn.close()
        if self.transport is not None:
            if self.ws is not None and not self.transport.is_closing():
                self._down(self.ws.close(reason), self.layers.index(self.ws))
            self.transport.close()

    # ------------------------------------------------------------ output
    def _flush(self) -> None:
        if self.closing or self.conn is None:
            return
        if self.ws is not None and not self.ws.open:
            return
        if not self.layers:
            chunks = self.conn.data_to_send_chunks()
            if not chunks:
                return
            for chunk in chunks:
                self.transport.write(chunk)
        else:
            data = self.conn.data_to_send()
            if not data:
                return
            self._down(data)
        pending = self.output.over_limit()
        if pending is not None:
            self.transport.abort()
            self.disconnect(f"output queue of {pending} bytes over limit (client not reading)")

    def _set_throttle(self) -> None:
        fb = self.server.owner.framebuffer()
        self.output.fit_frame(fb.width * fb.height * self.conn.pixel_format.bytes_per_pixel)

    def add_dirty(self, rects: list[Rect]) -> None:
        """Rectangles (clipped to today's surface) this client has yet to see;
        the server says when to send them (RfbServer.mark_dirty)."""
        self.dirty.update(rects)

    def _maybe_update(self) -> None:
        if self.closing or not self.attached or self._job is not None or self.server.deferring:
            return
        request = self.conn.pending_request
        if request is None:
            return
        if request is Request.INCREMENTAL and not (self.dirty or self.conn.has_pseudo):
            return
        if not self.output.room_for(request):
            return          # resume_writing() brings us back
        fb = self.server.owner.framebuffer()
        # A size change goes alone; the pixels follow on the next request.
        rects = [] if self.conn.resize_pending else self.dirty.take()
        self.link.began(time.monotonic())     # (loop.time() would cost a getpid: CPython 3.11)
        self._job = job = self.server.updates.begin(self.conn, self.encoder, fb, rects)
        self.server.updates.run(job, self._update_sent, self._update_failed, self._flush, self.link.batch)

    @property
    def busy(self) -> bool:
        """An update is being made for this client: a change now would wait for it."""
        return self._job is not None

    def _update_sent(self, nbytes: int) -> None:
        """On the loop: an update is queued on the connection (or was empty)."""
        self._job = None
        if nbytes:
            self.updates_sent += 1
            self.link.made(time.monotonic())
        self._flush()
        self._maybe_update()        # a request or changes that came meanwhile
        self.server.owner.session_free()

    def _update_failed(self, exc: BaseException) -> None:
        self._job = None
        log.error("VNC: encoding an update for %s failed", self.peer, exc_info=exc)
        self.disconnect(f"encoder error: {exc}")
        self.server.owner.session_free()

    # ------------------------------------------------------------ events
    def _handle(self, event) -> None:
        if isinstance(event, rfb.UpdateRequest):
            self.link.requested(time.monotonic())
            if not event.incremental:
                fb = self.server.owner.framebuffer()
                rect = clip(event.x, event.y, event.w, event.h, fb.width, fb.height)
                if rect is not None:
                    self.dirty.add(rect)
        elif isinstance(event, rfb.PixelFormatChanged):
            self._set_throttle()
            fb = self.server.owner.framebuffer()
            # Info once per client (a client may switch formats at will), debug after.
            log.log(logging.DEBUG if self._format_logged else logging.INFO,
                    "VNC: client %s asks for %d bpp depth %d: conversion by %s", self.peer,
                    event.fmt.bpp, event.fmt.depth, self.server.owner.conversion_path(fb.fmt, event.fmt))
            self._format_logged = True
        elif isinstance(event, rfb.EncodingsChanged):
            log.debug("VNC: client %s uses %s", self.peer, enc.NAMES.get(event.encoding))
        elif isinstance(event, rfb.Authenticated):
            self.authenticated = True
            self.server.blacklist.success(self.host)
        elif isinstance(event, rfb.ClientInit):
            self._client_init(event.shared)
        elif isinstance(event, rfb.StartTls):
            self._start_tls()
        elif self.attached:
            self.server.owner.session_input(self, event)

    def _start_tls(self) -> None:
        """VeNCrypt agreed: the ack goes out in the clear, then everything is TLS."""
        self._flush()
        self._push_tls()
        early = self.conn.take_buffered_input()   # a ClientHello right behind the choice
        if early and self._up(early):
            self.disconnect("data inside TLS before the handshake finished")

    def _client_init(self, shared: bool) -> None:
        server = self.server
        others = [c for c in server.clients if c is not self and c.attached]
        if len(others) >= server.max_clients:
            self.disconnect(f"too many clients (limit {server.max_clients})")
            return
        if shared and any(c.exclusive for c in others):
            self.disconnect("refused: an exclusive client is connected")
            return
        if not shared:
            for other in others:
                other.disconnect(f"exclusive client {self.peer} connected")
        self.exclusive = not shared
        for timer in self._timers:
            timer.cancel()
        self.attached = True
        self._set_throttle()
        server.owner.session_attached(self)
        self.server.budget.info("attach", "VNC: client %s authenticated (%s)", self.peer,
                    "shared" if shared else "exclusive", what="VNC clients attached")

    @property
    def throttle(self) -> int:
        return self.output.throttle if self.output is not None else MIN_THROTTLE

    def follows_pointer_type(self) -> bool:
        """The client takes PointerTypeChange: with a relative pointer it
        sends offsets from an origin, not positions."""
        return enc.POINTER_TYPE_CHANGE in self.conn.encodings

    # ------------------------------------------------------------ display changes
    def resized(self, width: int, height: int) -> None:
        if not self.conn.resize(width, height):
            self.server.budget.info("resize-view", "VNC: client %s cannot follow the resize to %dx%d; "
                                    "it keeps its %dx%d view", self.peer, width, height,
                                    self.conn.width, self.conn.height, what="VNC clients kept their size")
        self.dirty.take()
        self.dirty.add((0, 0, min(width, self.conn.width), min(height, self.conn.height)))
        self._set_throttle()
        self._flush()
        self._maybe_update()

    def set_pointer_mode(self, absolute: bool) -> None:
        self.conn.set_pointer_mode(absolute)
        self._flush()

    def set_leds(self, leds: int) -> None:
        self.conn.set_leds(leds)
        self._flush()


class RfbServer:
    """Listening sockets and the sessions of one picture.  The display that
    owns it (`owner`, an `RfbDisplay`) gives the picture and hears of
    sessions and their input; it reports changes with `mark_dirty`,
    `resize_clients`, `pointer_mode_changed`, `leds_changed`."""

    def __init__(self, owner: RfbDisplay, *, password: str | None = None, name: str = "QEMU",
                 max_clients: int = 32, lossy: bool = False, tls: TlsCredentials | None = None,
                 websocket_origins: tuple[str, ...] = ()):
        self.owner = owner
        self.password = password
        self.password_expired = False
        self.name = name
        self.max_clients = max_clients
        self.lossy = lossy
        # TLS: VeNCrypt only on the RFB side, wss:// only for WebSockets.
        # server_context raises TlsConfigError (one line) for bad credentials.
        self.tls = tls
        self.tls_context = server_context(tls) if tls is not None else None
        # Browser pages (their Origin, normalised) that may use the WebSocket
        # port; none by default.  Clients sending no Origin are not pages.
        self.websocket_origins = frozenset(websocket_origins)
        self.host = ""
        self.port = 0
        self.display = 0
        self.websocket_port: int | None = None
        self.clients: list[RfbSession] = []
        self.blacklist = Blacklist()
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        self.max_handshakes = MAX_UNAUTHENTICATED
        self.max_handshakes_per_address = MAX_UNAUTHENTICATED_PER_ADDRESS
        self.stall_timeout = STALL_TIMEOUT
        self.defer_update = DEFER_UPDATE_S
        self._defer: ShortTimer | None = None      # made on the loop, at the first small change
        self.budget = LogBudget(log)      # the lines a client can cause (logbudget.py)
        self._servers: list[asyncio.AbstractServer] = []
        self.updates = Updates(owner.convert_rect)   # snapshots, encoder threads (updates.py)

    @property
    def desktop_name(self) -> str:
        if self.name == "QEMU" or self.name.startswith("QEMU ("):
            return self.name
        return f"QEMU ({self.name})"

    def prepare_connection(self, conn: rfb.ServerConnection) -> None:
        """Set what ServerInit and the first pseudo-encodings report."""
        conn.absolute_pointer = self.owner.pointer_absolute()
        conn.leds = self.owner.leds()

    # ------------------------------------------------------------ display changes
    def attached_clients(self) -> list[RfbSession]:
        return [c for c in self.clients if c.attached and not c.closing]

    def mark_dirty(self, rects: list[Rect]) -> None:
        clients = self.attached_clients()
        for client in clients:
            client.add_dirty(rects)
        if not clients:
            return
        fb = self.owner.framebuffer()
        small = sum(r[2] * r[3] for r in rects) < DEFER_MAX_SHARE * fb.width * fb.height
        if small and self.defer_update > 0:
            if self._defer is None:
                self._defer = ShortTimer(asyncio.get_running_loop(), self._send_deferred)
            if not self._defer.active:
                self._defer.start(self.defer_update)
            return                      # the pending deferral takes these along
        self._send_deferred()

    def all_busy(self) -> bool:
        """Every attached client has an update being made (RfbSession.busy):
        changes made now would only wait.  False without clients."""
        clients = self.attached_clients()
        return bool(clients) and all(c.busy for c in clients)

    @property
    def deferring(self) -> bool:
        """Small changes are waiting for company (DEFER_UPDATE_S): no update yet."""
        return self._defer is not None and self._defer.active

    def _send_deferred(self) -> None:
        if self._defer is not None:
            self._defer.cancel()
        for client in self.attached_clients():
            client._maybe_update()

    def resize_clients(self, width: int, height: int) -> None:
        for client in self.attached_clients():
            client.resized(width, height)

    def pointer_mode_changed(self, absolute: bool) -> None:
        for client in self.attached_clients():
            client.set_pointer_mode(absolute)

    def leds_changed(self, leds: int) -> None:
        for client in self.attached_clients():
            client.set_leds(leds)

    def all_clients_gone(self) -> None:
        """Nobody watches: let the frame buffers and zlib streams go back to
        the system instead of staying resident until the next client."""
        self.updates.idle()

    # ------------------------------------------------------------ control
    def set_password(self, password: str | None) -> None:
        self.password = password
        self.password_expired = False

    def expire_password(self) -> None:
        self.password_expired = True

    def pending_handshakes(self) -> dict[str, list[RfbSession]]:
        """Connections still in the handshake by address, oldest first."""
        pending: dict[str, list[RfbSession]] = {}
        for c in self.clients:              # in connection order
            if not c.attached and not c.closing:
                pending.setdefault(c.host, []).append(c)
        return pending

    def make_handshake_room(self, newcomer: RfbSession) -> None:
        """Bound the handshakes in progress, per address and in all, so that
        one source holding silent connections cannot keep others out: over
        an address's share, its own oldest handshake goes; over the total,
        the oldest of the address holding the most (on a tie, the oldest of
        all).  The newcomer always gets its banner."""
        pending = self.pending_handshakes()
        mine = pending.get(newcomer.host, [])
        if len(mine) > self.max_handshakes_per_address:
            mine[0].disconnect(f"evicted: more than {self.max_handshakes_per_address} connections "
                               f"from {newcomer.host} in the handshake")
            mine.pop(0)
        while sum(map(len, pending.values())) > self.max_handshakes:
            # On a tie max() keeps the first: pending is ordered by each
            # address's oldest handshake, so the oldest of all goes.
            greediest = max(pending.values(), key=len)
            victim = greediest.pop(0)
            if victim is newcomer:          # only one connection in all: nothing to do
                break
            victim.disconnect(f"evicted: {self.max_handshakes} connections in the handshake, "
                              f"{len(greediest) + 1} of them from {victim.host}")
            if not greediest:
                del pending[victim.host]

    async def listen(self, host: str, display: int, *, to_display: int | None = None,
                     websocket_port: int | None = None) -> int:
        """Bind 5900+display (searching up to to_display) and serve; returns
        the port.  websocket_port: also serve WebSocket clients there."""
        listeners = bind_vnc(host, display, to_display=to_display, websocket_port=websocket_port)
        await self.serve(listeners)
        return self.port

    async def serve(self, listeners: VncListeners) -> None:
        """Serve on sockets bound beforehand (listener.bind_vnc)."""
        loop = asyncio.get_running_loop()
        for sock, mode in listeners.sockets:
            self._servers.append(await loop.create_server(
                lambda mode=mode: RfbSession(self, mode), sock=sock))
        self.host, self.port, self.display = listeners.host, listeners.port, listeners.display
        self.websocket_port = listeners.websocket_port
        log.info("VNC: listening on %s port %d (display :%d)", listeners.host or "all addresses",
                 self.port, self.display)
        if self.websocket_port is not None:
            log.info("VNC: WebSocket (%s) on port %d; browser pages allowed: %s",
                     "wss://" if self.tls is not None else "ws://", self.websocket_port,
                     " ".join(sorted(self.websocket_origins)) or "none (websocket-origin=)")

    async def close(self) -> None:
        if self._defer is not None:
            self._defer.close()
            self._defer = None
        for server in self._servers:
            server.close()
        for client in list(self.clients):
            client.disconnect("server shutting down")
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self.updates.close()
