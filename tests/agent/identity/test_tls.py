"""Real TLS 1.3 handshakes over loopback TCP between contexts of real IdentityManagers.

Real clock throughout: OpenSSL checks certificate validity against the wall clock.
"""
from __future__ import annotations

import datetime as dt
import random
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import pytest
import trio

from agent.identity import IdentityManager, PeerIdentityError, PeerNotAllowed, check_peer, peer_identity
from controller import pki
from controller.api.spiffe import SpiffeId
from tests.agent.identity.conftest import DB, NODE, TD, WEB, RealSigner


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def manager_for(signer: RealSigner, seed: int = 1) -> IdentityManager:
    return IdentityManager(signer, rng=random.Random(seed))


@pytest.fixture
def signer(root):
    return RealSigner(root, utcnow)


@asynccontextmanager
async def tcp_pair():
    """A connected (server, client) pair of loopback TCP streams."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    try:
        yield server, client
    finally:
        for s in (client, server, listener):
            await trio.aclose_forcefully(s)


async def handshake(tcp, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext):
    """Handshake both sides at once: ``(server, client, {side: BrokenResourceError})``."""
    server = trio.SSLStream(tcp[0], server_ctx, server_side=True)
    client = trio.SSLStream(tcp[1], client_ctx, server_hostname=None)
    errors: dict[str, trio.BrokenResourceError] = {}

    async def side(name: str, stream: trio.SSLStream) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as e:
            errors[name] = e
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as n:
        n.start_soon(side, "server", server)
        n.start_soon(side, "client", client)
    return server, client, errors


async def echo(server: trio.SSLStream, client: trio.SSLStream) -> bytes:
    await client.send_all(b"ping")
    await server.send_all((await server.receive_some(100)).upper())
    return await client.receive_some(100)


def verify_failed(err: BaseException) -> bool:
    cause = err.__cause__
    return isinstance(cause, ssl.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(cause).upper().replace(" ", "_")


async def test_mutual_tls_both_sides_see_the_other_spiffe_id(signer):
    node1, node2 = manager_for(signer, 1), manager_for(signer, 2)
    with trio.fail_after(10):
        await node1.certified(WEB)
        await node2.certified(DB)
        async with tcp_pair() as tcp:
            server, client, errors = await handshake(tcp, node2.server_context(DB), node1.client_context(WEB))
            assert errors == {}
            assert peer_identity(server) == SpiffeId(TD, "shop", "web")
            assert peer_identity(client) == SpiffeId(TD, "shop", "db")
            assert peer_identity(server._ssl_object) == SpiffeId(TD, "shop", "web")   # the SSLObject too
            assert server.selected_alpn_protocol() == client.selected_alpn_protocol() == "h2"
            assert client.version() == "TLSv1.3"
            assert await echo(server, client) == b"PING"


async def test_context_settings(signer):
    m = manager_for(signer)
    await m.certified(WEB)
    for ctx in (m.server_context(WEB), m.client_context(WEB)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is False


async def test_node_identity_handshakes_and_is_returned_as_its_uri(signer):
    node, peer = manager_for(signer, 1), manager_for(signer, 2)
    with trio.fail_after(10):
        await node.certified(NODE)
        await peer.certified(DB)
        async with tcp_pair() as tcp:
            server, client, errors = await handshake(tcp, peer.server_context(DB), node.client_context(NODE))
            assert errors == {}
            assert peer_identity(server) == NODE


async def test_a_client_from_another_ca_is_rejected(signer, root, epoch):
    other_root = pki.create_root("other mesh", now=epoch, ttl=dt.timedelta(days=30))
    # the intruder trusts our root (so it accepts our server) but its own cert is another CA's
    ours = manager_for(signer, 1)
    theirs = manager_for(RealSigner(other_root, utcnow, bundle=[other_root, root]), 2)
    with trio.fail_after(10):
        await ours.certified(DB)
        await theirs.certified(WEB)        # same SPIFFE ID, wrong CA
        async with tcp_pair() as tcp:
            server, client, errors = await handshake(tcp, ours.server_context(DB), theirs.client_context(WEB))
            assert "server" in errors and verify_failed(errors["server"])
            if "client" not in errors:     # TLS 1.3: the client learns on its first read
                with pytest.raises(trio.BrokenResourceError):
                    await client.send_all(b"x")
                    await client.receive_some(10)


async def test_a_server_from_another_ca_is_rejected(signer, epoch):
    other_root = pki.create_root("other mesh", now=epoch, ttl=dt.timedelta(days=30))
    ours, theirs = manager_for(signer, 1), manager_for(RealSigner(other_root, utcnow), 2)
    with trio.fail_after(10):
        await ours.certified(WEB)
        await theirs.certified(DB)
        async with tcp_pair() as tcp:
            _, _, errors = await handshake(tcp, theirs.server_context(DB), ours.client_context(WEB))
            assert "client" in errors and verify_failed(errors["client"])


async def test_a_client_without_a_certificate_is_rejected(signer):
    m = manager_for(signer)
    with trio.fail_after(10):
        await m.certified(DB)
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.check_hostname = False
        anonymous.load_verify_locations(cadata=m.bundle_pem.decode())
        async with tcp_pair() as tcp:
            server, client, errors = await handshake(tcp, m.server_context(DB), anonymous)
            assert "server" in errors
            assert "CERTIFICATE" in str(errors["server"].__cause__).upper()


async def test_check_peer_refuses_an_identity_outside_the_allowed_set(signer):
    node1, node2 = manager_for(signer, 1), manager_for(signer, 2)
    with trio.fail_after(10):
        await node1.certified(WEB)
        await node2.certified(DB)
        async with tcp_pair() as tcp:
            server, _, errors = await handshake(tcp, node2.server_context(DB), node1.client_context(WEB))
            assert errors == {}
            peer = peer_identity(server)
    assert check_peer(peer, {WEB}) == WEB
    with pytest.raises(PeerNotAllowed) as err:
        check_peer(peer, {DB, NODE})
    assert err.value.peer == WEB and err.value.allowed == frozenset({DB, NODE})
    assert check_peer(peer, lambda uri: uri.startswith(f"spiffe://{TD}/ns/shop/")) == WEB
    with pytest.raises(PeerNotAllowed) as err:
        check_peer(peer, lambda uri: uri.endswith("/sa/db"))
    assert callable(err.value.allowed)
    with pytest.raises(TypeError):
        check_peer(peer, WEB)     # a bare string is not a set of URIs


async def test_root_rotation_old_and_new_roots_interoperate(epoch):
    old = pki.create_root("root 1", now=epoch, ttl=dt.timedelta(days=365))
    new = pki.create_root("root 2", now=epoch, ttl=dt.timedelta(days=365))
    by_old = RealSigner(old, utcnow, bundle=[old, new])
    by_new = RealSigner(new, utcnow, bundle=[old, new])
    a, b = manager_for(by_old, 1), manager_for(by_new, 2)
    with trio.fail_after(10):
        await a.certified(WEB)
        await b.certified(DB)
        for server_ctx, client_ctx, expect in [
            (b.server_context(DB), a.client_context(WEB), WEB),     # new-root server, old-root client
            (a.server_context(WEB), b.client_context(DB), DB),      # old-root server, new-root client
        ]:
            async with tcp_pair() as tcp:
                server, client, errors = await handshake(tcp, server_ctx, client_ctx)
                assert errors == {}
                assert str(peer_identity(server)) == expect
                assert await echo(server, client) == b"PING"


async def test_bundle_update_swaps_contexts_and_open_connections_are_unaffected(epoch):
    old = pki.create_root("root 1", now=epoch, ttl=dt.timedelta(days=365))
    new = pki.create_root("root 2", now=epoch, ttl=dt.timedelta(days=365))
    a = manager_for(RealSigner(old, utcnow, bundle=[old]), 1)
    b = manager_for(RealSigner(new, utcnow, bundle=[new, old]), 2)
    with trio.fail_after(10):
        await a.certified(WEB)             # a trusts only the old root
        await b.certified(DB)
        async with tcp_pair() as tcp:      # a refuses b's new-root server certificate
            _, _, errors = await handshake(tcp, b.server_context(DB), a.client_context(WEB))
            assert "client" in errors and verify_failed(errors["client"])

        await a.update_bundle(pki.cert_pem(old.cert) + pki.cert_pem(new.cert))   # the push of the rotation
        async with tcp_pair() as tcp:
            server, client, errors = await handshake(tcp, b.server_context(DB), a.client_context(WEB))
            assert errors == {}
            await a.update_bundle(pki.cert_pem(old.cert))                   # new root dropped again
            assert await echo(server, client) == b"PING"                    # the open one still works
            async with tcp_pair() as tcp2:
                _, _, errors = await handshake(tcp2, b.server_context(DB), a.client_context(WEB))
                assert "client" in errors


def socket_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """A blocking ``ssl.SSLSocket`` pair over a socketpair, both sides handshaken."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    with ThreadPoolExecutor(1) as pool:
        server = pool.submit(server_ctx.wrap_socket, a, server_side=True)
        client = client_ctx.wrap_socket(b, server_hostname=None)
        return server.result(timeout=10), client


