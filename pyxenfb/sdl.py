"""The SDL display: a pygame window showing a console, feeding its input back.

`SdlDisplay` is a console listener.  Each batch of dirty rectangles is
converted by `convert.convert_rect` straight into the window surface's own
pixel memory (a plain row copy when the guest format is the window's) and
pushed to the screen with one `pygame.display.update(rects)`.

Event-loop integration (see docs/sdl.md for the why): on X11 the X server
connection's fd is watched with `loop.add_reader`, and SDL's event queue is
drained whenever it is readable and after every SDL call of ours (those can
pull events off the socket into Xlib's queue without the fd staying
readable).  The dummy driver has no outside events, so nothing is watched;
whoever injects events calls `pump_events()`.  Any other driver falls back
to draining the queue every POLL_FALLBACK_S seconds while the window
exists, with a warning.

pygame is imported when an `SdlDisplay` is constructed, never at module import.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import re
from typing import Callable

import numpy as np

from .console.core import Console, Surface
from .util.region import clip
from .convert import PixelFormat, conversion_path, convert_rect
from .console.keymap import usb_hid_to_linux

log = logging.getLogger(__name__)

GRAB_HINT = " - Press Ctrl-Alt-G to exit grab"
POLL_FALLBACK_S = 0.05          # only for video drivers whose fd we cannot watch
# USB HID usages (= SDL scancodes) of the hotkeys; layout independent, as QEMU.
SCANCODE_F, SCANCODE_G = 9, 10
MOUSE_BUTTONS = {1: "left", 2: "middle", 3: "right"}


SDL_SYSWM_X11 = 2               # SDL_SYSWM_TYPE
MAX_WINDOW_ID = 64              # SDL window ids looked at for pygame's window


class _SdlVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint8), ("minor", ctypes.c_uint8), ("patch", ctypes.c_uint8)]


class _SdlX11Info(ctypes.Structure):
    _fields_ = [("display", ctypes.c_void_p), ("window", ctypes.c_ulong)]


class _SdlWmInfoUnion(ctypes.Union):
    _fields_ = [("x11", _SdlX11Info), ("dummy", ctypes.c_uint8 * 64)]


class _SdlSysWmInfo(ctypes.Structure):
    _fields_ = [("version", _SdlVersion), ("subsystem", ctypes.c_int), ("info", _SdlWmInfoUnion)]


def _loaded_sdl() -> ctypes.CDLL | None:
    """The SDL 2 library pygame loaded (its wheel bundles one), by path from
    /proc/self/maps: a second copy of SDL would know none of pygame's windows."""
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split(None, 5) for line in maps]
        paths = {f[5].strip() for f in fields if len(f) == 6}
    except OSError:
        return None
    for path in sorted(paths):
        if re.search(r"/libSDL2-2[.-][^/]*$", path):
            return ctypes.CDLL(path)
    return None


def _pygame_window(sdl: ctypes.CDLL) -> int | None:
    """pygame's one window.  SDL numbers windows from 1 each time its video
    subsystem starts, and pygame opens one; asking pygame._sdl2 instead would
    leave SDL holding a pointer to a Python object that dies with it."""
    for window_id in range(1, MAX_WINDOW_ID + 1):
        window = sdl.SDL_GetWindowFromID(window_id)
        if window:
            return window
    return None


