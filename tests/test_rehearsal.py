"""The zygote's rehearsal (pyxenfb/zygote/rehearsal.py), the launcher
(pyxenfb/zygote/launch.py), the stand-in's wire codec (pyxenfb/zygote/standin.py) and
its last form (pyxenfb/zygote/forwarder.py)."""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from pyxenfb.zygote import forwarder, rehearsal, wire
from pyxenfb.rfb import encodings


def test_rehearsal_serves_every_encoding_and_format_without_a_thread(monkeypatch):
    seen = []
    real = encodings.Encoder.encode_chunks

    def spy(self, encoding, fmt, *args, **kwargs):
        seen.append((encoding, fmt.bpp))
        return real(self, encoding, fmt, *args, **kwargs)
    monkeypatch.setattr(encodings.Encoder, "encode_chunks", spy)
    from pyxenfb.machine import cli
    parsed = []
    monkeypatch.setattr(cli, "parse_args", lambda argv: parsed.append(argv))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    threads = set(os.listdir("/proc/self/task"))
    rehearsal.rehearse(cli)
    assert set(os.listdir("/proc/self/task")) == threads       # a zygote must stay single-threaded
    assert (root.handlers, root.level) == (handlers, level)    # its log handler gone again
    for encoding in rehearsal._ENCODINGS:
        for bpp in (32, 16, 8):
            assert seen.count((encoding, bpp)) == 2, (encoding, bpp)   # full, then incremental
    assert parsed == [rehearsal.LIBXL_ARGV]


def test_a_failing_step_raises_instead_of_hanging(monkeypatch):
    """A server that never answers ends the rehearsal with an error (the
    zygote logs it and serves on), within STEP_LIMIT loop turns."""
    monkeypatch.setattr(rehearsal, "STEP_LIMIT", 50)
    monkeypatch.setattr(rehearsal._Session, "send", lambda self, data: None)
    with pytest.raises(TimeoutError):
        rehearsal.rehearse()


