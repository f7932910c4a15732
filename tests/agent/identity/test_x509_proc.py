"""The x509 child process (agent.identity.x509_proc): the same answers as x509 in this process,
typed errors across the pipe, a clear error (never a hang) when the child dies, and the
identity manager and bootstrap on top of it. Real clock and real child processes throughout.
"""
from __future__ import annotations

import datetime as dt
import random
import sys

import pytest
import trio
from cryptography import x509 as cx509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.identity import BadBundle, BadCertificate, IdentityManager, X509ChildError, x509, x509_proc
from agent.identity.store import StateDir
from agent.sync import join
from controller import pki
from tests.agent.identity.conftest import DB, NODE, TTL, WEB, RealSigner, spki


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def here(fn, *args):
    """What calling x509 in this process gives: its value, or the error it raised."""
    try:
        return fn(*args)
    except (BadCertificate, BadBundle, ValueError) as e:
        return e


def same(a, b) -> bool:
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b) and vars(a) == vars(b)
    return a == b


async def test_the_child_answers_as_x509_does_here(signed, root, epoch):
    key_pem, chain, bundle = signed
    other = pki.create_root("other", now=epoch, ttl=dt.timedelta(days=30))
    encrypted = serialization.load_pem_private_key(key_pem, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    rsa_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    two = bundle + pki.cert_pem(other.cert)
    cases = [
        (x509.check_bundle, two), (x509.check_bundle, chain), (x509.check_bundle, b""),
        (x509.check_bundle, b"\xff\xfe not even text"),
        (x509.check_chain, WEB, chain, bundle, key_pem, epoch),                        # good
        (x509.check_chain, WEB, chain, bundle, x509.new_key_pem(), epoch),             # another key
        (x509.check_chain, DB, chain, bundle, key_pem, epoch),                         # another identity
        (x509.check_chain, WEB, chain, pki.cert_pem(other.cert), key_pem, epoch),      # another CA
        (x509.check_chain, WEB, chain, two, key_pem, epoch + TTL),                     # expired
        (x509.check_chain, WEB, b"hello \xff", bundle, key_pem, epoch),                # not PEM
        (x509.check_chain, WEB, chain, chain, key_pem, epoch),                         # leaf as bundle
        (x509.check_chain, WEB, chain, bundle, b"junk", epoch),                        # ValueError: no key
        (x509.check_chain, WEB, chain, bundle, encrypted, epoch),                      # ValueError: encrypted
        (x509.check_chain, WEB, chain, bundle, rsa_pem, epoch),                        # ValueError: not P-256
    ]
    ops = [getattr(x509_proc, fn.__name__)(*args) for fn, *args in cases]
    with trio.fail_after(30):
        got = await x509_proc.run_in_child(ops)                                        # one child, 14 ops
    expected = [here(fn, *args) for fn, *args in cases]
    assert len(got) == len(expected)
    for case, g, e in zip(cases, got, expected):
        assert same(g, e), (case[0].__name__, g, e)
    assert got[0] == 2 and isinstance(got[4], x509.Leaf) and got[4].not_after == epoch + TTL
    assert {type(e) for e in expected} >= {int, x509.Leaf, BadBundle, BadCertificate, ValueError}


async def test_a_bad_chain_from_the_child_is_a_bad_certificate_with_the_reason(signed, epoch):
    key_pem, chain, _ = signed
    other = pki.create_root("other", now=epoch, ttl=dt.timedelta(days=30))
    (outcome,) = await x509_proc.run_in_child([x509_proc.check_chain(WEB, chain, pki.cert_pem(other.cert),
                                                                     key_pem, epoch)])
    with pytest.raises(BadCertificate) as err:
        x509_proc.value(outcome)
    assert err.value.uri == WEB and "does not chain to the trust bundle" in err.value.reason


async def test_key_and_csr_from_the_child(root, epoch):
    with trio.fail_after(30):
        (first, second) = await x509_proc.run_in_child([x509_proc.key_and_csr(WEB), x509_proc.key_and_csr(WEB)])
    key_pem, csr_pem = first
    assert first[0] != second[0] and b"PRIVATE KEY" not in csr_pem
    csr = cx509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.extensions.get_extension_for_class(cx509.SubjectAlternativeName).value \
        .get_values_for_type(cx509.UniformResourceIdentifier) == [WEB]
    assert spki(csr.public_key()) == spki(serialization.load_pem_private_key(key_pem, None).public_key())
    leaf = pki.issue(root, csr.public_key(), now=epoch, ttl=TTL, uris=(WEB,))
    assert x509.check_chain(WEB, pki.cert_pem(leaf), pki.cert_pem(root.cert), key_pem, epoch)


def test_now_must_be_timezone_aware(signed):
    key_pem, chain, bundle = signed
    with pytest.raises(ValueError, match="timezone-aware"):
        x509_proc.check_chain(WEB, chain, bundle, key_pem, dt.datetime.now())


async def test_keys_never_go_to_argv_or_the_environment(signed, epoch, monkeypatch):
    seen = []
    real = trio.run_process

    async def spy(command, **kwargs):
        seen.append((command, kwargs["env"]))
        return await real(command, **kwargs)

    monkeypatch.setattr(trio, "run_process", spy)
    key_pem, chain, bundle = signed
    (made, leaf) = await x509_proc.run_in_child([x509_proc.key_and_csr(WEB),
                                                 x509_proc.check_chain(WEB, chain, bundle, key_pem, epoch)])
    assert isinstance(leaf, x509.Leaf) and len(seen) == 1
    command, env = seen[0]
    for secret in (key_pem, made[0]):
        body = secret.decode().splitlines()[1]
        assert not any(body in part for part in command) and not any(body in v for v in env.values())


# --- the child failing ----------------------------------------------------------------------

@pytest.mark.parametrize("child,words", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL"),
    ("raise SystemExit('out of luck')", "exited with 1: out of luck"),
    ("print('not json')", "unreadable answer"),
    ("print('[]')", "unreadable answer"),
    ("print('[{\"ok\": [\"-----BEGIN PRIVATE KEY-----MIGHAgEAMBMG')", "unreadable answer"),   # cut short
    ("print('[{\"error\": \"MemoryError\"}]')", "unreadable answer to check_bundle"),
])
async def test_a_child_that_dies_or_babbles_is_a_typed_error(monkeypatch, child, words):
    monkeypatch.setattr(x509_proc, "CHILD", ("-c", child))
    with trio.fail_after(30), pytest.raises(X509ChildError, match=words) as err:
        await x509_proc.run_in_child([x509_proc.check_bundle(b"")])
    assert "PRIVATE" not in str(err.value) and "MIGH" not in str(err.value)    # an answer is never echoed


