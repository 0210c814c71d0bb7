"""A warm fork-server behind `pyqemu-dm` (issue 16, docs/zygote.md).

`pyxenfb-zygote` imports everything a device model needs once, freezes its
heap and, single-threaded, listens on a unix socket.  `pyqemu-dm`, as the
toolstack execs it, asks the zygote first (`standin.try_zygote`, from
launch.py, before anything heavy is imported): it sends its argv, environment, cwd, umask and rlimits with its
fds 0-2 and any `fd=N` QMP socket (SCM_RIGHTS).  The zygote forks (once; it
reaps its children on SIGCHLD) a child that puts those fds back at the same
numbers, joins the exec'd process's mount and IPC namespaces, takes its
rlimits and runs `cli.main(argv)` as a cold start would.  The exec'd process
stays as a thin stand-in whose pid the toolstack knows: it forwards
SIGTERM/SIGINT/SIGHUP, exits with the child's status, and when it is
SIGKILLed the child sees the control socket close and exits at once.

Wire (wire.py: SOCK_SEQPACKET, one fixed binary layout per message, each bounded):
  stand-in -> zygote   REQUEST (argv, env, cwd, umask, rlimits, fd numbers) + SCM_RIGHTS
  zygote   -> stand-in ERROR (refused; the stand-in starts cold)
  child    -> stand-in PID                stand-in -> child GO
  stand-in -> child    SIGNAL             child -> stand-in EXIT

This module imports only the standard library at the top: the stand-in must
stay small and start fast.
"""
from __future__ import annotations

import array
import fcntl
import os
import resource     # a child applies its stand-in's rlimits: loaded here, shared
import signal
import socket
import struct
import sys
import time


from .forwarder import FORWARDED
from . import wire
from .standin import (ANSWER_TIMEOUT, CLONE_NEWIPC, CLONE_NEWNS, DEFAULT_SOCKET, MAX_PENDING, NAMESPACES,
                      REQUEST_TIMEOUT, _ns_inode, _recv, _rlimit_number)
from .wire import MAX_FDS, MAX_REQUEST, WireError
from ..machine import supervisor


# ---- the zygote ------------------------------------------------------------------------

class RequestError(Exception):
    """A peer's request refused; str() is one line sent back to it."""


class Request:
    """A request the zygote accepted: wire.decode_request's, with the fds
    received here and the peer's pid."""

    def __init__(self, decoded: wire.Request, fds: list[int]):
        self.argv = [os.fsdecode(a) for a in decoded.argv]     # as sys.argv has them
        self.env, self.cwd, self.umask = decoded.env, decoded.cwd, decoded.umask
        self.peer: int | None = None          # the stand-in's pid (SO_PEERCRED)
        self.rlimits = decoded.rlimits
        self.fds = dict(zip(decoded.fds, fds))     # target number -> fd received here


def _peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i")))


