"""The sans-IO RFB core, driven without sockets; plus hypothesis fuzzing."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyxenfb.convert import GUEST_32, convert_rect
from pyxenfb.rfb import encodings as enc
from pyxenfb.rfb import protocol as rfb
from pyxenfb.rfb.auth import Blacklist, des_key, vnc_response
from pyxenfb.rfb.updates import send_update as _send_update
from rfb_harness import make_picture

_ENCODERS: dict = {}


def send_update(conn, rows, fmt, rects):
    """One update at once, with the connection's own encoder (its zlib streams)."""
    return _send_update(conn, rows, fmt, rects, _ENCODERS.setdefault(id(conn), (conn, enc.Encoder()))[1],
                        convert_rect)


def new(password=None, **kw) -> rfb.ServerConnection:
    conn = rfb.ServerConnection(800, 600, "QEMU (test)", password=password, **kw)
    assert conn.data_to_send() == b"RFB 003.008\n"
    return conn


def to_normal(conn=None, version=b"RFB 003.008\n") -> rfb.ServerConnection:
    if conn is None:
        conn = new()
    else:
        conn.data_to_send()
    conn.receive_data(version)
    if version == b"RFB 003.008\n":
        conn.receive_data(b"\x01")
    conn.receive_data(b"\x01")
    conn.data_to_send()
    assert conn.state == "normal"
    return conn


def pixel_format(bpp=32, depth=24, big=0, tc=1, maxes=(255, 255, 255), shifts=(16, 8, 0)) -> bytes:
    return struct.pack(">BBBBHHHBBB3x", bpp, depth, big, tc, *maxes, *shifts)


def set_encodings(*encs) -> bytes:
    return struct.pack(f">BxH{len(encs)}i", 2, len(encs), *encs)


def fbur(incremental, x=0, y=0, w=800, h=600) -> bytes:
    return struct.pack(">BBHHHH", 3, incremental, x, y, w, h)


# ------------------------------------------------------------------ handshake
@pytest.mark.parametrize("client,minor", [(b"RFB 003.003\n", 3), (b"RFB 003.004\n", 3), (b"RFB 003.005\n", 3),
                                          (b"RFB 003.007\n", 7), (b"RFB 003.008\n", 8), (b"RFB 003.009\n", 8),
                                          (b"RFB 003.889\n", 8)])
def test_versions_accepted(client, minor):
    conn = new()
    conn.receive_data(client)
    assert conn.version == minor
    out = conn.data_to_send()
    assert out == (b"\0\0\0\x01" if minor == 3 else b"\x01\x01")


@pytest.mark.parametrize("client", [b"RFB 003.006\n", b"RFB 004.001\n", b"RFB 003.00\n\n", b"RFB 003.000\n",
                                    b"GET / HTTP/1.1\r\n"])
def test_versions_refused(client):
    conn = new()
    with pytest.raises(rfb.ProtocolError):
        conn.receive_data(client)
    assert conn.closed


def test_server_init_and_padding():
    conn = new()
    conn.receive_data(b"RFB 003.008\n\x01")
    assert conn.data_to_send() == b"\x01\x01\0\0\0\0"   # one type (None), SecurityResult OK in 3.8
    events = conn.receive_data(b"\x01")
    assert events == [rfb.ClientInit(True)]
    out = conn.data_to_send()
    w, h = struct.unpack(">HH", out[:4])
    assert (w, h) == (800, 600)
    assert out[4:20] == pixel_format() and out[17:20] == b"\0\0\0"
    assert out[20:24] == struct.pack(">I", 11) and out[24:] == b"QEMU (test)"


