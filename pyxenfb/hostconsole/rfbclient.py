"""A small asyncio RFB client: enough to keep a copy of a console's picture.

Handshake (3.3, 3.7, 3.8), security None or VNC (pyxenfb.rfb.auth), a
32bpp little-endian true-colour pixel format, encodings Raw + DesktopSize
only (a server sends nothing else), incremental update requests.  Every
size the server announces is checked before anything is read for it, so a
hostile or broken server gets a closed connection, not our memory.
"""
from __future__ import annotations

import asyncio
import struct

import numpy as np

from ..rfb.auth import vnc_response

MAX_SIDE = 8192                 # larger than any Xen PV framebuffer (2 GiB video RAM cap aside)
MAX_NAME = 4096
MAX_CUT_TEXT = 1 << 20
MAX_COLOUR_ENTRIES = 256
MAX_RECTS = 1 << 16
ENC_RAW, ENC_DESKTOP_SIZE = 0, -223
SEC_NONE, SEC_VNC = 1, 2
# 32bpp, depth 24, little-endian, true colour, R at bit 16, G at 8, B at 0:
# the xen-fbfront format, so pyqemu-dm and QEMU send their surface unconverted.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


class RfbError(Exception):
    """The server broke the protocol or refused us; str() is the reason."""


class PasswordRequired(RfbError):
    """The server offers no security type we can satisfy without a password."""


class RfbClient:
    """One connection.  `await RfbClient.connect(...)`, then `await update()`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.width = self.height = 0
        self.name = ""
        self.pixels: np.ndarray | None = None   # (h, w, 4) uint8: B, G, R, X

    @classmethod
    async def connect(cls, host: str, port: int, password: str | None = None,
                      timeout: float = 10.0) -> "RfbClient":
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        self = cls(reader, writer)
        try:
            await asyncio.wait_for(self._handshake(password), timeout)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self.writer.close()

    async def _read(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise RfbError("server closed the connection") from None

    async def _reason(self) -> str:
        (n,) = struct.unpack(">I", await self._read(4))
        return (await self._read(min(n, MAX_NAME))).decode("utf-8", "replace")

    async def _handshake(self, password: str | None) -> None:
        version = await self._read(12)
        if not (version.startswith(b"RFB 003.") and version.endswith(b"\n")):
            raise RfbError(f"not an RFB server: {version!r}")
        minor = int(version[8:11]) if version[8:11].isdigit() else 0
        minor = 8 if minor >= 8 else 7 if minor == 7 else 3
        self.writer.write(b"RFB 003.%03d\n" % minor)
        if minor == 3:
            (chosen,) = struct.unpack(">I", await self._read(4))
            if chosen == 0:
                raise RfbError(f"server refused: {await self._reason()}")
            offered = [chosen]
        else:
            (count,) = await self._read(1)
            if count == 0:
                raise RfbError(f"server refused: {await self._reason()}")
            offered = list(await self._read(count))
            chosen = SEC_NONE if SEC_NONE in offered else SEC_VNC if SEC_VNC in offered else 0
        if chosen == SEC_VNC and password is None or chosen not in (SEC_NONE, SEC_VNC):
            raise PasswordRequired(f"server wants security types {offered}")
        if minor != 3:
            self.writer.write(bytes([chosen]))
        if chosen == SEC_VNC:
            self.writer.write(vnc_response(password, await self._read(16)))
        if chosen == SEC_VNC or minor == 8:
            (result,) = struct.unpack(">I", await self._read(4))
            if result != 0:
                reason = await self._reason() if minor == 8 else "authentication failed"
                raise RfbError(f"security result {result}: {reason}")
        self.writer.write(b"\x01")                                  # ClientInit: shared
        w, h = struct.unpack(">HH", await self._read(4))
        await self._read(16)                                        # its pixel format: we set ours
        (name_len,) = struct.unpack(">I", await self._read(4))
        if name_len > MAX_NAME:
            raise RfbError(f"desktop name of {name_len} bytes")
        self.name = (await self._read(name_len)).decode("utf-8", "replace")
        self._resize(w, h)
        self.writer.write(b"\x00\x00\x00\x00" + PIXEL_FORMAT)        # SetPixelFormat
        self.writer.write(struct.pack(">BxHii", 2, 2, ENC_RAW, ENC_DESKTOP_SIZE))
        await self.writer.drain()

    def _resize(self, w: int, h: int) -> None:
        if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
            raise RfbError(f"framebuffer size {w}x{h} out of range")
        self.width, self.height = w, h
        self.pixels = np.zeros((h, w, 4), np.uint8)

    def request(self, incremental: bool) -> None:
        self.writer.write(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))

    async def update(self) -> bool:
        """Read server messages until one framebuffer update is complete.

        Returns True when it changed the size (the caller asks for a full
        frame then)."""
        while True:
            (msg,) = await self._read(1)
            if msg == 0:
                return await self._framebuffer_update()
            if msg == 1:                                    # SetColourMapEntries: not for true colour
                _, _, count = struct.unpack(">BHH", await self._read(5))
                if count > MAX_COLOUR_ENTRIES:
                    raise RfbError(f"{count} colour map entries")
                await self._read(6 * count)
            elif msg == 2:                                  # Bell
                pass
            elif msg == 3:                                  # ServerCutText: read and drop
                (n,) = struct.unpack(">3xI", await self._read(7))
                if n > MAX_CUT_TEXT:
                    raise RfbError(f"cut text of {n} bytes")
                await self._read(n)
            else:
                raise RfbError(f"unexpected server message type {msg}")

    async def _framebuffer_update(self) -> bool:
        (count,) = struct.unpack(">xH", await self._read(3))
        if count > MAX_RECTS:
            raise RfbError(f"{count} rectangles in one update")
        resized = False
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await self._read(12))
            if encoding == ENC_DESKTOP_SIZE:
                self._resize(w, h)
                resized = True
            elif encoding == ENC_RAW:
                if x + w > self.width or y + h > self.height:
                    raise RfbError(f"rectangle {w}x{h}+{x}+{y} outside {self.width}x{self.height}")
                data = await self._read(w * h * 4)
                self.pixels[y:y + h, x:x + w] = np.frombuffer(data, np.uint8).reshape(h, w, 4)
            else:
                raise RfbError(f"encoding {encoding} we did not ask for")
        return resized

    def rgb(self) -> np.ndarray:
        """A copy of the picture as (h, w, 3) RGB."""
        return self.pixels[:, :, 2::-1].copy()
