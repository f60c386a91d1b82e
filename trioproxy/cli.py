"""The ``trioproxy`` command: configuration, Hypercorn, signals."""

from __future__ import annotations

import difflib
import errno
import ipaddress
import logging
import math
import os
import re
import signal
import ssl
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import trio
from traitlets import Bool, Float, Int, List, Unicode, default
from traitlets.config import Application, Config
from traitlets.config.loader import (
    ConfigFileNotFound,
    JSONFileConfigLoader,
    KVArgParseConfigLoader,
    PyFileConfigLoader,
)

from . import __version__
from .auth import MaskingFormatter, TokenAuth, generate_token
from .commands import COMMANDS
from .config import (
    ConfigError,
    LauncherEntry,
    Reloader,
    ReloadError,
    ServerProcess,
    ServerProxy,
    collect_servers,
    make_server_process,
)
from .errors import sole_exception
from .logs import BatchedHandler, setup_logging
from .options import OptionError, check_app_options

log = logging.getLogger("trioproxy")

DEFAULT_SERVER = "files"
# Largest request head (request line and headers) accepted; larger ones get 431.
MAX_REQUEST_HEAD = 64 * 1024


class UsageError(Exception):
    """A mistake on the command line: reported in one line, with the fix where one is likely."""


class _StrictArgParser(KVArgParseConfigLoader):
    """traitlets' command-line parser, which only warns about an unknown option and runs on."""

    def _handle_unrecognized_alias(self, arg: str) -> None:
        known = [name for name in (*self.aliases, *self.flags) if isinstance(name, str) and len(name) > 1]
        message = f"unknown option --{arg}"
        close = difflib.get_close_matches(arg, known, n=1)
        if close:
            message += f" (did you mean --{close[0]}?)"
        raise UsageError(message + "; trioproxy --help lists the options")


