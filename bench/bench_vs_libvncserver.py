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
one dict per encoding and size (xanim picture; quick: 800x600 only, 10
updates; else also 1920x1080, 20 updates).
"""
from __future__ import annotations

import argparse
import io
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

BPP = 4
TPIXEL = 3              # Tight pixels are R,G,B bytes at 32 bpp depth 24
TIMEOUT = 30.0          # seconds, for every socket read and server start

RAW, HEXTILE, ZLIB, TIGHT, ZRLE = 0, 5, 6, 7, 16
DESKTOP_SIZE, LAST_RECT = -223, -224
ENCODINGS = {"Raw": RAW, "Hextile": HEXTILE, "Zlib": ZLIB, "ZRLE": ZRLE, "Tight": TIGHT}
NAMES = {v: k for k, v in ENCODINGS.items()}

# Client -> server messages, in the format both servers use natively.
SET_PIXEL_FORMAT = struct.pack(">B3xBBBBHHHBBB3x", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


class ProtocolFailure(Exception):
    """The server sent something this client cannot walk."""


# ------------------------------------------------------------------ client
class Reader:
    """Buffered reads from a socket (or, to time the parser alone, from memory).

    Only `consumed` matters for accounting; big payloads are skipped into a
    scratch buffer so Raw frames cost no Python-level copying.
    """

    def __init__(self, recv_into):
        self._recv_into = recv_into
        self._buf = bytearray()
        self._pos = 0
        self._scratch = memoryview(bytearray(1 << 20))
        self.consumed = 0
        self.record: bytearray | None = None      # set to capture raw bytes

    def _more(self) -> None:
        n = self._recv_into(self._scratch, len(self._scratch))
        if not n:
            raise ProtocolFailure(f"server closed the connection after {self.consumed} bytes")
        if self.record is not None:
            self.record += self._scratch[:n]
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += self._scratch[:n]

    def take(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            self._more()
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        self.consumed += n
        return out

    def u8(self) -> int:
        if self._pos >= len(self._buf):
            self._more()
        self._pos += 1
        self.consumed += 1
        return self._buf[self._pos - 1]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def skip(self, n: int) -> None:
        self.consumed += n
        have = len(self._buf) - self._pos
        if n <= have:
            self._pos += n
            return
        n -= have
        self._buf.clear()
        self._pos = 0
        while n:
            got = self._recv_into(self._scratch, min(n, len(self._scratch)))
            if not got:
                raise ProtocolFailure("server closed the connection inside a rectangle")
            if self.record is not None:
                self.record += self._scratch[:got]
            n -= got

    # ---- rectangle walkers: consume one rectangle's payload, decode nothing
    def walk_raw(self, w: int, h: int) -> None:
        self.skip(w * h * BPP)

    def walk_zlib(self, w: int, h: int) -> None:       # Zlib and ZRLE alike
        self.skip(self.u32())

    def walk_hextile(self, w: int, h: int) -> None:
        for ty in range(0, h, 16):
            th = min(16, h - ty)
            for tx in range(0, w, 16):
                mask = self.u8()
                if mask & 1:                            # Raw tile
                    self.skip(min(16, w - tx) * th * BPP)
                    continue
                if mask > 31:
                    raise ProtocolFailure(f"Hextile: bad subencoding mask {mask:#x}")
                colours = (BPP if mask & 2 else 0) + (BPP if mask & 4 else 0)
                if mask & 8:                            # AnySubrects
                    self.skip(colours)
                    self.skip(self.u8() * (BPP + 2 if mask & 16 else 2))
                else:
                    self.skip(colours)

    def compact_length(self) -> int:
        b = self.u8()
        n = b & 0x7F
        if b & 0x80:
            b = self.u8()
            n |= (b & 0x7F) << 7
            if b & 0x80:
                n |= self.u8() << 14
        return n

    def walk_tight(self, w: int, h: int) -> None:
        kind = self.u8() >> 4                           # low nibble: zlib resets
        if kind == 0x8:                                 # Fill
            self.skip(TPIXEL)
        elif kind == 0x9:                               # JPEG
            self.skip(self.compact_length())
        elif kind < 0x8 or kind in (0xA, 0xE):          # Basic (0xA/0xE: without zlib)
            filter_id = self.u8() if kind & 0x4 else 0
            if filter_id == 1:                          # Palette
                colours = self.u8() + 1
                self.skip(colours * TPIXEL)
                size = (w + 7) // 8 * h if colours == 2 else w * h
            elif filter_id in (0, 2):                   # Copy, Gradient
                size = w * h * TPIXEL
            else:
                raise ProtocolFailure(f"Tight: unknown filter id {filter_id}")
            # Short data goes uncompressed and without a length.
            self.skip(size if size < 12 else self.compact_length())
        else:
            raise ProtocolFailure(f"Tight: bad compression control {kind:#x}")

    WALKERS = {RAW: walk_raw, HEXTILE: walk_hextile, ZLIB: walk_zlib, ZRLE: walk_zlib,
               TIGHT: walk_tight}

    def read_update(self, width: int, height: int) -> tuple[int, set[int]]:
        """Walk one FramebufferUpdate; returns (rectangles, encodings seen)."""
        msg = self.u8()
        if msg != 0:
            raise ProtocolFailure(f"server message type {msg} where a FramebufferUpdate was due")
        self.skip(1)
        count = self.u16()
        rects, area, seen = 0, 0, set()
        # 0xFFFF: the count is unknown and a LastRect rectangle ends the update.
        while count == 0xFFFF or rects < count:
            x, y, w, h, encoding = struct.unpack(">HHHHi", self.take(12))
            if encoding == LAST_RECT:
                break
            rects += 1
            if encoding == DESKTOP_SIZE:
                continue
            walker = self.WALKERS.get(encoding)
            if walker is None:
                raise ProtocolFailure(f"unexpected encoding {encoding} in rectangle "
                                      f"{w}x{h}+{x}+{y} (asked only for real encodings)")
            walker(self, w, h)
            seen.add(encoding)
            area += w * h
        if area != width * height:
            raise ProtocolFailure(f"update covered {area} pixels, not {width * height}")
        return rects, seen


class Client:
    """One RFB 3.8 connection: security None, shared, one encoding."""

    def __init__(self, port: int, encoding: int, width: int, height: int):
        self.width, self.height = width, height
        self.request = struct.pack(">BBHHHH", 3, 0, 0, 0, width, height)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.settimeout(TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rd = Reader(self.sock.recv_into)
        self._handshake(encoding)

    def _handshake(self, encoding: int) -> None:
        rd = self.rd
        version = rd.take(12)
        if not version.startswith(b"RFB 003."):
            raise ProtocolFailure(f"not an RFB server: {version!r}")
        self.sock.sendall(b"RFB 003.008\n")
        types = rd.take(rd.u8())
        if 1 not in types:
            reason = rd.take(rd.u32()) if not types else types
            raise ProtocolFailure(f"security type None not offered: {reason!r}")
        self.sock.sendall(b"\x01")
        if rd.u32() != 0:
            raise ProtocolFailure(f"security failed: {rd.take(rd.u32())!r}")
        self.sock.sendall(b"\x01")                      # ClientInit: shared
        w, h = rd.u16(), rd.u16()
        rd.take(16)                                     # server pixel format
        rd.take(rd.u32())                               # desktop name
        if (w, h) != (self.width, self.height):
            raise ProtocolFailure(f"desktop is {w}x{h}, expected {self.width}x{self.height}")
        self.sock.sendall(SET_PIXEL_FORMAT + struct.pack(">BxHi", 2, 1, encoding))

    def update(self) -> tuple[float, int, int, set[int]]:
        """One full update: (seconds, bytes, rectangles, encodings seen)."""
        start = self.rd.consumed
        t0 = time.perf_counter()
        self.sock.sendall(self.request)
        rects, seen = self.rd.read_update(self.width, self.height)
        return time.perf_counter() - t0, self.rd.consumed - start, rects, seen

    def close(self) -> None:
        self.sock.close()


def parse_cost(update: bytes, width: int, height: int, repeat: int = 5) -> float:
    """Best time for this client to walk a recorded update from memory."""
    best = float("inf")
    for _ in range(repeat):
        src = io.BytesIO(update)
        rd = Reader(lambda buf, n: src.readinto(buf[:n]))
        t0 = time.perf_counter()
        rd.read_update(width, height)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(servers: dict[str, int], encoding: str, width: int, height: int,
            updates: int) -> dict[str, dict]:
    """Per server (name -> port): median/best seconds, bytes, rectangles...
    The servers take turns, one update each, so drift hits all alike."""
    clients, recorded = {}, {}
    try:
        for server, port in servers.items():
            try:
                clients[server] = Client(port, ENCODINGS[encoding], width, height)
                clients[server].rd.record = bytearray()      # the warm-up update, kept
                clients[server].update()
            except (ProtocolFailure, OSError) as exc:
                raise ProtocolFailure(f"{server}, {encoding}: {exc}") from None
            recorded[server], clients[server].rd.record = bytes(clients[server].rd.record), None
        runs = {server: [] for server in servers}
        for _ in range(updates):
            for server, client in clients.items():
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
        if port >= 5900:
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
        await server.listen("127.0.0.1", port - 5900)
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
            results = measure_case("xanim", width, height, 10 if quick else 20)
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
