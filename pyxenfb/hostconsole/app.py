"""The web application: pages, the domain API, thumbnails and the VNC relay.

aiohttp does all HTTP and WebSocket parsing.  Everything a request names
(a domid, a path) is looked up in what we know; anything else is a 404 or a
403 with a log line, never a traceback.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from aiohttp import web

from .auth import COOKIE, PasswordHash, RateLimit, Sessions
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
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: with it Chromium sends "Origin: null" on our own login form.
    "Referrer-Policy": "same-origin",
    # 'self' includes this origin's ws:/wss: (CSP level 3).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
}


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
    def __init__(self, directory: DomainDirectory, settings: Settings):
        self.directory = directory
        self.settings = settings
        self.thumbs = ThumbnailService(settings.thumb_interval, settings.thumb_idle)
        directory.subscribe(lambda domid: self.thumbs.domain_changed(domid, directory.domains.get(domid)))
        self.sessions = Sessions()
        self.limits = RateLimit()
        self.relays = 0
        self.waiters = 0
        self.app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
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

    # ---- access ------------------------------------------------------------
    def _same_origin(self, request: web.Request) -> bool:
        """An Origin header, when sent, must be ours (or one allowed for a reverse proxy)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True                 # not a browser: it can't carry a victim's cookie
        ours = f"{'https' if self.settings.tls else 'http'}://{request.host}"
        return origin == ours or origin in self.settings.allowed_origins

    def _logged_in(self, request: web.Request) -> bool:
        return self.settings.password is None or self.sessions.valid(request.cookies.get(COOKIE))

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        host = _host_name(request.host)
        allowed_hosts = {urlsplit(o).hostname for o in self.settings.allowed_origins}
        if self.settings.loopback_only and host not in LOOPBACK_NAMES and host not in allowed_hosts:
            # A loopback console answers loopback names only: a DNS-rebinding page can't reach it.
            log.warning("console: %s: Host %r refused", request.remote, request.host[:80])
            raise web.HTTPForbidden(text="this console answers on localhost only\n")
        public = request.path in ("/login", "/logout") or request.path.startswith("/static/")
        if not public and not self._logged_in(request):
            if request.method == "GET" and PAGE_PATH.fullmatch(request.path):
                raise web.HTTPFound(f"/login?next={quote(request.path_qs, safe='/')}")
            raise web.HTTPUnauthorized(text="log in first\n")
        response = await handler(request)
        if not getattr(response, "prepared", False):
            response.headers.update(SECURITY_HEADERS)
        return response

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
            log.warning("console: %s: %d long polls already held; refused", request.remote, self.waiters)
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
            log.warning("console: %s: WebSocket for domain %d from Origin %r refused",
                        request.remote, domain.domid, request.headers.get("Origin", "")[:120])
            raise web.HTTPForbidden(text="cross-origin WebSocket refused\n")
        if self.relays >= MAX_RELAYS:
            log.warning("console: %s: %d consoles already open; refused", request.remote, self.relays)
            raise web.HTTPServiceUnavailable(text="too many open consoles\n")
        ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=MAX_WS_MESSAGE,
                                   heartbeat=30.0)
        await ws.prepare(request)
        label = f"{request.remote} -> domain {domain.domid} ({domain.name})"
        log.info("console: %s: relaying to VNC %s:%d", label, domain.vnc_host, domain.vnc_port)
        self.relays += 1
        try:
            await relay(ws, domain.vnc_host, domain.vnc_port, label)
        finally:
            self.relays -= 1
        return ws

    # ---- login ----------------------------------------------------------
    async def login_page(self, request: web.Request) -> web.StreamResponse:
        if self.settings.password is None:
            raise web.HTTPFound("/")
        return web.FileResponse(STATIC / "login.html", headers={"Cache-Control": "no-store"})

    async def login(self, request: web.Request) -> web.Response:
        if self.settings.password is None:
            raise web.HTTPNotFound()
        if not self._same_origin(request):
            log.warning("console: %s: login from Origin %r refused", request.remote,
                        request.headers.get("Origin", "")[:120])
            raise web.HTTPForbidden(text="cross-origin login refused\n")
        addr = request.remote or "?"
        wait = self.limits.retry_after(addr)
        if wait > 0:
            log.warning("console: %s: login attempt while blocked (%.0f s left)", addr, wait)
            raise web.HTTPTooManyRequests(text=f"too many failed logins; retry in {wait:.0f} s\n",
                                          headers={"Retry-After": str(int(wait) + 1)})
        form = await request.post()
        password = form.get("password")
        if not isinstance(password, str) or len(password) > 1024 or \
                not self.settings.password.check(password):
            self.limits.failed(addr)
            log.warning("console: %s: failed login", addr)
            raise web.HTTPFound("/login?failed=1")
        self.limits.succeeded(addr)
        nxt = form.get("next") if isinstance(form.get("next"), str) else "/"
        if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
            nxt = "/"
        response = web.HTTPFound(nxt)
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

