"""libpixman-1 for pixel conversion (cffi ABI mode, loaded on first use).

`format_codes(src_fmt, dst_fmt)` says which pixman formats describe a
conversion exactly (or None), `composite_src` runs it.  The library is
dlopen'ed the first time `load()` is called, under a lock; nothing else is
shared, so conversions may run in several threads (a cffi call releases the
GIL).  PYXENFB_NO_PIXMAN=1 makes `load()` report the library missing.

Mapping rules (pixman formats are defined on native-endian words):
* a format of another byte order is used only if its channels are whole
  bytes, as the byte-swapped native format (e.g. big-endian XRGB = b8g8r8x8);
* channels of more than 8 bits are not mapped: pixman converts those through
  floats, rounding, where the rest of pyxenfb truncates;
* sources use x-formats (padding ignored); a destination with padding uses
  the a-format whose alpha field is exactly the padding, because pixman's
  x-formats leave their padding unspecified (r5g6b5 -> x8r8g8b8 writes 0xff,
  x8r8g8b8 -> x8b8g8r8 writes 0) while the alpha of an opaque pixel is
  always all ones.
"""
from __future__ import annotations

import functools
import os
import sys

from ..util.lazylib import LazyLibrary

OP_SRC = 1            # PIXMAN_OP_SRC
_TYPE_ARGB, _TYPE_ABGR, _TYPE_BGRA, _TYPE_RGBA = 2, 3, 8, 9

# name: (bpp, type, a, r, g, b) as PIXMAN_FORMAT() in pixman.h spells them.
FORMATS = {
    "a8r8g8b8": (32, _TYPE_ARGB, 8, 8, 8, 8), "x8r8g8b8": (32, _TYPE_ARGB, 0, 8, 8, 8),
    "a8b8g8r8": (32, _TYPE_ABGR, 8, 8, 8, 8), "x8b8g8r8": (32, _TYPE_ABGR, 0, 8, 8, 8),
    "b8g8r8a8": (32, _TYPE_BGRA, 8, 8, 8, 8), "b8g8r8x8": (32, _TYPE_BGRA, 0, 8, 8, 8),
    "r8g8b8a8": (32, _TYPE_RGBA, 8, 8, 8, 8), "r8g8b8x8": (32, _TYPE_RGBA, 0, 8, 8, 8),
    "x14r6g6b6": (32, _TYPE_ARGB, 0, 6, 6, 6),
    "r8g8b8": (24, _TYPE_ARGB, 0, 8, 8, 8), "b8g8r8": (24, _TYPE_ABGR, 0, 8, 8, 8),
    "r5g6b5": (16, _TYPE_ARGB, 0, 5, 6, 5), "b5g6r5": (16, _TYPE_ABGR, 0, 5, 6, 5),
    "a1r5g5b5": (16, _TYPE_ARGB, 1, 5, 5, 5), "x1r5g5b5": (16, _TYPE_ARGB, 0, 5, 5, 5),
    "a1b5g5r5": (16, _TYPE_ABGR, 1, 5, 5, 5), "x1b5g5r5": (16, _TYPE_ABGR, 0, 5, 5, 5),
    "a4r4g4b4": (16, _TYPE_ARGB, 4, 4, 4, 4), "x4r4g4b4": (16, _TYPE_ARGB, 0, 4, 4, 4),
    "a4b4g4r4": (16, _TYPE_ABGR, 4, 4, 4, 4), "x4b4g4r4": (16, _TYPE_ABGR, 0, 4, 4, 4),
    "r3g3b2": (8, _TYPE_ARGB, 0, 3, 3, 2), "b2g3r3": (8, _TYPE_ABGR, 0, 3, 3, 2),
    "a2r2g2b2": (8, _TYPE_ARGB, 2, 2, 2, 2), "a2b2g2r2": (8, _TYPE_ABGR, 2, 2, 2, 2),
}


def code(bpp: int, typ: int, a: int, r: int, g: int, b: int) -> int:
    """PIXMAN_FORMAT(bpp, type, a, r, g, b)."""
    return (bpp << 24) | (typ << 16) | (a << 12) | (r << 8) | (g << 4) | b


