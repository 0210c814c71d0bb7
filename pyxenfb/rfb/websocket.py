"""RFB over WebSocket (RFC 6455), sans-IO, on top of websockets' ServerProtocol.

RFB bytes travel in binary frames; frame boundaries mean nothing, so the
payloads are simply concatenated.  The `binary` subprotocol is echoed when a
client offers it (old noVNC/websockify); none is required.
"""
from __future__ import annotations

# The websockets library is imported when the first browser connects, not at
# start-up: a device model's start-up time counts against libxl's timeout.
MAX_HANDSHAKE = 4096
MAX_FRAME = 1 << 20


class WebSocketError(Exception):
    """The WebSocket peer misbehaved or closed; str() is the reason.

    `payload` holds RFB bytes that arrived before the end, `reply` the bytes
    (HTTP error or close frame) to write before closing."""

    def __init__(self, reason: str, payload: bytes = b"", reply: bytes = b""):
        super().__init__(reason)
        self.payload, self.reply = payload, reply


def looks_like_websocket(first_bytes: bytes) -> bool:
    """A browser opens with an HTTP GET; an RFB client waits for our banner."""
    return len(first_bytes) > 0 and b"GET ".startswith(first_bytes[:4])


def _pick_subprotocol(protocol, offered):
    return "binary" if "binary" in offered else None


class WebSocketStream:
    """Turns raw TCP bytes into RFB bytes and back."""

    def __init__(self):
        from websockets.server import ServerProtocol
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
                response = self._ws.accept(event)
                self._ws.send_response(response)
                if response.status_code != 101:
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
