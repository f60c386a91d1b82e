"""A backend that takes a while to start, printing as it goes, as a model server does:

    python slow_start.py PORT SECONDS PIDFILE [FAIL]

Appends its pid to PIDFILE, prints "loading model… <n>/<total>" every quarter second for
SECONDS, then listens on PORT (or, with FAIL, prints why and exits 3). Every GET, HEAD and
POST is answered with an HTML page naming the target it was asked for (path and query), and
its pid.
"""

import html
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

port, seconds, pidfile = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
fail = len(sys.argv) > 4
with open(pidfile, "a") as file:
    file.write(f"{os.getpid()}\n")
steps = max(1, int(seconds / 0.25))
for step in range(1, steps + 1):
    print(f"loading model… {step}/{steps}", flush=True)
    time.sleep(seconds / steps)
if fail:
    print("model.bin: checksum mismatch", flush=True)
    sys.exit(3)
print("model loaded; listening", flush=True)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"<!doctype html><title>app</title><p id='target'>{html.escape(self.path)}</p><p id='pid'>{os.getpid()}</p>"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
