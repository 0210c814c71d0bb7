"""The RFB client side, sans-IO: one `Connection` for every client we have.

In h11's style: the owner feeds what the socket gave with `receive_data()`
(b"" at end of file), takes events with `next_event()` until NEED_DATA, and
sends `data_to_send()`.  No sockets, no asyncio, the standard library only
(zlib, struct): the dom0 test client of the real-Xen lab imports it there.

The client always asks for one pixel format, the xen-fbfront one: 32 bpp,
depth 24, little-endian true colour, R at bit 16, so each pixel is B, G, R, X
and Tight/ZRLE's compact pixels are 3 bytes.  The picture is `fb`, a
bytearray of width * height * 4 such bytes.

Decoders: Raw, CopyRect, RRE, Hextile, Zlib, Tight (JPEG through a pluggable
`jpeg` decoder: the stdlib-only user has none), ZRLE; pseudo-encodings
DesktopSize, ExtendedDesktopSize, LastRect.  With `decode=False` an update is
only walked for its length (a client that measures a server, or dom0 under
TCG, where decoding in Python is slow).

A hostile server gets an `RfbError`, never our memory: every size it
announces is checked against the rectangle before anything is read for it,
and zlib output is capped at what the rectangle can hold.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable

from .auth import CHALLENGE_SIZE, vnc_response
from .states import (COPYRECT, DESKTOP_SIZE, EXT_DESKTOP_SIZE, HEXTILE, LAST_RECT, RAW, RRE, TIGHT, ZLIB,
                     ZRLE, ClientMsg, SecurityType, ServerMsg)

MAX_SIDE = 8192                 # larger than any Xen PV framebuffer
MAX_NAME = 4096
MAX_REASON = 4096
MAX_CUT_TEXT = 1 << 20
MAX_COLOUR_ENTRIES = 256
MAX_SCREENS = 255
# 32bpp, depth 24, little-endian, true colour, R at bit 16, G at 8, B at 0:
# the xen-fbfront format, so pyqemu-dm and QEMU send their surface unconverted.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
BPP = 4
CPIXEL = 3                      # ZRLE's CPIXEL (B, G, R) and Tight's TPIXEL (R, G, B) at this format
TIGHT_MIN_TO_COMPRESS = 12      # smaller Tight data comes as it is, without zlib
NEED_DATA = "NEED_DATA"         # next_event(): feed more bytes first
_PEEK = -(1 << 62)              # a decoder's yield: show me what is buffered (at least a byte)


class RfbError(Exception):
    """The server broke the protocol or refused us; str() is the reason."""


class Refused(RfbError):
    """The server refused the connection or the authentication."""


class PasswordRequired(Refused):
    """The server offers no security type we can satisfy (without a password)."""


class ConnectionClosed(RfbError):
    """The server closed the connection in the middle of a message."""


# ---- events -------------------------------------------------------------------
@dataclass
class ServerInit:
    width: int
    height: int
    name: str
    pixel_format: bytes         # the server's own; the client then sets PIXEL_FORMAT


@dataclass
class Rectangle:
    x: int
    y: int
    w: int
    h: int
    encoding: int
    palette: bytes | None = None   # a Tight palette rectangle's colours (R, G, B each)


@dataclass
class FramebufferUpdate:
    rects: list[Rectangle] = field(default_factory=list)
    resized: bool = False       # DesktopSize/ExtendedDesktopSize changed width/height (fb is new)

    @property
    def area(self) -> int:
        """Pixels the real (not pseudo-) rectangles covered."""
        return sum(r.w * r.h for r in self.rects if r.encoding >= 0)


@dataclass
class Bell:
    pass


@dataclass
class ServerCutText:
    text: bytes


@dataclass
class SetColourMapEntries:
    first: int
    colours: list[tuple[int, int, int]]


# ---- the connection ---------------------------------------------------------------
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_RECT = struct.Struct(">HHHHi")
# one byte of a 1-bit palette row -> its 8 palette indices, leftmost pixel first
_BITS = [bytes((b >> (7 - i)) & 1 for i in range(8)) for b in range(256)]


def _zlib_bound(n: int) -> int:
    """A generous most a deflate stream may take to say n bytes: zlib falls back to
    stored blocks (+0.03%), but zlib-ng's fastest level sends noise 5-6% larger."""
    return n + (n >> 2) + 1024


