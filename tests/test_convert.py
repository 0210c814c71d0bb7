"""convert.py against a slow per-pixel pure-Python reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pyxenfb.convert import (GUEST_8, GUEST_16, GUEST_24, GUEST_32, GUEST_FORMATS, RGB888,
                             PixelFormat, _plan, check_format, convert_rect, to_rgb)


def reference(src: np.ndarray, sf: PixelFormat, df: PixelFormat, x, y, w, h) -> np.ndarray:
    """One pixel at a time with Python ints: the specification."""
    sb, db = sf.bpp // 8, df.bpp // 8
    same = (sf.bpp == df.bpp and sf.channels == df.channels
            and (sf.bpp == 8 or sf.big_endian == df.big_endian))
    out = bytearray()
    for row in range(y, y + h):
        for col in range(x, x + w):
            raw = bytes(src[row, col * sb:(col + 1) * sb])
            if same:                # a format match is a plain copy, padding bits included
                out += raw
                continue
            v = int.from_bytes(raw, "big" if sf.big_endian else "little")
            dv = 0
            for (smax, ss), (dmax, ds) in zip(sf.channels, df.channels):
                c = (v >> ss) & smax
                dv |= ((c * dmax + smax // 2) // smax) << ds
            out += dv.to_bytes(db, "big" if df.big_endian else "little")
    return np.frombuffer(bytes(out), np.uint8).reshape(h, w * db)


NAMED = [
    GUEST_32, GUEST_24, GUEST_16, GUEST_8, RGB888,
    PixelFormat(32, 24, False, 255, 255, 255, 0, 8, 16),      # noVNC / vncdotool RGBX
    PixelFormat(32, 24, True, 255, 255, 255, 16, 8, 0),       # big-endian XRGB
    PixelFormat(32, 24, True, 255, 255, 255, 0, 8, 16),
    PixelFormat(32, 24, False, 255, 255, 255, 24, 16, 8),     # RGBX read the other way
    PixelFormat(24, 24, False, 255, 255, 255, 0, 8, 16),
    PixelFormat(16, 16, True, 31, 63, 31, 11, 5, 0),          # 565 big-endian
    PixelFormat(16, 15, False, 31, 31, 31, 10, 5, 0),         # 555
    PixelFormat(16, 15, True, 31, 31, 31, 0, 5, 10),
    PixelFormat(8, 8, False, 7, 7, 3, 0, 3, 6),               # BGR233 (QEMU colour map)
    PixelFormat(8, 6, False, 3, 3, 3, 4, 2, 0),               # TigerVNC 64 colours
    PixelFormat(8, 3, False, 1, 1, 1, 2, 1, 0),               # TigerVNC 8 colours
    PixelFormat(32, 30, False, 1023, 1023, 1023, 20, 10, 0),  # 10-bit channels
    PixelFormat(32, 31, True, 1023, 31, 65535, 21, 16, 0),    # wide, uneven channels
]


@st.composite
def random_formats(draw) -> PixelFormat:
    bpp = draw(st.sampled_from([8, 16, 24, 32]))
    bits = [draw(st.integers(1, max(1, bpp // 2))) for _ in range(3)]
    while sum(bits) > bpp:
        bits[bits.index(max(bits))] -= 1
    order = draw(st.permutations([0, 1, 2]))
    free = bpp - sum(bits)
    gaps = sorted(draw(st.lists(st.integers(0, free), min_size=3, max_size=3)))
    shifts = [0, 0, 0]
    pos = 0
    for k, ch in enumerate(order):
        pos = max(pos, gaps[k] + sum(bits[c] for c in order[:k]))
        shifts[ch] = pos
        pos += bits[ch]
    maxes = [(1 << b) - 1 for b in bits]
    fmt = PixelFormat(bpp, sum(bits), draw(st.booleans()), *maxes, *shifts)
    check_format(fmt)
    return fmt


formats = st.one_of(st.sampled_from(NAMED), random_formats())


@st.composite
def pictures(draw, fmt_strategy=formats):
    sf = draw(fmt_strategy)
    width, height = draw(st.integers(1, 13)), draw(st.integers(1, 7))
    pad = draw(st.integers(0, 5))
    stride = width * sf.bytes_per_pixel + pad
    seed = draw(st.integers(0, 2**32 - 1))
    src = np.random.default_rng(seed).integers(0, 256, (height, stride), dtype=np.uint8)
    x = draw(st.integers(0, width - 1))
    y = draw(st.integers(0, height - 1))
    w = draw(st.integers(1, width - x))
    h = draw(st.integers(1, height - y))
    return src, sf, (x, y, w, h)


@settings(deadline=None, max_examples=400)
@given(pictures(), formats)
def test_matches_reference(picture, df):
    src, sf, rect = picture
    got = convert_rect(src, sf, df, *rect)
    np.testing.assert_array_equal(got, reference(src, sf, df, *rect))
    assert not np.shares_memory(got, src)


@settings(deadline=None, max_examples=150)
@given(pictures(), formats)
def test_out_parameter_writes_only_the_rect(picture, df):
    """`out` may be a strided window into a bigger buffer (e.g. an SDL surface)."""
    src, sf, (x, y, w, h) = picture
    db = df.bytes_per_pixel
    canvas = np.full((h + 3, (w + 4) * db + 3), 0xA5, np.uint8)
    view = canvas[1:1 + h, 2 * db + 1:(2 + w) * db + 1]
    ret = convert_rect(src, sf, df, x, y, w, h, out=view)
    assert ret is view
    np.testing.assert_array_equal(view, reference(src, sf, df, x, y, w, h))
    outside = canvas.copy()
    outside[1:1 + h, 2 * db + 1:(2 + w) * db + 1] = 0xA5
    assert (outside == 0xA5).all()


@pytest.mark.parametrize("guest_bpp", sorted(GUEST_FORMATS))
@pytest.mark.parametrize("target", NAMED, ids=lambda f: f"{f.bpp}bpp-{'be' if f.big_endian else 'le'}-"
                         f"{f.red_max}.{f.green_max}.{f.blue_max}@{f.red_shift}.{f.green_shift}.{f.blue_shift}")
def test_every_guest_depth_to_every_target(guest_bpp, target):
    sf = GUEST_FORMATS[guest_bpp]
    rng = np.random.default_rng(guest_bpp)
    width, height = 37, 11
    src = rng.integers(0, 256, (height, width * sf.bytes_per_pixel + 4), dtype=np.uint8)
    for rect in [(0, 0, width, height), (width - 1, height - 1, 1, 1), (3, 2, 31, 9), (0, 10, 37, 1)]:
        np.testing.assert_array_equal(convert_rect(src, sf, target, *rect),
                                      reference(src, sf, target, *rect))


def test_paths_are_the_expected_ones():
    le_rgbx = PixelFormat(32, 24, False, 255, 255, 255, 0, 8, 16)
    be_565 = PixelFormat(16, 16, True, 31, 63, 31, 11, 5, 0)
    assert _plan(GUEST_32, PixelFormat(32, 32, False, 255, 255, 255, 16, 8, 0)).kind == "copy"
    assert _plan(GUEST_32, le_rgbx).kind == "planes"
    assert _plan(GUEST_32, RGB888).kind == "planes"
    assert _plan(GUEST_32, GUEST_16).kind == "channels"
    assert _plan(GUEST_16, GUEST_32).kind == "lut"
    assert _plan(GUEST_8, be_565).kind == "lut"
    assert _plan(GUEST_8, PixelFormat(8, 8, True, 7, 7, 3, 5, 2, 0)).kind == "copy"


def test_match_copy_does_not_alias_and_copies_padding():
    src = np.arange(4 * 4 * 5, dtype=np.uint8).reshape(4, 20) * 3
    got = convert_rect(src, GUEST_32, GUEST_32, 1, 1, 3, 2)
    np.testing.assert_array_equal(got, src[1:3, 4:16])
    assert got.flags.c_contiguous and not np.shares_memory(got, src)
    src[1, 4] ^= 0xFF
    assert got[0, 0] != src[1, 4]


def test_channel_rounding_to_nearest():
    # 32 -> 565: red 132 -> (132*31 + 127)//255 = 16; green 2 -> (2*63+127)//255 = 0; 3 -> 1
    src = np.array([[0, 2, 132, 0, 0, 3, 255, 0]], np.uint8)   # B,G,R,X pixels
    got = convert_rect(src, GUEST_32, GUEST_16, 0, 0, 2, 1).view("<u2")
    assert got[0, 0] == (16 << 11) | (0 << 5) | 0
    assert got[0, 1] == (31 << 11) | (1 << 5) | 0


def test_to_rgb():
    src = np.array([[10, 20, 30, 99, 1, 2, 3, 4]], np.uint8)
    np.testing.assert_array_equal(to_rgb(src, GUEST_32, 2, 1), [[[30, 20, 10], [3, 2, 1]]])


def test_empty_rect():
    src = np.zeros((2, 8), np.uint8)
    assert convert_rect(src, GUEST_32, GUEST_16, 1, 1, 0, 1).shape == (1, 0)


@pytest.mark.parametrize("rect", [(-1, 0, 1, 1), (0, -1, 1, 1), (1, 0, 2, 1), (0, 1, 1, 2), (0, 0, -1, 1)])
def test_rect_outside_source_rejected(rect):
    src = np.zeros((2, 8), np.uint8)   # 2x2 at 32 bpp
    with pytest.raises(ValueError, match="outside"):
        convert_rect(src, GUEST_32, GUEST_16, *rect)


def test_bad_out_rejected():
    src = np.zeros((2, 8), np.uint8)
    with pytest.raises(ValueError, match="out must be"):
        convert_rect(src, GUEST_32, GUEST_16, 0, 0, 2, 2, out=np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="out must be"):
        convert_rect(src, GUEST_32, GUEST_16, 0, 0, 2, 2, out=np.zeros((2, 8), np.uint8)[:, ::2])


@pytest.mark.parametrize("fmt, reason", [
    (PixelFormat(12, 12, False, 15, 15, 15, 8, 4, 0), "bits per pixel"),
    (PixelFormat(32, 33, False, 255, 255, 255, 16, 8, 0), "depth"),
    (PixelFormat(32, 0, False, 255, 255, 255, 16, 8, 0), "depth"),
    (PixelFormat(32, 24, False, 0, 255, 255, 16, 8, 0), "red max"),
    (PixelFormat(32, 24, False, 255, 254, 255, 16, 8, 0), "green max"),
    (PixelFormat(32, 24, False, 255, 255, 255, 16, 8, 25), "blue shift"),
    (PixelFormat(16, 16, False, 255, 255, 255, 16, 8, 0), "red shift"),
    (PixelFormat(32, 24, False, 255, 255, 255, 16, 12, 0), "overlaps"),
    (PixelFormat(32, 24, False, 255, 255, 255, -1, 8, 0), "red shift"),
])
def test_check_format_rejects(fmt, reason):
    with pytest.raises(ValueError, match=reason):
        check_format(fmt)
    with pytest.raises(ValueError, match=reason):
        fmt.validate()
    with pytest.raises(ValueError):
        convert_rect(np.zeros((1, 4), np.uint8), GUEST_32, fmt, 0, 0, 1, 1)


def test_check_format_wire_bpp():
    check_format(RGB888)
    with pytest.raises(ValueError, match="bits per pixel 24"):
        check_format(RGB888, allowed_bpp=(8, 16, 32))


def test_from_masks():
    assert PixelFormat.from_masks(32, 0xFF0000, 0xFF00, 0xFF, big_endian=False) == GUEST_32
    assert PixelFormat.from_masks(16, 0xF800, 0x7E0, 0x1F, big_endian=False) == GUEST_16
    with pytest.raises(ValueError):
        PixelFormat.from_masks(16, 0, 0x7E0, 0x1F)


def test_large_picture_all_paths_agree_with_small_reference_sample():
    """A 1920x1080 rect (the vectorised code at full size) checked on sampled rows."""
    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, (1080, 1920 * 4), dtype=np.uint8)
    for df in (GUEST_16, RGB888, PixelFormat(8, 8, False, 7, 7, 3, 0, 3, 6),
               PixelFormat(32, 24, True, 255, 255, 255, 0, 8, 16)):
        got = convert_rect(src, GUEST_32, df, 0, 0, 1920, 1080)
        for row in (0, 539, 1079):
            np.testing.assert_array_equal(got[row:row + 1], reference(src, GUEST_32, df, 0, row, 1920, 1))


@needs_pixman
def test_threads_share_one_lazily_loaded_library(monkeypatch):
    """Conversions from worker threads (cffi releases the GIL) load the library
    once and give the same bytes as the reference."""
    from concurrent.futures import ThreadPoolExecutor
    monkeypatch.setattr(pixman, "_loaded", False)
    monkeypatch.setattr(pixman, "_lib", None)
    rng = np.random.default_rng(9)
    src = rng.integers(0, 256, (64, 96 * 4), dtype=np.uint8)
    want = reference(src, GUEST_32, GUEST_16, 5, 3, 80, 50)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: convert_rect(src, GUEST_32, GUEST_16, 5, 3, 80, 50), range(32)))
    assert pixman._lib is not None and conversion_path(GUEST_32, GUEST_16) == "pixman"
    for got in results:
        np.testing.assert_array_equal(got, want)