class TrioProxy(Application):
    """Start web services on demand and relay HTTP and WebSocket traffic to them."""

    name = "trioproxy"
    version = __version__
    description = (
        "Start web services on demand, keep them alive, and relay HTTP and WebSocket traffic\n"
        "to them under one authenticated address. Configured like jupyter-server-proxy:\n"
        "c.ServerProxy.servers = {...} in a file given with --config; without --config,\n"
        "jupyter_server_config.py (or .json) from the Jupyter config path (jupyter --paths).\n\n"
        "  trioproxy --config cfg.py --port 8888\n"
        "  trioproxy --port 8888 -- python3 -m http.server {port}\n\n"
        "Commands for a running trioproxy (found by its runtime file; each has --help):\n"
        + "".join(f"  trioproxy {name:<8} {text}\n" for name, text in COMMANDS.items())
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
    public_url = Unicode(
        "",
        help="The absolute URL at which users reach the base URL (https://example.org/tools/), told to "
        "servers as TRIOPROXY_URL. Default: $JUPYTERHUB_PUBLIC_URL under JupyterHub, else unknown.",
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
    websocket_pump = Bool(
        True,
        help="Copy WebSockets' bytes on one thread of trioproxy's own (about 1.6x the round trips of the "
        "event loop at small messages); False: on the event loop.",
    ).tag(config=True)
    max_body_size = Int(
        None, allow_none=True, help="Largest request body relayed (bytes); larger ones get 413. Default: no limit."
    ).tag(config=True)
    body_timeout = Float(
        60.0, help="Seconds a client may pause while sending a request body before getting 408."
    ).tag(config=True)
    forwarded_allow_ips = List(
        Unicode(),
        help="Client addresses (or networks, or '*') whose X-Forwarded-* headers are believed: the "
        "proxies in front of trioproxy. Default: $FORWARDED_ALLOW_IPS (comma-separated), else loopback.",
    ).tag(config=True)

    @default("forwarded_allow_ips")
    def _default_forwarded_allow_ips(self) -> list[str]:
        from .relay.upstream import DEFAULT_FORWARDED_ALLOW

        listed = os.environ.get("FORWARDED_ALLOW_IPS", "")
        return [ip.strip() for ip in listed.split(",") if ip.strip()] or list(DEFAULT_FORWARDED_ALLOW)

    graceful_timeout = Float(
        5.0,
        help="On SIGTERM or SIGINT, seconds that requests under way get to finish before the servers are stopped.",
    ).tag(config=True)
    hub_cache_max_age = Float(
        60.0,
        help="JupyterHub mode: seconds the Hub's word on a token (its user, scopes, shares and the owner's "
        "groups) is trusted before the Hub is asked again; a revoked token or share stops working within that.",
    ).tag(config=True)
    certfile = Unicode("", help="Serve HTTPS (and HTTP/2) with this certificate file (PEM).").tag(config=True)
    keyfile = Unicode("", help="The private key of --certfile (PEM).").tag(config=True)
    generate_config = Bool(False, help="Write a commented config file and exit.").tag(config=True)
    # The token trioproxy made up, if it did: only that one is shown in the start-up URL.
    generated_token: str | None = None
    # Without --config: (path, error or None) for each jupyter_server_config file found on the
    # Jupyter config path, logged once logging is set up (see load_jupyter_config).
    loaded_jupyter_configs: List[Any] = List()

    aliases = {
        "config": "TrioProxy.config_file",
        "ip": "TrioProxy.ip",
        "port": "TrioProxy.port",
        "base-url": "TrioProxy.base_url",
        "public-url": "TrioProxy.public_url",
        "token": "TrioProxy.token",
        "graceful-timeout": "TrioProxy.graceful_timeout",
        "certfile": "TrioProxy.certfile",
        "keyfile": "TrioProxy.keyfile",
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
        "strict-config": (
            {"ServerProxy": {"strict_config": True}},
            "Refuse unknown server and launcher_entry options, and servers with nothing to start or "
            "reach, instead of warning and leaving them out (ServerProxy.strict_config).",
        ),
    }

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.INFO

    @default("log_format")
    def _default_log_format(self) -> str:
        return "[%(levelname)1.1s %(asctime)s %(name)s] %(message)s"

    def _create_loader(self, argv: Any, aliases: Any, flags: Any, classes: Any) -> KVArgParseConfigLoader:
        return _StrictArgParser(argv, aliases, flags, classes=classes, log=self.log, subcommands=self.subcommands)

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


JUPYTER_CONFIG_NAME = "jupyter_server_config"


def jupyter_config_files() -> list[str]:
    """The ``jupyter_server_config.py`` and ``.json`` files on the Jupyter config path, lowest
    priority first (later files override earlier ones, as in Jupyter).

    The path is jupyter_core's (what ``jupyter --paths`` lists under config) when jupyter_core
    is installed; without it, ``$JUPYTER_CONFIG_DIR`` or ``~/.jupyter``.
    """
    try:
        from jupyter_core.paths import jupyter_config_path
    except ImportError:
        directories = [os.environ.get("JUPYTER_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".jupyter")]
    else:
        directories = jupyter_config_path()
    found: list[str] = []
    for directory in reversed(directories):
        for extension in (".py", ".json"):  # in one directory, .json wins (as in traitlets)
            path = os.path.abspath(os.path.join(directory, JUPYTER_CONFIG_NAME + extension))
            if os.path.isfile(path) and path not in found:
                found.append(path)
    return found


def load_jupyter_config(app: TrioProxy) -> None:
    """Without ``--config``, read the user's existing Jupyter server config, so a
    ``c.ServerProxy.servers`` written for jupyter-server-proxy works as it is.

    A file that fails to load is reported and skipped, as Jupyter does; the command line wins
    over every file.
    """
    for path in jupyter_config_files():
        try:
            app.load_file(path)
        except ConfigError as exc:
            app.loaded_jupyter_configs.append((path, str(exc)))
        else:
            app.loaded_jupyter_configs.append((path, None))


def _log_jupyter_config(app: TrioProxy) -> None:
    for path, error in app.loaded_jupyter_configs:
        if error is None:
            log.info("loaded config from %s (Jupyter config path)", path)
        else:
            log.error("skipped a file on the Jupyter config path: %s", error)


def _is_loopback(ip: str) -> bool:
    if ip in ("localhost", ""):
        return ip == "localhost"
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _base_url(value: str) -> str:
    return "/" + value.strip("/") + "/" if value.strip("/") else "/"


def _explicit(app: TrioProxy, name: str) -> bool:
    """Whether the command line or a config file set ``TrioProxy.<name>``."""
    return "TrioProxy" in app.config and name in app.config["TrioProxy"]


def _hub_settings(app: TrioProxy, env: Mapping[str, str]) -> Any:
    """JupyterHub's settings if trioproxy runs under JupyterHub, else None.

    JupyterHub mode starts when the Hub's API token is in the environment, unless a token
    or --no-auth was asked for explicitly.
    """
    if "JUPYTERHUB_API_TOKEN" not in env or app.no_auth or app.token is not None:
        return None
    from .hub import HubSettings

    return HubSettings.from_environ(env)


def _listen_address(app: TrioProxy, hub: Any) -> tuple[str, int, str]:
    """(ip, port, base_url): the options, or where JupyterHub says, unless set explicitly."""
    ip, port, base_url = app.ip, app.port, _base_url(app.base_url)
    if hub is None:
        return ip, port, base_url
    if hub.service_url:
        url = urlsplit(hub.service_url)
        if not _explicit(app, "ip") and url.hostname is not None:
            ip = url.hostname
        if not _explicit(app, "port"):
            port = url.port or (443 if url.scheme == "https" else 80)
    if not _explicit(app, "base_url"):
        base_url = hub.prefix
    return ip, port, base_url


def _check_tls(app: TrioProxy) -> None:
    """Try --certfile and --keyfile, so that a mistake is one line at start-up."""
    if not app.certfile and not app.keyfile:
        return
    if not (app.certfile and app.keyfile):
        given, missing = ("--certfile", "--keyfile") if app.certfile else ("--keyfile", "--certfile")
        raise ConfigError(f"{given} needs {missing} as well")
    for option, path in (("certfile", app.certfile), ("keyfile", app.keyfile)):
        if not os.path.isfile(path):
            raise ConfigError(f"{option} not found: {path}")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(app.certfile, app.keyfile)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise ConfigError(f"cannot use {app.certfile} with {app.keyfile}: {reason}") from None


def _tls(hconfig: Any, app: TrioProxy) -> None:
    """HTTPS with --certfile and --keyfile; browsers then get HTTP/2 (ALPN), HTTP/1.1 clients
    HTTP/1.1."""
    if not app.certfile:
        return
    hconfig.certfile = os.path.abspath(app.certfile)
    hconfig.keyfile = os.path.abspath(app.keyfile)
    hconfig.alpn_protocols = ["h2", "http/1.1"]


def _hub_tls(hconfig: Any, hub: Any) -> None:
    """Serve HTTPS when the Hub's internal SSL asks for it, requiring the Hub's client certs."""
    if hub is None or urlsplit(hub.service_url).scheme != "https":
        return
    if not (hub.certfile and hub.keyfile):
        raise ConfigError("JUPYTERHUB_SERVICE_URL is https but JUPYTERHUB_SSL_CERTFILE/KEYFILE are not set")
    hconfig.certfile = hub.certfile
    hconfig.keyfile = hub.keyfile
    if hub.client_ca:
        hconfig.ca_certs = hub.client_ca
        hconfig.verify_mode = ssl.CERT_REQUIRED


def _check_origin_pattern(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"allow_origin_pat is not a valid regular expression: {exc}") from None


ROOT_SERVER = "app"  # standalone mode's server, at the root of the base URL


def _config_source(app: TrioProxy) -> str:
    """Where ``c.ServerProxy.servers`` came from, as messages name it."""
    if app.config_file:
        return f"config file {os.path.abspath(app.config_file)}"
    files = [path for path, error in app.loaded_jupyter_configs if error is None]
    if files:
        return "the Jupyter config " + ", ".join(files)
    return "the configuration"


def _servers(app: TrioProxy, proxy: ServerProxy) -> dict[str, ServerProcess]:
    """Every server to run: configured, from entry points, standalone, or the default one."""
    servers = collect_servers(proxy, source=_config_source(app))
    if app.extra_args:
        return {
            ROOT_SERVER: _root_server(make_server_process(ROOT_SERVER, {"command": list(app.extra_args)}, parent=proxy)),
            **{k: v for k, v in servers.items() if k != ROOT_SERVER},
        }
    # Not when every configured one was left out, nor when templates are all there is.
    if not servers and not proxy.servers and not proxy.templates:
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
    return servers


def _root_server(process: ServerProcess) -> ServerProcess:
    process.root = True
    return process


def read_servers_again(app: TrioProxy, instances: Any = None) -> dict[str, ServerProcess]:
    """The servers as the configuration says now: the same command line, the files read
    again (what a reload applies); the templates read with them are staged in ``instances``.
    Raises ConfigError."""
    fresh = TrioProxy()
    fresh.initialize(list(app.argv))
    if fresh.config_file:
        fresh.load_file(fresh.config_file)
    else:
        load_jupyter_config(fresh)
        for _path, error in fresh.loaded_jupyter_configs:
            if error is not None:
                raise ConfigError(error)
    proxy = ServerProxy(parent=fresh)
    servers = _servers(fresh, proxy)
    if instances is not None:
        instances.stage(proxy.templates, parent=proxy)
    return servers


def build(app: TrioProxy) -> tuple[Any, Any, Any]:
    """From a configured TrioProxy: (hypercorn config, supervisors, asgi app)."""
    from hypercorn.config import Config as HypercornConfig

    from .app import Settings, create_app
    from .instances import Instances, TemplateReloader, load_templates
    from .start_history import StartHistory
    from .supervisor import Supervisors

    hub = _hub_settings(app, os.environ)
    ip, port, base_url = _listen_address(app, hub)
    _check_origin_pattern(app.allow_origin_pat)
    _check_tls(app)
    try:
        check_app_options(app)
    except OptionError as exc:
        raise ConfigError(str(exc)) from None
    proxy = ServerProxy(parent=app)
    servers = _servers(app, proxy)
    root_server = ROOT_SERVER if app.extra_args else None

    auth: Any
    if hub is not None:
        from .hub import HubAuth

        if not 0 <= app.hub_cache_max_age <= 86400:
            raise ConfigError(f"hub_cache_max_age must be between 0 and 86400 seconds, not {app.hub_cache_max_age}")
        auth = HubAuth(hub, cache_max_age=app.hub_cache_max_age)
    else:
        if app.no_auth:
            if not _is_loopback(ip) and not app.allow_remote_no_auth:
                raise ConfigError(
                    f"refusing --no-auth on non-loopback address {ip!r}: anyone who can reach it "
                    "could run anything the proxied servers allow; add --allow-remote-no-auth to force"
                )
            token = None
        else:
            token = app.token or os.environ.get("JUPYTER_TOKEN")
            if not token:
                token = generate_token()
                app.generated_token = token
        auth = TokenAuth(token, base_url=base_url, secure_cookie=bool(app.certfile))

    settings = Settings(
        base_url=base_url,
        auth=auth,
        host_allowlist=proxy.host_allowlist,
        non_service_rewrite_response=_as_list(proxy.non_service_rewrite_response),
        root_server=root_server,
        strip_token_query=app.strip_token_query,
        websocket_max_message_size=app.websocket_max_message_size,
        websocket_pump=app.websocket_pump,
        allow_origin=app.allow_origin,
        allow_origin_pat=app.allow_origin_pat,
        max_body_size=app.max_body_size,
        body_timeout=app.body_timeout,
        forwarded_allow_ips=tuple(app.forwarded_allow_ips),
        # The same list HubAuth fills with X-JupyterHub-Version.
        response_headers=auth.response_headers if hub is not None else [],
        default_url=hub.default_url if hub is not None else "",
    )
    public_url = app.public_url or (hub.public_url if hub is not None else "")
    supervisors = Supervisors(servers, base_url=base_url, public_url=public_url)
    supervisors.history = StartHistory.in_runtime_dir()  # the start page's estimates, kept
    templates, _invalid = load_templates(proxy.templates, parent=proxy)
    instances = settings.instances = Instances(supervisors, templates, parent=proxy)
    instances.invalid = _invalid
    reloader = Reloader(partial(read_servers_again, app, instances), instances.configured)
    settings.reloader = TemplateReloader(reloader, instances)
    asgi_app = create_app(settings, supervisors)
    if hub is not None:
        warning = kubernetes_grace_warning(app.graceful_timeout, servers, os.environ)
        if warning is not None:
            log.warning("%s", warning)
        asgi_app.extensions["trioproxy"].services.append(
            partial(auth.run, last_activity=partial(_latest_server_activity, supervisors))
        )

    hconfig = HypercornConfig()
    hconfig.bind = [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"]
    hconfig.accesslog = None
    hconfig.errorlog = logging.getLogger("trioproxy.http")
    hconfig.websocket_max_message_size = app.websocket_max_message_size
    # Limits on what clients may cost. Heads up to 64 KiB (Hypercorn's default is 16 KiB), as
    # Tornado, hence Jupyter, accepts: browsers with many cookies for one host send big ones.
    # That also bounds the header count, which the dispatcher bounds further.
    hconfig.h11_max_incomplete_size = MAX_REQUEST_HEAD
    # No read_timeout: Hypercorn applies it to every read, so it would cut off a client that
    # sends nothing while it downloads for long or holds an idle WebSocket. A slow request
    # head is bounded by keep_alive_timeout instead (Hypercorn's idle timer runs until the
    # head is complete), and a stalled request body by Settings.body_timeout.
    hconfig.read_timeout = None
    # Idle keep-alive connections and unfinished request heads are dropped after 75 s, as
    # nginx does; browsers reopen connections as needed.
    hconfig.keep_alive_timeout = 75
    # Relayed responses carry the backend's own Date and Server headers.
    hconfig.include_date_header = False
    hconfig.include_server_header = False
    # On SIGTERM or SIGINT, requests under way get this long before they are cut off.
    hconfig.graceful_timeout = app.graceful_timeout
    _tls(hconfig, app)
    _hub_tls(hconfig, hub)
    return hconfig, supervisors, asgi_app


# KubeSpawner deletes a stopped server's pod with this grace period (its delete_grace_period,
# 1 s by default), after which Kubernetes kills the pod: shorter than trioproxy's own stop.
KUBESPAWNER_GRACE = 1.0
GRACE_VARIABLE = "TRIOPROXY_DELETE_GRACE_PERIOD"  # the grace the admin configured, if not the default


def kubernetes_grace_warning(
    graceful_timeout: float, servers: Mapping[str, ServerProcess], env: Mapping[str, str]
) -> str | None:
    """The warning to log when trioproxy runs in a Kubernetes pod (under KubeSpawner) whose
    grace period is shorter than trioproxy's graceful stop, else None.

    A stop takes up to ``graceful_timeout`` (requests finishing) and then each server's
    ``stop_timeout`` (SIGTERM to SIGKILL; the servers stop together, so the longest counts).
    """
    if not env.get("KUBERNETES_SERVICE_HOST"):
        return None
    managed = [server.stop_timeout for server in servers.values() if server.command]
    needed = graceful_timeout + max(managed, default=0.0)
    raw = env.get(GRACE_VARIABLE, "")
    try:
        grace = float(raw) if raw else KUBESPAWNER_GRACE
    except ValueError:
        return f"{GRACE_VARIABLE} must be a number of seconds, not {raw!r}; assuming KubeSpawner's default of {KUBESPAWNER_GRACE:g} s"
    if needed <= grace:
        return None
    source = f"{GRACE_VARIABLE}={raw}" if raw else f"KubeSpawner's default delete_grace_period of {grace:g} s"
    return (
        f"running in Kubernetes: a graceful stop takes up to {needed:g} s (graceful_timeout {graceful_timeout:g} s "
        f"+ the longest stop_timeout {max(managed, default=0.0):g} s), but the pod is killed after {grace:g} s "
        f"({source}): requests and apps are cut off. Set c.KubeSpawner.delete_grace_period to at least "
        f"{math.ceil(needed)} (and {GRACE_VARIABLE} to the same in the pod's environment), or lower "
        "--graceful-timeout and the servers' stop_timeout (README: KubeSpawner and zero-to-jupyterhub)"
    )


def _latest_server_activity(supervisors: Any) -> float | None:
    """The trio time of the latest traffic any server saw (WebSocket messages included)."""
    return max((supervisor.last_activity for supervisor in supervisors.values()), default=None)


def _as_list(value: Any) -> list[Any]:
    if callable(value):
        return [value]
    return list(value or [])


async def serve(app: TrioProxy, formatter: MaskingFormatter, access_log: BatchedHandler) -> None:
    from .server import run_app

    _log_jupyter_config(app)
    hconfig, supervisors, asgi_app = build(app)
    auth = asgi_app.extensions["trioproxy"].settings.auth
    formatter.known.extend(auth.known_secrets())
    asgi_app.extensions["trioproxy"].services.append(access_log.run)
    shutdown = trio.Event()
    reloader = asgi_app.extensions["trioproxy"].settings.reloader

    async def reload_logged() -> None:
        try:
            await reloader.reload()
        except (ConfigError, ReloadError):
            pass  # logged by the reloader
        except Exception:  # a bug outside the reloader's own boundary: that reload only
            log.exception("reload failed")

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus[list[str]]) -> None:
                await run_app(asgi_app, hconfig, shutdown=shutdown, task_status=task_status)
                nursery.cancel_scope.cancel()

            try:
                binds = await nursery.start(run)
            except BaseException as exc:
                error = sole_exception(exc)
                if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
                    address = hconfig.bind[0]
                    raise OSError(
                        error.errno,
                        f"cannot listen on {address}: the address is already in use (by another "
                        "trioproxy or a Jupyter server?); choose another port with --port N "
                        "(--port 0 picks a free one)",
                    ) from None
                raise
            runtime_file = _write_runtime_file(app, auth, binds[0])
            nursery.start_soon(_remove_on_exit, runtime_file)
            for bind in binds:
                url = _start_url(app, auth, bind)
                print(f"trioproxy is serving {len(supervisors)} server(s) at: {url}", flush=True)
            if not auth.enabled:
                log.warning(
                    "AUTHENTICATION IS DISABLED (--no-auth): anyone who can reach %s may use every server",
                    ", ".join(binds),
                )
            nursery.start_soon(
                _on_signals, signals, shutdown, app.graceful_timeout, nursery.cancel_scope, reload_logged
            )
    log.info("stopped")


def _write_runtime_file(app: TrioProxy, auth: Any, bind: str) -> Path | None:
    """The runtime file that ``trioproxy list``, ``stop`` and ``servers`` find this one by."""
    from . import runtime

    instance = runtime.Instance(
        url=bind + auth.base_url,
        pid=os.getpid(),
        port=int(urlsplit(bind).port or 0),
        base_url=auth.base_url,
        token=getattr(auth, "token", None),
        version=__version__,
        certfile=os.path.abspath(app.certfile) if app.certfile else None,
    )
    try:
        return runtime.write(instance)
    except OSError as exc:
        log.warning("cannot write the runtime file (trioproxy list will not show this one): %s", exc)
        return None


async def _remove_on_exit(path: Path | None) -> None:
    from .runtime import remove

    try:
        await trio.sleep_forever()
    finally:
        if path is not None:
            remove(path)


def _start_url(app: TrioProxy, auth: Any, bind: str) -> str:
    """The URL to open. A token the user chose is theirs to know and stays out of the terminal
    (and of whatever records it), as Jupyter Server does; a generated one must be shown."""
    url = bind + auth.base_url
    if getattr(auth, "token", None):
        url += f"?token={app.generated_token}" if app.generated_token else "?token=..."
    return url


async def _on_signals(
    signals: Any, shutdown: trio.Event, grace: float, everything: trio.CancelScope, reload: Any
) -> None:
    """SIGHUP reloads the configuration. The first SIGINT or SIGTERM shuts down gracefully;
    a second one cuts it short."""
    async with trio.open_nursery() as nursery:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if not shutdown.is_set():
                    log.info("received SIGHUP: reloading the configuration")
                    nursery.start_soon(reload)
                continue
            _on_stop_signal(signum, shutdown, grace, everything)


def _on_stop_signal(signum: int, shutdown: trio.Event, grace: float, everything: trio.CancelScope) -> None:
    name = signal.Signals(signum).name
    if not shutdown.is_set():
        log.info("received %s: finishing requests under way (up to %g s), then stopping every server", name, grace)
        shutdown.set()
    else:
        log.info("received %s again: stopping every server now", name)
        everything.cancel()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        from .commands import run

        run(args[0], args[1:])
    app = TrioProxy()
    try:
        app.initialize(argv)
        if app.config_file:
            app.load_file(app.config_file)
        else:
            load_jupyter_config(app)
        if app.generate_config:
            path = os.path.abspath("trioproxy_config.py")
            if os.path.exists(path):
                raise ConfigError(f"{path} exists already; not overwriting it")
            with open(path, "w") as file:
                file.write(app.generate_config_file())
            print(f"wrote {path}")
            return
        formatter, access_log, writer = setup_logging(cast(int, app.log_level), app.log_format)
        try:
            trio.run(serve, app, formatter, access_log)
        except BaseException as exc:
            # Errors from inside nurseries come wrapped in exception groups.
            raise sole_exception(exc) from None
        finally:
            writer.close()
    except ConfigError as exc:
        print(f"trioproxy: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except UsageError as exc:
        print(f"trioproxy: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"trioproxy: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)
