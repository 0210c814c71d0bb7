"""asyncio glue around the sans-IO RFB core: sockets, console, throttling.

One `VncClient` (an asyncio Protocol) per connection: it feeds the socket's
bytes to its `ServerConnection`, turns the resulting events into console
input, and listens to the console for dirty rectangles, resizes and pointer
mode changes.  Updates are encoded only when the client has asked for one (or
enabled continuous updates) and its output queue is short; nothing runs on a
timer except the handshake deadline and the WebSocket sniffing delay.
"""
from __future__ import annotations

import asyncio
import logging

from ..console import Console, Surface
from . import encodings as enc
from . import protocol as rfb
from .auth import Blacklist
from .listener import VncBindError, VncListeners, bind_vnc  # noqa: F401 (VncBindError re-exported)
from .websocket import WebSocketError, WebSocketStream, looks_like_websocket

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0        # seconds from connect to ClientInit
MAX_UNAUTHENTICATED = 16        # connections still in the handshake
WEBSOCKET_SNIFF = 0.1           # how long a silent client may be a browser
MIN_THROTTLE = 1 << 20          # output queue limit floor (bytes)
HARD_LIMIT_FACTOR = 5           # disconnect beyond this many throttle units
MAX_DIRTY_RECTS = 16
UPDATE_SLICE = 0.005            # seconds of encoding before other clients and input get a turn
POINTER_ORIGIN = 0x7FFF         # relative-mode pointer offsets (QEMU -257)
BUTTONS = ((1, "left"), (2, "middle"), (4, "right"))
WHEEL_UP, WHEEL_DOWN = 8, 16


class DirtyRegion:
    """A few rectangles; beyond MAX_DIRTY_RECTS they merge into their bounding box."""

    def __init__(self):
        self.rects: list[tuple[int, int, int, int]] = []

    def __bool__(self) -> bool:
        return bool(self.rects)

    def add(self, x: int, y: int, w: int, h: int) -> None:
        if w <= 0 or h <= 0:
            return
        for (rx, ry, rw, rh) in self.rects:
            if rx <= x and ry <= y and x + w <= rx + rw and y + h <= ry + rh:
                return
        self.rects = [r for r in self.rects
                      if not (x <= r[0] and y <= r[1] and r[0] + r[2] <= x + w and r[1] + r[3] <= y + h)]
        self.rects.append((x, y, w, h))
        if len(self.rects) > MAX_DIRTY_RECTS:
            x0 = min(r[0] for r in self.rects)
            y0 = min(r[1] for r in self.rects)
            x1 = max(r[0] + r[2] for r in self.rects)
            y1 = max(r[1] + r[3] for r in self.rects)
            self.rects = [(x0, y0, x1 - x0, y1 - y0)]

    def take(self) -> list[tuple[int, int, int, int]]:
        rects, self.rects = self.rects, []
        return rects


def _peer_name(transport) -> tuple[str, str]:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return host, f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer), str(peer)


