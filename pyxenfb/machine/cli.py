"""Command line of `pyqemu-dm`: qemu-dm/xend style and libxl (QEMU) style.

Two generations of toolstacks start the device model:

* xend (2007) ran `qemu-dm -M xenpv -d <domid> -domain-name <name>
  -vnc <addr>:<display> [-vncunused] [-vnclisten <addr>] [-k <map>] [-sdl]`;
* libxl runs upstream QEMU with `-xen-domid <domid> ... -chardev socket,...
  -mon chardev=...,mode=control ... -vnc 127.0.0.1:0,to=99 -display none
  -machine xenpv -m <MiB>`, and beforehand a `-machine none,accel=xen` probe.

Both become one `Options` object.  Options that matter to a xenpv machine
are parsed strictly (a bad value is a `CliError`, exit code 2); options that
libxl or xend always pass and that need no action are accepted silently; any
other QEMU option is accepted and reported once in `Options.ignored`.
`--opt` is accepted for every `-opt`, as QEMU does.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

# The option types live in options.py (qmp.py reads them too); re-exported here.
from .options import (  # noqa: F401
    COMMAND_LINE_OPTIONS, ChardevSocket, Options, RestrictOptions, RunAs, VncOptions,
)
from ..rfb.listener import VNC_BASE_PORT
from ..platform.xenconst import DOMID_FIRST_RESERVED

if TYPE_CHECKING:
    from ..rfb.tls import TlsCredentials     # imported where used: it loads ssl

PROG = "pyqemu-dm"

WEBSOCKET_BASE_PORT = 5700          # QEMU's websocket=on port base
MAX_DISPLAY = 65535 - VNC_BASE_PORT
# -vncunused: qemu-dm searched upward without a bound; we try 100 displays,
# the same count libxl's `to=99` gives from display 0.
VNCUNUSED_SPAN = 99
# Xen domids at or above DOMID_FIRST_RESERVED (0x7FF0) are special ids.
MAX_DOMID = DOMID_FIRST_RESERVED - 1
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107

# upstream QEMU's `-d` log items (qemu-system -d help, 7.2 and later), which
# `-d` may carry instead of qemu-dm's domain id
QEMU_LOG_ITEMS = frozenset("""
    out_asm in_asm op op_opt op_ind op_plugin int exec cpu fpu mmu pcall
    cpu_reset unimp guest_errors page nochain plugin strace tid invalid_mem vpu
    tb_op help
""".split())

KEYMAP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")

# -run-with keys of QEMU (8.1+) that have nothing to do in a xenpv backend.
RUN_WITH_IGNORED = frozenset({"async-teardown", "exit-with-parent"})

VNC_REFUSED = frozenset({          # security features we do not implement
    "tls-authz", "sasl", "sasl-authz", "acl", "reverse",
})
VNC_IGNORED = frozenset({          # harmless tuning knobs
    "share", "non-adaptive", "key-delay-ms", "connections",
    "power-control", "audiodev", "display", "id", "lock-key-sync",
})

class CliError(Exception):
    """A bad command line; str() is one readable line."""


class EarlyExit(Exception):
    """--help / -version: print `text` to stdout and exit 0."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


# ---------------------------------------------------------------------------
# Value parsers (each raises CliError with a message naming the option)

def split_opts(text: str) -> list[str]:
    """Split a QemuOpts string on ',' where ',,' stands for a literal comma."""
    parts, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def parse_bool(option: str, key: str, value: str | None) -> bool:
    """QemuOpts booleans: a bare key means on."""
    if value is None or value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise CliError(f"{option}: '{key}' expects on or off, not '{value}'")


def parse_int(option: str, what: str, text: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]+", text or ""):
        raise CliError(f"{option}: {what} must be a number, not '{text}'")
    value = int(text)
    if not low <= value <= high:
        raise CliError(f"{option}: {what} {value} out of range {low}..{high}")
    return value


def parse_domid(option: str, text: str) -> int:
    return parse_int(option, "domain id", text, 0, MAX_DOMID)


def keyvals(parts: list[str]) -> list[tuple[str, str | None]]:
    """'key=value' pairs; a bare word has value None."""
    out = []
    for part in parts:
        key, sep, value = part.partition("=")
        out.append((key, value if sep else None))
    return out


