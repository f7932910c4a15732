"""Identity over the real API: join tokens, node-scoped workload certificates, rotation, status."""
from __future__ import annotations

import datetime as dt
import logging
import ssl

import httpx
import pytest
import trio
from cryptography import x509

from controller import client, ledger, pki
from controller.api.spiffe import node_uri
from controller.identity_api import JOIN_BURST
from controller.ratelimit import PerSource
from tests.controller.test_api_server import MESH

PREFIX = "/apis/nodemesh.io/v1alpha1"
WEB = "spiffe://cluster.local/ns/shop/sa/web"


def workload(name: str, node: str, sa: str = "web") -> dict:
    return {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Workload",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": sa}},
            "spec": {"node": node, "serviceAccount": sa, "addresses": ["10.10.1.2"],
                     "netns": f"/var/run/netns/{name}"}}


class Agent:
    """What a node's agent does over HTTP, with keys that stay here (only CSRs leave)."""

    def __init__(self, controller, tmp_path, node: str):
        self.c, self.tmp, self.node = controller, tmp_path, node
        self.cert_path = self.key_path = None

    def _post(self, path: str, body: dict, *, authenticated: bool) -> httpx.Response:
        ctx = ssl.create_default_context(cafile=str(self.c.d.bundle))
        if authenticated:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        return httpx.post(self.c.url + PREFIX + path, json=body, verify=ctx)

    def csr(self, uri: str):
        key = pki.generate_key()
        return key, pki.csr_pem(uri, key).decode()

    def join(self, token: str, uri: str | None = None) -> httpx.Response:
        key, csr = self.csr(uri or node_uri("cluster.local", self.node))
        r = self._post("/join", {"token": token, "csr": csr}, authenticated=False)
        if r.status_code == 200:
            self.cert_path, self.key_path = self.tmp / f"{self.node}.crt", self.tmp / f"{self.node}.key"
            pki.write_file(self.cert_path, r.json()["certificate"].encode(), secret=False)
            pki.write_file(self.key_path, pki.key_pem(key), secret=True)
        return r

    def sign(self, uri: str) -> tuple[httpx.Response, object]:
        key, csr = self.csr(uri)
        return self._post("/certificates", {"csr": csr}, authenticated=True), key


async def token_for(controller, node: str, ttl: float = 3600) -> str:
    c = controller.client()
    return (await controller.call(c.create_token, node, ttl))["token"]


def leaf(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem.encode())[0]


async def test_join_then_node_scoped_workload_certificates(controller, tmp_path, caplog):
    c = controller.client()
    mesh = dict(MESH, spec={**MESH["spec"], "certificateTTL": "2h"})
    await controller.call(c.apply, [mesh, workload("web-1", "node-1"), workload("db-1", "node-2", sa="db")])
    agent = Agent(controller, tmp_path, "node-1")
    r = await trio.to_thread.run_sync(agent.join, await token_for(controller, "node-1"))
    assert r.status_code == 200, r.text
    node_cert = leaf(r.json()["certificate"])
    assert pki.uri_sans(node_cert) == [node_uri("cluster.local", "node-1")]
    node_cert.verify_directly_issued_by(x509.load_pem_x509_certificate(r.json()["trustBundle"].encode()))

    r, key = await trio.to_thread.run_sync(agent.sign, WEB)
    assert r.status_code == 200, r.text
    cert = leaf(r.json()["certificate"])
    assert pki.uri_sans(cert) == [WEB]
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(hours=2, minutes=5)  # Mesh TTL + backdate

    caplog.set_level(logging.WARNING, logger="nodemesh.identity")
    r, _ = await trio.to_thread.run_sync(agent.sign, "spiffe://cluster.local/ns/shop/sa/db")
    assert r.status_code == 403 and "node node-1 runs no workload with identity" in r.json()["message"]
    assert "certificate refused: node node-1 asked for spiffe://cluster.local/ns/shop/sa/db" in caplog.text
    r, _ = await trio.to_thread.run_sync(agent.sign, "spiffe://other.org/ns/shop/sa/web")
    assert r.status_code == 403
    r, _ = await trio.to_thread.run_sync(agent.sign, node_uri("cluster.local", "node-2"))
    assert r.status_code == 403  # another node's identity is not a workload identity either

    r, _ = await trio.to_thread.run_sync(agent.sign, node_uri("cluster.local", "node-1"))
    assert r.status_code == 200  # renewal of its own node certificate

    s = await controller.call(c.status)
    (n1,) = s["nodes"]
    assert n1["node"] == "node-1" and n1["identities"] == 1 and n1["nearestIdentity"] == WEB


