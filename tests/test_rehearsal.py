"""The zygote's rehearsal (pyxenfb/zygote/rehearsal.py), the launcher
(pyxenfb/zygote/launch.py), the stand-in's wire codec (pyxenfb/zygote/standin.py) and
its last form (pyxenfb/zygote/forwarder.py)."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest

from pyxenfb.zygote import forwarder, rehearsal
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


@pytest.mark.parametrize("message, code", [
    (b'{"exit": 0}', 0), (b'{"exit": 255}', 255), (b'{"exit":3}', 3),
    (b'{"exit": 256}', None), (b'{"exit": -1}', None), (b'{"exit": "1"}', None),
    (b'{"exit": 1.5}', None), (b'{"signal": 15}', None), (b'', None),
    (b'{"exit": 00000000001}', None), (b'\xff\xfe', None), (b'{"exit": 1}junk', None),
])
def test_forwarder_reads_only_an_exit_status(message, code):
    assert forwarder.exit_code(message) == code


def test_forwarder_forwards_signals_and_returns_the_status():
    """The slim stand-in as exec'd (a bare `python -S -I` importing only the
    forwarder): SIGTERM goes over the socket as {"signal": 15}; garbage is
    logged and ignored; {"exit": 7} ends it with status 7."""
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
        assert ours.recv(4096) == b'{"signal": 15}'
        ours.send(b"nonsense")
        ours.send(b'{"exit": 7}')
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


def test_the_stand_in_writes_json_as_json_dumps_does():
    import json
    from pyxenfb.zygote.standin import _dumps
    request = {"v": 1, "argv": ["pyqemu-dm", "-name", "gu\u00e9st \"q\" \\ \n\t\x01", "\U0001f600"],
               "env": {"K": "v", "UNDECODABLE": "\udcff\udcfe"}, "cwd": "/", "umask": 18,
               "rlimits": {"AS": [-1, 2 ** 64 - 1]}, "fds": [0, 1, 2], "flag": True, "none": None}
    assert _dumps(request) == json.dumps(request)
    with pytest.raises(TypeError):
        _dumps({"x": 1.5})


@pytest.mark.parametrize("text, obj", [
    ('{"pid": 123}', {"pid": 123}), ('{"go": true}', {"go": True}), ('{}', {}),
    ('{"error": "uid 5 \\"x\\" \\u00e9"}', {"error": 'uid 5 "x" \u00e9'}),
    ('{ "exit" : 0 , "a": null, "b": -7 }', {"exit": 0, "a": None, "b": -7}),
])
def test_the_stand_in_reads_flat_json_objects(text, obj):
    from pyxenfb.zygote.standin import _loads_flat
    assert _loads_flat(text) == obj


@pytest.mark.parametrize("text", [
    "", "{", "}", "[1]", '{"a": [1]}', '{"a": {"b": 1}}', '{"a": 1.5}', '{"a" 1}', '{"a": 1,}',
    "{a: 1}", '{"a": "x}', '{"a": 1} x', '{"a": 1 2}', '{"a": tru}', '{"a": ' + "9" * 30 + "}",
    '{"a": 1,, "b": 2}', '{"a"', "\x00" * 10, '{"\ud800": 1', "{" * 1000,
])
def test_the_stand_in_refuses_anything_else_with_a_value_error(text):
    from pyxenfb.zygote.standin import _loads_flat
    with pytest.raises(ValueError):
        _loads_flat(text)


def test_the_stand_in_parser_never_fails_otherwise():
    from hypothesis import given, settings, strategies as st

    from pyxenfb.zygote.standin import _loads_flat

    @settings(max_examples=2000, deadline=None)
    @given(st.text(alphabet=st.sampled_from('{}[]":,- \t\\0123456789aeflnrstu\u00e9'), max_size=60))
    def check(text):
        try:
            assert isinstance(_loads_flat(text), dict)
        except ValueError:
            pass
    check()
