"""A backend that tells what it was started with: python argv_env.py PORT [ARGS...].

At start it prints its arguments and the value of $APP_PASSWORD (as a careless app might);
every GET answers JSON {"argv": ARGS, "env": {name: value or null}} for the variables named
in ?names=A,B (default: PGHOST, PGUSER, APP_PASSWORD, MARK).
"""

import os
import sys
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from json_server import serve_json

DEFAULT_NAMES = "PGHOST,PGUSER,APP_PASSWORD,MARK"


def answer(request: BaseHTTPRequestHandler) -> dict[str, object]:
    query = parse_qs(urlsplit(request.path).query)
    names = query.get("names", [DEFAULT_NAMES])[0].split(",")
    return {"argv": sys.argv[2:], "env": {name: os.environ.get(name) for name in names}}


if __name__ == "__main__":
    print("started with:", " ".join(sys.argv[2:]), flush=True)
    print("my password is", os.environ.get("APP_PASSWORD"), flush=True)
    serve_json(int(sys.argv[1]), answer)
