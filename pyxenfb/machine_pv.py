"""The `xenpv` machine: platform -> backends -> console -> displays, one loop.

Started by xend (`-M xenpv -d N ...`) or libxl (`-xen-domid N ... -machine
xenpv`): see cli.py.  It writes /local/domain/0/device-model/N/state =
running once the displays are up (after `cont` under -S), exits 0 when its
domain is gone (@releaseDomain) or on SIGTERM/SIGINT/SIGHUP, and relies on
nothing at exit: libxl's `xl destroy` sends SIGKILL, so start-up removes
whatever a killed predecessor left (stale QMP sockets, backend states).
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from dataclasses import dataclass

from .machine.qmp import QmpError

log = logging.getLogger("pyxenfb.machine")

VNC_PASSWORD_MAX = 63   # qemu-dm copied at most 63 bytes from /vm/<uuid>/vncpasswd


class MachineError(Exception):
    """A start-up failure with one readable line for the user."""


class XenPvMachine:
    """One device model process for one domain: XenStore, QMP, the vfb and
    vkbd backends, the console and its displays, in one asyncio loop.

    `run()` starts them in libxl's order (QMP, VNC port, `running`, then the
    display stack and the backends), applies dm_restrict once every handle is
    open, and exits when the domain is released, on a signal, or when the
    XenStore connection is lost.  QMP commands arrive as the `qmp_*` methods.
    """

    def __init__(self, options, platform):
        self.opts = options
        self.platform = platform
        self.domid = options.domid
        self.status = "prelaunch" if options.start_paused else "running"
        self.stop_event = asyncio.Event()
        self.exit_code = 0
        self.console = None
        self.xs = None
        self.ports = None
        self.devices = []
        self.vnc = None
        self.sdl = None
        self.qmp = None
        self.vnc_password: str | None = None
        self.vnc_password_expired = False
        self.vnc_listeners = None           # bound early, served once VncDisplay exists
        self.evtchn = None                  # the hypervisor handles, opened before dm_restrict
        self.foreignmem = None

    # ---- start-up -----------------------------------------------------------
    async def start(self) -> None:
        from .console.keymap import Keymap, UnknownKeymap
        try:
            self.keymap = Keymap.load(self.opts.keymap or "en-us")
        except UnknownKeymap as e:
            raise MachineError(str(e)) from None
        try:
            self.xs = await self.platform.open_xenstore()
        except OSError as e:
            raise MachineError(f"cannot connect to XenStore: {e}") from None
        await self._start_qmp()
        if self.opts.machine == "none":       # libxl's capability probe: QMP only
            return
        name = self.opts.name or await self.xs.read_str(f"/local/domain/{self.domid}/name") or ""
        await self._bind_vnc()
        await self.xs.watch("@releaseDomain", "release", self._domain_maybe_gone)
        # libxl gives a device model 60 s (fixed) to write `running`, and
        # numpy plus the encoders take seconds to import in an emulated or
        # busy dom0.  So, VNC-only: announce once QMP answers and the VNC port
        # is bound (clients queue in its backlog), and import the rest in a
        # thread while the loop keeps answering QMP (libxl allows a QMP command
        # 10 s).  With SDL, announce once the window is open.  (This design was
        # reverted once after DMs crashed in the lab: that was the lab losing
        # vector registers as soon as the unpaused domU ran; docs/real-xen.md.)
        for devtype in ("vfb", "vkbd"):     # what QEMU registers; libxl may look here
            await self.xs.mkdir(f"/local/domain/0/device-model/{self.domid}/backends/{devtype}")
        await self._advertise_backend_features()
        early = self.status == "running" and not self.opts.sdl
        if early:
            await self._announce_running()
        restrict = self.opts.restrict
        preload = None
        if restrict.chroot is not None or restrict.user is not None:
            vnc_opts = self.opts.vnc
            preload = Preload(tls=vnc_opts is not None and vnc_opts.tls is not None,
                              websocket=vnc_opts is not None and vnc_opts.websocket is not None)
        try:
            if _display_stack_loaded():
                # A zygote child: the common part is there already (TLS or a
                # WebSocket port: loaded here).  No thread started for
                # nothing (it would stay, idle, with its stack and state).
                _import_display_stack(preload)
            else:
                # Under a chroot or another user the installed files may be out of reach later.
                await asyncio.get_running_loop().run_in_executor(None, _import_display_stack, preload)
        except ImportError as e:
            raise MachineError(f"cannot load the display stack: {e}") from None
        from .console.core import Console
        self.console = Console(name)
        self._open_handles()
        self._make_vnc(name)            # reads the TLS credentials: before any chroot
        if restrict.active:
            # Every handle is open and every socket listens: from here on the
            # process needs no path, no new device and no privilege.
            from .machine.restrict import RestrictError, apply
            try:
                log.info("restricted: %s", apply(restrict, self.domid, self.evtchn, self.foreignmem))
            except RestrictError as e:
                raise MachineError(str(e)) from None
        await self._start_devices()
        await self._start_displays(name)
        if self.status == "running" and not early:
            await self._announce_running()

    async def _advertise_backend_features(self) -> None:
        """Before `running` (libxl unpauses the guest then): the frontends read
        some features only when they probe, long before the backends start."""
        from .devices.xenfb_abi import BACKEND_FEATURES
        for devtype, features in BACKEND_FEATURES.items():
            be = f"/local/domain/0/backend/{devtype}/{self.domid}/0"
            if await self.xs.read(f"{be}/frontend", None) is None:
                continue                    # no such device (or not ours to touch)
            for key, value in features.items():
                await self.xs.write(f"{be}/{key}", value)

    async def _start_qmp(self) -> None:
        if not self.opts.monitors:
            return
        from .machine.qmp import QmpServer
        self.qmp = QmpServer(self)
        for chardev in self.opts.monitors:
            try:
                await self.qmp.listen(chardev)
            except OSError as e:
                raise MachineError(f"QMP socket {chardev.path or chardev.fd}: {e}") from None

    def _open_handles(self) -> None:
        try:
            self.evtchn = self.platform.open_evtchn(0)
        except OSError as e:
            raise MachineError(f"cannot open event channels: {e}") from None
        try:
            self.foreignmem = self.platform.foreign_memory()
        except OSError as e:
            raise MachineError(f"cannot open foreign memory: {e}") from None

    async def _start_devices(self) -> None:
        from .xenfb import BackendContext, PortDispatcher, start_backends
        self.ports = PortDispatcher(self.evtchn)
        ctx = BackendContext(self.xs, self.foreignmem, self.ports, self.console)
        self.devices = await start_backends(ctx, self.domid)

    async def _bind_vnc(self) -> None:
        vnc_opts = self.opts.vnc
        if vnc_opts is None:
            return
        from .rfb.listener import VncBindError, bind_vnc
        if vnc_opts.tls is not None:
            from .rfb.tls import TlsConfigError, server_context
            try:
                server_context(vnc_opts.tls)        # bad credentials: fail before `running`
            except TlsConfigError as e:
                raise MachineError(f"VNC: {e}") from None
            log.info("VNC: %s", vnc_opts.tls.describe())
        self.vnc_password = await self._take_xend_vnc_password()
        try:
            self.vnc_listeners = bind_vnc(vnc_opts.host, vnc_opts.display,
                                          to_display=vnc_opts.to_display,
                                          websocket_port=vnc_opts.websocket,
                                          websocket_follows=vnc_opts.websocket_on)
        except VncBindError as e:
            raise MachineError(str(e)) from None
        port = self.vnc_listeners.port
        log.info("VNC server on %s:%d", vnc_opts.host, port)
        # qemu-dm wrote these for xend; under libxl the toolstack writes them too.
        base = f"/local/domain/{self.domid}/console"
        await self.xs.write(f"{base}/vnc-port", str(port))
        await self.xs.write(f"{base}/vnc-listen", vnc_opts.host)

    def _make_vnc(self, name: str) -> None:
        vnc_opts = self.opts.vnc
        if vnc_opts is not None:
            from .vnc import VncDisplay
            password = self.vnc_password
            if vnc_opts.password and password is None:
                password = ""    # password=on, none set yet: nobody gets in until QMP sets one
            self.vnc = VncDisplay(self.console, keymap=self.keymap, password=password, name=name,
                                 lossy=vnc_opts.lossy, tls=vnc_opts.tls,
                                 websocket_origins=tuple(vnc_opts.websocket_origins))

    async def _start_displays(self, name: str) -> None:
        if self.vnc is not None:
            if self.vnc_password_expired:
                self.vnc.expire_password()
            await self.vnc.serve(self.vnc_listeners)
        if self.opts.sdl:
            from .sdl import SdlDisplay
            try:
                self.sdl = SdlDisplay(self.console, name=name, on_close=self._sdl_closed)
                self.sdl.start(asyncio.get_running_loop())
                log.info("SDL display open (video driver %s)", os.environ.get("SDL_VIDEODRIVER", "default"))
            except Exception as e:   # no X display, no SDL: one line, not a traceback
                raise MachineError(f"SDL display: {e}") from None

    async def _take_xend_vnc_password(self) -> str | None:
        """xend kept the password at <vm>/vncpasswd: read it once, then erase it."""
        vm = await self.xs.read_str(f"/local/domain/{self.domid}/vm")
        if not vm:
            return None
        raw = await self.xs.read(f"{vm}/vncpasswd", None)
        if raw is None:
            return None
        await self.xs.write(f"{vm}/vncpasswd", b"\0" * len(raw))   # overwritten as qemu-dm did
        password = raw.split(b"\0", 1)[0][:VNC_PASSWORD_MAX]
        return password.decode("latin-1") if password else None

    async def _announce_running(self) -> None:
        await self.xs.write(f"/local/domain/0/device-model/{self.domid}/state", "running")
        from .machine.supervisor import current, seconds_since_exec
        since_exec = seconds_since_exec(current().exec_pid())
        log.info("running" if since_exec is None else f"running ({since_exec:.2f} s after exec)")

    # ---- lifecycle ----------------------------------------------------------
    def _domain_maybe_gone(self, path: str, token: str) -> None:
        async def check():
            try:
                alive = await self.xs.is_domain_introduced(self.domid)
            except OSError:
                alive = False
            if not alive:
                log.info("domain %d is gone, exiting", self.domid)
                self.stop_event.set()
        asyncio.ensure_future(check())

    def _sdl_closed(self) -> None:
        if self.vnc is None:
            log.info("SDL window closed, exiting (no other display)")
            self.stop_event.set()
        else:
            log.info("SDL window closed; VNC display keeps running")
            self.sdl = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        from .machine.supervisor import current
        current().watch(loop, lambda: log.info("stand-in process gone (SIGKILLed?): exiting at once"))
        try:
            await self.start()
        except MachineError as e:
            print(f"pyqemu-dm: {e}", file=sys.stderr)
            await self.shutdown()
            return 1
        except OSError:
            # xenstored went away while we started: every request fails now
            if self.xs is None or not self.xs.closed.done():
                raise
            log.error("XenStore connection lost during start-up, exiting")
            await self.shutdown()
            return 1
        lost = self.xs.closed if self.xs is not None else loop.create_future()
        stop = asyncio.ensure_future(self.stop_event.wait())
        done, _ = await asyncio.wait([stop, lost], return_when=asyncio.FIRST_COMPLETED)
        if lost in done and not self.stop_event.is_set():
            log.error("XenStore connection lost, exiting")
            self.exit_code = 1
        stop.cancel()
        await self.shutdown()
        return self.exit_code

    def _on_signal(self, sig) -> None:
        log.info("%s received, shutting down", signal.Signals(sig).name)
        self.stop_event.set()

    async def shutdown(self) -> None:
        # Suppressed lines are summarised now rather than lost.
        for budget in {id(b): b for b in ([self.vnc.budget] if self.vnc else [])
                       + [d.ctx.budget for d in self.devices]}.values():
            budget.flush()
        if self.vnc is not None:
            await self.vnc.close()
            self.vnc = None
        if self.vnc_listeners is not None:
            self.vnc_listeners.close()       # if never served
        if self.sdl is not None:
            self.sdl.close()
            self.sdl = None
        for dev in self.devices:
            await dev.close()
        self.devices = []
        if self.ports is not None:
            self.ports.close()
            self.ports = None
        elif self.evtchn is not None:
            self.evtchn.close()
        self.evtchn = None
        if self.foreignmem is not None:
            self.foreignmem.close()
            self.foreignmem = None
        if self.qmp is not None:
            await self.qmp.close()
            self.qmp = None
        if self.xs is not None:
            self.xs.close()
            self.xs = None

    # ---- QMP (pyxenfb.machine.qmp.QmpMachine) ----------------------------------------
    def qmp_status(self) -> str:
        return self.status

    def qmp_cont(self) -> None:
        if self.status != "running":
            self.status = "running"
            if self.opts.machine != "none":
                asyncio.ensure_future(self._announce_running())

    def qmp_query_vnc(self) -> dict:
        if self.vnc_listeners is None:
            return {"enabled": False}
        host = self.vnc_listeners.host
        clients = self.vnc.query_clients() if self.vnc is not None else []
        return {"enabled": True, "host": host, "family": "ipv6" if ":" in host else "ipv4",
                "service": str(self.vnc_listeners.port), **self._vnc_auth(), "clients": clients}

    def _vnc_auth(self) -> dict:
        """query-vnc's auth fields, named as QEMU names them."""
        password = self.vnc_password is not None or bool(self.opts.vnc and self.opts.vnc.password)
        tls = self.opts.vnc.tls if self.opts.vnc else None
        if tls is None:
            return {"auth": "vnc" if password else "none"}
        kind = "x509" if tls.kind == "x509" else "tls"
        return {"auth": "vencrypt", "vencrypt": f"{kind}-{'vnc' if password else 'none'}"}

    def qmp_set_vnc_password(self, password: str) -> None:
        if self.vnc_listeners is None:
            raise QmpError("GenericError", "Could not set password")
        self.vnc_password, self.vnc_password_expired = password, False
        if self.vnc is not None:
            self.vnc.set_password(password)

    def qmp_expire_vnc_password(self, time: str) -> None:
        if self.vnc_listeners is None:
            raise QmpError("GenericError", "Could not set password expire time")
        if time != "never":
            self.vnc_password_expired = True
            if self.vnc is not None:
                self.vnc.expire_password()

    def qmp_screendump(self, filename: str, fmt: str) -> None:
        if self.console is None:
            raise QmpError("GenericError", "There is no console to take a screendump from")
        from .convert import to_rgb
        s = self.console.surface
        rgb = to_rgb(s.rows, s.fmt, s.width, s.height)
        try:
            if fmt == "png":
                from PIL import Image
                Image.fromarray(rgb, "RGB").save(filename, format="PNG")
            else:
                with open(filename, "wb") as f:
                    f.write(b"P6\n%d %d\n255\n" % (s.width, s.height))
                    f.write(rgb.tobytes())
        except OSError as e:
            raise QmpError("GenericError", f"failed to write {filename}: {e.strerror}") from None

    def qmp_quit(self) -> None:
        self.stop_event.set()

    def qmp_chardevs(self) -> list[dict]:
        out = []
        for c in self.opts.monitors:
            where = f"unix:{c.path}" if c.path else f"fd:{c.fd}"
            out.append({"label": c.id, "filename": f"{where},server=on", "frontend-open": True})
        return out


