"""Shared test fixtures and the root-only marker.

Tests marked ``@pytest.mark.root`` need root (network namespaces, eBPF, iptables). They are
skipped, with the reason printed, when the suite runs as an ordinary user; CI runs as root,
so there they always run.
"""
import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (run sudo scripts/test)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
