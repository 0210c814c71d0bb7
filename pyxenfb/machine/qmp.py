"""The QMP monitor libxl talks to (QEMU Machine Protocol over a unix socket).

Wire rules that libxl depends on (seen in a real Xen 4.17 run):
- a greeting `{"QMP": {"version": {"qemu": {...}, "package": ...}, ...}}`
  on every new connection; libxl reads only the version;
- every reply echoes the request's "id" (any JSON value) and ends in "\\r\\n"
  (libxl splits messages on "\\r\\n"; a bare "\\n" makes it time out);
- commands before `qmp_capabilities` are refused as QEMU does.

Input is split into JSON values by `MessageSplitter` (a byte-level scanner
that only tracks strings and bracket depth), then each complete value is
decoded with the json module.  Every message is bounded in size and nesting;
a bad message gets QEMU's GenericError reply and the connection goes on; an
oversized one gets an error reply and the connection is closed.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import socket
import stat
from typing import Any, Callable, Protocol

from .options import COMMAND_LINE_OPTIONS, ChardevSocket

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024     # bytes per request
MAX_NESTING = 64            # brackets deep per request
MAX_CONNECTIONS = 16        # per QmpServer, all listeners together
READ_CHUNK = 4096


class QmpMachine(Protocol):
    """What the monitor needs from the machine (implemented by machine_pv)."""

    def qmp_status(self) -> str: ...                 # 'prelaunch' | 'running' | 'paused'
    def qmp_cont(self) -> None: ...
    def qmp_query_vnc(self) -> dict: ...              # QEMU VncInfo
    def qmp_set_vnc_password(self, password: str) -> None: ...
    def qmp_expire_vnc_password(self, time: str) -> None: ...
    def qmp_screendump(self, filename: str, fmt: str) -> None: ...
    def qmp_quit(self) -> None: ...
    def qmp_chardevs(self) -> list[dict]: ...         # [{"label", "filename"}]


class QmpError(Exception):
    """A command failed: becomes {"error": {"class": cls, "desc": desc}}."""

    def __init__(self, cls: str, desc: str):
        super().__init__(desc)
        self.cls = cls
        self.desc = desc

    def to_reply(self) -> dict:
        return {"error": {"class": self.cls, "desc": self.desc}}


def generic_error(desc: str) -> QmpError:
    return QmpError("GenericError", desc)


class MessageTooLong(Exception):
    pass


# ---------------------------------------------------------------------------
# Splitting the byte stream into JSON values (no I/O, tested directly)

_WHITESPACE = b" \t\r\n"
_DELIMITERS = b" \t\r\n{}[]\""


class MessageSplitter:
    """Finds complete top-level JSON values in a byte stream.

    feed() returns the raw bytes of each complete value (an object/array once
    its brackets balance, a bare scalar once a delimiter follows it).  The
    scan position is kept across calls, so each byte is looked at once.
    Raises MessageTooLong when an unfinished value exceeds `limit` bytes or
    nests deeper than `max_depth`; the splitter is unusable afterwards.
    """

    def __init__(self, limit: int = MAX_MESSAGE, max_depth: int = MAX_NESTING):
        self.limit = limit
        self.max_depth = max_depth
        self.buf = bytearray()
        self.pos = 0            # next byte to scan
        self.start = -1         # start of the current value, -1: between values
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.scalar = False     # scanning a bare top-level scalar

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out: list[bytes] = []
        buf = self.buf
        i = self.pos
        while i < len(buf):
            ch = buf[i]
            if self.start < 0:                   # between values
                if ch in _WHITESPACE:
                    i += 1
                    continue
                self.start = i
                if ch in b"{[":
                    self.depth = 1
                elif ch == 0x22:                 # a top-level string
                    self.in_string = True
                    self.depth = 0
                elif ch in b"}]":                # stray closer: a value by itself
                    self._emit(out, i + 1)
                else:
                    self.scalar = True
                i += 1
                continue
            if self.scalar:
                if ch in _DELIMITERS:
                    self._emit(out, i)
                    self.scalar = False
                    continue                     # rescan ch as a new start
                i += 1
                continue
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == 0x5C:                 # backslash
                    self.escape = True
                elif ch == 0x22:
                    self.in_string = False
                    if self.depth == 0:
                        self._emit(out, i + 1)
                i += 1
                continue
            if ch == 0x22:
                self.in_string = True
            elif ch in b"{[":
                self.depth += 1
                if self.depth > self.max_depth:
                    raise MessageTooLong(f"nesting deeper than {self.max_depth}")
            elif ch in b"}]":
                self.depth -= 1
                if self.depth == 0:
                    self._emit(out, i + 1)
            i += 1
        # drop what has been handed out
        keep_from = self.start if self.start >= 0 else i
        del buf[:keep_from]
        self.pos = i - keep_from
        if self.start >= 0:
            self.start = 0
        if self.start >= 0 and len(buf) > self.limit:
            raise MessageTooLong(f"message longer than {self.limit} bytes")
        return out

    def _emit(self, out: list[bytes], end: int) -> None:
        if end - self.start > self.limit:
            raise MessageTooLong(f"message longer than {self.limit} bytes")
        out.append(bytes(self.buf[self.start:end]))
        self.start = -1


def decode_message(raw: bytes) -> Any:
    """json.loads with QEMU-style error text; raises QmpError."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise generic_error("JSON parse error, invalid UTF-8 sequence") from None
    except json.JSONDecodeError as error:
        raise generic_error(f"JSON parse error, {error.msg}") from None
    except RecursionError:
        raise generic_error("JSON parse error, nesting too deep") from None


