"""The simulated toolstack: what `xl create` / `xl destroy` / `xl list` do.

Every XenStore key, value and permission written here is the one libxl 4.17
wrote in the captured real run (reference/libxl-4.17-captured/
xenstore-ls-after-create.txt); the device model is started with the same argv
shape, watched and configured over QMP the same way (xl-create-vvv.log), and
killed with SIGKILL on destroy as libxl did.  Nodes that only a real
hypervisor or daemon would write (xenconsoled's `console/tty`, the backends'
own `feature-*`/`hotplug-status`/state 2) are left to whoever plays that part.

Sync/async API for tests: `create_domain`, `destroy_domain`, `list_domains`,
`read_input_log`, `fbdump_array` (implemented in `fbdump`).  numpy is only
imported by the commands that need it, so `list`/`destroy` start fast.
"""
from __future__ import annotations

import asyncio
import errno
import importlib.util
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..xenstore import XenStore, XenStoreError

log = logging.getLogger("pyxenfb.sim.toolstack")

MiB = 1 << 20
PAGE_SIZE = 4096
DOMID_FIRST_RESERVED = 0x7FF0          # xen.h: domids from here on are special
DM_START_TIMEOUT = 60.0                # LIBXL_DEVICE_MODEL_START_TIMEOUT (s)
QMP_CMD_TIMEOUT = 10.0                 # LIBXL_QMP_CMD_TIMEOUT (s)
QMP_LINE_MAX = 1 << 20                 # a longer QMP reply is a broken DM
GUEST_STOP_TIMEOUT = 5.0               # SIGTERM -> SIGKILL for the guest
KILL_WAIT_TIMEOUT = 5.0                # bound on waiting for a SIGKILLed process
CONSOLE_LIMIT = 1048576                # XEN_QEMU_CONSOLE_LIMIT, libxl's xsa_180 env
# dm_restrict (libxl_linux.c, libxl__local_dm_preexec_restrict): soft = hard.
DM_RESTRICT_RLIMITS = (
    (resource.RLIMIT_FSIZE, 256 * 1024),     # "big enough for log files, not for a DoS"
    (resource.RLIMIT_CORE, 0),
    (resource.RLIMIT_MSGQUEUE, 0),
    (getattr(resource, "RLIMIT_LOCKS", 10), 0),   # Linux 10; Python has no name for it
    (resource.RLIMIT_MEMLOCK, 0),
)
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
# Fake "hypervisor" resources: nobody maps or binds these in the sim.
STORE_PORT, CONSOLE_PORT = 1, 2


class ToolstackError(Exception):
    """A failed toolstack operation; str() is one readable line for the user."""


# ---- configuration ----------------------------------------------------------

@dataclass
class VfbConfig:
    """An xl `vfb = [ "..." ]` entry, with libxl's defaults filled in."""
    vnc: bool = True
    vncdisplay: int = 0
    vnclisten: str = "127.0.0.1"
    vncpasswd: str | None = None
    vncunused: bool = True
    sdl: bool = False
    opengl: bool = False
    keymap: str | None = None
    display: str | None = None          # SDL: DISPLAY for the DM
    xauthority: str | None = None       # SDL: XAUTHORITY for the DM


def _flag(key: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise ToolstackError(f"vfb: {key}={value!r}: expected 0 or 1")
    return value == "1"


def parse_vfb(spec: str) -> VfbConfig:
    """Parse "vnc=1,vncdisplay=D,vnclisten=ADDR,..." as xl_parse.c does."""
    cfg = VfbConfig()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ToolstackError(f"vfb: {item!r} is not key=value")
        if key in ("vnc", "vncunused", "sdl", "opengl"):
            setattr(cfg, key, _flag(key, value))
        elif key == "vncdisplay":
            if not value.isdigit() or int(value) > 65535 - 5900:
                raise ToolstackError(f"vfb: vncdisplay={value!r}: expected a display number")
            cfg.vncdisplay = int(value)
        elif key in ("vnclisten", "vncpasswd", "keymap", "display", "xauthority"):
            if any(c in value for c in "\0\n"):
                raise ToolstackError(f"vfb: {key} contains a control character")
            setattr(cfg, key, value)
        else:
            raise ToolstackError(f"vfb: unknown key {key!r}")
    return cfg


@dataclass
class CreateResult:
    domid: int
    name: str
    uuid: str
    guest_pid: int | None = None
    dm_pid: int | None = None
    vnc_host: str | None = None
    vnc_port: int | None = None
    dm_log: str | None = None
    dm_root: str | None = None         # dm_restrict: the device model's chroot

    def summary(self) -> str:
        if self.vnc_port is not None:
            where = f"VNC on {self.vnc_host}:{self.vnc_port}"
        elif self.dm_pid is not None:
            where = "no VNC"
        else:
            where = "no device model"
        return f"domain {self.domid} ({self.name}) created; {where}"


# ---- paths --------------------------------------------------------------------

def resolve_run_dir(run_dir: str | os.PathLike | None) -> str:
    run_dir = run_dir or os.environ.get("PYXENFB_SIM")
    if not run_dir:
        raise ToolstackError("no run dir: pass --run-dir DIR or set PYXENFB_SIM=DIR")
    return os.path.abspath(run_dir)


def dom_dir(run_dir: str, domid: int) -> str:
    return os.path.join(run_dir, f"dom{domid}")


def qmp_paths(run_dir: str, domid: int) -> tuple[str, str]:
    return (os.path.join(run_dir, f"qmp-libxl-{domid}"),
            os.path.join(run_dir, f"qmp-libxenstat-{domid}"))


def dm_root_path(run_dir: str, domid: int) -> str:
    """libxl: XEN_RUN_DIR/qemu-root-<domid>."""
    return os.path.join(run_dir, f"qemu-root-{domid}")


def dm_log_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"qemu-dm-{name}.log")