class Zygote:
    def __init__(self, path: str, log=None):
        self.path = path
        self.log = log or (lambda msg: print(f"pyxenfb-zygote: {msg}", file=sys.stderr, flush=True))
        self.listener: socket.socket | None = None
        self.selector = None
        self.pending: dict[int, tuple[socket.socket, float, int]] = {}   # fd -> (conn, deadline, pid)
        self.wake_r = self.wake_w = -1
        self.stopping = False
        self.served = 0
        self.inherited = False          # the socket came from systemd: its path is not ours to remove

    # -- start-up --
    @staticmethod
    def warm() -> None:
        """Everything a device model imports or loads lazily, once, here."""
        import numpy  # noqa: F401
        from .. import convert, evtchn, machine_pv, vnc, xenfb  # noqa: F401
        from ..console import core, keymap  # noqa: F401
        from ..devices import xenfb_abi  # noqa: F401
        from ..machine import cli, qmp, restrict  # noqa: F401
        from ..platform import foreignmem, host, xenstore, xs_wire  # noqa: F401
        from ..util import logbudget, region  # noqa: F401
        from ..rfb import auth, encodings, listener, protocol, server, tls, websocket  # noqa: F401
        # PIL plugins, pixman, the encoders' kernel, JPEG/PNG, DES.  Not
        # OpenSSL nor the WebSocket library: few device models have TLS or a
        # WebSocket port, and those load them in their own pages.
        restrict.preload()
        # en-us, the default; a child with another -k loads its own layout
        # (~16 kB) at its start, before any chroot: all 38 here cost 0.6 MB.
        keymap.Keymap.load(keymap.DEFAULT_LAYOUT)
        try:
            from ..platform import _xen_ffi  # noqa: F401  (the real hypervisor's cffi module)
        except ImportError:
            pass

    def adopt(self, fd: int) -> None:
        """Listen on a socket passed by systemd (socket activation) instead of binding."""
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            sock.detach()
            raise OSError(f"fd {fd} from systemd is not a unix SOCK_SEQPACKET socket "
                          "(ListenSequentialPacket= in the .socket unit)")
        os.set_inheritable(fd, False)       # the children's execs must not keep it
        sock.setblocking(False)
        self.listener = sock
        self.inherited = True
        try:
            self.path = sock.getsockname() or self.path
        except OSError:
            pass

    def bind(self) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            pass                            # none, or a dead zygote's socket
        else:
            raise OSError(f"another zygote answers on {self.path}")
        finally:
            probe.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)               # 0600 from the start: no window for other users
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        self.listener = sock

    def serve(self) -> int:
        import selectors
        threads = os.listdir("/proc/self/task")
        if len(threads) != 1:
            # fork() would copy locks held by threads the child doesn't have
            self.log(f"refusing to serve: {len(threads)} threads (a library started one; "
                     "is OPENBLAS_NUM_THREADS=1 set?)")
            return 1
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        for sig in FORWARDED:
            signal.signal(sig, self._stop)
        # A handler (doing nothing) so that a child's exit writes to the wake-up pipe.
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        while not self.stopping:
            now = time.monotonic()
            timeout = min((d for _c, d, _p in self.pending.values()), default=None)
            events = self.selector.select(None if timeout is None else max(0.0, timeout - now))
            for key, _mask in events:
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    try:
                        os.read(self.wake_r, 64)
                    except BlockingIOError:
                        pass
                    self._reap()
                elif key.fd in self.pending:
                    try:
                        self._request(key.fd)
                    except Exception as e:      # a bug must cost one request, not the zygote
                        self.log(f"request failed: {type(e).__name__}: {e}")
                        if key.fd in self.pending:
                            self._drop(key.fd).close()
            now = time.monotonic()
            for fd, (conn, deadline, pid) in list(self.pending.items()):
                if deadline <= now:
                    self._refuse(fd, f"no request within {REQUEST_TIMEOUT:g} s")
        self.close()
        return 0

    def _stop(self, signum, _frame) -> None:
        self.stopping = True

    def close(self) -> None:
        for fd in list(self.pending):
            self._drop(fd)
        if self.selector is not None:
            self.selector.close()
            self.selector = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if not self.inherited:          # systemd's socket stays for the next activation
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass

    # -- connections --
    def _accept(self) -> None:
        import selectors
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.log(f"accept: {e.strerror or e}")
                return
            pid, uid, _gid = _peer_cred(conn)
            if uid not in (0, os.geteuid()):
                self.log(f"refused pid {pid}: uid {uid} is not root")
                try:
                    conn.send(wire.encode_error(f"uid {uid} may not use this zygote (root only)"))
                except OSError:
                    pass
                conn.close()
                continue
            if len(self.pending) >= MAX_PENDING:
                try:
                    conn.send(wire.encode_error("too many pending requests"))
                except OSError:
                    pass
                conn.close()
                continue
            conn.setblocking(False)
            self.pending[conn.fileno()] = (conn, time.monotonic() + REQUEST_TIMEOUT, pid)
            self.selector.register(conn, selectors.EVENT_READ, "request")

    def _drop(self, fd: int) -> socket.socket:
        conn, _deadline, _pid = self.pending.pop(fd)
        self.selector.unregister(conn)
        return conn

    def _refuse(self, fd: int, reason: str) -> None:
        conn = self._drop(fd)
        self.log(f"refused a request: {reason}")
        try:
            conn.send(wire.encode_error(reason))
        except OSError:
            pass
        conn.close()

    def _request(self, fd: int) -> None:
        conn, _deadline, peer = self.pending[fd]
        fds: list[int] = []
        try:
            data, anc, flags, _ = conn.recvmsg(MAX_REQUEST + 1, socket.CMSG_SPACE(MAX_FDS * 4))
        except BlockingIOError:
            return
        except OSError as e:
            self._refuse(fd, f"receive failed: {e.strerror or e}")
            return
        try:
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(blob[:len(blob) - len(blob) % got.itemsize])
                    fds.extend(got)
            if not data:
                raise RequestError("closed before sending a request")
            if flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
                raise RequestError(f"more than {MAX_FDS} file descriptors")
            if flags & socket.MSG_TRUNC or len(data) > MAX_REQUEST:
                raise RequestError(f"request longer than {MAX_REQUEST} bytes")
            try:
                request = Request(wire.decode_request(data, len(fds)), fds)
            except WireError as e:
                raise RequestError(str(e)) from None
            request.peer = peer
            ns = self._open_namespaces(peer)
        except RequestError as e:
            for f in fds:
                os.close(f)
            self._refuse(fd, str(e))
            return
        self._drop(fd)
        try:
            self._fork(conn, request, ns)
        except OSError as e:                # EAGAIN, ENOMEM: this request fails, the zygote serves on
            self.log(f"fork failed: {e.strerror or e}")
            try:
                conn.send(wire.encode_error(f"fork failed: {e.strerror or e}"))
            except OSError:
                pass
        finally:
            for f in fds + [f for f in ns.values()]:
                os.close(f)
            conn.close()

    def _open_namespaces(self, peer: int) -> dict[str, int]:
        """The peer's mount/IPC namespaces where they differ from ours (libxl's
        dm_restrict unshares them before exec): the child joins them."""
        out = {}
        for ns in NAMESPACES:
            try:
                if _ns_inode(peer, ns) == _ns_inode("self", ns):
                    continue
                out[ns] = os.open(f"/proc/{peer}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                for f in out.values():
                    os.close(f)
                raise RequestError(f"cannot read the {ns} namespace of pid {peer}: "
                                   f"{e.strerror or e}") from None
        return out

    def _fork(self, conn: socket.socket, request: Request, ns: dict[str, int]) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()                  # or the child would write our buffer again
        # One fork: under an emulated dom0 each fork of this ~45 MB process costs
        # tens of ms on the way to `running`.  The zygote reaps its children
        # (SIGCHLD, _reap); when it stops they are reparented and run on.
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()                 # not in the zygote's session or process group
                self._become(conn, request, ns)
            except BaseException as e:
                try:
                    os.write(2, f"pyxenfb-zygote: child failed to start: {e}\n".encode())
                finally:
                    os._exit(127)
            os._exit(127)
        self.served += 1

    def _reap(self) -> None:
        """Collect every child that has exited (their status went to their stand-ins)."""
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    # -- in the child --
    def _become(self, conn: socket.socket, request: Request, ns: dict[str, int]) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (*FORWARDED, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)   # as a fresh interpreter has it
        os.close(self.wake_r)
        os.close(self.wake_w)
        # The epoll instance is shared with the zygote across fork: unregistering
        # here would take the zygote's other pending requests out of its own
        # wait set (it then never read them, and closing them later reset the
        # stand-ins: seen with three domains created at once).  Closing this
        # process's copies of the fds leaves the zygote's registrations alone.
        for other in list(self.pending):
            self.pending.pop(other)[0].close()
        self.selector.close()
        self.listener.close()
        for kind, fd in ns.items():       # before the fds move: a passed fd may take their numbers
            _setns(fd, CLONE_NEWNS if kind == "mnt" else CLONE_NEWIPC)
            os.close(fd)
        conn = self._place_fds(conn, request.fds)
        for name, (soft, hard) in request.rlimits.items():
            number = _rlimit_number(name)
            limits = tuple(resource.RLIM_INFINITY if v == -1 else v for v in (soft, hard))
            try:
                resource.setrlimit(number, limits)
            except (ValueError, OSError) as e:
                raise OSError(f"cannot apply the stand-in's RLIMIT_{name} {limits}: {e}") from None
        _set_comm(os.path.basename(request.argv[0]))     # `ps -C pyqemu-dm` finds it as a cold one
        os.umask(request.umask)
        os.chdir(request.cwd)
        os.environ.clear()
        os.environb.update(request.env)     # the stand-in's bytes, as its exec had them
        sys.argv = list(request.argv)
        import logging
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)     # the zygote's; the DM sets up its own
        root.setLevel(logging.WARNING)
        conn.send(wire.encode_pid(os.getpid()))
        conn.settimeout(ANSWER_TIMEOUT)
        try:
            go = _recv(conn)
        except (OSError, WireError):
            go = None
        if go is None or go[0] != wire.GO:
            os._exit(0)                     # the stand-in gave up and starts cold: not ours
        conn.settimeout(None)
        supervisor.register(StandInLink(conn, request.peer))    # the machine's hook
        code = 1
        try:
            from ..machine.cli import main
            code = main(request.argv[1:])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            code = code if isinstance(code, int) and 0 <= code <= 255 else 1
            try:
                conn.send(wire.encode_exit(code))
            except OSError:
                pass
            _exit_now(code)

    @staticmethod
    def _place_fds(conn: socket.socket, fds: dict[int, int]) -> socket.socket:
        """The received fds at their numbers in the stand-in (0-2 closed where
        the stand-in had them closed); returns the control socket, moved
        above every number a passed fd may take."""
        top = max([*fds, *fds.values(), conn.fileno()]) + 1     # above every number in play
        control = socket.socket(fileno=_dup_at_least(conn.fileno(), top))
        conn.close()
        moved = {target: _dup_at_least(fd, top) for target, fd in fds.items()}
        for fd in fds.values():
            os.close(fd)
        # Nothing else the zygote holds (or inherited) belongs to this domain:
        # a cold start has exactly what its exec'er passed.
        low = 0
        for keep in sorted([*moved.values(), control.fileno()]):
            os.closerange(low, keep)
            low = keep + 1
        os.closerange(low, 1 << 30)
        for target, fd in moved.items():
            os.dup2(fd, target, inheritable=True)
            os.close(fd)
        return control


