"""The ``trioproxy`` command: configuration, Hypercorn, signals."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
from functools import partial
from typing import Any

import trio
if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from traitlets import Bool, Int, Unicode, default
from traitlets.config import Application, Config
from traitlets.config.loader import ConfigFileNotFound, JSONFileConfigLoader, PyFileConfigLoader

from . import __version__
from .auth import TokenAuth, generate_token
from .config import ConfigError, LauncherEntry, ServerProcess, ServerProxy, collect_servers, make_server_process

log = logging.getLogger("trioproxy")

DEFAULT_SERVER = "files"


class TrioProxy(Application):
    """Start web services on demand and relay HTTP and WebSocket traffic to them."""

    name = "trioproxy"
    version = __version__
    description = (
        "Start web services on demand, keep them alive, and relay HTTP and WebSocket traffic\n"
        "to them under one authenticated address. Configured like jupyter-server-proxy:\n"
        "c.ServerProxy.servers = {...} in a file given with --config.\n\n"
        "  trioproxy --config cfg.py --port 8888\n"
        "  trioproxy --port 8888 -- python3 -m http.server {port}"
    )
    classes = [ServerProxy, ServerProcess, LauncherEntry]

    config_file = Unicode("", help="A traitlets config file (.py or .json) to load.").tag(config=True)
    ip = Unicode("127.0.0.1", help="The address to listen on.").tag(config=True)
    port = Int(8888, help="The port to listen on (0 picks a free one).").tag(config=True)
    base_url = Unicode("/", help="The URL prefix everything is served under.").tag(config=True)
    token = Unicode(
        None,
        allow_none=True,
        help="The token clients must present. Default: $JUPYTER_TOKEN, else a generated one.",
    ).tag(config=True)
    no_auth = Bool(False, help="Let everyone in without a token (only on loopback).").tag(config=True)
    allow_remote_no_auth = Bool(
        False, help="Allow --no-auth on a non-loopback address (dangerous)."
    ).tag(config=True)
    strip_token_query = Bool(
        False, help="Remove ?token= from URLs before relaying (jupyter-server-proxy keeps it)."
    ).tag(config=True)
    allow_origin = Unicode("", help="Origin allowed for cross-origin WebSockets ('*': any).").tag(
        config=True
    )
    allow_origin_pat = Unicode("", help="Regular expression of allowed WebSocket origins.").tag(
        config=True
    )
    websocket_max_message_size = Int(
        16 * 1024 * 1024, help="Largest WebSocket message relayed (bytes); larger ones close with 1009."
    ).tag(config=True)
    generate_config = Bool(False, help="Write a commented config file and exit.").tag(config=True)

    aliases = {
        "config": "TrioProxy.config_file",
        "ip": "TrioProxy.ip",
        "port": "TrioProxy.port",
        "base-url": "TrioProxy.base_url",
        "token": "TrioProxy.token",
        "log-level": "Application.log_level",
    }
    flags = {
        "no-auth": ({"TrioProxy": {"no_auth": True}}, "Disable authentication (loopback only)."),
        "allow-remote-no-auth": (
            {"TrioProxy": {"allow_remote_no_auth": True}},
            "Allow --no-auth on a non-loopback address.",
        ),
        "generate-config": (
            {"TrioProxy": {"generate_config": True}},
            "Write trioproxy_config.py in the current directory and exit.",
        ),
        "debug": ({"Application": {"log_level": logging.DEBUG}}, "Log everything."),
    }

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.INFO

    @default("log_format")
    def _default_log_format(self) -> str:
        return "[%(levelname)1.1s %(asctime)s %(name)s] %(message)s"

    def load_file(self, path: str) -> None:
        directory, filename = os.path.split(os.path.abspath(path))
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        loader_class = JSONFileConfigLoader if filename.endswith(".json") else PyFileConfigLoader
        loader = loader_class(filename, path=directory, log=self.log)
        try:
            loaded = loader.load_config()
        except ConfigFileNotFound:
            raise ConfigError(f"config file not found: {path}") from None
        except Exception as exc:
            raise ConfigError(f"cannot load {path}: {type(exc).__name__}: {exc}") from None
        merged = Config()
        merged.merge(loaded)
        merged.merge(self.cli_config)
        self.update_config(merged)


def _is_loopback(ip: str) -> bool:
    if ip in ("localhost", ""):
        return ip == "localhost"
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _base_url(value: str) -> str:
    return "/" + value.strip("/") + "/" if value.strip("/") else "/"


def build(app: TrioProxy) -> tuple[Any, Any, Any]:
    """From a configured TrioProxy: (hypercorn config, supervisors, asgi app)."""
    from hypercorn.config import Config as HypercornConfig

    from .app import Settings, create_app
    from .supervisor import Supervisors

    base_url = _base_url(app.base_url)
    proxy = ServerProxy(parent=app)
    servers = collect_servers(proxy)
    root_server = None
    if app.extra_args:
        root_server = "app"
        servers = {
            root_server: make_server_process(root_server, {"command": list(app.extra_args)}, parent=proxy),
            **{k: v for k, v in servers.items() if k != root_server},
        }
    elif not servers:
        servers[DEFAULT_SERVER] = make_server_process(
            DEFAULT_SERVER,
            {
                "command": [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"],
                "launcher_entry": {"title": f"Files in {os.getcwd()}"},
                "new_browser_tab": False,
            },
            parent=proxy,
        )
        log.info("no servers configured: serving the current directory as %r", DEFAULT_SERVER)

    if app.no_auth:
        if not _is_loopback(app.ip) and not app.allow_remote_no_auth:
            raise ConfigError(
                f"refusing --no-auth on non-loopback address {app.ip!r}: anyone who can reach it "
                "could run anything the proxied servers allow; add --allow-remote-no-auth to force"
            )
        token = None
    else:
        token = app.token or os.environ.get("JUPYTER_TOKEN") or generate_token()
    auth = TokenAuth(token, base_url=base_url)

    settings = Settings(
        base_url=base_url,
        auth=auth,
        host_allowlist=proxy.host_allowlist,
        non_service_rewrite_response=_as_list(proxy.non_service_rewrite_response),
        root_server=root_server,
        strip_token_query=app.strip_token_query,
        websocket_max_message_size=app.websocket_max_message_size,
        allow_origin=app.allow_origin,
        allow_origin_pat=app.allow_origin_pat,
    )
    supervisors = Supervisors(servers, base_url=base_url)
    asgi_app = create_app(settings, supervisors)

    hconfig = HypercornConfig()
    hconfig.bind = [f"[{app.ip}]:{app.port}" if ":" in app.ip else f"{app.ip}:{app.port}"]
    hconfig.accesslog = None
    hconfig.errorlog = logging.getLogger("trioproxy.http")  # type: ignore[assignment]
    hconfig.websocket_max_message_size = app.websocket_max_message_size
    hconfig.keep_alive_timeout = 75
    # Relayed responses carry the backend's own Date and Server headers.
    hconfig.include_date_header = False
    hconfig.include_server_header = False
    hconfig.graceful_timeout = 1
    return hconfig, supervisors, asgi_app


def _as_list(value: Any) -> list[Any]:
    if callable(value):
        return [value]
    return list(value or [])


def setup_logging(level: int | str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger("trioproxy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


async def serve(app: TrioProxy) -> None:
    import hypercorn.trio

    setup_logging(app.log_level, app.log_format)
    hconfig, supervisors, asgi_app = build(app)
    auth = asgi_app.extensions["trioproxy"].settings.auth
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisors.run)
            binds = await nursery.start(
                partial(hypercorn.trio.serve, asgi_app, hconfig, shutdown_trigger=trio.sleep_forever)
            )
            base_url = _base_url(app.base_url)
            for bind in binds:
                url = bind + base_url
                if auth.token:
                    url += f"?token={auth.token}"
                print(f"trioproxy is serving {len(supervisors)} server(s) at: {url}", flush=True)
            if not auth.enabled:
                log.warning("AUTHENTICATION IS DISABLED (--no-auth): anyone who can reach %s may use every server", binds)
            async for signum in signals:
                log.info("received %s: stopping every server", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    log.info("stopped")


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None) -> None:
    app = TrioProxy()
    try:
        app.initialize(argv)
        if app.config_file:
            app.load_file(app.config_file)
        if app.generate_config:
            path = os.path.abspath("trioproxy_config.py")
            if os.path.exists(path):
                raise ConfigError(f"{path} exists already; not overwriting it")
            with open(path, "w") as file:
                file.write(app.generate_config_file())
            print(f"wrote {path}")
            return
        try:
            trio.run(serve, app)
        except BaseException as exc:
            # Errors from inside nurseries come wrapped in exception groups.
            raise _unwrap(exc) from None
    except ConfigError as exc:
        print(f"trioproxy: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"trioproxy: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)
