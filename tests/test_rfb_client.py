"""The sans-IO RFB client (pyxenfb/rfb/client.py): every decoder against our
own server's encoders, the handshake, and hostile servers -> RfbError."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pyxenfb.convert import GUEST_32
from pyxenfb.rfb import client as rc
from pyxenfb.rfb import encodings as enc
from pyxenfb.rfb.auth import vnc_response
from pyxenfb.rfb.client import (NEED_DATA, Bell, Connection, ConnectionClosed, FramebufferUpdate,
                                PasswordRequired, Refused, RfbError, ServerCutText, ServerInit,
                                SetColourMapEntries)

FORMAT = b"\x20\x18\0\1\0\xff\0\xff\0\xff\x10\x08\0\0\0\0"


def picture(w: int, h: int, seed: int = 0, colours: int | None = None) -> np.ndarray:
    """(h, w * 4) BGRX bytes, X = 0 (the client writes X = 0 where it fills)."""
    rng = np.random.default_rng(seed)
    if colours is None:
        words = rng.integers(0, 1 << 24, (h, w), dtype=np.uint32)
        words[h // 3:, : w // 2] = 0x336699                        # flat areas too
    else:
        palette = rng.integers(0, 1 << 24, colours, dtype=np.uint32)
        words = palette[rng.integers(0, colours, (h, w))]
    return np.ascontiguousarray(words.astype("<u4").view(np.uint8).reshape(h, w * 4))


def update(chunks: list[bytes], count: int) -> bytes:
    return struct.pack(">BxH", 0, count) + b"".join(chunks)


def feed(conn: Connection, data: bytes, step: int | None = None) -> list:
    """Feed data (in pieces of `step` bytes) and collect the events."""
    events = []
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        conn.receive_data(piece)
        while (ev := conn.next_event()) is not NEED_DATA:
            events.append(ev)
    return events


def fb_array(conn: Connection) -> np.ndarray:
    return np.frombuffer(conn.fb, np.uint8).reshape(conn.height, conn.width * 4)


def roundtrip(encoding: int, pix: np.ndarray, x: int = 0, y: int = 0, fbsize=None, step=None,
              encoder=None, conn=None, **kw):
    h, w4 = pix.shape
    w = w4 // 4
    encoder = encoder or enc.Encoder()
    count, data = encoder.encode(encoding, GUEST_32, pix, x, y, w, h, **kw)
    conn = conn or Connection(established=fbsize or (x + w, y + h), jpeg=kw.get("jpeg"))
    events = feed(conn, update([data], count), step)
    assert len(events) == 1 and isinstance(events[0], FramebufferUpdate)
    return conn, events[0]


@pytest.mark.parametrize("encoding", [enc.RAW, enc.RRE, enc.HEXTILE, enc.ZLIB, enc.ZRLE, enc.TIGHT])
@pytest.mark.parametrize("kind", ["full", "few", "two", "one"])
def test_each_decoder_gives_back_what_our_encoder_sent(encoding, kind):
    colours = {"full": None, "few": 7, "two": 2, "one": 1}[kind]
    pix = picture(150, 70, seed=encoding + 3, colours=colours)
    conn, ev = roundtrip(encoding, pix, x=5, y=3, fbsize=(160, 80))
    got = fb_array(conn)[3:73, 20:620]
    assert np.array_equal(got, pix)
    assert ev.area == 150 * 70 and not ev.resized
    assert fb_array(conn)[:3].sum() == 0 and fb_array(conn)[:, :20].sum() == 0


@pytest.mark.parametrize("encoding", [enc.HEXTILE, enc.ZLIB, enc.ZRLE, enc.TIGHT])
def test_fed_a_byte_at_a_time_and_streams_persist_across_updates(encoding):
    encoder, conn = enc.Encoder(), Connection(established=(40, 20))
    for seed in range(3):                       # zlib streams run on across updates
        pix = picture(40, 20, seed=seed, colours=None if seed != 1 else 5)
        roundtrip(encoding, pix, encoder=encoder, conn=conn, step=1 if seed == 0 else 97)
        assert np.array_equal(fb_array(conn), pix)


def test_tight_gradient_filter_and_uncompressed_short_data():
    # the server never uses the gradient filter: a hand-made rectangle
    w, h = 3, 2
    rgb = bytes([10, 20, 30, 15, 25, 35, 40, 50, 60, 1, 2, 3, 200, 100, 50, 255, 0, 9])
    # the filter sends V - clamp(left + up - upleft) per component
    diff = bytearray(len(rgb))
    for j in range(h):
        for i in range(3 * w):
            left = rgb[j * 9 + i - 3] if i >= 3 else 0
            up = rgb[(j - 1) * 9 + i] if j else 0
            upleft = rgb[(j - 1) * 9 + i - 3] if j and i >= 3 else 0
            diff[j * 9 + i] = (rgb[j * 9 + i] - max(0, min(255, left + up - upleft))) & 0xFF
    z = zlib.compressobj()
    body = z.compress(bytes(diff)) + z.flush(zlib.Z_SYNC_FLUSH)
    rect = struct.pack(">HHHHi", 0, 0, w, h, enc.TIGHT) + b"\x40\x02" + enc.compact_length(len(body)) + body
    conn = Connection(established=(w, h))
    feed(conn, update([rect], 1))
    want = bytearray()
    for i in range(0, len(rgb), 3):
        want += bytes((rgb[i + 2], rgb[i + 1], rgb[i], 0))
    assert conn.fb == want
    # 2x1 copy filter: 6 bytes < 12, sent without zlib and without a length
    rect = struct.pack(">HHHHi", 1, 1, 2, 1, enc.TIGHT) + b"\x00" + bytes([1, 2, 3, 4, 5, 6])
    feed(conn, update([rect], 1))
    assert conn.pixels(1, 1, 2, 1) == bytes([3, 2, 1, 0, 6, 5, 4, 0])


def _pil_jpeg(data: bytes) -> bytes:
    from PIL import Image
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_tight_jpeg_needs_a_decoder_and_uses_the_one_given():
    pix = picture(64, 48, seed=9)
    count, data = enc.Encoder().encode(enc.TIGHT, GUEST_32, pix, 0, 0, 64, 48, jpeg_quality=9)
    assert data[12] >> 4 == 0x9
    with pytest.raises(RfbError, match="JPEG"):
        feed(Connection(established=(64, 48)), update([data], count))
    conn = Connection(established=(64, 48), jpeg=_pil_jpeg)
    feed(conn, update([data], count))
    assert np.abs(fb_array(conn).astype(int) - pix).mean() < 12          # lossy, but the picture
    walk = Connection(established=(64, 48), decode=False)               # walking needs no decoder
    assert isinstance(feed(walk, update([data], count))[0], FramebufferUpdate)


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 70), h=st.integers(1, 40), colours=st.sampled_from([None, 1, 2, 3, 17, 300]),
       encoding=st.sampled_from([enc.RRE, enc.HEXTILE, enc.ZLIB, enc.ZRLE, enc.TIGHT]),
       seed=st.integers(0, 1000))
def test_any_picture_round_trips(w, h, colours, encoding, seed):
    pix = picture(w, h, seed=seed, colours=colours)
    conn, _ = roundtrip(encoding, pix)
    assert np.array_equal(fb_array(conn), pix)


@pytest.mark.parametrize("step", [1, 7, 1000, None])
@pytest.mark.parametrize("encoding", [enc.RAW, enc.RRE, enc.HEXTILE, enc.ZLIB, enc.ZRLE, enc.TIGHT])
def test_walking_consumes_exactly_the_update(encoding, step):
    # a mixed picture: Hextile's raw, solid and subrectangle tiles
    pix = picture(90, 50, seed=1, colours=None if encoding != enc.RRE else 4)
    pix[:, 200:] = picture(40, 50, seed=2, colours=3)
    count, data = enc.Encoder().encode(encoding, GUEST_32, pix, 0, 0, 90, 50)
    conn = Connection(established=(90, 50), decode=False)
    conn.record = bytearray()
    msg = update([data], count)
    events = feed(conn, msg + b"\x02", step=step)                      # and a Bell after it
    assert [type(e) for e in events] == [FramebufferUpdate, Bell]
    assert conn.record == msg + b"\x02" and not any(conn.fb)


def test_copyrect_overlapping_and_pseudo_encodings():
    conn = Connection(established=(4, 2))
    conn.fb[:] = bytes(range(32))
    rects = [struct.pack(">HHHHiHH", 1, 0, 3, 2, enc.COPYRECT, 0, 0)]     # overlapping, to the right
    feed(conn, update(rects, 1))
    want = bytearray(range(32))
    for j in range(2):
        want[j * 16 + 4:j * 16 + 16] = bytes(range(j * 16, j * 16 + 12))
    assert conn.fb == want
    # DesktopSize, then ExtendedDesktopSize (one screen), then LastRect ends a 0xFFFF count
    ext = struct.pack(">HHHHi", 0, 0, 8, 6, enc.EXT_DESKTOP_SIZE) + b"\x01\0\0\0" + bytes(16)
    msg = (struct.pack(">BxH", 0, 0xFFFF) + struct.pack(">HHHHi", 0, 0, 3, 3, enc.DESKTOP_SIZE) + ext +
           struct.pack(">HHHHi", 0, 0, 0, 0, rc.LAST_RECT))
    (ev,) = feed(conn, msg)
    assert ev.resized and (conn.width, conn.height) == (8, 6) and len(conn.fb) == 8 * 6 * 4
    assert [r.encoding for r in ev.rects] == [enc.DESKTOP_SIZE, enc.EXT_DESKTOP_SIZE]


def test_other_server_messages_are_events():
    conn = Connection(established=(2, 2))
    msg = (b"\x02" + b"\x03\0\0\0" + struct.pack(">I", 5) + b"hello" +
           b"\x01\0" + struct.pack(">HH", 7, 1) + struct.pack(">HHH", 1, 2, 3))
    assert feed(conn, msg, step=3) == [Bell(), ServerCutText(b"hello"), SetColourMapEntries(7, [(1, 2, 3)])]


# ---- the handshake ----------------------------------------------------------------
def server_init(w: int, h: int, name: bytes = b"dom") -> bytes:
    return struct.pack(">HH16sI", w, h, FORMAT, len(name)) + name


def test_handshake_38_none_then_pixel_format_and_encodings():
    conn = Connection(encodings=[enc.TIGHT, enc.DESKTOP_SIZE])
    assert feed(conn, b"RFB 003.008\n") == [] and conn.data_to_send() == b"RFB 003.008\n"
    feed(conn, b"\x02\x02\x01")
    assert conn.data_to_send() == b"\x01" and conn.security_types == [2, 1]
    events = feed(conn, b"\0\0\0\0" + server_init(6, 4, b"d\xc3\xa9"))
    assert events == [ServerInit(6, 4, "d\u00e9", FORMAT)] and conn.auth == "ok"
    out = conn.data_to_send()
    assert out == (b"\x01" + b"\0\0\0\0" + rc.PIXEL_FORMAT +
                   struct.pack(">BxHii", 2, 2, enc.TIGHT, enc.DESKTOP_SIZE))
    conn.request(False)
    conn.key_event(0x61, True)
    conn.pointer_event(3, 2, 1)
    assert conn.data_to_send() == (struct.pack(">BBHHHH", 3, 0, 0, 0, 6, 4) + struct.pack(">BBxxI", 4, 1, 0x61) +
                                   struct.pack(">BBHH", 5, 1, 3, 2))


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n", b"RFB 003.889\n"])
def test_vnc_auth_in_every_version(version):
    challenge = bytes(range(16))
    conn = Connection(password="pw")
    minor = 3 if version == b"RFB 003.003\n" else 7 if version == b"RFB 003.007\n" else 8
    feed(conn, version + (b"\0\0\0\x02" if minor == 3 else b"\x01\x02") + challenge)
    out = conn.data_to_send()
    assert out == b"RFB 003.%03d\n" % minor + (b"" if minor == 3 else b"\x02") + vnc_response("pw", challenge)
    assert isinstance(feed(conn, b"\0\0\0\0" + server_init(2, 2))[0], ServerInit)


def test_refusals_say_why():
    conn = Connection()
    with pytest.raises(PasswordRequired):
        feed(conn, b"RFB 003.008\n\x01\x02")
    assert conn.auth == "needs-password"
    conn = Connection(password="x", require_auth=True)
    with pytest.raises(PasswordRequired):
        feed(conn, b"RFB 003.008\n\x01\x01")
    assert conn.auth == "no-vnc-auth-offered"
    conn = Connection()
    with pytest.raises(Refused, match="too many"):
        feed(conn, b"RFB 003.008\n\0" + struct.pack(">I", 8) + b"too many")
    conn = Connection(password="bad")
    with pytest.raises(Refused, match="wrong"):
        feed(conn, b"RFB 003.008\n\x01\x02" + bytes(16) + b"\0\0\0\x01" + struct.pack(">I", 5) + b"wrong")
    assert conn.auth == "failed" and conn.reason == "wrong"


# ---- hostile servers ------------------------------------------------------------
def rect(x, y, w, h, encoding, body=b""):
    return struct.pack(">HHHHi", x, y, w, h, encoding) + body


def _bomb() -> bytes:
    z = zlib.compressobj()
    return z.compress(bytes(1 << 24)) + z.flush(zlib.Z_SYNC_FLUSH)


HOSTILE = {
    "not rfb": b"HTTP/1.1 200\r\n",
    "name": b"RFB 003.008\n\x01\x01\0\0\0\0" + struct.pack(">HH16sI", 4, 2, FORMAT, 1 << 30),
    "huge": b"RFB 003.008\n\x01\x01\0\0\0\0" + server_init(65535, 65535),
    "zero": b"RFB 003.008\n\x01\x01\0\0\0\0" + server_init(0, 5),
    "reason": b"RFB 003.008\n\0" + struct.pack(">I", 1 << 31),
}
NORMAL = {        # after the handshake, a 16x16 screen, every encoding asked for
    "msgtype": b"\x77",
    "cut text": b"\x03\0\0\0" + struct.pack(">I", 1 << 30),
    "colour map": b"\x01\0" + struct.pack(">HH", 0, 60000),
    "outside": update([rect(10, 0, 7, 1, enc.RAW)], 1),
    "not asked": update([rect(0, 0, 1, 1, -239)], 1),
    "desktop size": update([rect(0, 0, 9000, 10, enc.DESKTOP_SIZE)], 1),
    "copyrect source": update([rect(0, 0, 4, 4, enc.COPYRECT, struct.pack(">HH", 14, 0))], 1),
    "rre count": update([rect(0, 0, 2, 2, enc.RRE, struct.pack(">I", 1 << 31) + bytes(4))], 1),
    "rre subrect": update([rect(0, 0, 2, 2, enc.RRE, struct.pack(">I", 1) + bytes(8) + struct.pack(">HHHH", 1, 1, 2, 1))], 1),
    "hextile mask": update([rect(0, 0, 2, 2, enc.HEXTILE, b"\x40")], 1),
    "hextile subrect": update([rect(0, 0, 4, 4, enc.HEXTILE, b"\x08\x01\x33\x11")], 1),
    "zlib length": update([rect(0, 0, 16, 16, enc.ZLIB, struct.pack(">I", 0xFFFFFFFF))], 1),
    "zlib garbage": update([rect(0, 0, 2, 2, enc.ZLIB, struct.pack(">I", 5) + b"\xff" * 5)], 1),
    "zlib bomb": update([rect(0, 0, 2, 2, enc.ZLIB, struct.pack(">I", len(_bomb())) + _bomb())], 1),
    "zlib short": update([rect(0, 0, 2, 2, enc.ZLIB, struct.pack(">I", 10) + zlib.compress(b"abc")[:10])], 1),
    "zrle length": update([rect(0, 0, 16, 16, enc.ZRLE, struct.pack(">I", 0xFFFFFFFF))], 1),
    "zrle bomb": update([rect(0, 0, 2, 2, enc.ZRLE, struct.pack(">I", len(_bomb())) + _bomb())], 1),
    "zrle subenc": update([rect(0, 0, 2, 2, enc.ZRLE, struct.pack(">I", len(zlib.compress(b"\x7f"))) + zlib.compress(b"\x7f"))], 1),
    "tight filter": update([rect(0, 0, 2, 2, enc.TIGHT, b"\x40\x07")], 1),
    "tight control": update([rect(0, 0, 2, 2, enc.TIGHT, b"\xf0")], 1),
    "tight length": update([rect(0, 0, 16, 16, enc.TIGHT, b"\x00\xff\xff\xff")], 1),
    "tight index": update([rect(0, 0, 4, 4, enc.TIGHT, b"\x60\x01\x02" + bytes(9) + b"\x09" * 16)], 1),
}


def _normal_conn() -> Connection:
    conn = Connection(encodings=[enc.RAW, enc.COPYRECT, enc.RRE, enc.HEXTILE, enc.ZLIB, enc.ZRLE, enc.TIGHT,
                                 enc.DESKTOP_SIZE])
    feed(conn, b"RFB 003.008\n\x01\x01\0\0\0\0" + server_init(16, 16))
    return conn


@pytest.mark.parametrize("case", sorted(HOSTILE) + sorted(NORMAL))
def test_hostile_input_is_a_clear_error(case):
    conn = _normal_conn() if case in NORMAL else Connection()
    with pytest.raises(RfbError) as info:
        feed(conn, NORMAL.get(case) or HOSTILE[case])
    assert str(info.value)
    with pytest.raises(RfbError):             # and stays an error
        conn.next_event()
    conn.receive_data(bytes(1 << 20))         # what comes after it is not kept
    assert not conn._buf and conn.wanted == 0


def test_truncated_data_is_connection_closed_not_a_hang():
    pix = picture(30, 20, seed=2)
    count, data = enc.Encoder().encode(enc.ZRLE, GUEST_32, pix, 0, 0, 30, 20)
    msg = update([data], count)
    for cut in (1, 5, 20, len(msg) - 1):
        conn = Connection(established=(30, 20))
        assert feed(conn, msg[:cut]) == []
        conn.receive_data(b"")
        with pytest.raises(ConnectionClosed):
            conn.next_event()


def test_a_walker_skips_huge_raw_without_buffering():
    conn = Connection(established=(4000, 4000), decode=False)
    feed(conn, update([rect(0, 0, 4000, 4000, enc.RAW)], 1))
    for _ in range(100):
        conn.receive_data(bytes(640000))
        assert len(conn._buf) == 0
    assert isinstance(conn.next_event(), FramebufferUpdate)


def test_the_client_imports_only_the_standard_library():
    code = ("import sys, pyxenfb.rfb.client\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'Crypto', 'zlib_ng', 'PIL')"
            " or m.startswith(('pyxenfb.convert', 'pyxenfb.console', 'pyxenfb.rfb.encodings')))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("level", [0, 1, 9])
@pytest.mark.parametrize("encoding", [enc.ZLIB, enc.ZRLE, enc.TIGHT])
def test_noise_at_every_compress_level_fits_the_bounds(encoding, level):
    # incompressible data comes out larger than it went in: the client's bounds allow it
    encoder = enc.Encoder(compress_level=level)
    pix = picture(800, 120, seed=level)
    conn, _ = roundtrip(encoding, pix, encoder=encoder)
    assert np.array_equal(fb_array(conn), pix)
