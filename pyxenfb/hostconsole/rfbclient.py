"""A small asyncio RFB client: enough to keep a copy of a console's picture.

The asyncio transport around the sans-IO client (pyxenfb.rfb.client): it
asks for Raw + DesktopSize only (a server sends nothing else), security None
or VNC, the client's 32bpp B, G, R, X pixel format, incremental update
requests.  Every size the server announces is checked before anything is
read for it, so a hostile or broken server gets a closed connection, not our
memory.
"""
from __future__ import annotations

import asyncio

import numpy as np

from ..rfb.client import NEED_DATA, Connection, FramebufferUpdate, PasswordRequired, RfbError, ServerInit
from ..rfb.states import DESKTOP_SIZE, RAW

__all__ = ["PasswordRequired", "RfbClient", "RfbError"]


class RfbClient:
    """One connection.  `await RfbClient.connect(...)`, then `await update()`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 password: str | None = None):
        self.reader, self.writer = reader, writer
        self.conn = Connection(password, encodings=[RAW, DESKTOP_SIZE])

    @property
    def width(self) -> int:
        return self.conn.width

    @property
    def height(self) -> int:
        return self.conn.height

    @property
    def name(self) -> str:
        return self.conn.name

    @property
    def pixels(self) -> np.ndarray | None:
        """(h, w, 4) uint8: B, G, R, X (a view of the connection's picture)."""
        if not self.conn.width:
            return None
        return np.frombuffer(self.conn.fb, np.uint8).reshape(self.conn.height, self.conn.width, 4)

    @classmethod
    async def connect(cls, host: str, port: int, password: str | None = None,
                      timeout: float = 10.0) -> "RfbClient":
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        self = cls(reader, writer, password)
        try:
            await asyncio.wait_for(self._until(ServerInit), timeout)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self.writer.close()

    async def _until(self, kind: type):
        """Feed the connection until an event of `kind`; others are dropped."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                out = self.conn.data_to_send()
                if out:
                    self.writer.write(out)
                    await self.writer.drain()
                self.conn.receive_data(await self.reader.read(1 << 16))
            elif isinstance(event, kind):
                out = self.conn.data_to_send()
                if out:
                    self.writer.write(out)
                    await self.writer.drain()
                return event

    def request(self, incremental: bool) -> None:
        self.conn.request(incremental)
        self.writer.write(self.conn.data_to_send())

    async def update(self) -> bool:
        """Read server messages until one framebuffer update is complete.

        Returns True when it changed the size (the caller asks for a full
        frame then)."""
        return (await self._until(FramebufferUpdate)).resized

    def rgb(self) -> np.ndarray:
        """A copy of the picture as (h, w, 3) RGB."""
        return self.pixels[:, :, 2::-1].copy()
