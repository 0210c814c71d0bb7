"""The console: where a framebuffer device and its displays meet.

A device publishes a `Surface` (a numpy view of the guest framebuffer plus its
pixel format) and marks dirty rectangles; displays (VNC, SDL) attach as
listeners and call the input API.  Devices and displays never import each
other — this is QEMU's console / DisplayChangeListener split.

Everything runs on the one asyncio loop.  This is the one update path: the
device's dirty rectangles are clipped and coalesced here (`region.py`) and
each listener gets the whole batch once per loop pass (`loop.call_soon`),
never on a timer.  Input state every display shares lives here too: which
keys and buttons each display holds (released when it goes away) and how a
display's pointer position becomes the absolute or relative motion the
guest asked for.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..util.pixelformat import GUEST_32, PixelFormat
from ..util.region import DirtyRegion, Rect, clip
from .input_codes import BTN_LEFT, BTN_MIDDLE, BTN_RIGHT

log = logging.getLogger(__name__)

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
    def console_busy(self) -> bool:
        """Optional: True while this display could not show a change yet
        (every client of it has an update being made).  It then calls
        Console.display_ready() when one is done."""

    def console_update(self, rects: list[Rect]) -> None:
        """One batch of clipped, coalesced dirty rectangles (valid this loop pass)."""
    def console_pointer_mode(self, absolute: bool) -> None: ...
    def console_leds(self, leds: int) -> None: ...


class InputSink(Protocol):
    """What an input device (the vkbd backend) implements."""

    def key(self, code: int, down: bool) -> None: ...
    def pointer_abs(self, x: int, y: int, surface_w: int, surface_h: int) -> None: ...
    def pointer_rel(self, dx: int, dy: int) -> None: ...
    def wheel(self, dz: int) -> None: ...


class VisibilitySink(Protocol):
    """What a framebuffer device implements to hear whether anyone watches."""

    def displays_visible(self, visible: bool) -> None: ...


class _HeldInput:
    """What one display (an input source) holds down, and where its pointer was."""

    def __init__(self):
        self.codes: set[int] = set()
        self.last_pos: tuple[int, int] | None = None


class Console:
    """The one place a device and its displays meet.

    The framebuffer backend publishes its surface (`set_surface`) and marks
    what the guest changed (`invalidate`): rectangles are clipped to the
    surface and batched, and `flush`, scheduled once per loop turn, hands
    the batch to every attached display at once.  The displays send input
    the other way (`key`, pointer events), which goes to the keyboard
    backend (`input`) in the pointer mode the guest asked for; keys and
    buttons are tracked per source so a display that goes away releases
    what it held.  Knows nothing of Xen, VNC or SDL.
    """

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
        self._dirty = DirtyRegion()
        self._held: dict[object, _HeldInput] = {}
        self._flush_scheduled = False
        self._loop = loop
        self._on_ready = None            # a source holding its changes (hold_until_ready)

    # ---- device side -------------------------------------------------
    def set_surface(self, surface: Surface) -> None:
        """A new surface (connect, resize, disconnect).  Listeners redraw."""
        self.surface = surface
        self._dirty.take()
        for lst in list(self._listeners):
            lst.console_resized(surface)

    def invalidate(self, x: int, y: int, w: int, h: int) -> None:
        """Mark a rectangle dirty; it is clipped to the surface here."""
        rect = clip(x, y, w, h, self.surface.width, self.surface.height)
        if rect is None:
            return
        self._dirty.add(rect)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self.flush)

    def flush(self) -> None:
        """Hand the batch of dirty rectangles to every listener, once."""
        self._flush_scheduled = False
        rects = self._dirty.take()
        if not rects:
            return
        for lst in list(self._listeners):
            lst.console_update(rects)

    def busy(self) -> bool:
        """Every display is busy (DisplayListener.console_busy): a change
        marked now would only wait.  False without displays, and with any
        display that does not say (it takes every change at once)."""
        listeners = self._listeners
        return bool(listeners) and all(getattr(lst, "console_busy", None) is not None
                                       and lst.console_busy() for lst in listeners)

    def hold_until_ready(self, callback) -> None:
        """Call `callback` (once, on the loop) when a display could take a
        change: the device behind this console holds its changes till then."""
        self._on_ready = callback

    def cancel_hold(self, callback) -> None:
        if self._on_ready == callback:
            self._on_ready = None

    def display_ready(self) -> None:
        """A display could show a change now (an update of it is done)."""
        callback, self._on_ready = self._on_ready, None
        if callback is not None:
            (self._loop or asyncio.get_running_loop()).call_soon(callback)

    def set_pointer_mode(self, absolute: bool) -> None:
        if absolute != self.absolute_pointer:
            log.info("%s: guest asks for %s pointer", self.name or "console",
                     "absolute" if absolute else "relative")
        self.absolute_pointer = absolute
        for held in self._held.values():
            held.last_pos = None            # a relative delta must not span the switch
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
        self.display_ready()                # the busy display may have been the last

    @property
    def listeners(self) -> tuple[DisplayListener, ...]:
        return tuple(self._listeners)

    # ---- input (from displays) ------------------------------------------
    def key(self, code: int, down: bool, source: object = None) -> None:
        """A Linux input key code (KEY_* or BTN_*) pressed or released by
        `source` (a display or one of its clients), which holds it until
        released or until `release_input(source)`."""
        if source is not None:
            held = self._held.setdefault(source, _HeldInput())
            if down:
                held.codes.add(code)
            elif code in held.codes:
                held.codes.discard(code)
        if self.input is None:
            return
        self.input.key(code, down)
        if down and code in LOCK_LEDS:
            self.leds ^= LOCK_LEDS[code]
            for lst in list(self._listeners):
                lst.console_leds(self.leds)

    def button(self, name: str, down: bool, source: object = None) -> None:
        """'left', 'middle' or 'right'."""
        self.key(BUTTON_CODES[name], down, source)

    def release_input(self, source: object) -> None:
        """Let go of every key and button `source` still holds (a client
        leaving, a window losing focus), as QEMU does."""
        held = self._held.pop(source, None)
        if held is None:
            return
        for code in sorted(held.codes):
            self.key(code, False)

    def pointer_move(self, source: object, x: int, y: int) -> None:
        """A display's pointer is at (x, y) in surface pixels: an absolute
        position, or the motion since `source`'s last position, whichever
        the guest asked for."""
        if self.absolute_pointer:
            self.pointer_abs(x, y)
            return
        held = self._held.setdefault(source, _HeldInput())
        if held.last_pos is not None:
            self.pointer_rel(x - held.last_pos[0], y - held.last_pos[1])
        held.last_pos = (x, y)

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
