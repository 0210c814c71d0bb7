"""Where a simulated host keeps things: every path under its run dir, and the
toolstack's error type.

DIR/xenstored.sock and DIR/evtchn.sock (the host), DIR/dom<N>/ (a domain:
memory, guest.pid, dm.pid, guest.log, input.log), DIR/qmp-libxl-<N> and
DIR/qmp-libxenstat-<N> (the device model's QMP sockets), DIR/qemu-root-<N>
(dm_restrict's chroot), DIR/qemu-dm-<name>.log.
"""
from __future__ import annotations

import os

from ..platform.xenconst import DOMID_FIRST_RESERVED
from ..platform.xenstore import XenStore


class ToolstackError(Exception):
    """A failed toolstack operation; str() is one readable line for the user."""


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


def input_log_path(run_dir: str | None, domid: int) -> str:
    return os.path.join(dom_dir(resolve_run_dir(run_dir), domid), "input.log")


async def open_xenstore(run_dir: str) -> XenStore:
    path = os.path.join(run_dir, "xenstored.sock")
    try:
        return await XenStore.open(path)
    except OSError as exc:
        raise ToolstackError(f"cannot reach the sim's XenStore at {path} ({exc}); "
                             f"is `pyxenfb-sim host --run-dir {run_dir}` running?") from exc


def check_domid(domid: int) -> None:
    if not 0 < domid < DOMID_FIRST_RESERVED:
        raise ToolstackError(f"domid {domid} out of range 1..{DOMID_FIRST_RESERVED - 1}")


def check_name(name: str) -> None:
    # The name ends up in a file name (the DM log) and on the DM's argv.
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise ToolstackError(f"bad domain name {name!r}: use 1-64 of [A-Za-z0-9._-]")


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