def _layout(bpp: int, typ: int, a: int, r: int, g: int, b: int):
    """(bpp, ((max, shift) for red, green, blue)) of a pixman format."""
    if typ == _TYPE_ARGB:
        shifts = (g + b, b, 0)
    elif typ == _TYPE_ABGR:
        shifts = (0, r, r + g)
    elif typ == _TYPE_BGRA:
        shifts = (bpp - b - g - r, bpp - b - g, bpp - b)
    else:                                   # RGBA
        shifts = (bpp - r, bpp - r - g, bpp - r - g - b)
    return bpp, tuple(((1 << n) - 1, s) for n, s in zip((r, g, b), shifts))


def _tables():
    sources, dests = {}, {}
    for name, args in FORMATS.items():
        bpp, _typ, a, r, g, b = args
        key = _layout(*args)
        if a == 0:
            sources[key] = code(*args)
        if a == bpp - r - g - b:            # the alpha field is all the padding
            dests[key] = code(*args)
    return sources, dests


_SOURCES, _DESTS = _tables()


def _native_key(fmt):
    """(bpp, channels) of `fmt` as a native-endian word, or None if not a word format."""
    channels = fmt.channels
    if fmt.bpp > 8 and fmt.big_endian != (sys.byteorder == "big"):
        if any(cmax != 255 or shift % 8 for cmax, shift in channels):
            return None                     # a byte swap would split the channels
        channels = tuple((cmax, fmt.bpp - 8 - shift) for cmax, shift in channels)
    if any(cmax > 255 for cmax, _ in channels):
        return None
    return fmt.bpp, tuple(channels)


@functools.lru_cache(maxsize=64)
def format_codes(src_fmt, dst_fmt) -> tuple[int, int] | None:
    """(source code, destination code) if pixman converts src_fmt -> dst_fmt
    exactly as pyxenfb.convert specifies, else None."""
    s, d = _native_key(src_fmt), _native_key(dst_fmt)
    if s is None or d is None or s not in _SOURCES or d not in _DESTS:
        return None
    return _SOURCES[s], _DESTS[d]


# ---- the library ------------------------------------------------------------------

def _open_pixman():
    if os.environ.get("PYXENFB_NO_PIXMAN", "") not in ("", "0"):
        return None, None
    from ._pixman_ffi import ffi    # generated from pixman_cdefs
    try:
        return ffi, ffi.dlopen("libpixman-1.so.0")
    except OSError:
        return ffi, None


library = LazyLibrary(_open_pixman)


def load():
    """The libpixman-1 handle, or None if it is missing (or PYXENFB_NO_PIXMAN=1)."""
    return library()[1]


def available() -> bool:
    return load() is not None


def composite_src(src_code: int, src_addr: int, src_w: int, src_h: int, src_stride: int,
                  dst_code: int, dst_addr: int, dst_w: int, dst_h: int, dst_stride: int,
                  x: int, y: int, w: int, h: int) -> bool:
    """Convert (x, y, w, h) of the source to (0, 0) of the destination.

    Addresses and strides must be multiples of 4 (pixman's rows are uint32_t
    arrays); the caller keeps both buffers alive.  False if pixman refused.
    """
    ffi, lib = library()
    if lib is None:
        return False
    src = lib.pixman_image_create_bits(src_code, src_w, src_h, ffi.cast("uint32_t *", src_addr), src_stride)
    if src == ffi.NULL:
        return False
    try:
        dst = lib.pixman_image_create_bits(dst_code, dst_w, dst_h, ffi.cast("uint32_t *", dst_addr), dst_stride)
        if dst == ffi.NULL:
            return False
        try:
            lib.pixman_image_composite32(OP_SRC, src, ffi.NULL, dst, x, y, 0, 0, 0, 0, w, h)
        finally:
            lib.pixman_image_unref(dst)
    finally:
        lib.pixman_image_unref(src)
    return True
