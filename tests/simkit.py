"""Test kit: an in-process simulated host, domains, guests and backends.

Everything runs in the test's own asyncio loop, so a test can drive the
reference guest's hostile API and the backends directly.  Blocking tools
that talk to the same XenStore (fbdump) must run in a thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from pyxenfb.console.core import Console
from pyxenfb.platform.host import detect
from pyxenfb.sim.evtchn_broker import EvtchnBroker
from pyxenfb.sim.guest import ReferenceGuest
from pyxenfb.sim.toolstack import create_domain
from pyxenfb.sim.xenstored import XenStored
from pyxenfb.xenfb import BackendContext, PortDispatcher, start_backends
from pyxenfb.platform.xenstore import XenStore


HOST_START_TIMEOUT = 15.0


def short_run_dir() -> str:
    """Unix socket paths are limited to 108 bytes: keep the run dir short."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="pyxfb-", dir=base)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line, bounded.  Only for a process that prints one line at a time
    (select() can't see lines already sitting in the reader's buffer)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no line from pid {proc.pid} within {timeout} s")
    return proc.stdout.readline()


# PYXENFB_TEST_ZYGOTE=1: every host runs a zygote and the sim's `create`
# goes through it, to run the machine and display tests the other way.
THROUGH_ZYGOTE = os.environ.get("PYXENFB_TEST_ZYGOTE") == "1"


def start_host(run_dir: str, zygote: bool = THROUGH_ZYGOTE) -> subprocess.Popen:
    """`pyxenfb-sim host [--zygote]` as a process; returns once it printed its
    ready line (a zygote first loads numpy & co.: 4x the time)."""
    extra = ["--zygote"] if zygote else []
    proc = subprocess.Popen([sys.executable, "-m", "pyxenfb.sim.cli", "host", "--run-dir", run_dir,
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = read_line(proc, HOST_START_TIMEOUT * (4 if zygote else 1))
    assert line == (f"pyxenfb-sim: host ready, run dir {run_dir} "
                    f"(export PYXENFB_SIM={run_dir})\n"), (line, proc.stderr)
    return proc


def stop_host(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class HostThread:
    """XenStored + the event-channel broker on their own loop in a thread.

    The simulated event-channel handle makes synchronous requests (as the
    real ioctls are), so the broker must not share the caller's loop.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim-host", daemon=True)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self):
        self.thread.start()
        self.xsd = XenStored(self.run_dir)
        self.broker = EvtchnBroker(os.path.join(self.run_dir, "evtchn.sock"))
        self._call(self.xsd.start())
        self._call(self.broker.start())

    def stop(self):
        self._call(self.broker.close())
        self._call(self.xsd.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.asynccontextmanager
async def sim_host(run_dir: str | None = None):
    run_dir = run_dir or short_run_dir()
    host = HostThread(run_dir)
    await asyncio.to_thread(host.start)
    try:
        yield run_dir
    finally:
        await asyncio.to_thread(host.stop)
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class Backends:
    console: Console
    ctx: BackendContext
    devices: list
    events: list = field(default_factory=list)

    @property
    def fb(self):
        return self.devices[0]

    @property
    def kbd(self):
        return self.devices[1]

    async def close(self):
        for d in self.devices:
            await d.close()
        self.ctx.ports.close()
        self.ctx.xs.close()


async def start_backend_stack(run_dir: str, domid: int, console: Console | None = None) -> Backends:
    platform = detect({"PYXENFB_SIM": run_dir})
    xs = await platform.open_xenstore()
    console = console or Console(f"dom{domid}")
    ctx = BackendContext(xs, platform.foreign_memory(), PortDispatcher(platform.open_evtchn(0)),
                         console)
    devices = await start_backends(ctx, domid)
    return Backends(console, ctx, devices)


async def new_domain(run_dir: str, domid: int, **guest_kw) -> ReferenceGuest:
    """A domain written as xl would, its guest not booted yet (no DM).

    Boot it (`await guest.start()`) after the backends are up, as libxl
    unpauses a domain only once its device model runs: Linux reads the
    backend's feature-* keys at probe time.
    """
    await create_domain(run_dir, domid, f"guest{domid}", memory=16, vfb="vnc=1,vncdisplay=0",
                        dm=None, start_guest=False)
    return ReferenceGuest(run_dir, domid, **guest_kw)


def vnc_screenshot(port: int, password: str | None = None, timeout: float = 10.0) -> np.ndarray:
    """The picture vncdotool (a real client) gets from 127.0.0.1:port, as RGB."""
    from vncdotool import api
    client = api.connect(f"127.0.0.1::{port}", password=password, timeout=timeout)
    try:
        return np.asarray(client.refreshScreen().screen.convert("RGB"))
    finally:
        client.disconnect()


OPENSSL_FILES = ("libssl.so", "libcrypto.so", "/_ssl.", "/_hashlib.")


def openssl_mapped(pid: int) -> list[str]:
    """OpenSSL's libraries (and Python's modules for it) in a process's maps."""
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split()[-1] for line in f
                       if any(name in line for name in OPENSSL_FILES)})


