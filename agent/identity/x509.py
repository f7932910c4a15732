"""x509.py: keys, CSRs and certificate checks — the one module of agent/identity that imports
cryptography (STYLE habit 9), and only the child process of x509_proc.py imports it.

PEM bytes in, PEM bytes and plain values out: no cryptography object leaves this module. Pure
functions of their inputs (time is passed in as ``now``); no I/O, no trio, no TLS.
"""
from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from agent.identity.errors import BadBundle, BadCertificate
from agent.identity.certinfo import Leaf

__all__ = ["Leaf", "check_bundle", "check_chain", "csr_pem", "new_key_pem"]

MAX_CHAIN_DEPTH = 4   # leaf, up to two intermediates, root


def new_key_pem() -> bytes:
    """A new ECDSA P-256 private key as unencrypted PKCS#8 PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def csr_pem(uri: str, key_pem: bytes) -> bytes:
    """A PEM CSR signed with SHA-256 by ``key_pem``, carrying exactly one URI SAN: ``uri``.

    The subject is empty: per the SPIFFE X.509-SVID spec the identity is the URI SAN alone.
    """
    key = _load_key(key_pem)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                          critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def check_bundle(bundle_pem: bytes) -> int:
    """Check a trust bundle: one or more PEM CA certificates. Returns how many; raises BadBundle."""
    return len(_bundle(bundle_pem))


def check_chain(uri: str, chain_pem: bytes, bundle_pem: bytes, key_pem: bytes,
                now: dt.datetime) -> Leaf:
    """Accept a signed chain for ``uri`` only if it is ours and it is good at ``now``.

    ``chain_pem`` is the leaf first, then any intermediates. Checks: the leaf's public key is
    ``key_pem``'s; the leaf has exactly one URI SAN and it is ``uri`` (SPIFFE X.509-SVID 2);
    the leaf chains to a root of ``bundle_pem`` and every certificate on the path is valid at
    ``now`` (RFC 5280 path validation, cryptography's client-certificate profile, so the leaf
    must allow clientAuth). Returns the leaf's validity and serial; raises ``BadCertificate``.
    """
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise BadCertificate(uri, f"the chain is not PEM certificates ({e})") from None
    leaf = chain[0]
    ours = _load_key(key_pem).public_key()
    if not isinstance(leaf.public_key(), ec.EllipticCurvePublicKey) or _spki(leaf.public_key()) != _spki(ours):
        raise BadCertificate(uri, "the certificate's public key is not the key of our CSR")
    sans = _uri_sans(leaf)
    if sans != [uri]:
        raise BadCertificate(uri, f"the certificate must carry exactly one URI SAN {uri!r}, got {sans}")
    try:
        roots = _bundle(bundle_pem)
    except BadBundle as e:
        raise BadCertificate(uri, f"the bundle sent with it is bad: {e.reason}") from None
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        raise BadCertificate(uri, f"the certificate is not valid at {now:%Y-%m-%dT%H:%M:%SZ} "
                                  f"(valid {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                                  f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
    verifier = (PolicyBuilder().store(Store(roots)).time(now)
                .max_chain_depth(MAX_CHAIN_DEPTH).build_client_verifier())
    try:
        verifier.verify(leaf, chain[1:])
    except VerificationError as e:
        raise BadCertificate(uri, f"the certificate does not chain to the trust bundle ({e})") from None
    return Leaf(leaf.not_valid_before_utc, leaf.not_valid_after_utc, leaf.serial_number)


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def _bundle(bundle_pem: bytes) -> list[x509.Certificate]:
    try:
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError as e:
        raise BadBundle(f"not PEM certificates ({e})") from None
    for root in roots:
        try:
            ca = root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise BadBundle(f"{root.subject.rfc4514_string()!r} is not a CA certificate")
    return roots


def _load_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    """The P-256 private key of ``key_pem``; ValueError for anything else (encrypted, RSA, junk)."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (TypeError, UnsupportedAlgorithm) as e:      # TypeError: encrypted, no password given
        raise ValueError(f"unusable private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("only ECDSA P-256 keys are used")
    return key


def _spki(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
