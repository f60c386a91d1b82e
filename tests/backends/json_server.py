"""What the small JSON backends share: a quiet threading server whose handler answers each GET
with the JSON document ``answer(handler)`` returns. Imported by scripts run as
``python <backend>.py``, so from their own directory."""

import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def serve_json(port: int, answer: Callable[[BaseHTTPRequestHandler], Any]) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(answer(self)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            """Quiet: the tests read the backend's own prints, not an access log."""

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
