"""The simulated xenstored against real peers (xenstore-utils, pyxs), raw
sockets and our own client: semantics, permissions, domains, hostile input."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import tempfile
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxenfb.sim.xenstored import Caller, Connection, Limits, XenStored
from pyxenfb.platform.xenstore import XenStore, XenStoreError
from pyxenfb.platform.xs_wire import HEADER, Message, MessageDecoder, XsType, join_strings

TIMEOUT = 10


def run(scenario, timeout: float = TIMEOUT):
    asyncio.run(asyncio.wait_for(scenario(), timeout))


@pytest.fixture
def run_dir():
    # Short path: unix socket names are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="xs", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def daemon(run_dir: str, **limits):
    xsd = XenStored(run_dir, Limits(**limits))
    await xsd.start()
    try:
        yield xsd
    finally:
        await xsd.close()


@contextlib.asynccontextmanager
async def client(path: str):
    xs = await XenStore.open(path)
    try:
        yield xs
    finally:
        xs.close()


class RawClient:
    """A hand-driven connection for malformed and pipelined requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = MessageDecoder()
        self.inbox: list[Message] = []

    @classmethod
    async def open(cls, path: str) -> "RawClient":
        return cls(*await asyncio.open_unix_connection(path))

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, msg_type: int, payload: bytes, req_id: int = 0, tx_id: int = 0) -> None:
        self.writer.write(HEADER.pack(msg_type, req_id, tx_id, len(payload)) + payload)

    async def receive(self) -> Message:
        while not self.inbox:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionResetError("closed by daemon")
            self.inbox += self.decoder.feed(data)
        return self.inbox.pop(0)

    async def request(self, msg_type: int, payload: bytes, tx_id: int = 0) -> Message:
        self.send(msg_type, payload, 0, tx_id)
        while True:
            msg = await self.receive()
            if msg.type != XsType.WATCH_EVENT:
                return msg

    async def closed_by_peer(self) -> bool:
        while True:
            data = await self.reader.read(65536)
            if not data:
                return True

    def close(self) -> None:
        self.writer.close()


async def tool(*argv: str, sock: str) -> tuple[int, str]:
    env = dict(os.environ, XENSTORED_PATH=sock)
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    return proc.returncode, out.decode()


needs_tools = pytest.mark.skipif(shutil.which("xenstore-write") is None, reason="needs xenstore-utils")


# ---- Debian xenstore-utils -----------------------------------------------------

@needs_tools
def test_xenstore_utils_session(run_dir):
    async def scenario():
        async with daemon(run_dir) as xsd:
            sock = xsd.socket_path
            assert await tool("xenstore-write", "/vm/a", "one", "/vm/b", "two", sock=sock) == (0, "")
            assert await tool("xenstore-read", "/vm/a", sock=sock) == (0, "one\n")
            rc, out = await tool("xenstore-read", "/vm/missing", sock=sock)
            assert rc == 1 and "couldn't read path" in out
            assert await tool("xenstore-list", "/vm", sock=sock) == (0, "a\nb\n")
            assert (await tool("xenstore-exists", "/vm/b", sock=sock))[0] == 0
            assert (await tool("xenstore-exists", "/vm/c", sock=sock))[0] == 1
            assert (await tool("xenstore-chmod", "/vm/a", "n0", "r3", sock=sock))[0] == 0
            rc, out = await tool("xenstore-ls", "-p", "/vm", sock=sock)
            assert rc == 0
            assert [line.split()[0] for line in out.splitlines()] == ["a", "b"]
            assert out.splitlines()[0].endswith("(n0,r3)")
            rc, out = await tool("xenstore-ls", "/", sock=sock)
            assert rc == 0 and "local = \"\"" in out and "name = \"Domain-0\"" in out
            assert (await tool("xenstore-rm", "/vm/a", sock=sock))[0] == 0
            assert await tool("xenstore-list", "/vm", sock=sock) == (0, "b\n")

            env = dict(os.environ, XENSTORED_PATH=sock)
            watcher = await asyncio.create_subprocess_exec(
                "xenstore-watch", "-n", "2", "/vm", env=env, stdout=asyncio.subprocess.PIPE)
            first = await asyncio.wait_for(watcher.stdout.readline(), TIMEOUT)
            assert first == b"/vm\n"                       # the initial event
            async with client(sock) as xs:
                await xs.write("/vm/b/c", "x")
            out, _ = await asyncio.wait_for(watcher.communicate(), TIMEOUT)
            assert out == b"/vm/b/c\n" and watcher.returncode == 0
    run(scenario)


