"""Thumbnails: one long-lived RFB connection per domain, only while someone looks.

A request for a domain's thumbnail marks it *wanted* for `idle` seconds.
While wanted, the domain's watcher task keeps one connection open and asks
for an incremental update every `interval` seconds (the server answers when
something changed); once nobody asked for `idle` seconds it closes the
connection and forgets the picture.  Nobody looking costs nothing.
A console that asks for a password is remembered as locked: no picture, and
no reconnecting until its XenStore entry changes.
"""
from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .domains import Domain
from .rfbclient import PasswordRequired, RfbClient, RfbError

log = logging.getLogger(__name__)

THUMB_MAX = (320, 240)
RETRY_AFTER = 5.0           # a console that refused or failed: wait this long before trying again


def downscale(rgb: np.ndarray, box: tuple[int, int] = THUMB_MAX) -> Image.Image:
    """The thumbnail of an (h, w, 3) RGB picture: aspect kept, Pillow's box filter
    (exact averages, the same result for the same input everywhere)."""
    h, w = rgb.shape[:2]
    scale = min(box[0] / w, box[1] / h, 1.0)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return Image.fromarray(rgb, "RGB").resize(size, Image.Resampling.BOX)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class _Watcher:
    domain: Domain
    wanted_until: float = 0.0
    frame: asyncio.Event = field(default_factory=asyncio.Event)   # a picture is there
    task: asyncio.Task | None = None
    client: RfbClient | None = None
    size: tuple[int, int] | None = None     # last size seen (kept after closing)
    locked: bool = False
    generation: int = 0                     # bumped on each update received
    png: tuple[int, bytes] | None = None    # (generation, PNG) cache
    failed_at: float = 0.0
    failures: int = 0                       # in a row: only the first is a warning


class ThumbnailService:
    def __init__(self, interval: float = 2.0, idle: float = 10.0):
        self.interval, self.idle = interval, idle
        self._watchers: dict[int, _Watcher] = {}

    def domain_changed(self, domid: int, domain: Domain | None) -> None:
        """From the directory: a domain went, or its console moved."""
        w = self._watchers.get(domid)
        if w is None or w.domain == domain:
            return
        self._stop(w)
        if domain is None:
            del self._watchers[domid]
        else:
            self._watchers[domid] = _Watcher(domain, size=w.size if w.domain.vnc_port == domain.vnc_port else None)

    def info(self, domid: int) -> tuple[tuple[int, int] | None, bool]:
        """(size, locked) as far as known."""
        w = self._watchers.get(domid)
        return (w.size, w.locked) if w else (None, False)

    def active_connections(self) -> int:
        return sum(1 for w in self._watchers.values() if w.client is not None)

    async def thumbnail(self, domain: Domain, wait: float = 5.0) -> bytes | None:
        """PNG of the domain's picture, or None (locked, unreachable, no frame in `wait` s)."""
        w = self._watchers.get(domain.domid)
        if w is None or w.domain != domain:
            if w is not None:
                self._stop(w)
            w = self._watchers[domain.domid] = _Watcher(domain)
        w.wanted_until = time.monotonic() + self.idle
        if w.locked:
            return None
        if w.task is None or w.task.done():
            if time.monotonic() - w.failed_at < RETRY_AFTER:
                return None
            w.frame.clear()
            w.task = asyncio.create_task(self._watch(w), name=f"thumb-{domain.domid}")
        if not w.frame.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(w.frame.wait()), wait)
            except asyncio.TimeoutError:
                return None
        client = w.client
        if client is None or w.generation == 0:
            return None
        if w.png is None or w.png[0] != w.generation:
            gen, rgb = w.generation, client.rgb()
            # Resizing and PNG encoding release the GIL: off the loop.
            w.png = (gen, await asyncio.to_thread(lambda: png_bytes(downscale(rgb))))
        return w.png[1]

    def _stop(self, w: _Watcher) -> None:
        if w.task is not None:
            w.task.cancel()
            w.task = None
        if w.client is not None:
            w.client.close()
            w.client = None
        w.frame.clear()

    async def close(self) -> None:
        for w in self._watchers.values():
            self._stop(w)

    async def _watch(self, w: _Watcher) -> None:
        d = w.domain
        reader = None
        try:
            w.client = client = await RfbClient.connect(d.vnc_host, d.vnc_port)
            w.generation = 0
            w.size = (client.width, client.height)
            client.request(incremental=False)
            reader = asyncio.create_task(self._read_updates(w, client))
            while (remaining := w.wanted_until - time.monotonic()) > 0:
                await asyncio.wait({reader}, timeout=remaining)
                if reader.done():
                    reader.result()             # raises what ended it
                    break
            log.debug("console: domain %d: nobody looks, thumbnail connection closed", d.domid)
        except PasswordRequired as e:
            log.info("console: domain %d's VNC needs a password (%s): shown locked", d.domid, e)
            w.locked = True
        except (OSError, RfbError, asyncio.TimeoutError) as e:
            w.failures += 1
            (log.warning if w.failures == 1 else log.debug)(
                "console: domain %d thumbnail: VNC %s:%d: %s", d.domid, d.vnc_host, d.vnc_port,
                e or type(e).__name__)
            w.failed_at = time.monotonic()
        finally:
            if reader is not None:
                reader.cancel()
            if w.client is not None:
                w.client.close()
                w.client = None
            w.frame.set()                       # waiters see no client and give up at once
            w.png = None

    async def _read_updates(self, w: _Watcher, client: RfbClient) -> None:
        """Updates as they come; the next request only `interval` s after the last answer.
        (An incremental request is held by the server until something changes.)"""
        while True:
            resized = await client.update()
            w.failures = 0
            w.generation += 1
            w.size = (client.width, client.height)
            w.frame.set()
            await asyncio.sleep(self.interval)
            client.request(incremental=not resized)
