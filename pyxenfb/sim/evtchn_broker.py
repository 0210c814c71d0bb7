"""The simulated host's event-channel broker (DIR/evtchn.sock).

Plays the part of the hypervisor's event channels plus the Linux evtchn
driver: each SOCK_SEQPACKET connection is one handle of one domain, ports are
numbered per domain from 1, and a port is masked after each delivery until
its handle unmasks it (further notifies only set it pending), so events
coalesce exactly as on real Xen.  The wire protocol is in docs/interfaces.md
and docs/sim-evtchn-memory.md; the message layouts live in pyxenfb.evtchn.

Everything a client sends is hostile: lengths, ops, fields and port
ownership are checked.  A malformed message closes the connection; a
request that makes no sense gets a -errno reply; a notify/unmask of a port
the connection does not own is logged and ignored (too many of those close
the connection).  Output per connection is bounded.
"""
from __future__ import annotations

import asyncio
import errno
import heapq
import logging
import os
import socket
import stat
from collections import deque
from dataclasses import dataclass, field

from ..evtchn import (
    NOTIFICATION,
    OP_ALLOC_UNBOUND,
    OP_BIND_INTERDOMAIN,
    OP_HELLO,
    OP_NAMES,
    OP_NOTIFY,
    OP_RESTRICT,
    OP_UNBIND,
    RECV_SIZE,
    REPLY,
    REQUEST,
)
from ..platform.xenconst import DOMID_FIRST_RESERVED

log = logging.getLogger(__name__)

MAX_PORTS_PER_CONNECTION = 1024
MAX_CONNECTIONS = 256
# Requests handled per readiness callback, so one busy client can't starve others.
MAX_REQUESTS_PER_WAKE = 64
# Stop reading a client's requests while this many of its replies are unsent.
PAUSE_OUTPUT = 64
# Hard cap on queued output.  Masking bounds notifications to one per port,
# and pausing bounds replies, so only a broken client gets here.
MAX_OUTPUT = MAX_PORTS_PER_CONNECTION + PAUSE_OUTPUT + MAX_REQUESTS_PER_WAKE
# Ignored bad notifies/unmasks tolerated before the connection is closed.
MAX_BAD_REQUESTS = 16


@dataclass(eq=False)
class _Port:
    domid: int
    number: int
    owner: _Connection
    remote_domid: int          # unbound: who may bind; bound: the peer's domain
    remote_port: int = 0       # 0 while unbound
    masked: bool = False
    pending: bool = False


@dataclass
class _PortSpace:
    """One domain's port numbers: the lowest free number is reused first."""
    ports: dict[int, _Port] = field(default_factory=dict)
    next_number: int = 1
    freed: list[int] = field(default_factory=list)   # heap

    def allocate(self) -> int:
        if self.freed:
            return heapq.heappop(self.freed)
        self.next_number += 1
        return self.next_number - 1

    def release(self, number: int) -> None:
        del self.ports[number]
        heapq.heappush(self.freed, number)


class _Violation(Exception):
    """A message so malformed the connection is closed."""


class _Connection:
    def __init__(self, broker: EvtchnBroker, sock: socket.socket, name: str):
        self.broker = broker
        self.sock = sock
        self.name = name
        self.domid: int | None = None
        self.restricted_to: int | None = None     # OP_RESTRICT: the only domain it may bind to
        self.ports: dict[int, _Port] = {}
        self.output: deque[bytes] = deque()
        self.reading = False
        self.writing = False
        self.bad_requests = 0
        self.closed = False

    def __repr__(self) -> str:
        who = "?" if self.domid is None else self.domid
        return f"<evtchn conn {self.name} dom{who}>"


