"""Configuration, compatible with jupyter-server-proxy.

``c.ServerProxy.servers = {name: {...}}`` takes the same options with the same meaning as
jupyter-server-proxy's ``ServerProcess``; trioproxy's own options (restart policy, readiness,
stopping, idling) sit beside them. Servers registered by installed packages under the
``jupyter_serverproxy_servers`` entry point group are added to those from the config.

Loading is tolerant, reporting strict, as in jupyter-server-proxy: an unknown key (a server
option, or a ``launcher_entry`` one) is a warning naming the server, the key, where it came
from and the option it may be a typo of, and the server loads without it;
``ServerProxy.strict_config`` (``--strict-config``) makes it an error instead. A value that
cannot work (of the wrong type, a negative timeout...) fails that one server with the reason.
Among entry points registering one name, the first found is served, as there; a server with
nothing to start or reach (no command, port or unix socket path) gets no route.
"""

from __future__ import annotations

import difflib
import logging
import pathlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from importlib.metadata import entry_points
from typing import Any

from traitlets import (
    Bool,
    Dict,
    Enum,
    Float,
    Instance,
    Int,
    List,
    TraitError,
    Tuple,
    Unicode,
    Union,
    default,
    validate,
)
from traitlets import (
    Callable as CallableTrait,
)
from traitlets.config import Configurable

from .health import HealthCheck
from .options import OptionError, check_server
from .paths import check_paths, clash_with, find_clashes, server_path

log = logging.getLogger("trioproxy.config")

