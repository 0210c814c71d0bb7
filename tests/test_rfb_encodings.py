"""Encoders against independent reference decoders, for many formats and sizes."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pyxenfb.convert import GUEST_32, PixelFormat, convert_rect
from pyxenfb.rfb import encodings as enc
from rfb_harness import make_picture

FORMATS = {
    "bgrx32": GUEST_32,
    "rgbx32": PixelFormat(32, 24, False, 255, 255, 255, 0, 8, 16),
    "be32": PixelFormat(32, 24, True, 255, 255, 255, 16, 8, 0),
    "high32": PixelFormat(32, 24, False, 255, 255, 255, 24, 16, 8),
    "rgb565": PixelFormat(16, 16, False, 31, 63, 31, 11, 5, 0),
    "be565": PixelFormat(16, 16, True, 31, 63, 31, 11, 5, 0),
    "bgr233": PixelFormat(8, 8, False, 7, 7, 3, 5, 2, 0),
    "rgb111": PixelFormat(8, 3, False, 1, 1, 1, 2, 1, 0),
}
SIZES = [(1, 1), (17, 33), (70, 3), (2050, 40)]
BIG = (641, 79)       # odd width and height (vncdotool tests do 641x479 end to end)


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), "read past the end of the encoded data"
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self): return self.take(1)[0]
    def u16(self): return struct.unpack(">H", self.take(2))[0]
    def u32(self): return struct.unpack(">I", self.take(4))[0]

    def compact(self) -> int:
        n, shift = 0, 0
        for i in range(3):
            b = self.u8()
            n |= (b & (0x7F if i < 2 else 0xFF)) << shift
            shift += 7
            if i < 2 and not b & 0x80:
                break
        return n


class Decoder:
    """Straightforward per-pixel decoders written from the spec (slow, obvious)."""

    def __init__(self, fmt: PixelFormat, width: int, height: int):
        self.fmt, self.bpp = fmt, fmt.bytes_per_pixel
        self.fb = np.zeros((height, width * self.bpp), np.uint8)
        self.zlib = zlib.decompressobj()
        self.zrle = zlib.decompressobj()
        self.tight = [zlib.decompressobj() for _ in range(4)]

    def fill(self, x, y, w, h, pixel: bytes):
        self.fb[y:y + h, x * self.bpp:(x + w) * self.bpp] = np.tile(np.frombuffer(pixel, np.uint8), (h, w))

    def put(self, x, y, w, h, data: bytes):
        self.fb[y:y + h, x * self.bpp:(x + w) * self.bpp] = np.frombuffer(data, np.uint8).reshape(h, w * self.bpp)

    def update(self, data: bytes, count: int):
        r = Reader(data)
        for _ in range(count):
            x, y, w, h = r.u16(), r.u16(), r.u16(), r.u16()
            (e,) = struct.unpack(">i", r.take(4))
            getattr(self, {0: "raw", 2: "rre", 5: "hextile", 6: "zlib_", 16: "zrle_", 7: "tight_",
                           -260: "tight_"}[e])(r, x, y, w, h)
        assert r.pos == len(data), "trailing bytes"

    def raw(self, r, x, y, w, h):
        self.put(x, y, w, h, r.take(w * h * self.bpp))

    def rre(self, r, x, y, w, h):
        n = r.u32()
        self.fill(x, y, w, h, r.take(self.bpp))
        for _ in range(n):
            pix = r.take(self.bpp)
            sx, sy, sw, sh = r.u16(), r.u16(), r.u16(), r.u16()
            assert sx + sw <= w and sy + sh <= h
            self.fill(x + sx, y + sy, sw, sh, pix)

    def hextile(self, r, x, y, w, h):
        bg = fg = None
        for ty in range(y, y + h, 16):
            for tx in range(x, x + w, 16):
                tw, th = min(16, x + w - tx), min(16, y + h - ty)
                mask = r.u8()
                if mask & 1:
                    self.put(tx, ty, tw, th, r.take(tw * th * self.bpp))
                    bg = fg = None
                    continue
                if mask & 2:
                    bg = r.take(self.bpp)
                assert bg is not None
                self.fill(tx, ty, tw, th, bg)
                if mask & 4:
                    fg = r.take(self.bpp)
                if mask & 8:
                    for _ in range(r.u8()):
                        if mask & 16:
                            colour = r.take(self.bpp)
                        else:
                            assert fg is not None
                            colour = fg
                        xy, wh = r.u8(), r.u8()
                        sx, sy, sw, sh = xy >> 4, xy & 15, (wh >> 4) + 1, (wh & 15) + 1
                        assert sx + sw <= tw and sy + sh <= th
                        self.fill(tx + sx, ty + sy, sw, sh, colour)
                if mask & 16:
                    fg = None

    def zlib_(self, r, x, y, w, h):
        data = self.zlib.decompress(r.take(r.u32()))
        self.put(x, y, w, h, data)

    def _cpixel(self):
        f = self.fmt
        if f.bpp == 32 and f.depth <= 24:
            top = max(m << s for m, s in ((f.red_max, f.red_shift), (f.green_max, f.green_shift),
                                          (f.blue_max, f.blue_shift)))
            if top < 1 << 24:
                return 3, (lambda b: b + b"\0") if not f.big_endian else (lambda b: b"\0" + b)
            if min(f.red_shift, f.green_shift, f.blue_shift) >= 8:
                return 3, (lambda b: b"\0" + b) if not f.big_endian else (lambda b: b + b"\0")
        return self.bpp, lambda b: b

    def _expand_many(self, data: bytes, size: int, expand) -> bytes:
        if size == self.bpp:
            return data
        pad = expand(b"\1\1\1").index(0)      # where expand() puts the zero byte
        arr = np.frombuffer(data, np.uint8).reshape(-1, 3)
        return np.insert(arr, pad, 0, axis=1).tobytes()

    def zrle_(self, r, x, y, w, h):
        t = Reader(self.zrle.decompress(r.take(r.u32())))
        size, expand = self._cpixel()
        for ty in range(y, y + h, 64):
            for tx in range(x, x + w, 64):
                tw, th = min(64, x + w - tx), min(64, y + h - ty)
                sub = t.u8()
                if sub == 0:
                    self.put(tx, ty, tw, th, self._expand_many(t.take(size * tw * th), size, expand))
                elif sub == 1:
                    self.fill(tx, ty, tw, th, expand(t.take(size)))
                elif 2 <= sub <= 16:
                    pal = [expand(t.take(size)) for _ in range(sub)]
                    bits = 1 if sub == 2 else 2 if sub <= 4 else 4
                    rows = []
                    for _ in range(th):
                        row_bytes = t.take((tw * bits + 7) // 8)
                        val = int.from_bytes(row_bytes, "big")
                        total = len(row_bytes) * 8
                        for i in range(tw):
                            idx = (val >> (total - (i + 1) * bits)) & ((1 << bits) - 1)
                            assert idx < sub
                            rows.append(pal[idx])
                    self.put(tx, ty, tw, th, b"".join(rows))
                elif sub == 128 or sub >= 130:        # plain RLE, palette RLE
                    pal = [expand(t.take(size)) for _ in range(sub - 128)]
                    pixels = []
                    while len(pixels) < tw * th:
                        if not pal:
                            colour, more = expand(t.take(size)), True
                        else:
                            b = t.u8()
                            assert b & 127 < len(pal)
                            colour, more = pal[b & 127], bool(b & 128)
                        length = 1
                        while more:               # 255 255 ... then the rest
                            b = t.u8()
                            length += b
                            more = b == 255
                        pixels += [colour] * length
                    assert len(pixels) == tw * th, "RLE run past the tile"
                    self.put(tx, ty, tw, th, b"".join(pixels))
                else:
                    raise AssertionError(f"unexpected ZRLE subencoding {sub}")
        assert t.pos == len(t.data)

    def _tpixel(self, r):
        if enc.tight_pixel24(self.fmt):
            rgb = r.take(3)
            f = self.fmt
            v = rgb[0] << f.red_shift | rgb[1] << f.green_shift | rgb[2] << f.blue_shift
            return v.to_bytes(4, "big" if f.big_endian else "little")
        return r.take(self.bpp)

    def _rgb_to_pixels(self, rgb: np.ndarray) -> bytes:
        from pyxenfb.convert import RGB888
        h, w, _ = rgb.shape
        return convert_rect(rgb.reshape(h, w * 3), RGB888, self.fmt, 0, 0, w, h).tobytes()

    def tight_(self, r, x, y, w, h):
        assert w <= 2048
        control = r.u8()
        kind = control >> 4
        if kind == 8:
            self.fill(x, y, w, h, self._tpixel(r))
            return
        if kind in (9, 10):
            img = Image.open(io.BytesIO(r.take(r.compact())))
            self.put(x, y, w, h, self._rgb_to_pixels(np.asarray(img.convert("RGB"))))
            return
        assert kind < 8
        for i in range(4):          # bits 0-3: start stream i afresh
            if control & (1 << i):
                self.tight[i] = zlib.decompressobj()
        stream = kind & 3
        filt = r.u8() if kind & 4 else 0
        tp = 3 if enc.tight_pixel24(self.fmt) else self.bpp
        if filt == 1:
            n = r.u8() + 1
            pal = [self._tpixel(r) for _ in range(n)]
            size = ((w + 7) // 8) * h if n == 2 else w * h
        else:
            assert filt in (0, 2)
            assert filt == 0 or tp == 3, "gradient only for 3-byte TPIXELs here"
            size = w * h * tp
        data = r.take(size) if size < 12 else self.tight[stream].decompress(r.take(r.compact()))
        assert len(data) == size
        if filt == 1:
            if n == 2:
                bits = np.unpackbits(np.frombuffer(data, np.uint8).reshape(h, -1), axis=1)[:, :w]
            else:
                bits = np.frombuffer(data, np.uint8).reshape(h, w)
            self.put(x, y, w, h, b"".join(pal[i] for i in bits.reshape(-1)))
        else:
            if tp == 3:
                rgb = np.frombuffer(data, np.uint8).reshape(h, w, 3)
                if filt == 2:
                    rgb = _ungradient(rgb)
                self.put(x, y, w, h, self._rgb_to_pixels(rgb))
            else:
                self.put(x, y, w, h, data)


def _ungradient(diff: np.ndarray) -> np.ndarray:
    """Tight's gradient filter undone pixel by pixel: V = D + clamp(left + up - upleft)."""
    h, w, _ = diff.shape
    out = np.zeros((h, w, 3), np.int64)
    for j in range(h):
        for i in range(w):
            left = out[j, i - 1] if i else 0
            up = out[j - 1, i] if j else 0
            upleft = out[j - 1, i - 1] if i and j else 0
            out[j, i] = (diff[j, i] + np.clip(left + up - upleft, 0, 255)) & 255
    return out.astype(np.uint8)


