"""The console: where a framebuffer device and its displays meet.

A device publishes a `Surface` (a numpy view of the guest framebuffer plus its
pixel format) and marks dirty rectangles; displays (VNC, SDL) attach as
listeners and call the input API.  Devices and displays never import each
other — this is QEMU's console / DisplayChangeListener split.

Everything runs on the one asyncio loop.  Dirty rectangles are coalesced and
handed to listeners once per loop pass (`loop.call_soon`), never on a timer.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .convert import GUEST_32, PixelFormat

log = logging.getLogger(__name__)

# Up to this many separate rectangles are kept; beyond it they are merged
# into their bounding box (QEMU's xenfb keeps 8 before going full-screen).
MAX_RECTS = 8

# Linux input codes for pointer buttons (linux/input-event-codes.h).
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE = 0x110, 0x111, 0x112
BUTTON_CODES = {"left": BTN_LEFT, "middle": BTN_MIDDLE, "right": BTN_RIGHT}

# Lock keys and their bit in the lock-LED state (QEMU's LED-state bits).
KEY_CAPSLOCK, KEY_NUMLOCK, KEY_SCROLLLOCK = 58, 69, 70
LED_SCROLL, LED_NUM, LED_CAPS = 1, 2, 4
LOCK_LEDS = {KEY_SCROLLLOCK: LED_SCROLL, KEY_NUMLOCK: LED_NUM, KEY_CAPSLOCK: LED_CAPS}


@dataclass
class Surface:
    """What a display shows: rows of pixels in `fmt`.

    `rows` is a 2-D uint8 array of shape (height, stride), usually a zero-copy
    view of the guest's mapped framebuffer.  It is only valid until the
    console's next `set_surface` call: a display must not keep it across loop
    passes (the device may unmap the memory behind it).
    """
    width: int
    height: int
    stride: int
    fmt: PixelFormat
    rows: np.ndarray

    @classmethod
    def blank(cls, width: int, height: int, fmt: PixelFormat = GUEST_32) -> "Surface":
        stride = width * fmt.bytes_per_pixel
        return cls(width, height, stride, fmt, np.zeros((height, stride), np.uint8))

    def snapshot(self) -> "Surface":
        """A private copy, e.g. to keep showing the last frame after unmap."""
        return Surface(self.width, self.height, self.stride, self.fmt, self.rows.copy())


class DisplayListener(Protocol):
    """What a display implements to follow a console."""

    def console_resized(self, surface: Surface) -> None: ...
    def console_updated(self, x: int, y: int, w: int, h: int) -> None: ...
    def console_pointer_mode(self, absolute: bool) -> None: ...


class InputSink(Protocol):
    """What an input device (the vkbd backend) implements."""

    def key(self, code: int, down: bool) -> None: ...
    def pointer_abs(self, x: int, y: int, surface_w: int, surface_h: int) -> None: ...
    def pointer_rel(self, dx: int, dy: int) -> None: ...
    def wheel(self, dz: int) -> None: ...


class VisibilitySink(Protocol):
    """What a framebuffer device implements to hear whether anyone watches."""

    def displays_visible(self, visible: bool) -> None: ...


def _union(a, b):
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return (x0, y0, x1 - x0, y1 - y0)


class Console:
    def __init__(self, name: str = "", loop: asyncio.AbstractEventLoop | None = None):
        self.name = name
        self.surface: Surface = Surface.blank(640, 480)
        self.absolute_pointer = True
        # A PV keyboard has no LED channel (kbdif.h defines none), so the lock
        # state is followed from the lock keys sent to the guest, from all
        # locks off at boot.  Displays that can show it get console_leds().
        self.leds = 0
        self.input: InputSink | None = None
        self.framebuffer: VisibilitySink | None = None
        self._listeners: list[DisplayListener] = []
        self._dirty: list[tuple[int, int, int, int]] = []
        self._flush_scheduled = False
        self._loop = loop

    # ---- device side -------------------------------------------------
    def set_surface(self, surface: Surface) -> None:
        """A new surface (connect, resize, disconnect).  Listeners redraw."""
        self.surface = surface
        self._dirty.clear()
        for lst in list(self._listeners):
            lst.console_resized(surface)

    def invalidate(self, x: int, y: int, w: int, h: int) -> None:
        """Mark a rectangle dirty; it is clipped to the surface here."""
        s = self.surface
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(s.width, x + w), min(s.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return
        rect = (x0, y0, x1 - x0, y1 - y0)
        self._dirty.append(rect)
        if len(self._dirty) > MAX_RECTS:
            merged = self._dirty[0]
            for r in self._dirty[1:]:
                merged = _union(merged, r)
            self._dirty = [merged]
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self.flush)

    def flush(self) -> None:
        """Hand the coalesced dirty rectangles to every listener."""
        self._flush_scheduled = False
        rects, self._dirty = self._dirty, []
        for rect in rects:
            for lst in list(self._listeners):
                lst.console_updated(*rect)

    def set_pointer_mode(self, absolute: bool) -> None:
        if absolute != self.absolute_pointer:
            log.info("%s: guest asks for %s pointer", self.name or "console",
                     "absolute" if absolute else "relative")
        self.absolute_pointer = absolute
        for lst in list(self._listeners):
            lst.console_pointer_mode(absolute)

    # ---- display side ------------------------------------------------
    def attach(self, listener: DisplayListener) -> None:
        was_visible = bool(self._listeners)
        self._listeners.append(listener)
        if not was_visible and self.framebuffer is not None:
            self.framebuffer.displays_visible(True)

    def detach(self, listener: DisplayListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
        if not self._listeners and self.framebuffer is not None:
            self.framebuffer.displays_visible(False)

    @property
    def listeners(self) -> tuple[DisplayListener, ...]:
        return tuple(self._listeners)

    def key(self, code: int, down: bool) -> None:
        """A Linux input key code (KEY_* or BTN_*) pressed or released."""
        if self.input is None:
            return
        self.input.key(code, down)
        if down and code in LOCK_LEDS:
            self.leds ^= LOCK_LEDS[code]
            for lst in list(self._listeners):
                notify = getattr(lst, "console_leds", None)
                if notify is not None:
                    notify(self.leds)

    def button(self, name: str, down: bool) -> None:
        """'left', 'middle' or 'right'."""
        self.key(BUTTON_CODES[name], down)

    def pointer_abs(self, x: int, y: int) -> None:
        """Absolute position in surface pixels (clamped here)."""
        s = self.surface
        x = min(max(0, x), max(0, s.width - 1))
        y = min(max(0, y), max(0, s.height - 1))
        if self.input is not None:
            self.input.pointer_abs(x, y, s.width, s.height)

    def pointer_rel(self, dx: int, dy: int) -> None:
        if self.input is not None and (dx or dy):
            self.input.pointer_rel(dx, dy)

    def wheel(self, dz: int) -> None:
        """dz < 0: wheel up (away from the user), dz > 0: down."""
        if self.input is not None and dz:
            self.input.wheel(dz)