@needs_tools
def test_libxenstore_directory_part_fallback(run_dir):
    """xenstore-list of a directory too big for one reply works through DIRECTORY_PART."""
    names = [f"child-with-a-rather-long-name-{i:04d}" for i in range(300)]

    async def scenario():
        async with daemon(run_dir) as xsd, client(xsd.socket_path) as xs:
            async def fill(tx):
                for name in names:
                    await xs.write(f"/big/{name}", b"", tx=tx)
            await xs.transaction(fill)
            rc, out = await tool("xenstore-list", "/big", sock=xsd.socket_path)
            assert rc == 0 and out.split() == names
            assert await xs.directory("/big") == names       # our client's fallback too
    run(scenario)


# ---- pyxs as an independent client ---------------------------------------------

def test_pyxs_client_operations(run_dir):
    from pyxs import Client, PyXSError

    def blocking_session(sock: str) -> None:
        with Client(unix_socket_path=sock) as c:
            c.write(b"/p/key", b"value")
            assert c.read(b"/p/key") == b"value"
            assert c.read(b"/p/none", b"dflt") == b"dflt"
            with pytest.raises(PyXSError) as info:
                c.read(b"/p/none")
            assert info.value.args[0] == errno.ENOENT
            assert c.list(b"/p") == [b"key"]
            assert c.exists(b"/p/key") and not c.exists(b"/p/none")
            c.set_perms(b"/p/key", [b"n0", b"r4"])
            assert c.get_perms(b"/p/key") == [b"n0", b"r4"]
            assert c.get_domain_path(4) == b"/local/domain/4"
            c.transaction()
            c.write(b"/p/tx", b"1")
            assert c.commit()
            assert c.read(b"/p/tx") == b"1"
            c.delete(b"/p")
            assert not c.exists(b"/p")

    async def scenario():
        async with daemon(run_dir) as xsd:
            await asyncio.get_running_loop().run_in_executor(None, blocking_session, xsd.socket_path)
    run(scenario)


def test_pyxs_monitor_events_fed_into_asyncio(run_dir):
    from pyxs import Client
    from pyxs._internal import Event

    async def scenario():
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        async with daemon(run_dir) as xsd:
            pyxs_client = Client(unix_socket_path=xsd.socket_path)
            await loop.run_in_executor(None, pyxs_client.connect)
            monitor = pyxs_client.monitor()
            stop = Event(b"", b"stop")

            def pump():
                # pyxs 0.4.1's Monitor.wait() can miss a wake-up (its own
                # condition-wait helper): events then sit in monitor.events
                # unseen.  Its router fills that queue correctly, so read it
                # with a plain Queue.get().
                while True:
                    event = monitor.events.get()
                    if event == stop:
                        return
                    loop.call_soon_threadsafe(events.put_nowait, event)
            pumper = threading.Thread(target=pump, daemon=True)
            pumper.start()
            try:
                await loop.run_in_executor(None, monitor.watch, b"/w", b"tok")
                await loop.run_in_executor(None, monitor.watch, b"@introduceDomain", b"intro")
                await loop.run_in_executor(None, monitor.watch, b"@releaseDomain", b"rel")
                initial = {await events.get() for _ in range(3)}
                assert initial == {(b"/w", b"tok"), (b"@introduceDomain", b"intro"),
                                   (b"@releaseDomain", b"rel")}
                async with client(xsd.socket_path) as xs:
                    await xs.write("/w/child", b"")
                    assert await events.get() == (b"/w/child", b"tok")
                    await xs.introduce_domain(3, 1234, 5)
                    assert await events.get() == (b"@introduceDomain", b"intro")
                    await xs.release_domain(3)
                    assert await events.get() == (b"@releaseDomain", b"rel")
            finally:
                monitor.events.put(stop)
                await loop.run_in_executor(None, pumper.join, TIMEOUT)
                await loop.run_in_executor(None, pyxs_client.close)
    run(scenario, timeout=2 * TIMEOUT)


# ---- domains and permissions -----------------------------------------------

