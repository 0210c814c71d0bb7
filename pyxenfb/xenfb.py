"""The vfb and vkbd backends: XenBus state machine, shared pages, rings.

Follows QEMU's xenfb with Linux frontends (reference: pvfb.md sections 2-6):
backend Initialising -> InitWait, read the frontend's keys only once it is
Initialised/Connected, map, Connected; frontend Closing/Closed -> release
everything and mirror the state; frontend back to Initialising after Closed
-> start over, in the same process.

Everything the guest controls is hostile: its XenStore keys, the shared page
and ring contents.  Each value is read once into private memory, checked,
and bad values are logged with the domid and ignored (or the device refused)
— never a crash, never a read outside a mapping.  Nothing here knows about
VNC or SDL: the framebuffer is published on a `Console`.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np

from .devices import ring, xenfb_abi as abi
from .console.core import Console, Surface
from .console.input_codes import KEY_MAX
from .util.pixelformat import GUEST_FORMATS
from .util.region import clip
from .util.logbudget import LogBudget

log = logging.getLogger("pyxenfb.xenfb")

REFRESH_PERIOD_MS = 30      # the display refresh interval we advertise while watched
LEGACY_REFRESH_S = 0.05     # full-screen rescans for a frontend without feature-update
# While every display has an update in the making, the out ring's events
# wait in the ring (the port stays masked) instead of being taken one by
# one: a guest that repaints faster than the displays show costs one batch
# per picture, not a wake-up, a ring walk and two event-channel calls per
# repaint (the X server of Xvnc holds its clients back the same way).
# Linux's fbfront queues up to the ring's length and then merges into one
# rectangle, which our notify flushes.  An update that takes longer (a big
# frame on a slow host, a stuck encoder) holds them at most this long, so
# a resize still lands.
HOLD_MAX_S = 0.1


class DeviceError(Exception):
    """A frontend description we refuse; the message says why."""


class XenBusStateError(RuntimeError):
    """A backend state change that BACKEND_TRANSITIONS does not allow (a bug here)."""


# --------------------------------------------------------------------------
# The XenBus state machine in one table (as h11's _state.py): the states the
# backend may move to from each state, and the frontend states that drive it.
# Writing the same state again is always allowed (a re-announcement).
# --------------------------------------------------------------------------
FE_CLOSING = frozenset({abi.CLOSING, abi.CLOSED})           # mirror it, release everything
FE_FRESH = frozenset({abi.INITIALISING, abi.INITIALISED})   # a new frontend instance: start over
FE_READY = frozenset({abi.INITIALISED, abi.CONNECTED})      # its keys are there: connect
BACKEND_TRANSITIONS: dict[int, frozenset[int]] = {
    abi.UNKNOWN: frozenset({abi.INITIALISING}) | FE_CLOSING,    # take the device over
    abi.INITIALISING: frozenset({abi.INIT_WAIT}) | FE_CLOSING,  # once the toolstack sets online=1
    abi.INIT_WAIT: frozenset({abi.CONNECTED}) | FE_CLOSING,     # frontend ready, mapped and bound
    abi.CONNECTED: frozenset({abi.INITIALISING}) | FE_CLOSING,  # frontend restarted, or closing
    abi.CLOSING: frozenset({abi.CLOSED}),
    abi.CLOSED: frozenset({abi.INITIALISING, abi.CLOSING}),  # reconnect in the same process
}


# --------------------------------------------------------------------------
# Event channel ports -> device callbacks
# --------------------------------------------------------------------------
class PortDispatcher:
    """One event-channel handle for the whole process; routes ports to devices."""

    def __init__(self, evtchn, loop: asyncio.AbstractEventLoop | None = None):
        self.evtchn = evtchn
        self.loop = loop or asyncio.get_running_loop()
        self.handlers: dict[int, callable] = {}
        self.loop.add_reader(evtchn.fileno(), self._ready)

    def bind(self, domid: int, remote_port: int, handler) -> int:
        port = self.evtchn.bind_interdomain(domid, remote_port)
        self.handlers[port] = handler
        return port

    def unbind(self, port: int) -> None:
        self.handlers.pop(port, None)
        try:
            self.evtchn.unbind(port)
        except OSError as e:
            log.debug("unbind port %d: %s", port, e)

    def notify(self, port: int) -> None:
        self.evtchn.notify(port)

    def release(self, port: int) -> None:
        """Re-arm a port whose handler held it (returned True)."""
        if port in self.handlers:
            self.evtchn.unmask(port)

    def _ready(self) -> None:
        try:
            ports = self.evtchn.pending()
        except OSError as e:        # broker gone / evtchn device reset
            log.error("event channel: %s", e)
            self.loop.remove_reader(self.evtchn.fileno())
            return
        for port in ports:
            handler = self.handlers.get(port)
            held = False
            if handler is not None:
                try:
                    # True: the device keeps the port masked and calls release() later
                    held = handler() is True
                except Exception:   # one device's bug must not stop the others
                    log.exception("event handler for port %d failed", port)
            if not held:
                self.evtchn.unmask(port)

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.evtchn.fileno())
        except (ValueError, OSError):
            pass
        self.evtchn.close()


@dataclass
class BackendContext:
    """What the backends of one device model share."""
    xs: object                  # pyxenfb.platform.xenstore.XenStore
    foreignmem: object          # pyxenfb.platform.foreignmem.ForeignMemory
    ports: PortDispatcher
    console: Console
    # A guest can repeat anything at will: its lines go through a budget.
    budget: LogBudget = field(default_factory=lambda: LogBudget(log))


# --------------------------------------------------------------------------
# XenBus state machine shared by vfb and vkbd
# --------------------------------------------------------------------------
class BackendDevice:
    """One XenBus backend device (/local/domain/0/backend/<type>/<domid>/<devid>):
    its state machine as QEMU's xen-bus runs it, watching the frontend's
    state, mapping the shared page and binding the event channel on connect,
    and undoing both on close.  Subclasses supply `connect` and `on_event`."""

    devtype = ""

    def __init__(self, ctx: BackendContext, domid: int, devid: int = 0):
        self.ctx = ctx
        self.xs = ctx.xs
        self.domid = domid
        self.devid = devid
        self.be = f"/local/domain/0/backend/{self.devtype}/{domid}/{devid}"
        self.fe: str | None = None
        self.be_state = abi.UNKNOWN
        self.fe_state = abi.UNKNOWN
        self.connected = False
        self.fe_seen_connected = False     # FE reached Connected on this connection
        self.page_map = None
        self.page: np.ndarray | None = None
        self.port: int | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.last_refusal = ""

    @property
    def name(self) -> str:
        return f"dom{self.domid} {self.devtype}-{self.devid}"

    def refuse(self, reason: str, kind: str = "frontend") -> None:
        """Log a refused input, through the budget: a few lines per kind,
        then one summary per window (logbudget.py)."""
        self.last_refusal = reason
        self.ctx.budget.warning(f"{self.name}:refused:{kind}", "%s: %s", self.name, reason,
                                what=f"{self.name} refusals ({kind})")

    def note(self, kind: str, msg: str, *args) -> None:
        """An info line the guest causes (state changes, resizes): budgeted too."""
        self.ctx.budget.info(f"{self.name}:{kind}", msg, *args, what=f"{self.name} {kind} events")

    async def start(self) -> None:
        await self.xs.watch(self.be, f"be:{self.be}", self._kick)
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-xenbus")

    def _kick(self, path: str = "", token: str = "") -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._evaluate()
            except asyncio.CancelledError:
                raise
            except OSError as e:
                if self.xs.closed.done():
                    log.error("%s: XenStore connection lost: %s", self.name, e)
                    return
                log.exception("%s: XenStore error: %s", self.name, e)
            except Exception as e:
                log.exception("%s: state machine error: %s", self.name, e)

    async def _set_state(self, state: int) -> None:
        changed = state != self.be_state
        if changed and state not in BACKEND_TRANSITIONS[self.be_state]:
            names = abi.STATE_NAMES
            raise XenBusStateError(f"{self.name}: backend {names[self.be_state]} -> "
                                   f"{names.get(state, state)} is not a XenBus transition")
        self.be_state = state
        await self.xs.write(f"{self.be}/state", str(state))
        if changed:
            self.note("state", "%s: backend -> %s", self.name, abi.STATE_NAMES.get(state, state))
        else:
            log.debug("%s: backend -> %s (written again)", self.name, abi.STATE_NAMES.get(state, state))

    async def _evaluate(self) -> None:
        if self.fe is None:
            fe = await self.xs.read_str(f"{self.be}/frontend")
            if not fe:
                return                      # toolstack hasn't written the device yet
            if fe != f"/local/domain/{self.domid}/device/{self.devtype}/{self.devid}":
                self.refuse(f"unexpected frontend path {fe!r}")
                return
            self.fe = fe
            await self.xs.watch(fe, f"fe:{fe}", self._kick)
            # Take the device over whatever a previous (killed) device model left.
            await self._set_state(abi.INITIALISING)
        while await self._step():
            pass

    async def _step(self) -> bool:
        """One transition of the XenBus state machine; True if another may follow."""
        self.fe_state = await self.xs.read_int(f"{self.fe}/state", abi.UNKNOWN)
        fe_state = self.fe_state
        if fe_state in FE_CLOSING or (fe_state == abi.UNKNOWN and self.connected):
            if self.connected:
                self.disconnect()
            target = fe_state if fe_state != abi.UNKNOWN else abi.CLOSED
            if self.be_state != target:
                await self._set_state(target)
            return False
        # A new frontend instance (module reload, kexec, resume): start over.
        # It may already be Initialised by the time we look, so accept both.
        if fe_state in FE_FRESH and (self.be_state == abi.CLOSED or self.fe_seen_connected):
            self.note("state", "%s: frontend re-initialising, reconnecting", self.name)
            if self.connected:
                self.disconnect()
            self.fe_seen_connected = False
            await self._set_state(abi.INITIALISING)
            return True
        if self.be_state == abi.INITIALISING:
            if await self.xs.read_int(f"{self.be}/online", 0) != 1:
                return False
            await self.init_backend()
            await self.xs.write(f"{self.be}/hotplug-status", "connected")
            await self._set_state(abi.INIT_WAIT)
            return True
        if self.be_state == abi.INIT_WAIT and fe_state in FE_READY:
            try:
                await self.connect()
            except (DeviceError, OSError, ValueError) as e:
                self.refuse(f"cannot connect: {e}", "connect")
                self.disconnect()
                return False
            self.connected = True
            self.last_refusal = ""
            await self._set_state(abi.CONNECTED)
            return True
        if self.be_state == abi.CONNECTED and fe_state == abi.CONNECTED:
            self.fe_seen_connected = True
            await self.frontend_connected()
        return False

    # ---- shared helpers for subclasses -------------------------------------
    async def read_fe_int(self, key: str, lo: int, hi: int) -> int:
        value = await self.xs.read_int(f"{self.fe}/{key}", None)
        if value is None or not lo <= value <= hi:
            raise DeviceError(f"frontend key {key} missing or out of range")
        return value

    def map_shared_page(self, frame: int) -> None:
        self.page_map = self.ctx.foreignmem.map(self.domid, [frame], writable=True)
        self.page = self.page_map.array[:abi.PAGE_SIZE]

    def bind_port(self, remote_port: int) -> None:
        self.port = self.ctx.ports.bind(self.domid, remote_port, self.on_event)

    def notify(self) -> None:
        if self.port is not None:
            self.ctx.ports.notify(self.port)

    def push_in_event(self, in_ring: ring.Ring, event: bytes) -> bool:
        """Producer side of an in ring: False (event dropped) when full."""
        if self.page is None or not ring.produce(self.page, in_ring, event):
            return False
        self.notify()
        return True

    def disconnect(self) -> None:
        self.connected = False
        self.fe_seen_connected = False
        if self.port is not None:
            self.ctx.ports.unbind(self.port)
            self.port = None
        self.page = None
        if self.page_map is not None:
            self.page_map.close()
            self.page_map = None

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            self._task = None
        self.disconnect()

    # ---- hooks ------------------------------------------------------------
    async def init_backend(self) -> None:
        for key, value in abi.BACKEND_FEATURES[self.devtype].items():
            await self.xs.write(f"{self.be}/{key}", value)

    async def connect(self) -> None: ...
    async def frontend_connected(self) -> None: ...
    def on_event(self) -> None: ...


# --------------------------------------------------------------------------
# vfb
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    width: int
    height: int
    stride: int
    depth: int
    offset: int


def check_geometry(fb_len: int, width: int, height: int, stride: int, depth: int,
                   offset: int) -> Geometry:
    """QEMU's xenfb_configure_fb rules (pvfb.md section 6), on Python ints."""
    if depth not in GUEST_FORMATS:
        raise DeviceError(f"depth {depth} not one of 8, 16, 24, 32")
    if not 0 < stride <= fb_len:
        raise DeviceError(f"line length {stride} outside 1..{fb_len}")
    max_width = stride // (depth // 8)
    if width < 0 or width > max_width:
        width = max_width
    if not 0 <= offset < fb_len:
        raise DeviceError(f"offset {offset} outside 0..{fb_len - 1}")
    max_height = (fb_len - offset) // stride
    if height < 0 or height > max_height:
        height = max_height
    if width == 0 or height == 0:
        raise DeviceError(f"empty framebuffer {width}x{height}")
    return Geometry(width, height, stride, depth, offset)