class VncClient(asyncio.Protocol):
    """One connected client: a console listener driving a ServerConnection."""

    def __init__(self, server: "VncServer", mode: str):
        self.server = server
        self.console: Console = server.console
        self.mode = mode                  # "detect", "rfb" or "websocket"
        self.transport: asyncio.Transport | None = None
        self.conn: rfb.ServerConnection | None = None
        self.ws: WebSocketStream | None = None
        self.peer = self.host = "?"
        self.authenticated = False
        self.attached = False
        self.exclusive = False
        self.closing = False
        self.dirty = DirtyRegion()
        self.throttle = MIN_THROTTLE
        self.updates_sent = 0
        self._job: rfb.UpdateJob | None = None     # the update being encoded, band by band
        self._timers: list[asyncio.TimerHandle] = []
        self._sniff: asyncio.TimerHandle | None = None
        self._held_keys: set[int] = set()
        self._keysyms = server.keysym_decoder()   # per client: its own modifier state
        self._buttons = 0
        self._last_pos: tuple[int, int] | None = None

    # ------------------------------------------------------------ connection
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.host, self.peer = _peer_name(transport)
        server = self.server
        server.clients.append(self)
        loop = asyncio.get_running_loop()
        log.info("VNC: client %s connected", self.peer)
        if server.unauthenticated_count() > MAX_UNAUTHENTICATED:
            self.disconnect("too many connections still in the handshake")
            return
        blocked = server.blacklist.blocked_for(self.host)
        self.conn = rfb.ServerConnection(
            self.console.surface.width, self.console.surface.height, server.desktop_name,
            password=server.password,
            # An empty password (password=on, none set yet) lets nobody in.
            password_expired=server.password_expired or server.password == "",
            blocked_reason="Too many security failures" if blocked else None,
            lossy=server.lossy)
        self.conn.absolute_pointer = self.console.absolute_pointer
        self._timers.append(loop.call_later(server.handshake_timeout, self._handshake_expired))
        if self.mode == "websocket":
            self.ws = WebSocketStream()
        elif self.mode == "detect":
            self._sniff = loop.call_later(server.websocket_sniff, self._start_rfb)
        else:
            self._start_rfb()

    def _start_rfb(self) -> None:
        self._sniff = None
        self.mode = "rfb"
        self._flush()

    def _handshake_expired(self) -> None:
        if not self.attached:
            self.disconnect(f"no handshake within {self.server.handshake_timeout:g} s")

    def data_received(self, data: bytes) -> None:
        if self.closing or self.conn is None:
            return
        if self.mode == "detect":
            self._sniff.cancel()
            if looks_like_websocket(data):
                self.mode, self.ws = "websocket", WebSocketStream()
            else:
                self._start_rfb()
        if self.ws is not None:
            try:
                data, reply = self.ws.receive(data)
            except WebSocketError as exc:
                if exc.reply:
                    self.transport.write(exc.reply)
                self.disconnect(str(exc))
                return
            if reply:
                self.transport.write(reply)
            self._flush()       # the banner goes out once the WebSocket is open
        if data:
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        if not self.attached:
            # Not yet a listener: ServerInit must carry the size of today's surface.
            surface = self.console.surface
            self.conn.width, self.conn.height = surface.width, surface.height
            self.conn.absolute_pointer = self.console.absolute_pointer
            self.conn.leds = self.console.leds
        try:
            events = self.conn.receive_data(data)
        except rfb.AuthenticationFailed as exc:
            self.server.blacklist.failure(self.host)
            self._flush()
            self.disconnect(str(exc))
            return
        except rfb.ProtocolError as exc:
            self._flush()
            self.disconnect(str(exc))
            return
        for event in events:
            self._handle(event)
            if self.closing:
                return
        self._flush()
        self._maybe_update()

    def connection_lost(self, exc) -> None:
        self.disconnect(f"connection lost ({exc})" if exc else "client closed the connection")

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        self._maybe_update()

    def disconnect(self, reason: str) -> None:
        """Close with a logged reason; idempotent; never blocks."""
        if self.closing:
            return
        self.closing = True
        self._job = None
        log.info("VNC: client %s disconnected: %s", self.peer, reason)
        for timer in self._timers:
            timer.cancel()
        if self._sniff is not None:
            self._sniff.cancel()
        self._release_input()
        if self.attached:
            self.console.detach(self)
            self.attached = False
        if self in self.server.clients:
            self.server.clients.remove(self)
        if self.conn is not None:
            self.conn.state = "closed"
        if self.transport is not None:
            if self.ws is not None and not self.transport.is_closing():
                self.transport.write(self.ws.close(reason))
            self.transport.close()

    # ------------------------------------------------------------ output
    def _flush(self) -> None:
        if self.closing or self.conn is None or self.mode == "detect":
            return
        if self.ws is not None and not self.ws.open:
            return
        data = self.conn.data_to_send()
        if not data:
            return
        if self.ws is not None:
            data = self.ws.send(data)
        self.transport.write(data)
        pending = self.transport.get_write_buffer_size()
        if pending > HARD_LIMIT_FACTOR * self.throttle:
            self.transport.abort()
            self.disconnect(f"output queue of {pending} bytes over limit (client not reading)")

    def _set_throttle(self) -> None:
        s = self.console.surface
        self.throttle = max(MIN_THROTTLE, s.width * s.height * self.conn.pixel_format.bytes_per_pixel)
        self.transport.set_write_buffer_limits(high=self.throttle)

    def _maybe_update(self) -> None:
        if self.closing or not self.attached or self._job is not None:
            return
        request = self.conn.pending_request
        if request is None:
            return
        pending = self.transport.get_write_buffer_size()
        if request == "incremental" and (not (self.dirty or self.conn.has_pseudo) or pending > self.throttle):
            return
        if request == "full" and pending > 2 * self.throttle:
            return          # resume_writing() brings us back
        surface = self.console.surface
        # A size change goes alone; the pixels follow on the next request.
        rects = [] if self.conn.resize_pending else self.dirty.take()
        self._job = self.conn.begin_update(surface.rows, surface.fmt, rects)
        self._continue_update()

    def _continue_update(self) -> None:
        """Encode bands for up to UPDATE_SLICE, then let the loop run the rest
        (a full frame can take 100+ ms here, seconds in an emulated dom0)."""
        job = self._job
        if job is None or self.closing:
            self._job = None
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UPDATE_SLICE
        while job.step():
            if loop.time() >= deadline:
                loop.call_soon(self._continue_update)
                return
        self._job = None
        if job.finish():
            self.updates_sent += 1
        self._flush()
        self._maybe_update()        # a request or changes that came meanwhile

    # ------------------------------------------------------------ events
    def _handle(self, event) -> None:
        if isinstance(event, rfb.UpdateRequest):
            if not event.incremental:
                s = self.console.surface
                x, y = min(event.x, s.width), min(event.y, s.height)
                self.dirty.add(x, y, min(event.w, s.width - x), min(event.h, s.height - y))
        elif isinstance(event, rfb.PointerEvent):
            self._pointer(event)
        elif isinstance(event, rfb.KeyEvent):
            self._key(self._keysym_code(event.keysym, event.down), event.down)
        elif isinstance(event, rfb.ExtendedKeyEvent):
            code = self.server.qnum_to_linux(event.keycode) if event.keycode else None
            if code is None:
                code = self.server.keysym_to_linux(event.keysym)
            self._key(code, event.down)
        elif isinstance(event, rfb.PixelFormatChanged):
            self._set_throttle()
        elif isinstance(event, rfb.EncodingsChanged):
            log.debug("VNC: client %s uses %s", self.peer, enc.NAMES.get(event.encoding))
        elif isinstance(event, rfb.Authenticated):
            self.authenticated = True
            self.server.blacklist.success(self.host)
        elif isinstance(event, rfb.ClientInit):
            self._client_init(event.shared)

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
        self.console.attach(self)
        log.info("VNC: client %s authenticated (%s)", self.peer, "shared" if shared else "exclusive")

    def _keysym_code(self, keysym: int, down: bool) -> int | None:
        """The layout's key for a keysym, chosen with this client's held modifiers."""
        if self._keysyms is None:
            return self.server.keysym_to_linux(keysym)
        return self._keysyms.press(keysym) if down else self._keysyms.release(keysym)

    def _key(self, code: int | None, down: bool) -> None:
        if not code:
            return
        if down:
            self._held_keys.add(code)
        elif code in self._held_keys:
            self._held_keys.discard(code)
        self.console.key(code, down)

    def _pointer(self, event: rfb.PointerEvent) -> None:
        console = self.console
        if console.absolute_pointer:
            console.pointer_abs(event.x, event.y)
        elif enc.POINTER_TYPE_CHANGE in self.conn.encodings:
            console.pointer_rel(event.x - POINTER_ORIGIN, event.y - POINTER_ORIGIN)
        else:
            if self._last_pos is not None:
                console.pointer_rel(event.x - self._last_pos[0], event.y - self._last_pos[1])
            self._last_pos = (event.x, event.y)
        changed = event.buttons ^ self._buttons
        pressed = event.buttons & ~self._buttons
        self._buttons = event.buttons
        for bit, name in BUTTONS:
            if changed & bit:
                console.button(name, bool(event.buttons & bit))
        if pressed & WHEEL_UP:
            console.wheel(-1)
        if pressed & WHEEL_DOWN:
            console.wheel(1)

    def _release_input(self) -> None:
        """Let go of whatever this client still holds (as QEMU does)."""
        for code in sorted(self._held_keys):
            self.console.key(code, False)
        self._held_keys.clear()
        for bit, name in BUTTONS:
            if self._buttons & bit:
                self.console.button(name, False)
        self._buttons = 0

    # ------------------------------------------------------------ console listener
    def console_updated(self, x: int, y: int, w: int, h: int) -> None:
        self.dirty.add(x, y, w, h)
        self._maybe_update()

    def console_resized(self, surface: Surface) -> None:
        if not self.conn.resize(surface.width, surface.height):
            self.disconnect("client does not support desktop resizing")
            return
        self.dirty.take()
        self.dirty.add(0, 0, surface.width, surface.height)
        self._set_throttle()
        self._flush()
        self._maybe_update()

    def console_pointer_mode(self, absolute: bool) -> None:
        self._last_pos = None
        self.conn.set_pointer_mode(absolute)
        self._flush()

    def console_leds(self, leds: int) -> None:
        self.conn.set_leds(leds)
        self._flush()


