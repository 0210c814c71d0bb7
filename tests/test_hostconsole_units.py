"""pyxenfb-console's pieces without a sim: the RFB client against hostile
servers, the password file, the login rate limit, the thumbnail downscale."""
from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest

from pyxenfb.hostconsole import auth
from pyxenfb.hostconsole.domains import connect_host
from pyxenfb.hostconsole.rfbclient import PasswordRequired, RfbClient, RfbError
from pyxenfb.hostconsole.thumbnails import downscale
from pyxenfb.rfb.auth import vnc_response

FORMAT = b"\x20\x18\0\1\0\xff\0\xff\0\xff\x10\x08\0\0\0\0"


def server_init(w: int, h: int, name: bytes = b"dom") -> bytes:
    return struct.pack(">HH16sI", w, h, FORMAT, len(name)) + name


async def run_against(script, password=None, updates: int = 0):
    """A one-connection server running `script(reader, writer)`; returns the
    client after `updates` updates, or raises what the client raised."""
    done = asyncio.Event()

    async def handle(reader, writer):
        try:
            await script(reader, writer)
        finally:
            await done.wait()
            writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await RfbClient.connect("127.0.0.1", port, password, timeout=5)
        try:
            client.request(False)
            for _ in range(updates):
                await asyncio.wait_for(client.update(), 5)
        finally:
            client.close()
        return client
    finally:
        done.set()
        server.close()
        await server.wait_closed()


async def security_none_38(reader, writer):
    """RFB 3.8 with security None, up to (not including) ServerInit."""
    writer.write(b"RFB 003.008\n")
    assert await reader.readexactly(12) == b"RFB 003.008\n"
    writer.write(b"\x01\x01")
    assert await reader.readexactly(1) == b"\x01"
    writer.write(b"\0\0\0\0")
    assert await reader.readexactly(1) == b"\x01"


async def handshake_38(reader, writer, w=4, h=2):
    await security_none_38(reader, writer)
    writer.write(server_init(w, h))
    await reader.readexactly(20 + 12 + 10)


def test_raw_update_lands_in_the_picture():
    async def script(reader, writer):
        await handshake_38(reader, writer)
        writer.write(b"\0\0\0\x01" + struct.pack(">HHHHi", 1, 1, 2, 1, 0) + b"\x03\x02\x01\0\x06\x05\x04\0")
    client = asyncio.run(run_against(script, updates=1))
    rgb = client.rgb()
    assert rgb.shape == (2, 4, 3)
    assert rgb[1, 1].tolist() == [1, 2, 3] and rgb[1, 2].tolist() == [4, 5, 6]
    assert rgb[0].sum() == 0


def test_vnc_auth_with_the_password():
    challenge = bytes(range(16))

    async def script(reader, writer):
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(12)
        writer.write(b"\x01\x02")
        assert await reader.readexactly(1) == b"\x02"
        writer.write(challenge)
        assert await reader.readexactly(16) == vnc_response("pw", challenge)
        writer.write(b"\0\0\0\0")
        await reader.readexactly(1)
        writer.write(server_init(2, 2))
        await reader.readexactly(42)
    assert asyncio.run(run_against(script, password="pw")).width == 2


@pytest.mark.parametrize("case", ["password", "huge", "outside", "encoding", "name", "cuttext",
                                  "msgtype", "refused"])
def test_hostile_or_locked_servers_are_refused(case):
    async def script(reader, writer):
        if case == "password":
            writer.write(b"RFB 003.008\n\x01\x02")
            return
        if case == "refused":
            writer.write(b"RFB 003.008\n\x00\x00\x00\x00\x04nope")
            return
        if case == "huge":
            await security_none_38(reader, writer)
            writer.write(server_init(65535, 65535))
            return
        if case == "name":
            await security_none_38(reader, writer)
            writer.write(struct.pack(">HH16sI", 4, 2, FORMAT, 1 << 30))
            return
        await handshake_38(reader, writer)
        writer.write({
            "outside": b"\0\0\0\x01" + struct.pack(">HHHHi", 3, 0, 2, 1, 0),
            "encoding": b"\0\0\0\x01" + struct.pack(">HHHHi", 0, 0, 1, 1, 16),
            "cuttext": b"\x03\0\0\0" + struct.pack(">I", 1 << 30),
            "msgtype": b"\x77",
        }[case])
    expected = PasswordRequired if case == "password" else RfbError
    with pytest.raises(expected):
        asyncio.run(run_against(script, updates=1))


def test_password_file_roundtrip_and_garbage():
    line = auth.hash_password("correct horse")
    h = auth.PasswordHash.parse(line)
    assert h.check("correct horse") and not h.check("correct horsE")
    assert auth.hash_password("x") != auth.hash_password("x")          # salted
    for bad in ("", "plain", "scrypt$3$8$1$AAAA$AAAA", "scrypt$16384$8$1$!!$AAAA",
                "pbkdf2$1$1$1$QUJDREVGR0g=$QUJDREVGR0hJSktMTU5PUA=="):
        with pytest.raises(auth.PasswordFileError):
            auth.PasswordHash.parse(bad)