async def open_xenstore(run_dir: str) -> XenStore:
    path = os.path.join(run_dir, "xenstored.sock")
    try:
        return await XenStore.open(path)
    except OSError as exc:
        raise ToolstackError(f"cannot reach the sim's XenStore at {path} ({exc}); "
                             f"is `pyxenfb-sim host --run-dir {run_dir}` running?") from exc


def _check_domid(domid: int) -> None:
    if not 0 < domid < DOMID_FIRST_RESERVED:
        raise ToolstackError(f"domid {domid} out of range 1..{DOMID_FIRST_RESERVED - 1}")


def _check_name(name: str) -> None:
    # The name ends up in a file name (the DM log) and on the DM's argv.
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise ToolstackError(f"bad domain name {name!r}: use 1-64 of [A-Za-z0-9._-]")


# ---- the device model's argv (libxl__build_device_model_args_new) -------------

def default_dm_program() -> list[str]:
    """`pyqemu-dm` next to this Python, else `python -m pyxenfb.cli`."""
    candidate = os.path.join(os.path.dirname(sys.executable), "pyqemu-dm")
    if os.access(candidate, os.X_OK):
        return [candidate]
    return [sys.executable, "-m", "pyxenfb.cli"]


def vnc_arg(vfb: VfbConfig) -> str:
    if ":" in vfb.vnclisten:
        if vfb.vncdisplay:
            raise ToolstackError("vncdisplay set, vnclisten contains display")
        arg = vfb.vnclisten
    else:
        arg = f"{vfb.vnclisten}:{vfb.vncdisplay}"
    if vfb.vncpasswd:
        arg += ",password=on"
    if vfb.vncunused:
        arg += ",to=99"            # libxl: must be the last vnc option
    return arg


def dm_argv(program: list[str], run_dir: str, domid: int, name: str,
            memory_mib: int, vfb: VfbConfig | None, *, qmp_fd: int | None = None,
            dm_root: str | None = None, dm_user: str | None = None) -> list[str]:
    """qmp_fd: the QMP socket libxl pre-opened; dm_root: dm_restrict's chroot
    (with -xen-domid-restrict); dm_user: device_model_user (-runas, which
    libxl passes for HVM only)."""
    qmp_libxl, qmp_stat = qmp_paths(run_dir, domid)
    where = f"fd={qmp_fd}" if qmp_fd is not None else f"path={qmp_libxl}"
    argv = [*program, "-xen-domid", str(domid), "-no-shutdown",
            "-chardev", f"socket,id=libxl-cmd,{where},server=on,wait=off",
            "-mon", "chardev=libxl-cmd,mode=control",
            "-chardev", f"socket,id=libxenstat-cmd,path={qmp_stat},server=on,wait=off",
            "-mon", "chardev=libxenstat-cmd,mode=control",
            "-nodefaults", "-no-user-config", "-xen-attach", "-name", name]
    argv += ["-vnc", vnc_arg(vfb) if vfb and vfb.vnc else "none"]
    argv += ["-display", "none"]
    if vfb and vfb.sdl:
        argv.append("-sdl")
    if vfb and vfb.keymap:
        argv += ["-k", vfb.keymap]
    if dm_root is not None:
        argv += ["-xen-domid-restrict", "-chroot", dm_root]
    argv += ["-machine", "xenpv", "-m", str(memory_mib)]
    if dm_user is not None:
        argv += ["-runas", dm_user]
    return argv


