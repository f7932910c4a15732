"""identity_api.py: the controller's identity endpoints — join, certificates, bundle, tokens, rotation, status.

Who may get which certificate is decided here (the CA in ca.py only signs):
- ``join``: anyone holding a valid one-time token gets a node certificate for the token's node;
- ``certificates``: a node may renew its own node certificate, and get workload certificates
  only for identities of Workloads placed on that node (``spec.node``); anything else is 403
  and logged with the node and the identity asked for.
Refusals are logged. Knows nothing of sockets; routes are wired in handlers.py.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Callable

import trio

from controller import api, auth, datadir, pki
from controller.api.meta import dns_subdomain_error
from controller.api.spiffe import node_uri
from controller.ca import CertificateAuthority
from controller.httpd import HttpError, Request, Response
from controller.ledger import Issued, Ledger, NodeStatus, TokenRefused
from controller.ratelimit import PerSource
from controller.store import Store

log = logging.getLogger("nodemesh.identity")

NODE_CERT_TTL = dt.timedelta(days=7)
DEFAULT_TOKEN_TTL = 3600.0
DEFAULT_PROPAGATION = 60.0   # s; agents refresh their trust bundle every 30 s
MAX_TOKEN_TTL = 7 * 86400.0
JOIN_BURST, JOIN_RATE = 20, 1 / 3   # join attempts per source address: 20 at once, then one per 3 s


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class IdentityApi:
    d: datadir.DataDir
    settings: datadir.Settings
    ca: CertificateAuthority
    ledger: Ledger
    store: Store
    on_rotate: Callable[[], None] = lambda: None
    now: Callable[[], dt.datetime] = utcnow
    joins: PerSource = field(default_factory=lambda: PerSource(rate=JOIN_RATE, burst=JOIN_BURST))

    @property
    def trust_domain(self) -> str:
        return self.settings.trust_domain

    def routes(self) -> dict:
        """(method, path under the API prefix) -> (metric verb, auth verb or None for anonymous, handler)."""
        return {
            ("POST", "join"): ("join", None, self.join),
            ("POST", "certificates"): ("sign", auth.Verb.SIGN, self.certificates),
            ("GET", "trustbundle"): ("bundle", auth.Verb.READ, self.trust_bundle),
            ("POST", "tokens"): ("token", auth.Verb.ISSUE, self.create_token),
            ("POST", "ca/rotate"): ("rotate", auth.Verb.ISSUE, self.rotate),
            ("GET", "status"): ("status", auth.Verb.READ, self.status),
            ("POST", "nodestatus"): ("nodestatus", auth.Verb.SIGN, self.node_status),
        }

    # --- tokens and join ---------------------------------------------------------------------

    async def create_token(self, req: Request, caller: auth.Caller) -> Response:
        body = _object(req)
        node = body.get("node")
        if not isinstance(node, str) or dns_subdomain_error(node):
            raise HttpError(422, "Invalid", f"node: must be a node name (DNS subdomain), got {node!r}")
        ttl = body.get("ttlSeconds", DEFAULT_TOKEN_TTL)
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TOKEN_TTL:
            raise HttpError(422, "Invalid", f"ttlSeconds: must be between 1 and {MAX_TOKEN_TTL:.0f}, got {ttl!r}")
        now = self.now()
        token = await trio.to_thread.run_sync(lambda: self.ledger.create_token(node, ttl=ttl, now=now.timestamp()))
        expires = now + dt.timedelta(seconds=ttl)
        log.info("join token for node %s created by %s, expires %s", node, caller, _iso(expires))
        return Response.json(200, {"token": token, "node": node, "expires": _iso(expires)})

    async def join(self, req: Request, caller: auth.Caller) -> Response:
        source = req.peer_addr.rsplit(":", 1)[0]   # the address, not the connection
        wait = self.joins.allow(source, self.now().timestamp())
        if wait is not None:   # before any work: a token guesser gets nothing but this
            log.warning("join from %s refused: too many attempts", source)
            raise HttpError(429, "TooManyRequests", f"too many join attempts from {source}; "
                                                    f"retry in {wait:.0f}s", headers=[("retry-after", str(int(wait) + 1))])
        body = _object(req)
        token, csr_pem = body.get("token"), body.get("csr")
        if not isinstance(token, str) or not isinstance(csr_pem, str):
            raise HttpError(400, "BadRequest", 'body must be {"token": "...", "csr": "<PEM>"}')
        csr = _csr(csr_pem)  # check the CSR before spending the token
        now = self.now()
        try:
            node = await trio.to_thread.run_sync(lambda: self.ledger.redeem(token, now=now.timestamp(), by=req.peer_addr))
        except TokenRefused as e:
            log.warning("join refused from %s (node %s): %s", req.peer_addr, e.node or "?", e)
            raise HttpError(401, "Unauthorized", f"join refused: {e}") from None
        if csr.uri != node_uri(self.trust_domain, node):
            log.warning("join refused from %s: token is for node %s but the CSR asks for %s", req.peer_addr, node, csr.uri)
            raise HttpError(403, "Forbidden", f"the token is for node {node}; the CSR must ask for "
                                              f"{node_uri(self.trust_domain, node)}, not {csr.uri}")
        signed = await self._sign(csr, node, NODE_CERT_TTL, f"node {node}")
        log.info("node %s joined from %s", node, req.peer_addr)
        return Response.json(200, {"node": node, **signed})

    # --- certificates ------------------------------------------------------------------------

    async def certificates(self, req: Request, caller: auth.Caller) -> Response:
        body = _object(req)
        if not isinstance(body.get("csr"), str):
            raise HttpError(400, "BadRequest", 'body must be {"csr": "<PEM>"}')
        csr = _csr(body["csr"])
        node = caller.name
        if csr.uri == node_uri(self.trust_domain, node):
            return Response.json(200, await self._sign(csr, node, NODE_CERT_TTL, f"node {node}"))
        try:
            wanted = api.parse_spiffe_id(csr.uri)
        except api.InvalidSpiffeId as e:
            self._refuse(node, csr.uri, "not a workload SPIFFE ID")
            raise HttpError(403, "Forbidden", f"{csr.uri} is not a workload identity: {e}") from None
        if wanted.trust_domain != self.trust_domain:
            self._refuse(node, csr.uri, "another trust domain")
            raise HttpError(403, "Forbidden", f"{csr.uri} is not in trust domain {self.trust_domain}")
        workloads, _ = await trio.to_thread.run_sync(self.store.list, "Workload", wanted.namespace)
        if not any(w["spec"]["node"] == node and w["spec"].get("serviceAccount", "default") == wanted.service_account
                   for w in workloads):
            self._refuse(node, csr.uri, "no workload with this identity is placed on the node")
            raise HttpError(403, "Forbidden", f"node {node} runs no workload with identity {csr.uri} "
                                              f"(no Workload in namespace {wanted.namespace} with serviceAccount "
                                              f"{wanted.service_account} and spec.node {node})")
        ttl = await trio.to_thread.run_sync(self._workload_ttl)
        return Response.json(200, await self._sign(csr, node, ttl, wanted.principal))

    def _refuse(self, node: str, identity: str, why: str) -> None:
        log.warning("certificate refused: node %s asked for %s: %s", node, identity, why)

    def _workload_ttl(self) -> dt.timedelta:
        mesh = self.store.get("Mesh", "", "default")
        ttl = (mesh or {}).get("spec", {}).get("certificateTTL", "24h")
        return dt.timedelta(seconds=api.parse_duration(ttl))

    async def _sign(self, csr: pki.Csr, node: str, ttl: dt.timedelta, label: str) -> dict:
        await self.activate_due()
        now = self.now()
        signed = self.ca.sign(csr, now=now, ttl=ttl, common_name=label)
        cert = signed.cert
        record = Issued(pki.serial_hex(cert), node, csr.uri, signed.issuer_serial,
                        cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())
        await trio.to_thread.run_sync(self.ledger.record, record)
        log.info("issued %s to node %s, expires %s", csr.uri, node, _iso(cert.not_valid_after_utc))
        return {"certificate": signed.chain_pem.decode(), "trustBundle": signed.bundle_pem.decode(),
                "expires": _iso(cert.not_valid_after_utc)}

    # --- bundle, rotation, status ------------------------------------------------------------

    async def trust_bundle(self, req: Request, caller: auth.Caller) -> Response:
        await self.activate_due()
        return Response.json(200, {"trustBundle": self.ca.bundle_pem(self.now()).decode()})

    async def rotate(self, req: Request, caller: auth.Caller) -> Response:
        """A new root is trusted now and signs after ``propagationSeconds`` (default 60 s, twice the
        agents' bundle refresh), so no agent meets a new-root certificate before it trusts it."""
        body = _object(req)
        delay = body.get("propagationSeconds", DEFAULT_PROPAGATION)
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay <= 86400:
            raise HttpError(422, "Invalid", f"propagationSeconds: must be between 0 and 86400, got {delay!r}")
        now = self.now()
        old = self.ca.issuer.cert
        try:
            new = self.ca.rotate(now=now, activate_at=now + dt.timedelta(seconds=delay),
                                 common_name=f"nodemesh root CA {self.trust_domain} {now:%Y-%m-%d %H:%M:%S}")
        except pki.PkiError as e:
            raise HttpError(409, "Conflict", str(e)) from None
        self.on_rotate()
        log.warning("CA rotation started by %s: new root %s trusted now, signs from %s", caller,
                    pki.serial_hex(new), _iso(now + dt.timedelta(seconds=delay)))
        await self.activate_due()
        return Response.json(200, {"root": pki.serial_hex(new), "retiredRoot": pki.serial_hex(old),
                                   "signsFrom": _iso(now + dt.timedelta(seconds=delay)),
                                   "active": self.ca.issuer_serial == pki.serial_hex(new)})

    async def activate_due(self) -> None:
        """Finish a pending rotation whose time has come: the new root signs, the controller's
        own certificates are re-issued from it, the old root stays trusted until its last leaf expires."""
        pending = self.ca.pending()
        now = self.now()
        if pending is None or now < pending[1]:
            return
        old = self.ca.issuer_serial
        last = await trio.to_thread.run_sync(self.ledger.last_expiry_by, old)
        until = max(dt.datetime.fromtimestamp(last, dt.timezone.utc) if last else now, now)
        new = self.ca.activate(now=now, old_valid_until=until)
        if new is None:
            return
        datadir.issue_own_certificates(self.d, new, self.settings, now=now)
        self.on_rotate()
        log.warning("CA rotation done: root %s signs now; old root %s trusted until %s",
                    pki.serial_hex(new.cert), old, _iso(until))

    async def node_status(self, req: Request, caller: auth.Caller) -> Response:
        """An agent reports the resourceVersion it serves, whether it is ready, and its last error."""
        body = _object(req)
        version, ready, error = body.get("version"), body.get("ready"), body.get("error", "")
        if not isinstance(version, int) or isinstance(version, bool) or not isinstance(ready, bool) \
                or not isinstance(error, str):
            raise HttpError(400, "BadRequest", 'body must be {"version": int, "ready": bool, "error": str}')
        status = NodeStatus(caller.name, version, ready, error[:2000], self.now().timestamp())
        await trio.to_thread.run_sync(self.ledger.report, status)
        return Response.json(200, {"node": caller.name, "version": version})

    async def status(self, req: Request, caller: auth.Caller) -> Response:
        now = self.now()
        current = await trio.to_thread.run_sync(lambda: self.ledger.current(now=now.timestamp()))
        reports = await trio.to_thread.run_sync(self.ledger.node_statuses)
        nodes: dict[str, dict] = {}
        for name, rep in sorted(reports.items()):
            nodes[name] = {"node": name, "nodeCertificateExpires": None, "identities": 0, "nearestExpiry": None}
        for rec in current:
            n = nodes.setdefault(rec.node, {"node": rec.node, "nodeCertificateExpires": None,
                                            "identities": 0, "nearestExpiry": None})
            if rec.identity == node_uri(self.trust_domain, rec.node):
                n["nodeCertificateExpires"] = _iso_ts(rec.not_after)
            else:
                n["identities"] += 1
            if n["nearestExpiry"] is None or rec.not_after < n["_nearest"]:
                n["_nearest"], n["nearestExpiry"] = rec.not_after, _iso_ts(rec.not_after)
                n["nearestIdentity"] = rec.identity
        for n in nodes.values():
            n.pop("_nearest", None)
            rep = reports.get(n["node"])
            n["version"] = rep.version if rep else None
            n["ready"] = rep.ready if rep else None
            n["error"] = rep.error if rep else ""
            n["reported"] = _iso_ts(rep.reported) if rep else None
        own = [("ca", self.ca.issuer.cert)] + [("retired-root", c) for c, _ in self.ca.retired()] + [
            ("controller", pki.load_cert(self.d.server_cert)), ("admin", pki.load_cert(self.d.admin_cert))]
        return Response.json(200, {
            "trustDomain": self.trust_domain,
            "resourceVersion": str(self.store.revision),
            "nodes": list(nodes.values()),
            "certificates": [{"name": name, "serial": pki.serial_hex(c), "expires": _iso(c.not_valid_after_utc)}
                             for name, c in own],
            "retiredRoots": [{"serial": pki.serial_hex(c), "trustedUntil": _iso(u)} for c, u in self.ca.retired()],
            "pendingRoot": ({"serial": pki.serial_hex(self.ca.pending()[0]), "signsFrom": _iso(self.ca.pending()[1])}
                            if self.ca.pending() else None),
        })


def _object(req: Request) -> dict:
    body = req.json()
    if not isinstance(body, dict):
        raise HttpError(400, "BadRequest", "body must be a JSON object")
    return body


def _csr(pem: str) -> pki.Csr:
    try:
        return pki.parse_csr(pem)
    except pki.CsrError as e:
        raise HttpError(400, "BadRequest", f"csr: {e}") from None


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_ts(ts: float) -> str:
    return _iso(dt.datetime.fromtimestamp(ts, dt.timezone.utc))
