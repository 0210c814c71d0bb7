"""XenStore wire protocol (xen/io/xs_wire.h) as a sans-IO codec.

Bytes in -> `Message`s out (`MessageDecoder`), `Message` -> bytes
(`Message.encode`), plus path validation and the error-name table.  No
sockets here: the asyncio client (`pyxenfb.platform.xenstore`) and the simulated
daemon (`pyxenfb.sim.xenstored`) both sit on top of this module.

Message numbers are taken from pyxs's `Op` table where pyxs has them, so two
independent definitions must agree (tests also check them against Debian's
C header).  We do not use pyxs's client itself: it blocks every call on a
private router thread (no way to put its fd in our event loop), refuses
empty or non-ASCII values (xenbus writes empty ones all the time), knows no
opcodes above 19 (RESET_WATCHES, DIRECTORY_PART) and hangs a call in flight
forever when the daemon goes away.  Its `Packet` refuses opcodes 21/22 for
the same reason, and its `check_path` always applies the absolute length
limit, so we keep our own `Message` and path checks.
"""
from __future__ import annotations

import enum
import errno
import re
import struct
from dataclasses import dataclass

from pyxs._internal import Op

HEADER = struct.Struct("<IIII")          # type, req_id, tx_id, len
HEADER_SIZE = HEADER.size                # 16
PAYLOAD_MAX = 4096                       # XENSTORE_PAYLOAD_MAX
ABS_PATH_MAX = 3072                      # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048                      # XENSTORE_REL_PATH_MAX
UINT32_MAX = 0xFFFFFFFF


class XsType(enum.IntEnum):
    """enum xsd_sockmsg_type."""
    CONTROL = Op.DEBUG
    DIRECTORY = Op.DIRECTORY
    READ = Op.READ
    GET_PERMS = Op.GET_PERMS
    WATCH = Op.WATCH
    UNWATCH = Op.UNWATCH
    TRANSACTION_START = Op.TRANSACTION_START
    TRANSACTION_END = Op.TRANSACTION_END
    INTRODUCE = Op.INTRODUCE
    RELEASE = Op.RELEASE
    GET_DOMAIN_PATH = Op.GET_DOMAIN_PATH
    WRITE = Op.WRITE
    MKDIR = Op.MKDIR
    RM = Op.RM
    SET_PERMS = Op.SET_PERMS
    WATCH_EVENT = Op.WATCH_EVENT
    ERROR = Op.ERROR
    IS_DOMAIN_INTRODUCED = Op.IS_DOMAIN_INTRODUCED
    RESUME = Op.RESUME
    SET_TARGET = Op.SET_TARGET
    # 20 was XS_RESTRICT, removed from Xen; the number stays unused.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


XS_TYPE_COUNT = 23
XS_INVALID = 0xFFFF

# Error names xenstored sends in an XS_ERROR payload, in header order.
ERROR_NAMES: tuple[str, ...] = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC",
    "EIO", "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN",
    "E2BIG", "EPERM",
)
ERRNO_BY_NAME: dict[str, int] = {name: getattr(errno, name) for name in ERROR_NAMES}
NAME_BY_ERRNO: dict[int, str] = {num: name for name, num in ERRNO_BY_NAME.items()}

SPECIAL_WATCH_PATHS = ("@introduceDomain", "@releaseDomain")


class ProtocolError(Exception):
    """The byte stream broke the protocol; the connection cannot continue."""


class InvalidPathError(ValueError):
    """A XenStore path that real xenstored would refuse with EINVAL."""


def error_name(err: int) -> str:
    """Wire name for an errno; unknown numbers become EINVAL as xenstored does."""
    return NAME_BY_ERRNO.get(err, "EINVAL")


