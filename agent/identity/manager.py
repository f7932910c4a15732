"""manager.py: the agent's certificates — one per local workload identity and one for the node.

Owns the key of each identity (made here, never sent anywhere), the certificate cache, renewal
at half life with backoff while the controller is away, the trust bundle, and the TLS contexts
built from them, swapped whole. Talks to the controller only through the injected ``signer``,
and makes keys and checks certificates only through ``run_x509`` (by default a child process:
x509_proc.py); knows nothing of HTTP, the proxy or policy. Wall-clock validity comes from
``now``; waits are trio sleeps.
"""
from __future__ import annotations

import datetime as dt
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent.identity import tls, x509_proc
from agent.identity.errors import BadBundle, BadCertificate, IdentityError, NotCertified, SignerError
from agent.identity.ids import parse_identity
from agent.identity.renewal import backoff, renew_at
from agent.identity.store import StateDir, scratch_files

log = logging.getLogger("nodemesh.agent.identity")

MAX_NAP = 60.0   # the renewal loop re-reads the wall clock at least this often (suspend, clock steps)


@dataclass(frozen=True)
class SignResult:
    """The controller's answer to a CSR: the chain (leaf first) and the current trust bundle."""

    chain_pem: bytes
    bundle_pem: bytes


Signer = Callable[[str, bytes], Awaitable[SignResult]]


@dataclass(frozen=True)
class Certified:
    """An identity's accepted certificate chain and the key it belongs to."""

    uri: str
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    not_before: dt.datetime
    not_after: dt.datetime
    serial: int


@dataclass(frozen=True)
class _Held:
    """Everything served for one identity; replaced whole, never changed in place."""

    certified: Certified
    renew_at: dt.datetime
    server: ssl.SSLContext
    client: ssl.SSLContext


