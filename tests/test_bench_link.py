"""The slow-link pieces of the benchmark: bench/link.py's user-space relay
(rate and one-way delay, as netem) and bench/vnc_rate_ext.py's SetEncodings
rewrite that asks Tight for JPEG."""
from __future__ import annotations

import socket
import struct
import threading
import time

from bench.link import Relay
from bench.vnc_rate_ext import JPEG_QUALITY_0, _AskJpeg


def echo_server() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "relay closed early"
        buf += chunk
    return buf


def test_relay_delays_each_way_and_limits_the_rate():
    srv, port = echo_server()
    relay = Relay(port, rate_bps=2e6, delay_s=0.05)
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.monotonic()
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
            rtt = time.monotonic() - t0
            assert 0.1 <= rtt < 2.0                       # 50 ms each way
            payload = bytes(range(256)) * 400              # 102,400 bytes: 0.41 s at 2 Mbit/s
            t0 = time.monotonic()
            c.sendall(payload)
            assert recv_exactly(c, len(payload)) == payload  # order and content kept
            took = time.monotonic() - t0
            # at least one serialisation at 2 Mbit/s (the two directions overlap
            # chunk by chunk through the echo), plus 50 ms each way
            assert took >= len(payload) * 8 / 2e6 * 0.95 + 0.1
            assert took < 10
    finally:
        relay.close()
        srv.close()


class FakeSock:
    def __init__(self):
        self.sent = []

    def sendall(self, data):
        self.sent.append(bytes(data))


def test_jpeg_extension_adds_the_quality_pseudo_encoding_to_set_encodings_only():
    fake = FakeSock()
    sock = _AskJpeg(fake, [JPEG_QUALITY_0 + 6])
    set_encodings = struct.pack(">BxHi", 2, 1, 7)               # Tight alone, as vnc-rate sends it
    request = struct.pack(">BBHHHH", 3, 1, 0, 0, 800, 600)      # untouched
    sock.sendall(set_encodings)
    sock.sendall(request)
    kind, n = struct.unpack(">BxH", fake.sent[0][:4])
    assert (kind, n) == (2, 2)
    assert struct.unpack(">2i", fake.sent[0][4:]) == (7, -26)
    assert fake.sent[1] == request
