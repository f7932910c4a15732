"""controlplane.py: the agent's client of the controller API (the agent's one owner of httpx).

Join with a token, get certificates signed, fetch the trust bundle, list + watch resources,
report the version served. The controller is verified with the trust bundle (hostnames as in
any HTTPS client); the agent authenticates with its node certificate once it has one.
Turns transport failures into ``Unreachable`` and API refusals into ``Refused``.
"""
from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import httpx

PREFIX = "/apis/nodemesh.io/v1alpha1"


class ControlPlaneError(Exception):
    pass


class Unreachable(ControlPlaneError):
    """The controller could not be reached (or the TLS handshake failed); try again later."""


class Refused(ControlPlaneError):
    """The controller answered with an error; ``code`` is the HTTP status."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{message} (HTTP {code})")
        self.code = code


@dataclass(frozen=True)
class Signed:
    chain_pem: bytes
    bundle_pem: bytes


class ControlPlane:
    def __init__(self, url: str, *, bundle_pem: bytes, credentials: tuple[Path, Path] | None = None,
                 timeout: float = 10.0):
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._bundle, self._credentials = bundle_pem, credentials
        self._client = self._make_client()

    def _make_client(self) -> httpx.AsyncClient:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=self._bundle.decode())
        if self._credentials:
            ctx.load_cert_chain(*self._credentials)
        return httpx.AsyncClient(base_url=self.url, verify=ctx, timeout=self._timeout)

    @property
    def bundle_pem(self) -> bytes:
        return self._bundle

    async def update(self, *, bundle_pem: bytes | None = None,
                     credentials: tuple[Path, Path] | None = None) -> None:
        """Use a new trust bundle and/or node credential for new requests."""
        self._bundle = bundle_pem or self._bundle
        self._credentials = credentials or self._credentials
        old, self._client = self._client, self._make_client()
        await old.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def trust_domain(self) -> str:
        """The mesh's trust domain, from the (anonymous) health endpoint: needed to ask for a node identity."""
        return (await self._call("GET", "/healthz", prefix=""))["trustDomain"]

    async def join(self, token: str, csr_pem: bytes) -> Signed:
        r = await self._call("POST", "/join", json={"token": token, "csr": csr_pem.decode()})
        return Signed(r["certificate"].encode(), r["trustBundle"].encode())

    async def sign(self, csr_pem: bytes) -> Signed:
        r = await self._call("POST", "/certificates", json={"csr": csr_pem.decode()})
        return Signed(r["certificate"].encode(), r["trustBundle"].encode())

    async def trust_bundle(self) -> bytes:
        return (await self._call("GET", "/trustbundle"))["trustBundle"].encode()

    async def report(self, *, version: int, ready: bool, error: str = "") -> None:
        await self._call("POST", "/nodestatus", json={"version": version, "ready": ready, "error": error})

    async def watch(self, since: int | None) -> AsyncIterator[dict]:
        """Events after ``since`` (all current objects first as ADDED when None), until the stream ends."""
        params = {} if since is None else {"resourceVersion": str(since)}
        try:
            async with self._client.stream("GET", PREFIX + "/watch", params=params,
                                           timeout=httpx.Timeout(self._timeout, read=60.0)) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise _refused(r)
                async for line in r.aiter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as e:
            raise Unreachable(f"controller {self.url}: {e or type(e).__name__}") from None

    async def _call(self, method: str, path: str, *, prefix: str = PREFIX, **kw) -> dict:
        try:
            r = await self._client.request(method, prefix + path, **kw)
        except httpx.TransportError as e:
            raise Unreachable(f"controller {self.url}: {e or type(e).__name__}") from None
        if r.status_code >= 400:
            raise _refused(r)
        return r.json()


def _refused(r: httpx.Response) -> Refused:
    try:
        message = r.json().get("message") or r.text
    except ValueError:
        message = r.text
    return Refused(r.status_code, message.strip())
