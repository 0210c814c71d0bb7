"""pyxenfb-console under attack (issue 21, items 4-8), in process: the app on
a real loopback socket with aiohttp's test server, a stand-in domain
directory, real scrypt.  Each test makes the attack and then checks that the
legitimate path still works.  The ones that need a separate process (a
lowered descriptor limit, the simulated host, Chromium) are in
tests/test_hostconsole.py."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import threading
import time
import urllib.parse

import pytest
from aiohttp import ClientSession, WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from pyxenfb.hostconsole import app as console_app
from pyxenfb.hostconsole import auth
from pyxenfb.hostconsole.app import ConsoleApp, Settings
from pyxenfb.hostconsole.domains import Domain

PASSWORD = "right horse"


def cheap_hash(password: str, n: int = 1 << 10) -> auth.PasswordHash:
    salt = os.urandom(16)
    line = "scrypt$%d$8$1$%s$%s" % (n, base64.b64encode(salt).decode(), base64.b64encode(
        hashlib.scrypt(password.encode(), salt=salt, n=n, r=8, p=1, dklen=32)).decode())
    return auth.PasswordHash.parse(line)


class CountingHash:
    """A password hash that counts the checks made (from whatever thread)."""

    def __init__(self, inner: auth.PasswordHash):
        self.inner = inner
        self.calls = 0
        self.seconds: list[float] = []
        self._lock = threading.Lock()

    def check(self, password: str) -> bool:
        with self._lock:
            self.calls += 1
        t = time.perf_counter()
        try:
            return self.inner.check(password)
        finally:
            self.seconds.append(time.perf_counter() - t)


class FakeDirectory:
    """What ConsoleApp needs of DomainDirectory: domains, version, subscribe, wait_change."""

    def __init__(self, domains: dict[int, Domain] | None = None):
        self.domains = domains or {}
        self.version = 1

    def subscribe(self, callback) -> None:
        pass

    async def wait_change(self, since: int, timeout: float) -> int:
        return self.version


def domain(domid: int, port: int) -> Domain:
    return Domain(domid=domid, name=f"d{domid}", vnc_host="127.0.0.1", vnc_port=port,
                  password=False, served_by=None)


class Console:
    """The app on 127.0.0.1:<port>; `async with Console(...) as c: c.url, c.client`."""

    def __init__(self, settings: Settings | None = None, domains=None, **app_kw):
        self.settings = settings or Settings(novnc_dir=None)
        self.domains = domains or {}
        self.app_kw = app_kw

    async def __aenter__(self):
        self.console = ConsoleApp(FakeDirectory(self.domains), self.settings, **self.app_kw)
        self.server = TestServer(self.console.app, host="127.0.0.1")
        self.client = TestClient(self.server)
        await self.client.start_server()
        self.url = f"http://127.0.0.1:{self.server.port}"
        return self

    async def __aexit__(self, *exc):
        await self.client.close()


def run(coro, timeout: float = 60.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


# ---- item 6: where the browser goes after login ----------------------------------

HOSTILE_NEXT = ["//evil.example/x", "/\t/evil.example/x", "/\n/evil.example/x", "/\r/evil.example",
                "\t//evil.example", "/\\evil.example", "\\\\evil.example", "/%09/evil.example",
                "/%2F/evil.example", "https://evil.example/", "http:/evil.example",
                "javascript:alert(1)", "JaVaScRiPt:alert(1)", " /domain/1/", "/domain/1/ ",
                "/\u3000/evil.example", "/\uff0f/evil.example", "\uff0f\uff0fevil.example",
                "/domain/1/\x00", "/domain/1/?next=//evil", "/domain/1/#//evil",
                "/api/domains", "/../../evil", "", None, "x" * 5000, "/domain/1//evil.example"]


@pytest.mark.parametrize("nxt", HOSTILE_NEXT)
def test_login_never_redirects_off_the_console(nxt):
    async def go():
        settings = Settings(novnc_dir=None, password=cheap_hash(PASSWORD), loopback_only=True)
        async with Console(settings) as c:
            fields = {"password": PASSWORD}
            if nxt is not None:
                fields["next"] = nxt
            r = await c.client.post("/login", data=fields, allow_redirects=False)
            assert r.status == 302
            location = r.headers["Location"]
            # As a browser resolves it: against the page's URL.
            target = urllib.parse.urlsplit(urllib.parse.urljoin(c.url + "/login", location))
            assert f"{target.scheme}://{target.netloc}" == c.url, (nxt, location)
            assert location == "/", (nxt, location)
    run(go())


def test_login_goes_back_to_the_console_page_it_came_from():
    async def go():
        settings = Settings(novnc_dir=None, password=cheap_hash(PASSWORD))
        async with Console(settings) as c:
            r = await c.client.get("/domain/3/", allow_redirects=False)
            assert r.status == 302 and r.headers["Location"] == "/login?next=/domain/3/"
            r = await c.client.post("/login", data={"password": PASSWORD, "next": "/domain/3/"},
                                    allow_redirects=False)
            assert r.status == 302 and r.headers["Location"] == "/domain/3/"
    run(go())


# ---- item 8: other sites' pages, headers -------------------------------------------

def test_cross_site_fetches_of_thumbnails_and_api_are_refused():
    async def go():
        async with Console(domains={1: domain(1, 9)}) as c:
            for path in ("/domain/1/thumbnail.png", "/domain/7/thumbnail.png", "/api/domains",
                         "/api/changes?since=0", "/domain/1/websockify"):
                for site in ("cross-site", "same-site"):
                    r = await c.client.get(path, headers={"Sec-Fetch-Site": site})
                    assert r.status == 403, (path, site, r.status)
            # Our own page's requests, a typed URL and non-browser clients still work.
            for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {}):
                r = await c.client.get("/api/domains", headers=headers)
                assert r.status == 200 and (await r.json())[0]["domid"] == 1
            # A page is still reachable from a link on another site.
            r = await c.client.get("/static/style.css", headers={"Sec-Fetch-Site": "cross-site"})
            assert r.status == 200
    run(go())


def _check_headers(headers, tls: bool, what: str) -> None:
    server = headers.get("Server", "")
    assert "aiohttp" not in server.lower() and "python" not in server.lower(), (what, server)
    assert headers.get("X-Content-Type-Options") == "nosniff", what
    assert headers.get("X-Frame-Options") == "DENY", what
    if tls:
        assert headers.get("Strict-Transport-Security", "").startswith("max-age="), what
        assert int(headers["Strict-Transport-Security"].split("=")[1]) >= 180 * 86400
    else:
        assert "Strict-Transport-Security" not in headers, what


@pytest.mark.parametrize("tls", [False, True])
def test_headers_on_every_kind_of_response(tls):
    async def vnc(reader, writer):
        writer.write(b"RFB 003.008\n")
        await writer.drain()
        await reader.read()
        writer.close()

    async def go():
        vnc_server = await asyncio.start_server(vnc, "127.0.0.1", 0)
        port = vnc_server.sockets[0].getsockname()[1]
        # tls=True only changes what the app thinks (the TLS transport is cli.py's);
        # the headers it adds are what is checked here.
        settings = Settings(novnc_dir=None, tls=tls)
        try:
            async with Console(settings, domains={1: domain(1, port)}) as c:
                for path, status in (("/api/domains", 200), ("/domain/1", 302), ("/nope", 404),
                                     ("/domain/9/", 404), ("/static/style.css", 200)):
                    r = await c.client.get(path, allow_redirects=False)
                    assert r.status == status, (path, r.status)
                    _check_headers(r.headers, tls, path)
                r = await c.client.get("/api/domains", headers={"Sec-Fetch-Site": "cross-site"})
                assert r.status == 403
                _check_headers(r.headers, tls, "403")
                origin = ("https://" if tls else "http://") + f"127.0.0.1:{c.server.port}"
                ws = await c.client.ws_connect("/domain/1/websockify", origin=origin)
                try:
                    _check_headers(ws._response.headers, tls, "101")
                    assert ws._response.status == 101
                    msg = await ws.receive(timeout=10)
                    assert msg.type == WSMsgType.BINARY and msg.data == b"RFB 003.008\n"
                finally:
                    await ws.close()
                # aiohttp's own answer to a malformed request, before any route.
                reader, writer = await asyncio.open_connection("127.0.0.1", c.server.port)
                writer.write(b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")
                head = (await asyncio.wait_for(reader.read(4096), 10)).decode("latin-1")
                writer.close()
                assert head.split(" ", 2)[1] == "400", head
                assert "aiohttp" not in head and "Python/" not in head, head
        finally:
            vnc_server.close()
    run(go())


# ---- item 4: password guessing -------------------------------------------------------

def test_new_hashes_use_owasp_scrypt_and_old_ones_still_verify():
    line = auth.hash_password(PASSWORD)
    assert line.split("$")[1:4] == [str(1 << 17), "8", "1"]
    h = auth.PasswordHash.parse(line)
    assert h.check(PASSWORD) and not h.check(PASSWORD + "x")
    # A line as the console wrote it before (N=2^14), made here with those parameters.
    salt = os.urandom(16)
    old = "scrypt$16384$8$1$%s$%s" % (base64.b64encode(salt).decode(), base64.b64encode(
        hashlib.scrypt(PASSWORD.encode(), salt=salt, n=1 << 14, r=8, p=1, dklen=32)).decode())
    assert auth.PasswordHash.parse(old).check(PASSWORD)
    assert not auth.PasswordHash.parse(old).check("wrong")
    with pytest.raises(auth.PasswordFileError):       # 128*N*r over 1 GiB: refused, not attempted
        auth.PasswordHash.parse(old.replace("$16384$8$", "$1048576$16$"))


async def _post_login(session: ClientSession, url: str, password: str) -> tuple[int, dict]:
    async with session.post(f"{url}/login", data={"password": password, "next": "/"},
                            allow_redirects=False) as r:
        await r.read()
        return r.status, dict(r.headers)


def test_parallel_guesses_from_one_address_are_not_all_hashed_and_the_admin_gets_in():
    """40 wrong passwords at once from one address: only the few free attempts
    are hashed (the checker counts), the rest get 429 without hashing; once the
    attack stops, the right password from the same address gets in after at most
    the capped delay."""
    async def go():
        checker = CountingHash(auth.PasswordHash.parse(auth.hash_password(PASSWORD)))
        settings = Settings(novnc_dir=None, password=checker)
        async with Console(settings) as c:
            async with ClientSession() as session:
                answers = await asyncio.gather(*(_post_login(session, c.url, f"guess{i}")
                                                 for i in range(40)))
                statuses = sorted(s for s, _ in answers)
                print(f"40 parallel guesses: {checker.calls} hashed, "
                      f"{statuses.count(429)} refused with 429; a hash took "
                      f"{max(checker.seconds):.2f} s")
                assert checker.calls <= c.console.limits.free
                assert statuses.count(429) >= 40 - c.console.limits.free
                assert statuses.count(302) == checker.calls
                # More serial guesses, each as soon as allowed, for a few seconds.
                t_end = time.monotonic() + 3
                while time.monotonic() < t_end:
                    status, headers = await _post_login(session, c.url, "again")
                    if status == 429:
                        await asyncio.sleep(min(float(headers["Retry-After"]), t_end - time.monotonic(), 1))
                # The attack stopped: the admin, same address, follows Retry-After.
                t0 = time.monotonic()
                while True:
                    status, headers = await _post_login(session, c.url, PASSWORD)
                    if status != 429:
                        break
                    wait = float(headers["Retry-After"])
                    assert wait <= c.console.limits.cap + 1
                    await asyncio.sleep(wait)
                took = time.monotonic() - t0
                print(f"the right password got in {took:.1f} s after the attack stopped")
                assert status == 302 and headers["Location"] == "/"
                assert "pyxenfb_console=" in headers["Set-Cookie"]
                assert took <= c.console.limits.cap + 2 * max(checker.seconds) + 1
    run(go(), 120)


def test_pages_answer_while_many_addresses_guess():
    """200 guesses from 200 loopback addresses at once: a bounded number are
    hashed (in threads, off the event loop), the rest are refused with 503, and
    meanwhile the API and static files answer in well under a hash's time."""
    async def go():
        checker = CountingHash(auth.PasswordHash.parse(auth.hash_password(PASSWORD)))
        settings = Settings(novnc_dir=None, password=checker)
        async with Console(settings) as c:
            statuses: list[int] = []

            async def guess(i: int) -> None:
                from aiohttp import TCPConnector
                local = f"127.0.{1 + i // 250}.{1 + i % 250}"
                async with ClientSession(connector=TCPConnector(local_addr=(local, 0))) as s:
                    statuses.append((await _post_login(s, c.url, f"guess{i}"))[0])

            attack = [asyncio.create_task(guess(i)) for i in range(200)]
            # Logged in? No: these pages need no login (static) or answer 401 (API).
            latencies = []
            async with ClientSession() as s:
                while not all(t.done() for t in attack) or not latencies:
                    for path in ("/static/style.css", "/api/domains", "/login"):
                        t = time.perf_counter()
                        async with s.get(c.url + path) as r:
                            await r.read()
                            assert r.status in (200, 401), (path, r.status)
                        latencies.append(time.perf_counter() - t)
                    await asyncio.sleep(0.05)
            await asyncio.gather(*attack)
            hash_s = max(checker.seconds)
            print(f"200 guesses: {checker.calls} hashed, {statuses.count(503)} refused (503); "
                  f"other pages meanwhile: worst {max(latencies) * 1000:.0f} ms over "
                  f"{len(latencies)} requests; one hash {hash_s:.2f} s")
            assert sorted(set(statuses)) <= [302, 503]
            assert statuses.count(503) >= 200 - 4 * console_app.MAX_PENDING_HASHES
            assert max(latencies) < min(1.0, hash_s)
    run(go(), 180)
