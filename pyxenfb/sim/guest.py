"""Reference PV guest: vfb and vkbd frontends that behave like Linux's.

`FbFront` follows drivers/video/fbdev/xen-fbfront.c and `KbdFront`
drivers/input/misc/xen-kbdfront.c step by step: the same XenStore keys in the
same order and transaction, the same XenBus states, pd[] laid out as Linux
lays it out for the guest's ABI, UPDATE events as the guest draws, RESIZE,
REFRESH_PERIOD obeyed, input events logged.  Tests drive it in-process (and
use its hostile API to write anything anywhere); `pyxenfb-sim create` runs
it as a process:

    python -m pyxenfb.sim.guest --run-dir DIR --domid N [--abi x86_32]
        [--width W --height H] [--animate [box|full|text|desktop]] [--fps F] [--echo-input]

--animate (= box) moves a small square over the test picture; --animate full
repaints the whole framebuffer from ../shared/bench/xanim.c's 24 frames, one
full-screen UPDATE per frame (the benchmark load), as fast as the backend
consumes them or at most --fps F frames per second; text (a scrolling text
console) and desktop (a desktop whose clock and cursor change) do the same
with pyxenfb/sim/content.py's frames, one UPDATE per changed rectangle.  --echo-input draws what
the keyboard frontend receives (pyxenfb/sim/echo.py); off, the picture is
exactly the test picture.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import struct
import sys
import time
from pathlib import Path

import numpy as np

from ..console.input_codes import kbdfront_device
from ..util.region import bounding_box, clip
from ..devices import ring, xenfb_abi as abi
from .content import content_frames
from .picture import BOX, box_colour, box_position, test_picture
from .toolstack import ANIMATIONS

log = logging.getLogger("pyxenfb.guest")

MiB = 1 << 20
DEFAULT_VIDEORAM_MB = 2          # Linux xen-fbfront's default video memory
ANIMATION_INTERVAL = 0.1         # seconds between animation frames (the guest's own clock)
STATE_WAIT = 5.0                 # bound on waiting for the backend while closing


def _abi(name: str) -> abi.GuestAbi:
    return {"x86_64": abi.ABI_X86_64, "x86_32": abi.ABI_X86_32}.get(name) or abi.ABIS[name]


class Frontend:
    """What both frontends share: XenStore paths, state, one shared page."""

    kind = ""

    def __init__(self, guest: "ReferenceGuest", devid: int = 0):
        self.guest = guest
        self.xs = guest.xs
        self.fe = f"device/{self.kind}/{devid}"          # relative: /local/domain/N/...
        self.fe_abs = f"/local/domain/{guest.domid}/{self.fe}"
        self.be: str | None = None
        self.state = abi.INITIALISING
        self.page_frame: int | None = None
        self.page: np.ndarray | None = None               # 4096 bytes, the shared page
        self._page_map = None
        self.port: int | None = None
        self._watch_token = f"{self.kind}-be"
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()                  # backend Connected and we too

    # ---- helpers --------------------------------------------------------
    def u32(self, off: int) -> int:
        return ring.read_u32(self.page, off)

    def drain(self, in_ring: ring.Ring, handle) -> None:
        """Consume the in ring; corrupt indexes are skipped over, as Linux's fronts do."""
        try:
            ring.consume(self.page, in_ring, handle)
        except ring.RingIndexError as e:
            log.warning("dom%d %s: in ring indexes corrupt, resynchronising", self.guest.domid, self.kind)
            ring.skip_to(self.page, in_ring, e.prod)

    async def switch_state(self, state: int) -> None:
        if self.state == state:
            return
        self.state = state
        await self.xs.write(f"{self.fe}/state", str(state))
        log.debug("dom%d %s: frontend -> %s", self.guest.domid, self.kind, abi.STATE_NAMES[state])

    async def backend_state(self) -> int:
        return await self.xs.read_int(f"{self.be}/state", abi.UNKNOWN)

    # ---- lifecycle -------------------------------------------------------
    async def probe(self) -> None:
        """Allocate, fill the shared page, publish keys in one transaction, go Initialised."""
        self.be = await self.xs.read_str(f"{self.fe}/backend")
        if not self.be:
            raise RuntimeError(f"{self.fe}/backend missing: was the domain created by the toolstack?")
        await self.read_backend_features()
        frames = self.guest.alloc(1)
        self.page_frame = frames[0]
        self._page_map = self.guest.map_own(frames)
        self.page = self._page_map.array[:abi.PAGE_SIZE]
        self.page[:] = 0
        self.setup_page()
        self.port = self.guest.evtchn.alloc_unbound(0)
        self.guest.ports[self.port] = self
        await self.write_pre_transaction_keys()

        async def publish(tx):
            for key, value in self.frontend_keys():
                await self.xs.write(f"{self.fe}/{key}", value, tx=tx)
        await self.xs.transaction(publish)
        await self.switch_state(abi.INITIALISED)
        await self.xs.watch(f"{self.be}/state", self._watch_token, lambda p, t: self._changed.set())
        self._task = asyncio.create_task(self._follow_backend(), name=f"{self.kind}-follow")

    async def _follow_backend(self) -> None:
        while True:
            try:
                await self.xs.until(self._changed.wait())
            except OSError:
                return                # XenStore is gone: _run sees it and exits
            self._changed.clear()
            try:
                await self.backend_changed(await self.backend_state())
            except Exception as exc:
                if self.xs.closed.done() or isinstance(exc, ConnectionError):
                    return            # the host died under the reply: as above
                # a guest bug must be loud in tests, not silent
                log.exception("dom%d %s: backend_changed failed", self.guest.domid, self.kind)

    async def backend_changed(self, be_state: int) -> None:
        """xen-fbfront/xen-kbdfront's otherend_changed, as Linux does it."""
        if be_state == abi.INIT_WAIT:
            await self.switch_state(abi.CONNECTED)
        elif be_state == abi.CONNECTED:
            # Linux's race workaround: the backend may go InitWait->Connected
            # before we saw InitWait.
            if self.state != abi.CONNECTED:
                await self.switch_state(abi.CONNECTED)
            await self.backend_connected()
            self.connected.set()
        elif be_state == abi.CLOSED and self.state == abi.CLOSED:
            pass
        elif be_state in (abi.CLOSING, abi.CLOSED):
            self.connected.clear()
            await self.switch_state(abi.CLOSING)
            await self.switch_state(abi.CLOSED)
        else:
            self.connected.clear()

    async def close(self) -> None:
        """Module unload / reboot: Closing, wait for the backend, Closed, free."""
        self.connected.clear()
        if self.be is not None and self.state not in (abi.CLOSED,):
            await self.switch_state(abi.CLOSING)
            await self._wait_backend_at_least(abi.CLOSING)
            await self.switch_state(abi.CLOSED)
            await self._wait_backend_at_least(abi.CLOSED)
        await self.release()

    async def _wait_backend_at_least(self, state: int) -> None:
        deadline = time.monotonic() + STATE_WAIT
        while time.monotonic() < deadline:
            s = await self.backend_state()
            if s >= state or s == abi.UNKNOWN:
                return
            waiter = asyncio.Event()
            token = f"{self.kind}-wait-{state}"
            await self.xs.watch(f"{self.be}/state", token, lambda p, t: waiter.set())
            try:
                await asyncio.wait_for(self.xs.until(waiter.wait()),
                                       max(0.01, deadline - time.monotonic()))
                waiter.clear()
                s = await self.backend_state()
                if s >= state:
                    return
            except asyncio.TimeoutError:
                break
            finally:
                await self.xs.unwatch(f"{self.be}/state", token)
        log.warning("dom%d %s: backend did not reach state %d", self.guest.domid, self.kind, state)

    async def release(self) -> None:
        if self._task:
            self._task.cancel()
            self._task = None
            if self.be:
                try:
                    await self.xs.unwatch(f"{self.be}/state", self._watch_token)
                except OSError:
                    pass
        if self.port is not None:
            self.guest.ports.pop(self.port, None)
            self.guest.evtchn.unbind(self.port)
            self.port = None
        if self._page_map is not None:
            self.page = None
            self._page_map.close()
            self._page_map = None
            self.guest.free([self.page_frame])
            self.page_frame = None
        self.release_device_memory()

    def notify(self) -> None:
        if self.port is not None:
            self.guest.evtchn.notify(self.port)

    # ---- per device hooks ---------------------------------------------------
    async def read_backend_features(self) -> None: ...
    def setup_page(self) -> None: ...
    async def write_pre_transaction_keys(self) -> None: ...
    def frontend_keys(self) -> list[tuple[str, str]]: return []
    async def backend_connected(self) -> None: ...
    def handle_event(self) -> None: ...
    def release_device_memory(self) -> None: ...

    # ---- hostile API (tests) ------------------------------------------------
    def poke(self, offset: int, fmt: str, *values) -> None:
        """Write anything anywhere in the shared page."""
        struct.pack_into(fmt, self.page, offset, *values)


