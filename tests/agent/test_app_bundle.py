"""app._refresh_bundle: the node identity is taken under management and a rotated trust bundle
reaches both the identity manager and the control-plane client. Trio's autojump clock, the
x509 work in this process (x509_proc.run_in_process), a real CA."""
from __future__ import annotations

import datetime as dt
import random

import trio

from agent import app
from agent.identity import IdentityManager, x509_proc
from controller import pki
from tests.agent.identity.conftest import NODE, RealSigner


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class FakeControlPlane:
    """Serves ``bundle`` as the controller's trust bundle and records what the agent adopts."""

    def __init__(self, bundle: bytes):
        self.bundle = bundle
        self.bundle_pem: bytes | None = None
        self.updates: list[bytes] = []

    async def trust_bundle(self) -> bytes:
        return self.bundle

    async def update(self, *, bundle_pem: bytes, credentials) -> None:
        self.bundle_pem = bundle_pem
        self.updates.append(bundle_pem)


async def test_a_rotated_bundle_reaches_the_manager_and_the_client(autojump_clock):
    now = utcnow()
    old, new = (pki.create_root(name, now=now, ttl=dt.timedelta(days=30)) for name in ("root 1", "root 2"))
    identity = IdentityManager(RealSigner(old, utcnow), rng=random.Random(1), run_x509=x509_proc.run_in_process)
    both = pki.cert_pem(old.cert) + pki.cert_pem(new.cert)
    cp = FakeControlPlane(both)
    with trio.move_on_after(app.BUNDLE_REFRESH / 2):
        await app._refresh_bundle(cp, identity, NODE, creds=None)
    assert NODE in identity.expiries()                     # managed: certified, so renewed
    assert identity.bundle_pem == both and cp.updates == [both]
