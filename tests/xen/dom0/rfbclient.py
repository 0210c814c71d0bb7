#!/usr/bin/env python3
"""A small VNC (RFB 3.8) test client for dom0: pyxenfb.rfb.client over a socket.

    rfbclient.py HOST PORT RESULT.json [--password PW] ACTION...
    rfbclient.py decode RESULT.json          (on the host: captures -> PPM files)

Actions, run in order on one connection:
  grab:ENC:OUT       full, non-incremental update in encoding ENC (raw, rre,
                     hextile, zlib, zrle, tight). Dom0 runs under TCG, where
                     decoding in Python is slow, so the update is only parsed
                     for its length and its wire bytes saved as OUT.rfb;
                     `decode` (same decoders, full speed on the host) writes
                     OUT.ppm. The encodings the server really used are recorded.
  hold:S:OUT.ppm     a live Tight client: asks for Tight (+ DesktopSize), takes
                     a full frame and decodes it here (Tight's decoder is cheap
                     enough in dom0: zlib and byte-string slicing), writes it as
                     OUT.ppm (renamed into place: its appearance tells a waiting
                     script "the client has a full frame"), then keeps asking
                     for incremental updates and decoding them until the file
                     OUT.ppm.stop exists, at most S seconds (OUT.ppm is then
                     rewritten if any update came meanwhile).
  key:KS[,KS...]     press + release of each X keysym (hex or decimal)
  down:KS / up:KS    press / release only (modifiers)
  ptr:X,Y,MASK       pointer event (mask bit 0 left, 1 middle, 2 right, 3/4 wheel)
  sync               a 1x1 non-incremental update: when it arrives the server
                     has handled every message sent before it
RESULT.json gets the handshake (security types offered, auth outcome, reason)
and one entry per grab. Exit status 0 when every action ran, 3 when the server
refused the connection / authentication (recorded, not a crash).
VNC authentication (type 2) uses DES from pycryptodome (on PYTHONPATH).
The protocol and the decoders are pyxenfb.rfb.client's (standard library
only); the project source is found beside this file or at /host/src (dom0).
"""
import json
import os
import select
import signal
import socket
import sys
import time

