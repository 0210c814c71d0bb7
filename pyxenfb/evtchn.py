"""Event channels: one handle, one pollable fd, many ports.

Two implementations behind one small interface (docs/interfaces.md):

* `RealEventChannel` — /dev/xen/evtchn through libxenevtchn.so.1 (cffi ABI
  mode: no compiler needed, the library is only dlopen-ed when a handle is
  constructed).
* `SimEventChannel` — a SOCK_SEQPACKET connection to the simulated host's
  event-channel broker (pyxenfb.sim.evtchn_broker; protocol in
  docs/interfaces.md and docs/sim-evtchn-memory.md).

Loop use::

    loop.add_reader(ch.fileno(), on_ready)
    def on_ready():
        for port in ch.pending():
            handle(port)
            ch.unmask(port)
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import struct
import time
from abc import ABC, abstractmethod

from .util.lazylib import LazyLibrary

log = logging.getLogger(__name__)

# ---- broker wire protocol (shared with pyxenfb.sim.evtchn_broker) ---------
OP_HELLO = 1
OP_ALLOC_UNBOUND = 2
OP_BIND_INTERDOMAIN = 3
OP_NOTIFY = 4
OP_UNMASK = 5
OP_UNBIND = 6
OP_RESTRICT = 7         # IOCTL_EVTCHN_RESTRICT_DOMID: this handle serves one domain from now on
OP_NAMES = {OP_HELLO: "HELLO", OP_ALLOC_UNBOUND: "ALLOC_UNBOUND",
            OP_BIND_INTERDOMAIN: "BIND_INTERDOMAIN", OP_NOTIFY: "NOTIFY",
            OP_UNMASK: "UNMASK", OP_UNBIND: "UNBIND", OP_RESTRICT: "RESTRICT"}
REQUEST = struct.Struct("<IIII")      # op, a, b, c
REPLY = struct.Struct("<iI")          # result (port, 0 or -errno), op
NOTIFICATION = struct.Struct("<I")    # a local port that fired
# Receive buffer larger than any valid message, so an oversized message shows
# up as a wrong length instead of being silently truncated to a valid one.
RECV_SIZE = 64

MAX_PORT = 0xFFFFFFFF
MAX_DOMID = 0xFFFF

# How long a synchronous request may wait for the broker's reply.
DEFAULT_TIMEOUT = 5.0
# At most this many ports are read per pending() call; the fd stays readable
# if more are queued, so the loop simply calls again.
MAX_PENDING_PER_CALL = 4096


def _check_port(port: int) -> int:
    if not isinstance(port, int) or not 1 <= port <= MAX_PORT:
        raise ValueError(f"bad event-channel port {port!r}")
    return port


def _check_domid(domid: int) -> int:
    if not isinstance(domid, int) or not 0 <= domid <= MAX_DOMID:
        raise ValueError(f"bad domain id {domid!r}")
    return domid


class EventChannel(ABC):
    """One event-channel handle (like one open of /dev/xen/evtchn)."""

    @abstractmethod
    def fileno(self) -> int:
        """An fd that is readable while pending() has ports to return."""

    @abstractmethod
    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind to `remote_port` of domain `domid`; returns the local port."""

    @abstractmethod
    def alloc_unbound(self, remote_domid: int) -> int:
        """A new local port that domain `remote_domid` may bind to."""

    @abstractmethod
    def notify(self, port: int) -> None:
        """Send an event through a local port to its peer."""

    @abstractmethod
    def pending(self) -> list[int]:
        """Ports that fired since the last call (non-blocking, [] if none).

        Each returned port is masked until unmask(port)."""

    @abstractmethod
    def unmask(self, port: int) -> None:
        """Re-arm a port; an event that came while masked is delivered now."""

    @abstractmethod
    def unbind(self, port: int) -> None:
        """Release a local port."""

    @abstractmethod
    def close(self) -> None:
        """Release the handle and all its ports (idempotent)."""

    def restrict(self, domid: int) -> None:
        """From now on this handle binds only to ports of `domid`
        (xenevtchn_restrict; dm_restrict).  Irrevocable: a second call fails
        with EACCES, binding elsewhere or an unbound port with EACCES."""
        raise OSError(errno.ENOSYS, f"{type(self).__name__} cannot be restricted")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- simulated: the broker connection --------------------------------------

