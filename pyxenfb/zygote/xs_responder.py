"""A minimal XenStore daemon for the zygote's rehearsal (rehearsal.py).

The rehearsal runs the device model's XenStore client (pyxenfb.platform.xenstore)
over a real unix socket, so that the client's and the wire codec's code is
warm in the zygote before it forks.  The daemon at the other end is never
run by a device model, so it need not be a xenstored: this one keeps a flat
path -> value map and answers only what the rehearsal sends (read, write,
mkdir, rm, directory, get_perms, watch/unwatch with their events, and
transactions applied at once, without isolation).  Anything else gets
ENOSYS.  It speaks the wire through pyxenfb.platform.xs_wire, as the client
does; the simulated host's full xenstored stays in pyxenfb/sim/.
"""
from __future__ import annotations

import asyncio
import errno
import os

from ..platform.xs_wire import (Message, MessageDecoder, ProtocolError, XsType, error_name,
                                is_at_or_below, join_strings, validate_path)


class Responder:
    """`await start()`, then XenStore.open(socket_path); `await close()`."""

    def __init__(self, run_dir: str):
        self.socket_path = os.path.join(run_dir, "xenstored.sock")
        self.nodes: dict[str, bytes] = {"/": b""}
        self.server: asyncio.AbstractServer | None = None
        self.next_tx = 1

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, self.socket_path)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = MessageDecoder()
        watches: list[tuple[str, bytes]] = []        # (path, token) of this connection
        try:
            while data := await reader.read(65536):
                for msg in decoder.feed(data):
                    for reply in self._answer(msg, watches):
                        writer.write(reply.encode())
        except (ProtocolError, ConnectionError):
            pass
        finally:
            writer.close()

    # -- the operations --
    def _answer(self, msg: Message, watches: list[tuple[str, bytes]]) -> list[Message]:
        def ok(payload: bytes = b"OK\0") -> Message:
            return Message(msg.type, msg.req_id, msg.tx_id, payload)
        args = msg.strings()
        try:
            kind = XsType(msg.type)
            if kind in (XsType.READ, XsType.DIRECTORY, XsType.GET_PERMS, XsType.MKDIR, XsType.RM):
                path = validate_path(args[0])
                if kind == XsType.MKDIR:
                    return [ok(), *self._set(path, self.nodes.get(path, b""), watches)]
                if path not in self.nodes:
                    raise OSError(errno.ENOENT, path)
                if kind == XsType.READ:
                    return [ok(self.nodes[path])]
                if kind == XsType.GET_PERMS:
                    return [ok(join_strings("n0"))]
                if kind == XsType.DIRECTORY:
                    return [ok(join_strings(*self._children(path)))]
                for node in [n for n in self.nodes if is_at_or_below(n, path) and n != "/"]:
                    del self.nodes[node]
                return [ok(), *self._fire(path, watches)]
            if kind == XsType.WRITE:
                path, _, value = msg.payload.partition(b"\0")
                return [ok(), *self._set(validate_path(path), value, watches)]
            if kind == XsType.WATCH:
                watch = (validate_path(args[0], allow_special=True), args[1])
                watches.append(watch)
                return [ok(), self._event(watch[0], watch[1])]     # the initial event
            if kind == XsType.UNWATCH:
                watches.remove((validate_path(args[0], allow_special=True), args[1]))
                return [ok()]
            if kind == XsType.TRANSACTION_START:
                self.next_tx += 1
                return [ok(b"%d\0" % (self.next_tx - 1))]
            if kind == XsType.TRANSACTION_END:
                return [ok()]
            raise OSError(errno.ENOSYS, kind.name)
        except (ValueError, IndexError):
            err = errno.EINVAL
        except OSError as e:
            err = e.errno
        return [Message(XsType.ERROR, msg.req_id, msg.tx_id, join_strings(error_name(err)))]

    def _children(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({n[len(prefix):].split("/", 1)[0] for n in self.nodes
                       if n.startswith(prefix) and n != prefix})

    def _set(self, path: str, value: bytes, watches) -> list[Message]:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):             # missing parents appear, empty
            self.nodes.setdefault("/" + "/".join(parts[:i]), b"")
        self.nodes[path] = value
        return self._fire(path, watches)

    def _fire(self, path: str, watches) -> list[Message]:
        return [self._event(path, token) for watched, token in watches
                if is_at_or_below(path, watched)]

    @staticmethod
    def _event(path: str, token: bytes) -> Message:
        return Message(XsType.WATCH_EVENT, 0, 0, join_strings(path, token))
