"""store.py: an identity's key and chain as files, because stdlib ``ssl`` loads them only from files.

Owns the private directory (0700), atomic 0600 writes (temp file + fsync + rename), the file
names of each identity and of the trust bundle, and reading them back. Knows nothing of what
the PEM says; no trio (the files are a few kB, written synchronously).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, unquote

BUNDLE = "bundle.pem"


class StateDir:
    """A private directory holding ``<quoted uri>.key.pem`` + ``<quoted uri>.chain.pem`` per identity."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    def files(self, uri: str) -> tuple[Path, Path]:
        """``(chain file, key file)`` of ``uri``; the name is the percent-encoded URI (reversible)."""
        name = quote(uri, safe="")
        return self.path / f"{name}.chain.pem", self.path / f"{name}.key.pem"

    def save(self, uri: str, chain_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
        """Write ``uri``'s key, then its chain (both 0600, each atomically); return their paths."""
        chain, key = self.files(uri)
        write_private(key, key_pem)
        write_private(chain, chain_pem)
        return chain, key

    def load(self, uri: str) -> tuple[bytes, bytes] | None:
        """``(chain_pem, key_pem)`` of ``uri``, or None when either file is missing."""
        chain, key = self.files(uri)
        try:
            return chain.read_bytes(), key.read_bytes()
        except FileNotFoundError:
            return None

    def uris(self) -> list[str]:
        """The URIs that have a saved chain, sorted (the inverse of ``files``' naming)."""
        suffix = ".chain.pem"
        return sorted(unquote(p.name[:-len(suffix)]) for p in self.path.glob(f"*{suffix}")
                      if not p.name.startswith("."))

    def remove(self, uri: str) -> None:
        """Delete ``uri``'s files; tolerates their absence."""
        for path in self.files(uri):
            path.unlink(missing_ok=True)

    def save_bundle(self, bundle_pem: bytes) -> None:
        write_private(self.path / BUNDLE, bundle_pem)

    def load_bundle(self) -> bytes | None:
        try:
            return (self.path / BUNDLE).read_bytes()
        except FileNotFoundError:
            return None


@contextmanager
def scratch_files(chain_pem: bytes, key_pem: bytes) -> Iterator[tuple[Path, Path]]:
    """``(chain file, key file)`` in a fresh ``mkdtemp`` dir (0700, files 0600), removed on exit.

    For a manager without a state dir: the files live only while ``ssl`` reads them.
    """
    tmp = Path(tempfile.mkdtemp(prefix="nodemesh-identity-"))
    try:
        chain, key = tmp / "chain.pem", tmp / "key.pem"
        write_private(key, key_pem)
        write_private(chain, chain_pem)
        yield chain, key
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (temp file in the same dir + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