SIZE_UNITS = {"": 1 << 20, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(text: str) -> int:
    """-m [size=]N[KMGT][,slots=..,maxmem=..] -> MiB (a bare number is MiB)."""
    parts = split_opts(text)
    size = parts[0]
    if size.startswith("size="):
        size = size[5:]
    for key, value in keyvals(parts[1:]):
        if key == "size" and value is not None:
            size = value
    m = re.fullmatch(r"([0-9]+)([bBkKmMgGtT]?)", size)
    if not m:
        raise CliError(f"-m: bad memory size '{text}'")
    mib = int(m.group(1)) * SIZE_UNITS[m.group(2).lower()] >> 20
    if mib <= 0 or mib > (1 << 30):
        raise CliError(f"-m: memory size '{text}' out of range")
    return mib


def parse_machine(text: str, ignored: list[str]) -> str:
    parts = split_opts(text)
    machine_type = parts[0]
    rest = parts[1:]
    if "=" in machine_type:             # -machine type=xenpv,accel=xen
        machine_type, rest = "", parts
    for key, value in keyvals(rest):
        if key == "type" and value:
            machine_type = value
        elif key == "accel":
            accels = (value or "").split(":")
            if "xen" not in accels:
                raise CliError(f"-machine: accel '{value}' is not supported (only xen)")
        else:
            ignored.append(f"-machine {key}{'=' + value if value is not None else ''}")
    if machine_type not in ("xenpv", "none"):
        raise CliError(f"-machine: machine type '{machine_type}' is not supported "
                       "(xenpv, or none for the libxl probe)")
    return machine_type


def parse_name(text: str, ignored: list[str]) -> str:
    """-name NAME or -name guest=NAME[,process=..][,debug-threads=..]."""
    parts = split_opts(text)
    name = None
    first_key = parts[0].partition("=")[0]
    if first_key not in ("guest", "process", "debug-threads"):
        name, parts = parts[0], parts[1:]     # implied 'guest' (libxl passes it bare)
    for key, value in keyvals(parts):
        if key == "guest":
            name = value or ""
        else:
            ignored.append(f"-name {key}{'=' + value if value is not None else ''}")
    if not name:
        raise CliError(f"-name: no guest name in '{text}'")
    return name


def parse_keymap(text: str) -> str:
    if not KEYMAP_RE.fullmatch(text):
        raise CliError(f"-k: bad keymap name '{text}' (e.g. en-us, de, fr-ch)")
    from ..console.keymap import available_layouts       # the generated index: no tables loaded
    if text not in available_layouts():
        raise CliError(f"-k: unknown keymap '{text}' (available: {' '.join(available_layouts())})")
    return text


def split_host_display(option: str, text: str) -> tuple[str, str]:
    """'[host]:D', '[::1]:D', 'host:D' -> (host without brackets, 'D')."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise CliError(f"{option}: bad address '{text}' (expected [ipv6]:display)")
        return text[1:end], text[end + 2:]
    host, sep, display = text.rpartition(":")
    if not sep:
        raise CliError(f"{option}: '{text}' lacks ':display' (e.g. 127.0.0.1:0 or :1)")
    return host, display


def parse_websocket(value: str | None, display: int) -> int | None:
    if value is None or value == "on":
        port = WEBSOCKET_BASE_PORT + display
    elif value == "off":
        return None
    else:
        port_text = value.rpartition(":")[2]   # [host:]port; host is the VNC host
        port = parse_int("-vnc", "websocket port", port_text, 1, 65535)
    if port > 65535:
        raise CliError(f"-vnc: websocket port {port} out of range")
    return port


def parse_origin(value: str | None) -> str:
    """websocket-origin=URL: a browser page's origin allowed to use the
    WebSocket port, normalised as browsers send it."""
    from ..rfb.websocket import normalise_origin
    if not value:
        raise CliError("-vnc: websocket-origin= needs an origin, e.g. https://console.example")
    try:
        return normalise_origin(value)
    except ValueError as e:
        shown = value if len(value) <= 60 else value[:60] + "..."
        raise CliError(f"-vnc: websocket-origin={shown!r}: {e}") from None


def parse_vnc(text: str, ignored: list[str]) -> VncOptions | None:
    """-vnc value: 'none' or '[host]:D[,to=N][,password[=on|off]][,websocket=..]'."""
    if text == "none":
        return None
    parts = split_opts(text)
    if parts[0].startswith("unix:"):
        raise CliError("-vnc: unix socket displays are not supported")
    host, display_text = split_host_display("-vnc", parts[0])
    display = parse_int("-vnc", "display", display_text, 0, MAX_DISPLAY)
    vnc = VncOptions(host=host or "127.0.0.1", display=display, to_display=None,
                     password=False, websocket=None)
    old_tls, x509_dir, x509_verify = False, None, False     # qemu-dm's tls,x509=DIR
    for key, value in keyvals(parts[1:]):
        if key == "to":
            vnc.to_display = parse_int("-vnc", "to=", value or "", display, MAX_DISPLAY)
        elif key == "password":
            vnc.password = parse_bool("-vnc", key, value)
        elif key == "websocket":
            vnc.websocket = parse_websocket(value, display)
            vnc.websocket_on = vnc.websocket is not None and value in (None, "on")
        elif key == "websocket-origin":
            vnc.websocket_origins.append(parse_origin(value))
        elif key == "lossy":
            vnc.lossy = parse_bool("-vnc", key, value)
        elif key == "tls-creds":
            if not value:
                raise CliError("-vnc: tls-creds= needs the id of a -object tls-creds-*")
            vnc.tls_creds_id = value
        elif key == "tls":
            old_tls = parse_bool("-vnc", key, value)
        elif key in ("x509", "x509verify"):
            if not value:
                raise CliError(f"-vnc: {key}= needs a directory")
            old_tls, x509_dir, x509_verify = True, value, key == "x509verify"
        elif key in ("ipv4", "ipv6"):
            parse_bool("-vnc", key, value)    # the host decides the family
        elif key in VNC_REFUSED:
            raise CliError(f"-vnc: '{key}' is not supported (no TLS/SASL/ACL/reverse)")
        elif key in VNC_IGNORED:
            ignored.append(f"-vnc {key}{'=' + value if value is not None else ''}")
        else:
            raise CliError(f"-vnc: unknown option '{key}'")
    if vnc.websocket_origins and vnc.websocket is None:
        raise CliError("-vnc: websocket-origin= needs websocket=on|PORT (the WebSocket is off)")
    if old_tls:
        from ..rfb.tls import TlsCredentials     # here: it imports ssl, which a zygote stand-in never needs
        if vnc.tls_creds_id is not None:
            raise CliError("-vnc: give either tls-creds= or tls/x509=, not both")
        vnc.tls = (TlsCredentials("x509", x509_dir, x509_verify) if x509_dir
                   else TlsCredentials("anon"))
    return vnc


def parse_tls_object(text: str) -> tuple[str, TlsCredentials] | None:
    """-object tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]
    or tls-creds-anon,id=ID,endpoint=server: (id, credentials); None for
    objects of other types (ignored as before)."""
    parts = split_opts(text)
    kind = parts[0].removeprefix("qom-type=")
    if kind not in ("tls-creds-x509", "tls-creds-anon"):
        return None
    from ..rfb.tls import TlsCredentials
    props = dict(keyvals(parts[1:]))
    obj_id = props.get("id")
    if not obj_id:
        raise CliError(f"-object {kind}: id= is required")
    endpoint = props.get("endpoint", "client")
    if endpoint != "server":
        raise CliError(f"-object {obj_id}: endpoint={endpoint}, a VNC server needs endpoint=server")
    if kind == "tls-creds-anon":
        return obj_id, TlsCredentials("anon")
    directory = props.get("dir")
    if not directory:
        raise CliError(f"-object {obj_id}: dir= is required")
    # QEMU checks client certificates unless told not to.
    verify = parse_bool(f"-object {obj_id}", "verify-peer", props.get("verify-peer", "on"))
    return obj_id, TlsCredentials("x509", directory, verify)


@dataclass
class _Chardev:
    backend: str
    id: str
    spec: str                       # the original text, for the ignored list
    socket: ChardevSocket | None    # set for unix sockets (path= or fd=)
    why_not: str = ""               # why it can't be a QMP monitor


def parse_chardev(text: str) -> _Chardev:
    parts = split_opts(text)
    backend = parts[0]
    props = dict(keyvals(parts[1:]))
    chardev_id = props.get("id")
    if not chardev_id:
        raise CliError(f"-chardev: no id= in '{text}'")
    if backend != "socket":
        return _Chardev(backend, chardev_id, text, None, f"a '{backend}' chardev")
    path, fd_text = props.get("path"), props.get("fd")
    if "host" in props or "port" in props:
        if path or fd_text:
            raise CliError(f"-chardev {chardev_id}: both a TCP address and path/fd given")
        return _Chardev(backend, chardev_id, text, None, "a TCP socket")
    if (path is None) == (fd_text is None):
        raise CliError(f"-chardev {chardev_id}: socket needs exactly one of path= or fd=")
    fd = None
    if fd_text is not None:
        fd = parse_int(f"-chardev {chardev_id}", "fd", fd_text, 0, 1 << 20)
    if path is not None:
        if not path or len(path.encode()) > MAX_UNIX_PATH or "\0" in path:
            raise CliError(f"-chardev {chardev_id}: bad unix socket path '{path}'")
    server = parse_bool("-chardev", "server", props.get("server", "off"))
    wait = parse_bool("-chardev", "wait", props.get("wait", "on"))
    if "nowait" in props:
        wait = False
    return _Chardev(backend, chardev_id, text,
                    ChardevSocket(chardev_id, path, fd, server, wait))


def parse_qmp_shorthand(text: str, index: int) -> _Chardev | None:
    """-qmp unix:PATH[,server][,nowait] -> an implicit socket chardev."""
    parts = split_opts(text)
    if not parts[0].startswith("unix:"):
        return None
    chardev_id = f"compat_monitor{index}"
    props = ["socket", f"id={chardev_id}", f"path={parts[0][5:]}"] + parts[1:]
    return parse_chardev(",".join(p.replace(",", ",,") for p in props))


def parse_runas(option: str, text: str) -> RunAs:
    """A user name, or uid:gid (QEMU 7.2 accepts both)."""
    import pwd
    m = re.fullmatch(r"([0-9]+):([0-9]+)", text)
    if m:
        uid, gid = int(m[1]), int(m[2])
        if uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
            raise CliError(f"{option}: uid:gid '{text}' out of range")
    else:
        if not text or "\0" in text:
            raise CliError(f"{option}: empty user name")
        try:
            entry = pwd.getpwnam(text)
        except KeyError:
            raise CliError(f"{option}: user \"{text}\" doesn't exist (and is not <uid>:<gid>)") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if uid == 0:
        # The drop is verified by setuid(0) failing afterwards: root can't pass.
        raise CliError(f"{option}: '{text}' is root; refusing to run as root when asked to drop")
    return RunAs(text, uid, gid)


def parse_chroot(option: str, text: str) -> str:
    if not text or "\0" in text:
        raise CliError(f"{option}: empty directory")
    import os
    if not os.path.isdir(text):
        raise CliError(f"{option}: '{text}' is not a directory")
    return text


# ---------------------------------------------------------------------------

class _Parser:
    """Walks argv once, doing what OPTION_TABLE says for each option;
    cross-option checks happen in finish()."""

    def __init__(self) -> None:
        self.opts = Options()
        self.chardevs: dict[str, _Chardev] = {}
        self.mon_chardev_ids: list[str] = []      # -mon mode=control
        self.readline_chardev_ids: list[str] = []  # -mon mode=readline (HMP)
        self.domid_from: str | None = None
        self.vnclisten: str | None = None
        self.vncunused = False
        self.nographic = False
        self.qmp_count = 0
        self.tls_objects: dict[str, TlsCredentials] = {}   # -object tls-creds-*, by id

    def parse(self, argv: list[str]) -> Options:
        args = list(argv)
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            if not arg.startswith("-") or arg in ("-", "--"):
                self.opts.ignored.append(arg)        # QEMU: a disk image
                continue
            name = arg[2:] if arg.startswith("--") else arg[1:]
            value = None
            if name in OPTIONS_WITH_VALUE:
                if i >= len(args):
                    raise CliError(f"-{name}: requires an argument")
                value = args[i]
                i += 1
            self.option(name, value)
        return self.finish()

    def option(self, name: str, value: str | None) -> None:
        row = OPTIONS_BY_NAME.get(name)
        action = row.action if row is not None else None
        (action or _Parser.ignore)(self, name, value)

    # ---- actions (named by OPTION_TABLE): (name as given, value or None) ----
    def ignore(self, name: str, value: str | None) -> None:
        self.opts.ignored.append(f"-{name}" if value is None else f"-{name} {value}")

    def nothing(self, name: str, value: str | None) -> None:
        pass

    def show_help(self, name: str, value: None) -> None:
        raise EarlyExit(HELP)

    def show_version(self, name: str, value: None) -> None:
        raise EarlyExit(f"{PROG} (pyxenfb): QEMU 7.2 compatible xenpv device model")

    def machine(self, name: str, value: str) -> None:
        self.opts.machine = parse_machine(value, self.opts.ignored)

    def domid(self, name: str, value: str) -> None:
        if name == "d" and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_,:*.-]*", value):
            # upstream QEMU's -d is a list of log items, qemu-dm's is the domid
            items = value.split(",")
            unknown = [i for i in items if i not in QEMU_LOG_ITEMS and not i.startswith("trace:")]
            if unknown:
                raise CliError(f"-d: '{value}' is neither a domain id nor QEMU log items "
                               f"('{unknown[0]}' is not one)")
            self.opts.ignored.append(f"-d {value}")
            return
        domid = parse_domid(f"-{name}", value)
        if self.opts.domid is not None and domid != self.opts.domid:
            raise CliError(f"-{name} {domid} conflicts with -{self.domid_from} "
                           f"{self.opts.domid}")
        self.opts.domid, self.domid_from = domid, name

    def guest_name(self, name: str, value: str) -> None:
        self.opts.name = parse_name(value, self.opts.ignored)

    def domain_name(self, name: str, value: str) -> None:
        self.opts.name = value

    def vnc(self, name: str, value: str) -> None:
        self.opts.vnc = parse_vnc(value, self.opts.ignored)

    def set_vnclisten(self, name: str, value: str) -> None:
        self.vnclisten = value.strip("[]")
        if not self.vnclisten:
            raise CliError("-vnclisten: empty address")

    def set_vncunused(self, name: str, value: None) -> None:
        self.vncunused = True

    def vncviewer(self, name: str, value: None) -> None:
        self.opts.vncviewer = True

    def sdl(self, name: str, value: None) -> None:
        self.opts.sdl = True

    def display(self, name: str, value: str) -> None:
        parts = split_opts(value)
        kind = parts[0]
        if kind == "none":
            self.opts.sdl = False
        elif kind == "sdl":
            self.opts.sdl = True
            self.opts.ignored.extend(f"-display sdl,{p}" for p in parts[1:])
        elif kind.startswith("vnc="):          # QEMU's legacy -display vnc=...
            self.opts.vnc = parse_vnc(value[4:], self.opts.ignored)
        else:
            raise CliError(f"-display: '{kind}' is not supported (sdl or none; "
                           "use -vnc for VNC)")

    def set_nographic(self, name: str, value: None) -> None:
        self.nographic = True

    def keymap(self, name: str, value: str) -> None:
        self.opts.keymap = parse_keymap(value)

    def paused(self, name: str, value: None) -> None:
        self.opts.start_paused = True

    def memory(self, name: str, value: str) -> None:
        self.opts.memory_mb = parse_memory(value)

    def chardev(self, name: str, value: str) -> None:
        self.add_chardev(parse_chardev(value))

    def tls_object(self, name: str, value: str) -> None:
        tls = parse_tls_object(value)
        if tls is None:
            self.ignore(name, value)         # not a TLS credential: nothing we use
        else:
            self.tls_objects[tls[0]] = tls[1]

    def mon(self, name: str, value: str) -> None:
        props = dict(keyvals(split_opts(value)))
        chardev_id = props.get("chardev")
        if not chardev_id:
            raise CliError(f"-mon: no chardev= in '{value}'")
        mode = props.get("mode", "readline")
        if mode not in ("control", "readline"):
            raise CliError(f"-mon: unknown mode '{mode}'")
        if "pretty" in props:
            parse_bool("-mon", "pretty", props["pretty"])
        if mode == "readline":
            # The human monitor (HMP) is not provided; the chardev stays unused.
            self.opts.ignored.append(f"-mon {value}")
            self.readline_chardev_ids.append(chardev_id)
            return
        self.mon_chardev_ids.append(chardev_id)

    def qmp(self, name: str, value: str) -> None:
        chardev = parse_qmp_shorthand(value, self.qmp_count)
        self.qmp_count += 1
        if chardev is None:
            self.opts.ignored.append(f"-qmp {value}")
            return
        self.add_chardev(chardev)
        self.mon_chardev_ids.append(chardev.id)

    def accel(self, name: str, value: str) -> None:
        if "xen" not in split_opts(value)[0].split(":"):
            raise CliError(f"-accel: '{value}' is not supported (only xen)")

    def sandbox(self, name: str, value: str) -> None:
        if value.startswith("on"):
            raise CliError("-sandbox on: seccomp sandboxing is not supported; "
                           "refusing to run unrestricted")
        self.ignore(name, value)

    def domid_restrict(self, name: str, value: None) -> None:
        self.opts.restrict.domid_restrict = True

    def chroot(self, name: str, value: str) -> None:
        self.opts.restrict.chroot = parse_chroot("-chroot", value)

    def runas(self, name: str, value: str) -> None:
        self.opts.restrict.user = parse_runas("-runas", value)

    def run_with(self, name: str, value: str) -> None:
        for key, val in keyvals(split_opts(value)):
            if key == "chroot":
                self.opts.restrict.chroot = parse_chroot("-run-with chroot", val or "")
            elif key == "user":
                self.opts.restrict.user = parse_runas("-run-with user", val or "")
            elif key in RUN_WITH_IGNORED:
                self.opts.ignored.append(f"-run-with {key}{'=' + val if val is not None else ''}")
            else:
                raise CliError(f"-run-with: unknown option '{key}'")

    # ---- helpers ------------------------------------------------------------
    def add_chardev(self, chardev: _Chardev) -> None:
        if chardev.id in self.chardevs:
            raise CliError(f"-chardev: duplicate id '{chardev.id}'")
        self.chardevs[chardev.id] = chardev

    def finish(self) -> Options:
        o = self.opts
        used: set[str] = set()
        for chardev_id in self.mon_chardev_ids + self.readline_chardev_ids:
            if chardev_id not in self.chardevs:
                raise CliError(f"-mon: chardev '{chardev_id}' not found")
        for chardev_id in self.mon_chardev_ids:
            chardev = self.chardevs[chardev_id]
            if chardev.socket is None:
                raise CliError(f"-mon: chardev '{chardev_id}' is {chardev.why_not}; "
                               "a QMP monitor needs a unix socket (path= or fd=)")
            if not chardev.socket.server:
                raise CliError(f"-mon: chardev '{chardev_id}' must be server=on")
            if chardev_id in used:
                raise CliError(f"-mon: chardev '{chardev_id}' used twice")
            used.add(chardev_id)
            o.monitors.append(chardev.socket)
        for chardev in self.chardevs.values():
            if chardev.id not in used and not chardev.id.startswith("compat_monitor"):
                o.ignored.append(f"-chardev {chardev.spec}")
        if o.vnc is not None:
            if o.vnc.tls_creds_id is not None:
                if o.vnc.tls_creds_id not in self.tls_objects:
                    raise CliError(f"-vnc: tls-creds={o.vnc.tls_creds_id}: no such -object tls-creds-*")
                o.vnc.tls = self.tls_objects[o.vnc.tls_creds_id]
            if self.vnclisten is not None:
                o.vnc.host = self.vnclisten
            if self.vncunused and o.vnc.to_display is None:
                o.vnc.to_display = min(o.vnc.display + VNCUNUSED_SPAN, MAX_DISPLAY)
        if self.nographic and o.sdl:
            raise CliError("-nographic cannot be combined with SDL (-sdl, -display sdl)")
        if o.sdl and o.restrict.chroot is not None:
            # SDL needs the X socket, fonts and libraries it loads lazily: none
            # of them exist inside an empty chroot.
            raise CliError("SDL cannot run inside -chroot (dm_restrict); use VNC")
        if o.restrict.domid_restrict and o.machine == "none":
            raise CliError("-xen-domid-restrict needs a domain (-machine xenpv)")
        if o.machine == "xenpv" and o.domid is None:
            raise CliError("no domain id: give -xen-domid N (libxl) or -d N (xend)")
        return o


def parse_args(argv: list[str]) -> Options:
    """Parse a qemu-dm/xend or libxl/QEMU style argv (without argv[0])."""
    return _Parser().parse(argv)


# ---------------------------------------------------------------------------
# The option table, as QEMU's qemu-options.hx: each row gives an option's
# names, whether it takes a value, the _Parser action and its --help lines.
# OPTIONS_WITH_VALUE, the parser's dispatch and HELP are all made from it.

@dataclass(frozen=True)
class Opt:
    names: tuple[str, ...]
    value: bool = False                   # takes the next argv word as its value
    action: Callable[[_Parser, str, str | None], None] | None = None   # None: ignored, warned
    help: str = ""                        # preformatted --help lines ("" for none)


def _text(text: str) -> Opt:
    """A --help text that belongs to no option (a section title, a note)."""
    return Opt((), help=text)


def _ignored_with_value(words: str) -> list[Opt]:
    """QEMU and qemu-dm options that we ignore but that take a value: known,
    so that the value is not read as an option or a disk image."""
    return [Opt((w,), value=True) for w in words.split()]


P = _Parser
OPTION_TABLE: list[Opt] = [
    _text(f"""\
