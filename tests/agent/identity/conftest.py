"""A real CA (controller.pki) behind a real signer function, and clocks for identity tests."""
from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.identity import SignResult
from agent.identity import x509 as agent_x509
from controller import pki

TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
DB = f"spiffe://{TD}/ns/shop/sa/db"
NODE = f"spiffe://{TD}/nodemesh/node/node-1"
TTL = dt.timedelta(hours=24)


class ControllerAway(ConnectionError):
    """What the test signer raises while told to fail."""


@dataclass
class Call:
    at: dt.datetime
    uri: str
    csr_pem: bytes


@dataclass
class RealSigner:
    """Parses the CSR, checks it as the controller would, and signs it with a real CA.

    ``fail`` makes the next N calls raise; ``bad`` makes the next answer wrong in a chosen way;
    ``delay`` makes each call take that many (trio) seconds.
    """

    ca: pki.Issuer
    now: Callable[[], dt.datetime]
    bundle: list[pki.Issuer] = field(default_factory=list)
    ttl: dt.timedelta = TTL
    fail: int = 0
    bad: str | None = None
    delay: float = 0.0
    calls: list[Call] = field(default_factory=list)
    _called: trio.Event = field(default_factory=trio.Event, repr=False)

    def __post_init__(self) -> None:
        self.bundle = self.bundle or [self.ca]

    async def wait_calls(self, n: int) -> None:
        """Return once the signer has been called ``n`` times in all."""
        while len(self.calls) < n:
            await self._called.wait()

    def bundle_pem(self) -> bytes:
        return b"".join(pki.cert_pem(i.cert) for i in self.bundle)

    async def __call__(self, uri: str, csr_pem: bytes) -> SignResult:
        self.calls.append(Call(self.now(), uri, csr_pem))
        self._called.set()
        self._called = trio.Event()
        if self.delay:
            await trio.sleep(self.delay)
        if self.fail > 0:
            self.fail -= 1
            raise ControllerAway("controller unreachable")
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
        key, ca, uris, now = csr.public_key(), self.ca, (uri,), self.now()
        bad, self.bad = self.bad, None
        if bad == "wrong_uri":
            uris = (f"spiffe://{TD}/ns/shop/sa/admin",)
        elif bad == "two_uris":
            uris = (uri, f"spiffe://{TD}/ns/shop/sa/admin")
        elif bad == "wrong_key":
            key = pki.generate_key().public_key()
        elif bad == "other_ca":
            ca = pki.create_root("intruder", now=now, ttl=dt.timedelta(days=30))
        elif bad == "expired":
            now = now - 2 * self.ttl
        elif bad == "garbage":
            return SignResult(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
                              self.bundle_pem())
        elif bad == "leaf_as_bundle":
            leaf = pki.issue(ca, key, now=now, ttl=self.ttl, uris=uris)
            return SignResult(pki.cert_pem(leaf), pki.cert_pem(leaf))
        elif bad is not None:
            raise AssertionError(f"unknown bad answer {bad}")
        leaf = pki.issue(ca, key, now=now, ttl=self.ttl, uris=uris)
        return SignResult(pki.cert_pem(leaf), self.bundle_pem())


def leaf_of(chain_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem)[0]


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def epoch() -> dt.datetime:
    """Real time at the start of the test: handshakes are checked by OpenSSL on the real clock."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


@pytest.fixture
async def virtual_now(epoch) -> Callable[[], dt.datetime]:
    """Wall clock driven by trio's (mock) clock: ``epoch + trio.current_time()``."""
    start = trio.current_time()
    return lambda: epoch + dt.timedelta(seconds=trio.current_time() - start)


@pytest.fixture
def root(epoch) -> pki.Issuer:
    return pki.create_root("test root", now=epoch, ttl=dt.timedelta(days=365))


@pytest.fixture
def signed(root, epoch):
    """(key_pem, chain_pem, bundle_pem) of a good WEB certificate."""
    key_pem = agent_x509.new_key_pem()
    key = serialization.load_pem_private_key(key_pem, password=None)
    leaf = pki.issue(root, key.public_key(), now=epoch, ttl=TTL, uris=(WEB,))
    return key_pem, pki.cert_pem(leaf), pki.cert_pem(root.cert)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(20250101)
