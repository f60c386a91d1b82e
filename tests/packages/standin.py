"""Stand-ins for the programs the jupyter-*-proxy packages start: ``standin.py PROGRAM ARGS…``.

The package matrix (tests/test_package_matrix.py) puts a wrapper named after each program
(``rserver``, ``code-server``, ``vncserver``, ``shiny-server``, ``julia``,
``matlab-proxy-manager-app``, ``tensorboard``, ``marimo``, ``panel``) first on PATH; it runs this
file with the program's name and the package's arguments. Each stand-in finds its port or unix
socket where the package passes it (argv, a config file, the environment), listens on loopback
only, and answers the first pages as the real program does: RStudio's redirect to its sign-in page
with an absolute URL carrying its own port, MATLAB's ``/matlab/`` to ``/matlab/default/``, the
cookies with a path, a 401/403 when the header a package adds (``request_headers_override``) is
missing. ``vncserver`` speaks the first RFB messages on its socket.

When ``STANDIN_RECORDS`` names a directory, each process writes what it was given there
(``<program>-<pid>.json``: argv, cwd, where it listens, the variables packages set) and appends one
line per request to ``<program>-<pid>.requests.jsonl``, so that the matrix can compare what the
two proxies handed the same package.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import socket
import socketserver
import sys
import threading
from pathlib import Path
from typing import Any

RSERVER_HELP = """\
rserver options (stand-in):
  --www-port arg          port to listen on
  --www-socket arg        unix socket to listen on
  --www-root-path arg     the path prefix RStudio is served under
  --www-thread-pool-size arg
  --server-data-dir arg
  --database-config-file arg
  --rsession-which-r arg
  --auth-none arg
