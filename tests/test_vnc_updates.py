"""The update path: one guest batch, one FramebufferUpdate; encoding in
worker threads that neither input nor other clients wait for; one
conversion per pixel format shared by the clients; snapshot buffers reused."""
from __future__ import annotations

import asyncio
import struct
import threading

import numpy as np
import pytest

from pyxenfb.devices import xenfb_abi as abi
from pyxenfb.console.core import Surface
from pyxenfb.convert import GUEST_32
from pyxenfb.rfb import client as rfb_client, encodings as enc
from pyxenfb import xenfb
from pyxenfb.vnc import VncDisplay

from rfb_harness import KEY_A, RawClient, ServerThread
from simkit import RawVncClient as AsyncRawClient, connected_domain, wait_connected, wait_for, wait_until

W, H = 1920, 1080


def noisy_surface(width: int = W, height: int = H) -> Surface:
    rng = np.random.default_rng(3)
    words = rng.integers(0, 1 << 24, (height, width), dtype=np.uint32)
    words[:, : width // 3] = 0x00336699                       # some flat area too
    rows = words.astype("<u4").view(np.uint8).reshape(height, width * 4)
    return Surface(width, height, width * 4, GUEST_32, np.ascontiguousarray(rows))


def read_update(c: RawClient, bpp: int = 4) -> list[tuple]:
    """One FramebufferUpdate: [(x, y, w, h, encoding, payload)] (Raw and
    Tight's basic/fill payloads are returned as read)."""
    assert c.recv_exact(1) == b"\0"
    _, n = struct.unpack(">BH", c.recv_exact(3))
    rects = []
    for _ in range(n):
        x, y, w, h, e = struct.unpack(">HHHHi", c.recv_exact(12))
        if e == enc.RAW:
            payload = c.recv_exact(w * h * bpp)
        elif e == enc.ZRLE:
            payload = c.recv_exact(struct.unpack(">I", c.recv_exact(4))[0])
        else:
            raise AssertionError(f"unexpected encoding {e}")
        rects.append((x, y, w, h, e, payload))
    return rects


def full_request(c: RawClient, incremental: bool = False, w: int = W, h: int = H) -> None:
    c.send(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, w, h))


def test_one_guest_batch_is_one_framebuffer_update():
    """The guest puts 8 UPDATEs on its ring and notifies once (as a busy
    xen-fbfront does between two backend passes): a client whose request is
    pending gets all 8 rectangles in a single FramebufferUpdate."""
    rects = [(20 + 90 * i, 10 + 60 * i, 40 + i, 30 + 2 * i) for i in range(8)]

    async def body():
        async with connected_domain(1) as (run_dir, guest, be, listener):
            vnc = VncDisplay(be.console, name="sim")
            port = await vnc.listen("127.0.0.1", 0, to_display=99)
            client = AsyncRawClient("c")
            await client.connect(port)
            reader = asyncio.create_task(client.read_updates())
            await wait_for(lambda: client.updates == 1, what="first frame")
            await wait_for(lambda: vnc.server.clients[0].conn.pending_request == "incremental",
                           what="the next request pending at the server")
            for i, (x, y, w, h) in enumerate(rects):
                guest.fb.fb[y:y + h, x:x + w] = 0x00102030 * (i + 1) & 0xFFFFFF
                guest.fb.push_out_event(abi.pack_event(abi.FB_UPDATE, abi.XENFB_TYPE_UPDATE, x, y, w, h),
                                        notify=i == len(rects) - 1)
            await wait_for(lambda: client.updates == 2, what="the batch's update")
            await wait_for(lambda: np.array_equal(client.picture, guest.fb.fb), what="pixels")
            reader.cancel()
            assert client.updates == 2, "the batch came in more than one update"
            assert sorted(client.last_rects) == sorted(rects)
            client.w.close()
            await vnc.close()
    asyncio.run(asyncio.wait_for(body(), 60))


