"""Binding the VNC port: display D is TCP 5900+D, searching upward with
`to=` / -vncunused, plus an optional separate WebSocket port.

Kept free of heavy imports: the device model binds its port (and can answer
libxl's query-vnc) before it loads numpy and the encoders.
"""
from __future__ import annotations

import enum
import errno
import socket
from dataclasses import dataclass, field

VNC_BASE_PORT = 5900


class Transport(enum.Enum):
    """What a connection speaks under RFB.  The VNC port is RFB only (as in
    QEMU); a WebSocket is served only on its own port, when asked for."""
    RFB = "rfb"                 # the VNC port: the server speaks first
    WEBSOCKET = "websocket"     # the WebSocket port, ws://
    WSS = "wss"                 # the WebSocket port with TLS configured: wss:// only


class VncBindError(Exception):
    """str() is one readable line, e.g. "VNC: port 5901 on 127.0.0.1 is in use"."""


@dataclass
class VncListeners:
    host: str
    port: int
    display: int
    sockets: list[tuple[socket.socket, Transport]] = field(default_factory=list)
    websocket_port: int | None = None

    def close(self) -> None:
        for sock, _ in self.sockets:
            sock.close()
        self.sockets.clear()


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address `host` names ("" = all)."""
    socks = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        for family, kind, proto, _, addr in dict.fromkeys(
                (i[0], i[1], i[2], None, i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(100)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def bind_vnc(host: str, display: int, *, to_display: int | None = None,
             websocket_port: int | None = None, websocket_follows: bool = False) -> VncListeners:
    """Bind 5900+display (or the first free one up to to_display) for RFB,
    and websocket_port (if given) for WebSocket clients only.  With
    websocket_follows (websocket=on), the WebSocket port moves with the
    display found: 5700+D for display D."""
    last = max(display, to_display if to_display is not None else display)
    where = host or "all addresses"
    for d in range(display, last + 1):
        port = VNC_BASE_PORT + d
        try:
            socks = _listen(host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise VncBindError(f"VNC: cannot listen on port {port} on {where}: "
                               f"{exc.strerror or exc}") from None
        listeners = VncListeners(host, port, d, [(s, Transport.RFB) for s in socks])
        break
    else:
        if last == display:
            raise VncBindError(f"VNC: port {VNC_BASE_PORT + display} on {where} is in use")
        raise VncBindError(f"VNC: ports {VNC_BASE_PORT + display}-{VNC_BASE_PORT + last} "
                           f"on {where} are all in use")
    if websocket_port is not None:
        if websocket_follows:
            websocket_port += listeners.display - display
        if websocket_port > 65535:
            listeners.close()
            raise VncBindError(f"VNC: WebSocket port {websocket_port} (display :{listeners.display}) "
                               "out of range")
        try:
            listeners.sockets += [(s, Transport.WEBSOCKET) for s in _listen(host, websocket_port)]
        except OSError as exc:
            listeners.close()
            raise VncBindError(f"VNC: WebSocket port {websocket_port} on {where}: "
                               f"{exc.strerror or exc}") from None
        listeners.websocket_port = websocket_port
    return listeners
