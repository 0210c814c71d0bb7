"""The asyncio XenStore client, against the simulated daemon and against
scripted fake daemons for misbehaviour the real one never shows."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading

import pytest

from pyxenfb.sim.xenstored import XenStored
from pyxenfb.platform.xenstore import XenStore, XenStoreError, default_path
from pyxenfb.platform.xs_wire import HEADER, Message, MessageDecoder, XsType

TIMEOUT = 10


def run(scenario, timeout: float = TIMEOUT):
    asyncio.run(asyncio.wait_for(scenario(), timeout))


@pytest.fixture
def run_dir():
    path = tempfile.mkdtemp(prefix="xc", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def sim(run_dir: str):
    xsd = XenStored(run_dir)
    await xsd.start()
    xs = await XenStore.open(xsd.socket_path)
    try:
        yield xsd, xs
    finally:
        xs.close()
        await xsd.close()


@contextlib.asynccontextmanager
async def fake_daemon(run_dir: str, serve):
    """A scripted daemon: serve(messages_queue, writer) runs per connection."""
    path = os.path.join(run_dir, "fake.sock")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        decoder = MessageDecoder()
        inbox: asyncio.Queue[Message] = asyncio.Queue()

        async def pump():
            while data := await reader.read(65536):
                for msg in decoder.feed(data):
                    inbox.put_nowait(msg)
        pumper = asyncio.create_task(pump())
        try:
            await serve(inbox, writer)
        finally:
            pumper.cancel()
            writer.close()

    server = await asyncio.start_unix_server(handle, path)
    try:
        yield path
    finally:
        server.close()


def test_values_of_any_content(run_dir):
    async def scenario():
        async with sim(run_dir) as (_, xs):
            binary = bytes(range(256))
            await xs.write("/v/empty", b"")
            await xs.write("/v/binary", binary)
            await xs.write("/v/text", "grüße")
            await xs.write("/v/int", 42)
            await xs.write("/v/flag", True)
            assert await xs.read("/v/empty") == b""
            assert await xs.read("/v/binary") == binary
            assert await xs.read_str("/v/text") == "grüße"
            assert await xs.read_int("/v/int") == 42
            assert await xs.read("/v/flag") == b"1"
            assert await xs.read_int("/v/text", -1) == -1          # not an int -> default
            assert await xs.read_int("/v/none") is None
            assert await xs.read_str("/v/none", "d") == "d"
            assert await xs.read("/v/none", b"x") == b"x"
            with pytest.raises(XenStoreError) as info:
                await xs.read("/v/none")
            assert info.value.errno == 2 and info.value.strerror == "ENOENT"
            assert sorted(await xs.directory("/v")) == ["binary", "empty", "flag", "int", "text"]
            assert await xs.directory("/v/int") == []
            await xs.mkdir("/v/dir")
            await xs.mkdir("/v/dir")                                # exists: fine
            assert await xs.get_perms("/v/dir") == ["n0"]
            await xs.set_perms("/v/dir", ["n0", "r3", "b4"])
            assert await xs.get_perms("/v/dir") == ["n0", "r3", "b4"]
            with pytest.raises(ValueError):
                await xs.set_perms("/v/dir", ["x1"])
            with pytest.raises(ValueError):
                await xs.read("/bad path")
            with pytest.raises(XenStoreError) as info:
                await xs.write("/v/huge", b"x" * 5000)               # refused before sending
            assert info.value.strerror == "E2BIG"
            await xs.rm("/v")
            await xs.rm("/v")                                       # missing: no error
            assert await xs.read("/v", None) is None
            assert await xs.get_domain_path(7) == "/local/domain/7"
    run(scenario)


def test_pipelined_requests_are_matched_by_req_id(run_dir):
    async def scenario():
        async with sim(run_dir) as (_, xs):
            await asyncio.gather(*(xs.write(f"/p/{i}", str(i * i)) for i in range(200)))
            values = await asyncio.gather(*(xs.read_int(f"/p/{i}") for i in range(200)))
            assert values == [i * i for i in range(200)]
    run(scenario)


def test_watch_callbacks_run_in_the_loop(run_dir):
    async def scenario():
        loop_thread = threading.get_ident()
        async with sim(run_dir) as (xsd, xs), contextlib.AsyncExitStack() as stack:
            other = await XenStore.open(xsd.socket_path)
            stack.callback(other.close)
            events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

            def on_event(path: str, token: str) -> None:
                assert threading.get_ident() == loop_thread
                events.put_nowait((path, token))

            def broken_callback(path: str, token: str) -> None:
                raise RuntimeError("a bug in a callback must not kill the connection")

            await xs.watch("/be", "tok", on_event)
            await xs.watch("/crash", "c", broken_callback)
            assert await events.get() == ("/be", "tok")
            await other.write("/be/state", "4")
            assert await events.get() == ("/be/state", "tok")
            await other.write("/crash/x", "1")
            await other.write("/be/state", "5")
            assert await events.get() == ("/be/state", "tok")
            await xs.unwatch("/be", "tok")
            await other.write("/be/state", "6")
            await xs.read("/")               # round trip: an event would have arrived by now
            assert events.empty()
            with pytest.raises(XenStoreError):
                await xs.unwatch("/be", "tok")
            await xs.watch("@releaseDomain", "rel", on_event)
            assert await events.get() == ("@releaseDomain", "rel")
            await xs.introduce_domain(4, 1, 1)
            assert await xs.is_domain_introduced(4)
            await xs.release_domain(4)
            assert await events.get() == ("@releaseDomain", "rel")
            assert not xs.closed.done()
    run(scenario)


def test_transaction_helper_aborts_on_exception(run_dir):
    async def scenario():
        async with sim(run_dir) as (xsd, xs):
            async def failing(tx):
                await xs.write("/tx/a", "1", tx=tx)
                raise KeyError("boom")
            with pytest.raises(KeyError):
                await xs.transaction(failing)
            assert await xs.read("/tx/a", None) is None
            await xs.read("/")                     # the background abort has been handled
            assert all(not c.transactions for c in xsd.connections)

            async def ok(tx):
                await xs.write("/tx/b", "2", tx=tx)
                return await xs.read_int("/tx/b", tx=tx)
            assert await xs.transaction(ok) == 2
            assert await xs.read_int("/tx/b") == 2
    run(scenario)


def test_directory_falls_back_to_directory_part(run_dir):
    names = [f"n{i:03d}-{'x' * 40}" for i in range(200)]

    async def scenario():
        async with sim(run_dir) as (_, xs):
            async def fill(tx):
                for name in names:
                    await xs.mkdir(f"/big/{name}", tx=tx)
            await xs.transaction(fill)
            assert await xs.directory("/big") == names
    run(scenario)


def test_directory_part_restarts_when_the_node_changes(run_dir):
    async def serve(inbox, writer):
        gens = iter([b"1", b"2", b"2", b"2"])
        while True:
            msg = await inbox.get()
            if msg.type == XsType.DIRECTORY:
                reply = Message(XsType.ERROR, msg.req_id, 0, b"E2BIG\0")
            else:
                offset = int(msg.strings()[1])
                gen = next(gens)
                part = b"a\0b\0" if offset == 0 else b"c\0\0"
                reply = Message(XsType.DIRECTORY_PART, msg.req_id, 0, gen + b"\0" + part)
            writer.write(reply.encode())

    async def scenario():
        async with fake_daemon(run_dir, serve) as path:
            xs = await XenStore.open(path)
            assert await xs.directory("/d") == ["a", "b", "c"]
            xs.close()
    run(scenario)


def test_connection_loss_fails_pending_requests(run_dir):
    async def serve(inbox, writer):
        await inbox.get()
        await inbox.get()          # two requests in flight, then the daemon dies

    async def scenario():
        async with fake_daemon(run_dir, serve) as path:
            xs = await XenStore.open(path)
            first = asyncio.ensure_future(xs.read("/a"))
            second = asyncio.ensure_future(xs.watch("/w", "t", lambda p, t: None))
            for pending in (first, second):
                with pytest.raises(XenStoreError) as info:
                    await pending
                assert info.value.strerror == "ECONNRESET"
            await asyncio.wait_for(xs.closed, TIMEOUT)
            with pytest.raises(XenStoreError):       # later calls fail fast
                await xs.read("/a")
    run(scenario)


def test_connection_loss_ends_a_wait_on_a_watch(run_dir):
    """A watch registered, its caller waiting for the event: when xenstored
    goes (EOF), the wait ends with the connection-lost error, not never."""
    async def serve(inbox, writer):
        msg = await inbox.get()
        assert msg.type == XsType.WATCH
        writer.write(Message(XsType.WATCH, msg.req_id, 0, b"OK\0").encode())
        await writer.drain()
        await inbox.get()          # the read below: the daemon dies with it pending

    async def scenario():
        async with fake_daemon(run_dir, serve) as path:
            xs = await XenStore.open(path)
            fired = asyncio.Event()
            await xs.watch("/w", "t", lambda p, t: fired.set())
            waiting = asyncio.ensure_future(xs.until(fired.wait()))
            pending = asyncio.ensure_future(xs.read("/a"))
            for future in (waiting, pending):
                with pytest.raises(XenStoreError) as info:
                    await future
                assert info.value.strerror == "ECONNRESET"
            assert xs.closed.done() and not fired.is_set()
            with pytest.raises(XenStoreError):       # a wait begun afterwards fails at once
                await xs.until(fired.wait())
    run(scenario)


def test_until_returns_what_the_awaitable_returns(run_dir):
    async def scenario():
        async with sim(run_dir) as (_xsd, xs):
            fired = asyncio.Event()
            await xs.watch("/w", "t", lambda p, t: fired.set())
            assert await xs.until(fired.wait()) is True      # the initial event
            assert await xs.until(xs.read("/w", b"none")) == b"none"
            assert not xs.closed.done()
    run(scenario)


def test_protocol_violation_by_daemon_closes_the_client(run_dir):
    async def serve(inbox, writer):
        msg = await inbox.get()
        writer.write(HEADER.pack(XsType.READ, msg.req_id, 0, 100_000))
        await inbox.get()

    async def scenario():
        async with fake_daemon(run_dir, serve) as path:
            xs = await XenStore.open(path)
            with pytest.raises(XenStoreError) as info:
                await xs.read("/a")
            assert "protocol" in str(info.value)
            await asyncio.wait_for(xs.closed, TIMEOUT)
    run(scenario)


def test_stray_and_foreign_events_are_ignored(run_dir):
    async def serve(inbox, writer):
        watch = await inbox.get()
        writer.write(Message(XsType.WATCH, watch.req_id, 0, b"OK\0").encode())
        for payload in (b"/w\0t\0", b"/elsewhere\0t\0", b"/w/x\0other\0", b"garbage",
                        b"/w/y\0t\0"):
            writer.write(Message(XsType.WATCH_EVENT, 0, 0, payload).encode())
        writer.write(Message(XsType.READ, 12345, 0, b"nobody asked").encode())
        read = await inbox.get()
        writer.write(Message(XsType.DIRECTORY, read.req_id, 0, b"").encode())   # wrong type
        read = await inbox.get()
        writer.write(Message(XsType.READ, read.req_id, 0, b"fine").encode())
        await inbox.get()

    async def scenario():
        async with fake_daemon(run_dir, serve) as path:
            xs = await XenStore.open(path)
            seen: list[str] = []
            await xs.watch("/w", "t", lambda p, t: seen.append(p))
            with pytest.raises(XenStoreError) as info:
                await xs.read("/r")
            assert info.value.strerror == "EIO"
            assert await xs.read("/r") == b"fine"
            assert seen == ["/w", "/w/y"]
            xs.close()
            await asyncio.wait_for(xs.closed, TIMEOUT)
    run(scenario)


def test_close_resolves_closed_and_fails_pending(run_dir):
    async def scenario():
        async with sim(run_dir) as (xsd, _):
            xs = await XenStore.open(xsd.socket_path)
            await xs.write("/c", "1")
            xs.close()
            await asyncio.wait_for(xs.closed, TIMEOUT)
            with pytest.raises(XenStoreError):
                await xs.read("/c")
    run(scenario)


def test_open_paths(run_dir, monkeypatch):
    monkeypatch.setenv("XENSTORED_PATH", "/some/where.sock")
    assert default_path() == "/some/where.sock"
    assert default_path({}) in ("/var/run/xenstored/socket", "/dev/xen/xenbus")

    async def scenario():
        with pytest.raises(XenStoreError) as info:
            await XenStore.open(os.path.join(run_dir, "absent.sock"))
        assert info.value.strerror == "ENOENT"
        async with sim(run_dir) as (xsd, _):
            monkeypatch.setenv("XENSTORED_PATH", xsd.socket_path)
            xs = await XenStore.open()
            assert await xs.read("/local/domain/0/name") == b"Domain-0"
            xs.close()
    run(scenario)


def test_character_device_path_uses_plain_fd_io():
    """The /dev/xen/xenbus code path, exercised on a raw-mode pty (also a character device)."""
    import tty

    async def scenario():
        master, slave = os.openpty()
        tty.setraw(slave)
        try:
            xs = await XenStore.open(os.ttyname(slave))
            loop = asyncio.get_running_loop()
            decoder = MessageDecoder()
            requests: asyncio.Queue[Message] = asyncio.Queue()

            def on_master_readable():
                for msg in decoder.feed(os.read(master, 65536)):
                    requests.put_nowait(msg)
            loop.add_reader(master, on_master_readable)
            try:
                pending = asyncio.ensure_future(xs.read("/local/domain/0/name"))
                msg = await requests.get()
                assert (msg.type, msg.payload) == (XsType.READ, b"/local/domain/0/name\0")
                os.write(master, Message(XsType.READ, msg.req_id, 0, b"Domain-0\n\r\0").encode())
                assert await pending == b"Domain-0\n\r\0"
                xs.close()
                await asyncio.wait_for(xs.closed, TIMEOUT)
            finally:
                loop.remove_reader(master)
        finally:
            os.close(master)
            os.close(slave)
    run(scenario)