class EncodeGate:
    """Holds encodes in the worker threads until opened (a stuck encoder):
    those of `encoding` (None: any), while armed."""

    def __init__(self, monkeypatch, encoding: int | None = enc.TIGHT, armed: bool = True):
        self.armed, self.waiting, self.opened = threading.Event(), threading.Event(), threading.Event()
        if armed:
            self.armed.set()
        real = enc.Encoder.encode_chunks

        def gated(encoder, kind, *args, **kwargs):
            if (self.armed.is_set() and encoding in (None, kind)
                    and threading.current_thread().name.startswith("vnc-encode")):
                self.waiting.set()
                assert self.opened.wait(30), "gate never opened"
            return real(encoder, kind, *args, **kwargs)
        monkeypatch.setattr(enc.Encoder, "encode_chunks", gated)


class HextileClient:
    """Our decoding client (pyxenfb.rfb.client) on an asyncio stream, asking
    for Hextile: big updates are encoded in the worker threads (Raw never is)."""

    def __init__(self):
        self.conn = rfb_client.Connection(encodings=[enc.HEXTILE])
        self.updates, self.last_rects = 0, []

    async def connect(self, port: int) -> asyncio.Task:
        self.r, self.w = await asyncio.open_connection("127.0.0.1", port)
        return asyncio.create_task(self._run())

    @property
    def picture(self) -> np.ndarray:
        c = self.conn
        return np.frombuffer(bytes(c.fb), "<u4").reshape(c.height, c.width) & 0xFFFFFF

    async def _run(self) -> None:
        conn = self.conn
        while True:
            self.w.write(conn.data_to_send())
            data = await self.r.read(1 << 16)
            conn.receive_data(data)
            if not data:
                return
            while (event := conn.next_event()) is not rfb_client.NEED_DATA:
                if isinstance(event, rfb_client.ServerInit):
                    conn.request(incremental=False)
                elif isinstance(event, rfb_client.FramebufferUpdate):
                    self.updates += 1
                    self.last_rects = [(r.x, r.y, r.w, r.h) for r in event.rects if r.encoding >= 0]
                    conn.request(incremental=True)


async def _client_with_an_update_in_the_encoder(guest, be, held: EncodeGate):
    """A VNC client of the domain whose second update sits in the encoder."""
    vnc = VncDisplay(be.console, name="sim")
    port = await vnc.listen("127.0.0.1", 0, to_display=99)
    client = HextileClient()
    reader = await client.connect(port)
    await wait_for(lambda: client.updates == 1, what="first frame")
    await wait_for(lambda: vnc.server.clients[0].conn.pending_request == "incremental",
                   what="the next request pending at the server")
    held.armed.set()
    guest.fb.fb[0:200, 0:200] = 0x00ABCDEF         # more than updates.INLINE_PIXELS: a worker's
    guest.fb.refresh(0, 0, 200, 200)
    await wait_for(held.waiting.is_set, what="the update in the encoder")
    return vnc, client, reader


async def _close(held: EncodeGate, vnc, client, reader) -> None:
    held.opened.set()
    reader.cancel()
    client.w.close()
    await vnc.close()


def _run_held(held: EncodeGate, body) -> None:
    try:
        asyncio.run(asyncio.wait_for(body(), 60))
    finally:
        held.opened.set()           # a failed test must not leave a worker waiting


def _repaint(guest, rects, colour: int) -> None:
    for x, y, w, h in rects:
        guest.fb.fb[y:y + h, x:x + w] = colour
        guest.fb.push_out_event(abi.pack_event(abi.FB_UPDATE, abi.XENFB_TYPE_UPDATE, x, y, w, h))


