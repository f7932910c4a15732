"""scripts/install-controller and scripts/install-node, run for real below a temporary --root
(root: they install Debian packages when missing and build the kernel-header tree).

One install of each (the venv from this checkout, pip from the package index) is shared by the
tests of this module, which run in order: what was written, that the installed nodemesh runs
from its venv, that a second run changes nothing, that --uninstall removes it all.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.controller.conftest import free_port
from tests.notify_socket import NotifySocket

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
CONTROLLER_URL = "https://10.0.0.1:15012"


def run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # as a user runs it
    p = subprocess.run([str(ROOT / "scripts" / script), *args], env=env, capture_output=True,
                       text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def files_below(root: Path) -> dict[str, int]:
    """Every file and link below root (the venv and header tree as one entry each), with mtimes."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in list(dirs):
            p = Path(dirpath) / name
            if p.name in ("venv", "kheaders") or p.is_symlink():
                out[str(p.relative_to(root))] = p.lstat().st_mtime_ns
                dirs.remove(name)
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.lstat().st_mtime_ns
    return out


@pytest.fixture(scope="module")
def installed():
    root = Path(tempfile.mkdtemp(prefix="nodemesh-root-"))
    token = root.parent / f"{root.name}.token"
    token.write_text("not-a-real-token\n")
    try:
        ctl = run("install-controller", "--root", str(root), "--no-start", "--san", "10.0.0.1")
        node = run("install-node", "--root", str(root), "--no-start", "--controller", CONTROLLER_URL,
                   "--node", "node-1", "--token", str(token), "--redirect", "iptables")
        yield root, token, ctl.stderr + node.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)
        token.unlink()


def test_install_writes_the_venv_units_token_and_ca(installed):
    root, _, log = installed
    venv = root / "opt/nodemesh/venv"
    assert os.access(venv / "bin/nodemesh", os.X_OK), log
    home = next(ln.split("=", 1)[1].strip() for ln in (venv / "pyvenv.cfg").read_text().splitlines()
                if ln.startswith("home"))
    assert not Path(home).resolve().is_relative_to("/root"), home   # ProtectHome=yes would hide it
    assert os.readlink(root / "usr/local/bin/nodemesh") == "/opt/nodemesh/venv/bin/nodemesh"
    conf = root / "etc/nodemesh/agent"
    assert (conf / "token").read_text() == "not-a-real-token"
    assert (conf / "token").stat().st_mode & 0o777 == 0o600
    data = root / "var/lib/nodemesh/controller"
    assert (conf / "ca.crt").read_bytes() == (data / "ca/bundle.crt").read_bytes()   # this host's controller
    assert (root / "root/.config/nodemesh/config.yaml").is_file()
    assert (root / "var/lib/nodemesh/kheaders/include").is_dir()

    # The units are what the installed `nodemesh install systemd` prints (one source of the text).
    units = root / "etc/systemd/system"
    printed = subprocess.run([venv / "bin/nodemesh", "install", "systemd", "agent", "--node", "node-1",
                              "--controller", CONTROLLER_URL, "--redirect", "iptables"],
                             capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
    assert (units / "nodemesh-agent.service").read_text() == printed
    assert "ExecStart=/opt/nodemesh/venv/bin/nodemesh controller run --data-dir /var/lib/nodemesh/controller" \
        in (units / "nodemesh-controller.service").read_text()
    if shutil.which("systemd-analyze"):       # the installed binary is what ExecStart runs
        with tempfile.TemporaryDirectory() as tmp:
            for unit in units.iterdir():
                (Path(tmp) / unit.name).write_text(unit.read_text().replace("/opt/nodemesh", str(root / "opt/nodemesh")))
            p = subprocess.run(["systemd-analyze", "verify", "--man=no", *os.listdir(tmp)], cwd=tmp,
                               capture_output=True, text=True)
            assert p.stdout + p.stderr == ""
    assert "not enabling or starting nodemesh-agent.service" in log


def test_installed_venv_is_not_the_checkout_and_has_bcc_and_the_bpf_sources(installed):
    root, _, _ = installed
    py = root / "opt/nodemesh/venv/bin/python"
    code = ("import agent, bcc; from agent.redirect.ebpf_build import BPF_DIR, PROGRAM_FILES; "
            "print(agent.__file__); print(bcc.__file__); print(all((BPF_DIR / f).is_file() for f in PROGRAM_FILES))")
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True, cwd="/",
                         env={"PATH": os.environ["PATH"]}).stdout.split()
    assert Path(out[0]).is_relative_to(root / "opt/nodemesh/venv"), out
    assert Path(out[1]).resolve().is_relative_to("/usr/lib/python3/dist-packages/bcc"), out
    assert out[2] == "True"