"""
# Variables the packages set for their program (recorded; compared between the two proxies).
RECORDED_ENV = ("USER", "MWI_MPM_PORT", "MWI_MPM_AUTH_TOKEN", "MWI_MPM_PARENT_PID", "MWI_MPM_BASE_URL_PREFIX")
RFB_VERSION = b"RFB 003.008\n"


class Fail(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(f"standin: {message}")


def option(argv: list[str], name: str) -> str | None:
    """``--name=value`` or ``--name value`` (also ``-name value``)."""
    for index, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
    return None


def record(program: str, listen: str, extra: dict[str, Any] | None = None) -> None:
    folder = os.environ.get("STANDIN_RECORDS")
    if not folder:
        return
    data = {
        "program": program,
        "proxy": os.environ.get("STANDIN_PROXY"),
        "argv": sys.argv[2:],
        "cwd": os.getcwd(),
        "listen": listen,
        "env": {name: os.environ[name] for name in RECORDED_ENV if name in os.environ},
        **(extra or {}),
    }
    (Path(folder) / f"{program}-{os.getpid()}.json").write_text(json.dumps(data))


def record_request(program: str, method: str, path: str, headers: dict[str, str]) -> None:
    folder = os.environ.get("STANDIN_RECORDS")
    if not folder:
        return
    line = json.dumps({"method": method, "path": path, "headers": headers})
    with open(Path(folder) / f"{program}-{os.getpid()}.requests.jsonl", "a") as file:
        file.write(line + "\n")


# -- answers: (status, headers, body) for (path, request headers) --------------------------------

Answer = tuple[int, list[tuple[str, str]], bytes]
HTML = ("Content-Type", "text/html; charset=utf-8")


def page(title: str) -> bytes:
    return f"<!doctype html><html><head><title>{title}</title></head><body>{title}</body></html>".encode()


class App:
    """One program's pages. ``root`` is the prefix the program was told it is served under."""

    def __init__(self, program: str, argv: list[str]) -> None:
        self.program = program
        self.argv = argv

    def answer(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        raise NotImplementedError


class RServer(App):
    # rserver builds its redirects from its own address and port (hence rewrite_netloc).
    def answer(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        root = option(self.argv, "--www-root-path") or "/"
        port = option(self.argv, "--www-port") or "8787"
        if path == "/":
            return 302, [
                ("Location", f"http://127.0.0.1:{port}{root}auth-sign-in?appUri=%2F"),
                ("Set-Cookie", f"rs-csrf-token=standin-csrf; Path={root}; SameSite=Lax"),
                HTML,
            ], b""
        if path.startswith("/auth-sign-in"):
            return 200, [HTML, ("Set-Cookie", f"user-id=standin; Path={root}; HttpOnly")], page("RStudio Sign In")
        return 404, [HTML], page("Not Found")


class CodeServer(App):
    # code-server (both packages) and openvscode-server: / sends the browser to the folder.
    def answer(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        if path == "/":
            folder = os.path.abspath(self.argv[-1]) if self.argv and not self.argv[-1].startswith("-") else os.getcwd()
            return 302, [("Location", f"./?folder={folder}"), ("Content-Type", "text/plain; charset=utf-8")], b"Found"
        if path.startswith("/?folder="):
            return 200, [HTML, ("Set-Cookie", "vscode-tkn=standin; Path=/; SameSite=Lax")], page("Code - OSS")
        return 404, [("Content-Type", "text/plain; charset=utf-8")], b"Not found"


class ShinyServer(App):
    def __init__(self, program: str, argv: list[str], site_dir: str) -> None:
        super().__init__(program, argv)
        self.site_dir = Path(site_dir)

    def answer(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        target = self.site_dir / path.lstrip("/")
        if target.is_dir() and not path.endswith("/"):
            return 301, [("Location", path + "/"), HTML], b""
        if target.is_dir():
            names = "".join(f"<li>{entry.name}</li>" for entry in sorted(target.iterdir()))
            return 200, [HTML], f"<!doctype html><ul>{names}</ul>".encode()
        return 404, [HTML], page("Not Found")


class Pluto(App):
    def answer(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        if path == "/":
            return 200, [HTML, ("Set-Cookie", "secret=standin-secret; SameSite=Strict; HttpOnly")], page("Pluto.jl")
        return 404, [HTML], page("Not found!")


class MatlabProxyManager(App):
    # absolute_url: paths arrive with Jupyter's prefix; the token header comes from the package.
    def answer(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        if headers.get("mwi-mpm-auth-token") != os.environ.get("MWI_MPM_AUTH_TOKEN"):
            return 403, [("Content-Type", "text/plain; charset=utf-8")], b"403: Forbidden"
        prefix = os.environ.get("MWI_MPM_BASE_URL_PREFIX", "/")
        if path.endswith("/matlab/"):
            return 302, [("Location", path.rstrip("/") + "/default/"), ("Content-Type", "text/plain; charset=utf-8")], b"302: Found"
        if path.startswith(f"{prefix}matlab/default/"):
            return 200, [
                HTML,
                ("Set-Cookie", f"mwi-auth-session=standin; HttpOnly; Path={prefix}matlab/default/; SameSite=Lax"),
            ], page("MATLAB")
        return 404, [HTML], page("Incorrect request path in the URL")


class TensorBoard(App):
    def answer(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        if path == "/":
            return 200, [HTML], page("TensorBoard")
        if path == "/data/logdir":
            body = json.dumps({"logdir": option(self.argv, "--logdir")}).encode()
            return 200, [("Content-Type", "application/json")], body
        return 404, [("Content-Type", "text/plain")], b"Not Found"


class Marimo(App):
    # --token-password guards marimo; the package sends it as Basic credentials for every request.
    def answer(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        base = option(self.argv, "--base-url") or ""
        password = option(self.argv, "--token-password") or ""
        expected = "Basic " + base64.b64encode(b" :" + password.encode()).decode()
        if headers.get("authorization") != expected:
            return 401, [("WWW-Authenticate", 'Basic realm="marimo"'), ("Content-Type", "text/plain; charset=utf-8")], b"Unauthorized"
        if path == f"{base}/":
            return 200, [HTML, ("Set-Cookie", "session_marimo=standin; HttpOnly; Path=/; SameSite=lax")], page("marimo")
        if path == f"{base}/files":
            # Starlette's slash redirect: an absolute URL built from the Host header it got.
            return 307, [("Location", f"http://{headers.get('host', '')}{base}/files/"), ("Content-Length", "0")], b""
        return 404, [("Content-Type", "text/plain; charset=utf-8")], b"Not Found"


class Panel(App):
    def answer(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        prefix = (option(self.argv, "--prefix") or "").rstrip("/")
        apps = [Path(arg).stem for arg in self.argv[1:] if arg.endswith((".py", ".ipynb"))]
        if path == f"{prefix}/":
            links = "".join(f'<a href="{name}">{name}</a>' for name in apps)
            return 200, [HTML], f"<!doctype html>{links}".encode()
        if path.removeprefix(prefix + "/") in apps:
            return 200, [HTML], page("Bokeh Application")
        return 404, [HTML], page("404: Not Found")


# -- serving ----------------------------------------------------------------------------------


def handler_for(app: App) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_any(self) -> None:
            headers = {name.lower(): value for name, value in self.headers.items()}
            record_request(app.program, self.command, self.path, headers)
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            status, response_headers, body = app.answer(self.command, self.path, headers)
            self.send_response(status)
            for name, value in response_headers:
                self.send_header(name, value)
            if not any(name.lower() == "content-length" for name, _ in response_headers):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = handle_any

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"{app.program} stand-in: {format % args}\n")

        def address_string(self) -> str:
            return "client"

    return Handler


class TCPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, _ = super().get_request()
        return sock, ("unix", 0)


def serve(app: App, port: str | None, unix_socket: str | None) -> None:
    handler = handler_for(app)
    server: socketserver.BaseServer
    if unix_socket:
        record(app.program, f"unix:{unix_socket}")
        server = UnixServer(unix_socket, handler)
    elif port:
        record(app.program, f"port:{port}")
        # The packages ask for 0.0.0.0 (code-server, Pluto); a stand-in listens on loopback only.
        server = TCPServer(("127.0.0.1", int(port)), handler)
    else:
        raise Fail(f"{app.program}: found no port or socket in {app.argv!r}")
    print(f"{app.program} stand-in listening on {unix_socket or port}", flush=True)
    server.serve_forever()


def serve_rfb(path: str) -> None:
    """vncserver: the RFB handshake's first steps (version, then the security types: None)."""
    record("vncserver", f"unix:{path}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    print(f"vncserver stand-in listening on {path}", flush=True)

    def talk(conn: socket.socket) -> None:
        with conn:
            conn.sendall(RFB_VERSION)
            got = b""
            while len(got) < len(RFB_VERSION):
                chunk = conn.recv(64)
                if not chunk:
                    return
                got += chunk
            conn.sendall(b"\x01\x01" if got == RFB_VERSION else b"\x00")
            while conn.recv(4096):
                pass

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=talk, args=(conn,), daemon=True).start()


def main(argv: list[str]) -> None:
    program, args = argv[0], argv[1:]
    if program == "rserver":
        if "--help" in args:
            print(RSERVER_HELP)
            return
        serve(RServer(program, args), option(args, "--www-port"), option(args, "--www-socket"))
    elif program in ("code-server", "openvscode-server"):
        bind = option(args, "--bind-addr")
        port = bind.rsplit(":", 1)[1] if bind else option(args, "--port")
        serve(CodeServer(program, args), port, option(args, "--socket"))
    elif program == "vncserver":
        path = option(args, "-rfbunixpath")
        if not path or "-fg" not in args:
            raise Fail(f"vncserver: expected -rfbunixpath PATH and -fg in {args!r}")
        serve_rfb(path)
    elif program == "shiny-server":
        config = Path(args[0]).read_text()
        port = re.search(r"listen (\d+);", config)
        site_dir = re.search(r"site_dir (.+);", config)
        if not port or not site_dir:
            raise Fail(f"shiny-server: no listen/site_dir in {config!r}")
        serve(ShinyServer(program, args, site_dir[1]), port[1], None)
    elif program == "julia":
        port = re.search(r"port=(\d+)", option(args, "-e") or "")
        serve(Pluto(program, args), port[1] if port else None, None)
    elif program == "matlab-proxy-manager-app":
        serve(MatlabProxyManager(program, args), os.environ.get("MWI_MPM_PORT"), None)
    elif program == "tensorboard":
        serve(TensorBoard(program, args), option(args, "--port"), None)
    elif program == "marimo":
        serve(Marimo(program, args), option(args, "--port"), None)
    elif program == "panel":
        serve(Panel(program, args), option(args, "--port"), None)
    else:
        raise Fail(f"no stand-in for {program!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
