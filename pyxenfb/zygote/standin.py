"""pyqemu-dm's side of the warm fork-server (pyxenfb-zygote, docs/zygote.md).

`try_zygote` is the first thing pyqemu-dm does (launch.py): it hands this process's argv,
environment and fds to a zygote, then stays as the thin stand-in whose pid
the toolstack knows.  (In a zygote child, server.StandInLink is the device
model's hook: its control socket closing -- the stand-in SIGKILLed -- ends it.)
The wire format and its bounds are wire.py's.

This module imports only the standard library, and on the stand-in's path
to the hand-over only C modules (_socket, _signal, _struct) besides os, sys and
time: socket.py and signal.py would pull in enum and re, ~10 ms here and a
good part of a second in an emulated dom0, before every domain's start;
the zygote itself (server.py) imports the whole device model.
"""
from __future__ import annotations

import os
import sys
import time

import _signal
import _socket

from . import wire
from .wire import MAX_FD_NUMBER, MAX_FDS, MAX_MESSAGE, RLIMITS, WireError

ENV = "PYXENFB_ZYGOTE"                  # a socket path, or "off"
DEFAULT_SOCKET = "/var/run/xen/pyxenfb-zygote.sock"
ANSWER_TIMEOUT = 2.0                    # the stand-in's bound on the zygote's answer
REQUEST_TIMEOUT = 2.0                   # the zygote's bound on a peer's request
MAX_PENDING = 64                        # connections accepted but not yet served
NAMESPACES = ("mnt", "ipc")             # what libxl's dm_restrict unshares
CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
RLIMIT_NUMBERS = {"LOCKS": 10}          # Linux's number; Python has no name for it


class Unavailable(Exception):
    """No zygote to use: the reason (one line), and whether to say it."""

    def __init__(self, reason: str, quiet: bool = False):
        super().__init__(reason)
        self.quiet = quiet


# ---- shared helpers ------------------------------------------------------------