def test_guest_updates_wait_in_the_ring_while_the_client_has_an_update_made(monkeypatch):
    """A guest repainting faster than its client takes pictures: while the
    client's update is encoded, the guest's UPDATEs stay in the out ring (its
    port masked: no wake-up, ring walk and notify per repaint); once that
    update is made they are all taken, and the next update carries them."""
    held = EncodeGate(monkeypatch, encoding=None, armed=False)   # armed once a client waits
    rects = [(100, 100, 30, 20), (300, 200, 40, 10), (500, 400, 20, 50)]

    async def body():
        async with connected_domain(1) as (run_dir, guest, be, listener):
            vnc, client, reader = await _client_with_an_update_in_the_encoder(guest, be, held)
            taken, holds = be.fb.updates, be.fb.holds
            _repaint(guest, rects, 0x00405060)
            await wait_for(lambda: be.fb.holds == holds + 1, what="the out ring held")
            assert be.fb.updates == taken, "an UPDATE was taken while the client's update was made"
            assert guest.fb.u32(abi.FB_OUT_PROD) - guest.fb.u32(abi.FB_OUT_CONS) == len(rects)

            held.armed.clear()
            held.opened.set()
            await wait_for(lambda: sorted(client.last_rects) == sorted(rects),
                           what="one update of the held changes")
            await wait_for(lambda: np.array_equal(client.picture, guest.fb.fb), what="pixels")
            assert be.fb.updates == taken + len(rects)
            assert be.fb.holds == holds + 1
            await _close(held, vnc, client, reader)
    _run_held(held, body)


def test_a_stuck_client_holds_the_guests_updates_at_most_hold_max(monkeypatch):
    """An update that never ends (a stuck encoder) holds the out ring for
    HOLD_MAX_S at most: a resize or a repaint still reaches the console."""
    held = EncodeGate(monkeypatch, encoding=None, armed=False)   # armed once a client waits
    monkeypatch.setattr(xenfb, "HOLD_MAX_S", 0.05)

    async def body():
        async with connected_domain(1) as (run_dir, guest, be, listener):
            vnc, client, reader = await _client_with_an_update_in_the_encoder(guest, be, held)
            taken, holds = be.fb.updates, be.fb.holds
            _repaint(guest, [(10, 20, 30, 40)], 0x00112233)
            await wait_for(lambda: be.fb.holds == holds + 1, what="the out ring held")
            await wait_for(lambda: be.fb.updates == taken + 1, what="the UPDATE taken after HOLD_MAX_S")
            assert vnc.server.clients[0].busy, "the client's update ended: not a stuck one"
            assert guest.fb.u32(abi.FB_OUT_PROD) == guest.fb.u32(abi.FB_OUT_CONS)
            await _close(held, vnc, client, reader)
    _run_held(held, body)


def test_a_guest_that_reconnects_while_held_is_served_again(monkeypatch):
    """The frontend closes and comes back (a module reload) while its out
    ring is held: the hold goes with the old connection, and the new one's
    UPDATEs are taken and shown."""
    held = EncodeGate(monkeypatch, encoding=None, armed=False)   # armed once a client waits

    async def body():
        async with connected_domain(1) as (run_dir, guest, be, listener):
            vnc, client, reader = await _client_with_an_update_in_the_encoder(guest, be, held)
            holds = be.fb.holds
            _repaint(guest, [(10, 20, 30, 40)], 0x00112233)
            await wait_for(lambda: be.fb.holds == holds + 1, what="the out ring held")
            await guest.reboot()
            await wait_connected(guest, be)
            held.armed.clear()
            held.opened.set()
            rect = (200, 150, 60, 30)
            await wait_for(lambda: not guest.fb.out_ring_busy(), what="the new frontend may send")
            _repaint(guest, [rect], 0x00A0B0C0)
            await wait_for(lambda: client.picture[150, 200] == 0x00A0B0C0, what="the new frontend's change shown")
            assert guest.fb.u32(abi.FB_OUT_PROD) == guest.fb.u32(abi.FB_OUT_CONS)
            await _close(held, vnc, client, reader)
    _run_held(held, body)


def test_a_display_that_takes_every_change_is_never_held(monkeypatch):
    """Beside a busy VNC client, a display that does not say it is busy (SDL
    draws every change at once) gets the guest's UPDATEs as they come."""
    held = EncodeGate(monkeypatch, encoding=None, armed=False)   # armed once a client waits

    async def body():
        async with connected_domain(1, attach=True) as (run_dir, guest, be, listener):
            vnc, client, reader = await _client_with_an_update_in_the_encoder(guest, be, held)
            taken, holds = be.fb.updates, be.fb.holds
            _repaint(guest, [(10, 20, 30, 40)], 0x00112233)
            await wait_for(lambda: be.fb.updates == taken + 1, what="the UPDATE taken")
            await wait_for(lambda: (10, 20, 30, 40) in listener.updates, what="the display's change")
            assert be.fb.holds == holds
            await _close(held, vnc, client, reader)
    _run_held(held, body)


