"""Pixel formats, as RFB's PIXEL_FORMAT describes them; no numpy.

Here, below everything, so that the RFB protocol core can parse and name a
client's format without importing the converters (convert.py re-exports
these names).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

_NATIVE_BIG = sys.byteorder == "big"


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

    @property
    def channels(self) -> tuple[tuple[int, int], ...]:
        """((max, shift) for red, green, blue)."""
        return ((self.red_max, self.red_shift), (self.green_max, self.green_shift),
                (self.blue_max, self.blue_shift))

    @classmethod
    def from_masks(cls, bpp: int, red_mask: int, green_mask: int, blue_mask: int,
                   big_endian: bool = _NATIVE_BIG) -> "PixelFormat":
        """A format from channel bit masks (as SDL and X11 describe theirs)."""
        def split(mask: int) -> tuple[int, int]:
            if mask <= 0:
                raise ValueError(f"empty channel mask {mask:#x}")
            shift = (mask & -mask).bit_length() - 1
            return mask >> shift, shift
        (rm, rs), (gm, gs), (bm, bs) = split(red_mask), split(green_mask), split(blue_mask)
        depth = sum(m.bit_length() for m in (rm, gm, bm))
        fmt = cls(bpp, depth, big_endian, rm, gm, bm, rs, gs, bs)
        check_format(fmt)
        return fmt


def check_format(fmt: PixelFormat, *, allowed_bpp: tuple[int, ...] = (8, 16, 24, 32)) -> None:
    """Refuse a format the converters cannot handle safely (ValueError with the reason).

    A VNC server calls this for SetPixelFormat (with allowed_bpp=(8, 16, 32):
    24 bpp is not legal on the RFB wire).
    """
    if fmt.bpp not in allowed_bpp:
        raise ValueError(f"bits per pixel {fmt.bpp} not in {sorted(allowed_bpp)}")
    if not 0 < fmt.depth <= fmt.bpp:
        raise ValueError(f"depth {fmt.depth} not in 1..{fmt.bpp}")
    used = 0
    for name, (cmax, shift) in zip(("red", "green", "blue"), fmt.channels):
        if cmax <= 0 or cmax & (cmax + 1):
            raise ValueError(f"{name} max {cmax} is not 2^n-1 > 0")
        if shift < 0 or shift + cmax.bit_length() > fmt.bpp:
            raise ValueError(f"{name} shift {shift} + {cmax.bit_length()} bits exceeds {fmt.bpp} bpp")
        mask = cmax << shift
        if used & mask:
            raise ValueError(f"{name} channel overlaps another")
        used |= mask


# What Linux xen-fbfront uses: x8r8g8b8, bytes B,G,R,X in memory.
GUEST_32 = PixelFormat(32, 24, False, 255, 255, 255, 16, 8, 0)
# Other guest depths a RESIZE may ask for (pvfb.md section 6 rule 13).
GUEST_24 = PixelFormat(24, 24, False, 255, 255, 255, 16, 8, 0)
GUEST_16 = PixelFormat(16, 16, False, 31, 63, 31, 11, 5, 0)
GUEST_8 = PixelFormat(8, 8, False, 7, 7, 3, 5, 2, 0)
GUEST_FORMATS = {32: GUEST_32, 24: GUEST_24, 16: GUEST_16, 8: GUEST_8}
# Packed R,G,B bytes, as PIL's "RGB" mode wants.
RGB888 = PixelFormat(24, 24, True, 255, 255, 255, 16, 8, 0)
