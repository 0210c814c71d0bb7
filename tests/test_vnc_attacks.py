"""rfb.md section 8, case by case, over real sockets: the bad client is closed
with a log line; the server and other clients go on."""
from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest

from pyxenfb.rfb import server as rfb_server
from pyxenfb.rfb.listener import VNC_BASE_PORT
from simkit import wait_until
from rfb_harness import (RawClient, ServerThread, make_picture, vnc_server,  # noqa: F401
                         vnc_server_password, vnc_server_ws)

FULL = struct.pack(">BBHHHH", 3, 0, 0, 0, 800, 600)


def set_encodings(*encs) -> bytes:
    return struct.pack(f">BxH{len(encs)}i", 2, len(encs), *encs)


def read_update(c: RawClient, bpp: int = 4) -> list[tuple]:
    """Read one FramebufferUpdate of Raw/pseudo rects; returns the rect headers."""
    assert c.recv_exact(1) == b"\0"
    pad, n = struct.unpack(">BH", c.recv_exact(3))
    assert pad == 0
    rects = []
    for _ in range(n):
        x, y, w, h, e = struct.unpack(">HHHHi", c.recv_exact(12))
        if e == 0:
            c.recv_exact(w * h * bpp)
        elif e == -308:
            nscreens = c.recv_exact(4)[0]
            c.recv_exact(16 * nscreens)
        rects.append((x, y, w, h, e))
    return rects


def assert_healthy(srv: ServerThread) -> None:
    """A fresh client still gets the picture."""
    c = RawClient(srv.port)
    try:
        c.handshake()
        c.send(set_encodings(0) + FULL)
        assert read_update(c) == [(0, 0, 800, 600, 0)]
    finally:
        c.close()


def closed_with_log(caplog, client: RawClient, text: str) -> None:
    assert client.closed(), "server did not close the connection"
    wait_until(lambda: any(text in r.getMessage() for r in caplog.records), 5,
               f"a log line containing {text!r}")


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO, logger="pyxenfb.rfb")


def connected(srv) -> RawClient:
    c = RawClient(srv.port)
    c.handshake()
    return c


# 1, 2 --------------------------------------------------------------------
@pytest.mark.parametrize("length", [0xFFFFFFFF, 0x7FFFFFFF, 2 << 20, 0x80000000])
def test_cut_text_huge_length(vnc_server, caplog, length):
    c = connected(vnc_server)
    c.send(struct.pack(">BxxxI", 6, length))
    closed_with_log(caplog, c, "ClientCutText")
    assert_healthy(vnc_server)


def test_cut_text_within_bound_is_dropped(vnc_server):
    c = connected(vnc_server)
    c.send(struct.pack(">BxxxI", 6, 1 << 20) + b"x" * (1 << 20) + set_encodings(0) + FULL)
    assert read_update(c) == [(0, 0, 800, 600, 0)]


# 4, 5, 6 -------------------------------------------------------------------
@pytest.mark.parametrize("bpp,depth,maxes,shifts", [
    (0, 24, (255,) * 3, (16, 8, 0)), (1, 1, (1,) * 3, (0, 0, 0)), (7, 7, (1,) * 3, (0, 1, 2)),
    (24, 24, (255,) * 3, (16, 8, 0)), (64, 24, (255,) * 3, (16, 8, 0)), (255, 24, (255,) * 3, (16, 8, 0)),
    (16, 24, (31, 63, 31), (11, 5, 0)), (32, 24, (0, 255, 255), (16, 8, 0)), (32, 24, (255,) * 3, (32, 8, 0)),
    (32, 24, (0xFFFF, 255, 255), (16, 8, 0)),
])
def test_bad_pixel_format(vnc_server, caplog, bpp, depth, maxes, shifts):
    c = connected(vnc_server)
    c.send(b"\0\0\0\0" + struct.pack(">BBBBHHHBBB3x", bpp, depth, 0, 1, *maxes, *shifts))
    closed_with_log(caplog, c, "SetPixelFormat")
    assert_healthy(vnc_server)


def test_wide_channel_format_is_served(vnc_server):
    """A 16-bit red channel is odd but consistent (fits in depth 32): it is served."""
    c = connected(vnc_server)
    c.send(b"\0\0\0\0" + struct.pack(">BBBBHHHBBB3x", 32, 32, 0, 1, 0xFFFF, 255, 255, 16, 8, 0))
    c.send(set_encodings(5) + struct.pack(">BBHHHH", 3, 0, 0, 0, 33, 17))
    assert c.recv_exact(4) == b"\0\0\0\x01"