def test_input_and_other_clients_go_on_while_a_1080p_update_is_encoded(monkeypatch):
    gate = EncodeGate(monkeypatch)
    srv = ServerThread(noisy_surface())
    slow, other = RawClient(srv.port), RawClient(srv.port, timeout=20)
    try:
        slow.handshake()
        slow.send(struct.pack(">BxHi", 2, 1, enc.TIGHT))
        full_request(slow)
        assert gate.waiting.wait(20), "the Tight update never reached a worker"
        assert srv.call(lambda: sum(c._job is not None for c in srv.server.clients)) == 1

        # While that update sits in a worker: input from another client...
        other.handshake()
        other.send(struct.pack(">BBxxI", 4, 1, 0x61) + struct.pack(">BBxxI", 4, 0, 0x61))
        wait_until(lambda: ("key", KEY_A, False) in srv.input.events, 10, "key events handled")
        # ... and a full 1080p frame for that client, encoded beside it.
        full_request(other)
        rects = read_update(other)
        assert sum(w * h for _, _, w, h, _, _ in rects) == W * H
        assert srv.call(lambda: sum(c._job is not None for c in srv.server.clients)) == 1

        gate.opened.set()
        assert slow.recv_exact(1) == b"\0"              # the slow client's update arrives
        assert struct.unpack(">xH", slow.recv_exact(3))[0] >= 1
    finally:
        gate.opened.set()
        slow.close()
        other.close()
        srv.close()


def test_clients_with_one_format_share_one_conversion(monkeypatch):
    calls = []
    real = VncDisplay.convert_rect

    def counting(*args, **kwargs):
        calls.append(args[3:7])
        return real(*args, **kwargs)
    monkeypatch.setattr(VncDisplay, "convert_rect", staticmethod(counting))    # the display converts
    picture = noisy_surface(640, 480)
    srv = ServerThread(Surface.blank(640, 480))
    clients = [RawClient(srv.port) for _ in range(3)]
    try:
        for c in clients:
            c.handshake()
            full_request(c, w=640, h=480)
            read_update(c)
        wait_until(lambda: srv.call(lambda: all(c.conn.pending_request is None
                                                for c in srv.server.clients)), 5, "first frames sent")
        for c in clients:
            full_request(c, incremental=True, w=640, h=480)
        wait_until(lambda: srv.call(lambda: all(c.conn.pending_request == "incremental"
                                                for c in srv.server.clients)), 5, "requests pending")
        calls.clear()
        srv.draw(picture.rows, 100, 50, 300, 200)
        updates = [read_update(c) for c in clients]
        assert updates[0] == updates[1] == updates[2]
        ((x, y, w, h, _, payload),) = updates[0]
        assert (x, y, w, h) == (100, 50, 300, 200)
        expected = picture.rows[50:250, 400:1600].tobytes()
        assert payload == expected
        assert calls == [(100, 50, 300, 200)], calls       # converted once, for all three
    finally:
        for c in clients:
            c.close()
        srv.close()


@pytest.mark.parametrize("encoding", [enc.ZRLE, enc.RAW])
def test_snapshot_buffers_are_reused_between_updates(encoding):
    """Raw sends views of the snapshot: once sent (or copied by the
    transport) nothing holds them, and the pool reuses the buffer."""
    srv = ServerThread(noisy_surface(800, 600))
    c = RawClient(srv.port)
    try:
        c.handshake()
        c.send(struct.pack(">BxHi", 2, 1, encoding))
        for _ in range(30):
            full_request(c, w=800, h=600)
            rects = read_update(c)
            assert sum(w * h for _, _, w, h, _, _ in rects) == 800 * 600
        assert srv.call(lambda: srv.server.updates._pool.allocations) <= 2
    finally:
        c.close()
        srv.close()


