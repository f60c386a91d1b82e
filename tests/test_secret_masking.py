"""Secrets on servers' command lines and in their environments never reach trioproxy's log or
its API answers: a real trioproxy starting a server as the marimo packages do
(``--token-password <token>``), and the masking rules themselves."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import BACKENDS, PY, ProxyProcess, launch_trioproxy, start_proxy
from trioproxy.auth import (
    MASK,
    learn_secrets,
    mask_argv,
    mask_environment,
    mask_secrets,
    secret_option,
    secret_variable,
)

pytestmark = pytest.mark.timeout(120)
TOKEN = "masking-proxy-token-42"
ARGV_ENV = str(BACKENDS / "argv_env.py")
SECRETS = {
    "option": "marimo-token-7f3a9c",  # --token-password X
    "equals": "api-key-b81d0e",  # --api-key=X
    "env": "pg-password-c0ffee",  # APP_PASSWORD
    "env_token": "gh-token-5e5e5e",  # GH_TOKEN
}


def wait_until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_secrets_are_masked_in_the_log_the_api_and_trioproxy_servers(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    command = [
        PY, ARGV_ENV, "{port}",
        "--token-password", SECRETS["option"],
        f"--api-key={SECRETS['equals']}",
        "--auth", TOKEN,  # trioproxy's own secret, substituted by the config
        "--port-hint", "visible-argument",
    ]  # fmt: skip
    environment = {"APP_PASSWORD": SECRETS["env"], "GH_TOKEN": SECRETS["env_token"], "MARK": "visible-mark"}
    config = tmp_path / "cfg.py"
    config.write_text(
        f"c.ServerProxy.servers = {{'marimo-like': {{'command': {command!r}, 'environment': {environment!r}}}}}\n"
    )
    runtime = tmp_path / "runtime"
    proxy = launch_trioproxy(
        ["--port", "0", "--token", TOKEN, "--debug", "--config", str(config)], env={"JUPYTER_RUNTIME_DIR": str(runtime)}
    )
    proxy_processes.append(proxy)
    answers: list[str] = []
    with httpx.Client(base_url=proxy.base, headers={"Authorization": f"token {TOKEN}"}, timeout=30) as http:
        relayed = http.get("marimo-like/").json()
        port = http.get("server-proxy/api/servers/marimo-like").json()["port"]
        # The server itself got the real values: only what is shown is masked.
        assert relayed["argv"][:4] == ["--token-password", SECRETS["option"], f"--api-key={SECRETS['equals']}", "--auth"]
        assert relayed["env"]["APP_PASSWORD"] == SECRETS["env"]
        wait_until(lambda: "my password is" in http.get("server-proxy/api/servers/marimo-like/logs").text)
        # A learned secret in a path, and secrets in a query (marimo takes ?access_token=).
        query = f"access_token={SECRETS['option']}&x=1&Password=hunter-two-zz&token={TOKEN}&tokenizer=bpe"
        assert http.get(f"marimo-like/files/{SECRETS['env']}?{query}").status_code == 200
        for path in (
            "server-proxy/api/servers",
            "server-proxy/api/servers/marimo-like",
            "server-proxy/api/servers/marimo-like/logs",
            "server-proxy/servers-info",
        ):
            answers.append(http.get(path).text)
    logs = answers[2]
    assert f"started with: --token-password {MASK} --api-key={MASK} --auth {MASK} --port-hint visible-argument" in logs
    assert f"my password is {MASK}" in logs  # the app printed its own password: learned, masked

    run_env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    for args in (["servers"], ["servers", "--json"], ["servers", "logs", "marimo-like"]):
        result = subprocess.run([PY, "-m", "trioproxy", *args], capture_output=True, text=True, timeout=60, env=run_env)
        assert result.returncode == 0, result.stderr
        answers.append(result.stdout + result.stderr)
    assert "marimo-like" in answers[-2] and MASK in answers[-1]

    wait_until(lambda: "my password is" in proxy.output())
    output = proxy.output()
    started = next(line for line in output.splitlines() if "marimo-like: started pid" in line)
    assert started.endswith(
        f"{ARGV_ENV} {port} --token-password {MASK} --api-key={MASK} --auth {MASK} --port-hint visible-argument"
    ), started
    assert f"marimo-like: environment added: APP_PASSWORD={MASK} GH_TOKEN={MASK} MARK=visible-mark" in output
    assert f"my password is {MASK}" in output
    wait_until(lambda: "GET /marimo-like/files/" in proxy.output())
    access = next(line for line in proxy.output().splitlines() if "GET /marimo-like/files/" in line)
    assert f"GET /marimo-like/files/{MASK}?access_token={MASK}&x=1&Password={MASK}&tokenizer=bpe 200 " in access
    output = proxy.output()
    for text in [output, *answers]:
        for name, secret in SECRETS.items():
            assert secret not in text, (name, text)
        assert TOKEN not in text and "hunter-two-zz" not in text
    assert proxy.stop() == 0


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["app", "--token", "abc"], ["app", "--token", MASK]),
        (["app", "--token=abc"], ["app", f"--token={MASK}"]),
        (["app", "--token="], ["app", "--token="]),  # empty: nothing to hide, and it says so
        (["marimo", "edit", "--token-password", "x"], ["marimo", "edit", "--token-password", MASK]),
        (["jupyter", "--NotebookApp.token=x", "--ServerApp.password", "h"], ["jupyter", f"--NotebookApp.token={MASK}", "--ServerApp.password", MASK]),
        (["app", "--auth-token", "t", "--api-key", "k", "--client-secret=s"], ["app", "--auth-token", MASK, "--api-key", MASK, f"--client-secret={MASK}"]),
        (["app", "--no-token", "serve"], ["app", "--no-token", "serve"]),
        (["app", "--token", "--port", "1"], ["app", "--token", "--port", "1"]),  # a flag, not a value
        (["app", "--tokenizer", "bpe", "--port", "1"], ["app", "--tokenizer", "bpe", "--port", "1"]),
        (["app", "http://h/?token=abc"], ["app", f"http://h/?token={MASK}"]),
        (["llm", "--max-tokens", "4096"], ["llm", "--max-tokens", "4096"]),  # a count
    ],
)
def test_secret_looking_options_are_masked(argv: list[str], shown: list[str]) -> None:
    assert mask_argv(argv) == shown


@pytest.mark.parametrize(
    ("query", "shown"),
    [
        (b"", ""),
        (b"x=1&y=%2F", "x=1&y=%2F"),  # as sent: nothing re-encoded
        (b"token=abc&x=1", "x=1"),
        (b"access_token=abc&api_key=k&PASSWORD=p&client-secret=s", f"access_token={MASK}&api_key={MASK}&PASSWORD={MASK}&client-secret={MASK}"),
        (b"tokenizer=bpe&max_tokens=5&keyboard=us&flag", "tokenizer=bpe&max_tokens=5&keyboard=us&flag"),
        (b"password", "password"),  # a name alone holds nothing
    ],
)
def test_query_strings_in_the_access_log(query: bytes, shown: str) -> None:
    from trioproxy.auth import query_for_log

    assert query_for_log(query) == shown


def test_known_secrets_are_masked_in_any_argument() -> None:
    assert mask_argv(["app", "--auth", "known-secret-1"], known=["known-secret-1"]) == ["app", "--auth", MASK]


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("JUPYTERHUB_API_TOKEN", True),
        ("GH_TOKEN", True),
        ("PGPASSWORD", True),
        ("APP_PASSWORD", True),
        ("CLIENT_SECRET", True),
        ("OPENAI_API_KEY", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("PGHOST", False),
        ("HOME", False),
        ("KEYRING_BACKEND", False),
        ("MONKEY", False),
        ("TOKENIZERS_PARALLELISM", False),
    ],
)
def test_secret_variables(name: str, secret: bool) -> None:
    assert secret_variable(name) is secret
    masked = mask_environment({name: "value-123", "UNSET": None})
    assert masked == {name: MASK if secret else "value-123", "UNSET": None}


def test_secret_options() -> None:
    assert secret_option("--password") and secret_option("-token") and secret_option("--IdentityProvider.token=x")
    assert not secret_option("token") and not secret_option("--no-password") and not secret_option("--port")


def test_free_text_masks_options_and_learned_values() -> None:
    line = "running marimo edit --token-password abc --port 1, then x --password=def"
    assert mask_secrets(line) == f"running marimo edit --token-password {MASK} --port 1, then x --password={MASK}"
    learn_secrets(["learned-value-1", "short"])
    assert mask_secrets("the value is learned-value-1 and short") == f"the value is {MASK} and short"


@pytest.mark.parametrize(
    ("settings", "secret"),
    [
        ({"environment": {"API_TOKEN": 98765432, "HOME": "/h"}}, "98765432"),
        ({"command": ["app", "--password", "hunter2-pw", 5]}, "hunter2-pw"),
    ],
)
def test_a_value_of_the_wrong_type_is_reported_without_its_secrets(
    settings: dict[str, object], secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    from trioproxy.config import load_server

    process = load_server("web", settings)
    assert process.config_error is not None and process.config_error.startswith("option ")
    assert MASK in process.config_error and secret not in process.config_error
    assert "this server will not start" in caplog.text and secret not in caplog.text


async def test_a_failed_start_is_reported_by_the_api_without_the_secret(nursery: trio.Nursery) -> None:
    secret = "callable-secret-9d9d9d"

    def command() -> list[str]:
        raise ValueError(f"cannot run app --token-password {secret}")

    proxy = await start_proxy(nursery, {"app": {"command": command}})
    async with proxy.client() as client:
        refused = await client.get("app/")
        assert refused.status_code == 503
        status = (await client.get("server-proxy/api/servers/app")).json()
        listed = (await client.get("server-proxy/api/servers")).text
    assert status["state"] == "failed"
    assert f"the command callable failed: ValueError: cannot run app --token-password {MASK}" in status["reason"]
    for text in (refused.text, str(status), listed):
        assert secret not in text


@pytest.mark.parametrize("line", ["--" + "a-" * 50_000, "--token-" * 12_500, "x-" * 50_000 + "token=abc"])
def test_masking_a_long_line_takes_one_pass(line: str) -> None:
    """Every pattern is anchored so a line is scanned about once: masking these 100 KB lines
    took minutes when a pattern started at every word boundary, milliseconds now."""
    started = time.monotonic()
    masked = mask_secrets(line)
    assert time.monotonic() - started < 5
    assert ("abc" not in masked) if line.endswith("token=abc") else masked == line


def test_learned_secrets_are_bounded_and_the_latest_kept() -> None:
    from trioproxy.auth import MAX_LEARNED

    learn_secrets([f"rotating-token-{index:05d}" for index in range(MAX_LEARNED + 10)])
    latest = f"rotating-token-{MAX_LEARNED + 9:05d}"
    assert mask_secrets(f"value {latest}") == f"value {MASK}"
    assert mask_secrets("value rotating-token-00000") == "value rotating-token-00000"  # the oldest, forgotten
