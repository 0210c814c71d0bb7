"""Event channels: the simulated broker's semantics, the SimEventChannel
client (including its pollable fd), and the real libxenevtchn binding."""
from __future__ import annotations

import asyncio
import errno
import os
import select
import shutil
import socket
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyxenfb import evtchn
from pyxenfb.evtchn import (
    OP_ALLOC_UNBOUND,
    OP_BIND_INTERDOMAIN,
    OP_HELLO,
    OP_NOTIFY,
    OP_UNBIND,
    OP_UNMASK,
    REPLY,
    REQUEST,
    RealEventChannel,
    SimEventChannel,
)
from pyxenfb.sim import evtchn_broker
from pyxenfb.sim.evtchn_broker import BrokerThread

GUEST = 7


@pytest.fixture
def sock_path():
    # Unix socket paths are limited to 108 bytes: keep it short.
    d = tempfile.mkdtemp(prefix="evt", dir="/tmp")
    yield os.path.join(d, "evtchn.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def broker(sock_path):
    with BrokerThread(sock_path) as bt:
        yield bt
        assert bt.errors == [], "exceptions reached the broker's loop"


@pytest.fixture
def pair(broker):
    """A guest handle and a dom0 handle joined by one channel."""
    guest = SimEventChannel(broker.broker.sock_path, GUEST)
    dom0 = SimEventChannel(broker.broker.sock_path, 0)
    gport = guest.alloc_unbound(0)
    bport = dom0.bind_interdomain(GUEST, gport)
    barrier(guest)
    # Binding fires the new port once (Xen does so too); consume it.
    assert dom0.pending() == [bport]
    dom0.unmask(bport)
    barrier(dom0)
    yield guest, gport, dom0, bport
    guest.close()
    dom0.close()


def barrier(ch: SimEventChannel) -> None:
    """Return once the broker has handled everything `ch` sent before.

    The broker handles one connection's messages in order and sends the
    resulting notifications before reading on, so after this round trip every
    notification caused by `ch`'s earlier messages is in its receiver's socket.
    """
    ch.unbind(ch.alloc_unbound(0))


def readable(ch) -> bool:
    return bool(select.select([ch.fileno()], [], [], 0)[0])


def raw_client(path: str, domid: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(path)
    if domid is not None:
        s.send(REQUEST.pack(OP_HELLO, domid, 0, 0))
        assert REPLY.unpack(s.recv(64)) == (0, OP_HELLO)
    return s


def wait_closed(s: socket.socket) -> None:
    """The broker closed this raw connection (EOF or reset within the timeout)."""
    while True:
        try:
            if not s.recv(64):
                return
        except ConnectionResetError:      # closed with our messages unread
            return


# ---- semantics -------------------------------------------------------------

def test_ports_are_per_domain_and_start_at_1(broker):
    path = broker.broker.sock_path
    with SimEventChannel(path, 3) as a, SimEventChannel(path, 4) as b, \
            SimEventChannel(path, 3) as a2:
        assert a.alloc_unbound(4) == 1
        assert b.alloc_unbound(3) == 1          # another domain's space
        assert a2.alloc_unbound(4) == 2         # same domain, other handle
        assert a.alloc_unbound(4) == 3
        a.unbind(1)
        assert a2.alloc_unbound(4) == 1         # lowest free number reused


def test_notify_delivers_both_ways(pair):
    guest, gport, dom0, bport = pair
    assert dom0.pending() == [] and not readable(dom0)
    guest.notify(gport)
    barrier(guest)
    assert readable(dom0)
    assert dom0.pending() == [bport]
    assert not readable(dom0)
    dom0.notify(bport)
    barrier(dom0)
    assert guest.pending() == [gport]


def test_masked_port_coalesces_and_unmask_redelivers(pair):
    guest, gport, dom0, bport = pair
    for _ in range(5):
        guest.notify(gport)
    barrier(guest)
    assert dom0.pending() == [bport]            # five notifies, one delivery
    assert dom0.pending() == []                 # masked: the rest only set pending
    dom0.unmask(bport)
    barrier(dom0)
    assert dom0.pending() == [bport]            # the pending bit, delivered once
    dom0.unmask(bport)
    barrier(dom0)
    assert dom0.pending() == []                 # nothing pending: nothing delivered
    guest.notify(gport)
    barrier(guest)
    assert dom0.pending() == [bport]            # unmasked again: delivered at once


def test_unbind_leaves_peer_unbound_and_rebindable(pair, broker):
    guest, gport, dom0, bport = pair
    dom0.unbind(bport)
    guest.notify(gport)                          # goes nowhere
    barrier(guest)
    assert dom0.pending() == []
    with pytest.raises(OSError) as e:
        dom0.unbind(bport)
    assert e.value.errno == errno.EINVAL
    # As in Xen the guest's port is unbound again, for the same remote domain.
    again = dom0.bind_interdomain(GUEST, gport)
    barrier(dom0)
    assert dom0.pending() == [again]
    dom0.unmask(again)
    barrier(dom0)
    guest.notify(gport)
    barrier(guest)
    assert dom0.pending() == [again]


def test_unbind_drops_stashed_notifications_of_that_port(pair):
    guest, gport, dom0, bport = pair
    guest.notify(gport)
    barrier(guest)
    dom0.unbind(bport)               # the notification is read (stashed) here
    assert dom0.pending() == []


def test_closing_a_handle_unbinds_its_ports(pair, broker):
    guest, gport, dom0, bport = pair
    other = dom0.alloc_unbound(GUEST)
    assert broker.broker.port_count(GUEST) == 1
    guest.close()
    broker.settle()
    assert broker.broker.port_count(GUEST) == 0
    dom0.notify(bport)                         # peer gone: dropped, no error
    barrier(dom0)
    assert dom0.pending() == []
    with SimEventChannel(broker.broker.sock_path, GUEST) as guest2:
        assert guest2.bind_interdomain(0, other) == 1   # dom0 still serves


@pytest.mark.parametrize("domid, rport, why", [
    (GUEST, 99, "no such port"),
    (GUEST, None, "port meant for another domain"),
    (0xFFFF, 1, "reserved domain"),
])
def test_bind_interdomain_is_validated(broker, domid, rport, why):
    path = broker.broker.sock_path
    with SimEventChannel(path, GUEST) as guest, SimEventChannel(path, 0) as dom0:
        meant_for_dom3 = guest.alloc_unbound(3)
        with pytest.raises(OSError) as e:
            dom0.bind_interdomain(domid, meant_for_dom3 if rport is None else rport)
        assert e.value.errno == errno.EINVAL, why


def test_binding_an_already_bound_port_fails(pair, broker):
    guest, gport, dom0, bport = pair
    with SimEventChannel(broker.broker.sock_path, 0) as second:
        with pytest.raises(OSError) as e:
            second.bind_interdomain(GUEST, gport)
        assert e.value.errno == errno.EINVAL


def test_port_quota(broker, monkeypatch):
    with SimEventChannel(broker.broker.sock_path, 1) as ch:
        for i in range(evtchn_broker.MAX_PORTS_PER_CONNECTION):
            assert ch.alloc_unbound(0) == i + 1
        with pytest.raises(OSError) as e:
            ch.alloc_unbound(0)
        assert e.value.errno == errno.ENOSPC
        ch.unbind(5)
        assert ch.alloc_unbound(0) == 5


# ---- the client's fd -------------------------------------------------------

def test_notification_during_a_request_is_stashed_and_fd_stays_readable(pair):
    guest, gport, dom0, bport = pair
    guest.notify(gport)
    barrier(guest)                  # the notification now waits in dom0's socket
    extra = dom0.alloc_unbound(GUEST)   # reads it while waiting for the reply
    assert extra > 0
    assert readable(dom0)
    assert dom0.pending() == [bport]
    assert not readable(dom0)


def test_add_reader_wakes_on_notification(pair):
    asyncio.run(_add_reader_wakes_on_notification(*pair))


async def _add_reader_wakes_on_notification(guest, gport, dom0, bport):
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[int] = asyncio.Queue()

    def on_ready():
        for port in dom0.pending():
            got.put_nowait(port)
            dom0.unmask(port)

    loop.add_reader(dom0.fileno(), on_ready)
    try:
        guest.notify(gport)
        assert await asyncio.wait_for(got.get(), 5) == bport
        # And a notification that was stashed by a synchronous request.
        guest.notify(gport)
        barrier(guest)
        dom0.alloc_unbound(GUEST)
        assert await asyncio.wait_for(got.get(), 5) == bport
    finally:
        loop.remove_reader(dom0.fileno())


def test_broker_going_away_is_an_error_not_a_spin(sock_path):
    bt = BrokerThread(sock_path)
    ch = SimEventChannel(sock_path, 0)
    try:
        bt.stop()
        assert select.select([ch.fileno()], [], [], 5)[0]     # EOF wakes the loop
        with pytest.raises(ConnectionError):
            ch.pending()
    finally:
        ch.close()


def test_silent_broker_times_out(sock_path):
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mute.bind(sock_path)
    mute.listen(1)                       # accepts (backlog) but never answers
    try:
        with pytest.raises(TimeoutError):
            SimEventChannel(sock_path, 0, timeout=0.2)
    finally:
        mute.close()


def test_missing_broker_is_a_readable_error(sock_path):
    with pytest.raises(OSError, match="cannot connect to the event-channel broker"):
        SimEventChannel(sock_path, 0)


def test_client_rejects_bad_arguments(pair):
    guest, gport, dom0, bport = pair
    for bad in (0, -1, 1 << 32, "1"):
        with pytest.raises(ValueError):
            guest.notify(bad)
    with pytest.raises(ValueError):
        SimEventChannel("/nonexistent", 1 << 16)


# ---- hostile clients ---------------------------------------------------------

@pytest.mark.parametrize("first, why", [
    (b"\x01\x00\x00\x00", "short message"),
    (REQUEST.pack(OP_HELLO, 0, 0, 0) + b"x", "long message"),
    (REQUEST.pack(99, 0, 0, 0), "unknown op"),
    (REQUEST.pack(OP_ALLOC_UNBOUND, 0, 0, 0), "request before HELLO"),
])
def test_malformed_messages_close_the_connection(broker, first, why):
    s = raw_client(broker.broker.sock_path)
    s.send(first)
    wait_closed(s)
    s.close()
    with SimEventChannel(broker.broker.sock_path, 0) as ok:   # others go on
        assert ok.alloc_unbound(1) == 1


def test_bad_requests_get_errors_then_the_connection_closes(pair, broker):
    guest, gport, dom0, bport = pair
    s = raw_client(broker.broker.sock_path, domid=0)
    s.send(REQUEST.pack(OP_HELLO, 0, 0, 0))                       # second HELLO
    assert REPLY.unpack(s.recv(64)) == (-errno.EINVAL, OP_HELLO)
    s.send(REQUEST.pack(OP_UNBIND, bport, 0, 0))                  # dom0's, not ours
    assert REPLY.unpack(s.recv(64)) == (-errno.EINVAL, OP_UNBIND)
    s.send(REQUEST.pack(OP_ALLOC_UNBOUND, 0, 1, 0))               # unused field set
    assert REPLY.unpack(s.recv(64)) == (-errno.EINVAL, OP_ALLOC_UNBOUND)
    # Notifying or unmasking another handle's port: ignored...
    s.send(REQUEST.pack(OP_NOTIFY, bport, 0, 0))
    s.send(REQUEST.pack(OP_UNMASK, bport, 0, 0))
    s.send(REQUEST.pack(OP_BIND_INTERDOMAIN, GUEST, gport, 0))    # already bound
    assert REPLY.unpack(s.recv(64)) == (-errno.EINVAL, OP_BIND_INTERDOMAIN)
    barrier(dom0)
    assert guest.pending() == []
    # ... until there are too many (the two above count).
    for _ in range(evtchn_broker.MAX_BAD_REQUESTS - 1):
        s.send(REQUEST.pack(OP_NOTIFY, bport, 0, 0))
    wait_closed(s)
    s.close()
    guest.notify(gport)                                           # the real pair is fine
    barrier(guest)
    assert dom0.pending() == [bport]


def test_client_that_never_reads_is_paused_not_buffered(broker):
    s = raw_client(broker.broker.sock_path, domid=0)
    s.setblocking(False)
    bad_unbind = REQUEST.pack(OP_UNBIND, 999, 0, 0)       # each earns an 8-byte reply
    state = broker.call(_connection_state(broker.broker))
    for _ in range(200_000):
        try:
            s.send(bad_unbind)
            continue
        except BlockingIOError:
            pass
        state = broker.call(_connection_state(broker.broker))
        if not state["reading"]:
            break
        # The broker is still reading, so room will come; if it pauses
        # meanwhile, the state check above ends the loop.
        select.select([], [s], [], 0.05)
    assert state["reading"] is False, "broker kept reading a client that never reads"
    assert state["queued"] <= evtchn_broker.MAX_OUTPUT
    # Once the client reads, the broker catches up and answers everything.
    s.setblocking(True)
    s.settimeout(5)
    s.shutdown(socket.SHUT_WR)
    with SimEventChannel(broker.broker.sock_path, 0) as ok:
        assert ok.alloc_unbound(1) == 1
    n = 0
    while msg := s.recv(64):
        assert REPLY.unpack(msg) == (-errno.EINVAL, OP_UNBIND)
        n += 1
    assert n > evtchn_broker.PAUSE_OUTPUT
    s.close()


async def _connection_state(broker):
    (conn,) = [c for c in broker._connections if c.domid == 0]
    return {"reading": conn.reading, "queued": len(conn.output)}


_requests = st.builds(
    lambda op, a, b, c: REQUEST.pack(op, a, b, c),
    st.integers(0, 8),
    st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1)),
    st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
    st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
)
_messages = st.lists(st.one_of(_requests, st.binary(min_size=1, max_size=40)),
                     max_size=30)


