"""The machine set-up (scripts/setup.sh) worked: bcc, kernel headers, namespaces.

These fail, rather than skip, when something is broken: as root (CI, `sudo scripts/test`)
every one of them runs.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KHEADERS = "/var/lib/nodemesh/kheaders"


def test_python_version():
    assert sys.version_info >= (3, 11)


def test_import_bcc_is_debians():
    import bcc

    # The PyPI package called "bcc" is an unrelated lattice library: make sure this is Debian's.
    assert hasattr(bcc, "BPF"), f"wrong bcc imported from {bcc.__file__}"
    assert Path(bcc.__file__).resolve().is_relative_to("/usr/lib/python3/dist-packages/bcc")


@pytest.mark.root
def test_kernel_header_tree():
    src = Path(os.environ.get("BCC_KERNEL_SOURCE", KHEADERS))
    for rel in (
        "include/linux/kconfig.h",
        "include/generated/autoconf.h",
        "include/generated/uapi/linux/version.h",
        "include/config",
        "arch/x86/include/asm",
        "arch/x86/include/generated",
    ):
        assert (src / rel).exists(), f"{src / rel} missing: re-run sudo scripts/test"


@pytest.mark.root
def test_bcc_compiles_and_loads(monkeypatch):
    if "BCC_KERNEL_SOURCE" not in os.environ:
        monkeypatch.setenv("BCC_KERNEL_SOURCE", KHEADERS)
    from bcc import BPF

    b = BPF(text=b"int nm_accept_all(struct __sk_buff *skb) { return -1; }")
    try:
        fn = b.load_func(b"nm_accept_all", BPF.SOCKET_FILTER)
        assert fn.fd >= 0
    finally:
        b.cleanup()


@pytest.mark.root
def test_pyroute2_netns_create_remove():
    from pyroute2 import netns

    name = f"nmtest-{os.getpid()}"
    assert name not in netns.listnetns()
    try:
        netns.create(name)
        assert name in netns.listnetns()
        # The namespace is usable: it has its own loopback.
        out = subprocess.run(
            ["ip", "-n", name, "-o", "link", "show", "lo"],
            check=True, capture_output=True, text=True,
        ).stdout
        assert ": lo:" in out
    finally:
        if name in netns.listnetns():
            netns.remove(name)
    assert name not in netns.listnetns()


@pytest.mark.parametrize("script", ["scripts/setup.sh", "scripts/test", "scripts/lab", ".ci/run"])
def test_scripts_parse(script):
    path = ROOT / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    if script != "scripts/setup.sh":
        assert os.access(path, os.X_OK), f"{script} is not executable"