sys.dont_write_bytecode = True          # nothing written into the shared source tree
for _src in (os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."), "/host/src"):
    if os.path.isfile(os.path.join(_src, "pyxenfb", "rfb", "client.py")):
        sys.path.insert(0, os.path.abspath(_src))
        break

from pyxenfb.rfb.client import (NEED_DATA, Connection, ConnectionClosed, FramebufferUpdate,  # noqa: E402
                                Refused, RfbError)
from pyxenfb.rfb.states import DESKTOP_SIZE, HEXTILE, RAW, RRE, TIGHT, ZLIB, ZRLE  # noqa: E402

ENCODINGS = {"raw": RAW, "rre": RRE, "hextile": HEXTILE, "zlib": ZLIB, "zrle": ZRLE, "tight": TIGHT}
TIMEOUT_S = 30


class Client:
    """A socket (live) or a recorded capture (replay) around one Connection."""

    def __init__(self, host=None, port=None, data=None, skim=True):
        """Live (host, port): skim mode, updates are captured, not decoded.
        Replay (data = captured bytes): decodes into the framebuffer."""
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT_S) if data is None else None
        self.replay, self.pos = data, 0
        self.skim = skim and data is None
        self.conn = None                    # live: made by handshake(); replay: by the first update
        self.tight_palettes = []    # decoded Tight palette rectangles: x, y, w, h, colours, first, last
        self.area = 0                               # pixels covered by the last update's rectangles
        self.width = self.height = 0
        self.fb = bytearray()                       # BGRX, 4 bytes a pixel
        self.info = {}

    def send(self):
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    # ---- handshake --------------------------------------------------------
    def handshake(self, password):
        conn = self.conn = Connection(password, require_auth=password is not None)
        try:
            while conn.next_event() is NEED_DATA:
                self.send()
                # big reads: in a PV dom0 under TCG every syscall is expensive
                conn.receive_data(self.sock.recv(1 << 17))
            self.send()
        finally:
            for key in ("server_version", "security_types", "auth", "reason"):
                if getattr(conn, key):
                    self.info[key] = getattr(conn, key)
        self.width, self.height, self.fb = conn.width, conn.height, conn.fb
        self.info["name"] = conn.name
        self.info["size"] = [self.width, self.height]

    # ---- framebuffer updates ----------------------------------------------
    def set_encodings(self, encodings):
        self.conn.set_encodings(encodings)
        self.send()

    def request(self, x, y, w, h, incremental=False):
        self.conn.request(incremental, x, y, w, h)
        self.send()

    def read_update(self, timeout=None):
        """Read server messages until one FramebufferUpdate; returns encodings used
        (None when `timeout` seconds pass without a byte from the server)."""
        if self.replay is not None:
            return self._replay_update()
        conn = self.conn
        conn.decode = not self.skim
        try:
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
                        return None
                    conn.receive_data(self.sock.recv(1 << 17))
                elif isinstance(ev, FramebufferUpdate):
                    return self._took(ev)
        except ConnectionClosed as e:
            raise EOFError(str(e)) from None
        except Refused:
            raise
        except RfbError as e:
            raise ValueError(str(e)) from None

    def _replay_update(self):
        conn = self.conn
        if conn is None:
            conn = self.conn = Connection(established=(self.width, self.height))
        conn.width, conn.height, conn.fb = self.width, self.height, self.fb
        conn.decode = not self.skim
        conn.record = bytearray()
        conn.receive_data(memoryview(self.replay)[self.pos:])
        try:
            ev = conn.next_event()
        except RfbError as e:
            raise ValueError(str(e)) from None
        self.pos += len(conn.record)
        conn.record = None
        if not isinstance(ev, FramebufferUpdate):
            raise EOFError("capture ends early")
        return self._took(ev)

    def _took(self, ev):
        conn = self.conn
        self.width, self.height, self.fb = conn.width, conn.height, conn.fb
        self.area = ev.area
        if conn.decode:
            self.tight_palettes += [[r.x, r.y, r.w, r.h, len(r.palette) // 3, r.palette[:3].hex(),
                                     r.palette[-3:].hex()] for r in ev.rects if r.palette is not None]
        return [r.encoding for r in ev.rects]

    def ppm(self):
        return self.conn.ppm()


def keysyms(text):
    return [int(k, 0) for k in text.split(",") if k]


def hold(client, seconds, ppm_path, result):
    """A live Tight client: one full frame, decoded and written to ppm_path, then
    incremental updates decoded until ppm_path + ".stop" exists, at most `seconds`."""
    client.skim = False
    client.set_encodings([TIGHT, DESKTOP_SIZE])
    info = {"seconds": seconds, "updates": 0, "rects_area": 0, "encodings_used": []}
    result["hold"] = info
    used = set()
    t0 = time.monotonic()
    client.request(0, 0, client.width, client.height)
    covered = 0
    while True:                       # a server may split the first frame over updates
        used.update(client.read_update())
        info["updates"] += 1
        covered += client.area
        if covered >= client.width * client.height:
            break
        client.request(0, 0, client.width, client.height, incremental=True)
    info["first_frame_s"] = round(time.monotonic() - t0, 3)
    info["tight_palettes"] = client.tight_palettes[:]
    info["size"] = [client.width, client.height]
    with open(ppm_path + ".tmp", "wb") as f:
        f.write(client.ppm())
    os.replace(ppm_path + ".tmp", ppm_path)
    deadline = time.monotonic() + seconds
    stop = ppm_path + ".stop"
    info["stopped_by"] = "time"
    client.request(0, 0, client.width, client.height, incremental=True)
    while True:
        info["encodings_used"] = sorted(used)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if os.path.exists(stop):
            info["stopped_by"] = "stop file"
            break
        # None: nothing came from the server meanwhile (a partial update waits in the client)
        got = client.read_update(timeout=min(remaining, 0.25))
        if got is not None:
            used.update(got)
            info["updates"] += 1
            info["rects_area"] += client.area
            client.request(0, 0, client.width, client.height, incremental=True)
    info["held_s"] = round(time.monotonic() - t0, 3)
    if info["rects_area"]:            # the picture changed meanwhile: OUT.ppm is the last frame
        with open(ppm_path + ".tmp", "wb") as f:
            f.write(client.ppm())
        os.replace(ppm_path + ".tmp", ppm_path)


