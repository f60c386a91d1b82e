"""trioproxy's own pages and API (a Quart blueprint): login, launcher, servers-info, icons,
the management API, logs and metrics.

:data:`ROUTES` lists every route and the :class:`Pages` method that serves it. Pages work with
any :class:`~trioproxy.auth.Authenticator`: the token's login form, or a login through another
site (its ``oauth`` flow, e.g. JupyterHub's), whose answers are turned into responses here.
"""

from __future__ import annotations

import html
import json
import logging
import mimetypes
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path, PurePosixPath
from string import Template
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import trio
from quart import Blueprint, Response, jsonify, make_response, redirect, request, send_from_directory
from werkzeug.exceptions import HTTPException, NotFound

from . import startpage
from .auth import Authenticator, Identity, LoginAnswer, LoginRequest, TokenAuth, local_redirect, mask_secrets
from .backend_tls import server_tls
from .config import ConfigError, ReloadError, ServerProcess
from .errors import render_error
from .identity import describe as describe_forward_user
from .instances import InstanceRefused, Instances
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .metrics import render as render_metrics
from .origin import origin_allowed
from .paths import PathTable, parse_path
from .relay.keepalive import interval_for as keepalive_interval
from .relay.upstream import trusted_forwarded
from .supervisor import ServerSupervisor, ServerUnavailable, State, Supervisors
from .templates import Template as ServerTemplate
from .throttle import LoginThrottle
from .urls import public_prefix, url_for_port

if TYPE_CHECKING:
    from .app import Settings

IDENTITY = "trioproxy.identity"  # where a request's Identity is kept in its scope


def _login_response(answer: LoginAnswer) -> Response:
    """A step of a login through another site, as a response: a redirect or an error page."""
    if answer.location:
        response = Response("", status=answer.status, headers={"Location": answer.location})
    else:
        content_type, body = render_error(answer.status, answer.message, as_json=False)
        response = Response(body, status=answer.status, content_type=content_type.decode())
    for cookie in answer.cookies:
        if cookie.max_age == 0:
            # With the flags it was set with: a browser ignores a __Host- cookie's deletion otherwise.
            response.delete_cookie(cookie.name, path=cookie.path, secure=cookie.secure, httponly=True, samesite="Lax")
        else:
            response.set_cookie(
                cookie.name,
                cookie.value,
                max_age=cookie.max_age,
                path=cookie.path,
                httponly=True,
                samesite="Lax",
                secure=cookie.secure,
            )
    response.headers["Cache-Control"] = "no-store"
    return response


# Every route of the blueprint: (rule, Pages method, HTTP methods). Quart adds HEAD to GET.
ROUTES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("/login", "login", ("GET", "POST")),
    ("/logout", "logout", ("GET",)),
    ("/oauth_callback", "oauth_callback", ("GET",)),
    ("/server-proxy/servers-info", "servers_info", ("GET",)),
    ("/server-proxy/icon/<name>", "icon", ("GET",)),
    ("/server-proxy/api/servers", "list_servers", ("GET",)),
    ("/server-proxy/api/servers", "create_instance", ("POST",)),
    ("/server-proxy/api/templates", "list_templates", ("GET",)),
    ("/server-proxy/api/servers/<name>", "one_server", ("GET", "DELETE")),
    ("/server-proxy/api/servers/<name>/<action>", "control", ("POST",)),
    ("/server-proxy/api/servers/<name>/logs", "logs", ("GET",)),
    ("/server-proxy/api/servers/<name>/events", "events", ("GET",)),
    ("/server-proxy/start/<name>", "start_page", ("GET",)),
    ("/server-proxy/api/reload", "reload", ("POST",)),
    ("/server-proxy/api/url", "port_url", ("GET",)),
    ("/server-proxy/metrics", "metrics", ("GET",)),
    ("/server-proxy/static/<path:filename>", "static_file", ("GET",)),
    ("/server-proxy/api/health", "health", ("GET",)),
    ("/api", "version", ("GET",)),
    ("/server-proxy/launcher", "launcher_page", ("GET",)),
    ("/", "launcher", ("GET",)),
)
# Reachable without logging in: the login itself, and the liveness answers (which say
# nothing but that trioproxy is up, and its version).
_OPEN_PATHS = ("login", "logout", "oauth_callback")  # first path segments
_OPEN_ROUTES = frozenset({"/api", "/server-proxy/api/health"})  # whole paths