def test_rehearsal_exercises_xenstore_and_the_resolver(monkeypatch):
    from pyxenfb.platform.xenstore import XenStore
    calls = []
    for name in ("write", "read", "watch", "transaction_start", "transaction_end", "unwatch"):
        real = getattr(XenStore, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(XenStore, name, spy)
    looked_up = []
    real_gai = rehearsal.socket.getaddrinfo
    monkeypatch.setattr(rehearsal.socket, "getaddrinfo",
                        lambda host, *a, **k: looked_up.append(host) or real_gai(host, *a, **k))
    rehearsal.rehearse()
    assert {"write", "read", "watch", "transaction_start", "transaction_end", "unwatch"} <= set(calls)
    assert "127.0.0.1" in looked_up


def test_the_rehearsals_xenstore_answers_the_client_as_xenstored_would(tmp_path):
    """xs_responder: the operations the rehearsal sends, with watch events
    and errors, through the device model's own client."""
    import asyncio
    import errno
    from pyxenfb.platform.xenstore import XenStore, XenStoreError
    from pyxenfb.zygote.xs_responder import Responder

    async def session():
        daemon = Responder(str(tmp_path))
        await daemon.start()
        xs = await XenStore.open(daemon.socket_path)
        try:
            seen = []
            await xs.watch("/a", "t", lambda path, token: seen.append(path))
            await xs.write("/a/b/c", "1")
            assert await xs.read("/a/b/c") == b"1"
            assert await xs.read("/a/b") == b""                 # parents appear, empty
            assert await xs.read("/a/missing", None) is None
            await xs.mkdir("/a/d")
            assert await xs.directory("/a") == ["b", "d"]
            assert await xs.get_perms("/a") == ["n0"]
            await xs.transaction(lambda tx: xs.write("/a/tx", "2", tx=tx))
            assert await xs.read_int("/a/tx") == 2
            await xs.rm("/a/b")
            assert await xs.directory("/a") == ["d", "tx"]
            with pytest.raises(XenStoreError) as err:
                await xs.directory("/a/b")
            assert err.value.errno == errno.ENOENT
            with pytest.raises(XenStoreError) as err:
                await xs.get_domain_path(1)                     # not the rehearsal's: ENOSYS
            assert err.value.errno == errno.ENOSYS
            await xs.unwatch("/a", "t")
            await xs.write("/a/after", "x")
            await xs.read("/a/after")                           # a round trip: events before it arrived
            assert seen == ["/a", "/a/b/c", "/a/d", "/a/tx", "/a/b"]
        finally:
            xs.close()
            await daemon.close()
    asyncio.run(session())


_EXIT_7 = wire.encode_exit(7)


@pytest.mark.parametrize("message, code", [
    (wire.encode_exit(0), 0), (wire.encode_exit(255), 255), (_EXIT_7, 7),
    (wire.encode_exit(256), None), (wire.encode_exit(-1), None), (wire.encode_signal(15), None),
    (wire.encode_pid(7), None), (wire.encode_go(), None), (b"", None), (_EXIT_7[:-1], None),
    (_EXIT_7 + b"\0", None), (b"\xff\xfe", None), (b"PXZF" + _EXIT_7[4:], None),
    (_EXIT_7[:4] + b"\x01\x00" + _EXIT_7[6:], None), (b'{"exit": 7}', None),
])
def test_forwarder_reads_only_an_exit_status(message, code):
    assert forwarder.exit_code(message) == code


def test_forwarder_forwards_signals_and_returns_the_status():
    """The slim stand-in as exec'd (a bare `python -S -I` importing only the
    forwarder): SIGTERM goes over the socket as a SIGNAL 15 message; garbage
    is logged and ignored; EXIT 7 ends it with status 7."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(forwarder.__file__))))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import signal; "
            "signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM,)); "
            "from pyxenfb.zygote.forwarder import main; "
            "print(sorted({'json', 'socket', 're', 'array'} & set(sys.modules)), flush=True); "
            "sys.exit(main(sys.argv[2:]))")
    proc = subprocess.Popen([sys.executable, "-S", "-I", "-c", code, root, str(theirs.fileno()),
                             "42", "pyqemu-dm", "--"], pass_fds=(theirs.fileno(),),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        assert proc.stdout.readline().strip() == "[]"           # no socket, json, re or array loaded
        proc.send_signal(15)
        ours.settimeout(10)
        assert ours.recv(4096) == wire.encode_signal(15)
        ours.send(b"nonsense")
        ours.send(wire.encode_exit(7))
        assert proc.wait(10) == 7
        assert "bad message b'nonsense'; ignored" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        ours.close()


def test_forwarder_without_a_status_exits_1_when_the_child_goes():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(forwarder.__file__))))
    proc = subprocess.Popen([sys.executable, "-S", "-I", "-c",
                             "import sys; sys.path.insert(0, sys.argv[1]); "
                             "from pyxenfb.zygote.forwarder import main; sys.exit(main(sys.argv[2:]))",
                             root, str(theirs.fileno()), "42", "pyqemu-dm", "--"],
                            pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE, text=True)
    theirs.close()
    ours.close()
    assert proc.wait(10) == 1
    assert "device model pid 42 died without an exit status" in proc.stderr.read()


def test_the_launcher_imports_nothing_heavy_before_the_zygote_answers(tmp_path):
    """`pyqemu-dm` (launch.py) asks the zygote with the standard library
    only; the cli, logging and dataclasses load only for a cold start."""
    code = ("import sys; from pyxenfb.zygote import launch, standin; "
            "standin.try_zygote = lambda argv, prefix: print(prefix, sorted("
            "{'pyxenfb.machine.cli', 'logging', 'dataclasses', 'numpy', 'json', 're', 'enum', "
            "'socket', 'signal'} & set(sys.modules))) or 0; "
            "sys.argv = ['pyqemu-dm', '-xen-domid', '7', '-vnc', ':1']; sys.exit(launch.main())")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(forwarder.__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pyqemu-dm[7] []"


@pytest.mark.parametrize("argv, prefix", [
    (["-xen-domid", "12", "-vnc", ":0"], "pyqemu-dm[12]"), (["-d", "3"], "pyqemu-dm[3]"),
    (["-d", "x"], "pyqemu-dm"), (["-M", "none"], "pyqemu-dm"), (["-d"], "pyqemu-dm"),
])
def test_launcher_log_prefix(argv, prefix):
    from pyxenfb.zygote.launch import log_prefix
    assert log_prefix(argv) == prefix


# ---- the wire (pyxenfb/zygote/wire.py) -------------------------------------------------

def _request(**change) -> bytes:
    fields = dict(argv=[b"pyqemu-dm", b"-name", b"g\xff=\0"[:-1], b""], env=[b"K=v", b"E=", b"Q=a=b"],
                  cwd=b"/root", umask=0o22, rlimits={"AS": (-1, -1), "STACK": (8 << 20, -1)},
                  fds=[0, 1, 2, 7])
    fields.update(change)
    return wire.encode_request(**fields)


def test_a_request_round_trips_as_bytes():
    request = wire.decode_request(_request(), 4)
    assert request.argv == [b"pyqemu-dm", b"-name", b"g\xff=", b""]
    assert request.env == {b"K": b"v", b"E": b"", b"Q": b"a=b"}
    assert (request.cwd, request.umask, request.fds) == (b"/root", 0o22, [0, 1, 2, 7])
    assert request.rlimits == {"AS": (-1, -1), "STACK": (8 << 20, -1)}
    assert wire.decode_request(_request(env=[b"K=1", b"K=2"]), 4).env == {b"K": b"1"}   # the first wins


def _patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    import struct
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]


_FIXED = wire.HEADER.size


@pytest.mark.parametrize("data, passed, why", [
    (b"", 4, "shorter than a header"),
    (b"JSON" + _request()[4:], 4, "not a zygote message"),
    (_patched(_request(), 4, "=H", 1), 4, "protocol version 1"),
    (_patched(_request(), 6, "=H", wire.EXIT), 4, "a exit message where a request belongs"),
    (_patched(_request(), 6, "=H", 99), 4, "unknown message kind"),
    (_request()[:wire.REQUEST_HEAD - 1], 4, "shorter than its fixed part"),
    (_request(argv=[]), 4, "argv must have 1..4096 entries, not 0"),
    (_request(argv=[b"a"] * 4097), 4, "not 4097"),
    (_request(), 3, "one per passed fd"),
    (_request(fds=[0, 0, 1, 2]), 4, "once each"),
    (_request(fds=[0, 1, 2, 1024]), 4, "once each"),
    (_request(fds=list(range(17))), 17, "one per passed fd"),
    (_request(umask=0o1000), 4, "umask"),
    (_patched(_request(), _FIXED + 16, "=I", 1 << 16), 4, "rlimit mask"),
    (_request(rlimits={"CPU": (-2, 5)}), 4, "bad rlimit CPU"),
    (_request() + b"x", 4, "its fields say"),
    (_request()[:-1], 4, "its fields say"),
    (_patched(_request(), _FIXED + 4, "=I", 2), 4, "each NUL-terminated"),    # envc 2 of 3
    (_request(cwd=b"relative"), 4, "absolute"),
    (_request(env=[b"NOEQUALS"]), 4, "NAME=VALUE"),
    (_request(env=[b"=value"]), 4, "NAME=VALUE"),
    (_request(argv=[b"x" * (wire.MAX_REQUEST // 2)]) + b"y" * (wire.MAX_REQUEST // 2), 4, "longer than"),
])
def test_the_zygote_refuses_a_bad_request_with_its_reason(data, passed, why):
    with pytest.raises(wire.WireError, match=re.escape(why)):
        wire.decode_request(data, passed)


def test_the_encoder_refuses_what_the_layout_cannot_carry():
    with pytest.raises(wire.WireError, match="exceeds 131072"):
        _request(argv=[b"x" * wire.MAX_REQUEST])
    with pytest.raises(wire.WireError, match="out of range"):
        _request(rlimits={"AS": (1 << 64, 0)})
    with pytest.raises(wire.WireError, match="out of range"):
        _request(umask=-1)


@pytest.mark.parametrize("data, value", [
    (wire.encode_pid(4242), (wire.PID, 4242)), (wire.encode_go(), (wire.GO, None)),
    (wire.encode_signal(15), (wire.SIGNAL, 15)), (wire.encode_exit(0), (wire.EXIT, 0)),
    (wire.encode_error("caf\u00e9 refused"), (wire.ERROR, "caf\u00e9 refused")),
    (wire.encode_error("x" * 9000), (wire.ERROR, "x" * wire.MAX_ERROR)),      # cut to fit
])
def test_the_small_messages_round_trip(data, value):
    assert wire.decode(data) == value


@pytest.mark.parametrize("data, why", [
    (wire.encode_pid(1), "pid 1 out of range"), (wire.encode_signal(0), "signal 0 out of range"),
    (wire.encode_signal(65), "out of range"), (wire.encode_exit(256), "exit 256 out of range"),
    (wire.encode_go() + b"\0", "go message with a body"), (wire.encode_pid(5)[:-1], "pid message of 11"),
    (wire.encode_error("abc")[:-1], "length other than"), (_request(), "request message"),
    (b"x" * 5000, "longer than 4096"), (b'{"pid": 5}', "not a zygote message"),
])
def test_every_other_message_is_checked(data, why):
    with pytest.raises(wire.WireError, match=re.escape(why)):
        wire.decode(data)


def test_the_decoders_never_fail_otherwise():
    from hypothesis import given, settings, strategies as st

    good = [_request(), wire.encode_pid(5), wire.encode_exit(3), wire.encode_error("no")]

    @settings(max_examples=2000, deadline=None)
    @given(st.sampled_from(good), st.integers(0, 400), st.binary(max_size=8), st.booleans())
    def check(base, at, junk, cut):
        data = base[:at] + junk + (b"" if cut else base[at + len(junk):])
        for decoder in (wire.decode, lambda d: wire.decode_request(d, 4)):
            try:
                decoder(data)
            except wire.WireError:
                pass
    check()


def test_the_wire_loads_nothing_but_struct():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); "
            "from pyxenfb.zygote import wire; "
            "print(sorted(m for m in set(sys.modules) - before if not m.startswith('pyxenfb')))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(wire.__file__))))
    out = subprocess.run([sys.executable, "-S", "-I", "-c", code, root], capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "['__future__', '_struct']", out