class Connection:
    """One client connection, from the server's version string on.

    password: for VNC authentication.  require_auth: with a password, refuse a
    server that does not ask for it (a test that the server really wants one).
    encodings: sent with the pixel format after ServerInit (None: send none
    yet; call set_encodings()).  decode: decode rectangles into `fb`, or
    only walk them.  jpeg: bytes -> R, G, B bytes (w * h * 3) for Tight's JPEG.
    established=(w, h): start after ServerInit (to decode a recorded update).
    send_pixel_format=False: keep the server's format (a protocol test that
    reads the wire itself; the decoders assume PIXEL_FORMAT).  version: the
    version string to answer with, instead of the best one both speak.
    """

    def __init__(self, password: str | None = None, encodings: list[int] | None = None, *,
                 decode: bool = True, jpeg: Callable[[bytes], bytes] | None = None,
                 require_auth: bool = False, shared: bool = True, max_side: int = MAX_SIDE,
                 established: tuple[int, int] | None = None, send_pixel_format: bool = True,
                 version: bytes | None = None):
        self.password, self.encodings = password, encodings
        self.require_auth, self.shared, self.max_side = require_auth, shared, max_side
        self.decode, self.jpeg = decode, jpeg
        self.send_pixel_format, self.version = send_pixel_format, version
        self.width = self.height = 0
        self.fb = bytearray()
        self.name = ""
        self.server_version = ""
        self.security_types: list[int] = []
        self.auth: str | None = None           # "ok", "needs-password", "no-vnc-auth-offered", "failed"
        self.reason: str | None = None         # the server's reason for refusing us
        self.record: bytearray | None = None   # set: every byte the parser consumes is added
        # the real encodings the server may use: Raw until SetEncodings (RFC 6143
        # 7.5.2); a recorded update (established) may use any we decode
        self.accepted: set[int] | None = None if established is not None else {RAW}
        # zlib streams ("zlib", "zrle", Tight's 0-3), made when first used: a
        # connection that only walks or never sees them holds none
        self._streams: dict[str | int, object] = {}
        self._out: list[bytes] = []
        self._events: list = []
        self._buf = bytearray()             # what the parser could not use yet
        self._skip = 0
        self._eof = False
        self._error: RfbError | None = None
        if established is not None:
            self._resize(*established)
            self._gen = self._messages()
        else:
            self._gen = self._protocol()
        self._want = 0
        self._skip = 0
        self._advance(None)

    # ---- the h11-style surface
    def receive_data(self, data: bytes) -> None:
        """What the server sent (any bytes-like object, not kept); b"" when it
        closed the connection."""
        if self._error is not None:             # the connection is over: nothing more is kept
            return
        if not data:
            self._eof = True
            self._run(self._buf)
        elif self._buf:
            self._buf += data
            self._run(self._buf)
        else:                                   # parse in place, keep only what is left
            self._run(data)

    def next_event(self):
        """The next event, or NEED_DATA; raises the RfbError that ended the connection."""
        if self._events:
            return self._events.pop(0)
        if self._error is not None:
            raise self._error
        return NEED_DATA

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def wanted(self) -> int:
        """Bytes the parser needs before it can go on (a blocking owner reads
        exactly these, so nothing past the current message is taken from the socket)."""
        if self._error is not None:
            return 0
        return self._skip or max(1, self._want - len(self._buf))    # _PEEK: 1

    @property
    def established(self) -> bool:
        return self.width > 0 and self._error is None

    # ---- client -> server messages
    def set_encodings(self, encodings: list[int]) -> None:
        self._out.append(struct.pack(">BxH", ClientMsg.SET_ENCODINGS, len(encodings)) +
                         b"".join(struct.pack(">i", e) for e in encodings))
        if self.accepted is not None:           # cumulative: an update already asked for may use the old ones
            self.accepted |= set(encodings)

    def request(self, incremental: bool = True, x: int = 0, y: int = 0,
                w: int | None = None, h: int | None = None) -> None:
        """FramebufferUpdateRequest, for the whole screen unless told otherwise."""
        self._out.append(struct.pack(">BBHHHH", ClientMsg.FRAMEBUFFER_UPDATE_REQUEST, int(incremental), x, y,
                                     self.width if w is None else w, self.height if h is None else h))

    def key_event(self, keysym: int, down: bool) -> None:
        self._out.append(struct.pack(">BBxxI", ClientMsg.KEY_EVENT, int(down), keysym))

    def pointer_event(self, x: int, y: int, mask: int) -> None:
        self._out.append(struct.pack(">BBHH", ClientMsg.POINTER_EVENT, mask, x, y))

    def cut_text(self, text: bytes) -> None:
        self._out.append(struct.pack(">BxxxI", ClientMsg.CLIENT_CUT_TEXT, len(text)) + text)

    # ---- the parser driver: the generators yield n >= 0 (give me n bytes) or -n (skip n)
    def _advance(self, value) -> None:
        try:
            want = self._gen.send(value)
            if want == _PEEK:
                self._want = _PEEK
            elif want < 0:
                self._want, self._skip = 0, -want
            else:
                self._want = want
        except RfbError as e:
            self._fail(e)
        except (ValueError, IndexError, struct.error, zlib.error) as e:
            self._fail(RfbError(f"bad data from the server: {e}"))

    def _fail(self, error: RfbError) -> None:
        self._error, self._want, self._skip = error, 0, 0
        self._gen.close()

    def _run(self, buf) -> None:
        view, pos, end = memoryview(buf), 0, len(buf)
        while self._error is None:
            want = self._want
            if self._skip:
                n = min(self._skip, end - pos)
                if self.record is not None:
                    self.record += view[pos:pos + n]
                pos += n
                self._skip -= n
                if self._skip:
                    break
                self._advance(None)
            elif want == _PEEK:                 # the walker scans the buffer, then skips
                if pos == end:
                    break
                # a view, not a copy; the walker lets go of it before its next yield
                self._advance(view[pos:])
            elif end - pos >= want:
                data = bytes(view[pos:pos + want])
                pos += want
                if self.record is not None:
                    self.record += data
                self._advance(data)
            else:
                break
        if self._error is not None:
            view.release()
            self._buf = bytearray()
        elif buf is self._buf:
            view.release()
            del buf[:pos]
        else:
            self._buf = bytearray(view[pos:])
            view.release()
        if self._eof and self._error is None:
            self._fail(ConnectionClosed("server closed the connection"))

    # ---- the protocol, as generators
    def _reason(self):
        (n,) = _U32.unpack((yield 4))
        if n > MAX_REASON:
            raise RfbError(f"a reason of {n} bytes")
        return (yield n).decode("utf-8", "replace") if n else ""

    def _protocol(self):
        version = yield 12
        if not (version.startswith(b"RFB 003.") and version.endswith(b"\n")):
            raise RfbError(f"not an RFB server: {version!r}")
        self.server_version = version.decode("latin-1").strip()
        minor = int(version[8:11]) if version[8:11].isdigit() else 0
        minor = 8 if minor >= 8 else 7 if minor == 7 else 3
        self._out.append(self.version or b"RFB 003.%03d\n" % minor)
        if minor == 3:
            (chosen,) = _U32.unpack((yield 4))
            if chosen == 0:
                self.reason = yield from self._reason()
                raise Refused(f"server refused: {self.reason}")
            offered = [chosen]
        else:
            (count,) = yield 1
            if count == 0:
                self.reason = yield from self._reason()
                raise Refused(f"server refused: {self.reason}")
            offered = list((yield count))
            if self.password is not None and (self.require_auth or SecurityType.NONE not in offered):
                chosen = SecurityType.VNC if SecurityType.VNC in offered else 0
            else:
                chosen = SecurityType.NONE if SecurityType.NONE in offered else \
                    SecurityType.VNC if SecurityType.VNC in offered else 0
        self.security_types = offered
        if chosen == SecurityType.VNC and self.password is None or \
                chosen not in (SecurityType.NONE, SecurityType.VNC):
            self.auth = "no-vnc-auth-offered" if self.password is not None else "needs-password"
            raise PasswordRequired(f"server wants security types {offered}")
        if self.require_auth and self.password is not None and chosen != SecurityType.VNC:
            self.auth = "no-vnc-auth-offered"
            raise PasswordRequired(f"server does not ask for a password (types {offered})")
        if minor != 3:
            self._out.append(bytes([chosen]))
        if chosen == SecurityType.VNC:
            self._out.append(vnc_response(self.password, (yield CHALLENGE_SIZE)))
        if chosen == SecurityType.VNC or minor == 8:
            (result,) = _U32.unpack((yield 4))
            if result != 0:
                self.auth = "failed"
                self.reason = (yield from self._reason()) if minor == 8 else "authentication failed"
                raise Refused(f"security result {result}: {self.reason}")
        self.auth = "ok"
        self._out.append(b"\x01" if self.shared else b"\x00")          # ClientInit
        w, h = struct.unpack(">HH", (yield 4))
        server_format = yield 16                                        # we set ours
        (name_len,) = _U32.unpack((yield 4))
        if name_len > MAX_NAME:
            raise RfbError(f"desktop name of {name_len} bytes")
        self.name = (yield name_len).decode("utf-8", "replace") if name_len else ""
        self._resize(w, h)
        if self.send_pixel_format:
            self._out.append(struct.pack(">B3x", ClientMsg.SET_PIXEL_FORMAT) + PIXEL_FORMAT)
        if self.encodings is not None:
            self.set_encodings(self.encodings)
        self._events.append(ServerInit(w, h, self.name, server_format))
        yield from self._messages()

    def _resize(self, w: int, h: int) -> None:
        if not (0 < w <= self.max_side and 0 < h <= self.max_side):
            raise RfbError(f"framebuffer size {w}x{h} out of range")
        self.width, self.height = w, h
        # Only a decoding client keeps the picture (a walking one never writes it).
        self.fb = bytearray(w * h * BPP) if self.decode else bytearray()

    def _stream(self, key: str | int):
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = zlib.decompressobj()
        return stream

    def _messages(self):
        while True:
            (msg,) = yield 1
            if msg == ServerMsg.FRAMEBUFFER_UPDATE:
                self._events.append((yield from self._update()))
            elif msg == ServerMsg.SET_COLOUR_MAP_ENTRIES:       # not for true colour, but legal
                _, first, count = struct.unpack(">BHH", (yield 5))
                if count > MAX_COLOUR_ENTRIES:
                    raise RfbError(f"{count} colour map entries")
                data = (yield 6 * count) if count else b""
                self._events.append(SetColourMapEntries(
                    first, [struct.unpack_from(">HHH", data, 6 * i) for i in range(count)]))
            elif msg == ServerMsg.BELL:
                self._events.append(Bell())
            elif msg == ServerMsg.SERVER_CUT_TEXT:
                (n,) = struct.unpack(">3xI", (yield 7))
                if n > MAX_CUT_TEXT:
                    raise RfbError(f"cut text of {n} bytes")
                self._events.append(ServerCutText((yield n) if n else b""))
            else:
                raise RfbError(f"unexpected server message type {msg}")

    def _update(self):
        (count,) = struct.unpack(">xH", (yield 3))
        if self.decode and len(self.fb) != self.width * self.height * BPP:
            self.fb = bytearray(self.width * self.height * BPP)    # decoding turned on after a walk
        event = FramebufferUpdate()
        # 0xFFFF: the count is unknown and a LastRect rectangle ends the update
        while count == 0xFFFF or len(event.rects) < count:
            x, y, w, h, encoding = _RECT.unpack((yield 12))
            if encoding == LAST_RECT:
                break
            rect = Rectangle(x, y, w, h, encoding)
            event.rects.append(rect)
            if encoding == DESKTOP_SIZE:
                self._resize(w, h)
                event.resized = True
                continue
            if encoding == EXT_DESKTOP_SIZE:
                (screens,) = yield 1
                yield -(3 + 16 * screens)
                if y == 0:                      # status: success (x is the reason)
                    self._resize(w, h)
                    event.resized = True
                continue
            if x + w > self.width or y + h > self.height:
                raise RfbError(f"rectangle {w}x{h}+{x}+{y} outside {self.width}x{self.height}")
            decoder = _DECODERS.get(encoding)
            if decoder is None or self.accepted is not None and encoding not in self.accepted:
                raise RfbError(f"encoding {encoding} we did not ask for")
            yield from decoder(self, rect)
        return event

    # ---- writing into fb
    def _put(self, x: int, y: int, w: int, h: int, data) -> None:
        row, stride = w * BPP, self.width * BPP
        if x == 0 and w == self.width:
            self.fb[y * stride:(y + h) * stride] = data
            return
        fb, p = self.fb, (y * self.width + x) * BPP
        for j in range(h):
            fb[p:p + row] = data[j * row:(j + 1) * row]
            p += stride

    def _fill(self, x: int, y: int, w: int, h: int, pixel: bytes) -> None:
        if w == 1 and h == 1:
            p = (y * self.width + x) * BPP
            self.fb[p:p + BPP] = pixel
        else:
            self._put(x, y, w, h, pixel * (w * h))

    def pixels(self, x: int, y: int, w: int, h: int) -> bytes:
        """The B, G, R, X bytes of a rectangle of the picture, rows one after another."""
        row, stride = w * BPP, self.width * BPP
        p = (y * self.width + x) * BPP
        return b"".join(self.fb[p + j * stride:p + j * stride + row] for j in range(h))

    def ppm(self) -> bytes:
        """The picture as a binary PPM (P6)."""
        rgb = bytearray(self.width * self.height * 3)
        rgb[0::3] = self.fb[2::4]
        rgb[1::3] = self.fb[1::4]
        rgb[2::3] = self.fb[0::4]
        return b"P6\n%d %d\n255\n" % (self.width, self.height) + bytes(rgb)

    def _inflate(self, stream, compressed: bytes, size: int, exact: bool = True) -> bytes:
        """At most `size` bytes out of `stream` (exactly that many when exact)."""
        data = stream.decompress(compressed, size + 1)
        if len(data) > size or stream.unconsumed_tail:
            raise RfbError(f"zlib data inflates beyond the {size} bytes its rectangle holds")
        if exact and len(data) != size:
            raise RfbError(f"zlib data inflates to {len(data)} bytes, expected {size}")
        return data


