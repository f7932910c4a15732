"""join.py: the agent's node identity — join once with a token, then reuse and renew.

On first start the agent reads the one-time token, makes a key and a CSR for
``spiffe://<td>/nodemesh/node/<node>`` (the key never leaves), and joins. The node certificate
and the trust bundle are kept in the identity state dir, where the IdentityManager finds them
after a restart and renews them like any identity. A token is only needed again if the node
certificate expired while the agent was down. Keys, CSRs and checks run in x509_proc's child
process (one per step), so the agent never imports cryptography.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from agent.identity import x509_proc
from agent.identity.errors import BadCertificate, X509ChildError
from agent.identity.store import StateDir
from agent.sync.client import ControlPlane, Refused
from controller.api.spiffe import node_uri

log = logging.getLogger("nodemesh.agent.bootstrap")


TRUST_DOMAIN_FILE = "trust-domain"


class JoinError(Exception):
    """The agent cannot get a node identity; the message says what to do."""


async def saved_node_identity(state: StateDir, uri: str, now: dt.datetime) -> tuple[Path, Path] | None:
    """The (chain, key) files of a saved node certificate that is still valid, else None.

    Raises ``JoinError`` when the check itself cannot run (x509_proc's child failed).
    """
    saved, bundle = state.load(uri), state.load_bundle()
    if saved is None or bundle is None:
        return None
    chain, key = saved
    try:
        x509_proc.value((await _x509([x509_proc.check_chain(uri, chain, bundle, key, now)]))[0])
    except (BadCertificate, ValueError) as e:   # any problem with the saved files means "join again"
        log.warning("the saved node certificate is unusable (%s); joining again", e)
        return None
    return state.files(uri)


async def _x509(ops: list[x509_proc.Op]) -> list[x509_proc.Outcome]:
    try:
        return await x509_proc.run_in_child(ops)
    except X509ChildError as e:
        raise JoinError(f"cannot make keys or check certificates: {e}") from None


async def trust_domain(cp: ControlPlane, state: StateDir) -> str:
    """The mesh's trust domain: remembered from the join, so a restart needs no controller."""
    try:
        return (state.path / TRUST_DOMAIN_FILE).read_text().strip()
    except FileNotFoundError:
        return await cp.trust_domain()


async def join(cp: ControlPlane, state: StateDir, *, node: str, token_file: Path | None,
               now: dt.datetime) -> tuple[str, tuple[Path, Path], bytes]:
    """Return (node URI, (chain file, key file), trust bundle), joining with the token if needed."""
    td = await trust_domain(cp, state)
    uri = node_uri(td, node)
    files = await saved_node_identity(state, uri, now)
    if files is not None:
        log.info("using the saved node certificate for %s", uri)
        return uri, files, state.load_bundle()
    if token_file is None:
        raise JoinError(f"node {node} has no valid node certificate in {state.path}: pass --token FILE "
                        f"(create one with 'nodemesh token create --node {node}')")
    try:
        token = Path(token_file).read_text().strip()
    except OSError as e:
        raise JoinError(f"cannot read the join token {token_file}: {e}") from None
    key, csr = x509_proc.value((await _x509([x509_proc.key_and_csr(uri)]))[0])
    try:
        signed = await cp.join(token, csr)
    except Refused as e:
        raise JoinError(f"the controller refused to let node {node} join: {e}") from None
    x509_proc.value((await _x509([x509_proc.check_chain(uri, signed.chain_pem, signed.bundle_pem, key, now)]))[0])
    files = state.save(uri, signed.chain_pem, key)
    state.save_bundle(signed.bundle_pem)
    (state.path / TRUST_DOMAIN_FILE).write_text(td + "\n")
    log.info("joined as %s", uri)
    return uri, files, signed.bundle_pem
