#!/usr/bin/env python3
"""A small VNC (RFB 3.8) test client for dom0, independent of pyxenfb.

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
"""
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import zlib

TIGHT = 7
ENCODINGS = {"raw": 0, "rre": 2, "hextile": 5, "zlib": 6, "zrle": 16, "tight": TIGHT}
DESKTOP_SIZE = -223
TIMEOUT_S = 30


class Refused(Exception):
    pass


class Client:
    def __init__(self, host=None, port=None, data=None, skim=True):
        """Live (host, port): skim mode, updates are captured, not decoded.
        Replay (data = captured bytes): decodes into the framebuffer."""
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT_S) if data is None else None
        # buffered reads: in a PV dom0 under TCG every syscall is expensive
        self.rfile = self.sock.makefile("rb", buffering=1 << 17) if self.sock else None
        self.replay, self.pos = data, 0
        self.skim = skim and data is None
        self.capture = None                         # bytearray while a grab is captured
        self.zlib_stream = zlib.decompressobj()     # Zlib encoding: one stream per connection
        self.zrle_stream = zlib.decompressobj()     # ZRLE: its own stream
        self.tight_streams = [zlib.decompressobj() for _ in range(4)]   # Tight: four
        self.tight_palettes = []    # decoded Tight palette rectangles: x, y, w, h, colours, first, last
        self.area = 0                               # pixels covered by the last update's rectangles
        self.width = self.height = 0
        self.fb = bytearray()                       # BGRX, 4 bytes a pixel
        self.info = {}

    def rx(self, n):
        if self.replay is not None:
            if self.pos + n > len(self.replay):
                raise EOFError("capture ends early")
            self.pos += n
            return self.replay[self.pos - n:self.pos]
        buf = self.rfile.read(n)
        if len(buf) < n:
            raise EOFError("server closed the connection")
        if self.capture is not None:
            self.capture += buf
        return buf

    def u8(self):
        return self.rx(1)[0]

    def u16(self):
        return struct.unpack(">H", self.rx(2))[0]

    def u32(self):
        return struct.unpack(">I", self.rx(4))[0]

    # ---- handshake --------------------------------------------------------
    def handshake(self, password):
        version = self.rx(12)
        self.info["server_version"] = version.decode("latin-1").strip()
        self.sock.sendall(b"RFB 003.008\n")
        n = self.u8()
        if n == 0:
            self.info["reason"] = self.rx(self.u32()).decode("latin-1")
            raise Refused("connection refused: " + self.info["reason"])
        types = list(self.rx(n))
        self.info["security_types"] = types
        if password is None:
            if 1 not in types:
                self.info["auth"] = "needs-password"
                raise Refused("server needs authentication, no password given")
            self.sock.sendall(b"\x01")
        else:
            if 2 not in types:
                self.info["auth"] = "no-vnc-auth-offered"
                raise Refused("server does not offer VNC authentication")
            self.sock.sendall(b"\x02")
            challenge = self.rx(16)
            self.sock.sendall(vnc_auth_response(password, challenge))
        result = self.u32()
        if result != 0:
            try:
                self.info["reason"] = self.rx(self.u32()).decode("latin-1")
            except (EOFError, OSError):
                self.info["reason"] = None
            self.info["auth"] = "failed"
            raise Refused("authentication failed: %r" % self.info["reason"])
        self.info["auth"] = "ok"
        self.sock.sendall(b"\x01")                                  # shared
        self.width, self.height = struct.unpack(">HH", self.rx(4))
        self.rx(16)
        self.info["name"] = self.rx(self.u32()).decode("latin-1")
        self.info["size"] = [self.width, self.height]
        self.fb = bytearray(self.width * self.height * 4)
        # 32 bpp, depth 24, little endian, true colour, red << 16: BGRX bytes
        self.sock.sendall(struct.pack(">B3x", 0) +
                          struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))

    # ---- framebuffer updates ----------------------------------------------
    def set_encodings(self, encodings):
        self.sock.sendall(struct.pack(">BxH", 2, len(encodings)) +
                          b"".join(struct.pack(">i", e) for e in encodings))

    def request(self, x, y, w, h, incremental=False):
        self.sock.sendall(struct.pack(">BBHHHH", 3, int(incremental), x, y, w, h))

    def read_update(self):
        """Read server messages until one FramebufferUpdate; returns encodings used."""
        while True:
            t = self.u8()
            if t == 0:
                break
            if t == 1:                                   # colour map entries
                self.rx(3)
                self.rx(6 * self.u16())
            elif t == 2:                                 # bell
                pass
            elif t == 3:                                 # cut text
                self.rx(3)
                self.rx(self.u32())
            else:
                raise ValueError("unexpected server message type %d" % t)
        self.rx(1)
        used = []
        self.area = 0
        for _ in range(self.u16()):
            x, y, w, h, enc = struct.unpack(">HHHHi", self.rx(12))
            used.append(enc)
            if enc == DESKTOP_SIZE:
                self.width, self.height = w, h
                self.fb = bytearray(w * h * 4)
                continue
            if x + w > self.width or y + h > self.height:
                raise ValueError("rectangle %r outside %dx%d" % ((x, y, w, h), self.width, self.height))
            decode = DECODERS.get(enc)
            if decode is None:
                raise ValueError("encoding %d was not asked for" % enc)
            decode(self, x, y, w, h)
            self.area += w * h
        return used

    def put(self, x, y, w, h, data):
        if self.skim:
            return
        row = w * 4
        for j in range(h):
            p = ((y + j) * self.width + x) * 4
            self.fb[p:p + row] = data[j * row:(j + 1) * row]

    def fill(self, x, y, w, h, pixel):
        if self.skim:
            return
        self.put(x, y, w, h, pixel * (w * h))

    def ppm(self):
        rgb = bytearray(self.width * self.height * 3)
        rgb[0::3] = self.fb[2::4]
        rgb[1::3] = self.fb[1::4]
        rgb[2::3] = self.fb[0::4]
        return b"P6\n%d %d\n255\n" % (self.width, self.height) + bytes(rgb)


