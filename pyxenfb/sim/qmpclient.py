"""libxl's side of QMP: the client that configures a started device model
(qmp_capabilities, query-chardev, query-vnc, change-vnc-password), the way
xl-create-vvv.log shows libxl doing it.
"""
from __future__ import annotations

import asyncio
import json

from ..platform.xenstore import XenStore
from .rundir import ToolstackError, qmp_paths
from .vfbconfig import VfbConfig

QMP_CMD_TIMEOUT = 10.0                 # LIBXL_QMP_CMD_TIMEOUT (s)
QMP_LINE_MAX = 1 << 20                 # a longer QMP reply is a broken DM


class QmpError(ToolstackError):
    pass


class QmpClient:
    """libxl's side of QMP: one command at a time, replies matched by id.

    libxl only accepts replies terminated by "\\r\\n" (a DM sending bare "\\n"
    made the real xl hang until its timeout); we reject them at once.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 what: str, timeout: float = QMP_CMD_TIMEOUT):
        self.reader, self.writer, self.what, self.timeout = reader, writer, what, timeout
        self.next_id = 1
        self.greeting: dict = {}

    @classmethod
    async def connect(cls, path: str, what: str, timeout: float = QMP_CMD_TIMEOUT) -> "QmpClient":
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(path, limit=QMP_LINE_MAX), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise QmpError(f"Failed to connect to QMP socket {path}: {exc!r}; {what}") from exc
        client = cls(reader, writer, what, timeout)
        msg = await client._read_message()
        if not isinstance(msg.get("QMP"), dict):
            client.close()
            raise QmpError(f"QMP greeting missing from {path}: {msg!r:.200}; {what}")
        client.greeting = msg["QMP"]
        return client

    async def _read_message(self) -> dict:
        try:
            line = await asyncio.wait_for(self.reader.readuntil(b"\n"), self.timeout)
        except asyncio.TimeoutError:
            raise QmpError(f"QMP timeout: no reply within {self.timeout:.0f} s; {self.what}") from None
        except asyncio.IncompleteReadError as exc:
            raise QmpError(f"QMP connection closed by the device model "
                           f"(partial {exc.partial[:80]!r}); {self.what}") from None
        except asyncio.LimitOverrunError:
            raise QmpError(f"QMP message over {QMP_LINE_MAX} bytes; {self.what}") from None
        except OSError as exc:
            raise QmpError(f"QMP read failed: {exc}; {self.what}") from None
        if not line.endswith(b"\r\n"):
            raise QmpError(f"QMP protocol error: message not terminated by \\r\\n: "
                           f"{line[:120]!r}; {self.what}")
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise QmpError(f"QMP protocol error: not JSON: {line[:120]!r}; {self.what}") from None
        if not isinstance(msg, dict):
            raise QmpError(f"QMP protocol error: not an object: {line[:120]!r}; {self.what}")
        return msg

    async def execute(self, command: str, arguments: dict | None = None):
        cmd_id = self.next_id
        self.next_id += 1
        request = {"execute": command, "id": cmd_id}
        if arguments is not None:
            request["arguments"] = arguments
        self.writer.write(json.dumps(request).encode() + b"\r\n")
        try:
            await self.writer.drain()
        except OSError as exc:
            raise QmpError(f"QMP write of {command!r} failed: {exc}; {self.what}") from None
        while True:
            msg = await self._read_message()
            if "event" in msg and "id" not in msg:
                continue                         # asynchronous events may interleave
            if msg.get("id") != cmd_id:
                raise QmpError(f"QMP reply to {command!r} does not echo id {cmd_id}: "
                               f"{msg!r:.200}; {self.what}")
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise QmpError(f"QMP command {command!r} failed: {err.get('class')}: "
                               f"{err.get('desc')}; {self.what}")
            if "return" not in msg:
                raise QmpError(f"QMP reply to {command!r} has no 'return': {msg!r:.200}; "
                               f"{self.what}")
            return msg["return"]

    def close(self) -> None:
        self.writer.close()


async def postconfig(xs: XenStore, run_dir: str, domid: int, vfb: VfbConfig | None,
                      what: str) -> tuple[str | None, int | None]:
    """After 'running': qmp_capabilities, query-chardev, query-vnc, change-vnc-password."""
    qmp = await QmpClient.connect(qmp_paths(run_dir, domid)[0], what)
    dom = f"/local/domain/{domid}"
    try:
        await qmp.execute("qmp_capabilities")
        chardevs = await qmp.execute("query-chardev")
        if not isinstance(chardevs, list) or not all(
                isinstance(c, dict) and isinstance(c.get("label"), str) for c in chardevs):
            raise QmpError(f"unexpected response to QMP cmd 'query-chardev': "
                           f"{chardevs!r:.200}; {what}")
        if vfb is None:
            return None, None
        vnc = await qmp.execute("query-vnc")
        host = port = None
        if not isinstance(vnc, dict) or not isinstance(vnc.get("enabled"), bool):
            raise QmpError(f"unexpected response to QMP cmd 'query-vnc': {vnc!r:.200}; {what}")
        if vnc["enabled"]:
            host, service = vnc.get("host"), vnc.get("service")
            if not isinstance(host, str) or not isinstance(service, str) or not service.isdigit():
                raise QmpError(f"Failed to retrieve VNC connect information: {vnc!r:.200}; {what}")
            port = int(service)
            await xs.write(f"{dom}/console/vnc-listen", host)
            await xs.write(f"{dom}/console/vnc-port", service)
        if vfb.vncpasswd:
            await qmp.execute("change-vnc-password", {"password": vfb.vncpasswd})
            await xs.write(f"{dom}/console/vnc-pass", vfb.vncpasswd)
        return host, port
    finally:
        qmp.close()