# ---- decoders: generators over one rectangle, after its header ------------------------
def _decode_raw(c: Connection, r: Rectangle):
    size = r.w * r.h * BPP
    if not c.decode:
        yield -size
        return
    c._put(r.x, r.y, r.w, r.h, (yield size))


def _decode_copyrect(c: Connection, r: Rectangle):
    sx, sy = struct.unpack(">HH", (yield 4))
    if sx + r.w > c.width or sy + r.h > c.height:
        raise RfbError(f"CopyRect source {r.w}x{r.h}+{sx}+{sy} outside {c.width}x{c.height}")
    if c.decode:
        c._put(r.x, r.y, r.w, r.h, c.pixels(sx, sy, r.w, r.h))


def _subrect_check(r: Rectangle, sx: int, sy: int, sw: int, sh: int, what: str) -> None:
    if sx + sw > r.w or sy + sh > r.h:
        raise RfbError(f"{what} subrectangle {sw}x{sh}+{sx}+{sy} outside its {r.w}x{r.h}")


def _decode_rre(c: Connection, r: Rectangle):
    head = yield 4 + BPP
    (n,) = _U32.unpack_from(head)
    if n > r.w * r.h:
        raise RfbError(f"RRE: {n} subrectangles in {r.w}x{r.h}")
    if c.decode:
        c._fill(r.x, r.y, r.w, r.h, head[4:])
    for _ in range(n):
        sub = yield BPP + 8
        sx, sy, sw, sh = struct.unpack_from(">HHHH", sub, BPP)
        _subrect_check(r, sx, sy, sw, sh, "RRE")
        if c.decode:
            c._fill(r.x + sx, r.y + sy, sw, sh, sub[:BPP])


