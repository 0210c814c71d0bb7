"""What the reference guest draws, with --echo-input, of the input it receives.

A strip along the bottom of the picture shows the last characters typed
(Linux key codes through a US layout) and the number of clicks; a crosshair
marks the absolute pointer position, red while a button is down.  The state
is fed the same entries the guest logs to input.log; the picture functions
are pure, so a test renders the expected strip from the text it typed.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..console.input_codes import kbdfront_device

STRIP_H = 24                    # rows at the bottom of the picture
MAX_TEXT = 48                   # characters kept
MARKER = 11                     # crosshair side, pixels (odd: centred)
KEY_BACKSPACE, KEY_ENTER, KEY_LEFTSHIFT, KEY_RIGHTSHIFT = 14, 28, 42, 54

_ROWS = {2: ("1234567890-=", "!@#$%^&*()_+"), 16: ("qwertyuiop[]", "QWERTYUIOP{}"),
         30: ("asdfghjkl;'`", 'ASDFGHJKL:"~'), 43: ("\\zxcvbnm,./", "|ZXCVBNM<>?")}
US_KEYS: dict[int, tuple[str, str]] = {57: (" ", " ")}
for _first, (_plain, _shifted) in _ROWS.items():
    for _i, (_a, _b) in enumerate(zip(_plain, _shifted)):
        US_KEYS[_first + _i] = (_a, _b)


class InputEcho:
    def __init__(self) -> None:
        self.text = ""
        self.clicks = 0
        self.shift: set[int] = set()
        self.buttons: set[int] = set()
        self.pointer: tuple[int, int] | None = None     # in framebuffer pixels

    def feed(self, entry: dict) -> tuple[bool, bool]:
        """One input.log entry; returns (strip changed, marker changed)."""
        if entry.get("type") == "pos":
            self.pointer = (entry["x"], entry["y"])
            return False, True
        if entry.get("type") != "key":
            return False, False
        code, pressed = entry["code"], entry["pressed"]
        if kbdfront_device(code) == "pointer":
            (self.buttons.add if pressed else self.buttons.discard)(code)
            if pressed:
                self.clicks += 1
            return pressed, True
        if code in (KEY_LEFTSHIFT, KEY_RIGHTSHIFT):
            (self.shift.add if pressed else self.shift.discard)(code)
            return False, False
        if not pressed:
            return False, False
        if code == KEY_BACKSPACE:
            self.text = self.text[:-1]
        elif code == KEY_ENTER:
            self.text += "|"
        elif code in US_KEYS:
            self.text += US_KEYS[code][1 if self.shift else 0]
        else:
            return False, False
        self.text = self.text[-MAX_TEXT:]
        return True, False

    def strip_text(self) -> str:
        return strip_text(self.text, self.clicks)


def strip_text(text: str, clicks: int) -> str:
    return f"typed: {text}_   clicks: {clicks}"


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=16)


def render_strip(width: int, text: str) -> np.ndarray:
    """(STRIP_H, width) uint32 0x00RRGGBB: white text on dark blue."""
    img = Image.new("RGB", (width, STRIP_H), (16, 24, 64))
    ImageDraw.Draw(img).text((6, 3), text, fill=(255, 255, 255), font=_font())
    rgb = np.asarray(img, dtype=np.uint32)
    return (rgb[:, :, 0] << 16) | (rgb[:, :, 1] << 8) | rgb[:, :, 2]


def marker_rect(x: int, y: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The crosshair's box around (x, y), clipped: (x0, y0, x1, y1)."""
    r = MARKER // 2
    return max(0, x - r), max(0, y - r), min(width, x + r + 1), min(height, y + r + 1)


def draw_marker(fb: np.ndarray, x: int, y: int, pressed: bool) -> None:
    h, w = fb.shape
    if not (0 <= x < w and 0 <= y < h):
        return
    x0, y0, x1, y1 = marker_rect(x, y, w, h)
    colour = np.uint32(0xFF2020 if pressed else 0xFFFFFF)
    fb[y, x0:x1] = colour
    fb[y0:y1, x] = colour
