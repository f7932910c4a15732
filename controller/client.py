"""client.py: the CLI's HTTPS client for the controller API (the one owner of httpx here).

Resolves where the controller is and which credential to present (flags, then
NODEMESH_* environment variables, then the config file ``controller init`` wrote), and turns
transport and API failures into ClientError messages that say what was tried and what to do.
"""
from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import yaml

PREFIX = "/apis/nodemesh.io/v1alpha1"


def default_config_path() -> Path:
    return Path(os.environ.get("NODEMESH_CONFIG") or Path.home() / ".config" / "nodemesh" / "config.yaml")


class ClientError(Exception):
    """Something the user must act on; the message says what and where."""


class Unreachable(ClientError):
    pass


class ApiStatusError(ClientError):
    def __init__(self, code: int, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.code, self.problems = code, problems or []


@dataclass(frozen=True)
class Settings:
    controller: str
    ca: Path
    cert: Path | None = None
    key: Path | None = None


def resolve_settings(
    controller: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    config: str | None = None,
) -> Settings:
    """Merge flags > environment > config file into Settings, or raise ClientError."""
    path = Path(config) if config else default_config_path()
    file: dict = {}
    if path.exists():
        try:
            file = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ClientError(f"{path}: cannot read the client config: {e}") from None
        if not isinstance(file, dict):
            raise ClientError(f"{path}: the client config must be a mapping")
    elif config:
        raise ClientError(f"{path}: no such config file")

    def pick(flag, env, name):
        return flag or os.environ.get(env) or file.get(name)

    url = pick(controller, "NODEMESH_CONTROLLER", "controller")
    ca_path = pick(ca, "NODEMESH_CA", "ca")
    if not url or not ca_path:
        raise ClientError(
            "no controller configured: pass --controller URL --ca FILE (or set NODEMESH_CONTROLLER "
            f"and NODEMESH_CA), or run 'nodemesh controller init', which writes {path}")
    cert_path, key_path = pick(cert, "NODEMESH_CERT", "cert"), pick(key, "NODEMESH_KEY", "key")
    return Settings(url.rstrip("/"), Path(ca_path),
                    Path(cert_path) if cert_path else None, Path(key_path) if key_path else None)


def write_config(path: Path, settings: Settings) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"controller": settings.controller, "ca": str(settings.ca)}
    if settings.cert:
        body |= {"cert": str(settings.cert), "key": str(settings.key)}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    path.chmod(0o600)


def ssl_context(settings: Settings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(cafile=settings.ca)
        if settings.cert:
            ctx.load_cert_chain(settings.cert, settings.key)
    except (OSError, ssl.SSLError) as e:
        raise ClientError(f"cannot load TLS files (ca {settings.ca}, cert {settings.cert}, "
                          f"key {settings.key}): {e}") from None
    return ctx


class Client:
    """Blocking API client; one instance per command."""

    def __init__(self, settings: Settings, timeout: float = 15.0):
        self.settings = settings
        self._http = httpx.Client(base_url=settings.controller, verify=ssl_context(settings), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def apply(self, items: list[dict], *, dry_run: bool = False) -> dict:
        return self._call("POST", f"{PREFIX}/apply", json={"items": items, "dryRun": dry_run})

    def delete(self, keys: list[dict]) -> dict:
        return self._call("POST", f"{PREFIX}/delete", json={"items": keys})

    def list(self, plural: str, namespace: str | None = None) -> dict:
        return self._call("GET", _collection(plural, namespace))

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict:
        return self._call("GET", f"{_collection(plural, namespace)}/{name}")

    def create_token(self, node: str, ttl_seconds: float) -> dict:
        return self._call("POST", f"{PREFIX}/tokens", json={"node": node, "ttlSeconds": ttl_seconds})

    def rotate_ca(self, propagation_seconds: float = 60.0) -> dict:
        return self._call("POST", f"{PREFIX}/ca/rotate", json={"propagationSeconds": propagation_seconds})

    def status(self) -> dict:
        return self._call("GET", f"{PREFIX}/status")

    def watch(self, resource_version: int | None = None, kinds: tuple[str, ...] = ()) -> Iterator[dict]:
        """Yield watch events (dicts with type and object) until the stream ends."""
        params = [("kind", k) for k in kinds]
        if resource_version is not None:
            params.append(("resourceVersion", str(resource_version)))
        try:
            with self._http.stream("GET", f"{PREFIX}/watch", params=params,
                                   timeout=httpx.Timeout(15.0, read=None)) as r:
                if r.status_code != 200:
                    r.read()
                    raise _status_error(r)
                for line in r.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        if r.status_code >= 400:
            raise _status_error(r)
        return r.json()

    def _unreachable(self, e: Exception) -> Unreachable:
        cause = str(e) or type(e).__name__
        hint = ("the controller refused our TLS credentials or we refused its certificate; "
                "check --ca/--cert/--key" if isinstance(e, httpx.ConnectError) and "SSL" in cause
                else "is 'nodemesh controller run' running there? Set --controller or NODEMESH_CONTROLLER")
        return Unreachable(f"cannot reach the controller at {self.settings.controller}: {cause} ({hint})")


def _collection(plural: str, namespace: str | None) -> str:
    return f"{PREFIX}/namespaces/{namespace}/{plural}" if namespace else f"{PREFIX}/{plural}"


def _status_error(r: httpx.Response) -> ApiStatusError:
    try:
        body = r.json()
        message = body.get("message") or r.text
        problems = (body.get("details") or {}).get("problems")
    except (ValueError, AttributeError):
        message, problems = r.text.strip() or r.reason_phrase, None
    return ApiStatusError(r.status_code, f"{message} (HTTP {r.status_code})", problems)