def decode_raw(c, x, y, w, h):
    c.put(x, y, w, h, c.rx(w * h * 4))


def decode_rre(c, x, y, w, h):
    n = c.u32()
    c.fill(x, y, w, h, c.rx(4))
    for _ in range(n):
        pixel = c.rx(4)
        sx, sy, sw, sh = struct.unpack(">HHHH", c.rx(8))
        c.fill(x + sx, y + sy, sw, sh, pixel)


def decode_hextile(c, x, y, w, h):
    bg = fg = b"\0\0\0\0"
    for ty in range(y, y + h, 16):
        for tx in range(x, x + w, 16):
            tw, th = min(16, x + w - tx), min(16, y + h - ty)
            mask = c.u8()
            if mask & 1:                                           # raw tile
                c.put(tx, ty, tw, th, c.rx(tw * th * 4))
                continue
            if mask & 2:
                bg = c.rx(4)
            if mask & 4:
                fg = c.rx(4)
            c.fill(tx, ty, tw, th, bg)
            if mask & 8:
                for _ in range(c.u8()):
                    colour = c.rx(4) if mask & 16 else fg
                    xy, wh = c.rx(2)
                    c.fill(tx + (xy >> 4), ty + (xy & 15), (wh >> 4) + 1, (wh & 15) + 1, colour)


def decode_zlib(c, x, y, w, h):
    compressed = c.rx(c.u32())
    if c.skim:
        return
    data = c.zlib_stream.decompress(compressed)
    if len(data) != w * h * 4:
        raise ValueError("zlib rectangle: %d bytes, expected %d" % (len(data), w * h * 4))
    c.put(x, y, w, h, data)