class EvtchnBroker:
    """Listens on `sock_path`; run start() inside the loop, close() to stop."""

    def __init__(self, sock_path: str):
        self.sock_path = sock_path
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_Connection] = set()
        self._spaces: dict[int, _PortSpace] = {}
        self._serial = 0

    # ---- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        _remove_stale_socket(self.sock_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.sock_path)
            listener.listen(64)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._loop.add_reader(listener.fileno(), self._on_accept)
        log.info("event-channel broker listening on %s", self.sock_path)

    async def close(self) -> None:
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.sock_path)
            except FileNotFoundError:
                pass
        for conn in list(self._connections):
            self._drop(conn, "broker shutting down")

    async def __aenter__(self) -> EvtchnBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- introspection (tests, debugging)

    def port_count(self, domid: int) -> int:
        space = self._spaces.get(domid)
        return len(space.ports) if space else 0

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def restrictions(self, domid: int) -> list[int]:
        """For each connection of domain `domid`: the domain it is restricted to (-1: none)."""
        return [-1 if c.restricted_to is None else c.restricted_to
                for c in self._connections if c.domid == domid]

    # ---- connections

    def _on_accept(self) -> None:
        for _ in range(MAX_REQUESTS_PER_WAKE):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:        # e.g. EMFILE: log, let the loop retry later
                log.warning("event-channel broker: accept failed: %s", e)
                return
            if len(self._connections) >= MAX_CONNECTIONS:
                log.warning("event-channel broker: refusing a connection, "
                            "already %d open", len(self._connections))
                sock.close()
                continue
            sock.setblocking(False)
            self._serial += 1
            conn = _Connection(self, sock, f"#{self._serial}")
            self._connections.add(conn)
            self._resume_reading(conn)

    def _resume_reading(self, conn: _Connection) -> None:
        if not conn.reading and not conn.closed:
            conn.reading = True
            self._loop.add_reader(conn.sock.fileno(), self._on_readable, conn)

    def _pause_reading(self, conn: _Connection) -> None:
        if conn.reading:
            conn.reading = False
            self._loop.remove_reader(conn.sock.fileno())

    def _on_readable(self, conn: _Connection) -> None:
        for _ in range(MAX_REQUESTS_PER_WAKE):
            if conn.closed or not conn.reading:
                return
            try:
                msg = conn.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._drop(conn, f"receive failed: {e}")
                return
            if not msg:
                self._drop(conn, None)
                return
            try:
                self._handle(conn, msg)
            except _Violation as e:
                self._drop(conn, str(e))
                return
            if len(conn.output) >= PAUSE_OUTPUT:
                self._pause_reading(conn)

    def _drop(self, conn: _Connection, reason: str | None) -> None:
        """Close a connection; its ports are unbound (peers become unbound)."""
        if conn.closed:
            return
        conn.closed = True
        if reason:
            log.warning("event-channel broker: closing %r: %s", conn, reason)
        else:
            log.debug("event-channel broker: %r disconnected", conn)
        for port in list(conn.ports.values()):
            self._close_port(port)
        self._pause_reading(conn)
        if conn.writing:
            conn.writing = False
            self._loop.remove_writer(conn.sock.fileno())
        conn.output.clear()
        conn.sock.close()
        self._connections.discard(conn)

    # ---- output

    def _send(self, conn: _Connection, msg: bytes) -> None:
        if conn.closed:
            return
        if conn.output:
            if len(conn.output) >= MAX_OUTPUT:
                self._drop(conn, f"not reading: {len(conn.output)} messages queued")
                return
            conn.output.append(msg)
            return
        try:
            conn.sock.send(msg)
        except (BlockingIOError, InterruptedError):
            conn.output.append(msg)
            conn.writing = True
            self._loop.add_writer(conn.sock.fileno(), self._on_writable, conn)
        except OSError as e:
            self._drop(conn, f"send failed: {e}")

    def _on_writable(self, conn: _Connection) -> None:
        while conn.output:
            try:
                conn.sock.send(conn.output[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._drop(conn, f"send failed: {e}")
                return
            conn.output.popleft()
        conn.writing = False
        self._loop.remove_writer(conn.sock.fileno())
        self._resume_reading(conn)

    def _reply(self, conn: _Connection, op: int, result: int) -> None:
        self._send(conn, REPLY.pack(result, op))

    # ---- requests

    def _handle(self, conn: _Connection, msg: bytes) -> None:
        if len(msg) != REQUEST.size:
            raise _Violation(f"{len(msg)}-byte message, requests are {REQUEST.size} bytes")
        op, a, b, c = REQUEST.unpack(msg)
        if op not in OP_NAMES:
            raise _Violation(f"unknown op {op}")
        if conn.domid is None and op != OP_HELLO:
            raise _Violation(f"{OP_NAMES[op]} before HELLO")
        if op == OP_HELLO:
            self._reply(conn, op, self._hello(conn, a, b, c))
        elif op == OP_ALLOC_UNBOUND:
            self._reply(conn, op, self._alloc_unbound(conn, a, b, c))
        elif op == OP_BIND_INTERDOMAIN:
            result = self._bind_interdomain(conn, a, b, c)
            self._reply(conn, op, result)
            if result > 0 and not conn.closed:
                # As Xen does: notifications sent to the remote port while it
                # was unbound would be lost, so the new port starts pending.
                self._deliver(conn.ports[result])
        elif op == OP_UNBIND:
            self._reply(conn, op, self._unbind(conn, a, b, c))
        elif op == OP_RESTRICT:
            self._reply(conn, op, self._restrict(conn, a, b, c))
        else:
            port = conn.ports.get(a)
            if port is None or b or c:
                why = "not a port of this connection" if port is None else "unused fields set"
                self._bad_request(conn, f"{OP_NAMES[op]}({a}, {b}, {c}): {why}")
                return
            if op == OP_NOTIFY:
                self._notify(port)
            else:
                self._unmask(port)

    def _bad_request(self, conn: _Connection, what: str) -> None:
        conn.bad_requests += 1
        if conn.bad_requests > MAX_BAD_REQUESTS:
            raise _Violation(f"too many bad requests, last: {what}")
        log.warning("event-channel broker: %r: ignoring %s", conn, what)

    def _hello(self, conn: _Connection, domid: int, b: int, c: int) -> int:
        if conn.domid is not None or b or c or domid >= DOMID_FIRST_RESERVED:
            return -errno.EINVAL
        conn.domid = domid
        return 0

    def _new_port(self, conn: _Connection, remote_domid: int, remote_port: int) -> _Port:
        space = self._spaces.setdefault(conn.domid, _PortSpace())
        port = _Port(conn.domid, space.allocate(), conn, remote_domid, remote_port)
        space.ports[port.number] = port
        conn.ports[port.number] = port
        return port

    def _restrict(self, conn: _Connection, domid: int, b: int, c: int) -> int:
        # As Linux's evtchn driver (IOCTL_EVTCHN_RESTRICT_DOMID): once only,
        # and only to a real guest domain.
        if conn.restricted_to is not None:
            return -errno.EACCES
        if b or c or domid == 0 or domid >= DOMID_FIRST_RESERVED:
            return -errno.EINVAL
        conn.restricted_to = domid
        log.info("event-channel broker: %r restricted to dom%d", conn, domid)
        return 0

    def _alloc_unbound(self, conn: _Connection, remote_domid: int, b: int, c: int) -> int:
        if conn.restricted_to is not None:
            return -errno.EACCES            # a restricted handle offers no new ports
        if b or c or remote_domid >= DOMID_FIRST_RESERVED:
            return -errno.EINVAL
        if len(conn.ports) >= MAX_PORTS_PER_CONNECTION:
            return -errno.ENOSPC
        return self._new_port(conn, remote_domid, 0).number

    def _bind_interdomain(self, conn: _Connection, remote_domid: int, remote_number: int,
                          c: int) -> int:
        if conn.restricted_to is not None and remote_domid != conn.restricted_to:
            return -errno.EACCES
        space = self._spaces.get(remote_domid)
        remote = space.ports.get(remote_number) if space else None
        if (c or remote is None or remote.remote_port != 0
                or remote.remote_domid != conn.domid):
            return -errno.EINVAL
        if len(conn.ports) >= MAX_PORTS_PER_CONNECTION:
            return -errno.ENOSPC
        local = self._new_port(conn, remote_domid, remote_number)
        remote.remote_port = local.number
        return local.number

    def _unbind(self, conn: _Connection, number: int, b: int, c: int) -> int:
        port = conn.ports.get(number)
        if port is None or b or c:
            return -errno.EINVAL
        self._close_port(port)
        return 0

    def _close_port(self, port: _Port) -> None:
        peer = self._peer(port)
        if peer is not None:
            # The peer becomes unbound again, bindable by our domain (as in Xen).
            peer.remote_port = 0
        del port.owner.ports[port.number]
        self._spaces[port.domid].release(port.number)

    def _peer(self, port: _Port) -> _Port | None:
        if port.remote_port == 0:
            return None
        return self._spaces[port.remote_domid].ports.get(port.remote_port)

    def _notify(self, port: _Port) -> None:
        peer = self._peer(port)
        if peer is not None:       # notifies on an unbound port go nowhere
            self._deliver(peer)

    def _unmask(self, port: _Port) -> None:
        port.masked = False
        if port.pending:
            port.pending = False
            self._deliver(port)

    def _deliver(self, port: _Port) -> None:
        if port.masked:
            port.pending = True
            return
        port.masked = True
        self._send(port.owner, NOTIFICATION.pack(port.number))


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead broker; refuse to clobber other files."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)           # nobody listening: stale
        return
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, f"another broker is listening on {path}")


class BrokerThread:
    """A broker on its own thread and loop — for tests and tools only.

    SimEventChannel's requests block until the broker replies, so a broker
    must never share a thread with a SimEventChannel user; in the product the
    broker lives in the `pyxenfb-sim host` process.
    """

    def __init__(self, sock_path: str):
        import threading
        self.broker = EvtchnBroker(sock_path)
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict] = []       # exceptions that reached the loop
        self.loop.set_exception_handler(self._on_loop_error)
        self._thread = threading.Thread(target=self.loop.run_forever,
                                        name="evtchn-broker", daemon=True)
        self._thread.start()
        self.call(self.broker.start())

    def _on_loop_error(self, loop, context: dict) -> None:
        self.errors.append(context)
        loop.default_exception_handler(context)

    def call(self, coro, timeout: float = 10.0):
        """Run a coroutine on the broker's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def settle(self) -> None:
        """Return once the broker has handled every fd that was ready when called.

        The loop runs the callbacks of all ready fds in one pass; the second
        step of this coroutine runs in a later pass.
        """
        async def next_pass() -> None:
            await asyncio.sleep(0)
        self.call(next_pass())

    def stop(self) -> None:
        if self._thread.is_alive():
            self.call(self.broker.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def __enter__(self) -> BrokerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
