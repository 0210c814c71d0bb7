#!/usr/bin/env python3
"""Make docs/console.png (the console's index with several simulated domains)
and docs/console-page.png (one domain's console after typing into it: the
guest draws what it received), as headless Chromium renders them.
Run from the repository: uv run scripts/console_screenshot.py"""
from __future__ import annotations

import asyncio
import base64
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from consolekit import ConsoleProcess  # noqa: E402
from novnc_driver import Chromium  # noqa: E402
from simkit import short_run_dir, start_host, stop_host  # noqa: E402

from pyxenfb.sim import toolstack  # noqa: E402

DOMAINS = [  # domid, name, vfb extras, width, height, animate
    (1, "web01", "", 800, 600, True),
    (2, "db01", "", 640, 480, False),
    (3, "build", "", 1024, 768, "full"),
    (4, "vault", ",vncpasswd=s3cret", 800, 600, False),
    (5, "mail", "", 640, 400, False),
]


def echo_text(run_dir: str) -> str:
    """What the echo strip of domain 1 says, rebuilt from its input log."""
    from pyxenfb.sim.echo import InputEcho
    echo = InputEcho()
    for entry in toolstack.read_input_log(run_dir, 1):
        echo.feed(entry)
    return echo.strip_text()


def main() -> int:
    out = os.path.join(REPO, "docs", "console.png")
    page_out = os.path.join(REPO, "docs", "console-page.png")
    run_dir = short_run_dir()
    host = start_host(run_dir)
    console = chromium = None
    try:
        for domid, name, extra, w, h, animate in DOMAINS:
            asyncio.run(toolstack.create_domain(
                run_dir, domid, name, memory=8, vfb=f"vnc=1,vncdisplay={70 + domid},vncunused=1{extra}",
                width=w, height=h, animate=animate, fps=5 if animate == "full" else None,
                echo_input=domid == 1))
        console = ConsoleProcess(run_dir)
        chromium = Chromium()
        chromium.call("Emulation.setDeviceMetricsOverride",
                      {"width": 1080, "height": 660, "deviceScaleFactor": 1, "mobile": False})
        chromium.navigate(console.url + "/")
        deadline = time.monotonic() + 30
        script = """document.querySelectorAll('.card').length === %d &&
            [...document.querySelectorAll('.card')].every(c =>
            c.querySelector('.lock') || (c.querySelector('img') && c.querySelector('img').complete
            && c.querySelector('.size')))""" % len(DOMAINS)
        while not chromium.evaluate(script):
            if time.monotonic() > deadline:
                raise SystemExit("thumbnails did not all load in 30 s")
            time.sleep(0.2)
        png = chromium.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(out, "wb") as f:
            f.write(base64.b64decode(png))
        print(f"wrote {out}")
        chromium.call("Emulation.setDeviceMetricsOverride",
                      {"width": 860, "height": 690, "deviceScaleFactor": 1, "mobile": False})
        chromium.navigate(console.url + "/domain/1/")
        deadline = time.monotonic() + 30
        while not chromium.evaluate("!!(window.pyxenfbConsole && window.pyxenfbConsole.connected)"):
            if time.monotonic() > deadline:
                raise SystemExit("the console page did not connect in 30 s")
            time.sleep(0.2)
        chromium.evaluate("window.pyxenfbConsole.rfb.focus()")
        for ch in "hello from the browser":
            code = "Space" if ch == " " else f"Key{ch.upper()}"
            for kind in ("keyDown", "keyUp"):
                chromium.call("Input.dispatchKeyEvent", {"type": kind, "key": ch, "code": code,
                                                          "text": ch if kind == "keyDown" else "",
                                                          "windowsVirtualKeyCode": ord(ch.upper())})
        box = chromium.evaluate("""(() => { const r = document.querySelector('#screen canvas')
            .getBoundingClientRect(); return {x: r.left + r.width * 0.7, y: r.top + r.height * 0.3}; })()""")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            chromium.call("Input.dispatchMouseEvent", {"type": kind, **box, "button": "left",
                                                        "clickCount": 1})
        deadline = time.monotonic() + 10
        while "clicks: 1" not in echo_text(run_dir):
            if time.monotonic() > deadline:
                raise SystemExit("the guest did not echo the input in 10 s")
            time.sleep(0.1)
        time.sleep(0.5)              # let noVNC draw the update before the picture is taken
        png = chromium.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(page_out, "wb") as f:
            f.write(base64.b64decode(png))
        print(f"wrote {page_out}")
        return 0
    finally:
        if chromium:
            chromium.close()
        if console:
            console.close()
        for domid, *_ in DOMAINS:
            try:
                asyncio.run(toolstack.destroy_domain(run_dir, domid))
            except toolstack.ToolstackError:
                pass
        stop_host(host)


if __name__ == "__main__":
    sys.exit(main())