def encode_reply(reply: dict) -> bytes:
    return json.dumps(reply, ensure_ascii=True).encode("ascii") + b"\r\n"


# ---------------------------------------------------------------------------
# Commands

# Argument type checks, QEMU's names for the error text.
def _is_str(v: Any) -> bool: return isinstance(v, str)
def _is_int(v: Any) -> bool: return isinstance(v, int) and not isinstance(v, bool)
def _is_list(v: Any) -> bool: return isinstance(v, list)


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (_is_str, "string"), "int": (_is_int, "integer"), "list": (_is_list, "array"),
}


class _Command:
    def __init__(self, handler, required: dict[str, str] | None = None,
                 optional: dict[str, str] | None = None):
        self.handler = handler
        self.required = required or {}
        self.optional = optional or {}

    def check(self, args: dict) -> None:
        for name in self.required:
            if name not in args:
                raise generic_error(f"Parameter '{name}' is missing")
        for name, value in args.items():
            kind = self.required.get(name) or self.optional.get(name)
            if kind is None:
                raise generic_error(f"Parameter '{name}' is unexpected")
            test, type_name = _TYPES[kind]
            if not test(value):
                raise generic_error(f"Invalid parameter type for '{name}', "
                                    f"expected: {type_name}")


EXPIRE_TIME_RE = re.compile(r"now|never|\+?[0-9]{1,20}")


