"""This machine's long-term identity, and the TLS contexts that pin peers by certificate.

Contract
--------
``load_or_create(folder, name)`` returns the :class:`Identity` stored in ``folder``
(``cert.pem`` and ``key.pem``, the key file mode 0600), creating it on first use: a fresh
P-256 key and a self-signed certificate (CA:FALSE, ten years).  A certificate is never
trusted through a chain: peers are pinned by their exact certificate (trust store = that
certificate alone, ``VERIFY_X509_PARTIAL_CHAIN``) and named by its SHA-256 fingerprint.

``client_context(identity, pinned_pem)`` dials a master: TLS 1.3, this identity as client
certificate, and only the pinned master certificate accepted (host names are not checked:
the pin is stronger).  ``server_context(identity, member_pems)`` is the master's: it presents
its certificate and accepts a client certificate only if it is one of ``member_pems``
(a client may also send none; the caller then allows pairing only).  ``pairing_client_context()``
presents nothing and accepts any server certificate: the pairing protocol authenticates
the master afterwards, and binds the certificate seen here (see ``pairing``).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("molink.identity")

CERT_FILE, KEY_FILE = "cert.pem", "key.pem"


@dataclass(frozen=True)
class Identity:
    name: str  # the common name chosen at creation (informative only)
    cert_pem: str
    cert_path: Path
    key_path: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)


def fingerprint(cert_pem: str) -> str:
    """SHA-256 of the certificate's DER bytes, hex."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem)).hexdigest()


def der_fingerprint(cert_der: bytes) -> str:
    return hashlib.sha256(cert_der).hexdigest()


def check_cert_pem(text: str) -> str:
    """Parse a peer's PEM certificate; return it normalised, or raise ValueError."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if not isinstance(text, str) or len(text) > 16384:
        raise ValueError("certificate must be a PEM string of at most 16 KiB")
    try:
        cert = x509.load_pem_x509_certificate(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise ValueError(f"not a PEM certificate: {e}") from None
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_or_create(folder: Path, name: str) -> Identity:
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    if cert_path.exists() and key_path.exists():
        pem = cert_path.read_text()
        return Identity(_common_name(pem), pem, cert_path, key_path)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "molink")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("molink")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = key_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    os.replace(tmp, key_path)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    cert_path.write_text(pem)
    log.info("created this machine's identity in %s (fingerprint %s)", folder, fingerprint(pem)[:16])
    return Identity(name, pem, cert_path, key_path)


def _common_name(pem: str) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    attrs = x509.load_pem_x509_certificate(pem.encode()).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def client_context(identity: Identity, pinned_pem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # pinned by certificate instead
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=pinned_pem)
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    return ctx


def pairing_client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the PAKE authenticates the master, and pins this certificate
    return ctx


def server_context(identity: Identity, member_pems: list[str], required: bool = False) -> ssl.SSLContext:
    """TLS 1.3 server presenting ``identity``, accepting a client certificate only if it is one of
    ``member_pems``.  ``required`` False (the group port): a client may send none, and may then
    only pair (enforced per request by the server); True (a direct hop): it must send one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if member_pems:
        ctx.load_verify_locations(cadata="".join(member_pems))
    return ctx