class SimEventChannel(EventChannel):
    """A handle on the simulated host's broker (DIR/evtchn.sock).

    Requests with a reply are synchronous: the request is sent, then messages
    are read until the 8-byte reply arrives.  Notifications (4 bytes) that
    arrive meanwhile are stashed for pending().  Because the loop only wakes
    on fd readability, fileno() is an epoll fd watching both the socket and an
    eventfd that is signalled while the stash is non-empty — so a stashed
    notification wakes the loop exactly like one still in the socket.
    """

    def __init__(self, sock_path: str, domid: int, *, timeout: float = DEFAULT_TIMEOUT):
        self.domid = _check_domid(domid)
        self.sock_path = sock_path
        self.timeout = timeout
        self._stash: list[int] = []
        self._sock: socket.socket | None = None
        self._wake_fd = -1
        self._epoll: select.epoll | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(sock_path)
            except OSError as e:
                raise OSError(e.errno, f"cannot connect to the event-channel broker "
                                       f"at {sock_path}: {e.strerror}") from None
            sock.setblocking(False)
            self._sock = sock
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._epoll = select.epoll()
            self._epoll.register(sock.fileno(), select.EPOLLIN)
            self._epoll.register(self._wake_fd, select.EPOLLIN)
            self._request(OP_HELLO, domid)
        except BaseException:
            sock.close()
            self._sock = None
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<SimEventChannel dom{self.domid} {self.sock_path}>"

    # -- interface

    def fileno(self) -> int:
        if self._epoll is None:
            raise ValueError("event channel is closed")
        return self._epoll.fileno()

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        return self._request(OP_BIND_INTERDOMAIN, _check_domid(domid), _check_port(remote_port))

    def alloc_unbound(self, remote_domid: int) -> int:
        return self._request(OP_ALLOC_UNBOUND, _check_domid(remote_domid))

    def notify(self, port: int) -> None:
        self._send(OP_NOTIFY, _check_port(port))

    def unmask(self, port: int) -> None:
        self._send(OP_UNMASK, _check_port(port))

    def restrict(self, domid: int) -> None:
        self._request(OP_RESTRICT, _check_domid(domid))

    def unbind(self, port: int) -> None:
        self._request(OP_UNBIND, _check_port(port))
        # An event that fired before the unbind must not surface afterwards.
        self._stash = [p for p in self._stash if p != port]

    def pending(self) -> list[int]:
        sock = self._live_socket()
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        ports, self._stash = self._stash, []
        while len(ports) < MAX_PENDING_PER_CALL:
            try:
                msg = sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            if not msg:
                raise ConnectionError(f"event-channel broker {self.sock_path} "
                                      "closed the connection")
            if len(msg) == NOTIFICATION.size:
                ports.append(NOTIFICATION.unpack(msg)[0])
            else:
                log.warning("%r: ignoring unexpected %d-byte message from the broker",
                            self, len(msg))
        return ports

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._stash = []

    # -- wire

    def _live_socket(self) -> socket.socket:
        if self._sock is None:
            raise ValueError("event channel is closed")
        return self._sock

    def _wait(self, sock: socket.socket, events: int, deadline: float, what: str) -> None:
        poller = select.poll()
        poller.register(sock.fileno(), events)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(errno.ETIMEDOUT, f"event-channel broker {self.sock_path}: "
                                                    f"no {what} within {self.timeout} s")
            if poller.poll(left * 1000):
                return

    def _send(self, op: int, a: int = 0, b: int = 0) -> None:
        sock = self._live_socket()
        msg = REQUEST.pack(op, a, b, 0)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock.send(msg)
                return
            except BlockingIOError:
                self._wait(sock, select.POLLOUT, deadline, "room to send")

    def _request(self, op: int, a: int = 0, b: int = 0) -> int:
        sock = self._live_socket()
        self._send(op, a, b)
        deadline = time.monotonic() + self.timeout
        stashed_before = len(self._stash)
        try:
            while True:
                try:
                    msg = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    self._wait(sock, select.POLLIN, deadline, f"reply to {OP_NAMES[op]}")
                    continue
                if not msg:
                    raise ConnectionError(f"event-channel broker {self.sock_path} "
                                          f"closed the connection during {OP_NAMES[op]}")
                if len(msg) == NOTIFICATION.size:
                    if len(self._stash) >= MAX_PENDING_PER_CALL:
                        raise OSError(errno.EPROTO, f"event-channel broker {self.sock_path}: "
                                                    "notification flood during a request")
                    self._stash.append(NOTIFICATION.unpack(msg)[0])
                    continue
                if len(msg) != REPLY.size:
                    raise OSError(errno.EPROTO, f"event-channel broker {self.sock_path}: "
                                                f"bad {len(msg)}-byte message")
                result, reply_op = REPLY.unpack(msg)
                if reply_op != op:
                    raise OSError(errno.EPROTO, f"event-channel broker {self.sock_path}: reply "
                                                f"for op {reply_op}, expected {OP_NAMES[op]}")
                if result < 0:
                    raise OSError(-result, f"{OP_NAMES[op]}({a}, {b}) on {self.sock_path}: "
                                           f"{os.strerror(-result)}")
                return result
        finally:
            if len(self._stash) > stashed_before:
                os.eventfd_write(self._wake_fd, 1)


