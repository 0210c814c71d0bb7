"""Drive Debian's noVNC 1.3 in headless Chromium, for tests/test_novnc.py.

`NovncHttp` serves /usr/share/novnc plus our test page (tests/novnc_page.js)
on a loopback port; `Chromium` starts /usr/bin/chromium with a DevTools port
and speaks the DevTools protocol over `websockets` (already a dependency), so
nothing is downloaded at test time.  `NovncBrowser.run_client` opens the page
and returns what tests/novnc_page.js resolved with.
"""
from __future__ import annotations

import base64
import functools
import http.server
import io
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
from PIL import Image
from websockets.sync.client import connect as ws_connect

NOVNC_DIR = "/usr/share/novnc"
CHROMIUM = "/usr/bin/chromium"
PAGE_JS = os.path.join(os.path.dirname(__file__), "novnc_page.js")
PAGE_HTML = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>pyxenfb noVNC test</title></head>
<body style="margin:0"><div id="screen"></div></body></html>
"""
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1024,768", "--force-device-scale-factor=1", "--force-color-profile=srgb",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
    # wss:// tests serve certificates made on the fly by a CA it cannot know.
    "--ignore-certificate-errors",
]


def missing_requirement() -> str | None:
    """Why these tests cannot run here, or None."""
    if not os.path.exists(os.path.join(NOVNC_DIR, "core", "rfb.js")):
        return "Debian package novnc is not installed (no /usr/share/novnc/core/rfb.js)"
    if not shutil.which(CHROMIUM):
        return "Debian package chromium is not installed (no /usr/bin/chromium)"
    return None


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript", ".html": "text/html"}

    def do_GET(self):
        page = {"/pyxenfb/page.html": (PAGE_HTML, "text/html"),
                "/pyxenfb/page.js": (None, "text/javascript")}.get(self.path)
        if page is None:
            return super().do_GET()
        body, mime = page
        if body is None:
            with open(PAGE_JS, "rb") as f:
                body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):   # keep pytest output clean
        pass


class NovncHttp:
    """noVNC's files and the test page over HTTP, in a background thread."""

    def __init__(self):
        handler = functools.partial(_Handler, directory=NOVNC_DIR)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


ATTACK_HTML = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>another site</title></head><body></body></html>
"""
# What a hostile page does: open a WebSocket to the VNC server and report
# whether it opened and what it read.  Resolves on close or on RFB bytes.
ATTACK_JS = """new Promise((resolve) => {
    const seen = { events: [], text: '' };
    const ws = new WebSocket(%s, ['binary']);
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => seen.events.push('open');
    ws.onerror = () => seen.events.push('error');
    ws.onmessage = (e) => {
        seen.text += String.fromCharCode(...new Uint8Array(e.data).slice(0, 64));
        if (seen.text.length >= 12) { ws.close(); resolve(seen); }
    };
    ws.onclose = (e) => { seen.events.push('close'); seen.code = e.code; resolve(seen); };
    setTimeout(() => { seen.events.push('timeout'); resolve(seen); }, %d);
})"""


class _AttackHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(ATTACK_HTML)))
        self.end_headers()
        self.wfile.write(ATTACK_HTML)

    def log_message(self, format, *args):
        pass


class AttackerSite:
    """Another web site on loopback (127.0.0.2, its own port): the origin of
    a page that tries to reach a VNC server it was never allowed to."""

    def __init__(self, host: str = "127.0.0.2"):
        self.httpd = http.server.ThreadingHTTPServer((host, 0), _AttackHandler)
        self.origin = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def attack(self, chromium: "Chromium", url: str, timeout: float = 10.0) -> dict:
        """Load the page in `chromium`, let it open `url`; returns what it saw:
        events (open, error, close, timeout), text (the first bytes read)."""
        chromium.navigate(f"{self.origin}/")
        try:
            return chromium.evaluate(ATTACK_JS % (json.dumps(url), int(timeout * 1000)),
                                     timeout=timeout + 10)
        finally:
            chromium.navigate("about:blank")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class DevToolsError(RuntimeError):
    pass


class Chromium:
    """Headless Chromium with one page, controlled over the DevTools protocol."""

    def __init__(self, start_timeout: float = 30.0):
        self.profile = tempfile.mkdtemp(prefix="pyxenfb-chromium-")
        self.log = open(os.path.join(self.profile, "chromium.log"), "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self._ids = itertools.count(1)
        try:
            port = self._devtools_port(start_timeout)
            page_ws = self._page_websocket(port)
            # legacy=True: a plain connection object; proxy=None: loopback never via a proxy.
            self.ws = ws_connect(page_ws, max_size=None, open_timeout=start_timeout,
                                 proxy=None, legacy=True)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout: float) -> int:
        """Chromium writes its chosen port to DevToolsActivePort once listening."""
        path = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:      # an external process: poll with a deadline
            if self.proc.poll() is not None:
                raise DevToolsError(f"chromium exited with {self.proc.returncode}: {self.log_text()}")
            try:
                with open(path) as f:
                    first = f.readline().strip()
                if first:
                    return int(first)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        raise DevToolsError(f"chromium did not open its DevTools port in {timeout} s")

    @staticmethod
    def _page_websocket(port: int) -> str:
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        for t in targets:
            if t.get("type") == "page":
                return t["webSocketDebuggerUrl"]
        raise DevToolsError(f"no page target in {targets}")

    def log_text(self) -> str:
        try:
            with open(os.path.join(self.profile, "chromium.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def call(self, method: str, params: dict | None = None, *, timeout: float = 30.0,
             wait_event: str | None = None) -> dict:
        """Send one command; return its result (after `wait_event` too, if given)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        result, event_seen = None, wait_event is None
        while result is None or not event_seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevToolsError(f"{method}: no answer in {timeout} s")
            msg = json.loads(self.ws.recv(timeout=remaining))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise DevToolsError(f"{method}: {msg['error']}")
                result = msg["result"]
            elif msg.get("method") == wait_event:
                event_seen = True
        return result

    def navigate(self, url: str, timeout: float = 20.0) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", {"url": url}, timeout=timeout, wait_event="Page.loadEventFired")

    def evaluate(self, expression: str, timeout: float = 30.0):
        """Evaluate JS in the page, awaiting a promise; return its JSON value."""
        reply = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                               "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in reply:
            raise DevToolsError(f"page threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def screenshot(self, box: dict) -> np.ndarray:
        """The page area `box` (CSS pixels) as an (h, w, 3) uint8 RGB array."""
        clip = {**box, "scale": 1}
        png = self.call("Page.captureScreenshot", {"format": "png", "clip": clip})["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB"))

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