class StandInLink(supervisor.Supervisor):
    """In a zygote child: the connection to its stand-in, the process the
    toolstack exec'd (exec -> running is timed from its exec)."""

    def __init__(self, control: socket.socket, stand_in_pid: int | None):
        self.control = control
        self.stand_in_pid = stand_in_pid

    def exec_pid(self) -> int | str:
        return self.stand_in_pid or "self"

    def watch(self, loop, on_lost=None) -> None:
        """A forwarded signal is raised here; the stand-in's death (xl destroy
        SIGKILLs it) ends this process at once, as the SIGKILL would have
        ended a cold device model: a graceful shutdown would still write to
        XenStore while the toolstack removes the domain's nodes."""
        sock = self.control
        sock.setblocking(False)

        def readable() -> None:
            try:
                msg = _recv(sock)
            except BlockingIOError:
                return
            except WireError:
                return                      # garbage from our own stand-in: ignored
            except OSError:
                msg = None
            if msg is None:
                if on_lost is not None:
                    on_lost()
                _exit_now(1)
            kind, sig = msg
            if kind == wire.SIGNAL and sig in FORWARDED:
                signal.raise_signal(sig)
        loop.add_reader(sock.fileno(), readable)


def _exit_now(code: int) -> None:
    import logging
    logging.shutdown()                      # flush the log lines written so far
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _dup_at_least(fd: int, low: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)


