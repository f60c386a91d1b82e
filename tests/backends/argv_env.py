"""A backend that tells what it was started with: python argv_env.py PORT [ARGS...].

At start it prints its arguments and the value of $APP_PASSWORD (as a careless app might);
every GET answers JSON {"argv": ARGS, "env": {name: value or null}} for the variables named
in ?names=A,B (default: PGHOST, PGUSER, APP_PASSWORD, MARK).
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

DEFAULT_NAMES = "PGHOST,PGUSER,APP_PASSWORD,MARK"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        names = query.get("names", [DEFAULT_NAMES])[0].split(",")
        body = json.dumps({"argv": sys.argv[2:], "env": {name: os.environ.get(name) for name in names}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    print("started with:", " ".join(sys.argv[2:]), flush=True)
    print("my password is", os.environ.get("APP_PASSWORD"), flush=True)
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
