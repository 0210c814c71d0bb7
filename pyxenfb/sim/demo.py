"""`pyxenfb-sim demo`: the whole thing on one machine, no Xen.

Starts a simulated host, creates a domain whose reference guest animates
and draws the input it receives (--echo-input), launches `pyqemu-dm` exactly
as libxl would (through `create`), starts the web console
(`pyxenfb-console`), prints where to point a browser or a VNC viewer, and
tears everything down on Ctrl-C / SIGTERM (or after --seconds, for scripted
runs).

A browser reaches the guest through the web console (its own relay, with
its own origin check and login off loopback), never through a WebSocket on
pyqemu-dm's VNC port: that port speaks RFB only.
"""
from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from . import toolstack
from ..rfb.listener import VNC_BASE_PORT

HOST_READY_TIMEOUT = 15.0
DOMID = 1
CONSOLE_READY_TIMEOUT = 30.0


def _parse_vnc(spec: str) -> tuple[str, int]:
    host, _, display = spec.rpartition(":")
    if not display.isdigit() or int(display) > 99:
        raise toolstack.ToolstackError(f"--vnc {spec!r}: expected [HOST]:DISPLAY, e.g. :1")
    return host or "127.0.0.1", int(display)


def _start_host(run_dir: str) -> subprocess.Popen:
    host = subprocess.Popen([sys.executable, "-m", "pyxenfb.sim.cli", "host", "--run-dir", run_dir],
                            stdout=subprocess.PIPE, stderr=sys.stderr, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + HOST_READY_TIMEOUT
    os.set_blocking(host.stdout.fileno(), True)
    line = host.stdout.readline()          # the host prints exactly one ready line
    if not line or time.monotonic() > deadline:
        host.kill()
        raise toolstack.ToolstackError("the simulated host did not start")
    return host


def _start_console(run_dir: str, port: int) -> tuple[subprocess.Popen | None, str | None]:
    """pyxenfb-console on the sim; returns (process, URL).  A taken port: any free one."""
    for try_port in (port, 0) if port else (0,):
        proc = subprocess.Popen([sys.executable, "-m", "pyxenfb.hostconsole.cli", "--sim", run_dir,
                                 "--port", str(try_port)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        ready, _, _ = select.select([proc.stdout], [], [], CONSOLE_READY_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if "serving " in line:
            return proc, line.split("serving ", 1)[1].split()[0]
        proc.kill()
        proc.wait()
    return None, None


def _open_viewer(host: str, port: int) -> subprocess.Popen | None:
    for viewer in ("vncviewer", "gvncviewer"):
        path = shutil.which(viewer)
        if path:
            target = f"{host}::{port}" if viewer == "vncviewer" else f"{host}:{port - VNC_BASE_PORT}"
            print(f"pyxenfb-sim demo: starting {viewer} {target}", flush=True)
            return subprocess.Popen([path, target], start_new_session=True)
    print("pyxenfb-sim demo: no VNC viewer installed (try: apt install tigervnc-viewer)", flush=True)
    return None


def run_demo(vnc: str | None, sdl: bool, open_viewer: bool, seconds: float | None,
             run_dir: str | None, console_port: int = 8080) -> int:
    own_dir = run_dir is None
    if own_dir:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        run_dir = tempfile.mkdtemp(prefix="pyxenfb-demo-", dir=base)
    vnc_host, display = _parse_vnc(vnc or ":1")
    vfb = f"vnc=1,vncdisplay={display},vnclisten={vnc_host},vncunused=1,sdl={1 if sdl else 0}"
    host = _start_host(run_dir)
    viewer = console = None
    try:
        result = asyncio.run(toolstack.create_domain(run_dir, DOMID, "demo", memory=32, vfb=vfb,
                                                     animate=True, echo_input=True))
        port = result.vnc_port
        print(f"pyxenfb-sim demo: simulated host in {run_dir}", flush=True)
        print(f"pyxenfb-sim demo: guest 'demo' (domain {DOMID}) is animating; "
              f"pyqemu-dm serves it on VNC {result.vnc_host}:{port} "
              f"(display :{port - VNC_BASE_PORT})", flush=True)
        print(f"pyxenfb-sim demo:   vncviewer {result.vnc_host}::{port}", flush=True)
        if console_port >= 0:
            console, url = _start_console(run_dir, console_port)
            if url:
                print(f"pyxenfb-sim demo:   web console: {url} (for a browser; the guest's "
                      f"page is {url.rstrip('/')}/domain/{DOMID}/ - type into it: the guest "
                      f"draws what it receives)", flush=True)
            else:
                print("pyxenfb-sim demo:   web console did not start (browsers reach a guest "
                      "only through it; use a VNC viewer)", flush=True)
        print(f"pyxenfb-sim demo:   input it receives: pyxenfb-sim input-log --run-dir {run_dir} "
              f"--domid {DOMID} --follow", flush=True)
        if open_viewer:
            viewer = _open_viewer(result.vnc_host, port)
        # Caught before the line that invites them: a Ctrl-C right after it
        # is a clean stop, not a KeyboardInterrupt.
        with StopSignals() as stop:
            print("pyxenfb-sim demo: running; Ctrl-C to stop", flush=True)
            stop.wait(seconds)
        return 0
    finally:
        print("pyxenfb-sim demo: stopping", flush=True)
        for child in (viewer, console):
            if child is not None:
                child.terminate()
        try:
            asyncio.run(toolstack.destroy_domain(run_dir, DOMID))
        except Exception as e:       # already gone, or never created
            print(f"pyxenfb-sim demo: destroy: {e}", file=sys.stderr)
        host.terminate()
        try:
            host.wait(10)
        except subprocess.TimeoutExpired:
            host.kill()
        if own_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP caught while in effect, and `wait()` until
    one comes (or `seconds`).  Blocking them and sigwait()ing is not enough:
    the kernel hands a process's signal to any thread not blocking it, and
    numpy's OpenBLAS threads block nothing; Python's C handler, in whatever
    thread, writes to the wakeup socket the main thread waits on."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> "StopSignals":
        self._r, self._w = socket.socketpair()
        self._w.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._old = {s: signal.signal(s, lambda signum, frame: None) for s in self.SIGNALS}
        return self

    def wait(self, seconds: float | None) -> None:
        select.select([self._r], [], [], seconds)

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._old_fd)
        self._r.close()
        self._w.close()