# ---- real: libxenevtchn ----------------------------------------------------

def _open_libxenevtchn():
    from .platform._xen_ffi import ffi      # generated from xen_cdefs.EVTCHN
    return ffi, ffi.dlopen("libxenevtchn.so.1")


_load_libxenevtchn = LazyLibrary(_open_libxenevtchn)


class RealEventChannel(EventChannel):
    """/dev/xen/evtchn through libxenevtchn (needs a Xen dom0 or driver domain)."""

    def __init__(self) -> None:
        self._ffi, self._lib = _load_libxenevtchn()
        handle = self._lib.xenevtchn_open(self._ffi.NULL, 0)
        if handle == self._ffi.NULL:
            err = self._ffi.errno
            raise OSError(err, f"cannot open the Xen event-channel device /dev/xen/evtchn "
                               f"(xenevtchn_open): {os.strerror(err)}")
        self._handle = handle
        self._fd = self._lib.xenevtchn_fd(handle)
        # pending() must never block the loop: read() then fails with EAGAIN.
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    def _live(self):
        if self._handle is None:
            raise ValueError("event channel is closed")
        return self._handle

    def _check(self, ret: int, what: str) -> int:
        if ret < 0:
            err = self._ffi.errno
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return ret

    def fileno(self) -> int:
        self._live()
        return self._fd

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        return self._check(self._lib.xenevtchn_bind_interdomain(
            self._live(), _check_domid(domid), _check_port(remote_port)),
            f"xenevtchn_bind_interdomain(dom {domid}, port {remote_port})")

    def alloc_unbound(self, remote_domid: int) -> int:
        return self._check(self._lib.xenevtchn_bind_unbound_port(
            self._live(), _check_domid(remote_domid)),
            f"xenevtchn_bind_unbound_port(dom {remote_domid})")

    def notify(self, port: int) -> None:
        self._check(self._lib.xenevtchn_notify(self._live(), _check_port(port)),
                    f"xenevtchn_notify({port})")

    def unmask(self, port: int) -> None:
        self._check(self._lib.xenevtchn_unmask(self._live(), _check_port(port)),
                    f"xenevtchn_unmask({port})")

    def unbind(self, port: int) -> None:
        self._check(self._lib.xenevtchn_unbind(self._live(), _check_port(port)),
                    f"xenevtchn_unbind({port})")

    def restrict(self, domid: int) -> None:
        self._check(self._lib.xenevtchn_restrict(self._live(), _check_domid(domid)),
                    f"xenevtchn_restrict(dom {domid})")

    def pending(self) -> list[int]:
        handle = self._live()
        ports: list[int] = []
        while len(ports) < MAX_PENDING_PER_CALL:
            port = self._lib.xenevtchn_pending(handle)
            if port < 0:
                err = self._ffi.errno
                if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                raise OSError(err, f"xenevtchn_pending: {os.strerror(err)}")
            ports.append(port)
        return ports

    def close(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            self._handle = None
            self._lib.xenevtchn_close(handle)