class _Pending:
    """One signer call in flight for a URI, shared by everyone who needs its answer."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Certified | None = None
        self.error: IdentityError | None = None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class IdentityManager:
    """Certificates and TLS contexts for the identities this agent holds.

    ``signer(uri, csr_pem)`` sends a CSR to the controller and returns a ``SignResult``; anything
    it raises becomes ``SignerError``. ``rng`` draws renewal jitter and backoff; ``now`` is the
    wall clock certificates are checked against. With ``state_dir``, each identity's key and
    chain (and the bundle) are kept there (0700/0600) and served after a restart while valid
    (checked in one batch by ``load_saved``); without it, key and chain touch disk only in a
    ``mkdtemp`` dir while ``ssl`` loads them. ``run_x509`` runs x509_proc operations: a child
    process per batch by default, ``x509_proc.run_in_process`` in tests on a mock clock.
    """

    def __init__(self, signer: Signer, *, rng: random.Random,
                 now: Callable[[], dt.datetime] = _utcnow, state_dir: Path | None = None,
                 run_x509: x509_proc.Runner = x509_proc.run_in_child):
        self._signer = signer
        self._rng = rng
        self._now = now
        self._run_x509 = run_x509
        self._store = StateDir(state_dir) if state_dir is not None else None
        self._bundle: bytes | None = None
        self._held: dict[str, _Held] = {}
        self._saved: dict[str, Certified] | None = {} if self._store is None else None  # None: not checked yet
        self._loading: trio.Event | None = None
        self._pending: dict[str, _Pending] = {}
        self._epoch: dict[str, int] = {}            # bumped by forget(): late answers are dropped
        self._loops: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    # --- reading ----------------------------------------------------------------------------

    @property
    def bundle_pem(self) -> bytes | None:
        """The latest trust bundle (PEM roots), or None before the first answer or push."""
        return self._bundle

    def server_context(self, uri: str) -> ssl.SSLContext:
        """The current server context of ``uri``; raises ``NotCertified`` if none or expired."""
        return self._usable(uri).server

    def client_context(self, uri: str) -> ssl.SSLContext:
        """The current client context of ``uri``; raises ``NotCertified`` if none or expired."""
        return self._usable(uri).client

    def expiries(self) -> dict[str, float]:
        """``{uri: not_after as epoch seconds}`` of every held identity (a gauge's samples)."""
        return {uri: h.certified.not_after.timestamp() for uri, h in self._held.items()}

    async def certified(self, uri: str) -> Certified:
        """The valid certificate of ``uri``, requesting one if there is none (or it expired).

        A saved certificate is served from the state dir without asking. Concurrent callers for
        one URI share one signer call. Raises ``InvalidSpiffeId`` for a URI that is no identity,
        ``SignerError`` or ``BadCertificate`` when the one attempt fails (the renewal loop
        retries only identities already certified), ``X509ChildError`` when no key can be made
        or no certificate checked.
        """
        parse_identity(uri)
        await self.load_saved()
        held = self._held_or_saved(uri)
        if held is not None and self._now() < held.certified.not_after:
            return held.certified
        return await self._request(uri)

    # --- changing ---------------------------------------------------------------------------

    async def load_saved(self) -> None:
        """Check the state dir's bundle and certificates, all in one x509 batch, once (again after
        a bundle change); those that pass are served on demand. No-op without a state dir.

        Raises ``X509ChildError`` (and checks again on the next call) if the batch fails.
        """
        while self._saved is None:
            if self._loading is not None:
                await self._loading.wait()
                continue
            loading = self._loading = trio.Event()
            try:
                self._saved = await self._check_saved()
            finally:
                self._loading = None
                loading.set()

    async def update_bundle(self, bundle_pem: bytes) -> None:
        """Adopt a pushed trust bundle; rebuilds every context if it differs. Raises ``BadBundle``
        (or ``X509ChildError``)."""
        if bundle_pem != self._bundle:
            roots = x509_proc.value((await self._run_x509([x509_proc.check_bundle(bundle_pem)]))[0])
            self._adopt_bundle(bundle_pem, roots)

    def forget(self, uri: str) -> None:
        """Drop ``uri``: stop renewing it, discard its contexts, delete its files."""
        self._held.pop(uri, None)
        if self._saved is not None:
            self._saved.pop(uri, None)
        self._epoch[uri] = self._epoch.get(uri, 0) + 1
        scope = self._loops.pop(uri, None)
        if scope is not None:
            scope.cancel()
        if self._store is not None:
            self._store.remove(uri)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew every held identity at half life (± jitter) until cancelled; ready once the
        saved certificates are checked (``load_saved``)."""
        if self._nursery is not None:
            raise RuntimeError("IdentityManager.run is already running")
        try:
            await self.load_saved()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for uri in list(self._held):
                    self._start_loop(uri)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._loops.clear()

    # --- internals --------------------------------------------------------------------------

    def _usable(self, uri: str) -> _Held:
        held = self._held_or_saved(uri)
        if held is None:
            raise NotCertified(uri, "no certificate yet")
        if self._now() >= held.certified.not_after:
            raise NotCertified(uri, f"the certificate expired at {held.certified.not_after:%Y-%m-%dT%H:%M:%SZ}")
        return held

    def _held_or_saved(self, uri: str) -> _Held | None:
        held = self._held.get(uri)
        if held is not None or not self._saved or uri not in self._saved:
            return held
        certified = self._saved.pop(uri)
        log.info("identity %s: serving saved certificate serial %x until %s", uri, certified.serial,
                 certified.not_after.isoformat())
        return self._install(certified)

    async def _check_saved(self) -> dict[str, Certified] | None:
        """The state dir's certificates that pass ``check_chain`` now, against the bundle held or
        else the saved one (adopted if it passes ``check_bundle``); one x509 batch. None if the
        bundle changed meanwhile (check again)."""
        assert self._store is not None
        held_bundle = bundle = self._bundle
        ops = []
        if bundle is None:
            bundle = self._store.load_bundle()
            if bundle is None:
                return {}
            ops.append(x509_proc.check_bundle(bundle))
        now, epochs, saved = self._now(), dict(self._epoch), {}
        for uri in self._store.uris():
            files = None if uri in self._held else self._store.load(uri)
            if files is not None:
                saved[uri] = files
                ops.append(x509_proc.check_chain(uri, files[0], bundle, files[1], now))
        outcomes = await self._run_x509(ops)
        if self._bundle != held_bundle:
            return None
        if held_bundle is None:
            if isinstance(outcomes[0], BadBundle):
                log.warning("ignoring the saved trust bundle in %s: %s", self._store.path, outcomes[0])
                return {}
            self._bundle = bundle
            outcomes = outcomes[1:]
        good = {}
        for (uri, (chain_pem, key_pem)), leaf in zip(saved.items(), outcomes):
            if isinstance(leaf, (BadCertificate, ValueError)):
                log.info("identity %s: not serving the saved certificate: %s", uri, leaf)
            elif self._epoch.get(uri, 0) == epochs.get(uri, 0):   # not forgotten meanwhile
                good[uri] = Certified(uri, chain_pem, key_pem, leaf.not_before, leaf.not_after, leaf.serial)
        return good

    async def _request(self, uri: str) -> Certified:
        """One signer call for ``uri``, or a share of the one already in flight."""
        while (pending := self._pending.get(uri)) is not None:
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            if pending.result is not None:
                return pending.result
            # the caller that made the request was cancelled: make our own
        pending = self._pending[uri] = _Pending()
        try:
            pending.result = await self._sign(uri)
            return pending.result
        except IdentityError as e:
            pending.error = e
            raise
        finally:
            del self._pending[uri]
            pending.done.set()

    async def _sign(self, uri: str) -> Certified:
        epoch = self._epoch.get(uri, 0)
        key_pem, csr = x509_proc.value((await self._run_x509([x509_proc.key_and_csr(uri)]))[0])
        try:
            answer = await self._signer(uri, csr)
            chain_pem, bundle_pem = bytes(answer.chain_pem), bytes(answer.bundle_pem)
        except Exception as e:  # the signer is foreign code: whatever it raises is its failure
            raise SignerError(uri, e) from e
        leaf, roots = await self._run_x509([x509_proc.check_chain(uri, chain_pem, bundle_pem, key_pem, self._now()),
                                        x509_proc.check_bundle(bundle_pem)])
        leaf, roots = x509_proc.value(leaf), x509_proc.value(roots)
        if self._epoch.get(uri, 0) != epoch:
            raise NotCertified(uri, "forgotten while its certificate was being requested")
        certified = Certified(uri, chain_pem, key_pem, leaf.not_before, leaf.not_after, leaf.serial)
        self._adopt_bundle(bundle_pem, roots)
        held = self._install(certified)
        log.info("identity %s: certified, serial %x, valid until %s, renewal at %s", uri,
                 certified.serial, certified.not_after.isoformat(), held.renew_at.isoformat())
        return certified

    def _install(self, certified: Certified) -> _Held:
        """Build fresh contexts for ``certified`` (saving its files) and swap them in; start its renewal."""
        assert self._bundle is not None
        server, client = self._contexts(certified, self._bundle)
        held = _Held(certified, renew_at(certified.not_before, certified.not_after, self._rng),
                     server, client)
        self._held[certified.uri] = held
        self._start_loop(certified.uri)
        return held

    def _adopt_bundle(self, bundle_pem: bytes, roots: int) -> None:
        """Hold ``bundle_pem`` (checked: ``roots`` CA certificates); saved certificates not
        served yet are checked again, against it."""
        if bundle_pem == self._bundle:
            return
        self._bundle = bundle_pem
        if self._store is not None:
            self._store.save_bundle(bundle_pem)
            if self._saved:
                self._saved = None
        log.info("trust bundle changed (%d roots); rebuilding %d identities' contexts",
                 roots, len(self._held))
        for uri, held in list(self._held.items()):
            server, client = self._contexts(held.certified, bundle_pem)
            self._held[uri] = _Held(held.certified, held.renew_at, server, client)

    def _contexts(self, certified: Certified, bundle_pem: bytes) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        if self._store is not None:
            chain_file, key_file = self._store.save(certified.uri, certified.chain_pem, certified.key_pem)
            return (tls.server_context(chain_file, key_file, bundle_pem),
                    tls.client_context(chain_file, key_file, bundle_pem))
        with scratch_files(certified.chain_pem, certified.key_pem) as (chain_file, key_file):
            return (tls.server_context(chain_file, key_file, bundle_pem),
                    tls.client_context(chain_file, key_file, bundle_pem))

    def _start_loop(self, uri: str) -> None:
        if self._nursery is not None and uri not in self._loops:
            scope = self._loops[uri] = trio.CancelScope()
            self._nursery.start_soon(self._renew_loop, uri, scope)

    async def _renew_loop(self, uri: str, scope: trio.CancelScope) -> None:
        with scope:
            failures = 0
            while (held := self._held.get(uri)) is not None:
                wait = (held.renew_at - self._now()).total_seconds()
                if wait > 0:
                    await trio.sleep(min(wait, MAX_NAP))
                    continue
                try:
                    await self._request(uri)
                    failures = 0
                except NotCertified:
                    return
                except IdentityError as e:
                    delay = backoff(failures, self._rng)
                    failures += 1
                    left = (held.certified.not_after - self._now()).total_seconds()
                    log.warning("identity %s: renewal attempt %d failed, retrying in %.1fs; "
                                "the current certificate %s: %s", uri, failures, delay,
                                f"is valid for {left:.0f}s more" if left > 0 else "has EXPIRED", e)
                    await trio.sleep(delay)
        if self._loops.get(uri) is scope:
            del self._loops[uri]
