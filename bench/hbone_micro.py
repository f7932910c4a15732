"""hbone_micro.py: CPU per request through one HBONE hop, each side measured on its own.

Two processes on 127.0.0.1: this one runs an ``HbonePool`` client, a child runs ``serve_hbone``
whose handler echoes each stream. Real mTLS (a throwaway CA from controller.pki, contexts from
agent.identity.tls). Per run it times N sequential exchanges of ``--size`` bytes each way and
reads each side's CPU (client: getrusage; server: /proc/<pid>/stat) around the timed part only,
so handshakes and start-up are left out.

Modes: ``stream`` (one stream, N request/response exchanges) and ``per-request`` (a new CONNECT
stream per exchange: open, send, half-close, read to EOF, close; the TLS connection is pooled).
With ``--relay`` the server relays each stream (agent.proxy.relay, as the inbound proxy does)
to a TCP echo server in a third process, so its figure is a whole destination proxy's cost.
``--server floor`` (implies ``--relay``) puts ``bench.hbone_floor`` in the server's place: the
same hop on a bare epoll loop, the least such a server can cost in Python.
``--no-hyperframe-patch`` runs both sides with hyperframe's own DATA-frame repr
(agent.proxy.hyperframe_patch undone), to measure what that patch saves.

    PYTHONPATH=. python -m bench.hbone_micro [--requests 3000] [--runs 5] [--mode stream|per-request|both]
                                             [--relay] [--server agent|floor] [--size 1024]
                                             [--no-hyperframe-patch]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

CLIENT_ID = "spiffe://cluster.local/ns/bench/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/bench/sa/server"
_TICK = os.sysconf("SC_CLK_TCK")


def make_certs(directory: Path) -> None:
    from controller import pki
    now = dt.datetime.now(dt.timezone.utc)
    root = pki.create_root("bench root", now=now, ttl=dt.timedelta(days=1))
    pki.write_file(directory / "ca.crt", pki.cert_pem(root.cert), secret=False)
    for name, uri in (("client", CLIENT_ID), ("server", SERVER_ID)):
        key = pki.generate_key()
        cert = pki.issue(root, key.public_key(), now=now, ttl=dt.timedelta(hours=1), uris=(uri,))
        pki.write_file(directory / f"{name}.crt", pki.cert_pem(cert), secret=False)
        pki.write_file(directory / f"{name}.key", pki.key_pem(key), secret=True)


def context(directory: Path, name: str):
    from agent.identity import tls
    make = tls.server_context if name == "server" else tls.client_context
    return make(directory / f"{name}.crt", directory / f"{name}.key", (directory / "ca.crt").read_bytes())


# --- server (child process) -----------------------------------------------------------------

async def _echo(req) -> None:
    stream = await req.accept()
    try:
        while data := await stream.receive_some(64 * 1024):
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass


async def _tcp_echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(64 * 1024):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def echo_server() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, _tcp_echo, 0)
        print(listeners[0].socket.getsockname()[1], flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()


def _unpatch(patched: bool) -> None:
    if not patched:
        from agent.proxy import hyperframe_patch
        hyperframe_patch.undo()


async def serve(directory: Path, relay_to: int | None, patched: bool = True) -> None:
    from agent.proxy import hbone
    _unpatch(patched)
    from agent.proxy.relay import RelayError, open_marked_tcp_stream, relay
    ctx = context(directory, "server")

    async def relay_handler(req) -> None:
        upstream = await open_marked_tcp_stream("127.0.0.1", relay_to)
        async with upstream:
            stream = await req.accept()
            try:
                await relay(stream, upstream)
            except RelayError:
                pass

    handler = relay_handler if relay_to else _echo

    async def on_tcp(tcp: trio.SocketStream) -> None:
        await hbone.serve_hbone(trio.SSLStream(tcp, ctx, server_side=True), handler)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, on_tcp, 0)
        port = listeners[0].socket.getsockname()[1]
        print(port, flush=True)
        # Ends when the parent closes our stdin.
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()


# --- client (this process) ------------------------------------------------------------------

def _proc_cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK     # utime, stime


def _self_cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


async def _receive_exactly(stream, n: int) -> None:
    got = 0
    while got < n:
        data = await stream.receive_some(n - got)
        if not data:
            raise RuntimeError("EOF mid-response")
        got += len(data)


async def _one_stream(pool, open_kw, n: int, payload: bytes) -> None:
    stream = await pool.open("127.0.0.1:9", **open_kw)
    for _ in range(n):
        await stream.send_all(payload)
        await _receive_exactly(stream, len(payload))
    await stream.send_eof()
    while await stream.receive_some():
        pass
    await stream.aclose()


async def _per_request(pool, open_kw, n: int, payload: bytes) -> None:
    for _ in range(n):
        stream = await pool.open("127.0.0.1:9", **open_kw)
        await stream.send_all(payload)
        await stream.send_eof()
        got = 0
        while data := await stream.receive_some(64 * 1024):
            got += len(data)
        assert got == len(payload), got
        await stream.aclose()


async def run_client(port: int, server_pid: int, directory: Path, mode: str, n: int, size: int,
                     runs: int, patched: bool = True) -> list[dict]:
    from agent.proxy.hbone_pool import open_hbone_pool
    _unpatch(patched)
    ctx = context(directory, "client")
    open_kw = dict(node_address=("127.0.0.1", port), source_identity=CLIENT_ID,
                   expected_peer=frozenset({SERVER_ID}), ssl_context=ctx, forwarded_for="10.0.0.1")
    payload = os.urandom(size)
    body = _one_stream if mode == "stream" else _per_request
    results = []
    async with open_hbone_pool() as pool:
        await body(pool, open_kw, min(200, n), payload)          # warm up: handshake, caches
        for _ in range(runs):
            c0, s0, t0 = _self_cpu(), _proc_cpu(server_pid), time.perf_counter()
            with trio.fail_after(120):
                await body(pool, open_kw, n, payload)
            c1, s1, t1 = _self_cpu(), _proc_cpu(server_pid), time.perf_counter()
            us = lambda a, b: (sum(b) - sum(a)) / n * 1e6           # noqa: E731
            results.append({"client_us": us(c0, c1), "server_us": us(s0, s1), "rps": n / (t1 - t0),
                            "client_sys_us": (c1[1] - c0[1]) / n * 1e6,
                            "server_sys_us": (s1[1] - s0[1]) / n * 1e6})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--mode", choices=("stream", "per-request", "both"), default="both")
    ap.add_argument("--relay", action="store_true",
                    help="the server relays to a TCP echo process instead of echoing itself")
    ap.add_argument("--server", choices=("agent", "floor"), default="agent",
                    help="agent: our serve_hbone (default); floor: bench.hbone_floor, a bare epoll "
                         "loop with ssl and h2 (implies --relay)")
    ap.add_argument("--no-hyperframe-patch", dest="patched", action="store_false",
                    help="both sides with hyperframe's own DATA-frame repr (agent.proxy.hyperframe_patch undone)")
    ap.add_argument("--json", action="store_true", help="print the raw runs as JSON too")
    ap.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)   # the children's roles
    ap.add_argument("--relay-to", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo:
        trio.run(echo_server)
        return
    if args.serve:
        profile = os.environ.get("HBONE_MICRO_PROFILE")     # a path: cProfile the server there
        if profile:
            import cProfile
            cProfile.runctx("trio.run(serve, Path(args.serve), args.relay_to, args.patched)",
                            globals(), locals(), profile)
        else:
            trio.run(serve, Path(args.serve), args.relay_to, args.patched)
        return
    with tempfile.TemporaryDirectory(prefix="hbone-micro-") as tmp:
        directory = Path(tmp)
        make_certs(directory)
        children = []
        relay_to = []
        if args.relay or args.server == "floor":
            echo = subprocess.Popen([sys.executable, "-m", "bench.hbone_micro", "--echo"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            children.append(echo)
            relay_to = ["--relay-to", echo.stdout.readline().strip()]
        role = (["-m", "bench.hbone_floor", tmp, relay_to[1]] if args.server == "floor"
                else ["-m", "bench.hbone_micro", "--serve", tmp, *relay_to,
                      *([] if args.patched else ["--no-hyperframe-patch"])])
        child = subprocess.Popen([sys.executable, *role],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(child)
        try:
            port = int(child.stdout.readline())
            modes = ("stream", "per-request") if args.mode == "both" else (args.mode,)
            for mode in modes:
                runs = trio.run(run_client, port, child.pid, directory, mode, args.requests,
                                args.size, args.runs, args.patched)
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rng = {k: (min(r[k] for r in runs), max(r[k] for r in runs)) for k in runs[0]}
                print(f"{mode:12s} {args.requests} x {args.size} B, median of {args.runs}: "
                      f"client {med['client_us']:.0f} µs/req ({rng['client_us'][0]:.0f}–{rng['client_us'][1]:.0f}), "
                      f"server {med['server_us']:.0f} µs/req ({rng['server_us'][0]:.0f}–{rng['server_us'][1]:.0f}), "
                      f"{med['rps']:.0f} req/s ({rng['rps'][0]:.0f}–{rng['rps'][1]:.0f}); "
                      f"of which kernel: client {med['client_sys_us']:.0f}, server {med['server_sys_us']:.0f} µs/req")
                if args.json:
                    print(json.dumps({"mode": mode, "runs": runs}))
        finally:
            for c in children:
                c.stdin.close()
                try:
                    c.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    c.kill()


if __name__ == "__main__":
    main()
