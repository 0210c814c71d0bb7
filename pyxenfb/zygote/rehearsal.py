"""A device model's everyday code, run once in the zygote before it forks.

CPython 3.11 writes into a code object the first times it runs (warm-up
counters, then the specialised bytecode), and libraries fill caches on first
use.  Done in a zygote child, each such write copies a page the zygote
shares with every other child.  Measured: the same VNC work right after
fork() dirtied 6.9 MiB cold and 2.7 MiB once the zygote had rehearsed it.

The rehearsal, in a private event loop with the device model's log
handler writing to nowhere: a XenStore session (a minimal responder,
xs_responder.py, on a temporary socket: the real wire protocol) with reads, writes, a
transaction and a watch; the resolver's first lookup (glibc loads its NSS
modules then); a VNC session on a socketpair: a 64x64 console picture
(flat, two-colour, few-colour and gradient areas) served in every encoding
and three pixel formats, with keys, pointer and incremental updates; and
libxl's argv through the option parser.  Updates this small are encoded on
the loop, so no thread starts (a zygote must not have one when it forks).
A rehearsal that fails costs memory, never the zygote: the caller logs it
and serves on.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
import socket
import struct
import tempfile

import numpy as np

from ..rfb import encodings as enc
from ..rfb.listener import VNC_BASE_PORT
from ..rfb.states import ClientMsg, SecurityType

SIZE = 64
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STEP_LIMIT = 2000               # loop iterations to wait for one reply (no clocks: nothing sleeps)

# Encodings a client asks for: each one in turn, with the pseudo-encodings
# real clients add (DesktopSize, LED state, QEMU pointer motion change, QEMU
# extended keys, CompressLevel 6).
_ENCODINGS = (enc.TIGHT, enc.ZRLE, enc.HEXTILE, enc.ZLIB, enc.RRE, enc.RAW, enc.TIGHT_PNG)
_PSEUDO = (enc.DESKTOP_SIZE, enc.QEMU_LED_STATE, enc.POINTER_TYPE_CHANGE, enc.QEMU_EXT_KEY,
           enc.COMPRESS_LEVEL_MIN + 6)
# SetPixelFormat bodies: 32bpp true colour, RGB565, BGR233.
_FORMATS = (
    struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0),
    struct.pack(">BBBBHHHBBB3x", 16, 16, 0, 1, 31, 63, 31, 11, 5, 0),
    struct.pack(">BBBBHHHBBB3x", 8, 8, 0, 1, 7, 7, 3, 0, 3, 6),
)
LIBXL_ARGV = ["-xen-domid", "1", "-chardev",
              "socket,id=libxl-cmd,path=/run/xen/qmp-libxl-1,server=on,wait=off",
              "-mon", "chardev=libxl-cmd,mode=control", "-nodefaults", "-no-user-config",
              "-xen-attach", "-name", "rehearsal", "-vnc", "127.0.0.1:0,to=99",
              "-display", "none", "-k", "en-us", "-machine", "xenpv", "-m", "64"]


class _NoInput:
    """The console's input sink: the rehearsal's keys go nowhere."""

    def key(self, code, down):
        pass

    def pointer_abs(self, x, y, w, h):
        pass

    def pointer_rel(self, dx, dy):
        pass

    def wheel(self, dz):
        pass


def picture(seed: int = 0) -> np.ndarray:
    """SIZE x SIZE guest pixels (x8r8g8b8 rows) with an area for each
    encoder path: solid, two colours, a few colours, many colours."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.uint32)
    words = ((x * 4 + seed) << 16) | ((y * 4) << 8) | ((x ^ y) & 0xFF)     # gradient
    words[:16] = 0x00336699                                               # solid band
    words[16:32] = np.where((x[16:32] + y[16:32] + seed) % 3 == 0, 0x00FFFFFF, 0x00102030)
    words[32:40] = ((x[32:40] // 8) % 6) * 0x00202020                      # few colours
    return np.ascontiguousarray(words.astype("<u4").view(np.uint8).reshape(SIZE, SIZE * 4))


class _Session:
    def __init__(self, server, sock: socket.socket):
        self.server = server
        self.sock = sock

    async def reply(self, predicate=None) -> bytes:
        """What the server sends back, once predicate() holds (or at once)."""
        for _ in range(STEP_LIMIT):
            if predicate is None or predicate():
                break
            await asyncio.sleep(0)
        else:
            raise TimeoutError("the rehearsal's VNC server did not answer")
        await asyncio.sleep(0)
        data = bytearray()
        with contextlib.suppress(BlockingIOError):
            while chunk := self.sock.recv(1 << 16):
                data += chunk
        return bytes(data)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    async def update(self, incremental: bool) -> None:
        client = self.server.clients[0]
        sent = client.updates_sent
        self.send(struct.pack(">BBHHHH", ClientMsg.FRAMEBUFFER_UPDATE_REQUEST, int(incremental),
                              0, 0, SIZE, SIZE))
        await self.reply(lambda: client.updates_sent > sent)


async def _vnc_session(loop: asyncio.AbstractEventLoop) -> None:
    from ..console.core import Console, Surface
    from ..convert import GUEST_32
    from ..console.keymap import Keymap
    from ..rfb.listener import Transport
    from ..rfb.server import RfbSession
    from ..vnc import VncDisplay

    console = Console("rehearsal", loop)
    console.input = _NoInput()
    console.set_surface(Surface(SIZE, SIZE, SIZE * 4, GUEST_32, picture()))
    server = VncDisplay(console, keymap=Keymap.load("en-us")).server
    ours, theirs = socket.socketpair()
    try:
        theirs.setblocking(False)
        await loop.connect_accepted_socket(lambda: RfbSession(server, Transport.RFB), ours)
        session = _Session(server, theirs)
        await session.reply(lambda: bool(server.clients))
        session.send(b"RFB 003.008\n")
        await session.reply()
        session.send(bytes([SecurityType.NONE]))
        await session.reply()
        session.send(b"\x01")                           # ClientInit: shared
        await session.reply(lambda: server.clients[0].attached)
        for n, fmt in enumerate(_FORMATS):
            session.send(bytes([ClientMsg.SET_PIXEL_FORMAT, 0, 0, 0]) + fmt)
            for i, encoding in enumerate(_ENCODINGS):
                codes = (encoding, *_PSEUDO)
                session.send(struct.pack(f">BxH{len(codes)}i", ClientMsg.SET_ENCODINGS, len(codes), *codes))
                await session.update(incremental=False)
                console.surface.rows[:] = picture(seed=8 * n + i + 1)
                console.invalidate(0, 0, SIZE, SIZE)
                await session.update(incremental=True)
        for down in (1, 0):
            session.send(struct.pack(">BBxxI", ClientMsg.KEY_EVENT, down, 0x61))      # 'a'
            session.send(struct.pack(">BBHH", ClientMsg.POINTER_EVENT, down, SIZE // 2, SIZE // 3))
        session.send(struct.pack(">BxxxI", ClientMsg.CLIENT_CUT_TEXT, 4) + b"text")
        await session.reply()
    finally:
        theirs.close()
        await asyncio.sleep(0)
        await server.close()
        ours.close()


async def _xenstore_session() -> None:
    from ..platform.xenstore import XenStore
    from .xs_responder import Responder

    with tempfile.TemporaryDirectory(prefix="pyxenfb-rehearsal-") as run_dir:
        daemon = Responder(run_dir)
        await daemon.start()
        try:
            xs = await XenStore.open(daemon.socket_path)
            try:
                seen: list[str] = []
                await xs.watch("/rehearsal", "token", lambda path, token: seen.append(path))
                await xs.write("/rehearsal/state", "1")
                await xs.read_str("/rehearsal/state")
                await xs.read_int("/rehearsal/state")
                await xs.read("/rehearsal/missing", None)
                await xs.mkdir("/rehearsal/dir")
                await xs.directory("/rehearsal")
                await xs.get_perms("/rehearsal")
                await xs.transaction(lambda tx: xs.write("/rehearsal/tx", "2", tx=tx))
                await xs.rm("/rehearsal/dir")
                for _ in range(STEP_LIMIT):
                    if len(seen) >= 2:
                        break
                    await asyncio.sleep(0)
                await xs.unwatch("/rehearsal", "token")
            finally:
                xs.close()
        finally:
            await daemon.close()


def _resolve() -> None:
    for host in ("127.0.0.1", "localhost", None):
        with contextlib.suppress(OSError):
            socket.getaddrinfo(host, VNC_BASE_PORT, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)


async def _sessions() -> None:
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:                # as the machine's loop has them
        loop.add_signal_handler(sig, lambda: None)
    try:
        await _xenstore_session()
        _resolve()
        await _vnc_session(loop)
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)


def rehearse(cli=None) -> None:
    """Run the rehearsal (raises what went wrong; the zygote logs it).
    cli: pyxenfb.machine.cli, given by the zygote (an entry point may import the
    cli; this module may not): its log handler and option parser."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    if cli is not None:
        cli.setup_logging(0, stream=io.StringIO())
    else:
        root.setLevel(logging.CRITICAL)     # its connects and disconnects are nobody's news
    try:
        asyncio.run(_sessions())
        if cli is not None:
            cli.parse_args(list(LIBXL_ARGV))
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