def _surface_pixels(width, height, fmt, seed=0):
    s = make_picture(width, height, seed)
    return convert_rect(s.rows, s.fmt, fmt, 0, 0, width, height)


def _channel_bits(fmt, rows: np.ndarray) -> np.ndarray:
    """`rows` with the padding bits cleared: ZRLE's CPIXEL and Tight's TPIXEL
    send 3 bytes of a 32-bit pixel, so a decoder cannot know the padding
    (pyxenfb's converter sets it to 1s, a plain copy keeps the guest's)."""
    used = 0
    for m, s in fmt.channels:
        used |= m << s
    mask = np.frombuffer(used.to_bytes(fmt.bytes_per_pixel, "big" if fmt.big_endian else "little"), np.uint8)
    return rows & np.tile(mask, rows.shape[1] // fmt.bytes_per_pixel)


@pytest.mark.parametrize("encoding", [enc.RAW, enc.RRE, enc.HEXTILE, enc.ZLIB, enc.ZRLE, enc.TIGHT])
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_lossless_round_trip(encoding, fmt_name):
    fmt = FORMATS[fmt_name]
    encoder = enc.Encoder()
    dec = Decoder(fmt, 1, 1)     # one decoder: the zlib streams persist across updates
    sizes = SIZES + [BIG] if fmt_name == "bgrx32" else SIZES + [(97, 61)]
    for (w, h) in sizes:
        pixels = _surface_pixels(w, h, fmt, seed=w)
        for _ in range(2):
            dec.fb = np.zeros((h, w * fmt.bytes_per_pixel), np.uint8)
            count, data = encoder.encode(encoding, fmt, pixels, 0, 0, w, h)
            dec.update(data, count)
            if encoding in (enc.ZRLE, enc.TIGHT):
                assert np.array_equal(_channel_bits(fmt, dec.fb), _channel_bits(fmt, pixels)), (fmt_name, w, h)
            else:
                assert np.array_equal(dec.fb, pixels), (fmt_name, w, h)


def test_subrectangle_offsets():
    """Encoders place sub-rectangles at the rectangle's position, not at 0,0."""
    fmt = GUEST_32
    full = _surface_pixels(100, 90, fmt)
    for encoding in (enc.RRE, enc.HEXTILE, enc.ZRLE, enc.TIGHT, enc.ZLIB):
        dec = Decoder(fmt, 100, 90)
        part = np.ascontiguousarray(full[30:77, 13 * 4:(13 + 61) * 4])
        count, data = enc.Encoder().encode(encoding, fmt, part, 13, 30, 61, 47)
        dec.update(data, count)
        assert np.array_equal(_channel_bits(fmt, dec.fb[30:77, 13 * 4:74 * 4]), _channel_bits(fmt, part))
        assert not dec.fb[:30].any() and not dec.fb[77:].any()


def test_tight_png_and_jpeg():
    fmt = FORMATS["rgbx32"]
    pixels = _surface_pixels(300, 200, fmt)
    dec = Decoder(fmt, 300, 200)
    count, data = enc.Encoder().encode(enc.TIGHT_PNG, fmt, pixels, 0, 0, 300, 200)
    dec.update(data, count)
    assert np.array_equal(dec.fb, pixels)
    count, data = enc.Encoder().encode(enc.TIGHT, fmt, pixels, 0, 0, 300, 200, jpeg_quality=9)
    assert data[12] >> 4 == 9          # JPEG compression control
    dec.update(data, count)
    err = np.abs(dec.fb.astype(int) - pixels.astype(int))
    assert err.mean() < 3


def test_tight_fill_and_compact_length():
    assert enc.compact_length(10000) == b"\x90\x4e"
    assert enc.compact_length(127) == b"\x7f"
    assert enc.compact_length(4194303) == b"\xff\xff\xff"
    fmt = GUEST_32
    pixels = np.tile(np.array([1, 2, 3, 0], np.uint8), (5, 7))
    count, data = enc.Encoder().encode(enc.TIGHT, fmt, pixels, 0, 0, 7, 5)
    assert count == 1 and data[12:] == b"\x80\x03\x02\x01"   # fill, TPIXEL R,G,B


def test_encoders_read_only_their_rectangle():
    """An encoder given exactly w*h pixels never needs more (a smaller buffer would raise)."""
    fmt = GUEST_32
    for (w, h) in [(1, 1), (15, 17), (641, 1), (1, 479)]:
        pixels = _surface_pixels(w, h, fmt)
        for encoding in (enc.RAW, enc.RRE, enc.HEXTILE, enc.ZLIB, enc.ZRLE, enc.TIGHT, enc.TIGHT_PNG):
            count, data = enc.Encoder().encode(encoding, fmt, pixels, 0, 0, w, h)
            dec = Decoder(fmt, w, h)
            dec.update(data, count)
            assert np.array_equal(_channel_bits(fmt, dec.fb), _channel_bits(fmt, pixels))


def _level_picture(width: int, height: int, seed: int) -> np.ndarray:
    """Compressible but not trivial: a gradient with some noise in the low
    bits (every update differs, too many colours for palettes)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    noise = rng.integers(0, 4, (height, width)) * (x % 16 == 0)
    v = ((x // 8 + y + seed) & 0xFF) << 16 | ((y * 3) & 0xFF) << 8 | noise
    return v.astype("<u4").view(np.uint8).reshape(height, width * 4)


@pytest.mark.parametrize("encoding", [enc.ZLIB, enc.ZRLE, enc.TIGHT])
def test_compress_level_change_mid_stream(encoding):
    """A new CompressLevel applies to streams already running, and a client's
    continuing inflaters (one per stream, never reset for Zlib/ZRLE) decode
    every update across the changes; the level really changes the output."""
    fmt = GUEST_32
    w, h = 256, 128
    encoder = enc.Encoder()
    dec = Decoder(fmt, w, h)
    sizes = {}
    for step, level in enumerate([None, 9, 0, 9, 1, 6, 1, 9]):
        encoder.set_compress_level(level)
        pixels = _level_picture(w, h, step)
        # Two bands of 64 rows, as the server sends a big update.
        data = b"".join(encoder.encode(encoding, fmt, np.ascontiguousarray(pixels[y:y + 64]),
                                       0, y, w, 64)[1] for y in (0, 64))
        dec.update(data, 2)
        assert np.array_equal(_channel_bits(fmt, dec.fb), _channel_bits(fmt, pixels)), (level, step)
        sizes.setdefault(level, []).append(len(data))
    # Level 0 stores; any other level compresses, 9 clearly (ZRLE's RLE has
    # already taken much of what deflate would).
    assert min(sizes[0]) > max(sizes[9] + sizes[1] + sizes[6] + sizes[None])
    assert max(sizes[9]) < 0.7 * min(sizes[0])


def test_tight_level_change_resets_only_that_stream():
    fmt = GUEST_32
    pixels = _level_picture(64, 64, 0)
    encoder = enc.Encoder()
    first = encoder.encode(enc.TIGHT, fmt, pixels, 0, 0, 64, 64)[1]
    again = encoder.encode(enc.TIGHT, fmt, pixels, 0, 0, 64, 64)[1]
    encoder.compress_level = 9              # what ServerConnection sets
    changed = encoder.encode(enc.TIGHT, fmt, pixels, 0, 0, 64, 64)[1]
    # full colour (gradient filter), stream 0, no reset
    assert first[12:14] == again[12:14] == b"\x40\x02"
    assert changed[12:14] == b"\x41\x02"   # stream 0 reset, then level 9
    assert encoder.compress_level == 9


def test_tight_streams_let_go_when_idle_restart_with_their_reset_bit():
    """release_idle_memory drops Tight's zlib streams; the next rectangle on
    each stream that was in use resets it (control bit N), once, and a
    decoder that kept its inflaters decodes every rectangle exactly.  A
    stream never used needs no reset."""
    fmt = GUEST_32
    full = _level_picture(64, 64, 0)                         # stream 0 (gradient)
    mono = np.where(np.arange(64 * 64).reshape(64, 64) % 3 == 0, 0x00FFFFFF, 0).astype("<u4")
    mono = mono.view(np.uint8).reshape(64, 256)               # two colours: stream 1
    encoder = enc.Encoder()
    dec = Decoder(fmt, 64, 64)

    def send(pixels) -> bytes:
        data = encoder.encode(enc.TIGHT, fmt, pixels, 0, 0, 64, 64)[1]
        dec.update(data, 1)
        assert np.array_equal(_channel_bits(fmt, dec.fb), _channel_bits(fmt, pixels))
        return data
    assert send(full)[12] == 0x40 and send(mono)[12] == 0x50          # streams 0 and 1, no reset
    assert encoder.live_streams() == 2
    encoder.release_idle_memory()
    assert encoder.live_streams() == 0
    assert send(mono)[12] == 0x52 and send(mono)[12] == 0x50          # stream 1 reset (bit 1), once
    assert send(full)[12] == 0x41 and send(full)[12] == 0x40          # stream 0 reset, once
    palette = (np.arange(64 * 64).reshape(64, 64) % 5 * 0x1F1F1F).astype("<u4")
    assert send(palette.view(np.uint8).reshape(64, 256))[12] == 0x60   # stream 2: new, no reset


def test_tight_gradient_can_be_refused():
    """gradient=False (a noVNC client): full colour goes with the copy filter."""
    fmt = GUEST_32
    pixels = _level_picture(64, 64, 0)
    data = enc.Encoder().encode(enc.TIGHT, fmt, pixels, 0, 0, 64, 64, gradient=False)[1]
    assert data[12] == 0x00
    dec = Decoder(fmt, 64, 64)
    dec.update(data, 1)
    assert np.array_equal(_channel_bits(fmt, dec.fb), _channel_bits(fmt, pixels))


def test_zlib_continuation_survives_a_plain_decompressobj():
    """The Zlib stream across level changes is one valid zlib stream prefix:
    exactly what a client's single inflater sees."""
    fmt = GUEST_32
    encoder = enc.Encoder()
    inflater = zlib.decompressobj()
    for step, level in enumerate([None, 0, 9, 3, 0, 5]):
        encoder.set_compress_level(level)
        pixels = _level_picture(100, 30, step)
        data = encoder.encode(enc.ZLIB, fmt, pixels, 0, 0, 100, 30)[1]
        (n,) = struct.unpack(">I", data[12:16])
        assert len(data) == 16 + n
        assert inflater.decompress(data[16:]) == pixels.tobytes()



@pytest.mark.parametrize("fmt_name", list(FORMATS))
@pytest.mark.parametrize("pattern", ["checker", "stripes", "thirds", "sparse"])
def test_hextile_two_colour_tiles_with_many_runs(fmt_name, pattern):
    """Two-colour tiles up to the most runs a tile can have (8 per row) in
    every pixel size: whichever form the encoder picks, it decodes exactly."""
    fmt = FORMATS[fmt_name]
    w, h = 67, 35                                   # edge tiles too
    y, x = np.mgrid[0:h, 0:w]
    fg = {"checker": (x + y) % 2 == 0, "stripes": x % 2 == 0, "thirds": x % 3 == 0,
          "sparse": np.random.default_rng(5).random((h, w)) < 0.2}[pattern]
    one, two = (np.array([v] + [0] * (fmt.bytes_per_pixel - 1), np.uint8) for v in (1, 2))
    pixels = np.where(fg[..., None], one, two).reshape(h, -1).astype(np.uint8)
    dec = Decoder(fmt, w, h)
    count, data = enc.Encoder().encode(enc.HEXTILE, fmt, np.ascontiguousarray(pixels), 0, 0, w, h)
    dec.update(data, count)
    assert np.array_equal(dec.fb, pixels)


# RRE never sends more than Raw (issue 21 item 8) ------------------------------
def _rre_and_raw_sizes(fmt, pixels, w, h):
    count, data = enc.Encoder().encode(enc.RRE, fmt, pixels, 3, 5, w, h)
    raw = 12 + w * h * fmt.bytes_per_pixel            # Raw's header and pixels
    return count, data, raw


def test_rre_gradient_is_not_bigger_than_raw():
    """A gradient (every pixel a new run) at 32 bpp was 2.7x Raw's bytes."""
    fmt = GUEST_32
    w, h = 256, 64
    xs = np.arange(w, dtype=np.uint32)
    words = np.tile((xs << 16) | (xs << 8) | xs, (h, 1)) + np.arange(h, dtype=np.uint32)[:, None]
    pixels = np.ascontiguousarray(words.astype("<u4").view(np.uint8).reshape(h, w * 4))
    count, data, raw = _rre_and_raw_sizes(fmt, pixels, w, h)
    assert len(data) <= raw
    dec = Decoder(fmt, w + 3, h + 5)
    dec.update(data, count)
    assert np.array_equal(dec.fb[5:, 12:], pixels)


def test_rre_still_used_where_it_wins():
    fmt = GUEST_32
    pixels = np.zeros((40, 40 * 4), np.uint8)
    pixels[10:12, 40:80] = 0xFF
    _, data, raw = _rre_and_raw_sizes(fmt, pixels, 40, 40)
    assert struct.unpack(">i", data[8:12])[0] == enc.RRE and len(data) < raw // 10


@settings(max_examples=200, deadline=None)
@given(fmt_name=st.sampled_from(list(FORMATS)), w=st.integers(1, 40), h=st.integers(1, 12),
       colours=st.integers(1, 6), data=st.data())
def test_rre_never_exceeds_raw_and_decodes_exactly(fmt_name, w, h, colours, data):
    fmt = FORMATS[fmt_name]
    bpp = fmt.bytes_per_pixel
    palette = data.draw(st.lists(st.binary(min_size=bpp, max_size=bpp), min_size=colours, max_size=colours))
    picks = data.draw(st.lists(st.integers(0, colours - 1), min_size=w * h, max_size=w * h))
    pixels = np.frombuffer(b"".join(palette[i] for i in picks), np.uint8).reshape(h, w * bpp).copy()
    count, encoded, raw = _rre_and_raw_sizes(fmt, pixels, w, h)
    assert len(encoded) <= raw
    dec = Decoder(fmt, w + 3, h + 5)
    dec.update(encoded, count)
    assert np.array_equal(dec.fb[5:, 3 * bpp:], pixels)


# Hextile: coloured subrectangles, mono tiles, the C kernel and its numpy twin ------------
def _hextile_tiles(data: bytes, w: int, h: int, bpp: int) -> list[tuple[int, int]]:
    """(subencoding mask, number of subrectangles) of each tile of one
    Hextile rectangle's body."""
    r, out = Reader(data), []
    for ty in range(0, h, 16):
        for tx in range(0, w, 16):
            tw, th = min(16, w - tx), min(16, h - ty)
            mask = r.u8()
            if mask & 1:
                r.take(tw * th * bpp)
                out.append((mask, 0))
                continue
            r.take(bpp * (bool(mask & 2) + bool(mask & 4)))
            n = r.u8() if mask & 8 else 0
            r.take(n * (2 + (bpp if mask & 16 else 0)))
            out.append((mask, n))
    assert r.pos == len(data)
    return out


def _hextile_body(fmt, pixels, w, h):
    count, data = enc.Encoder().encode(enc.HEXTILE, fmt, np.ascontiguousarray(pixels), 0, 0, w, h)
    assert count == 1 and struct.unpack(">i", data[8:12])[0] == enc.HEXTILE
    dec = Decoder(fmt, w, h)
    dec.update(data, count)
    assert np.array_equal(dec.fb, pixels)
    return data[12:]


def _pixels_from(fmt, index: np.ndarray, palette: list[bytes]) -> np.ndarray:
    h, w = index.shape
    return np.frombuffer(b"".join(palette[i] for i in index.reshape(-1)), np.uint8).reshape(h, -1).copy()


def _colour(fmt, i: int) -> bytes:
    return (0x10203 * (i + 1) * 37 % (1 << fmt.bpp)).to_bytes(fmt.bytes_per_pixel,
                                                             "big" if fmt.big_endian else "little")


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_hextile_text_tiles_go_mono_and_a_vertical_stroke_is_one_subrect(fmt_name):
    """A glyph-like tile (two colours, strokes) is mono: foreground once, 2
    bytes a subrectangle, a vertical stroke one subrectangle even where a
    bar crosses it (the bar's subrectangle overlaps it: a partition into
    rectangles would take three); the next tile with the same foreground
    does not repeat it."""
    fmt = FORMATS[fmt_name]
    w, h = 37, 21                                   # edge tiles too
    index = np.zeros((h, w), int)
    index[2:14, 3] = 1                              # a vertical stroke: one subrectangle
    index[7, 2:9] = 1
    index[2:14, 19] = 1
    index[18:21, 34:37] = 1                         # in the corner edge tile (5x5)
    pixels = _pixels_from(fmt, index, [_colour(fmt, 0), _colour(fmt, 1)])
    tiles = _hextile_tiles(_hextile_body(fmt, pixels, w, h), w, h, fmt.bytes_per_pixel)
    HT_BG, HT_FG, HT_ANY = 2, 4, 8
    assert tiles[0] == (HT_BG | HT_FG | HT_ANY, 2)  # the whole stroke, the bar across it
    assert tiles[1] == (HT_ANY, 1)                  # same background and foreground: neither again
    assert tiles[2][0] == 0                         # plain background
    assert tiles[5] == (HT_ANY, 1)                  # the corner: its block is one subrectangle


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_hextile_many_colour_tile_goes_coloured_not_raw(fmt_name):
    """Bands of many colours are SubrectsColoured (a pixel + 2 bytes each),
    where the old encoder sent raw; noise stays raw."""
    fmt = FORMATS[fmt_name]
    w, h = 48, 19
    y, x = np.mgrid[0:h, 0:w]
    bands = (x // 4 + y // 3) % 8                   # 8 colours in blocks
    noise = np.random.default_rng(1).integers(0, 8, (h, w))
    index = np.where(x < 32, bands, noise)
    palette = [_colour(fmt, i) for i in range(8)]
    if len(set(palette)) < 8:                      # 3-bit formats: fewer distinct colours
        pytest.skip("format has fewer than 8 colours")
    tiles = _hextile_tiles(_hextile_body(fmt, _pixels_from(fmt, index, palette), w, h),
                           w, h, fmt.bytes_per_pixel)
    HT_RAW, HT_COLOURED = 1, 16
    assert tiles[0][0] & HT_COLOURED and tiles[1][0] & HT_COLOURED
    if fmt.bytes_per_pixel > 1:                     # at 1 byte a pixel raw is cheap: may win
        assert tiles[2][0] == HT_RAW


@settings(max_examples=300, deadline=None)
@given(fmt_name=st.sampled_from(list(FORMATS)), w=st.integers(1, 50), h=st.integers(1, 40),
       colours=st.integers(1, 8), block=st.integers(1, 6), data=st.data())
def test_hextile_kernel_and_numpy_twin_agree_and_decode(fmt_name, w, h, colours, block, data):
    """The C kernel's bytes are exactly its numpy twin's, and both decode to
    the pixels (random colours in blocks, so every tile kind appears)."""
    from pyxenfb.rfb import enc_kernel
    fmt = FORMATS[fmt_name]
    bpp = fmt.bytes_per_pixel
    palette = data.draw(st.lists(st.binary(min_size=bpp, max_size=bpp), min_size=colours, max_size=colours))
    cells = data.draw(st.lists(st.integers(0, colours - 1), min_size=((w + block - 1) // block) * ((h + block - 1) // block),
                               max_size=((w + block - 1) // block) * ((h + block - 1) // block)))
    index = np.array(cells).reshape(-(-h // block), -(-w // block)).repeat(block, 0).repeat(block, 1)[:h, :w]
    pixels = _pixels_from(fmt, index, palette)
    twin = enc.hextile_plan(enc._values(pixels, fmt, w, h), fmt)
    dec = Decoder(fmt, w, h)
    dec.update(enc.rect_header(0, 0, w, h, enc.HEXTILE) + twin, 1)
    assert np.array_equal(dec.fb, pixels)
    assert enc_kernel.load() is not None, "the C kernel is not built (python3 hatch_build.py)"
    assert enc_kernel.hextile(pixels, w, h, bpp) == twin


def test_hextile_without_the_kernel_uses_the_twin(monkeypatch):
    from pyxenfb.rfb import enc_kernel
    fmt = GUEST_32
    pixels = _surface_pixels(50, 30, fmt)
    with_kernel = enc.Encoder().encode(enc.HEXTILE, fmt, pixels, 0, 0, 50, 30)[1]
    monkeypatch.setattr(enc_kernel, "load", lambda: None)
    assert enc.Encoder().encode(enc.HEXTILE, fmt, pixels, 0, 0, 50, 30)[1] == with_kernel


# ZRLE: the subencoding per tile, the C kernel and its numpy twin --------------------------
def _zrle_subencodings(fmt, pixels, w, h) -> list[int]:
    """Each tile's subencoding byte, after checking the rectangle decodes exactly."""
    count, data = enc.Encoder().encode(enc.ZRLE, fmt, np.ascontiguousarray(pixels), 0, 0, w, h)
    dec = Decoder(fmt, w, h)
    dec.update(data, count)
    assert np.array_equal(_channel_bits(fmt, dec.fb), _channel_bits(fmt, pixels))
    stream = zlib.decompressobj().decompress(data[16:])   # sync-flushed, never ended
    subs, pos = [], 0
    size = 3 if enc._cpixel_bytes(fmt) is not None else fmt.bytes_per_pixel
    for ty in range(0, h, 64):
        for tx in range(0, w, 64):
            tw, th = min(64, w - tx), min(64, h - ty)
            sub = stream[pos]
            subs.append(sub)
            pos += 1
            if sub == 0:
                pos += tw * th * size
            elif sub == 1:
                pos += size
            elif sub <= 16:
                bits = 1 if sub == 2 else 2 if sub <= 4 else 4
                pos += sub * size + th * ((tw * bits + 7) // 8)
            else:                                   # RLE: walk the runs
                palette = sub - 128 if sub > 128 else 0
                pos += palette * size
                left = tw * th
                while left:
                    if palette:
                        idx = stream[pos]
                        pos += 1
                        run = 1
                        if idx & 128:
                            run = 1
                            while stream[pos] == 255:
                                run, pos = run + 255, pos + 1
                            run, pos = run + stream[pos], pos + 1
                    else:
                        pos += size
                        run = 1
                        while stream[pos] == 255:
                            run, pos = run + 255, pos + 1
                        run, pos = run + stream[pos], pos + 1
                    left -= run
                    assert left >= 0
    assert pos == len(stream)
    return subs


@pytest.mark.parametrize("fmt_name", ["bgrx32", "be32", "rgb565", "be565", "bgr233"])
def test_zrle_picks_solid_packed_rle_and_raw_per_tile(fmt_name):
    fmt = FORMATS[fmt_name]
    bpp = fmt.bytes_per_pixel
    w, h = 64 * 4 + 5, 64 + 7                       # edge tiles too
    rng = np.random.default_rng(2)
    colours = max(2, min(200, 1 << fmt.depth))
    palette = list({_colour(fmt, i) for i in range(colours)})
    index = np.zeros((h, w), int)
    index[:, 64:128] = rng.integers(0, 2, (h, 64))              # two colours, noisy: packed
    index[:, 128:192] = np.arange(h)[:, None] % len(palette)     # a colour per row: runs of 64
    index[:, 192:256] = rng.integers(0, len(palette), (h, 64))   # noise: raw
    subs = _zrle_subencodings(fmt, _pixels_from(fmt, index, palette), w, h)
    assert subs[0] == 1                                          # solid
    assert subs[1] == 2                                          # packed, 2 colours
    # 71 rows of 64: palette RLE when the colours fit 127, else plain RLE
    assert subs[2] == (128 + min(len(palette), 64) if len(palette) <= 64 else 128)
    if bpp > 1:
        assert subs[3] == 0                                      # raw
    assert subs[5] == 1 and subs[9] == 1                         # edge tiles: still solid


def test_zrle_kernel_scratch_gives_the_same_stream():
    """The Encoder's reused buffer for the tile stream: the same bytes as a
    fresh one, grown for a bigger rectangle, and a fresh buffer instead
    when a view of the last stream is still held (it cannot be resized)."""
    from pyxenfb.rfb import enc_kernel
    assert enc_kernel.load() is not None, "the C kernel is not built (python3 hatch_build.py)"
    fmt = FORMATS["bgrx32"]
    scratch = bytearray()
    held = None
    for w, h in ((70, 20), (130, 90), (20, 10), (200, 100)):
        pixels = make_picture(w, h, seed=w).rows
        vals = enc._values(pixels, fmt, w, h)
        view = enc.zrle_tiles(vals, fmt, scratch)
        assert isinstance(view, memoryview) and view == enc.zrle_tiles(vals, fmt) == enc.zrle_plan(vals, fmt)
        if w == 130:
            assert len(scratch) >= 130 * 90 * 3            # grown in place
        if w == 20:
            held = view             # still alive when the next, bigger one needs room
        del view
    assert held is not None and 130 * 90 * 3 <= len(scratch) < 200 * 100 * 3


def test_zrle_small_rects_decode_whole_from_their_own_bytes():
    """ZRLE ends a rectangle's data with a partial flush: each rectangle's
    bytes alone give the inflater all of its tiles (nothing held back for
    the next one), also across a CompressLevel change, and a small
    rectangle costs ~4 bytes less than with a sync flush's empty stored block."""
    fmt = FORMATS["bgrx32"]
    rng = np.random.default_rng(5)
    e, inflater = enc.Encoder(), zlib.decompressobj()
    synced = zlib.compressobj(6, zlib.DEFLATED, 15, enc._ZRLE_MEM_LEVEL)
    ours = sync = 0
    for i in range(40):
        if i == 20:
            e.set_compress_level(1)
        w, h = (8, 16) if i % 2 else (64, 16)
        colours = np.array([0x202020, 0xE0E0E0, 0x3366CC], np.uint32)
        pixels = np.ascontiguousarray(colours[rng.integers(0, 3, (h, w)) * (i % 3 != 0)])
        pixels = pixels.view(np.uint8).reshape(h, w * 4)
        count, data = e.encode(enc.ZRLE, fmt, pixels, 0, 0, w, h)
        tiles = enc.zrle_tiles(enc._values(pixels, fmt, w, h), fmt)
        assert inflater.decompress(data[16:]) == tiles
        if i < 20:                                  # the same level as the sync-flushed stream
            ours += len(data) - 16
            sync += len(synced.compress(tiles) + synced.flush(zlib.Z_SYNC_FLUSH))
    assert ours <= sync - 3 * 20


def test_zrle_compresses_the_gradient_beyond_xvnc():
    """xanim's gradient frames (what the vnc_rate bench serves) through one
    ZRLE stream: more compression than TigerVNC's Xvnc gets on them (8.49 at
    800x600, docs/performance.md), as zlib-ng's default block size gave 7.9;
    the stream inflates, continued across updates, to the tile streams."""
    from pyxenfb.sim.picture import xanim_frames
    fmt = FORMATS["bgrx32"]
    w, h = 800, 600
    e, inflater, wire = enc.Encoder(), zlib.decompressobj(), 0
    for frame in xanim_frames(w, h, 4):
        pixels = np.ascontiguousarray(frame).view(np.uint8).reshape(h, w * 4)
        count, data = e.encode(enc.ZRLE, fmt, pixels, 0, 0, w, h)
        assert count == 1 and struct.unpack(">I", data[12:16])[0] == len(data) - 16
        assert inflater.decompress(data[16:]) == enc.zrle_tiles(enc._values(pixels, fmt, w, h), fmt)
        wire += len(data)
    assert 4 * w * h * 4 / wire >= 8.8


@settings(max_examples=200, deadline=None)
@given(fmt_name=st.sampled_from(list(FORMATS)), w=st.integers(1, 150), h=st.integers(1, 80),
       colours=st.integers(1, 140), run=st.integers(1, 300), data=st.data())
def test_zrle_kernel_and_numpy_twin_agree(fmt_name, w, h, colours, run, data):
    """Byte-identical tile streams from the C kernel and its twin, for
    palettes up to past 127 colours and runs up to past 255 pixels."""
    from pyxenfb.rfb import enc_kernel
    fmt = FORMATS[fmt_name]
    bpp = fmt.bytes_per_pixel
    seed = data.draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (colours, bpp), dtype=np.uint8)
    picks = rng.integers(0, colours, -(-w * h // run)).repeat(run)[:w * h]
    pixels = palette[picks].reshape(h, w * bpp)
    vals = enc._values(pixels, fmt, w, h)
    twin = enc.zrle_plan(vals, fmt)
    assert enc_kernel.load() is not None, "the C kernel is not built (python3 hatch_build.py)"
    sel = enc._cpixel_bytes(fmt)
    coff, cb = (sel[0], 3) if sel is not None else (0, bpp)
    assert enc_kernel.zrle_tiles(pixels, w, h, bpp, coff, cb) == twin
    dec = Decoder(fmt, w, h)
    body = zlib.compress(twin)
    dec.update(enc.rect_header(0, 0, w, h, enc.ZRLE) + struct.pack(">I", len(body)) + body, 1)
    assert np.array_equal(_channel_bits(fmt, dec.fb), _channel_bits(fmt, pixels))


@settings(max_examples=100, deadline=None)
@given(w=st.integers(1, 70), h=st.integers(1, 40), smooth=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
def test_gradient_kernel_and_numpy_twin_agree(w, h, smooth, seed):
    from pyxenfb.rfb import enc_kernel
    rng = np.random.default_rng(seed)
    if smooth:       # predictions inside 0..255 mostly, clamped at the edges
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([(x * 7 + y) % 256, (y * 9) % 256, (x * 3 + y * 5) % 256], -1).astype(np.uint8)
    else:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert enc_kernel.load() is not None, "the C kernel is not built (python3 hatch_build.py)"
    twin = enc.gradient24_plan(rgb)
    assert enc_kernel.gradient24(rgb) == twin
    assert np.array_equal(_ungradient(np.frombuffer(twin, np.uint8).reshape(h, w, 3)), rgb)


@settings(max_examples=150, deadline=None)
@given(fmt_name=st.sampled_from(list(FORMATS)), w=st.integers(1, 90), h=st.integers(1, 30),
       colours=st.integers(1, 300), run=st.integers(1, 20), seed=st.integers(0, 2 ** 32 - 1))
def test_palette_kernel_and_numpy_twin_agree(fmt_name, w, h, colours, run, seed):
    """Tight's palette: the kernel's sorted colours and indices are the numpy
    path's (sort, searchsorted), and both refuse past 256 colours."""
    from pyxenfb.rfb import enc_kernel
    fmt = FORMATS[fmt_name]
    bpp = fmt.bytes_per_pixel
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 256, (colours, bpp), dtype=np.uint8)
    picks = rng.integers(0, colours, -(-w * h // run)).repeat(run)[:w * h]
    vals = enc._values(table[picks].reshape(h, w * bpp), fmt, w, h)
    assert enc_kernel.load() is not None, "the C kernel is not built (python3 hatch_build.py)"
    twin = enc._few_colours(vals, 256)
    got = enc_kernel.palette(vals, 256)
    if twin is None:
        assert got is None
    else:
        assert np.array_equal(got[0], twin) and got[0].dtype == vals.dtype
        assert np.array_equal(got[1], np.searchsorted(twin, vals))


def test_a_kernel_of_another_version_is_not_used(tmp_path):
    """An editable install whose library predates its source falls back to
    numpy (same bytes) instead of calling functions that changed."""
    import subprocess
    import sys
    src = tmp_path / "old.c"
    src.write_text("int pyxenfb_enc_version(void) { return -7; }\n")
    lib = tmp_path / "_enc_kernel.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, timeout=60)
    code = ("import pyxenfb.rfb.enc_kernel as k; k.LIBRARY = %r; print(k.load() is None)" % str(lib))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
    assert "another version" in out.stderr


@settings(max_examples=300, deadline=None)
@given(encoding=st.sampled_from([enc.RAW, enc.RRE, enc.HEXTILE, enc.ZLIB, enc.ZRLE, enc.TIGHT, enc.TIGHT_PNG]),
       x=st.integers(0, 100), y=st.integers(0, 100), w=st.integers(1, 5000), h=st.integers(1, 3000))
def test_pieces_cover_a_rectangle_exactly_within_each_encodings_limits(encoding, x, y, w, h):
    """What an update's head announces: the pieces tile the rectangle with
    no overlap; Tight's are at most 2048 wide and 65536 pixels; the others'
    are full-width bands starting on 64-row multiples (tile grids kept),
    one piece when small, and Raw is never cut."""
    got = enc.pieces(encoding, x, y, w, h)
    cover = np.zeros((h, w), np.int8)
    for px, py, pw, ph in got:
        assert pw > 0 and ph > 0
        cover[py - y:py - y + ph, px - x:px - x + pw] += 1
    assert (cover == 1).all()
    if encoding in (enc.TIGHT, enc.TIGHT_PNG):
        assert all(pw <= enc.TIGHT_MAX_WIDTH and pw * ph <= max(enc.TIGHT_MAX_AREA, pw) for _, _, pw, ph in got)
    elif encoding == enc.RAW or w * h <= enc.BAND_PIXELS:
        assert got == [(x, y, w, h)]
    else:
        assert all(pw == w and (py - y) % 64 == 0 for px, py, pw, ph in got)
        assert all(pw * ph <= max(enc.BAND_PIXELS, 64 * w) for _, _, pw, ph in got)
