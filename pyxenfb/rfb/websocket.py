"""RFB over WebSocket (RFC 6455), sans-IO, on top of websockets' ServerProtocol.

RFB bytes travel in binary frames; frame boundaries mean nothing, so the
payloads are simply concatenated.  The `binary` subprotocol is echoed when a
client offers it (old noVNC/websockify); none is required.

Browsers let any web page open a WebSocket to any address, and say which
page did in the `Origin` header.  An upgrade that carries an Origin not in
the allow-list is refused (HTTP 403); one without an Origin comes from a
program (websockify, a script), not from a page, and is accepted.
"""
from __future__ import annotations

import ipaddress
import re

# The websockets library is imported when the first browser connects, not at
# start-up: a device model's start-up time counts against libxl's timeout.
MAX_HANDSHAKE = 4096
MAX_FRAME = 1 << 20
MAX_ORIGIN = 256                # longer than any origin worth listing
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


def normalise_origin(text: str) -> str:
    """'scheme://host[:port]' as browsers send it: scheme and host in lower
    case, the scheme's default port dropped.  Only http and https (a page's
    origin); ValueError (a short reason) for anything else, including
    "null", paths, credentials and non-ASCII hosts (give them in punycode)."""
    if len(text) > MAX_ORIGIN:
        raise ValueError(f"longer than {MAX_ORIGIN} characters")
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        raise ValueError("only printable ASCII without spaces (punycode for international names)")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise ValueError("expected http://HOST[:PORT] or https://HOST[:PORT]")
    if any(c in rest for c in "/?#@\\"):
        raise ValueError("an origin is scheme://host[:port], without path, query or user")
    if rest.startswith("["):
        end = rest.find("]")
        host, port_text = rest[:end + 1], rest[end + 1:]
        if end < 0 or (port_text and not port_text.startswith(":")):
            raise ValueError("bad IPv6 address (expected [addr] or [addr]:port)")
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r}") from None
        port_text = port_text[1:] if port_text else None
    else:
        host, sep, port_text = rest.partition(":")
        port_text = port_text if sep else None
        if not _HOSTNAME.match(host.lower()):
            raise ValueError(f"bad host name {host!r}")
    host = host.lower()
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"bad port {port_text!r}")
        port = int(port_text)
    if port is None or port == DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class WebSocketError(Exception):
    """The WebSocket peer misbehaved or closed; str() is the reason.

    `payload` holds RFB bytes that arrived before the end, `reply` the bytes
    (HTTP error or close frame) to write before closing."""

    def __init__(self, reason: str, payload: bytes = b"", reply: bytes = b""):
        super().__init__(reason)
        self.payload, self.reply = payload, reply


def _pick_subprotocol(protocol, offered):
    return "binary" if "binary" in offered else None


class WebSocketStream:
    """Turns raw TCP bytes into RFB bytes and back."""

    def __init__(self, origins: frozenset[str] | tuple[str, ...] = ()):
        """origins: the normalised origins whose pages may connect; empty =
        no browser page at all (clients without an Origin still may)."""
        from websockets.server import ServerProtocol
        self.origins = frozenset(origins)
        self._ws = ServerProtocol(subprotocols=["binary"], select_subprotocol=_pick_subprotocol,
                                  max_size=MAX_FRAME)
        self._handshake_bytes = 0
        self.open = False

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Feed network bytes; returns (RFB payload, bytes to write back).

        Raises WebSocketError when the connection must end (after the caller
        has written the returned bytes, which may hold a close frame or an
        HTTP error)."""
        from websockets.frames import Opcode
        from websockets.http11 import Request
        from websockets.protocol import State
        if not self.open:
            self._handshake_bytes += len(data)
            if self._handshake_bytes > MAX_HANDSHAKE:
                raise WebSocketError(f"WebSocket handshake over {MAX_HANDSHAKE} bytes")
        self._ws.receive_data(data)
        payload = bytearray()
        error = None
        for event in self._ws.events_received():
            if isinstance(event, Request):
                refused = self._origin_refused(event)
                response = (self._ws.reject(403, "Origin not allowed\n") if refused
                            else self._ws.accept(event))
                self._ws.send_response(response)
                if refused:
                    error = refused
                elif response.status_code != 101:
                    error = f"WebSocket handshake refused: {response.status_code} {response.reason_phrase}"
                else:
                    self.open = True
            elif event.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
                payload += event.data
            elif event.opcode == Opcode.CLOSE:
                error = "WebSocket closed by client"
        out = b"".join(self._ws.data_to_send())
        if self._ws.parser_exc is not None:
            error = f"WebSocket error: {self._ws.parser_exc}"
        elif error is None and self._ws.state in (State.CLOSING, State.CLOSED):
            error = "WebSocket closed"
        if error is not None:
            raise WebSocketError(error, bytes(payload), out)
        return bytes(payload), out

    def _origin_refused(self, request) -> str | None:
        """Why this upgrade's Origin is refused, or None when it may go on."""
        values = request.headers.get_all("Origin")
        if not values:
            return None                 # not a browser page
        shown = repr(values[0][:100])
        if len(values) > 1:
            return f"WebSocket refused: {len(values)} Origin headers"
        try:
            origin = normalise_origin(values[0])
        except ValueError:
            return f"WebSocket refused: Origin {shown} is not an http(s) origin"
        if origin in self.origins:
            return None
        return (f"WebSocket refused: Origin {shown} is not allowed "
                f"(to allow it: -vnc ...,websocket-origin={origin})")

    def _is_open(self) -> bool:
        from websockets.protocol import State
        return self._ws.state is State.OPEN

    def send(self, data: bytes) -> bytes:
        if not self._is_open():
            return b""
        self._ws.send_binary(data)
        return b"".join(self._ws.data_to_send())

    def close(self, reason: str = "") -> bytes:
        """A close frame to send before dropping the connection."""
        if not self._is_open():
            return b""
        self._ws.send_close(1000, reason[:100])
        return b"".join(self._ws.data_to_send())