async def test_token_reuse_forgery_expiry_and_wrong_node_are_refused_and_logged(controller, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="nodemesh.identity")
    token = await token_for(controller, "node-1")
    agent = Agent(controller, tmp_path, "node-1")
    assert (await trio.to_thread.run_sync(agent.join, token)).status_code == 200

    r = await trio.to_thread.run_sync(agent.join, token)
    assert r.status_code == 401 and "already used" in r.json()["message"]

    token_id = token.split(".")[0]
    r = await trio.to_thread.run_sync(agent.join, token_id + ".not-the-secret")
    assert r.status_code == 401 and "forged" in r.json()["message"]
    r = await trio.to_thread.run_sync(agent.join, "nonsense")
    assert r.status_code == 401 and "malformed" in r.json()["message"]

    short = await token_for(controller, "node-1", ttl=0.001)
    await trio.sleep(0.01)
    r = await trio.to_thread.run_sync(agent.join, short)
    assert r.status_code == 401 and "expired" in r.json()["message"]

    other = await token_for(controller, "node-2")
    r = await trio.to_thread.run_sync(lambda: agent.join(other, node_uri("cluster.local", "node-1")))
    assert r.status_code == 403 and "the token is for node node-2" in r.json()["message"]
    for reason in ("already used", "forged", "malformed", "expired"):
        assert reason in caplog.text


async def test_only_nodes_sign_and_only_admins_make_tokens(controller, tmp_path):
    anon = Agent(controller, tmp_path, "x")
    key, csr = anon.csr(WEB)
    r = await trio.to_thread.run_sync(lambda: anon._post("/certificates", {"csr": csr}, authenticated=False))
    assert r.status_code == 401
    anon.cert_path, anon.key_path = controller.d.admin_cert, controller.d.admin_key
    r = await trio.to_thread.run_sync(lambda: anon._post("/certificates", {"csr": csr}, authenticated=True))
    assert r.status_code == 403  # an admin is not a node

    agent = Agent(controller, tmp_path, "node-1")
    await trio.to_thread.run_sync(agent.join, await token_for(controller, "node-1"))
    r = await trio.to_thread.run_sync(lambda: agent._post("/tokens", {"node": "node-9"}, authenticated=True))
    assert r.status_code == 403


def ctx_for(cert_path, key_path, bundle_pem: bytes, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    return ctx


async def mtls_handshake(server_ctx, client_ctx) -> str:
    """A real TLS 1.3 handshake over loopback; returns the URI the server saw."""
    seen = []
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as n:
        async def serve():
            raw = await listener.accept()
            s = trio.SSLStream(raw, server_ctx, server_side=True)
            await s.do_handshake()
            seen.append(pki.uri_sans(x509.load_der_x509_certificate(s.getpeercert(binary_form=True))))
            await s.aclose()
        n.start_soon(serve)
        c = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_ctx, server_side=False)
        await c.do_handshake()
        await c.receive_some(1)
        await c.aclose()
    await listener.aclose()
    return seen[0][0]