@dataclass(frozen=True)
class FramebufferPlan:
    """What a checked frontend description asks us to map."""
    abi: abi.GuestAbi
    geometry: Geometry
    fb_len: int
    n_pages: int
    directory: tuple[int, ...]     # frame numbers of the page-directory pages


def plan_framebuffer(header: bytes, protocol: str | None, videoram_mb: int) -> FramebufferPlan:
    """Check a private copy of the shared page's first 1024 bytes (pvfb.md section 6)."""
    guest_abi = abi.abi_for_protocol(protocol, header)
    (_, _, _, _, width, height, line_length, mem_length, depth) = abi.FB_HEADER.unpack_from(header)
    fb_len_max = guest_abi.max_fb_len()
    fb_len_lim = min(videoram_mb * (1 << 20), fb_len_max) if videoram_mb > 0 else fb_len_max
    fb_len = min(mem_length, fb_len_lim)
    if fb_len <= 0:
        raise DeviceError(f"mem_length {mem_length} is empty")
    geometry = check_geometry(fb_len, width, height, line_length, depth, 0)
    n_pages = (fb_len + abi.PAGE_SIZE - 1) // abi.PAGE_SIZE
    n_dirs = (n_pages + guest_abi.entries_per_page - 1) // guest_abi.entries_per_page
    dtype = "<u4" if guest_abi.entry_size == 4 else "<u8"
    pd = np.frombuffer(header, dtype, count=n_dirs, offset=guest_abi.pd_offset)
    return FramebufferPlan(guest_abi, geometry, fb_len, n_pages, tuple(int(f) for f in pd))