class FbFront(Frontend):
    kind = "vfb"

    def __init__(self, guest, width: int, height: int):
        super().__init__(guest)
        self.width, self.height = width, height
        self.initial_width, self.initial_height = width, height
        self.line_length = width * 4
        self.fb_len = 0
        self.fb_frames: list[int] = []
        self.dir_frames: list[int] = []
        self._fb_map = None
        self._dir_map = None
        self.fb: np.ndarray | None = None        # (height, width) uint32 view of guest "vmalloc" memory
        self.update_wanted = False
        self.feature_resize = False
        self.refresh_period: int | None = None   # last REFRESH_PERIOD seen (ms)
        self.pending_dirty: tuple[int, int, int, int] | None = None
        self.updates_sent = 0
        self.backend_kicked = asyncio.Event()    # set on every notification from the backend
        self.echo_marker: tuple[int, int] | None = None   # where --echo-input's crosshair is

    async def read_backend_features(self) -> None:
        mb = await self.xs.read_int(f"{self.be}/videoram", None)
        videoram = DEFAULT_VIDEORAM_MB if not mb or mb <= 0 else min(mb, DEFAULT_VIDEORAM_MB * 64)
        self.fb_len = max(videoram * MiB, self.height * self.line_length)
        self.fb_len = (self.fb_len + abi.PAGE_SIZE - 1) // abi.PAGE_SIZE * abi.PAGE_SIZE

    def setup_page(self) -> None:
        a = self.guest.abi
        nr_pages = self.fb_len // abi.PAGE_SIZE
        self.fb_frames = self.guest.alloc(nr_pages)
        self._fb_map = self.guest.map_own(self.fb_frames)
        mem = self._fb_map.array
        mem[:] = 0
        self.fb = mem[:self.height * self.line_length].view("<u4").reshape(self.height, self.width)
        # The gfn array (Linux: info->gfns, vmalloc'ed) lives in its own pages;
        # pd[i] names the page holding entries i*epd .. (i+1)*epd-1.
        epd = a.entries_per_page
        n_dirs = (nr_pages + epd - 1) // epd
        self.dir_frames = self.guest.alloc(n_dirs)
        self._dir_map = self.guest.map_own(self.dir_frames)
        entries = np.zeros(n_dirs * epd, dtype="<u4" if a.entry_size == 4 else "<u8")
        entries[:nr_pages] = self.fb_frames
        self._dir_map.array[:] = entries.view(np.uint8)
        self.poke(abi.FB_WIDTH, "<i", self.width)
        self.poke(abi.FB_HEIGHT, "<i", self.height)
        self.poke(abi.FB_DEPTH, "<B", 32)
        self.poke(abi.FB_LINE_LENGTH, "<I", self.line_length)
        self.poke(abi.FB_MEM_LENGTH, "<I", self.fb_len)
        for i, frame in enumerate(self.dir_frames):
            self.poke(a.pd_offset + i * a.entry_size, a.entry_format, frame)
        self.draw_picture()

    def frontend_keys(self):
        return [("page-ref", str(self.page_frame)), ("event-channel", str(self.port)),
                ("protocol", self.guest.abi.name), ("feature-update", "1")]

    async def backend_connected(self) -> None:
        self.update_wanted = bool(await self.xs.read_int(f"{self.be}/request-update", 0))
        self.feature_resize = bool(await self.xs.read_int(f"{self.be}/feature-resize", 0))
        self.refresh(0, 0, self.width, self.height)
        self.backend_kicked.set()

    def release_device_memory(self) -> None:
        self.fb = None
        for m in (self._fb_map, self._dir_map):
            if m is not None:
                m.close()
        self._fb_map = self._dir_map = None
        self.guest.free(self.fb_frames + self.dir_frames)
        self.fb_frames, self.dir_frames = [], []
        self.update_wanted = False

    # ---- drawing ---------------------------------------------------------
    def draw_picture(self) -> None:
        self.fb[:, :] = test_picture(self.width, self.height)

    def draw_box(self, frame: int) -> tuple[int, int, int, int]:
        """Animation step: restore the old square's area, draw the new one; return the dirty rect."""
        pic = self.guest.picture_cache(self.width, self.height)
        ox, oy = box_position(frame - 1, self.width, self.height)
        nx, ny = box_position(frame, self.width, self.height)
        self.fb[oy:oy + BOX, ox:ox + BOX] = pic[oy:oy + BOX, ox:ox + BOX]
        self.fb[ny:ny + BOX, nx:nx + BOX] = box_colour(frame)
        return clip(*bounding_box([(ox, oy, BOX, BOX), (nx, ny, BOX, BOX)]), self.width, self.height)

    def draw_echo(self, echo, strip: bool, marker: bool) -> None:
        """--echo-input: the strip goes into the background too (the animated
        square restores from it); the marker only into the framebuffer."""
        from .echo import STRIP_H, draw_marker, marker_rect, render_strip
        if self.fb is None:
            return
        w, h = self.width, self.height
        background = self.guest.picture_cache(w, h)
        dirty = []
        if strip and h > 2 * STRIP_H:
            pixels = render_strip(w, echo.strip_text())
            background[h - STRIP_H:, :] = pixels
            self.fb[h - STRIP_H:, :] = pixels
            dirty.append((0, h - STRIP_H, w, h))
        if strip or marker:
            if self.echo_marker is not None:          # take the old crosshair away
                x0, y0, x1, y1 = marker_rect(*self.echo_marker, w, h)
                self.fb[y0:y1, x0:x1] = background[y0:y1, x0:x1]
                dirty.append((x0, y0, x1, y1))
            if echo.pointer is not None:
                draw_marker(self.fb, *echo.pointer, bool(echo.buttons))
                dirty.append(marker_rect(*echo.pointer, w, h))
                self.echo_marker = echo.pointer
        if dirty:
            x0, y0 = min(d[0] for d in dirty), min(d[1] for d in dirty)
            x1, y1 = max(d[2] for d in dirty), max(d[3] for d in dirty)
            self.refresh(x0, y0, x1 - x0, y1 - y0)

    def out_ring_busy(self) -> bool:
        """Our last event is not consumed yet (or we may not send at all)."""
        return (self.page is None or not self.update_wanted
                or self.refresh_period == abi.XENFB_NO_REFRESH
                or self.u32(abi.FB_OUT_PROD) != self.u32(abi.FB_OUT_CONS))

    def refresh(self, x: int, y: int, w: int, h: int) -> None:
        """Linux xenfb_refresh: send an UPDATE, or stash the rect if we can't yet."""
        if self.pending_dirty is not None:
            x, y, w, h = bounding_box([self.pending_dirty, (x, y, w, h)])
        if not self.update_wanted or self.refresh_period == abi.XENFB_NO_REFRESH or self.page is None:
            self.pending_dirty = (x, y, w, h)
            return
        if not ring.produce(self.page, ring.FB_OUT,
                            abi.pack_event(abi.FB_UPDATE, abi.XENFB_TYPE_UPDATE, x, y, w, h)):
            self.pending_dirty = (x, y, w, h)     # ring full: flushed on the next notification
            return
        self.pending_dirty = None
        self.notify()
        self.updates_sent += 1

    def push_out_event(self, event: bytes, *, notify: bool = True) -> None:
        """Unchecked, as a guest may: tests use it to inject raw events."""
        ring.put(self.page, ring.FB_OUT, event)
        if notify:
            self.notify()

    def resize(self, width: int, height: int) -> bool:
        """xenfb_set_par: only when the backend offered feature-resize and it fits."""
        if not self.feature_resize or width * 4 > self.line_length or height > self.initial_height:
            return False
        self.width, self.height = width, height
        mem = self._fb_map.array
        self.fb = mem[:height * self.line_length].view("<u4").reshape(height, self.line_length // 4)[:, :width]
        self.guest.picture_cache(width, height)
        self.fb[:, :] = test_picture(width, height)
        self.push_out_event(abi.pack_event(abi.FB_RESIZE, abi.XENFB_TYPE_RESIZE, width, height,
                                           self.line_length, 32, 0))
        self.refresh(0, 0, width, height)
        return True

    def handle_event(self) -> None:
        """The backend notified: drain the in ring, then flush a stashed rect."""
        self.drain(ring.FB_IN, self._in_event)
        if self.pending_dirty is not None:
            self.refresh(*self.pending_dirty)
        self.backend_kicked.set()

    def _in_event(self, event: bytes) -> None:
        if event[0] == abi.XENFB_TYPE_REFRESH_PERIOD:
            _, period = abi.FB_REFRESH.unpack_from(event)
            was = self.refresh_period
            self.refresh_period = period
            log.info("dom%d vfb: refresh period %d ms", self.guest.domid, period)
            if was == abi.XENFB_NO_REFRESH and period != abi.XENFB_NO_REFRESH:
                self.pending_dirty = (0, 0, self.width, self.height)


XENFB_WIDTH, XENFB_HEIGHT = 800, 600


class KbdFront(Frontend):
    kind = "vkbd"

    def __init__(self, guest):
        super().__init__(guest)
        self.abs_pointer = False
        self.ptr_size = (XENFB_WIDTH, XENFB_HEIGHT)
        self.events: list[dict] = []

    async def read_backend_features(self) -> None:
        self.abs_pointer = bool(await self.xs.read_int(f"{self.be}/feature-abs-pointer", 0))
        w = await self.xs.read_int(f"{self.be}/width", None)
        h = await self.xs.read_int(f"{self.be}/height", None)
        if w and h and w > 0 and h > 0:
            self.ptr_size = (w, h)

    def setup_page(self) -> None:
        pass   # in/out indexes start at zero

    async def write_pre_transaction_keys(self) -> None:
        if self.abs_pointer:
            await self.xs.write(f"{self.fe}/request-abs-pointer", "1")

    def frontend_keys(self):
        # page-gref: a grant reference in Linux; the sim has no grant tables,
        # the value is only kept so the key set matches a real guest.
        return [("page-ref", str(self.page_frame)), ("page-gref", "8"),
                ("event-channel", str(self.port))]

    def handle_event(self) -> None:
        self.drain(ring.KBD_IN, self._log_input)
        # No out events are defined: just consume whatever is there.
        ring.discard(self.page, ring.KBD_OUT)

    def _log_input(self, ev: bytes) -> None:
        kind = ev[0]
        if kind == abi.XENKBD_TYPE_KEY:
            _, pressed, code = abi.KBD_KEY.unpack_from(ev)
            device = kbdfront_device(code)
            entry = {"dev": "vkbd", "type": "key", "code": code, "pressed": bool(pressed),
                     "device": device}
        elif kind == abi.XENKBD_TYPE_MOTION:
            _, dx, dy, dz = abi.KBD_MOTION.unpack_from(ev)
            entry = {"dev": "vkbd", "type": "motion", "rel_x": dx, "rel_y": dy, "rel_z": dz}
        elif kind == abi.XENKBD_TYPE_POS:
            _, ax, ay, dz = abi.KBD_POS.unpack_from(ev)
            # Linux's abs range is [0, ptr_size]; userspace maps it onto the screen.
            fb = self.guest.fb
            px = ax * fb.width // self.ptr_size[0] if fb else ax
            py = ay * fb.height // self.ptr_size[1] if fb else ay
            entry = {"dev": "vkbd", "type": "pos", "abs_x": ax, "abs_y": ay, "rel_z": dz,
                     "x": px, "y": py}
        else:
            entry = {"dev": "vkbd", "type": "unknown", "raw_type": kind}
        self.events.append(entry)
        self.guest.log_event(entry)
        if self.guest.echo is not None and self.guest.fb is not None:
            self.guest.fb.draw_echo(self.guest.echo, *self.guest.echo.feed(entry))


class ReferenceGuest:
    """One simulated PV domain's kernel: a vfb and a vkbd frontend."""

    def __init__(self, run_dir: str | os.PathLike, domid: int, *, abi_name: str = "x86_64",
                 width: int = 800, height: int = 600, animate: bool | str = False,
                 fps: float | None = None, seed: int | None = None, echo_input: bool = False):
        self.run_dir = Path(run_dir)
        self.domid = domid
        self.abi = _abi(abi_name)
        self.width, self.height = width, height
        # True / "box": the bouncing square; "full": xanim's full-screen frames;
        # "text", "desktop": content.py's frames
        self.animate = "box" if animate is True else (animate or None)
        if self.animate not in (None, *ANIMATIONS):
            raise ValueError(f"unknown animation {animate!r}")
        self.fps = fps if fps and fps > 0 else None
        if echo_input:
            from .echo import InputEcho
        self.echo = InputEcho() if echo_input else None     # draws received input (opt-in)
        self.seed = domid if seed is None else seed
        self.dom_dir = self.run_dir / f"dom{domid}"
        self.ports: dict[int, Frontend] = {}
        self.frame = 0
        self._pictures: dict[tuple[int, int], np.ndarray] = {}
        self._anim: asyncio.Task | None = None
        self._log_file = None
        self.fb: FbFront | None = None
        self.kbd: KbdFront | None = None

    # ---- platform of the guest --------------------------------------------
    async def start(self) -> None:
        from ..evtchn import SimEventChannel
        from ..platform.foreignmem import SimForeignMemory
        from ..platform.xenstore import XenStore
        from .guestmem import FrameAllocator, GuestMemory

        self.mem = GuestMemory.open(str(self.dom_dir / "memory"))
        self.allocator = FrameAllocator(self.mem.nr_frames, self.seed)
        self.own_maps = SimForeignMemory(str(self.run_dir))
        self.xs = await XenStore.open(str(self.dom_dir / "xenstored.sock"))
        self.evtchn = SimEventChannel(str(self.run_dir / "evtchn.sock"), self.domid)
        asyncio.get_running_loop().add_reader(self.evtchn.fileno(), self._on_evtchn)
        self._log_file = open(self.dom_dir / "input.log", "a", buffering=1)
        await self.boot()

    def alloc(self, n: int) -> list[int]:
        return self.allocator.alloc(n)

    def free(self, frames: list[int]) -> None:
        if frames:
            self.allocator.free(frames)

    def map_own(self, frames: list[int]):
        """The guest kernel's view of its own pages, contiguous (vmalloc)."""
        return self.own_maps.map(self.domid, frames, writable=True)

    def picture_cache(self, width: int, height: int) -> np.ndarray:
        key = (width, height)
        if key not in self._pictures:
            self._pictures[key] = test_picture(width, height)
        return self._pictures[key]

    def _on_evtchn(self) -> None:
        try:
            ports = self.evtchn.pending()
        except ConnectionError as e:
            # the host is gone: _run reports it once, when XenStore goes too
            log.debug("dom%d: %s", self.domid, e)
            asyncio.get_running_loop().remove_reader(self.evtchn.fileno())
            return
        for port in ports:
            front = self.ports.get(port)
            if front is not None and front.page is not None:
                front.handle_event()
            self.evtchn.unmask(port)

    def log_event(self, entry: dict) -> None:
        entry = {"t": round(time.time(), 3), **entry}
        if self._log_file is not None:
            self._log_file.write(json.dumps(entry) + "\n")

    # ---- kernel lifecycle ----------------------------------------------------
    async def boot(self) -> None:
        # As Linux's xenbus: only the devices the toolstack put under device/
        # are probed; a domain without a vfb (or vkbd) simply has none.
        has_devices = await self.xs.read("device", None) is not None
        devices = await self.xs.directory("device") if has_devices else []
        self.fb = FbFront(self, self.width, self.height) if "vfb" in devices else None
        self.kbd = KbdFront(self) if "vkbd" in devices else None
        for front in self._fronts():
            await front.probe()
        self._write_info()
        if self.animate and self._anim is None and self.fb is not None:
            body = self._animate() if self.animate == "box" else self._animate_full()
            self._anim = asyncio.create_task(body, name="guest-animate")

    async def reboot(self, clean: bool = True) -> None:
        """Frontends re-initialise: after closing (module reload, reboot) or,
        with clean=False, straight from Connected (kexec, resume)."""
        log.info("dom%d: rebooting frontends%s", self.domid, "" if clean else " (no close)")
        for front in self._fronts():
            await (front.close() if clean else front.release())
        for front in self._fronts():
            await self.xs.write(f"{front.fe}/state", str(abi.INITIALISING))
        await self.boot()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(asyncio.gather(*(f.connected.wait() for f in self._fronts())),
                               timeout)

    def _fronts(self) -> list[Frontend]:
        return [front for front in (self.fb, self.kbd) if front is not None]

    async def _animate(self) -> None:
        while True:
            await asyncio.sleep(ANIMATION_INTERVAL)
            fb = self.fb
            if fb is None or fb.fb is None:
                continue
            self.frame += 1
            fb.refresh(*fb.draw_box(self.frame))

    async def _animate_full(self) -> None:
        """Frames of a ring: one copy into the framebuffer, one UPDATE per
        changed rectangle (full, xanim's: the whole screen), one notify each.

        Keeps one UPDATE in flight: the next frame is drawn once the backend
        consumed the last one (its notification), so the guest paints as
        fast as the backend takes frames and never overflows the out ring.
        """
        loop = asyncio.get_running_loop()
        frames, rects, n, first = None, [], 0, True
        next_t = loop.time()
        while True:
            fb = self.fb
            if fb.fb is None or fb.out_ring_busy():
                fb.backend_kicked.clear()
                # The backend's notification wakes us; the timeout only covers
                # a reboot replacing self.fb (the old front is never kicked).
                try:
                    await asyncio.wait_for(fb.backend_kicked.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
                continue
            if frames is None or frames[0].shape != (fb.height, fb.width):
                kind = "gradient" if self.animate == "full" else self.animate
                frames, rects = content_frames(kind, fb.width, fb.height)
                first = True
            k = n % len(frames)
            # the first frame (also after a resize) is new everywhere
            changed = [(0, 0, fb.width, fb.height)] if first else rects[k]
            first = False
            for x, y, w, h in changed:
                fb.fb[y:y + h, x:x + w] = frames[k][y:y + h, x:x + w]
            n += 1
            self.frame = n
            for rect in changed:
                fb.refresh(*rect)
            if self.fps:
                next_t = max(next_t + 1 / self.fps, loop.time() - 1.0)
                await asyncio.sleep(max(0.0, next_t - loop.time()))

    def _write_info(self) -> None:
        fb, kbd = self.fb, self.kbd
        info = {"domid": self.domid, "pid": os.getpid(), "abi": self.abi.name,
                "fb_page_ref": fb and fb.page_frame, "kbd_page_ref": kbd and kbd.page_frame,
                "width": fb and fb.width, "height": fb and fb.height}
        tmp = self.dom_dir / "guest.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.dom_dir / "guest.json")

    async def stop(self) -> None:
        if self._anim:
            self._anim.cancel()
            self._anim = None
        for front in (self.fb, self.kbd):
            if front is not None:
                await front.release()
        try:
            asyncio.get_running_loop().remove_reader(self.evtchn.fileno())
        except (ValueError, OSError):
            pass
        self.evtchn.close()
        self.xs.close()
        if self._log_file:
            self._log_file.close()
            self._log_file = None


async def _run(args) -> int:
    guest = ReferenceGuest(args.run_dir, args.domid, abi_name=args.abi, width=args.width,
                           height=args.height, animate=args.animate, fps=args.fps,
                           echo_input=args.echo_input)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(guest.reboot()))
    try:
        await guest.start()
    except OSError as e:
        # A host dying during boot may break the event channel first: give
        # the XenStore connection a moment to report the same.
        xs = getattr(guest, "xs", None)
        if xs is None or not (await asyncio.wait({xs.closed}, timeout=1.0))[0]:
            log.error("dom%d: cannot boot: %s", args.domid, e)
            return 1
    else:
        log.info("dom%d: guest running (%s, %dx%d, devices: %s)", args.domid, guest.abi.name,
                 args.width, args.height, " ".join(f.kind for f in guest._fronts()) or "none")
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({stopping, guest.xs.closed}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.done():
            await guest.stop()
            return 0
    # The host (xenstored) went away under us: as a real domain would, this
    # one dies with it.  Nothing to tear down that a dead host could see.
    log.info("dom%d: XenStore connection lost: the host is gone, domain dead", args.domid)
    return 0


def add_animate_args(p: argparse.ArgumentParser) -> None:
    """--animate [box|full] and --fps, shared with `pyxenfb-sim create`."""
    p.add_argument("--animate", nargs="?", const="box", choices=ANIMATIONS, default=None,
                   help="animate: box (default when given alone) = a moving square; "
                        "full = repaint the whole screen every frame (xanim's frames); "
                        "text = a scrolling text console; desktop = a desktop's clock and cursor")
    p.add_argument("--fps", type=float, default=None,
                   help="with --animate full: at most F frames per second (default: as fast as "
                        "the backend consumes them)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pyxenfb-guest", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--abi", default="x86_64", choices=["x86_64", "x86_32"])
    p.add_argument("--width", type=int, default=800)
    p.add_argument("--height", type=int, default=600)
    add_animate_args(p)
    p.add_argument("--echo-input", action="store_true",
                   help="draw the input received: typed text in a bottom strip, a pointer marker")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"pyxenfb-guest[{args.domid}]: %(message)s")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
