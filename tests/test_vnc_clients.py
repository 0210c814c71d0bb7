"""Real VNC clients against our server; pictures compared pixel for pixel."""
from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import struct
import subprocess
import tempfile
import time

import numpy as np
import pytest
from xvfb import Xvfb
from PIL import Image

from pyxenfb.rfb.auth import vnc_response
from pyxenfb.rfb.listener import VNC_BASE_PORT
from simkit import wait_until
from rfb_harness import (KEY_A, RawClient, ServerThread, _factory_for, capture,  # noqa: F401
                         expected_rgb, make_picture, vnc_server, vnc_server_lossy,
                         vnc_server_password)

vncdotool_api = pytest.importorskip("vncdotool.api")
_SHOT = os.path.join(tempfile.mkdtemp(prefix="vnc-test-"), "shot.png")
from vncdotool import rfb as vnc_rfb  # noqa: E402


@pytest.mark.parametrize("encoding", [None, vnc_rfb.Encoding.HEXTILE, vnc_rfb.Encoding.ZRLE,
                                      vnc_rfb.Encoding.RRE],
                         ids=["raw", "hextile", "zrle", "rre"])
def test_vncdotool_picture(vnc_server, encoding):
    got = capture(vnc_server.port, encoding)
    assert got.shape == (600, 800, 3)
    assert np.array_equal(got, expected_rgb(make_picture()))


def test_vncdotool_odd_size(vnc_server):
    """641x479 (not a multiple of any tile size) through vncdotool's encodings.

    Not ZRLE: vncdotool 1.4.2 does not byte-align packed-palette rows, which
    the spec requires (TigerVNC does; see test_tigervnc_odd_size)."""
    surface = make_picture(641, 479, seed=3)
    vnc_server.set_surface(surface)
    for encoding in (None, vnc_rfb.Encoding.HEXTILE, vnc_rfb.Encoding.RRE):
        assert np.array_equal(capture(vnc_server.port, encoding), expected_rgb(surface)), encoding


def test_vncdotool_compress_level_mid_session(vnc_server):
    """CompressLevel changed on a live ZRLE connection takes effect at once,
    and vncdotool's one zlib inflater still decodes every picture exactly."""
    zrle = _factory_for(vnc_rfb.Encoding.ZRLE)

    class Client(zrle.protocol):
        def offer(self, encodings):
            self.setEncodings(encodings)
            return self          # the proxy chains the next call on what this returns

    class Factory(zrle):
        protocol = Client

    c = vncdotool_api.connect(f"127.0.0.1::{vnc_server.port}", timeout=20, factory_class=Factory)
    try:
        c.refreshScreen()                          # the stream starts at the default level
        for seed, level in enumerate([9, 0, 5, 1], start=1):
            c.offer([vnc_rfb.Encoding.ZRLE, -256 + level])
            surface = make_picture(seed=seed)
            vnc_server.draw(surface.rows, 0, 0, 800, 600)
            got = np.asarray(c.refreshScreen().screen.convert("RGB"))
            assert np.array_equal(got, expected_rgb(surface)), level
            levels = vnc_server.call(lambda: [cl.encoder.compress_level
                                              for cl in vnc_server.server.clients])
            assert levels == [level]
    finally:
        c.disconnect()


def test_vncdotool_input(vnc_server):
    c = vncdotool_api.connect(f"127.0.0.1::{vnc_server.port}", timeout=20)
    try:
        c.keyPress("a")
        c.mouseMove(100, 50)
        c.mousePress(1)
        c.mousePress(4)          # wheel up (button 4 -> bit 3)
        c.captureScreen(_SHOT)   # a round trip: the input is in
    finally:
        c.disconnect()
    events = vnc_server.input.events
    assert ("key", KEY_A, True) in events and ("key", KEY_A, False) in events
    assert ("abs", 100, 50) in events
    assert ("key", 0x110, True) in events and ("key", 0x110, False) in events
    assert events.count(("wheel", -1)) == 1