@settings(deadline=None, max_examples=150,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hello=st.one_of(st.none(), st.integers(0, 2**32 - 1)), messages=_messages)
def test_fuzzed_clients_never_hurt_the_broker(broker, hello, messages):
    path = broker.broker.sock_path
    s = raw_client(path)
    s.setblocking(False)
    try:
        if hello is not None:
            s.send(REQUEST.pack(OP_HELLO, hello, 0, 0))
        for m in messages:
            s.send(m)
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass
    finally:
        s.close()
    # A well-behaved pair still works, the fuzz client's ports are gone.
    with SimEventChannel(path, 50) as g, SimEventChannel(path, 0) as d:
        p = d.bind_interdomain(50, g.alloc_unbound(0))
        barrier(g)
        assert d.pending() == [p]
    assert broker.errors == []
    assert open_connections(broker) == 0


def open_connections(broker) -> int:
    """Broker connections, once the broker has seen every earlier close."""
    broker.settle()
    return broker.broker.connection_count


# ---- real libxenevtchn -----------------------------------------------------

def test_libxenevtchn_loads():
    _ffi, lib = evtchn._load_libxenevtchn()
    assert lib.xenevtchn_open is not None


@pytest.mark.skipif(os.path.exists("/dev/xen"), reason="a real Xen is present")
def test_real_event_channel_without_xen_is_a_readable_oserror():
    with pytest.raises(OSError) as e:
        RealEventChannel()
    assert e.value.errno == errno.ENOENT
    assert "/dev/xen/evtchn" in str(e.value)


