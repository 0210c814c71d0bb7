"""QMP monitor: a real client over a unix socket against QmpServer."""
import asyncio
import json
import os
import socket
import stat

import pytest
from hypothesis import given, settings, strategies as st

from pyxenfb.machine.cli import COMMAND_LINE_OPTIONS, ChardevSocket
from pyxenfb.machine.qmp import (MAX_MESSAGE, MessageSplitter, MessageTooLong, QmpError,
                         QmpServer)

TIMEOUT = 5


class FakeMachine:
    def __init__(self):
        self.status = "prelaunch"
        self.calls = []
        self.screendump_error = None
        self.quit_event = asyncio.Event()

    def qmp_status(self):
        return self.status

    def qmp_cont(self):
        self.calls.append(("cont",))
        self.status = "running"

    def qmp_query_vnc(self):
        return {"enabled": True, "host": "127.0.0.1", "family": "ipv4",
                "service": "5901", "auth": "none", "clients": []}

    def qmp_set_vnc_password(self, password):
        self.calls.append(("password", password))

    def qmp_expire_vnc_password(self, time):
        self.calls.append(("expire", time))

    def qmp_screendump(self, filename, fmt):
        if self.screendump_error:
            raise self.screendump_error
        self.calls.append(("screendump", filename, fmt))

    def qmp_quit(self):
        self.calls.append(("quit",))
        self.quit_event.set()

    def qmp_chardevs(self):
        return [{"label": "libxl-cmd", "filename": "unix:/tmp/q,server=on"}]


