"""An app that checks who trioproxy says its user is: python whoami.py PORT README.

It runs the verification snippet of README.md (the section "Telling an app who its user is")
as it is written there, with the secret from its own environment, and answers every GET with
JSON {"user": what the snippet says (null: not vouched for), "headers": [[name, value]...] as
they arrived}. ``?max_age=S`` passes S to the snippet.
"""

import re
import sys
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from json_server import serve_json


def snippet(readme: str) -> str:
    section = readme.split("## Telling an app who its user is", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return next(block for block in blocks if "def trioproxy_user" in block)


namespace: dict = {}
exec(snippet(open(sys.argv[2]).read()), namespace)  # noqa: S102 - the README's own code is what is tested
trioproxy_user = namespace["trioproxy_user"]


def answer(request: BaseHTTPRequestHandler) -> dict[str, object]:
    query = parse_qs(urlsplit(request.path).query)
    max_age = float(query.get("max_age", ["60"])[0])
    return {"user": trioproxy_user(request.headers, max_age), "headers": [[k, v] for k, v in request.headers.items()]}


if __name__ == "__main__":
    serve_json(int(sys.argv[1]), answer)
