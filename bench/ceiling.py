"""The loopback ceiling for a warm WADO-RS answer: the least work that sends it.

A minimal HTTP/1.1 server that answers every GET with the same
``multipart/related`` body the gateway sends for a cached series (the same
part headers, from ``app.dicomweb.multipart``), with a Content-Length, each
file handed to the kernel with ``sendfile`` (no copy through the process).
No routing, no cache index, no checks: what is left is the TCP loopback and
curl, so a warm retrieve through the gateway cannot be faster than this on
the same machine.

    .venv/bin/python -m bench.ceiling --port 8999 FILE...
"""

from __future__ import annotations

import argparse
import socket
import socketserver
from collections.abc import Sequence
from pathlib import Path

from app.dicomweb import multipart
from tests.peers.common import read_instance_info


class _Body:
    def __init__(self, files: Sequence[Path], base: str) -> None:
        self.boundary = multipart.new_boundary()
        self.parts: list[tuple[bytes, Path, int]] = []
        for path in files:
            info = read_instance_info(path)
            size = path.stat().st_size
            header = multipart.part_header(
                self.boundary,
                f"application/dicom; transfer-syntax={info.transfer_syntax_uid}",
                f"{base}/instances/{info.sop_instance_uid}",
                size,
            )
            self.parts.append((header, path, size))
        self.trailer = multipart.part_trailer()
        self.closing = multipart.closing(self.boundary)
        self.length = sum(len(h) + n + len(self.trailer) for h, _, n in self.parts) + len(
            self.closing
        )


def serve(port: int, files: Sequence[Path]) -> None:
    body = _Body(files, f"http://127.0.0.1:{port}/dicomweb/studies/x/series/y")

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                request += chunk
            head = (
                "HTTP/1.1 200 OK\r\n"
                f"content-type: {multipart.content_type(body.boundary, 'application/dicom')}\r\n"
                f"content-length: {body.length}\r\nconnection: close\r\n\r\n"
            ).encode()
            lead = head
            for header, path, _size in body.parts:
                sock.sendall(lead + header)
                with open(path, "rb") as f:
                    sock.sendfile(f)
                lead = body.trailer
            sock.sendall(body.trailer + body.closing)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler) as server:
        print(f"ceiling: {len(files)} files, {body.length} bytes on port {port}", flush=True)
        server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    serve(args.port, args.files)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
