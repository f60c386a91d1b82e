"""trioproxy.relay.header_map.HeaderMap behaves as Tornado's HTTPHeaders, which callables
written for jupyter-server-proxy were written against: each case runs the same operations on
both (Tornado is installed with jupyter_server) and compares everything that can be read."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import trio
from tornado.httputil import HTTPHeaders

from trioproxy.relay.header_map import HeaderMap

from .conftest import echo_command, start_proxy

RAW = [(b"content-type", b"text/html"), (b"set-cookie", b"a=1"), (b"SET-COOKIE", b"b=2"), (b"location", b"http://x:1/")]


def both() -> tuple[HeaderMap, HTTPHeaders]:
    ours = HeaderMap.from_raw(RAW)
    theirs = HTTPHeaders()
    for name, value in RAW:
        theirs.add(name.decode(), value.decode())
    return ours, theirs


def readings(headers: Any) -> dict[str, Any]:
    return {
        "get_all": list(headers.get_all()),
        "dict": dict(headers),
        "keys": list(headers.keys()),
        "values": list(headers.values()),
        "items": list(headers.items()),
        "iter": list(headers),
        "len": len(headers),
        "cookies": headers.get_list("set-cookie"),
        "joined": headers.get("Set-Cookie"),
        "item": headers["CONTENT-TYPE"],
        "missing": headers.get("x-none", "default"),
        "in": ("location" in headers, "Location" in headers, "x-none" in headers),
        "str": str(headers),
    }


OPERATIONS: dict[str, Callable[[Any], Any]] = {
    "nothing": lambda h: None,
    "add": lambda h: h.add("set-cookie", "c=3"),
    "set replaces repeats": lambda h: h.__setitem__("Set-Cookie", "only"),
    "delete": lambda h: h.__delitem__("set-cookie"),
    "pop": lambda h: h.pop("Location"),
    "pop missing with default": lambda h: h.pop("x-none", None),
    "setdefault present": lambda h: h.setdefault("content-type", "x"),
    "setdefault absent": lambda h: h.setdefault("x-new", "y"),
    "update": lambda h: h.update({"content-type": "text/plain", "x-extra": "1"}),
    "set new in lower case": lambda h: h.__setitem__("x-frame-options", "DENY"),
    "rewrite Location while iterating": lambda h: [
        h.__setitem__(name, "http://y/") for name, _ in h.get_all() if name == "Location"
    ],
}


@pytest.mark.parametrize("operation", OPERATIONS, ids=list(OPERATIONS))
def test_same_as_tornados_http_headers(operation: str) -> None:
    ours, theirs = both()
    assert OPERATIONS[operation](ours) == OPERATIONS[operation](theirs)
    assert readings(ours) == readings(theirs)
    assert readings(ours.copy()) == readings(theirs.copy())
    assert readings(copy.copy(ours)) == readings(copy.copy(theirs))


def test_missing_names_raise_as_in_tornado() -> None:
    ours, theirs = both()
    for headers in (ours, theirs):
        with pytest.raises(KeyError):
            headers["x-none"]
        with pytest.raises(KeyError):
            del headers["x-none"]


def test_raw_keeps_every_value_in_lower_case() -> None:
    ours, _ = both()
    ours.add("X-Added", "1")
    assert ours.raw() == [(n.lower(), v) for n, v in RAW] + [(b"x-added", b"1")]


def _rewrite_location(response: Any, request: Any) -> None:
    # The pattern of jupyter-rsession-proxy's callable: every header, names compared as
    # Tornado gives them, the Location pointed at the host the client used.
    for name, value in response.headers.get_all():
        if name == "Location":
            response.headers[name] = value.replace("backend.example:8787", request.host)


def _replace_headers_with_a_dict(response: Any) -> None:
    response.headers = {**dict(response.headers), "X-Replaced": "yes"}


async def test_callables_using_tornados_header_api_work_through_the_relay(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(
        nursery,
        {
            "rs": {"command": echo_command(), "rewrite_response": _rewrite_location},
            "dict": {"command": echo_command(), "rewrite_response": _replace_headers_with_a_dict},
        },
    )
    async with proxy.client(follow_redirects=False) as client:
        response = await client.get("rs/redirect", params={"to": "http://backend.example:8787/auth-sign-in"})
        assert response.status_code == 302
        host = proxy.url.split("/")[2]
        assert response.headers["location"] == f"http://{host}/auth-sign-in"
        replaced = await client.get("dict/x")
        assert replaced.status_code == 200 and replaced.headers["x-replaced"] == "yes"


def test_the_request_offers_its_cookies_as_tornado_does() -> None:
    from trioproxy.admission import relayed_request

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/app/",
        "raw_path": b"/app/",
        "query_string": b"",
        "headers": [(b"host", b"h"), (b"cookie", b"a=1; session=xyz"), (b"cookie", b"b=2")],
    }
    request = relayed_request(scope)
    assert {name: morsel.value for name, morsel in request.cookies.items()} == {"a": "1", "session": "xyz", "b": "2"}
    assert request.get_cookie("session") == "xyz" and request.get_cookie("none", "d") == "d"


def _failing_rewrite(response: Any) -> None:
    raise ValueError("the package's own bug")


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_failing_callable_is_named_and_logged_with_its_traceback(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    proxy = await start_proxy(nursery, {"bad": {"command": echo_command(), "rewrite_response": _failing_rewrite}})
    async with proxy.client() as client:
        response = await client.request(method, "bad/x", content=b"a body" if method == "POST" else None)
    assert response.status_code == 500
    name = f"{__name__}._failing_rewrite"
    assert response.json()["message"] == f"bad: the rewrite_response callable {name} raised ValueError: the package's own bug"
    (record,) = [r for r in caplog.records if r.name == "trioproxy.app" and r.levelname == "ERROR"]
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    assert "_failing_rewrite" in caplog.text.split("Traceback", 1)[1]  # the package's frame is shown
    assert "ExceptionGroup" not in response.text
