"""The web application: pages, the domain API, thumbnails and the VNC relay.

aiohttp does all HTTP and WebSocket parsing.  Everything a request names
(a domid, a path) is looked up in what we know; anything else is a 404 or a
403 with a log line, never a traceback.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from aiohttp import web, web_response

from ..util.logbudget import LogBudget
from .auth import COOKIE, SESSION_TTL, LoginThrottle, PasswordHash, Sessions
from .domains import Domain, DomainDirectory
from .relay import relay
from .thumbnails import ThumbnailService

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
PAGE_PATH = re.compile(r"/|/domain/[0-9]{1,9}/?")     # a browser gets sent to /login from these
LONG_POLL = 25.0                    # seconds a /api/changes request is held
MAX_WS_MESSAGE = 1 << 20            # RFB client messages are small; ClientCutText is capped too
MAX_RELAYS = 256                    # open console connections, all domains together
MAX_WAITERS = 256                   # held /api/changes requests
HASH_THREADS = 2                    # scrypt runs here, never on the event loop (128 MiB each)
MAX_PENDING_HASHES = 8              # checked or queued, all addresses together; more: 503
BODY_TIMEOUT = 10.0                 # seconds to send a login form's body
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}
SERVER_NAME = "console"             # the Server header: no software names, no versions
HSTS = "max-age=31536000"           # with TLS: a year; not includeSubDomains (other hosts' business)
# Requests another site's page may not make (Sec-Fetch-Site cross-site/same-site): the
# API and thumbnails (they tell which domains exist and open VNC connections) and the relay.
SAME_ORIGIN_ONLY = re.compile(r"/api/.*|/domain/[0-9]{1,9}/(thumbnail\.png|websockify)")
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: with it Chromium sends "Origin: null" on our own login form.
    "Referrer-Policy": "same-origin",
    # 'self' includes this origin's ws:/wss: (CSP level 3).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
}


# aiohttp adds "Server: Python/3.x aiohttp/3.y" with setdefault() to every response,
# including the ones it makes itself before any route matched (a 400 for a malformed
# request line), which no application hook sees; its default is this module constant.
web_response.SERVER_SOFTWARE = SERVER_NAME


def safe_next(value) -> str:
    """Where to send the browser after login: one of our own pages, else "/".

    Browsers strip TAB, CR and LF from URLs and treat a backslash as a slash,
    so "/\t/evil.example" is "//evil.example" to them: anything but a plain
    path of a page we serve is refused rather than cleaned."""
    if not isinstance(value, str) or len(value) > 64 or not value.isascii():
        return "/"
    if any(not ch.isprintable() or ch.isspace() or ch == "\\" for ch in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or parts.query or parts.fragment or parts.path != value \
            or not PAGE_PATH.fullmatch(value):
        return "/"
    return value


@dataclass
class Settings:
    tls: bool = False
    password: PasswordHash | None = None        # None: no login (loopback only)
    novnc_dir: str | None = "/usr/share/novnc"
    allowed_origins: set[str] = field(default_factory=set)
    loopback_only: bool = True                  # refuse other Host names (DNS rebinding)
    thumb_interval: float = 2.0
    thumb_idle: float = 10.0


def novnc_available(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "core", "rfb.js"))


def _host_name(host: str) -> str:
    """Host header without the port."""
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class ConsoleApp:
    def __init__(self, directory: DomainDirectory, settings: Settings, session_ttl: float | None = None):
        self.directory = directory
        self.settings = settings
        self.thumbs = ThumbnailService(settings.thumb_interval, settings.thumb_idle)
        directory.subscribe(lambda domid: self.thumbs.domain_changed(domid, directory.domains.get(domid)))
        self.sessions = Sessions(session_ttl or SESSION_TTL, on_end=self._session_ended)
        self.session_relays: dict[str, set[asyncio.Event]] = {}   # token -> its relays' stop
        self.limits = LoginThrottle()
        self.budget = LogBudget(log)
        self.hash_pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="console-scrypt")
        self.hashing = 0
        self.relays = 0
        self.waiters = 0
        self.app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        self.app.on_response_prepare.append(self._headers)
        r = self.app.router
        r.add_get("/", self.index)
        r.add_get("/api/domains", self.api_domains)
        r.add_get("/api/changes", self.api_changes)
        r.add_get("/domain/{domid:[0-9]{1,9}}", self.console_redirect)
        r.add_get("/domain/{domid:[0-9]{1,9}}/", self.console_page)
        r.add_get("/domain/{domid:[0-9]{1,9}}/thumbnail.png", self.thumbnail)
        r.add_get("/domain/{domid:[0-9]{1,9}}/websockify", self.websockify)
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_static("/static/", STATIC)
        if novnc_available(settings.novnc_dir):
            r.add_static("/novnc/", settings.novnc_dir)
        self.app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, app) -> None:
        await self.thumbs.close()
        self.hash_pool.shutdown(wait=False, cancel_futures=True)
        self.budget.flush()

    # ---- access ------------------------------------------------------------
    def _same_origin(self, request: web.Request) -> bool:
        """An Origin header, when sent, must be ours (or one allowed for a reverse proxy)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True                 # not a browser: it can't carry a victim's cookie
        ours = f"{'https' if self.settings.tls else 'http'}://{request.host}"
        return origin == ours or origin in self.settings.allowed_origins

    def _same_site_fetch(self, request: web.Request) -> bool:
        """Fetch metadata: a request another site's page made (an <img>, a fetch) is
        refused; our own pages send same-origin, a typed URL "none", curl nothing."""
        return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """On every response the application makes: pages, API, errors, redirects, the
        WebSocket's 101."""
        response.headers["Server"] = SERVER_NAME
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if self.settings.tls:
            response.headers["Strict-Transport-Security"] = HSTS

    def _logged_in(self, request: web.Request) -> bool:
        return self.settings.password is None or self.sessions.valid(request.cookies.get(COOKIE))

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        host = _host_name(request.host)
        allowed_hosts = {urlsplit(o).hostname for o in self.settings.allowed_origins}
        if self.settings.loopback_only and host not in LOOPBACK_NAMES and host not in allowed_hosts:
            # A loopback console answers loopback names only: a DNS-rebinding page can't reach it.
            self.budget.warning("host", "console: %s: Host %r refused", request.remote,
                                request.host[:80], what="requests for other Host names refused")
            raise web.HTTPForbidden(text="this console answers on localhost only\n")
        if SAME_ORIGIN_ONLY.fullmatch(request.path) and not self._same_site_fetch(request):
            self.budget.warning("cross-site", "console: %s: %s requested by another site "
                                "(Sec-Fetch-Site %r); refused", request.remote, request.path[:80],
                                request.headers.get("Sec-Fetch-Site"),
                                what="requests from other sites' pages refused")
            raise web.HTTPForbidden(text="not for other sites' pages\n")
        public = request.path in ("/login", "/logout") or request.path.startswith("/static/")
        if not public and not self._logged_in(request):
            if request.method == "GET" and PAGE_PATH.fullmatch(request.path):
                raise web.HTTPFound(f"/login?next={quote(request.path, safe='/')}")
            raise web.HTTPUnauthorized(text="log in first\n")
        return await handler(request)

    def _domain(self, request: web.Request) -> Domain:
        domain = self.directory.domains.get(int(request.match_info["domid"]))
        if domain is None:
            raise web.HTTPNotFound(text="no such domain\n")
        return domain

    # ---- pages and API ----------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def domain_json(self, d: Domain) -> dict:
        size, locked = self.thumbs.info(d.domid)
        return {"domid": d.domid, "name": d.name, "vnc_host": d.vnc_host, "vnc_port": d.vnc_port,
                "width": size[0] if size else None, "height": size[1] if size else None,
                "password": d.password or locked, "served_by": d.served_by}

    async def api_domains(self, request: web.Request) -> web.Response:
        domains = [self.domain_json(d) for _, d in sorted(self.directory.domains.items())]
        return web.json_response(domains, headers={"Cache-Control": "no-store",
                                                   "X-Domains-Version": str(self.directory.version)})

    async def api_changes(self, request: web.Request) -> web.Response:
        """Long poll: answers once the domain list differs from version `since`."""
        try:
            since = int(request.query.get("since", "-1"))
        except ValueError:
            raise web.HTTPBadRequest(text="since must be a number\n") from None
        if self.waiters >= MAX_WAITERS:
            self.budget.warning("waiters", "console: %s: %d long polls already held; refused",
                                request.remote, self.waiters, what="long polls refused (limit)")
            raise web.HTTPServiceUnavailable(text="too many waiting requests\n")
        self.waiters += 1
        try:
            version = await self.directory.wait_change(since, LONG_POLL)
        finally:
            self.waiters -= 1
        return web.json_response({"version": version}, headers={"Cache-Control": "no-store"})

    async def console_redirect(self, request: web.Request) -> web.Response:
        self._domain(request)
        raise web.HTTPFound(f"/domain/{int(request.match_info['domid'])}/")

    async def console_page(self, request: web.Request) -> web.StreamResponse:
        self._domain(request)
        if not novnc_available(self.settings.novnc_dir):
            return web.Response(status=503, content_type="text/html", text=(
                "<!DOCTYPE html><title>noVNC missing</title><p>noVNC is not installed on this "
                f"host (looked in {self.settings.novnc_dir}): <code>apt install novnc</code>, or "
                "start <code>pyxenfb-console --novnc DIR</code>.</p><p><a href=\"/\">all domains</a></p>"))
        return web.FileResponse(STATIC / "console.html", headers={"Cache-Control": "no-store"})

    async def thumbnail(self, request: web.Request) -> web.Response:
        domain = self._domain(request)
        png = await self.thumbs.thumbnail(domain)
        if png is None:
            _, locked = self.thumbs.info(domain.domid)
            raise web.HTTPForbidden(text="needs a VNC password\n") if locked or domain.password \
                else web.HTTPServiceUnavailable(text="no picture yet\n")
        return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "no-store"})

    async def websockify(self, request: web.Request) -> web.StreamResponse:
        domain = self._domain(request)
        if not self._same_origin(request):
            self.budget.warning("ws-origin", "console: %s: WebSocket for domain %d from Origin %r "
                                "refused", request.remote, domain.domid,
                                request.headers.get("Origin", "")[:120],
                                what="cross-origin WebSockets refused")
            raise web.HTTPForbidden(text="cross-origin WebSocket refused\n")
        if self.relays >= MAX_RELAYS:
            self.budget.warning("relays", "console: %s: %d consoles already open; refused",
                                request.remote, self.relays, what="consoles refused (limit)")
            raise web.HTTPServiceUnavailable(text="too many open consoles\n")
        ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=MAX_WS_MESSAGE,
                                   heartbeat=30.0)
        await ws.prepare(request)
        label = f"{request.remote} -> domain {domain.domid} ({domain.name})"
        log.info("console: %s: relaying to VNC %s:%d", label, domain.vnc_host, domain.vnc_port)
        # A relay lives no longer than the session that opened it: logout, eviction
        # (_session_ended) and expiry (the timer) stop it.
        stop, expiry_timer = asyncio.Event(), None
        token = request.cookies.get(COOKIE) if self.settings.password is not None else None
        if token:
            self.session_relays.setdefault(token, set()).add(stop)
            expiry = self.sessions.expiry(token)
            left = 0.0 if expiry is None else max(0.0, expiry - time.monotonic())
            expiry_timer = asyncio.get_running_loop().call_later(left, stop.set)
        self.relays += 1
        try:
            await relay(ws, domain.vnc_host, domain.vnc_port, label, stop)
        finally:
            self.relays -= 1
            if expiry_timer is not None:
                expiry_timer.cancel()
            if token:
                stops = self.session_relays.get(token, set())
                stops.discard(stop)
                if not stops:
                    self.session_relays.pop(token, None)
        return ws

    def _session_ended(self, token: str) -> None:
        for stop in self.session_relays.pop(token, ()):
            stop.set()

    # ---- login ----------------------------------------------------------
    async def login_page(self, request: web.Request) -> web.StreamResponse:
        if self.settings.password is None:
            raise web.HTTPFound("/")
        return web.FileResponse(STATIC / "login.html", headers={"Cache-Control": "no-store"})

    async def login(self, request: web.Request) -> web.Response:
        if self.settings.password is None:
            raise web.HTTPNotFound()
        if not self._same_origin(request):
            self.budget.warning("login-origin", "console: %s: login from Origin %r refused",
                                request.remote, request.headers.get("Origin", "")[:120],
                                what="cross-origin logins refused")
            raise web.HTTPForbidden(text="cross-origin login refused\n")
        addr = request.remote or "?"
        # Counted before anything is read or hashed: parallel guesses count as they arrive.
        wait = self.limits.begin(addr)
        if wait > 0:
            self.budget.warning("login-blocked", "console: %s: login attempt while blocked (%.0f s left)",
                                addr, wait, what="login attempts refused by the rate limit")
            raise web.HTTPTooManyRequests(text=f"too many failed logins; retry in {math.ceil(wait)} s\n",
                                          headers={"Retry-After": str(math.ceil(wait))})
        verdict = None
        try:
            if self.hashing >= MAX_PENDING_HASHES:
                self.budget.warning("login-busy", "console: %s: %d password checks pending; login refused",
                                    addr, self.hashing, what="logins refused while busy hashing")
                raise web.HTTPServiceUnavailable(text="busy checking other logins; retry soon\n",
                                                 headers={"Retry-After": "2"})
            self.hashing += 1               # held from here: a slow body keeps its slot
            try:
                try:
                    async with asyncio.timeout(BODY_TIMEOUT):
                        form = await request.post()
                except TimeoutError:
                    raise web.HTTPRequestTimeout(text="login form too slow\n") from None
                password = form.get("password")
                verdict = False
                if isinstance(password, str) and len(password) <= 1024:
                    verdict = await asyncio.get_running_loop().run_in_executor(
                        self.hash_pool, self.settings.password.check, password)
            finally:
                self.hashing -= 1
        finally:
            self.limits.end(addr, verdict)
        if not verdict:
            self.budget.warning("login-failed", "console: %s: failed login", addr,
                                what="failed logins")
            raise web.HTTPFound("/login?failed=1")
        response = web.HTTPFound(safe_next(form.get("next")))
        response.set_cookie(COOKIE, self.sessions.new(), httponly=True, secure=self.settings.tls,
                            samesite="Strict", path="/", max_age=int(self.sessions.ttl))
        log.info("console: %s: logged in", addr)
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        if not self._same_origin(request):
            raise web.HTTPForbidden(text="cross-origin logout refused\n")
        self.sessions.drop(request.cookies.get(COOKIE))
        response = web.HTTPFound("/login")
        response.del_cookie(COOKIE, path="/")
        raise response


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

