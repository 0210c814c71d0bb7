"""TLS credentials for VNC, read the way QEMU reads its tls-creds objects.

x509: a directory with ca-cert.pem, server-cert.pem and server-key.pem (QEMU's
names); with verify-peer the client must present a certificate signed by
that CA.  anon: anonymous (EC)DH, no certificates, as TigerVNC's TLSNone and
TLSVnc and QEMU's tls-creds-anon use; it protects against eavesdropping, not
against a man in the middle.

`TlsStream` is TLS without I/O (ssl.MemoryBIO), like websocket.py: the
server feeds it the socket's bytes and writes what it returns.  asyncio's
start_tls cannot take over a connection whose first bytes were already read
(a browser's wss:// ClientHello arrives before we know it is one), and bytes
a client sends right behind its VeNCrypt choice would race the switch.

`ssl` (OpenSSL) is imported by the functions that need it, not with this
module: a device model without TLS never loads it (util/lean_imports.py).
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

TLS_RECORD = 0x16           # first byte of a TLS handshake record (a ClientHello)

CA_CERT, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"


class TlsConfigError(Exception):
    """str() is one readable line naming the file or the setting."""


class TlsKind(str, enum.Enum):
    X509 = "x509"                   # certificates from a directory (VeNCrypt X509*)
    ANON = "anon"                   # anonymous Diffie-Hellman (VeNCrypt TLS*)


@dataclass(frozen=True)
class TlsCredentials:
    kind: TlsKind                   # given as "x509" or "anon" too
    dir: str | None = None          # x509: where the PEM files are
    verify_peer: bool = False

    def __post_init__(self):
        # A kind we do not know stays as given: server_context refuses it in one line.
        if self.kind in TlsKind._value2member_map_:
            object.__setattr__(self, "kind", TlsKind(self.kind))

    def describe(self) -> str:
        if self.kind is TlsKind.ANON:
            return "anonymous TLS"
        return f"X.509 TLS from {self.dir}" + (" (client certificates required)"
                                                if self.verify_peer else "")


def server_context(creds: TlsCredentials) -> ssl.SSLContext:
    """An SSLContext for the server side, or TlsConfigError."""
    import ssl
    if creds.kind is TlsKind.ANON:
        return _anon_context()
    if creds.kind is not TlsKind.X509:
        raise TlsConfigError(f"unknown TLS credentials type {creds.kind!r}")
    paths = {name: os.path.join(creds.dir or ".", name) for name in (CA_CERT, SERVER_CERT, SERVER_KEY)}
    for name in (SERVER_CERT, SERVER_KEY) + ((CA_CERT,) if creds.verify_peer else ()):
        if not os.path.isfile(paths[name]):
            raise TlsConfigError(f"TLS credentials: {paths[name]} is missing")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.3 session tickets: nobody resumes a VNC session, and TigerVNC
    # 1.12 stalls when a ticket and the first RFB bytes arrive together.
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(paths[SERVER_CERT], paths[SERVER_KEY])
        if creds.verify_peer:
            ctx.load_verify_locations(paths[CA_CERT])
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsConfigError(f"TLS credentials in {creds.dir}: {exc}") from None
    return ctx


def _anon_context() -> ssl.SSLContext:
    """Anonymous ECDH: TLS 1.2 (1.3 has no anonymous suites), security level 0."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.set_ciphers("AECDH:!eNULL:@SECLEVEL=0")
    except ssl.SSLError as exc:
        raise TlsConfigError(f"anonymous TLS is not available in this OpenSSL: {exc}") from None
    return ctx


class TlsError(Exception):
    """The peer's TLS failed (bad certificate, garbage, alert); str() is the reason.
    `reply` holds bytes still to send (an alert), if any."""

    def __init__(self, reason: str, reply: bytes = b""):
        super().__init__(reason)
        self.reply = reply


class TlsStream:
    """The server side of one TLS connection over memory buffers."""

    def __init__(self, ctx: ssl.SSLContext):
        import ssl
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Bytes from the socket -> (plaintext for the layer above, bytes to send)."""
        import ssl                  # loaded by __init__: a lookup, for its exceptions
        self._incoming.write(data)
        plain = bytearray()
        try:
            if not self.established:
                self._ssl.do_handshake()
                self.established = True
            while True:
                chunk = self._ssl.read(1 << 16)
                if not chunk:
                    break
                plain += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            raise TlsError("client closed TLS", self._outgoing.read()) from None
        except ssl.SSLError as exc:
            raise TlsError(exc.reason or exc.strerror or str(exc), self._outgoing.read()) from None
        return bytes(plain), self._outgoing.read()

    def send(self, data) -> bytes:
        """Plaintext -> TLS records to write to the socket."""
        self._ssl.write(data)
        return self._outgoing.read()

    def peer_certificate(self) -> dict | None:
        return self._ssl.getpeercert() if self.established else None