class _Bytes:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError("ZRLE data ends early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self):
        return self.take(1)[0]


def decode_zrle(c, x, y, w, h):
    compressed = c.rx(c.u32())
    if c.skim:
        return
    z = _Bytes(c.zrle_stream.decompress(compressed))
    cpixel = lambda: z.take(3) + b"\0"                              # 24-bit CPIXEL (depth 24)
    for ty in range(y, y + h, 64):
        for tx in range(x, x + w, 64):
            tw, th = min(64, x + w - tx), min(64, y + h - ty)
            sub = z.u8()
            if sub == 0:
                c.put(tx, ty, tw, th, b"".join(cpixel() for _ in range(tw * th)))
            elif sub == 1:
                c.fill(tx, ty, tw, th, cpixel())
            elif 2 <= sub <= 16:
                palette = [cpixel() for _ in range(sub)]
                bits = 1 if sub == 2 else 2 if sub <= 4 else 4
                out = []
                for _ in range(th):
                    row = z.take((tw * bits + 7) // 8)
                    for i in range(tw):
                        shift = 8 - bits - (i * bits) % 8
                        out.append(palette[(row[i * bits // 8] >> shift) & ((1 << bits) - 1)])
                c.put(tx, ty, tw, th, b"".join(out))
            elif sub == 128 or sub >= 130:
                palette = [cpixel() for _ in range(sub - 128)] if sub >= 130 else None
                out, total = [], tw * th
                while len(out) < total:
                    if palette is None:
                        pixel, run = cpixel(), 1
                    else:
                        index = z.u8()
                        pixel, run = palette[index & 127], 1
                        if not index & 128:
                            out.append(pixel)
                            continue
                    n = 255
                    while n == 255:
                        n = z.u8()
                        run += n
                    out.extend([pixel] * run)
                if len(out) != total:
                    raise ValueError("ZRLE run overflows its tile")
                c.put(tx, ty, tw, th, b"".join(out))
            else:
                raise ValueError("bad ZRLE subencoding %d" % sub)


# ---- Tight (RFB spec, "Tight Encoding") --------------------------------------
# The pixel format set in handshake() is 32 bpp, depth 24, true colour, 8-bit
# channels: Tight's TPIXEL is then 3 bytes R, G, B (not the 4-byte PIXEL).
TIGHT_MIN_TO_COMPRESS = 12          # smaller filtered data is sent as it is, no zlib
# one byte of a 1-bit palette row -> its 8 palette indices, leftmost pixel first
_BITS = [bytes((b >> (7 - i)) & 1 for i in range(8)) for b in range(256)]


def _compact_length(c):
    """1-3 bytes: 7 bits, 7 bits (each with a 'more' flag in bit 7), then 8 bits."""
    b = c.u8()
    n = b & 0x7F
    if b & 0x80:
        b = c.u8()
        n |= (b & 0x7F) << 7
        if b & 0x80:
            n |= c.u8() << 14
    return n


def _rgb_to_bgrx(rgb, npix):
    """TPIXELs (R, G, B) -> the framebuffer's B, G, R, X bytes."""
    out = bytearray(npix * 4)
    out[0::4] = rgb[2::3]
    out[1::4] = rgb[1::3]
    out[2::4] = rgb[0::3]
    return out


def _ungradient(data, w, h):
    """Undo the gradient filter: each component V = D + clamp(left + up - upleft) mod 256,
    the neighbours outside the rectangle being 0."""
    out = bytearray(w * h * 3)
    row = 3 * w
    for j in range(h):
        base = j * row
        for i in range(row):
            left = out[base + i - 3] if i >= 3 else 0
            up = out[base - row + i] if j else 0
            upleft = out[base - row + i - 3] if j and i >= 3 else 0
            p = left + up - upleft
            p = 0 if p < 0 else 255 if p > 255 else p
            out[base + i] = (data[base + i] + p) & 0xFF
    return out


def decode_tight(c, x, y, w, h):
    ctl = c.u8()
    for stream in range(4):                  # bits 0-3: reset these streams first
        if ctl & (1 << stream):
            c.tight_streams[stream] = zlib.decompressobj()
    kind = ctl >> 4
    if kind == 0x8:                          # FillCompression: one TPIXEL for the whole rectangle
        r, g, b = c.rx(3)
        c.fill(x, y, w, h, bytes((b, g, r, 0)))
        return
    if kind == 0x9:
        raise ValueError("Tight JPEG rectangle (control 0x%02x) at %r: this client sends no "
                         "JPEG quality level, so the server must stay lossless" % (ctl, (x, y, w, h)))
    if kind & 0x8:                           # 0xA0/0xE0 (without zlib, or TightPNG), others invalid
        raise ValueError("Tight control byte 0x%02x at %r: neither fill nor basic compression "
                         "(nothing else was asked for)" % (ctl, (x, y, w, h)))
    stream = kind & 0x3
    filter_id = c.u8() if kind & 0x4 else 0
    palette = None
    if filter_id in (0, 2):                  # copy, gradient: one TPIXEL per pixel
        size = w * h * 3
    elif filter_id == 1:
        palette = c.rx(3 * (c.u8() + 1))
        size = (w + 7) // 8 * h if len(palette) == 6 else w * h
    else:
        raise ValueError("Tight filter id %d at %r" % (filter_id, (x, y, w, h)))
    if size < TIGHT_MIN_TO_COMPRESS:
        data = c.rx(size)
    else:
        compressed = c.rx(_compact_length(c))
        if c.skim:
            return
        data = c.tight_streams[stream].decompress(compressed)
    if c.skim:
        return
    if len(data) != size:
        raise ValueError("Tight rectangle %r: %d bytes after zlib stream %d, expected %d"
                         % ((x, y, w, h), len(data), stream, size))
    if palette is None:
        rgb = _ungradient(data, w, h) if filter_id == 2 else data
        c.put(x, y, w, h, _rgb_to_bgrx(rgb, w * h))
        return
    n = len(palette) // 3
    c.tight_palettes.append([x, y, w, h, n, palette[:3].hex(), palette[-3:].hex()])
    if n == 2:                               # 1 bit a pixel, each row padded to a byte
        stride = (w + 7) // 8
        data = b"".join(b"".join(map(_BITS.__getitem__, data[j * stride:(j + 1) * stride]))[:w]
                        for j in range(h))
    elif data and max(data) >= n:
        raise ValueError("Tight rectangle %r: palette index %d of %d colours" % ((x, y, w, h), max(data), n))
    table = [bytes(palette[k::3]).ljust(256, b"\0") for k in range(3)]   # index -> R, G, B
    out = bytearray(w * h * 4)
    out[0::4] = data.translate(table[2])
    out[1::4] = data.translate(table[1])
    out[2::4] = data.translate(table[0])
    c.put(x, y, w, h, out)


DECODERS = {0: decode_raw, 2: decode_rre, 5: decode_hextile, 6: decode_zlib, 16: decode_zrle,
            TIGHT: decode_tight}


def vnc_auth_response(password, challenge):
    """DES-encrypt the challenge with the password; VNC uses each key byte bit-reversed."""
    from Crypto.Cipher import DES
    key = password.encode("latin-1")[:8].ljust(8, b"\0")
    key = bytes(int(format(b, "08b")[::-1], 2) for b in key)
    return DES.new(key, DES.MODE_ECB).encrypt(challenge)


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
        # the reply to an update is read whole, so nothing waits in the buffer:
        # the socket says whether the server has sent another one
        if select.select([client.sock], [], [], min(remaining, 0.25))[0]:
            used.update(client.read_update())
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
            client.capture = bytearray()
            used = client.read_update()
            with open(path + ".rfb", "wb") as f:
                f.write(client.capture)
            client.capture = None
            result["grabs"].append({"encoding": name, "file": path, "size": size,
                                    "encodings_used": sorted(set(used))})
        elif kind == "key":
            for ks in keysyms(arg):
                client.sock.sendall(struct.pack(">BBxxI", 4, 1, ks) + struct.pack(">BBxxI", 4, 0, ks))
        elif kind in ("down", "up"):
            for ks in keysyms(arg):
                client.sock.sendall(struct.pack(">BBxxI", 4, kind == "down", ks))
        elif kind == "ptr":
            px, py, mask = (int(v) for v in arg.split(","))
            client.sock.sendall(struct.pack(">BBHH", 5, mask, px, py))
        elif kind == "hold":
            seconds, _, path = arg.partition(":")
            hold(client, float(seconds), path, result)
        elif kind == "sync":
            client.set_encodings([0, DESKTOP_SIZE])
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
    except (OSError, EOFError, ValueError, Terminated) as e:
        result["error"], status = "%s: %s" % (type(e).__name__, e), 1
    finally:
        if client is not None:
            result.update(client.info)
            if client.rfile is not None:
                client.rfile.close()
            client.sock.close()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("rfbclient:", json.dumps({k: v for k, v in result.items() if k != "done"}))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
