"""Pages that jupyter-*-proxy packages serve from a Jupyter server extension.

Some packages that register ``jupyter_serverproxy_servers`` serve their user-facing page not
from the process they start but from a Jupyter *server extension* of their own, which Jupyter
Server loads beside jupyter-server-proxy: jupyter-remote-desktop-proxy's ``<base>/desktop/``
(a template and noVNC's static files) is one; its launcher entry points there
(``path_info: desktop``), while its server, ``desktop-websockify``, only carries the VNC
WebSocket. trioproxy is no Jupyter Server, so it runs such extensions in one of its own
servers: a Jupyter Server child (``trioproxy.extension_host``) per package, started on demand
and supervised like any other, reached under the path its launcher entry points to.

Discovery, without importing the packages: a distribution that registers
``jupyter_serverproxy_servers`` entry points and installs a
``etc/jupyter/jupyter_server_config.d/*.json`` enabling server extensions
(``ServerApp.jpserver_extensions``), which is how such packages enable themselves for Jupyter;
one turned off in the Jupyter configuration's JSON files (``jupyter server extension disable``)
is left out, as Jupyter Server merges them.
The path to serve is the first segment of its servers' ``launcher_entry.path_info`` where that
is not a server's own name: that is the page the launcher opens. A package whose extension
serves nothing its launcher points to gets no child (its pages are not reachable from
trioproxy's launcher anyway, and starting a Jupyter Server for them would cost for nothing).

The child is named after that path (``desktop``), is relayed with ``absolute_url`` (Jupyter
Server wants the whole path under its own ``base_url``, which is trioproxy's), and trusts only
a token header trioproxy adds to each request it relays (see :mod:`trioproxy.extension_host`),
so trioproxy's authentication, token or JupyterHub, is the one that decides. A server of that
name in the configuration replaces it, as for every entry point's server.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import Distribution, distributions, entry_points
from pathlib import Path, PurePosixPath
from typing import Any

from .paths import name_clash

log = logging.getLogger("trioproxy.config")

GROUP = "jupyter_serverproxy_servers"
TOKEN_ENV = "TRIOPROXY_EXTENSION_HOST_TOKEN"
# One token for the life of this trioproxy: a reload compares server settings by value, and a
# new token would make every extension host look changed and restart.
_TOKEN = secrets.token_hex(24)


@dataclass(frozen=True)
class PackageExtension:
    """The server extensions one distribution enables, and the entry points it registers."""

    distribution: str  # "jupyter-remote-desktop-proxy 3.0.1"
    modules: tuple[str, ...]
    entry_points: tuple[str, ...]


def _config_files(dist: Distribution) -> list[Path]:
    """The ``jupyter_server_config.d`` JSON files ``dist`` installed, where they are.

    The recorded path is relative to the site directory (``../../../etc/jupyter/…`` for a
    prefix install); ``pip install --target`` records the prefix's path but puts the file
    below the target, so that place is tried too.
    """
    found = []
    for file in dist.files or []:
        path = PurePosixPath(str(file))
        if path.suffix != ".json" or path.parent.name != "jupyter_server_config.d":
            continue
        site = Path(str(dist.locate_file("")))
        for candidate in (Path(str(dist.locate_file(file))), site / "etc" / "jupyter" / "jupyter_server_config.d" / path.name):
            if candidate.is_file():
                found.append(candidate)
                break
    return found


def enabled_modules(files: Iterable[Path], where: str) -> list[str]:
    """Extension modules the files enable (``{"ServerApp": {"jpserver_extensions": {m: true}}}``);
    a file that cannot be read or is not that shape is logged and skipped."""
    modules: list[str] = []
    for file in files:
        try:
            data = json.loads(file.read_text())
            extensions = data.get("ServerApp", {}).get("jpserver_extensions", {})
            if not isinstance(extensions, dict):
                raise ValueError("ServerApp.jpserver_extensions is not an object")
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring %s of %s: %s", file, where, exc)
            continue
        modules += [str(name) for name, on in extensions.items() if on is True and name not in modules]
    return modules


def _registering(path: list[str] | None) -> list[tuple[Distribution, tuple[str, ...]]]:
    """Distributions with server-proxy entry points and their names, each once, in order.
    Through the entry points: reading every installed distribution's metadata costs ~0.5 s
    in a large environment, the entry point index a few ms."""
    if path is None:
        entries = list(entry_points(group=GROUP))
    else:
        entries = [entry for dist in distributions(path=path) for entry in dist.entry_points if entry.group == GROUP]
    found: dict[str, tuple[Distribution, list[str]]] = {}
    for entry in entries:
        dist = entry.dist
        if dist is None:
            continue
        key = (dist.name or "").lower().replace("_", "-")
        if key not in found:
            found[key] = (dist, [])
        if found[key][0] is dist:  # a second copy of a distribution further on the path: not used
            found[key][1].append(entry.name)
    return [(dist, tuple(names)) for dist, names in found.values()]


def find_package_extensions(path: list[str] | None = None) -> list[PackageExtension]:
    """Installed distributions (on ``path``, by default ``sys.path``) with both server-proxy
    entry points and enabled extensions, in ``importlib.metadata``'s order, each once."""
    found = []
    for dist, names in _registering(path):
        where = f"{dist.name} {dist.version}"
        modules = enabled_modules(_config_files(dist), where)
        off = disabled_in_jupyter_config(modules) if modules else set()
        if off:
            log.info("not running the server extension(s) %s of %s: disabled in the Jupyter configuration", ", ".join(sorted(off)), where)
            modules = [module for module in modules if module not in off]
        if modules:
            found.append(PackageExtension(where, tuple(modules), names))
    return found


