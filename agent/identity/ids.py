"""ids.py: which URIs are identities an agent holds or accepts from a peer.

Workload IDs (``spiffe://td/ns/N/sa/S``) and the control-plane IDs of ``controller.api.spiffe``
(``spiffe://td/nodemesh/node/<name>`` and friends). Syntax only, from the contract; no I/O.
"""
from __future__ import annotations

from controller.api.errors import InvalidSpiffeId
from controller.api.spiffe import (
    SCHEME, SpiffeId, control_plane_role, controller_uri, parse_spiffe_id, trust_domain_error,
)


def parse_identity(uri: str) -> SpiffeId | str:
    """A workload URI as a ``SpiffeId``; a control-plane URI (node, admin, controller) as itself.

    Raises ``InvalidSpiffeId`` for anything else.
    """
    try:
        return parse_spiffe_id(uri)
    except InvalidSpiffeId as workload_error:
        if isinstance(uri, str) and uri.startswith(SCHEME):
            td = uri[len(SCHEME):].partition("/")[0]
            if trust_domain_error(td) is None and (
                    uri == controller_uri(td) or control_plane_role(uri, td) is not None):
                return uri
        raise workload_error
