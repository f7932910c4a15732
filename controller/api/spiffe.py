"""SPIFFE IDs of nodemesh workloads: ``spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>``.

Owns the SPIFFE-ID syntax (https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md)
and the nodemesh path shape. Knows nothing of certificates, YAML or how IDs are authorized.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.api.errors import InvalidSpiffeId

if TYPE_CHECKING:
    from controller.api.resources import Workload

SCHEME = "spiffe://"
# SPIFFE-ID spec 2.1: trust domain names use lowercase letters, digits, '.', '-' and '_' only.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
# SPIFFE-ID spec 2.2: path segments use letters, digits, '.', '-' and '_'; never '.' or '..'.
_SEGMENT = re.compile(r"[a-zA-Z0-9._-]+")
_MAX_TRUST_DOMAIN = 255
_MAX_URI = 2048


def trust_domain_error(td: object) -> str | None:
    """Why ``td`` is not a valid SPIFFE trust domain name, or None if it is."""
    if not isinstance(td, str):
        return f"must be a string, got {type(td).__name__}"
    if not td:
        return "trust domain must not be empty"
    if len(td) > _MAX_TRUST_DOMAIN:
        return f"trust domain must be at most {_MAX_TRUST_DOMAIN} characters, got {len(td)}"
    if "@" in td:
        return f"trust domain must not contain userinfo ('@'), got {td!r}"
    if ":" in td:
        return f"trust domain must not contain a port (':'), got {td!r}"
    if not _TRUST_DOMAIN.fullmatch(td):
        hint = " (trust domains are lowercase)" if _TRUST_DOMAIN.fullmatch(td.lower()) else ""
        return f"trust domain may only contain a-z, 0-9, '.', '-' and '_'{hint}, got {td!r}"
    return None


def _segment_error(name: str, seg: str) -> str | None:
    if not seg:
        return f"{name} must not be empty"
    if seg in (".", ".."):
        return f"{name} must not be '.' or '..'"
    if not _SEGMENT.fullmatch(seg):
        return f"{name} may only contain letters, digits, '.', '-' and '_', got {seg!r}"
    return None


@dataclass(frozen=True)
class SpiffeId:
    """A workload identity; raises ``InvalidSpiffeId`` if any part breaks the SPIFFE-ID spec."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        reason = (trust_domain_error(self.trust_domain)
                  or _segment_error("namespace", self.namespace)
                  or _segment_error("service account", self.service_account))
        if reason:
            raise InvalidSpiffeId(f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}",
                                  reason)

    @property
    def principal(self) -> str:
        """The ID without its scheme, as policies write it: ``td/ns/N/sa/S``."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def uri(self) -> str:
        """The URI SAN form: ``spiffe://td/ns/N/sa/S``."""
        return SCHEME + self.principal

    def __str__(self) -> str:
        return self.uri


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse ``spiffe://td/ns/N/sa/S`` into a ``SpiffeId``.

    Raises ``InvalidSpiffeId`` for a wrong or uppercase scheme, a query, fragment, port or
    userinfo, an empty, '.' or '..' segment, a bad character, or any other path shape.
    """
    if not isinstance(uri, str):
        raise InvalidSpiffeId(repr(uri), f"must be a string, got {type(uri).__name__}")
    if not uri.startswith(SCHEME):
        raise InvalidSpiffeId(uri, "must start with 'spiffe://' (lowercase scheme)")
    if len(uri) > _MAX_URI:
        raise InvalidSpiffeId(uri, f"must be at most {_MAX_URI} characters, got {len(uri)}")
    return _parse_rest(uri, uri[len(SCHEME):])


def parse_principal(principal: str) -> SpiffeId:
    """Parse a policy principal ``td/ns/N/sa/S`` (a SPIFFE ID without its scheme).

    Raises ``InvalidSpiffeId`` as ``parse_spiffe_id`` does, and for a principal written with the
    scheme.
    """
    if not isinstance(principal, str):
        raise InvalidSpiffeId(repr(principal), f"must be a string, got {type(principal).__name__}")
    if principal.startswith(SCHEME):
        raise InvalidSpiffeId(principal, "write principals without the 'spiffe://' scheme")
    return _parse_rest(principal, principal)


def _parse_rest(original: str, rest: str) -> SpiffeId:
    if "?" in rest:
        raise InvalidSpiffeId(original, "must not contain a query ('?')")
    if "#" in rest:
        raise InvalidSpiffeId(original, "must not contain a fragment ('#')")
    td, slash, path = rest.partition("/")
    reason = trust_domain_error(td)
    if reason:
        raise InvalidSpiffeId(original, reason)
    if not slash:
        raise InvalidSpiffeId(original, "must have the path /ns/<namespace>/sa/<serviceAccount>")
    segments = path.split("/")
    for seg in segments:
        reason = _segment_error("path segment", seg)
        if reason:
            raise InvalidSpiffeId(original, reason)
    if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
        raise InvalidSpiffeId(original, f"path must be /ns/<namespace>/sa/<serviceAccount>, got /{path}")
    return SpiffeId(td, segments[1], segments[3])


def workload_spiffe_id(mesh_trust_domain: str, workload: Workload) -> SpiffeId:
    """The identity of ``workload`` in a mesh with trust domain ``mesh_trust_domain``."""
    return SpiffeId(mesh_trust_domain, workload.metadata.namespace, workload.spec.service_account)


# --- control-plane identities ---------------------------------------------------------------
# The controller, admins and node agents have SPIFFE IDs of their own, under a path that no
# workload ID can take (workload IDs always start with /ns/):
#   spiffe://<td>/nodemesh/controller      the controller's API server certificate
#   spiffe://<td>/nodemesh/admin/<name>    an admin client (the CLI)
#   spiffe://<td>/nodemesh/node/<name>     a node's agent (issued at join)

def controller_uri(trust_domain: str) -> str:
    return f"{SCHEME}{trust_domain}/nodemesh/controller"


def admin_uri(trust_domain: str, name: str) -> str:
    return f"{SCHEME}{trust_domain}/nodemesh/admin/{name}"


def node_uri(trust_domain: str, node: str) -> str:
    return f"{SCHEME}{trust_domain}/nodemesh/node/{node}"


def control_plane_role(uri: str, trust_domain: str) -> tuple[str, str] | None:
    """``("admin"|"node", name)`` for a control-plane URI of this trust domain, else None."""
    for role in ("admin", "node"):
        prefix = f"{SCHEME}{trust_domain}/nodemesh/{role}/"
        name = uri[len(prefix):] if uri.startswith(prefix) else ""
        if name and _SEGMENT.fullmatch(name) and name not in (".", ".."):
            return role, name
    return None
