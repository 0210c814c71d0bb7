"""The encoders' C kernel (pyxenfb/rfb/enc_kernel.c -> _enc_kernel.so, built
by hatch_build.py), loaded through cffi's ABI mode the first time it is
asked for.  `load()` gives None when the library was not built (no C
compiler), was built from another version of the source (an editable
install not rebuilt: hatch_build.py), or PYXENFB_NO_ENC_KERNEL=1: the
encoders then use their numpy twins, which give the same bytes, slower.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from ..util.lazylib import LazyLibrary

log = logging.getLogger(__name__)

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_enc_kernel.so")

def _open_kernel():
    if os.environ.get("PYXENFB_NO_ENC_KERNEL", "") not in ("", "0") or not os.path.exists(LIBRARY):
        return None, None
    from ._enc_ffi import ffi          # generated from enc_cdefs
    from .enc_cdefs import VERSION
    try:
        lib = ffi.dlopen(LIBRARY)
        if lib.pyxenfb_enc_version() != VERSION:
            raise OSError("built from another version of enc_kernel.c")
    except (OSError, AttributeError) as e:     # AttributeError: an old library
        log.warning("encoders' C kernel %s not used (%s): numpy serves", LIBRARY, e)
        lib = None
    return ffi, lib


library = LazyLibrary(_open_kernel)
_ffi = _lib = None          # what library() gave, for the wrappers below


def load():
    """The kernel's handle, or None."""
    global _ffi, _lib
    _ffi, _lib = library()
    return _lib


def hextile(pixels: np.ndarray, w: int, h: int, bpp: int) -> memoryview:
    """Hextile of the (h, w * bpp) uint8 pixels, by the kernel (load() must
    have returned it): a view of the first bytes of a buffer of its own (not
    zeroed first, nor copied after: the kernel writes every byte it counts)."""
    pixels = np.ascontiguousarray(pixels)
    assert pixels.dtype == np.uint8 and pixels.shape == (h, w * bpp)
    cap = w * h * bpp + (-(-w // 16)) * (-(-h // 16))
    out = np.empty(cap, np.uint8)
    n = _lib.pyxenfb_hextile(_ffi.from_buffer("uint8_t[]", pixels), w * bpp, w, h, bpp,
                             _ffi.from_buffer("uint8_t[]", out), cap)
    if n < 0:
        raise RuntimeError(f"Hextile kernel refused a {w}x{h} rectangle at {bpp} bytes a pixel")
    return memoryview(out)[:n]


def zrle_tiles(pixels: np.ndarray, w: int, h: int, bpp: int, coff: int, cb: int,
               scratch: bytearray | None = None):
    """ZRLE's uncompressed tile stream for the (h, w * bpp) uint8 pixels,
    CPIXEL = bytes [coff, coff + cb) of each pixel (load() must have
    returned the kernel).  bytes; or, given a scratch bytearray (grown as
    needed), a memoryview of it, valid until scratch is used again: a full
    1080p frame's stream is 6 MB, and a fresh buffer for it each frame costs
    its page faults and zeroing, and a copy into bytes."""
    pixels = np.ascontiguousarray(pixels)
    assert pixels.dtype == np.uint8 and pixels.shape == (h, w * bpp)
    cap = w * h * cb + (-(-w // 64)) * (-(-h // 64))
    out = bytearray(cap) if scratch is None else scratch
    if len(out) < cap:
        try:
            out.extend(bytes(cap - len(out)))
        except BufferError:             # a view of the last stream still alive: a fresh one
            out = bytearray(cap)
    n = _lib.pyxenfb_zrle_tiles(_ffi.from_buffer("uint8_t[]", pixels), w * bpp, w, h, bpp, coff, cb,
                                _ffi.from_buffer("uint8_t[]", out), cap)
    if n < 0:
        raise RuntimeError(f"ZRLE kernel refused a {w}x{h} rectangle at {bpp} bytes a pixel")
    if scratch is not None:
        return memoryview(out)[:n]
    del out[n:]
    return bytes(out)


def gradient24(rgb: np.ndarray) -> bytes:
    """Tight's gradient filter of the (h, w, 3) uint8 image (load() must
    have returned the kernel)."""
    rgb = np.ascontiguousarray(rgb)
    h, w, three = rgb.shape
    assert rgb.dtype == np.uint8 and three == 3
    out = bytearray(rgb.size)
    _lib.pyxenfb_gradient24(_ffi.from_buffer("uint8_t[]", rgb), w, h, _ffi.from_buffer("uint8_t[]", out))
    return bytes(out)


def palette(vals: np.ndarray, limit: int):
    """(distinct values ascending, (h, w) uint8 index of each pixel) of the
    (h, w) integer pixel values, or None when there are more than limit
    (<= 256) (load() must have returned the kernel)."""
    vals = np.ascontiguousarray(vals)
    pal = np.empty(limit, np.uint32)
    idx = np.empty(vals.shape, np.uint8)
    k = _lib.pyxenfb_palette(_ffi.from_buffer("uint8_t[]", vals.view(np.uint8).reshape(-1)), vals.size,
                             vals.itemsize, limit, _ffi.from_buffer("uint32_t[]", pal),
                             _ffi.from_buffer("uint8_t[]", idx))
    if k < 0:
        return None
    return pal[:k].astype(vals.dtype), idx