def errno_from_name(name: bytes | str) -> int:
    """errno for a wire error name; unknown names map to EIO."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return ERRNO_BY_NAME.get(name, errno.EIO)


@dataclass(frozen=True, slots=True)
class Message:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        if len(self.payload) > PAYLOAD_MAX:
            raise ProtocolError(f"payload of {len(self.payload)} bytes exceeds {PAYLOAD_MAX}")
        return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    def strings(self) -> list[bytes]:
        """The NUL-terminated strings of the payload (a final unterminated part included)."""
        return split_strings(self.payload)


def split_strings(payload: bytes) -> list[bytes]:
    """b"a\\0b\\0" -> [b"a", b"b"]; an unterminated tail is kept as the last item."""
    parts = payload.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


def join_strings(*parts: bytes | str) -> bytes:
    """Each part NUL-terminated: join_strings("a", "b") == b"a\\0b\\0"."""
    out = bytearray()
    for part in parts:
        out += part.encode() if isinstance(part, str) else part
        out += b"\0"
    return bytes(out)


class MessageDecoder:
    """Incremental decoder: feed() any chunk of bytes, get complete messages.

    Refuses a header announcing more than PAYLOAD_MAX bytes (ProtocolError);
    after that the decoder stays broken because the stream has lost framing.
    At most one partial message (16 + 4096 bytes) is ever buffered.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._broken: str | None = None

    def feed(self, data: bytes) -> list[Message]:
        if self._broken:
            raise ProtocolError(self._broken)
        self._buf += data
        messages: list[Message] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= HEADER_SIZE:
            typ, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
            if length > PAYLOAD_MAX:
                self._broken = f"message announces {length} payload bytes (max {PAYLOAD_MAX})"
                self._buf = bytearray()
                raise ProtocolError(self._broken)
            end = pos + HEADER_SIZE + length
            if len(buf) < end:
                break
            messages.append(Message(typ, req_id, tx_id, bytes(buf[pos + HEADER_SIZE:end])))
            pos = end
        del buf[:pos]
        return messages

    @property
    def buffered(self) -> int:
        return len(self._buf)


# Node names: the characters real xenstored accepts.
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]+")


def validate_path(path: bytes | str, *, allow_special: bool = False) -> str:
    """Check a path as xenstored does and return it as str.

    Absolute paths may be up to ABS_PATH_MAX bytes, relative ones up to
    REL_PATH_MAX; no `//`, no trailing `/` except the root.  With
    allow_special the watch names @introduceDomain/@releaseDomain pass too.
    """
    if isinstance(path, bytes):
        try:
            path = path.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidPathError(f"non-ASCII path {path[:64]!r}") from None
    if allow_special and path in SPECIAL_WATCH_PATHS:
        return path
    if not path or _PATH_CHARS.fullmatch(path) is None:
        raise InvalidPathError(f"bad characters in path {path[:64]!r}")
    if path.startswith("@"):
        raise InvalidPathError(f"unknown special path {path[:64]!r}")
    limit = ABS_PATH_MAX if path.startswith("/") else REL_PATH_MAX
    if len(path) > limit:
        raise InvalidPathError(f"path of {len(path)} bytes exceeds {limit}")
    if "//" in path or (len(path) > 1 and path.endswith("/")):
        raise InvalidPathError(f"malformed path {path[:64]!r}")
    return path


def is_at_or_below(path: str, ancestor: str) -> bool:
    """True when `path` is `ancestor` itself or a node in its subtree."""
    if path == ancestor:
        return True
    if ancestor == "/":
        return path.startswith("/")
    return path.startswith(ancestor + "/")


# Permission strings: one letter (n none, r read, w write, b both) + domid.
_PERM = re.compile(r"([nrwb])([0-9]{1,10})")


def parse_perm(perm: bytes | str) -> tuple[str, int]:
    """b"r5" -> ("r", 5); ValueError on anything else."""
    if isinstance(perm, bytes):
        perm = perm.decode("ascii", "replace")
    match = _PERM.fullmatch(perm)
    if match is None or int(match.group(2)) > UINT32_MAX:
        raise ValueError(f"bad permission {perm[:32]!r}")
    return match.group(1), int(match.group(2))
