"""Error responses: what a browser and an API client get."""

from __future__ import annotations

import re
from typing import Any

import trio

from trioproxy.errors import render_error, send_error
from trioproxy.relay.websocket import refuse_websocket
from trioproxy.supervisor import State

from .conftest import PY, start_proxy


async def test_a_passing_condition_refreshes_the_page_and_says_when_to_retry() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await send_error(send, [(b"accept", b"text/html")], 503, "web: starting", server="web", retry_after=1.5)
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 503 and headers[b"retry-after"] == b"2"
    assert "<meta http-equiv='refresh' content='2'>" in sent[1]["body"].decode()


def test_a_lasting_error_does_not_refresh() -> None:
    _, page = render_error(503, "web: failed", as_json=False, server="web")
    assert b"refresh" not in page
    content_type, document = render_error(503, "web: starting", as_json=True, retry_after=3)
    assert content_type == b"application/json" and b"refresh" not in document


async def test_pages_for_a_server_backing_off_refresh_themselves(nursery: trio.Nursery) -> None:
    crash = {
        "command": [PY, "-c", "import sys; sys.exit(3)"],
        "timeout": 1,
        "backoff_initial": 5,
        "backoff_max": 5,
        "max_failures": 10,
    }
    proxy = await start_proxy(nursery, {"crash": crash})
    supervisor = proxy.supervisors["crash"]
    async with proxy.client() as client:
        first = await client.get("crash/", headers={"Accept": "application/json"})
        # Exited before it was ready; the first failure restarts at once.
        assert first.status_code == 503 and first.headers["retry-after"] == "2", first.headers
        with trio.fail_after(10):
            await supervisor.wait_for_state(State.BACKOFF)
        # A request waits for the server (timeout: 1 s) while it backs off for 5 s (±10 %).
        page = await client.get("crash/", headers={"Accept": "text/html"})
        assert page.status_code == 504
        refresh = re.search(r"<meta http-equiv='refresh' content='(\d+)'>", page.text)
        assert refresh is not None and 2 <= int(refresh[1]) <= 5, page.text
        document = await client.get("crash/", headers={"Accept": "application/json"})
        assert document.status_code == 504 and 1 <= int(document.headers["retry-after"]) <= 4



async def test_pages_for_a_server_that_will_not_come_back_do_not_refresh(nursery: trio.Nursery) -> None:
    # Exit code 0 before it was ready: stopped, not restarted; only a new request starts it.
    proxy = await start_proxy(nursery, {"done": {"command": [PY, "-c", "pass"]}})
    async with proxy.client() as client:
        page = await client.get("done/", headers={"Accept": "text/html"})
    assert page.status_code == 503 and "retry-after" not in page.headers
    assert "refresh" not in page.text and proxy.supervisors["done"].state is State.STOPPED


async def test_a_websocket_refused_while_a_server_starts_says_when_to_retry() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "headers": [(b"accept", b"text/html")], "extensions": {"websocket.http.response": {}}}
    await refuse_websocket(scope, receive, send, 503, "starting", "web", retry_after=2.0)
    assert sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"retry-after"] == b"2"
    assert b"<meta http-equiv='refresh' content='2'>" in sent[1]["body"]