def _set_comm(name: str) -> None:
    # prctl(PR_SET_NAME) through its file: no ctypes in the child (a CDLL
    # object and its function classes, built there, would copy pages).
    with open("/proc/self/comm", "wb") as comm:
        comm.write(name.encode(errors="replace")[:15])


def _setns(fd: int, nstype: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


SD_LISTEN_FDS_START = 3


def listen_fds() -> list[int]:
    """The sockets systemd passed (sd_listen_fds(3): LISTEN_PID, LISTEN_FDS from fd 3).

    The variables are removed either way, so that nothing this process starts
    takes them for its own."""
    pid, count = os.environ.pop("LISTEN_PID", None), os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None or not pid.isdigit() or int(pid) != os.getpid():
        return []
    if not count.isdigit():
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))


def main(argv: list[str] | None = None) -> int:
    """`pyxenfb-zygote [--socket PATH]`: warm up, then serve until SIGTERM."""
    # Before numpy: OpenBLAS would start threads at import, and a process
    # with threads must not fork.
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import argparse
    ap = argparse.ArgumentParser(prog="pyxenfb-zygote", description=main.__doc__.split(":")[0])
    ap.add_argument("--socket", default=DEFAULT_SOCKET,
                    help=f"unix socket to listen on (default {DEFAULT_SOCKET}); a socket "
                         "passed by systemd (LISTEN_FDS, a .socket unit) is used instead")
    args = ap.parse_args(argv)
    passed = listen_fds()
    zygote = Zygote(args.socket)
    if len(passed) > 1:
        zygote.log(f"systemd passed {len(passed)} sockets; expected one")
        return 1
    started = time.monotonic()
    from ..util.malloc import limit_arenas
    limit_arenas()              # as cli.main does: the children inherit it done
    from ..util.lean_imports import import_asyncio_without_ssl
    import_asyncio_without_ssl()    # as cli.main does: a child with TLS loads OpenSSL itself

    try:
        zygote.warm()
    except Exception as e:
        zygote.log(f"cannot load the device model: {e}")
        return 1
    from ..machine import cli
    from ..util import malloc
    from . import rehearsal
    try:
        rehearsal.rehearse(cli)    # what every child runs first, run here: its pages stay shared
    except Exception as e:      # costs the children memory, not the zygote its service
        zygote.log(f"rehearsal failed (children will copy more of the shared heap): "
                   f"{type(e).__name__}: {e}")
    import gc
    gc.collect()
    malloc.trim()               # the warm-up's freed memory: not kept resident for every child
    gc.freeze()                 # the warm heap stays out of every child's collections: shared pages
    from .pageout import page_out_file_mappings
    advised, refused = page_out_file_mappings()   # the warm-up's file pages: not kept for its lifetime
    if refused:
        zygote.log(f"the kernel refused MADV_PAGEOUT for {refused} of {advised} file mappings "
                   "(Linux < 5.4?): the warm-up's file pages stay resident")
    try:
        if passed:
            zygote.adopt(passed[0])
        else:
            zygote.bind()
    except OSError as e:
        zygote.log(f"cannot listen on {args.socket}: {e.strerror or e}")
        return 1
    how = " (socket from systemd)" if zygote.inherited else ""
    # On stdout (problems go to stderr): whoever started us waits for this line.
    print(f"pyxenfb-zygote: ready on {zygote.path}{how} (warmed up in "
          f"{time.monotonic() - started:.2f} s, pid {os.getpid()})", flush=True)
    code = zygote.serve()
    print(f"pyxenfb-zygote: stopped after serving {zygote.served} device models; "
          "they keep running", flush=True)
    return code


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: a child's machine
    # finds its control socket through `pyxenfb.zygote.server`.
    from pyxenfb.zygote.server import main as _main
    sys.exit(_main())