def read_page_directory(foreignmem, domid: int, plan: FramebufferPlan) -> list[int]:
    """The framebuffer's frame numbers, copied out of the guest's directory pages."""
    dtype = "<u4" if plan.abi.entry_size == 4 else "<u8"
    dir_map = foreignmem.map(domid, list(plan.directory), writable=False)
    try:
        return [int(f) for f in np.frombuffer(dir_map.array, dtype, count=plan.n_pages)]
    finally:
        dir_map.close()


class FramebufferBackend(BackendDevice):
    """The vfb backend: maps the guest's framebuffer through the shared
    page's page directory (checked against the guest's ABI and videoram),
    publishes it to the console as a surface, and turns the out ring's
    UPDATE and RESIZE events into console invalidations and new surfaces."""

    devtype = "vfb"

    def __init__(self, ctx: BackendContext, domid: int, devid: int = 0):
        super().__init__(ctx, domid, devid)
        self.fb_map = None
        self.fb_len = 0
        self.geometry: Geometry | None = None
        self.feature_update = False
        self.abi: abi.GuestAbi | None = None
        self.visible = False
        self.rewrote_connected = False
        self._legacy_timer: asyncio.TimerHandle | None = None
        self.updates = 0          # UPDATE events accepted (tests, stats)
        self.resizes = 0
        self.holds = 0            # times the out ring waited for a busy display (HOLD_MAX_S)
        self._hold_timer: asyncio.TimerHandle | None = None


    async def connect(self) -> None:
        page_ref = await self.read_fe_int("page-ref", 0, 2**64 - 1)
        remote_port = await self.read_fe_int("event-channel", 1, 2**32 - 1)
        protocol = await self.xs.read_str(f"{self.fe}/protocol")
        self.feature_update = await self.xs.read_int(f"{self.fe}/feature-update", 0) == 1
        videoram_mb = await self.xs.read_int(f"{self.be}/videoram", 0) or 0

        self.map_shared_page(page_ref)
        # One private copy of everything before the rings: the header and pd[].
        plan = plan_framebuffer(bytes(self.page[:abi.FB_IN_RING_OFFS]), protocol, videoram_mb)
        frames = read_page_directory(self.ctx.foreignmem, self.domid, plan)
        self.fb_map = self.ctx.foreignmem.map(self.domid, frames, writable=False)
        self.fb_len, self.abi, self.geometry = plan.fb_len, plan.abi, plan.geometry
        self.bind_port(remote_port)
        if self.feature_update:
            await self.xs.write(f"{self.be}/request-update", "1")
        self.rewrote_connected = False
        self._publish()
        g = plan.geometry
        self.note("connect", "%s: connected %dx%d depth %d stride %d, %d pages (%s)", self.name,
                  g.width, g.height, g.depth, g.stride, plan.n_pages, plan.abi.name)
        self.displays_visible(bool(self.ctx.console.listeners))

    async def frontend_connected(self) -> None:
        # A fast backend can go InitWait->Connected before Linux saw InitWait;
        # Linux then skips reading request-update.  Writing Connected once
        # more fires its watch again (as QEMU does).
        if not self.rewrote_connected:
            self.rewrote_connected = True
            await self._set_state(abi.CONNECTED)

    def _publish(self) -> None:
        g = self.geometry
        view = self.fb_map.array[g.offset:g.offset + g.height * g.stride].reshape(g.height, g.stride)
        self.ctx.console.framebuffer = self
        self.ctx.console.set_surface(Surface(g.width, g.height, g.stride, GUEST_FORMATS[g.depth], view))

    def on_event(self) -> bool:
        """The out ring's port fired: take its events, or (True) hold them
        in the ring, port masked, while every display is busy (HOLD_MAX_S)."""
        if self.page is None:
            return False
        if self._hold_timer is not None:
            return True                     # already held (an unmask raced the hold)
        console = self.ctx.console
        if console.busy():
            self.holds += 1
            console.hold_until_ready(self._release)
            self._hold_timer = asyncio.get_running_loop().call_later(HOLD_MAX_S, self._release)
            return True
        self._take_events()
        return False

    def _release(self) -> None:
        """A display could show a change (or HOLD_MAX_S passed): take the held events."""
        if self._hold_timer is None:
            return
        self._hold_timer.cancel()
        self._hold_timer = None
        self.ctx.console.cancel_hold(self._release)
        port = self.port
        try:
            if self.page is not None:
                self._take_events()
        except Exception:           # as PortDispatcher: a bug here must not leave the port masked
            log.exception("%s: taking the held out-ring events failed", self.name)
        if port is not None and port == self.port:
            self.ctx.ports.release(port)

    def _take_events(self) -> None:
        try:
            ring.consume(self.page, ring.FB_OUT, self._handle_out_event)
        except ring.RingIndexError as e:
            self.refuse(f"out ring indexes prod={e.prod} cons={e.cons} are inconsistent; batch ignored",
                        "out-ring-indexes")
            return
        self.notify()            # the frontend flushes anything it stashed
        if not self.feature_update:
            self.ctx.console.invalidate(0, 0, self.geometry.width, self.geometry.height)

    def _handle_out_event(self, event: bytes) -> None:
        kind = event[0]
        if kind == abi.XENFB_TYPE_UPDATE:
            _, x, y, w, h = abi.FB_UPDATE.unpack_from(event)
            rect = clip(x, y, w, h, self.geometry.width, self.geometry.height)
            if rect is None:          # nothing of it on the framebuffer
                return
            self.updates += 1
            self.ctx.console.invalidate(*rect)
        elif kind == abi.XENFB_TYPE_RESIZE:
            _, width, height, stride, depth, offset = abi.FB_RESIZE.unpack_from(event)
            try:
                geometry = check_geometry(self.fb_len, width, height, stride, depth, offset)
            except DeviceError as e:
                self.refuse(f"resize refused: {e}", "resize")
                return
            self.geometry = geometry
            self.resizes += 1
            self.note("resize", "%s: resized to %dx%d depth %d", self.name, geometry.width,
                      geometry.height, geometry.depth)
            self._publish()
        # Unknown types are ignored, as the protocol says.

    def displays_visible(self, visible: bool) -> None:
        """No display watching: tell the guest it need not send updates (XENFB_NO_REFRESH)."""
        self.visible = visible
        self._arm_legacy_refresh()
        if self.page is None or not self.feature_update:
            return
        period = REFRESH_PERIOD_MS if visible else abi.XENFB_NO_REFRESH
        event = abi.pack_event(abi.FB_REFRESH, abi.XENFB_TYPE_REFRESH_PERIOD, period)
        self.push_in_event(ring.FB_IN, event)

    def _arm_legacy_refresh(self) -> None:
        """A frontend without feature-update sends no UPDATE events: rescan while watched."""
        if self._legacy_timer is not None:
            self._legacy_timer.cancel()
            self._legacy_timer = None
        if self.feature_update or not self.visible or self.fb_map is None:
            return

        def tick():
            self._legacy_timer = None
            if self.fb_map is not None:
                self.ctx.console.invalidate(0, 0, self.geometry.width, self.geometry.height)
                self._arm_legacy_refresh()
        self._legacy_timer = asyncio.get_running_loop().call_later(LEGACY_REFRESH_S, tick)

    def disconnect(self) -> None:
        if self._legacy_timer is not None:
            self._legacy_timer.cancel()
            self._legacy_timer = None
        if self._hold_timer is not None:        # its port goes with the connection
            self._hold_timer.cancel()
            self._hold_timer = None
            self.ctx.console.cancel_hold(self._release)
        if self.fb_map is not None:
            console = self.ctx.console
            # Keep showing the last picture from private memory, then unmap.
            console.set_surface(console.surface.snapshot())
            self.fb_map.close()
            self.fb_map = None
        self.geometry = None
        super().disconnect()


