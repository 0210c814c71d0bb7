"""pyqemu-dm's stand-in in C (pyxenfb/zygote/standin.c, built by scripts/setup into
pyxenfb/bin/pyqemu-dm): the same wire as the Python one (standin.py), byte
for byte, and every answer it may get from a socket checked.  The domain-level
checks (picture, keys, QMP, destroy, SIGTERM, kill -9) run through it in
tests/test_zygote.py."""
from __future__ import annotations

import array
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pyxenfb.zygote import server as zygote
from pyxenfb.zygote import standin, wire
from simkit import short_run_dir

C_STAND_IN = standin.C_STAND_IN
SOURCE = Path(standin.__file__).with_name("standin.c")


def test_the_c_stand_in_is_built_from_its_source():
    assert os.access(C_STAND_IN, os.X_OK), "scripts/setup builds pyxenfb/bin/pyqemu-dm"
    assert os.stat(C_STAND_IN).st_mtime >= SOURCE.stat().st_mtime, "stale: run scripts/setup"


def test_its_constants_are_wire_pys_and_standin_pys():
    defines = dict(re.findall(r"^#define (\w+) (.+?)\s*$", SOURCE.read_text(), re.M))
    assert int(defines["PROTOCOL"]) == wire.PROTOCOL
    assert json.loads(defines["WIRE_MAGIC"]).encode() == wire.MAGIC
    for kind, name in wire.KIND_NAMES.items():
        assert int(defines[f"KIND_{name.upper()}"]) == kind, name
    assert int(defines["HEADER_SIZE"]) == wire.HEADER.size
    assert int(defines["REQUEST_FIXED_SIZE"]) == wire.REQUEST_FIXED.size
    assert int(defines["RLIMIT_SIZE"]) == wire.RLIMIT.size
    assert int(defines["SMALL_SIZE"]) == wire.HEADER.size + wire.NUMBER.size == \
        wire.HEADER.size + wire.COUNT.size
    assert json.loads(defines["DEFAULT_SOCKET"]) == standin.DEFAULT_SOCKET
    assert json.loads(defines["ENV_SOCKET"]) == standin.ENV
    assert int(defines["ANSWER_TIMEOUT_MS"]) == standin.ANSWER_TIMEOUT * 1000
    assert eval(defines["MAX_REQUEST"]) == wire.MAX_REQUEST
    for name in ("MAX_MESSAGE", "MAX_FDS", "MAX_FD_NUMBER", "MAX_ARGS"):
        assert int(defines[name]) == getattr(wire, name), name
    names = re.findall(r'\{"(\w+)", RLIMIT_\1\}', SOURCE.read_text())
    assert tuple(names) == wire.RLIMITS


