"""ebpf_build.py: compile and load bpf/*.c with bcc — in a child process, so that the agent
never holds bcc and LLVM (importing bcc alone is ~62 MB of RSS, a compile ~80 MB more).

The only module that imports bcc. ``build()`` runs ``python -m agent.redirect.ebpf_build`` and
receives the loaded programs' and maps' file descriptors over a unix socket (SCM_RIGHTS); the
child then exits, and the kernel objects live on through those descriptors. ``compile_here()``
does the same work in this process (the child's job, and tests that read bcc's view of the
maps). Attaching and map access are bpfmaps.py's (libbpf), which needs neither.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from agent.base.constants import INBOUND_HBONE_PORT, INBOUND_PLAIN_PORT, KHEADERS, OUTBOUND_PORT, PROXY_MARK
from agent.redirect.base import RedirectError



def _bpf_dir() -> Path:
    """bpf/ beside the packages in a checkout; in an installed wheel (scripts/install-node), the
    copy pyproject's data-files put under the venv, PREFIX/share/nodemesh/bpf."""
    beside = Path(__file__).resolve().parents[2] / "bpf"
    return beside if beside.is_dir() else Path(sys.prefix) / "share" / "nodemesh" / "bpf"


BPF_DIR = _bpf_dir()
PROGRAM_FILES = ("cgroup_connect4_redirect.c", "sockops_origdst.c", "sk_lookup_inbound.c")

MAPS = ("origdst_by_peer", "origdst_by_cookie", "own_addrs", "inbound_listeners", "host_inbound")
BUILD_TIMEOUT = 120.0                  # seconds; a compile takes 0.5–2.5 s here


def cflags() -> list[str]:
    """The programs' parameters (DESIGN "Ports", agent.base.constants) and include path."""
    return [f"-DOUTBOUND_PORT={OUTBOUND_PORT}", f"-DINBOUND_PLAIN_PORT={INBOUND_PLAIN_PORT}",
            f"-DINBOUND_HBONE_PORT={INBOUND_HBONE_PORT}", f"-DPROXY_MARK={PROXY_MARK:#x}",
            f"-I{BPF_DIR / 'include'}"]


# (name, bcc program type, attach type): the types by number where bcc 0.26 has no name
PROGRAMS = (("nm_connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),
            ("nm_connect6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT"),
            ("nm_sockops", "SOCK_OPS", None),
            ("nm_sk_lookup", 30, "SK_LOOKUP"))          # 30: BPF_PROG_TYPE_SK_LOOKUP


@dataclass
class Built:
    """Loaded programs and maps, by name, as descriptors this process owns."""

    progs: dict[str, int] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)

    def cleanup(self) -> None:
        """Close the descriptors (programs still attached somewhere stay loaded)."""
        for fd in [*self.progs.values(), *self.maps.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.progs, self.maps = {}, {}


def build() -> Built:
    """Compile and load in a child process; blocking (0.5–3 s). Raises RedirectError with the
    child's words."""
    env = _with_kernel_source(dict(os.environ))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        child = subprocess.Popen([sys.executable, "-m", "agent.redirect.ebpf_build", str(theirs.fileno())],
                                 pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        theirs.close()
        try:
            ours.settimeout(BUILD_TIMEOUT)
            message, fds, _, _ = socket.recv_fds(ours, 65536, len(PROGRAMS) + len(MAPS))
        except (OSError, TimeoutError) as e:
            child.kill()
            message, fds = b"", []
            why = f"no answer from the compiler process: {e}"
        else:
            why = ""
        try:
            err = child.communicate(timeout=BUILD_TIMEOUT)[1].decode(errors="replace").strip()
        except subprocess.TimeoutExpired:
            child.kill()
            err = "timed out"
        if not message:
            for fd in fds:
                os.close(fd)
            raise RedirectError(err.splitlines()[-1] if err else why or
                                f"the compiler process exited with {child.returncode}")
        names = json.loads(message)
        pairs = dict(zip(names, fds))
        return Built(progs={n: pairs[n] for n, _, _ in PROGRAMS},
                     maps={n: pairs[n] for n in MAPS})
    finally:
        ours.close()
        theirs.close()


def _with_kernel_source(env):
    """``env`` with BCC_KERNEL_SOURCE at the setup's header tree when the running kernel has
    none of its own (KERNEL-NOTES); returns ``env``."""
    if "BCC_KERNEL_SOURCE" not in env and os.path.isdir(KHEADERS) \
            and not os.path.isdir(f"/lib/modules/{os.uname().release}/build"):
        env["BCC_KERNEL_SOURCE"] = KHEADERS
    return env


def compile_here():
    """Compile and load in this process; returns (bcc BPF, {program name: fd}). Blocking."""
    from bcc import BPF, BPFAttachType, BPFProgType

    _with_kernel_source(os.environ)
    text = "\n".join((BPF_DIR / f).read_text() for f in PROGRAM_FILES)
    try:
        b = BPF(text=text.encode(), cflags=cflags())
    except Exception as e:
        raise RedirectError(f"compiling {', '.join(PROGRAM_FILES)} failed: {e} (is "
                            f"BCC_KERNEL_SOURCE set to a header tree? see KERNEL-NOTES)") from e
    try:
        fds = {}
        for name, ptype, atype in PROGRAMS:
            fds[name] = b.load_func(name.encode(),
                                    getattr(BPFProgType, ptype) if isinstance(ptype, str) else ptype,
                                    attach_type=getattr(BPFAttachType, atype) if atype else -1).fd
    except Exception as e:
        b.cleanup()
        raise RedirectError(f"loading the redirect programs failed: {e}") from e
    return b, fds


def _map_fd(b, name: str) -> int:
    from bcc import libbcc
    fd = libbcc.lib.bpf_table_fd(b.module, name.encode())
    if fd < 0:
        raise RedirectError(f"map {name} missing from the compiled programs")
    return fd


def main(argv: list[str]) -> int:
    """The child: compile, send every program's and map's fd to the parent, exit."""
    out = socket.socket(fileno=int(argv[0]))
    try:
        b, progs = compile_here()
        names = [n for n, _, _ in PROGRAMS] + list(MAPS)
        fds = [progs[n] for n, _, _ in PROGRAMS] + [_map_fd(b, n) for n in MAPS]
    except RedirectError as e:
        print(str(e), file=sys.stderr)
        return 2
    socket.send_fds(out, [json.dumps(names).encode()], fds)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