async def test_rotation_keeps_old_and_new_certificates_talking(controller, tmp_path):
    c = controller.client()
    await controller.call(c.apply, [MESH, workload("web-1", "node-1"), workload("fe-1", "node-1", sa="frontend")])
    agent = Agent(controller, tmp_path, "node-1")
    await trio.to_thread.run_sync(agent.join, await token_for(controller, "node-1"))
    r, old_key = await trio.to_thread.run_sync(agent.sign, WEB)
    old_pem = r.json()["certificate"]
    old_root_serial = format(leaf(r.json()["trustBundle"]).serial_number, "x")

    reply = await controller.call(c.rotate_ca, 0)
    assert reply["retiredRoot"] == old_root_serial
    assert reply["active"]
    # The admin credential and the API certificate were re-issued from the new root, and the CLI
    # (which verifies with ca/bundle.crt) still works.
    c2 = controller.client()
    s = await controller.call(c2.status)
    assert s["retiredRoots"][0]["serial"] == old_root_serial

    # The node certificate from the old root still authenticates (bundle keeps the old root).
    r, new_key = await trio.to_thread.run_sync(agent.sign, "spiffe://cluster.local/ns/shop/sa/frontend")
    assert r.status_code == 200
    bundle = r.json()["trustBundle"].encode()
    assert len(x509.load_pem_x509_certificates(bundle)) == 2
    new_pem = r.json()["certificate"]
    assert format(leaf(new_pem).serial_number, "x") != old_root_serial
    new_root = x509.load_pem_x509_certificates(bundle)[0]
    leaf(new_pem).verify_directly_issued_by(new_root)

    paths = {}
    for name, pem, key in (("old", old_pem, old_key), ("new", new_pem, new_key)):
        paths[name] = (tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        pki.write_file(paths[name][0], pem.encode(), secret=False)
        pki.write_file(paths[name][1], pki.key_pem(key), secret=True)
    with trio.fail_after(10):
        # old-root server, new-root client, and the other way round
        assert await mtls_handshake(ctx_for(*paths["old"], bundle, True), ctx_for(*paths["new"], bundle, False)) == \
            "spiffe://cluster.local/ns/shop/sa/frontend"
        assert await mtls_handshake(ctx_for(*paths["new"], bundle, True), ctx_for(*paths["old"], bundle, False)) == WEB


def test_ledger_tokens_are_one_time_and_expire(tmp_path):
    lg = ledger.Ledger(tmp_path / "identity.db")
    t = lg.create_token("node-1", ttl=60, now=1000.0)
    with pytest.raises(ledger.TokenRefused) as e:
        lg.redeem(t, now=1060.0, by="test")
    assert e.value.reason == "expired"
    t2 = lg.create_token("node-1", ttl=60, now=1000.0)
    assert lg.redeem(t2, now=1059.0, by="a") == "node-1"
    with pytest.raises(ledger.TokenRefused) as e:
        lg.redeem(t2, now=1059.5, by="b")
    assert e.value.reason == "used" and "by a" in str(e.value)
    lg.close()
    # Survives a restart: the token is still spent.
    lg = ledger.Ledger(tmp_path / "identity.db")
    with pytest.raises(ledger.TokenRefused):
        lg.redeem(t2, now=1059.6, by="c")


async def test_a_users_intermediate_ca_signs_and_chains_to_their_root(tmp_path, nursery):
    from controller import app, datadir
    from tests.controller.conftest import Running
    now = dt.datetime.now(dt.timezone.utc)
    root = pki.create_root("corp root", now=now, ttl=dt.timedelta(days=30))
    inter_key = pki.generate_key()
    inter = pki.Issuer(_intermediate(root, inter_key, now), inter_key)
    for name, data, secret in (("root.crt", pki.cert_pem(root.cert), False), ("int.crt", pki.cert_pem(inter.cert), False),
                               ("int.key", pki.key_pem(inter_key), True)):
        pki.write_file(tmp_path / name, data, secret=secret)
    d = datadir.DataDir(tmp_path / "controller")
    with pytest.raises(datadir.DataDirError, match="intermediate"):
        datadir.initialise(d, trust_domain="cluster.local", server_names=("127.0.0.1",),
                           ca_cert=tmp_path / "int.crt", ca_key=tmp_path / "int.key")
    assert datadir.initialise(d, trust_domain="cluster.local", server_names=("127.0.0.1",),
                              ca_cert=tmp_path / "int.crt", ca_key=tmp_path / "int.key",
                              ca_bundle=tmp_path / "root.crt")
    ports = await nursery.start(lambda task_status: app.run(d, api_host="127.0.0.1", api_port=0, metrics_host="127.0.0.1",
                                                            metrics_port=0, task_status=task_status))
    ctl = Running(d, f"https://127.0.0.1:{ports[0]}", "")
    agent = Agent(ctl, tmp_path, "node-1")
    r = await trio.to_thread.run_sync(agent.join, await token_for(ctl, "node-1"))
    assert r.status_code == 200, r.text
    chain = x509.load_pem_x509_certificates(r.json()["certificate"].encode())
    assert len(chain) == 2 and chain[1].subject == inter.cert.subject     # leaf + intermediate
    chain[0].verify_directly_issued_by(chain[1])
    chain[1].verify_directly_issued_by(x509.load_pem_x509_certificate(r.json()["trustBundle"].encode()))
    c = ctl.client()
    with pytest.raises(client.ApiStatusError) as e:
        await ctl.call(c.rotate_ca)   # the user's CA is rotated by the user
    assert e.value.code == 409 and "intermediate" in str(e.value)


def _intermediate(root, key, now):
    from cryptography.hazmat.primitives import hashes
    return (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string("CN=corp mesh intermediate"))
            .issuer_name(root.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=20))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(root.key, hashes.SHA256()))