async def test_peer_identity_of_an_ssl_socket(signer):
    node1, node2 = manager_for(signer, 1), manager_for(signer, 2)
    with trio.fail_after(10):
        await node1.certified(WEB)
        await node2.certified(DB)
    server, client = await trio.to_thread.run_sync(socket_handshake, node2.server_context(DB),
                                                   node1.client_context(WEB))
    with server, client:
        assert peer_identity(server) == SpiffeId(TD, "shop", "web")
        assert peer_identity(client) == SpiffeId(TD, "shop", "db")


class FakeSSLObject:
    """Stands in for ssl.SSLObject where no CA would sign such a certificate for a handshake:
    ``getpeercert()`` answers what ``ssl`` decodes of a verified peer certificate."""

    def __init__(self, cert: dict | None):
        self.cert = cert

    def getpeercert(self, binary_form: bool = False):
        assert not binary_form
        return self.cert


def decoded_with(root, tmp_path, uris=(), dns=()) -> dict:
    """``getpeercert()`` of such a certificate, decoded by CPython's own decoder (as ``ssl`` does)."""
    cert = pki.issue(root, pki.generate_key().public_key(), now=utcnow(), ttl=dt.timedelta(hours=1),
                     uris=tuple(uris), dns_names=tuple(dns))
    path = tmp_path / "peer.pem"
    path.write_bytes(pki.cert_pem(cert))
    return ssl._ssl._test_decode_cert(str(path))


