"""Error responses: what a browser and an API client get."""

from __future__ import annotations

from typing import Any

from trioproxy.errors import render_error, send_error


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