async def setup_guest(xs: XenStore, domid: int) -> None:
    """What libxl does: domain dir readable by the guest, device dir owned by it,
    backend dir owned by dom0 and readable by the guest."""
    home = f"/local/domain/{domid}"
    be = f"/local/domain/0/backend/vfb/{domid}/0"
    fe = f"{home}/device/vfb/0"

    async def body(tx):
        for path in (home, fe, be):
            await xs.mkdir(path, tx=tx)
        await xs.set_perms(home, ["n0", f"r{domid}"], tx=tx)
        await xs.set_perms(f"{home}/device", [f"n{domid}"], tx=tx)
        await xs.set_perms(fe, [f"n{domid}", "r0"], tx=tx)
        await xs.write(f"{be}/state", "1", tx=tx)
        await xs.set_perms(be, ["n0", f"r{domid}"], tx=tx)
        await xs.set_perms(f"{be}/state", ["n0", f"r{domid}"], tx=tx)
    await xs.transaction(body)
    await xs.introduce_domain(domid, 0xFEFFF, 1)


def test_introduce_release_socket_lifecycle(run_dir):
    async def scenario():
        async with daemon(run_dir) as xsd, client(xsd.socket_path) as dom0:
            fired: list[str] = []
            await dom0.watch("@releaseDomain", "r", lambda p, t: fired.append(p))
            await dom0.watch("@introduceDomain", "i", lambda p, t: fired.append(p))
            assert not await dom0.is_domain_introduced(5)
            await setup_guest(dom0, 5)
            guest_sock = os.path.join(run_dir, "dom5", "xenstored.sock")
            assert os.path.exists(guest_sock)
            assert await dom0.is_domain_introduced(5)
            guest = await XenStore.open(guest_sock)
            assert await guest.read_str("/local/domain/0/backend/vfb/5/0/state") == "1"
            await dom0.release_domain(5)
            await asyncio.wait_for(guest.closed, TIMEOUT)      # dropped by RELEASE
            assert not os.path.exists(guest_sock)
            assert not await dom0.is_domain_introduced(5)
            await dom0.read("/")                               # round trip: events have arrived
            assert fired == ["@releaseDomain", "@introduceDomain", "@introduceDomain", "@releaseDomain"]
            with pytest.raises(XenStoreError) as info:
                await dom0.release_domain(5)
            assert info.value.strerror == "ENOENT"
            with pytest.raises(XenStoreError):
                await dom0.introduce_domain(0, 1, 1)
    run(scenario)


def test_guest_permissions(run_dir):
    async def scenario():
        async with daemon(run_dir) as xsd, client(xsd.socket_path) as dom0:
            await setup_guest(dom0, 5)
            await dom0.write("/local/domain/7/secret", "s")
            await dom0.set_perms("/local/domain/7/secret", ["n7"])
            async with client(os.path.join(run_dir, "dom5", "xenstored.sock")) as guest:
                async def refused(coro, name="EACCES"):
                    with pytest.raises(XenStoreError) as info:
                        await coro
                    assert info.value.strerror == name

                await refused(guest.read("/local/domain/7/secret"))
                await refused(guest.read("/local/domain/7/missing"))     # no existence leak
                await refused(guest.write("/local/domain/0/backend/vfb/5/0/state", "4"))
                await refused(guest.write("/local/domain/0/backend/vfb/5/0/new", "x"))
                await refused(guest.set_perms("/local/domain/0/backend/vfb/5/0", ["b5"]))
                await refused(guest.introduce_domain(6, 1, 1))
                await refused(guest.release_domain(5))
                await refused(guest.write("/tool/x", "1"))
                # Its own frontend dir: relative paths resolve under /local/domain/5.
                await guest.write("device/vfb/0/page-ref", "1234")
                assert await dom0.read_int("/local/domain/5/device/vfb/0/page-ref") == 1234
                assert await guest.get_perms("device/vfb/0/page-ref") == ["n5", "r0"]
                await refused(guest.set_perms("device/vfb/0", ["n0"]), "EPERM")   # no giving away
                await guest.set_perms("device/vfb/0", ["n5", "r0", "r9"])
                assert await guest.read("/local/domain/0/backend/vfb/5/0/state") == b"1"
                await refused(guest.read("/local/domain/0/backend/vfb/5/0/nope"), "ENOENT")
                assert await guest.get_domain_path(5) == "/local/domain/5"

                # Watch events only reach connections that may read the node.
                seen: list[str] = []
                await guest.watch("/local/domain/0/backend", "be", lambda p, t: seen.append(p))
                await guest.watch("device", "fe", lambda p, t: seen.append(p))
                await dom0.write("/local/domain/0/backend/hidden", "x")
                await dom0.write("/local/domain/0/backend/vfb/5/0/state", "2")
                await dom0.write("/local/domain/5/device/vfb/0/state", "1")
                await guest.read("device")        # round trip after all events were sent
                assert seen == ["/local/domain/0/backend", "device",
                                "/local/domain/0/backend/vfb/5/0/state", "device/vfb/0/state"]
    run(scenario)


