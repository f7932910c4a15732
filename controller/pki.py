"""pki.py: the controller's X.509 toolkit (the one controller module that imports cryptography).

Creates ECDSA P-256 keys, the mesh root, and leaf certificates for the controller, admins,
nodes and workloads; reads and writes PEM files (private keys 0600, written atomically).
Pure functions of their inputs (time is passed in as ``now``); knows nothing of HTTP or the store.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey
Certificate = x509.Certificate


class PkiError(Exception):
    """A certificate or key could not be read, made or verified; the message says which and why."""


@dataclass(frozen=True)
class Issuer:
    """A CA certificate and its key: what signs."""

    cert: x509.Certificate
    key: PrivateKey


def generate_key() -> PrivateKey:
    """Return a new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def create_root(common_name: str, *, now: dt.datetime, ttl: dt.timedelta) -> Issuer:
    """Return a self-signed root CA (path length 1, so an intermediate may sit below it)."""
    key = generate_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issuer(cert, key)


def issue(
    issuer: Issuer,
    public_key: ec.EllipticCurvePublicKey,
    *,
    now: dt.datetime,
    ttl: dt.timedelta,
    uris: tuple[str, ...] = (),
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    common_name: str = "",
    server: bool = True,
    client: bool = True,
) -> x509.Certificate:
    """Sign a leaf certificate for ``public_key``.

    The validity never outlasts the issuer's. SANs carry the identity (the SPIFFE ID is the one
    URI SAN of a workload certificate, per the SPIFFE X.509-SVID spec); the subject is only a label.
    """
    if not (uris or dns_names or ip_addresses):
        raise PkiError("a leaf certificate needs at least one subject alternative name")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise PkiError("only ECDSA P-256 keys are accepted")
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_addresses]
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    not_after = min(now + ttl, issuer.cert.not_valid_after_utc)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh")]
        + ([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])] if common_name else [])
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    return builder.sign(issuer.key, hashes.SHA256())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Return the certificate's URI SANs (empty when it has none)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


class CsrError(PkiError):
    """The CSR is unusable; the message says why (shown to the requester)."""


@dataclass(frozen=True)
class Csr:
    uri: str
    public_key: ec.EllipticCurvePublicKey


def parse_csr(pem: str | bytes) -> Csr:
    """Check a PEM CSR: valid self-signature, ECDSA P-256, exactly one URI SAN and nothing else."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise CsrError(f"not a PEM certificate request: {e}") from None
    if not csr.is_signature_valid:
        raise CsrError("the CSR's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CsrError("the CSR's key must be ECDSA P-256")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrError("the CSR has no subjectAltName; it must carry exactly one URI SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(list(san)) != 1:
        raise CsrError(f"the CSR must carry exactly one URI SAN and no other names, got {[str(n.value) for n in san]}")
    return Csr(uris[0], key)


def csr_pem(uri: str, key: PrivateKey) -> bytes:
    """A CSR carrying exactly one URI SAN (the controller's own certificates, and tests)."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def cert_from_pem(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data)


# --- PEM files ---------------------------------------------------------------------------

def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_cert(path: Path) -> x509.Certificate:
    """Read one PEM certificate; PkiError names the file when it is missing or malformed."""
    return _load_certs(path)[0]


def load_certs(path: Path) -> list[x509.Certificate]:
    """Read every PEM certificate of a bundle file."""
    return _load_certs(path)


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path}: no such certificate file") from None
    except ValueError as e:
        raise PkiError(f"{path}: not a PEM certificate ({e})") from None
    return certs


def load_key(path: Path) -> PrivateKey:
    """Read a PEM private key (unencrypted, ECDSA P-256)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(f"{path}: no such key file") from None
    except (ValueError, TypeError) as e:
        raise PkiError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise PkiError(f"{path}: only ECDSA P-256 keys are supported")
    return key


def load_issuer(cert_path: Path, key_path: Path) -> Issuer:
    """Read a CA certificate and its key and check that they belong together and can sign."""
    cert, key = load_cert(cert_path), load_key(key_path)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise PkiError(f"{key_path} is not the key of {cert_path}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise PkiError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE missing)")
    return Issuer(cert, key)


def write_file(path: Path, data: bytes, *, secret: bool) -> None:
    """Write ``data`` atomically (temp file + rename); mode 0600 when ``secret`` else 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
