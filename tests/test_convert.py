"""convert.py (pixman and numpy paths) against a slow per-pixel pure-Python reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import contextlib

from pyxenfb import convert
from pyxenfb.displays import pixman
from pyxenfb.util.lazylib import LazyLibrary
from pyxenfb.convert import (GUEST_8, GUEST_16, GUEST_24, GUEST_32, GUEST_FORMATS, RGB888,
                             PixelFormat, _plan, check_format, conversion_path, convert_rect, to_rgb)


def rescale(c: int, sbits: int, dbits: int) -> int:
    """pixman's (and QEMU's) channel rescale: repeat the bits, keep the top dbits."""
    rep, n = c, sbits
    while n < dbits:
        rep, n = (rep << sbits) | c, n + sbits
    return rep >> (n - dbits)


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
            dv = (1 << df.bpp) - 1          # bits of no channel are 1 (an opaque alpha)
            for (smax, ss), (dmax, ds) in zip(sf.channels, df.channels):
                dv &= ~(dmax << ds)
                dv |= rescale((v >> ss) & smax, smax.bit_length(), dmax.bit_length()) << ds
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
    assert _plan(GUEST_32, GUEST_16).kind == "words"
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


def test_channels_truncate_and_replicate_like_pixman():
    # 32 -> 565 keeps the high bits: red 132 -> 16, green 3 -> 0, 255 -> 31/63
    src = np.array([[0, 2, 132, 0, 0, 3, 255, 0]], np.uint8)   # B,G,R,X pixels
    got = convert_rect(src, GUEST_32, GUEST_16, 0, 0, 2, 1).view("<u2")
    assert got[0, 0] == (16 << 11) | (0 << 5) | 0
    assert got[0, 1] == (31 << 11) | (0 << 5) | 0
    # 565 -> 32 replicates: 5-bit 16 -> 132, 6-bit 1 -> 4; the padding byte is 0xFF
    px = np.array([[(16 << 11) | (1 << 5) | 31]], "<u2").view(np.uint8)
    assert convert_rect(px, GUEST_16, GUEST_32, 0, 0, 1, 1).tolist() == [[255, 4, 132, 255]]
    # 3-bit 5 -> 8 bits = 101 101 10; 2-bit 2 -> 10 10 10 10
    px = np.array([[(5 << 5) | 2]], np.uint8)
    assert convert_rect(px, GUEST_8, RGB888, 0, 0, 1, 1).tolist() == [[0b10110110, 0, 0b10101010]]


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


# ---- the pixman path against the numpy path --------------------------------------

NATIVE_BIG = __import__("sys").byteorder == "big"


def pixman_formats(role: str) -> list[PixelFormat]:
    """Our formats for pixman's: sources with no alpha, destinations whose alpha
    is all the padding; also the other byte order where channels are whole bytes."""
    out = []
    for name, (bpp, typ, a, r, g, b) in pixman.FORMATS.items():
        if (role == "src" and a) or (role == "dst" and a != bpp - r - g - b):
            continue
        _, ((rm, rs), (gm, gs), (bm, bs)) = pixman._layout(bpp, typ, a, r, g, b)
        out.append(PixelFormat(bpp, r + g + b, NATIVE_BIG, rm, gm, bm, rs, gs, bs))
        if bpp >= 24 and r == g == b == 8:
            flip = [bpp - 8 - s for s in (rs, gs, bs)]
            out.append(PixelFormat(bpp, 24, not NATIVE_BIG, rm, gm, bm, *flip))
    return out


PIXMAN_SRC, PIXMAN_DST = pixman_formats("src"), pixman_formats("dst")


@pytest.fixture
def no_pixman(monkeypatch):
    """libpixman-1 reported missing, as PYXENFB_NO_PIXMAN=1 does."""
    monkeypatch.setenv("PYXENFB_NO_PIXMAN", "1")
    monkeypatch.setattr(pixman, "library", LazyLibrary(pixman._open_pixman))
    assert not pixman.available()


needs_pixman = pytest.mark.skipif(not pixman.available(), reason="libpixman-1.so.0 not installed")


@contextlib.contextmanager
def pixman_wherever_exact():
    """Use pixman also for the pairs where numpy is the faster choice."""
    real = convert._numpy_faster
    convert._numpy_faster = lambda sf, df: False
    convert._plan.cache_clear()
    try:
        yield
    finally:
        convert._numpy_faster = real
        convert._plan.cache_clear()


@st.composite
def aligned_pictures(draw, fmts):
    """Pictures pixman can take: 4-byte aligned rows, random rect and stride."""
    sf = draw(st.sampled_from(fmts))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 9))
    stride = -(-(width * sf.bytes_per_pixel) // 4) * 4 + 4 * draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    src = np.random.default_rng(seed).integers(0, 256, (height, stride), dtype=np.uint8)
    x = draw(st.integers(0, width - 1))
    y = draw(st.integers(0, height - 1))
    return src, sf, (x, y, draw(st.integers(1, width - x)), draw(st.integers(1, height - y)))


def test_every_pixman_format_maps_to_itself():
    for sf in PIXMAN_SRC:
        assert pixman.format_codes(sf, PIXMAN_DST[0]) is not None, sf
    for df in PIXMAN_DST:
        assert pixman.format_codes(PIXMAN_SRC[0], df) is not None, df
    assert len(PIXMAN_SRC) == 21 and len(PIXMAN_DST) == 22   # both byte orders of 8-bit ones


@needs_pixman
@settings(deadline=None, max_examples=500)
@given(aligned_pictures(PIXMAN_SRC), st.sampled_from(PIXMAN_DST), st.data())
def test_pixman_equals_numpy_equals_reference(picture, df, data):
    src, sf, (x, y, w, h) = picture
    expected = reference(src, sf, df, x, y, w, h)
    db = df.bytes_per_pixel
    # into a new array, and into a 4-byte aligned window of a bigger buffer
    dst_stride = -(-(w * db + 8) // 4) * 4 + 4
    canvas = np.full((h + 2, dst_stride), 0xA5, np.uint8)
    col = 4 * data.draw(st.integers(0, 2)) // db * db if db != 3 else 0
    view = canvas[1:1 + h, col:col + w * db]
    calls = []
    real = pixman.composite_src
    pixman.composite_src = lambda *a: calls.append(a) or real(*a)
    try:
        with pixman_wherever_exact():
            path = conversion_path(sf, df)
            got = convert_rect(src, sf, df, x, y, w, h)
            convert_rect(src, sf, df, x, y, w, h, out=view)
    finally:
        pixman.composite_src = real
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(view, expected)
    canvas[1:1 + h, col:col + w * db] = 0xA5
    assert (canvas == 0xA5).all()                       # nothing written outside the rect
    if path == "pixman":
        aligned_out = (w * db) % 4 == 0 or h == 1
        assert len(calls) == (1 if aligned_out else 0) + (1 if view.ctypes.data % 4 == 0 else 0)
    else:
        assert path == "copy" and not calls


# the fixture's state (pixman hidden) is the same for every example
@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(aligned_pictures(PIXMAN_SRC), st.sampled_from(PIXMAN_DST))
def test_numpy_path_without_pixman(no_pixman, picture, df):
    src, sf, rect = picture
    assert conversion_path(sf, df) in ("copy", "numpy")
    np.testing.assert_array_equal(convert_rect(src, sf, df, *rect), reference(src, sf, df, *rect))


@needs_pixman
def test_conversion_paths():
    be_565 = PixelFormat(16, 16, True, 31, 63, 31, 11, 5, 0)
    be_xrgb = PixelFormat(32, 24, True, 255, 255, 255, 16, 8, 0)
    ten_bit = PixelFormat(32, 30, False, 1023, 1023, 1023, 20, 10, 0)
    tiger64 = PixelFormat(8, 6, False, 3, 3, 3, 4, 2, 0)
    bgr233 = PixelFormat(8, 8, False, 7, 7, 3, 0, 3, 6)
    rgb555 = PixelFormat(16, 15, False, 31, 31, 31, 10, 5, 0)
    assert conversion_path(GUEST_32, GUEST_32) == "copy"
    for df in (GUEST_16, RGB888, GUEST_24, be_xrgb, tiger64):
        assert conversion_path(GUEST_32, df) == "pixman", df
    assert conversion_path(GUEST_16, GUEST_32) == "pixman"
    assert conversion_path(GUEST_8, RGB888) == "pixman"
    # exact in pixman, but numpy is faster (docs/sdl.md)
    for sf, df in ((GUEST_32, GUEST_8), (GUEST_32, bgr233), (GUEST_32, rgb555), (GUEST_8, GUEST_32)):
        assert pixman.format_codes(sf, df) is not None
        assert conversion_path(sf, df) == "numpy", (sf, df)
    assert conversion_path(GUEST_32, be_565) == "numpy"     # a byte swap splits green
    assert conversion_path(GUEST_32, ten_bit) == "numpy"    # pixman rounds wide channels
    assert conversion_path(tiger64, GUEST_32) == "numpy"    # no x2r2g2b2 source format
    assert conversion_path(GUEST_32, PixelFormat(32, 18, False, 63, 63, 63, 12, 6, 0)) == "numpy"


def test_conversion_path_without_pixman(no_pixman):
    assert conversion_path(GUEST_32, GUEST_16) == "numpy"
    assert conversion_path(GUEST_32, GUEST_32) == "copy"


def test_env_var_hides_pixman_and_import_is_lazy():
    import subprocess
    import sys
    code = ("import sys; from pyxenfb import convert as c; "
            "lazy = 'pyxenfb.displays._pixman_ffi' not in sys.modules; "
            "print(lazy, c.conversion_path(c.GUEST_32, c.GUEST_16))")
    env = dict(__import__("os").environ, PYXENFB_NO_PIXMAN="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["True", "numpy"]


@needs_pixman
def test_unaligned_buffers_fall_back_to_numpy():
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (5, 4 * 9 + 1), dtype=np.uint8)[:, 1:]   # rows start at odd addresses
    assert src.ctypes.data % 4
    np.testing.assert_array_equal(convert_rect(src, GUEST_32, GUEST_16, 1, 1, 7, 3),
                                  reference(src, GUEST_32, GUEST_16, 1, 1, 7, 3))


def test_copy_of_full_width_rows_is_one_block():
    src = np.random.default_rng(4).integers(0, 256, (6, 32), dtype=np.uint8)
    got = convert_rect(src, GUEST_32, GUEST_32, 0, 2, 8, 3)
    np.testing.assert_array_equal(got, src[2:5])
    assert got.flags.c_contiguous and not np.shares_memory(got, src)


@needs_pixman
def test_threads_share_one_lazily_loaded_library(monkeypatch):
    """Conversions from worker threads (cffi releases the GIL) load the library
    once and give the same bytes as the reference."""
    from concurrent.futures import ThreadPoolExecutor
    monkeypatch.setattr(pixman, "library", LazyLibrary(pixman._open_pixman))
    rng = np.random.default_rng(9)
    src = rng.integers(0, 256, (64, 96 * 4), dtype=np.uint8)
    want = reference(src, GUEST_32, GUEST_16, 5, 3, 80, 50)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: convert_rect(src, GUEST_32, GUEST_16, 5, 3, 80, 50), range(32)))
    assert pixman.library.lib is not None and conversion_path(GUEST_32, GUEST_16) == "pixman"
    for got in results:
        np.testing.assert_array_equal(got, want)


@needs_pixman
@pytest.mark.parametrize("shape, rect", [((40000, 2 * 4), (1, 39990, 1, 9)),      # tall
                                         ((3, 33000 * 4), (32760, 1, 30, 2)),    # wide
                                         ((3, 33000 * 4), (0, 0, 32767, 3))])
def test_beyond_pixmans_16_bit_coordinates(shape, rect):
    """pixman does nothing past 16-bit coordinates: such rects still convert
    (numpy takes those the pixman source image cannot reach)."""
    src = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    x, y, w, h = rect
    got = convert_rect(src, GUEST_32, GUEST_16, *rect)
    for row in (0, h - 1):
        np.testing.assert_array_equal(got[row:row + 1], reference(src, GUEST_32, GUEST_16, x, y + row, w, 1))
