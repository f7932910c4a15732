"""Fixtures for controller tests: an initialised data dir and a running in-process controller."""
from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from controller.api import spiffe
from controller import app, auth, client, datadir, pki


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def data_dir(tmp_path) -> datadir.DataDir:
    d = datadir.DataDir(tmp_path / "controller")
    assert datadir.initialise(d, trust_domain="cluster.local", server_names=("localhost", "127.0.0.1"))
    return d


def issue_client_cert(d: datadir.DataDir, tmp: Path, uri: str, name: str) -> tuple[Path, Path]:
    """A client credential signed by the controller's CA with the given URI SAN."""
    issuer = pki.load_issuer(d.signer_cert, d.signer_key)
    key = pki.generate_key()
    cert = pki.issue(issuer, key.public_key(), now=dt.datetime.now(dt.timezone.utc),
                     ttl=dt.timedelta(hours=1), uris=(uri,), server=False)
    cp, kp = tmp / f"{name}.crt", tmp / f"{name}.key"
    pki.write_file(cp, pki.cert_pem(cert), secret=False)
    pki.write_file(kp, pki.key_pem(key), secret=True)
    return cp, kp


@dataclass
class Running:
    d: datadir.DataDir
    url: str
    metrics_url: str

    def settings(self, cert: Path | None = None, key: Path | None = None, admin: bool = True) -> client.Settings:
        if admin and cert is None:
            cert, key = self.d.admin_cert, self.d.admin_key
        return client.Settings(self.url, self.d.bundle, cert, key)

    def client(self, **kw) -> client.Client:
        return client.Client(self.settings(**kw))

    async def call(self, fn, *args, **kw):
        """Run a blocking client call off the trio thread."""
        return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


@pytest.fixture
async def controller(data_dir, nursery) -> Running:
    api_port, metrics_port = await nursery.start(lambda task_status: app.run(
        data_dir, api_host="127.0.0.1", api_port=0, metrics_host="127.0.0.1", metrics_port=0,
        task_status=task_status))
    return Running(data_dir, f"https://127.0.0.1:{api_port}", f"http://127.0.0.1:{metrics_port}")


TD = "cluster.local"
NODE_URI = spiffe.node_uri(TD, "node-1")
WORKLOAD_URI = "spiffe://cluster.local/ns/shop/sa/web"
