"""The zygote's wire format, defined once (docs/zygote.md, "Wire format").

Every message is one SOCK_SEQPACKET datagram on a unix socket, so it never
leaves the host: integers are in the host's byte order at standard sizes
(struct "="), and strings are raw bytes as the kernel gave them to the
stand-in (argv, environ): no text encoding anywhere.  Each message starts
with HEADER (magic, version, kind); then, by kind:

  REQUEST  stand-in -> zygote, with the fds (SCM_RIGHTS)
           REQUEST_FIXED  argc, envc, nfds, umask, rlimit mask, strings length
           RLIMIT x len(RLIMITS)  (soft, hard) for each of RLIMITS in order,
                          -1 = infinity; (0, 0) where the mask's bit is clear
           FD x nfds      the number each passed fd has in the stand-in
           strings        cwd, argv[0..argc), env[0..envc) ("NAME=VALUE"),
                          each NUL-terminated, nothing after them
  ERROR    zygote -> stand-in: COUNT (length) + UTF-8 text, one line
  PID      child -> stand-in: NUMBER (the child's pid)
  GO       stand-in -> child: the header alone
  SIGNAL   stand-in -> child: NUMBER (a forwarded signal)
  EXIT     child -> stand-in: NUMBER (its exit status, 0..255)

standin.c writes and reads the same layout; tests/test_standin_c.py checks
its constants against these and both encoders against each other.  Every
decoder here checks lengths first and raises WireError (a ValueError) with
a one-line reason.

Only _struct is imported (a C module): the stand-in's path to the
hand-over and the forwarder stay this light (tests/test_rehearsal.py).
"""
from __future__ import annotations

try:
    from _struct import Struct, error as _StructError
except ImportError:                     # not CPython
    from struct import Struct, error as _StructError

MAGIC = b"PXZG"
PROTOCOL = 2                            # 1 was one JSON object per message
REQUEST, ERROR, PID, GO, SIGNAL, EXIT = 1, 2, 3, 4, 5, 6
KIND_NAMES = {REQUEST: "request", ERROR: "error", PID: "pid", GO: "go", SIGNAL: "signal", EXIT: "exit"}

HEADER = Struct("=4sHH")                # magic, version, kind: 8 bytes
REQUEST_FIXED = Struct("=IIIIII")       # argc, envc, nfds, umask, rlimit mask, strings length
RLIMIT = Struct("=qq")                  # soft, hard; -1 = RLIM_INFINITY
FD = Struct("=i")
NUMBER = Struct("=i")                   # PID, SIGNAL, EXIT
COUNT = Struct("=I")                    # ERROR's text length

MAX_REQUEST = 128 * 1024                # a whole request, header to the last NUL
MAX_MESSAGE = 4096                      # every other message
MAX_ERROR = MAX_MESSAGE - HEADER.size - COUNT.size
MAX_FDS = 16
MAX_FD_NUMBER = 1023
MAX_ARGS = 4096
RLIMITS = ("AS", "CORE", "CPU", "DATA", "FSIZE", "LOCKS", "MEMLOCK", "MSGQUEUE", "NICE",
           "NOFILE", "NPROC", "RSS", "RTPRIO", "RTTIME", "SIGPENDING", "STACK")
RLIMIT_MAX = (1 << 63) - 1
SIGNAL_MAX = 64
REQUEST_HEAD = HEADER.size + REQUEST_FIXED.size + RLIMIT.size * len(RLIMITS)


class WireError(ValueError):
    """A message that is not this format; str() is the reason (one line)."""


class Request:
    """A decoded request: argv and env entries as bytes, env as NAME -> VALUE."""

    def __init__(self, argv: list[bytes], env: dict[bytes, bytes], cwd: bytes, umask: int,
                 rlimits: dict[str, tuple[int, int]], fds: list[int]):
        self.argv, self.env, self.cwd, self.umask = argv, env, cwd, umask
        self.rlimits, self.fds = rlimits, fds


def _header(kind: int) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL, kind)


def _check_header(data: bytes) -> int:
    """The kind of a message whose header is this format's."""
    if len(data) < HEADER.size:
        raise WireError(f"message of {len(data)} bytes is shorter than a header")
    magic, version, kind = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"not a zygote message (magic {bytes(magic)!r})")
    if version != PROTOCOL:
        raise WireError(f"protocol version {version}, expected {PROTOCOL}")
    if kind not in KIND_NAMES:
        raise WireError(f"unknown message kind {kind}")
    return kind


# ---- the request -----------------------------------------------------------------

def encode_request(argv: list[bytes], env: list[bytes], cwd: bytes, umask: int,
                   rlimits: dict[str, tuple[int, int]], fds: list[int]) -> bytes:
    """env: "NAME=VALUE" entries.  Encodes whatever it is given that fits the
    layout (the zygote's decoder judges it); WireError if longer than MAX_REQUEST."""
    mask, limits = 0, []
    for bit, name in enumerate(RLIMITS):
        pair = rlimits.get(name)
        if pair is not None:
            mask |= 1 << bit
        try:
            limits.append(RLIMIT.pack(*(pair or (0, 0))))
        except _StructError:
            raise WireError(f"rlimit {name} {pair} out of range") from None
    strings = b"".join(s + b"\0" for s in (cwd, *argv, *env))
    try:
        data = b"".join((_header(REQUEST),
                         REQUEST_FIXED.pack(len(argv), len(env), len(fds), umask, mask, len(strings)),
                         *limits, *(FD.pack(fd) for fd in fds), strings))
    except _StructError as e:
        raise WireError(f"request field out of range: {e}") from None
    if len(data) > MAX_REQUEST:
        raise WireError(f"request of {len(data)} bytes exceeds {MAX_REQUEST}")
    return data