def x11_window_info() -> tuple[int, int] | None:
    """(X11 window id, fd of SDL's Xlib connection) of pygame's window.

    Not pygame.display.get_wm_info(): pygame 2.6 fills its dict from every
    window system compiled in, so on X11 it reads the Wayland members of the
    union too, one of them uninitialised stack; when that happens to be NULL
    it stores a NULL capsule and the interpreter crashes (seen with Debian's
    Python 3.11.2 when a display is initialised twice in one process).  We
    ask SDL ourselves with a zeroed struct and read only the X11 members."""
    try:
        sdl = _loaded_sdl()
        if sdl is None:
            raise OSError("SDL 2 is not loaded")
        sdl.SDL_GetWindowFromID.restype = ctypes.c_void_p
        sdl.SDL_GetWindowFromID.argtypes = [ctypes.c_uint32]
        sdl.SDL_GetWindowWMInfo.restype = ctypes.c_int
        sdl.SDL_GetWindowWMInfo.argtypes = [ctypes.c_void_p, ctypes.POINTER(_SdlSysWmInfo)]
        sdl.SDL_GetVersion.argtypes = [ctypes.POINTER(_SdlVersion)]
        window = _pygame_window(sdl)
        info = _SdlSysWmInfo()
        sdl.SDL_GetVersion(ctypes.byref(info.version))
        if not window or not sdl.SDL_GetWindowWMInfo(window, ctypes.byref(info)) \
                or info.subsystem != SDL_SYSWM_X11 or not info.info.x11.display:
            raise OSError("SDL gives no X11 window information")
        libx11 = ctypes.CDLL(ctypes.util.find_library("X11") or "libX11.so.6")
        libx11.XConnectionNumber.restype = ctypes.c_int
        libx11.XConnectionNumber.argtypes = [ctypes.c_void_p]
        fd = libx11.XConnectionNumber(info.info.x11.display)
    except (OSError, ValueError, AttributeError, TypeError, ImportError) as exc:
        log.warning("sdl: cannot find the X11 connection fd: %s", exc)
        return None
    return (info.info.x11.window, fd) if fd >= 0 else None