async def test_a_crash_in_the_real_child_is_a_typed_error():
    with trio.fail_after(30), pytest.raises(X509ChildError) as err:
        await x509_proc.run_in_child([{"op": "make_coffee"}])
    assert "exited with 1" in err.value.reason and "unknown operation 'make_coffee'" in err.value.reason


async def test_a_child_that_hangs_is_killed_at_the_timeout(monkeypatch):
    monkeypatch.setattr(x509_proc, "CHILD", ("-c", "import time; time.sleep(600)"))
    start = trio.current_time()
    with trio.fail_after(10), pytest.raises(X509ChildError, match=r"no answer within 0.5s \(killed\)"):
        await x509_proc.run_in_child([x509_proc.check_bundle(b"")], timeout=0.5)
    assert trio.current_time() - start < 5


async def test_a_child_that_cannot_start_is_a_typed_error(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    with pytest.raises(X509ChildError, match="cannot start /nonexistent/python3"):
        await x509_proc.run_in_child([x509_proc.check_bundle(b"")])


# --- on top of it: the identity manager and bootstrap ----------------------------------------

class Counting:
    """A runner that counts its batches (one child each) and passes them to the real child."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def __call__(self, ops):
        self.batches.append([op["op"] for op in ops])
        return await x509_proc.run_in_child(ops)


async def test_manager_on_the_child_certifies_restarts_and_rejects(root, tmp_path):
    signer, state = RealSigner(root, utcnow), tmp_path / "identities"
    runner = Counting()
    first = IdentityManager(signer, rng=random.Random(1), state_dir=state, run_x509=runner)
    with trio.fail_after(60):
        web, node = await first.certified(WEB), await first.certified(NODE)
        assert runner.batches == [["key_and_csr"], ["check_chain", "check_bundle"]] * 2  # 2 per renewal

        runner.batches.clear()
        restarted = IdentityManager(signer, rng=random.Random(2), state_dir=state, run_x509=runner)
        await restarted.load_saved()
        assert runner.batches == [["check_bundle", "check_chain", "check_chain"]]      # one batch at start
        restarted.server_context(WEB)
        assert (await restarted.certified(NODE)).serial == node.serial
        assert (await restarted.certified(WEB)).serial == web.serial and len(signer.calls) == 2
        assert len(runner.batches) == 1

        with pytest.raises(BadBundle, match="not PEM"):
            await restarted.update_bundle(b"not a bundle")
        signer.bad = "wrong_key"
        with pytest.raises(BadCertificate) as err:
            await restarted.certified(DB)
        assert err.value.uri == DB and "public key" in err.value.reason


async def test_manager_when_the_child_fails(root, monkeypatch):
    signer = RealSigner(root, utcnow)
    manager = IdentityManager(signer, rng=random.Random(1))
    monkeypatch.setattr(x509_proc, "CHILD", ("-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    with trio.fail_after(30):
        with pytest.raises(X509ChildError, match="killed"):
            await manager.certified(WEB)
        assert signer.calls == []                                 # no key, no CSR sent
        monkeypatch.undo()
        assert (await manager.certified(WEB)).uri == WEB          # nothing stuck: it works again


async def test_bootstrap_checks_the_saved_node_certificate_in_the_child(root, epoch, tmp_path, monkeypatch):
    state = StateDir(tmp_path / "identities")
    key = pki.generate_key()
    state.save(NODE, pki.cert_pem(pki.issue(root, key.public_key(), now=epoch, ttl=TTL, uris=(NODE,))),
               pki.key_pem(key))
    with trio.fail_after(30):
        assert await join.saved_node_identity(state, NODE, epoch) is None          # no bundle yet
        state.save_bundle(pki.cert_pem(root.cert))
        assert await join.saved_node_identity(state, NODE, epoch) == state.files(NODE)
        assert await join.saved_node_identity(state, NODE, epoch + TTL) is None    # expired: join again
        monkeypatch.setattr(x509_proc, "CHILD", ("-c", "raise SystemExit(3)"))
        with pytest.raises(join.JoinError, match="exited with 3"):               # not "join again"
            await join.saved_node_identity(state, NODE, epoch)


async def test_the_in_process_runner_is_the_same_wire(signed, epoch):
    key_pem, chain, bundle = signed
    ops = [x509_proc.check_chain(WEB, chain, bundle, key_pem, epoch), x509_proc.check_bundle(chain)]
    assert all(same(a, b) for a, b in zip(await x509_proc.run_in_process(ops), await x509_proc.run_in_child(ops)))