def test_none_auth_in_33_and_37_has_no_security_result():
    conn = new()
    events = conn.receive_data(b"RFB 003.003\n")
    assert events == [rfb.Authenticated()] and conn.state == "client_init"
    conn = new()
    conn.receive_data(b"RFB 003.007\n")
    conn.data_to_send()
    conn.receive_data(b"\x01")
    assert conn.data_to_send() == b"" and conn.state == "client_init"


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"])
def test_vnc_auth(version):
    conn = new(password="pass")
    conn.receive_data(version)
    out = conn.data_to_send()
    if version == b"RFB 003.003\n":
        assert out[:4] == b"\0\0\0\x02"
        challenge = out[4:]
    else:
        assert out == b"\x01\x02"
        conn.receive_data(b"\x02")
        challenge = conn.data_to_send()
    assert len(challenge) == 16
    events = conn.receive_data(vnc_response("pass", challenge))
    assert events == [rfb.Authenticated()] and conn.data_to_send() == b"\0\0\0\0"


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"])
def test_vnc_auth_wrong_password(version):
    conn = new(password="pass")
    conn.receive_data(version)
    out = conn.data_to_send()
    if version != b"RFB 003.003\n":
        conn.receive_data(b"\x02")
        out = conn.data_to_send()
    with pytest.raises(rfb.AuthenticationFailed):
        conn.receive_data(vnc_response("passX", out[-16:]))
    out = conn.data_to_send()
    if version == b"RFB 003.008\n":
        assert out == b"\0\0\0\x01" + struct.pack(">I", 21) + b"Authentication failed"
    else:
        assert out == b"\0\0\0\x01"


def test_challenge_is_fresh_and_only_8_password_bytes_count():
    a, b = new(password="12345678"), new(password="12345678")
    for c in (a, b):
        c.receive_data(b"RFB 003.008\n\x02")
    ca, cb = a.data_to_send()[2:], b.data_to_send()[2:]
    assert ca != cb
    a.receive_data(vnc_response("12345678-and-more", ca))
    assert a.state == "client_init"
    # The RFB key is the password with each byte's bits reversed.
    assert des_key("\x01\x80") == b"\x80\x01" + b"\0" * 6


@pytest.mark.parametrize("choice", [b"\x00", b"\x01", b"\xff", b"\x13"])
def test_wrong_security_type(choice):
    conn = new(password="pw")
    conn.receive_data(b"RFB 003.008\n")
    conn.data_to_send()
    with pytest.raises(rfb.ProtocolError) as caught:
        conn.receive_data(choice)
    # Nothing was guessed: not a blacklist failure.
    assert not isinstance(caught.value, rfb.AuthenticationFailed)
    out = conn.data_to_send()
    assert out[:4] == b"\0\0\0\x01" and b"security type" in out


def test_expired_password_always_fails():
    conn = new(password="pw", password_expired=True)
    conn.receive_data(b"RFB 003.008\n\x02")
    challenge = conn.data_to_send()[2:]
    with pytest.raises(rfb.ProtocolError, match="expired") as caught:
        conn.receive_data(vnc_response("pw", challenge))
    assert not isinstance(caught.value, rfb.AuthenticationFailed)


@pytest.mark.parametrize("guess", ["", "pw"])
def test_empty_password_lets_nobody_in_and_is_no_guess(guess):
    conn = new(password="")
    conn.receive_data(b"RFB 003.008\n\x02")
    challenge = conn.data_to_send()[2:]
    with pytest.raises(rfb.ProtocolError, match="no VNC password set") as caught:
        conn.receive_data(vnc_response(guess, challenge))
    assert not isinstance(caught.value, rfb.AuthenticationFailed)
    assert conn.data_to_send() == b"\0\0\0\x01" + struct.pack(">I", 21) + b"Authentication failed"


@pytest.mark.parametrize("version,prefix", [(b"RFB 003.008\n", b"\x00"), (b"RFB 003.003\n", b"\0\0\0\0")])
def test_blocked_address_gets_reason(version, prefix):
    conn = new(blocked_reason="Too many security failures")
    with pytest.raises(rfb.ProtocolError):
        conn.receive_data(version)
    assert conn.data_to_send() == prefix + struct.pack(">I", 26) + b"Too many security failures"


def test_blacklist_doubles():
    now = [0.0]
    bl = Blacklist(threshold=5, timeout=10, clock=lambda: now[0])
    for _ in range(4):
        bl.failure("a")
    assert bl.blocked_for("a") == 0
    bl.failure("a")
    assert bl.blocked_for("a") == 10 and bl.blocked_for("b") == 0
    now[0] = 11
    assert bl.blocked_for("a") == 0
    bl.failure("a")
    assert bl.blocked_for("a") == 20
    bl.success("a")
    assert bl.blocked_for("a") == 0