class SdlDisplay:
    """A pygame window following `console`; see the module docstring."""

    def __init__(self, console: Console, *, name: str,
                 on_close: Callable[[], None] | None = None):
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        # Like QEMU: an idle guest console must not keep the screensaver away.
        os.environ.setdefault("SDL_VIDEO_ALLOW_SCREENSAVER", "1")
        # Draw into the window system's own framebuffer (X11: XShm images in
        # the visual's format) rather than an OpenGL texture SDL converts
        # from: our converter does that job, once.
        os.environ.setdefault("SDL_FRAMEBUFFER_ACCELERATION", "0")
        import pygame                                  # lazy: only with --sdl
        self._pg = pygame
        self.console = console
        self.name = name
        self.on_close = on_close
        self.grabbed = False
        self.fullscreen = False
        self.window_format: PixelFormat | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._window = None                  # the pygame display surface
        self._shadow = None                  # 32 bpp staging surface if the window's format is exotic
        self._fd: int | None = None
        self.window_id: int | None = None    # X11 window id, when there is one
        self._poll_handle: asyncio.TimerHandle | None = None
        self._pump_scheduled = False
        self._logged_pair = None
        self._swallowed: set[int] = set()    # scancodes of hotkeys whose key-up must not reach the guest
        self._grab_click = False             # the click that grabbed: its release stays ours too
        self._closed = False

    # ---- life cycle -----------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        pg = self._pg
        self._loop = loop or asyncio.get_running_loop()
        pg.display.init()
        self._open_window(self.console.surface.width, self.console.surface.height)
        self._update_title()
        self.console.attach(self)
        self._watch_events()
        self._redraw_all()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.console.detach(self)
        self.console.release_input(self)
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        self._window = self._shadow = None
        self._pg.display.quit()

    def _watch_events(self) -> None:
        pg = self._pg
        driver = pg.display.get_driver()
        if driver == "x11":
            found = x11_window_info()
            if found is not None:
                self.window_id, self._fd = found
                self._loop.add_reader(self._fd, self.pump_events)
                return
        if driver in ("dummy", "offscreen"):
            return                       # no outside events: nothing to wait for
        log.warning("sdl: video driver %r: no fd to watch, checking for events every %.0f ms",
                    driver, POLL_FALLBACK_S * 1000)
        self._poll_handle = self._loop.call_later(POLL_FALLBACK_S, self._poll_fallback)

    def _poll_fallback(self) -> None:
        self._poll_handle = None
        if self._closed:
            return
        self.pump_events()
        self._poll_handle = self._loop.call_later(POLL_FALLBACK_S, self._poll_fallback)

    # ---- window and pixels ---------------------------------------------
    def _open_window(self, width: int, height: int) -> None:
        pg = self._pg
        flags = pg.FULLSCREEN if self.fullscreen else 0
        self._window = pg.display.set_mode((max(1, width), max(1, height)), flags)
        self._adopt_window_surface()

    def _adopt_window_surface(self) -> None:
        """Learn the window surface's native format (it changes with set_mode/fullscreen)."""
        pg = self._pg
        self._window = pg.display.get_surface()
        surf = self._window
        r, g, b, _ = surf.get_masks()
        try:
            self.window_format = PixelFormat.from_masks(surf.get_bytesize() * 8, r, g, b)
            self._shadow = None
        except ValueError:
            # e.g. a palettised window: convert to XRGB and let SDL blit.
            log.info("sdl: window format %d bpp masks %x/%x/%x not true-colour; blitting via 32 bpp",
                     surf.get_bitsize(), r, g, b)
            self._shadow = pg.Surface(surf.get_size(), 0, 32, (0xFF0000, 0xFF00, 0xFF, 0))
            self.window_format = PixelFormat.from_masks(32, 0xFF0000, 0xFF00, 0xFF)
        self._log_conversion()

    def _log_conversion(self) -> None:
        """Say once per (guest, window) format pair how pixels are converted."""
        pair = (self.console.surface.fmt, self.window_format)
        if pair != self._logged_pair:
            self._logged_pair = pair
            log.info("sdl: %d bpp guest -> %d bpp window: %s", pair[0].bpp, pair[1].bpp,
                     conversion_path(*pair))

    def _draw(self, x: int, y: int, w: int, h: int) -> tuple[int, int, int, int] | None:
        """Convert one guest rectangle into the window surface; return it clipped."""
        s = self.console.surface
        target = self._shadow if self._shadow is not None else self._window
        tw, th = target.get_size()
        rect = clip(x, y, w, h, min(s.width, tw), min(s.height, th))
        if rect is None:
            return None
        x, y, w, h = rect
        fmt = self.window_format
        db = fmt.bytes_per_pixel
        proxy = target.get_buffer()      # locks the surface until the proxy is gone
        try:
            pixels = np.frombuffer(proxy, np.uint8).reshape(th, target.get_pitch())
            convert_rect(s.rows, s.fmt, fmt, x, y, w, h, out=pixels[y:y + h, x * db:(x + w) * db])
            del pixels
        except ValueError as exc:
            log.warning("sdl: cannot draw %dx%d+%d+%d: %s", w, h, x, y, exc)
            return None
        finally:
            del proxy
        if self._shadow is not None:
            self._window.blit(self._shadow, (x, y), (x, y, w, h))
        return (x, y, w, h)

    def _redraw_all(self) -> None:
        s = self.console.surface
        if self._window is not None:
            self._window.fill((0, 0, 0))
            self._draw(0, 0, s.width, s.height)
            self._pg.display.update()
        self._schedule_pump()

    # ---- DisplayListener ------------------------------------------------
    def console_resized(self, surface: Surface) -> None:
        if self._closed:
            return
        if self._window.get_size() != (surface.width, surface.height) and not self.fullscreen:
            self._open_window(surface.width, surface.height)
            self._update_title()
        self._log_conversion()
        self._redraw_all()

    def console_update(self, rects) -> None:
        # Convert now: the console's surface rows are only valid in this loop pass.
        if self._closed:
            return
        drawn = [self._pg.Rect(r) for r in (self._draw(*rect) for rect in rects) if r is not None]
        if drawn:
            self._pg.display.update(drawn)
            self.pump_events()

    def console_leds(self, leds: int) -> None:
        pass                               # a window has no lock LEDs to show

    def console_pointer_mode(self, absolute: bool) -> None:
        if not self._closed:
            self._apply_grab()

    # ---- grab, title, fullscreen ---------------------------------------
    @property
    def title(self) -> str:
        base = f"QEMU ({self.name})" if self.name else "QEMU"
        return base + (GRAB_HINT if self.grabbed else "")

    def _update_title(self) -> None:
        self._pg.display.set_caption(self.title)

    def set_grab(self, grabbed: bool) -> None:
        if grabbed == self.grabbed:
            return
        self.grabbed = grabbed
        self._apply_grab()
        self._update_title()
        self._schedule_pump()

    def _apply_grab(self) -> None:
        pg = self._pg
        pg.event.set_grab(self.grabbed)
        if hasattr(pg.event, "set_keyboard_grab"):
            pg.event.set_keyboard_grab(self.grabbed)
        # A hidden cursor plus a grab puts SDL in relative mode: unbounded
        # motion, which is what a relative guest pointer wants.
        relative = self.grabbed and not self.console.absolute_pointer
        pg.mouse.set_visible(not relative)

    def toggle_fullscreen(self) -> None:
        pg = self._pg
        try:
            pg.display.toggle_fullscreen()
        except pg.error as exc:
            log.info("sdl: fullscreen not available: %s", exc)
            return
        self.fullscreen = not self.fullscreen
        self._adopt_window_surface()
        self._redraw_all()

    # ---- events ----------------------------------------------------------
    def _schedule_pump(self) -> None:
        """Drain events once our SDL calls are done: they may have read X events
        into Xlib's queue, where the fd watch cannot see them."""
        if not self._pump_scheduled and self._loop is not None and not self._closed:
            self._pump_scheduled = True
            self._loop.call_soon(self.pump_events)

    def pump_events(self) -> None:
        """Handle everything in SDL's queue (call after injecting events)."""
        self._pump_scheduled = False
        if self._closed:
            return
        for event in self._pg.event.get():
            try:
                self.handle_event(event)
            except Exception:                  # one bad event must not kill the display
                log.exception("sdl: error handling %s", event)
            if self._closed:
                return

    def handle_event(self, event) -> None:
        pg = self._pg
        t = event.type
        if t == pg.QUIT:
            log.info("sdl: window closed")
            if self.on_close is not None:
                self.on_close()
            else:
                self.close()
        elif t in (pg.KEYDOWN, pg.KEYUP):
            self._on_key(event, t == pg.KEYDOWN)
        elif t == pg.MOUSEMOTION:
            self._on_motion(event)
        elif t in (pg.MOUSEBUTTONDOWN, pg.MOUSEBUTTONUP):
            self._on_button(event, t == pg.MOUSEBUTTONDOWN)
        elif t == pg.MOUSEWHEEL:
            dy = int(getattr(event, "y", 0))
            if getattr(event, "flipped", False):
                dy = -dy
            if dy:
                self.console.wheel(-1 if dy > 0 else 1)   # wheel up -> -1 (away from user)
        elif t in (pg.WINDOWEXPOSED, pg.VIDEOEXPOSE):
            self._pg.display.update()      # the surface still holds the picture
        elif t == pg.WINDOWSIZECHANGED:
            self._adopt_window_surface()
            self._redraw_all()
        elif t == pg.WINDOWFOCUSLOST:
            self.console.release_input(self)

    def _on_key(self, event, down: bool) -> None:
        pg = self._pg
        scancode = int(getattr(event, "scancode", 0))
        mod = int(getattr(event, "mod", 0))
        hotkey = bool(mod & pg.KMOD_CTRL) and bool(mod & pg.KMOD_ALT)
        if down and hotkey and scancode in (SCANCODE_G, SCANCODE_F):
            self._swallowed.add(scancode)
            if scancode == SCANCODE_G:
                self.set_grab(not self.grabbed)
            else:
                self.toggle_fullscreen()
            return
        if not down and scancode in self._swallowed:
            self._swallowed.discard(scancode)
            return
        code = self._linux_code(scancode)
        if code is not None:
            self.console.key(code, down, source=self)

    def _linux_code(self, scancode: int) -> int | None:
        code = usb_hid_to_linux(scancode)
        if code is None:
            log.debug("sdl: scancode %d has no Linux key code", scancode)
        return code

    def _on_motion(self, event) -> None:
        if self.console.absolute_pointer:
            x, y = event.pos
            self.console.pointer_abs(int(x), int(y))
        elif self.grabbed:
            dx, dy = event.rel
            self.console.pointer_rel(int(dx), int(dy))

    def _on_button(self, event, down: bool) -> None:
        name = MOUSE_BUTTONS.get(event.button)
        if name is None:                 # 4/5: legacy wheel duplicates of MOUSEWHEEL
            return
        if not down and self._grab_click and name == "left":
            self._grab_click = False
            return
        if not self.console.absolute_pointer and not self.grabbed:
            if down and name == "left":
                self._grab_click = True
                self.set_grab(True)      # a relative pointer needs the grab, as in QEMU
            return
        if self.console.absolute_pointer:
            x, y = event.pos
            self.console.pointer_abs(int(x), int(y))
        self.console.button(name, down, source=self)
