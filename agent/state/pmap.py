"""pmap.py: ``PMap``, an immutable mapping whose next version costs what changed, not its size.

Pure data, no I/O. A PMap is a tuple of about sqrt(n) plain dicts (shards), a key living in
shard ``hash(key) & mask``; ``edit()`` gives an ``Editor`` that copies the shard tuple and each
shard it writes to once, so a one-key change to a 10^4-entry table copies some 200 references
instead of 10^4. The rule: a PMap never changes once built (two threads may read one); an
Editor is owned by one writer until ``finish``. Lookups stay one hash and two C-level indexings
(``m.shards[hash(k) & m.mask].get(k)``, which hot readers may inline).
"""
from __future__ import annotations

from typing import Generic, Iterator, Mapping, TypeVar

K = TypeVar("K")
V = TypeVar("V")
_MISSING = object()


def _bits(n: int) -> int:
    """log2 of the shard count for ``n`` entries: shards of about sqrt(n) entries each."""
    return (n.bit_length() + 1) // 2


def _shard(items: Mapping, bits: int) -> tuple[dict, ...]:
    if bits == 0:
        return (dict(items),)
    shards: list[dict] = [{} for _ in range(1 << bits)]
    mask = (1 << bits) - 1
    for k, v in items.items():
        shards[hash(k) & mask][k] = v
    return tuple(shards)


class _Reads(Generic[K, V]):
    """The lookups a PMap and its Editor share: ``shards`` (a sequence of dicts) and ``mask``."""

    __slots__ = ()

    shards: "tuple[dict, ...] | list[dict]"
    mask: int

    def get(self, k: K, default: V | None = None) -> V | None:
        return self.shards[hash(k) & self.mask].get(k, default)

    def __getitem__(self, k: K) -> V:
        return self.shards[hash(k) & self.mask][k]

    def __contains__(self, k: object) -> bool:
        return k in self.shards[hash(k) & self.mask]

    def __iter__(self) -> Iterator[K]:
        for s in self.shards:
            yield from s


class PMap(_Reads[K, V]):
    """An immutable mapping (the read half of ``dict``'s interface); equal to another PMap or
    dict holding the same items, whatever their sharding and order."""

    __slots__ = ("shards", "mask", "_len")

    shards: tuple[dict, ...]
    mask: int

    def __init__(self, items: Mapping[K, V] | None = None) -> None:
        items = items if items is not None else {}
        self._set(_shard(items, _bits(len(items))), len(items))

    def _set(self, shards: tuple[dict, ...], n: int) -> None:
        self.shards, self.mask, self._len = shards, len(shards) - 1, n

    @classmethod
    def _of(cls, shards: tuple[dict, ...], n: int) -> PMap:
        m = cls.__new__(cls)
        m._set(shards, n)
        return m

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def keys(self) -> Iterator[K]:
        return iter(self)

    def values(self) -> Iterator[V]:
        for s in self.shards:
            yield from s.values()

    def items(self) -> Iterator[tuple[K, V]]:
        for s in self.shards:
            yield from s.items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (PMap, dict)) or len(other) != self._len:
            return NotImplemented if not isinstance(other, (PMap, dict)) else False
        get = other.get
        return all(get(k, _MISSING) == v for k, v in self.items())

    __hash__ = None   # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PMap({dict(self.items())!r})"

    def edit(self) -> Editor[K, V]:
        """A writable draft of this map; ``self`` does not change."""
        return Editor(self)


class Editor(_Reads[K, V]):
    """The next version of a PMap, being written: the ``dict`` operations the tables use. Each
    shard is copied on its first write; ``finish`` returns the new PMap (re-sharded when the
    size has drifted far from what the shard count suits)."""

    __slots__ = ("shards", "_owned", "mask", "_len")

    def __init__(self, base: PMap[K, V]) -> None:
        self.shards: list[dict] = list(base.shards)
        self._owned: set[int] = set()
        self.mask, self._len = base.mask, len(base)

    def _write(self, k: K) -> dict:
        i = hash(k) & self.mask
        if i not in self._owned:
            self.shards[i] = self.shards[i].copy()
            self._owned.add(i)
        return self.shards[i]

    def __len__(self) -> int:
        return self._len

    def __setitem__(self, k: K, v: V) -> None:
        s = self._write(k)
        n = len(s)
        s[k] = v
        self._len += len(s) - n

    def __delitem__(self, k: K) -> None:
        if k not in self:
            raise KeyError(k)
        del self._write(k)[k]
        self._len -= 1

    def pop(self, k: K, default: V | None = None) -> V | None:
        if k not in self:
            return default
        self._len -= 1
        return self._write(k).pop(k)

    def finish(self) -> PMap[K, V]:
        """The edited map. The editor must not be used afterwards."""
        if abs(_bits(self._len) - (len(self.shards).bit_length() - 1)) > 1:
            merged = {k: v for s in self.shards for k, v in s.items()}
            return PMap(merged)
        return PMap._of(tuple(self.shards), self._len)


def finish(t: object) -> object:
    """``t.finish()`` for an Editor, else ``t`` unchanged."""
    return t.finish() if type(t) is Editor else t
