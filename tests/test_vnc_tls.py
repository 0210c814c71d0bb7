"""VNC over TLS: VeNCrypt (X509None, X509Vnc, TLSNone, TLSVnc) and wss://,
against our own TLS client and TigerVNC's viewer; bad certificates, garbage
and stalls cost only their own connection."""
from __future__ import annotations

import logging
import socket
import ssl
import struct
import time

import numpy as np
import pytest

from pyxenfb.machine.cli import CliError, parse_args
from pyxenfb.rfb import protocol as rfb
from pyxenfb.rfb.auth import vnc_response
from pyxenfb.rfb.states import VeNCryptSubtype
from pyxenfb.rfb.tls import TlsConfigError, TlsCredentials, server_context

from rfb_harness import RawClient, ServerThread, expected_rgb, make_picture
from test_vnc_clients import run_tigervnc, xvfb  # noqa: F401 (fixture)
from simkit import wait_until
from tlscerts import make_pki

X509_NONE, X509_VNC = VeNCryptSubtype.X509_NONE, VeNCryptSubtype.X509_VNC
TLS_NONE, TLS_VNC = VeNCryptSubtype.TLS_NONE, VeNCryptSubtype.TLS_VNC


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


class VencryptClient(RawClient):
    """A minimal VeNCrypt client on Python's ssl (RFB 3.8)."""

    def choose(self, subtype: int) -> None:
        """VeNCrypt up to the server's ack of `subtype`: TLS comes next."""
        assert self.recv_exact(12) == b"RFB 003.008\n"
        self.send(b"RFB 003.008\n")
        types = self.recv_exact(self.recv_exact(1)[0])
        assert types == bytes([19]), f"offered {types!r}, expected VeNCrypt only"
        self.send(bytes([19]))
        assert self.recv_exact(2) == b"\x00\x02"
        self.send(b"\x00\x02")
        assert self.recv_exact(1) == b"\x00"
        subtypes = struct.unpack(f">{self.recv_exact(1)[0]}I", self.recv_exact(4 * 1))
        self.offered = subtypes
        self.send(struct.pack(">I", subtype))
        assert self.recv_exact(1) == b"\x01"

    def negotiate(self, subtype: int, *, ca: str | None = None, cert: str | None = None,
                  key: str | None = None) -> None:
        self.choose(subtype)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if ca is None:                                  # anonymous
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("AECDH:!eNULL:@SECLEVEL=0")
        else:
            ctx.load_verify_locations(ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        self.sock = ctx.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def finish_auth(self, password: str | None = None) -> tuple[int, int]:
        if password is not None:
            self.send(vnc_response(password, self.recv_exact(16)))
        result = struct.unpack(">I", self.recv_exact(4))[0]
        if result != 0:
            raise ConnectionError(self.recv_exact(struct.unpack(">I", self.recv_exact(4))[0]).decode())
        self.send(b"\x01")
        w, h = struct.unpack(">HH", self.recv_exact(4))
        self.recv_exact(16)
        self.recv_exact(struct.unpack(">I", self.recv_exact(4))[0])
        return w, h

    def raw_frame(self, w: int, h: int) -> np.ndarray:
        self.send(struct.pack(">BBHHHH", 3, 0, 0, 0, w, h))
        assert self.recv_exact(2)[0] == 0
        (n,) = struct.unpack(">H", self.recv_exact(2))
        picture = np.zeros((h, w), np.uint32)
        for _ in range(n):
            x, y, rw, rh, e = struct.unpack(">HHHHi", self.recv_exact(12))
            assert e == 0
            picture[y:y + rh, x:x + rw] = np.frombuffer(self.recv_exact(rw * rh * 4), "<u4").reshape(rh, rw)
        return picture & 0xFFFFFF


def words(surface) -> np.ndarray:
    return surface.rows.view("<u4").reshape(surface.height, surface.width) & 0xFFFFFF


@pytest.fixture
def tls_server(pki):
    servers = []

    def start(creds: TlsCredentials, **kwargs) -> ServerThread:
        srv = ServerThread(tls=creds, **kwargs)
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        srv.close()


# ---------------------------------------------------------------- sans-IO
def test_vencrypt_negotiation_bytes():
    conn = rfb.ServerConnection(64, 48, "t", tls="x509", password="pw")
    assert conn.data_to_send() == b"RFB 003.008\n"
    assert conn.receive_data(b"RFB 003.008\n") == []
    assert conn.data_to_send() == b"\x01\x13"              # VeNCrypt only
    conn.receive_data(b"\x13")
    assert conn.data_to_send() == b"\x00\x02"
    conn.receive_data(b"\x00\x02")
    assert conn.data_to_send() == b"\x00\x01" + struct.pack(">I", X509_VNC)
    events = conn.receive_data(struct.pack(">I", X509_VNC) + b"\x16\x03\x01")
    assert events == [rfb.StartTls()] and conn.data_to_send() == b"\x01"
    assert conn.take_buffered_input() == b"\x16\x03\x01"   # the TLS layer gets these
    conn.tls_established()
    assert len(conn.data_to_send()) == 16                     # the VNC challenge, inside TLS


@pytest.mark.parametrize("bad,reason", [
    (b"\x13\x00\x01", "VeNCrypt version 0.1"),
    (b"\x13\x00\x02" + struct.pack(">I", 256), "subtype 256"),
    (b"\x02", "security type 2"),
])
def test_vencrypt_refusals(bad, reason):
    conn = rfb.ServerConnection(64, 48, "t", tls="anon")
    conn.receive_data(b"RFB 003.008\n")
    with pytest.raises(rfb.ProtocolError, match=reason) as caught:
        conn.receive_data(bad)
    assert not isinstance(caught.value, rfb.AuthenticationFailed)     # nothing guessed


def test_rfb_33_client_refused_when_tls_is_required():
    conn = rfb.ServerConnection(64, 48, "t", tls="x509")
    conn.data_to_send()
    with pytest.raises(rfb.ProtocolError, match="TLS is required"):
        conn.receive_data(b"RFB 003.003\n")
    assert b"TLS is required" in conn.data_to_send()


def test_bad_credentials_are_one_line(tmp_path):
    with pytest.raises(TlsConfigError, match="server-cert.pem is missing"):
        server_context(TlsCredentials("x509", str(tmp_path)))
    (tmp_path / "server-cert.pem").write_text("not a certificate")
    (tmp_path / "server-key.pem").write_text("not a key")
    with pytest.raises(TlsConfigError, match=str(tmp_path)):
        server_context(TlsCredentials("x509", str(tmp_path), verify_peer=False))


# ---------------------------------------------------------------- command line
def test_cli_tls_syntaxes(tmp_path):
    o = parse_args(["-xen-domid", "3", "-object",
                    f"tls-creds-x509,id=tls0,dir={tmp_path},endpoint=server,verify-peer=off",
                    "-vnc", "127.0.0.1:1,tls-creds=tls0,password=on"])
    assert o.vnc.tls == TlsCredentials("x509", str(tmp_path), False) and o.vnc.password
    o = parse_args(["-xen-domid", "3", "-object", f"tls-creds-x509,id=t,dir={tmp_path},endpoint=server",
                    "-vnc", ":1,tls-creds=t"])
    assert o.vnc.tls.verify_peer                          # QEMU's default
    assert parse_args(["-d", "3", "-vnc", f":1,tls,x509verify={tmp_path}"]).vnc.tls == \
        TlsCredentials("x509", str(tmp_path), True)
    assert parse_args(["-d", "3", "-vnc", f":1,tls,x509={tmp_path}"]).vnc.tls.verify_peer is False
    assert parse_args(["-d", "3", "-vnc", ":1,tls"]).vnc.tls == TlsCredentials("anon")
    with pytest.raises(CliError, match="no such -object"):
        parse_args(["-d", "3", "-vnc", ":1,tls-creds=nope"])
    with pytest.raises(CliError, match="endpoint=server"):
        parse_args(["-d", "3", "-object", f"tls-creds-x509,id=t,dir={tmp_path}", "-vnc", ":1,tls-creds=t"])


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("verify", [False, True])
def test_x509_none_gives_the_exact_picture(tls_server, pki, verify):
    srv = tls_server(TlsCredentials("x509", pki.dir, verify))
    c = VencryptClient(srv.port)
    try:
        c.negotiate(X509_NONE, ca=pki.ca, cert=pki.client_cert if verify else None,
                    key=pki.client_key if verify else None)
        assert c.offered == (X509_NONE,)
        w, h = c.finish_auth()
        assert np.array_equal(c.raw_frame(w, h), words(make_picture()))
        if verify:
            assert srv.call(lambda: srv.server.clients[0].tls.peer_certificate() is not None)
    finally:
        c.close()


def test_x509_vnc_needs_the_password_inside_tls(tls_server, pki):
    srv = tls_server(TlsCredentials("x509", pki.dir, False), password="s3cret")
    good, bad = VencryptClient(srv.port), VencryptClient(srv.port)
    try:
        good.negotiate(X509_VNC, ca=pki.ca)
        w, h = good.finish_auth("s3cret")
        bad.negotiate(X509_VNC, ca=pki.ca)
        with pytest.raises(ConnectionError, match="Authentication failed"):
            bad.finish_auth("wrong")
        assert np.array_equal(good.raw_frame(w, h), words(make_picture()))
    finally:
        good.close()
        bad.close()


@pytest.mark.parametrize("password", [None, "pw"])
def test_anonymous_tls(tls_server, password):
    srv = tls_server(TlsCredentials("anon"), password=password)
    c = VencryptClient(srv.port)
    try:
        c.negotiate(TLS_VNC if password else TLS_NONE)
        w, h = c.finish_auth(password)
        assert np.array_equal(c.raw_frame(w, h), words(make_picture()))
    finally:
        c.close()


@pytest.mark.parametrize("password", [None, "s3cret"])
def test_vencrypt_refusals_never_block_the_address(tls_server, password):
    """Bad VeNCrypt versions, subtypes and security types, many times from
    127.0.0.1: nothing was guessed, so a right client from there still gets in."""
    srv = tls_server(TlsCredentials("anon"), password=password)
    offered = TLS_VNC if password else TLS_NONE
    for i in range(12):
        c = RawClient(srv.port)
        try:
            c.recv_exact(12)
            c.send(b"RFB 003.008\n")
            assert c.recv_exact(2) == b"\x01\x13"
            if i % 3 == 0:
                c.send(b"\x02")                                # not offered
                assert struct.unpack(">I", c.recv_exact(4))[0] == 1
            else:
                c.send(b"\x13")
                c.recv_exact(2)
                if i % 3 == 1:
                    c.send(b"\x00\x01")                        # VeNCrypt 0.1
                    assert c.recv_exact(1) != b"\x00"
                else:
                    c.send(b"\x00\x02")
                    c.recv_exact(6)
                    c.send(struct.pack(">I", 256))             # a subtype not offered
                    assert c.recv_exact(1) == b"\x00"
            assert c.closed()
        finally:
            c.close()
    assert srv.call(lambda: srv.server.blacklist.blocked_for("127.0.0.1")) == 0
    c = VencryptClient(srv.port)
    try:
        c.negotiate(offered)
        assert c.finish_auth(password) == (800, 600)
    finally:
        c.close()


def test_plain_client_is_offered_only_vencrypt(tls_server, pki):
    srv = tls_server(TlsCredentials("x509", pki.dir, False))
    c = RawClient(srv.port)
    try:
        assert c.recv_exact(12) == b"RFB 003.008\n"
        c.send(b"RFB 003.008\n")
        assert c.recv_exact(2) == b"\x01\x13"
        c.send(b"\x01")                                   # None: refused
        assert struct.unpack(">I", c.recv_exact(4))[0] == 1
        assert c.closed()
    finally:
        c.close()


def _failing(kind: str, srv, pki):
    """Start one bad TLS attempt; returns the socket-ish object to close."""
    c = VencryptClient(srv.port)
    if kind == "wrong CA":
        with pytest.raises(ssl.SSLError):
            c.negotiate(X509_NONE, ca=pki.other_ca)
    elif kind == "no client certificate":
        c.negotiate(X509_NONE, ca=pki.ca)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            c.finish_auth()                           # TLS 1.3: the refusal comes on first read
    elif kind == "client certificate from another CA":
        c.negotiate(X509_NONE, ca=pki.ca, cert=pki.rogue_client_cert, key=pki.rogue_client_key)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            c.finish_auth()
    elif kind == "garbage":
        c.choose(X509_NONE)
        c.send(b"GET / HTTP/1.1\r\n\r\n" * 4)           # not a ClientHello
        assert c.closed()
    return c


@pytest.mark.parametrize("kind", ["wrong CA", "no client certificate",
                                  "client certificate from another CA", "garbage"])
def test_bad_tls_costs_only_its_own_connection(tls_server, pki, kind, caplog):
    srv = tls_server(TlsCredentials("x509", pki.dir, True))
    good = VencryptClient(srv.port)
    try:
        good.negotiate(X509_NONE, ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        w, h = good.finish_auth()
        with caplog.at_level(logging.INFO, logger="pyxenfb.rfb.server"):
            bad = _failing(kind, srv, pki)
            bad.close()
            wait_until(lambda: any("TLS" in r.getMessage() and "disconnected" in r.getMessage()
                                   for r in caplog.records)
                       or kind == "wrong CA" and any("disconnected" in r.getMessage()
                                                     for r in caplog.records),
                       10, f"the server logging the {kind} refusal")
        assert np.array_equal(good.raw_frame(w, h), words(make_picture()))
    finally:
        good.close()


def test_expired_server_certificate_is_refused_by_the_client(tls_server, pki):
    srv = tls_server(TlsCredentials("x509", pki.expired_dir, False))
    c = VencryptClient(srv.port)
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            c.negotiate(X509_NONE, ca=pki.ca)
    finally:
        c.close()


def test_stalled_tls_handshake_is_closed(tls_server, pki):
    srv = tls_server(TlsCredentials("x509", pki.dir, False))
    srv.call(setattr, srv.server, "handshake_timeout", 0.5)
    c = VencryptClient(srv.port)
    try:
        c.choose(X509_NONE)
        c.send(b"\x16\x03\x01")                          # a ClientHello that never finishes
        started = time.monotonic()
        assert c.closed(timeout=10)
        assert time.monotonic() - started < 9
        wait_until(lambda: srv.call(lambda: not srv.server.clients), 5, "client gone")
    finally:
        c.close()


def test_plain_websocket_refused_when_tls_is_configured(tls_server, pki, caplog):
    """With TLS configured the WebSocket port takes wss:// only: a plain
    ws:// upgrade is closed unanswered, with one line."""
    srv = tls_server(TlsCredentials("x509", pki.dir, False), websocket=True)
    s = socket.create_connection(("127.0.0.1", srv.ws_port), timeout=5)
    try:
        with caplog.at_level(logging.INFO, logger="pyxenfb.rfb"):
            s.sendall(b"GET /websockify HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            assert s.recv(100) == b""
            wait_until(lambda: any("plain ws:// refused" in r.getMessage() for r in caplog.records),
                       5, "the refusal line")
        assert sum("disconnected" in r.getMessage() for r in caplog.records) == 1
    finally:
        s.close()


def test_wss_websocket_inside_tls_gets_plain_security(tls_server, pki):
    """A browser's wss://: TLS first, then the WebSocket upgrade, then RFB with
    the plain security types (the TLS around it protects it, as in QEMU)."""
    from websockets.sync.client import connect
    srv = tls_server(TlsCredentials("x509", pki.dir, False), websocket=True)
    ctx = ssl.create_default_context(cafile=pki.ca)
    with connect(f"wss://127.0.0.1:{srv.ws_port}/websockify", ssl=ctx, open_timeout=10) as ws:
        assert ws.recv(timeout=10) == b"RFB 003.008\n"
        ws.send(b"RFB 003.008\n")
        assert ws.recv(timeout=10) == b"\x01\x01"


def test_wss_origin_checked_inside_tls(tls_server, pki):
    """The Origin check applies inside wss:// too."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect
    srv = tls_server(TlsCredentials("x509", pki.dir, False), websocket=True,
                     websocket_origins=("https://console.example",))
    ctx = ssl.create_default_context(cafile=pki.ca)
    url = f"wss://127.0.0.1:{srv.ws_port}/"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, ssl=ctx, open_timeout=10, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    with connect(url, ssl=ctx, open_timeout=10, origin="https://console.example") as ws:
        assert ws.recv(timeout=10) == b"RFB 003.008\n"


def test_rfb_port_takes_no_wss(tls_server, pki):
    """TLS from the first byte on the VNC port is not a wss:// client: the
    port speaks RFB (VeNCrypt) only, so the banner came first and a
    ClientHello is a bad version."""
    srv = tls_server(TlsCredentials("x509", pki.dir, False), websocket=True)
    ctx = ssl.create_default_context(cafile=pki.ca)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")


# ---------------------------------------------------------------- real viewers
@pytest.mark.parametrize("security", ["X509None", "X509Vnc", "TLSNone"])
def test_tigervnc_over_tls_shows_the_exact_picture(xvfb, tls_server, pki, tmp_path, security):
    creds = TlsCredentials("anon") if security.startswith("TLS") else TlsCredentials("x509", pki.dir, False)
    password = "s3cret" if security.endswith("Vnc") else None
    srv = tls_server(creds, password=password)
    options = ["-SecurityTypes", security, "-X509CA", pki.ca]
    if password:
        passwd = tmp_path / "passwd"
        passwd.write_bytes(vnc_obfuscated(password))
        options += ["-PasswordFile", str(passwd)]
    run_tigervnc(xvfb, srv.port, options, expected_rgb(make_picture()))


def vnc_obfuscated(password: str) -> bytes:
    """A vncpasswd file: the password DES-encrypted with VNC's fixed key (whose
    bytes, like a password's, go to DES with their bit order reversed)."""
    from Crypto.Cipher import DES
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in (23, 82, 107, 6, 35, 78, 88, 7))
    return DES.new(key, DES.MODE_ECB).encrypt(password.encode()[:8].ljust(8, b"\0"))


@pytest.mark.parametrize("password", [None, "s3cret"])
def test_novnc_over_wss_is_pixel_exact(tls_server, pki, password):
    from novnc_driver import NovncBrowser, missing_requirement
    if (missing := missing_requirement()) is not None:
        pytest.skip(missing)
    from pyxenfb.rfb import encodings as enc
    browser = NovncBrowser()
    try:
        # The page's origin (the test's HTTP server) is the one allowed.
        srv = tls_server(TlsCredentials("x509", pki.dir, False), password=password,
                         websocket=True, websocket_origins=(browser.origin,))
        result = browser.run_client(srv.ws_port, 800, 600, encodings=[enc.TIGHT], lossless=True,
                                    password=password, scheme="wss")
    finally:
        browser.close()
    assert result["outcome"] == "frame", result
    want = expected_rgb(make_picture())
    assert (result["picture"][..., :3] == want).all()
