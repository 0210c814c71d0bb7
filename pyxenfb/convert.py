"""Pixel formats and rectangle conversion (numpy, a plain copy on a format match).

A `PixelFormat` describes a true-colour format the way RFB's PIXEL_FORMAT does
(bits per pixel, depth, byte order, per-channel max and shift); guest and SDL
formats map onto it.  `convert_rect` turns a rectangle of a source surface
into a contiguous buffer in the target format.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PixelFormat:
    bpp: int            # bits per pixel on the wire / in memory: 8, 16, 24, 32
    depth: int          # useful bits
    big_endian: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    @property
    def bytes_per_pixel(self) -> int:
        return self.bpp // 8


# What Linux xen-fbfront uses: x8r8g8b8, bytes B,G,R,X in memory.
GUEST_32 = PixelFormat(32, 24, False, 255, 255, 255, 16, 8, 0)
# Other guest depths a RESIZE may ask for (pvfb.md section 6 rule 13).
GUEST_24 = PixelFormat(24, 24, False, 255, 255, 255, 16, 8, 0)
GUEST_16 = PixelFormat(16, 16, False, 31, 63, 31, 11, 5, 0)
GUEST_8 = PixelFormat(8, 8, False, 7, 7, 3, 5, 2, 0)
GUEST_FORMATS = {32: GUEST_32, 24: GUEST_24, 16: GUEST_16, 8: GUEST_8}
# Packed R,G,B bytes, as PIL's "RGB" mode wants.
RGB888 = PixelFormat(24, 24, True, 255, 255, 255, 16, 8, 0)


def _to_words(rows: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """(h, w*bpp) uint8 rows -> (h, w) uint32 pixel values."""
    h = rows.shape[0]
    b = fmt.bytes_per_pixel
    px = rows.reshape(h, -1, b).astype(np.uint32)
    order = range(b) if not fmt.big_endian else range(b - 1, -1, -1)
    words = np.zeros(px.shape[:2], np.uint32)
    for shift, i in enumerate(order):
        words |= px[:, :, i] << np.uint32(8 * shift)
    return words


def _from_words(words: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    b = fmt.bytes_per_pixel
    h, w = words.shape
    out = np.empty((h, w, b), np.uint8)
    for i in range(b):
        byte = (words >> np.uint32(8 * i)) & np.uint32(0xFF)
        out[:, :, (b - 1 - i) if fmt.big_endian else i] = byte
    return out.reshape(h, w * b)


def _channel(words: np.ndarray, shift: int, cmax: int) -> np.ndarray:
    return (words >> np.uint32(shift)) & np.uint32(cmax)


def _rescale(v: np.ndarray, src_max: int, dst_max: int) -> np.ndarray:
    if src_max == dst_max:
        return v
    # Round to nearest: what TigerVNC and QEMU expect of a server.
    return (v * np.uint32(dst_max) + np.uint32(src_max // 2)) // np.uint32(src_max)


def convert_rect(src: np.ndarray, src_fmt: PixelFormat, dst_fmt: PixelFormat,
                 x: int, y: int, w: int, h: int) -> np.ndarray:
    """Convert rectangle (x, y, w, h) of `src` into `dst_fmt`.

    `src` is a 2-D uint8 array of rows (height, stride) in `src_fmt`.  The
    result is a new C-contiguous (h, w * dst_bpp) uint8 array; it never
    aliases the source, so a hostile guest rewriting its framebuffer cannot
    change the pixels an encoder is reading.
    """
    sb = src_fmt.bytes_per_pixel
    rows = src[y:y + h, x * sb:(x + w) * sb]
    if src_fmt == dst_fmt:
        return np.array(rows, dtype=np.uint8, order="C", copy=True)
    words = _to_words(rows, src_fmt)
    r = _rescale(_channel(words, src_fmt.red_shift, src_fmt.red_max), src_fmt.red_max, dst_fmt.red_max)
    g = _rescale(_channel(words, src_fmt.green_shift, src_fmt.green_max), src_fmt.green_max, dst_fmt.green_max)
    b = _rescale(_channel(words, src_fmt.blue_shift, src_fmt.blue_max), src_fmt.blue_max, dst_fmt.blue_max)
    out = (r << np.uint32(dst_fmt.red_shift)) | (g << np.uint32(dst_fmt.green_shift)) | (b << np.uint32(dst_fmt.blue_shift))
    return _from_words(out, dst_fmt)


def to_rgb(src: np.ndarray, src_fmt: PixelFormat, width: int, height: int) -> np.ndarray:
    """The whole picture as an (height, width, 3) uint8 RGB array (for PNG/PPM)."""
    return convert_rect(src, src_fmt, RGB888, 0, 0, width, height).reshape(height, width, 3)