class QmpServer:
    """Serves QMP on one or more listening sockets for one machine."""

    def __init__(self, machine: QmpMachine, *, version: tuple[int, int, int] = (7, 2, 0),
                 package: str = "pyxenfb"):
        self.machine = machine
        self.version = version
        self.package = package
        self._servers: list[asyncio.AbstractServer] = []
        self._owned_paths: list[tuple[str, int, int]] = []   # path, st_dev, st_ino
        self._connections: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._commands: dict[str, _Command] = {
            "qmp_capabilities": _Command(self._cmd_capabilities, optional={"enable": "list"}),
            "query-status": _Command(self._cmd_query_status),
            "cont": _Command(self._cmd_cont),
            "stop": _Command(self._cmd_stop),
            "query-vnc": _Command(lambda a: self.machine.qmp_query_vnc()),
            "query-chardev": _Command(self._cmd_query_chardev),
            "query-command-line-options": _Command(self._cmd_command_line_options,
                                                   optional={"option": "str"}),
            "change-vnc-password": _Command(self._cmd_change_vnc_password,
                                            required={"password": "str"}),
            "set_password": _Command(self._cmd_set_password,
                                     required={"protocol": "str", "password": "str"},
                                     optional={"connected": "str", "display": "str"}),
            "expire_password": _Command(self._cmd_expire_password,
                                        required={"protocol": "str", "time": "str"},
                                        optional={"display": "str"}),
            "screendump": _Command(self._cmd_screendump, required={"filename": "str"},
                                   optional={"device": "str", "head": "int",
                                             "format": "str"}),
            "query-version": _Command(lambda a: self._version_info()),
            "query-commands": _Command(
                lambda a: [{"name": name} for name in self._commands]),
            "quit": _Command(lambda a: {}),    # the machine is told after the reply
        }

    # -- listening --------------------------------------------------------

    async def listen(self, chardev: ChardevSocket) -> None:
        """Serve on `chardev`: bind its path, or adopt its listening fd."""
        if chardev.fd is not None:
            sock = _adopt_listening_fd(chardev)
        elif chardev.path is not None:
            sock = _bind_unix(chardev.path)
            st = os.stat(chardev.path)
            self._owned_paths.append((chardev.path, st.st_dev, st.st_ino))
        else:
            raise ValueError(f"chardev {chardev.id}: neither path nor fd")
        server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                 limit=READ_CHUNK)
        self._servers.append(server)
        log.info("QMP monitor on %s", chardev.path or f"fd {chardev.fd}")

    async def close(self) -> None:
        """Stop listening, drop every connection, unlink the socket files we made."""
        for server in self._servers:
            server.close()
        for writer in list(self._connections):
            writer.close()
        for server in self._servers:
            await server.wait_closed()
        if self._tasks:   # closed transports make the handlers return promptly
            _, stuck = await asyncio.wait(set(self._tasks), timeout=5)
            for task in stuck:
                task.cancel()
        self._servers.clear()
        for path, dev, ino in self._owned_paths:
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):   # still ours
                    os.unlink(path)
            except FileNotFoundError:
                pass
        self._owned_paths.clear()

    # -- one connection ---------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= MAX_CONNECTIONS:
            log.warning("QMP: too many connections, refusing one")
            writer.close()
            return
        self._connections.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = _Connection()
        try:
            writer.write(encode_reply(self._greeting()))
            splitter = MessageSplitter()
            while not conn.done:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                try:
                    messages = splitter.feed(data)
                except MessageTooLong as error:
                    log.warning("QMP: %s, closing the connection", error)
                    writer.write(encode_reply(generic_error(
                        f"QMP input too long or too deep ({error})").to_reply()))
                    await writer.drain()
                    break
                for raw in messages:
                    reply = self._handle(conn, raw)
                    writer.write(encode_reply(reply))
                    await writer.drain()   # back-pressure: a client that
                    if conn.done:          # doesn't read stops being served
                        break
            if conn.quit_requested:
                self.machine.qmp_quit()
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            self._connections.discard(writer)
            self._tasks.discard(task)
            writer.close()

    def _greeting(self) -> dict:
        return {"QMP": {"version": self._version_info(), "capabilities": []}}

    def _version_info(self) -> dict:
        major, minor, micro = self.version
        return {"qemu": {"major": major, "minor": minor, "micro": micro},
                "package": self.package}

    def _handle(self, conn: "_Connection", raw: bytes) -> dict:
        """One request in, one reply out (with the request's id when known)."""
        request_id: Any = None
        has_id = False
        name = "(bad request)"
        try:
            request = decode_message(raw)
            if not isinstance(request, dict):
                raise generic_error("QMP input must be a JSON object")
            if "id" in request:
                request_id, has_id = request["id"], True
            for key in request:
                if key not in ("execute", "arguments", "id"):
                    raise generic_error(f"QMP input member '{key}' is unexpected")
            if "execute" not in request:
                raise generic_error("QMP input lacks member 'execute'")
            if not isinstance(request["execute"], str):
                raise generic_error("QMP input member 'execute' must be a string")
            name = request["execute"][:64]
            args = request.get("arguments", {})
            if not isinstance(args, dict):
                raise generic_error("QMP input member 'arguments' must be an object")
            result = self._execute(conn, request["execute"], args)
            reply: dict = {"return": result}
            log.info("QMP %s: ok", name)
        except QmpError as error:
            reply = error.to_reply()
            log.info("QMP %s: %s: %s", name, error.cls, error.desc)
        except Exception:   # a bug in a handler must not end the monitor
            log.exception("QMP %s: internal error", name)
            reply = generic_error("internal error").to_reply()
        if has_id:
            reply["id"] = request_id
        return reply

    def _execute(self, conn: "_Connection", name: str, args: dict) -> Any:
        if not conn.negotiated and name != "qmp_capabilities":
            raise QmpError("CommandNotFound",
                           "Expecting capabilities negotiation with 'qmp_capabilities'")
        if conn.negotiated and name == "qmp_capabilities":
            raise QmpError("CommandNotFound",
                           "Capabilities negotiation is already complete, command ignored")
        command = self._commands.get(name)
        if command is None:
            raise QmpError("CommandNotFound", f"The command {name} has not been found")
        command.check(args)
        result = command.handler(args)
        if name == "qmp_capabilities":
            conn.negotiated = True
        elif name == "quit":
            conn.done = conn.quit_requested = True
        return result

    # -- command handlers (args already type-checked) ----------------------

    def _cmd_capabilities(self, args: dict) -> dict:
        for capability in args.get("enable", []):
            # we advertise none (no out-of-band execution)
            raise generic_error(f"Capability '{capability}' not available")
        return {}

    def _cmd_query_status(self, args: dict) -> dict:
        status = self.machine.qmp_status()
        return {"status": status, "running": status == "running", "singlestep": False}

    def _cmd_cont(self, args: dict) -> dict:
        self.machine.qmp_cont()
        return {}

    def _cmd_stop(self, args: dict) -> dict:
        # A PV backend has no vCPUs to stop; the guest is paused by the toolstack.
        log.info("QMP stop: nothing to stop in a xenpv machine")
        return {}

    def _cmd_query_chardev(self, args: dict) -> list:
        return [{"frontend-open": True, **info} for info in self.machine.qmp_chardevs()]

    def _cmd_command_line_options(self, args: dict) -> list:
        wanted = args.get("option")
        options = [o for o in COMMAND_LINE_OPTIONS if wanted in (None, o["option"])]
        if wanted is not None and not options:
            raise generic_error(f"invalid option name: {wanted}")
        return json.loads(json.dumps(options))     # a copy the caller can't alter

    def _cmd_change_vnc_password(self, args: dict) -> dict:
        self.machine.qmp_set_vnc_password(args["password"])
        return {}

    def _cmd_set_password(self, args: dict) -> dict:
        _require_vnc(args["protocol"])
        if args.get("connected", "keep") != "keep":
            raise generic_error("Only 'keep' is supported for 'connected' with VNC")
        self.machine.qmp_set_vnc_password(args["password"])
        return {}

    def _cmd_expire_password(self, args: dict) -> dict:
        _require_vnc(args["protocol"])
        if not EXPIRE_TIME_RE.fullmatch(args["time"]):
            raise generic_error("Parameter 'time' expects now, never, +SECONDS or SECONDS")
        self.machine.qmp_expire_vnc_password(args["time"])
        return {}

    def _cmd_screendump(self, args: dict) -> dict:
        fmt = args.get("format", "ppm")
        if fmt not in ("ppm", "png"):
            raise generic_error(f"Parameter 'format' does not accept value '{fmt}'")
        self.machine.qmp_screendump(args["filename"], fmt)
        return {}


