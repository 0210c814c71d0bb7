#!/usr/bin/env python3
"""Make docs/console.png: the console's index with several simulated domains,
as headless Chromium renders it.  Run from the repository: uv run scripts/console_screenshot.py"""
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


def main() -> int:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "docs", "console.png")
    run_dir = short_run_dir()
    host = start_host(run_dir)
    console = chromium = None
    try:
        for domid, name, extra, w, h, animate in DOMAINS:
            asyncio.run(toolstack.create_domain(
                run_dir, domid, name, memory=8, vfb=f"vnc=1,vncdisplay={70 + domid},vncunused=1{extra}",
                width=w, height=h, animate=animate, fps=5 if animate == "full" else None))
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
