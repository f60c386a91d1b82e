"""A real HTTP/1.1 backend for tests: python echo.py PORT [--unix PATH].

Routes:
  /status/<code>           answer with that status
  /redirect?to=<location>  302 to <location>
  /cookies                 two Set-Cookie headers
  /bytes?size=N[&chunked=1][&chunk=K]  N bytes of a repeating pattern
  /gzip                    a gzip-encoded body with Content-Encoding: gzip
  /sse?n=N&delay=S         N server-sent events, S seconds apart
  /die?after=N             promises more than it sends, then drops the connection
  /slow?delay=S            answers after S seconds
  /crash                   reads the request, then the process exits without answering
  /reject                  answers 413 at once without reading the body, and closes
  /upload (any method)     reads the body; answers its length and sha256
  /headers?name=value...   answers with those response headers
  /bytes?...&report=FILE   writes "broken" to FILE if the client goes away mid-body
  anything else            JSON echo of method, target, headers and body length
"""

import gzip
import hashlib
import json
import os
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import ThreadingUnixStreamServer
from urllib.parse import parse_qs, urlsplit

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(size):
    full, rest = divmod(size, len(PATTERN))
    for _ in range(full):
        yield PATTERN
    if rest:
        yield PATTERN[:rest]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            digest, total = hashlib.sha256(), 0
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return total, digest.hexdigest()
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    digest.update(chunk)
                    remaining -= len(chunk)
                    total += len(chunk)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        digest, remaining = hashlib.sha256(), length
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        return length - remaining, digest.hexdigest()

    def _send_json(self, status, document, extra=()):
        body = json.dumps(document).encode() if status not in (204, 304) else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_any(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path.startswith("/status/"):
            self._body()
            code = int(path.split("/")[2])
            self._send_json(code, {"status": code})
        elif path.endswith("/redirect"):
            self._body()
            self.send_response(302)
            self.send_header("Location", query.get("to", "/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/cookies":
            self.send_response(200)
            self.send_header("Set-Cookie", "a=1; Path=/")
            self.send_header("Set-Cookie", "b=2; Path=/")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        elif path == "/bytes":
            size = int(query.get("size", "0"))
            chunked = query.get("chunked") == "1"
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(size))
            self.end_headers()
            try:
                for block in pattern_bytes(size):
                    if chunked:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    else:
                        self.wfile.write(block)
                    if "report" in query:
                        time.sleep(0.001)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                if "report" in query:
                    with open(query["report"], "w") as report:
                        report.write("broken")
                self.close_connection = True
        elif path == "/gzip":
            body = gzip.compress(b"compressed hello " * 100)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/sse":
            count, delay = int(query.get("n", "3")), float(query.get("delay", "0.2"))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(count):
                event = f"data: {i} {time.time()}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(delay)
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/die":
            after = int(query.get("after", "1000"))
            self.send_response(200)
            self.send_header("Content-Length", str(after * 10))
            self.end_headers()
            self.wfile.write(b"x" * after)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        elif path == "/headers":
            self.send_response(200)
            for name, values in parse_qs(url.query).items():
                for value in values:
                    self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/crash":
            self._body()
            os._exit(1)  # dies having read the request, before answering
        elif path == "/reject":
            self.close_connection = True
            self.send_response(413)
            self.send_header("Content-Length", "8")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"too big!")
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
        elif path == "/slow":
            time.sleep(float(query.get("delay", "1")))
            self._send_json(200, {"slow": True})
        elif path == "/upload":
            length, digest = self._body()
            self._send_json(200, {"length": length, "sha256": digest})
        else:
            length, digest = self._body()
            self._send_json(
                200,
                {
                    "method": self.command,
                    "target": self.path,
                    "headers": [[k.lower(), v] for k, v in self.headers.items()],
                    "body_length": length,
                    "body_sha256": digest,
                    "peer": list(self.client_address),
                },
            )

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.handle_any
        raise AttributeError(name)


class UnixServer(ThreadingUnixStreamServer):
    daemon_threads = True

    def get_request(self):
        request, _ = super().get_request()
        return request, ("127.0.0.1", 0)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--unix":
        path = sys.argv[2]
        if os.path.exists(path):
            os.unlink(path)
        server = UnixServer(path, Handler)
    else:
        ThreadingHTTPServer.daemon_threads = True
        server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("echo backend listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