# ------------------------------------------------------------------ messages
def test_messages_split_at_every_byte():
    stream = (pixel_format_msg := b"\0\0\0\0" + pixel_format(shifts=(0, 8, 16))) + set_encodings(5, -258, 16) \
        + fbur(0) + struct.pack(">BBxxI", 4, 1, 0x61) + struct.pack(">BBHH", 5, 1, 10, 20) \
        + struct.pack(">BxxxI", 6, 3) + b"abc" + fbur(1, 1, 2, 3, 4)
    whole = to_normal()
    expected = whole.receive_data(stream)
    split = to_normal()
    got = []
    for i in range(len(stream)):
        got += split.receive_data(stream[i:i + 1])
    assert got == expected
    assert [type(e) for e in got] == [rfb.PixelFormatChanged, rfb.EncodingsChanged, rfb.UpdateRequest,
                                      rfb.KeyEvent, rfb.PointerEvent, rfb.CutText, rfb.UpdateRequest]
    assert got[3] == rfb.KeyEvent(True, 0x61) and got[4] == rfb.PointerEvent(1, 10, 20)
    assert got[6] == rfb.UpdateRequest(True, 1, 2, 3, 4)
    assert len(pixel_format_msg) == 20


@pytest.mark.parametrize("fmt", [
    pixel_format(bpp=0), pixel_format(bpp=1), pixel_format(bpp=7), pixel_format(bpp=24),
    pixel_format(bpp=64), pixel_format(bpp=255), pixel_format(depth=33), pixel_format(bpp=16, depth=24),
    pixel_format(maxes=(0, 255, 255)), pixel_format(maxes=(254, 255, 255)), pixel_format(maxes=(0xFFFF, 255, 255)),
    pixel_format(shifts=(32, 8, 0)), pixel_format(shifts=(255, 8, 0)), pixel_format(shifts=(0, 0, 0)),
    pixel_format(depth=0),
])
def test_bad_pixel_formats_rejected(fmt):
    conn = to_normal()
    with pytest.raises(rfb.ProtocolError, match="SetPixelFormat"):
        conn.receive_data(b"\0\0\0\0" + fmt)


def test_colour_map_request_gets_fixed_palette():
    conn = to_normal()
    conn.receive_data(b"\0\0\0\0" + pixel_format(bpp=8, depth=8, tc=0))
    out = conn.data_to_send()
    assert out[:6] == b"\x01\x00\x00\x00\x01\x00" and len(out) == 6 + 256 * 6
    assert conn.pixel_format == rfb.PALETTE_FORMAT
    # Entry 0xFF is white (R 7, G 7, B 3 at shifts 0, 3, 6).
    assert out[6 + 255 * 6:] == b"\xff\xff" * 3
    # An update arrives as palette indices.
    conn.receive_data(fbur(0, 0, 0, 1, 1))
    surface = make_picture()
    send_update(conn, surface.rows, surface.fmt, [(0, 0, 1, 1)])
    out = conn.data_to_send()
    assert len(out) == 4 + 12 + 1


@pytest.mark.parametrize("encs,chosen", [
    ([], enc.RAW), ([99, -5, 1], enc.RAW), ([-258, -223], enc.RAW), ([1, 7, 5], enc.TIGHT),
    ([6, 16], enc.ZRLE), ([6, 5], enc.ZLIB), ([-314, -239, 16, 7, 5, 0], enc.ZRLE), ([5, 5, 2], enc.HEXTILE),
    ([-260, 7], enc.TIGHT_PNG),
])
def test_encoding_choice(encs, chosen):
    conn = to_normal()
    assert conn.receive_data(set_encodings(*encs)) == [rfb.EncodingsChanged(chosen)]


def test_set_encodings_65535_entries():
    conn = to_normal()
    values = list(range(100, 100 + 65534)) + [enc.HEXTILE]
    assert conn.receive_data(set_encodings(*values)) == [rfb.EncodingsChanged(enc.HEXTILE)]


def test_quality_and_compression_levels():
    conn = to_normal()
    conn.receive_data(set_encodings(7, -24, -254))
    assert conn.jpeg_quality == 8 and conn.compress_level == 2
    conn.receive_data(set_encodings(7))
    assert conn.jpeg_quality is None