def decode_request(data: bytes, passed: int) -> Request:
    """passed: how many fds came with it.  WireError for anything the zygote refuses."""
    if len(data) > MAX_REQUEST:
        raise WireError(f"request longer than {MAX_REQUEST} bytes")
    kind = _check_header(data)
    if kind != REQUEST:
        raise WireError(f"a {KIND_NAMES[kind]} message where a request belongs")
    if len(data) < REQUEST_HEAD:
        raise WireError(f"request of {len(data)} bytes is shorter than its fixed part")
    argc, envc, nfds, umask, mask, strings_len = REQUEST_FIXED.unpack_from(data, HEADER.size)
    if not 1 <= argc <= MAX_ARGS:
        raise WireError(f"argv must have 1..{MAX_ARGS} entries, not {argc}")
    if nfds != passed or nfds > MAX_FDS:
        raise WireError(f"fds must name 0..{MAX_FD_NUMBER} once each, one per passed fd "
                        f"({nfds} named, {passed} passed)")
    if umask > 0o777:
        raise WireError("umask out of range")
    if mask >> len(RLIMITS):
        raise WireError(f"bad rlimit mask {mask:#x}")
    at = HEADER.size + REQUEST_FIXED.size
    rlimits = {}
    for bit, name in enumerate(RLIMITS):
        soft, hard = RLIMIT.unpack_from(data, at + bit * RLIMIT.size)
        if mask & (1 << bit):
            if not (-1 <= soft and -1 <= hard):
                raise WireError(f"bad rlimit {name}")
            rlimits[name] = (soft, hard)
    at = REQUEST_HEAD
    if len(data) != at + nfds * FD.size + strings_len:
        raise WireError(f"request of {len(data)} bytes, its fields say "
                        f"{at + nfds * FD.size + strings_len}")
    fds = [FD.unpack_from(data, at + i * FD.size)[0] for i in range(nfds)]
    if not all(0 <= fd <= MAX_FD_NUMBER for fd in fds) or len(set(fds)) != len(fds):
        raise WireError(f"fds must name 0..{MAX_FD_NUMBER} once each, one per passed fd")
    strings = data[at + nfds * FD.size:]
    if not strings.endswith(b"\0") or strings.count(b"\0") != 1 + argc + envc:
        raise WireError(f"strings must be cwd, {argc} arguments and {envc} environment "
                        "entries, each NUL-terminated")
    parts = strings[:-1].split(b"\0")
    cwd, argv, entries = parts[0], parts[1:1 + argc], parts[1 + argc:]
    if not cwd.startswith(b"/"):
        raise WireError("cwd must be an absolute path")
    env = {}
    for entry in entries:
        name, eq, value = entry.partition(b"=")
        if not name or not eq:
            raise WireError("env entries must be NAME=VALUE with a name")
        env.setdefault(name, value)
    return Request(argv, env, cwd, umask, rlimits, fds)


# ---- the small messages -------------------------------------------------------------

def encode_error(text: str) -> bytes:
    raw = text.encode("utf-8", "replace")[:MAX_ERROR]
    return _header(ERROR) + COUNT.pack(len(raw)) + raw


def encode_pid(pid: int) -> bytes:
    return _header(PID) + NUMBER.pack(pid)


def encode_go() -> bytes:
    return _header(GO)


def encode_signal(signum: int) -> bytes:
    return _header(SIGNAL) + NUMBER.pack(signum)


def encode_exit(code: int) -> bytes:
    return _header(EXIT) + NUMBER.pack(code)


def decode(data: bytes) -> tuple[int, int | str | None]:
    """Any message but a request: (kind, value): ERROR's text, PID's pid
    (2..2**31-1), SIGNAL's number (1..64), EXIT's status (0..255), GO's None."""
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message longer than {MAX_MESSAGE} bytes")
    kind = _check_header(data)
    body = len(data) - HEADER.size
    if kind == GO:
        if body:
            raise WireError("go message with a body")
        return kind, None
    if kind == ERROR:
        if body < COUNT.size or COUNT.unpack_from(data, HEADER.size)[0] != body - COUNT.size:
            raise WireError("error message of a length other than its text's")
        return kind, data[HEADER.size + COUNT.size:].decode("utf-8", "replace")
    if kind == REQUEST or body != NUMBER.size:
        raise WireError(f"{KIND_NAMES[kind]} message of {len(data)} bytes")
    value = NUMBER.unpack_from(data, HEADER.size)[0]
    low, high = {PID: (2, (1 << 31) - 1), SIGNAL: (1, SIGNAL_MAX), EXIT: (0, 255)}[kind]
    if not low <= value <= high:
        raise WireError(f"{KIND_NAMES[kind]} {value} out of range")
    return kind, value


def exit_code(data: bytes) -> int | None:
    """The status (0..255) of an EXIT message; None for any other message."""
    try:
        kind, value = decode(data)
    except WireError:
        return None
    return value if kind == EXIT else None