def _walk_hextile(c: Connection, r: Rectangle):
    """Hextile without decoding, tile headers scanned straight from the buffer
    (a tile at a time through yields costs 3x: this walker times servers)."""
    tiles = [(min(16, r.w - tx), min(16, r.h - ty)) for ty in range(0, r.h, 16) for tx in range(0, r.w, 16)]
    i, n = 0, len(tiles)
    while i < n:
        data = yield _PEEK
        p, end = 0, len(data)
        while i < n and p < end:
            mask = data[p]
            if mask & 1:                                    # raw tile: may run past the buffer
                tw, th = tiles[i]
                p += 1 + tw * th * BPP
                i += 1
                continue
            if mask > 31:
                raise RfbError(f"Hextile: bad subencoding mask {mask:#x}")
            head = 1 + (BPP if mask & 2 else 0) + (BPP if mask & 4 else 0) + (1 if mask & 8 else 0)
            if p + head > end:                              # the rest of the header comes later
                break
            p += head
            if mask & 8:
                p += data[p - 1] * (BPP + 2 if mask & 16 else 2)
            i += 1
        del data                                            # the view pins the buffer's size
        if p:
            yield -p
        if i < n and p < end:                               # a split header: this tile the slow way
            yield from _hextile_tiles(c, r, tiles[i:i + 1], i)
            i += 1


