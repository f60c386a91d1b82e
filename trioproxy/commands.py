"""``trioproxy list``, ``trioproxy stop`` and ``trioproxy servers``: commands that act on a
running trioproxy, found by its runtime file (:mod:`trioproxy.runtime`).

``servers`` is a small client of the management API (``server-proxy/api/servers``): the
runtime file gives the address and the token, so nobody needs curl and the token by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
import time
from typing import Any, NoReturn

from .runtime import Instance, pid_alive, running_instances

COMMANDS = {
    "list": "list the running trioproxy instances",
    "stop": "stop a running trioproxy (SIGTERM; waits until it has exited)",
    "servers": "show or control the servers of a running trioproxy: status, start, stop, restart, logs",
    "reload": "re-read the configuration of a running trioproxy",
}


class CommandError(Exception):
    """Reported as one line on stderr; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def run(command: str, argv: list[str]) -> NoReturn:
    """Run ``trioproxy <command> ARGV`` and exit."""
    try:
        code = _COMMANDS[command](argv)
    except CommandError as exc:
        print(f"trioproxy {command}: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"trioproxy {command}", description=description)


def _add_port(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    help_text = "the port of the trioproxy to talk to (needed when several run)"
    if positional:
        parser.add_argument("port", nargs="?", type=int, help=help_text)
    else:
        parser.add_argument("--port", type=int, help=help_text)


def choose(port: int | None) -> Instance:
    """The running trioproxy on ``port``, or the only one running."""
    instances = running_instances()
    if port is not None:
        for instance in instances:
            if instance.port == port:
                return instance
        raise CommandError(f"no running trioproxy on port {port}" + _which(instances))
    if not instances:
        raise CommandError("no running trioproxy found (trioproxy list shows them)")
    if len(instances) > 1:
        ports = ", ".join(str(instance.port) for instance in instances)
        raise CommandError(f"{len(instances)} trioproxy instances are running (ports {ports}); name one with its port", 2)
    return instances[0]


def _which(instances: list[Instance]) -> str:
    if not instances:
        return " (none is running)"
    return " (running: " + ", ".join(f"port {instance.port}" for instance in instances) + ")"


# -- list ---------------------------------------------------------------------------------


def list_command(argv: list[str]) -> int:
    parser = _parser("list", COMMANDS["list"] + ", with their URLs and tokens.")
    parser.add_argument("--json", action="store_true", help="print a JSON array instead")
    args = parser.parse_args(argv)
    instances = running_instances()
    if args.json:
        fields = ("url", "pid", "port", "base_url", "token", "version")
        print(json.dumps([{name: getattr(instance, name) for name in fields} for instance in instances], indent=2))
        return 0
    if not instances:
        print("No trioproxy is running.")
        return 0
    print("Running trioproxy instances:")
    for instance in instances:
        print(f"{instance.url_with_token()} :: pid {instance.pid}, port {instance.port}")
    return 0


# -- stop ---------------------------------------------------------------------------------


def stop_command(argv: list[str]) -> int:
    parser = _parser("stop", COMMANDS["stop"] + ". Its servers are stopped with it.")
    _add_port(parser, positional=True)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to exit (default 60)")
    args = parser.parse_args(argv)
    instance = choose(args.port)
    try:
        os.kill(instance.pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"trioproxy on port {instance.port} (pid {instance.pid}) had already exited")
        return 0
    except PermissionError:
        raise CommandError(f"not allowed to stop pid {instance.pid} (another user's trioproxy?)") from None
    deadline = time.monotonic() + args.timeout
    while pid_alive(instance.pid):
        if time.monotonic() > deadline:
            raise CommandError(f"trioproxy on port {instance.port} (pid {instance.pid}) did not exit within {args.timeout:g} s")
        time.sleep(0.05)
    print(f"stopped trioproxy on port {instance.port} (pid {instance.pid})")
    return 0


# -- the management API ---------------------------------------------------------------------


def _client(instance: Instance, timeout: float | None = 30.0) -> Any:
    import httpx

    headers = {"Accept": "application/json"}
    if instance.token:
        headers["Authorization"] = f"token {instance.token}"
    return httpx.Client(base_url=instance.url, headers=headers, timeout=timeout, verify=_verify(instance))


def _verify(instance: Instance) -> Any:
    """For HTTPS, trust exactly the certificate that trioproxy serves (named in its runtime
    file): it may be self-signed, and be made out for a name other than the address."""
    if not instance.url.startswith("https:") or not instance.certfile:
        return True
    context = ssl.create_default_context()
    context.check_hostname = False
    context.load_verify_locations(instance.certfile)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def _call(instance: Instance, method: str, path: str, **kwargs: Any) -> Any:
    import httpx

    try:
        with _client(instance, kwargs.pop("timeout", 30.0)) as client:
            response = client.request(method, path, **kwargs)
    except httpx.TimeoutException:
        raise CommandError(f"trioproxy at {instance.url} did not answer in time") from None
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach trioproxy at {instance.url}: {exc}") from None
    if response.status_code >= 400:
        raise CommandError(_api_message(response))
    return response


def _api_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    message = str(body.get("message") or f"HTTP {response.status_code}") if isinstance(body, dict) else ""
    output = body.get("output") if isinstance(body, dict) else None
    if output:
        message += "\n" + "\n".join(f"  {line}" for line in output)
    return message


def _server_path(name: str, action: str = "") -> str:
    from urllib.parse import quote

    return f"server-proxy/api/servers/{quote(name, safe='')}" + (f"/{action}" if action else "")


def servers_command(argv: list[str]) -> int:
    parser = _parser("servers", COMMANDS["servers"] + ".")
    _add_port(parser)
    parser.add_argument("action", nargs="?", default="status", choices=("status", "start", "stop", "restart", "logs"))
    parser.add_argument("name", nargs="?", help="the server (status without a name: every server)")
    parser.add_argument("--json", action="store_true", help="status as JSON")
    parser.add_argument("--tail", type=int, help="logs: the last N lines")
    parser.add_argument("-f", "--follow", action="store_true", help="logs: keep printing new output")
    args = parser.parse_args(argv)
    if args.action != "status" and not args.name:
        parser.error(f"{args.action} needs the name of a server")
    instance = choose(args.port)
    if args.action == "status":
        if args.name:
            servers = [_call(instance, "GET", _server_path(args.name)).json()]
        else:
            servers = _call(instance, "GET", "server-proxy/api/servers").json()["servers"]
        if args.json:
            print(json.dumps(servers if not args.name else servers[0], indent=2))
        else:
            _print_table(servers)
        return 0
    if args.action == "logs":
        return _logs(instance, args.name, args.tail, args.follow)
    method = "DELETE" if args.action == "stop" else "POST"
    path = _server_path(args.name) if args.action == "stop" else _server_path(args.name, args.action)
    # The API answers once the server is ready (or stopped); a start may take its timeout.
    server = _call(instance, method, path, timeout=None).json()
    print(f"{server['name']}: {server['state']}" + (f" ({server['reason']})" if server.get("reason") else ""))
    return 0


def _print_table(servers: list[dict[str, Any]]) -> None:
    rows = [("NAME", "STATE", "PID", "ADDRESS", "RESTARTS", "REASON")]
    for server in servers:
        address = server.get("unix_socket") or (str(server["port"]) if server.get("port") else "-")
        rows.append(
            (
                server["name"],
                server["state"],
                str(server["pid"] or "-"),
                address,
                str(server.get("restarts", 0)),
                server.get("reason") or "",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1])


def _logs(instance: Instance, name: str, tail: int | None, follow: bool) -> int:
    import httpx

    params: dict[str, str] = {}
    if tail is not None:
        params["tail"] = str(tail)
    if not follow:
        sys.stdout.write(_call(instance, "GET", _server_path(name, "logs"), params=params).text)
        return 0
    params["follow"] = "1"
    try:
        with _client(instance, timeout=None) as client:
            with client.stream("GET", _server_path(name, "logs"), params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    raise CommandError(_api_message(response))
                for chunk in response.iter_text():
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
    except httpx.HTTPError as exc:
        raise CommandError(f"lost the connection to trioproxy at {instance.url}: {exc}") from None
    return 0


# -- reload -------------------------------------------------------------------------------


def reload_command(argv: list[str]) -> int:
    parser = _parser("reload", COMMANDS["reload"] + ": servers added, removed or changed take effect.")
    _add_port(parser)
    parser.add_argument(
        "--when-idle", action="store_true", help="restart changed servers only once they have no requests under way"
    )
    args = parser.parse_args(argv)
    instance = choose(args.port)
    params = {"when": "idle"} if args.when_idle else {}
    result = _call(instance, "POST", "server-proxy/api/reload", params=params, timeout=None).json()
    for key in ("added", "removed", "changed"):
        if result.get(key):
            print(f"{key}: {', '.join(result[key])}")
    if not any(result.get(key) for key in ("added", "removed", "changed")):
        print("no change")
    # Servers whose options cannot work: the rest was applied, but this needs fixing.
    for why in sorted(result.get("invalid", {}).values()):
        print(f"trioproxy reload: {why}", file=sys.stderr)
    return 1 if result.get("invalid") else 0


_COMMANDS = {
    "list": list_command,
    "stop": stop_command,
    "servers": servers_command,
    "reload": reload_command,
}
