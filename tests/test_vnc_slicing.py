"""A big update is encoded a band at a time, so the event loop (input, QMP,
XenStore, other clients) keeps running while it is being encoded."""
from __future__ import annotations

import asyncio
import struct
import threading

import numpy as np

from pyxenfb.console import Surface
from pyxenfb.convert import GUEST_32
from pyxenfb.rfb import encodings as enc
from pyxenfb.rfb import protocol as rfb

from rfb_harness import RawClient, ServerThread

W, H = 1920, 1080


def noisy_surface() -> Surface:
    rng = np.random.default_rng(3)
    words = rng.integers(0, 1 << 24, (H, W), dtype=np.uint32)
    words[:, : W // 3] = 0x00336699                       # some flat area too
    rows = words.astype("<u4").view(np.uint8).reshape(H, W * 4)
    return Surface(W, H, W * 4, GUEST_32, np.ascontiguousarray(rows))


def read_zrle_update(c: RawClient) -> list[tuple]:
    assert c.recv_exact(1) == b"\0"
    _, n = struct.unpack(">BH", c.recv_exact(3))
    rects = []
    for _ in range(n):
        x, y, w, h, e = struct.unpack(">HHHHi", c.recv_exact(12))
        assert e == enc.ZRLE, e
        c.recv_exact(struct.unpack(">I", c.recv_exact(4))[0])
        rects.append((x, y, w, h))
    return rects


def test_big_update_comes_as_bands_that_tile_the_screen():
    """Sans-IO: a full ZRLE frame comes as 64-row bands (ZRLE's tile grid)."""
    surface = noisy_surface()
    conn = rfb.ServerConnection(W, H, "t")
    conn.encoding = enc.ZRLE
    conn._request = "full"
    conn.data_to_send()                                   # the version banner
    job = conn.begin_update(surface.rows, surface.fmt, [(0, 0, W, H)])
    steps = 1
    while job.step():
        steps += 1
    assert job.finish() > 0
    assert steps == -(-H // 64)
    data = conn.data_to_send()
    count = struct.unpack_from(">H", data, 2)[0]
    assert count == steps
    covered, pos = np.zeros((H, W), bool), 4
    for _ in range(count):
        x, y, w, h, e = struct.unpack_from(">HHHHi", data, pos)
        covered[y:y + h, x:x + w] = True
        pos += 12 + 4 + struct.unpack_from(">I", data, pos + 12)[0]
    assert pos == len(data) and covered.all()


def test_loop_keeps_running_while_two_clients_get_full_frames():
    """Other callbacks run while an update is half encoded (encoding it in one
    go, as before, would never let them see a job in progress)."""
    srv = ServerThread(noisy_surface())
    seen_mid_update = 0
    stop = threading.Event()

    async def heartbeat():
        nonlocal seen_mid_update
        while not stop.is_set():
            await asyncio.sleep(0)
            if any(c._job is not None for c in srv.server.clients):
                seen_mid_update += 1
    beat = asyncio.run_coroutine_threadsafe(heartbeat(), srv.loop)
    clients = []
    try:
        for _ in range(2):
            c = RawClient(srv.port)
            c.handshake()
            clients.append(c)
        for c in clients:
            c.send(struct.pack(">BxHi", 2, 1, enc.ZRLE) + struct.pack(">BBHHHH", 3, 0, 0, 0, W, H))
        for c in clients:
            rects = read_zrle_update(c)
            assert sum(w * h for _, _, w, h in rects) == W * H
    finally:
        stop.set()
        beat.result(10)
        for c in clients:
            c.close()
        srv.close()
    assert seen_mid_update >= 3, seen_mid_update