_DISPLAY_STACK = ("numpy", "pyxenfb.console.core", "pyxenfb.convert", "pyxenfb.vnc", "pyxenfb.xenfb")


def _display_stack_loaded() -> bool:
    return all(name in sys.modules for name in _DISPLAY_STACK)


@dataclass(frozen=True)
class Preload:
    """What restrict.preload must load besides the display stack's lazy paths."""
    tls: bool
    websocket: bool


def _import_display_stack(preload: Preload | None = None) -> None:
    """The heavy modules (numpy, the backends, the VNC encoders), loaded in a
    worker thread so that the event loop keeps serving QMP meanwhile; before
    a chroot or a user switch, also every lazy path (restrict.preload)."""
    for name in _DISPLAY_STACK:
        importlib.import_module(name)
    if preload is not None:
        from .machine import restrict
        restrict.preload(tls=preload.tls, websocket=preload.websocket)


def run(options) -> int:
    """Entry point from cli.main: one readable line and a non-zero code on failure."""
    from .platform.host import PlatformUnavailable, detect
    try:
        platform = detect()
    except PlatformUnavailable as e:
        print(f"pyqemu-dm: {e}", file=sys.stderr)
        return 1
    if options.machine != "none" and options.domid is None:
        print("pyqemu-dm: no domain given (-d N or -xen-domid N)", file=sys.stderr)
        return 2

    async def main() -> int:
        return await XenPvMachine(options, platform).run()
    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0
