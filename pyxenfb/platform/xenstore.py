"""asyncio XenStore client: one connection, all I/O in the running loop.

Talks the xs_wire protocol on xenstored's unix socket (or, on a dom0
without the socket, the /dev/xen/xenbus character device through the same
protocol object).  Requests carry our own req_id counter and are matched to
replies by it; WATCH_EVENTs go to the callback registered for their token.
Losing the connection (EOF, a socket error, a protocol violation) fails
every pending request and every wait through `until()` at once, and
resolves `closed`.
See docs/interfaces.md for the contract.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .xs_wire import (
    PAYLOAD_MAX, UINT32_MAX, Message, MessageDecoder, ProtocolError, XsType,
    errno_from_name, is_at_or_below, join_strings, parse_perm, split_strings,
    validate_path,
)

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/xenstored/socket"
XENBUS_DEVICE = "/dev/xen/xenbus"
TRANSACTION_ATTEMPTS = 100      # EAGAIN retries before giving up
DIRECTORY_PART_RESTARTS = 10    # the node changed under us this often: give up

WatchCallback = Callable[[str, str], None]
T = TypeVar("T")
_RAISE: Any = object()


class XenStoreError(OSError):
    """An error reply (or a lost connection); .strerror is the wire name."""

    def __init__(self, err: int, name: str, detail: str = "") -> None:
        super().__init__(err, name)
        self.detail = detail

    def __str__(self) -> str:
        text = f"[{self.errno}] {self.strerror}"
        return f"{text}: {self.detail}" if self.detail else text


def _connection_lost_error(detail: str = "") -> XenStoreError:
    return XenStoreError(errno.ECONNRESET, "ECONNRESET", detail or "connection to xenstored lost")


def default_path(environ: dict[str, str] | os._Environ = os.environ) -> str:
    """$XENSTORED_PATH, else the standard socket if present, else the xenbus device."""
    path = environ.get("XENSTORED_PATH")
    if path:
        return path
    if os.path.exists(DEFAULT_SOCKET):
        return DEFAULT_SOCKET
    return XENBUS_DEVICE


def _to_bytes(value: bytes | str | int) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, int):
        return str(value).encode()
    return value.encode()


def _strip_nul(payload: bytes) -> bytes:
    return payload[:-1] if payload.endswith(b"\0") else payload


class _Protocol(asyncio.Protocol):
    """Forwards transport callbacks to the owning XenStore."""

    def __init__(self, owner: "XenStore") -> None:
        self._owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._owner._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._owner._data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._connection_lost(exc)


class _XenbusDeviceTransport:
    """Minimal transport over the xenbus character device (real dom0 only).

    The kernel device takes one whole message per write() and hands back
    replies and watch events on read(), so plain non-blocking fd I/O with
    add_reader is all it needs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: _Protocol) -> None:
        self._loop, self._fd, self._protocol = loop, fd, protocol
        self._open = True
        protocol.connection_made(self)  # type: ignore[arg-type]
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(exc)
            return
        if not data:
            self._lose(None)
            return
        self._protocol.data_received(data)

    def write(self, data: bytes) -> None:
        if not self._open:
            return
        try:
            os.write(self._fd, data)
        except OSError as exc:
            self._lose(exc)

    def is_closing(self) -> bool:
        return not self._open

    def close(self) -> None:
        self._lose(None)

    abort = close

    def _lose(self, exc: Exception | None) -> None:
        if not self._open:
            return
        self._open = False
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._loop.call_soon(self._protocol.connection_lost, exc)