def test_login_throttle_counts_attempts_in_flight_then_doubles_to_a_low_cap():
    now = [100.0]
    rl = auth.LoginThrottle(free=3, base=1.0, cap=8.0, clock=lambda: now[0])
    # Parallel: three admitted before any finished, the fourth must wait.
    assert [rl.begin("a") for _ in range(3)] == [0, 0, 0]
    assert rl.begin("a") >= 1
    for _ in range(3):
        rl.end("a", False)
    waits = [round(rl.retry_after("a"))]
    for _ in range(5):
        now[0] += rl.retry_after("a")
        assert rl.begin("a") == 0
        assert rl.begin("a") >= 1               # one at a time past the free ones
        rl.end("a", False)
        waits.append(round(rl.retry_after("a")))
    assert waits == [1, 2, 4, 8, 8, 8]
    assert rl.retry_after("b") == 0             # other addresses are not affected
    # The delay decays: one failure forgiven per `cap` seconds of quiet ...
    now[0] += 8 * 5
    assert rl.retry_after("a") == 0
    assert rl.begin("a") == 0
    rl.end("a", True)                           # ... and a success forgets the address
    assert rl._entries == {}
    assert [rl.begin("a") for _ in range(3)] == [0, 0, 0]
    for _ in range(3):
        rl.end("a", None)                       # no verdict: nothing counted
    assert rl._entries == {}


def test_sessions_expire_and_are_random(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    s = auth.Sessions(ttl=60)
    a, b = s.new(), s.new()
    assert a != b and len(a) >= 40 and s.valid(a) and not s.valid("guess") and not s.valid(None)
    now[0] += 61
    assert not s.valid(a)
    s.drop(b)
    assert not s.valid(b)


def test_sessions_report_their_end_on_logout_and_eviction(monkeypatch):
    ended = []
    monkeypatch.setattr(auth, "MAX_SESSIONS", 2)
    s = auth.Sessions(ttl=60, on_end=ended.append)
    a, b = s.new(), s.new()
    assert s.expiry(a) is not None and s.expiry("guess") is None
    s.drop(a)
    s.drop(a)                                   # once only
    assert ended == [a]
    c = s.new()
    d = s.new()                                 # room for two: the oldest (b) goes
    assert ended == [a, b] and s.valid(c) and s.valid(d)


def test_downscale_keeps_aspect_and_box_averages():
    rgb = np.zeros((600, 800, 3), np.uint8)
    rgb[:, 1::2] = 200                      # alternate columns: a box filter averages them
    img = downscale(rgb)
    assert img.size == (320, 240)
    small = np.zeros((100, 50, 3), np.uint8)
    assert downscale(small).size == (50, 100)               # never scaled up


def test_wildcard_listen_connects_to_loopback():
    assert connect_host("0.0.0.0") == "127.0.0.1"
    assert connect_host("::") == "::1"
    assert connect_host("192.0.2.7") == "192.0.2.7"


def test_program_of_names_the_device_model(tmp_path):
    from pyxenfb.hostconsole.domains import program_of
    cases = {1: b"/usr/bin/python3\0/usr/local/bin/pyqemu-dm\0-xen-domid\0003\0",
             2: b"python3\0-m\0pyxenfb.machine.cli\0-xen-domid\0003\0",
             3: b"/usr/libexec/xen-qemu-system-i386\0-xen-domid\0003\0",
             4: b"python3\0-m\0pyxenfb\0-d\0001\0",
             5: b"python3\0-m\0some.other_dm\0"}
    for pid, cmdline in cases.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(cmdline)
    assert [program_of(p, str(tmp_path)) for p in (1, 2, 3, 4, 5)] == \
        ["pyqemu-dm", "pyqemu-dm", "xen-qemu-system-i386", "pyqemu-dm", "some.other_dm"]
    assert program_of(6, str(tmp_path)) is None and program_of(0, str(tmp_path)) is None


def test_accept_errors_are_budgeted_one_liners():
    """asyncio reports each accept() that failed for want of descriptors through the
    loop's exception handler, with a traceback; the console makes it a budgeted line."""
    import logging

    from pyxenfb.hostconsole.server import budget_accept_errors
    from pyxenfb.util.logbudget import LogBudget

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    logger = logging.getLogger("test.console.accept")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    loop = asyncio.new_event_loop()
    try:
        budget_accept_errors(loop, LogBudget(logger))
        for _ in range(10000):
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(24, "Too many open files")})
    finally:
        loop.close()
    assert 1 <= len(records) <= 10
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in records)
    assert "Too many open files" in records[0].getMessage()


def test_connection_limits_keep_headroom_below_the_descriptor_limit():
    from pyxenfb.hostconsole.server import FD_RESERVE, connection_limits
    for nofile in (128, 256, 1024, 4096, 1 << 20):
        total, per_address = connection_limits(nofile)
        assert 2 * total + FD_RESERVE <= max(nofile, 2 * 4 + FD_RESERVE)
        assert 8 <= per_address <= total or per_address == total
        assert total <= 1024
    assert connection_limits(256) == (96, 24)
