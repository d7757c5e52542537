"""A throw-away PKI for the TLS tests (``cryptography``): CAs, server and client certificates, written to files."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by another CA
    rogue_key: Path

    def read(self, path: Path) -> bytes:
        return path.read_bytes()


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, server: bool,
           valid_for: datetime.timedelta = datetime.timedelta(days=1),
           ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """``valid_for``: from now; negative for a certificate that has expired."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now + valid_for)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(d: Path) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a rogue client certificate,
    written into ``d``."""
    ca_key, ca_cert = make_ca("attn test CA")
    server_key, server_cert = issue(ca_key, ca_cert, "attn-server", server=True)
    client_key, client_cert = issue(ca_key, ca_cert, "attn-client", server=False)
    rogue_ca_key, rogue_ca_cert = make_ca("some other CA")
    rogue_key, rogue_cert = issue(rogue_ca_key, rogue_ca_cert, "attn-client", server=False)
    return Pki(ca=write_cert(ca_cert, d / "ca.pem"),
               server_cert=write_cert(server_cert, d / "server.pem"),
               server_key=write_key(server_key, d / "server.key"),
               client_cert=write_cert(client_cert, d / "client.pem"),
               client_key=write_key(client_key, d / "client.key"),
               rogue_cert=write_cert(rogue_cert, d / "rogue.pem"), rogue_key=write_key(rogue_key, d / "rogue.key"))


@dataclass(frozen=True)
class ServerPair:
    """A server certificate for localhost/127.0.0.1 from a CA of its own, as PEM bytes."""

    ca: bytes
    cert: bytes
    key: bytes
    der: bytes  # the certificate as a TLS handshake presents it

    def install(self, cert: Path, key: Path) -> None:
        """Replaces the files the way a renewal does: each written aside, then renamed over the old one."""
        for data, path in ((self.cert, cert), (self.key, key)):
            aside = path.with_name(f".{path.name}.new")
            aside.write_bytes(data)
            aside.replace(path)


def server_pair(cn: str, valid_for: datetime.timedelta = datetime.timedelta(days=1)) -> ServerPair:
    ca_key, ca_cert = make_ca(f"{cn} CA")
    key, cert = issue(ca_key, ca_cert, cn, server=True, valid_for=valid_for)
    return ServerPair(ca=ca_cert.public_bytes(serialization.Encoding.PEM),
                      cert=cert.public_bytes(serialization.Encoding.PEM),
                      key=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()),
                      der=cert.public_bytes(serialization.Encoding.DER))