def make_dm_root(path: str) -> None:
    """As libxl: remove a leftover (empty) root, then create it mode 0000."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ToolstackError(f"failed to remove existing chroot dir {path}: {exc.strerror}") from None
    os.mkdir(path, 0o000)
    os.chmod(path, 0o000)              # whatever the umask


def pre_open_qmp(path: str) -> socket.socket:
    """libxl__pre_open_qmp_socket: bound and listening before the DM starts."""
    _unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


def dm_restrict_preexec(unshare: bool):
    """The child's side of libxl__local_dm_preexec_restrict: new mount and
    IPC namespaces (root only), then the rlimits.  Runs between fork and exec."""
    from ..foreignmem import _load_libc
    ffi, libc = _load_libc()           # loaded before the fork: nothing to open in the child

    def preexec() -> None:
        if unshare and libc.unshare(CLONE_NEWNS | CLONE_NEWIPC) != 0:
            raise OSError(ffi.errno, "unshare Mount and IPC namespace failed")
        for res, limit in DM_RESTRICT_RLIMITS:
            resource.setrlimit(res, (limit, limit))
    return preexec


def dm_environment(run_dir: str, vfb: VfbConfig | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYXENFB_SIM"] = run_dir
    env["XEN_QEMU_CONSOLE_LIMIT"] = str(CONSOLE_LIMIT)
    # `host --zygote` runs one in the run dir: pyqemu-dm goes through it as
    # after libxl's exec; without one, never a zygote from outside the sim.
    zygote = os.path.join(run_dir, "zygote.sock")
    env.setdefault("PYXENFB_ZYGOTE", zygote if os.path.exists(zygote) else "off")
    if vfb and vfb.sdl:
        if vfb.display:
            env["DISPLAY"] = vfb.display
        if vfb.xauthority:
            env["XAUTHORITY"] = vfb.xauthority
    return env


# ---- XenStore layout (what libxl writes, with the captured permissions) -------

class _Writer:
    """Writes nodes with explicit permissions inside one transaction."""

    def __init__(self, xs: XenStore, tx: int):
        self.xs, self.tx = xs, tx

    async def node(self, path: str, value: str | int, perms: list[str]) -> None:
        await self.xs.write(path, str(value), tx=self.tx)
        await self.xs.set_perms(path, perms, tx=self.tx)

    async def nodes(self, base: str, kv: dict[str, str | int | None], perms: list[str]) -> None:
        for key, value in kv.items():
            if value is not None:       # libxl__xs_writev skips NULL values
                await self.node(f"{base}/{key}", value, perms)

    async def mkdir(self, path: str, perms: list[str]) -> None:
        """A directory node: created empty if absent, permissions set."""
        if await self.xs.read(path, None, tx=self.tx) is None:
            await self.xs.write(path, "", tx=self.tx)
        await self.xs.set_perms(path, perms, tx=self.tx)


def _perms(domid: int) -> dict[str, list[str]]:
    return {"dom0": ["n0"],                  # toolstack only
            "ro": ["n0", f"r{domid}"],       # dom0 owns, guest reads (libxl roperm)
            "rw": [f"n{domid}"],             # guest owns (libxl rwperm)
            "fe": [f"n{domid}", "r0"]}       # frontend dirs: guest owns, backend reads


async def _write_domain(xs: XenStore, domid: int, name: str, uuid: str,
                        memory_mib: int, kernel: str, cmdline: str) -> None:
    """libxl__domain_make + libxl__build_post: /local/domain/N, /vm, /libxl."""
    dom, vm, lx = f"/local/domain/{domid}", f"/vm/{uuid}", f"/libxl/{domid}"
    p = _perms(domid)
    frames = memory_mib * MiB // PAGE_SIZE

    async def make(tx: int) -> None:
        w = _Writer(xs, tx)
        for path in (dom, vm, lx):
            await xs.rm(path, tx=tx)
        await w.mkdir("/vm", p["dom0"])
        await w.mkdir("/libxl", p["dom0"])
        await w.node(dom, "", p["ro"])
        await w.node(vm, "", p["ro"])
        await w.node(lx, "", p["dom0"])
        await w.node(f"{lx}/device", "", p["dom0"])
        await w.node(f"{dom}/vm", vm, p["ro"])
        await w.node(f"{dom}/name", name, p["ro"])
        await w.node(f"{dom}/device", "", p["ro"])
        await w.node(f"{dom}/control", "", p["ro"])
        await w.nodes(f"{dom}/control", {"platform-feature-multiprocessor-suspend": 1,
                                         "platform-feature-xs_reset_watches": 1}, p["ro"])
        for key in ("shutdown", "feature-poweroff", "feature-reboot", "feature-suspend", "sysrq"):
            await w.node(f"{dom}/control/{key}", "", p["rw"])
        await w.node(f"{dom}/device/suspend", "", p["ro"])
        await w.node(f"{dom}/device/suspend/event-channel", "", p["rw"])
        for key in ("data", "drivers", "feature", "attr", "error"):
            await w.node(f"{dom}/{key}", "", p["rw"])
        await w.nodes(vm, {"uuid": uuid, "name": name}, p["ro"])
        await w.nodes(lx, {"type": "pv", "dm-version": "qemu_xen"}, p["dom0"])

    async def build(tx: int) -> None:
        w = _Writer(xs, tx)
        await w.node(f"{dom}/memory", "", p["ro"])
        await w.nodes(f"{dom}/memory", {"static-max": memory_mib * 1024,
                                        "target": memory_mib * 1024, "videoram": 0}, p["ro"])
        await w.node(f"{dom}/domid", domid, p["ro"])
        await w.node(f"{dom}/cpu", "", p["ro"])
        await w.node(f"{dom}/cpu/0", "", p["ro"])
        await w.node(f"{dom}/cpu/0/availability", "online", p["ro"])
        await w.node(f"{dom}/store", "", p["ro"])
        # Fake ring frames just past the guest's RAM: no such frame exists.
        await w.nodes(f"{dom}/store", {"port": STORE_PORT, "ring-ref": frames}, p["ro"])
        await w.node(f"{vm}/image", "", p["ro"])
        await w.nodes(f"{vm}/image", {"ostype": "linux", "kernel": kernel,
                                      "cmdline": cmdline}, p["ro"])
        await w.node(f"{vm}/start_time", f"{time.time():.2f}", p["ro"])

    await xs.transaction(make)
    await xs.transaction(build)


async def _add_console(xs: XenStore, domid: int, memory_mib: int) -> None:
    """The PV console device libxl adds (served by xenconsoled, not by the DM)."""
    dom = f"/local/domain/{domid}"
    be = f"/local/domain/0/backend/console/{domid}/0"
    fe = f"{dom}/console"
    p = _perms(domid)
    back = {"frontend": fe, "frontend-id": domid, "online": 1, "protocol": "vt100", "state": 1}

    async def body(tx: int) -> None:
        w = _Writer(xs, tx)
        await _backend_parents(w, "console", domid)
        await w.node(be, "", p["ro"])
        await w.nodes(be, back, p["ro"])
        await w.node(fe, "", p["ro"])
        await w.nodes(fe, {"backend": be, "limit": CONSOLE_LIMIT, "type": "xenconsoled",
                           "output": "pty", "port": CONSOLE_PORT,
                           "ring-ref": memory_mib * MiB // PAGE_SIZE + 1}, p["ro"])
        await w.node(f"{fe}/backend-id", 0, p["fe"])
        await _libxl_device(w, domid, "console", {"backend": be, **back})

    await xs.transaction(body)


async def _backend_parents(w: _Writer, kind: str, domid: int) -> None:
    for path in ("/local/domain/0/backend", f"/local/domain/0/backend/{kind}",
                 f"/local/domain/0/backend/{kind}/{domid}"):
        await w.mkdir(path, ["n0"])


async def _libxl_device(w: _Writer, domid: int, kind: str, keys: dict) -> None:
    base = f"/libxl/{domid}/device/{kind}"
    await w.mkdir(base, ["n0"])
    await w.node(f"{base}/0", "", ["n0"])
    await w.nodes(f"{base}/0", keys, ["n0"])


async def _add_pv_device(xs: XenStore, domid: int, kind: str, extra: dict) -> None:
    """libxl__device_generic_add for vfb/vkbd devid 0: BE, FE and /libxl copies."""
    dom = f"/local/domain/{domid}"
    be = f"/local/domain/0/backend/{kind}/{domid}/0"
    fe = f"{dom}/device/{kind}/0"
    p = _perms(domid)
    back = {"frontend": fe, "frontend-id": domid, "online": 1, "state": 1, **extra}

    async def body(tx: int) -> None:
        w = _Writer(xs, tx)
        await _backend_parents(w, kind, domid)
        await w.node(be, "", p["ro"])
        await w.nodes(be, back, p["ro"])
        await w.mkdir(f"{dom}/device/{kind}", p["ro"])
        await w.node(fe, "", p["fe"])
        await w.nodes(fe, {"backend": be, "backend-id": 0, "state": 1}, p["fe"])
        await _libxl_device(w, domid, kind, {"backend": be, **back})

    await xs.transaction(body)


def _vfb_backend_keys(vfb: VfbConfig) -> dict:
    """libxl__set_xenstore_vfb: the vfb BE extras (no keymap, no videoram)."""
    return {"vnc": int(vfb.vnc), "vnclisten": vfb.vnclisten, "vncpasswd": vfb.vncpasswd,
            "vncdisplay": vfb.vncdisplay, "vncunused": int(vfb.vncunused),
            "sdl": int(vfb.sdl), "opengl": int(vfb.opengl),
            "display": vfb.display, "xauthority": vfb.xauthority}


async def _domain_names(xs: XenStore) -> dict[int, str]:
    names = {}
    for entry in await xs.directory("/local/domain"):
        if entry.isdigit():
            names[int(entry)] = await xs.read_str(f"/local/domain/{entry}/name", "")
    return names


# ---- processes ------------------------------------------------------------------

def _process_exited(pid: int) -> asyncio.Future:
    """A future resolved when `pid` exits (pidfd: no polling, no SIGCHLD games).

    Cancel it when no longer interested: that closes the pidfd.
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        done.set_result(None)
        return done
    except (AttributeError, OSError):
        return done                    # no pidfd here: only timeouts bound the waits

    def release(_future: asyncio.Future) -> None:
        loop.remove_reader(fd)
        os.close(fd)

    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    done.add_done_callback(release)
    return done