def test_colour_map_client_gets_palette_and_8bpp(vnc_server):
    c = connected(vnc_server)
    c.send(b"\0\0\0\0" + struct.pack(">BBBBHHHBBB3x", 8, 8, 0, 0, 0, 0, 0, 0, 0, 0))
    head = c.recv_exact(6)
    assert head == b"\x01\x00\x00\x00\x01\x00"
    c.recv_exact(256 * 6)
    c.send(set_encodings(0) + struct.pack(">BBHHHH", 3, 0, 0, 0, 4, 1))
    assert c.recv_exact(4) == b"\0\0\0\x01"
    assert struct.unpack(">HHHHi", c.recv_exact(12)) == (0, 0, 4, 1, 0)
    pixels = c.recv_exact(4)
    # Pixel (0,0) of the picture is black, palette index 0.
    assert pixels[0] == 0


# 7, 8 ------------------------------------------------------------------------
def test_set_encodings_65535(vnc_server):
    c = connected(vnc_server)
    values = [7 + 1000 + i for i in range(65534)] + [0]
    c.send(set_encodings(*values) + FULL)
    # Answered (within the client's socket timeout), in Raw, the one it knows.
    assert read_update(c) == [(0, 0, 800, 600, 0)]
    kept = vnc_server.call(lambda: [len(cl.conn.encodings) for cl in vnc_server.server.clients])
    assert kept == [65535]


def test_set_encodings_stall_does_not_block_others(vnc_server):
    c = connected(vnc_server)
    c.send(struct.pack(">BxH", 2, 65535) + b"\0\0\0\0" * 10)    # and then nothing
    assert_healthy(vnc_server)
    c.close()


# 9 ---------------------------------------------------------------------------
@pytest.mark.parametrize("x,y,w,h", [(0, 0, 0, 0), (0, 0, 800, 0), (900, 700, 10, 10),
                                     (65535, 65535, 65535, 65535), (790, 590, 65535, 65535)])
def test_odd_update_requests(vnc_server, x, y, w, h):
    c = connected(vnc_server)
    c.send(set_encodings(0) + struct.pack(">BBHHHH", 3, 0, x, y, w, h))
    rects = read_update(c)
    for (rx, ry, rw, rh, _) in rects:
        assert rx + rw <= 800 and ry + rh <= 600
    c.send(FULL)
    assert read_update(c) == [(0, 0, 800, 600, 0)]


# 11 --------------------------------------------------------------------------
def test_padding_is_zero(vnc_server):
    c = RawClient(vnc_server.port)
    c.handshake()
    assert c.pixel_format[13:] == b"\0\0\0"
    c.send(set_encodings(0) + FULL)
    read_update(c)          # asserts the FBU padding byte


# 12 -- three clients, one never reads ----------------------------------------
def test_non_reading_client_is_bounded_and_others_go_on(vnc_server):
    srv = vnc_server
    lazy = socket.socket()
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(("127.0.0.1", srv.port))
    lazy_client = RawClient.__new__(RawClient)
    lazy_client.sock = lazy
    lazy_client.sock.settimeout(5)
    lazy_client.handshake()
    lazy.sendall(set_encodings(0) + FULL * 50)       # asks a lot, reads nothing
    readers = [connected(srv), connected(srv)]
    for r in readers:
        r.send(set_encodings(0) + FULL)
        read_update(r)
    rng = np.random.default_rng(1)
    limit = 5 * max(rfb_server.MIN_THROTTLE, 800 * 600 * 4)
    for frame in range(40):
        picture = make_picture(seed=frame)
        srv.draw(picture.rows, 0, 0, 800, 600)
        for r in readers:
            r.send(struct.pack(">BBHHHH", 3, 1, 0, 0, 800, 600))
            rects = read_update(r)
            assert rects, "a reading client stopped getting updates"
        sizes = srv.call(lambda: [c.transport.get_write_buffer_size() for c in srv.server.clients
                                  if c.transport is not None and not c.closing])
        assert max(sizes) <= limit
        if rng.random() < 0.3:
            lazy.sendall(FULL)       # keeps asking, never reads
    # The lazy client got only the few frames that fit in the socket buffers
    # and the throttle; the readers got all 40.
    counts = srv.call(lambda: sorted(c.updates_sent for c in srv.server.clients))
    assert len(counts) == 3 and counts[0] < 10 and counts[1] >= 41
    lazy.close()


# 14 --------------------------------------------------------------------------
def test_disconnect_at_every_handshake_byte(vnc_server_password, caplog):
    srv = vnc_server_password
    from pyxenfb.rfb.auth import vnc_response
    for cut in range(0, 12 + 1 + 16 + 1):
        c = RawClient(srv.port)
        c.recv_exact(12)
        script = bytearray(b"RFB 003.008\n")
        if cut > 12:
            c.send(bytes(script))
            c.recv_exact(2)
            c.send(b"\x02")
            challenge = c.recv_exact(16)
            script = bytearray(vnc_response("s3cret", challenge) + b"\x01")
            c.send(bytes(script[:cut - 13]))
        else:
            c.send(bytes(script[:cut]))
        c.close()
    wait_until(lambda: not srv.call(lambda: len(srv.server.clients)), 5,
               "the connections to go (leaked?)")
    c = RawClient(srv.port)
    c.handshake(password="s3cret")