def make_blueprint(settings: Settings, supervisors: Supervisors, metrics: Metrics) -> Blueprint:
    pages = Pages(settings, supervisors, metrics)
    bp = Blueprint("trioproxy", __name__)
    bp.before_request(pages.require_login)
    bp.after_request(pages.add_cookie)
    for rule, endpoint, methods in ROUTES:
        bp.add_url_rule(rule, endpoint, getattr(pages, endpoint), methods=list(methods))
    bp.app_errorhandler(HTTPException)(pages.http_error)
    return bp


class Pages:
    """trioproxy's own pages and API: one method per route of :data:`ROUTES`, and the hooks."""

    def __init__(self, settings: Settings, supervisors: Supervisors, metrics: Metrics) -> None:
        self.settings = settings
        self.supervisors = supervisors
        self._metrics = metrics
        self.base_url: str = settings.base_url
        self.auth: Authenticator = settings.auth
        self.throttle = LoginThrottle()
        self.instances: Instances = settings.instances or Instances(supervisors)

    def _error(self, status: int, message: str, server: str | None = None, output: list[str] | None = None) -> Response:
        accept = request.headers.get("Accept", "")
        as_json = "text/html" not in accept
        # A server's output may echo its URL (?token=…) or its environment; never pass it on raw.
        known = self.auth.known_secrets()
        message = mask_secrets(message, known)
        output = [mask_secrets(line, known) for line in output] if output else output
        content_type, body = render_error(status, message, as_json=as_json, server=server, output=output)
        return Response(body, status=status, content_type=content_type.decode())

    def _unknown(self, name: str) -> Response:
        return self._error(404, f"No server named {name!r}.")

    def public_base(self) -> str:
        # Behind another proxy (Jupyter's /proxy/<port>/), links must carry its prefix too.
        prefix = request.headers.get("X-Forwarded-Prefix") or request.headers.get("X-Forwarded-Context")
        if prefix:
            return prefix.rstrip("/") + self.base_url
        return self.base_url

    # -- hooks ------------------------------------------------------------------------------

    async def require_login(self) -> Any:
        base_url = self.base_url
        path = request.path[len(base_url) - 1 :] if base_url != "/" else request.path
        if path.split("/", 2)[1] in _OPEN_PATHS or path in _OPEN_ROUTES:
            return None
        if path == "/" and self.settings.default_url:
            # Before logging in, so that the login comes back to the default URL itself.
            return redirect(self.base_url + self.settings.default_url)
        identity = await self.auth.authenticate(cast(dict[str, Any], request.scope))
        if identity is not None:
            cast(dict[str, Any], request.scope)[IDENTITY] = identity
            return None
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            return redirect(self.auth.login_url(request.full_path.rstrip("?")))
        return self._error(403, "Authentication required: a valid token is needed.")

    async def add_cookie(self, response: Response) -> Response:
        identity: Identity | None = cast(dict[str, Any], request.scope).get(IDENTITY)
        if identity is not None and identity.set_cookie:
            response.headers.add("Set-Cookie", identity.set_cookie.decode("latin-1"))
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    async def http_error(self, exc: HTTPException) -> Response:
        # Quart's own 404 and 405, in trioproxy's error format (JSON for API clients).
        response = self._error(exc.code or 500, f"{exc.name}: {request.method} {request.path}")
        allow = dict(exc.get_headers()).get("Allow")
        if allow:
            response.headers["Allow"] = allow
        return response

    # -- login ------------------------------------------------------------------------------

    def safe_next(self, value: str | None) -> str:
        """Only local paths under the base URL: no open redirect to another site."""
        return local_redirect(value, self.base_url)

    def login_request(self) -> LoginRequest:
        forwarded = trusted_forwarded(
            cast(dict[str, Any], request.scope), b"x-forwarded-proto", self.settings.forwarded_allow_ips
        )
        https = request.scheme == "https" or forwarded == "https"
        return LoginRequest(args=request.args, cookies=request.cookies, https=https)

    async def login(self) -> Any:
        auth = self.auth
        if not auth.enabled:
            return redirect(self.safe_next(request.args.get("next")))
        if auth.oauth is not None:
            return _login_response(await auth.oauth.begin(self.login_request()))
        if not isinstance(auth, TokenAuth):
            raise NotFound()  # an authenticator with neither a form nor a flow: no login page
        return await self._token_form(auth)

    async def _token_form(self, auth: TokenAuth) -> Any:
        message = ""
        if request.method == "POST":
            form = await request.form
            next_url = self.safe_next(form.get("next"))
            address = request.remote_addr or "?"
            now = trio.current_time()
            wait = self.throttle.retry_after(address, now)
            if wait > 0:
                refusal = self._error(429, f"Too many failed logins; try again in {wait:.0f} s.")
                refusal.headers["Retry-After"] = str(int(wait) + 1)
                return refusal
            if auth.check_token(form.get("token", "")):
                self.throttle.succeeded(address)
                response = redirect(next_url)
                response.headers.add("Set-Cookie", auth.make_cookie().decode("latin-1"))
                return response
            self.throttle.failed(address, now)
            message = "That token is not valid."
            status = 403
        else:
            next_url = self.safe_next(request.args.get("next"))
            status = 200
        page = Template(_LOGIN_PAGE).substitute(
            action=html.escape(self.public_base() + "login"),
            next=html.escape(next_url),
            message=f"<p class='error'>{html.escape(message)}</p>" if message else "",
        )
        return Response(page, status=status, content_type="text/html; charset=utf-8")

    async def logout(self) -> Any:
        if self.auth.oauth is not None:
            return _login_response(await self.auth.oauth.logout(self.login_request()))
        self.auth.end_session(cast(dict[str, Any], request.scope)["headers"])
        response = redirect(self.base_url + "login")
        response.delete_cookie(self.auth.cookie_name, path=self.base_url)
        return response

    async def oauth_callback(self) -> Any:
        if self.auth.oauth is None:
            raise NotFound()
        return _login_response(await self.auth.oauth.finish(self.login_request()))

    # -- servers-info and icons (jupyter-server-proxy's shapes) ---------------------------

    def launcher_info(self, name: str, process: ServerProcess | None = None) -> dict[str, Any]:
        """``name``'s entry in servers-info: the served process's, or ``process``'s (another
        server of that name that is listed but not served)."""
        process = process or self.supervisors[name].process
        entry = process.launcher
        info: dict[str, Any] = {
            "enabled": entry.enabled,
            "title": entry.title,
            "path_info": entry.path_info,
            "category": entry.category,
        }
        if entry.icon_path:
            info["icon_url"] = f"{self.public_base()}server-proxy/icon/{quote(name, safe='')}"
        return {"name": name, "launcher_entry": info, "new_browser_tab": process.new_browser_tab}

    async def servers_info(self) -> Any:
        listed = []
        for name, supervisor in self.supervisors.items():
            if not supervisor.process.routed:  # its paths clash with another's: no URL to launch
                continue
            listed.append(self.launcher_info(name))
            # jupyter-server-proxy lists every server of a name; the first is the one served.
            listed.extend(self.launcher_info(name, other) for other in supervisor.process.also_listed)
        return jsonify({"server_processes": listed})

    async def icon(self, name: str) -> Any:
        supervisors = self.supervisors
        # The served server's icon, else that of one listed with it (servers-info gives both one URL).
        listed = [supervisors[name].process, *supervisors[name].process.also_listed] if name in supervisors else []
        path = next((process.launcher.icon_path for process in listed if process.launcher.icon_path), "")
        if not path:
            return self._error(404, f"No icon for {name!r}.")
        try:
            data = await trio.Path(path).read_bytes()
        except OSError as exc:
            return self._error(404, f"Icon of {name!r} cannot be read: {exc.strerror}.")
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        response = Response(data, content_type=content_type)
        # An SVG opened on its own is a document of this origin: no scripts in it.
        response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    # -- management API ---------------------------------------------------------------------

    def masked(self, lines: list[str]) -> list[str]:
        """A server's output as clients may see it (the logs API, the start page's events)."""
        known = self.auth.known_secrets()
        return [mask_secrets(line, known) for line in lines]

    def status(self, name: str, supervisor: ServerSupervisor | None = None) -> dict[str, Any]:
        return self.status_of(supervisor or self.supervisors[name], name=name)

    def status_of(
        self, supervisor: ServerSupervisor, public_base: str | None = None, *, name: str | None = None
    ) -> dict[str, Any]:
        """``public_base``: given where there is no request context (an event stream's body)."""
        name = name or supervisor.name
        info = supervisor.status()
        if info["reason"]:  # may quote a command or environment value (a bad item, a callable's error)
            info["reason"] = mask_secrets(info["reason"], self.auth.known_secrets())
        info["last_activity"] = _timestamp_ago(info["idle_seconds"])
        info["managed"] = supervisor.has_command  # False: relayed to, never started or stopped
        process = supervisor.process
        base = public_base or self.public_base()
        info["url"] = base + public_prefix(self.base_url, process)[len(self.base_url) :] if process.routed else None
        info["aliases"] = [f"{base}{'/'.join(parse_path('aliases', alias))}/" for alias in process.aliases] if process.routed else []
        instance = self.instances.describe(name)
        if instance is not None:
            info.update(instance)
        # forward_user: the headers sent (never the secret); backend_tls: its settings (paths only).
        info["forward_user"] = describe_forward_user(supervisor.process)
        tls = server_tls(supervisor.process)
        info["backend_tls"] = tls.describe() if tls is not None else None
        info["websocket_keepalive"] = keepalive_interval(supervisor.process)
        # How far a start is (the launcher and the start page show it).
        info.update(startpage.progress(supervisor))
        last = self.masked(supervisor.output.tail(1))
        info["last_line"] = last[0] if last else None
        return info

    async def port_url(self) -> Any:
        """Where a local port is reached from outside: ``?port=N`` (see :func:`trioproxy.urls.url_for_port`)."""
        text = request.args.get("port", "")
        if not (text.isascii() and text.isdigit() and 0 < int(text) < 65536):
            return self._error(400, f"port must be a number from 1 to 65535, not {text!r}.")
        port = int(text)
        answer = url_for_port(
            port,
            self.supervisors,
            base=self.public_base(),
            base_url=self.base_url,
            public_url=self.supervisors.public_url,
            proxy_allowed=self._localhost_allowed,
        )
        if answer is None:
            return self._error(404, f"No server listens on port {port}, and proxy/{port}/ may not reach localhost (host_allowlist).")
        return jsonify(answer)

    def _localhost_allowed(self) -> bool:
        allowlist = self.settings.host_allowlist
        if not callable(allowlist):
            return "localhost" in allowlist
        try:
            return bool(allowlist(self, "localhost"))
        except Exception:
            logging.getLogger("trioproxy.api").exception("host_allowlist callable failed for 'localhost'")
            return False

    async def list_servers(self) -> Any:
        # generation: changes when a reload adds, removes or replaces servers (the launcher
        # then fetches itself again).
        servers = [self.status(name) for name in self.supervisors]
        return jsonify({"servers": servers, "generation": self.supervisors.generation})

    async def reload(self) -> Any:
        """Read the configuration again and apply it; ``?when=idle``: restart changed servers
        only once nothing is under way on them."""
        settings = self.settings
        scope = cast(dict[str, Any], request.scope)
        if not origin_allowed(scope, settings.allow_origin, settings.allow_origin_pat, settings.forwarded_allow_ips):
            return self._error(403, "Cross-origin request refused.")
        reloader = settings.reloader
        if reloader is None:
            return self._error(501, "This trioproxy has no configuration to reload.")
        when = request.args.get("when", "now")
        if when not in ("now", "idle"):
            return self._error(400, f"when must be 'now' or 'idle', not {when!r}.")
        outcome: dict[str, Any] = {}
        done = trio.Event()

        # In the supervisors' own nursery, like the actions: a client that goes away must not
        # leave a reload half done.
        async def apply() -> None:
            try:
                outcome["result"] = await reloader.reload(when_idle=when == "idle")
            except ConfigError as exc:  # logged by the reloader
                outcome["error"] = (400, f"Reload failed, nothing changed: config error: {exc}")
            except ReloadError as exc:  # logged by the reloader, with its traceback
                outcome["error"] = (500, f"Reload failed: {exc}")
            except Exception as exc:  # a bug outside the reloader's own boundary
                logging.getLogger("trioproxy.api").exception("reload failed")
                outcome["error"] = (500, f"Reload failed: {type(exc).__name__}: {exc}")
            finally:
                done.set()

        try:
            self.supervisors.spawn(apply)
        except ServerUnavailable as exc:
            return self._error(exc.status, str(exc))
        await done.wait()
        if "error" in outcome:
            return self._error(*outcome["error"])
        return jsonify(outcome["result"])

    async def one_server(self, name: str) -> Any:
        if name not in self.supervisors:
            return self._unknown(name)
        if request.method == "DELETE":
            return await self.control_action(name, "stop")
        return jsonify(self.status(name))

    async def control(self, name: str, action: str) -> Any:
        if name not in self.supervisors:
            return self._unknown(name)
        if action not in _ACTIONS:
            return self._error(404, f"Unknown action {action!r}: use start, restart or stop.")
        return await self.control_action(name, action)

    async def control_action(self, name: str, action: str) -> Any:
        """Start, restart or stop; answer when done, or at once (202) with ``?wait=0``."""
        settings = self.settings
        supervisor = self.supervisors[name]
        scope = cast(dict[str, Any], request.scope)
        if not origin_allowed(scope, settings.allow_origin, settings.allow_origin_pat, settings.forwarded_allow_ips):
            # A browser sends the cookie with a form posted from another site's page.
            return self._error(403, "Cross-origin request refused.", server=name)
        if not supervisor.has_command:
            return self._error(409, f"{name!r} has no command: trioproxy relays to it but cannot {action} it.", server=name)
        wait = request.args.get("wait", "1") not in ("0", "false", "no")
        if action == "start":
            try:
                await supervisor.start(wait=False)  # so that ?wait=0 already answers "starting"
            except ServerUnavailable as exc:
                return self._error(exc.status, str(exc), server=name, output=exc.output)
        outcome = _Outcome()
        # The action runs in the supervisor's nursery, not in the request: a client that goes
        # away must not leave a restart half done (stopped, never started again), and a
        # shutdown ends it with the server. Stopping an instance removes it, supervisor and
        # all: that runs in the supervisors' nursery.
        removing = action == "stop" and name in self.instances
        try:
            if removing:
                self.supervisors.spawn(partial(_remove_instance, self.instances, name, outcome))
            else:
                supervisor.spawn(partial(_run_action, supervisor, action, outcome, self.instances))
        except ServerUnavailable as exc:
            return self._error(exc.status, str(exc), server=name)
        if not wait:
            return jsonify(self.status(name, supervisor)), 202
        await outcome.done.wait()
        failure = outcome.error
        if failure is not None:
            return self._error(failure.status, str(failure), server=name, output=failure.output)
        info = self.status(name, supervisor)
        if removing:
            info["removed"] = True
        return jsonify(info)

    # -- instances on demand (trioproxy.instances) ------------------------------------------

    async def list_templates(self) -> Any:
        instances = self.instances
        templates = [
            {**template.describe(), "instances": instances.of(name)} for name, template in instances.templates.items()
        ]
        return jsonify({"templates": templates, "invalid": instances.invalid, "generation": self.supervisors.generation})

    async def create_instance(self) -> Any:
        """``{"template": name, "args": {...}}``: make the instance of those arguments and start
        it; 201 with its status (200 if it existed), when it is ready (``?wait=0``: 202 at once)."""
        settings = self.settings
        scope = cast(dict[str, Any], request.scope)
        if not origin_allowed(scope, settings.allow_origin, settings.allow_origin_pat, settings.forwarded_allow_ips):
            return self._error(403, "Cross-origin request refused.")
        # No form a page of another site can post without asking first (a CORS preflight).
        if request.mimetype != "application/json":
            return self._error(415, "Send the request as JSON (Content-Type: application/json).")
        body = b""
        async for chunk in request.body:
            body += chunk
            if len(body) > _MAX_CREATE_BODY:
                return self._error(413, f"The request body is over {_MAX_CREATE_BODY} bytes.")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return self._error(400, "The request body is not valid JSON.")
        if not isinstance(document, dict):
            return self._error(400, 'Expected a JSON object: {"template": ..., "args": {...}}.')
        unknown = sorted(str(key) for key in document if key not in ("template", "args"))
        if unknown:
            return self._error(400, f"Unknown key {unknown[0]!r}: expected 'template' and 'args'.")
        wait = request.args.get("wait", "1") not in ("0", "false", "no")
        outcome = _Created()

        # In the supervisors' nursery, like the actions: a client that goes away must not
        # leave an instance half made.
        async def create() -> None:
            try:
                outcome.name, outcome.created = await self.instances.create(document.get("template"), document.get("args"), wait=wait)
            except (InstanceRefused, ServerUnavailable) as exc:
                outcome.error = exc
            except Exception as exc:  # a bug: reported, never a traceback to the client
                logging.getLogger("trioproxy.api").exception("creating an instance failed")
                outcome.error = exc
            finally:
                outcome.done.set()

        try:
            self.supervisors.spawn(create)
        except ServerUnavailable as exc:
            return self._error(exc.status, str(exc))
        await outcome.done.wait()
        error = outcome.error
        if isinstance(error, InstanceRefused):
            return self._error(error.status, str(error))
        if isinstance(error, ServerUnavailable):
            return self._error(error.status, str(error), server=error.server, output=error.output)
        if error is not None:
            return self._error(500, f"Creating the instance failed: {type(error).__name__}: {error}")
        if outcome.name is None or outcome.name not in self.supervisors:
            return self._error(503, "The instance was removed before it could be reported.")
        status = 200 if not outcome.created else 201 if wait else 202
        response = jsonify({**self.status(outcome.name), "created": outcome.created})
        response.status_code = status
        response.headers["Location"] = f"{self.public_base()}server-proxy/api/servers/{quote(outcome.name, safe='')}"
        return response

    async def logs(self, name: str) -> Any:
        if name not in self.supervisors:
            return self._unknown(name)
        output = self.supervisors[name].output
        tail = request.args.get("tail", "")
        if tail and not tail.isdigit():
            return self._error(400, f"tail must be a number of lines, not {tail!r}.", server=name)
        first = max(0, output.total - int(tail)) if tail else 0

        def text_of(lines: list[str]) -> str:
            return "".join(line + "\n" for line in self.masked(lines))

        if request.args.get("follow", "0") in ("0", "false", "no"):
            return Response(text_of(output.since(first)), content_type="text/plain; charset=utf-8")

        async def follow() -> AsyncIterator[bytes]:
            seen = first
            while True:
                lines = output.since(seen)
                seen = output.total
                if lines:
                    yield text_of(lines).encode()
                await output.wait_for_more(seen)

        response = await make_response(follow(), 200, {"Content-Type": "text/plain; charset=utf-8"})
        response.timeout = None  # type: ignore[union-attr]
        # Proxies in front (nginx) would otherwise hold the stream back in their buffers.
        response.headers["X-Accel-Buffering"] = "no"
        return response

    # -- the start page (trioproxy.startpage) ------------------------------------------------

    async def events(self, name: str) -> Any:
        """Server-sent events of a server's state and output, from ``?since=<line count>`` or a
        reconnecting EventSource's ``Last-Event-ID`` (else the last lines)."""
        supervisor = self.supervisors.get(name)
        if supervisor is None:
            return self._unknown(name)
        output = supervisor.output
        resume = request.headers.get("Last-Event-ID") or request.args.get("since", "")
        if resume and not resume.isdigit():
            return self._error(400, f"since must be a number of lines, not {resume!r}.", server=name)
        first = min(int(resume), output.total) if resume else max(0, output.total - startpage.FIRST_LINES)
        stream = startpage.events(
            cast(dict[str, Any], request.scope),
            supervisor,
            partial(self.status_of, supervisor, self.public_base()),
            self.masked,
            first,
            lambda: self.supervisors.get(name) is supervisor,
        )
        response = await make_response(stream, 200, {"Content-Type": "text/event-stream; charset=utf-8"})
        response.timeout = None  # type: ignore[union-attr]
        response.headers["X-Accel-Buffering"] = "no"
        return response

    async def start_page(self, name: str) -> Any:
        """The page a browser is sent to while ``name`` starts; once ready, a redirect to ``next``."""
        supervisor = self.supervisors.get(name)
        if supervisor is None:
            return self._unknown(name)
        root_server = self.settings.root_server
        value = request.args.get("next")
        if value is None:
            value = startpage.default_next(supervisor, root_server)
        target = startpage.continue_target(value, name, self.base_url, PathTable.of(self.supervisors), root_server)
        if target is None:
            logging.getLogger("trioproxy.api").warning("%s: start page refused next=%r", name, value)
            return self._error(400, f"next must be a path to {name!r} below trioproxy's base URL.", server=name)
        if not startpage.needs_start_page(supervisor):
            return Response("", status=303, headers={"Location": target})
        if supervisor.state in (State.STOPPED, State.STOPPING):  # reached directly, or stopped since
            try:
                await startpage.begin_start(supervisor)
            except ServerUnavailable as exc:
                return self._error(exc.status, str(exc), server=name)
        status = self.status_of(supervisor)
        output = self.masked(supervisor.output.tail(startpage.FIRST_LINES))
        code, page = startpage.render(supervisor, status, output, target, value)
        response = Response(page, status=code, content_type="text/html; charset=utf-8")
        response.headers["Content-Security-Policy"] = _LAUNCHER_CSP
        return response

    # -- liveness ---------------------------------------------------------------------------

    async def health(self) -> Any:
        """Unauthenticated: trioproxy answers (for Kubernetes probes). Nothing about servers."""
        from . import __version__

        return jsonify({"status": "ok", "version": __version__})

    async def version(self) -> Any:
        """Unauthenticated ``<prefix>api``, as jupyterhub-singleuser (Jupyter Server) answers it."""
        from . import __version__

        return jsonify({"version": __version__})

    # -- metrics ----------------------------------------------------------------------------

    async def metrics(self) -> Any:
        text = render_metrics(self._metrics, self.supervisors)
        return Response(text, content_type=METRICS_CONTENT_TYPE)

    # -- launcher page and its files ------------------------------------------------------

    async def static_file(self, filename: str) -> Any:
        content_type = _STATIC_TYPES.get(PurePosixPath(filename).suffix)
        if content_type is None:
            return self._error(404, f"No static file {filename!r}.")
        try:
            response = await send_from_directory(STATIC_DIR, filename, mimetype=content_type)
        except NotFound:
            return self._error(404, f"No static file {filename!r}.")
        response.headers["Cache-Control"] = "no-cache"  # revalidated by ETag: new versions show
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    async def launcher(self) -> Any:
        return self._launcher(_base_href(request.headers, self.public_base()))

    async def launcher_page(self) -> Any:
        """The launcher at a URL of its own, for when the root sends browsers to a default URL."""
        public_base = self.public_base()
        base = f"<base href='{html.escape(public_base)}'>" if _SAFE_PREFIX.fullmatch(public_base) else ""
        return self._launcher(base)

    def _launcher(self, base: str) -> Any:
        supervisors, instances = self.supervisors, self.instances
        entries = [
            (name, supervisor)
            for name, supervisor in supervisors.items()
            # routed: no URL, nothing to open
            if supervisor.process.launcher.enabled and supervisor.process.routed and name not in instances
        ]
        templates = [
            (template, [(name, supervisors[name]) for name in instances.of(template.name) if name in supervisors])
            for template in instances.templates.values()
            if template.in_launcher
        ]
        page = _launcher_page(entries, base, supervisors.generation, templates)
        response = Response(page, content_type="text/html; charset=utf-8")
        response.headers["Content-Security-Policy"] = _LAUNCHER_CSP
        return response



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

