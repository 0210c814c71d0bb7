"""The live list of domains with a VNC console, from XenStore.

Watches `@introduceDomain` and `@releaseDomain` (a domain came or went) and,
per domain, its `console` and `name` keys (the VNC port is written after the
domain is introduced, and removed with the domain).  Every change re-reads
only what it concerns; nothing polls.  Listeners are told the domid that
changed so that the thumbnail side can drop a dead connection at once.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..platform.xenstore import XenStore, XenStoreError

log = logging.getLogger(__name__)

MAX_NAME = 128          # libxl names are short; a longer one is cut for display
WILDCARD_LISTEN = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True)
class Domain:
    domid: int
    name: str
    vnc_host: str           # where this server connects (a wildcard listen becomes loopback)
    vnc_port: int
    password: bool          # libxl's console/vnc-pass exists: the VNC server asks for one
    served_by: str | None   # the device model's program name, when its pid is known


def connect_host(listen: str) -> str:
    listen = listen.strip()
    if listen in WILDCARD_LISTEN:
        return WILDCARD_LISTEN[listen]
    try:
        ipaddress.ip_address(listen)
    except ValueError:
        return "127.0.0.1" if listen == "localhost" else listen
    return listen


_PYQEMU_DM_MODULES = ("pyxenfb", "pyxenfb.zygote.launch", "pyxenfb.machine.cli")


def program_of(pid: int | None, proc: str = "/proc") -> str | None:
    """The device model's program name: the first argv word that isn't an interpreter."""
    if not pid or pid <= 0:
        return None
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            argv = f.read(4096).split(b"\0")
    except OSError:
        return None
    words = [w.decode("utf-8", "replace") for w in argv]
    for i, word in enumerate(words):
        base = os.path.basename(word)
        if word == "-m" and i + 1 < len(words):      # `python3 -m pyxenfb`: pyqemu-dm
            module = words[i + 1]
            return "pyqemu-dm" if module in _PYQEMU_DM_MODULES else module[:64]
        if base and not base.startswith("python") and not base.startswith("-"):
            return base[:64]
    return None


class DomainDirectory:
    """Domains with `console/vnc-port`, kept current by XenStore watches."""

    def __init__(self, xs: XenStore):
        self.xs = xs
        self.domains: dict[int, Domain] = {}
        self._watched: set[int] = set()
        self._listeners: list[Callable[[int], None]] = []
        self._dirty: set[int] = set()
        self._rescan = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.version = 0                        # bumped after each batch of changes
        self.changed = asyncio.Condition()      # notified with it

    def subscribe(self, callback: Callable[[int], None]) -> None:
        self._listeners.append(callback)

    async def start(self) -> None:
        self._rescan = True
        await self.xs.watch("@introduceDomain", "domains", self._on_domains)
        await self.xs.watch("@releaseDomain", "domains", self._on_domains)
        await self._settle()                    # the initial list is there once start returns
        self._task = asyncio.create_task(self._run(), name="domain-directory")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            self._task = None

    async def wait_change(self, seen: int, timeout: float) -> int:
        """Return once version != seen (or after timeout): the index page's long poll."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.version != seen), timeout)
            except asyncio.TimeoutError:
                pass
        return self.version

    # ---- watch callbacks: only mark what to re-read; the task reads ----------
    def _on_domains(self, path: str, token: str) -> None:
        self._rescan = True
        self._wake.set()

    def _on_domain_key(self, domid: int) -> Callable[[str, str], None]:
        def changed(path: str, token: str) -> None:
            self._dirty.add(domid)
            self._wake.set()
        return changed

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._settle()
            except XenStoreError as e:
                if self.xs.closed.done():
                    log.error("console: lost the XenStore connection: %s", e)
                    return
                log.warning("console: re-reading domains failed: %s", e)

    async def _settle(self) -> None:
        while self._rescan or self._dirty:
            if self._rescan:
                self._rescan = False
                await self._scan()
            dirty, self._dirty = self._dirty, set()
            changed = [d for d in sorted(dirty) if await self._refresh(d)]
            for domid in changed:
                for callback in self._listeners:
                    callback(domid)
            if changed:
                self.version += 1
                async with self.changed:
                    self.changed.notify_all()

    async def _scan(self) -> None:
        names = await self.xs.directory("/local/domain")
        present = {int(n) for n in names if n.isdigit() and len(n) < 6}
        for domid in sorted(present - self._watched):
            self._watched.add(domid)
            base = f"/local/domain/{domid}"
            for key in ("console", "name"):
                await self.xs.watch(f"{base}/{key}", f"dom{domid}", self._on_domain_key(domid))
            self._dirty.add(domid)          # the watch's first event marks it too; harmless
        for domid in sorted(self._watched - present):
            self._watched.discard(domid)
            for key in ("console", "name"):
                try:
                    await self.xs.unwatch(f"/local/domain/{domid}/{key}", f"dom{domid}")
                except XenStoreError:
                    pass
            self._dirty.add(domid)

    async def _refresh(self, domid: int) -> bool:
        """Re-read one domain; True when its entry changed (or went)."""
        new = await self._read(domid) if domid in self._watched else None
        old = self.domains.get(domid)
        if new == old:
            return False
        if new is None:
            self.domains.pop(domid, None)
            log.info("console: domain %d gone", domid)
        else:
            self.domains[domid] = new
            log.info("console: domain %d (%s) VNC on %s:%d%s", domid, new.name, new.vnc_host,
                     new.vnc_port, " with a password" if new.password else "")
        return True

    async def _read(self, domid: int) -> Domain | None:
        base = f"/local/domain/{domid}"
        port = await self.xs.read_int(f"{base}/console/vnc-port")
        if port is None or not 0 < port < 65536:
            return None
        listen = await self.xs.read_str(f"{base}/console/vnc-listen", "127.0.0.1")
        name = (await self.xs.read_str(f"{base}/name", "") or f"domain-{domid}")[:MAX_NAME]
        password = await self.xs.read(f"{base}/console/vnc-pass", None) not in (None, b"")
        pid = await self.xs.read_int(f"{base}/image/device-model-pid")
        return Domain(domid, name, connect_host(listen), port, password, program_of(pid))
