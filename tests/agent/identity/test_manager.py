"""IdentityManager against a real CA: on-demand certificates, renewal, backoff, rejection, persistence.

Time is trio's autojump clock: ``virtual_now`` is ``epoch + trio.current_time()``, so a 24 h
certificate reaches half life in milliseconds. The x509 operations run in this process
(``x509_proc.run_in_process``): waiting for a child would let the mock clock jump. The child
itself is test_x509_proc.py's.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import stat

import pytest
import trio
from cryptography.hazmat.primitives import serialization

from agent.identity import (
    BadBundle, BadCertificate, IdentityManager, NotCertified, SignerError,
)
from agent.identity import x509_proc
from agent.identity.renewal import JITTER_FRACTION
from controller import pki
from controller.api.errors import InvalidSpiffeId
from tests.agent.identity.conftest import DB, NODE, TTL, WEB, ControllerAway, RealSigner, leaf_of, spki

HOUR = 3600.0
LIFETIME = (TTL + dt.timedelta(minutes=5)).total_seconds()     # pki backdates not_before by 5 min


@pytest.fixture
def signer(root, virtual_now):
    return RealSigner(root, virtual_now)


def make(signer, **kwargs) -> IdentityManager:
    return IdentityManager(signer, run_x509=x509_proc.run_in_process, **kwargs)


@pytest.fixture
def manager(signer, virtual_now, rng):
    return make(signer, now=virtual_now, rng=rng)


def window(c) -> tuple[dt.datetime, dt.datetime]:
    """The renewal window of a certificate: half life ± 5% of its lifetime."""
    life = c.not_after - c.not_before
    mid = c.not_before + life / 2
    return mid - life * JITTER_FRACTION, mid + life * JITTER_FRACTION


async def test_first_request_on_demand_and_the_key_never_leaves(manager, signer, virtual_now):
    with trio.fail_after(5):
        c = await manager.certified(WEB)
    assert len(signer.calls) == 1
    call = signer.calls[0]
    assert call.uri == WEB and b"PRIVATE KEY" not in call.csr_pem   # the signer sees only the CSR
    leaf = leaf_of(c.chain_pem)
    key = serialization.load_pem_private_key(c.key_pem, password=None)
    assert spki(leaf.public_key()) == spki(key.public_key())
    assert (c.uri, c.serial) == (WEB, leaf.serial_number)
    assert abs(c.not_after - (call.at + TTL)) < dt.timedelta(seconds=1)
    assert "key_pem" not in repr(c)
    assert manager.expiries() == {WEB: c.not_after.timestamp()}
    assert manager.bundle_pem == signer.bundle_pem()
    assert await manager.certified(WEB) is c and len(signer.calls) == 1     # cached


async def test_concurrent_callers_share_one_signer_call(manager, signer, autojump_clock):
    signer.delay = 2.0
    got = []

    async def ask():
        got.append(await manager.certified(WEB))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(ask)
    assert len(signer.calls) == 1
    assert len(got) == 5 and all(c is got[0] for c in got)


async def test_concurrent_callers_share_the_failure(manager, signer, autojump_clock):
    signer.delay, signer.fail = 1.0, 1
    errors = []

    async def ask():
        try:
            await manager.certified(WEB)
        except SignerError as e:
            errors.append(e)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(ask)
    assert len(signer.calls) == 1 and len(errors) == 3
    assert errors[0].uri == WEB and isinstance(errors[0].cause, ControllerAway)


async def test_contexts_need_a_certificate(manager):
    with pytest.raises(NotCertified) as err:
        manager.server_context(WEB)
    assert err.value.uri == WEB
    with pytest.raises(NotCertified):
        manager.client_context(WEB)


async def test_identity_uris_are_checked(manager, signer):
    with pytest.raises(InvalidSpiffeId):
        await manager.certified("spiffe://cluster.local/somewhere/else")
    assert signer.calls == []
    with trio.fail_after(5):
        node = await manager.certified(NODE)      # the node's own identity is an identity too
    assert node.uri == NODE


async def test_renews_at_half_life_with_jitter_and_swaps_contexts(manager, signer, virtual_now, autojump_clock):
    async with trio.open_nursery() as n:
        await n.start(manager.run)
        with trio.fail_after(2 * HOUR * 24):
            first = await manager.certified(WEB)
            server, client = manager.server_context(WEB), manager.client_context(WEB)
            lo, hi = window(first)
            await trio.sleep((lo - virtual_now()).total_seconds() - 1)
            assert len(signer.calls) == 1                             # not before the window
            assert manager.server_context(WEB) is server
            await trio.sleep((hi - virtual_now()).total_seconds() + 1)
        assert len(signer.calls) == 2                                 # once inside the window
        assert lo <= signer.calls[1].at <= hi
        second = await manager.certified(WEB)
        assert second.serial != first.serial and second.key_pem != first.key_pem
        assert manager.server_context(WEB) is not server and manager.client_context(WEB) is not client
        assert manager.expiries()[WEB] == second.not_after.timestamp()
        # and again for the new certificate, at its own (differently jittered) half life
        lo2, hi2 = window(second)
        await trio.sleep((hi2 - virtual_now()).total_seconds() + 1)
        assert len(signer.calls) == 3 and lo2 <= signer.calls[2].at <= hi2
        assert signer.calls[2].at - signer.calls[1].at != signer.calls[1].at - signer.calls[0].at
        n.cancel_scope.cancel()


async def test_controller_away_backs_off_serves_old_then_recovers(manager, signer, virtual_now,
                                                                  autojump_clock, caplog):
    caplog.set_level(logging.WARNING, logger="nodemesh.agent.identity")
    async with trio.open_nursery() as n:
        await n.start(manager.run)
        first = await manager.certified(WEB)
        server = manager.server_context(WEB)
        signer.fail = 8
        _, hi = window(first)
        with trio.fail_after(2 * HOUR * 24):
            await trio.sleep((hi - virtual_now()).total_seconds() + 1)
            while len(signer.calls) < 1 + 8:                     # 8 failures
                assert await manager.certified(WEB) is first      # the old one is still served
                assert manager.server_context(WEB) is server
                await trio.sleep(0.25)
            await trio.sleep(200)                                 # the 9th call succeeds
        assert len(signer.calls) == 10
        gaps = [(b.at - a.at).total_seconds() for a, b in zip(signer.calls[1:], signer.calls[2:])]
        for attempt, gap in enumerate(gaps):
            ceiling = min(2.0 ** attempt, 60.0)
            assert ceiling / 2 <= gap <= ceiling + 0.01, (attempt, gaps)
        second = await manager.certified(WEB)
        assert second.serial != first.serial
        assert manager.server_context(WEB) is not server
        n.cancel_scope.cancel()
    failures = [r for r in caplog.records if "renewal attempt" in r.getMessage()]
    assert len(failures) == 8                                      # once per failed attempt
    assert all(WEB in r.getMessage() and "controller unreachable" in r.getMessage() for r in failures)


async def test_never_gives_up_while_the_old_certificate_is_valid(manager, signer, virtual_now, autojump_clock):
    async with trio.open_nursery() as n:
        await n.start(manager.run)
        first = await manager.certified(WEB)
        signer.fail = 10**9
        with trio.fail_after(2 * HOUR * 24):
            await trio.sleep((first.not_after - virtual_now()).total_seconds() + 120)
        before_expiry = [c.at for c in signer.calls if c.at < first.not_after]
        assert first.not_after - before_expiry[-1] <= dt.timedelta(seconds=60)
        assert any(c.at > first.not_after for c in signer.calls)   # and keeps trying after
        with pytest.raises(NotCertified, match="expired"):
            manager.server_context(WEB)                              # an expired cert is not served
        signer.fail = 0
        await trio.sleep(61)
        assert (await manager.certified(WEB)).not_after > virtual_now()
        manager.server_context(WEB)
        n.cancel_scope.cancel()


@pytest.mark.parametrize("bad,reason", [
    ("wrong_uri", "exactly one URI SAN"),
    ("two_uris", "exactly one URI SAN"),
    ("wrong_key", "public key"),
    ("other_ca", "does not chain"),
    ("expired", "not valid at"),
    ("garbage", "not PEM"),
    ("leaf_as_bundle", "bundle"),
])
async def test_a_bad_answer_is_rejected(manager, signer, bad, reason):
    signer.bad = bad
    with pytest.raises(BadCertificate) as err:
        await manager.certified(WEB)
    assert err.value.uri == WEB and reason in err.value.reason
    assert manager.expiries() == {} and manager.bundle_pem is None
    with pytest.raises(NotCertified):
        manager.server_context(WEB)


async def test_a_bad_renewal_is_rejected_and_the_old_certificate_kept(manager, signer, virtual_now,
                                                                      autojump_clock, caplog):
    async with trio.open_nursery() as n:
        await n.start(manager.run)
        first = await manager.certified(WEB)
        server = manager.server_context(WEB)
        signer.bad = "other_ca"
        lo, _ = window(first)
        with trio.fail_after(2 * HOUR * 24):
            await signer.wait_calls(2)
            await trio.sleep(0.1)                                    # answer checked; no retry yet
            assert lo <= signer.calls[1].at and len(signer.calls) == 2
            assert await manager.certified(WEB) is first and manager.server_context(WEB) is server
            assert manager.bundle_pem == signer.bundle_pem()
            await trio.sleep(2)                                      # retried after backoff
        assert len(signer.calls) == 3
        assert (await manager.certified(WEB)).serial != first.serial
        n.cancel_scope.cancel()
    assert any("does not chain" in r.getMessage() and WEB in r.getMessage() for r in caplog.records)


async def test_bundle_push_rebuilds_contexts_and_bad_bundles_are_refused(manager, signer, root, epoch):
    await manager.certified(WEB)
    await manager.certified(DB)
    before = {u: (manager.server_context(u), manager.client_context(u)) for u in (WEB, DB)}
    new_root = pki.create_root("new root", now=epoch, ttl=dt.timedelta(days=365))
    both = pki.cert_pem(root.cert) + pki.cert_pem(new_root.cert)
    await manager.update_bundle(both)
    assert manager.bundle_pem == both
    for u, (server, client) in before.items():
        assert manager.server_context(u) is not server and manager.client_context(u) is not client
    same = manager.server_context(WEB)
    await manager.update_bundle(both)                                # unchanged: nothing rebuilt
    assert manager.server_context(WEB) is same
    with pytest.raises(BadBundle):
        await manager.update_bundle(b"not a bundle")
    assert manager.bundle_pem == both and manager.server_context(WEB) is same


async def test_forget_drops_the_identity_and_stops_renewing(manager, signer, autojump_clock):
    async with trio.open_nursery() as n:
        await n.start(manager.run)
        await manager.certified(WEB)
        await manager.certified(DB)
        manager.forget(WEB)
        with pytest.raises(NotCertified):
            manager.server_context(WEB)
        assert set(manager.expiries()) == {DB}
        await trio.sleep(20 * HOUR)
        assert [c.uri for c in signer.calls] == [WEB, DB, DB]
        n.cancel_scope.cancel()


async def test_forget_during_a_request_drops_the_answer(manager, signer, autojump_clock):
    signer.delay = 1.0
    async with trio.open_nursery() as n:
        async def ask():
            with pytest.raises(NotCertified, match="forgotten"):
                await manager.certified(WEB)
        n.start_soon(ask)
        await trio.sleep(0.5)
        manager.forget(WEB)
    assert manager.expiries() == {}


# --- persistence ---------------------------------------------------------------------------

async def test_restart_serves_from_the_state_dir_then_renews(signer, virtual_now, rng, tmp_path,
                                                             autojump_clock):
    state = tmp_path / "identity"
    first_mgr = make(signer, now=virtual_now, rng=rng, state_dir=state)
    first = await first_mgr.certified(WEB)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    files = sorted(p.name for p in state.iterdir())
    assert len(files) == 3 and "bundle.pem" in files                 # key, chain, bundle; no temp files
    assert all(stat.S_IMODE(os.stat(state / f).st_mode) == 0o600 for f in files)

    await trio.sleep(HOUR)                                           # the agent restarts
    restarted = make(signer, now=virtual_now, rng=rng, state_dir=state)
    await restarted.load_saved()                                     # what run() does first
    ctx = restarted.server_context(WEB)                              # straight from disk
    again = await restarted.certified(WEB)
    assert (again.serial, again.key_pem, again.chain_pem) == (first.serial, first.key_pem, first.chain_pem)
    assert restarted.bundle_pem == signer.bundle_pem()
    assert restarted.server_context(WEB) is ctx
    assert len(signer.calls) == 1

    async with trio.open_nursery() as n:
        await n.start(restarted.run)
        _, hi = window(first)
        await trio.sleep((hi - virtual_now()).total_seconds() + 1)
        assert len(signer.calls) == 2
        n.cancel_scope.cancel()
    renewed = await restarted.certified(WEB)
    assert renewed.serial != first.serial
    on_disk = make(signer, now=virtual_now, rng=rng, state_dir=state)
    assert (await on_disk.certified(WEB)).serial == renewed.serial   # the renewal was saved


async def test_an_expired_or_broken_saved_certificate_is_replaced(signer, virtual_now, rng, tmp_path,
                                                                  autojump_clock):
    state = tmp_path / "identity"
    first = await make(signer, now=virtual_now, rng=rng, state_dir=state).certified(WEB)
    await trio.sleep(TTL.total_seconds() + 1)
    later = make(signer, now=virtual_now, rng=rng, state_dir=state)
    await later.load_saved()
    with pytest.raises(NotCertified):
        later.server_context(WEB)
    second = await later.certified(WEB)
    assert second.serial != first.serial and len(signer.calls) == 2

    chain_file, key_file = later._store.files(WEB)
    key_file.write_bytes(serialization.load_pem_private_key(
        pki.key_pem(pki.generate_key()), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    broken = make(signer, now=virtual_now, rng=rng, state_dir=state)
    third = await broken.certified(WEB)                              # key does not match: ask again
    assert third.serial not in (first.serial, second.serial) and len(signer.calls) == 3


async def test_forget_deletes_the_saved_files(signer, virtual_now, rng, tmp_path):
    state = tmp_path / "identity"
    manager = make(signer, now=virtual_now, rng=rng, state_dir=state)
    await manager.certified(WEB)
    manager.forget(WEB)
    assert sorted(p.name for p in state.iterdir()) == ["bundle.pem"]


async def test_without_a_state_dir_key_files_exist_only_while_ssl_loads_them(manager, tmp_path, monkeypatch):
    import tempfile
    seen = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        path = real_mkdtemp(*args, **kwargs)
        seen.append((path, stat.S_IMODE(os.stat(path).st_mode)))
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    await manager.certified(WEB)
    manager.server_context(WEB)
    assert seen and all(mode == 0o700 for _, mode in seen)
    assert not any(os.path.exists(path) for path, _ in seen)
