"""The reference guest's deterministic test picture (x8r8g8b8 words)."""
from __future__ import annotations

import numpy as np

from ..util.region import clip

BOX = 48  # side of the animated square, pixels


def test_picture(width: int, height: int) -> np.ndarray:
    """(height, width) uint32 array of 0x00RRGGBB values.

    Gradients, hard-edged colour bars and a fine checker: every encoder path
    (solid tiles, few-colour tiles, many-colour tiles) gets exercised, and a
    one-pixel error anywhere is visible in a comparison.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.uint32)
    r = (x * 255 // max(1, width - 1)) & 0xFF
    g = (y * 255 // max(1, height - 1)) & 0xFF
    b = (x ^ y) & 0xFF
    pic = (r << 16) | (g << 8) | b
    bars = [0xFF0000, 0x00FF00, 0x0000FF, 0xFFFF00, 0x00FFFF, 0xFF00FF, 0xFFFFFF, 0x000000]
    bar_w = max(1, width // len(bars))
    top, bottom = height // 8, height // 8 + max(1, height // 10)
    for i, colour in enumerate(bars):
        pic[top:bottom, i * bar_w:(i + 1) * bar_w] = colour
    cy0, cy1 = height // 2, min(height, height // 2 + 64)
    cx0, cx1 = width // 8, min(width, width // 8 + 128)
    checker = ((x[cy0:cy1, cx0:cx1] // 2 + y[cy0:cy1, cx0:cx1] // 2) & 1) * np.uint32(0xFFFFFF)
    pic[cy0:cy1, cx0:cx1] = checker
    return pic


def box_position(frame: int, width: int, height: int) -> tuple[int, int]:
    """Where the animated square is at `frame` (bounces along a diagonal)."""
    span_x, span_y = max(1, width - BOX), max(1, height - BOX)
    px = (frame * 7) % (2 * span_x)
    py = (frame * 5) % (2 * span_y)
    return (px if px < span_x else 2 * span_x - px), (py if py < span_y else 2 * span_y - py)


def box_colour(frame: int) -> int:
    return ((frame * 37) & 0xFF) << 16 | ((frame * 91) & 0xFF) << 8 | 0x80


# ---- the benchmark animation (--animate full) -------------------------------
# The same 24 frames as ../shared/bench/xanim.c (its default "gradient" mode),
# so pyxenfb and the x11vnc anchor serve identical content.
XANIM_FRAMES = 24


def xanim_blocks(width: int, height: int) -> list[list[int]]:
    """xanim.c's 5 moving blocks: [x, y, vx, vy, w, h, colour]."""
    W, H = width, height
    return [[50, 40, 7, 3, W // 8, H // 7, 0xFFFFFF],
            [300, 200, -5, 4, W // 10, H // 5, 0x202020],
            [600, 100, 4, -6, W // 6, H // 9, 0xE03030],
            [100, 400, -3, -2, W // 12, H // 12, 0x30E030],
            [700, 300, 6, 5, W // 9, H // 6, 0x3030E0]]


def xanim_frames(width: int, height: int, n: int = XANIM_FRAMES) -> np.ndarray:
    """(n, height, width) uint32 0x00RRGGBB: frame f is xanim's frame f.

    r = ((x + y + 4f) / 4) & 255, g = (y·256 / H) & 255,
    b = (255 − (x + 4f) / 8) & 255, then the blocks, which move 3·v px per
    frame and bounce off the edges exactly as in xanim.c (clipped, not
    wrapped; the bounce test uses the position after the move).
    """
    x = np.arange(width, dtype=np.int64)
    y = np.arange(height, dtype=np.int64)[:, None]
    g = (((y * 256) // height) & 255).astype(np.uint32) << 8
    out = np.empty((n, height, width), np.uint32)
    blocks = xanim_blocks(width, height)
    for f in range(n):
        off = 4 * f
        r = (((x + y + off) // 4) & 255).astype(np.uint32) << 16
        b = ((255 - (x + off) // 8) & 255).astype(np.uint32)      # two's complement & 255, as C
        out[f] = r | g | b
        for blk in blocks:
            bx, by, vx, vy, bw, bh, colour = blk
            rect = clip(bx, by, bw, bh, width, height)
            if rect is not None:
                x0, y0, w, h = rect
                out[f, y0:y0 + h, x0:x0 + w] = colour
            blk[0] += vx * 3
            blk[1] += vy * 3
            if blk[0] < 0 or blk[0] + bw > width:
                blk[2] = -vx
            if blk[1] < 0 or blk[1] + bh > height:
                blk[3] = -vy
    return out
