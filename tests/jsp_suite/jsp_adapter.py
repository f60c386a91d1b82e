"""pytest plugin: run jupyter-server-proxy's own tests against trioproxy.

Loaded into a pytest run inside the unpacked jupyter-server-proxy sdist with
``-p jsp_adapter`` (this directory on ``PYTHONPATH``); their files stay as released. It changes
two things only:

- their ``a_server`` fixture, which starts, awaits and stops ``jupyter notebook``/``lab``,
  starts, awaits and stops ``python -m trioproxy`` instead, on the same config file, port and
  token;
- the test ids listed in ``differences.toml`` beside this file are marked: ``skip`` for those
  that do not apply to trioproxy, strict ``xfail`` for known differences, so that a listed
  test that starts passing fails the run too.

With ``TRIOPROXY_JSP_TARGET=jupyter-server-proxy`` (the reference run) it leaves their fixture,
which starts a real Jupyter server with jupyter-server-proxy, and marks nothing; as root it
lets Jupyter run as root. Both runs use the same invocation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself needs tomli there
    import tomli as tomllib

HERE = Path(__file__).parent
DIFFERENCES = HERE / "differences.toml"
KINDS = {"deliberate difference", "stack limit", "not applicable"}
REFERENCE = os.environ.get("TRIOPROXY_JSP_TARGET", "trioproxy") == "jupyter-server-proxy"
_resources = Path()  # their tests/resources, learnt from their conftest


# Their a_server fixture runs each test twice, under "notebook" and "lab"; the listed names
# leave that first parameter out.
_SERVER_KIND = re.compile(r"\[(?:notebook|lab)(?:-|(?=\]))")


def load_differences(path: Path = DIFFERENCES) -> dict[str, dict[str, str]]:
    """Listed test → its kind and reason.

    A test is named by its function (``test_x``: every id of it) or by one id without the
    server kind (``test_x[params]`` for ``test_x[notebook-params]`` and ``test_x[lab-params]``).
    """
    with path.open("rb") as file:
        entries = tomllib.load(file)
    for name, entry in entries.items():
        if entry.get("kind") not in KINDS or not entry.get("reason") or set(entry) != {"kind", "reason"}:
            raise ValueError(f"{path.name}: {name!r} needs a kind (one of {sorted(KINDS)}) and a reason, only")
    return entries


def listed_name(test_name: str) -> str:
    """``test_x[notebook-a-b]`` → ``test_x[a-b]``; ``test_x[lab]`` → ``test_x``."""
    return _SERVER_KIND.sub("[", test_name, count=1).replace("[]", "")


@pytest.fixture(scope="session")
def a_server(
    a_server_cmd: str, tmp_path_factory: pytest.TempPathFactory, an_unused_port: int, a_token: str
) -> Iterator[str]:
    """trioproxy on their config, port and token, in place of ``jupyter notebook``/``lab``."""
    config = _resources / "jupyter_server_config.py"
    log_path = tmp_path_factory.mktemp(a_server_cmd) / "trioproxy.log"
    url = f"http://127.0.0.1:{an_unused_port}/"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "trioproxy", "--config", str(config), f"--port={an_unused_port}",
             f"--token={a_token}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_up(f"{url}server-proxy/servers-info?token={a_token}", process, log_path)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError("trioproxy did not stop within 20 s of SIGINT") from None
        sys.stdout.write(log_path.read_text())  # captured: shown with the session's reports


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"trioproxy exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    raise AssertionError(f"trioproxy did not answer {url} within 30 s:\n{log_path.read_text()}")


def pytest_configure(config: pytest.Config) -> None:
    if REFERENCE and hasattr(os, "geteuid") and os.geteuid() == 0:
        # Jupyter refuses to run as root (as CI does here) unless allowed; its config path
        # is the one way in that leaves their fixture's command line as it is.
        directory = Path(tempfile.mkdtemp(prefix="jsp-reference-"))
        (directory / "jupyter_config.json").write_text(json.dumps({"ServerApp": {"allow_root": True}}))
        os.environ["JUPYTER_CONFIG_PATH"] = os.pathsep.join(filter(None, [str(directory), os.environ.get("JUPYTER_CONFIG_PATH")]))
        config.add_cleanup(partial(shutil.rmtree, directory, ignore_errors=True))


@pytest.hookimpl(tryfirst=True)
def pytest_plugin_registered(plugin: Any, manager: Any) -> None:
    # Their conftest's fixtures are parsed when it is registered, just after this hook: put
    # ours in its place first (a plugin's fixture would lose to a conftest's of the same name).
    if REFERENCE or getattr(plugin, "__name__", "") != "conftest" or not hasattr(plugin, "a_server"):
        return
    global _resources
    _resources = Path(plugin.RESOURCES)
    plugin.a_server = a_server


def listed_as(test_name: str, differences: dict[str, dict[str, str]]) -> str | None:
    """The key under which a test (``test_x[notebook-params]``) is listed, if it is."""
    name = listed_name(test_name)
    function = test_name.partition("[")[0]
    return name if name in differences else function if function in differences else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REFERENCE:
        return
    if _resources == Path():
        raise pytest.UsageError("no a_server fixture found in their conftest.py to start trioproxy instead")
    differences = load_differences()
    used: set[str] = set()
    for item in items:
        key = listed_as(item.name, differences)
        if key is None:
            continue
        used.add(key)
        entry = differences[key]
        reason = f"{entry['kind']}: {entry['reason']}"
        if entry["kind"] == "not applicable":
            item.add_marker(pytest.mark.skip(reason=reason))
        else:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
    unused = sorted(set(differences) - used)
    if unused and not config.getoption("keyword") and not config.getoption("markexpr"):
        raise pytest.UsageError(f"{DIFFERENCES.name} lists tests that do not exist: {', '.join(unused)}")
