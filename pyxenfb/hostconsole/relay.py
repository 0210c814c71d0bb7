"""Relay raw RFB between a browser's WebSocket and a domain's VNC port.

Bytes are passed through untouched: the domain's VNC authentication runs
between noVNC and the VNC server, end to end.  Backpressure both ways: we
read the VNC socket only after the previous chunk went into the WebSocket
(aiohttp's send waits for its transport to drain), and read the WebSocket
only after the previous message was drained into the VNC socket, so a slow
side stalls the other instead of filling memory.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
CONNECT_TIMEOUT = 10.0


async def relay(ws: web.WebSocketResponse, host: str, port: int, label: str,
                stop: asyncio.Event | None = None) -> None:
    """Until either side closes, or `stop` is set (the session that opened it
    ended): then both sockets are closed."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as e:
        log.warning("console: %s: cannot reach VNC %s:%d: %s", label, host, port, e)
        await ws.close(code=1011, message=b"VNC server unreachable")
        return
    # The output buffer before drain() blocks; the read side stops at CHUNK per read.
    writer.transport.set_write_buffer_limits(high=CHUNK)

    async def vnc_to_browser() -> None:
        while data := await reader.read(CHUNK):
            await ws.send_bytes(data)

    async def browser_to_vnc() -> None:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                writer.write(msg.data)
                await writer.drain()
            elif msg.type == WSMsgType.TEXT:
                log.warning("console: %s: text frame from the browser ignored (RFB is binary)", label)
            elif msg.type == WSMsgType.ERROR:
                log.warning("console: %s: WebSocket error %s", label, ws.exception())
                return

    tasks = [asyncio.create_task(vnc_to_browser()), asyncio.create_task(browser_to_vnc())]
    stopper = asyncio.create_task((stop or asyncio.Event()).wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and not t.cancelled() and t.exception() is not None:
                log.info("console: %s: relay ended: %s", label, t.exception())
    finally:
        for t in (*tasks, stopper):
            t.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)
        writer.close()
        if not ws.closed:
            if stop is not None and stop.is_set():
                log.info("console: %s: session ended; console closed", label)
                await ws.close(code=1008, message=b"session ended")
            else:
                await ws.close()