@pytest.mark.parametrize("uris,dns,reason", [
    ((), ("web.shop",), "exactly one URI SAN"),
    ((WEB, DB), (), "exactly one URI SAN"),
    (("https://example.com/x",), (), "not a SPIFFE ID"),
    ((f"spiffe://{TD}/ns/shop",), (), "not a SPIFFE ID"),
])
def test_peer_identity_needs_exactly_one_spiffe_uri_san(root, tmp_path, uris, dns, reason):
    with pytest.raises(PeerIdentityError, match=reason):
        peer_identity(FakeSSLObject(decoded_with(root, tmp_path, uris, dns)))


def test_peer_identity_reads_the_uri_san_among_others(root, tmp_path):
    assert peer_identity(FakeSSLObject(decoded_with(root, tmp_path, (WEB,), ("web.shop",)))) == \
        SpiffeId(TD, "shop", "web")


def test_peer_identity_needs_a_verified_certificate():
    with pytest.raises(PeerIdentityError, match="no certificate"):
        peer_identity(FakeSSLObject(None))
    with pytest.raises(PeerIdentityError, match="not verified"):
        peer_identity(FakeSSLObject({}))          # what ssl answers under CERT_NONE
    with pytest.raises(PeerIdentityError, match=r"exactly one URI SAN, got \[\]"):
        peer_identity(FakeSSLObject({"subject": ((("commonName", "no SANs"),),)}))
