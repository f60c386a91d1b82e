"""The package matrix: the jupyter-*-proxy packages people install, unchanged, behind trioproxy
and behind jupyter-server-proxy 4.6, given the same configuration.

The current releases (pinned in tests/packages/requirements.txt) are installed outside
site-packages (.ci/run: ``pip install --no-deps --target .venv/package-matrix``) and reach only the
two servers started here, through PYTHONPATH: one trioproxy and one Jupyter Server with
jupyter-server-proxy, both under the base URL /user/e2e/, from the same directory, with the same
environment and PATH. The programs the packages start are stand-ins (tests/packages/standin.py)
first on that PATH, answering like the real apps' first pages.

For each package: its entry point loads in trioproxy; its first pages, relayed with the package's
own options and callables (command and environment callables, ``rewrite_response``,
``absolute_url``, ``request_headers_override``, ``raw_socket_proxy`` …), answer with the same
status, Location, Set-Cookie and Content-Type through both proxies (differences are failures unless
tests/packages/differences.toml lists them with a reason); and both proxies started the stand-in
with the same command line, environment and working directory, and relayed the same paths to it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

import trioproxy

from .e2e_helpers import (
    VENV_BIN,
    Service,
    answers,
    clean_env,
    free_port,
    new_marker,
    services_cleaned_up,
    start_service,
    wait_until,
)
from .packages.matrix import (
    CASES,
    FIELDS,
    STANDIN,
    TARGET,
    TENSORBOARD_PORT,
    Case,
    Normalizer,
    compare,
    differences,
    install_command,
    pins,
    write_standins,
)
from .packages.standin import RFB_VERSION, Marimo, MatlabProxyManager

pytestmark = pytest.mark.e2e

BASE = "/user/e2e/"
TOKEN = "package-matrix-" + secrets.token_hex(8)
IDS = [case.server for case in CASES]
TRIOPROXY = "trioproxy"
JSP = "jupyter-server-proxy"


@dataclass
class Matrix:
    urls: dict[str, str]  # proxy -> http://127.0.0.1:<port>
    services: dict[str, Service]
    records: Path
    normalizer: Normalizer

    def client(self, proxy: str) -> httpx.Client:
        return httpx.Client(base_url=self.urls[proxy] + BASE, headers={"Authorization": f"token {TOKEN}"}, timeout=60)

    def log(self, proxy: str) -> str:
        return self.services[proxy].log()

    def logs(self) -> str:
        return "\n".join(f"--- {name}:\n{service.log()[-4000:]}" for name, service in self.services.items())


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _require_installed(target: Path = TARGET, env: Mapping[str, str] = os.environ) -> None:
    """Skip only where the packages were never installed and this is not CI (CI installs them)."""
    if not target.is_dir():
        message = f"the package matrix is not installed in {target}; run: {install_command()}"
        if env.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    _require_installed()
    tmp = tmp_path_factory.mktemp("package-matrix")
    bin_dir, work, home, tmpdir, records = (tmp / name for name in ("bin", "work", "home", "tmpdir", "records"))
    write_standins(bin_dir)
    for folder in (work, home, tmpdir, records, work / "sub", tmp / "config", tmp / "data", tmp / "runtime"):
        folder.mkdir()
    (work / "app.py").write_text("import panel as pn\n\npn.panel('matrix').servable()\n")  # jupyter-panel-proxy serves it
    jupyter_config = tmp / "jupyter_config.py"
    jupyter_config.write_text("c.ServerApp.jpserver_extensions = {'panel.io.jupyter_server_extension': False}\n")
    wait_until(lambda: _port_is_free(TENSORBOARD_PORT), timeout=60, what=f"port {TENSORBOARD_PORT} (jupyter-tensorboard-proxy's) to be free")
    marker = new_marker()
    # The trioproxy the tests import (this checkout), then the packages.
    source = Path(trioproxy.__file__).resolve().parent.parent
    common = clean_env(
        marker,
        PYTHONPATH=os.pathsep.join([str(source), str(TARGET)]),
        HOME=str(home),
        TMPDIR=str(tmpdir),
        JUPYTERHUB_SERVICE_PREFIX=BASE,  # jupyter-marimo-proxy needs it (marimo's --base-url)
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_DATA_DIR=str(tmp / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        STANDIN_RECORDS=str(records),
    )
    common["PATH"] = f"{bin_dir}{os.pathsep}{common['PATH']}"
    ports = {TRIOPROXY: free_port(), JSP: free_port()}
    with services_cleaned_up(marker) as started:
        trio_service = start_service(
            TRIOPROXY,
            [sys.executable, "-m", "trioproxy", "--port", str(ports[TRIOPROXY]), "--token", TOKEN, "--base-url", BASE],
            {**common, "STANDIN_PROXY": TRIOPROXY}, work, tmp,
        )
        started.append(trio_service)
        jsp_service = start_service(
            JSP,
            [
                str(VENV_BIN / "jupyter"), "server", "--allow-root", f"--ServerApp.token={TOKEN}",
                "--ServerApp.open_browser=False", f"--ServerApp.root_dir={work}", "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={ports[JSP]}", "--ServerApp.port_retries=0", f"--ServerApp.base_url={BASE}",
                f"--config={jupyter_config}",
            ],
            {**common, "STANDIN_PROXY": JSP}, work, tmp,
        )
        started.append(jsp_service)
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        services = {TRIOPROXY: trio_service, JSP: jsp_service}
        wait_until(answers(f"{urls[TRIOPROXY]}{BASE}login"), timeout=60, what="trioproxy", services=tuple(started))
        wait_until(answers(f"{urls[JSP]}{BASE}api"), timeout=90, what="Jupyter Server", services=tuple(started))
        yield Matrix(urls, services, records, Normalizer(set(ports.values()), tmp))


def test_the_pinned_releases_are_installed() -> None:
    _require_installed()
    installed = {}
    for info in TARGET.glob("*.dist-info"):
        name, version = info.name.removesuffix(".dist-info").rsplit("-", 1)
        installed[name.lower().replace("_", "-")] = version
    expected = pins()
    assert {name: installed.get(name) for name in expected} == expected, f"reinstall: {install_command()}"
    assert {case.distribution for case in CASES} <= set(expected)


def _load_error(log: str, server: str) -> str:
    lines = [line for line in log.splitlines() if repr(server) in line and ("skipping" in line or "error" in line.lower())]
    return "\n".join(lines) or "(no line in trioproxy's log names it)"


def _require_loaded(matrix: Matrix, case: Case) -> None:
    if case.server not in _trioproxy_servers(matrix):
        pytest.fail(
            f"trioproxy did not load {case.distribution}'s entry point: {_load_error(matrix.log(TRIOPROXY), case.server)}",
            pytrace=False,
        )


def _trioproxy_servers(matrix: Matrix) -> dict[str, Any]:
    with matrix.client(TRIOPROXY) as client:
        listing = client.get("server-proxy/api/servers")
    assert listing.status_code == 200, matrix.logs()
    return {server["name"]: server for server in listing.json()["servers"]}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_entry_point_loads(matrix: Matrix, case: Case) -> None:
    with matrix.client(JSP) as client:
        info = client.get("server-proxy/servers-info")
    assert info.status_code == 200, matrix.logs()
    # The reference first: jupyter-server-proxy loads it with the stand-ins on PATH.
    assert case.server in [server["name"] for server in info.json()["server_processes"]], matrix.log(JSP)[-4000:]
    _require_loaded(matrix, case)


def _servers_info(matrix: Matrix, proxy: str) -> dict[str, Any]:
    with matrix.client(proxy) as client:
        info = client.get("server-proxy/servers-info")
    assert info.status_code == 200, matrix.log(proxy)[-4000:]
    return {item["name"]: item for item in info.json()["server_processes"]}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_launcher_entry_as_jupyter_server_proxy(matrix: Matrix, case: Case) -> None:
    # What JupyterLab's launcher shows and where it leads (title, path_info, icon, new tab).
    theirs = _servers_info(matrix, JSP)[case.server]
    _require_loaded(matrix, case)
    ours = _servers_info(matrix, TRIOPROXY)[case.server]
    key = f"{case.server}.servers-info"
    listed = differences()
    if key in listed:
        assert ours != theirs, f"differences.toml lists {key!r}, but both answer the same: remove it"
    else:
        assert ours == theirs


def _relay(matrix: Matrix, proxy: str, case: Case) -> list[dict[str, Any]]:
    with matrix.client(proxy) as client:
        return [matrix.normalizer.answer(*_get(client, path)) for path, _ in case.requests]


def _get(client: httpx.Client, path: str) -> tuple[int, httpx.Headers]:
    response = client.get(path)
    return response.status_code, response.headers


def _stop_in_trioproxy(matrix: Matrix, server: str) -> None:
    with matrix.client(TRIOPROXY) as client:
        stopped = client.delete(f"server-proxy/api/servers/{server}")
        assert stopped.status_code < 300, stopped.text
        wait_until(lambda: _port_is_free(TENSORBOARD_PORT), timeout=30, what=f"trioproxy's {server} to stop")


def _records(matrix: Matrix, proxy: str, case: Case) -> list[dict[str, Any]]:
    found = []
    for path in matrix.records.glob(f"{case.program}-*.json"):
        record = json.loads(path.read_text())
        if record["proxy"] == proxy and case.argv_has in " ".join(record["argv"]):
            requests = path.with_name(path.stem + ".requests.jsonl")
            lines = requests.read_text().splitlines() if requests.exists() else []
            record["requests"] = [json.loads(line) for line in lines]
            found.append(record)
    return found


def _relayed_paths(record: dict[str, Any]) -> list[str]:
    # The client's requests, not jupyter-server-proxy's own readiness checks.
    return [request["path"] for request in record["requests"] if request["headers"].get("user-agent", "").startswith("python-httpx")]


def _command_problems(matrix: Matrix, case: Case) -> list[str]:
    """Both proxies started the stand-in the same way and relayed the same paths to it."""
    seen = {proxy: _records(matrix, proxy, case) for proxy in (TRIOPROXY, JSP)}
    if len(seen[TRIOPROXY]) != 1 or len(seen[JSP]) != 1:
        return [f"expected one {case.program} per proxy, found {[(p, len(r)) for p, r in seen.items()]}"]
    ours, theirs = seen[TRIOPROXY][0], seen[JSP][0]
    normalize = matrix.normalizer
    problems = []
    for what, get in (
        ("argv", normalize.argv),
        ("environment", normalize.env),
        ("working directory", lambda record: record["cwd"]),
        ("paths relayed", _relayed_paths),
    ):
        if get(ours) != get(theirs):
            problems.append(f"{what}: trioproxy {get(ours)!r}, jupyter-server-proxy {get(theirs)!r}")
    return problems


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_answers_as_jupyter_server_proxy(matrix: Matrix, case: Case) -> None:
    loaded = case.server in _trioproxy_servers(matrix)
    ours = _relay(matrix, TRIOPROXY, case) if loaded else None
    if case.server == "tensorboard" and loaded:
        _stop_in_trioproxy(matrix, case.server)  # its fixed port is jupyter-server-proxy's next
    theirs = _relay(matrix, JSP, case)
    # The reference answers as the stand-in means: the matrix itself works.
    assert [answer["status"] for answer in theirs] == [status for _, status in case.requests], (theirs, matrix.log(JSP)[-4000:])
    _require_loaded(matrix, case)
    assert ours is not None
    problems = compare(case, ours, theirs, differences())
    if not case.websocket:  # raw_socket_proxy: the HTTP request never reaches the backend
        problems += _command_problems(matrix, case)
    assert not problems, "\n".join(problems) + "\n" + matrix.log(TRIOPROXY)[-1500:]


async def _rfb_exchange(matrix: Matrix, proxy: str) -> list[bytes | str]:
    url = matrix.urls[proxy].replace("http://", "ws://") + BASE + "desktop-websockify/"
    headers = [(b"authorization", f"token {TOKEN}".encode()), (b"origin", matrix.urls[proxy].encode())]
    with trio.fail_after(60):
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            greeting = await ws.get_message()
            await ws.send_message(RFB_VERSION)
            return [greeting, await ws.get_message()]


async def test_desktop_websocket_reaches_the_vnc_socket(matrix: Matrix) -> None:
    case = next(case for case in CASES if case.websocket)
    theirs = await _rfb_exchange(matrix, JSP)
    assert theirs == [RFB_VERSION, b"\x01\x01"], matrix.log(JSP)[-4000:]
    _require_loaded(matrix, case)
    ours = await _rfb_exchange(matrix, TRIOPROXY)
    assert ours == theirs, matrix.log(TRIOPROXY)[-1500:]
    problems = _command_problems(matrix, case)
    assert not problems, "\n".join(problems)



# -- the matrix's own parts, without servers ----------------------------------------------------


def test_a_missing_install_skips_outside_ci_and_fails_in_ci(tmp_path: Path) -> None:
    _require_installed(tmp_path, {})  # there: nothing to say
    with pytest.raises(pytest.skip.Exception, match="pip install --no-deps --target"):
        _require_installed(tmp_path / "missing", {})
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        _require_installed(tmp_path / "missing", {"CI": "true"})


def test_pins_are_read_from_requirements() -> None:
    found = pins()
    assert found["jupyter-rsession-proxy"] == "2.5.1" and found["jupyter-remote-desktop-proxy"] == "3.0.1"
    assert all(version and "#" not in version for version in found.values())


def test_compare_reports_unlisted_differences_and_stale_entries() -> None:
    case = next(case for case in CASES if case.server == "rstudio")
    same = {"status": 302, "location": "/x", "set-cookie": [], "content-type": "text/html"}
    other = {**same, "location": "/y"}
    second = {**same, "status": 200}
    assert compare(case, [same, second], [same, second], {}) == []
    assert compare(case, [same, second], [other, second], {}) == [
        "rstudio/ location: trioproxy '/x', jupyter-server-proxy '/y'"
    ]
    assert compare(case, [same, second], [other, second], {"rstudio.rstudio/.location": "why"}) == []
    # A listed difference that is gone fails (others' entries are not this case's business).
    listed = {"rstudio.rstudio/.status": "why", "shiny.shiny/.status": "why"}
    assert compare(case, [same, second], [same, second], listed) == [
        "differences.toml lists 'rstudio.rstudio/.status', but both answer the same: remove it"
    ]


def test_every_listed_difference_names_a_request_of_the_matrix() -> None:
    keys = {f"{case.server}.{path}.{field}" for case in CASES for path, _ in case.requests for field in FIELDS}
    keys |= {f"{case.server}.servers-info" for case in CASES}
    for key, reason in differences().items():
        assert key in keys and reason.strip(), key


def test_normalizer_replaces_only_what_must_differ(tmp_path: Path) -> None:
    normalize = Normalizer({8888}, tmp_path)
    assert normalize.text("http://127.0.0.1:8888/a http://localhost:4321/b") == "http://{proxy}/a http://{backend}/b"
    record = {
        "listen": "port:4321",
        "argv": ["--port", "4321", "--token-password", "s3cret", f"--key={tmp_path}/tmpdir/tmpab12", "--root=/user/e2e/x/"],
        "env": {"MWI_MPM_PORT": "4321", "MWI_MPM_AUTH_TOKEN": "t", "USER": "me"},
    }
    assert normalize.argv(record) == ["--port", "{port}", "--token-password", "{secret}", "--key={tmpfile}", "--root=/user/e2e/x/"]
    assert normalize.env(record) == {"MWI_MPM_PORT": "{port}", "MWI_MPM_AUTH_TOKEN": "{per-process}", "USER": "me"}
    headers = httpx.Headers([("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "_xsrf=2"), ("Location", "http://127.0.0.1:8888/")])
    assert normalize.answer(302, headers) == {
        "status": 302, "location": "http://{proxy}/", "set-cookie": ["a=1; Path=/"], "content-type": None,
    }


def _standin(program: str, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(STANDIN), program, *args], capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "STANDIN_RECORDS": "", **(env or {})},
    )


def test_a_stand_in_without_its_address_exits_with_the_reason() -> None:
    result = _standin("marimo", "edit", "--headless")
    assert result.returncode != 0 and "marimo: found no port or socket in ['edit', '--headless']" in result.stderr
    result = _standin("vncserver", "-geometry", "1x1")
    assert result.returncode != 0 and "expected -rfbunixpath PATH and -fg" in result.stderr
    result = _standin("emacs")
    assert result.returncode != 0 and "no stand-in for 'emacs'" in result.stderr
    # rserver --help lists what jupyter-rsession-proxy probes for.
    result = _standin("rserver", "--help")
    assert result.returncode == 0 and "--www-socket" in result.stdout and "--www-root-path" in result.stdout


def test_stand_ins_refuse_requests_without_the_packages_headers() -> None:
    # request_headers_override is what lets these through: without it, the real apps refuse too.
    marimo = Marimo("marimo", ["edit", "--port", "1", "--base-url", "/b/marimo", "--token-password", "pw"])
    assert marimo.answer("GET", "/b/marimo/", {})[0] == 401
    good = "Basic " + base64.b64encode(b" :pw").decode()
    assert marimo.answer("GET", "/b/marimo/", {"authorization": good})[0] == 200
    matlab = MatlabProxyManager("matlab-proxy-manager-app", [])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MWI_MPM_AUTH_TOKEN", "tok")
        patch.setenv("MWI_MPM_BASE_URL_PREFIX", "/b/")
        assert matlab.answer("GET", "/b/matlab/", {})[0] == 403
        assert matlab.answer("GET", "/b/matlab/", {"mwi-mpm-auth-token": "tok"})[:2] == (
            302, [("Location", "/b/matlab/default/"), ("Content-Type", "text/plain; charset=utf-8")]
        )