usage: {PROG} [options]

A drop-in for `qemu-dm -M xenpv` / `qemu-system-i386 -machine xenpv`: the Xen
PV framebuffer and keyboard backends with VNC and SDL displays.
Every option may also be written with two dashes (--vnc, --sdl, --help).
"""),
    Opt(("h", "help"), action=P.show_help),
    Opt(("version",), action=P.show_version),

    _text("\nMachine:\n"),
    Opt(("M", "machine"), True, P.machine, """\
  -machine xenpv[,accel=xen]   the PV backend machine (default); -M xenpv
  -machine none,accel=xen      libxl's command-line probe: QMP only
"""),
    Opt(("xen-domid", "d"), True, P.domid, """\
  -xen-domid N | -d N          the guest's domain id (required for xenpv)
"""),
    Opt(("name",), True, P.guest_name, """\
  -name NAME | -name guest=NAME,...  | -domain-name NAME   the guest's name
"""),
    Opt(("domain-name",), True, P.domain_name),
    Opt(("m",), True, P.memory, """\
  -m MiB                       guest memory (accepted, informational)
"""),
    Opt(("S",), action=P.paused, help="""\
  -S                           start paused until QMP 'cont'
"""),
    Opt(("accel",), True, P.accel),

    _text("\nDisplay:\n"),
    Opt(("vnc",), True, P.vnc, f"""\
  -vnc [HOST]:D[,to=N][,password=on][,websocket=on|PORT][,lossy=on]
                               VNC on port {VNC_BASE_PORT}+D; HOST defaults to 127.0.0.1;
                               [::1]:D for IPv6; to=N tries displays D..N
       ...,websocket=on|[HOST:]PORT   also serve noVNC (WebSocket) on its own
                               port: on = {WEBSOCKET_BASE_PORT}+D; off by default; with TLS
                               (tls-creds=, tls, x509=) it takes wss:// only
       ...,websocket-origin=URL   a web page origin (https://console.example,
                               http://127.0.0.1:8000) allowed to open that
                               WebSocket; repeatable; none by default: every
                               browser page is refused until listed (clients
                               that send no Origin, like websockify, are let in)
  -vnc none                    no VNC (also the default)
"""),
    Opt(("vnclisten",), True, P.set_vnclisten, """\
  -vnclisten ADDR              (xend) listen address, overrides HOST
"""),
    Opt(("vncunused",), action=P.set_vncunused, help=f"""\
  -vncunused                   (xend) try displays D..D+{VNCUNUSED_SPAN} for a free port
"""),
    Opt(("vncviewer",), action=P.vncviewer, help="""\
  -vncviewer                   (xend) start a VNC viewer on the display
"""),
    Opt(("sdl",), action=P.sdl, help="""\
  -sdl | -display sdl          an SDL window; -display none / -nographic: none
"""),
    Opt(("display",), True, P.display),
    Opt(("nographic",), action=P.set_nographic),
    Opt(("k",), True, P.keymap, """\
  -k MAP                       keymap for VNC key events (en-us, de, fr, ...)
"""),

    _text("\nMonitor (QMP, what libxl talks to):\n"),
    Opt(("chardev",), True, P.chardev, """\
  -chardev socket,id=ID,path=PATH,server=on,wait=off
  -chardev socket,id=ID,fd=N,server=on,wait=off    a listening fd libxl opened
"""),
    Opt(("mon",), True, P.mon, """\
  -mon chardev=ID,mode=control
"""),
    Opt(("qmp",), True, P.qmp, """\
  -qmp unix:PATH,server=on,wait=off
"""),
    Opt(("object",), True, P.tls_object),      # tls-creds-x509/anon for -vnc tls-creds=

    _text("\nCompatibility:\n"),
    # libxl and xend always pass these; a xenpv backend has nothing to do:
    # -no-shutdown (we never act on guest shutdown), -nodefaults (we create
    # no default devices), -no-user-config (we read no config files),
    # -xen-attach (the domain exists already, always so for xenpv).
    Opt(("no-shutdown", "nodefaults", "no-user-config", "xen-attach"), action=P.nothing, help="""\
  -no-shutdown -nodefaults -no-user-config -xen-attach  accepted (nothing to do)
"""),
    _text("""\
  any other QEMU option is accepted and ignored, with one warning line;
  VNC TLS/SASL and -sandbox on are refused rather than silently ignored.
"""),
    Opt(("sandbox",), True, P.sandbox),

    _text("\nRestriction (libxl's dm_restrict), applied once every handle is open:\n"),
    Opt(("xen-domid-restrict",), action=P.domid_restrict, help="""\
  -xen-domid-restrict          event channels and foreign memory: this domain only
"""),
    Opt(("chroot",), True, P.chroot, """\
  -chroot DIR                  chroot into DIR (QMP screendump paths are inside it)
"""),
    Opt(("runas",), True, P.runas, """\
  -runas USER | -runas UID:GID drop to this user (supplementary groups dropped)
"""),
    Opt(("run-with",), True, P.run_with, """\
  -run-with chroot=DIR[,user=USER]   the same, QEMU 8.1+ spelling
"""),
    _text("  Exit status 2 on a bad command line.\n"),

    _text(f"""
Examples:
  xend:   {PROG} -M xenpv -d 3 -domain-name web -vnc 127.0.0.1:0 -vncunused -k de
  libxl:  {PROG} -xen-domid 1 -no-shutdown
            -chardev socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-1,server=on,wait=off
            -mon chardev=libxl-cmd,mode=control -nodefaults -no-user-config
            -xen-attach -name fbtest -vnc 127.0.0.1:0,to=99 -display none
            -machine xenpv -m 256
  demo:   PYXENFB_SIM=/dev/shm/xen {PROG} -d 1 --vnc :1 --sdl
"""),

    *_ignored_with_value("""
        cpu smp numa add-fd set global boot mem-path audiodev audio soundhw
        device uuid fda fdb hda hdb hdc hdd cdrom blockdev drive mtdblock sd
        pflash fsdev virtfs iscsi usbdevice vga g spice monitor qmp-pretty
        debugcon pidfile gdb D dfilter seed L bios kernel initrd append dtb
        fw_cfg serial parallel virtioconsole netdev nic net tpmdev bt incoming
        readconfig writeconfig option-rom rtc icount watchdog watchdog-action
        echr trace plugin msg semihosting-config acpitable smbios tb-size
        overcommit action compat loadvm rotate alt-grab-key device-tree
        smp-threads mem-prealloc-threads
        videoram vcpus vcpu_avail pciemulation direct-pci vncpasswd keymap-file
        gfx_passthru-mode
    """),
]
del P

OPTIONS_BY_NAME: dict[str, Opt] = {n: row for row in OPTION_TABLE for n in row.names}
OPTIONS_WITH_VALUE = frozenset(n for row in OPTION_TABLE if row.value for n in row.names)
HELP = "".join(row.help for row in OPTION_TABLE)


# ---------------------------------------------------------------------------

class _PrefixFormatter(logging.Formatter):
    def __init__(self, prefix: str):
        super().__init__("%(message)s")
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        # one line per event: a multi-line message or traceback is folded
        text = super().format(record).replace("\n", " | ")
        return f"{self.prefix}: {text}"


def setup_logging(domid: int | None, stream=None) -> None:
    prefix = PROG if domid is None else f"{PROG}[{domid}]"
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_PrefixFormatter(prefix))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_pyqemu_dm", False):
            root.removeHandler(old)
    handler._pyqemu_dm = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """The device model, started cold (launch.main, when no zygote answers),
    in a zygote's child, or by a test."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # numpy's OpenBLAS starts a thread per core at import, which costs CPU
    # (a quarter of the import here, more in an emulated dom0) and memory;
    # nothing here does linear algebra.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ..util.malloc import limit_arenas
    limit_arenas()
    from ..util.lean_imports import import_asyncio_without_ssl
    import_asyncio_without_ssl()        # OpenSSL only with TLS configured (rfb/tls.py)
    try:
        options = parse_args(argv)
    except EarlyExit as done:
        print(done.text, end="" if done.text.endswith("\n") else "\n")
        return 0
    except CliError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    setup_logging(options.domid)
    log = logging.getLogger("pyxenfb.machine.cli")
    if options.ignored:
        log.warning("ignoring unsupported options: %s", " ".join(options.ignored))
    from ..machine_pv import run
    try:
        return run(options)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # A cold start, always: `pyqemu-dm` / `python -m pyxenfb` ask a zygote first.
    sys.exit(main())