def _fd_bytes(fds: list[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)


def _recv(sock, limit: int = MAX_MESSAGE) -> tuple[int, int | str | None] | None:
    """One message (wire.decode's (kind, value)); None at EOF; WireError if malformed."""
    data, _anc, flags, _addr = sock.recvmsg(limit + 1)
    if not data:
        return None
    if flags & _socket.MSG_TRUNC or len(data) > limit:
        raise WireError(f"message longer than {limit} bytes")
    return wire.decode(data)


def _rlimit_number(name: str) -> int | None:
    import resource
    return getattr(resource, f"RLIMIT_{name}", RLIMIT_NUMBERS.get(name))


def _ns_inode(pid: int | str, ns: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{ns}").st_ino


# ---- the stand-in (the process the toolstack exec'd) ---------------------------------

def _fds_to_pass(argv: list[str]) -> list[int]:
    """0, 1, 2 where open, and every `fd=N` of a -chardev/-add-fd in argv."""
    wanted = [0, 1, 2]
    for arg in argv:
        for part in arg.split(","):
            if part.startswith("fd=") and part[3:].isdigit():
                wanted.append(int(part[3:]))
    out = []
    for fd in dict.fromkeys(wanted):
        if fd <= MAX_FD_NUMBER and len(out) < MAX_FDS:
            try:
                os.fstat(fd)
            except OSError:
                continue                  # closed here: the child has it closed too
            out.append(fd)
    return out


def _rlimits() -> dict[str, tuple[int, int]]:
    import resource
    out = {}
    for name in RLIMITS:
        number = _rlimit_number(name)
        if number is not None:
            try:
                out[name] = resource.getrlimit(number)
            except (ValueError, OSError):
                continue
    return out


def _handshake(path: str, argv: list[str], explicit: bool,
               announce) -> tuple[socket.socket, int, list[int]]:
    deadline = time.monotonic() + ANSWER_TIMEOUT
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            sock.connect(path)
        except FileNotFoundError:
            # No zygote installed at the default path: a plain cold start, silently.
            raise Unavailable(f"no zygote at {path}", quiet=not explicit) from None
        except TimeoutError:
            raise Unavailable(f"{path} did not accept within {ANSWER_TIMEOUT:g} s") from None
        except OSError as e:
            raise Unavailable(f"cannot connect to {path}: {e.strerror or e}") from None
        fds = _fds_to_pass(argv)
        try:
            cwd = os.getcwdb()
        except OSError:
            raise Unavailable("cannot read the working directory") from None
        argv0 = sys.argv[0] if sys.argv else "pyqemu-dm"
        try:
            # The bytes the kernel gave this process, as the C launcher sends them.
            data = wire.encode_request([os.fsencode(a) for a in (argv0, *argv)],
                                       [k + b"=" + v for k, v in os.environb.items() if k],
                                       cwd, _umask(), _rlimits(), fds)
        except WireError as e:
            raise Unavailable(str(e)) from None
        try:
            sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _fd_bytes(fds))])
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            reply = _recv(sock)
        except TimeoutError:
            raise Unavailable(f"{path} did not answer within {ANSWER_TIMEOUT:g} s") from None
        except (OSError, WireError) as e:
            raise Unavailable(f"{path}: bad answer: {e}") from None
        if reply is None:
            raise Unavailable(f"{path} closed the connection without an answer")
        kind, value = reply
        if kind == wire.ERROR:
            raise Unavailable(f"{path} refused: {value[:200]}")
        if kind != wire.PID:
            raise Unavailable(f"{path}: bad answer: a {wire.KIND_NAMES[kind]} message")
        pid = value
        announce(pid)       # before GO: the child logs only once it has GO, so this line comes first
        try:
            sock.send(wire.encode_go())     # from here on the child is this domain's DM
        except OSError as e:
            raise Unavailable(f"{path}: child {pid} went away: {e.strerror or e}") from None
        sock.settimeout(None)
        return sock, pid, fds
    except BaseException:
        sock.close()
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def try_zygote(argv: list[str], prefix: str) -> int | None:
    """In the exec'd pyqemu-dm: have the zygote fork this domain's device model
    and stand in for it (returns its exit status); None = start cold."""
    setting = os.environ.get(ENV, "")
    if setting == "off":
        return None
    path = setting or DEFAULT_SOCKET
    started = time.monotonic()
    # The toolstack may signal us as soon as the child is running: held from
    # before the hand-over until the forwarder's handlers are in place (as
    # the C launcher does), or released to a cold start on failure.
    forwarded = {_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP}
    _signal.pthread_sigmask(_signal.SIG_BLOCK, forwarded)

    def announce(pid: int) -> None:
        from ..machine.supervisor import seconds_since_exec     # os only
        since_exec = seconds_since_exec()
        print(f"{prefix}: zygote {path} forked the device model as pid {pid} in "
              f"{(time.monotonic() - started) * 1000:.0f} ms"
              + ("" if since_exec is None else f" ({since_exec * 1000:.0f} ms after exec)")
              + f"; pid {os.getpid()} stands in for it", file=sys.stderr, flush=True)

    try:
        sock, pid, fds = _handshake(path, argv, explicit=bool(setting), announce=announce)
    except Unavailable as e:
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, forwarded)
        if not e.quiet:
            print(f"{prefix}: zygote: {e}; cold start", file=sys.stderr, flush=True)
        return None
    return _stand_in(sock, pid, fds, prefix)


# The stand-in, once committed, re-execs itself into its last form, same pid
# for the toolstack: the C stand-in (pyxenfb/bin/pyqemu-dm --forward, built
# from standin.c; ~0.3 MiB) where it was built, else a bare interpreter
# running only forwarder.py (no site, no socket, no json; ~3.5 MiB).  Either
# keeps the original argv for `ps`.  docs/zygote.md has the figures.
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))       # .../pyxenfb
C_STAND_IN = os.path.join(_PACKAGE, "bin", "pyqemu-dm")
_SLIM = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from pyxenfb.zygote.forwarder import main; sys.exit(main(sys.argv[2:]))")


def _reexec_slim(sock: socket.socket, pid: int, prefix: str) -> None:
    """Returns only if the exec failed (the stand-in then carries on as it is)."""
    root = os.path.dirname(_PACKAGE)
    # The forwarded signals, blocked since try_zygote, stay blocked across
    # exec and pending until the new image has its handlers in place.
    tail = [str(sock.fileno()), str(pid), prefix, "--", *sys.argv]
    try:
        os.set_inheritable(sock.fileno(), True)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.access(C_STAND_IN, os.X_OK):
            try:
                os.execv(C_STAND_IN, [C_STAND_IN, "--forward", *tail])
            except OSError:
                pass                        # not runnable here: the Python one below
        os.execv(sys.executable, [sys.executable, "-S", "-I", "-c", _SLIM, root, *tail])
    except OSError:
        os.set_inheritable(sock.fileno(), False)


def _stand_in(sock: socket.socket, pid: int, fds: list[int], prefix: str) -> int:
    for fd in fds:
        if fd > 2:
            os.close(fd)                   # the child's QMP socket: not ours to hold open
    _reexec_slim(sock, pid, prefix)
    from . import forwarder
    return forwarder.forward(sock.fileno(), pid, prefix)