def wait_until(predicate, timeout: float = 5.0, what="condition"):
    """Poll predicate() from a plain thread until true; bounded.  `what` may be
    a callable, evaluated only for the failure message."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for "
                                 f"{what() if callable(what) else what}")
        time.sleep(0.02)


async def wait_for(predicate, timeout: float = 5.0, what="condition"):
    """Wait until predicate() is true, letting the loop run; bounded.  `what`
    may be a callable, evaluated only for the failure message."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.005)


async def wait_node(xs, path: str, want, pids: tuple[int, ...] = (), timeout: float = 20.0) -> str:
    """Wait until XenStore node `path` satisfies want(value), woken by a watch
    (no polling); bounded; fails at once if one of `pids` (a guest, a device
    model) dies meanwhile or the XenStore connection is lost."""
    from pyxenfb.sim.dmprocess import process_exited
    changed = asyncio.Event()
    token = f"wait-node-{id(changed)}"
    deaths = [process_exited(pid) for pid in pids]
    for death in deaths:
        death.add_done_callback(lambda _f: changed.set())
    await xs.watch(path, token, lambda _p, _t: changed.set())
    try:
        async def watch_until_wanted():
            while True:
                changed.clear()
                value = await xs.read_str(path)
                if value is not None and want(value):
                    return value
                dead = [pid for pid, d in zip(pids, deaths) if d.done()]
                assert not dead, f"pid {dead} died while waiting for {path} (value {value!r})"
                await xs.until(changed.wait())
        try:
            return await asyncio.wait_for(watch_until_wanted(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {path} "
                                 f"(value {await xs.read_str(path)!r})") from None
    finally:
        for death in deaths:
            death.cancel()
        if not xs.closed.done():
            await xs.unwatch(path, token)


async def wait_connected(guest: ReferenceGuest, be: Backends, timeout: float = 5.0):
    await guest.wait_connected(timeout)
    await wait_for(lambda: be.fb.connected and be.kbd.connected, timeout, "backends connected")
    await wait_for(lambda: guest.fb.update_wanted or not be.fb.feature_update, timeout,
                   "request-update seen by the guest")


def surface_words(console: Console) -> np.ndarray:
    s = console.surface
    return s.rows[:, :s.width * 4].view("<u4").reshape(s.height, s.width).copy()


class RecordingListener:
    def __init__(self):
        self.updates: list[tuple[int, int, int, int]] = []
        self.batches: list[list[tuple[int, int, int, int]]] = []
        self.leds: list[int] = []
        self.resizes: list[tuple[int, int]] = []
        self.modes: list[bool] = []

    def console_resized(self, surface):
        self.resizes.append((surface.width, surface.height))

    def console_update(self, rects):
        self.batches.append(list(rects))
        self.updates.extend(rects)

    def console_leds(self, leds):
        self.leds.append(leds)

    def console_pointer_mode(self, absolute):
        self.modes.append(absolute)


@contextlib.asynccontextmanager
async def connected_domain(domid: int = 1, *, attach: bool = False, **guest_kw):
    """A sim host, a domain, its backends and its booted guest, all connected.

    Yields (run_dir, guest, backends, listener); with attach=True a
    RecordingListener watches the console from before the guest boots.
    """
    async with sim_host() as run_dir:
        guest = await new_domain(run_dir, domid, **guest_kw)
        be = await start_backend_stack(run_dir, domid)
        listener = RecordingListener()
        if attach:
            be.console.attach(listener)
        await guest.start()
        try:
            await wait_connected(guest, be)
            yield run_dir, guest, be, listener
        finally:
            await be.close()
            await guest.stop()


# ---- a VNC client for tests that watch a display ------------------------------

RAW, DESKTOP_SIZE = 0, -223


class RawVncClient:
    """The smallest RFB 3.8 client: None auth, Raw + DesktopSize, keeps a picture."""

    def __init__(self, name):
        self.name = name
        self.updates = 0
        self.size = (0, 0)
        self.picture = None

    async def connect(self, port, rcvbuf=None):
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        self.r, self.w = await asyncio.open_connection(sock=sock)
        assert (await self.r.readexactly(12)).startswith(b"RFB 003.")
        self.w.write(b"RFB 003.008\n")
        types = await self.r.readexactly((await self.r.readexactly(1))[0])
        assert 1 in types
        self.w.write(b"\x01")
        assert await self.r.readexactly(4) == b"\0\0\0\0"
        self.w.write(b"\x01")                                   # shared
        width, height = struct.unpack(">HH", await self.r.readexactly(4))
        await self.r.readexactly(16)
        await self.r.readexactly(struct.unpack(">I", await self.r.readexactly(4))[0])
        self._resize(width, height)
        self.w.write(struct.pack(">BxHii", 2, 2, RAW, DESKTOP_SIZE))
        self.request(incremental=False)

    def _resize(self, width, height):
        self.size = (width, height)
        self.picture = np.zeros((height, width), np.uint32)

    def request(self, incremental=True):
        w, h = self.size
        self.w.write(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, w, h))

    async def read_updates(self):
        while True:
            kind, _, n = struct.unpack(">BBH", await self.r.readexactly(4))
            assert kind == 0, kind
            resized = False
            rects = []
            for _ in range(n):
                x, y, w, h, enc = struct.unpack(">HHHHi", await self.r.readexactly(12))
                if enc == DESKTOP_SIZE:
                    self._resize(w, h)
                    resized = True
                    continue
                assert enc == RAW, enc
                rects.append((x, y, w, h))
                data = await self.r.readexactly(w * h * 4)
                self.picture[y:y + h, x:x + w] = np.frombuffer(data, "<u4").reshape(h, w) & 0xFFFFFF
            self.last_rects = rects
            self.updates += 1
            self.request(incremental=not resized)


