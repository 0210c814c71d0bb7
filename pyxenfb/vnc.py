"""The VNC display of a console, beside sdl.py.

`VncDisplay` is the console listener: it owns an `RfbServer` and passes
each batch of dirty rectangles, size changes, pointer-mode and LED changes
to its clients through it, and turns their input into the console's input API: keysyms through the keymap
(QEMU's rules, per client modifier state) or QEMU extended key events (XT
scancodes) to Linux key codes, pointer positions and buttons.  The RFB
protocol, encoders and sockets live in `rfb/`, which knows nothing of
consoles, keymaps or pixel conversion (the display hands it `convert_rect`).
"""
from __future__ import annotations

import logging

from .console.core import Console, Surface
from .convert import conversion_path, convert_rect
from .util.region import Rect
from .rfb import protocol as rfb
from .rfb.listener import Transport, VncListeners
from .rfb.server import RfbServer, RfbSession

log = logging.getLogger(__name__)

POINTER_ORIGIN = 0x7FFF         # relative-mode pointer offsets (QEMU -257)
BUTTONS = ((1, "left"), (2, "middle"), (4, "right"))
WHEEL_UP, WHEEL_DOWN = 8, 16


class InputState:
    """One attached client's input state: its modifiers and buttons."""

    def __init__(self, keysyms):
        self.keysyms = keysyms          # a KeysymDecoder, or None with a foreign keymap
        self.buttons = 0


class VncDisplay:
    """The VNC display of one console: the console's listener and the
    owner (`RfbDisplay`) of the RFB server that serves it."""

    def __init__(self, console: Console, *, keymap=None, password: str | None = None,
                 name: str = "QEMU", max_clients: int = 32, lossy: bool = False, tls=None,
                 websocket_origins: tuple[str, ...] = ()):
        self.console = console
        self.keymap = keymap
        self.server = RfbServer(self, password=password, name=name, max_clients=max_clients,
                                lossy=lossy, tls=tls, websocket_origins=websocket_origins)
        self._sessions: dict[RfbSession, InputState] = {}    # attached, with their input state
        self._listening = False

    # ------------------------------------------------------------ serving
    async def listen(self, host: str, display: int, **kwargs) -> int:
        """Bind and serve (RfbServer.listen); returns the port."""
        return await self.server.listen(host, display, **kwargs)

    async def serve(self, listeners: VncListeners) -> None:
        await self.server.serve(listeners)

    async def close(self) -> None:
        await self.server.close()

    @property
    def budget(self):
        """The log budget of the lines clients can cause."""
        return self.server.budget

    def set_password(self, password: str | None) -> None:
        self.server.set_password(password)

    def expire_password(self) -> None:
        self.server.expire_password()

    # ------------------------------------------------------------ RfbDisplay
    def framebuffer(self) -> Surface:
        return self.console.surface

    convert_rect = staticmethod(convert_rect)        # the display converts; rfb/ only encodes
    conversion_path = staticmethod(conversion_path)

    def pointer_absolute(self) -> bool:
        return self.console.absolute_pointer

    def leds(self) -> int:
        return self.console.leds

    def session_attached(self, session: RfbSession) -> None:
        self._sessions[session] = InputState(self.keysym_decoder())
        if not self._listening:
            self._listening = True
            self.console.attach(self)

    def session_detached(self, session: RfbSession) -> None:
        self._sessions.pop(session, None)
        self.console.release_input(session)
        if self._listening and not self.server.attached_clients():
            self._listening = False
            self.console.detach(self)

    def session_free(self) -> None:
        self.console.display_ready()

    def session_input(self, session: RfbSession, event) -> None:
        state = self._sessions.get(session)
        if state is None:
            return
        if isinstance(event, rfb.PointerEvent):
            self._pointer(session, state, event)
        elif isinstance(event, rfb.KeyEvent):
            self._key(session, self._keysym_code(state, event.keysym, event.down), event.down)
        elif isinstance(event, rfb.ExtendedKeyEvent):
            code = self.qnum_to_linux(event.keycode) if event.keycode else None
            if code is None:
                code = self.keysym_to_linux(event.keysym)
            self._key(session, code, event.down)

    # ------------------------------------------------------------ console listener
    def console_update(self, rects: list[Rect]) -> None:
        self.server.mark_dirty(rects)

    def console_busy(self) -> bool:
        return self.server.all_busy()

    def console_resized(self, surface: Surface) -> None:
        self.server.resize_clients(surface.width, surface.height)

    def console_pointer_mode(self, absolute: bool) -> None:
        self.server.pointer_mode_changed(absolute)

    def console_leds(self, leds: int) -> None:
        self.server.leds_changed(leds)

    # ------------------------------------------------------------ input
    def _keysym_code(self, state: InputState, keysym: int, down: bool) -> int | None:
        """The layout's key for a keysym, chosen with this client's held modifiers."""
        decoder = state.keysyms
        if decoder is None:
            return self.keysym_to_linux(keysym)
        return decoder.press(keysym) if down else decoder.release(keysym)

    def _key(self, session: RfbSession, code: int | None, down: bool) -> None:
        if code:
            self.console.key(code, down, source=session)

    def _pointer(self, session: RfbSession, state: InputState, event: rfb.PointerEvent) -> None:
        console = self.console
        if not console.absolute_pointer and session.follows_pointer_type():
            # The session knows the pointer is relative: it sends offsets from an origin.
            console.pointer_rel(event.x - POINTER_ORIGIN, event.y - POINTER_ORIGIN)
        else:
            console.pointer_move(session, event.x, event.y)
        changed = event.buttons ^ state.buttons
        pressed = event.buttons & ~state.buttons
        state.buttons = event.buttons
        for bit, name in BUTTONS:
            if changed & bit:
                console.button(name, bool(event.buttons & bit), source=session)
        if pressed & WHEEL_UP:
            console.wheel(-1)
        if pressed & WHEEL_DOWN:
            console.wheel(1)

    # ------------------------------------------------------------ keymaps
    def _keymap(self):
        if self.keymap is None:
            try:
                from .console.keymap import Keymap
                self.keymap = Keymap.load()
            except ValueError as exc:
                log.warning("VNC: no keymap available (%s), keysym input dropped", exc)
                self.keymap = False
        return self.keymap or None

    def keysym_decoder(self):
        """QEMU's keysym rules for one client, when the keymap is one of ours."""
        from .console.keymap import Keymap, KeysymDecoder
        km = self._keymap()
        return KeysymDecoder(km) if isinstance(km, Keymap) else None

    def keysym_to_linux(self, keysym: int) -> int | None:
        km = self._keymap()
        return km.keysym_to_linux(keysym) if km is not None else None

    def qnum_to_linux(self, qnum: int) -> int | None:
        from .console.keymap import qnum_to_linux
        return qnum_to_linux(qnum)

    # ------------------------------------------------------------ QMP
    def query_clients(self) -> list[dict]:
        """The `clients` of QMP query-vnc."""
        return [{"host": c.host, "family": "ipv6" if ":" in c.host else "ipv4",
                 "service": c.peer.rsplit(":", 1)[-1], "websocket": c.mode is not Transport.RFB}
                for c in self.server.attached_clients()]

