"""apps.py: the lab's demo applications, plain servers that know nothing of the mesh.

    python -m agent.lab.apps http --port 8080 --name web-1   HTTP/1.1, keep-alive; GET answers
                                                              "<name> <path>" (the pod and the path)
    python -m agent.lab.apps echo --port 9000                TCP echo

Standard library only; one thread per connection. Each request or connection is logged to
stdout (the lab's ``logs/app-<pod>.log``) with the peer address.
"""
from __future__ import annotations

import argparse
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _log(line: str) -> None:
    print(line, flush=True)


def http_server(host: str, port: int, name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"          # keep-alive
        server_version = f"nodemesh-lab/{name}"

        def do_GET(self) -> None:
            body = f"{name} {self.path}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, fmt: str, *args) -> None:
            _log(f"{self.client_address[0]}:{self.client_address[1]} {fmt % args}")

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    return ThreadingHTTPServer((host, port), Handler)


def echo_server(host: str, port: int) -> socketserver.ThreadingTCPServer:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            peer = "%s:%d" % self.client_address[:2]
            total = 0
            try:
                while chunk := self.request.recv(65536):
                    self.request.sendall(chunk)
                    total += len(chunk)
            except OSError:
                pass
            _log(f"{peer} echoed {total} bytes")

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    return Server((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m agent.lab.apps", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="app", required=True)
    h = sub.add_parser("http", help="HTTP/1.1 server answering '<name> <path>'")
    h.add_argument("--port", type=int, default=8080)
    h.add_argument("--name", default="web")
    e = sub.add_parser("echo", help="TCP echo server")
    e.add_argument("--port", type=int, default=9000)
    for p in (h, e):
        p.add_argument("--host", default="0.0.0.0")
    args = ap.parse_args(argv)
    server = http_server(args.host, args.port, args.name) if args.app == "http" else echo_server(args.host, args.port)
    _log(f"{args.app} listening on {args.host}:{args.port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