class FakeZygote:
    """A listening socket that takes one request (bytes and fds) and answers
    with whatever the test says: the stand-in's peer, hostile on purpose."""

    def __init__(self, answer: bytes | None, then=None, directory: str | None = None):
        self.dir, self.own_dir = directory or short_run_dir(), directory is None
        self.path = os.path.join(self.dir, "z.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.answer, self.then = answer, then
        self.request: bytes | None = None
        self.fds: list[int] = []            # the numbers received (closed at once)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(20)
        conn, _ = self.listener.accept()
        with conn:
            data, anc, _flags, _ = conn.recvmsg(wire.MAX_REQUEST + 1, socket.CMSG_SPACE(64 * 4))
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
                    self.fds.extend(fds)
                    for fd in fds:          # the caller's pipes: held, its output never ends
                        os.close(fd)
            self.request = data
            if self.answer is not None:
                conn.send(self.answer)
            if self.then is not None:
                self.then(conn)

    def close(self) -> None:
        self.thread.join(30)
        self.listener.close()
        os.unlink(self.path)
        if self.own_dir:
            os.rmdir(self.dir)


# Hostile-looking but legal environment bytes: every one must reach the child as it was.
ODD_ENV = {b"PLAIN": b"value", b"QUOTES": b'say "hi" \\ back\\', b"CTRL": b"a\tb\nc\x01\x7f",
           b"UTF8": "d\u00e9j\u00e0 \u20ac \U0001f600".encode(), b"BAD_UTF8": b"\xff\xc3(\xed\xa0\x80\xf4\x90",
           b"EMPTY": b"", b"N\xe9ME": b"x"}


def _run(argv: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=30, **kw)


def test_its_request_is_the_python_stand_ins_byte_for_byte(tmp_path):
    """The same argv, environment, cwd, umask, rlimits and fds from both
    stand-ins; the zygote's own request check accepts it."""
    qmp_r, qmp_w = os.pipe()
    argv = ["-xen-domid", "5", "-chardev", f"socket,id=libxl-cmd,fd={qmp_w},server=on",
            "-vnc", "127.0.0.1:0", "ünïcode", "fd=999999999999"]
    requests, directory = [], short_run_dir()        # the same socket path for both
    for program in ([C_STAND_IN], [sys.executable, "-S", "-c",
                                   "import sys; sys.path.insert(0, sys.argv[1]); "
                                   "from pyxenfb.zygote.standin import try_zygote; "
                                   "sys.argv = ['X', *sys.argv[2:]]; "
                                   "sys.exit(try_zygote(sys.argv[1:], 'pyqemu-dm[5]') or 3)",
                                   str(Path(standin.__file__).parents[2])]):
        fake = FakeZygote(wire.encode_error("test over"), directory=directory)
        # LC_ALL set: no locale coercion (PEP 538) adding LC_CTYPE to Python's environment
        env = {**ODD_ENV, b"LC_ALL": b"C.UTF-8", b"PYXENFB_ZYGOTE": fake.path.encode(),
               b"PYXENFB_PYTHON": b"/bin/true"}
        try:
            # argv[0] differs by nature (the program); the same for both here
            done = _run([*program, *argv], env, pass_fds=(qmp_w,), cwd=tmp_path)
        finally:
            fake.close()
        assert b"refused: test over; cold start" in done.stderr, done.stderr
        assert len(fake.fds) == 4                     # 0, 1, 2 and the QMP socket
        requests.append(fake.request)
    os.close(qmp_r)
    os.close(qmp_w)
    os.rmdir(directory)
    c_request, py_request = (wire.decode_request(r, 4) for r in requests)
    assert c_request.argv[0] == os.fsencode(C_STAND_IN)
    assert py_request.argv[0] == b"X"
    # byte for byte, once the program's name is the same
    assert _encode(c_request, argv0=b"X") == requests[1]
    assert _encode(c_request) == requests[0]
    assert c_request.argv[1:] == [a.encode() for a in argv]
    assert c_request.fds == [0, 1, 2, qmp_w]
    assert c_request.cwd == os.fsencode(tmp_path)
    # the zygote gets these bytes' own environment
    assert c_request.env == {**ODD_ENV, b"LC_ALL": b"C.UTF-8",
                             b"PYXENFB_ZYGOTE": c_request.env[b"PYXENFB_ZYGOTE"],
                             b"PYXENFB_PYTHON": b"/bin/true"}
    zygote.Request(c_request, [0, 1, 2, 3])


def _encode(request: wire.Request, argv0: bytes | None = None) -> bytes:
    argv = [argv0, *request.argv[1:]] if argv0 is not None else request.argv
    return wire.encode_request(argv, [k + b"=" + v for k, v in request.env.items()], request.cwd,
                               request.umask, request.rlimits, request.fds)


# The Python launcher with the C one's argv[0]: then the two requests are the same bytes.
PY_LAUNCHER = [sys.executable, "-S", "-c",
               "import sys; sys.path.insert(0, sys.argv[1]); "
               "from pyxenfb.zygote.standin import try_zygote; "
               "sys.argv = sys.argv[2:]; "
               "sys.exit(try_zygote(sys.argv[1:], 'pyqemu-dm') or 3)",
               str(Path(standin.__file__).parents[2]), C_STAND_IN]

HOSTILE = {
    "empty strings": ([b"", b"-name", b""], {b"EMPTY": b"", b"E2": b""}),
    "non-UTF-8": ([b"\xff\xfe", b"\xc3(", b"\xed\xa0\x80"], {b"K\xff": b"\x80\x81", b"V": b"\xf4\x90"}),
    "'=' in values": ([b"a=b", b"=", b"=="], {b"EQ": b"=", b"EQ2": b"a=b=c", b"EQ3": b"=="}),
    "long values": ([b"x" * 30_000], {b"LONG": b"y" * 60_000}),
    "many entries": ([b"-a"] * 2000, {b"E%d" % i: b"%d" % i for i in range(3000)}),
    "too many args": ([b"a"] * wire.MAX_ARGS, {}),
    "too long": ([b"z" * 70_000], {b"BIG": b"w" * 70_000}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_both_launchers_encode_hostile_argv_and_env_alike(tmp_path, case):
    """The same bytes from C and Python for a hostile argv and environment,
    and the zygote's decoder takes or refuses both with the same reason."""
    args, extra = HOSTILE[case]
    requests, lines, directory = [], [], short_run_dir()
    for program in ([C_STAND_IN], PY_LAUNCHER):
        fake = FakeZygote(None if case == "too long" else wire.encode_error("test over"),
                          directory=directory)
        env = {b"LC_ALL": b"C.UTF-8", b"PYXENFB_ZYGOTE": fake.path.encode(),
               b"PYXENFB_PYTHON": b"/bin/true", **extra}
        try:
            done = _run([*program, *args], env, cwd=tmp_path)
        finally:
            fake.close()
        requests.append(fake.request)
        lines.append(done.stderr.decode(errors="replace"))
    os.rmdir(directory)
    if case == "too long":
        for line in lines:              # neither sends it: one line each, a cold start
            assert re.fullmatch(r"pyqemu-dm: zygote: request (of \d+ bytes )?exceeds 131072( bytes)?; "
                                r"cold start\n", line), line
        assert requests == [b"", b""]
        return
    assert all("pyqemu-dm: zygote: " in line and "refused: test over; cold start" in line
               for line in lines), lines
    assert requests[0] == requests[1]               # byte for byte
    try:
        request = wire.decode_request(requests[0], 3)
    except wire.WireError as e:
        assert case == "too many args"
        assert str(e) == f"argv must have 1..{wire.MAX_ARGS} entries, not {wire.MAX_ARGS + 1}"
        return
    assert case != "too many args"
    assert request.argv == [os.fsencode(C_STAND_IN), *args]
    assert request.cwd == os.fsencode(tmp_path)
    for name, value in extra.items():
        assert request.env[name] == value
    assert _encode(request) == requests[0]


def _cold_start_script(tmp_path) -> str:
    """Stands in for `python3 -m pyxenfb.machine.cli`: prints what it was given."""
    script = tmp_path / "fake-python"
    script.write_text('#!/bin/sh\necho "cold: $*"\necho "path: $PYTHONPATH"\n')
    script.chmod(0o755)
    return str(script)


def _slow(conn):
    conn.recv(100)          # never answers: the stand-in's 2 s bound ends it


_GOOD_PID = wire.encode_pid(12)


@pytest.mark.parametrize("answer, then, line", [
    (wire.encode_error("fork failed: no memory"), None, "refused: fork failed: no memory"),
    (wire.encode_error('caf\u00e9 "x"\n'), None, 'refused: caf? "x"?'),
    (b"not a message at all", None, "bad answer b'not a message at all'"),
    (wire.encode_pid(1), None, "bad answer b'PXZG"),
    (wire.encode_pid(-5), None, "bad answer"),
    (wire.encode_exit(12), None, "bad answer"),                      # the wrong kind
    (wire.encode_go(), None, "bad answer"),
    (_GOOD_PID + b"x", None, "bad answer"),                         # trailing
    (_GOOD_PID[:-1], None, "bad answer"),                           # short
    (b"XXXX" + _GOOD_PID[4:], None, "bad answer b'XXXX"),            # magic
    (_GOOD_PID[:4] + b"\x01\x00" + _GOOD_PID[6:], None, "bad answer"),  # protocol 1
    (_GOOD_PID[:6] + b"\x63\x00" + _GOOD_PID[8:], None, "bad answer"),  # no such kind
    (wire.encode_error("x")[:-1], None, "bad answer"),               # text shorter than its count
    (wire.encode_error("x") + b"y", None, "bad answer"),
    (b"x" * 5000, None, "message longer than 4096 bytes"),
    (None, None, "closed the connection without an answer"),
    (None, _slow, "did not answer within 2 s"),
])
def test_every_bad_answer_is_one_line_and_a_cold_start(tmp_path, answer, then, line):
    fake = FakeZygote(answer, then)
    env = {"PYXENFB_ZYGOTE": fake.path, "PYXENFB_PYTHON": _cold_start_script(tmp_path),
           "PYTHONPATH": "/elsewhere"}
    try:
        done = _run([C_STAND_IN, "-d", "007", "-vnc", ":1"], env, text=True)
    finally:
        fake.close()
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("pyqemu-dm[7]: zygote: ")
    assert line in done.stderr and done.stderr.endswith("; cold start\n"), done.stderr
    root = str(Path(standin.__file__).parents[2])
    assert done.stdout == f"cold: -m pyxenfb.machine.cli -d 007 -vnc :1\npath: {root}:/elsewhere\n"


def test_no_zygote_is_a_cold_start_silent_only_at_the_default_path(tmp_path):
    fake_python = _cold_start_script(tmp_path)
    quiet = _run([C_STAND_IN, "-version"], {"PYXENFB_PYTHON": fake_python}, text=True)
    off = _run([C_STAND_IN, "-version"], {"PYXENFB_PYTHON": fake_python, "PYXENFB_ZYGOTE": "off"},
               text=True)
    missing = _run([C_STAND_IN, "-version"], {"PYXENFB_PYTHON": fake_python,
                                              "PYXENFB_ZYGOTE": str(tmp_path / "none.sock")}, text=True)
    if not os.path.exists(standin.DEFAULT_SOCKET):
        assert quiet.stderr == ""
    assert off.stderr == ""
    assert missing.stderr == f"pyqemu-dm: zygote: no zygote at {tmp_path}/none.sock; cold start\n"
    for done in (quiet, off, missing):
        assert done.returncode == 0 and done.stdout.startswith("cold: -m pyxenfb.machine.cli -version\n")
    gone = _run([C_STAND_IN, "-version"], {"PYXENFB_PYTHON": str(tmp_path / "no-python"),
                                           "PYXENFB_ZYGOTE": "off"}, text=True)
    assert gone.returncode == 1
    assert gone.stderr == f"pyqemu-dm: cannot start {tmp_path}/no-python for a cold start: " \
                          "No such file or directory\n"


def _forward() -> tuple[subprocess.Popen, socket.socket]:
    """As standin.py execs it: the forwarded signals blocked across the exec."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([C_STAND_IN, "--forward", str(theirs.fileno()), "42", "pyqemu-dm[3]",
                             "--", "/usr/bin/pyqemu-dm", "-d", "3"], pass_fds=(theirs.fileno(),),
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, (
                                signal.SIGTERM, signal.SIGINT, signal.SIGHUP)))
    theirs.close()
    return proc, ours


def test_forward_mode_forwards_signals_ignores_garbage_and_returns_the_status():
    proc, ours = _forward()
    try:
        ours.settimeout(10)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            proc.send_signal(sig)
            assert ours.recv(4096) == wire.encode_signal(sig)
        for bad in (b"nonsense", wire.encode_exit(256), wire.encode_exit(-1), wire.encode_pid(7),
                    b"\x00\xff'\\", b"z" * 5000):
            ours.send(bad)
        ours.send(wire.encode_exit(7))
        assert proc.wait(10) == 7
        err = proc.stderr.read()
        assert "pyqemu-dm[3]: zygote child 42: bad message b'nonsense'; ignored" in err
        assert "bad message b'\\x00\\xff\\'\\\\'; ignored" in err
        assert "bad message b'" + "z" * 40 + "'; ignored" in err
        assert err.count("ignored") == 6
    finally:
        proc.kill()
        proc.wait()
        ours.close()


def test_forward_mode_exits_1_when_the_child_goes_without_a_status():
    proc, ours = _forward()
    ours.close()
    assert proc.wait(10) == 1
    assert proc.stderr.read() == ("pyqemu-dm[3]: device model pid 42 died without an exit status "
                                  "(killed by a signal?)\n")


def test_forward_mode_refuses_a_bad_fd():
    done = _run([C_STAND_IN, "--forward", "x", "42", "p", "--"], {}, text=True)
    assert done.returncode == 2 and done.stderr == "p: --forward: bad fd x\n"


@pytest.mark.parametrize("which", ["c", "python"])
def test_a_vanished_working_directory_is_a_cold_start_with_one_line(tmp_path, which):
    """Both launchers: getcwd() fails (the directory was removed under it)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    fake = FakeZygote(None)          # connected to, then left without a request
    program = [C_STAND_IN] if which == "c" else [sys.executable, "-m", "pyxenfb"]
    env = {"PYXENFB_ZYGOTE": fake.path, "PYXENFB_PYTHON": _cold_start_script(tmp_path),
           "PYTHONPATH": str(Path(standin.__file__).parents[2]), "PATH": os.environ["PATH"]}
    try:
        done = subprocess.run(program + ["-version"], env=env, cwd=gone, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60,
                              preexec_fn=lambda: os.rmdir(os.getcwd()))
    finally:
        fake.close()
    assert fake.request == b""
    assert "pyqemu-dm: zygote: cannot read the working directory; cold start\n" in done.stderr
    assert done.stderr.count("zygote:") == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_an_environment_too_big_for_one_request_is_a_cold_start(tmp_path):
    fake = FakeZygote(None)
    env = {"PYXENFB_ZYGOTE": fake.path, "PYXENFB_PYTHON": _cold_start_script(tmp_path),
           **{f"BIG{i}": "x" * 60_000 for i in range(3)}}     # one string may not pass 128 KiB
    try:
        done = _run([C_STAND_IN, "-version"], env, text=True)
    finally:
        fake.close()
    assert done.stderr == "pyqemu-dm: zygote: request exceeds 131072 bytes; cold start\n"
    assert done.stdout.startswith("cold: -m pyxenfb.machine.cli -version\n")


# ---- which interpreter a cold start runs -------------------------------------------------

def _fake_python(path: Path, record: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "$0 $*" > {record}\n')
    path.chmod(0o755)


def _cold_start(launcher: Path, record: Path, **env: str) -> str:
    record.unlink(missing_ok=True)
    base = {"PATH": os.environ["PATH"], "PYXENFB_ZYGOTE": "off"}
    done = subprocess.run([str(launcher), "-d", "5"], env={**base, **env}, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return record.read_text().strip()


def test_a_cold_start_runs_the_interpreter_of_the_venv_it_is_installed_in():
    """A wheel's launcher (pipx) can't have its interpreter compiled in: it
    finds VENV/bin/python from its own path; -DPYTHON and $PYXENFB_PYTHON
    still come first, and outside a venv it is python3 from PATH."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pyxfb-venv-") as tmp:
        tmp = Path(tmp)
        venv, record = tmp / "venv", tmp / "ran"
        launcher = venv / "lib" / "python3.11" / "site-packages" / "pyxenfb" / "bin" / "pyqemu-dm"
        launcher.parent.mkdir(parents=True)
        (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
        _fake_python(venv / "bin" / "python", record)
        _fake_python(tmp / "path" / "python3", record)
        _fake_python(tmp / "other" / "python", record)
        path = f"{tmp / 'path'}:{os.environ['PATH']}"

        def build(*defines: str) -> None:
            subprocess.run(["cc", "-O2", *defines, "-o", str(launcher), str(SOURCE)], check=True)

        build()
        assert _cold_start(launcher, record, PATH=path) == f"{venv}/bin/python -m pyxenfb.machine.cli -d 5"
        assert _cold_start(launcher, record, PATH=path, PYXENFB_PYTHON=str(tmp / "other" / "python")) \
            == f"{tmp}/other/python -m pyxenfb.machine.cli -d 5"
        (venv / "pyvenv.cfg").unlink()              # not a venv: python3 from PATH, as before
        assert _cold_start(launcher, record, PATH=path) == f"{tmp}/path/python3 -m pyxenfb.machine.cli -d 5"
        (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
        build(f'-DPYTHON="{tmp}/other/python"')     # scripts/setup's and the package's way
        assert _cold_start(launcher, record, PATH=path) == f"{tmp}/other/python -m pyxenfb.machine.cli -d 5"