def test_extended_key_event_uses_scancodes(vnc_server):
    """QEMU Extended Key Event (vncdotool 1.4.2 asks for -258 but never sends
    one, so by hand): 'c' is unknown to the stub keysym map, so KEY_C can only
    come from the XT scancode 0x2e; Right (E0 4D -> 0xCD) is KEY_RIGHT."""
    keymap = pytest.importorskip("pyxenfb.console.keymap")
    if not hasattr(keymap, "qnum_to_linux"):
        pytest.skip("pyxenfb.console.keymap.qnum_to_linux not available yet")
    c = RawClient(vnc_server.port)
    c.handshake()
    c.send(struct.pack(">BxHii", 2, 2, 0, -258) + struct.pack(">BBHHHH", 3, 1, 0, 0, 1, 1))
    assert c.recv_exact(16) == b"\0\0\0\x01" + struct.pack(">HHHHi", 0, 0, 0, 0, -258)
    c.send(struct.pack(">BBHII", 255, 0, 1, 0x63, 0x2E) + struct.pack(">BBHII", 255, 0, 0, 0x63, 0x2E)
           + struct.pack(">BBHII", 255, 0, 1, 0, 0xCD) + struct.pack(">BBHHHH", 3, 0, 0, 0, 1, 1))
    c.recv_exact(4 + 12 + 4)
    c.close()
    assert vnc_server.input.events[:3] == [("key", 46, True), ("key", 46, False), ("key", 106, True)]


def test_password_ok(vnc_server_password):
    got = capture(vnc_server_password.port, password="s3cret")
    assert np.array_equal(got, expected_rgb(make_picture()))


def test_password_wrong(vnc_server_password, caplog):
    """vncdotool just hangs on a refused password, so speak RFB by hand."""
    caplog.set_level(logging.INFO, logger="pyxenfb.rfb")
    c = RawClient(vnc_server_password.port)
    assert c.recv_exact(12) == b"RFB 003.008\n"
    c.send(b"RFB 003.008\n")
    assert c.recv_exact(2) == b"\x01\x02"
    c.send(b"\x02")
    challenge = c.recv_exact(16)
    c.send(vnc_response("wrong", challenge))
    assert c.recv_exact(4) == b"\0\0\0\1"
    (n,) = struct.unpack(">I", c.recv_exact(4))
    assert c.recv_exact(n) == b"Authentication failed"
    assert c.closed()
    assert any("authentication failed" in r.getMessage() for r in caplog.records)
    # The right password still works afterwards.
    assert np.array_equal(capture(vnc_server_password.port, password="s3cret"),
                          expected_rgb(make_picture()))


def test_resize_reaches_vncdotool(vnc_server):
    c = vncdotool_api.connect(f"127.0.0.1::{vnc_server.port}", timeout=20)
    try:
        c.captureScreen(_SHOT)
        bigger = make_picture(1024, 768, seed=1)
        vnc_server.set_surface(bigger)
        deadline = time.monotonic() + 10
        while c.screen.size != (1024, 768) and time.monotonic() < deadline:
            c.refreshScreen()
        c.captureScreen(_SHOT)
        assert c.screen.size == (1024, 768)
        assert np.array_equal(np.asarray(c.screen.convert("RGB")), expected_rgb(bigger))
    finally:
        c.disconnect()


def test_asyncvnc_zlib(vnc_server):
    asyncvnc = pytest.importorskip("asyncvnc")

    async def shot():
        async with asyncvnc.connect("127.0.0.1", vnc_server.port) as client:
            first = await client.screenshot()
            # A second screenshot goes through the same (persistent) zlib stream.
            second = await client.screenshot()
            return first, second

    first, second = asyncio.run(asyncio.wait_for(shot(), 20))
    exp = expected_rgb(make_picture())
    assert np.array_equal(first[:, :, :3], exp)
    assert np.array_equal(second[:, :, :3], exp)


# ------------------------------------------------------------------ TigerVNC
@pytest.fixture(scope="module")
def xvfb():
    if not shutil.which("Xvfb") or not shutil.which("vncviewer"):
        pytest.skip("Xvfb or TigerVNC vncviewer not installed")
    server = Xvfb("1280x1024x24")
    yield server.display
    server.stop()