def _decode_hextile(c: Connection, r: Rectangle):
    if not c.decode:
        yield from _walk_hextile(c, r)
        return
    tiles = [(min(16, r.w - tx), min(16, r.h - ty)) for ty in range(0, r.h, 16) for tx in range(0, r.w, 16)]
    yield from _hextile_tiles(c, r, tiles, 0)


def _hextile_tiles(c: Connection, r: Rectangle, tiles, first: int):
    """Hextile tiles number first.. (tiles: their sizes), one field at a time.
    bg/fg start black again: only the walker calls this mid-rectangle."""
    bg = fg = b"\0\0\0\0"
    decode = c.decode
    columns = (r.w + 15) // 16
    for k, (tw, th) in enumerate(tiles, first):
        tx, ty = r.x + 16 * (k % columns), r.y + 16 * (k // columns)
        (mask,) = yield 1
        if mask & 1:                                    # raw tile
            if decode:
                c._put(tx, ty, tw, th, (yield tw * th * BPP))
            else:
                yield -(tw * th * BPP)
            continue
        if mask > 31:
            raise RfbError(f"Hextile: bad subencoding mask {mask:#x}")
        if mask & 2:
            bg = yield BPP
        if mask & 4:
            fg = yield BPP
        if decode:
            c._fill(tx, ty, tw, th, bg)
        if mask & 8:
            (n,) = yield 1
            coloured = mask & 16
            size = BPP + 2 if coloured else 2
            data = (yield n * size) if n else b""
            for i in range(0, n * size, size):
                colour = data[i:i + BPP] if coloured else fg
                xy, wh = data[i + size - 2], data[i + size - 1]
                sx, sy, sw, sh = xy >> 4, xy & 15, (wh >> 4) + 1, (wh & 15) + 1
                if sx + sw > tw or sy + sh > th:
                    raise RfbError(f"Hextile subrectangle {sw}x{sh}+{sx}+{sy} outside its {tw}x{th} tile")
                if decode:
                    c._fill(tx + sx, ty + sy, sw, sh, colour)


def _decode_zlib(c: Connection, r: Rectangle):
    size = r.w * r.h * BPP
    (n,) = _U32.unpack((yield 4))
    if n > _zlib_bound(size):
        raise RfbError(f"Zlib: {n} compressed bytes for a {r.w}x{r.h} rectangle")
    if not c.decode:
        yield -n
        return
    c._put(r.x, r.y, r.w, r.h, c._inflate(c._stream("zlib"), (yield n) if n else b"", size))


class _Bytes:
    """Reads through one inflated ZRLE rectangle."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RfbError("ZRLE data ends early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise RfbError("ZRLE data ends early")
        self.pos += 1
        return self.data[self.pos - 1]


def _zrle_bound(w: int, h: int) -> int:
    """The most one rectangle's tiles can take: 4 bytes a pixel (a CPIXEL and a
    run length, or less) plus each 64x64 tile's subencoding and palette."""
    tiles = ((w + 63) // 64) * ((h + 63) // 64)
    return 4 * w * h + tiles * (1 + 127 * CPIXEL) + 64


def _decode_zrle(c: Connection, r: Rectangle):
    (n,) = _U32.unpack((yield 4))
    bound = _zrle_bound(r.w, r.h)
    if n > _zlib_bound(bound):
        raise RfbError(f"ZRLE: {n} compressed bytes for a {r.w}x{r.h} rectangle")
    if not c.decode:
        yield -n
        return
    z = _Bytes(c._inflate(c._stream("zrle"), (yield n) if n else b"", bound, exact=False))

    def cpixel() -> bytes:
        return z.take(CPIXEL) + b"\0"
    x0, y0, w, h = r.x, r.y, r.w, r.h
    for ty in range(y0, y0 + h, 64):
        th = min(64, y0 + h - ty)
        for tx in range(x0, x0 + w, 64):
            tw = min(64, x0 + w - tx)
            total = tw * th
            sub = z.u8()
            if sub == 0:
                bgr = z.take(total * CPIXEL)
                out = bytearray(total * BPP)
                out[0::4], out[1::4], out[2::4] = bgr[0::3], bgr[1::3], bgr[2::3]
                c._put(tx, ty, tw, th, out)
            elif sub == 1:
                c._fill(tx, ty, tw, th, cpixel())
            elif 2 <= sub <= 16:
                palette = [cpixel() for _ in range(sub)]
                bits = 1 if sub == 2 else 2 if sub <= 4 else 4
                out = []
                for _ in range(th):
                    row = z.take((tw * bits + 7) // 8)
                    for i in range(tw):
                        shift = 8 - bits - (i * bits) % 8
                        index = (row[i * bits // 8] >> shift) & ((1 << bits) - 1)
                        if index >= sub:
                            raise RfbError(f"ZRLE palette index {index} of {sub} colours")
                        out.append(palette[index])
                c._put(tx, ty, tw, th, b"".join(out))
            elif sub == 128 or sub >= 130:
                palette = [cpixel() for _ in range(sub - 128)] if sub >= 130 else None
                out, filled = [], 0
                while filled < total:
                    if palette is None:
                        pixel, run = cpixel(), 1
                    else:
                        index = z.u8()
                        if index & 127 >= len(palette):
                            raise RfbError(f"ZRLE palette index {index & 127} of {len(palette)} colours")
                        pixel, run = palette[index & 127], 1
                        if not index & 128:
                            out.append(pixel)
                            filled += 1
                            continue
                    more = 255
                    while more == 255:
                        more = z.u8()
                        run += more
                    if filled + run > total:
                        raise RfbError("ZRLE run overflows its tile")
                    out.append(pixel * run)
                    filled += run
                c._put(tx, ty, tw, th, b"".join(out))
            else:
                raise RfbError(f"bad ZRLE subencoding {sub}")
    if z.pos != len(z.data):
        raise RfbError(f"ZRLE: {len(z.data) - z.pos} bytes left over after the tiles")


# ---- Tight (RFB spec, "Tight Encoding"): TPIXEL is R, G, B at our format ---------------
def _compact_length():
    """1-3 bytes: 7 bits, 7 bits (each with a 'more' flag in bit 7), then 8 bits."""
    (b,) = yield 1
    n = b & 0x7F
    if b & 0x80:
        (b,) = yield 1
        n |= (b & 0x7F) << 7
        if b & 0x80:
            (b,) = yield 1
            n |= b << 14
    return n


def _rgb_to_bgrx(rgb, npix: int) -> bytearray:
    out = bytearray(npix * BPP)
    out[0::4] = rgb[2::3]
    out[1::4] = rgb[1::3]
    out[2::4] = rgb[0::3]
    return out


def _ungradient(data, w: int, h: int) -> bytearray:
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


def _decode_tight(c: Connection, r: Rectangle):
    x, y, w, h = r.x, r.y, r.w, r.h
    (ctl,) = yield 1
    for stream in range(4):                  # bits 0-3: reset these streams first
        if ctl & (1 << stream):
            c._streams.pop(stream, None)
    kind = ctl >> 4
    if kind == 0x8:                          # Fill: one TPIXEL for the whole rectangle
        red, green, blue = yield CPIXEL
        if c.decode:
            c._fill(x, y, w, h, bytes((blue, green, red, 0)))
        return
    if kind == 0x9:                          # JPEG
        n = yield from _compact_length()
        if not c.decode:
            yield -n
            return
        if c.jpeg is None:
            raise RfbError(f"Tight JPEG rectangle at {(x, y, w, h)}: this client decodes no JPEG")
        rgb = c.jpeg((yield n) if n else b"")
        if len(rgb) != w * h * 3:
            raise RfbError(f"Tight JPEG rectangle at {(x, y, w, h)} decodes to {len(rgb)} bytes")
        c._put(x, y, w, h, _rgb_to_bgrx(rgb, w * h))
        return
    if kind & 0x8 and (c.decode or kind not in (0xA, 0xE)):
        raise RfbError(f"Tight control byte {ctl:#04x} at {(x, y, w, h)}: neither fill nor basic "
                       "compression (nor JPEG)")
    stream = kind & 0x3
    filter_id = (yield 1)[0] if kind & 0x4 else 0
    palette = None
    if filter_id in (0, 2):                  # copy, gradient: one TPIXEL per pixel
        size = w * h * CPIXEL
    elif filter_id == 1:
        (n,) = yield 1
        palette = yield CPIXEL * (n + 1)
        r.palette = palette
        size = (w + 7) // 8 * h if n == 1 else w * h
    else:
        raise RfbError(f"Tight filter id {filter_id} at {(x, y, w, h)}")
    if size < TIGHT_MIN_TO_COMPRESS:
        if not c.decode:
            yield -size
            return
        data = yield size
    else:
        n = yield from _compact_length()
        if n > _zlib_bound(size):
            raise RfbError(f"Tight: {n} compressed bytes for {size} at {(x, y, w, h)}")
        if not c.decode:
            yield -n
            return
        data = c._inflate(c._stream(stream), (yield n) if n else b"", size)
    if palette is None:
        rgb = _ungradient(data, w, h) if filter_id == 2 else data
        c._put(x, y, w, h, _rgb_to_bgrx(rgb, w * h))
        return
    colours = len(palette) // CPIXEL
    if colours == 2:                         # 1 bit a pixel, each row padded to a byte
        stride = (w + 7) // 8
        data = b"".join(b"".join(map(_BITS.__getitem__, data[j * stride:(j + 1) * stride]))[:w]
                        for j in range(h))
    elif data and max(data) >= colours:
        raise RfbError(f"Tight rectangle {(x, y, w, h)}: palette index {max(data)} of {colours} colours")
    table = [bytes(palette[k::3]).ljust(256, b"\0") for k in range(3)]   # index -> R, G, B
    out = bytearray(w * h * BPP)
    out[0::4] = data.translate(table[2])
    out[1::4] = data.translate(table[1])
    out[2::4] = data.translate(table[0])
    c._put(x, y, w, h, out)


_DECODERS = {RAW: _decode_raw, COPYRECT: _decode_copyrect, RRE: _decode_rre, HEXTILE: _decode_hextile,
             ZLIB: _decode_zlib, ZRLE: _decode_zrle, TIGHT: _decode_tight}
DECODED = tuple(_DECODERS)