# 17 --------------------------------------------------------------------------
def test_brute_force_blocked(vnc_server_password, caplog):
    srv = vnc_server_password
    for _ in range(5):
        c = RawClient(srv.port)
        c.recv_exact(12)
        c.send(b"RFB 003.008\n")
        c.recv_exact(2)
        c.send(b"\x02")
        c.recv_exact(16)
        c.send(b"\0" * 16)
        assert c.recv_exact(4) == b"\0\0\0\x01"
        c.close()
    c = RawClient(srv.port)
    c.recv_exact(12)
    c.send(b"RFB 003.008\n")
    assert c.recv_exact(1) == b"\0"
    (n,) = struct.unpack(">I", c.recv_exact(4))
    assert c.recv_exact(n) == b"Too many security failures"
    closed_with_log(caplog, c, "Too many security failures")
    # Even the right password is refused while blocked.
    c = RawClient(srv.port)
    c.recv_exact(12)
    c.send(b"RFB 003.008\n")
    assert c.recv_exact(1) == b"\0"


# 18 --------------------------------------------------------------------------
@pytest.mark.parametrize("choice", [0, 1, 255])
def test_wrong_security_type(vnc_server_password, caplog, choice):
    c = RawClient(vnc_server_password.port)
    c.recv_exact(12)
    c.send(b"RFB 003.008\n")
    c.recv_exact(2)
    c.send(bytes([choice]))
    assert c.recv_exact(4) == b"\0\0\0\x01"
    closed_with_log(caplog, c, "security type")


def _wrong_security_type(port: int, source: str | None = None) -> None:
    c = RawClient(port, source=source)
    try:
        c.recv_exact(12)
        c.send(b"RFB 003.008\n")
        offered = c.recv_exact(2)[1]
        c.send(bytes([offered ^ 3]))                   # 1 -> 2, 2 -> 1: never the offered one
        assert c.recv_exact(4) == b"\0\0\0\x01"
        assert c.closed()
    finally:
        c.close()


def _wrong_password(port: int, source: str | None = None) -> bytes:
    """One wrong guess; returns the SecurityResult (b"" if refused before it)."""
    c = RawClient(port, source=source)
    try:
        c.recv_exact(12)
        c.send(b"RFB 003.008\n")
        if c.recv_exact(1) == b"\0":                    # blocked: no security types
            return b""
        c.recv_exact(1)
        c.send(b"\x02")
        c.recv_exact(16)
        c.send(b"\0" * 16)
        return c.recv_exact(4)
    finally:
        c.close()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("password", [None, "s3cret", ""])
def test_protocol_errors_never_block_a_legitimate_client(password):
    """Wrong security types (and, with password=on but none set yet, any
    answer at all) from 127.0.0.1, twenty times: nothing could be guessed,
    so they are closed but count for nothing, and the host's own clients
    (all 127.0.0.1) still get in."""
    srv = ServerThread(password=password)
    try:
        for _ in range(20):
            _wrong_security_type(srv.port)
        if password == "":
            for _ in range(20):
                assert _wrong_password(srv.port) == b"\0\0\0\x01"
            srv.call(srv.server.set_password, "now-set")
        c = RawClient(srv.port)
        c.handshake(password="now-set" if password == "" else password)
        c.close()
    finally:
        srv.close()


def test_wrong_passwords_from_one_address_never_block_another(vnc_server_password, caplog):
    srv = vnc_server_password
    for _ in range(12):
        _wrong_password(srv.port, source="127.0.0.2")
    assert _wrong_password(srv.port, source="127.0.0.2") == b""     # that one is blocked
    c = RawClient(srv.port, source="127.0.0.1")
    c.handshake(password="s3cret")
    c.close()
    assert any("127.0.0.2 blocked for" in r.getMessage() for r in caplog.records)