@pytest.mark.parametrize("encs, gradient", [
    ([7, -254], True),                                   # TigerVNC-like: decodes the filter
    ([1, 7, -260, 5, 2, 0, -254], False),                # noVNC's list: its decoder throws on it
])
def test_tight_gradient_filter_only_for_clients_that_decode_it(encs, gradient):
    conn = to_normal()
    conn.receive_data(set_encodings(*encs))
    conn.receive_data(fbur(0))
    plan = conn.begin_update(64, 64, [(0, 0, 64, 64)])
    assert plan.encoding == enc.TIGHT and plan.tight_gradient is gradient
    conn.websocket = True                                # any client through the WebSocket port
    conn.receive_data(fbur(0))
    assert conn.begin_update(64, 64, [(0, 0, 64, 64)]).tight_gradient is False


def test_ext_key_ack_rides_on_next_update():
    conn = to_normal()
    with pytest.raises(rfb.ProtocolError):       # not negotiated yet
        to_normal().receive_data(struct.pack(">BBHII", 255, 0, 1, 0x61, 30))
    conn.receive_data(set_encodings(0, -258))
    assert conn.data_to_send() == b""            # nothing unasked-for
    assert conn.has_pseudo
    conn.receive_data(fbur(1))
    surface = make_picture()
    send_update(conn, surface.rows, surface.fmt, [])
    out = conn.data_to_send()
    assert out == b"\0\0\0\x01" + enc.rect_header(0, 0, 0, 0, -258)
    events = conn.receive_data(struct.pack(">BBHII", 255, 0, 1, 0x61, 30))
    assert events == [rfb.ExtendedKeyEvent(True, 0x61, 30)]
    with pytest.raises(rfb.ProtocolError, match="subtype"):
        conn.receive_data(b"\xff\x01\x00\x00")


def test_fence_and_continuous_updates():
    conn = to_normal()
    with pytest.raises(rfb.ProtocolError):
        to_normal().receive_data(struct.pack(">B3xIB", 248, 1 << 31, 0))
    with pytest.raises(rfb.ProtocolError):
        to_normal().receive_data(struct.pack(">BBHHHH", 150, 1, 0, 0, 10, 10))
    conn.receive_data(set_encodings(0, -312, -313))
    out = conn.data_to_send()
    assert out == struct.pack(">B3xIB", 248, 1 << 31, 0) + b"\x96"
    conn.receive_data(struct.pack(">B3xIB", 248, (1 << 31) | 0x7 | (1 << 20), 3) + b"xyz")
    assert conn.data_to_send() == struct.pack(">B3xIB", 248, 0x7, 3) + b"xyz"
    conn.receive_data(struct.pack(">B3xIB", 248, 0, 0))       # a reply of the client: no answer
    assert conn.data_to_send() == b""
    with pytest.raises(rfb.ProtocolError, match="Fence payload"):
        conn.receive_data(struct.pack(">B3xIB", 248, 1 << 31, 65) + b"x" * 65)
    conn = to_normal()
    conn.receive_data(set_encodings(-313))
    conn.data_to_send()
    assert conn.pending_request is None
    conn.receive_data(struct.pack(">BBHHHH", 150, 1, 0, 0, 800, 600))
    assert conn.pending_request == "incremental"
    conn.receive_data(struct.pack(">BBHHHH", 150, 0, 0, 0, 800, 600))
    assert conn.data_to_send() == b"\x96" and conn.pending_request is None


def test_replies_held_behind_an_open_update_are_capped():
    """While a streamed update is open, the Fence answers a client asks for
    wait behind it in memory.  A client that keeps asking (more than
    MAX_HELD_REPLIES of answers within one update) is closed, not buffered
    for; under the cap its answers all follow the update, in order."""
    def open_conn():
        conn = to_normal()
        conn.receive_data(set_encodings(0, -312) + fbur(0))
        conn.data_to_send()
        plan = conn.begin_update(800, 600, [(0, 0, 800, 600)])
        conn.open_update(plan, 1)
        return conn

    def fence(n):
        return struct.pack(">B3xIB", 248, (1 << 31) | 0x7, 4) + struct.pack(">I", n)
    answer_size = len(fence(0))
    under = rfb.MAX_HELD_REPLIES // answer_size
    conn = open_conn()
    head = bytes(conn.data_to_send())
    conn.receive_data(b"".join(fence(n) for n in range(under)))
    assert bytes(conn.data_to_send()) == b""            # held behind the open update
    conn.update_data([b"R" * 10])
    conn.close_update()
    out = bytes(conn.data_to_send())
    assert head[:4] == b"\0\0\0\x01" and out[:10] == b"R" * 10
    assert out[10:] == b"".join(struct.pack(">B3xIB", 248, 0x7, 4) + struct.pack(">I", n) for n in range(under))

    conn = open_conn()
    with pytest.raises(rfb.ProtocolError, match="replies asked for while one update is sent"):
        conn.receive_data(b"".join(fence(n) for n in range(under + 1)))
    assert conn.closed