# -- management actions and the launcher page ------------------------------------------------

_ACTIONS = ("start", "restart", "stop")


_MAX_CREATE_BODY = 64 * 1024


@dataclass
class _Outcome:
    done: trio.Event = field(default_factory=trio.Event)
    error: ServerUnavailable | None = None


@dataclass
class _Created:
    done: trio.Event = field(default_factory=trio.Event)
    name: str | None = None
    created: bool = False
    error: Exception | None = None


async def _run_action(supervisor: ServerSupervisor, action: str, outcome: _Outcome, instances: Instances) -> None:
    try:
        if action == "start":
            await supervisor.start(wait=True)
        elif action == "restart":
            with instances.keeping(supervisor.name):  # an instance is not removed in between
                await supervisor.restart(wait=True)
        else:
            await supervisor.stop()
    except ServerUnavailable as exc:
        outcome.error = exc  # with ?wait=0 nobody waits for it: the state tells
    finally:
        outcome.done.set()


async def _remove_instance(instances: Instances, name: str, outcome: _Outcome) -> None:
    try:
        await instances.remove(name, why="stopped on request")
    finally:
        outcome.done.set()


def _timestamp_ago(seconds: float) -> str:
    """An ISO 8601 UTC time ``seconds`` ago (supervisors count in trio's monotonic clock)."""
    moment = datetime.now(timezone.utc) - timedelta(seconds=seconds)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


