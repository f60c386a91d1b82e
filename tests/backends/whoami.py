"""An app that checks who trioproxy says its user is: python whoami.py PORT README.

It runs the verification snippet of README.md (the section "Telling an app who its user is")
as it is written there, with the secret from its own environment, and answers every GET with
JSON {"user": what the snippet says (null: not vouched for), "headers": [[name, value]...] as
they arrived}. ``?max_age=S`` passes S to the snippet.
"""

import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def snippet(readme: str) -> str:
    section = readme.split("## Telling an app who its user is", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return next(block for block in blocks if "def trioproxy_user" in block)


namespace: dict = {}
exec(snippet(open(sys.argv[2]).read()), namespace)  # noqa: S102 - the README's own code is what is tested
trioproxy_user = namespace["trioproxy_user"]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        max_age = float(query.get("max_age", ["60"])[0])
        body = json.dumps(
            {"user": trioproxy_user(self.headers, max_age), "headers": [[k, v] for k, v in self.headers.items()]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