def test_brute_force_block_is_capped_and_ends(vnc_server_password):
    """Burst after burst of wrong passwords, each as soon as the block ends:
    the block grows to 60 s and no further (it used to double for ever), and
    after it the right password gets in."""
    srv = vnc_server_password
    clock = FakeClock()
    srv.call(setattr, srv.server.blacklist, "clock", clock)
    blocked_for = lambda: srv.call(srv.server.blacklist.blocked_for, "127.0.0.2")  # noqa: E731
    blocks = []
    for _ in range(10):
        for _ in range(5):
            if _wrong_password(srv.port, source="127.0.0.2") == b"":
                break
        blocks.append(blocked_for())
        assert _wrong_password(srv.port, source="127.0.0.2") == b"", "not blocked"
        clock.now += blocks[-1]
    assert blocks[:4] == [10, 20, 40, 60] and max(blocks) == 60
    # Blocked: even the right password is refused (that is what stops guessing).
    _wrong_password(srv.port, source="127.0.0.2")
    c = RawClient(srv.port, source="127.0.0.2")
    c.recv_exact(12)
    c.send(b"RFB 003.008\n")
    assert c.recv_exact(1) == b"\0"
    c.close()
    clock.now += 60
    c = RawClient(srv.port, source="127.0.0.2")
    c.handshake(password="s3cret")
    c.close()
    assert blocked_for() == 0


# 19 --------------------------------------------------------------------------
@pytest.mark.parametrize("w,h,screens", [(0, 0, 0), (1024, 768, 1), (1, 1, 2), (65535, 65535, 255)])
def test_set_desktop_size_variants(vnc_server, w, h, screens):
    c = connected(vnc_server)
    c.send(set_encodings(0, -308))
    c.send(struct.pack(">BxHHBx", 251, w, h, screens) + b"\0" * 16 * screens)
    c.send(struct.pack(">BBHHHH", 3, 1, 0, 0, 1, 1))
    rects = read_update(c)
    assert (1, 1, 800, 600, -308) in rects            # reason 1 (this client), status 1 (prohibited)
    assert vnc_server.call(lambda: (vnc_server.console.surface.width, vnc_server.console.surface.height)) \
        == (800, 600)


def test_set_desktop_size_truncated_then_close(vnc_server, caplog):
    c = connected(vnc_server)
    c.send(set_encodings(0, -308) + struct.pack(">BxHHBx", 251, 10, 10, 255) + b"\0" * 100)
    c.close()
    assert_healthy(vnc_server)


def test_set_desktop_size_without_negotiation(vnc_server, caplog):
    c = connected(vnc_server)
    c.send(struct.pack(">BxHHBx", 251, 10, 10, 0))
    closed_with_log(caplog, c, "unexpected message type 251")


# 20, 21 ----------------------------------------------------------------------
@pytest.mark.parametrize("msg", [b"\x07", b"\x7f", b"\x95", b"\xfe", b"\x96\x01\0\0\0\0\0\0\0\0",
                                 b"\xf8\0\0\0\x80\0\0\0\0", b"\xfa\0\x01\x02", b"\xff\x01\0\0"])
def test_unknown_and_unnegotiated_messages(vnc_server, caplog, msg):
    c = connected(vnc_server)
    c.send(msg)
    closed_with_log(caplog, c, "unexpected message type")
    assert_healthy(vnc_server)


def test_fence_payload_too_long(vnc_server, caplog):
    c = connected(vnc_server)
    c.send(set_encodings(0, -312) + struct.pack(">B3xIB", 248, 1 << 31, 200) + b"x" * 200)
    closed_with_log(caplog, c, "Fence payload")


def test_qemu_audio_refused(vnc_server, caplog):
    c = connected(vnc_server)
    c.send(set_encodings(0, -258, -259) + b"\xff\x01\0\0")
    closed_with_log(caplog, c, "QEMU message subtype 1")


# 22 --------------------------------------------------------------------------
def test_slowloris_handshake_deadline(vnc_server, caplog):
    vnc_server.call(setattr, vnc_server.server, "handshake_timeout", 0.5)
    c = RawClient(vnc_server.port)
    c.recv_exact(12)
    c.send(b"RFB 0")
    closed_with_log(caplog, c, "no handshake within 0.5 s")
    assert_healthy(vnc_server)


def _pending(srv) -> dict[str, int]:
    return srv.call(lambda: {h: len(cs) for h, cs in srv.server.pending_handshakes().items()})


def test_one_address_holds_at_most_its_share_of_handshakes(vnc_server, caplog):
    per = rfb_server.MAX_UNAUTHENTICATED_PER_ADDRESS
    idle = []
    for _ in range(per + 4):
        idle.append(RawClient(vnc_server.port, source="127.0.0.2"))
        idle[-1].recv_exact(12)          # every newcomer gets its banner...
    for c in idle[:4]:                   # ...and the address's oldest ones go
        closed_with_log(caplog, c, f"evicted: more than {per} connections from 127.0.0.2")
    assert _pending(vnc_server) == {"127.0.0.2": per}
    for c in idle[4:]:
        assert not c.closed(timeout=0.05)
    assert_healthy(vnc_server)
    for c in idle:
        c.close()


