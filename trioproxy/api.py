"""trioproxy's own pages and API (a Quart blueprint): login, launcher, servers-info, icons,
the management API and logs."""

from __future__ import annotations

import html
import mimetypes
from string import Template
from typing import Any
from urllib.parse import urlsplit

import trio
from quart import Blueprint, Response, jsonify, make_response, redirect, request

from .errors import render_error
from .supervisor import ServerUnavailable, Supervisors


def _error(status: int, message: str, server: str | None = None, output: list[str] | None = None) -> Response:
    accept = request.headers.get("Accept", "")
    as_json = "text/html" not in accept
    content_type, body = render_error(status, message, as_json=as_json, server=server, output=output)
    return Response(body, status=status, content_type=content_type.decode())


def make_blueprint(settings: Any, supervisors: Supervisors) -> Blueprint:
    bp = Blueprint("trioproxy", __name__)
    base_url: str = settings.base_url
    auth = settings.auth

    def public_base() -> str:
        # Behind another proxy (Jupyter's /proxy/<port>/), links must carry its prefix too.
        prefix = request.headers.get("X-Forwarded-Prefix") or request.headers.get("X-Forwarded-Context")
        if prefix:
            return prefix.rstrip("/") + base_url
        return base_url

    @bp.before_request
    async def require_login() -> Response | None:
        path = request.path[len(base_url) - 1 :] if base_url != "/" else request.path
        if path.startswith(("/login", "/logout", "/oauth_callback")):
            return None
        identity = await auth.authenticate(request.scope)
        if identity is not None:
            request.scope["trioproxy.identity"] = identity
            return None
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            return redirect(auth.login_url(request.full_path.rstrip("?")))
        return _error(403, "Authentication required: a valid token is needed.")

    @bp.after_request
    async def add_cookie(response: Response) -> Response:
        identity = request.scope.get("trioproxy.identity")
        if identity is not None and identity.set_cookie:
            response.headers.add("Set-Cookie", identity.set_cookie.decode("latin-1"))
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # -- login ------------------------------------------------------------------------------

    def safe_next(value: str | None) -> str:
        """Only local paths under the base URL: no open redirect to another site."""
        if not value:
            return base_url
        parts = urlsplit(value)
        if parts.scheme or parts.netloc or not value.startswith("/") or value.startswith("//"):
            return base_url
        if "\\" in value or not value.startswith(base_url.rstrip("/") or "/"):
            return base_url
        return value

    @bp.route("/login", methods=["GET", "POST"])
    async def login() -> Any:
        if not getattr(auth, "enabled", True):
            return redirect(safe_next(request.args.get("next")))
        if hasattr(auth, "oauth_login"):
            return await auth.oauth_login(request)
        message = ""
        if request.method == "POST":
            form = await request.form
            next_url = safe_next(form.get("next"))
            if auth.check_token(form.get("token", "")):
                response = redirect(next_url)
                response.headers.add("Set-Cookie", auth.make_cookie().decode("latin-1"))
                return response
            message = "That token is not valid."
            status = 403
        else:
            next_url = safe_next(request.args.get("next"))
            status = 200
        page = Template(_LOGIN_PAGE).substitute(
            action=html.escape(public_base() + "login"),
            next=html.escape(next_url),
            message=f"<p class='error'>{html.escape(message)}</p>" if message else "",
        )
        return Response(page, status=status, content_type="text/html; charset=utf-8")

    @bp.route("/logout")
    async def logout() -> Any:
        response = redirect(base_url + "login")
        cookie = getattr(auth, "cookie_name", None)
        if cookie:
            response.delete_cookie(cookie, path=base_url)
        return response

    if hasattr(auth, "oauth_callback"):

        @bp.route("/oauth_callback")
        async def oauth_callback() -> Any:
            return await auth.oauth_callback(request)

    # -- servers-info and icons (jupyter-server-proxy's shapes) ---------------------------

    def launcher_info(name: str) -> dict[str, Any]:
        process = supervisors[name].process
        entry = process.launcher
        info: dict[str, Any] = {
            "enabled": entry.enabled,
            "title": entry.title,
            "path_info": entry.path_info,
            "category": entry.category,
        }
        if entry.icon_path:
            info["icon_url"] = f"{public_base()}server-proxy/icon/{name}"
        return {"name": name, "launcher_entry": info, "new_browser_tab": process.new_browser_tab}

    @bp.route("/server-proxy/servers-info")
    async def servers_info() -> Any:
        return jsonify({"server_processes": [launcher_info(name) for name in supervisors]})

    @bp.route("/server-proxy/icon/<name>")
    async def icon(name: str) -> Any:
        if name not in supervisors or not supervisors[name].process.launcher.icon_path:
            return _error(404, f"No icon for {name!r}.")
        path = supervisors[name].process.launcher.icon_path
        try:
            data = await trio.Path(path).read_bytes()
        except OSError as exc:
            return _error(404, f"Icon of {name!r} cannot be read: {exc.strerror}.")
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return Response(data, content_type=content_type)

    # -- management API ---------------------------------------------------------------------

    def status(name: str) -> dict[str, Any]:
        return supervisors[name].status()

    def unknown(name: str) -> Response:
        return _error(404, f"No server named {name!r}.")

    @bp.route("/server-proxy/api/servers")
    async def list_servers() -> Any:
        return jsonify({"servers": [status(name) for name in supervisors]})

    @bp.route("/server-proxy/api/servers/<name>", methods=["GET", "DELETE"])
    async def one_server(name: str) -> Any:
        if name not in supervisors:
            return unknown(name)
        if request.method == "DELETE":
            await supervisors[name].stop()
        return jsonify(status(name))

    @bp.route("/server-proxy/api/servers/<name>/<action>", methods=["POST"])
    async def control(name: str, action: str) -> Any:
        if name not in supervisors:
            return unknown(name)
        if action not in ("start", "restart", "stop"):
            return _error(404, f"Unknown action {action!r}: use start, restart or stop.")
        supervisor = supervisors[name]
        wait = request.args.get("wait", "1") not in ("0", "false", "no")
        try:
            if action == "stop":
                await supervisor.stop()
            elif action == "start":
                await supervisor.start(wait=wait)
            else:
                await supervisor.restart(wait=wait)
        except ServerUnavailable as exc:
            return _error(exc.status, str(exc), server=name, output=exc.output)
        return jsonify(status(name))

    @bp.route("/server-proxy/api/servers/<name>/logs")
    async def logs(name: str) -> Any:
        if name not in supervisors:
            return unknown(name)
        output = supervisors[name].output
        if request.args.get("follow", "0") in ("0", "false", "no"):
            text = "".join(line + "\n" for line in output.tail())
            return Response(text, content_type="text/plain; charset=utf-8")

        async def follow() -> Any:
            seen = max(0, output.total - 1000)
            while True:
                lines = output.since(seen)
                seen = output.total
                if lines:
                    yield "".join(line + "\n" for line in lines).encode()
                await output.wait_for_more(seen)

        response = await make_response(follow(), 200, {"Content-Type": "text/plain; charset=utf-8"})
        response.timeout = None  # type: ignore[union-attr]
        return response

    # -- launcher page ----------------------------------------------------------------------

    @bp.route("/")
    async def launcher() -> Any:
        base = public_base()
        rows = []
        for name in supervisors:
            process = supervisors[name].process
            entry = process.launcher
            if not entry.enabled:
                continue
            state = supervisors[name].state.value
            icon = (
                f"<img src='{html.escape(base)}server-proxy/icon/{html.escape(name)}' alt=''>"
                if entry.icon_path
                else "<span class='noicon'></span>"
            )
            target = " target='_blank'" if process.new_browser_tab else ""
            rows.append(
                f"<li data-server='{html.escape(name)}'>{icon}"
                f"<a href='{html.escape(base + entry.path_info)}'{target}>{html.escape(entry.title)}</a>"
                f" <span class='state'>{html.escape(state)}</span></li>"
            )
        page = Template(_LAUNCHER_PAGE).substitute(servers="\n".join(rows) or "<li>No servers configured.</li>")
        return Response(page, content_type="text/html; charset=utf-8")

    return bp


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:48em;padding:0 1em}"
    "li{list-style:none;margin:.6em 0;display:flex;align-items:center;gap:.6em}"
    "img,.noicon{width:32px;height:32px;display:inline-block;background:#eee;border-radius:4px}"
    ".state{color:#666;font-size:.9em}.error{color:#b00}"
)

_LOGIN_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>trioproxy: log in</title>"
    "<style>" + _STYLE + "</style></head><body><h1>trioproxy</h1>"
    "<p>Enter the token printed when trioproxy started.</p>$message"
    "<form method='post' action='$action'><input type='hidden' name='next' value='$next'>"
    "<input type='password' name='token' autofocus placeholder='token' size='40'> "
    "<button type='submit'>Log in</button></form></body></html>"
)

_LAUNCHER_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>trioproxy</title>"
    "<style>" + _STYLE + "</style></head><body><h1>trioproxy</h1><ul>$servers</ul></body></html>"
)