def _window_id(display: str, title_part: str, size: str) -> str | None:
    out = subprocess.run(["xwininfo", "-root", "-tree", "-display", display],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if title_part in line and size in line:
            return line.split()[0]
    return None


def _grab(display: str, window: str) -> np.ndarray | None:
    res = subprocess.run(["import", "-display", display, "-window", window, "png:-"],
                         capture_output=True)
    if res.returncode != 0 or not res.stdout:
        return None
    return np.asarray(Image.open(io.BytesIO(res.stdout)).convert("RGB"))


def _quantise(rgb: np.ndarray, maxes) -> np.ndarray:
    """What a TigerVNC low-colour viewer shows (rfb.md section 10): our server
    narrows each channel keeping its high bits (pixman's semantic), the viewer
    scales back by q * 255 // max."""
    out = np.empty_like(rgb)
    for i, m in enumerate(maxes):
        q = rgb[..., i].astype(np.uint32) >> (8 - m.bit_length())
        out[..., i] = q * 255 // m
    return out


class TigerVnc:
    """Debian's TigerVNC viewer on `display`, connected to `port`; `shows()`
    waits until its window holds a picture.  A context manager."""

    def __init__(self, display: str, port: int, options: list[str]):
        self.display, self.options = display, options
        self.log = tempfile.TemporaryFile()
        self.viewer = subprocess.Popen(["vncviewer", "-display", display, "-SecurityTypes", "None",
                                        "-Shared", "-AutoSelect=0", *options, f"127.0.0.1::{port}"],
                                       stdout=self.log, stderr=subprocess.STDOUT)
        self.window = None

    def __enter__(self) -> "TigerVnc":
        return self

    def __exit__(self, *exc) -> None:
        self.viewer.terminate()
        self.viewer.wait(5)
        self.log.close()

    def shows(self, expected: np.ndarray, tolerance: float | None = None,
              timeout: float = 15.0) -> np.ndarray:
        """The window's picture once it equals `expected` (or is within a mean
        error of `tolerance`); an AssertionError when the viewer exits or the
        timeout passes first.  The window's pixels can only be polled."""
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            if self.viewer.poll() is not None:
                self.log.seek(0)
                raise AssertionError(f"vncviewer exited {self.viewer.returncode}: "
                                     f"{self.log.read().decode(errors='replace')[-2000:]}")
            self.window = self.window or _window_id(self.display, "TigerVNC",
                                                    f"{expected.shape[1]}x{expected.shape[0]}")
            if self.window:
                got = _grab(self.display, self.window)
                if got is not None and got.shape == expected.shape:
                    diff = np.abs(got.astype(int) - expected.astype(int))
                    if (tolerance is None and not diff.any()) or \
                            (tolerance is not None and diff.mean() <= tolerance):
                        return got
            time.sleep(0.2)
        err = None
        if got is not None and got.shape == expected.shape:
            err = np.abs(got.astype(int) - expected.astype(int)).mean()
        raise AssertionError(f"viewer picture never matched ({self.options}); window={self.window}, "
                             f"shape={None if got is None else got.shape}, mean error {err}")


def run_tigervnc(display: str, port: int, options: list[str], expected: np.ndarray,
                 tolerance: float | None = None, timeout: float = 15.0) -> np.ndarray:
    with TigerVnc(display, port, options) as viewer:
        return viewer.shows(expected, tolerance, timeout)


@pytest.mark.parametrize("encoding", ["Raw", "Hextile", "ZRLE", "Tight"])
def test_tigervnc_full_colour(xvfb, vnc_server, encoding):
    run_tigervnc(xvfb, vnc_server.port, ["-PreferredEncoding", encoding, "-FullColor", "-NoJPEG"],
                 expected_rgb(make_picture()))


@pytest.mark.parametrize("encoding", ["Hextile", "ZRLE", "Tight"])
def test_tigervnc_odd_size(xvfb, vnc_server, encoding):
    surface = make_picture(641, 479, seed=5)
    vnc_server.set_surface(surface)
    run_tigervnc(xvfb, vnc_server.port, ["-PreferredEncoding", encoding, "-FullColor", "-NoJPEG"],
                 expected_rgb(surface))


@pytest.mark.parametrize("encoding", ["ZRLE", "Tight"])
def test_tigervnc_many_small_updates(xvfb, vnc_server, encoding):
    """Small ZRLE or Tight rectangles one after another (a panel clock and a
    cursor, far apart; Tight's two- and three-colour ones on its mono and
    palette streams): each one's data ends with a partial flush whose last
    bits travel with the next, and TigerVNC shows every step exactly."""
    from types import SimpleNamespace
    surface = vnc_server.call(lambda: vnc_server.console.surface)
    rows = surface.rows.copy()
    shown = SimpleNamespace(rows=rows, fmt=surface.fmt, width=surface.width, height=surface.height)
    with TigerVnc(xvfb, vnc_server.port, ["-PreferredEncoding", encoding, "-FullColor", "-NoJPEG"]) as viewer:
        viewer.shows(expected_rgb(shown))
        rng = np.random.default_rng(9)
        colours = np.array([0x101010, 0xF0F0F0, 0x2266AA], "<u4")
        for step in range(6):
            for x, y, w, h in ((720, 4, 64, 16), (150, 165, 8, 16)):
                pick = rng.integers(0, 2 + step % 2, (h, w))
                rows[y:y + h, x * 4:(x + w) * 4] = colours[pick].view(np.uint8).reshape(h, w * 4)
                vnc_server.draw(rows, x, y, w, h)
            viewer.shows(expected_rgb(shown))


def test_tigervnc_tight_after_its_idle_streams_were_let_go(xvfb, vnc_server):
    """A picture at rest for QUIET_RELEASE_S lets each client's Tight zlib
    streams go (~0.4 MB each); the next update restarts every stream it uses
    with its reset bit, and TigerVNC, whose inflaters lived on, shows each
    step exactly."""
    from types import SimpleNamespace
    from pyxenfb.rfb.updates import QUIET_RELEASE_S
    surface = vnc_server.call(lambda: vnc_server.console.surface)
    rows = surface.rows.copy()
    shown = SimpleNamespace(rows=rows, fmt=surface.fmt, width=surface.width, height=surface.height)

    def live_streams() -> int:
        return vnc_server.call(lambda: sum(c.encoder.live_streams() for c in vnc_server.server.clients))
    with TigerVnc(xvfb, vnc_server.port, ["-PreferredEncoding", "Tight", "-FullColor", "-NoJPEG"]) as viewer:
        viewer.shows(expected_rgb(shown))
        rng = np.random.default_rng(4)
        colours = np.array([0x101010, 0xF0F0F0, 0x2266AA], "<u4")
        for step in range(2):               # each step after the streams of the one before went
            wait_until(lambda: live_streams() == 0, QUIET_RELEASE_S + 10, "the streams let go")
            fresh = make_picture(seed=step + 11).rows
            rows[100:300, 40:1240] = fresh[100:300, 40:1240]              # full colour: stream 0
            vnc_server.draw(rows, 10, 100, 300, 200)
            pick = rng.integers(0, 2 + step, (16, 64))                     # mono, then palette
            rows[400:416, 2000:2256] = colours[pick].view(np.uint8).reshape(16, 256)
            vnc_server.draw(rows, 500, 400, 64, 16)
            viewer.shows(expected_rgb(shown))


@pytest.mark.parametrize("level,maxes", [(0, (1, 1, 1)), (1, (3, 3, 3)), (2, (7, 7, 3))])
@pytest.mark.parametrize("encoding", ["ZRLE", "Tight"])
def test_tigervnc_low_colour(xvfb, vnc_server, encoding, level, maxes):
    run_tigervnc(xvfb, vnc_server.port, ["-PreferredEncoding", encoding, "-FullColor=0",
                                          "-LowColorLevel", str(level), "-NoJPEG"],
                 _quantise(expected_rgb(make_picture()), maxes))


def test_tigervnc_tight_jpeg(xvfb, vnc_server_lossy):
    """JPEG is lossy: mean per-channel error <= 6 (of 255) on this busy test picture
    (measured ~3.7 at TigerVNC's quality level 8)."""
    expected = expected_rgb(make_picture())
    got = run_tigervnc(xvfb, vnc_server_lossy.port, ["-PreferredEncoding", "Tight", "-FullColor",
                                                "-QualityLevel", "8", "-NoJPEG=0"],
                       expected, tolerance=6.0)
    assert not np.array_equal(got, expected), "expected JPEG (lossy) rectangles"


def test_gvnccapture(vnc_server, tmp_path):
    if not shutil.which("gvnccapture"):
        pytest.skip("gvnccapture not installed")
    out = tmp_path / "shot.png"
    res = subprocess.run(["gvnccapture", "-q", f"127.0.0.1:{vnc_server.port - VNC_BASE_PORT}", str(out)],
                         capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    got = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(got, expected_rgb(make_picture()))


# ------------------------------------------------------------------ pointer modes, passwords
def _raw_update(c: RawClient) -> list[tuple]:
    assert c.recv_exact(2) == b"\0\0"
    (n,) = struct.unpack(">H", c.recv_exact(2))
    rects = []
    for _ in range(n):
        x, y, w, h, e = struct.unpack(">HHHHi", c.recv_exact(12))
        if e == 0:
            c.recv_exact(w * h * 4)
        rects.append((x, y, w, h, e))
    return rects


def test_relative_pointer_with_pointer_type_change(vnc_server):
    vnc_server.call(vnc_server.console.set_pointer_mode, False)
    c = RawClient(vnc_server.port)
    c.handshake()
    c.send(struct.pack(">BxHii", 2, 2, 0, -257) + struct.pack(">BBHHHH", 3, 1, 0, 0, 1, 1))
    assert _raw_update(c) == [(0, 0, 800, 600, -257)]          # x=0: relative
    c.send(struct.pack(">BBHH", 5, 0, 0x7FFF + 5, 0x7FFF - 3) + struct.pack(">BBHH", 5, 16, 0x7FFF, 0x7FFF)
           + struct.pack(">BBHHHH", 3, 0, 0, 0, 1, 1))
    _raw_update(c)
    assert vnc_server.input.events == [("rel", 5, -3), ("wheel", 1)]
    vnc_server.call(vnc_server.console.set_pointer_mode, True)
    c.send(struct.pack(">BBHHHH", 3, 1, 0, 0, 1, 1))
    assert _raw_update(c) == [(1, 0, 800, 600, -257)]          # back to absolute


def test_relative_pointer_without_extension_uses_deltas(vnc_server):
    vnc_server.call(vnc_server.console.set_pointer_mode, False)
    c = RawClient(vnc_server.port)
    c.handshake()
    c.send(struct.pack(">BBHH", 5, 0, 100, 100) + struct.pack(">BBHH", 5, 4, 110, 95)
           + struct.pack(">BxHi", 2, 1, 0) + struct.pack(">BBHHHH", 3, 0, 0, 0, 1, 1))
    _raw_update(c)
    assert vnc_server.input.events == [("rel", 10, -5), ("key", 0x111, True)]


def test_empty_password_lets_nobody_in(vnc_server):
    vnc_server.call(vnc_server.server.set_password, "")
    c = RawClient(vnc_server.port)
    c.recv_exact(12)
    c.send(b"RFB 003.008\n")
    assert c.recv_exact(2) == b"\x01\x02"
    c.send(b"\x02")
    c.send(vnc_response("", c.recv_exact(16)))
    assert c.recv_exact(4) == b"\0\0\0\x01"
    vnc_server.call(vnc_server.server.set_password, "new")
    RawClient(vnc_server.port).handshake(password="new")
    vnc_server.call(vnc_server.server.expire_password)
    c = RawClient(vnc_server.port)
    c.recv_exact(12)
    c.send(b"RFB 003.008\n\x02")
    c.recv_exact(2)
    c.send(vnc_response("new", c.recv_exact(16)))
    assert c.recv_exact(4) == b"\0\0\0\x01"


def test_listen_range_and_bind_error():
    import socket as socketlib
    from rfb_harness import free_port
    from pyxenfb.rfb import VncBindError

    srv = ServerThread()
    try:
        taken = srv.port
        other = srv.call(lambda: type(srv.display)(srv.console))
        with pytest.raises(VncBindError) as err:
            srv.run(other.listen("127.0.0.1", taken - VNC_BASE_PORT))
        assert str(err.value) == f"VNC: port {taken} on 127.0.0.1 is in use"
        # With a range it moves on to the next free port.
        blocker = socketlib.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        base = blocker.getsockname()[1]
        try:
            port = srv.run(other.listen("127.0.0.1", base - VNC_BASE_PORT, to_display=base - VNC_BASE_PORT + 20))
            assert base < port <= base + 20 and other.server.display == port - VNC_BASE_PORT
        finally:
            blocker.close()
            srv.run(other.close())
    finally:
        srv.close()
    assert free_port()
