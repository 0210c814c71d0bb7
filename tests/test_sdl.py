"""The SDL window: dummy-driver tests in the normal run, Xvfb tests against a real X server."""
from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from xvfb import Xvfb

from pyxenfb.console.core import BTN_LEFT, BTN_RIGHT, Console, Surface
from pyxenfb.convert import GUEST_16, GUEST_32, PixelFormat, convert_rect, to_rgb

pygame = pytest.importorskip("pygame")

try:
    from pyxenfb.console.keymap import usb_hid_to_linux
except ImportError:
    usb_hid_to_linux = None
needs_keymap = pytest.mark.skipif(usb_hid_to_linux is None,
                                  reason="pyxenfb.console.keymap.usb_hid_to_linux not available yet")
KEY_A = 30
SCAN_A, SCAN_G = 4, 10


class RecordingSink:
    """An InputSink that records, and wakes a waiter when enough has arrived."""

    def __init__(self):
        self.events: list[tuple] = []
        self._waiter: tuple[int, asyncio.Future] | None = None

    @property
    def keys(self) -> list[tuple]:
        return [e for e in self.events if e[0] == "key"]

    def _add(self, *ev):
        self.events.append(ev)
        if self._waiter and len(self.keys) >= self._waiter[0] and not self._waiter[1].done():
            self._waiter[1].set_result(None)

    def key(self, code, down): self._add("key", code, down)
    def pointer_abs(self, x, y, w, h): self._add("abs", x, y, w, h)
    def pointer_rel(self, dx, dy): self._add("rel", dx, dy)
    def wheel(self, dz): self._add("wheel", dz)

    async def wait_for_keys(self, count: int, timeout: float = 5.0):
        if len(self.keys) < count:
            fut = asyncio.get_running_loop().create_future()
            self._waiter = (count, fut)
            await asyncio.wait_for(fut, timeout)


def picture(width: int, height: int, fmt: PixelFormat = GUEST_32, seed: int = 0) -> Surface:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (height, width * fmt.bytes_per_pixel), dtype=np.uint8)
    return Surface(width, height, width * fmt.bytes_per_pixel, fmt, rows)


def window_rgb() -> np.ndarray:
    """What the window surface shows, read back through pygame (not convert.py)."""
    surf = pygame.display.get_surface()
    w, h = surf.get_size()
    return np.frombuffer(pygame.image.tostring(surf, "RGB"), np.uint8).reshape(h, w, 3)


async def settle():
    """Let call_soon work (console flush, display flush) run."""
    for _ in range(3):
        await asyncio.sleep(0)


def make_display(console, **kw):
    from pyxenfb.sdl import SdlDisplay
    return SdlDisplay(console, name=kw.pop("name", "guest1"), **kw)


def started_display(surface: Surface | None = None, **kw):
    """(console, input sink, display): a console showing `surface` whose
    input is recorded, and a started SdlDisplay on it."""
    console = Console("t")
    if surface is not None:
        console.set_surface(surface)
    console.input = sink = RecordingSink()
    disp = make_display(console, **kw)
    disp.start()
    return console, sink, disp