def test_set_desktop_size_is_prohibited():
    conn = to_normal()
    conn.receive_data(set_encodings(0, -308))
    for screens, size in ((0, (0, 0)), (1, (1024, 768)), (2, (1, 1))):
        msg = struct.pack(">BxHHBx", 251, *size, screens) + b"\0" * 16 * screens
        assert conn.receive_data(msg) == []
        assert conn.has_pseudo
        conn.receive_data(fbur(1))
        send_update(conn, make_picture().rows, GUEST_32, [])
        out = conn.data_to_send()
        assert out[4:16] == enc.rect_header(1, 1, 800, 600, -308)     # reason 1, status 1
        assert conn.width == 800


def test_a_surface_wider_than_rfb_can_say_is_shown_clipped():
    """A guest can make its surface 70000 pixels wide (one row, 8 bpp): RFB
    sizes are u16, so the client is told 65535 and sees the top-left part."""
    conn = rfb.ServerConnection(70000, 2, "wide")
    conn.data_to_send()
    conn.receive_data(b"RFB 003.008\n\x01\x01")
    assert struct.unpack(">HH", conn.data_to_send()[2 + 4:2 + 4 + 4]) == (65535, 2)
    conn.receive_data(set_encodings(0, -223))
    assert conn.resize(1, 100_000) is True
    conn.receive_data(fbur(1))
    send_update(conn, make_picture(8, 8).rows, GUEST_32, [])
    assert conn.data_to_send() == b"\0\0\0\x01" + enc.rect_header(0, 0, 1, 65535, -223)


def test_changes_outside_a_clients_view_keep_its_request_outstanding():
    """A client that can't follow a resize keeps its 800x600 view: a change
    outside it must not use up its request (it would wait for good)."""
    conn = to_normal()
    assert conn.resize(1024, 768) is False
    conn.receive_data(fbur(1))
    picture = make_picture(1024, 768).rows
    assert send_update(conn, picture, GUEST_32, [(900, 700, 10, 10)]) == 0
    assert conn.data_to_send() == b"" and conn.pending_request == "incremental"
    assert send_update(conn, picture, GUEST_32, [(10, 10, 2, 2)]) > 0
    out = conn.data_to_send()
    assert out[:16] == b"\0\0\0\x01" + enc.rect_header(10, 10, 2, 2, 0)
    assert conn.pending_request is None


def test_resize_goes_alone_and_unsupported_client_refuses():
    conn = to_normal()
    assert conn.resize(1024, 768) is False
    conn = to_normal()
    conn.receive_data(set_encodings(0, -223))
    assert conn.resize(1024, 768) is True and conn.resize_pending
    conn.receive_data(fbur(1))
    send_update(conn, make_picture(1024, 768).rows, GUEST_32, [])
    assert conn.data_to_send() == b"\0\0\0\x01" + enc.rect_header(0, 0, 1024, 768, -223)
    assert not conn.resize_pending


def test_update_clipped_and_padding_zero():
    conn = to_normal()
    conn.receive_data(fbur(0, 790, 590, 65535, 65535))
    surface = make_picture()
    send_update(conn, surface.rows, surface.fmt, [(790, 590, 65535, 65535), (900, 0, 5, 5)])
    out = conn.data_to_send()
    assert out[:4] == b"\0\0\0\x01"           # type, zero padding, one rectangle
    assert out[4:16] == enc.rect_header(790, 590, 10, 10, 0) and len(out) == 16 + 400


def test_full_request_with_nothing_to_send_gets_empty_update():
    conn = to_normal()
    conn.receive_data(fbur(0, 5000, 5000, 0, 0))
    send_update(conn, make_picture().rows, GUEST_32, [])
    assert conn.data_to_send() == b"\0\0\0\0"


