"""Fixtures for the VNC tests: a console with a known picture, a recording
input sink, and a VncDisplay on a free port in a background event loop."""
from __future__ import annotations

import asyncio
import socket
import threading

import numpy as np
import pytest

from pyxenfb.console.core import Console, Surface
from pyxenfb.convert import GUEST_32, to_rgb
from pyxenfb.vnc import VncDisplay
from pyxenfb.rfb.client import NEED_DATA, Connection, ServerInit
from pyxenfb.rfb.listener import VNC_BASE_PORT

KEY_A, KEY_B, KEY_ENTER = 30, 48, 28
STUB_KEYSYMS = {0x61: KEY_A, 0x62: KEY_B, 0xFF0D: KEY_ENTER}


class StubKeymap:
    """keysym 'a', 'b', Return -> KEY_A, KEY_B, KEY_ENTER."""

    def keysym_to_linux(self, keysym: int) -> int | None:
        return STUB_KEYSYMS.get(keysym)


def make_picture(width: int = 800, height: int = 600, seed: int = 0) -> Surface:
    """Gradient plus blocky 'text' plus flat areas: exercises every encoder path."""
    y, x = np.mgrid[0:height, 0:width].astype(np.uint32)
    r = (x * 255 // max(1, width - 1)) & 0xFF
    g = (y * 255 // max(1, height - 1)) & 0xFF
    b = ((x // 7 + y // 5 + seed) % 3) * 100
    words = (r << 16) | (g << 8) | b
    words[(y // 16) % 4 == 1] = 0x00FFFFFF                        # flat white bands
    text = ((x // 3 + y // 2 + seed) % 5 == 0) & ((y // 16) % 4 == 1)
    words[text] = 0x00102030                                     # two-colour "text"
    words[height // 2:, : width // 4] = 0x00336699               # a solid block
    rows = words.astype("<u4").view(np.uint8).reshape(height, width * 4)
    return Surface(width, height, width * 4, GUEST_32, np.ascontiguousarray(rows))


def expected_rgb(surface: Surface) -> np.ndarray:
    return to_rgb(surface.rows, surface.fmt, surface.width, surface.height)


class RecordingInput:
    """InputSink that remembers what it was told (thread-safe reads via list copy)."""

    def __init__(self):
        self.events: list[tuple] = []

    def key(self, code, down):
        self.events.append(("key", code, down))

    def pointer_abs(self, x, y, w, h):
        self.events.append(("abs", x, y))

    def pointer_rel(self, dx, dy):
        self.events.append(("rel", dx, dy))

    def wheel(self, dz):
        self.events.append(("wheel", dz))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A VncDisplay on 127.0.0.1 running in its own event-loop thread; with
    websocket=True also a WebSocket port (`ws_port`, as -vnc ...,websocket=)."""

    def __init__(self, surface: Surface | None = None, websocket: bool = False, **server_kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.input = RecordingInput()
        self.console: Console = self.call(Console, "test", self.loop)
        self.console.input = self.input
        self.call(self.console.set_surface, surface or make_picture())
        server_kwargs.setdefault("keymap", StubKeymap())
        self.display: VncDisplay = self.call(VncDisplay, self.console, **server_kwargs)
        self.server = self.display.server           # its RfbServer: sessions, limits, blacklist
        self.port = self.run(self._listen(websocket))
        self.ws_port = self.server.websocket_port

    async def _listen(self, websocket: bool):
        port = free_port()
        return await self.server.listen("127.0.0.1", port - VNC_BASE_PORT,
                                        websocket_port=free_port() if websocket else None)

    def call(self, fn, *args, **kwargs):
        """Run a plain function in the loop thread and return its result."""
        async def wrapper():
            return fn(*args, **kwargs)
        return self.run(wrapper())

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def set_surface(self, surface: Surface) -> None:
        self.call(self.console.set_surface, surface)

    def draw(self, surface_rows: np.ndarray, x: int, y: int, w: int, h: int) -> None:
        """Copy new pixels into the current surface and mark them dirty."""
        def do():
            s = self.console.surface
            s.rows[y:y + h, x * 4:(x + w) * 4] = surface_rows[y:y + h, x * 4:(x + w) * 4]
            self.console.invalidate(x, y, w, h)
        self.call(do)

    def client_count(self) -> int:
        return self.call(lambda: sum(1 for c in self.server.clients if c.attached))

    def close(self) -> None:
        self.run(self.display.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def vnc_server():
    srv = ServerThread()
    yield srv
    srv.close()


@pytest.fixture
def vnc_server_ws():
    """With a WebSocket port (ws_port), no browser origin allowed."""
    srv = ServerThread(websocket=True)
    yield srv
    srv.close()


@pytest.fixture
def vnc_server_lossy():
    """JPEG allowed, as with QEMU's -vnc ...,lossy=on."""
    srv = ServerThread(lossy=True)
    yield srv
    srv.close()


@pytest.fixture
def vnc_server_password():
    srv = ServerThread(password="s3cret")
    yield srv
    srv.close()


# ------------------------------------------------------------------ raw client
class RawClient:
    """A minimal blocking RFB client for protocol-level tests."""

    def __init__(self, port: int, timeout: float = 5.0, source: str | None = None):
        # source: another loopback address (all of 127.0.0.0/8 is local on
        # Linux) for a client the server must tell apart from 127.0.0.1.
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self, password: str | None = None, shared: bool = True, version=b"RFB 003.008\n"):
        """Up to ServerInit through the sans-IO client, reading exactly what it
        needs (the test reads the wire itself from there); the server's pixel
        format is kept."""
        conn = Connection(password, shared=shared, require_auth=password is not None,
                          send_pixel_format=False, version=version, decode=False)
        while (event := conn.next_event()) is NEED_DATA:
            self.send(conn.data_to_send())
            conn.receive_data(self.recv_exact(conn.wanted))
        self.send(conn.data_to_send())
        assert isinstance(event, ServerInit)
        assert conn.server_version == "RFB 003.008"
        assert conn.security_types == ([1] if password is None else [2])
        self.pixel_format, self.name = event.pixel_format, event.name
        self.width, self.height = event.width, event.height
        return event.width, event.height

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (reads and drops data)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ vncdotool
def _factory_for(encoding):
    """A vncdotool client factory that advertises exactly `encoding`
    (vncdotool decodes Hextile, ZRLE, RRE... but advertises only Raw)."""
    from vncdotool import client as vnc_client

    class Client(vnc_client.VNCDoToolClient):
        pass
    Client.encoding = encoding

    class Factory(vnc_client.VNCDoToolFactory):
        protocol = Client
    return Factory


def capture(port: int, encoding=None, password=None) -> np.ndarray:
    """One full-screen capture with vncdotool, as an (h, w, 3) RGB array."""
    from vncdotool import api, client as vnc_client
    factory = _factory_for(encoding) if encoding is not None else vnc_client.VNCDoToolFactory
    c = api.connect(f"127.0.0.1::{port}", password=password, factory_class=factory, timeout=20)
    try:
        return np.asarray(c.refreshScreen().screen.convert("RGB"))
    finally:
        c.disconnect()
