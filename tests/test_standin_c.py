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
from pyxenfb.zygote import standin
from simkit import short_run_dir

C_STAND_IN = standin.C_STAND_IN
SOURCE = Path(standin.__file__).with_name("standin.c")


def test_the_c_stand_in_is_built_from_its_source():
    assert os.access(C_STAND_IN, os.X_OK), "scripts/setup builds pyxenfb/bin/pyqemu-dm"
    assert os.stat(C_STAND_IN).st_mtime >= SOURCE.stat().st_mtime, "stale: run scripts/setup"


def test_its_constants_are_standin_pys():
    defines = dict(re.findall(r"^#define (\w+) (.+?)\s*$", SOURCE.read_text(), re.M))
    assert int(defines["PROTOCOL"]) == standin.PROTOCOL
    assert json.loads(defines["DEFAULT_SOCKET"]) == standin.DEFAULT_SOCKET
    assert json.loads(defines["ENV_SOCKET"]) == standin.ENV
    assert int(defines["ANSWER_TIMEOUT_MS"]) == standin.ANSWER_TIMEOUT * 1000
    assert eval(defines["MAX_REQUEST"]) == standin.MAX_REQUEST
    for name in ("MAX_MESSAGE", "MAX_FDS", "MAX_FD_NUMBER"):
        assert int(defines[name]) == getattr(standin, name), name
    names = re.findall(r'\{"(\w+)", RLIMIT_\1\}', SOURCE.read_text())
    assert tuple(names) == standin.RLIMITS


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
            data, anc, _flags, _ = conn.recvmsg(standin.MAX_REQUEST + 1, socket.CMSG_SPACE(64 * 4))
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
        fake = FakeZygote(b'{"error": "test over"}', directory=directory)
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
    c_request, py_request = (json.loads(r) for r in requests)
    assert c_request["argv"][0] == C_STAND_IN
    c_request["argv"][0] = py_request["argv"][0]
    assert c_request == py_request
    assert requests[0].replace(json.dumps(C_STAND_IN).encode(), json.dumps("X").encode()) == requests[1]
    assert c_request["fds"] == [0, 1, 2, qmp_w]
    assert c_request["cwd"] == str(tmp_path)
    # the zygote reads it as these bytes' own environment (surrogateescape)
    assert {os.fsencode(k): os.fsencode(v) for k, v in c_request["env"].items()} == {
        **ODD_ENV, b"LC_ALL": b"C.UTF-8",
        b"PYXENFB_ZYGOTE": os.fsencode(c_request["env"]["PYXENFB_ZYGOTE"]),
        b"PYXENFB_PYTHON": b"/bin/true"}
    zygote.Request(c_request, [0, 1, 2, 3])        # raises RequestError if the zygote would refuse


def _cold_start_script(tmp_path) -> str:
    """Stands in for `python3 -m pyxenfb.machine.cli`: prints what it was given."""
    script = tmp_path / "fake-python"
    script.write_text('#!/bin/sh\necho "cold: $*"\necho "path: $PYTHONPATH"\n')
    script.chmod(0o755)
    return str(script)


def _slow(conn):
    conn.recv(100)          # never answers: the stand-in's 2 s bound ends it


@pytest.mark.parametrize("answer, then, line", [
    (b'{"error": "fork failed: no memory"}', None, "refused: fork failed: no memory"),
    (b'{"error": "caf\\u00e9 \\"x\\"\\n"}', None, 'refused: caf? "x"?'),
    (b"not json at all", None, "bad answer b'not json at all'"),
    (b'{"pid": 1}', None, "bad answer b'{\"pid\": 1}'"),
    (b'{"pid": -5}', None, "bad answer"),
    (b'{"pid": "12"}', None, "bad answer"),
    (b'{"pid": 99999999999999999999}', None, "bad answer"),
    (b'{"pid": 12} trailing', None, "bad answer"),
    (b'{"pid": 12, }', None, "bad answer"),
    (b'{"pid": tru}', None, "bad answer"),
    (b'{"pid": 12', None, "bad answer"),
    (b'{"' + b"\\" * 3000 + b'": 12}', None, "bad answer"),
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
            assert json.loads(ours.recv(4096)) == {"signal": sig}
        for bad in (b"nonsense", b'{"exit": 256}', b'{"exit": -1}', b'{"exit": "1"}', b"\x00\xff'\\",
                    b"z" * 5000):
            ours.send(bad)
        ours.send(b'{"exit" : 7 }')
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