def _reap(pid: int) -> None:
    """Collect the exit status if `pid` is our child (else init does it)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False


async def _stop_process(pid: int, sig: int, timeout: float, escalate: bool) -> None:
    if not _alive(pid):
        _reap(pid)
        return
    exited = _process_exited(pid)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    try:
        await asyncio.wait_for(asyncio.shield(exited), timeout)
    except asyncio.TimeoutError:
        if escalate and _alive(pid):
            log.warning("pid %d ignored signal %d for %.0f s; sending SIGKILL", pid, sig, timeout)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(asyncio.shield(exited), KILL_WAIT_TIMEOUT)
            except asyncio.TimeoutError:
                log.error("pid %d still alive after SIGKILL", pid)
    finally:
        exited.cancel()
        _reap(pid)


def _read_pid_file(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 1 else None


def _spawn_daemon(argv: list[str], log_path: str, env: dict[str, str], cwd: str,
                  preexec_fn=None, pass_fds: tuple[int, ...] = ()) -> int:
    """Start a process in its own session with stdout/stderr to log_path."""
    with open(log_path, "wb") as out, open(os.devnull, "rb") as null:
        proc = subprocess.Popen(argv, stdin=null, stdout=out, stderr=out, env=env,
                                cwd=cwd, start_new_session=True, close_fds=True,
                                preexec_fn=preexec_fn, pass_fds=pass_fds)
    return proc.pid


def _guest_argv(run_dir: str, domid: int, abi: str, width: int | None,
                height: int | None, animate: bool | str, fps: float | None = None,
                echo_input: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "pyxenfb.sim.guest", "--run-dir", run_dir,
            "--domid", str(domid), "--abi", abi]
    if width is not None:
        argv += ["--width", str(width)]
    if height is not None:
        argv += ["--height", str(height)]
    if animate:
        argv += ["--animate"] if animate in (True, "box") else ["--animate", str(animate)]
        if fps:
            argv += ["--fps", str(fps)]
    if echo_input:
        argv += ["--echo-input"]
    return argv


# ---- waiting for the device model and talking QMP ----------------------------

async def _wait_dm_running(xs: XenStore, domid: int, timeout: float,
                           dm_exited: asyncio.Future, log_file: str) -> None:
    """libxl's spawn watch on /local/domain/0/device-model/N/state."""
    path = f"/local/domain/0/device-model/{domid}/state"
    changed = asyncio.Event()
    token = f"pyxenfb-sim-dm-{domid}"
    await xs.watch(path, token, lambda _p, _t: changed.set())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            changed.clear()
            if await xs.read_str(path) == "running":
                return
            if dm_exited.done():
                raise ToolstackError(f"domain {domid} device model exited before it was "
                                     f"running; see {log_file}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ToolstackError(f"domain {domid} device model did not write 'running' "
                                     f"to {path} within {timeout:.0f} s; see {log_file}")
            waiter = asyncio.ensure_future(changed.wait())
            try:
                await asyncio.wait({waiter, dm_exited}, timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
    finally:
        try:
            await xs.unwatch(path, token)
        except XenStoreError:
            pass


class QmpError(ToolstackError):
    pass


class QmpClient:
    """libxl's side of QMP: one command at a time, replies matched by id.

    libxl only accepts replies terminated by "\\r\\n" (a DM sending bare "\\n"
    made the real xl hang until its timeout); we reject them at once.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 what: str, timeout: float = QMP_CMD_TIMEOUT):
        self.reader, self.writer, self.what, self.timeout = reader, writer, what, timeout
        self.next_id = 1
        self.greeting: dict = {}

    @classmethod
    async def connect(cls, path: str, what: str, timeout: float = QMP_CMD_TIMEOUT) -> "QmpClient":
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(path, limit=QMP_LINE_MAX), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise QmpError(f"Failed to connect to QMP socket {path}: {exc!r}; {what}") from exc
        client = cls(reader, writer, what, timeout)
        msg = await client._read_message()
        if not isinstance(msg.get("QMP"), dict):
            client.close()
            raise QmpError(f"QMP greeting missing from {path}: {msg!r:.200}; {what}")
        client.greeting = msg["QMP"]
        return client

    async def _read_message(self) -> dict:
        try:
            line = await asyncio.wait_for(self.reader.readuntil(b"\n"), self.timeout)
        except asyncio.TimeoutError:
            raise QmpError(f"QMP timeout: no reply within {self.timeout:.0f} s; {self.what}") from None
        except asyncio.IncompleteReadError as exc:
            raise QmpError(f"QMP connection closed by the device model "
                           f"(partial {exc.partial[:80]!r}); {self.what}") from None
        except asyncio.LimitOverrunError:
            raise QmpError(f"QMP message over {QMP_LINE_MAX} bytes; {self.what}") from None
        except OSError as exc:
            raise QmpError(f"QMP read failed: {exc}; {self.what}") from None
        if not line.endswith(b"\r\n"):
            raise QmpError(f"QMP protocol error: message not terminated by \\r\\n: "
                           f"{line[:120]!r}; {self.what}")
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise QmpError(f"QMP protocol error: not JSON: {line[:120]!r}; {self.what}") from None
        if not isinstance(msg, dict):
            raise QmpError(f"QMP protocol error: not an object: {line[:120]!r}; {self.what}")
        return msg

    async def execute(self, command: str, arguments: dict | None = None):
        cmd_id = self.next_id
        self.next_id += 1
        request = {"execute": command, "id": cmd_id}
        if arguments is not None:
            request["arguments"] = arguments
        self.writer.write(json.dumps(request).encode() + b"\r\n")
        try:
            await self.writer.drain()
        except OSError as exc:
            raise QmpError(f"QMP write of {command!r} failed: {exc}; {self.what}") from None
        while True:
            msg = await self._read_message()
            if "event" in msg and "id" not in msg:
                continue                         # asynchronous events may interleave
            if msg.get("id") != cmd_id:
                raise QmpError(f"QMP reply to {command!r} does not echo id {cmd_id}: "
                               f"{msg!r:.200}; {self.what}")
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise QmpError(f"QMP command {command!r} failed: {err.get('class')}: "
                               f"{err.get('desc')}; {self.what}")
            if "return" not in msg:
                raise QmpError(f"QMP reply to {command!r} has no 'return': {msg!r:.200}; "
                               f"{self.what}")
            return msg["return"]

    def close(self) -> None:
        self.writer.close()


async def _postconfig(xs: XenStore, run_dir: str, domid: int, vfb: VfbConfig | None,
                      what: str) -> tuple[str | None, int | None]:
    """After 'running': qmp_capabilities, query-chardev, query-vnc, change-vnc-password."""
    qmp = await QmpClient.connect(qmp_paths(run_dir, domid)[0], what)
    dom = f"/local/domain/{domid}"
    try:
        await qmp.execute("qmp_capabilities")
        chardevs = await qmp.execute("query-chardev")
        if not isinstance(chardevs, list) or not all(
                isinstance(c, dict) and isinstance(c.get("label"), str) for c in chardevs):
            raise QmpError(f"unexpected response to QMP cmd 'query-chardev': "
                           f"{chardevs!r:.200}; {what}")
        if vfb is None:
            return None, None
        vnc = await qmp.execute("query-vnc")
        host = port = None
        if not isinstance(vnc, dict) or not isinstance(vnc.get("enabled"), bool):
            raise QmpError(f"unexpected response to QMP cmd 'query-vnc': {vnc!r:.200}; {what}")
        if vnc["enabled"]:
            host, service = vnc.get("host"), vnc.get("service")
            if not isinstance(host, str) or not isinstance(service, str) or not service.isdigit():
                raise QmpError(f"Failed to retrieve VNC connect information: {vnc!r:.200}; {what}")
            port = int(service)
            await xs.write(f"{dom}/console/vnc-listen", host)
            await xs.write(f"{dom}/console/vnc-port", service)
        if vfb.vncpasswd:
            await qmp.execute("change-vnc-password", {"password": vfb.vncpasswd})
            await xs.write(f"{dom}/console/vnc-pass", vfb.vncpasswd)
        return host, port
    finally:
        qmp.close()


# ---- create / destroy / list ---------------------------------------------------

async def create_domain(run_dir: str | None, domid: int, name: str, *, memory: int = 64,
                        vfb: VfbConfig | str | None = None, abi: str = "x86_64",
                        width: int | None = None, height: int | None = None,
                        animate: bool | str = False, fps: float | None = None,
                        dm: str | list[str] | None = "default",
                        start_guest: bool = True,
                        dm_timeout: float = DM_START_TIMEOUT, dm_restrict: bool = False,
                        dm_user: str | None = None, echo_input: bool = False) -> CreateResult:
    """`xl create` for a PV guest with an optional vfb (+ the vkbd xl adds with it).

    animate: False, True / "box" (moving square) or "full" (whole screen every
    frame, at most `fps` frames/s when given).
    echo_input: the guest draws the input it receives into its picture.
    dm: "default" (pyqemu-dm), a program path or argv prefix, or None (no DM).
    dm_restrict: as xl's `dm_restrict=1` (chroot dir, pre-opened QMP socket,
    unshare and rlimits before exec); dm_user: `device_model_user=` (-runas).
    On any failure the half-built domain is destroyed, as libxl does.
    """
    run_dir = resolve_run_dir(run_dir)
    _check_domid(domid)
    _check_name(name)
    if not 1 <= memory <= 1 << 20:
        raise ToolstackError(f"memory {memory} MiB out of range")
    if abi not in ("x86_64", "x86_32"):
        raise ToolstackError(f"unknown guest ABI {abi!r}")
    if animate not in (False, True, None, "box", "full"):
        raise ToolstackError(f"unknown animation {animate!r}")
    if isinstance(vfb, str):
        vfb = parse_vfb(vfb)
    program = (default_dm_program() if dm == "default" else
               [dm] if isinstance(dm, str) else list(dm) if dm else None)
    if program:
        program[0] = shutil.which(program[0]) or os.path.abspath(program[0])
        if not os.access(program[0], os.X_OK):
            raise ToolstackError(f"device model {program[0]} is not executable")
    if vfb and program:
        vnc_arg(vfb)                        # refuse a bad listen/display before building
    if start_guest and importlib.util.find_spec("pyxenfb.sim.guest") is None:
        raise ToolstackError("the reference guest (pyxenfb.sim.guest) is not installed")

    xs = await open_xenstore(run_dir)
    try:
        names = await _domain_names(xs)
        if domid in names or os.path.exists(dom_dir(run_dir, domid)):
            raise ToolstackError(f"domain {domid} already exists")
        if name in names.values():
            raise ToolstackError(f"domain name {name!r} is already in use")
        result = CreateResult(domid, name, str(uuidlib.uuid4()))
        try:
            await _build(xs, run_dir, result, memory, vfb, abi, width, height, animate,
                         program, start_guest, dm_timeout, fps, dm_restrict, dm_user, echo_input)
        except BaseException as exc:
            try:
                await asyncio.shield(_destroy(xs, run_dir, domid))
            except Exception:
                log.exception("cleanup after failed create of domain %d failed", domid)
            if isinstance(exc, (XenStoreError, OSError)):
                raise ToolstackError(f"creating domain {domid} failed: {exc}") from exc
            raise
        return result
    finally:
        xs.close()


async def _build(xs: XenStore, run_dir: str, result: CreateResult, memory: int,
                 vfb: VfbConfig | None, abi: str, width: int | None, height: int | None,
                 animate: bool | str, program: list[str] | None, start_guest: bool,
                 dm_timeout: float, fps: float | None = None, dm_restrict: bool = False,
                 dm_user: str | None = None, echo_input: bool = False) -> None:
    domid, name = result.domid, result.name
    from .guestmem import GuestMemory
    ddir = dom_dir(run_dir, domid)
    os.makedirs(ddir)
    GuestMemory.create(os.path.join(ddir, "memory"), memory * MiB).close()

    guest = _guest_argv(run_dir, domid, abi, width, height, animate, fps, echo_input)
    await _write_domain(xs, domid, name, result.uuid, memory,
                        kernel="pyxenfb.sim.guest", cmdline=" ".join(guest[3:]))
    await _add_console(xs, domid, memory)
    await xs.introduce_domain(domid, memory * MiB // PAGE_SIZE, STORE_PORT)
    if vfb is not None:
        await _add_pv_device(xs, domid, "vfb", _vfb_backend_keys(vfb))
        await _add_pv_device(xs, domid, "vkbd", {})     # xl adds a vkb with every vfb

    def unpause() -> None:
        # libxl unpauses the domain last, once its device model runs: Linux's
        # frontends read the backends' feature-* keys at probe time.
        if start_guest:
            env = dict(os.environ, PYXENFB_SIM=run_dir)
            result.guest_pid = _spawn_daemon(guest, os.path.join(ddir, "guest.log"), env, run_dir)
            Path(ddir, "guest.pid").write_text(f"{result.guest_pid}\n")

    if program is None:
        unpause()
        return

    dom = f"/local/domain/{domid}"
    await xs.mkdir(f"/local/domain/0/device-model/{domid}")
    if vfb is not None and vfb.vncpasswd:
        # libxl still stores it where xend did, for qemu-xen-traditional.
        await xs.write(f"/vm/{result.uuid}/vncpasswd", vfb.vncpasswd)
    result.dm_log = dm_log_path(run_dir, name)
    for path in qmp_paths(run_dir, domid):
        _unlink(path)
    qmp_sock = preexec = None
    if dm_restrict:
        result.dm_root = dm_root_path(run_dir, domid)
        make_dm_root(result.dm_root)
        qmp_sock = pre_open_qmp(qmp_paths(run_dir, domid)[0])
        unshare = os.geteuid() == 0
        if not unshare:
            log.warning("dm_restrict: not root, so the device model's mount and IPC "
                        "namespaces are not unshared (rlimits still apply)")
        preexec = dm_restrict_preexec(unshare)
    try:
        argv = dm_argv(program, run_dir, domid, name, memory, vfb,
                       qmp_fd=qmp_sock.fileno() if qmp_sock else None,
                       dm_root=result.dm_root, dm_user=dm_user)
        log.debug("spawning device model: %s", argv)
        result.dm_pid = _spawn_daemon(argv, result.dm_log, dm_environment(run_dir, vfb), "/",
                                      preexec, (qmp_sock.fileno(),) if qmp_sock else ())
    finally:
        if qmp_sock is not None:
            qmp_sock.close()            # the device model has its own copy
    Path(ddir, "dm.pid").write_text(f"{result.dm_pid}\n")
    await xs.write(f"{dom}/image/device-model-pid", result.dm_pid)
    await xs.set_perms(f"{dom}/image", _perms(domid)["ro"])
    await xs.set_perms(f"{dom}/image/device-model-pid", _perms(domid)["ro"])

    what = f"device model did not start; see {result.dm_log}"
    exited = _process_exited(result.dm_pid)
    try:
        await _wait_dm_running(xs, domid, dm_timeout, exited, result.dm_log)
    finally:
        exited.cancel()
    result.vnc_host, result.vnc_port = await _postconfig(xs, run_dir, domid, vfb, what)
    unpause()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def destroy_domain(run_dir: str | None, domid: int) -> None:
    """`xl destroy`: SIGKILL the DM, stop the guest, remove its nodes, RELEASE it."""
    run_dir = resolve_run_dir(run_dir)
    _check_domid(domid)
    xs = await open_xenstore(run_dir)
    try:
        known = (await xs.read(f"/local/domain/{domid}", None) is not None
                 or await xs.read(f"/libxl/{domid}", None) is not None
                 or os.path.isdir(dom_dir(run_dir, domid)))
        if not known:
            raise ToolstackError(f"domain {domid} does not exist")
        await _destroy(xs, run_dir, domid)
    finally:
        xs.close()


async def _destroy(xs: XenStore, run_dir: str, domid: int) -> None:
    ddir = dom_dir(run_dir, domid)
    dom = f"/local/domain/{domid}"
    dm_pid = await xs.read_int(f"{dom}/image/device-model-pid") or \
        _read_pid_file(os.path.join(ddir, "dm.pid"))
    if dm_pid:
        await _stop_process(dm_pid, signal.SIGKILL, KILL_WAIT_TIMEOUT, escalate=False)
    guest_pid = _read_pid_file(os.path.join(ddir, "guest.pid"))
    if guest_pid:
        await _stop_process(guest_pid, signal.SIGTERM, GUEST_STOP_TIMEOUT, escalate=True)

    async def remove(tx: int) -> None:
        vm = await xs.read_str(f"{dom}/vm", tx=tx)
        if vm and vm.startswith("/vm/") and "/" not in vm[4:]:
            await xs.rm(vm, tx=tx)
        for path in (dom, f"/libxl/{domid}", f"/local/domain/0/device-model/{domid}",
                     *(f"/local/domain/0/backend/{kind}/{domid}"
                       for kind in ("vfb", "vkbd", "console"))):
            await xs.rm(path, tx=tx)

    await xs.transaction(remove)
    try:
        await xs.release_domain(domid)       # stands in for the hypervisor's domain death
    except XenStoreError as exc:
        if exc.errno != errno.ENOENT:
            raise
    shutil.rmtree(ddir, ignore_errors=True)
    for path in qmp_paths(run_dir, domid):
        _unlink(path)
    try:
        os.rmdir(dm_root_path(run_dir, domid))   # empty unless a screendump was left there
    except OSError:
        pass


@dataclass
class DomainInfo:
    name: str
    domid: int
    mem_mib: int
    vcpus: int
    state: str
    time_s: float


async def list_domains(run_dir: str | None) -> list[DomainInfo]:
    run_dir = resolve_run_dir(run_dir)
    xs = await open_xenstore(run_dir)
    try:
        infos = []
        for domid, name in sorted((await _domain_names(xs)).items()):
            dom = f"/local/domain/{domid}"
            target = await xs.read_int(f"{dom}/memory/target", 0) or 0
            vcpus = len(await xs.directory(f"{dom}/cpu")) if domid else 1
            if domid == 0:
                state, started = "r-----", _read_pid_start(os.path.join(run_dir, "host.pid"))
            else:
                pid = _read_pid_file(os.path.join(dom_dir(run_dir, domid), "guest.pid"))
                state = "-b----" if pid and _alive(pid) else "--p---"
                vm = await xs.read_str(f"{dom}/vm")
                started = None
                if vm:
                    try:
                        started = float(await xs.read_str(f"{vm}/start_time", "") or "x")
                    except (ValueError, XenStoreError):
                        started = None
            uptime = time.time() - started if started else 0.0
            infos.append(DomainInfo(name or f"(domain {domid})", domid, target // 1024,
                                    vcpus, state, uptime))
        return infos
    finally:
        xs.close()


def _read_pid_start(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def format_domain_list(infos: list[DomainInfo]) -> str:
    lines = [f"{'Name':<40}{'ID':>5}{'Mem':>6}{'VCPUs':>6}{'State':>10}{'Time(s)':>10}"]
    for d in infos:
        lines.append(f"{d.name:<40}{d.domid:>5}{d.mem_mib:>6}{d.vcpus:>6}"
                     f"{d.state:>10}{d.time_s:>10.1f}")
    return "\n".join(lines)


def fbdump_array(run_dir: str | None, domid: int):
    """The guest framebuffer as an (h, w, 3) uint8 RGB numpy array (see fbdump)."""
    from .fbdump import fbdump_array as dump
    return dump(run_dir, domid)


# ---- input log -------------------------------------------------------------------

def input_log_path(run_dir: str | None, domid: int) -> str:
    return os.path.join(dom_dir(resolve_run_dir(run_dir), domid), "input.log")


def read_input_log(run_dir: str | None, domid: int) -> list[dict]:
    """The reference guest's input events so far (unparseable lines skipped)."""
    try:
        text = Path(input_log_path(run_dir, domid)).read_text(errors="replace")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue                    # a line still being written
        if isinstance(event, dict):
            events.append(event)
    return events


def follow_input_log(run_dir: str | None, domid: int, emit: Callable[[str], None],
                     follow: bool, stop: Callable[[], bool] = lambda: False) -> None:
    """Print the log; with follow, keep printing what is appended.

    The stdlib has no inotify, so --follow sleeps 0.2 s between reads, as
    `tail -f` does without inotify.  This is a CLI convenience only; nothing
    in the sim waits like this.
    """
    path = input_log_path(run_dir, domid)
    pending = b""
    while True:
        try:
            f = open(path, "rb")
            break
        except FileNotFoundError:
            if not follow:
                raise ToolstackError(f"no input log at {path}") from None
            if stop():
                return
            time.sleep(0.2)
    with f:
        while True:
            chunk = f.read(65536)
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    emit(line.decode(errors="replace"))
                continue
            if not follow or stop():
                if pending:
                    emit(pending.decode(errors="replace"))
                return
            time.sleep(0.2)