def test_node_quota_for_a_domain(run_dir):
    async def scenario():
        async with daemon(run_dir, max_nodes_per_domain=5) as xsd, client(xsd.socket_path) as dom0:
            await setup_guest(dom0, 5)
            async with client(os.path.join(run_dir, "dom5", "xenstored.sock")) as guest:
                # setup_guest gave dom5 two nodes (device, device/vfb/0): three more fit.
                for i in range(3):
                    await guest.write(f"device/k{i}", "v")
                with pytest.raises(XenStoreError) as info:
                    await guest.write("device/k3", "v")
                assert info.value.strerror == "ENOSPC"
                with pytest.raises(XenStoreError):       # also counted inside transactions
                    await guest.transaction(lambda tx: guest.write("device/k3", "v", tx=tx))
                await guest.rm("device/k0")
                await guest.write("device/k3", "v")
                await dom0.write("/local/domain/0/unlimited/a/b/c/d/e/f", "dom0 has no quota")
    run(scenario)


# ---- semantics ----------------------------------------------------------------

def test_rm_fires_watches_on_ancestors_and_descendants(run_dir):
    async def scenario():
        async with daemon(run_dir) as xsd, client(xsd.socket_path) as xs:
            await xs.write("/r/x/y/z", "1")
            seen: list[tuple[str, str]] = []
            for path, token in (("/r", "anc"), ("/r/x/y", "desc"), ("/r/x/y/gone", "below"), ("/other", "o")):
                await xs.watch(path, token, lambda p, t: seen.append((t, p)))
            seen.clear()
            await xs.rm("/r/x")
            await xs.rm("/r/x")          # already gone: no error, no event
            await xs.read("/")
            assert sorted(seen) == [("anc", "/r/x"), ("below", "/r/x/y/gone"), ("desc", "/r/x/y")]
            with pytest.raises(XenStoreError):
                await xs.rm("/")
            await xs.rm("/no/such/parent")     # the client hides ENOENT on rm (raw test below)
    run(scenario)


def test_transaction_isolation_and_commit_time_watches(run_dir):
    async def scenario():
        async with daemon(run_dir) as xsd, client(xsd.socket_path) as a, client(xsd.socket_path) as b:
            await a.write("/t/v", "old")
            seen: list[str] = []
            await b.watch("/t", "t", lambda p, tok: seen.append(p))
            seen.clear()
            tx = await a.transaction_start()
            await a.write("/t/v", "new", tx=tx)
            await a.write("/t/w", "", tx=tx)
            assert await a.read("/t/v", tx=tx) == b"new"
            assert await b.read("/t/v") == b"old"              # not visible outside
            assert await b.read("/t/w", None) is None
            assert seen == []                                  # nothing fired yet
            assert await a.transaction_end(tx) is True
            assert await b.read("/t/v") == b"new"
            await b.read("/")
            assert sorted(seen) == ["/t/v", "/t/w"]

            tx = await a.transaction_start()                   # abort drops the writes
            await a.write("/t/v", "aborted", tx=tx)
            assert await a.transaction_end(tx, commit=False) is True
            assert await a.read("/t/v") == b"new"
            with pytest.raises(XenStoreError) as info:
                await a.transaction_end(tx)
            assert info.value.strerror == "ENOENT"
    run(scenario)


def test_transaction_conflict_gives_eagain_and_transaction_retries(run_dir):
    async def scenario():
        async with daemon(run_dir) as xsd, client(xsd.socket_path) as a, client(xsd.socket_path) as b:
            await a.write("/c/counter", "0")
            tx = await a.transaction_start()
            value = await a.read_int("/c/counter", tx=tx)
            await b.write("/c/counter", "10")                  # someone else changes what we read
            await a.write("/c/counter", str(value + 1), tx=tx)
            assert await a.transaction_end(tx) is False        # EAGAIN
            assert await a.read_int("/c/counter") == 10

            attempts = 0

            async def increment(tx):
                nonlocal attempts
                attempts += 1
                current = await a.read_int("/c/counter", tx=tx)
                if attempts == 1:
                    await b.write("/c/counter", "20")          # conflict on the first try only
                await a.write("/c/counter", str(current + 1), tx=tx)
                return current + 1
            assert await a.transaction(increment) == 21
            assert attempts == 2
            assert await b.read_int("/c/counter") == 21
    run(scenario)


