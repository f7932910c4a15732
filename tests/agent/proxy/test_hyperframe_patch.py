"""hyperframe_patch against hyperframe itself: the same reprs, for every frame type that uses it."""
from __future__ import annotations

import random

import hyperframe
import hyperframe.frame as hf
import pytest

from agent.proxy import hyperframe_patch


@pytest.fixture
def restore():
    yield
    hyperframe_patch.apply()        # as the process has it (h2conn applies it on import)


def _payloads() -> list:
    rng = random.Random(3)
    sizes = [0, 1, 9, 10, 11, 12, 20, 100, 16384, 1 << 20] + [rng.randint(0, 64) for _ in range(50)]
    out = [None]
    for n in sizes:
        data = rng.randbytes(n)
        out += [data, bytearray(data), memoryview(data)]
    return out


@pytest.mark.skipif(hyperframe.__version__ not in hyperframe_patch.TESTED, reason="patch not applied")
def test_the_same_output_as_hyperframes_own():
    assert hyperframe_patch.original is not None
    for data in _payloads():
        assert hyperframe_patch.raw_data_repr(data) == hyperframe_patch.original(data), data


def _frames(data: bytes) -> list:
    return [hf.DataFrame(1, data), hf.DataFrame(3, data, flags=["END_STREAM"]),
            hf.HeadersFrame(1, data), hf.ContinuationFrame(1, data), hf.PushPromiseFrame(1, 2, data),
            hf.ExtensionFrame(0xFA, 1, 0, data)]


@pytest.mark.skipif(hyperframe.__version__ not in hyperframe_patch.TESTED, reason="patch not applied")
def test_frame_reprs_are_unchanged(restore):
    payloads = [b"", b"x", bytes(range(11)), bytes(range(256)) * 300]
    hyperframe_patch.undo()
    before = [repr(f) for data in payloads for f in _frames(data)]
    assert hyperframe_patch.apply()
    assert hf._raw_data_repr is hyperframe_patch.raw_data_repr
    assert [repr(f) for data in payloads for f in _frames(data)] == before


def test_an_untested_hyperframe_is_left_alone(monkeypatch, restore):
    hyperframe_patch.undo()
    monkeypatch.setattr(hyperframe, "__version__", "6.2.0")
    assert not hyperframe_patch.apply()
    assert hf._raw_data_repr is hyperframe_patch.original
