"""The processes of a simulated domain: the device model's argv, environment
and dm_restrict set-up as libxl builds them (libxl__build_device_model_args_new,
libxl__local_dm_preexec_restrict), spawning it and the reference guest,
waiting for the device model's 'running', and stopping processes (pidfd).
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ..platform.xenstore import XenStore, XenStoreError
from .libxl_tree import CONSOLE_LIMIT
from .rundir import ToolstackError, qmp_paths, unlink_quietly
from .vfbconfig import VfbConfig

log = logging.getLogger("pyxenfb.sim.toolstack")

DM_START_TIMEOUT = 60.0                # LIBXL_DEVICE_MODEL_START_TIMEOUT (s)
GUEST_STOP_TIMEOUT = 5.0               # SIGTERM -> SIGKILL for the guest
KILL_WAIT_TIMEOUT = 5.0                # bound on waiting for a SIGKILLed process
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


def default_dm_program() -> list[str]:
    """`pyqemu-dm` next to this Python, else `python -m pyxenfb` (the same launcher)."""
    candidate = os.path.join(os.path.dirname(sys.executable), "pyqemu-dm")
    if os.access(candidate, os.X_OK):
        return [candidate]
    return [sys.executable, "-m", "pyxenfb"]


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
    unlink_quietly(path)
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
    from ..platform.foreignmem import _load_libc
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


def process_exited(pid: int) -> asyncio.Future:
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


def alive(pid: int) -> bool:
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


async def stop_process(pid: int, sig: int, timeout: float, escalate: bool) -> None:
    if not alive(pid):
        _reap(pid)
        return
    exited = process_exited(pid)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    try:
        await asyncio.wait_for(asyncio.shield(exited), timeout)
    except asyncio.TimeoutError:
        if escalate and alive(pid):
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


def read_pid_file(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 1 else None


def spawn_daemon(argv: list[str], log_path: str, env: dict[str, str], cwd: str,
                  preexec_fn=None, pass_fds: tuple[int, ...] = ()) -> int:
    """Start a process in its own session with stdout/stderr to log_path."""
    with open(log_path, "wb") as out, open(os.devnull, "rb") as null:
        proc = subprocess.Popen(argv, stdin=null, stdout=out, stderr=out, env=env,
                                cwd=cwd, start_new_session=True, close_fds=True,
                                preexec_fn=preexec_fn, pass_fds=pass_fds)
    return proc.pid


def guest_argv(run_dir: str, domid: int, abi: str, width: int | None,
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


async def wait_dm_running(xs: XenStore, domid: int, timeout: float,
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