ENTRY_POINT_GROUP = "jupyter_serverproxy_servers"


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one line naming what is wrong."""


class ServerOptionError(ConfigError):
    """One server's option has a value that cannot work (of the wrong type, a NUL in its
    command, a negative timeout...): that server fails, the others run. An unknown option is
    a warning, or with ``strict_config`` a plain ConfigError (none of that file is used)."""

    def __init__(self, server: str, option: str, detail: str) -> None:
        super().__init__(f"server {server!r}: option {option!r}: {detail}")
        self.server = server
        self.option = option
        self.detail = detail


class ReloadError(Exception):
    """A reload that failed for another reason than the configuration (logged with its
    traceback); the message says what was left as it was."""


class LauncherEntry(Configurable):
    """How a server appears in a launcher (JupyterLab's, or trioproxy's own page)."""

    enabled = Bool(True, help="Show this server in the launcher.").tag(config=True)
    icon_path = Union(
        [Unicode(), Instance(pathlib.Path)],
        default_value="",
        help="Path of an SVG or PNG icon for the launcher.",
    ).tag(config=True)
    title = Unicode(help="Title shown in the launcher; the server's name by default.").tag(
        config=True
    )
    path_info = Unicode(help="Path the launcher opens, relative to the base URL; '<name>/' by default.").tag(
        config=True
    )
    category = Unicode("Notebook", help="Launcher section the entry goes in.").tag(config=True)

    @validate("icon_path")
    def _validate_icon_path(self, proposal: Any) -> str:
        return str(proposal["value"])


class ServerProcess(Configurable):
    """One server: how to start it and how to relay to it.

    Keyword arguments that are no option (``ServerProcess(comand=...)`` in a config file) are
    left out, as in jupyter-server-proxy, and kept in :attr:`ignored_options` (with those of
    ``launcher_entry``) for :func:`make_server_process` to report.
    """

    def __init__(self, **kwargs: Any) -> None:
        # (where, key): where is "" for a server option, "launcher_entry" for one of those.
        self.ignored_options: list[tuple[str, str]] = []
        # Servers of the same name that are not served but listed in servers-info after this
        # one, as jupyter-server-proxy lists them: another package's, or the entry point's
        # when the configuration has the name too.
        self.also_listed: list[ServerProcess] = []
        known = set(type(self).class_trait_names()) | {"parent", "config"}
        for key in [key for key in kwargs if key not in known]:
            del kwargs[key]
            self.ignored_options.append(("", str(key)))
        super().__init__(**kwargs)

    name = Unicode(help="Name of the server; its URL is <base_url><name>/.").tag(config=True)

    # jupyter-server-proxy's options
    command = Union(
        [List(Unicode()), CallableTrait()],
        default_value=[],
        help="Command (list, or a callable returning one) to start the server. {port}, "
        "{unix_socket} and {base_url} are substituted. Empty: the server is already running.",
    ).tag(config=True)
    environment = Union(
        [Dict(Unicode()), CallableTrait()],
        default_value={},
        help="Environment variables (dict, or callable returning one) added to trioproxy's own.",
    ).tag(config=True)
    timeout = Float(
        5.0,
        help="Seconds a request waits for the server to become ready (504 after); the start goes on.",
    ).tag(config=True)
    absolute_url = Bool(
        False, help="Pass the full path (with the proxy prefix) to the server instead of stripping it."
    ).tag(config=True)
    port = Int(0, help="Port the server listens on; 0 picks a free one.").tag(config=True)
    unix_socket = Union(
        [Bool(False), Unicode()],
        default_value=None,
        allow_none=True,
        help="Listen on a unix socket instead of a port: True for one trioproxy creates, or a path.",
    ).tag(config=True)
    mappath = Union(
        [Dict(Unicode()), CallableTrait()],
        default_value={},
        help="Map request paths before relaying: a dict of exact paths, or a callable(path).",
    ).tag(config=True)
    launcher_entry = Union(
        [Instance(LauncherEntry), Dict()],
        allow_none=False,
        help="Launcher settings: enabled, icon_path, title, path_info, category.",
    ).tag(config=True)
    new_browser_tab = Bool(True, help="Open the server in a new browser tab from a launcher.").tag(
        config=True
    )
    request_headers_override = Union(
        [Dict(Unicode()), CallableTrait()],
        default_value={},
        help="Headers (dict, or callable returning one) set on every relayed request; "
        "templates are substituted.",
    ).tag(config=True)
    rewrite_response = Union(
        [CallableTrait(), List(CallableTrait())],
        default_value=[],
        help="Callable(s) that may change a response; arguments chosen by name among "
        "response, request, orig_response, host, port, path.",
    ).tag(config=True)
    update_last_activity = Union(
        [Bool(), CallableTrait()],
        default_value=True,
        help="Count traffic to this server as activity: a bool, or a callable(request).",
    ).tag(config=True)
    exclude_last_activity_patterns = List(
        Union([Unicode(), Instance(re.Pattern)]),
        help="Request paths (regular expressions, matched at the start) that are not activity.",
    ).tag(config=True)
    raw_socket_proxy = Bool(
        False, help="Relay WebSocket messages to a plain TCP or unix-socket stream."
    ).tag(config=True)
    progressive = Bool(
        None,
        allow_none=True,
        help="Accepted for compatibility; trioproxy always streams responses.",
    ).tag(config=True)

    # trioproxy's own options
    path = Unicode(
        "",
        help="URL path below the base URL to serve the server at instead of its name; several "
        "segments allowed ('tools/refine'). Checked against other servers' paths and trioproxy's "
        "own routes.",
    ).tag(config=True)
    aliases = List(
        Unicode(),
        help="Other paths that redirect (307) to the server's path, keeping the rest of the "
        "path and the query.",
    ).tag(config=True)
    autostart = Bool(False, help="Start the server when trioproxy starts, not on first use.").tag(
        config=True
    )
    restart = Enum(
        ["on-failure", "always", "never"],
        default_value="on-failure",
        help="When to restart the process after it exits.",
    ).tag(config=True)
    backoff_initial = Float(0.5, help="Delay before the second restart in a row (s).").tag(
        config=True
    )
    backoff_max = Float(30.0, help="Longest delay between restarts (s).").tag(config=True)
    max_failures = Int(
        5, help="Failures within failure_window after which the server is marked failed."
    ).tag(config=True)
    failure_window = Float(60.0, help="Window in which failures are counted (s).").tag(config=True)
    stable_after = Float(
        10.0,
        help="A process ready this long was healthy: its exit restarts at once and clears "
        "the failure count (s).",
    ).tag(config=True)
    ready_check_path = Unicode(
        None,
        allow_none=True,
        help="Path that must answer (status < 400) for the server to be ready; by default "
        "an accepted connection is enough.",
    ).tag(config=True)
    start_timeout = Float(
        300.0,
        help="Seconds a starting process has to become ready; then it is stopped and the start "
        "counts as a failure under 'restart'.",
    ).tag(config=True)
    start_quiet_timeout = Float(
        0.0,
        help="Stop a starting process that printed no line for this many seconds; the start "
        "counts as a failure (0: off).",
    ).tag(config=True)
    stop_timeout = Float(5.0, help="Seconds between SIGTERM and SIGKILL when stopping.").tag(
        config=True
    )
    idle_timeout = Float(0.0, help="Stop the server after this many idle seconds (0: never).").tag(
        config=True
    )
    cwd = Unicode(None, allow_none=True, help="Working directory of the process.").tag(config=True)
    connect_timeout = Float(
        10.0, help="Seconds to wait for the server to accept a connection (504 after)."
    ).tag(config=True)
    response_timeout = Float(
        300.0,
        help="Seconds from the end of a request to the server's response head (504 after).",
    ).tag(config=True)
    max_connections = Int(
        100, help="HTTP connections open to the server at once; more requests wait for one."
    ).tag(config=True)
    max_websockets = Int(
        1000, help="WebSocket connections open to the server at once; more wait for one to close."
    ).tag(config=True)
    pool_idle_timeout = Float(
        30.0, help="Seconds an idle keep-alive connection to the server is kept."
    ).tag(config=True)
    websocket_keepalive = Float(
        None,
        allow_none=True,
        help="Ping a WebSocket's client after this many seconds without bytes to it, and close it "
        "with 1011 when it stays silent as long again (0: off). Default: 30 for raw_socket_proxy "
        "servers, off for the others.",
    ).tag(config=True)

    health_check = Union(
        [Bool(), Dict()],
        default_value=None,
        allow_none=True,
        help="Restart the server when it stops answering: {'path': '/health' (none: a "
        "connection is enough), 'interval': 10, 'timeout': 5, 'failures': 3 (in a row)}; "
        "True for those defaults. Off by default.",
    ).tag(config=True)

    forward_user = Union(
        [Bool(), Dict()],
        default_value=False,
        help="Send the authenticated user to the server in signed X-Trioproxy-User, -Groups and "
        "-Scopes headers (README: Telling an app who its user is): True (the process gets the "
        "secret in $TRIOPROXY_USER_SECRET), or {'secret': '...'} for a server trioproxy does not start.",
    ).tag(config=True)
    backend_tls = Union(
        [Bool(), Dict()],
        default_value=False,
        help="The server speaks HTTPS: True, or {'verify': True, 'ca_file': ..., 'client_cert': ..., "
        "'client_key': ..., 'hostname': ...}; under JupyterHub's internal_ssl its files by default.",
    ).tag(config=True)

    @default("launcher_entry")
    def _default_launcher_entry(self) -> LauncherEntry:
        return LauncherEntry(parent=self, title=self.name, path_info=self.name + "/")

    @validate("launcher_entry")
    def _validate_launcher_entry(self, proposal: Any) -> LauncherEntry:
        value = proposal["value"]
        if isinstance(value, LauncherEntry):
            return value
        ignored = getattr(self, "ignored_options", None)
        if ignored is None:  # set before the traits are: not reached, but never an AttributeError
            ignored = self.ignored_options = []
        ignored[:] = [item for item in ignored if item[0] != "launcher_entry"]
        known = {key: item for key, item in value.items() if key in LAUNCHER_OPTIONS}
        ignored.extend(("launcher_entry", str(key)) for key in value if key not in LAUNCHER_OPTIONS)
        settings = {"title": self.name, "path_info": self.name + "/", **known}
        return LauncherEntry(parent=self, **settings)

    # Not an option: why this server cannot run (see failed_server); None for a usable one.
    config_error = Unicode(None, allow_none=True)
    # Not an option: False for a stand-in whose paths clash with another server's (no URL).
    routed = Bool(True)
    # Not an option: standalone mode's server, served at the base URL's root.
    root = Bool(False)

    @validate("exclude_last_activity_patterns")
    def _validate_patterns(self, proposal: Any) -> list[re.Pattern[str]]:
        try:
            return [re.compile(pattern) for pattern in proposal["value"]]
        except re.error as exc:
            raise TraitError(f"invalid regular expression: {exc}") from None

    @validate("health_check")
    def _validate_health_check(self, proposal: Any) -> Any:
        try:
            HealthCheck.parse(proposal["value"])
        except ValueError as exc:
            raise TraitError(str(exc)) from None
        return proposal["value"]

    @property
    def health(self) -> HealthCheck | None:
        """The health check asked for, or None."""
        return HealthCheck.parse(self.health_check)

    @property
    def launcher(self) -> LauncherEntry:
        entry = self.launcher_entry
        assert isinstance(entry, LauncherEntry)
        return entry

    @property
    def rewrite_response_chain(self) -> list[Callable[..., Any]]:
        value = self.rewrite_response
        return list(value) if isinstance(value, (list, tuple)) else [value]


class ServerProxy(Configurable):
    """The set of servers trioproxy runs and relays to."""

    servers = Dict(
        help="Servers to run: {name: {option: value}} or {name: ServerProcess(...)}."
    ).tag(config=True)
    templates = Dict(
        help="Servers started on demand, one instance per set of arguments (POST "
        "server-proxy/api/servers): {name: {server options..., 'params': {param: {'type': "
        "'string'|'path'|'int', ...}}, 'max_instances': 3}}; see the README, 'Instances on demand'."
    ).tag(config=True)
    host_allowlist = Union(
        [List(Unicode()), CallableTrait()],
        default_value=["localhost", "127.0.0.1"],
        help="Hosts /proxy/<host>:<port>/ may reach: a list, or a callable(handler, host).",
    ).tag(config=True)
    non_service_rewrite_response = Union(
        [CallableTrait(), List(CallableTrait()), Tuple()],
        default_value=[],
        help="rewrite_response callable(s) for /proxy/<port>/ routes.",
    ).tag(config=True)
    load_entry_points = Bool(
        True, help=f"Add servers registered under the {ENTRY_POINT_GROUP!r} entry point group."
    ).tag(config=True)
    strict_config = Bool(
        False,
        help="Refuse a server option or launcher_entry option trioproxy does not know, and a server "
        "with no command, port or unix socket path (by default: a warning, and the key or the "
        "server is left out, as jupyter-server-proxy does). A configuration file with one is not "
        "used at all; an entry point with one is skipped.",
    ).tag(config=True)


SERVER_OPTIONS = frozenset(ServerProcess.class_trait_names(config=True)) - {"name"}
LAUNCHER_OPTIONS = frozenset(LauncherEntry.class_trait_names(config=True))
CONFIGURATION = "the configuration"


def make_server_process(
    name: str,
    settings: Any,
    parent: Configurable | None = None,
    *,
    strict: bool = False,
    source: str = CONFIGURATION,
) -> ServerProcess:
    """Build and validate one server's settings (``source`` says where they came from, for
    messages). An unknown key is logged and left out, or with ``strict`` a ConfigError; a
    value that cannot work is a ServerOptionError (see :func:`load_server`). Every error is
    one line."""
    if isinstance(settings, ServerProcess):
        if not settings.name:
            settings.name = name
        _report_ignored(name, settings.ignored_options, source, strict)
        if settings.config_error is None:
            _check_values(settings)
        return settings
    if not isinstance(settings, dict):
        raise ConfigError(
            f"server {name!r}: expected a dict of options or a ServerProcess, "
            f"got {type(settings).__name__} (in {source})"
        )
    unknown = [("", str(option)) for option in settings if option not in SERVER_OPTIONS]
    process = ServerProcess(parent=parent, name=name)
    for option, value in settings.items():
        if option not in SERVER_OPTIONS:
            continue
        try:
            setattr(process, option, value)
        except TraitError as exc:
            raise ServerOptionError(name, option, _short(_masked(exc, value))) from None
    _report_ignored(name, unknown + process.ignored_options, source, strict)
    _check_values(process)
    return process


def unknown_key_message(name: str, where: str, key: str) -> str:
    """``server 'x': unknown option 'comand' (did you mean 'command'?)``: what is unknown,
    and what may have been meant."""
    own, other = (LAUNCHER_OPTIONS, SERVER_OPTIONS) if where else (SERVER_OPTIONS, LAUNCHER_OPTIONS)
    label = f"{where} option" if where else "option"
    hint = difflib.get_close_matches(key, sorted(own), n=1)
    if key in other:  # before a near miss: 'path_info' is launcher_entry's, not a typo of 'path'
        suggestion = " (a launcher_entry option, not a server option)" if not where else " (a server option, not a launcher_entry one)"
    elif hint:
        suggestion = f" (did you mean {hint[0]!r}?)"
    else:
        suggestion = ""
    return f"server {name!r}: unknown {label} {key!r}{suggestion}"


def _report_ignored(name: str, ignored: list[tuple[str, str]], source: str, strict: bool) -> None:
    for where, key in ignored:
        message = f"{unknown_key_message(name, where, key)} in {source}"
        if strict:
            raise ConfigError(message)
        log.warning("%s; ignored, the server loads without it (--strict-config makes this an error)", message)


def _check_values(process: ServerProcess) -> None:
    try:
        check_server(process)
    except OptionError as exc:
        raise ServerOptionError(process.name, exc.option, exc.detail) from None
    entry = process.launcher
    if process.path and entry.path_info == process.name + "/":  # the default follows the path
        entry.path_info = server_path(process) + "/"


def failed_server(name: str, reason: str, *, routed: bool = True, like: ServerProcess | None = None) -> ServerProcess:
    """A stand-in for a server that cannot run (``reason`` says why): it runs nothing, and
    each start (one at once, then one per request or API call) fails with the reason, so its
    URL answers 503 with it and the API lists it as failed. A reload replaces it.
    ``routed`` false: it has no URL (its paths clash with another server's). ``like``: the
    server it stands in for, whose path and aliases it takes."""
    process = ServerProcess(name=name, autostart=True)
    process.command = ["(not started)"]  # never run: the supervisor sees config_error first
    process.config_error = reason
    process.routed = routed
    if like is not None:
        process.path, process.aliases, process.root = like.path, list(like.aliases), like.root
    return process


def _paths_of(name: str, settings: Any) -> ServerProcess | None:
    """A server with just the path and aliases of ``settings``, if those are valid."""
    try:
        if isinstance(settings, ServerProcess):
            path, aliases = settings.path, settings.aliases
        else:
            path, aliases = settings.get("path", ""), settings.get("aliases", [])
        process = ServerProcess(name=name, path=path, aliases=list(aliases))
        check_paths(process)
    except Exception:  # the path is what is wrong (reported already), or no dict at all
        return None
    return process


def load_server(
    name: str,
    settings: Any,
    parent: Configurable | None = None,
    *,
    strict: bool = False,
    source: str = CONFIGURATION,
) -> ServerProcess:
    """:func:`make_server_process`, but a value that cannot work fails that server alone
    (logged; a :func:`failed_server` takes its place). Other ConfigErrors are raised."""
    try:
        return make_server_process(name, settings, parent=parent, strict=strict, source=source)
    except ServerOptionError as exc:
        log.error("%s (in %s); this server will not start, the others will", exc, source)
        reason = f"option {exc.option!r}: {exc.detail}; fix the configuration and reload"
        return failed_server(name, reason, like=_paths_of(name, settings))


def _masked(exc: TraitError, value: Any) -> str:
    """The error's text without the secrets its value may show (traitlets quotes the whole
    value: an ``environment`` holding a token of the wrong type, a ``command`` with a password)."""
    from .auth import MASK, secret_values, secret_variable

    text = str(exc)
    hidden: list[Any] = []
    if isinstance(value, dict):
        hidden = [item for key, item in value.items() if secret_variable(str(key)) and item not in (None, "")]
    elif isinstance(value, (list, tuple)):
        hidden = list(secret_values([str(item) for item in value], {}))
    for item in hidden:
        text = text.replace(repr(item), repr(MASK)).replace(str(item), MASK)
    return text


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass(frozen=True)
class EntryPointServer:
    """A server's settings as an installed package's entry point gave them."""

    settings: Any
    source: str  # "entry point 'name = module:function' of distribution 1.0"
    distribution: str
    shadowed: tuple[EntryPointServer, ...] = ()  # later ones with the same name: listed, not served


def _distribution(entry: Any) -> str:
    dist = getattr(entry, "dist", None)
    if dist is None:
        return "an unknown distribution"
    return f"{dist.name} {dist.version}"


def load_entry_point_servers() -> dict[str, EntryPointServer]:
    """Server settings from installed packages; one that fails is logged and skipped.

    Entry points come in ``importlib.metadata``'s order (``sys.path``'s); when two register
    one name, the first is served and the later ones kept in its ``shadowed`` and named in a
    warning, as jupyter-server-proxy lists both and routes to the first.
    """
    found: dict[str, EntryPointServer] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        distribution = _distribution(entry)
        source = f"entry point '{entry.name} = {entry.value}' of {distribution}"
        try:
            setup = entry.load()
            settings = setup()
        except Exception as exc:  # a broken package must not stop the others
            log.error("skipping server %r from %s: %s: %s", entry.name, source, type(exc).__name__, exc)
            continue
        server = EntryPointServer(settings, source, distribution)
        if entry.name in found:
            first = found[entry.name]
            log.warning(
                "server %r is registered by two packages: %s and %s; serving the one of %s (found "
                "first, as jupyter-server-proxy does), not the one of %s (servers-info lists both)",
                entry.name,
                first.source,
                source,
                first.distribution,
                distribution,
            )
            found[entry.name] = replace(first, shadowed=(*first.shadowed, server))
            continue
        found[entry.name] = server
    return found


def _listed_only(name: str, entries: Iterable[EntryPointServer], proxy: ServerProxy) -> list[ServerProcess]:
    """Servers that servers-info lists but that get no route; one that does not load is left out."""
    listed = []
    for entry in entries:
        try:
            process = load_server(name, entry.settings, parent=proxy, strict=False, source=entry.source)
        except ConfigError as exc:
            log.error("not listing server %r from %s: %s", name, entry.source, exc)
            continue
        if process.config_error is None:
            listed.append(process)
    return listed


def has_route(process: ServerProcess) -> bool:
    """Whether there is anything to start or reach, as jupyter-server-proxy decides it: a
    command, else a port or a unix socket path."""
    return bool(process.command) or bool(process.port) or isinstance(process.unix_socket, str)


def collect_servers(proxy: ServerProxy, *, source: str = CONFIGURATION) -> dict[str, ServerProcess]:
    """All servers: those from entry points, then those from the config (which win);
    ``source`` names the config for messages."""
    from_entry_points = load_entry_point_servers() if proxy.load_entry_points else {}
    strict = proxy.strict_config
    servers: dict[str, ServerProcess] = {}
    for name, entry in from_entry_points.items():
        if name in proxy.servers:
            log.info("server %r: the configuration's replaces the one from %s (servers-info lists both)", name, entry.source)
            continue
        try:
            check_server_name(name)
            servers[name] = load_server(name, entry.settings, parent=proxy, strict=strict, source=entry.source)
        except ConfigError as exc:
            log.error("skipping server %r from %s: %s", name, entry.source, exc)
            continue
        servers[name].also_listed = _listed_only(name, entry.shadowed, proxy)
    for name, settings in proxy.servers.items():
        check_server_name(name)
        servers[name] = load_server(name, settings, parent=proxy, strict=strict, source=source)
        if name in from_entry_points:
            entry = from_entry_points[name]
            servers[name].also_listed = _listed_only(name, (entry, *entry.shadowed), proxy)
    for name in list(servers):
        if servers[name].config_error is None and not has_route(servers[name]):
            where = from_entry_points[name].source if name in from_entry_points and name not in proxy.servers else source
            message = f"server {name!r} in {where} has no command, port or unix_socket path: nothing to start or reach"
            if strict and where == source:
                raise ConfigError(message)
            log.warning("%s; it gets no route (404), as in jupyter-server-proxy", message)
            del servers[name]
    if proxy.load_entry_points:  # packages' Jupyter server extensions (their pages), in a child of their own
        from .server_extensions import extension_servers

        for name, settings in extension_servers(servers, reserved=RESERVED_NAMES).items():
            try:
                check_server_name(name)
                servers[name] = load_server(name, settings, parent=proxy, strict=strict, source=f"server {name!r}'s extension host")
            except ConfigError as exc:
                log.error("not serving the server extension page %r: %s", name, exc)
    _refuse_clashes(servers, proxy, from_entry_points, strict=strict, source=source)
    return servers


def _refuse_clashes(
    servers: dict[str, ServerProcess],
    proxy: ServerProxy,
    from_entry_points: dict[str, EntryPointServer],
    *,
    strict: bool,
    source: str,
) -> None:
    """Servers whose paths clash with another's (see :mod:`trioproxy.paths`) become stand-ins
    without a URL that report why; with ``strict``, a clash in the configuration is an error.
    The configuration's servers come first, in its order, then those of entry points: the
    later of two keeps nothing."""
    order = [name for name in proxy.servers if name in servers] + [n for n in servers if n not in proxy.servers]
    for name, reason in find_clashes(servers[name] for name in order).items():
        if name in proxy.servers:
            where = source
        elif name in from_entry_points:
            where = from_entry_points[name].source
        else:
            where = f"server {name!r}'s extension host"
        message = f"server {name!r} in {where}: {reason}"
        if strict and where == source:
            raise ConfigError(message)
        log.error("%s; this server gets no URL, the others are served (fix the configuration and reload)", message)
        servers[name] = failed_server(name, f"{reason}; fix the configuration and reload", routed=False)


RESERVED_NAMES = frozenset({"proxy", "server-proxy", "login", "logout", "oauth_callback"})


def check_server_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"server name {name!r}: must be a non-empty string")
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"server name {name!r}: must not contain '/' or be '.' or '..'")
    if name in RESERVED_NAMES:
        raise ConfigError(f"server name {name!r}: reserved for trioproxy's own routes")


# -- reloading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload changes: servers by name."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]


def plan_reload(old: dict[str, ServerProcess], new: dict[str, ServerProcess]) -> ReloadPlan:
    """Compare two configurations server by server (pure: nothing is started or stopped)."""
    same = {name: _same(old[name], new[name]) for name in new if name in old}
    return ReloadPlan(
        added=[name for name in new if name not in old],
        removed=[name for name in old if name not in new],
        changed=[name for name in new if name in old and not same[name]],
        unchanged=[name for name in new if name in old and same[name]],
    )


def _same(old: ServerProcess, new: ServerProcess) -> bool:
    try:
        return bool(settings_of(old) == settings_of(new))
    except Exception:  # a default argument whose == raises: call it changed, restart it
        log.warning("cannot compare the settings of server %r; treating them as changed", new.name, exc_info=True)
        return False


def settings_of(process: ServerProcess) -> dict[str, Any]:
    """A server's options in a form that compares equal when a config file read again says
    the same: functions compare by their code, not by identity, since reading a ``.py``
    config again makes new function objects."""
    settings = {name: _comparable(getattr(process, name)) for name in sorted(SERVER_OPTIONS)}
    settings["config_error"] = process.config_error
    return settings


def _comparable(value: Any) -> Any:
    if isinstance(value, LauncherEntry):
        return _comparable({name: getattr(value, name) for name in value.trait_names(config=True)})
    if isinstance(value, dict):
        return tuple(sorted((str(key), _comparable(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(item) for item in value)
    if isinstance(value, re.Pattern):
        return ("pattern", value.pattern, value.flags)
    if callable(value):
        code = getattr(value, "__code__", None)
        # Default arguments too (a lambda's ``port=8080``), but not what a closure captured.
        defaults = _comparable(getattr(value, "__defaults__", None) or ())
        return ("callable", getattr(value, "__module__", None), getattr(value, "__qualname__", repr(value)), code, defaults)
    return value


class Reloader:
    """Reads the configuration again and brings the running servers in line with it, as
    supervisord's ``reread`` and ``update`` do: added servers appear, removed ones are stopped,
    changed ones are restarted (at once, or once idle), unchanged ones are left alone, open
    connections and all.

    A reload is a boundary: reading and planning change nothing until they have succeeded,
    and each server's change is applied on its own, so that one that fails (logged with its
    traceback) leaves the others' applied and no server stopped that the plan did not stop.
    A changed server whose new settings cannot work keeps running as it was.

    ``load`` reads the configuration and returns every server (the CLI's, which knows the
    files and the command line); ``supervisors`` is :class:`trioproxy.supervisor.Supervisors`.
    """

    def __init__(self, load: Callable[[], dict[str, ServerProcess]], supervisors: Any) -> None:
        self._load = load
        self._supervisors = supervisors
        self._lock: Any = None

    async def reload(self, *, when_idle: bool = False) -> dict[str, Any]:
        """Apply the configuration as it is now; the plan as a dict (with ``invalid``: the
        servers whose options cannot work and why, when there are any).

        Raises ConfigError, having changed nothing, when the configuration cannot be used;
        ReloadError when something else failed: while planning (nothing changed), or while
        applying one server's change (that server as the message says, the rest applied).
        """
        import trio

        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            try:
                new = self._load()
            except Exception as exc:  # a config file that raises, an entry point gone wrong
                error = exc if isinstance(exc, ConfigError) else ConfigError(f"{type(exc).__name__}: {exc}")
                log.error("reload failed, nothing changed: config error: %s", error)
                raise error from None
            try:
                new, invalid = self._keep_working(new)
                plan = plan_reload(self._supervisors.processes(), new)
            except Exception as exc:
                log.exception("reload failed, nothing changed: cannot plan it")
                raise ReloadError(f"nothing changed: cannot plan it: {type(exc).__name__}: {exc}") from None
            log.info(
                "reloading the configuration: added %s, removed %s, changed %s, unchanged %d",
                plan.added or "none",
                plan.removed or "none",
                plan.changed or "none",
                len(plan.unchanged),
            )
            failures: dict[str, str] = {}

            async def apply(name: str, what: str, change: Callable[[], Any]) -> None:
                try:
                    await change()
                except Exception as exc:
                    log.exception("reload: could not %s server %r", what, name)
                    failures[name] = f"could not {what} it: {type(exc).__name__}: {exc}"

            async with trio.open_nursery() as nursery:
                for name in plan.removed:
                    nursery.start_soon(apply, name, "remove", partial(self._supervisors.remove, name))
                for name in plan.changed:
                    change = partial(self._supervisors.replace, new[name], when_idle=when_idle)
                    nursery.start_soon(apply, name, "restart", change)
                for name in plan.added:
                    await apply(name, "add", partial(self._supervisors.add, new[name]))
            result: dict[str, Any] = {
                "added": plan.added,
                "removed": plan.removed,
                "changed": plan.changed,
                "unchanged": plan.unchanged,
                "waiting_for_idle": self._supervisors.waiting_for_idle(),
            }
            if invalid:
                result["invalid"] = invalid
            if failures:
                summary = "; ".join(f"server {name!r}: {why}" for name, why in sorted(failures.items()))
                raise ReloadError(f"{summary}; the other changes were applied")
            return result

    def _keep_working(self, new: dict[str, ServerProcess]) -> tuple[dict[str, ServerProcess], dict[str, str]]:
        """The servers to apply, and why those whose options cannot work cannot: a running
        server keeps its settings rather than become one that cannot start."""
        current = self._supervisors.processes()
        kept = dict(new)
        invalid: dict[str, str] = {}
        for name, process in new.items():
            if process.config_error is None:
                continue
            invalid[name] = f"server {name!r}: {process.config_error}"
            running = current.get(name)
            # Kept unless its paths now clash with a server the new configuration has.
            if running is not None and running.config_error is None and clash_with(running, kept.values()) is None:
                kept[name] = running
                invalid[name] += " (its running settings are kept)"
                log.error("reload: %s", invalid[name])
        return kept, invalid