class Client:
    """A raw QMP client that checks every message ends in \\r\\n."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path):
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), TIMEOUT)
        return cls(reader, writer)

    async def raw_message(self) -> bytes:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), TIMEOUT)
        assert raw.endswith(b"\r\n") and b"\n" not in raw[:-2]
        return raw

    async def message(self):
        return json.loads(await self.raw_message())

    async def send(self, data: bytes):
        self.writer.write(data)
        await self.writer.drain()

    async def call(self, command, arguments=None, id=1):
        request = {"execute": command, "id": id}
        if arguments is not None:
            request["arguments"] = arguments
        await self.send(json.dumps(request).encode())
        return await self.message()

    async def negotiated(self):
        greeting = await self.message()
        assert "QMP" in greeting
        assert await self.call("qmp_capabilities") == {"return": {}, "id": 1}
        return self

    async def at_eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), TIMEOUT) == b""

    def close(self):
        self.writer.close()


def run(coro_fn, tmp_path):
    """Run coro_fn(server, machine, path) with a server listening at path."""
    async def main():
        machine = FakeMachine()
        server = QmpServer(machine)
        path = str(tmp_path / "qmp.sock")
        await server.listen(ChardevSocket("libxl-cmd", path, None, True, False))
        try:
            await asyncio.wait_for(coro_fn(server, machine, path), 20)
        finally:
            await server.close()
    asyncio.run(main())


def test_greeting_and_negotiation(tmp_path):
    async def body(server, machine, path):
        c = await Client.connect(path)
        raw = await c.raw_message()
        assert json.loads(raw) == {"QMP": {
            "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "pyxenfb"},
            "capabilities": []}}
        # before qmp_capabilities: QEMU's refusal, id echoed
        assert await c.call("query-status", id=5) == {"error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 5}
        assert machine.calls == []
        assert await c.call("qmp_capabilities", id=6) == {"return": {}, "id": 6}
        again = await c.call("qmp_capabilities", id=7)
        assert again["error"]["class"] == "CommandNotFound" and again["id"] == 7
        c.close()
    run(body, tmp_path)


def test_capability_enable_refused(tmp_path):
    async def body(server, machine, path):
        c = await Client.connect(path)
        await c.message()
        reply = await c.call("qmp_capabilities", {"enable": ["oob"]})
        assert reply["error"]["class"] == "GenericError" and "oob" in reply["error"]["desc"]
        # still not negotiated
        assert (await c.call("query-version"))["error"]["class"] == "CommandNotFound"
        c.close()
    run(body, tmp_path)


def test_libxl_startup_sequence(tmp_path):
    # what libxl sends with the fd= / -S startup, then post-config and unpause
    async def body(server, machine, path):
        c = await (await Client.connect(path)).negotiated()
        assert await c.call("query-status", id=2) == {
            "return": {"status": "prelaunch", "running": False, "singlestep": False},
            "id": 2}
        chardevs = await c.call("query-chardev", id=3)
        assert chardevs == {"return": [{"frontend-open": True, "label": "libxl-cmd",
                                        "filename": "unix:/tmp/q,server=on"}], "id": 3}
        vnc = await c.call("query-vnc", id=4)
        assert vnc["return"]["enabled"] is True and vnc["return"]["service"] == "5901"
        assert await c.call("change-vnc-password", {"password": "s3cret"}, id=5) == {
            "return": {}, "id": 5}
        assert await c.call("cont", id=6) == {"return": {}, "id": 6}
        assert machine.calls == [("password", "s3cret"), ("cont",)]
        status = await c.call("query-status", id=7)
        assert status["return"]["status"] == "running" and status["return"]["running"]
        assert await c.call("stop", id=8) == {"return": {}, "id": 8}
        c.close()
    run(body, tmp_path)


def test_libxl_probe_sequence(tmp_path):
    async def body(server, machine, path):
        c = await (await Client.connect(path)).negotiated()
        options = await c.call("query-command-line-options", id=2)
        assert options["id"] == 2
        names = [o["option"] for o in options["return"]]
        assert "vnc" in names and "run-with" not in names
        for option in options["return"]:
            assert all(isinstance(p["name"], str) for p in option["parameters"])
        one = await c.call("query-command-line-options", {"option": "vnc"})
        assert one["return"] == [o for o in COMMAND_LINE_OPTIONS if o["option"] == "vnc"]
        bad = await c.call("query-command-line-options", {"option": "nope"})
        assert bad["error"] == {"class": "GenericError", "desc": "invalid option name: nope"}
        assert await c.call("quit", id=3) == {"return": {}, "id": 3}
        await asyncio.wait_for(machine.quit_event.wait(), TIMEOUT)
        assert await c.at_eof()
    run(body, tmp_path)


def test_password_and_screendump_commands(tmp_path):
    async def body(server, machine, path):
        c = await (await Client.connect(path)).negotiated()
        ok = {"return": {}, "id": 1}
        assert await c.call("set_password", {"protocol": "vnc", "password": "pw"}) == ok
        assert await c.call("set_password", {"protocol": "vnc", "password": "p2",
                                              "connected": "keep"}) == ok
        err = await c.call("set_password", {"protocol": "spice", "password": "x"})
        assert err["error"]["class"] == "GenericError"
        err = await c.call("set_password", {"protocol": "vnc", "password": "x",
                                            "connected": "disconnect"})
        assert err["error"]["class"] == "GenericError"
        for time in ("now", "never", "+30", "1700000000"):
            assert await c.call("expire_password", {"protocol": "vnc", "time": time}) == ok
        err = await c.call("expire_password", {"protocol": "vnc", "time": "soon"})
        assert err["error"]["class"] == "GenericError"
        assert await c.call("screendump", {"filename": "/tmp/a.ppm"}) == ok
        assert await c.call("screendump", {"filename": "/tmp/b.png", "format": "png"}) == ok
        err = await c.call("screendump", {"filename": "/tmp/c", "format": "jpeg"})
        assert err["error"]["desc"] == "Parameter 'format' does not accept value 'jpeg'"
        machine.screendump_error = QmpError("GenericError", "no surface yet")
        assert await c.call("screendump", {"filename": "/tmp/d"}, id=9) == {
            "error": {"class": "GenericError", "desc": "no surface yet"}, "id": 9}
        assert machine.calls == [
            ("password", "pw"), ("password", "p2"),
            ("expire", "now"), ("expire", "never"), ("expire", "+30"),
            ("expire", "1700000000"),
            ("screendump", "/tmp/a.ppm", "ppm"), ("screendump", "/tmp/b.png", "png")]
        c.close()
    run(body, tmp_path)


def test_version_commands_and_unknown(tmp_path):
    async def body(server, machine, path):
        c = await (await Client.connect(path)).negotiated()
        version = await c.call("query-version")
        assert version["return"] == {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                     "package": "pyxenfb"}
        commands = {entry["name"] for entry in (await c.call("query-commands"))["return"]}
        assert {"qmp_capabilities", "query-status", "cont", "stop", "query-vnc",
                "query-chardev", "query-command-line-options", "change-vnc-password",
                "set_password", "expire_password", "screendump", "query-version",
                "query-commands", "quit"} <= commands
        assert await c.call("device_add", {"driver": "x"}, id=4) == {"error": {
            "class": "CommandNotFound", "desc": "The command device_add has not been found"},
            "id": 4}
        c.close()
    run(body, tmp_path)


def test_argument_checks(tmp_path):
    async def body(server, machine, path):
        c = await (await Client.connect(path)).negotiated()
        cases = [
            ("change-vnc-password", {}, "Parameter 'password' is missing"),
            ("change-vnc-password", {"password": 5},
             "Invalid parameter type for 'password', expected: string"),
            ("change-vnc-password", {"password": "x", "extra": 1},
             "Parameter 'extra' is unexpected"),
            ("screendump", {"filename": "/x", "head": True},
             "Invalid parameter type for 'head', expected: integer"),
            ("query-status", {"verbose": True}, "Parameter 'verbose' is unexpected"),
        ]
        for command, arguments, desc in cases:
            reply = await c.call(command, arguments, id=command)
            assert reply == {"error": {"class": "GenericError", "desc": desc}, "id": command}
        assert machine.calls == []
        c.close()
    run(body, tmp_path)


@pytest.mark.parametrize("request_id", ["abc", 0, -7, 2**40, 1.5, None, True,
                                        {"a": [1, {"b": None}]}, [1, "x"], "ünï"])
def test_id_echoed_verbatim(tmp_path, request_id):
    async def body(server, machine, path):
        c = await Client.connect(path)
        await c.message()
        before = await c.call("query-vnc", id=request_id)
        assert before["id"] == request_id and "error" in before
        assert (await c.call("qmp_capabilities", id=request_id)) == {
            "return": {}, "id": request_id}
        after = await c.call("query-vnc", id=request_id)
        assert after["id"] == request_id and "return" in after
        c.close()
    run(body, tmp_path)


def test_bad_requests_get_errors_and_connection_goes_on(tmp_path):
    async def body(server, machine, path):
        c = await (await Client.connect(path)).negotiated()
        bad = [
            (b'{"execute": "query-status",}', "JSON parse error"),
            (b"garbage ", "JSON parse error"),
            (b"]", "JSON parse error"),
            (b'"just a string"', "QMP input must be a JSON object"),
            (b"[1, 2]", "QMP input must be a JSON object"),
            (b"42 ", "QMP input must be a JSON object"),
            (b'{"id": 3}', "QMP input lacks member 'execute'"),
            (b'{"execute": 3}', "QMP input member 'execute' must be a string"),
            (b'{"execute": "cont", "arguments": []}',
             "QMP input member 'arguments' must be an object"),
            (b'{"execute": "cont", "bogus": 1}', "QMP input member 'bogus' is unexpected"),
            (b'{"execute": "cont\xff"}', "invalid UTF-8"),
            (b'{"execute": "a\x01b"}', "JSON parse error"),
        ]
        for data, fragment in bad:
            await c.send(data)
            reply = await c.message()
            assert reply["error"]["class"] == "GenericError", data
            assert fragment in reply["error"]["desc"], (data, reply)
        # an id is echoed when the request was an object that had one
        await c.send(b'{"execute": 3, "id": "x"}')
        assert (await c.message())["id"] == "x"
        assert (await c.call("query-status"))["return"]["status"] == "prelaunch"
        assert machine.calls == []
        c.close()
    run(body, tmp_path)


def test_pipelined_commands_in_one_write(tmp_path):
    async def body(server, machine, path):
        c = await Client.connect(path)
        await c.message()
        await c.send(b'{"execute":"qmp_capabilities","id":1}{"execute":"query-status",'
                     b'"id":2}\r\n{"execute":"cont","id":3} {"execute":"query-status","id":4}')
        replies = [await c.message() for _ in range(4)]
        assert [r["id"] for r in replies] == [1, 2, 3, 4]
        assert replies[1]["return"]["status"] == "prelaunch"
        assert replies[3]["return"]["status"] == "running"
        c.close()
    run(body, tmp_path)


def test_command_split_across_writes(tmp_path):
    async def body(server, machine, path):
        c = await (await Client.connect(path)).negotiated()
        data = '{"execute": "change-vnc-password", "arguments": {"password": "a}\\"{é"}, "id": 8}'
        for byte in data.encode():
            await c.send(bytes([byte]))
        assert await c.message() == {"return": {}, "id": 8}
        assert machine.calls == [("password", 'a}"{é')]
        c.close()
    run(body, tmp_path)


def test_oversize_message_gets_error_then_close(tmp_path):
    async def body(server, machine, path):
        c = await (await Client.connect(path)).negotiated()
        other = await (await Client.connect(path)).negotiated()
        await c.send(b'{"execute": "cont", "arguments": {"x": "' + b"a" * (MAX_MESSAGE + 10))
        reply = await c.message()
        assert reply["error"]["class"] == "GenericError"
        assert "too long" in reply["error"]["desc"]
        assert await c.at_eof()
        # too deep a nesting is refused the same way
        deep = await (await Client.connect(path)).negotiated()
        await deep.send(b"[" * 1000)
        assert "too deep" in (await deep.message())["error"]["desc"]
        assert await deep.at_eof()
        # other clients go on
        assert (await other.call("query-status"))["return"]["status"] == "prelaunch"
        assert machine.calls == []
        other.close()
    run(body, tmp_path)


def test_multiple_connections_each_negotiate(tmp_path):
    async def body(server, machine, path):
        a = await (await Client.connect(path)).negotiated()
        b = await Client.connect(path)
        assert "QMP" in await b.message()
        assert (await b.call("query-status"))["error"]["class"] == "CommandNotFound"
        assert "return" in await a.call("query-status")
        a.close()
        b.close()
    run(body, tmp_path)


def test_machine_bug_becomes_an_error_reply(tmp_path):
    async def body(server, machine, path):
        def broken():
            raise RuntimeError("boom")
        machine.qmp_query_vnc = broken
        c = await (await Client.connect(path)).negotiated()
        assert (await c.call("query-vnc"))["error"] == {"class": "GenericError",
                                                        "desc": "internal error"}
        assert "return" in await c.call("query-status")
        c.close()
    run(body, tmp_path)


def test_socket_is_owner_only_and_close_cleans_up(tmp_path):
    async def main():
        machine = FakeMachine()
        server = QmpServer(machine, version=(8, 0, 4), package="test")
        path = str(tmp_path / "q")
        await server.listen(ChardevSocket("m", path, None, True, False))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        c = await Client.connect(path)
        greeting = await c.message()
        assert greeting["QMP"]["version"] == {"qemu": {"major": 8, "minor": 0, "micro": 4},
                                              "package": "test"}
        await asyncio.wait_for(server.close(), TIMEOUT)
        assert not os.path.exists(path)
        assert await c.at_eof()
    asyncio.run(main())


def test_stale_socket_replaced_and_non_socket_refused(tmp_path):
    stale = str(tmp_path / "stale")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(stale)
    leftover.close()                       # the file stays, nobody listens
    plain = tmp_path / "plain"
    plain.write_text("keep me")

    async def main():
        server = QmpServer(FakeMachine())
        await server.listen(ChardevSocket("a", stale, None, True, False))
        c = await Client.connect(stale)
        assert "QMP" in await c.message()
        with pytest.raises(FileExistsError):
            await server.listen(ChardevSocket("b", str(plain), None, True, False))
        await server.close()
    asyncio.run(main())
    assert plain.read_text() == "keep me"


def test_close_leaves_a_replaced_socket_alone(tmp_path):
    path = str(tmp_path / "q")

    async def main():
        old = QmpServer(FakeMachine())
        await old.listen(ChardevSocket("a", path, None, True, False))
        new = QmpServer(FakeMachine())   # a restarted DM takes the path over
        await new.listen(ChardevSocket("a", path, None, True, False))
        await old.close()
        assert os.path.exists(path)
        c = await Client.connect(path)
        assert "QMP" in await c.message()
        await new.close()
        assert not os.path.exists(path)
    asyncio.run(main())


def test_fd_adoption(tmp_path):
    # what libxl does: bind + listen a socket itself and pass fd=N
    path = str(tmp_path / "pre-opened")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.detach()

    async def main():
        machine = FakeMachine()
        server = QmpServer(machine)
        await server.listen(ChardevSocket("libxl-cmd", None, fd, True, False))
        c = await (await Client.connect(path)).negotiated()
        assert (await c.call("query-status"))["return"]["status"] == "prelaunch"
        await server.close()
        assert await c.at_eof()
    asyncio.run(main())
    with pytest.raises(OSError):
        os.fstat(fd)                     # the adopted fd was closed with the server
    assert os.path.exists(path)          # not our path to unlink


def test_fd_that_is_not_a_listening_socket(tmp_path):
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()

    async def main():
        server = QmpServer(FakeMachine())
        with pytest.raises(OSError, match="not listening"):
            await server.listen(ChardevSocket("a", None, unbound.fileno(), True, False))
        with pytest.raises(OSError, match="not a socket"):
            await server.listen(ChardevSocket("b", None, r, True, False))
        await server.close()
    try:
        asyncio.run(main())
        os.fstat(r)                      # a refused fd is left open for its owner
        assert unbound.fileno() >= 0
    finally:
        unbound.close()
        os.close(r)
        os.close(w)


# -- the splitter on its own ------------------------------------------------

MESSAGES = [
    b'{"execute": "cont", "id": 1}',
    b'{"a": "}{][\\"", "b": [[{}]]}',
    b'[1, 2]',
    b'"top \\" level"',
    b'{"execute": "x", "arguments": {"password": "\xc3\xa9"}}',
]


@settings(deadline=None, max_examples=200)
@given(st.lists(st.sampled_from(MESSAGES), min_size=1, max_size=6),
       st.lists(st.integers(min_value=1, max_value=40), max_size=20))
def test_splitter_is_independent_of_chunking(messages, cuts):
    stream = b" \r\n".join(messages) + b"\r\n"
    splitter = MessageSplitter()
    out, pos = [], 0
    for cut in cuts:
        out += splitter.feed(stream[pos:pos + cut])
        pos += cut
    out += splitter.feed(stream[pos:])
    assert out == messages


@settings(deadline=None, max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_splitter_fuzz_bounded(chunks):
    splitter = MessageSplitter(limit=256, max_depth=8)
    try:
        for chunk in chunks:
            for message in splitter.feed(chunk):
                assert 0 < len(message) <= 256
            assert len(splitter.buf) <= 256 + 64
    except MessageTooLong:
        pass
