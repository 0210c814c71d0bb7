"""The device model's options as parsed from argv: what cli.py produces and
the machine, the QMP monitor and dm_restrict read.

A module of its own so that qmp.py (which reports COMMAND_LINE_OPTIONS and
listens on ChardevSocket) need not import the command line parser, which
imports the machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..rfb.listener import VNC_BASE_PORT

if TYPE_CHECKING:
    from ..rfb.tls import TlsCredentials     # loads ssl: a zygote stand-in must not pay for it

# What `query-command-line-options` reports (QMP): the QemuOpts-style
# options we understand and their parameters.  libxl only looks for
# `run-with`, which QEMU 7.2 (the version we answer as) lacks: libxl then
# passes -chroot, which we accept as well as -run-with.
COMMAND_LINE_OPTIONS: list[dict] = [
    {"option": "machine", "parameters": [
        {"name": "type", "type": "string"}, {"name": "accel", "type": "string"}]},
    {"option": "memory", "parameters": [{"name": "size", "type": "size"}]},
    {"option": "name", "parameters": [{"name": "guest", "type": "string"}]},
    {"option": "vnc", "parameters": [
        {"name": "to", "type": "number"},
        {"name": "password", "type": "boolean"},
        {"name": "websocket", "type": "string"},
        {"name": "websocket-origin", "type": "string"},
        {"name": "tls-creds", "type": "string"}]},
    {"option": "chardev", "parameters": [
        {"name": "backend", "type": "string"}, {"name": "id", "type": "string"},
        {"name": "path", "type": "string"}, {"name": "fd", "type": "string"},
        {"name": "server", "type": "boolean"}, {"name": "wait", "type": "boolean"}]},
    {"option": "mon", "parameters": [
        {"name": "chardev", "type": "string"}, {"name": "mode", "type": "string"},
        {"name": "pretty", "type": "boolean"}]},
]



@dataclass
class VncOptions:
    host: str                # listen address; "" or no host means 127.0.0.1
    display: int
    to_display: int | None   # search upward up to this display (to=, -vncunused)
    password: bool           # password=on: a password is required (set later)
    websocket: int | None    # websocket port (websocket=on -> 5700 + display)
    lossy: bool = False      # lossy=on: JPEG for clients that ask for a quality level
    tls: TlsCredentials | None = None   # VeNCrypt (and wss://) with these credentials
    tls_creds_id: str | None = None     # tls-creds=ID, resolved against -object at the end
    # websocket-origin=URL (repeatable): the browser pages, normalised
    # scheme://host[:port], that may use the WebSocket; none by default.
    websocket_origins: list[str] = field(default_factory=list)
    websocket_on: bool = False          # websocket=on: the port follows the display bound (5700+D)

    @property
    def port(self) -> int:
        return VNC_BASE_PORT + self.display


@dataclass
class ChardevSocket:
    id: str
    path: str | None
    fd: int | None
    server: bool
    wait: bool


@dataclass
class RunAs:
    """-runas / -run-with user=: resolved when parsed, as QEMU does (no
    /etc/passwd inside a chroot)."""
    spec: str
    uid: int
    gid: int


@dataclass
class RestrictOptions:
    """libxl's dm_restrict: applied once every handle is open (restrict.py)."""
    domid_restrict: bool = False         # -xen-domid-restrict
    chroot: str | None = None            # -chroot DIR, -run-with chroot=DIR
    user: RunAs | None = None            # -runas USER, -run-with user=USER

    @property
    def active(self) -> bool:
        return self.domid_restrict or self.chroot is not None or self.user is not None


@dataclass
class Options:
    machine: str = "xenpv"               # 'xenpv' or 'none' (libxl's probe)
    domid: int | None = None
    name: str | None = None
    vnc: VncOptions | None = None        # None = no VNC
    sdl: bool = False
    keymap: str | None = None
    monitors: list[ChardevSocket] = field(default_factory=list)
    start_paused: bool = False           # -S
    vncviewer: bool = False
    memory_mb: int | None = None
    restrict: RestrictOptions = field(default_factory=RestrictOptions)
    ignored: list[str] = field(default_factory=list)