def test_full_handshake_slots_evict_from_the_greediest_address(vnc_server, caplog):
    total, per = rfb_server.MAX_UNAUTHENTICATED, rfb_server.MAX_UNAUTHENTICATED_PER_ADDRESS
    idle = []
    for i in range(total):
        idle.append(RawClient(vnc_server.port, source=f"127.0.0.{2 + i // per}"))
        idle[-1].recv_exact(12)
    assert sum(_pending(vnc_server).values()) == total
    extra = RawClient(vnc_server.port)
    extra.recv_exact(12)
    # A tie (8 and 8): the oldest of all goes, 127.0.0.2's first.
    closed_with_log(caplog, idle[0], f"evicted: {total} connections in the handshake")
    assert _pending(vnc_server) == {"127.0.0.2": per - 1, "127.0.0.3": per, "127.0.0.1": 1}
    extra.close()
    for c in idle:
        c.close()
    wait_until(lambda: not vnc_server.call(lambda: len(vnc_server.server.clients)), 5,
               "the idle connections to go")
    assert_healthy(vnc_server)


class SilentAttacker:
    """Silent connections from some loopback addresses, each address holding
    up to `hold` of them and re-opening one for every one the server drops
    or that it closes itself; stops after `budget` connections or on stop()."""

    def __init__(self, port: int, sources: list[str], hold: int, budget: int):
        self.port, self.sources, self.hold, self.budget = port, sources, hold, budget
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        held: dict[str, list[socket.socket]] = {s: [] for s in self.sources}
        try:
            while self.opened < self.budget and not self._stop.is_set():
                for source, socks in held.items():
                    if len(socks) >= self.hold:
                        old = socks.pop(0)          # re-open: drop the oldest, reset
                        old.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        old.close()
                    try:
                        socks.append(socket.create_connection(("127.0.0.1", self.port), timeout=5,
                                                              source_address=(source, 0)))
                    except OSError:
                        pass
                    self.opened += 1
                # Pace the storm a little: the attacker shares two cores with the server.
                self._stop.wait(0.002)
        finally:
            for socks in held.values():
                for s in socks:
                    s.close()


def test_silent_connections_from_elsewhere_never_keep_a_client_out(vnc_server, caplog):
    """Attackers on 127.0.0.2-4 keep more silent handshakes open than the
    server allows (re-opening as they go); a client from 127.0.0.1 connects
    30 times meanwhile and gets in every time.  The log stays small."""
    srv = vnc_server
    caplog.clear()
    total, per = rfb_server.MAX_UNAUTHENTICATED, rfb_server.MAX_UNAUTHENTICATED_PER_ADDRESS
    with SilentAttacker(srv.port, ["127.0.0.2", "127.0.0.3", "127.0.0.4"], hold=per + 4,
                        budget=3000) as attack:
        wait_until(lambda: sum(_pending(srv).values()) >= total, 10, "the attack to fill the slots")
        # At least 30 tries, and on until the attackers have re-opened 100
        # connections (the banner comes at once, so 30 tries can be quick).
        tries, deadline = 0, time.monotonic() + 20
        while tries < 30 or (attack.opened <= 100 and time.monotonic() < deadline):
            c = RawClient(srv.port)
            try:
                assert c.handshake() == (800, 600)
            finally:
                c.close()
            tries += 1
            pending = _pending(srv)
            assert sum(pending.values()) <= total and max(pending.values()) <= per
        assert attack.opened > 100, "the attack hardly ran"
    lines = [r for r in caplog.records if r.name.startswith("pyxenfb.rfb")]
    assert len(lines) <= 60, f"{len(lines)} log lines for one attack"
    assert sum(len(r.getMessage()) for r in lines) < 12_000


# 23 --------------------------------------------------------------------------
@pytest.mark.parametrize("banner", [b"RFB 003.00\n\n", b"RFB 004.000\n", b"RFB 003.006\n", b"XYZ"])
def test_version_garbage(vnc_server, caplog, banner):
    c = RawClient(vnc_server.port)
    c.recv_exact(12)
    c.send(banner)
    closed_with_log(caplog, c, "protocol version")
    assert_healthy(vnc_server)


def test_pointer_extremes_and_odd_keys(vnc_server):
    c = connected(vnc_server)
    c.send(struct.pack(">BBHH", 5, 0, 65535, 65535) + struct.pack(">BBxxI", 4, 1, 0xFFFFFFFF)
           + struct.pack(">BBxxI", 4, 0, 0) + set_encodings(0) + FULL)
    read_update(c)
    assert ("abs", 799, 599) in vnc_server.input.events
    assert not [e for e in vnc_server.input.events if e[0] == "key"]


