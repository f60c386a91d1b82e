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
from http.server import BaseHTTPRequestHandler

from json_server import serve_json

PORT = int(sys.argv[1])


def where_and_token() -> tuple[str, str]:
    if os.environ.get("JUPYTERHUB_API_TOKEN"):
        return os.environ["JUPYTERHUB_SERVICE_URL"].rstrip("/") + "/", os.environ["JUPYTERHUB_API_TOKEN"]
    with open(os.environ["TRIOPROXY_RUNTIME_FILE"]) as file:
        runtime = json.load(file)
    return runtime["url"], runtime["token"]


def answer(request: BaseHTTPRequestHandler) -> dict[str, object]:
    url, token = where_and_token()
    ask = urllib.request.Request(f"{url}server-proxy/api/url?port={PORT}", headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(ask, timeout=20) as response:
        return {"answer": json.load(response), "prefix": os.environ.get("TRIOPROXY_PUBLIC_PREFIX")}


if __name__ == "__main__":
    serve_json(PORT, answer)
