"""A backend that does what a library in a kernel does: python asks_url.py PORT.

Every GET asks trioproxy where PORT is reached (``GET server-proxy/api/url?port=PORT``) and
answers ``{"answer": <trioproxy's JSON>, "prefix": $TRIOPROXY_PUBLIC_PREFIX}``. Under
JupyterHub it asks at ``$JUPYTERHUB_SERVICE_URL`` with ``$JUPYTERHUB_API_TOKEN``; otherwise at
the URL, with the token, of trioproxy's runtime file (``$TRIOPROXY_RUNTIME_FILE``).
"""

import json
import os
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])


def where_and_token() -> tuple[str, str]:
    if os.environ.get("JUPYTERHUB_API_TOKEN"):
        return os.environ["JUPYTERHUB_SERVICE_URL"].rstrip("/") + "/", os.environ["JUPYTERHUB_API_TOKEN"]
    with open(os.environ["TRIOPROXY_RUNTIME_FILE"]) as file:
        runtime = json.load(file)
    return runtime["url"], runtime["token"]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url, token = where_and_token()
        ask = urllib.request.Request(f"{url}server-proxy/api/url?port={PORT}", headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(ask, timeout=20) as response:
            answer = json.load(response)
        body = json.dumps({"answer": answer, "prefix": os.environ.get("TRIOPROXY_PUBLIC_PREFIX")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
