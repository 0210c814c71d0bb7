"""Rectangle conversion between pixel formats (pixman, numpy, a plain copy on a format match).

A `PixelFormat` (pyxenfb/util/pixelformat.py, re-exported here) describes a true-colour format the way RFB's PIXEL_FORMAT does
(bits per pixel, depth, byte order, per-channel max and shift); guest and SDL
formats map onto it.  `convert_rect` turns a rectangle of a source surface
into a buffer in the target format; `conversion_path` says how:

* "copy"   -- same layout: a plain copy of the rows (padding bits included);
* "pixman" -- libpixman-1 (pyxenfb.displays.pixman) when it loads, has an exact
  format for both sides and is not slower than numpy for the pair
  (`_numpy_faster`);
* "numpy"  -- otherwise, vectorised over the whole rectangle, planned once
  per (source, target) pair by `_plan`: a shuffle of byte planes when all
  channels are whole bytes, a lookup table for 8/16 bpp sources, else
  shift-and-mask terms on whole pixel words.

Both conversion paths give identical bytes, with pixman's semantic (which is
also QEMU's): a channel is narrowed by truncation (8 -> 5 bits: v >> 3) and
widened by bit replication (5 -> 8 bits: v << 3 | v >> 2); bits of a
converted pixel that belong to no channel are set to 1 (pixman writes an
opaque alpha there).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .displays import pixman
from .util.pixelformat import (NATIVE_BIG_ENDIAN, GUEST_8, GUEST_16, GUEST_24, GUEST_32,  # noqa: F401
                               GUEST_FORMATS, RGB888, PixelFormat, check_format)


# ---- helpers ----------------------------------------------------------------

def _same_layout(a: PixelFormat, b: PixelFormat) -> bool:
    """Byte-identical pixels (depth is informative only; byte order moot at 8 bpp)."""
    return (a.bpp == b.bpp and a.channels == b.channels
            and (a.bpp == 8 or a.big_endian == b.big_endian))


def _byte_index(fmt: PixelFormat, shift: int) -> int:
    """Which byte of a pixel holds the 8-bit field starting at bit `shift`."""
    k = shift // 8
    return fmt.bytes_per_pixel - 1 - k if fmt.big_endian else k


def _byte_planes(fmt: PixelFormat) -> tuple[int, int, int] | None:
    """Byte index of each channel if all three are whole bytes, else None."""
    if fmt.bpp < 24:
        return None
    if any(cmax != 255 or shift % 8 for cmax, shift in fmt.channels):
        return None
    return tuple(_byte_index(fmt, shift) for _, shift in fmt.channels)  # type: ignore[return-value]


def _uint(nbytes: int) -> np.dtype:
    return np.dtype({1: np.uint8, 2: np.uint16, 3: np.uint32, 4: np.uint32}[nbytes])


def _word_dtype(fmt: PixelFormat) -> np.dtype:
    """dtype to view 8/16/32 bpp pixel bytes as whole pixel values."""
    dt = _uint(fmt.bytes_per_pixel)
    return dt.newbyteorder(">" if fmt.big_endian else "<") if dt.itemsize > 1 else dt


def _rescale_values(v: np.ndarray, smax: int, dmax: int) -> np.ndarray:
    """Channel values of smax -> dmax (both 2^n-1): truncate or replicate bits."""
    if smax == dmax:
        return v
    return functools.reduce(np.bitwise_or, (((v << np.uint64(net)) if net >= 0 else (v >> np.uint64(-net)))
                                            & np.uint64(mask) for net, mask in _rescale_terms(smax, dmax)))


def _rescale_terms(smax: int, dmax: int) -> list[tuple[int, int]]:
    """A channel rescale as (left shift, mask of the result) terms to OR.

    The source bits are repeated until they fill the destination width and
    the top dbits kept: a narrowing keeps the high bits, a widening
    replicates (1 -> 8 bits: 0 or 255; 5 -> 8 bits: v << 3 | v >> 2).
    """
    sbits, dbits = smax.bit_length(), dmax.bit_length()
    terms = []
    pos = dbits - sbits
    while pos > -sbits:
        terms.append((pos, (smax << pos if pos >= 0 else smax >> -pos) & dmax))
        pos -= sbits
    return terms


def _pad_mask(fmt: PixelFormat) -> int:
    """Bits of a pixel that belong to no channel."""
    used = 0
    for cmax, shift in fmt.channels:
        used |= cmax << shift
    return ((1 << fmt.bpp) - 1) & ~used


def _pixels(rows: np.ndarray, nbytes: int) -> np.ndarray:
    """(h, w*n) uint8 rows with contiguous rows -> an (h, w, n) view, never a copy
    (a reshape could silently copy a strided `out` and lose the writes)."""
    h, width = rows.shape
    return np.lib.stride_tricks.as_strided(
        rows, shape=(h, width // nbytes, nbytes), strides=(rows.strides[0], nbytes, 1))


def _load_words(rows: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """(h, w*bpp) uint8 rows -> (h, w) pixel values (a view where possible)."""
    if fmt.bpp == 24:
        px = _pixels(rows, 3)
        lo, mid, hi = (2, 1, 0) if fmt.big_endian else (0, 1, 2)
        words = px[:, :, lo].astype(np.uint32)
        words |= px[:, :, mid].astype(np.uint32) << np.uint32(8)
        words |= px[:, :, hi].astype(np.uint32) << np.uint32(16)
        return words
    if rows.strides[1] != 1:
        rows = np.ascontiguousarray(rows)
    return rows.view(_word_dtype(fmt))


def _store_words(words: np.ndarray, out: np.ndarray, fmt: PixelFormat) -> None:
    """(h, w) native pixel values -> out, (h, w*bpp) uint8 in `fmt` byte order."""
    if fmt.bpp == 24:
        h, w = words.shape
        le = words.astype("<u4", copy=False).view(np.uint8).reshape(h, w, 4)
        _pixels(out, 3)[...] = le[:, :, 2::-1] if fmt.big_endian else le[:, :, :3]
    else:
        out.view(_word_dtype(fmt))[...] = words


# ---- plans ---------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    kind: str                       # "copy", "planes", "lut", "words"
    planes: tuple = ()              # "planes": (dst byte, src byte or -1 for padding)
    lut: np.ndarray | None = None   # "lut": src pixel value -> dst pixel value
    terms: tuple = ()               # "words": (right shift, mask) of the source word to OR
    pad: int = 0                    # "words": padding bits of the destination (set to 1)
    pixman: tuple | None = None     # (source, destination) pixman format codes if exact


@functools.lru_cache(maxsize=32)
def _plan(src_fmt: PixelFormat, dst_fmt: PixelFormat) -> _Plan:
    check_format(src_fmt)
    check_format(dst_fmt)
    if _same_layout(src_fmt, dst_fmt):
        return _Plan("copy")
    codes = None if _numpy_faster(src_fmt, dst_fmt) else pixman.format_codes(src_fmt, dst_fmt)

    src_bytes, dst_bytes = _byte_planes(src_fmt), _byte_planes(dst_fmt)
    if src_bytes is not None and dst_bytes is not None:
        by_dst = dict(zip(dst_bytes, src_bytes))
        planes = tuple((j, by_dst.get(j, -1)) for j in range(dst_fmt.bytes_per_pixel))
        return _Plan("planes", planes=planes, pixman=codes)

    dst_dt = _uint(dst_fmt.bytes_per_pixel)
    pad = _pad_mask(dst_fmt)
    if src_fmt.bpp <= 16:
        values = np.arange(1 << src_fmt.bpp, dtype=np.uint64)
        lut = np.full(values.shape, pad, np.uint64)
        for (smax, sshift), (dmax, dshift) in zip(src_fmt.channels, dst_fmt.channels):
            lut |= _rescale_values((values >> np.uint64(sshift)) & np.uint64(smax), smax, dmax) << np.uint64(dshift)
        return _Plan("lut", lut=lut.astype(dst_dt), pixman=codes)

    # 24/32 bpp source: every destination bit is one shift of the source word,
    # so the conversion is a few (shift, mask, OR) passes over uint32 words;
    # terms with the same shift share a pass.
    by_shift: dict[int, int] = {}
    for (smax, sshift), (dmax, dshift) in zip(src_fmt.channels, dst_fmt.channels):
        for left, mask in _rescale_terms(smax, dmax):
            right = sshift - dshift - left
            by_shift[right] = by_shift.get(right, 0) | (mask << dshift)
    return _Plan("words", terms=tuple(sorted(by_shift.items())), pad=pad, pixman=codes)


def _numpy_faster(src_fmt: PixelFormat, dst_fmt: PixelFormat) -> bool:
    """Pairs pixman has but converts through its generic per-scanline path
    slower than our numpy plan does (1080p, bench/bench_convert.py, docs/sdl.md):
    an 8 bpp source (a 256-entry table lookup, 2-4x) unless the target is
    24 bpp, and a 32 bpp source to 8 bpp without padding (three narrowing
    passes, ~1.5-2x) or to 16 bpp with padding (pixman's a1r5g5b5 /
    a4r4g4b4 stores, ~1.3x).  32 -> 565 stays with pixman's SIMD fast path."""
    pad = _pad_mask(dst_fmt)
    if src_fmt.bpp == 8:
        return dst_fmt.bpp != 24
    if src_fmt.bpp == 32:
        return (dst_fmt.bpp == 8 and not pad) or (dst_fmt.bpp == 16 and bool(pad))
    return False