async def test_a_new_root_is_trusted_before_it_signs(controller, tmp_path):
    c = controller.client()
    await controller.call(c.apply, [MESH, workload("web-1", "node-1")])
    agent = Agent(controller, tmp_path, "node-1")
    await trio.to_thread.run_sync(agent.join, await token_for(controller, "node-1"))
    reply = await controller.call(c.rotate_ca, 3600)
    assert not reply["active"]
    r, _ = await trio.to_thread.run_sync(agent.sign, WEB)
    bundle = x509.load_pem_x509_certificates(r.json()["trustBundle"].encode())
    assert [format(b.serial_number, "x") for b in bundle][-1] == reply["root"]      # trusted already ...
    issuer_serials = [format(b.serial_number, "x") for b in bundle if b.subject == leaf(r.json()["certificate"]).issuer]
    assert issuer_serials == [reply["retiredRoot"]]                                  # ... the old root still signs
    s = await controller.call(c.status)
    assert s["pendingRoot"]["serial"] == reply["root"]
    with pytest.raises(client.ApiStatusError) as e:
        await controller.call(c.rotate_ca, 0)
    assert e.value.code == 409 and "already under way" in str(e.value)


async def test_join_attempts_are_rate_limited_per_source_address(controller):
    """A token guesser gets 429 with Retry-After once its address has used its burst; another
    address is not held back by it."""
    ctx = ssl.create_default_context(cafile=str(controller.d.bundle))

    def attempt(source: str) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source, verify=ctx)) as c:
            return c.post(controller.url + PREFIX + "/join", json={"token": "guess", "csr": "x"})

    codes = [(await trio.to_thread.run_sync(attempt, "127.0.0.1")).status_code for _ in range(JOIN_BURST)]
    assert 429 not in codes, codes                      # the burst is served (and refused on its merits)
    r = await trio.to_thread.run_sync(attempt, "127.0.0.1")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, (r.status_code, r.text)
    assert "too many join attempts from 127.0.0.1" in r.json()["message"]
    assert (await trio.to_thread.run_sync(attempt, "127.0.0.2")).status_code != 429


def test_per_source_buckets_refill_at_their_rate():
    b = PerSource(rate=0.5, burst=2)
    assert b.allow("a", 0.0) is None and b.allow("a", 0.0) is None
    assert b.allow("a", 0.0) == pytest.approx(2.0)     # one token takes 2 s at 0.5/s
    assert b.allow("b", 0.0) is None                    # another source has its own bucket
    assert b.allow("a", 1.0) == pytest.approx(1.0)
    assert b.allow("a", 2.0) is None
    small = PerSource(rate=1.0, burst=1, max_keys=2)
    for i, key in enumerate("xyz"):
        assert small.allow(key, float(i)) is None
    assert len(small._buckets) <= 2                     # quiet or oldest sources are forgotten
