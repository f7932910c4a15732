"""nodemesh's resource contract: kinds, validation, manifests and SPIFFE identities.

Pure and standard-library only (``manifest.py`` alone imports ``yaml``, loaded on first use of
the manifest functions): no I/O, no trio.
Everything may import this package; it imports nothing else of nodemesh.
"""
from __future__ import annotations

from controller.api.decode import decode_document, from_dict
from controller.api.duration import parse_duration
from controller.api.errors import (ApiError, FieldError, InvalidDuration, InvalidSpiffeId,
                                   ManifestError, Problem, UnknownKind)
from controller.api.ip import canonical_ip
from controller.api.kinds import KINDS, KindInfo, resolve_kind
from controller.api.meta import FrozenDict, ObjectMeta
from controller.api.resources import (API_VERSION, AuthorizationPolicy, AuthorizationPolicySpec,
                                      LoadBalancer, Locality, Mesh, MeshSpec, Operation, Resource,
                                      Rule, Service, ServicePort, ServiceSpec, Source, Workload,
                                      WorkloadSpec, to_dict)
from controller.api.spiffe import SpiffeId, parse_principal, parse_spiffe_id, workload_spiffe_id

__all__ = [
    "API_VERSION", "ApiError", "AuthorizationPolicy", "AuthorizationPolicySpec", "FieldError",
    "FrozenDict", "InvalidDuration", "InvalidSpiffeId", "KINDS", "KindInfo", "LoadBalancer",
    "Locality", "ManifestError", "Mesh", "MeshSpec", "ObjectMeta", "Operation", "Problem",
    "Resource", "Rule", "Service", "ServicePort", "ServiceSpec", "Source", "SpiffeId",
    "UnknownKind", "Workload", "WorkloadSpec", "canonical_ip", "decode_document", "dump_json",
    "dump_yaml", "from_dict", "parse_duration", "parse_manifests", "parse_principal", "parse_spiffe_id",
    "resolve_kind", "to_dict", "workload_spiffe_id",
]

_MANIFEST = ("dump_json", "dump_yaml", "parse_manifests")


def __getattr__(name: str):
    """The manifest functions load ``manifest.py`` (and yaml) on first use: the agent, which
    never reads YAML, imports this package without them (PEP 562)."""
    if name in _MANIFEST:
        from controller.api import manifest
        return getattr(manifest, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
