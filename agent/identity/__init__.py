"""agent.identity: keys, CSRs, certificate refresh and TLS contexts of the agent's identities.

``x509`` is the one module here that imports cryptography; the agent imports nothing of the
controller but ``controller.api``.
"""
from agent.identity.errors import (
    BadBundle, BadCertificate, IdentityError, NotCertified, PeerIdentityError, PeerNotAllowed,
    SignerError,
)
from agent.identity.manager import Certified, IdentityManager, Signer, SignResult
from agent.identity.tls import check_peer, peer_identity

__all__ = [
    "BadBundle", "BadCertificate", "Certified", "IdentityError", "IdentityManager", "NotCertified",
    "PeerIdentityError", "PeerNotAllowed", "SignResult", "Signer", "SignerError", "check_peer",
    "peer_identity",
]