@pytest.fixture
def dummy_video(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    yield
    pygame.display.quit()


def post(type_, **attrs):
    pygame.event.post(pygame.event.Event(type_, **attrs))


# ---- dummy driver ---------------------------------------------------------------

def test_module_import_does_not_import_pygame():
    code = "import sys, pyxenfb.sdl; assert 'pygame' not in sys.modules, 'pygame imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("fmt", [GUEST_32, GUEST_16])
def test_window_shows_picture_and_updates(dummy_video, fmt):
    async def main():
        console = Console("t")
        console.set_surface(picture(64, 48, fmt))
        disp = make_display(console)
        disp.start()
        assert pygame.display.get_surface().get_size() == (64, 48)
        assert disp.title == "QEMU (guest1)" == pygame.display.get_caption()[0]
        np.testing.assert_array_equal(window_rgb(), to_rgb(console.surface.rows, fmt, 64, 48))
        # the guest draws into a rectangle at the right/bottom edge
        console.surface.rows[40:48, (50 * fmt.bytes_per_pixel):] ^= 0x5A
        console.invalidate(50, 40, 14, 8)
        await settle()
        np.testing.assert_array_equal(window_rgb(), to_rgb(console.surface.rows, fmt, 64, 48))
        disp.close()
    asyncio.run(main())


def test_guest_resize_resizes_window(dummy_video):
    async def main():
        console = Console("t")
        console.set_surface(picture(40, 30))
        disp = make_display(console)
        disp.start()
        console.set_surface(picture(100, 70, seed=3))
        assert pygame.display.get_surface().get_size() == (100, 70)
        np.testing.assert_array_equal(window_rgb(), to_rgb(console.surface.rows, GUEST_32, 100, 70))
        disp.close()
    asyncio.run(main())


@needs_keymap
def test_keys_reach_the_sink_as_linux_codes(dummy_video):
    async def main():
        console, sink, disp = started_display()
        post(pygame.KEYDOWN, scancode=SCAN_A, key=pygame.K_a, mod=0)
        post(pygame.KEYUP, scancode=SCAN_A, key=pygame.K_a, mod=0)
        post(pygame.KEYDOWN, scancode=0x2C, key=pygame.K_SPACE, mod=0)   # held, then focus lost
        post(pygame.WINDOWFOCUSLOST)
        disp.pump_events()
        assert sink.events == [("key", KEY_A, True), ("key", KEY_A, False),
                               ("key", 57, True), ("key", 57, False)]
        disp.close()
    asyncio.run(main())


def test_absolute_pointer_buttons_and_wheel(dummy_video):
    async def main():
        console, sink, disp = started_display(picture(64, 48))
        post(pygame.MOUSEMOTION, pos=(10, 20), rel=(3, 4), buttons=(0, 0, 0))
        post(pygame.MOUSEBUTTONDOWN, pos=(11, 21), button=1)
        post(pygame.MOUSEBUTTONUP, pos=(11, 21), button=1)
        post(pygame.MOUSEBUTTONDOWN, pos=(12, 22), button=4)      # legacy wheel: ignored
        post(pygame.MOUSEWHEEL, x=0, y=1, flipped=False)
        post(pygame.MOUSEWHEEL, x=0, y=-2, flipped=False)
        disp.pump_events()
        assert sink.events == [
            ("abs", 10, 20, 64, 48),
            ("abs", 11, 21, 64, 48), ("key", BTN_LEFT, True),
            ("abs", 11, 21, 64, 48), ("key", BTN_LEFT, False),
            ("wheel", -1), ("wheel", 1)]
        assert not disp.grabbed
        disp.close()
    asyncio.run(main())


def test_relative_pointer_needs_grab(dummy_video):
    async def main():
        console, sink, disp = started_display(picture(64, 48))
        console.set_pointer_mode(False)
        post(pygame.MOUSEMOTION, pos=(10, 20), rel=(3, 4), buttons=(0, 0, 0))   # not grabbed: dropped
        post(pygame.MOUSEBUTTONDOWN, pos=(10, 20), button=1)                     # click grabs
        post(pygame.MOUSEBUTTONUP, pos=(10, 20), button=1)
        disp.pump_events()
        assert sink.events == [] and disp.grabbed
        assert pygame.display.get_caption()[0] == "QEMU (guest1) - Press Ctrl-Alt-G to exit grab"
        post(pygame.MOUSEMOTION, pos=(10, 20), rel=(-5, 7), buttons=(0, 0, 0))
        post(pygame.MOUSEBUTTONDOWN, pos=(10, 20), button=3)
        disp.pump_events()
        assert sink.events == [("rel", -5, 7), ("key", BTN_RIGHT, True)]
        disp.close()
    asyncio.run(main())


def test_ctrl_alt_g_toggles_grab_and_title(dummy_video):
    async def main():
        console, sink, disp = started_display(name="vm7")
        mod = pygame.KMOD_LCTRL | pygame.KMOD_LALT
        post(pygame.KEYDOWN, scancode=SCAN_G, key=pygame.K_g, mod=mod)
        post(pygame.KEYUP, scancode=SCAN_G, key=pygame.K_g, mod=mod)
        disp.pump_events()
        assert disp.grabbed
        assert pygame.display.get_caption()[0] == "QEMU (vm7) - Press Ctrl-Alt-G to exit grab"
        post(pygame.KEYDOWN, scancode=SCAN_G, key=pygame.K_g, mod=mod)
        post(pygame.KEYUP, scancode=SCAN_G, key=pygame.K_g, mod=0)      # Ctrl/Alt let go first
        disp.pump_events()
        assert not disp.grabbed
        assert pygame.display.get_caption()[0] == "QEMU (vm7)"
        assert sink.events == []                                         # the hotkey never reaches the guest
        disp.close()
    asyncio.run(main())


def test_quit_calls_on_close(dummy_video):
    async def main():
        closed = []
        console = Console("t")
        disp = make_display(console, on_close=lambda: closed.append(True))
        disp.start()
        post(pygame.QUIT)
        disp.pump_events()
        assert closed == [True]
        disp.close()
        assert disp not in console.listeners
    asyncio.run(main())


# ---- a real X server (Xvfb) -----------------------------------------------------------

@pytest.fixture(params=[24, 16], ids=["x24", "x16"])
def xvfb(request, monkeypatch):
    if not shutil.which("Xvfb") or not shutil.which("xwd"):
        pytest.skip("Xvfb/xwd not installed")
    server = Xvfb(f"1024x768x{request.param}")
    monkeypatch.setenv("DISPLAY", server.display)
    monkeypatch.setenv("SDL_VIDEODRIVER", "x11")
    yield request.param
    pygame.display.quit()
    server.stop()


def parse_xwd(data: bytes) -> tuple[np.ndarray, int]:
    """XWD dump -> ((height, width) raw pixel values, bits per pixel)."""
    fields = struct.unpack(">25I", data[:100])
    header_size, bpp, bytes_per_line = fields[0], fields[11], fields[12]
    width, height, byte_order, ncolors = fields[4], fields[5], fields[7], fields[19]
    start = header_size + 12 * ncolors
    rows = np.frombuffer(data, np.uint8, height * bytes_per_line, start).reshape(height, bytes_per_line)
    dtype = {16: "u2", 32: "u4"}[bpp]
    px = rows[:, :width * bpp // 8].copy().view((">" if byte_order else "<") + dtype)
    return px.astype(np.uint32), bpp


async def xwd_window(wid: int) -> tuple[np.ndarray, int]:
    proc = await asyncio.create_subprocess_exec("xwd", "-id", str(wid), "-silent",
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    return parse_xwd(out)


async def run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, argv
    return out.decode().strip()


def test_xvfb_window_shows_exact_picture_and_keys(xvfb):
    async def main():
        console, sink, disp = started_display(picture(160, 120, seed=11), name="xguest")
        assert disp._fd is not None and disp._poll_handle is None   # woken by the X fd, no polling
        wid = disp.window_id
        rows = console.surface.rows
        if xvfb == 24:
            expected = rows.view("<u4") & 0xFFFFFF
            mask = 0xFFFFFF
        else:
            rgb565 = PixelFormat(16, 16, False, 31, 63, 31, 11, 5, 0)
            expected = convert_rect(rows, GUEST_32, rgb565, 0, 0, 160, 120).view("<u2").astype(np.uint32)
            mask = 0xFFFF
        assert disp.window_format.bpp == (32 if xvfb == 24 else 16)

        deadline = time.monotonic() + 10       # the X server shows it once the window is mapped
        while True:
            shot, bpp = await xwd_window(wid)
            if shot.shape == expected.shape and np.array_equal(shot & mask, expected):
                break
            assert time.monotonic() < deadline, "window never showed the guest picture"
            await asyncio.sleep(0.05)

        # a guest update shows up too
        rows[10:20, 40:80] = 0x80
        console.invalidate(10, 10, 10, 10)
        expected2 = (rows.view("<u4") & 0xFFFFFF) if xvfb == 24 else \
            convert_rect(rows, GUEST_32, rgb565, 0, 0, 160, 120).view("<u2").astype(np.uint32)
        await settle()
        shot, _ = await xwd_window(wid)
        np.testing.assert_array_equal(shot & mask, expected2)

        if usb_hid_to_linux is None:
            pytest.skip("pyxenfb.console.keymap.usb_hid_to_linux not available: key check skipped")
        await run("xdotool", "windowfocus", "--sync", str(wid))
        await run("xdotool", "key", "--delay", "0", "a")
        await sink.wait_for_keys(2)     # (the pointer over the window also reports motion)
        assert sink.keys[:2] == [("key", KEY_A, True), ("key", KEY_A, False)]

        # Ctrl-Alt-G grabs: the X window title changes, G never reaches the guest
        await run("xdotool", "key", "--delay", "0", "ctrl+alt+g")
        await sink.wait_for_keys(6)              # ctrl, alt down and up
        assert disp.grabbed
        assert await run("xdotool", "getwindowname", str(wid)) == "QEMU (xguest) - Press Ctrl-Alt-G to exit grab"
        codes = {e[1] for e in sink.keys[2:]}
        assert codes == {29, 56}                 # KEY_LEFTCTRL, KEY_LEFTALT only
        disp.close()
    asyncio.run(main())


def test_x11_display_started_twice_finds_its_window_without_get_wm_info(xvfb, monkeypatch):
    """--sdl on X11, the display initialised twice in one process: each time the
    window's X id and SDL's X connection fd are found, and pygame's
    get_wm_info() is never called (pygame 2.6 reads uninitialised Wayland
    members there and crashed Debian's Python 3.11.2 on the second start)."""
    import pygame

    def refuse():
        raise AssertionError("pygame.display.get_wm_info() called")
    monkeypatch.setattr(pygame.display, "get_wm_info", refuse)

    async def main():
        for round_ in range(2):
            console, sink, disp = started_display(picture(64, 48, seed=round_), name=f"twice{round_}")
            assert disp._fd is not None and disp._poll_handle is None
            # The id SDL gave us is an X window with our title.
            assert await run("xdotool", "getwindowname", str(disp.window_id)) == f"QEMU (twice{round_})"
            disp.close()
    asyncio.run(main())