class NovncBrowser:
    """One Chromium and one HTTP server, shared by the tests of a module."""

    def __init__(self):
        self.http = NovncHttp()
        try:
            self.chromium = Chromium()
        except BaseException:
            self.http.close()
            raise

    @property
    def origin(self) -> str:
        """The Origin header the pages send (an http://127.0.0.1:PORT server):
        the one to allow with websocket-origin=."""
        return self.http.base

    def run_client(self, vnc_port: int, width: int, height: int, *, encodings=None,
                   lossless: bool = False, raw_alpha_fix: bool = False,
                   password: str | None = None, screenshot: bool = False,
                   timeout: float = 20.0, scheme: str = "ws") -> dict:
        """Connect noVNC (on a fresh page) to ws://127.0.0.1:vnc_port/ (or wss://).

        Returns the page's result; for outcome 'frame', `picture` is the
        canvas as an (height, width, 4) uint8 RGBA array (read with
        getImageData) and, with `screenshot`, `screenshot` is the canvas as
        Chromium renders it, (height, width, 3) RGB."""
        self.chromium.navigate(f"{self.http.base}/pyxenfb/page.html")
        opts = {"url": f"{scheme}://127.0.0.1:{vnc_port}/", "width": width, "height": height,
                "encodings": encodings, "lossless": lossless,
                "rawAlphaFix": raw_alpha_fix, "password": password,
                "timeoutMs": int(timeout * 1000)}
        result = self.chromium.evaluate(
            f"import('/pyxenfb/page.js').then(m => m.run({json.dumps(opts)}))", timeout=timeout + 10)
        if result.get("outcome") == "frame":
            rgba = np.frombuffer(base64.b64decode(result.pop("rgba")), np.uint8)
            result["picture"] = rgba.reshape(height, width, 4)
            if screenshot:
                result["screenshot"] = self.chromium.screenshot(result["canvasBox"])
            self.chromium.evaluate("import('/pyxenfb/page.js').then(m => m.disconnect())")
        return result

    def open_vnc_lite(self, vnc_port: int, password: str | None = None,
                      timeout: float = 20.0) -> dict:
        """Debian's own vnc_lite.html pointed at our port (path /websockify):
        waits for its status line to leave "Connecting"; returns that line
        and the canvas size."""
        query = f"host=127.0.0.1&port={vnc_port}"
        if password is not None:
            query += f"&password={urllib.parse.quote(password)}"
        self.chromium.navigate(f"{self.http.base}/vnc_lite.html?{query}")
        # The status text changes on connect, disconnect or failure: watch it.
        script = """new Promise((resolve) => {
            const status = document.getElementById('status');
            const canvas = () => document.querySelector('#screen canvas');
            const report = () => ({ status: status.textContent,
                                    width: canvas() ? canvas().width : null,
                                    height: canvas() ? canvas().height : null });
            const settled = () => !status.textContent.startsWith('Connecting');
            if (settled()) { resolve(report()); return; }
            const observer = new MutationObserver(() => {
                if (settled()) { observer.disconnect(); resolve(report()); }
            });
            observer.observe(status, { childList: true, characterData: true, subtree: true });
            setTimeout(() => { observer.disconnect(); resolve(report()); }, %d);
        })""" % int(timeout * 1000)
        result = self.chromium.evaluate(script, timeout=timeout + 10)
        self.chromium.navigate("about:blank")       # closes the connection
        return result

    def close(self) -> None:
        self.chromium.close()
        self.http.close()