def test_cut_text_is_bounded_and_skipped():
    conn = to_normal()
    assert conn.receive_data(struct.pack(">BxxxI", 6, 5) + b"hel") == [rfb.CutText(5)]
    assert conn.receive_data(b"lo" + struct.pack(">BBHH", 5, 0, 1, 1)) == [rfb.PointerEvent(0, 1, 1)]
    for length in (0xFFFFFFFF, 0x7FFFFFFF, 2 << 20):
        with pytest.raises(rfb.ProtocolError, match="ClientCutText"):
            to_normal().receive_data(struct.pack(">BxxxI", 6, length))


@pytest.mark.parametrize("t", [1, 7, 127, 149, 150, 248, 250, 251, 254, 255])
def test_unknown_or_unnegotiated_message_types(t):
    with pytest.raises(rfb.ProtocolError, match="unexpected message type"):
        to_normal().receive_data(bytes([t]) + b"\0" * 20)


# ------------------------------------------------------------------ fuzzing
def _conn_in_state(state: str, password) -> rfb.ServerConnection:
    conn = new(password=password)
    steps = {"version": [], "security": [b"RFB 003.008\n"], "vnc_auth": [b"RFB 003.008\n", b"\x02"],
             "client_init": [b"RFB 003.008\n", b"\x01"], "normal": [b"RFB 003.008\n", b"\x01", b"\x01"]}
    for data in steps[state]:
        conn.receive_data(data)
    return conn


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(state=st.sampled_from(["version", "security", "vnc_auth", "client_init", "normal"]),
       chunks=st.lists(st.binary(max_size=64), max_size=8),
       negotiate=st.booleans())
def test_fuzz_any_bytes_in_any_state(state, chunks, negotiate):
    password = "pw" if state == "vnc_auth" else None
    conn = _conn_in_state(state, password)
    if negotiate and conn.state == "normal":
        conn.receive_data(set_encodings(7, -258, -312, -313, -308, -257, -223, -24))
    surface = make_picture(64, 48)
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except rfb.ProtocolError:
            assert conn.closed
            return
        conn.data_to_send()
        if conn.state == "normal" and conn.pending_request:
            send_update(conn, surface.rows, surface.fmt, [(0, 0, 64, 48)])