def test_held_keys_released_on_disconnect(vnc_server):
    c = connected(vnc_server)
    c.send(struct.pack(">BBxxI", 4, 1, 0x61) + struct.pack(">BBHH", 5, 1, 5, 5) + set_encodings(0) + FULL)
    read_update(c)
    c.close()
    wait_until(lambda: ("key", 30, False) in vnc_server.input.events
               and ("key", 0x110, False) in vnc_server.input.events, 5,
               lambda: f"key and button releases in {vnc_server.input.events}")


def test_exclusive_client_kicks_a_blocked_peer(vnc_server, caplog):
    lazy = socket.socket()
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(("127.0.0.1", vnc_server.port))
    lazy_client = RawClient.__new__(RawClient)
    lazy_client.sock = lazy
    lazy.settimeout(5)
    lazy_client.handshake()
    lazy.sendall(set_encodings(0) + FULL * 10)
    # Wait until the server has answered the lazy client (which never reads).
    wait_until(lambda: vnc_server.call(lambda: any(c.updates_sent for c in vnc_server.server.clients)),
               5, "an update for the lazy client")
    exclusive = RawClient(vnc_server.port)
    exclusive.handshake(shared=False)
    exclusive.send(set_encodings(0) + FULL)
    assert read_update(exclusive) == [(0, 0, 800, 600, 0)]
    closed_with_log(caplog, lazy_client, "exclusive client")
    # While the exclusive client is there, a shared one is refused.
    shared = RawClient(vnc_server.port)
    with pytest.raises(ConnectionError):
        shared.handshake()          # closed instead of ServerInit
    closed_with_log(caplog, shared, "an exclusive client is connected")


def test_resize_leaves_clients_that_cannot_follow_at_their_size(vnc_server, caplog):
    """As QEMU: a client without DesktopSize keeps its size and sees that much
    of the new picture; one with it is told the new size first."""
    plain = connected(vnc_server)
    plain.send(set_encodings(0) + FULL)
    read_update(plain)
    follower = connected(vnc_server)
    follower.send(set_encodings(0, -223) + FULL)
    read_update(follower)
    bigger = make_picture(1024, 768, seed=2)
    with caplog.at_level(logging.INFO, logger="pyxenfb.rfb.server"):
        vnc_server.set_surface(bigger)
        wait_until(lambda: any("cannot follow the resize to 1024x768; it keeps its 800x600 view"
                               in r.getMessage() for r in caplog.records), 5, "the resize log line")
    plain.send(struct.pack(">BBHHHH", 3, 1, 0, 0, 800, 600))
    assert read_update(plain) == [(0, 0, 800, 600, 0)]
    follower.send(struct.pack(">BBHHHH", 3, 1, 0, 0, 800, 600))
    assert read_update(follower) == [(0, 0, 1024, 768, -223)]
    follower.send(struct.pack(">BBHHHH", 3, 1, 0, 0, 1024, 768))
    assert read_update(follower) == [(0, 0, 1024, 768, 0)]


