"""The reference guest's deterministic test picture (x8r8g8b8 words)."""
from __future__ import annotations

import numpy as np

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