def conversion_path(src_fmt: PixelFormat, dst_fmt: PixelFormat) -> str:
    """"copy", "pixman" or "numpy": how `convert_rect` converts src_fmt -> dst_fmt
    (for buffers pixman can address: 4-byte aligned rows, see `_pixman_convert`)."""
    plan = _plan(src_fmt, dst_fmt)
    if plan.kind == "copy":
        return "copy"
    if plan.pixman is not None and pixman.available():
        return "pixman"
    return "numpy"


# ---- the public entry point ---------------------------------------------------------

def convert_rect(src: np.ndarray, src_fmt: PixelFormat, dst_fmt: PixelFormat,
                 x: int, y: int, w: int, h: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Convert rectangle (x, y, w, h) of `src` into `dst_fmt`.

    `src` is a 2-D uint8 array of rows (height, stride) in `src_fmt`.  The
    result is an (h, w * dst_bpp) uint8 array.  Without `out` it is a new
    C-contiguous array that never aliases the source, so a hostile guest
    rewriting its framebuffer cannot change the pixels an encoder is reading.
    With `out` (uint8, that shape, rows may be strided but each row
    contiguous — e.g. a slice of a window surface) the pixels are written
    there and `out` is returned.

    Raises ValueError for an invalid format, a rectangle outside `src`, or a
    bad `out`.
    """
    plan = _plan(src_fmt, dst_fmt)
    sb, db = src_fmt.bytes_per_pixel, dst_fmt.bytes_per_pixel
    if src.ndim != 2 or src.dtype != np.uint8 or src.strides[1] != 1:
        raise ValueError("src must be a 2-D uint8 array of contiguous rows")
    if min(x, y, w, h) < 0 or y + h > src.shape[0] or (x + w) * sb > src.shape[1]:
        raise ValueError(f"rectangle {w}x{h}+{x}+{y} outside the {src.shape[1] // sb}x{src.shape[0]} source")
    if out is None:
        out = np.empty((h, w * db), np.uint8)
    elif out.dtype != np.uint8 or out.shape != (h, w * db) or (w and out.strides[1] != 1):
        raise ValueError(f"out must be uint8 of shape {(h, w * db)} with contiguous rows")
    if w == 0 or h == 0:
        return out

    if plan.kind == "copy":
        rows = src[y:y + h, x * sb:(x + w) * sb]
        if rows.flags.c_contiguous and out.flags.c_contiguous:
            # full-width rows: one memcpy of the whole block
            out.reshape(-1)[...] = rows.reshape(-1)
        else:
            np.copyto(out, rows)
        return out
    if plan.pixman is not None and _pixman_convert(plan.pixman, src, sb, out, db, x, y, w, h):
        return out
    _convert_numpy(plan, src[y:y + h, x * sb:(x + w) * sb], src_fmt, dst_fmt, out, w, h)
    return out


def _pixman_convert(codes: tuple[int, int], src: np.ndarray, sb: int, out: np.ndarray, db: int,
                    x: int, y: int, w: int, h: int) -> bool:
    """The conversion by libpixman, if it is there and both buffers suit it;
    False to fall back to numpy."""
    # pixman silently composites nothing when coordinates leave 16 bits
    # (analyze_extent in pixman.c), which would hand out uninitialised memory:
    # its source image starts at row y, so only x + w and h are bounded.
    if x + w >= 0x7FFF or h >= 0x7FFF:
        return False
    src_stride = src.strides[0] if h > 1 else -(-((x + w) * sb) // 4) * 4
    dst_stride = out.strides[0] if h > 1 else -(-(w * db) // 4) * 4
    src_addr = src.ctypes.data + y * src.strides[0]
    dst_addr = out.ctypes.data
    # rows are uint32_t arrays to pixman: 4-byte aligned starts and strides
    if (src_addr | dst_addr | src_stride | dst_stride) & 3 or src_stride <= 0 or dst_stride <= 0:
        return False
    return pixman.composite_src(codes[0], src_addr, x + w, h, src_stride,
                                codes[1], dst_addr, w, h, dst_stride, x, 0, w, h)


def _convert_numpy(plan: _Plan, rows: np.ndarray, src_fmt: PixelFormat, dst_fmt: PixelFormat,
                   out: np.ndarray, w: int, h: int) -> None:
    if plan.kind == "planes":
        src_px = _pixels(rows, src_fmt.bytes_per_pixel)
        dst_px = _pixels(out, dst_fmt.bytes_per_pixel)
        for j, i in plan.planes:
            if i < 0:
                dst_px[:, :, j] = 0xFF
            else:
                dst_px[:, :, j] = src_px[:, :, i]
    elif plan.kind == "lut":
        words = _load_words(rows, src_fmt)
        index = np.ascontiguousarray(words, dtype=words.dtype.newbyteorder("="))
        _store_words(np.take(plan.lut, index, mode="clip"), out, dst_fmt)
    else:
        _convert_words(plan, rows, src_fmt, dst_fmt, out, w, h)


def _convert_words(plan: _Plan, rows: np.ndarray, src_fmt: PixelFormat,
                   dst_fmt: PixelFormat, out: np.ndarray, w: int, h: int) -> None:
    words = _load_words(rows, src_fmt)
    if words.dtype != np.uint32:         # other byte order: swap once, not per pass
        words = words.astype(np.uint32)
    # Every term's bits lie inside the destination pixel, so each shift can
    # write straight into the destination's word size (3x less memory traffic
    # than uint32 for 16 bpp), and into `out` itself when its byte order is native.
    dt = _uint(dst_fmt.bytes_per_pixel)
    direct = dst_fmt.bpp != 24 and (dst_fmt.bpp == 8 or dst_fmt.big_endian == NATIVE_BIG_ENDIAN)
    acc = out.view(dt) if direct else np.empty((h, w), dt)
    tmp = np.empty((h, w), dt) if len(plan.terms) > 1 else None
    for n, (right, mask) in enumerate(plan.terms):
        dest = acc if n == 0 else tmp
        if right > 0:
            np.right_shift(words, np.uint32(right), out=dest, casting="unsafe")
        elif right < 0:
            np.left_shift(words, np.uint32(-right), out=dest, casting="unsafe")
        else:
            np.copyto(dest, words, casting="unsafe")
        dest &= dt.type(mask)
        if n:
            acc |= tmp
    if plan.pad:
        acc |= dt.type(plan.pad)
    if not direct:
        _store_words(acc, out, dst_fmt)


def to_rgb(src: np.ndarray, src_fmt: PixelFormat, width: int, height: int) -> np.ndarray:
    """The whole picture as an (height, width, 3) uint8 RGB array (for PNG/PPM)."""
    return convert_rect(src, src_fmt, RGB888, 0, 0, width, height).reshape(height, width, 3)
