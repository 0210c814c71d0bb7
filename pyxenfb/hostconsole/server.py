"""The console's listening socket, with the bounds aiohttp leaves to us.

- Connections per client address and in total are counted when the TCP
  connection is accepted (before TLS and before any byte of HTTP), and the
  total stays below the descriptor limit with headroom for what the console
  opens itself (VNC connections, XenStore, files).  Over a bound, the new
  connection is closed at once: it costs a descriptor for microseconds.
- A connection has HEADER_TIMEOUT seconds for its TLS handshake
  (`ssl_handshake_timeout`) and then as long again to send complete request
  headers: aiohttp's keep-alive timer, which (aiohttp >= 3.9) runs from the
  connection's start and closes a connection whose handler waits for a
  request; the same timer closes an idle keep-alive connection after a
  response.  Requests being handled (a long poll, a relay) are not affected.
- What an outside party can make the console log goes through a LogBudget,
  including asyncio's "socket.accept() out of system resource" (logged with a
  traceback by the loop's exception handler, once per accept attempt).
"""
from __future__ import annotations

import asyncio
import logging
import resource
import ssl

from aiohttp import web

from ..util.logbudget import LogBudget

log = logging.getLogger("pyxenfb.console.core")

HEADER_TIMEOUT = 10.0       # seconds for the TLS handshake, and again for request headers
FD_RESERVE = 64             # descriptors kept for the console itself (XenStore, files, thumbnails)
MAX_CONNECTIONS = 1024      # in total, whatever the descriptor limit
PER_ADDRESS_SHARE = 4       # one address may hold 1/4 of the total (loopback/NAT carry many users)
MIN_PER_ADDRESS = 8         # a browser opens 6 connections per origin, plus WebSockets


def connection_limits(nofile: int | None = None) -> tuple[int, int]:
    """(total, per address) for a descriptor limit.  Each client connection may
    open one more descriptor (a relay's VNC socket), hence the halving."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            nofile = 1 << 20
    total = max(4, min(MAX_CONNECTIONS, (nofile - FD_RESERVE) // 2))
    return total, min(total, max(MIN_PER_ADDRESS, total // PER_ADDRESS_SHARE))


class ConnectionGate:
    """Counts open TCP connections per address; `admit` refuses over a bound."""

    def __init__(self, total: int, per_address: int, budget: LogBudget):
        self.total, self.per_address, self.budget = total, per_address, budget
        self._open: dict[str, list[asyncio.BaseTransport]] = {}
        self._count = 0

    def _purge(self, addr: str | None = None) -> None:
        addrs = [addr] if addr is not None else list(self._open)
        for a in addrs:
            transports = self._open.get(a)
            if transports is None:
                continue
            alive = [t for t in transports if not t.is_closing()]
            self._count -= len(transports) - len(alive)
            if alive:
                self._open[a] = alive
            else:
                del self._open[a]

    def open_count(self, addr: str | None = None) -> int:
        self._purge(addr)
        return self._count if addr is None else len(self._open.get(addr, ()))

    def admit(self, addr: str, transport: asyncio.BaseTransport) -> bool:
        mine = self.open_count(addr)
        if mine >= self.per_address:
            self.budget.warning("conn-per-address", "console: %s: %d connections open from this "
                                "address; refused", addr, mine,
                                what="connections refused (per-address limit)")
            return False
        if self._count >= self.total:
            self._purge()
            if self._count >= self.total:
                self.budget.warning("conn-total", "console: %s: %d connections open in total; "
                                    "refused", addr, self._count,
                                    what="connections refused (total limit)")
                return False
        self._open.setdefault(addr, []).append(transport)
        self._count += 1
        return True


class _Admission(asyncio.Protocol):
    """The first protocol of every accepted connection: counts it, then hands the
    transport to aiohttp's handler (after TLS, when there is TLS)."""

    def __init__(self, site: "GuardedSite"):
        self.site = site

    def connection_made(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        addr = peer[0] if isinstance(peer, tuple) else str(peer)
        if not self.site.gate.admit(addr, transport):
            transport.abort()
            return
        handler = self.site.handler_factory()
        if self.site.tls is None:
            transport.set_protocol(handler)
            handler.connection_made(transport)
            return
        transport.pause_reading()           # no ClientHello for this protocol: start_tls reads it
        asyncio.get_running_loop().create_task(self._tls(transport, handler, addr))

    async def _tls(self, transport: asyncio.Transport, handler, addr: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(transport, handler, self.site.tls, server_side=True,
                                                 ssl_handshake_timeout=self.site.header_timeout)
        except Exception as e:          # OSError/SSLError, the handshake timeout, a closed loop
            transport.abort()
            self.site.budget.info("tls-failed", "console: %s: TLS handshake failed: %s", addr,
                                  e or type(e).__name__, what="failed TLS handshakes")
            return
        handler.connection_made(tls_transport)

    def data_received(self, data: bytes) -> None:   # only before the hand-over: never
        pass

    def connection_lost(self, exc) -> None:
        pass


class GuardedSite(web.BaseSite):
    """A TCP site whose connections pass a ConnectionGate and a header deadline.
    The runner must be made with `keepalive_timeout=header_timeout`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, tls: ssl.SSLContext | None,
                 gate: ConnectionGate, budget: LogBudget, header_timeout: float = HEADER_TIMEOUT,
                 shutdown_timeout: float = 2.0, backlog: int = 128):
        super().__init__(runner, shutdown_timeout=shutdown_timeout, backlog=backlog)
        self._host, self._port = host, port
        self.tls, self.gate, self.budget, self.header_timeout = tls, gate, budget, header_timeout

    @property
    def name(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self._host}:{self._port}"

    def handler_factory(self):
        return self._runner.server()

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Admission(self), self._host, self._port,
                                                backlog=self._backlog, reuse_address=True)


def budget_accept_errors(loop: asyncio.AbstractEventLoop, budget: LogBudget) -> None:
    """asyncio reports an accept() that failed for want of descriptors (or memory)
    through the loop's exception handler, with a traceback, once per attempt;
    make it a budgeted one-line warning.  Everything else goes on as before."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message", "").startswith("socket.accept() out of system resource"):
            budget.warning("accept", "console: cannot accept connections: %s (retrying in 1 s)",
                           context.get("exception"), what="failed accept() calls")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)
    loop.set_exception_handler(handler)