class VncServer:
    """The VNC display of one console."""

    def __init__(self, console: Console, *, keymap=None, password: str | None = None,
                 name: str = "QEMU", max_clients: int = 32, lossy: bool = False):
        self.console = console
        self.keymap = keymap
        self.password = password
        self.password_expired = False
        self.name = name
        self.max_clients = max_clients
        self.lossy = lossy
        self.host = ""
        self.port = 0
        self.display = 0
        self.websocket_port: int | None = None
        self.clients: list[VncClient] = []
        self.blacklist = Blacklist()
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        self.websocket_sniff = WEBSOCKET_SNIFF
        self._servers: list[asyncio.AbstractServer] = []
        self._qnum = None

    @property
    def desktop_name(self) -> str:
        if self.name == "QEMU" or self.name.startswith("QEMU ("):
            return self.name
        return f"QEMU ({self.name})"

    # ------------------------------------------------------------ keymaps
    def _keymap(self):
        if self.keymap is None:
            try:
                from ..keymap import Keymap
                self.keymap = Keymap.load()
            except (ImportError, ValueError) as exc:
                log.warning("VNC: no keymap available (%s), keysym input dropped", exc)
                self.keymap = False
        return self.keymap or None

    def keysym_decoder(self):
        """QEMU's keysym rules for one client, when the keymap is one of ours."""
        from ..keymap import Keymap, KeysymDecoder
        km = self._keymap()
        return KeysymDecoder(km) if isinstance(km, Keymap) else None

    def keysym_to_linux(self, keysym: int) -> int | None:
        km = self._keymap()
        return km.keysym_to_linux(keysym) if km is not None else None

    def qnum_to_linux(self, qnum: int) -> int | None:
        if self._qnum is None:
            try:
                from ..keymap import qnum_to_linux
            except ImportError:
                qnum_to_linux = getattr(self._keymap(), "qnum_to_linux", None) or (lambda q: None)
            self._qnum = qnum_to_linux
        return self._qnum(qnum)

    # ------------------------------------------------------------ control
    def set_password(self, password: str | None) -> None:
        self.password = password
        self.password_expired = False

    def expire_password(self) -> None:
        self.password_expired = True

    def unauthenticated_count(self) -> int:
        return sum(1 for c in self.clients if not c.attached and not c.closing)

    async def listen(self, host: str, display: int, *, to_display: int | None = None,
                     websocket: bool = True, websocket_port: int | None = None) -> int:
        """Bind 5900+display (searching up to to_display) and serve; returns the port."""
        listeners = bind_vnc(host, display, to_display=to_display, websocket=websocket,
                             websocket_port=websocket_port)
        await self.serve(listeners)
        return self.port

    async def serve(self, listeners: VncListeners) -> None:
        """Serve on sockets bound beforehand (listener.bind_vnc)."""
        loop = asyncio.get_running_loop()
        for sock, mode in listeners.sockets:
            self._servers.append(await loop.create_server(
                lambda mode=mode: VncClient(self, mode), sock=sock))
        self.host, self.port, self.display = listeners.host, listeners.port, listeners.display
        self.websocket_port = listeners.websocket_port
        log.info("VNC: listening on %s port %d (display :%d)", listeners.host or "all addresses",
                 self.port, self.display)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for client in list(self.clients):
            client.disconnect("server shutting down")
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
