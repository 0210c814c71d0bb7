"""End-to-end VNC update latency: pyxenfb against libvncserver, same picture, same run.

    uv run python bench/bench_vs_libvncserver.py [--updates N] [--size WxH ...]
                                                 [--picture xanim|test] [--before-tree DIR]

Needs gcc, pkg-config and libvncserver-dev (`apt-get install -y
libvncserver-dev`); the command line exits with status 2 and one line of
explanation if one is missing, `run()` returns an empty list.

It compiles bench/lvs_server.c (a minimal libvncserver server) into a
temporary directory, writes the picture there as raw BGRX, and serves it from
two processes: the C server and a pyxenfb VncDisplay (this script re-run with
--serve-pyxenfb, so neither server shares an interpreter or a GIL with the
client).  --before-tree DIR adds a third server: pyxenfb imported from DIR
(e.g. an exported older commit), for before/after figures from one run.

Pictures: "xanim" is frame 0 of /work/shared/bench/xanim.c's gradient (the
x11vnc anchor's content: a diagonal gradient with 5 solid blocks), "test" is
the reference guest's test picture (gradients, x^y blue, colour bars, a
checker: many raw tiles).

For each of Raw, Hextile, Zlib, ZRLE and Tight (no JPEG: no quality
pseudo-encoding is sent) one connection per server asks for 32 bpp depth 24
little-endian R16 G8 B0 (the servers' native format, so neither converts
pixels) and that one encoding, discards one warm-up update, then times N
non-incremental full-screen FramebufferUpdateRequests, one at a time: from
sending the request to having read the whole FramebufferUpdate.  The servers
take turns update by update, so load drift on a shared host hits all alike.
The client never decodes pixels; it only walks the encoding far enough to
find where each rectangle ends.

Printed per encoding: median and best ms per update for each server, the
ratio pyxenfb / libvncserver, bytes and rectangles per update, and the time
this client needs to walk the same update from memory (its own share of
the measured time).  The host may be loaded: trust the ratios, not the
absolute figures.

`run(quick)` is the same measurement as a function for `python -m bench`:
one dict per encoding and size (xanim picture; quick: 800x600 only, 30
updates; else also 1920x1080, 40 updates: on a shared 2-core host the median
of 10 moved Hextile's ratio by +-0.2 between runs).
"""
from __future__ import annotations

import argparse
import os
import selectors
import shlex
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyxenfb.rfb.client import NEED_DATA, Connection, FramebufferUpdate, RfbError, ServerInit
from pyxenfb.rfb.listener import VNC_BASE_PORT
from pyxenfb.rfb.states import HEXTILE, RAW, TIGHT, ZLIB, ZRLE

BPP = 4
TIMEOUT = 30.0          # seconds, for every socket read and server start
CHUNK = 1 << 20         # one recv_into at most
UPDATES_QUICK, UPDATES_FULL = 30, 40    # timed updates per encoding and server in run()

ENCODINGS = {"Raw": RAW, "Hextile": HEXTILE, "Zlib": ZLIB, "ZRLE": ZRLE, "Tight": TIGHT}
NAMES = {v: k for k, v in ENCODINGS.items()}


class ProtocolFailure(Exception):
    """The server sent something this client cannot walk."""


# ------------------------------------------------------------------ client
def _walked(conn: Connection, ev, width: int, height: int) -> tuple[int, set[int]]:
    """(rectangles, encodings seen) of one FramebufferUpdate that covers the screen."""
    if not isinstance(ev, FramebufferUpdate):
        raise ProtocolFailure(f"server message {type(ev).__name__} where a FramebufferUpdate was due")
    if ev.area != width * height:
        raise ProtocolFailure(f"update covered {ev.area} pixels, not {width * height}")
    return len(ev.rects), {r.encoding for r in ev.rects if r.encoding >= 0}