def run(client, actions, result):
    for action in actions:
        kind, _, arg = action.partition(":")
        if kind == "grab":
            name, _, path = arg.partition(":")
            client.set_encodings([ENCODINGS[name], DESKTOP_SIZE])
            size = [client.width, client.height]
            client.request(0, 0, client.width, client.height)
            client.conn.record = bytearray()       # the update's bytes, as they came
            used = client.read_update()
            with open(path + ".rfb", "wb") as f:
                f.write(client.conn.record)
            client.conn.record = None
            result["grabs"].append({"encoding": name, "file": path, "size": size,
                                    "encodings_used": sorted(set(used))})
        elif kind == "key":
            for ks in keysyms(arg):
                client.conn.key_event(ks, True)
                client.conn.key_event(ks, False)
            client.send()
        elif kind in ("down", "up"):
            for ks in keysyms(arg):
                client.conn.key_event(ks, kind == "down")
            client.send()
        elif kind == "ptr":
            px, py, mask = (int(v) for v in arg.split(","))
            client.conn.pointer_event(px, py, mask)
            client.send()
        elif kind == "hold":
            seconds, _, path = arg.partition(":")
            hold(client, float(seconds), path, result)
        elif kind == "sync":
            client.set_encodings([RAW, DESKTOP_SIZE])
            client.request(0, 0, 1, 1)
            client.read_update()
        else:
            raise ValueError("unknown action %r" % action)
        result["done"].append(action)


def decode(result_path):
    """Host side: turn the captures of one connection (in order) into PPM files.
    Returns the result with each grab's Tight palette rectangles added."""
    with open(result_path) as f:
        result = json.load(f)
    state = None
    here = os.path.dirname(os.path.abspath(result_path))   # dom0 wrote its own paths
    for grab in result["grabs"]:                       # in capture order: zlib streams persist
        path = os.path.join(here, os.path.basename(grab["file"]))
        with open(path + ".rfb", "rb") as f:
            data = f.read()
        if state is None:
            state = Client(data=data)
            state.width, state.height = grab["size"]
            state.fb = bytearray(state.width * state.height * 4)
        state.replay, state.pos, state.tight_palettes = data, 0, []
        state.read_update()
        grab["tight_palettes"] = state.tight_palettes     # in the returned result only
        if state.pos != len(data):
            raise ValueError("%s: %d bytes left over after the update" % (path, len(data) - state.pos))
        with open(path, "wb") as f:
            f.write(state.ppm())
    return result


class Terminated(Exception):
    pass


def _terminated(signum, frame):
    raise Terminated("killed by signal %d (timeout)" % signum)


def main(argv):
    signal.signal(signal.SIGTERM, _terminated)     # `timeout` must not lose the result file
    if argv[:1] == ["decode"] and len(argv) == 2:
        decode(argv[1])
        return 0
    if len(argv) < 3:
        print(__doc__)
        return 2
    host, port, out = argv[0], int(argv[1]), argv[2]
    rest, password = argv[3:], None
    if rest[:1] == ["--password"]:
        password, rest = rest[1], rest[2:]
    result = {"grabs": [], "done": [], "error": None}
    status = 0
    client = None
    try:
        client = Client(host, port)
        client.handshake(password)
        run(client, rest, result)
    except Refused as e:
        result["error"], status = str(e), 3
    except (OSError, EOFError, ValueError, RfbError, Terminated) as e:
        result["error"], status = "%s: %s" % (type(e).__name__, e), 1
    finally:
        if client is not None:
            result.update(client.info)
            client.sock.close()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("rfbclient:", json.dumps({k: v for k, v in result.items() if k != "done"}))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
