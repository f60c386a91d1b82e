"""``rewrite_response``: let configured callables change a buffered response.

Each callable gets, by the names it asks for, ``response`` (a :class:`RewritableResponse` to
change in place), ``orig_response`` (the response as the backend sent it), ``request``,
``host``, ``port`` and ``path``, as in jupyter-server-proxy. They run in order, each seeing
what the one before it left.

What a callable leaves is checked before the next one runs: a final status (200 to 599: a
1xx such as 101 cannot end a response), headers that HTTP can carry, a body of bytes or text.
A callable that raises or leaves anything else fails the response with :class:`RewriteError`,
which names the callable (the relay answers 500 with it); nothing it produced is sent.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import http.cookies
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import CallableFailed, describe_callable
from ..options import header_name_problem, header_value_problem
from ..templating import call_with_asked_args
from .header_map import HeaderList, HeaderMap, headers_of


@dataclass
class RewritableResponse:
    """A response a rewrite callable may change: code, reason, headers and body."""

    code: int
    headers: HeaderMap
    body: bytes
    reason: str = ""

    def __setattr__(self, name: str, value: Any) -> None:
        # Changing the code resets a reason that was only the old code's standard phrase.
        if name == "code" and "code" in self.__dict__ and self.reason == _phrase(self.code):
            object.__setattr__(self, "reason", _phrase(value))
        object.__setattr__(self, name, value)


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


class MissingArgumentError(LookupError):
    """``get_argument`` without a default, for an argument the request does not have."""

    def __init__(self, name: str) -> None:
        super().__init__(f"missing argument {name!r}")
        self.arg_name = name


_NO_DEFAULT: Any = object()
# Control characters other than whitespace become spaces in argument values, as in Tornado.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0e-\x1f]")


@dataclass
class RelayedRequest:
    """What ``rewrite_response`` and ``update_last_activity`` callables see of the client's request.

    It offers what such callables use of Tornado's request (``method``, ``uri``, ``path``,
    ``query``, ``headers``, ``arguments``, ``host``, ``remote_ip``…) and, since
    jupyter-server-proxy passes ``update_last_activity`` its request *handler*, of the
    handler too: ``request`` (this object again) and ``get_argument(s)``,
    ``get_query_argument(s)``, ``get_body_argument(s)``. Request bodies are streamed to the
    backend, never parsed, so body arguments are always empty.
    """

    method: str
    uri: str
    path: str
    query: str
    headers: HeaderMap
    host: str
    remote_ip: str | None
    protocol: str = "http"
    version: str = "HTTP/1.1"
    body: bytes = b""

    @property
    def request(self) -> RelayedRequest:
        return self

    @property
    def host_name(self) -> str:
        return urlsplit("//" + self.host).hostname or ""

    def full_url(self) -> str:
        return f"{self.protocol}://{self.host}{self.uri}"

    @functools.cached_property
    def cookies(self) -> dict[str, http.cookies.Morsel[str]]:
        """The request's cookies by name, as Tornado's ``request.cookies`` gives them."""
        jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
        for header in self.headers.get_list("Cookie"):
            with contextlib.suppress(http.cookies.CookieError):  # Tornado skips what does not parse
                jar.load(header)
        return dict(jar)

    def get_cookie(self, name: str, default: str | None = None) -> str | None:
        morsel = self.cookies.get(name)
        return morsel.value if morsel is not None else default

    @functools.cached_property
    def query_arguments(self) -> dict[str, list[bytes]]:
        # As Tornado: names decoded, values the raw bytes of the percent-decoded value.
        parsed = parse_qs(self.query, keep_blank_values=True, encoding="latin-1")
        return {
            name.encode("latin-1").decode("utf-8", "replace"): [value.encode("latin-1") for value in values]
            for name, values in parsed.items()
        }

    @property
    def arguments(self) -> dict[str, list[bytes]]:
        return self.query_arguments

    @property
    def body_arguments(self) -> dict[str, list[bytes]]:
        return {}

    def get_argument(self, name: str, default: Any = _NO_DEFAULT, strip: bool = True) -> Any:
        return _last(name, self.get_arguments(name, strip), default)

    def get_arguments(self, name: str, strip: bool = True) -> list[str]:
        return _decoded(self.arguments.get(name, []), strip)

    def get_query_argument(self, name: str, default: Any = _NO_DEFAULT, strip: bool = True) -> Any:
        return _last(name, self.get_query_arguments(name, strip), default)

    def get_query_arguments(self, name: str, strip: bool = True) -> list[str]:
        return _decoded(self.query_arguments.get(name, []), strip)

    def get_body_argument(self, name: str, default: Any = _NO_DEFAULT, strip: bool = True) -> Any:
        return _last(name, [], default)

    def get_body_arguments(self, name: str, strip: bool = True) -> list[str]:
        return []


def _decoded(values: list[bytes], strip: bool) -> list[str]:
    texts = [_CONTROL_CHARS.sub(" ", value.decode("utf-8", "replace")) for value in values]
    return [text.strip() for text in texts] if strip else texts


def _last(name: str, values: list[str], default: Any) -> Any:
    if values:
        return values[-1]
    if default is _NO_DEFAULT:
        raise MissingArgumentError(name)
    return default


class RewriteError(Exception):
    """A ``rewrite_response`` callable that raised or left a response that cannot be sent."""


def response_problem(response: RewritableResponse, headers_before: Collection[tuple[str, str]] = ()) -> str | None:
    """Why ``response`` cannot be sent as it is, or None. Headers in ``headers_before`` (what
    the backend sent, as our parser accepted it) are not checked again."""
    code = response.code
    if isinstance(code, bool) or not isinstance(code, int) or not 200 <= code <= 599:
        return f"set the status to {code!r}; a final response needs 200 to 599"
    if not isinstance(response.headers, Mapping):
        return f"replaced the headers with a {type(response.headers).__name__}"
    for name, value in headers_of(response.headers).get_all():
        if (name, value) in headers_before:
            continue
        problem = header_name_problem(name) or header_value_problem(name, value)
        if problem is not None:
            return f"set {problem}"
    if not isinstance(response.body, (bytes, str)):
        return f"set the body to a {type(response.body).__name__}, not bytes or str"
    if code in (204, 304) and response.body:
        return f"set a body on a {code} response, which has none"
    return None


@dataclass
class RewriteContext:
    request: RelayedRequest
    host: str
    port: int | None
    path: str


def apply_rewrites(
    rewrites: Sequence[Callable[..., Any]],
    context: RewriteContext,
    status: int,
    reason: bytes,
    headers: HeaderList,
    body: bytes,
) -> tuple[int, HeaderList, bytes]:
    """Run the chain; return the final status, headers (with a fresh Content-Length) and body.

    Raises RewriteError naming the callable that failed or left something unsendable."""
    original = RewritableResponse(
        code=status,
        headers=HeaderMap.from_raw(headers),
        body=body,
        reason=reason.decode("latin-1") or _phrase(status),
    )
    response = copy.copy(original)
    response.headers = original.headers.copy()
    for rewrite in rewrites:
        headers_before = set(response.headers.get_all()) if isinstance(response.headers, HeaderMap) else set()
        try:
            call_with_asked_args(
                rewrite,
                {
                    "response": response,
                    "orig_response": original,
                    "request": context.request,
                    "host": context.host,
                    "port": context.port,
                    "path": context.path,
                },
            )
        except Exception as exc:
            raise CallableFailed("rewrite_response", rewrite) from exc
        problem = response_problem(response, headers_before)
        if problem is not None:
            raise RewriteError(f"the rewrite_response callable {describe_callable(rewrite)} {problem}")
    body_out = response.body if isinstance(response.body, bytes) else str(response.body).encode()
    raw = [(n, v) for n, v in headers_of(response.headers).raw() if n != b"content-length"]
    raw.append((b"content-length", str(len(body_out)).encode()))
    return int(response.code), raw, body_out
