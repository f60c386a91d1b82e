"""A backend that answers 503 to /ready for its first N requests (warming up), then 200.

    python warming.py PORT N

GET /stats answers JSON: how many connections it accepted and how many /ready requests it got.
HTTP/1.1 with keep-alive, so that a client that keeps its connection is seen to.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

counts = {"connections": 0, "ready_requests": 0}
lock = threading.Lock()
WARM_AFTER = int(sys.argv[2])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        with lock:
            counts["connections"] += 1
        super().setup()

    def do_GET(self) -> None:
        if self.path == "/ready":
            with lock:
                counts["ready_requests"] += 1
                warm = counts["ready_requests"] > WARM_AFTER
            self._answer(200 if warm else 503, b"ok" if warm else b"warming up")
        else:
            with lock:
                body = json.dumps(counts).encode()
            self._answer(200, body)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