def test_limits_on_transactions_and_watches(run_dir):
    async def scenario():
        async with daemon(run_dir, max_transactions_per_connection=3, max_watches_per_connection=4) as xsd, \
                client(xsd.socket_path) as xs, client(xsd.socket_path) as other:
            for _ in range(3):
                await xs.transaction_start()
            with pytest.raises(XenStoreError) as info:
                await xs.transaction_start()
            assert info.value.strerror == "ENOSPC"
            await other.transaction_end(await other.transaction_start())   # per connection
            for i in range(4):
                await xs.watch(f"/w{i}", "t", lambda p, t: None)
            with pytest.raises(XenStoreError) as info:
                await xs.watch("/w4", "t", lambda p, t: None)
            assert info.value.strerror == "E2BIG"
            with pytest.raises(XenStoreError) as info:
                await xs.watch("/w0", "t", lambda p, t: None)
            assert info.value.strerror == "EEXIST"
    run(scenario)


def test_reset_watches_and_raw_protocol_details(run_dir):
    async def scenario():
        async with daemon(run_dir) as xsd:
            raw = await RawClient.open(xsd.socket_path)
            reply = await raw.request(XsType.WATCH, join_strings("/rw", "tok"))
            assert (reply.type, reply.payload) == (XsType.WATCH, b"OK\0")
            event = await raw.receive()                          # the initial event follows the OK
            assert (event.type, event.payload, event.req_id) == (XsType.WATCH_EVENT, b"/rw\0tok\0", 0)
            assert (await raw.request(XsType.RESET_WATCHES, b"")).payload == b"OK\0"
            assert (await raw.request(XsType.WRITE, b"/rw/x\0")).payload == b"OK\0"   # empty value
            reply = await raw.request(XsType.READ, b"/rw/x\0")
            assert (reply.type, reply.payload) == (XsType.READ, b"")  # no event queued before it
            reply = await raw.request(XsType.TRANSACTION_START, b"\0")
            assert reply.payload == b"1\0"
            reply = await raw.request(XsType.READ, b"/rw/x\0", tx_id=1)
            assert reply.tx_id == 1 and reply.type == XsType.READ
            reply = await raw.request(XsType.READ, b"/rw/x\0", tx_id=77)
            assert (reply.type, reply.payload) == (XsType.ERROR, b"ENOENT\0")
            reply = await raw.request(XsType.DIRECTORY_PART, b"/rw\0" + b"0\0")
            gen, rest = reply.payload.split(b"\0", 1)
            assert gen.isdigit() and rest == b"x\0\0"
            reply = await raw.request(XsType.RM, b"/no/such/parent\0")
            assert reply.payload == b"ENOENT\0"
            assert (await raw.request(XsType.RM, b"/rw/missing\0")).payload == b"OK\0"
            reply = await raw.request(XsType.CONTROL, b"help\0")
            assert reply.type == XsType.CONTROL
            raw.close()
    run(scenario)


# ---- hostile input ----------------------------------------------------------------