# --------------------------------------------------------------------------
# vkbd
# --------------------------------------------------------------------------
class KeyboardBackend(BackendDevice):
    """The vkbd backend: the console's input sink.  Key codes and pointer
    events from the displays become in-ring events, absolute (scaled to the
    range the guest declared) or relative, whichever the guest requested."""

    devtype = "vkbd"
    DEFAULT_RANGE = (800, 600)   # Linux kbdfront's ptr_size default (XENFB_WIDTH x HEIGHT)

    def __init__(self, ctx: BackendContext, domid: int, devid: int = 0):
        super().__init__(ctx, domid, devid)
        self.absolute = False
        self.raw = False
        self.range = self.DEFAULT_RANGE
        self.last_abs = (0, 0)
        self.dropped = 0


    async def connect(self) -> None:
        page_ref = await self.read_fe_int("page-ref", 0, 2**64 - 1)
        remote_port = await self.read_fe_int("event-channel", 1, 2**32 - 1)
        w = await self.xs.read_int(f"{self.be}/width", None)
        h = await self.xs.read_int(f"{self.be}/height", None)
        self.range = (w, h) if w and h and 0 < w <= 65535 and 0 < h <= 65535 else self.DEFAULT_RANGE
        self.map_shared_page(page_ref)
        self.bind_port(remote_port)
        self.ctx.console.input = self
        self.note("connect", "%s: connected", self.name)

    async def frontend_connected(self) -> None:
        absolute = await self.xs.read_int(f"{self.fe}/request-abs-pointer", 0) == 1
        self.raw = await self.xs.read_int(f"{self.fe}/request-raw-pointer", 0) == 1
        if absolute != self.absolute or self.ctx.console.absolute_pointer != absolute:
            self.absolute = absolute
            self.ctx.console.set_pointer_mode(absolute)

    def on_event(self) -> None:
        if self.page is not None:
            # No frontend->backend events are defined: consume whatever is there.
            ring.discard(self.page, ring.KBD_OUT)

    def _send(self, event: bytes) -> None:
        if not self.push_in_event(ring.KBD_IN, event):
            self.dropped += 1
            if self.page is not None:
                self.refuse("input ring full: guest is not consuming, events dropped", "in-ring-full")

    # ---- InputSink (called by displays through the console) -----------------
    def key(self, code: int, down: bool) -> None:
        if not 0 < code <= KEY_MAX:
            return
        self._send(abi.pack_event(abi.KBD_KEY, abi.XENKBD_TYPE_KEY, 1 if down else 0, code))

    def _scale(self, x: int, y: int, sw: int, sh: int) -> tuple[int, int]:
        if self.raw:
            return (x * abi.XENKBD_ABS_MAX // max(1, sw - 1), y * abi.XENKBD_ABS_MAX // max(1, sh - 1))
        # Linux's abs range is [0, W] x [0, H] (BE width/height, else 800x600);
        # map surface pixels onto it (the identity for an 800x600 framebuffer,
        # which is what QEMU sends).
        rw, rh = self.range
        return ((x * rw + sw // 2) // max(1, sw), (y * rh + sh // 2) // max(1, sh))

    def pointer_abs(self, x: int, y: int, surface_w: int, surface_h: int) -> None:
        ax, ay = self._scale(x, y, surface_w, surface_h)
        if self.absolute:
            self.last_abs = (ax, ay)
            self._send(abi.pack_event(abi.KBD_POS, abi.XENKBD_TYPE_POS, ax, ay, 0))
        else:
            lx, ly = self.last_abs
            self.last_abs = (ax, ay)
            self.pointer_rel(ax - lx, ay - ly)

    def pointer_rel(self, dx: int, dy: int) -> None:
        self._send(abi.pack_event(abi.KBD_MOTION, abi.XENKBD_TYPE_MOTION, dx, dy, 0))

    def wheel(self, dz: int) -> None:
        if self.absolute:
            ax, ay = self.last_abs
            self._send(abi.pack_event(abi.KBD_POS, abi.XENKBD_TYPE_POS, ax, ay, dz))
        else:
            self._send(abi.pack_event(abi.KBD_MOTION, abi.XENKBD_TYPE_MOTION, 0, 0, dz))

    def disconnect(self) -> None:
        if self.ctx.console.input is self:
            self.ctx.console.input = None
        super().disconnect()


async def start_backends(ctx: BackendContext, domid: int) -> list[BackendDevice]:
    """The devices of the xenpv machine for one domain."""
    devices = [FramebufferBackend(ctx, domid), KeyboardBackend(ctx, domid)]
    for dev in devices:
        await dev.start()
    return devices