def _jupyter_config_dirs() -> list[str]:
    """Jupyter's config path, highest priority first (as ``jupyter --paths`` lists it)."""
    try:
        from jupyter_core.paths import jupyter_config_path
    except ImportError:
        return []
    return list(jupyter_config_path())


def disabled_in_jupyter_config(modules: Iterable[str], directories: list[str] | None = None) -> set[str]:
    """Which of ``modules`` the Jupyter configuration turns off, as Jupyter Server merges it:
    ``jupyter_server_config.d/*.json`` then ``jupyter_server_config.json`` of each directory,
    lowest priority first (``jupyter server extension disable <module>`` writes such a file)."""
    wanted = set(modules)
    state: dict[str, bool] = {}
    for directory in reversed(_jupyter_config_dirs() if directories is None else directories):
        base = Path(directory)
        files = sorted((base / "jupyter_server_config.d").glob("*.json")) + [base / "jupyter_server_config.json"]
        for file in files:
            try:
                extensions = json.loads(file.read_text()).get("ServerApp", {}).get("jpserver_extensions", {})
            except (OSError, ValueError, AttributeError):
                continue  # Jupyter's to complain about; a missing file is the common case
            if isinstance(extensions, dict):
                state.update({name: bool(on) for name, on in extensions.items() if name in wanted})
    return {name for name, on in state.items() if not on}


def _first_segment(path_info: str) -> str:
    return path_info.lstrip("/").split("?")[0].split("#")[0].split("/")[0]


def page_paths(package: PackageExtension, servers: Mapping[str, Any]) -> list[str]:
    """Where the package's launcher entries point outside its own servers' paths."""
    paths: list[str] = []
    for name in package.entry_points:
        process = servers.get(name)
        if process is None or process.config_error is not None:
            continue
        segment = _first_segment(process.launcher.path_info)
        if segment and segment not in servers and segment not in paths and name_clash(segment, servers.values()) is None:
            paths.append(segment)
    return paths


def host_settings(modules: Iterable[str], title: str) -> dict[str, Any]:
    """The server that runs ``modules`` in a Jupyter Server child."""
    return {
        "command": [
            sys.executable, "-m", "trioproxy.extension_host",
            "--port", "{port}", "--base-url", "{base_url}", "--auth-variable", TOKEN_ENV, *modules,
        ],
        "environment": {TOKEN_ENV: _TOKEN},
        "request_headers_override": {"Authorization": f"token {_TOKEN}"},
        "absolute_url": True,
        "timeout": 60,  # a Jupyter Server's start, on a loaded machine
        "launcher_entry": {"enabled": False, "title": title},
    }


def extension_servers(
    servers: Mapping[str, Any], *, reserved: Iterable[str] = (), path: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Settings of the extension hosts to add beside ``servers`` (the loaded ones), by name."""
    taken = set(reserved)
    hosts: dict[str, dict[str, Any]] = {}
    for package in find_package_extensions(path):
        pages = [page for page in page_paths(package, servers) if page not in taken and page not in hosts]
        if not pages:
            log.info(
                "not running the server extension(s) %s of %s: none of its launcher entries points to a page "
                "outside its servers", ", ".join(package.modules), package.distribution,
            )
            continue
        for page in pages:
            log.info(
                "server %r: the server extension(s) %s of %s, in a Jupyter Server started on first use",
                page, ", ".join(package.modules), package.distribution,
            )
            hosts[page] = host_settings(package.modules, f"{package.distribution}: {', '.join(package.modules)}")
    return hosts