async def wait_frontends_connected(run_dir: str, domid: int, timeout: float = 15.0) -> None:
    """Both sides of the domain's vfb and vkbd in XenBus state Connected (4)."""
    xs = await XenStore.open(os.path.join(run_dir, "xenstored.sock"))
    try:
        for dev in ("vfb", "vkbd"):
            for path in (f"/local/domain/0/backend/{dev}/{domid}/0/state",
                         f"/local/domain/{domid}/device/{dev}/0/state"):
                await wait_node(xs, path, lambda v: v == "4", timeout=timeout)
    finally:
        xs.close()


def start_demo(*args: str) -> tuple[subprocess.Popen, str]:
    """`pyxenfb-sim demo ARGS` in a session of its own; returns it and what it
    printed up to its "running" line (bounded: 60 s between lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "pyxenfb.sim.cli", "demo", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    # A thread reads stdout: the demo prints several lines at once.
    out: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [out.put(x) for x in proc.stdout], daemon=True).start()
    lines: list[str] = []
    while not lines or "running; Ctrl-C to stop" not in lines[-1]:
        try:
            lines.append(out.get(timeout=60))
        except queue.Empty:
            proc.kill()
            raise AssertionError(f"demo printed {lines} then nothing for 60 s") from None
    return proc, "".join(lines)