def test_installed_controller_runs_and_notifies_ready(installed):
    """The installed venv's `nodemesh controller run` on the data dir the installer made."""
    root, _, _ = installed
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="nm-") as short:
        notify = NotifySocket(f"{short}/notify")
        proc = subprocess.Popen([root / "opt/nodemesh/venv/bin/nodemesh", "controller", "run", "--data-dir",
                                 root / "var/lib/nodemesh/controller", "--listen", f"127.0.0.1:{free_port()}",
                                 "--metrics-listen", f"127.0.0.1:{free_port()}"],
                                env={"PATH": os.environ["PATH"], **notify.env()},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            notify.wait_for("READY=1", timeout=30)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            notify.wait_for("STOPPING=1", timeout=1)
        finally:
            if proc.poll() is None:
                proc.kill()
            notify.close()


def test_second_run_changes_nothing_and_says_so(installed):
    root, token, _ = installed
    before = files_below(root)
    ctl = run("install-controller", "--root", str(root), "--no-start", "--san", "10.0.0.1")
    node = run("install-node", "--root", str(root), "--no-start", "--controller", CONTROLLER_URL,
               "--node", "node-1", "--token", str(token), "--redirect", "iptables")
    assert "nothing changed: the nodemesh controller is already installed as asked" in ctl.stderr
    assert "nothing changed: the nodemesh agent of node node-1 is already installed as asked" in node.stderr
    assert files_below(root) == before

    # A changed option is a change: the unit is rewritten, and the run says what it wrote.
    node = run("install-node", "--root", str(root), "--no-start", "--controller", CONTROLLER_URL,
               "--node", "node-1", "--token", str(token), "--redirect", "ebpf")
    assert f"wrote {root}/etc/systemd/system/nodemesh-agent.service" in node.stderr
    assert "--redirect ebpf" in (root / "etc/systemd/system/nodemesh-agent.service").read_text()


def test_errors_say_what_to_do(installed):
    root, _, _ = installed
    p = run("install-node", "--root", str(root), "--node", "n", "--controller", CONTROLLER_URL,
            "--token", "/nonexistent", check=False)
    assert p.returncode == 1
    assert "cannot read the join token /nonexistent" in p.stderr and "nodemesh token create --node n" in p.stderr
    p = run("install-node", "--root", str(root), check=False)
    assert p.returncode == 1 and "missing --controller --node --token" in p.stderr
    assert run("install-node", "--help").stdout.startswith("Usage:")


def test_uninstall_removes_everything_it_made(installed):
    root, _, _ = installed
    node = run("install-node", "--root", str(root), "--uninstall")
    assert "keeping" in node.stderr and (root / "opt/nodemesh/venv").is_dir()   # the controller uses it
    assert not (root / "etc/systemd/system/nodemesh-agent.service").exists()
    assert not (root / "etc/nodemesh").exists()

    run("install-controller", "--root", str(root), "--uninstall")
    kept = files_below(root)
    assert all(f.startswith(("var/lib/nodemesh/", "root/.config/nodemesh/")) for f in kept), kept
    assert (root / "var/lib/nodemesh/controller/ca/bundle.crt").is_file()    # the CA is kept without --purge

    run("install-controller", "--root", str(root), "--uninstall", "--purge")
    run("install-node", "--root", str(root), "--uninstall", "--purge")
    assert files_below(root) == {}
    again = run("install-node", "--root", str(root), "--uninstall")
    assert "nothing changed: the nodemesh agent was not installed" in again.stderr
