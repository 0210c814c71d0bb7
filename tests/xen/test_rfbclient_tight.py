"""The dom0 VNC client's Tight decoder (tests/xen/dom0/rfbclient.py), on the host.

The real-Xen tier judges QEMU's and pyqemu-dm's Tight pictures with this
decoder, so it is checked here first (fast suite, no lab): against
pyxenfb's own Tight encoder, and against rectangles built by hand from the
RFB spec for what that encoder never sends (gradient filter, stream resets
by another server, short uncompressed data, JPEG).
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from pyxenfb.convert import GUEST_32
from pyxenfb.rfb import encodings as enc

RFBCLIENT = Path(__file__).parent / "dom0" / "rfbclient.py"
sys.path.insert(0, str(RFBCLIENT.parent))
import rfbclient  # noqa: E402
from rfb_harness import ServerThread, expected_rgb, make_picture  # noqa: E402
from simkit import wait_until  # noqa: E402


def bgrx(rgb: np.ndarray) -> np.ndarray:
    h, w, _ = rgb.shape
    out = np.zeros((h, w, 4), np.uint8)
    out[..., 0], out[..., 1], out[..., 2] = rgb[..., 2], rgb[..., 1], rgb[..., 0]
    return out


def replay_client(w: int, h: int) -> rfbclient.Client:
    c = rfbclient.Client(data=b"")
    c.width, c.height = w, h
    c.fb = bytearray(w * h * 4)
    return c


def update(count: int, rects: bytes) -> bytes:
    return b"\x00\x00" + struct.pack(">H", count) + rects


def decode(c: rfbclient.Client, message: bytes) -> list[int]:
    c.replay, c.pos = message, 0
    used = c.read_update()
    assert c.pos == len(message), "bytes left over after the update"
    return used


def skim_length(message: bytes) -> int:
    """What dom0 does with a live grab: parse the update for its length only."""
    c = replay_client(800, 600)
    c.skim = True
    c.replay, c.pos = message, 0
    c.read_update()
    return c.pos


def fb_rgb(c: rfbclient.Client) -> np.ndarray:
    a = np.frombuffer(bytes(c.fb), np.uint8).reshape(c.height, c.width, 4)
    return a[..., 2::-1]


def noise_picture() -> np.ndarray:
    """Seeded noise (full-colour rectangles) with a flat block (fills) in it."""
    rgb = np.random.default_rng(8).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    rgb[100:300, 100:420] = (12, 200, 77)
    return rgb


def few_colours_picture() -> np.ndarray:
    """Flat areas, a two-colour stripe pattern, a 100-colour area and a smooth ramp."""
    rgb = np.zeros((600, 800, 3), np.uint8)
    rgb[:, :] = (30, 60, 90)
    rgb[50:250, 0:800:2] = (255, 255, 255)
    rng = np.random.default_rng(3)
    colours = rng.integers(0, 256, (100, 3), dtype=np.uint8)
    rgb[300:420, 100:700] = colours[rng.integers(0, 100, (120, 600))]
    ramp = np.arange(800, dtype=np.uint16)
    rgb[450:600, :, 0] = (ramp * 255 // 799).astype(np.uint8)
    rgb[450:600, :, 1] = np.arange(150, dtype=np.uint8)[:, None]
    return rgb


@pytest.mark.parametrize("picture", [noise_picture, few_colours_picture])
def test_decodes_pyxenfbs_tight_exactly(picture):
    rgb = picture()
    h, w, _ = rgb.shape
    encoder = enc.Encoder()
    c = replay_client(w, h)
    for level in (None, 9, 1):     # a level change resets a stream: the decoder must follow
        encoder.set_compress_level(level)
        c.fb = bytearray(w * h * 4)
        count, data = encoder.encode(enc.TIGHT, GUEST_32, bgrx(rgb).reshape(h, w * 4), 0, 0, w, h)
        message = update(count, data)
        assert skim_length(message) == len(message)
        assert decode(c, message) == [enc.TIGHT] * count
        assert np.array_equal(fb_rgb(c), rgb)


def test_sub_rectangles_land_in_place():
    rgb = few_colours_picture()
    c = replay_client(800, 600)
    part = np.ascontiguousarray(rgb[33:333, 17:530])
    count, data = enc.Encoder().encode(enc.TIGHT, GUEST_32, bgrx(part).reshape(300, 513 * 4),
                                       17, 33, 513, 300)
    decode(c, update(count, data))
    got = fb_rgb(c)
    assert np.array_equal(got[33:333, 17:530], part)
    assert not got[:33].any() and not got[333:].any() and not got[:, :17].any()


def rect(x, y, w, h, body: bytes) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, rfbclient.TIGHT) + body


def compact(n: int) -> bytes:
    return enc.compact_length(n)


def gradient_filtered(rgb: np.ndarray) -> bytes:
    """The encoder's side of the spec's gradient filter, written out per component."""
    v = rgb.astype(int)
    h, w, _ = v.shape
    d = np.zeros_like(v)
    for j in range(h):
        for i in range(w):
            left = v[j, i - 1] if i else 0
            up = v[j - 1, i] if j else 0
            upleft = v[j - 1, i - 1] if i and j else 0
            p = np.clip(left + up - upleft, 0, 255)
            d[j, i] = (v[j, i] - p) & 0xFF
    return d.astype(np.uint8).tobytes()


def test_hand_built_rectangles():
    rng = np.random.default_rng(5)
    c = replay_client(64, 48)
    want = np.zeros((48, 64, 3), np.uint8)
    rects = []
    streams = [zlib.compressobj() for _ in range(4)]

    def z(stream, data):
        out = streams[stream].compress(data) + streams[stream].flush(zlib.Z_SYNC_FLUSH)
        return compact(len(out)) + out

    # gradient filter, stream 3
    smooth = np.clip(np.add.outer(np.arange(20) * 7, np.arange(30) * 5)[..., None]
                     + np.array([0, 40, 200]), 0, 255).astype(np.uint8)
    smooth[5, 5] = (255, 0, 17)
    rects.append(rect(0, 0, 30, 20, bytes([0x70, 2]) + z(3, gradient_filtered(smooth))))
    want[0:20, 0:30] = smooth
    # two colours, odd width (rows padded to whole bytes), stream 1
    bits = rng.integers(0, 2, (9, 13), dtype=np.uint8)
    palette = np.array([(1, 2, 3), (250, 251, 252)], np.uint8)
    rects.append(rect(31, 0, 13, 9, bytes([0x50, 1, 1]) + palette.tobytes()
                      + z(1, np.packbits(bits, axis=1).tobytes())))
    want[0:9, 31:44] = palette[bits]
    # three colours, one byte a pixel, stream 2
    idx = rng.integers(0, 3, (10, 12), dtype=np.uint8)
    pal3 = np.array([(9, 9, 9), (200, 0, 0), (0, 0, 200)], np.uint8)
    rects.append(rect(50, 20, 12, 10, bytes([0x60, 1, 2]) + pal3.tobytes() + z(2, idx.tobytes())))
    want[20:30, 50:62] = pal3[idx]
    # copy filter, under 12 bytes: no zlib, no length
    tiny = rng.integers(0, 256, (1, 3, 3), dtype=np.uint8)
    rects.append(rect(0, 40, 3, 1, b"\x00" + tiny.tobytes()))
    want[40:41, 0:3] = tiny
    # stream 0 with an explicit copy filter id, then reset (bit 0) and a fresh stream
    block = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    rects.append(rect(10, 30, 5, 4, bytes([0x40, 0]) + z(0, block.tobytes())))
    streams[0] = zlib.compressobj()
    block2 = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    rects.append(rect(16, 30, 5, 4, b"\x01" + z(0, block2.tobytes())))
    want[30:34, 10:15], want[30:34, 16:21] = block, block2
    # fill, resetting stream 2 on the way (the spec: resets apply to fills too)
    streams[2] = zlib.compressobj()
    rects.append(rect(40, 40, 24, 8, b"\x84" + bytes((7, 8, 9))))
    want[40:48, 40:64] = (7, 8, 9)
    idx2 = rng.integers(0, 3, (3, 12), dtype=np.uint8)
    rects.append(rect(50, 31, 12, 3, bytes([0x60, 1, 2]) + pal3.tobytes() + z(2, idx2.tobytes())))
    want[31:34, 50:62] = pal3[idx2]

    message = update(len(rects), b"".join(rects))
    assert skim_length(message) == len(message)
    decode(c, message)
    assert np.array_equal(fb_rgb(c), want)


@pytest.mark.parametrize("body, message", [
    (b"\x90" + compact(3) + b"\xff\xd8\xff", "JPEG"),
    (b"\xa0" + b"\x00" * 12, "neither fill nor basic"),
    (bytes([0x40, 3]) + b"\x00" * 12, "filter id 3"),
    (bytes([0x60, 1, 2]) + b"\x00" * 9 + bytes([0, 1, 2, 5]), "palette index"),
])
def test_what_it_refuses(body, message):
    c = replay_client(8, 8)
    with pytest.raises(ValueError, match=message):
        decode(c, update(1, rect(0, 0, 2, 2, body)))


def read_ppm_rgb(path: Path) -> np.ndarray:
    data = path.read_bytes()
    head = b"P6\n800 600\n255\n"
    assert data.startswith(head)
    return np.frombuffer(data[len(head):], np.uint8).reshape(600, 800, 3)


def test_hold_is_a_live_tight_client(tmp_path):
    """`hold`, as the tier runs it in dom0, against pyxenfb's VNC server: the first
    frame is exact when OUT.ppm appears, later updates are decoded, the stop file
    ends it, and OUT.ppm is then the last frame."""
    srv = ServerThread(make_picture())
    ppm, out = tmp_path / "hold.ppm", tmp_path / "hold.json"
    proc = subprocess.Popen([sys.executable, str(RFBCLIENT), "127.0.0.1", str(srv.port), str(out),
                             f"hold:60:{ppm}"], stdout=subprocess.DEVNULL)
    try:
        wait_until(ppm.exists, 20, "the first frame's PPM")
        assert np.array_equal(read_ppm_rgb(ppm), expected_rgb(make_picture()))
        changed = make_picture(seed=1)
        client = srv.call(lambda: srv.server.clients[0])
        sent = srv.call(lambda: client.updates_sent)
        srv.draw(changed.rows, 100, 50, 300, 200)
        # The client asks again only once it has read and decoded an update:
        # a later update sent and a new request pending = the change is in.
        wait_until(lambda: srv.call(lambda: client.updates_sent > sent
                                    and client.conn.pending_request is not None), 20,
                   "the changed rectangle decoded by the client")
        (tmp_path / "hold.ppm.stop").touch()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.close()
    hold = json.loads(out.read_text())
    assert hold["error"] is None, hold
    info = hold["hold"]
    assert info["stopped_by"] == "stop file" and info["encodings_used"] == [rfbclient.TIGHT], info
    assert info["updates"] >= 2 and info["rects_area"] > 0, info
    want = expected_rgb(make_picture())
    want[50:250, 100:400] = expected_rgb(changed)[50:250, 100:400]
    assert np.array_equal(read_ppm_rgb(ppm), want)
