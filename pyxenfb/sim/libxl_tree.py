"""The XenStore tree libxl writes for a domain: every key, value and permission
as libxl 4.17 wrote them in the captured real run
(reference/libxl-4.17-captured/xenstore-ls-after-create.txt).

Nodes that only a real hypervisor or daemon would write (xenconsoled's
`console/tty`, the backends' own `feature-*`/`hotplug-status`/state 2) are
left to whoever plays that part.
"""
from __future__ import annotations

import time

from ..platform.xenconst import PAGE_SIZE
from ..platform.xenstore import XenStore
from .vfbconfig import VfbConfig

MiB = 1 << 20
CONSOLE_LIMIT = 1048576                # XEN_QEMU_CONSOLE_LIMIT, libxl's xsa_180 env
# Fake "hypervisor" resources: nobody maps or binds these in the sim.
STORE_PORT, CONSOLE_PORT = 1, 2


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


def domain_perms(domid: int) -> dict[str, list[str]]:
    return {"dom0": ["n0"],                  # toolstack only
            "ro": ["n0", f"r{domid}"],       # dom0 owns, guest reads (libxl roperm)
            "rw": [f"n{domid}"],             # guest owns (libxl rwperm)
            "fe": [f"n{domid}", "r0"]}       # frontend dirs: guest owns, backend reads


async def write_domain(xs: XenStore, domid: int, name: str, uuid: str,
                        memory_mib: int, kernel: str, cmdline: str) -> None:
    """libxl__domain_make + libxl__build_post: /local/domain/N, /vm, /libxl."""
    dom, vm, lx = f"/local/domain/{domid}", f"/vm/{uuid}", f"/libxl/{domid}"
    p = domain_perms(domid)
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


async def add_console(xs: XenStore, domid: int, memory_mib: int) -> None:
    """The PV console device libxl adds (served by xenconsoled, not by the DM)."""
    dom = f"/local/domain/{domid}"
    be = f"/local/domain/0/backend/console/{domid}/0"
    fe = f"{dom}/console"
    p = domain_perms(domid)
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


async def add_pv_device(xs: XenStore, domid: int, kind: str, extra: dict) -> None:
    """libxl__device_generic_add for vfb/vkbd devid 0: BE, FE and /libxl copies."""
    dom = f"/local/domain/{domid}"
    be = f"/local/domain/0/backend/{kind}/{domid}/0"
    fe = f"{dom}/device/{kind}/0"
    p = domain_perms(domid)
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


def vfb_backend_keys(vfb: VfbConfig) -> dict:
    """libxl__set_xenstore_vfb: the vfb BE extras (no keymap, no videoram)."""
    return {"vnc": int(vfb.vnc), "vnclisten": vfb.vnclisten, "vncpasswd": vfb.vncpasswd,
            "vncdisplay": vfb.vncdisplay, "vncunused": int(vfb.vncunused),
            "sdl": int(vfb.sdl), "opengl": int(vfb.opengl),
            "display": vfb.display, "xauthority": vfb.xauthority}


async def domain_names(xs: XenStore) -> dict[int, str]:
    names = {}
    for entry in await xs.directory("/local/domain"):
        if entry.isdigit():
            names[int(entry)] = await xs.read_str(f"/local/domain/{entry}/name", "")
    return names