def test_held_input_released_once_by_the_console_when_a_client_goes():
    """Keys and buttons a VNC client holds are let go when it disconnects;
    another client's held key stays down."""
    srv = ServerThread()
    a, b = RawClient(srv.port), RawClient(srv.port)
    try:
        a.handshake()
        b.handshake()
        a.send(struct.pack(">BBxxI", 4, 1, 0x61) + struct.pack(">BBHH", 5, 1, 10, 10))
        b.send(struct.pack(">BBxxI", 4, 1, 0x62))
        wait_until(lambda: len([e for e in srv.input.events if e[0] == "key"]) == 3, 5, "presses")
        a.close()
        wait_until(lambda: ("key", 0x110, False) in srv.input.events, 5, "button released")
        keys = [e for e in srv.input.events if e[0] == "key"]
        assert ("key", KEY_A, False) in keys
        assert not any(e[1] == 48 and not e[2] for e in keys), "b's key was released too"
    finally:
        b.close()
        srv.close()


def test_log_says_which_conversion_a_client_gets(caplog):
    from pyxenfb.displays import pixman
    srv = ServerThread(noisy_surface(64, 48))
    c = RawClient(srv.port)
    try:
        c.handshake()
        with caplog.at_level("INFO", logger="pyxenfb.rfb.server"):
            # RGB565 little-endian
            c.send(struct.pack(">BxxxBBBBHHHBBBxxx", 0, 16, 16, 0, 1, 31, 63, 31, 11, 5, 0))
            full_request(c, w=64, h=48)
            assert c.recv_exact(1) == b"\0"
        path = "pixman" if pixman.available() else "numpy"
        assert any(f"16 bpp depth 16: conversion by {path}" in r.getMessage() for r in caplog.records)
    finally:
        c.close()
        srv.close()


def test_frame_buffers_let_go_when_the_last_client_leaves():
    from pyxenfb.util import malloc
    assert malloc.limit_arenas(1)                 # glibc: mallopt accepted
    srv = ServerThread(noisy_surface(800, 600))
    c = RawClient(srv.port)
    try:
        c.handshake()
        full_request(c, w=800, h=600)
        read_update(c)
        wait_until(lambda: srv.call(lambda: len(srv.server.updates._pool._free)) >= 1, 5, "a buffer back in the pool")
        c.close()
        wait_until(lambda: srv.call(lambda: not srv.server.clients and not srv.server.updates._pool._free),
                   5, "the pool emptied once nobody watches")
    finally:
        srv.close()


def test_periodic_trim_runs_at_most_once_per_interval(monkeypatch):
    from pyxenfb.util import malloc
    calls = []
    monkeypatch.setattr(malloc, "trim", lambda: calls.append(1))
    now = [100.0]
    trim = malloc.PeriodicTrim(1.0, clock=lambda: now[0])
    assert trim() is False                        # not a whole interval since it was made
    now[0] += 0.5
    assert trim() is False
    now[0] += 0.6
    assert trim() is True and calls == [1]
    assert trim() is False                        # the interval starts again
    now[0] += 1.0
    assert trim() is True and calls == [1, 1] and trim.trims == 2


def test_the_heap_is_trimmed_while_updates_flow(monkeypatch):
    """Every update is followed by the server's periodic trim (here with no
    interval): fragmented memory is not left resident until the client goes."""
    from pyxenfb.util import malloc
    srv = ServerThread(noisy_surface(800, 600))
    srv.call(lambda: setattr(srv.server.updates, "_trim", malloc.PeriodicTrim(0.0)))
    c = RawClient(srv.port)
    try:
        c.handshake()
        for _ in range(3):
            full_request(c, w=800, h=600)
            read_update(c)
        wait_until(lambda: srv.call(lambda: srv.server.updates._trim.trims) >= 3, 5, "three trims")
    finally:
        c.close()
        srv.close()