class XenStore:
    """One connection to xenstored.  Create with `await XenStore.open()`."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._decoder = MessageDecoder()
        self._pending: dict[int, tuple[int, asyncio.Future[bytes]]] = {}
        self._next_req_id = 1
        self._watches: dict[str, dict[str, WatchCallback]] = {}  # token -> path -> callback
        self._lost: XenStoreError | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()

    @classmethod
    async def open(cls, path: str | None = None) -> "XenStore":
        path = path or default_path()
        self = cls()
        protocol = _Protocol(self)
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise XenStoreError(exc.errno or errno.ENOENT, "ENOENT", f"{path}: {exc.strerror}") from exc
        if stat.S_ISCHR(mode):
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            _XenbusDeviceTransport(self._loop, fd, protocol)
        else:
            await self._loop.create_unix_connection(lambda: protocol, path)
        return self

    # ---- connection plumbing ------------------------------------------

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as exc:
            log.error("xenstore: protocol error from daemon: %s; closing", exc)
            self._lost = _connection_lost_error(f"protocol error: {exc}")
            if self._transport is not None:
                self._transport.abort()
            return
        for msg in messages:
            if msg.type == XsType.WATCH_EVENT:
                self._dispatch_watch_event(msg)
            else:
                self._complete_request(msg)

    def _connection_lost(self, exc: Exception | None) -> None:
        error = self._lost or _connection_lost_error(str(exc) if exc else "")
        self._lost = error
        pending, self._pending = self._pending, {}
        for _, future in pending.values():
            if not future.done():
                future.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)

    def _complete_request(self, msg: Message) -> None:
        entry = self._pending.pop(msg.req_id, None)
        if entry is None:
            log.warning("xenstore: reply type %d for unknown req_id %d dropped", msg.type, msg.req_id)
            return
        request_type, future = entry
        if future.done():       # the caller was cancelled
            return
        if msg.type == XsType.ERROR:
            name = _strip_nul(msg.payload).decode("ascii", "replace")
            future.set_exception(XenStoreError(errno_from_name(name), name))
        elif msg.type != request_type:
            future.set_exception(XenStoreError(
                errno.EIO, "EIO", f"reply type {msg.type} to request type {request_type}"))
        else:
            future.set_result(msg.payload)

    def _dispatch_watch_event(self, msg: Message) -> None:
        parts = split_strings(msg.payload)
        if len(parts) < 2:
            log.warning("xenstore: malformed watch event %r ignored", msg.payload[:80])
            return
        path = parts[0].decode("ascii", "replace")
        token = parts[1].decode("utf-8", "surrogateescape")
        for watched, callback in list(self._watches.get(token, {}).items()):
            if not is_at_or_below(path, watched):
                continue
            try:
                callback(path, token)
            except Exception:
                log.exception("xenstore: watch callback for %s (token %r) failed", watched, token)

    def _allocate_req_id(self) -> int:
        while True:
            req_id = self._next_req_id
            self._next_req_id = 1 if req_id >= UINT32_MAX else req_id + 1
            if req_id not in self._pending:
                return req_id

    def _send(self, msg_type: XsType, payload: bytes, tx: int = 0) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = self._loop.create_future()
        if self._lost is not None or self._transport is None or self._transport.is_closing():
            future.set_exception(self._lost or _connection_lost_error())
            return future
        if len(payload) > PAYLOAD_MAX:
            future.set_exception(XenStoreError(errno.E2BIG, "E2BIG", f"request of {len(payload)} bytes"))
            return future
        req_id = self._allocate_req_id()
        self._pending[req_id] = (msg_type, future)
        self._transport.write(Message(msg_type, req_id, tx, payload).encode())
        return future

    async def _request(self, msg_type: XsType, payload: bytes, tx: int = 0) -> bytes:
        return await self._send(msg_type, payload, tx)

    # ---- nodes -----------------------------------------------------------

    async def read(self, path: str, default: Any = _RAISE, *, tx: int = 0) -> bytes:
        try:
            return await self._request(XsType.READ, join_strings(validate_path(path)), tx)
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT and default is not _RAISE:
                return default
            raise

    async def read_str(self, path: str, default: str | None = None, *, tx: int = 0) -> str | None:
        value = await self.read(path, None, tx=tx)
        return default if value is None else value.decode("utf-8", "replace")

    async def read_int(self, path: str, default: int | None = None, *, tx: int = 0) -> int | None:
        value = await self.read(path, None, tx=tx)
        if value is None:
            return default
        try:
            return int(value.decode("ascii"))
        except ValueError:          # includes UnicodeDecodeError
            return default

    async def write(self, path: str, value: bytes | str | int, *, tx: int = 0) -> None:
        payload = validate_path(path).encode() + b"\0" + _to_bytes(value)
        await self._request(XsType.WRITE, payload, tx)

    async def mkdir(self, path: str, *, tx: int = 0) -> None:
        await self._request(XsType.MKDIR, join_strings(validate_path(path)), tx)

    async def rm(self, path: str, *, tx: int = 0) -> None:
        try:
            await self._request(XsType.RM, join_strings(validate_path(path)), tx)
        except XenStoreError as exc:
            if exc.errno != errno.ENOENT:
                raise

    async def directory(self, path: str, *, tx: int = 0) -> list[str]:
        path = validate_path(path)
        try:
            payload = await self._request(XsType.DIRECTORY, join_strings(path), tx)
        except XenStoreError as exc:
            if exc.errno != errno.E2BIG:
                raise
            return await self._directory_in_parts(path, tx)
        return [name.decode("ascii", "replace") for name in split_strings(payload)]

    async def _directory_in_parts(self, path: str, tx: int) -> list[str]:
        """DIRECTORY_PART: `gen\\0` + a slice of the child list; `\\0\\0` ends it."""
        for _ in range(DIRECTORY_PART_RESTARTS):
            names: list[bytes] = []
            generation: bytes | None = None
            offset = 0
            while True:
                reply = await self._request(XsType.DIRECTORY_PART, join_strings(path, str(offset)), tx)
                gen, sep, rest = reply.partition(b"\0")
                if not sep:
                    raise XenStoreError(errno.EIO, "EIO", "DIRECTORY_PART reply without generation")
                if generation is None:
                    generation = gen
                elif gen != generation:
                    break                       # node changed between parts: start over
                last = rest == b"\0" or rest.endswith(b"\0\0")
                chunk = rest[:-1] if last else rest
                if not last and not chunk.endswith(b"\0"):
                    raise XenStoreError(errno.EIO, "EIO", "DIRECTORY_PART reply not NUL-terminated")
                names += split_strings(chunk)
                offset += len(chunk)
                if last:
                    return [name.decode("ascii", "replace") for name in names]
        raise XenStoreError(errno.EAGAIN, "EAGAIN", f"{path} kept changing during DIRECTORY_PART")

    async def get_perms(self, path: str, *, tx: int = 0) -> list[str]:
        payload = await self._request(XsType.GET_PERMS, join_strings(validate_path(path)), tx)
        return [perm.decode("ascii", "replace") for perm in split_strings(payload)]

    async def set_perms(self, path: str, perms: list[str], *, tx: int = 0) -> None:
        if not perms:
            raise ValueError("set_perms needs at least the owner entry")
        for perm in perms:
            parse_perm(perm)
        await self._request(XsType.SET_PERMS, join_strings(validate_path(path), *perms), tx)

    # ---- transactions ----------------------------------------------------

    async def transaction_start(self) -> int:
        payload = await self._request(XsType.TRANSACTION_START, b"\0")
        try:
            return int(_strip_nul(payload))
        except ValueError:
            raise XenStoreError(errno.EIO, "EIO", f"bad transaction id {payload[:32]!r}") from None

    async def transaction_end(self, tx: int, commit: bool = True) -> bool:
        try:
            await self._request(XsType.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)
        except XenStoreError as exc:
            if exc.errno == errno.EAGAIN:
                return False
            raise
        return True

    async def transaction(self, body: Callable[[int], Awaitable[T]]) -> T:
        """Run body(tx) in a transaction, redoing it from scratch on EAGAIN."""
        for _ in range(TRANSACTION_ATTEMPTS):
            tx = await self.transaction_start()
            try:
                result = await body(tx)
            except BaseException:
                self._abort_in_background(tx)
                raise
            if await self.transaction_end(tx, commit=True):
                return result
        raise XenStoreError(errno.EAGAIN, "EAGAIN", f"transaction conflicted {TRANSACTION_ATTEMPTS} times")

    def _abort_in_background(self, tx: int) -> None:
        # Fire and forget: works even while the caller is being cancelled.
        future = self._send(XsType.TRANSACTION_END, b"F\0", tx)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    # ---- watches ---------------------------------------------------------

    async def watch(self, path: str, token: str, callback: WatchCallback) -> None:
        path = validate_path(path, allow_special=True)
        by_path = self._watches.setdefault(token, {})
        if path in by_path:
            raise XenStoreError(errno.EEXIST, "EEXIST", f"already watching {path} with token {token!r}")
        # Registered before sending: the initial event follows the OK immediately.
        by_path[path] = callback
        try:
            await self._request(XsType.WATCH, join_strings(path, token.encode("utf-8", "surrogateescape")))
        except BaseException:
            self._forget_watch(path, token)
            raise

    async def unwatch(self, path: str, token: str) -> None:
        path = validate_path(path, allow_special=True)
        try:
            await self._request(XsType.UNWATCH, join_strings(path, token.encode("utf-8", "surrogateescape")))
        finally:
            self._forget_watch(path, token)

    def _forget_watch(self, path: str, token: str) -> None:
        by_path = self._watches.get(token)
        if by_path is not None:
            by_path.pop(path, None)
            if not by_path:
                del self._watches[token]

    async def until(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` unless the connection is lost first: then raise
        the connection-lost XenStoreError.  A watch callback never fires
        again once xenstored is gone, so a wait for one must go through
        here or it waits for good."""
        task = asyncio.ensure_future(awaitable)
        if not self.closed.done():
            try:
                await asyncio.wait({task, self.closed}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                task.cancel()
                raise
            if task.done():
                return task.result()
        task.cancel()
        raise self._lost or _connection_lost_error()

    # ---- domains ---------------------------------------------------------

    async def get_domain_path(self, domid: int) -> str:
        payload = await self._request(XsType.GET_DOMAIN_PATH, join_strings(str(int(domid))))
        return _strip_nul(payload).decode("ascii", "replace")

    async def introduce_domain(self, domid: int, mfn: int, port: int) -> None:
        await self._request(XsType.INTRODUCE, join_strings(str(int(domid)), str(int(mfn)), str(int(port))))

    async def release_domain(self, domid: int) -> None:
        await self._request(XsType.RELEASE, join_strings(str(int(domid))))

    async def is_domain_introduced(self, domid: int) -> bool:
        payload = await self._request(XsType.IS_DOMAIN_INTRODUCED, join_strings(str(int(domid))))
        return _strip_nul(payload) == b"T"
