"""The X-side anchors for contents of our own: an X server with a VNC server on
it (TigerVNC's Xvnc, or Xvfb + x11vnc, started as ../shared/bench's anchor
scripts start them) and bench/xplay.c playing pyxenfb/sim/content.py's
frames on it, so the anchor serves the reference guest's pixels.

Everything is started through Procs (own sessions, killed at cleanup); with
`prefix` (["ip", "netns", "exec", NS]) inside a network namespace.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .procs import Procs

HERE = Path(__file__).resolve().parent
NEEDS = {"xvnc": (("Xvnc", "tigervnc-standalone-server"),),
         "x11vnc": (("Xvfb", "xvfb"), ("x11vnc", "x11vnc"))}
X11VNC_FLAGS = ["-forever", "-shared", "-nopw", "-localhost", "-noipv6", "-noxdamage", "-wait", "1",
                "-defer", "1", "-nowait_bog", "-nonap", "-sb", "0", "-setdefer", "0", "-wait_ui", "1",
                "-nowf", "-noscr", "-nocursor", "-nocursorshape", "-nocursorpos", "-noxfixes",
                "-noxrecord", "-nosel", "-noclipboard", "-noprimary", "-nobell", "-nolookup",
                "-norc", "-nodpms", "-fs", "0.75"]


class Missing(Exception):
    """A tool the anchor needs is not installed (the message says how to get it)."""


def missing(kind: str) -> str | None:
    """Why `kind` ("xvnc", "x11vnc") can't run here, or None."""
    tools = NEEDS[kind] + (("gcc", "gcc"),)
    absent = [pkg for tool, pkg in tools if not shutil.which(tool)]
    if not Path("/usr/include/X11/Xlib.h").exists():
        absent.append("libx11-dev")
    return f"apt-get install {' '.join(absent)}" if absent else None


def build_xplay(procs: Procs) -> str:
    out = os.path.join(procs.tempdir("pxb-xplay-"), "xplay")
    r = subprocess.run(["gcc", "-O2", "-o", out, str(HERE / "xplay.c"), "-lX11"],
                       capture_output=True, text=True)
    if r.returncode:
        raise Missing(f"cannot build bench/xplay.c (apt-get install gcc libx11-dev): {r.stderr[-200:]}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout} s")
        time.sleep(0.05)


def _display_from(procs: Procs, argv: list[str], prefix: list[str], log: str) -> tuple[subprocess.Popen, str]:
    """Start an X server with -displayfd; its display name once it is ready.
    The fd is a file, not a pipe: Xvnc writes the number more than once and
    dies of EPIPE if the reader has gone."""
    num_file = log + ".display"
    with open(num_file, "w") as f:
        p = procs.popen([*prefix, *argv[:1], "-displayfd", str(f.fileno()), *argv[1:]],
                        pass_fds=(f.fileno(),), stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    def named():
        if p.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited: {Path(log).read_text()[-300:]}")
        return Path(num_file).read_text().endswith("\n")
    _wait(named, 30, f"{argv[0]} did not name its display")
    num = Path(num_file).read_text().split()[0]
    if not num.isdigit():
        raise RuntimeError(f"{argv[0]} wrote {num!r} as its display number")
    return p, f":{num}"


class XAnchor:
    """kind "xvnc": Xvnc 1.12 uncapped (-FrameRate 1000 -CompareFB 0), as
    anchor-xvnc.sh runs it; "x11vnc": Xvfb + x11vnc polling as fast as it
    can, as anchor-x11vnc.sh.  .port (RFB), .pid (the VNC server's: its CPU)."""

    def __init__(self, procs: Procs, kind: str, width: int, height: int,
                 prefix: list[str] | None = None):
        why = missing(kind)
        if why:
            raise Missing(why)
        self.procs, self.kind, self.prefix = procs, kind, list(prefix or [])
        self.dir = procs.tempdir(f"pxb-{kind}-")
        self.port = free_port()
        geom = f"{width}x{height}"
        if kind == "xvnc":
            self.server, self.display = _display_from(
                procs, ["Xvnc", "-geometry", geom, "-depth", "24", "-rfbport", str(self.port),
                        "-localhost", "-SecurityTypes", "None", "-AlwaysShared", "-FrameRate", "1000",
                        "-CompareFB", "0", "-nolisten", "tcp", "-noreset"],
                self.prefix, os.path.join(self.dir, "xvnc.log"))
            self.pid = self.server.pid
        else:
            self.server, self.display = _display_from(
                procs, ["Xvfb", "-screen", "0", f"{geom}x24", "-nolisten", "tcp", "-noreset"],
                self.prefix, os.path.join(self.dir, "xvfb.log"))
            out = os.path.join(self.dir, "x11vnc.out")
            vnc = procs.popen([*self.prefix, "x11vnc", "-display", self.display, "-rfbport",
                               str(self.port), *X11VNC_FLAGS], stdout=open(out, "w"),
                              stderr=open(os.path.join(self.dir, "x11vnc.log"), "w"))
            self.pid = vnc.pid
            _wait(lambda: f"PORT={self.port}" in Path(out).read_text(), 30, "x11vnc did not start")
        self.player: subprocess.Popen | None = None

    def play(self, xplay: str, frames_file: str, fps: float | None = None) -> None:
        """xplay the frames file (the previous player is stopped first), at most fps frames/s."""
        self.stop_player()
        log = os.path.join(self.dir, "xplay.log")
        deadline = time.monotonic() + 20
        def start():
            self.player = self.procs.popen([*self.prefix, xplay, "--display", self.display,
                                            "--file", frames_file, "--fps", str(fps or 0)],
                                           stdout=subprocess.DEVNULL,
                                           stderr=open(log, "w"))
        def ready():
            if self.player.poll() is not None:
                text = Path(log).read_text()
                # Xvnc names its display a moment before it accepts X clients
                if "cannot open display" in text and time.monotonic() < deadline:
                    start()
                    return False
                raise RuntimeError(f"xplay exited: {text[-300:]}")
            return "ready" in Path(log).read_text()
        start()
        _wait(ready, 60, "xplay did not start")
        time.sleep(0.5)                 # the VNC server sees a moving screen before the client

    def stop_player(self) -> None:
        if self.player is not None:
            self.player.kill()
            self.player.wait()
            self.player = None

    def player_fps(self) -> float | None:
        try:
            lines = [ln for ln in Path(self.dir, "xplay.log").read_text().splitlines() if "fps=" in ln]
        except OSError:
            return None
        return float(lines[-1].rsplit("fps=", 1)[1]) if lines else None
