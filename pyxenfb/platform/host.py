"""Which Xen we run on: the real hypervisor or a simulated host.

`detect()` looks at the environment once and returns a `Platform` that hands
out the three hypervisor interfaces (XenStore, event channels, foreign
memory), each in its real or simulated flavour.  Nothing heavy is imported
or opened until asked for.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..evtchn import EventChannel
    from .foreignmem import ForeignMemory
    from .xenstore import XenStore

SIM_ENV = "PYXENFB_SIM"
DEV_XEN = "/dev/xen"
XENSTORED_SOCKET = "/var/run/xenstored/socket"
XENBUS_DEVICE = "/dev/xen/xenbus"


class PlatformUnavailable(Exception):
    """Neither Xen nor a simulated host is usable; str() is one line for the user."""


@dataclass
class Platform:
    kind: str                       # "real" or "sim"
    xenstore_path: str | None       # for XenStore.open
    run_dir: str | None = None      # sim only

    def open_evtchn(self, domid: int = 0) -> EventChannel:
        """A new event-channel handle.

        sim: the handle acts as domain `domid`; real: the kernel knows which
        domain we are, so `domid` is ignored."""
        if self.kind == "sim":
            from ..evtchn import SimEventChannel
            return SimEventChannel(os.path.join(self.run_dir, "evtchn.sock"), domid)
        from ..evtchn import RealEventChannel
        return RealEventChannel()

    def foreign_memory(self) -> ForeignMemory:
        if self.kind == "sim":
            from .foreignmem import SimForeignMemory
            return SimForeignMemory(self.run_dir)
        from .foreignmem import RealForeignMemory
        return RealForeignMemory()

    async def open_xenstore(self) -> XenStore:
        from .xenstore import XenStore
        return await XenStore.open(self.xenstore_path)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def detect(environ: Mapping[str, str] = os.environ, *, dev_xen: str = DEV_XEN) -> Platform:
    """PYXENFB_SIM=<run dir> -> sim; /dev/xen exists -> real; else PlatformUnavailable."""
    run_dir = environ.get(SIM_ENV)
    if run_dir:
        return _sim_platform(run_dir)
    if os.path.exists(dev_xen):
        path = environ.get("XENSTORED_PATH")
        if not path:
            path = XENSTORED_SOCKET if os.path.exists(XENSTORED_SOCKET) else XENBUS_DEVICE
        return Platform("real", path)
    raise PlatformUnavailable(
        f"no Xen here: {dev_xen} does not exist and {SIM_ENV} is not set "
        f"(run `pyxenfb-sim host` and export {SIM_ENV}=<run dir> to use the simulated host)")


def _sim_platform(run_dir: str) -> Platform:
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise PlatformUnavailable(f"{SIM_ENV}={run_dir}: no such directory "
                                  "(is `pyxenfb-sim host` running?)")
    xenstored = os.path.join(run_dir, "xenstored.sock")
    evtchn = os.path.join(run_dir, "evtchn.sock")
    missing = [p for p in (xenstored, evtchn) if not _is_socket(p)]
    if missing:
        raise PlatformUnavailable(f"{SIM_ENV}={run_dir}: simulated host not running: "
                                  f"missing socket {' and '.join(missing)}")
    return Platform("sim", xenstored, run_dir)