@settings(deadline=None, max_examples=150)
@given(messages=st.lists(st.one_of(
    st.builds(lambda b: b"\0\0\0\0" + b, st.binary(min_size=16, max_size=16)),
    st.builds(lambda v: set_encodings(*v), st.lists(st.integers(-2**31, 2**31 - 1), max_size=20)),
    st.builds(lambda i, x, y, w, h: fbur(i, x, y, w, h), st.integers(0, 1), st.integers(0, 65535),
              st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(lambda m, x, y: struct.pack(">BBHH", 5, m, x, y), st.integers(0, 255), st.integers(0, 65535),
              st.integers(0, 65535)),
), max_size=10))
def test_fuzz_well_formed_messages_with_hostile_values(messages):
    """Structured messages: only ProtocolError may escape, and updates always encode."""
    conn = to_normal(rfb.ServerConnection(37, 23, "fuzz"))
    surface = make_picture(37, 23)
    for msg in messages:
        try:
            conn.receive_data(msg)
        except rfb.ProtocolError:
            return
        if conn.pending_request:
            send_update(conn, surface.rows, surface.fmt, [(0, 0, 37, 23), (30, 20, 100, 100)])
        conn.data_to_send()


# ------------------------------------------------------------------ WebSocket layer
_UPGRADE = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def test_websocket_stream_round_trip():
    from pyxenfb.rfb.websocket import WebSocketStream
    ws = WebSocketStream()
    payload, reply = ws.receive(_UPGRADE)
    assert payload == b"" and reply.startswith(b"HTTP/1.1 101") and ws.open
    assert b"Sec-WebSocket-Protocol" not in reply          # none offered, none required
    frame = b"\x82\x83" + b"\0\0\0\0" + b"abc"              # masked with a zero key
    assert ws.receive(frame[:3]) == (b"", b"")
    assert ws.receive(frame[3:]) == (b"abc", b"")
    assert ws.send(b"xyz") == b"\x82\x03xyz"


@settings(deadline=None, max_examples=200)
@given(chunks=st.lists(st.binary(max_size=40), max_size=6), upgrade=st.booleans())
def test_fuzz_websocket_stream(chunks, upgrade):
    from pyxenfb.rfb.websocket import WebSocketError, WebSocketStream
    ws = WebSocketStream()
    if upgrade:
        ws.receive(_UPGRADE)
    for chunk in chunks:
        try:
            ws.receive(chunk)
        except WebSocketError:
            return


# ---------------------------------------------------------------- LED state
def test_led_state_follows_lock_keys_sent_to_the_guest():
    """QEMU LED state (-261): sent on negotiation and whenever a lock key the
    guest receives toggles a lock; bits 1 scroll, 2 num, 4 caps."""
    import struct as _struct

    from rfb_harness import RawClient, ServerThread

    def update_with_leds(c):
        c.send(_struct.pack(">BBHHHH", 3, 1, 0, 0, 8, 8))
        assert c.recv_exact(1) == b"\0"
        _, n = _struct.unpack(">BH", c.recv_exact(3))
        leds = None
        for _ in range(n):
            x, y, w, h, e = _struct.unpack(">HHHHi", c.recv_exact(12))
            if e == -261:
                leds = c.recv_exact(1)[0]
            elif e == 0:
                c.recv_exact(w * h * 4)
        return leds

    srv = ServerThread()
    try:
        c = RawClient(srv.port)
        c.handshake()
        c.send(_struct.pack(">BxH2i", 2, 2, 0, -261))
        assert update_with_leds(c) == 0
        srv.call(srv.console.key, 58, True)          # KEY_CAPSLOCK
        srv.call(srv.console.key, 58, False)
        assert update_with_leds(c) == 4
        srv.call(srv.console.key, 69, True)          # KEY_NUMLOCK
        assert update_with_leds(c) == 6
        assert ("key", 58, True) in srv.input.events  # the guest got the key itself
        c.close()
    finally:
        srv.close()


def test_state_table_refuses_an_illegal_move():
    """The connection changes state only through states.TRANSITIONS: a move
    the table lacks (ServerInit before any security) raises and leaves the
    state as it was."""
    from pyxenfb.rfb.states import State, StateError, Step, next_state
    conn = rfb.ServerConnection(64, 48, "t")
    with pytest.raises(StateError):
        conn._move(Step.CLIENT_INIT)
    assert conn.state is State.VERSION
    with pytest.raises(StateError):
        next_state(State.NORMAL, Step.SECURITY_NONE)
    assert next_state(State.NORMAL, Step.CLOSE) is State.CLOSED


def test_state_table_every_state_reachable_and_closable():
    from pyxenfb.rfb.states import TRANSITIONS, State, Step
    reached, todo = {State.VERSION}, [State.VERSION]
    while todo:
        here = todo.pop()
        for (state, _), there in TRANSITIONS.items():
            if state is here and there not in reached:
                reached.add(there)
                todo.append(there)
    assert reached == set(State)
    assert all(TRANSITIONS[state, Step.CLOSE] is State.CLOSED for state in State)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3 * rfb.SMALL_CHUNK), max_size=40))
def test_chunks_to_send_join_small_runs_and_keep_big_ones(sizes):
    """data_to_send_chunks: the same bytes in the same order; chunks of
    SMALL_CHUNK or more go as they are (no copy of an MB-sized rect); runs
    of smaller ones are joined, each join at most JOINED_MAX, and two
    neighbouring outputs are never both joinable."""
    conn = to_normal()
    conn.data_to_send()
    chunks = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    conn._chunks = list(chunks)
    out = conn.data_to_send_chunks()
    assert b"".join(out) == b"".join(chunks)
    big = [c for c in chunks if len(c) >= rfb.SMALL_CHUNK]
    assert [c for c in out if any(c is b for b in big)] == big
    for c in out:
        assert len(c) >= rfb.SMALL_CHUNK or len(c) <= rfb.JOINED_MAX
    smalls = [c for c in out if not any(c is b for b in big)]
    assert all(len(c) <= rfb.JOINED_MAX for c in smalls)
    for a, b in zip(out, out[1:]):
        joinable = (not any(a is x for x in big) and not any(b is x for x in big)
                    and len(a) + len(b) <= rfb.JOINED_MAX)
        assert not joinable
