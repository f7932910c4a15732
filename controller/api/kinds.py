"""The registry of resource kinds and the names users may call them by.

Owns kind, plural, singular and short names and each kind's scope, as the CLI and the HTTP
API resolve them. Knows nothing of validation or storage.
"""
from __future__ import annotations

from dataclasses import dataclass

from controller.api.errors import UnknownKind
from controller.api.resources import AuthorizationPolicy, Mesh, Service, Workload


@dataclass(frozen=True)
class KindInfo:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    namespaced: bool
    cls: type


KINDS: dict[str, KindInfo] = {
    info.kind: info for info in (
        KindInfo("Mesh", "meshes", "mesh", (), Mesh.namespaced, Mesh),
        KindInfo("Workload", "workloads", "workload", ("wl",), Workload.namespaced, Workload),
        KindInfo("Service", "services", "service", ("svc",), Service.namespaced, Service),
        KindInfo("AuthorizationPolicy", "authorizationpolicies", "authorizationpolicy", ("ap",),
                 AuthorizationPolicy.namespaced, AuthorizationPolicy),
    )
}

_NAMES: dict[str, KindInfo] = {
    name.lower(): info
    for info in KINDS.values()
    for name in (info.kind, info.plural, info.singular, *info.short_names)
}


def resolve_kind(name: str) -> KindInfo:
    """The kind called ``name`` (kind, plural, singular or short name, any case).

    Raises ``UnknownKind``, whose message lists the valid kinds.
    """
    info = _NAMES.get(name.lower()) if isinstance(name, str) else None
    if info is None:
        raise UnknownKind(name, tuple(
            f"{i.kind} ({', '.join((i.plural, *i.short_names))})" for i in KINDS.values()))
    return info