# 16: WebSocket (only on its own port, -vnc ...,websocket=) -------------------
def _ws_request(port: int, extra: bytes = b"") -> tuple[socket.socket, bytes]:
    """Send an upgrade request; returns the socket and the reply's head + rest."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
              b"Sec-WebSocket-Protocol: binary\r\n" + extra + b"\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, head
        head += chunk
    return s, head


def _ws_handshake(port: int, extra: bytes = b"") -> tuple[socket.socket, bytes]:
    s, head = _ws_request(port, extra)
    assert head.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Protocol: binary" in head
    return s, head.split(b"\r\n\r\n", 1)[1]


def _log_lines(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_rfb_port_speaks_first_and_takes_no_websocket(vnc_server, caplog):
    """The VNC port is RFB only: the banner is there before the client says
    anything, and a browser's upgrade request is a bad RFB version (closed,
    one line), never a WebSocket."""
    c = RawClient(vnc_server.port)
    assert c.recv_exact(12) == b"RFB 003.008\n"
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Origin: http://evil.example\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    c.sock.settimeout(5)
    rest = b""
    while chunk := c.sock.recv(4096):
        rest += chunk
    assert b"HTTP" not in rest
    closed_with_log(caplog, c, "protocol version b'GET / HTTP/1'")
    assert len(_log_lines(caplog, "disconnected")) == 1
    assert vnc_server.server.websocket_port is None
    assert_healthy(vnc_server)


def test_websocket_port_refuses_unlisted_origin(vnc_server_ws, caplog):
    """A page from another site: 403, closed, one line telling how to allow it."""
    s, head = _ws_request(vnc_server_ws.ws_port, b"Origin: http://evil.example:8000\r\n")
    assert head.startswith(b"HTTP/1.1 403"), head
    c = RawClient.__new__(RawClient)
    c.sock = s
    closed_with_log(caplog, c, "websocket-origin=http://evil.example:8000")
    lines = _log_lines(caplog, "disconnected")
    assert len(lines) == 1 and "Origin 'http://evil.example:8000' is not allowed" in lines[0], lines
    assert vnc_server_ws.call(lambda: vnc_server_ws.server.clients) == []
    assert_healthy(vnc_server_ws)


@pytest.mark.parametrize("origin", [
    b"null", b"file://", b"javascript:alert(1)", b"http://good.example/path",
    b"http://good.example.evil.example", b"http://good.example:8443", b"https://good.example",
    b"http://good.example\r\nOrigin: http://good.example", b"x" * 3000,
])
def test_websocket_origin_must_match_exactly(origin, caplog):
    srv = ServerThread(websocket=True, websocket_origins=("http://good.example",))
    try:
        s, head = _ws_request(srv.ws_port, b"Origin: " + origin + b"\r\n")
        assert head.startswith(b"HTTP/1.1 403"), head
        c = RawClient.__new__(RawClient)
        c.sock = s
        closed_with_log(caplog, c, "WebSocket refused")
        # Hostile text reaches the log quoted and cut short.
        assert all(len(line) < 400 and "\n" not in line for line in _log_lines(caplog, "refused"))
    finally:
        srv.close()


def test_websocket_listed_origin_and_no_origin_connect():
    """Compared after normalising (case, default port); a program without
    an Origin header (websockify, python websockets) is not a page."""
    srv = ServerThread(websocket=True, websocket_origins=("http://good.example",))
    try:
        for extra in (b"Origin: HTTP://Good.Example:80\r\n", b"Origin: http://good.example\r\n", b""):
            s, data = _ws_handshake(srv.ws_port, extra)
            while len(data) < 2 + 12:
                data += s.recv(4096)
            assert data[:14] == b"\x82\x0cRFB 003.008\n"
            s.close()
    finally:
        srv.close()


def _frame(payload: bytes, opcode=2, fin=True, mask=True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 65536:
        head += bytes([m | 126]) + struct.pack(">H", n)
    else:
        head += bytes([m | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def test_websocket_rfb_with_every_split(vnc_server_ws):
    from websockets.sync.client import connect
    with connect(f"ws://127.0.0.1:{vnc_server_ws.ws_port}/", subprotocols=["binary"]) as ws:
        assert ws.subprotocol == "binary"
        assert ws.recv(timeout=5) == b"RFB 003.008\n"
        ws.send(b"RFB 003.008\n")
        assert ws.recv(timeout=5) == b"\x01\x01"
        ws.send(b"\x01")
        buf = b""
        ws.send(b"\x01")
        while len(buf) < 4 + 4 + 16 + 4:
            buf += ws.recv(timeout=5)
        # A FBUR split into single-byte frames, and fragmented messages.
        msg = set_encodings(0) + struct.pack(">BBHHHH", 3, 0, 0, 0, 2, 1)
        for i in range(len(msg)):
            ws.send(msg[i:i + 1])
        data = b""
        while len(data) < 4 + 12 + 8:
            data += ws.recv(timeout=5)
        assert data[:16] == b"\0\0\0\x01" + struct.pack(">HHHHi", 0, 0, 2, 1, 0)


def test_websocket_fragmented_frames(vnc_server_ws):
    s, data = _ws_handshake(vnc_server_ws.ws_port)
    msg = b"RFB 003.008\n"
    s.sendall(_frame(msg[:5], fin=False) + _frame(msg[5:9], opcode=0, fin=False) + _frame(msg[9:], opcode=0))
    while len(data) < 2 + 12 + 2:
        data += s.recv(4096)
    assert b"\x82\x02\x01\x01" in data     # server frame with the security list


@pytest.mark.parametrize("attack,text", [
    (lambda s: s.sendall(b"\x82\xff" + struct.pack(">Q", 1 << 63) + b"abcd"), "WebSocket error"),
    (lambda s: s.sendall(b"\x82\xff" + struct.pack(">Q", 2 << 20) + b"abcd"), "WebSocket error"),
    (lambda s: s.sendall(_frame(b"RFB 003.008\n", mask=False)), "WebSocket error"),
])
def test_websocket_bad_frames(vnc_server_ws, caplog, attack, text):
    s, _ = _ws_handshake(vnc_server_ws.ws_port)
    attack(s)
    c = RawClient.__new__(RawClient)
    c.sock = s
    closed_with_log(caplog, c, text)
    assert_healthy(vnc_server_ws)


def test_websocket_huge_handshake(vnc_server_ws, caplog):
    s = socket.create_connection(("127.0.0.1", vnc_server_ws.ws_port), timeout=5)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nX-Junk: " + b"a" * (1 << 20))
    except (BrokenPipeError, ConnectionResetError):
        pass
    c = RawClient.__new__(RawClient)
    c.sock = s
    closed_with_log(caplog, c, "WebSocket handshake over")
    assert_healthy(vnc_server_ws)


# 13 --------------------------------------------------------------------------
def test_connect_negotiate_disconnect_cycles_leak_nothing(vnc_server):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def rss_kib() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    # The attack list asks for 10,000 cycles: PYXENFB_VNC_CYCLES=10000 runs them.
    cycles = int(os.environ.get("PYXENFB_VNC_CYCLES", "300"))
    warm_up = min(50, cycles // 3)
    assert_healthy(vnc_server)
    before = fds()
    for i in range(cycles):
        if i == warm_up:
            rss_before = rss_kib()
        c = connected(vnc_server)
        c.send(set_encodings([16, 6, 7][i % 3], -258, -312, -313) + struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 64))
        c.recv_exact(4)
        c.close()
    # zlib streams are ~256 KiB each: a leak of one per cycle would show at once.
    assert rss_kib() - rss_before < 16 * 1024, (rss_before, rss_kib())
    wait_until(lambda: not vnc_server.call(lambda: len(vnc_server.server.clients)), 5,
               "the clients to go (leaked?)")
    assert fds() <= before + 2
    assert_healthy(vnc_server)


# Idle bounds ------------------------------------------------------------------
def test_handshake_deadline_is_10_s():
    assert rfb_server.HANDSHAKE_TIMEOUT == 10.0


def test_client_not_reading_a_full_queue_is_closed(vnc_server, caplog):
    """A client that asks for frames and never reads them: once its queue is
    over the throttle (writing paused) and nothing drains for stall_timeout,
    it is closed with one line, while another client keeps its picture."""
    vnc_server.call(setattr, vnc_server.server, "stall_timeout", 0.5)
    c = RawClient(vnc_server.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.handshake()
    c.send(set_encodings(0))

    def stalled() -> bool:
        # Keep asking for 1.9 MB Raw frames, never reading: reading would drain the queue.
        if not any("not reading its output" in r.getMessage() for r in caplog.records):
            c.send(FULL)
            return False
        return True
    wait_until(stalled, 10, "the stalled client to be closed")
    assert c.closed()
    assert sum("not reading its output" in r.getMessage() for r in caplog.records) == 1
    assert_healthy(vnc_server)


# The server speaks first, at once ---------------------------------------------
class _RecordingTransport:
    """Just enough of an asyncio transport to see what is written, and when."""

    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_banner_is_written_inside_connection_made():
    """No sniffing delay: the RFB banner is written before connection_made
    returns, with no turn of the loop in between."""
    import asyncio

    from pyxenfb.console.core import Console
    from pyxenfb.rfb.listener import Transport
    from pyxenfb.vnc import VncDisplay

    async def scenario():
        console = Console("test", asyncio.get_running_loop())
        console.set_surface(make_picture(64, 48))
        server = VncDisplay(console)
        client = rfb_server.RfbSession(server.server, Transport.RFB)
        transport = _RecordingTransport()
        client.connection_made(transport)
        written = list(transport.writes)
        client.disconnect("test over")
        return written

    assert asyncio.run(scenario()) == [b"RFB 003.008\n"]


def test_websocket_on_follows_the_display_found():
    """websocket=on with a display search (to=, -vncunused): the WebSocket
    port is 5700+D for the display D actually bound, so two domains asking
    for the same display get a port each; a fixed PORT stays fixed."""
    from pyxenfb.rfb.listener import Transport, VncBindError, bind_vnc
    for _ in range(20):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        display = busy.getsockname()[1] - VNC_BASE_PORT
        if display >= 0 and _port_free(5700 + display + 1) and _port_free(VNC_BASE_PORT + display + 1):
            break
        busy.close()
    else:
        pytest.skip("no suitable free ports")
    try:
        listeners = bind_vnc("127.0.0.1", display, to_display=display + 1,
                             websocket_port=5700 + display, websocket_follows=True)
        try:
            assert listeners.display == display + 1
            assert listeners.websocket_port == 5700 + display + 1
            assert sorted(m.value for _, m in listeners.sockets) == ["rfb", "websocket"]
            assert all(isinstance(m, Transport) for _, m in listeners.sockets)
        finally:
            listeners.close()
        with pytest.raises(VncBindError, match="out of range"):
            bind_vnc("127.0.0.1", display, to_display=display + 1,
                     websocket_port=65535, websocket_follows=True)
    finally:
        busy.close()


def _port_free(port: int) -> bool:
    if not 1024 <= port <= 65535:
        return False
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