# ---- dm_restrict: a handle restricted to one domain ------------------------------

def test_restricted_handle_binds_only_to_its_domain(broker):
    """As Linux's IOCTL_EVTCHN_RESTRICT_DOMID: binding to another domain and
    unbound ports are EACCES afterwards, restricting twice EACCES, and only a
    guest domain (not 0, not a reserved id) may be the target."""
    path = broker.broker.sock_path
    with SimEventChannel(path, GUEST) as guest, SimEventChannel(path, GUEST + 1) as other, \
            SimEventChannel(path, 0) as dom0, SimEventChannel(path, 0) as fresh:
        gport, oport = guest.alloc_unbound(0), other.alloc_unbound(0)
        for bad in (0, 0x7FF0):
            with pytest.raises(OSError) as info:
                fresh.restrict(bad)
            assert info.value.errno == errno.EINVAL
        dom0.restrict(GUEST)
        with pytest.raises(OSError) as info:
            dom0.bind_interdomain(GUEST + 1, oport)
        assert info.value.errno == errno.EACCES
        with pytest.raises(OSError) as info:
            dom0.alloc_unbound(GUEST)
        assert info.value.errno == errno.EACCES
        with pytest.raises(OSError) as info:
            dom0.restrict(GUEST)
        assert info.value.errno == errno.EACCES
        # Its own guest still works both ways, and an unrestricted handle is unaffected.
        bport = dom0.bind_interdomain(GUEST, gport)
        barrier(guest)
        assert dom0.pending() == [bport]
        dom0.unmask(bport)
        guest.notify(gport)
        barrier(guest)
        assert dom0.pending() == [bport]
        assert fresh.bind_interdomain(GUEST + 1, oport) > 0

        async def restrictions():
            return broker.broker.restrictions(0)
        assert sorted(broker.call(restrictions())) == [-1, GUEST]