def _with_deferral(defer: float, act):
    """A connected client with an incremental request pending at a server
    whose deferral is `defer` seconds; act(vnc, guest, client) then runs."""
    async def body():
        async with connected_domain(1) as (run_dir, guest, be, listener):
            vnc = VncDisplay(be.console, name="sim")
            vnc.server.defer_update = defer
            port = await vnc.listen("127.0.0.1", 0, to_display=99)
            client = AsyncRawClient("c")
            await client.connect(port)
            reader = asyncio.create_task(client.read_updates())
            try:
                await wait_for(lambda: client.updates == 1, what="first frame")
                await wait_for(lambda: vnc.server.clients[0].conn.pending_request == "incremental",
                               what="the next request pending at the server")
                await act(vnc, guest, client)
            finally:
                reader.cancel()
                client.w.close()
    asyncio.run(body())


def test_small_changes_in_quick_succession_leave_as_one_update():
    """A clock, then a cursor, each its own notification (as a desktop's
    frontend sends them), a loop turn apart: one FramebufferUpdate with
    both, not one each (sent at once, the first would be on its way before
    the second came)."""
    clock, cursor = (720, 4, 64, 16), (150, 165, 8, 16)

    async def act(vnc, guest, client):
        vnc.server.mark_dirty([clock])
        await asyncio.sleep(0)                       # the second change comes a loop turn later
        await asyncio.sleep(0)
        vnc.server.mark_dirty([cursor])
        await wait_for(lambda: client.updates == 2, what="the update")
        assert sorted(client.last_rects) == sorted([clock, cursor])
        client.request()
        # nothing else is dirty: the next update is the next change's alone
        vnc.server.mark_dirty([cursor])
        await wait_for(lambda: client.updates == 3, what="the next update")
        assert client.last_rects == [cursor]

    _with_deferral(0.3, act)


def test_a_full_screen_change_does_not_wait_for_the_deferral():
    """With the deferral an hour long, a change of the whole picture still
    goes out (a frame of an animation gains nothing from waiting), and takes
    along a small change already waiting."""
    async def act(vnc, guest, client):
        vnc.server.mark_dirty([(5, 5, 10, 10)])
        assert vnc.server.deferring
        fb = vnc.framebuffer()
        vnc.server.mark_dirty([(0, 0, fb.width, fb.height)])
        await wait_for(lambda: client.updates == 2, what="the full-screen update")
        assert (0, 0, fb.width, fb.height) in client.last_rects
        assert not vnc.server.deferring

    _with_deferral(3600.0, act)


def test_a_client_slow_to_ask_again_is_far_and_gets_its_updates_piece_by_piece():
    """The session times each update (request -> queued) and the client's
    answer (queued -> next request).  A client that reads each frame at once
    stays near (its updates go in batches); one that waits 0.2 s before
    asking again -- a slow link's round trip -- becomes far, and its next
    update is handed over piece by piece (batch 0).  Both get every frame."""
    srv = ServerThread(noisy_surface(800, 600))
    near, far = RawClient(srv.port, timeout=20), RawClient(srv.port, timeout=20)
    batches = []
    real_run = srv.server.updates.run

    def recording_run(job, sent, failed, progress=lambda: None, batch=0):
        batches.append((job.conn, batch))
        return real_run(job, sent, failed, progress, batch)
    srv.server.updates.run = recording_run
    try:
        for c in (near, far):
            c.handshake()
            c.send(struct.pack(">BxHi", 2, 1, enc.ZRLE))
        frames = {}

        def watch(c, pause):
            got = 0
            for i in range(6):
                if pause and i:
                    threading.Event().wait(pause)       # the far client's round trip
                full_request(c, w=800, h=600)
                got += sum(w * h for _, _, w, h, _, _ in read_update(c)) == 800 * 600
            frames[pause] = got
        threads = [threading.Thread(target=watch, args=(c, p)) for c, p in ((near, 0.0), (far, 0.2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert frames == {0.0: 6, 0.2: 6}
        links = srv.call(lambda: [(s.link.far, s.link.take_s, s.link.make_s) for s in srv.server.clients])
        assert [far for far, _, _ in links] == [False, True], links
        far_conn = srv.call(lambda: srv.server.clients[1].conn)
        assert batches[-1] == (far_conn, 0)
        assert any(b > 0 for conn, b in batches if conn is not far_conn)
    finally:
        near.close()
        far.close()
        srv.close()