class Client:
    """One RFB 3.8 connection: security None, shared, one encoding, walked by
    the sans-IO client without decoding (it finds where each rectangle ends)."""

    def __init__(self, port: int, encoding: int, width: int, height: int):
        self.width, self.height = width, height
        self.request = struct.pack(">BBHHHH", 3, 0, 0, 0, width, height)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.settimeout(TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = Connection(encodings=[encoding], decode=False)
        self.consumed = 0               # bytes received: the server sends nothing unasked
        self._scratch = memoryview(bytearray(CHUNK))
        ev = self._next()
        if not isinstance(ev, ServerInit):
            raise ProtocolFailure(f"{type(ev).__name__} before ServerInit")
        if (ev.width, ev.height) != (width, height):
            raise ProtocolFailure(f"desktop is {ev.width}x{ev.height}, expected {width}x{height}")
        self.sock.sendall(self.conn.data_to_send())

    def _next(self):
        conn = self.conn
        try:
            while (ev := conn.next_event()) is NEED_DATA:
                out = conn.data_to_send()
                if out:
                    self.sock.sendall(out)
                n = self.sock.recv_into(self._scratch, CHUNK)
                self.consumed += n
                conn.receive_data(self._scratch[:n])
        except RfbError as exc:
            raise ProtocolFailure(str(exc)) from None
        return ev

    def update(self) -> tuple[float, int, int, set[int]]:
        """One full update: (seconds, bytes, rectangles, encodings seen)."""
        start = self.consumed
        t0 = time.perf_counter()
        self.sock.sendall(self.request)
        rects, seen = _walked(self.conn, self._next(), self.width, self.height)
        return time.perf_counter() - t0, self.consumed - start, rects, seen

    def close(self) -> None:
        self.sock.close()


def parse_cost(update: bytes, width: int, height: int, repeat: int = 5) -> float:
    """Best time for this client to walk a recorded update from memory."""
    best = float("inf")
    view = memoryview(update)
    for _ in range(repeat):
        conn = Connection(established=(width, height), decode=False)
        t0 = time.perf_counter()
        for i in range(0, len(view), CHUNK):
            conn.receive_data(view[i:i + CHUNK])
        try:
            _walked(conn, conn.next_event(), width, height)
        except RfbError as exc:
            raise ProtocolFailure(str(exc)) from None
        best = min(best, time.perf_counter() - t0)
    return best


def measure(servers: dict[str, int], encoding: str, width: int, height: int,
            updates: int) -> dict[str, dict]:
    """Per server (name -> port): median/best seconds, bytes, rectangles...
    The servers take turns, one update each (first one, then the other
    first), so drift hits all alike."""
    clients, recorded = {}, {}
    try:
        for server, port in servers.items():
            try:
                clients[server] = Client(port, ENCODINGS[encoding], width, height)
                clients[server].conn.record = bytearray()    # the warm-up update, kept
                clients[server].update()
            except (ProtocolFailure, OSError) as exc:
                raise ProtocolFailure(f"{server}, {encoding}: {exc}") from None
            recorded[server], clients[server].conn.record = bytes(clients[server].conn.record), None
        runs = {server: [] for server in servers}
        turns = list(clients.items())
        for i in range(updates):
            # who goes first alternates: neither always follows the other's update
            for server, client in (turns if i % 2 == 0 else turns[::-1]):
                try:
                    runs[server].append(client.update())
                except (ProtocolFailure, OSError) as exc:
                    raise ProtocolFailure(f"{server}, {encoding}: {exc}") from None
    finally:
        for client in clients.values():
            client.close()
    out = {}
    for server, rs in runs.items():
        times = [r[0] for r in rs]
        out[server] = {"median": statistics.median(times), "best": min(times),
                       "bytes": round(statistics.mean(r[1] for r in rs)),
                       "rects": max(r[2] for r in rs),
                       "seen": set().union(*(r[3] for r in rs)),
                       "parse": parse_cost(recorded[server], width, height)}
    return out


# ------------------------------------------------------------------ servers
def free_port() -> int:
    """A free TCP port >= 5900 (pyxenfb listens by display number)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= VNC_BASE_PORT:
            return port


class Unavailable(Exception):
    """A build requirement is missing (the message says which)."""


def build_lvs(tmp: Path) -> Path:
    missing = [tool for tool in ("gcc", "pkg-config") if shutil.which(tool) is None]
    if missing:
        raise Unavailable(f"{' and '.join(missing)} not installed "
                          "(apt-get install -y gcc pkg-config)")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libvncserver"],
                           capture_output=True, text=True)
    if flags.returncode != 0:
        raise Unavailable("libvncserver-dev not installed (apt-get install -y libvncserver-dev)")
    exe = tmp / "lvs_server"
    src = Path(__file__).with_name("lvs_server.c")
    cc = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src),
                         *shlex.split(flags.stdout)], capture_output=True, text=True)
    if cc.returncode != 0:
        raise RuntimeError(f"compiling {src} failed:\n{cc.stderr}")
    return exe


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a server process and wait for its READY line."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line = proc.stdout.readline() if sel.select(TIMEOUT) else b""
    sel.close()
    if line.strip() != b"READY":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text(errors='replace')}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def serve_pyxenfb(port: int, picture: str, width: int, height: int) -> None:
    """Child process: a pyxenfb VncDisplay showing the picture until killed."""
    import asyncio

    import numpy as np

    from pyxenfb.console.core import Console, Surface
    from pyxenfb.convert import GUEST_32
    from pyxenfb.vnc import VncDisplay

    rows = np.fromfile(picture, np.uint8).reshape(height, width * BPP)

    async def main():
        console = Console("bench", asyncio.get_running_loop())
        console.set_surface(Surface(width, height, width * BPP, GUEST_32, rows))
        server = VncDisplay(console, name="bench")
        await server.listen("127.0.0.1", port - VNC_BASE_PORT)
        print("READY", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def xanim_picture(width: int, height: int):
    """Frame 0 of xanim.c's gradient: (height, width) uint32 0x00RRGGBB."""
    import numpy as np
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r = ((x + y) // 4) & 255
    g = (y * 256 // height) & 255
    b = (255 - x // 8) & 255
    pic = (r << 16 | g << 8 | b).astype(np.uint32)
    # The 5 blocks at their starting places: x, y, w, h, colour.
    for bx, by, bw, bh, colour in ((50, 40, width // 8, height // 7, 0xFFFFFF),
                                   (300, 200, width // 10, height // 5, 0x202020),
                                   (600, 100, width // 6, height // 9, 0xE03030),
                                   (100, 400, width // 12, height // 12, 0x30E030),
                                   (700, 300, width // 9, height // 6, 0x3030E0)):
        pic[by:by + bh, bx:bx + bw] = colour
    return pic


def write_picture(path: Path, picture: str, width: int, height: int) -> None:
    if picture == "xanim":
        pic = xanim_picture(width, height)
    else:
        from pyxenfb.sim.picture import test_picture
        pic = test_picture(width, height)
    path.write_bytes(pic.astype("<u4").tobytes())


def measure_case(picture: str, width: int, height: int, updates: int, defer_ms: int = 0,
                 before_tree: str | None = None) -> dict[str, dict[str, dict]]:
    """Every encoding for one picture and size: {encoding: {server: result}}."""
    with tempfile.TemporaryDirectory(prefix="bench-lvs-") as tmpdir:
        tmp = Path(tmpdir)
        exe = build_lvs(tmp)
        pic = tmp / "picture.bgrx"
        write_picture(pic, picture, width, height)
        size = [str(width), str(height)]
        commands = {"libvncserver": [str(exe), None, str(pic), *size, str(defer_ms)],
                    "pyxenfb": [sys.executable, __file__, "--serve-pyxenfb", None, str(pic), *size]}
        env = {}
        if before_tree:
            commands["before"] = commands["pyxenfb"]
            env["before"] = dict(os.environ, PYTHONPATH=os.path.abspath(before_tree))
        servers, procs = {}, []
        try:
            for server, cmd in commands.items():
                port = free_port()
                while port in servers.values():
                    port = free_port()
                cmd = [str(port) if a is None else a for a in cmd]
                procs.append(start(cmd, tmp / f"{server}.log", env.get(server)))
                servers[server] = port
            return {name: measure(servers, name, width, height, updates) for name in ENCODINGS}
        finally:
            for proc in procs:
                stop(proc)


def run(quick: bool) -> list[dict]:
    """pyxenfb against libvncserver, for `python -m bench`: one dict per
    encoding and size (xanim picture), ratio = pyxenfb time / libvncserver
    time (< 1 is better).  Empty when libvncserver-dev, gcc or pkg-config
    is missing (the reason goes to stderr)."""
    sizes = [(800, 600)] if quick else [(800, 600), (1920, 1080)]
    out = []
    for width, height in sizes:
        try:
            results = measure_case("xanim", width, height, UPDATES_QUICK if quick else UPDATES_FULL)
        except Unavailable as exc:
            print(f"bench_vs_libvncserver skipped: {exc}", file=sys.stderr)
            return []
        for name, r in results.items():
            lvs, py = r["libvncserver"], r["pyxenfb"]
            out.append({"name": f"VNC full update, {name}, {width}x{height} xanim",
                        "value": round(py["median"] * 1e3, 3), "unit": "ms",
                        "baseline": "libvncserver",
                        "baseline_value": round(lvs["median"] * 1e3, 3),
                        "ratio": round(py["median"] / lvs["median"], 3),
                        "bytes": py["bytes"], "baseline_bytes": lvs["bytes"]})
    return out


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=20, help="timed updates per encoding (20)")
    ap.add_argument("--size", action="append", metavar="WxH",
                    help="picture size, repeatable (default 800x600)")
    ap.add_argument("--picture", choices=("xanim", "test"), default="xanim")
    ap.add_argument("--before-tree", metavar="DIR",
                    help="also serve pyxenfb imported from DIR (a before/after column)")
    ap.add_argument("--lvs-defer-ms", type=int, default=0,
                    help="libvncserver deferUpdateTime (library default 5; 0 = answer at once)")
    ap.add_argument("--serve-pyxenfb", nargs=4, metavar=("PORT", "PICTURE", "W", "H"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.updates < 1:
        ap.error("--updates must be at least 1")
    if args.serve_pyxenfb:
        port, picture, w, h = args.serve_pyxenfb
        serve_pyxenfb(int(port), picture, int(w), int(h))
        return
    sizes = []
    for text in args.size or ["800x600"]:
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            ap.error(f"--size {text}: expected WxH")
        sizes.append((w, h))
    for width, height in sizes:
        try:
            results = measure_case(args.picture, width, height, args.updates, args.lvs_defer_ms,
                                   args.before_tree)
        except Unavailable as exc:
            print(f"skipped: {exc}")
            sys.exit(2)
        report(results, args, width, height)


def report(results: dict, args, width: int, height: int) -> None:
    lvs_version = subprocess.run(["pkg-config", "--modversion", "libvncserver"],
                                 capture_output=True, text=True).stdout.strip()
    print(f"{width}x{height} {args.picture} picture, 32bpp depth 24; {args.updates} full updates "
          f"per encoding after 1 warm-up, servers taking turns; libvncserver {lvs_version} "
          f"(deferUpdateTime {args.lvs_defer_ms} ms); Python {sys.version.split()[0]}; "
          f"{os.cpu_count()} CPUs")
    before = "before" in next(iter(results.values()))
    print(f"{'':8} {'libvncserver ms':>16} {'pyxenfb ms':>16} {'py/lvs':>7} "
          + (f"{'before ms':>9} {'bef/lvs':>7} " if before else "")
          + f"{'bytes/update':>19} {'rects':>7} {'client walk ms':>15}")
    print(f"{'encoding':8} {'median':>8}{'best':>8} {'median':>8}{'best':>8} {'median':>7} "
          + (f"{'median':>9} {'median':>7} " if before else "")
          + f"{'libvncserver':>12}{'pyxenfb':>9} {'lvs':>3}/{'py':<3} {'lvs':>7}{'py':>8}")
    notes = []
    for name, r in results.items():
        lvs, py = r["libvncserver"], r["pyxenfb"]
        extra = ""
        if before:
            b = r["before"]
            extra = f"{b['median'] * 1e3:9.2f} {b['median'] / lvs['median']:7.2f} "
        print(f"{name:8} {lvs['median'] * 1e3:8.2f}{lvs['best'] * 1e3:8.2f} "
              f"{py['median'] * 1e3:8.2f}{py['best'] * 1e3:8.2f} "
              f"{py['median'] / lvs['median']:7.2f} {extra}{lvs['bytes']:12d}{py['bytes']:9d} "
              f"{lvs['rects']:>3}/{py['rects']:<3} {lvs['parse'] * 1e3:7.2f}{py['parse'] * 1e3:8.2f}")
        for server, res in r.items():
            if res["seen"] != {ENCODINGS[name]}:
                notes.append(f"note: {server} answered {name} with "
                             f"{', '.join(NAMES.get(e, str(e)) for e in sorted(res['seen']))}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    try:
        main()
    except ProtocolFailure as exc:
        sys.exit(f"protocol error: {exc}")