class _Connection:
    """Per-connection protocol state."""

    def __init__(self) -> None:
        self.negotiated = False
        self.done = False
        self.quit_requested = False


def _require_vnc(protocol: str) -> None:
    if protocol != "vnc":
        raise generic_error(f"Parameter 'protocol' does not accept value '{protocol}' "
                            "(only vnc)")


def _bind_unix(path: str) -> socket.socket:
    """Bind a listening unix socket at `path`, replacing a stale socket file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST,
                                  "exists and is not a socket; refusing to remove it", path)
        os.unlink(path)       # left over from an earlier device model
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # owner-only from the start (the loop is single-threaded, so the
        # process-wide umask change cannot race with another bind)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(8)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _adopt_listening_fd(chardev: ChardevSocket) -> socket.socket:
    """Take over a listening socket fd opened by the toolstack (libxl fd=N)."""
    try:
        sock = socket.socket(fileno=chardev.fd)
    except OSError as error:
        raise OSError(error.errno, f"chardev {chardev.id}: fd {chardev.fd} "
                      f"is not a socket: {error.strerror}") from None
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise OSError(errno.EINVAL, f"chardev {chardev.id}: fd {chardev.fd} "
                          "is not a unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OSError(errno.EINVAL, f"chardev {chardev.id}: fd {chardev.fd} "
                          "is not listening")
        sock.setblocking(False)
    except BaseException:
        sock.detach()          # not ours to close on failure
        raise
    return sock
