"""The simulated toolstack: what `xl create` / `xl destroy` / `xl list` do.

The device model is started with libxl's argv shape, watched and configured
over QMP the same way (xl-create-vvv.log), and killed with SIGKILL on destroy
as libxl did.  The pieces live beside this module, one concern each:
vfbconfig (the xl vfb spec), libxl_tree (the XenStore nodes libxl writes),
dmprocess (argv, spawning, waiting, stopping), qmpclient (libxl's QMP side),
inputlog (the guest's input log), rundir (paths and ToolstackError).  Their
public names are re-exported here.

Sync/async API for tests: `create_domain`, `destroy_domain`, `list_domains`,
`read_input_log`, `fbdump_array` (implemented in `fbdump`).  numpy is only
imported by the commands that need it, so `list`/`destroy` start fast.
"""
from __future__ import annotations

import asyncio
import errno
import importlib.util
import logging
import os
import shutil
import signal
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from ..platform.xenconst import DOMID_FIRST_RESERVED, PAGE_SIZE  # noqa: F401
from ..platform.xenstore import XenStore, XenStoreError
from .dmprocess import (  # noqa: F401  (re-exported)
    CLONE_NEWIPC, CLONE_NEWNS, DM_RESTRICT_RLIMITS, DM_START_TIMEOUT, GUEST_STOP_TIMEOUT,
    KILL_WAIT_TIMEOUT, alive, default_dm_program, dm_argv, dm_environment, dm_restrict_preexec,
    guest_argv, make_dm_root, pre_open_qmp, process_exited, read_pid_file, spawn_daemon,
    stop_process, vnc_arg, wait_dm_running,
)
from .inputlog import follow_input_log, read_input_log  # noqa: F401
from .libxl_tree import (  # noqa: F401
    CONSOLE_LIMIT, CONSOLE_PORT, MiB, STORE_PORT, add_console, add_pv_device, domain_names,
    domain_perms, vfb_backend_keys, write_domain,
)
from .qmpclient import (  # noqa: F401
    QMP_CMD_TIMEOUT, QMP_LINE_MAX, QmpClient, QmpError, postconfig,
)
from .rundir import (  # noqa: F401
    ToolstackError, check_domid, check_name, dm_log_path, dm_root_path, dom_dir,
    input_log_path, open_xenstore, qmp_paths, resolve_run_dir, unlink_quietly,
)
from .vfbconfig import VfbConfig, parse_vfb  # noqa: F401

# the reference guest's --animate: box, the bouncing square; full, xanim's
# frames (picture.py); text, desktop: content.py's frames
ANIMATIONS = ("box", "full", "text", "desktop")

log = logging.getLogger("pyxenfb.sim.toolstack")


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


async def create_domain(run_dir: str | None, domid: int, name: str, *, memory: int = 64,
                        vfb: VfbConfig | str | None = None, abi: str = "x86_64",
                        width: int | None = None, height: int | None = None,
                        animate: bool | str = False, fps: float | None = None,
                        dm: str | list[str] | None = "default",
                        start_guest: bool = True,
                        dm_timeout: float = DM_START_TIMEOUT, dm_restrict: bool = False,
                        dm_user: str | None = None, echo_input: bool = False) -> CreateResult:
    """`xl create` for a PV guest with an optional vfb (+ the vkbd xl adds with it).

    animate: False, True / "box" (moving square), "full" (whole screen every
    frame, at most `fps` frames/s when given), "text" or "desktop" (content.py).
    echo_input: the guest draws the input it receives into its picture.
    dm: "default" (pyqemu-dm), a program path or argv prefix, or None (no DM).
    dm_restrict: as xl's `dm_restrict=1` (chroot dir, pre-opened QMP socket,
    unshare and rlimits before exec); dm_user: `device_model_user=` (-runas).
    On any failure the half-built domain is destroyed, as libxl does.
    """
    run_dir = resolve_run_dir(run_dir)
    check_domid(domid)
    check_name(name)
    if not 1 <= memory <= 1 << 20:
        raise ToolstackError(f"memory {memory} MiB out of range")
    if abi not in ("x86_64", "x86_32"):
        raise ToolstackError(f"unknown guest ABI {abi!r}")
    if animate not in (False, True, None, *ANIMATIONS):
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
        names = await domain_names(xs)
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

    guest = guest_argv(run_dir, domid, abi, width, height, animate, fps, echo_input)
    await write_domain(xs, domid, name, result.uuid, memory,
                        kernel="pyxenfb.sim.guest", cmdline=" ".join(guest[3:]))
    await add_console(xs, domid, memory)
    await xs.introduce_domain(domid, memory * MiB // PAGE_SIZE, STORE_PORT)
    if vfb is not None:
        await add_pv_device(xs, domid, "vfb", vfb_backend_keys(vfb))
        await add_pv_device(xs, domid, "vkbd", {})     # xl adds a vkb with every vfb

    def unpause() -> None:
        # libxl unpauses the domain last, once its device model runs: Linux's
        # frontends read the backends' feature-* keys at probe time.
        if start_guest:
            env = dict(os.environ, PYXENFB_SIM=run_dir)
            result.guest_pid = spawn_daemon(guest, os.path.join(ddir, "guest.log"), env, run_dir)
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
        unlink_quietly(path)
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
        result.dm_pid = spawn_daemon(argv, result.dm_log, dm_environment(run_dir, vfb), "/",
                                      preexec, (qmp_sock.fileno(),) if qmp_sock else ())
    finally:
        if qmp_sock is not None:
            qmp_sock.close()            # the device model has its own copy
    Path(ddir, "dm.pid").write_text(f"{result.dm_pid}\n")
    await xs.write(f"{dom}/image/device-model-pid", result.dm_pid)
    await xs.set_perms(f"{dom}/image", domain_perms(domid)["ro"])
    await xs.set_perms(f"{dom}/image/device-model-pid", domain_perms(domid)["ro"])

    what = f"device model did not start; see {result.dm_log}"
    exited = process_exited(result.dm_pid)
    try:
        await wait_dm_running(xs, domid, dm_timeout, exited, result.dm_log)
    finally:
        exited.cancel()
    result.vnc_host, result.vnc_port = await postconfig(xs, run_dir, domid, vfb, what)
    unpause()


async def destroy_domain(run_dir: str | None, domid: int) -> None:
    """`xl destroy`: SIGKILL the DM, stop the guest, remove its nodes, RELEASE it."""
    run_dir = resolve_run_dir(run_dir)
    check_domid(domid)
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
        read_pid_file(os.path.join(ddir, "dm.pid"))
    if dm_pid:
        await stop_process(dm_pid, signal.SIGKILL, KILL_WAIT_TIMEOUT, escalate=False)
    guest_pid = read_pid_file(os.path.join(ddir, "guest.pid"))
    if guest_pid:
        await stop_process(guest_pid, signal.SIGTERM, GUEST_STOP_TIMEOUT, escalate=True)

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
        unlink_quietly(path)
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
        for domid, name in sorted((await domain_names(xs)).items()):
            dom = f"/local/domain/{domid}"
            target = await xs.read_int(f"{dom}/memory/target", 0) or 0
            vcpus = len(await xs.directory(f"{dom}/cpu")) if domid else 1
            if domid == 0:
                state, started = "r-----", _read_pid_start(os.path.join(run_dir, "host.pid"))
            else:
                pid = read_pid_file(os.path.join(dom_dir(run_dir, domid), "guest.pid"))
                state = "-b----" if pid and alive(pid) else "--p---"
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