def test_hostile_connections_do_not_disturb_others(run_dir):
    async def scenario():
        async with daemon(run_dir) as xsd, client(xsd.socket_path) as good:
            await good.write("/ok", "1")

            async def expect_error(payload_type: int, payload: bytes, name: bytes, tx_id: int = 0):
                raw = await RawClient.open(xsd.socket_path)
                reply = await raw.request(payload_type, payload, tx_id)
                assert (reply.type, reply.payload) == (XsType.ERROR, name + b"\0")
                # The connection keeps working after an error reply.
                assert (await raw.request(XsType.READ, b"/ok\0")).payload == b"1"
                raw.close()

            await expect_error(99, b"", b"ENOSYS")
            await expect_error(XsType.WATCH_EVENT, b"/a\0t\0", b"ENOSYS")
            await expect_error(20, b"", b"ENOSYS")
            await expect_error(XsType.READ, b"/ok", b"EINVAL")                 # missing NUL
            await expect_error(XsType.READ, b"/a\0b\0", b"EINVAL")             # too many args
            await expect_error(XsType.READ, b"/" + b"p" * 4000 + b"\0", b"EINVAL")  # path too long
            await expect_error(XsType.WRITE, b"/bad.char\0v", b"EINVAL")
            await expect_error(XsType.WRITE, b"/a//b\0v", b"EINVAL")
            await expect_error(XsType.WRITE, b"/\xff\0v", b"EINVAL")
            await expect_error(XsType.SET_PERMS, b"/ok\0q7\0", b"EINVAL")
            await expect_error(XsType.SET_PERMS, b"/ok\0", b"EINVAL")
            await expect_error(XsType.TRANSACTION_END, b"X\0", b"EINVAL")
            await expect_error(XsType.INTRODUCE, b"5\0zz\0" + b"1\0", b"EINVAL")
            await expect_error(XsType.GET_DOMAIN_PATH, b"99999999999\0", b"EINVAL")
            await expect_error(XsType.DIRECTORY_PART, b"/ok\0", b"EINVAL")
            await expect_error(XsType.TRANSACTION_START, b"\0", b"EBUSY", tx_id=5)

            # Broken framing closes the connection.
            for blob in (HEADER.pack(XsType.READ, 0, 0, 4097),                # oversize len
                         HEADER.pack(XsType.WRITE, 0, 0, 10_000) + b"/" * 10_000,   # 10k path
                         b"\xff" * 64):                                       # garbage
                raw = await RawClient.open(xsd.socket_path)
                raw.send_bytes(blob)
                assert await asyncio.wait_for(raw.closed_by_peer(), TIMEOUT)
                raw.close()

            # Many watches: refused past the limit, the connection survives.
            raw = await RawClient.open(xsd.socket_path)
            for i in range(200):
                raw.send(XsType.WATCH, join_strings(f"/many/{i}", "t"), req_id=i)
            replies = []
            while len(replies) < 200:
                msg = await raw.receive()
                if msg.type != XsType.WATCH_EVENT:
                    replies.append(msg)
            assert sum(m.payload == b"OK\0" for m in replies) == 128
            assert sum(m.payload == b"E2BIG\0" for m in replies) == 72
            raw.close()

            assert await good.read("/ok") == b"1"
            assert not good.closed.done()
    run(scenario)


def test_client_that_does_not_read_is_dropped(run_dir):
    async def scenario():
        async with daemon(run_dir, max_pending_output=64 * 1024) as xsd, client(xsd.socket_path) as writer:
            lazy = await RawClient.open(xsd.socket_path)
            token = "t" * 2000
            assert (await lazy.request(XsType.WATCH, join_strings("/flood", token))).payload == b"OK\0"
            assert (await lazy.receive()).type == XsType.WATCH_EVENT
            lazy.writer.transport.pause_reading()      # from now on it reads nothing
            assert len(xsd.connections) == 2
            for i in range(1000):                      # ~3 KiB events nobody reads
                await writer.write("/flood/" + "n" * 1000, str(i))
                if len(xsd.connections) == 1:
                    break
            assert len(xsd.connections) == 1          # the lazy reader was dropped, bounded
            assert i > 10
            lazy.writer.transport.resume_reading()
            assert await asyncio.wait_for(lazy.closed_by_peer(), TIMEOUT)
            assert await writer.read_int("/flood/" + "n" * 1000) == i
            lazy.close()
    run(scenario)


# ---- fuzzing the request handler ------------------------------------------------

class _CollectingTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out += data

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    close = abort


_pieces = st.sampled_from([b"/", b"/a", b"/a/b", b"a", b"@releaseDomain", b"@x", b"//", b"/a/",
                           b"n0", b"r5", b"T", b"F", b"0", b"5", b"99999", b"", b"\xff", b"x" * 3100])
_payloads = st.one_of(st.binary(max_size=64),
                      st.lists(_pieces, max_size=4).map(lambda parts: (b"\0".join(parts) + b"\0")[-4096:]))


@settings(deadline=None, max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 30), _payloads, st.integers(0, 3)), max_size=12),
       st.booleans())
def test_fuzz_request_handler_always_answers(requests, privileged):
    """Random requests: never an exception, exactly one reply per request."""
    run_dir = tempfile.mkdtemp(prefix="xf", dir="/tmp")

    async def scenario():
        xsd = XenStored(run_dir)
        conn = Connection(xsd, Caller(0 if privileged else 5, privileged))
        transport = _CollectingTransport()
        conn.connection_made(transport)
        try:
            for req_id, (msg_type, payload, tx_id) in enumerate(requests, 1):
                conn.data_received(Message(msg_type, req_id, tx_id, payload).encode())
                assert not transport.closing
            replies = [m for m in MessageDecoder().feed(bytes(transport.out))
                       if m.type != XsType.WATCH_EVENT]
            assert [m.req_id for m in replies] == list(range(1, len(requests) + 1))
            assert xsd.nodes["/"].children    # the tree survived
        finally:
            await xsd.close()
    try:
        run(scenario)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