STATIC_DIR = Path(__file__).parent / "static"
_STATIC_TYPES = {
    ".js": "text/javascript",  # Quart adds "; charset=utf-8"
    ".css": "text/css",
    ".svg": "image/svg+xml",
}

# Everything the launcher loads is its own: no inline script or style, no other origin.
_LAUNCHER_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'self'; form-action 'self'; frame-ancestors 'self'"
)

# Every URL in the page is relative to it (the base URL's root), so it works under any
# base URL and behind any other proxy's prefix without knowing either. Behind a proxy that
# announces its prefix, a <base> pins them down as well: jupyter-server-proxy also serves
# <jupyter>/proxy/<port> without the trailing slash, where relative URLs would miss a level.
_LAUNCHER_PAGE = Template(
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>trioproxy</title>
$base
<link rel="icon" href="server-proxy/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="server-proxy/static/launcher.css">
<script src="server-proxy/static/launcher.js" defer></script>
</head>
<body>
<header><h1><img src="server-proxy/static/favicon.svg" alt="">trioproxy</h1>
<p id="status" role="status" aria-live="polite"></p></header>
<main data-generation="$generation">
$sections
</main>
<footer><a href="server-proxy/api/servers">API</a> · <a href="server-proxy/servers-info">servers-info</a>
· <a href="server-proxy/metrics">metrics</a></footer>
</body>
</html>
"""
)


_SAFE_PREFIX = re.compile(r"/(?!/)[A-Za-z0-9\-._~!$&()*+,;=:@%/]*")


def _base_href(headers: Any, public_base: str) -> str:
    """A <base> tag for the public base URL, only when another proxy announced its prefix."""
    announced = headers.get("X-Forwarded-Prefix") or headers.get("X-Forwarded-Context")
    if not announced or not _SAFE_PREFIX.fullmatch(public_base):
        return ""
    return f"<base href='{html.escape(public_base)}'>"


# jupyter-server-proxy's default category puts entries in JupyterLab's "Notebook" section;
# on a page of its own that heading says nothing. servers-info still reports the category.
_HEADINGS = {"Notebook": "Servers", "": "Other"}


def _launcher_page(
    entries: list[tuple[str, ServerSupervisor]],
    base: str = "",
    generation: int = 0,
    templates: list[tuple[ServerTemplate, list[tuple[str, ServerSupervisor]]]] | None = None,
) -> str:
    categories: dict[str, list[str]] = {}
    for name, supervisor in entries:
        category = supervisor.process.launcher.category
        category = _HEADINGS.get(category, category)
        categories.setdefault(category, []).append(_server_item(name, supervisor))
    sections = "\n".join(
        f"<section><h2>{html.escape(category)}</h2>\n<ul class='servers'>\n" + "\n".join(items) + "\n</ul></section>"
        for category, items in categories.items()
    )
    if templates:
        sections += "\n" + "\n".join(_template_section(template, items) for template, items in templates)
    return _LAUNCHER_PAGE.substitute(
        base=base, sections=sections or "<p class='empty'>No servers are configured.</p>", generation=generation
    )


def _server_item(name: str, supervisor: ServerSupervisor) -> str:
    process = supervisor.process
    entry = process.launcher
    title = html.escape(entry.title or name)
    # "./" keeps a path_info such as "app:1/" from being read as a URL scheme.
    href = html.escape("./" + entry.path_info.lstrip("/"))
    target = " target='_blank' rel='noopener'" if process.new_browser_tab else ""
    if entry.icon_path:
        icon = f"<img class='icon' src='server-proxy/icon/{html.escape(quote(name, safe=''))}' alt=''>"
    else:
        icon = f"<span class='icon letter' aria-hidden='true'>{html.escape((entry.title or name)[:1].upper())}</span>"
    state = supervisor.state.value
    buttons = "".join(
        f"<button type='button' data-action='{action}'>{action.capitalize()}</button>" for action in _ACTIONS
    )
    return (
        f"<li class='server' data-server='{html.escape(name)}' data-state='{state}'"
        f" data-managed='{'true' if supervisor.has_command else 'false'}'>{icon}"
        f"<div class='body'><div class='head'><a class='title' href='{href}'{target}>{title}</a>"
        f" <span class='state'>{state}</span></div>"
        "<div class='detail'></div><div class='last-line' hidden></div><pre class='log' hidden></pre></div>"
        f"<div class='actions'><a class='button open' href='{href}'{target}>Open</a>{buttons}</div></li>"
    )


def _template_section(template: ServerTemplate, instances: list[tuple[str, ServerSupervisor]]) -> str:
    """A template's form (a field per parameter) and the list of its instances."""
    name = html.escape(template.name)
    fields = []
    for param in template.params.values():
        field_id = html.escape(f"t-{template.name}-{param.name}")
        label = html.escape(param.description or param.name)
        attributes = f" id='{field_id}' name='{html.escape(param.name)}'"
        if param.required:
            attributes += " required"
        if param.choices is not None:
            options = "".join(
                f"<option{' selected' if str(choice) == str(param.default) else ''}>{html.escape(str(choice))}</option>"
                for choice in param.choices
            )
            control = f"<select{attributes}>{options}</select>"
        else:
            if param.type == "int":
                attributes += " type='number' step='1'"
                attributes += f" min='{param.min}'" if param.min is not None else ""
                attributes += f" max='{param.max}'" if param.max is not None else ""
            else:
                attributes += f" type='text' maxlength='{param.max_length}'"
            if param.default is not None:
                attributes += f" value='{html.escape(str(param.default))}'"
            control = f"<input{attributes}>"
        fields.append(f"<label for='{field_id}'>{label} <span class='type'>{html.escape(param.type)}</span></label>{control}")
    description = f"<p class='description'>{html.escape(template.description)}</p>" if template.description else ""
    items = "\n".join(_server_item(instance, supervisor) for instance, supervisor in instances)
    return (
        f"<section class='template' data-template='{name}'><h2>{html.escape(template.title)}</h2>{description}"
        f"<form class='template-form' data-template='{name}' data-max='{template.max_instances}'>"
        + "".join(f"<div class='field'>{field}</div>" for field in fields)
        + "<div class='field submit'><button type='submit'>Start new</button></div>"
        "<p class='form-error' role='alert' hidden></p></form>"
        f"<ul class='servers instances'>\n{items}\n</ul></section>"
    )
