"""Sans-IO RFB server connection: bytes in -> events, calls in -> bytes out.

`ServerConnection` knows the whole wire protocol (handshake, security, client
messages with their exact lengths, the negotiated encodings and extensions)
but does no I/O and keeps no clock, so it is driven directly by tests and
fuzzers.  Feed client bytes to `receive_data`, act on the returned events,
and send whatever `data_to_send` returns.

Any client misbehaviour raises `ProtocolError` (its message is the reason to
log); the owner must then send the pending output (it may hold a failure
reason for the client) and close.  After that the connection is dead.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..util.pixelformat import GUEST_32, PixelFormat
from ..util.region import clip
from . import auth
from . import encodings as enc
from .tls import TlsKind
from .states import (QEMU_EXTENDED_KEY_EVENT, ClientMsg, Request, SecurityType, ServerMsg, State, Step,
                     VeNCryptSubtype, next_state)

SEC_NONE, SEC_VNC, SEC_VENCRYPT = SecurityType.NONE, SecurityType.VNC, SecurityType.VENCRYPT
VENCRYPT_VERSION = (0, 2)
MAX_CUT_TEXT = 1 << 20
MAX_FENCE_PAYLOAD = 64
MAX_NAME = 1024
# Replies (Fence answers, colour maps, EndOfContinuousUpdates) queued while
# a streamed update is open wait behind it in memory; a client asking for
# more than this within one update is flooding, not talking.
MAX_HELD_REPLIES = 64 << 10
# Output chunks under SMALL_CHUNK (rect headers, Tight's small rects) are
# joined into runs of up to JOINED_MAX: one write, not one per chunk.
SMALL_CHUNK = 16 << 10
JOINED_MAX = 64 << 10
FENCE_REQUEST = 1 << 31

# Pixel format the server announces (what xen-fbfront uses).
SERVER_FORMAT = GUEST_32
# Colour-map clients get this fixed palette (as QEMU): 8bpp, R bits 0-2,
# G bits 3-5, B bits 6-7, described once with SetColourMapEntries.
PALETTE_FORMAT = PixelFormat(8, 8, False, 7, 7, 3, 0, 3, 6)


class ProtocolError(Exception):
    """The client broke the protocol; str() is the reason to log."""


class AuthenticationFailed(ProtocolError):
    """A wrong answer to the VNC challenge of a set, unexpired, non-empty
    password: a guess at a secret, which counts for the blacklist.  Every
    other refusal (a security type or VeNCrypt version or subtype not
    offered, an expired or empty password) is a plain ProtocolError: there
    was nothing to guess, and counting it would let anyone lock out an
    address (docs/vnc.md, "Threat model")."""


# ---------------------------------------------------------------- events
@dataclass(frozen=True)
class Authenticated:
    pass


@dataclass(frozen=True)
class StartTls:
    """Send what is queued, run the server side of a TLS handshake on the
    connection, then call `tls_established()` (or close on failure)."""


@dataclass(frozen=True)
class ClientInit:
    shared: bool


@dataclass(frozen=True)
class PixelFormatChanged:
    fmt: PixelFormat


@dataclass(frozen=True)
class EncodingsChanged:
    encoding: int


@dataclass(frozen=True)
class UpdateRequest:
    incremental: bool
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class KeyEvent:
    down: bool
    keysym: int


@dataclass(frozen=True)
class ExtendedKeyEvent:
    down: bool
    keysym: int
    keycode: int


@dataclass(frozen=True)
class PointerEvent:
    buttons: int
    x: int
    y: int


@dataclass(frozen=True)
class CutText:
    length: int


@dataclass(frozen=True)
class ContinuousUpdates:
    enable: bool
    x: int
    y: int
    w: int
    h: int


# ---------------------------------------------------------------- helpers
_VERSION_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(">I", len(data)) + data


def pack_pixel_format(f: PixelFormat, true_colour: bool = True) -> bytes:
    return struct.pack(">BBBBHHHBBB3x", f.bpp, f.depth, int(f.big_endian), int(true_colour),
                       f.red_max, f.green_max, f.blue_max, f.red_shift, f.green_shift, f.blue_shift)


def parse_pixel_format(data: bytes) -> tuple[PixelFormat, bool]:
    """Validate a client PIXEL_FORMAT; returns (format, true_colour)."""
    bpp, depth, big, true_colour, rmax, gmax, bmax, rs, gs, bs = struct.unpack(">BBBBHHHBBB3x", data)
    if bpp not in (8, 16, 32):
        raise ProtocolError(f"SetPixelFormat: bits-per-pixel {bpp} not 8, 16 or 32")
    if not true_colour:
        return PALETTE_FORMAT, False
    if depth == 0 or depth > bpp:
        raise ProtocolError(f"SetPixelFormat: depth {depth} with {bpp} bpp")
    used = 0
    for name, cmax, shift in (("red", rmax, rs), ("green", gmax, gs), ("blue", bmax, bs)):
        if cmax == 0 or cmax & (cmax + 1):
            raise ProtocolError(f"SetPixelFormat: {name}-max {cmax} is not 2^n-1")
        if shift + cmax.bit_length() > bpp:
            raise ProtocolError(f"SetPixelFormat: {name} shift {shift} out of {bpp} bits")
        mask = cmax << shift
        if used & mask:
            raise ProtocolError("SetPixelFormat: colour channels overlap")
        used |= mask
    if sum(m.bit_length() for m in (rmax, gmax, bmax)) > depth:
        raise ProtocolError(f"SetPixelFormat: colour bits exceed depth {depth}")
    return PixelFormat(bpp, depth, bool(big) and bpp > 8, rmax, gmax, bmax, rs, gs, bs), True


def colour_map_entries() -> bytes:
    """SetColourMapEntries describing PALETTE_FORMAT's 256 colours."""
    out = bytearray(struct.pack(">BxHH", ServerMsg.SET_COLOUR_MAP_ENTRIES, 0, 256))
    for i in range(256):
        r, g, b = i & 7, (i >> 3) & 7, (i >> 6) & 3
        out += struct.pack(">HHH", r * 65535 // 7, g * 65535 // 7, b * 65535 // 3)
    return bytes(out)


@dataclass(frozen=True)
class UpdatePlan:
    """What one FramebufferUpdate answers with, fixed when it begins: the
    pseudo-rectangles queued so far, the rectangles to encode (clipped to
    what the client sees), and the encoding, format and levels in force."""
    pseudo: tuple[bytes, ...]
    rects: tuple[tuple[int, int, int, int], ...]
    full: bool                          # answers a non-incremental request
    encoding: int
    fmt: PixelFormat
    jpeg_quality: int | None
    compress_level: int | None
    # Tight's gradient filter: not for noVNC, whose Tight decoder (1.3, as
    # Debian 12 ships it) throws on it: not over the WebSocket, nor to a
    # client listing TightPNG (-260), which only noVNC does.
    tight_gradient: bool = True


# RFB sizes are u16: a larger surface (a guest may make one 70000 pixels wide
# and one high) is shown as its top-left 65535x65535, as to a client that
# cannot resize.
RFB_MAX_DIMENSION = 65535


def _coalesce(chunks: list) -> list:
    """Runs of chunks under SMALL_CHUNK joined, up to JOINED_MAX a run."""
    out: list = []
    run: list = []
    size = 0
    for chunk in chunks:
        n = len(chunk)
        if n >= SMALL_CHUNK:
            if run:
                out.append(run[0] if len(run) == 1 else b"".join(run))
                run, size = [], 0
            out.append(chunk)
            continue
        if size + n > JOINED_MAX:
            out.append(run[0] if len(run) == 1 else b"".join(run))
            run, size = [], 0
        run.append(chunk)
        size += n
    if run:
        out.append(run[0] if len(run) == 1 else b"".join(run))
    return out


class ServerConnection:
    """One client's RFB session, without I/O."""

    def __init__(self, width: int, height: int, name: str, *, password: str | None = None,
                 password_expired: bool = False, blocked_reason: str | None = None,
                 lossy: bool = False, tls: TlsKind | str | None = None, websocket: bool = False):
        self.width, self.height = min(width, RFB_MAX_DIMENSION), min(height, RFB_MAX_DIMENSION)
        self.name = name.encode("utf-8")[:MAX_NAME].decode("utf-8", "ignore")
        self.password = password
        self.password_expired = password_expired
        self.lossy = lossy              # JPEG allowed (QEMU's lossy=on); else Tight stays lossless
        self.websocket = websocket      # came through the WebSocket port: a browser (noVNC)
        self.blocked_reason = blocked_reason
        # TlsKind.X509 or ANON: only VeNCrypt is offered, with the one subtype
        # these credentials and the password setting call for (as QEMU).
        self.tls = TlsKind(tls) if tls is not None else None
        self.subtype: VeNCryptSubtype | None = None
        self.state = State.VERSION
        self.version = 8               # minor version in use
        self.pixel_format: PixelFormat = SERVER_FORMAT
        self.colour_map = False
        self.encoding = enc.RAW
        self.encodings: frozenset[int] = frozenset()
        self.jpeg_quality: int | None = None
        self.continuous: tuple[int, int, int, int] | None = None
        self.extkey_acked = False
        self.fence_seen = False
        self.cu_seen = False
        self.absolute_pointer = True
        self.leds = 0                        # lock LEDs, QEMU bits: 1 scroll, 2 num, 4 caps
        self.compress_level: int | None = None    # the client's CompressLevel, if it sent one
        self._request: Request | None = None
        # Pseudo-rectangles ride on the next FramebufferUpdate, so they never
        # arrive as an unasked-for update (vncdotool would take such an
        # update as the answer to its own request).
        self._pseudo: list[bytes] = []
        self.resize_pending = False           # a size change goes out alone
        self._in = bytearray()
        self._out = bytearray()
        self._chunks: list = []              # whole pieces queued before what _out holds
        self._update_open = False            # a streamed update's pieces are still coming
        self._discard = 0                    # cut text bytes still to skip
        self._challenge = b""
        self._out += b"RFB 003.008\n"

    # ------------------------------------------------------------ I/O side
    def data_to_send(self) -> bytes | bytearray:
        """Everything to send, as one buffer."""
        if not self._chunks and not self._update_open:
            out, self._out = self._out, bytearray()
            return out
        return b"".join(self._take_chunks())

    def data_to_send_chunks(self) -> list:
        """Everything to send, in pieces: big ones as they were made (updates
        are MBs: a server writes them one by one rather than copying them
        into one), runs of small ones joined (each write is a syscall)."""
        chunks = self._take_chunks()
        return _coalesce(chunks) if len(chunks) > 1 else chunks

    def _take_chunks(self) -> list:
        self._seal()
        chunks, self._chunks = self._chunks, []
        return chunks

    def _seal(self) -> None:
        """Small messages queued so far go before what is queued next; while
        an update is open they wait behind it (inside it they would be read
        as its rectangles)."""
        if self._out and not self._update_open:
            self._chunks.append(self._out)
            self._out = bytearray()

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def close(self) -> None:
        """The owner closed the connection: nothing more is parsed."""
        self._move(Step.CLOSE)

    def receive_data(self, data: bytes) -> list:
        if self.state is State.CLOSED:
            return []
        if self._discard:
            skip = min(self._discard, len(data))
            self._discard -= skip
            data = data[skip:]
        buf = self._in
        buf += data
        events: list = []
        pos = 0
        try:
            while self.state is not State.CLOSED:
                used = self._parse(buf, pos, events)
                if used == 0:
                    break
                pos += used
                if self._update_open and len(self._out) > MAX_HELD_REPLIES:
                    self._fail(f"{len(self._out)} bytes of replies asked for while one update is sent "
                               f"(limit {MAX_HELD_REPLIES})")
                if self._discard:
                    skip = min(self._discard, len(buf) - pos)
                    self._discard -= skip
                    pos += skip
        except ProtocolError:
            self._move(Step.CLOSE)
            buf.clear()
            raise
        del buf[:pos]
        return events

    def _move(self, step: Step) -> None:
        """Change state as the table in states.py says (StateError if not allowed)."""
        self.state = next_state(self.state, step)

    def _fail(self, reason: str, exc=ProtocolError):
        self._move(Step.CLOSE)
        raise exc(reason)

    # ------------------------------------------------------------ parsing
    # Each parser gets the input buffer and the offset of the next message
    # and returns the bytes it consumed (0 = incomplete, wait for more).
    def _parse(self, buf: bytearray, p: int, events: list) -> int:
        parser = self._STATE_PARSERS.get(self.state)
        return parser(self, buf, p, events) if parser is not None else 0

    def _parse_client_init(self, buf, p, events) -> int:
        if len(buf) - p < 1:
            return 0
        self._server_init()
        events.append(ClientInit(bool(buf[p])))
        return 1

    def _parse_version(self, buf, p, events) -> int:
        got = bytes(buf[p:p + 12])
        if len(got) < 12:
            if not b"RFB "[:len(got)] == got[:4]:
                self._fail(f"bad protocol version {got!r}")
            return 0
        m = _VERSION_RE.fullmatch(got)
        if not m or int(m[1]) != 3 or (int(m[2]) not in (3, 4, 5, 7) and int(m[2]) < 8):
            self._out += struct.pack(">I", 0) + _string("unsupported protocol version")
            self._fail(f"unsupported protocol version {got!r}")
        minor = int(m[2])
        self.version = 3 if minor in (3, 4, 5) else 7 if minor == 7 else 8
        sec = self._security_type()
        if self.blocked_reason is not None:
            self._out += struct.pack(">I" if self.version == 3 else ">B", 0)
            self._out += _string(self.blocked_reason)
            self._fail(self.blocked_reason)
        if self.version == 3:
            if sec == SEC_VENCRYPT:       # RFB 3.3 lets the server pick only None or VNC
                self._out += struct.pack(">I", 0) + _string("TLS is required (VeNCrypt, RFB 3.7 or later)")
                self._fail("RFB 3.3 client, but TLS is required")
            self._out += struct.pack(">I", sec)
            self._begin_security(sec, events)
        else:
            self._out += bytes([1, sec])
            self._move(Step.VERSION_3_7_OR_LATER)
        return 12

    def _security_type(self) -> SecurityType:
        if self.tls is not None:
            return SEC_VENCRYPT
        return SEC_VNC if self.password is not None else SEC_NONE

    def _offered_subtype(self) -> VeNCryptSubtype:
        with_password = self.password is not None
        if self.tls is TlsKind.X509:
            return VeNCryptSubtype.X509_VNC if with_password else VeNCryptSubtype.X509_NONE
        return VeNCryptSubtype.TLS_VNC if with_password else VeNCryptSubtype.TLS_NONE

    def _begin_security(self, sec: int, events: list) -> None:
        if sec == SEC_VENCRYPT:
            self._out += bytes(VENCRYPT_VERSION)
            self._move(Step.SECURITY_VENCRYPT)
        elif sec == SEC_VNC:
            self._challenge = auth.new_challenge()
            self._out += self._challenge
            self._move(Step.SECURITY_VNC)
        else:
            # VeNCrypt's None subtypes always end with a SecurityResult.
            if self.version == 8 or self.subtype is not None:
                self._out += struct.pack(">I", 0)
            self._move(Step.SECURITY_NONE)
            events.append(Authenticated())

    def _security_failed(self, reason: str, log_reason: str, exc=ProtocolError):
        self._out += struct.pack(">I", 1)
        if self.version == 8:
            self._out += _string(reason)
        self._fail(log_reason, exc)

    def _parse_security(self, buf, p, events) -> int:
        if len(buf) - p < 1:
            return 0
        offered = self._security_type()
        if buf[p] != offered:
            self._security_failed("Unsupported security type",
                                  f"client chose security type {buf[p]}, offered {offered}")
        self._begin_security(offered, events)
        return 1

    def _parse_vencrypt_version(self, buf, p, events) -> int:
        if len(buf) - p < 2:
            return 0
        version = (buf[p], buf[p + 1])
        if version != VENCRYPT_VERSION:
            self._out.append(1)                      # non-zero: unsupported, closing
            self._fail(f"VeNCrypt version {version[0]}.{version[1]} not supported (only 0.2)")
        self._out += bytes([0, 1]) + struct.pack(">I", self._offered_subtype())
        self._move(Step.VENCRYPT_VERSION)
        return 2

    def _parse_vencrypt_subtype(self, buf, p, events) -> int:
        if len(buf) - p < 4:
            return 0
        chosen = struct.unpack_from(">I", buf, p)[0]
        offered = self._offered_subtype()
        if chosen != offered:
            self._out.append(0)                      # 0 here means refused
            self._fail(f"client chose VeNCrypt subtype {chosen}, offered {offered.value} "
                       f"({offered.name})")
        self._out.append(1)
        self.subtype = offered
        self._move(Step.VENCRYPT_SUBTYPE)
        events.append(StartTls())
        return 4

    def tls_established(self) -> list:
        """The TLS handshake succeeded: the subtype's own authentication
        follows (VNC's challenge, or the SecurityResult for None)."""
        if self.state is not State.TLS_HANDSHAKE:
            raise ProtocolError("TLS established outside the handshake")
        events: list = []
        with_vnc = self.subtype in (VeNCryptSubtype.TLS_VNC, VeNCryptSubtype.X509_VNC)
        self._begin_security(SEC_VNC if with_vnc else SEC_NONE, events)
        return events

    def take_buffered_input(self) -> bytes:
        """Client bytes received behind the VeNCrypt choice: the start of the
        TLS handshake, for the TLS layer."""
        data, self._in = bytes(self._in), bytearray()
        return data

    def _parse_auth(self, buf, p, events) -> int:
        if len(buf) - p < auth.CHALLENGE_SIZE:
            return 0
        response = bytes(buf[p:p + auth.CHALLENGE_SIZE])
        if self.password_expired:
            self._security_failed("Password expired", "VNC password has expired")
        if not self.password:       # password=on with none set yet: nobody gets in
            self._security_failed("Authentication failed", "no VNC password set: nobody can log in")
        if not auth.check_response(self.password, self._challenge, response):
            self._security_failed("Authentication failed", "VNC authentication failed",
                                  AuthenticationFailed)
        self._out += struct.pack(">I", 0)
        self._move(Step.AUTHENTICATED)
        events.append(Authenticated())
        return auth.CHALLENGE_SIZE

    def _server_init(self) -> None:
        name = self.name.encode("utf-8")
        self._out += struct.pack(">HH", self.width, self.height)
        self._out += pack_pixel_format(SERVER_FORMAT)
        self._out += struct.pack(">I", len(name)) + name
        self._move(Step.CLIENT_INIT)

    # ------------------------------------------------------------ normal phase
    def _parse_message(self, buf, p, events) -> int:
        if len(buf) - p < 1:
            return 0
        t = buf[p]
        entry = self._MESSAGES.get(t)
        if entry is None or not entry[1](self):
            self._fail(f"unexpected message type {t}")
        return entry[0](self, buf, p, len(buf) - p, events)

    def _msg_set_pixel_format(self, buf, p, n, events) -> int:
        if n < 20:
            return 0
        fmt, true_colour = parse_pixel_format(bytes(buf[p + 4:p + 20]))
        self.pixel_format, self.colour_map = fmt, not true_colour
        if self.colour_map:
            self._out += colour_map_entries()
        events.append(PixelFormatChanged(fmt))
        return 20

    def _msg_set_encodings(self, buf, p, n, events) -> int:
        if n < 4:
            return 0
        count = struct.unpack_from(">H", buf, p + 2)[0]
        size = 4 + 4 * count
        if n < size:
            return 0
        self._set_encodings(list(struct.unpack_from(f">{count}i", buf, p + 4)))
        events.append(EncodingsChanged(self.encoding))
        return size

    def _msg_update_request(self, buf, p, n, events) -> int:
        if n < 10:
            return 0
        incremental, x, y, w, h = struct.unpack_from(">BHHHH", buf, p + 1)
        if not incremental:
            self._request = Request.FULL
            if enc.EXT_DESKTOP_SIZE in self.encodings:
                self._send_ext_desktop_size(0, 0)
        elif self._request is None:
            self._request = Request.INCREMENTAL
        events.append(UpdateRequest(bool(incremental), x, y, w, h))
        return 10

    def _msg_key(self, buf, p, n, events) -> int:
        if n < 8:
            return 0
        down, keysym = struct.unpack_from(">B2xI", buf, p + 1)
        events.append(KeyEvent(bool(down), keysym))
        return 8

    def _msg_pointer(self, buf, p, n, events) -> int:
        if n < 6:
            return 0
        events.append(PointerEvent(*struct.unpack_from(">BHH", buf, p + 1)))
        return 6

    def _msg_cut_text(self, buf, p, n, events) -> int:
        """Read and dropped (the guest has no clipboard channel)."""
        if n < 8:
            return 0
        length = struct.unpack_from(">I", buf, p + 4)[0]
        if length > MAX_CUT_TEXT:
            self._fail(f"ClientCutText of {length} bytes (limit {MAX_CUT_TEXT})")
        self._discard = length
        events.append(CutText(length))
        return 8

    def _msg_continuous_updates(self, buf, p, n, events) -> int:
        if n < 10:
            return 0
        enable, x, y, w, h = struct.unpack_from(">BHHHH", buf, p + 1)
        if enable:
            self.continuous = (x, y, w, h)
        else:
            self.continuous = None
            self._out.append(ServerMsg.END_OF_CONTINUOUS_UPDATES)
        events.append(ContinuousUpdates(bool(enable), x, y, w, h))
        return 10

    def _msg_fence(self, buf, p, n, events) -> int:
        if n < 9:
            return 0
        flags, length = struct.unpack_from(">3xIB", buf, p + 1)
        if length > MAX_FENCE_PAYLOAD:
            self._fail(f"Fence payload of {length} bytes (limit {MAX_FENCE_PAYLOAD})")
        if n < 9 + length:
            return 0
        if flags & FENCE_REQUEST:
            # Reply: same payload, request and unknown flags cleared.
            self._send_fence(flags & 0x7, bytes(buf[p + 9:p + 9 + length]))
        return 9 + length

    def _msg_set_desktop_size(self, buf, p, n, events) -> int:
        if n < 8:
            return 0
        size = 8 + 16 * buf[p + 6]
        if n < size:
            return 0
        # The guest decides its size: answer "prohibited".
        self._send_ext_desktop_size(1, 1)
        return size

    def _msg_qemu(self, buf, p, n, events) -> int:
        if n < 2:
            return 0
        if buf[p + 1] != QEMU_EXTENDED_KEY_EVENT:
            self._fail(f"unsupported QEMU message subtype {buf[p + 1]}")
        if n < 12:
            return 0
        down, keysym, keycode = struct.unpack_from(">HII", buf, p + 2)
        events.append(ExtendedKeyEvent(bool(down), keysym, keycode))
        return 12

    # message type -> (parser, whether the client may send it now): the
    # extension messages only after the client announced the extension.
    _MESSAGES = {
        ClientMsg.SET_PIXEL_FORMAT: (_msg_set_pixel_format, lambda c: True),
        ClientMsg.SET_ENCODINGS: (_msg_set_encodings, lambda c: True),
        ClientMsg.FRAMEBUFFER_UPDATE_REQUEST: (_msg_update_request, lambda c: True),
        ClientMsg.KEY_EVENT: (_msg_key, lambda c: True),
        ClientMsg.POINTER_EVENT: (_msg_pointer, lambda c: True),
        ClientMsg.CLIENT_CUT_TEXT: (_msg_cut_text, lambda c: True),
        ClientMsg.ENABLE_CONTINUOUS_UPDATES: (_msg_continuous_updates, lambda c: c.cu_seen),
        ClientMsg.CLIENT_FENCE: (_msg_fence, lambda c: c.fence_seen),
        ClientMsg.SET_DESKTOP_SIZE: (_msg_set_desktop_size,
                                     lambda c: enc.EXT_DESKTOP_SIZE in c.encodings),
        ClientMsg.QEMU: (_msg_qemu, lambda c: c.extkey_acked),
    }

    def _set_encodings(self, values: list[int]) -> None:
        wanted = set(values)
        real = [e for e in values if e in enc.SUPPORTED]
        if enc.ZRLE in wanted:           # ZRLE compresses better than Zlib
            real = [e for e in real if e != enc.ZLIB]
        self.encoding = real[0] if real else enc.RAW
        self.encodings = frozenset(wanted)
        qualities = [e for e in values if enc.JPEG_QUALITY_MIN <= e <= enc.JPEG_QUALITY_MAX]
        self.jpeg_quality = qualities[0] - enc.JPEG_QUALITY_MIN if qualities else None
        levels = [e for e in values if enc.COMPRESS_LEVEL_MIN <= e <= enc.COMPRESS_LEVEL_MAX]
        if levels:
            self.compress_level = levels[0] - enc.COMPRESS_LEVEL_MIN
        if enc.QEMU_EXT_KEY in wanted and not self.extkey_acked:
            self.extkey_acked = True
            self._pseudo_update(0, 0, 0, 0, enc.QEMU_EXT_KEY)
        if enc.POINTER_TYPE_CHANGE in wanted:
            self._pseudo_update(int(self.absolute_pointer), 0, self.width, self.height,
                                enc.POINTER_TYPE_CHANGE)
        if enc.QEMU_LED_STATE in wanted:
            self._pseudo_update(0, 0, 0, 0, enc.QEMU_LED_STATE, bytes([self.leds]))
        if enc.FENCE in wanted and not self.fence_seen:
            self.fence_seen = True
            self._send_fence(FENCE_REQUEST, b"")
        if enc.CONTINUOUS_UPDATES in wanted and not self.cu_seen:
            self.cu_seen = True
            self._out.append(ServerMsg.END_OF_CONTINUOUS_UPDATES)

    # ------------------------------------------------------------ server messages
    def _pseudo_update(self, x: int, y: int, w: int, h: int, encoding: int, data: bytes = b"") -> None:
        self._pseudo.append(enc.rect_header(x, y, w, h, encoding) + data)

    @property
    def has_pseudo(self) -> bool:
        return bool(self._pseudo)

    def _send_fence(self, flags: int, payload: bytes) -> None:
        self._out += struct.pack(">B3xIB", ServerMsg.SERVER_FENCE, flags, len(payload)) + payload

    def _send_ext_desktop_size(self, reason: int, status: int) -> None:
        screen = struct.pack(">B3xIHHHHI", 1, 0, 0, 0, self.width, self.height, 0)
        self._pseudo_update(reason, status, self.width, self.height, enc.EXT_DESKTOP_SIZE, screen)

    @property
    def supports_resize(self) -> bool:
        return bool({enc.DESKTOP_SIZE, enc.EXT_DESKTOP_SIZE} & self.encodings)

    def resize(self, width: int, height: int) -> bool:
        """The framebuffer changed size.  False if this client cannot follow:
        it keeps the size it has and sees that much of the new picture (as
        with QEMU); updates are clipped to it."""
        width, height = min(width, RFB_MAX_DIMENSION), min(height, RFB_MAX_DIMENSION)
        if self.state is not State.NORMAL:
            self.width, self.height = width, height      # ServerInit will say so
            return True
        if not self.supports_resize:
            return False
        self.width, self.height = width, height
        if enc.EXT_DESKTOP_SIZE in self.encodings:
            self._send_ext_desktop_size(0, 0)
        else:
            self._pseudo_update(0, 0, width, height, enc.DESKTOP_SIZE)
        self.resize_pending = True
        return True

    def set_pointer_mode(self, absolute: bool) -> None:
        self.absolute_pointer = absolute
        if self.state is State.NORMAL and enc.POINTER_TYPE_CHANGE in self.encodings:
            self._pseudo_update(int(absolute), 0, self.width, self.height, enc.POINTER_TYPE_CHANGE)

    def set_leds(self, leds: int) -> None:
        self.leds = leds & 7
        if self.state is State.NORMAL and enc.QEMU_LED_STATE in self.encodings:
            self._pseudo_update(0, 0, 0, 0, enc.QEMU_LED_STATE, bytes([self.leds]))

    # ------------------------------------------------------------ updates
    @property
    def pending_request(self) -> Request | None:
        """The update the client waits for, if any (continuous updates count
        as incremental)."""
        if self._request is None and self.continuous is not None:
            return Request.INCREMENTAL
        return self._request

    def begin_update(self, width: int, height: int,
                     rects: list[tuple[int, int, int, int]]) -> UpdatePlan | None:
        """Start answering the outstanding request with `rects` of a picture
        `width` x `height`: they are clipped to it and to this client's view,
        and pending pseudo-rectangles go first.  While a size change is
        pending the caller passes no rects: it goes out alone.  None when
        nothing this client can see changed (its request stays outstanding).
        The owner encodes the plan's rectangles and hands them to
        `finish_update`; updates.py does both."""
        width, height = min(self.width, width), min(self.height, height)
        clipped = [r for r in (clip(*rect, width, height) for rect in rects) if r is not None]
        if self._request is not Request.FULL and not self._pseudo and not clipped:
            # Nothing this client can see changed (all outside its view):
            # its incremental request stays outstanding, or it waits forever.
            return None
        pseudo, self._pseudo = self._pseudo, []
        self.resize_pending = False
        full, self._request = self._request is Request.FULL, None
        return UpdatePlan(tuple(pseudo), tuple(clipped), full, self.encoding, self.pixel_format,
                          self.jpeg_quality if self.lossy else None, self.compress_level,
                          not self.websocket and enc.TIGHT_PNG not in self.encodings)

    def finish_update(self, plan: UpdatePlan, rectangles: list[bytes], count: int) -> int:
        """Queue the FramebufferUpdate `plan` began: its pseudo-rectangles,
        then `count` encoded rectangles (`rectangles`, their bytes in
        pieces).  Returns the number of bytes queued."""
        count += len(plan.pseudo)
        if count == 0 and not plan.full:
            return 0
        self._seal()
        self._chunks.append(struct.pack(">BxH", ServerMsg.FRAMEBUFFER_UPDATE, count))
        self._chunks += plan.pseudo
        self._chunks += rectangles
        return 4 + sum(map(len, plan.pseudo)) + sum(len(c) for c in rectangles)

    def open_update(self, plan: UpdatePlan, count: int) -> int:
        """Queue the head of the FramebufferUpdate `plan` began (its
        pseudo-rectangles included), announcing `count` encoded rectangles
        that follow through `update_data` as they are encoded; other
        messages wait until `close_update`.  Returns the bytes queued."""
        if self._update_open:
            raise RuntimeError("an update is already open")
        self._seal()
        self._chunks.append(struct.pack(">BxH", ServerMsg.FRAMEBUFFER_UPDATE, count + len(plan.pseudo)))
        self._chunks += plan.pseudo
        self._update_open = True
        return 4 + sum(map(len, plan.pseudo))

    def update_data(self, rectangles: list[bytes]) -> int:
        """Queue more of the open update's rectangles (their bytes in pieces)."""
        if not self._update_open:
            raise RuntimeError("no update is open")
        self._chunks += rectangles
        return sum(len(c) for c in rectangles)

    def close_update(self) -> None:
        """The open update is complete (or abandoned with the connection):
        messages queued meanwhile go next."""
        self._update_open = False

    _STATE_PARSERS = {
        State.VERSION: _parse_version,
        State.SECURITY: _parse_security,
        State.VENCRYPT_VERSION: _parse_vencrypt_version,
        State.VENCRYPT_SUBTYPE: _parse_vencrypt_subtype,
        State.VNC_AUTH: _parse_auth,
        State.CLIENT_INIT: _parse_client_init,
        State.NORMAL: _parse_message,
    }
