"""Test certificates made on the fly (never committed): a CA, a server
certificate for 127.0.0.1/localhost, client certificates, and the odd ones
(another CA, an expired server certificate), in QEMU's file names."""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_key, subject: str, issuer_key, issuer: str, *, ca: bool = False,
          days: tuple[int, int] = (-1, 30), server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(subject_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now + datetime.timedelta(days=days[0]))
               .not_valid_after(now + datetime.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: str, *items) -> None:
    with open(path, "wb") as f:
        for item in items:
            if isinstance(item, x509.Certificate):
                f.write(item.public_bytes(serialization.Encoding.PEM))
            else:
                f.write(item.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


@dataclass
class TestPki:
    dir: str                 # ca-cert.pem, server-cert.pem, server-key.pem (QEMU's names)
    ca: str
    client_cert: str         # signed by the CA
    client_key: str
    other_ca: str            # a CA that signed nothing here
    rogue_client_cert: str   # signed by the other CA
    rogue_client_key: str
    expired_dir: str         # same CA, server certificate expired yesterday


def make_pki(root: str) -> TestPki:
    ca_key, other_key = _key(), _key()
    ca = _cert(ca_key, "pyxenfb test CA", ca_key, "pyxenfb test CA", ca=True)
    other = _cert(other_key, "other CA", other_key, "other CA", ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _cert(server_key, "localhost", ca_key, "pyxenfb test CA", server=True)
    expired = _cert(server_key, "localhost", ca_key, "pyxenfb test CA", server=True, days=(-30, -1))
    client = _cert(client_key, "client", ca_key, "pyxenfb test CA")
    rogue = _cert(rogue_key, "rogue", other_key, "other CA")
    good, old = os.path.join(root, "x509"), os.path.join(root, "expired")
    for d, cert in ((good, server), (old, expired)):
        os.makedirs(d)
        _write(os.path.join(d, "ca-cert.pem"), ca)
        _write(os.path.join(d, "server-cert.pem"), cert)
        _write(os.path.join(d, "server-key.pem"), server_key)
    paths = {name: os.path.join(root, name) for name in
             ("client-cert.pem", "client-key.pem", "other-ca.pem", "rogue-cert.pem", "rogue-key.pem")}
    _write(paths["client-cert.pem"], client)
    _write(paths["client-key.pem"], client_key)
    _write(paths["other-ca.pem"], other)
    _write(paths["rogue-cert.pem"], rogue)
    _write(paths["rogue-key.pem"], rogue_key)
    return TestPki(good, os.path.join(good, "ca-cert.pem"), paths["client-cert.pem"],
                   paths["client-key.pem"], paths["other-ca.pem"], paths["rogue-cert.pem"],
                   paths["rogue-key.pem"], old)
