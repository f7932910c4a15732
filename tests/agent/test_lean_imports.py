"""The agent's start path imports only what an idle agent needs (BENCHMARKS "(e) memory").

Each check runs in a fresh interpreter and reads ``sys.modules``: a heavy library that creeps
back onto the start path (an import at the top of a module) fails here, long before anyone
measures RSS again. Numbers are never asserted.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Not on the start path: the redirect modes' kernel libraries (imported only by the mode that
# needs them), httpx and its stack (the agent's control-plane client speaks h11), and
# prometheus_client (imported at the first scrape of /metrics), yaml (the agent reads no
# manifests; controller.api loads it on first use of its manifest functions), and cryptography
# (keys, CSRs and certificate checks run in agent.identity.x509_proc's child process).
NOT_AT_START = ("bcc", "pyroute2", "httpx", "httpcore", "anyio", "certifi", "pygments", "prometheus_client",
                "yaml", "cryptography")


def loaded_after(code: str, *args: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))",
                          *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    return {name.split(".")[0] for name in json.loads(out.splitlines()[-1])}


@pytest.mark.parametrize("code", [
    "import agent.app",
    "import controller.cli.root, agent.cli",                    # what `nodemesh agent run` loads
    "from agent.redirect import select; select.make('none'); select.make('iptables')",
])
def test_start_path_leaves_heavy_libraries_alone(code):
    assert loaded_after(code).isdisjoint(NOT_AT_START), sorted(loaded_after(code) & set(NOT_AT_START))


def test_metrics_import_prometheus_client_at_the_first_scrape():
    code = ("from agent.observe.metrics import AgentMetrics, ConnectionLabels\n"
            "m = AgentMetrics(config_version=lambda: 1)\n"
            "m.connection_opened(ConnectionLabels('source'))\n")
    assert "prometheus_client" not in loaded_after(code)
    assert "prometheus_client" in loaded_after(code + "assert b'nodemesh_config_version 1.0' in m.render()\n")


# The agent at work on its identities: bootstrap's check of the saved node certificate, the
# manager's check of the saved ones, a new certificate (key, CSR, check) and a bundle push. The
# CA signs in a process of its own, so that only the agent's side is in this interpreter.
IDENTITY_AT_WORK = textwrap.dedent("""
    import datetime as dt, random, subprocess, sys
    from pathlib import Path
    import trio
    from agent.sync import join
    from agent.identity import IdentityManager, SignResult
    from agent.identity.store import StateDir
    ids = Path(sys.argv[1])
    NODE, WEB = "spiffe://cluster.local/nodemesh/node/node-1", "spiffe://cluster.local/ns/shop/sa/web"
    SIGN = ("import sys, datetime as dt; from pathlib import Path; from controller import pki; "
            "i = pki.load_issuer(Path(sys.argv[1]), Path(sys.argv[2])); c = pki.parse_csr(sys.stdin.buffer.read()); "
            "sys.stdout.buffer.write(pki.cert_pem(pki.issue(i, c.public_key, now=dt.datetime.now(dt.timezone.utc), "
            "ttl=dt.timedelta(hours=1), uris=(c.uri,))))")

    async def signer(uri, csr):
        done = await trio.run_process([sys.executable, "-c", SIGN, sys.argv[2], sys.argv[3]], stdin=csr,
                                      capture_stdout=True)
        return SignResult(done.stdout, (ids / "bundle.pem").read_bytes())

    async def main():
        now = dt.datetime.now(dt.timezone.utc)
        assert await join.saved_node_identity(StateDir(ids), NODE, now) is not None
        manager = IdentityManager(signer, rng=random.Random(1), state_dir=ids)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            manager.client_context(NODE)
            await manager.certified(WEB)
            manager.server_context(WEB)
            await manager.update_bundle(Path(sys.argv[2]).read_bytes() * 2)
            nursery.cancel_scope.cancel()

    trio.run(main)
""")


def test_the_identity_manager_at_work_leaves_cryptography_alone(tmp_path):
    from agent.identity.store import StateDir
    from controller import pki
    now = dt.datetime.now(dt.timezone.utc)
    root = pki.create_root("lean root", now=now, ttl=dt.timedelta(days=1))
    key = pki.generate_key()
    state = StateDir(tmp_path / "identities")
    state.save("spiffe://cluster.local/nodemesh/node/node-1",
               pki.cert_pem(pki.issue(root, key.public_key(), now=now, ttl=dt.timedelta(hours=1),
                                      uris=("spiffe://cluster.local/nodemesh/node/node-1",))), pki.key_pem(key))
    state.save_bundle(pki.cert_pem(root.cert))
    (tmp_path / "root.pem").write_bytes(pki.cert_pem(root.cert))
    (tmp_path / "root.key").write_bytes(pki.key_pem(root.key))
    loaded = loaded_after(IDENTITY_AT_WORK, str(state.path), str(tmp_path / "root.pem"), str(tmp_path / "root.key"))
    assert "trio" in loaded and "cryptography" not in loaded
